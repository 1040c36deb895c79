//! `early_closes`: a station's close (as cancelled) of an application this bureau had not yet
//! verified (K5). A later Verify of that application is refused and opens nothing.
use sea_orm::entity::prelude::*;

use super::StoredClosedState;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "early_closes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub application_id: String,
    pub station_id: String,
    pub final_state: StoredClosedState,
    pub closed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
