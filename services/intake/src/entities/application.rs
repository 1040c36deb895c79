use sea_orm::entity::prelude::*;

use super::stored::{Document, Kind, State};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "applications")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub application_id: String,
    pub kind: Kind,
    pub state: State,
    pub id_number: String,
    pub declared_province: String,
    pub home_bureau_id: String,
    pub previous_card_serial: String,
    pub document_kind: Document,
    pub live_face_template: Vec<u8>,
    pub live_fingerprint_template: Vec<u8>,
    pub refusal_reason: Option<String>,
    pub decision: Option<Vec<u8>>,
    pub loss_decision: Option<Vec<u8>>,
    pub loss_recorded: bool,
    pub order_id: Option<String>,
    pub new_card_serial: Option<String>,
    pub home_notified: bool,
    /// W3C `traceparent` of the request that lodged it: the worker's calls continue that trace.
    pub trace_context: Option<String>,
    /// Caller, method and `idempotency-key` of the request that lodged it, if keyed; unique.
    pub request_key: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
