use sea_orm::entity::prelude::*;

use super::CardStatusColumn;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "status_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub sequence: i64,
    pub card_serial: String,
    pub status: CardStatusColumn,
    pub changed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
