use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "status_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub sequence: i64,
    pub card_serial: String,
    /// `StoredCardStatus::as_str` of the new status.
    pub status: String,
    pub changed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
