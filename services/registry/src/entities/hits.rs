use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "hits")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub card_serial: String,
    pub id_number: String,
    pub home_bureau_id: String,
    pub relying_party: String,
    pub checked_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
