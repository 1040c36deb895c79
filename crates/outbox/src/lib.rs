//! The transactional outbox, and the `yidi.v1.Outbox` RPCs over it ([`rpc`]).
//!
//! The transactional outbox: what a bureau owes another bureau is a row of `outbox_messages`,
//! inserted in the same transaction as the change that owes it, so a change is never committed
//! without its message, nor a message without its change. A [`Dispatcher`] delivers the rows:
//!
//! - it claims due rows with a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so several
//!   replicas sharing one database never deliver the same message at the same time, and a replica
//!   that dies mid-delivery only delays its messages until the lease runs out;
//! - every call runs under a deadline, and a bounded number run at once, so a stalled peer holds
//!   at most its own messages, never the others;
//! - a failure is retried after an exponential backoff with jitter; once the retry budget is spent
//!   (or the receiver refuses outright) the message becomes a dead letter, listed and retried by
//!   operators through `yidi.v1.Outbox`;
//! - the message id travels as the call's idempotency key, so a redelivery (after a crash between
//!   the peer's answer and our commit) is answered by the receiver, not redone.
//!
//! A message carries no payload: its subject row, committed with it, holds what is to be sent, so
//! what is sent is always built from the current state (a cancelled application sends nothing).
#![forbid(unsafe_code)]

mod migration;
pub mod rpc;

pub use migration::CreateOutbox;

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, FromQueryResult, QueryOrder, QuerySelect,
    Statement, entity::prelude::*,
};
use sea_orm_migration::prelude::{ColumnDef, Index, MigrationName, MigrationTrait, SchemaManager, Table, async_trait};
use serde::Deserialize;
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
};

use yidi_grpc::page::TimeId;
use yidi_runtime::shutdown::Shutdown;

/// The metadata key carrying the message id to the receiver.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A row of `outbox_messages` (also read from PostgreSQL's JSON of the row, so field names are
/// the column names).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
#[sea_orm(table_name = "outbox_messages")]
pub struct Model {
    /// A UUID; also the idempotency key of every delivery attempt.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub topic: String,
    /// The application or order the message is about.
    pub subject: String,
    /// The bureau it goes to.
    pub target: String,
    /// `pending`, `delivered`, `dead` or `dropped`.
    pub state: String,
    /// Failed attempts since it was (re)queued.
    pub attempts: i32,
    pub next_attempt_at: DateTimeUtc,
    /// The replica delivering it now, until `lease_until`.
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTimeUtc>,
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub delivered_at: Option<DateTimeUtc>,
    /// How many times a replica took it for delivery (polls of a slow peer included): with
    /// nothing failing, 1, however many replicas share the queue.
    pub claims: i32,
    /// The replica that settled it (delivered, dead or dropped).
    pub settled_by: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    Pending,
    Delivered,
    Dead,
    /// No longer owed: what it was for was overtaken (e.g. the application was cancelled).
    Dropped,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
            Self::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Dead, Self::Dropped].into_iter().find(|state| state.as_str() == s)
    }
}

impl Model {
    pub fn message_state(&self) -> Option<MessageState> {
        MessageState::parse(&self.state)
    }
}

/// A message to queue, with the change that owes it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub topic: &'static str,
    pub subject: String,
    pub target: String,
    /// Not to be sent before this (e.g. when an order's production time is up); now if `None`.
    pub not_before: Option<DateTime<Utc>>,
}

impl NewMessage {
    pub fn new(topic: &'static str, subject: impl Into<String>, target: impl Into<String>) -> Self {
        Self { topic, subject: subject.into(), target: target.into(), not_before: None }
    }
}

/// Queues `message` on `db`, which should be the transaction of the change that owes it.
/// Scheduling uses the wall clock: it is about when to call a peer, not about the domain's time.
pub async fn enqueue(db: &impl ConnectionTrait, message: NewMessage) -> Result<String, DbErr> {
    let now = Utc::now();
    let id = uuid::Uuid::new_v4().to_string();
    ActiveModel {
        id: Set(id.clone()),
        topic: Set(message.topic.to_owned()),
        subject: Set(message.subject),
        target: Set(message.target),
        state: Set(MessageState::Pending.as_str().to_owned()),
        attempts: Set(0),
        next_attempt_at: Set(message.not_before.map_or(now, |at| at.max(now))),
        lease_owner: Set(None),
        lease_until: Set(None),
        last_error: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        delivered_at: Set(None),
        claims: Set(0),
        settled_by: Set(None),
    }
    .insert(db)
    .await?;
    Ok(id)
}

/// Marks a message delivered, inside the transaction that records its answer (so the answer and
/// the delivery commit together). Returns whether it was still pending.
pub async fn complete(db: &impl ConnectionTrait, message_id: &str) -> Result<bool, DbErr> {
    let result = mark_delivered().filter(Column::Id.eq(message_id)).exec(db).await?;
    Ok(result.rows_affected > 0)
}

/// Marks every pending message of one of `topics` about `subject` delivered, inside the
/// transaction of the change that made them pointless because what they ask for has happened
/// (e.g. the peer told us, so the poll asking it is done). A delivery in flight then finds its
/// message no longer pending and records nothing. Returns how many were pending.
pub async fn complete_topics(db: &impl ConnectionTrait, subject: &str, topics: &[&str]) -> Result<u64, DbErr> {
    if topics.is_empty() {
        return Ok(0);
    }
    let result = mark_delivered()
        .filter(Column::Subject.eq(subject))
        .filter(Column::Topic.is_in(topics.iter().copied()))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// An update marking pending messages delivered now; the caller says which.
fn mark_delivered() -> sea_orm::UpdateMany<Entity> {
    let now = Utc::now();
    Entity::update_many()
        .col_expr(Column::State, Expr::value(MessageState::Delivered.as_str()))
        .col_expr(Column::DeliveredAt, Expr::value(now))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        // SET reads the row as it was: the replica holding the lease settles it.
        .col_expr(Column::SettledBy, Expr::col(Column::LeaseOwner))
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(Column::State.eq(MessageState::Pending.as_str()))
}

/// Makes pending `topic` messages due by `latest` at the latest (e.g. a shorter production time
/// configured since they were queued). Returns how many were brought forward.
pub async fn bring_forward(db: &impl ConnectionTrait, topic: &str, latest: DateTime<Utc>) -> Result<u64, DbErr> {
    let result = Entity::update_many()
        .col_expr(Column::NextAttemptAt, Expr::value(latest))
        .filter(Column::Topic.eq(topic))
        .filter(Column::State.eq(MessageState::Pending.as_str()))
        .filter(Column::NextAttemptAt.gt(latest))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Drops every message about `subject` still owed (pending or dead), with the reason: what they
/// were for was overtaken (e.g. the application was cancelled). A delivery in flight finds its
/// message no longer pending and records nothing.
pub async fn drop_owed(db: &impl ConnectionTrait, subject: &str, why: &str) -> Result<u64, DbErr> {
    let now = Utc::now();
    let result = Entity::update_many()
        .col_expr(Column::State, Expr::value(MessageState::Dropped.as_str()))
        .col_expr(Column::LastError, Expr::value(why))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .filter(Column::Subject.eq(subject))
        .filter(Column::State.is_in([MessageState::Pending.as_str(), MessageState::Dead.as_str()]))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Every message about `subject`, oldest first.
pub async fn for_subject(db: &impl ConnectionTrait, subject: &str) -> Result<Vec<Model>, DbErr> {
    Entity::find()
        .filter(Column::Subject.eq(subject))
        .order_by_asc(Column::CreatedAt)
        .order_by_asc(Column::Id)
        .all(db)
        .await
}

/// Every message about any of `subjects`, oldest first.
pub async fn for_subjects(db: &impl ConnectionTrait, subjects: &[String]) -> Result<Vec<Model>, DbErr> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    Entity::find()
        .filter(Column::Subject.is_in(subjects.iter().cloned()))
        .order_by_asc(Column::CreatedAt)
        .order_by_asc(Column::Id)
        .all(db)
        .await
}

/// Newest first, optionally in one state or about one subject.
pub async fn list(
    db: &impl ConnectionTrait,
    state: Option<MessageState>,
    subject: Option<&str>,
    after: Option<&TimeId>,
    limit: u64,
) -> Result<Vec<Model>, DbErr> {
    let mut query = Entity::find();
    if let Some(state) = state {
        query = query.filter(Column::State.eq(state.as_str()));
    }
    if let Some(subject) = subject {
        query = query.filter(Column::Subject.eq(subject));
    }
    if let Some(after) = after {
        query = query.filter(after.older(Column::CreatedAt, Column::Id));
    }
    query.order_by_desc(Column::CreatedAt).order_by_desc(Column::Id).limit(limit).all(db).await
}

/// Why a dead letter could not be retried.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("outbox message {0} does not exist")]
    NotFound(String),
    #[error("outbox message {id} is {state}, not dead: only dead letters are retried")]
    NotDead { id: String, state: String },
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// Re-queues a dead letter with a fresh retry budget, due at once.
pub async fn retry_dead_letter(db: &DatabaseConnection, message_id: &str) -> Result<Model, RetryError> {
    let now = Utc::now();
    let result = Entity::update_many()
        .col_expr(Column::State, Expr::value(MessageState::Pending.as_str()))
        .col_expr(Column::Attempts, Expr::value(0))
        .col_expr(Column::NextAttemptAt, Expr::value(now))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .filter(Column::Id.eq(message_id))
        .filter(Column::State.eq(MessageState::Dead.as_str()))
        .exec(db)
        .await?;
    let row = Entity::find_by_id(message_id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| RetryError::NotFound(message_id.to_owned()))?;
    if result.rows_affected == 0 {
        return Err(RetryError::NotDead { id: row.id, state: row.state });
    }
    Ok(row)
}

/// How the dispatcher delivers: `[outbox]` in a service's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// The deadline of one delivery attempt.
    pub call_timeout_ms: u64,
    /// Failed attempts before a message becomes a dead letter.
    pub max_attempts: u32,
    /// The backoff after the first failure; it doubles after each, up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// How often the queue is looked at when nothing wakes the dispatcher.
    pub poll_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            call_timeout_ms: 10_000,
            max_attempts: 10,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            concurrency: 32,
            poll_ms: 200,
        }
    }
}

impl OutboxConfig {
    pub fn validate(&self) -> Result<(), yidi_runtime::config::ConfigError> {
        use yidi_runtime::config::ConfigError;
        if !(1..=600_000).contains(&self.call_timeout_ms) {
            return Err(ConfigError::key("outbox.call_timeout_ms", "must be between 1 and 600000"));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::key("outbox.max_attempts", "must be at least 1"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_initial_ms > self.backoff_max_ms {
            return Err(ConfigError::key("outbox.backoff_initial_ms", "must be at least 1 and at most backoff_max_ms"));
        }
        if self.backoff_max_ms > 3_600_000 {
            return Err(ConfigError::key("outbox.backoff_max_ms", "must be at most 3600000"));
        }
        if !(1..=1024).contains(&self.concurrency) {
            return Err(ConfigError::key("outbox.concurrency", "must be between 1 and 1024"));
        }
        if !(1..=60_000).contains(&self.poll_ms) {
            return Err(ConfigError::key("outbox.poll_ms", "must be between 1 and 60000"));
        }
        Ok(())
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// How long a claimed message stays with its replica: the call's deadline plus time to
    /// record the answer. Past it, another replica may take the message over.
    fn lease(&self) -> Duration {
        self.call_timeout() + Duration::from_secs(5)
    }

    /// The wait after the `attempts`-th failure: exponential, capped, with "equal jitter" (half
    /// fixed, half random) so that messages failing together do not retry together.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(20);
        let base = self.backoff_initial_ms.saturating_mul(1u64 << exponent).min(self.backoff_max_ms);
        let half = base / 2;
        Duration::from_millis(half + rand::random_range(0..=base - half))
    }
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered and its answer recorded; the dispatcher marks the message delivered.
    Delivered,
    /// Delivered, and the handler's own transaction already marked the message delivered with
    /// the change its answer caused ([`complete`]): nothing is left for the dispatcher to write.
    Answered,
    /// Nothing is wrong, but it is not done: ask again after this long (an order still being
    /// made). Not counted as a failure; `note` says what the peer is doing.
    Later { after: Duration, note: Option<String> },
    /// Failed in a way a later attempt may not (peer down, overloaded, deadline passed).
    Retry(String),
    /// Refused in a way retrying cannot change: a dead letter at once.
    Fail(String),
    /// Not sent, and no longer owed: the change it was for was overtaken.
    Dropped(String),
}

/// Delivers one kind of service's messages.
pub trait Handler: Send + Sync + 'static {
    fn deliver(&self, message: &Model) -> impl Future<Output = Delivery> + Send;

    /// Called after an attempt was recorded (delivered, rescheduled, dead, dropped), e.g. to tell
    /// watchers, with the message as it was claimed: its id, topic, subject and target never
    /// change; its new state is in the table (not read back here, as no handler needs it).
    fn settled(&self, _message: &Model) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Delivers a service's outbox until shutdown.
pub struct Dispatcher<H> {
    db: DatabaseConnection,
    handler: Arc<H>,
    config: OutboxConfig,
    /// This replica's name in leases.
    owner: String,
    wake: Arc<Notify>,
    shutdown: Shutdown,
}

impl<H: Handler> Dispatcher<H> {
    pub fn new(
        db: DatabaseConnection,
        handler: Arc<H>,
        config: OutboxConfig,
        wake: Arc<Notify>,
        shutdown: Shutdown,
    ) -> Self {
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Self { db, handler, config, owner, wake, shutdown }
    }

    pub async fn run(self) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut deliveries = JoinSet::new();
        let this = Arc::new(self);
        loop {
            while deliveries.try_join_next().is_some() {}
            let free = slots.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match claim(&this.db, &this.owner, this.config.lease(), free).await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::warn!(%error, "outbox: cannot claim messages");
                        Vec::new()
                    }
                }
            };
            let full_batch = free > 0 && claimed.len() == free;
            for message in claimed {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                let this = Arc::clone(&this);
                deliveries.spawn(async move {
                    let _permit = permit;
                    this.deliver(message).await;
                });
            }
            if full_batch {
                // More may be due: look again as soon as a slot frees.
                tokio::select! {
                    () = this.shutdown.wait() => break,
                    _ = deliveries.join_next() => {}
                }
                continue;
            }
            tokio::select! {
                () = this.shutdown.wait() => break,
                () = this.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(this.config.poll_ms)) => {}
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            }
        }
        // Deliveries in flight are dropped and their messages stay pending; their leases are handed
        // back so that another replica (or this one, restarted) takes them at once.
        deliveries.shutdown().await;
        match release(&this.db, &this.owner).await {
            Ok(released) if released > 0 => {
                tracing::info!(released, "outbox: leases of interrupted deliveries released")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox: cannot release leases; they will run out"),
        }
        tracing::info!("outbox dispatcher stopped");
    }

    async fn deliver(&self, message: Model) {
        let outcome = match tokio::time::timeout(self.config.call_timeout(), self.handler.deliver(&message)).await {
            Ok(outcome) => outcome,
            Err(_) => Delivery::Retry(format!(
                "{}: no answer within the {} ms deadline",
                message.target, self.config.call_timeout_ms
            )),
        };
        let attempts = u32::try_from(message.attempts).unwrap_or(0);
        let settled = match &outcome {
            Delivery::Answered => Ok(true),
            Delivery::Delivered => {
                settle(&self.db, &message.id, &self.owner, MessageState::Delivered, None).await.map(|()| true)
            }
            Delivery::Later { after, note } => {
                reschedule(&self.db, &message, &self.owner, message.attempts, *after, note.clone(), false).await
            }
            Delivery::Retry(error) => {
                let attempts = attempts.saturating_add(1);
                let dead = attempts >= self.config.max_attempts;
                let error = format!("attempt {attempts}: {error}");
                if dead {
                    tracing::warn!(message_id = %message.id, topic = %message.topic, subject = %message.subject, %error, "outbox: retry budget spent; dead letter");
                } else {
                    tracing::info!(message_id = %message.id, topic = %message.topic, subject = %message.subject, %error, "outbox: delivery failed; will retry");
                }
                let wait = self.config.backoff(attempts);
                let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
                reschedule(&self.db, &message, &self.owner, attempts, wait, Some(error), dead).await
            }
            Delivery::Dropped(why) => {
                tracing::info!(message_id = %message.id, topic = %message.topic, subject = %message.subject, %why, "outbox: no longer owed; dropped");
                settle(&self.db, &message.id, &self.owner, MessageState::Dropped, Some(why.clone()))
                    .await
                    .map(|()| true)
            }
            Delivery::Fail(error) => {
                tracing::warn!(message_id = %message.id, topic = %message.topic, subject = %message.subject, %error, "outbox: refused; dead letter");
                let attempts = message.attempts.saturating_add(1);
                reschedule(&self.db, &message, &self.owner, attempts, Duration::ZERO, Some(error.clone()), true).await
            }
        };
        match settled {
            Ok(true) => self.handler.settled(&message).await,
            // The lease was lost (another replica took over after it ran out): theirs now.
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(message_id = %message.id, %error, "outbox: cannot record the attempt; the lease will expire")
            }
        }
    }
}

/// Takes up to `limit` due messages for `owner`: pending, due, and not leased to a live replica.
async fn claim(db: &DatabaseConnection, owner: &str, lease: Duration, limit: usize) -> Result<Vec<Model>, DbErr> {
    let backend = db.get_database_backend();
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(lease).unwrap_or_default();
    let p = yidi_runtime::db::placeholders(backend, 6);
    // PostgreSQL: concurrent claimers skip each other's rows instead of waiting or double-taking.
    // SQLite: one writer at a time, so the UPDATE is atomic by itself.
    let lock = if backend == DbBackend::Postgres { " FOR UPDATE SKIP LOCKED" } else { "" };
    let sql = format!(
        "UPDATE outbox_messages SET lease_owner = {owner}, lease_until = {until}, claims = claims + 1 \
         WHERE id IN (SELECT id FROM outbox_messages WHERE state = {pending} AND next_attempt_at <= {now} \
         AND (lease_until IS NULL OR lease_until < {now2}) ORDER BY next_attempt_at, id LIMIT {limit}{lock}) \
         RETURNING *",
        owner = p[0],
        until = p[1],
        pending = p[2],
        now = p[3],
        now2 = p[4],
        limit = p[5],
    );
    let values: Vec<sea_orm::Value> = vec![
        owner.into(),
        until.into(),
        MessageState::Pending.as_str().into(),
        now.into(),
        now.into(),
        i64::try_from(limit).unwrap_or(i64::MAX).into(),
    ];
    let rows = db.query_all_raw(Statement::from_sql_and_values(backend, sql, values)).await?;
    let mut claimed = rows.iter().map(|row| Model::from_query_result(row, "")).collect::<Result<Vec<_>, _>>()?;
    claimed.sort_by(|a, b| a.next_attempt_at.cmp(&b.next_attempt_at).then_with(|| a.id.cmp(&b.id)));
    Ok(claimed)
}

/// Hands back `owner`'s leases.
async fn release(db: &DatabaseConnection, owner: &str) -> Result<u64, DbErr> {
    let result = Entity::update_many()
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(Column::LeaseOwner.eq(owner))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Ends a leased message: delivered (if the handler has not already marked it in its
/// transaction) or dropped, with a note. If the row is no longer this replica's pending lease,
/// the handler settled it, or another replica took it over: nothing is written.
async fn settle(
    db: &DatabaseConnection,
    message_id: &str,
    owner: &str,
    state: MessageState,
    note: Option<String>,
) -> Result<(), DbErr> {
    let now = Utc::now();
    let mut update = Entity::update_many()
        .col_expr(Column::State, Expr::value(state.as_str()))
        .col_expr(Column::SettledBy, Expr::value(owner))
        .col_expr(Column::UpdatedAt, Expr::value(now));
    if state == MessageState::Delivered {
        update = update.col_expr(Column::DeliveredAt, Expr::value(now));
    }
    if note.is_some() {
        update = update.col_expr(Column::LastError, Expr::value(note));
    }
    update
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(Column::Id.eq(message_id))
        .filter(Column::State.eq(MessageState::Pending.as_str()))
        .filter(Column::LeaseOwner.eq(owner))
        .exec(db)
        .await?;
    Ok(())
}

/// Records an attempt that did not deliver: when to try again, or that it is dead. False if the
/// lease was lost (another replica took the message over after it ran out): theirs now.
async fn reschedule(
    db: &DatabaseConnection,
    message: &Model,
    owner: &str,
    attempts: i32,
    wait: Duration,
    error: Option<String>,
    dead: bool,
) -> Result<bool, DbErr> {
    let now = Utc::now();
    let state = if dead { MessageState::Dead } else { MessageState::Pending };
    let error = error.map(|e| e.chars().take(2000).collect::<String>());
    let mut update = Entity::update_many();
    if dead {
        update = update.col_expr(Column::SettledBy, Expr::value(owner));
    }
    let result = update
        .col_expr(Column::State, Expr::value(state.as_str()))
        .col_expr(Column::Attempts, Expr::value(attempts))
        .col_expr(Column::NextAttemptAt, Expr::value(now + chrono::Duration::from_std(wait).unwrap_or_default()))
        .col_expr(Column::LastError, Expr::value(error))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .col_expr(Column::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(Column::LeaseUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(Column::Id.eq(message.id.as_str()))
        .filter(Column::State.eq(MessageState::Pending.as_str()))
        .filter(Column::LeaseOwner.eq(owner))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

#[cfg(test)]
mod tests {
    use sea_orm::Database;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_within_the_upper_half() {
        let config = OutboxConfig { backoff_initial_ms: 400, backoff_max_ms: 3_000, ..OutboxConfig::default() };
        for _ in 0..200 {
            let first = config.backoff(1).as_millis();
            assert!((200..=400).contains(&first), "{first}");
            let third = config.backoff(3).as_millis();
            assert!((800..=1600).contains(&third), "{third}");
            let capped = config.backoff(30).as_millis();
            assert!((1500..=3000).contains(&capped), "{capped}");
        }
        let spread: std::collections::HashSet<u128> = (0..50).map(|_| config.backoff(5).as_millis()).collect();
        assert!(spread.len() > 5, "jitter spreads retries: {spread:?}");
    }

    #[test]
    fn a_zero_budget_or_deadline_is_refused_naming_the_key() {
        let bad = OutboxConfig { max_attempts: 0, ..OutboxConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("outbox.max_attempts"));
        let bad = OutboxConfig { call_timeout_ms: 0, ..OutboxConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("outbox.call_timeout_ms"));
        assert!(OutboxConfig::default().validate().is_ok());
    }

    async fn sqlite() -> (tempfile::TempDir, DatabaseConnection) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("outbox.db").display());
        let db = Database::connect(url).await.unwrap();
        let manager = SchemaManager::new(&db);
        CreateOutbox.up(&manager).await.unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn a_claimed_message_is_not_claimed_again_until_its_lease_runs_out() {
        let (_dir, db) = sqlite().await;
        let id = enqueue(&db, NewMessage::new("verify", "app-1", "home")).await.unwrap();
        let first = claim(&db, "replica-a", Duration::from_secs(60), 10).await.unwrap();
        assert_eq!(first.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
        assert!(claim(&db, "replica-b", Duration::from_secs(60), 10).await.unwrap().is_empty());
        // An expired lease (its replica died) is taken over.
        Entity::update_many()
            .col_expr(Column::LeaseUntil, Expr::value(Utc::now() - chrono::Duration::seconds(1)))
            .exec(&db)
            .await
            .unwrap();
        let taken = claim(&db, "replica-b", Duration::from_secs(60), 10).await.unwrap();
        assert_eq!(taken.len(), 1);
        // The first replica, back late, cannot settle what is no longer its own.
        let stored = || async { Entity::find_by_id(id.clone()).one(&db).await.unwrap().unwrap() };
        settle(&db, &id, "replica-a", MessageState::Delivered, None).await.unwrap();
        assert_eq!(stored().await.message_state(), Some(MessageState::Pending));
        settle(&db, &id, "replica-b", MessageState::Delivered, None).await.unwrap();
        let row = stored().await;
        assert_eq!(row.message_state(), Some(MessageState::Delivered));
        assert_eq!((row.settled_by.as_deref(), row.lease_owner.as_deref()), (Some("replica-b"), None));
    }

    #[tokio::test]
    async fn a_message_not_yet_due_waits_and_a_dead_letter_is_retried_only_once_dead() {
        let (_dir, db) = sqlite().await;
        let mut later = NewMessage::new("register_card", "order-1", "registry");
        later.not_before = Some(Utc::now() + chrono::Duration::hours(1));
        let id = enqueue(&db, later).await.unwrap();
        assert!(claim(&db, "r", Duration::from_secs(60), 10).await.unwrap().is_empty());
        assert!(matches!(retry_dead_letter(&db, &id).await, Err(RetryError::NotDead { .. })));
        assert!(matches!(retry_dead_letter(&db, "nope").await, Err(RetryError::NotFound(_))));
        Entity::update_many().col_expr(Column::State, Expr::value("dead")).exec(&db).await.unwrap();
        let retried = retry_dead_letter(&db, &id).await.unwrap();
        assert_eq!((retried.message_state(), retried.attempts), (Some(MessageState::Pending), 0));
        assert_eq!(claim(&db, "r", Duration::from_secs(60), 10).await.unwrap().len(), 1);
    }
}
