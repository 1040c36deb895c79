use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "loss_reports")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub card_serial: String,
    #[sea_orm(unique)]
    pub decision_id: String,
    pub reported_at: DateTimeUtc,
    pub withdrawn_at: Option<DateTimeUtc>,
    #[sea_orm(unique)]
    pub withdraw_decision_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
