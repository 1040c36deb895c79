use sea_orm::entity::prelude::*;

use super::CardStatusColumn;

/// One change of the replicas' ordered log: the card as it stands after it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "registry_feed")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub sequence: i64,
    pub card_serial: String,
    pub id_number: String,
    pub home_bureau_id: String,
    pub status: CardStatusColumn,
    pub valid_until: Option<Date>,
    pub status_changed_at: DateTimeUtc,
    pub status_event: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
