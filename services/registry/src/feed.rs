//! Replicas on one database (issue 15): the ordered log every replica follows, and how fresh this
//! replica can prove it is.
//!
//! Every write appends the cards it changed to `registry_feed` in its own transaction. Sequences
//! are allocated from the one row of `registry_feed_head` (`UPDATE … RETURNING`), whose row lock is
//! held until the commit: sequences therefore commit in order, with no gap, and a head read from a
//! committed snapshot means every entry up to it can be read. Status changes are also status events
//! (`status_events`, same sequence), which is what WatchRevocations sends.
//!
//! A replica reads the head, applies every entry up to it to its index, records how far it got in
//! `registry_replicas` (PostgreSQL) and only then counts as confirmed *from the instant it sent the
//! head read*. It answers checks while that confirmation is younger than the fence bound (S1).
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use tokio::sync::{Notify, watch};
use yidi_domain::{StoredCardStatus, status::id_number_hash};
use yidi_runtime::db;

use crate::{
    entities::{registry_feed, status_events},
    index::IndexedCard,
    repo::StatusEvent,
};

/// The PostgreSQL channel a commit of the log notifies (the wake-up only: readers read the log).
pub const FEED_CHANNEL: &str = "registry_feed";

/// A card as a write left it, appended to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardChange {
    pub serial: String,
    pub id_number: String,
    pub home_bureau_id: String,
    pub status: StoredCardStatus,
    pub valid_until: Option<NaiveDate>,
    pub status_changed_at: DateTime<Utc>,
    /// Whether it is a status event (WatchRevocations sends it): a registration, an import or a
    /// transfer changes what checks answer, but not the card's status.
    pub status_event: bool,
}

impl CardChange {
    pub fn indexed(&self) -> IndexedCard<'_> {
        IndexedCard {
            serial: &self.serial,
            id_number: &self.id_number,
            home_bureau_id: &self.home_bureau_id,
            status: self.status,
            valid_until: self.valid_until,
            status_changed_at: self.status_changed_at,
        }
    }
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sequence: u64,
    pub change: CardChange,
}

impl Entry {
    pub fn status_event(&self) -> Option<StatusEvent> {
        self.change.status_event.then(|| StatusEvent {
            sequence: self.sequence,
            card_serial: self.change.serial.clone(),
            status: self.change.status,
            changed_at: self.change.status_changed_at,
        })
    }
}

impl TryFrom<registry_feed::Model> for Entry {
    type Error = DbErr;

    fn try_from(m: registry_feed::Model) -> Result<Self, DbErr> {
        Ok(Self {
            sequence: sequence_of(m.sequence)?,
            change: CardChange {
                serial: m.card_serial,
                id_number: m.id_number,
                home_bureau_id: m.home_bureau_id,
                status: m.status.into(),
                valid_until: m.valid_until,
                status_changed_at: m.status_changed_at,
                status_event: m.status_event,
            },
        })
    }
}

fn sequence_of(value: i64) -> Result<u64, DbErr> {
    u64::try_from(value).map_err(|_| DbErr::Custom("negative sequence".into()))
}

fn stored(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

/// Appends `changes` to the log, in order, with their status events; the last thing a writing
/// transaction does before it commits, since the head's row lock it takes is held until then.
pub async fn append<C: ConnectionTrait>(txn: &C, changes: Vec<CardChange>) -> Result<Vec<Entry>, DbErr> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let backend = txn.get_database_backend();
    let count = i64::try_from(changes.len()).map_err(|_| DbErr::Custom("too many changes".into()))?;
    let allocate = Statement::from_sql_and_values(
        backend,
        "UPDATE registry_feed_head SET sequence = sequence + $1 WHERE id = 1 RETURNING sequence",
        [count.into()],
    );
    let head = txn.query_one_raw(allocate).await?.ok_or_else(|| DbErr::RecordNotFound("registry_feed_head".into()))?;
    let last: i64 = head.try_get("", "sequence")?;
    let mut entries = Vec::with_capacity(changes.len());
    for (offset, change) in (0_i64..).zip(changes) {
        let sequence = last - count + 1 + offset;
        registry_feed::Entity::insert(registry_feed::ActiveModel {
            sequence: Set(sequence),
            card_serial: Set(change.serial.clone()),
            id_number: Set(change.id_number.clone()),
            home_bureau_id: Set(change.home_bureau_id.clone()),
            status: Set(change.status.into()),
            valid_until: Set(change.valid_until),
            status_changed_at: Set(change.status_changed_at),
            status_event: Set(change.status_event),
        })
        .exec_without_returning(txn)
        .await?;
        if change.status_event {
            status_events::Entity::insert(status_events::ActiveModel {
                sequence: Set(sequence),
                card_serial: Set(change.serial.clone()),
                status: Set(change.status.into()),
                changed_at: Set(change.status_changed_at),
            })
            .exec_without_returning(txn)
            .await?;
        }
        entries.push(Entry { sequence: sequence_of(sequence)?, change });
    }
    if backend == DbBackend::Postgres {
        // Delivered at commit, and only then. The payload is the last sequence written, so a
        // replica that has already applied it (the writer itself) need not read the head again.
        txn.execute_unprepared(&format!("NOTIFY {FEED_CHANNEL}, '{last}'")).await?;
    }
    Ok(entries)
}

/// The newest committed sequence, and (PostgreSQL) the database's time when it was read.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub sequence: u64,
    pub read_at: Option<DateTime<Utc>>,
}

pub async fn head(db: &DatabaseConnection) -> Result<Head, DbErr> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => "SELECT sequence, clock_timestamp() AS read_at FROM registry_feed_head WHERE id = 1",
        _ => "SELECT sequence FROM registry_feed_head WHERE id = 1",
    };
    let row = db
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("registry_feed_head".into()))?;
    let sequence = sequence_of(row.try_get("", "sequence")?)?;
    let read_at = match backend {
        DbBackend::Postgres => Some(row.try_get("", "read_at")?),
        _ => None,
    };
    Ok(Head { sequence, read_at })
}

/// The entries after `after` up to `upto`, oldest first, at most `limit`.
pub async fn entries(db: &DatabaseConnection, after: u64, upto: u64, limit: u64) -> Result<Vec<Entry>, DbErr> {
    registry_feed::Entity::find()
        .filter(registry_feed::Column::Sequence.gt(stored(after)))
        .filter(registry_feed::Column::Sequence.lte(stored(upto)))
        .order_by_asc(registry_feed::Column::Sequence)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(Entry::try_from)
        .collect()
}

/// PostgreSQL: this replica is (again) one a writer waits for; before its first confirmation.
pub async fn join(db: &DatabaseConnection, replica_id: &str, applied: u64) -> Result<(), DbErr> {
    let upsert = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO registry_replicas (replica_id, applied_sequence, read_head_at) \
         VALUES ($1, $2, clock_timestamp()) ON CONFLICT (replica_id) DO UPDATE \
         SET applied_sequence = EXCLUDED.applied_sequence, read_head_at = EXCLUDED.read_head_at",
        [replica_id.into(), stored(applied).into()],
    );
    db.execute_raw(upsert).await?;
    Ok(())
}

/// PostgreSQL: records how far this replica has applied; false if its row was pruned meanwhile
/// (it must join again before it may confirm).
pub async fn record(
    db: &DatabaseConnection,
    replica_id: &str,
    applied: u64,
    read_at: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let update = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE registry_replicas SET applied_sequence = $2, read_head_at = $3 WHERE replica_id = $1",
        [replica_id.into(), stored(applied).into(), read_at.into()],
    );
    Ok(db.execute_raw(update).await?.rows_affected() == 1)
}

/// PostgreSQL: how many replicas other than `writer` have not yet recorded applying `sequence`.
/// The writer knows it has applied its own write from its own memory; its row is written a moment
/// later, and waiting for that row would cost every write a poll interval.
pub async fn laggards(db: &DatabaseConnection, sequence: u64, writer: &str) -> Result<i64, DbErr> {
    let count = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT COUNT(*) AS laggards FROM registry_replicas WHERE applied_sequence < $1 AND replica_id <> $2",
        [stored(sequence).into(), writer.into()],
    );
    let row = db.query_one_raw(count).await?.ok_or_else(|| DbErr::RecordNotFound("registry_replicas".into()))?;
    row.try_get("", "laggards")
}

/// PostgreSQL: forgets replicas that have not read the head for `older_than` (stopped or gone),
/// so that writers stop waiting for them; one that comes back joins again before it answers.
pub async fn prune(db: &DatabaseConnection, older_than: Duration) -> Result<u64, DbErr> {
    let millis = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    let delete = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM registry_replicas WHERE read_head_at < clock_timestamp() - $1 * interval '1 millisecond'",
        [millis.into()],
    );
    Ok(db.execute_raw(delete).await?.rows_affected())
}

/// Entries kept behind the slowest replica: a replica that starts reads the head, loads its index
/// (minutes for a nation) and then reads the log from that head on, before it has a row.
pub const RETAINED_ENTRIES: u64 = 1_000_000;

/// Deletes the entries every replica has applied, but the last `retained` of them
/// (`applied`: this replica's, the only one on SQLite). Status events stay: they are
/// `WatchRevocations`' history. How many were deleted.
pub async fn trim(db: &DatabaseConnection, applied: u64, retained: u64) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let below = match backend {
        DbBackend::Postgres => {
            let slowest =
                Statement::from_string(backend, "SELECT MIN(applied_sequence) AS slowest FROM registry_replicas");
            let row = db.query_one_raw(slowest).await?;
            let slowest: Option<i64> = match row {
                Some(row) => row.try_get("", "slowest")?,
                None => None,
            };
            slowest.map_or(0, |slowest| sequence_of(slowest).unwrap_or(0)).min(applied)
        }
        _ => applied,
    };
    let Some(below) = below.checked_sub(retained) else {
        return Ok(0);
    };
    let delete = Statement::from_sql_and_values(
        backend,
        "DELETE FROM registry_feed WHERE sequence < $1",
        [stored(below).into()],
    );
    Ok(db.execute_raw(delete).await?.rows_affected())
}

/// PostgreSQL: this replica stops (writers no longer wait for it).
pub async fn leave(db: &DatabaseConnection, replica_id: &str) -> Result<(), DbErr> {
    let delete = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM registry_replicas WHERE replica_id = $1",
        [replica_id.into()],
    );
    db.execute_raw(delete).await?;
    Ok(())
}

/// Serialises the writes about one holder across every replica until dropped (PostgreSQL: a
/// transaction holding an advisory lock; SQLite has one replica, whose writer lock suffices).
pub struct HolderLock {
    _txn: Option<db::Transaction>,
}

impl HolderLock {
    pub async fn acquire(db: &DatabaseConnection, id_number: &str) -> Result<Self, DbErr> {
        if db.get_database_backend() != DbBackend::Postgres {
            return Ok(Self { _txn: None });
        }
        let hash = id_number_hash(id_number);
        let key = i64::from_be_bytes([hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7]]);
        let txn = db::begin(db).await?;
        let lock =
            Statement::from_sql_and_values(DbBackend::Postgres, "SELECT pg_advisory_xact_lock($1)", [key.into()]);
        txn.execute_raw(lock).await?;
        Ok(Self { _txn: Some(txn) })
    }
}

/// How fresh this replica can prove it is; read by every check (atomics only).
#[derive(Debug)]
pub struct Freshness {
    started: Instant,
    fence: Duration,
    /// When the head read of the newest confirmation was sent, in nanoseconds after `started`;
    /// 0 before the first.
    confirmed: AtomicU64,
    /// Every entry up to this one is in the index.
    applied: AtomicU64,
    applied_watch: watch::Sender<u64>,
    /// Asks the follower to read the head now (a write of this replica committed).
    pub(crate) nudge: Notify,
    /// When the head read of a confirmation still being recorded was sent (as `confirmed`), 0 if
    /// none: once this replica's progress row is written, a writer may acknowledge its write and
    /// its caller check here before the confirmation lands.
    confirming: AtomicU64,
    /// Told when a confirmation being recorded lands or is given up.
    confirmations: Notify,
}

impl Freshness {
    pub fn new(fence: Duration, applied: u64) -> Self {
        Self {
            started: Instant::now(),
            fence,
            confirmed: AtomicU64::new(0),
            applied: AtomicU64::new(applied),
            applied_watch: watch::Sender::new(applied),
            nudge: Notify::new(),
            confirming: AtomicU64::new(0),
            confirmations: Notify::new(),
        }
    }

    fn nanos_since_start(&self, at: Instant) -> u64 {
        // 0 means "never": an instant in the very first nanosecond counts from the next.
        u64::try_from(at.saturating_duration_since(self.started).as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Entries up to `sequence` are in the index.
    pub fn set_applied(&self, sequence: u64) {
        self.applied.store(sequence, Ordering::Release);
        self.applied_watch.send_replace(sequence);
    }

    /// Every entry committed before `sent` is applied (a head read sent at `sent` found no more).
    pub fn confirm(&self, sent: Instant) {
        self.confirmed.store(self.nanos_since_start(sent), Ordering::Release);
        self.confirming.store(0, Ordering::Release);
        self.confirmations.notify_waiters();
    }

    /// A head read sent at `sent` is applied and its progress row is being written; [`Self::confirm`]
    /// follows once it is, or [`Self::not_confirmed`].
    pub fn confirming(&self, sent: Instant) {
        self.confirming.store(self.nanos_since_start(sent), Ordering::Release);
    }

    /// The confirmation being recorded failed (the row could not be written, or was pruned).
    pub fn not_confirmed(&self) {
        self.confirming.store(0, Ordering::Release);
        self.confirmations.notify_waiters();
    }

    /// [`Self::fresh_at`] for a check asked at `asked`; if it is fenced only because a confirmation
    /// is still being recorded, it waits for that one (at most the fence bound). Without this a
    /// check could be refused right after a writer saw this replica's row and acknowledged.
    pub async fn fresh_for_check(&self, asked: Instant) -> Option<u64> {
        if let Some(sequence) = self.fresh_at(asked) {
            return Some(sequence);
        }
        let landed = self.confirmations.notified();
        tokio::pin!(landed);
        landed.as_mut().enable();
        let pending = self.confirming.load(Ordering::Acquire);
        if pending == 0 || !self.within_fence(pending, asked) {
            return self.fresh_at(asked);
        }
        let _ = tokio::time::timeout(self.fence, landed).await;
        self.fresh_at(asked)
    }

    /// S1: the sequence every answer given `now` reflects, or None when this replica cannot prove
    /// it is that fresh (fenced). The confirmation is read first: the index and `applied` it
    /// covers were stored before it.
    pub fn fresh_at(&self, now: Instant) -> Option<u64> {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        (confirmed != 0 && self.within_fence(confirmed, now)).then(|| self.applied())
    }

    /// Whether `at` is less than the fence bound after the instant stored as `since`.
    fn within_fence(&self, since: u64, at: Instant) -> bool {
        let fence = u64::try_from(self.fence.as_nanos()).unwrap_or(u64::MAX);
        self.nanos_since_start(at).saturating_sub(since) < fence
    }

    /// Waits until `sequence` is applied, or `deadline`; whether it is.
    pub async fn applied_by(&self, sequence: u64, deadline: Instant) -> bool {
        let mut applied = self.applied_watch.subscribe();
        let reached = applied.wait_for(|applied| *applied >= sequence);
        matches!(tokio::time::timeout_at(deadline.into(), reached).await, Ok(Ok(_)))
    }
}

/// A replica id that is unique without configuration: host, process and start time.
pub fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "registry".to_owned());
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or_default();
    format!("{host}-{}-{started:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yidi_registry_migration::{Migrator, MigratorTrait};
    use yidi_runtime::config::DatabaseConfig;

    #[tokio::test]
    async fn the_log_is_gap_free_and_trimmed_only_behind_every_replica_and_its_retention() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("registry.db").display());
        let db = db::connect(&DatabaseConfig { url, max_connections: 1 }).await.unwrap();
        Migrator::up(&db, None).await.unwrap();
        let change = CardChange {
            serial: "JX0001".into(),
            id_number: "360102199003070012".into(),
            home_bureau_id: "home-jiangxi".into(),
            status: StoredCardStatus::Made,
            valid_until: None,
            status_changed_at: DateTime::from_timestamp(4_000_000_000, 0).unwrap(),
            status_event: false,
        };
        for _ in 0..2 {
            let txn = db::begin(&db).await.unwrap();
            append(&txn, vec![change.clone(); 5]).await.unwrap();
            txn.commit().await.unwrap();
        }
        assert_eq!(head(&db).await.unwrap().sequence, 10);
        let sequences: Vec<u64> = entries(&db, 0, 10, 100).await.unwrap().iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=10).collect::<Vec<_>>());
        assert_eq!(trim(&db, 10, 20).await.unwrap(), 0, "all within the retention");
        assert_eq!(trim(&db, 8, 3).await.unwrap(), 4, "below 8 - 3");
        assert_eq!(entries(&db, 0, 10, 100).await.unwrap()[0].sequence, 5);
        assert_eq!(head(&db).await.unwrap().sequence, 10, "the head stays");
        db.close().await.unwrap();
    }

    #[test]
    fn s1_a_replica_is_fresh_only_within_the_fence_after_a_confirmation() {
        let freshness = Freshness::new(Duration::from_millis(200), 7);
        let start = Instant::now();
        assert_eq!(freshness.fresh_at(start), None, "never confirmed");
        freshness.confirm(start);
        assert_eq!(freshness.fresh_at(start + Duration::from_millis(199)), Some(7));
        assert_eq!(freshness.fresh_at(start + Duration::from_millis(200)), None, "fenced at the bound");
        freshness.set_applied(9);
        freshness.confirm(start + Duration::from_millis(250));
        assert_eq!(freshness.fresh_at(start + Duration::from_millis(300)), Some(9));
    }

    /// A writer acknowledges once this replica's progress row is written, which is a moment before
    /// the confirmation lands in memory: a check asked in between waits for it, and is answered.
    #[tokio::test]
    async fn s1_a_check_asked_while_a_confirmation_is_recorded_waits_for_it() {
        let freshness = std::sync::Arc::new(Freshness::new(Duration::from_millis(200), 7));
        let old = Instant::now();
        freshness.confirm(old);
        tokio::time::sleep(Duration::from_millis(210)).await;
        let asked = Instant::now();
        assert_eq!(freshness.fresh_for_check(asked).await, None, "fenced, and nothing on its way");

        let sent = Instant::now();
        freshness.set_applied(8);
        freshness.confirming(sent);
        let landing = {
            let freshness = std::sync::Arc::clone(&freshness);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                freshness.confirm(sent);
            })
        };
        let asked = Instant::now();
        assert_eq!(freshness.fresh_for_check(asked).await, Some(8), "answered once the confirmation lands");
        landing.await.unwrap();

        // A confirmation given up (its row was pruned) is not waited for longer than that.
        tokio::time::sleep(Duration::from_millis(210)).await;
        freshness.confirming(Instant::now());
        let giving_up = {
            let freshness = std::sync::Arc::clone(&freshness);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                freshness.not_confirmed();
            })
        };
        let waited = Instant::now();
        assert_eq!(freshness.fresh_for_check(Instant::now()).await, None);
        assert!(waited.elapsed() < Duration::from_millis(150), "waited {:?}", waited.elapsed());
        giving_up.await.unwrap();
    }
}
