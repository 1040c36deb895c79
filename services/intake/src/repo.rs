//! All database access. Every state change is committed, with its event row (and audit row), in
//! one transaction before anyone is told; transitions are conditional on the expected state.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, Order,
    QueryFilter, QueryOrder, QuerySelect,
};
use yidi_common::{
    audit::{self, AuditEntry},
    db,
};
use yidi_domain::{ApplicationKind, ApplicationState};

use crate::entities::{application, application_event};

/// A state transition: `from` (one of) → `to`, with the columns that change alongside.
#[derive(Debug)]
pub struct Transition<'a> {
    pub application_id: &'a str,
    pub from: &'a [ApplicationState],
    pub to: ApplicationState,
    /// Further columns to set (only `Set` values are written).
    pub changes: application::ActiveModel,
    /// An extra condition the row must meet (e.g. a loss report not yet recorded).
    pub condition: Option<Condition>,
    pub note: String,
    pub audit: Option<AuditEntry>,
}

#[derive(Debug, Clone)]
pub struct Repo {
    db: DatabaseConnection,
}

fn empty_changes() -> application::ActiveModel {
    application::ActiveModel { ..Default::default() }
}

impl Repo {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Inserts a new application in RECEIVED with its first event (and audit row).
    pub async fn insert_application(
        &self,
        model: application::Model,
        note: &str,
        audit: Option<AuditEntry>,
    ) -> Result<(), DbErr> {
        let txn = db::begin(&self.db).await?;
        let at = model.created_at;
        let id = model.application_id.clone();
        let state = model.state.clone();
        application::ActiveModel::from(model).insert(&txn).await?;
        insert_event(&txn, &id, &state, at, note).await?;
        if let Some(entry) = audit {
            audit::append(&txn, at, entry).await?;
        }
        txn.commit().await
    }

    pub async fn audit(&self, entry: AuditEntry, at: DateTime<Utc>) -> Result<(), DbErr> {
        audit::append(&self.db, at, entry).await
    }

    pub async fn get(&self, application_id: &str) -> Result<Option<application::Model>, DbErr> {
        application::Entity::find_by_id(application_id.to_owned()).one(&self.db).await
    }

    pub async fn events(&self, application_id: &str) -> Result<Vec<application_event::Model>, DbErr> {
        application_event::Entity::find()
            .filter(application_event::Column::ApplicationId.eq(application_id))
            .order_by(application_event::Column::Id, Order::Asc)
            .all(&self.db)
            .await
    }

    pub async fn events_for(&self, ids: &[String]) -> Result<Vec<application_event::Model>, DbErr> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        application_event::Entity::find()
            .filter(application_event::Column::ApplicationId.is_in(ids.iter().cloned()))
            .order_by(application_event::Column::Id, Order::Asc)
            .all(&self.db)
            .await
    }

    /// Newest first.
    pub async fn list(
        &self,
        state: Option<ApplicationState>,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<application::Model>, DbErr> {
        let mut query = application::Entity::find();
        if let Some(state) = state {
            query = query.filter(application::Column::State.eq(state.as_str()));
        }
        query
            .order_by(application::Column::CreatedAt, Order::Desc)
            .order_by(application::Column::ApplicationId, Order::Desc)
            .offset(offset)
            .limit(limit)
            .all(&self.db)
            .await
    }

    /// Ids of the applications the worker may have something to do for, oldest first: open and
    /// not halted (halted ones are left to operators; a recorded loss report is final), or
    /// collected/cancelled with the home bureau not yet told (halted or not: telling the home
    /// bureau is always retried). Final rows that need nothing are not read.
    pub async fn pending(&self) -> Result<Vec<String>, DbErr> {
        let open: Vec<&str> = [
            ApplicationState::Received,
            ApplicationState::Verifying,
            ApplicationState::Approved,
            ApplicationState::InProduction,
        ]
        .iter()
        .map(|s| s.as_str())
        .collect();
        let closing = [ApplicationState::Collected.as_str(), ApplicationState::Cancelled.as_str()];
        let recorded_loss_report = Condition::all()
            .add(application::Column::Kind.eq(ApplicationKind::LossReport.as_str()))
            .add(application::Column::LossRecorded.eq(true));
        application::Entity::find()
            .select_only()
            .column(application::Column::ApplicationId)
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(application::Column::State.is_in(open))
                            .add(application::Column::Halted.eq(false))
                            .add(recorded_loss_report.not()),
                    )
                    .add(
                        Condition::all()
                            .add(application::Column::State.is_in(closing))
                            .add(application::Column::HomeNotified.eq(false)),
                    ),
            )
            .order_by(application::Column::CreatedAt, Order::Asc)
            .into_tuple::<String>()
            .all(&self.db)
            .await
    }

    /// Applies a transition if the row is still in one of `from`. Returns whether it applied.
    pub async fn transition(&self, t: Transition<'_>, now: DateTime<Utc>) -> Result<bool, DbErr> {
        let txn = db::begin(&self.db).await?;
        let mut changes = t.changes;
        changes.state = Set(t.to.as_str().to_owned());
        changes.updated_at = Set(now);
        let from: Vec<&str> = t.from.iter().map(|s| s.as_str()).collect();
        let mut filter = Condition::all()
            .add(application::Column::ApplicationId.eq(t.application_id))
            .add(application::Column::State.is_in(from));
        if let Some(condition) = t.condition {
            filter = filter.add(condition);
        }
        let result = application::Entity::update_many().set(changes).filter(filter).exec(&txn).await?;
        if result.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(false);
        }
        insert_event(&txn, t.application_id, t.to.as_str(), now, &t.note).await?;
        if let Some(entry) = t.audit {
            audit::append(&txn, now, entry).await?;
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Changes columns other than the state, if the row is still in `state`.
    pub async fn update_in_state(
        &self,
        application_id: &str,
        state: ApplicationState,
        mut changes: application::ActiveModel,
        audit: Option<AuditEntry>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbErr> {
        let txn = db::begin(&self.db).await?;
        changes.updated_at = Set(now);
        let result = application::Entity::update_many()
            .set(changes)
            .filter(application::Column::ApplicationId.eq(application_id))
            .filter(application::Column::State.eq(state.as_str()))
            .exec(&txn)
            .await?;
        if result.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(false);
        }
        if let Some(entry) = audit {
            audit::append(&txn, now, entry).await?;
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Records a failed call to a peer: attempts + 1, the error, when to try again, and whether
    /// to stop retrying; only if the row is still in `ran_in`, the state the failing step ran in
    /// (a cancel meanwhile must not be marked with the failure, nor halted).
    #[allow(clippy::too_many_arguments)]
    pub async fn record_failure(
        &self,
        application_id: &str,
        ran_in: ApplicationState,
        attempts: i32,
        error: &str,
        next_attempt_at: Option<DateTime<Utc>>,
        halt: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, DbErr> {
        let mut changes = empty_changes();
        changes.attempts = Set(attempts);
        changes.last_error = Set(Some(error.chars().take(1000).collect()));
        changes.next_attempt_at = Set(next_attempt_at);
        changes.halted = Set(halt);
        self.update_in_state(application_id, ran_in, changes, None, now).await
    }
}

async fn insert_event<C: sea_orm::ConnectionTrait>(
    db: &C,
    application_id: &str,
    state: &str,
    at: DateTime<Utc>,
    note: &str,
) -> Result<(), DbErr> {
    application_event::ActiveModel {
        application_id: Set(application_id.to_owned()),
        state: Set(state.to_owned()),
        at: Set(at),
        note: Set(note.to_owned()),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(())
}

/// A fresh set of changes (nothing set).
pub fn changes() -> application::ActiveModel {
    empty_changes()
}

#[cfg(test)]
mod tests {
    use sea_orm::Database;
    use yidi_intake_migration::{Migrator, MigratorTrait};

    use super::*;

    fn row(id: &str, kind: ApplicationKind, state: ApplicationState, at: i64) -> application::Model {
        let at = DateTime::from_timestamp(at, 0).unwrap_or_default();
        application::Model {
            application_id: id.into(),
            kind: kind.as_str().into(),
            state: state.as_str().into(),
            id_number: "360102199003071243".into(),
            declared_province: "36".into(),
            home_bureau_id: "home-jiangxi".into(),
            previous_card_serial: String::new(),
            document_kind: "household_register_book".into(),
            live_face_template: vec![1; 64],
            live_fingerprint_template: vec![2; 64],
            refusal_reason: None,
            decision: None,
            loss_decision: None,
            loss_recorded: false,
            order_id: None,
            new_card_serial: None,
            home_notified: false,
            halted: false,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            trace_context: None,
            created_at: at,
            updated_at: at,
        }
    }

    #[tokio::test]
    async fn pending_skips_final_rows_that_need_nothing_but_closes_halted_cancelled_ones() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("pending.db").display());
        let db = Database::connect(url).await.unwrap();
        Migrator::up(&db, None).await.unwrap();
        let repo = Repo::new(db);
        use ApplicationKind as K;
        use ApplicationState as S;
        let mut rows = vec![
            row("open", K::Renewal, S::Verifying, 1),
            row("loss-filing", K::LossReport, S::Approved, 2),
            row("refused", K::Renewal, S::Refused, 3),
            row("ready", K::Renewal, S::ReadyForCollection, 4),
        ];
        let mut recorded = row("loss-recorded", K::LossReport, S::Approved, 5);
        recorded.loss_recorded = true;
        let mut halted = row("halted", K::Renewal, S::Verifying, 6);
        halted.halted = true;
        let mut halted_cancelled = row("halted-cancelled", K::Renewal, S::Cancelled, 7);
        halted_cancelled.halted = true;
        let mut told = row("told", K::Renewal, S::Collected, 8);
        told.home_notified = true;
        let mut replacement = row("replacement", K::Replacement, S::Approved, 9);
        replacement.loss_recorded = true;
        rows.extend([recorded, halted, halted_cancelled, told, replacement]);
        for model in rows {
            repo.insert_application(model, "test", None).await.unwrap();
        }
        assert_eq!(repo.pending().await.unwrap(), ["open", "loss-filing", "halted-cancelled", "replacement"]);
    }
}
