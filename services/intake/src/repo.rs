//! All database access. Every state change is committed, with its event row (and audit row), in
//! one transaction before anyone is told; transitions are conditional on the expected state.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, Order,
    QueryFilter, QueryOrder, QuerySelect,
};
use yidi_audit::{self as audit, AuditEntry};
use yidi_domain::ApplicationState;
use yidi_outbox::{self as outbox, NewMessage};
use yidi_runtime::db;

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
    /// What the change settles and owes, committed with it.
    pub messages: Messages,
}

/// The outbox side of a change: the message it answers (marked delivered) and the messages it
/// owes (queued), in the change's own transaction.
#[derive(Debug, Default)]
pub struct Messages {
    pub delivered: Option<String>,
    /// Messages about this subject still owed that the change makes pointless, and why.
    pub dropped: Option<(String, String)>,
    pub owed: Vec<NewMessage>,
}

impl Messages {
    pub fn owe(message: NewMessage) -> Self {
        Self { owed: vec![message], ..Self::default() }
    }

    pub fn answering(message_id: &str) -> Self {
        Self { delivered: Some(message_id.to_owned()), ..Self::default() }
    }

    /// Drops what is still owed about `subject` (before queueing what this change owes).
    pub fn dropping(mut self, subject: &str, why: impl Into<String>) -> Self {
        self.dropped = Some((subject.to_owned(), why.into()));
        self
    }

    pub fn and_owe(mut self, message: Option<NewMessage>) -> Self {
        self.owed.extend(message);
        self
    }

    async fn write<C: sea_orm::ConnectionTrait>(self, db: &C) -> Result<(), DbErr> {
        if let Some(id) = self.delivered {
            outbox::complete(db, &id).await?;
        }
        if let Some((subject, why)) = self.dropped {
            outbox::drop_owed(db, &subject, &why).await?;
        }
        for message in self.owed {
            outbox::enqueue(db, message).await?;
        }
        Ok(())
    }
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

    /// Inserts a new application in RECEIVED with its first event (and audit row) and the
    /// messages it owes.
    pub async fn insert_application(
        &self,
        model: application::Model,
        note: &str,
        audit: Option<AuditEntry>,
        messages: Messages,
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
        messages.write(&txn).await?;
        txn.commit().await
    }

    /// The outbox messages about an application, oldest first.
    pub async fn messages(&self, application_id: &str) -> Result<Vec<outbox::Model>, DbErr> {
        outbox::for_subject(&self.db, application_id).await
    }

    pub async fn messages_for(&self, ids: &[String]) -> Result<Vec<outbox::Model>, DbErr> {
        outbox::for_subjects(&self.db, ids).await
    }

    pub async fn audit(&self, entry: AuditEntry, at: DateTime<Utc>) -> Result<(), DbErr> {
        audit::append(&self.db, at, entry).await
    }

    /// The application lodged by the keyed request `key`, if any.
    pub async fn by_request_key(&self, key: &str) -> Result<Option<application::Model>, DbErr> {
        application::Entity::find().filter(application::Column::RequestKey.eq(key)).one(&self.db).await
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
        t.messages.write(&txn).await?;
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
        messages: Messages,
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
        messages.write(&txn).await?;
        txn.commit().await?;
        Ok(true)
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
    use yidi_domain::ApplicationKind;
    use yidi_intake_migration::{Migrator, MigratorTrait};
    use yidi_outbox::MessageState;

    use super::*;

    fn received(id: &str) -> application::Model {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        application::Model {
            application_id: id.into(),
            kind: ApplicationKind::Renewal.as_str().into(),
            state: ApplicationState::Received.as_str().into(),
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
            request_key: None,
            created_at: at,
            updated_at: at,
        }
    }

    /// The change and the messages it owes commit together, or neither does.
    #[tokio::test]
    async fn a_transition_that_does_not_apply_queues_nothing_and_one_that_does_settles_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("intake.db").display());
        let db = Database::connect(url).await.unwrap();
        Migrator::up(&db, None).await.unwrap();
        let repo = Repo::new(db);
        let owed = Messages::owe(NewMessage::new("verify", "app-1", "home-jiangxi"));
        repo.insert_application(received("app-1"), "received", None, owed).await.unwrap();
        let verify = repo.messages("app-1").await.unwrap().remove(0);
        assert_eq!(verify.message_state(), Some(MessageState::Pending));

        let transition = |from, messages| Transition {
            application_id: "app-1",
            from,
            to: ApplicationState::Approved,
            changes: changes(),
            condition: None,
            note: "approved".into(),
            audit: None,
            messages,
        };
        let now = Utc::now();
        // Not in APPROVED's predecessor: nothing changes, nothing is queued or settled.
        let messages = Messages::answering(&verify.id).and_owe(Some(NewMessage::new("place_order", "app-1", "p")));
        assert!(!repo.transition(transition(&[ApplicationState::Verifying], messages), now).await.unwrap());
        let after = repo.messages("app-1").await.unwrap();
        assert_eq!((after.len(), after[0].message_state()), (1, Some(MessageState::Pending)));

        let messages = Messages::answering(&verify.id).and_owe(Some(NewMessage::new("place_order", "app-1", "p")));
        assert!(repo.transition(transition(&[ApplicationState::Received], messages), now).await.unwrap());
        let after = repo.messages("app-1").await.unwrap();
        let states: Vec<_> = after.iter().map(|m| (m.topic.as_str(), m.message_state())).collect();
        assert_eq!(states, [("verify", Some(MessageState::Delivered)), ("place_order", Some(MessageState::Pending))]);
    }
}
