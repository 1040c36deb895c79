//! `orders`: one card order per signed ISSUE_CARD decision.
use sea_orm::entity::prelude::*;

use crate::order::OrderState;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub order_id: Uuid,
    #[sea_orm(unique)]
    pub decision_id: String,
    pub application_id: String,
    pub station_id: String,
    pub id_number: String,
    #[sea_orm(unique)]
    pub card_serial: String,
    pub state: OrderState,
    /// The signed decision as received (`pb::SignedDecision`, protobuf bytes), forwarded verbatim.
    pub signed_decision: Vec<u8>,
    pub valid_from: Date,
    pub valid_until: Option<Date>,
    pub ready_at: DateTimeUtc,
    pub attempts: i32,
    pub last_error: String,
    /// The registry refused the card definitively: the worker does not retry it.
    pub retry_stopped: bool,
    /// W3C `traceparent` of the PlaceOrder request: the worker's calls continue that trace.
    pub trace_context: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
