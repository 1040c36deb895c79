//! `verifications`: one row per Verify answered (approved or refused); also the bureau's record
//! of every application of its citizens, wherever lodged (K5).
use chrono::NaiveDate;
use sea_orm::entity::prelude::*;

use super::{StoredClosedState, StoredKind, StoredOutcome, StoredPurpose};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "verifications")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub application_id: String,
    pub purpose: StoredPurpose,
    pub station_id: String,
    pub id_number: String,
    /// None for a withdrawal.
    pub kind: Option<StoredKind>,
    pub outcome: StoredOutcome,
    /// Refusal code (`RefusalReason::code`).
    pub refusal_reason: Option<String>,
    pub decision_id: Option<String>,
    pub loss_decision_id: Option<String>,
    /// The encoded `VerifyResponse`, replayed unchanged for a repeated request.
    #[sea_orm(column_type = "Blob")]
    pub response: Vec<u8>,
    /// Term of the card the ISSUE_CARD decision authorises (for CloseApplication).
    pub valid_from: Option<NaiveDate>,
    pub valid_until: Option<NaiveDate>,
    /// True for an approved ISSUE_CARD until CloseApplication (K5).
    pub open: bool,
    pub closed_state: Option<StoredClosedState>,
    pub closed_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
