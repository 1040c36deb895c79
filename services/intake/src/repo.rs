//! All database access. Every state change is committed, with its event row (and audit row), in
//! one transaction before anyone is told; transitions are conditional on the expected state.
//! Callers describe changes in domain terms ([`NewApplication`], [`Changes`]); the rows are built here.
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveEnum, ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection,
    DbBackend, DbErr, EntityTrait, FromQueryResult, Order, QueryFilter, QueryOrder, QuerySelect, Statement,
};
use yidi_audit::{self as audit, AuditEntry};
use yidi_domain::{ApplicationKind, ApplicationState, DocumentKind, RefusalReason};
use yidi_grpc::page::TimeId;
use yidi_outbox::{self as outbox, NewMessage};
use yidi_runtime::db;

use crate::entities::{application, application_event, stored::State};

/// An application as lodged at the counter; it starts RECEIVED.
#[derive(Debug, Clone)]
pub struct NewApplication {
    pub application_id: String,
    pub kind: ApplicationKind,
    pub id_number: String,
    pub declared_province: String,
    pub home_bureau_id: String,
    pub previous_card_serial: String,
    pub document_kind: DocumentKind,
    pub live_face_template: Vec<u8>,
    pub live_fingerprint_template: Vec<u8>,
    /// W3C `traceparent` of the request that lodged it.
    pub trace_context: Option<String>,
    /// Caller, method and `idempotency-key` of the request that lodged it, if keyed.
    pub request_key: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// The columns a change sets besides the state; `None` (or `false`) leaves a column as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// The card concerned, as the home bureau names it.
    pub previous_card_serial: Option<String>,
    pub refusal_reason: Option<RefusalReason>,
    /// The home bureau's signed decision, encoded.
    pub decision: Option<Vec<u8>>,
    /// The decision to file the loss report with, encoded (replacements).
    pub loss_decision: Option<Vec<u8>>,
    /// The registry recorded the loss report.
    pub loss_recorded: bool,
    pub order_id: Option<String>,
    pub new_card_serial: Option<String>,
    pub home_notified: Option<bool>,
}

impl Changes {
    fn into_active_model(self) -> application::ActiveModel {
        let mut row = application::ActiveModel { ..Default::default() };
        if let Some(serial) = self.previous_card_serial {
            row.previous_card_serial = Set(serial);
        }
        if let Some(reason) = self.refusal_reason {
            row.refusal_reason = Set(Some(reason.code().to_owned()));
        }
        if let Some(decision) = self.decision {
            row.decision = Set(Some(decision));
        }
        if let Some(decision) = self.loss_decision {
            row.loss_decision = Set(Some(decision));
        }
        if self.loss_recorded {
            row.loss_recorded = Set(true);
        }
        if let Some(order_id) = self.order_id {
            row.order_id = Set(Some(order_id));
        }
        if let Some(serial) = self.new_card_serial {
            row.new_card_serial = Set(Some(serial));
        }
        if let Some(notified) = self.home_notified {
            row.home_notified = Set(notified);
        }
        row
    }
}

/// A state transition: `from` (one of) → `to`, with the columns that change alongside.
#[derive(Debug)]
pub struct Transition<'a> {
    pub application_id: &'a str,
    pub from: &'a [ApplicationState],
    pub to: ApplicationState,
    pub changes: Changes,
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
    /// Messages about this subject, of these topics, that the change answers without their being
    /// delivered (the peer told us what they ask), marked delivered.
    pub settled: Option<(String, Vec<&'static str>)>,
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

    /// Marks what is still pending about `subject` of `topics` delivered: the change answers it.
    pub fn settling(mut self, subject: &str, topics: Vec<&'static str>) -> Self {
        self.settled = Some((subject.to_owned(), topics));
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
        if let Some((subject, topics)) = self.settled {
            outbox::complete_topics(db, &subject, &topics).await?;
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

impl Repo {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Inserts a new application in RECEIVED with its first event (and audit row) and the
    /// messages it owes.
    pub async fn insert_application(
        &self,
        new: NewApplication,
        note: &str,
        audit: Option<AuditEntry>,
        messages: Messages,
    ) -> Result<(), DbErr> {
        let txn = db::begin(&self.db).await?;
        let at = new.received_at;
        let id = new.application_id.clone();
        let received = ApplicationState::Received;
        application::ActiveModel {
            application_id: Set(new.application_id),
            kind: Set(new.kind.into()),
            state: Set(received.into()),
            id_number: Set(new.id_number),
            declared_province: Set(new.declared_province),
            home_bureau_id: Set(new.home_bureau_id),
            previous_card_serial: Set(new.previous_card_serial),
            document_kind: Set(new.document_kind.into()),
            live_face_template: Set(new.live_face_template),
            live_fingerprint_template: Set(new.live_fingerprint_template),
            refusal_reason: Set(None),
            decision: Set(None),
            loss_decision: Set(None),
            loss_recorded: Set(false),
            order_id: Set(None),
            new_card_serial: Set(None),
            home_notified: Set(false),
            trace_context: Set(new.trace_context),
            request_key: Set(new.request_key),
            created_at: Set(at),
            updated_at: Set(at),
        }
        .insert(&txn)
        .await?;
        insert_event(&txn, &id, received, at, note).await?;
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

    pub async fn get_many(&self, ids: &[String]) -> Result<Vec<application::Model>, DbErr> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        application::Entity::find()
            .filter(application::Column::ApplicationId.is_in(ids.iter().cloned()))
            .all(&self.db)
            .await
    }

    /// The applications `ids` (those that exist, in no particular order) with their events (in
    /// order) and their messages (oldest first). On PostgreSQL one statement: the events and
    /// messages come as JSON arrays of their rows, so a burst of changes costs one round trip
    /// (and one pooled connection) instead of three. Elsewhere three queries.
    pub async fn with_history(&self, ids: &[String]) -> Result<Vec<WithHistory>, DbErr> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if self.db.get_database_backend() != DbBackend::Postgres {
            let applications = self.get_many(ids).await?;
            return self.history_of(applications).await;
        }
        let placeholders = db::placeholders(DbBackend::Postgres, ids.len());
        let sql = format!(
            "SELECT a.*, \
             COALESCE((SELECT json_agg(e ORDER BY e.id) FROM application_events e \
             WHERE e.application_id = a.application_id), '[]')::text AS history_events, \
             COALESCE((SELECT json_agg(m ORDER BY m.created_at, m.id) FROM outbox_messages m \
             WHERE m.subject = a.application_id), '[]')::text AS history_messages \
             FROM applications a WHERE a.application_id IN ({})",
            placeholders.join(", ")
        );
        let values: Vec<sea_orm::Value> = ids.iter().map(|id| id.as_str().into()).collect();
        let rows = self.db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values)).await?;
        rows.iter()
            .map(|row| {
                let events: String = row.try_get("", "history_events")?;
                let messages: String = row.try_get("", "history_messages")?;
                Ok(WithHistory {
                    application: application::Model::from_query_result(row, "")?,
                    events: serde_json::from_str::<Vec<EventRow>>(&events)
                        .map_err(|e| DbErr::Json(format!("application_events as JSON: {e}")))?
                        .into_iter()
                        .map(EventRow::into_model)
                        .collect::<Result<_, _>>()?,
                    messages: serde_json::from_str(&messages)
                        .map_err(|e| DbErr::Json(format!("outbox_messages as JSON: {e}")))?,
                })
            })
            .collect()
    }

    /// `applications` with their events and messages, read in one query each.
    pub async fn history_of(&self, applications: Vec<application::Model>) -> Result<Vec<WithHistory>, DbErr> {
        let ids: Vec<String> = applications.iter().map(|a| a.application_id.clone()).collect();
        let mut events_of: HashMap<String, Vec<application_event::Model>> = HashMap::new();
        for event in self.events_for(&ids).await? {
            events_of.entry(event.application_id.clone()).or_default().push(event);
        }
        let mut messages_of: HashMap<String, Vec<outbox::Model>> = HashMap::new();
        for message in self.messages_for(&ids).await? {
            messages_of.entry(message.subject.clone()).or_default().push(message);
        }
        Ok(applications
            .into_iter()
            .map(|application| WithHistory {
                events: events_of.remove(&application.application_id).unwrap_or_default(),
                messages: messages_of.remove(&application.application_id).unwrap_or_default(),
                application,
            })
            .collect())
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

    /// Newest first, after `after` in that order.
    pub async fn list(
        &self,
        state: Option<ApplicationState>,
        after: Option<&TimeId>,
        limit: u64,
    ) -> Result<Vec<application::Model>, DbErr> {
        let mut query = application::Entity::find();
        if let Some(state) = state {
            query = query.filter(application::Column::State.eq(State::from(state)));
        }
        if let Some(after) = after {
            query = query.filter(after.older(application::Column::CreatedAt, application::Column::ApplicationId));
        }
        query
            .order_by(application::Column::CreatedAt, Order::Desc)
            .order_by(application::Column::ApplicationId, Order::Desc)
            .limit(limit)
            .all(&self.db)
            .await
    }

    /// Applies a transition if the row is still in one of `from`. Returns whether it applied.
    pub async fn transition(&self, t: Transition<'_>, now: DateTime<Utc>) -> Result<bool, DbErr> {
        let txn = db::begin(&self.db).await?;
        let mut changes = t.changes.into_active_model();
        changes.state = Set(t.to.into());
        changes.updated_at = Set(now);
        let from = t.from.iter().map(|&state| State::from(state));
        let filter = Condition::all()
            .add(application::Column::ApplicationId.eq(t.application_id))
            .add(application::Column::State.is_in(from));
        let result = application::Entity::update_many().set(changes).filter(filter).exec(&txn).await?;
        if result.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(false);
        }
        insert_event(&txn, t.application_id, t.to, now, &t.note).await?;
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
        changes: Changes,
        audit: Option<AuditEntry>,
        messages: Messages,
        now: DateTime<Utc>,
    ) -> Result<bool, DbErr> {
        let txn = db::begin(&self.db).await?;
        let mut changes = changes.into_active_model();
        changes.updated_at = Set(now);
        let result = application::Entity::update_many()
            .set(changes)
            .filter(application::Column::ApplicationId.eq(application_id))
            .filter(application::Column::State.eq(State::from(state)))
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
    state: ApplicationState,
    at: DateTime<Utc>,
    note: &str,
) -> Result<(), DbErr> {
    application_event::ActiveModel {
        application_id: Set(application_id.to_owned()),
        state: Set(state.into()),
        at: Set(at),
        note: Set(note.to_owned()),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(())
}

/// An application with its events and the messages about it.
#[derive(Debug, Clone)]
pub struct WithHistory {
    pub application: application::Model,
    pub events: Vec<application_event::Model>,
    pub messages: Vec<outbox::Model>,
}

/// A row of `application_events` as PostgreSQL writes it in JSON (the state as stored).
#[derive(serde::Deserialize)]
struct EventRow {
    id: i64,
    application_id: String,
    state: String,
    at: DateTime<Utc>,
    note: String,
}

impl EventRow {
    fn into_model(self) -> Result<application_event::Model, DbErr> {
        Ok(application_event::Model {
            id: self.id,
            application_id: self.application_id,
            state: State::try_from_value(&self.state).map_err(|e| DbErr::Type(e.to_string()))?,
            at: self.at,
            note: self.note,
        })
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::Database;
    use yidi_intake_migration::{Migrator, MigratorTrait};
    use yidi_outbox::MessageState;

    use super::*;

    fn received(id: &str) -> NewApplication {
        NewApplication {
            application_id: id.into(),
            kind: ApplicationKind::Renewal,
            id_number: "360102199003071243".into(),
            declared_province: "36".into(),
            home_bureau_id: "home-jiangxi".into(),
            previous_card_serial: String::new(),
            document_kind: DocumentKind::HouseholdRegisterBook,
            live_face_template: vec![1; 64],
            live_fingerprint_template: vec![2; 64],
            trace_context: None,
            request_key: None,
            received_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
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
            changes: Changes::default(),
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

    /// The one-statement read of PostgreSQL (events and messages as JSON) gives exactly what the
    /// three queries give: every column, nulls, multi-byte text, order of events and messages.
    #[tokio::test]
    async fn applications_read_with_their_history_in_one_statement_equal_the_three_query_read() {
        let Some(scratch) = yidi_testkit::postgres_for_tests("intake_history").await.unwrap() else { return };
        let db = Database::connect(scratch.url()).await.unwrap();
        Migrator::up(&db, None).await.unwrap();
        let repo = Repo::new(db.clone());
        for id in ["app-1", "app-2", "app-3"] {
            let owed = Messages::owe(NewMessage::new("verify", id, "home-jiangxi"));
            repo.insert_application(received(id), "received \"lodged\" 受理", None, owed).await.unwrap();
        }
        let verify = repo.messages("app-1").await.unwrap().remove(0);
        let approve = Transition {
            application_id: "app-1",
            from: &[ApplicationState::Received],
            to: ApplicationState::Approved,
            changes: Changes::default(),
            note: "已核准 \\ approved".into(),
            audit: None,
            messages: Messages::answering(&verify.id).and_owe(Some(NewMessage::new("place_order", "app-1", "p"))),
        };
        assert!(repo.transition(approve, Utc::now()).await.unwrap());
        db.execute_unprepared(
            "UPDATE outbox_messages SET last_error = 'attempt 1: 超时 \"no answer\"', lease_owner = 'replica-a', \
             lease_until = now() + interval '5 seconds', attempts = 1 WHERE subject = 'app-2'",
        )
        .await
        .unwrap();

        let ids: Vec<String> = ["app-1", "app-2", "app-3", "app-missing"].map(String::from).to_vec();
        let by_id = |mut read: Vec<WithHistory>| {
            read.sort_by(|a, b| a.application.application_id.cmp(&b.application.application_id));
            read.into_iter().map(|r| (r.application, r.events, r.messages)).collect::<Vec<_>>()
        };
        let one_statement = by_id(repo.with_history(&ids).await.unwrap());
        let three_queries = by_id(repo.history_of(repo.get_many(&ids).await.unwrap()).await.unwrap());
        assert_eq!(one_statement.len(), 3);
        assert_eq!(one_statement[0].1.len(), 2, "app-1: received, then approved");
        assert_eq!(one_statement[0].2.len(), 2, "app-1: verify delivered, place_order owed");
        assert!(one_statement[1].2[0].last_error.as_deref().is_some_and(|e| e.contains("超时")));
        assert_eq!(one_statement, three_queries);
        db.close().await.unwrap();
        scratch.drop().await.unwrap();
    }
}
