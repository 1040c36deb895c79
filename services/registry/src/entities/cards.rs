use sea_orm::entity::prelude::*;

use super::CardStatusColumn;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "cards")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub serial: String,
    pub id_number: String,
    pub home_bureau_id: String,
    pub status: CardStatusColumn,
    pub valid_from: Date,
    pub valid_until: Option<Date>,
    #[sea_orm(unique)]
    pub decision_id: Option<String>,
    pub producer_id: Option<String>,
    pub status_changed_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
    /// The card whose collection revoked this one (S1).
    pub revoked_by: Option<String>,
    /// C3: the station that lodged the application the card was made for; None for imported cards.
    pub station_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
