//! All database access. Every state change is committed, with its event row (and audit row), in
//! one transaction before anyone is told; transitions are conditional on the expected state.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, Order,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use yidi_common::audit::{self, AuditEntry};
use yidi_domain::ApplicationState;

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

    /// Inserts a new application in RECEIVED with its first event.
    pub async fn insert_application(&self, model: application::Model, note: &str) -> Result<(), DbErr> {
        let txn = self.db.begin().await?;
        let at = model.created_at;
        let id = model.application_id.clone();
        let state = model.state.clone();
        application::ActiveModel::from(model).insert(&txn).await?;
        insert_event(&txn, &id, &state, at, note).await?;
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

    /// Applications the worker may have something to do for: not final and not halted (halted
    /// ones are left to operators), or collected/cancelled with the home bureau not yet told
    /// (halted or not: telling the home bureau is always retried).
    pub async fn pending(&self) -> Result<Vec<application::Model>, DbErr> {
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
        application::Entity::find()
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(application::Column::State.is_in(open))
                            .add(application::Column::Halted.eq(false)),
                    )
                    .add(
                        Condition::all()
                            .add(application::Column::State.is_in(closing))
                            .add(application::Column::HomeNotified.eq(false)),
                    ),
            )
            .order_by(application::Column::CreatedAt, Order::Asc)
            .all(&self.db)
            .await
    }

    /// Applies a transition if the row is still in one of `from`. Returns whether it applied.
    pub async fn transition(&self, t: Transition<'_>, now: DateTime<Utc>) -> Result<bool, DbErr> {
        let txn = self.db.begin().await?;
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
        let txn = self.db.begin().await?;
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
