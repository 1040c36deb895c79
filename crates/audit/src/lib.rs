//! The hash-chained audit log every bureau keeps, and the `yidi.v1.Audit` RPCs over it ([`rpc`]).
//!
//! The audit log every service keeps: one `audit_log` table, one entity, one way to append a row,
//! the migrations that create and chain it, and the verification of the chain.
//!
//! One row per decision, refusal and state change. `subject` is a masked identity number or a card
//! serial, never a full number or a name.
//!
//! The log is tamper-evident: every row carries a gapless sequence number, the hash of the row
//! before it (`prev_hash`) and its own `hash`, a SHA-256 over a canonical, length-prefixed
//! encoding of its sequence number, time, action, subject, outcome, detail and `prev_hash`.
//! Altering, removing or inserting a row breaks the chain at that row; [`verify_chain`] finds the
//! first broken link. The one-row `audit_head` table holds the last sequence number and hash:
//! appends take its row lock first, so that two concurrent transactions never chain onto the
//! same predecessor, and a rolled-back append rolls the head back with it (no gap).
//!
//! # When an audit write fails
//!
//! One rule for every bureau. A refusal this bureau decides changed nothing, so it is answered
//! only once its row is written: if the write fails the caller gets the database error
//! (UNAVAILABLE or INTERNAL, to be retried) and the refusal is recorded when the call is repeated,
//! never answered off the record. A change is written in the same transaction as its row, so the
//! two stand or fall together. Only what another bureau has already done or decided (a loss
//! report withdrawn at the registry, a home bureau's verdict relayed by the station) is answered
//! even if the station's own row cannot be written, because the answer must say what happened;
//! that failure is logged.
#![forbid(unsafe_code)]

mod migration;
pub mod rpc;

pub use migration::{ChainAuditLog, CreateAuditLog};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::NotSet, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, QueryOrder, QuerySelect,
    Set, Statement, TransactionTrait, entity::prelude::*, sea_query::Expr,
};
use sea_orm_migration::prelude::{
    ColumnDef, Index, MigrationName, MigrationTrait, SchemaManager, Table, TableAlterStatement, async_trait,
};
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

/// A row of `audit_log`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_log")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: DateTimeUtc,
    pub action: String,
    /// Masked identity number or card serial; never a full number or a name.
    pub subject: String,
    pub outcome: String,
    #[sea_orm(column_type = "Text")]
    pub detail: String,
    /// 1, 2, 3, … without gaps, in the order the rows were appended. `None` only for a row written
    /// around [`append`] (which verification reports as not chained).
    pub seq: Option<i64>,
    /// Lowercase hex SHA-256 of the previous row ([`GENESIS_HASH`] for the first).
    pub prev_hash: Option<String>,
    /// Lowercase hex SHA-256 of this row, see [`entry_hash`].
    pub hash: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// The one-row table holding the end of the chain, locked by every append.
pub mod head {
    use sea_orm::entity::prelude::*;

    /// The only row's id.
    pub const ROW: i32 = 1;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_head")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        /// Sequence number of the last row appended (0: none yet).
        pub last_seq: i64,
        /// Hash of the last row appended ([`super::GENESIS_HASH`]: none yet).
        pub last_hash: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `prev_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record, still to be written. Its time is given to [`append`]: the `now` of the
/// transaction it belongs to, so that the audit row and the change it records share one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub action: &'static str,
    /// Masked identity number or card serial.
    pub subject: String,
    pub outcome: String,
    pub detail: String,
}

impl AuditEntry {
    pub fn new(
        action: &'static str,
        subject: impl Into<String>,
        outcome: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self { action, subject: subject.into(), outcome: outcome.into(), detail: detail.into() }
    }
}

/// The hash of one row: SHA-256 over a domain tag and each field, length-prefixed, so that no two
/// different rows encode alike (moving text from `detail` into `outcome` changes the hash).
/// The time counts in whole microseconds, the precision every database keeps.
pub fn entry_hash(
    seq: i64,
    at: DateTime<Utc>,
    action: &str,
    subject: &str,
    outcome: &str,
    detail: &str,
    prev_hash: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"yidi.audit_log.v1");
    hasher.update(seq.to_be_bytes());
    hasher.update(at.timestamp_micros().to_be_bytes());
    for field in [action, subject, outcome, detail, prev_hash] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 0xf)] as char]).collect()
}

/// Where an audit row can be appended: a connection (the append runs in a transaction of its
/// own) or a transaction (the row then commits, or not, with the change it records).
#[async_trait::async_trait]
pub trait AuditTarget: ConnectionTrait + Sync {
    async fn append_entry(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr>;
}

#[async_trait::async_trait]
impl AuditTarget for DatabaseConnection {
    async fn append_entry(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
        let txn = self.begin().await?;
        chain_onto_head(&txn, at, entry).await?;
        txn.commit().await
    }
}

#[async_trait::async_trait]
impl AuditTarget for DatabaseTransaction {
    async fn append_entry(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
        chain_onto_head(self, at, entry).await
    }
}

#[async_trait::async_trait]
impl AuditTarget for yidi_runtime::db::Transaction {
    async fn append_entry(&self, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
        chain_onto_head(self, at, entry).await
    }
}

/// Appends one row. `db` may be a connection or a transaction (the row then commits, or not, with
/// the change it records). In a transaction, append last: the chain's head stays locked until
/// the transaction ends, so appending early would hold every other writer back for longer.
pub async fn append(db: &impl AuditTarget, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
    db.append_entry(at, entry).await
}

/// The append itself, inside a transaction.
///
/// On PostgreSQL it is one statement, one round trip while the chain's head is locked: the head
/// row is locked and read (`FOR UPDATE`: a transaction that waited for it reads the head its
/// predecessor committed), moved on, and the row written with the hash computed by the server,
/// byte for byte as [`entry_hash`] does (SHA-256 over the same tag and length-prefixed fields;
/// `verify_chain` recomputes it in Rust).
///
/// On SQLite the first statement is a write to the head row that returns it: it takes the
/// database's write lock before anything is read, so a deferred transaction cannot be refused an
/// upgrade. SQLite has no writing CTE, so it takes three statements.
async fn chain_onto_head(txn: &impl ConnectionTrait, at: DateTime<Utc>, entry: AuditEntry) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    let at = micros(at);
    if backend == DbBackend::Postgres {
        return chain_onto_head_in_one_statement(txn, at, entry).await;
    }
    let head = txn
        .query_one_raw(Statement::from_string(
            backend,
            format!(
                "UPDATE audit_head SET last_seq = last_seq + 1 WHERE id = {} RETURNING last_seq, last_hash",
                head::ROW
            ),
        ))
        .await?
        .ok_or_else(no_head)?;
    let seq: i64 = head.try_get("", "last_seq")?;
    let prev_hash: String = head.try_get("", "last_hash")?;
    let hash = entry_hash(seq, at, entry.action, &entry.subject, &entry.outcome, &entry.detail, &prev_hash);
    Entity::insert(ActiveModel {
        id: NotSet,
        at: Set(at),
        action: Set(entry.action.to_owned()),
        subject: Set(entry.subject),
        outcome: Set(entry.outcome),
        detail: Set(entry.detail),
        seq: Set(Some(seq)),
        prev_hash: Set(Some(prev_hash)),
        hash: Set(Some(hash.clone())),
    })
    .exec_without_returning(txn)
    .await?;
    head::Entity::update_many()
        .col_expr(head::Column::LastHash, Expr::value(hash))
        .filter(head::Column::Id.eq(head::ROW))
        .exec(txn)
        .await?;
    Ok(())
}

fn no_head() -> DbErr {
    DbErr::Custom("audit_head has no row: is the audit log migrated?".into())
}

/// [`entry_hash`] in SQL: `f` is the name of a field (or `$n` of a parameter) in the statement.
fn sql_length_prefixed(f: &str) -> String {
    format!("int8send(octet_length(convert_to({f}, 'UTF8'))::int8) || convert_to({f}, 'UTF8')")
}

/// PostgreSQL: lock and read the head, move it on and write the row, in one statement.
/// Parameters: $1 at, $2 action, $3 subject, $4 outcome, $5 detail, $6 at in microseconds.
/// Built once: every audited change of every bureau sends it.
static APPEND_IN_ONE_STATEMENT: LazyLock<String> = LazyLock::new(|| {
    let hash = format!(
        "encode(sha256(convert_to('yidi.audit_log.v1', 'UTF8') || int8send(head.last_seq + 1) || int8send($6::int8) \
         || {} || {} || {} || {} || {}), 'hex')",
        sql_length_prefixed("$2::text"),
        sql_length_prefixed("$3::text"),
        sql_length_prefixed("$4::text"),
        sql_length_prefixed("$5::text"),
        sql_length_prefixed("head.last_hash"),
    );
    format!(
        "WITH head AS (SELECT last_seq, last_hash FROM audit_head WHERE id = {row} FOR UPDATE), \
         moved AS (UPDATE audit_head SET last_seq = head.last_seq + 1, last_hash = {hash} FROM head \
                   WHERE audit_head.id = {row} \
                   RETURNING audit_head.last_seq, head.last_hash AS prev_hash, audit_head.last_hash) \
         INSERT INTO audit_log (at, action, subject, outcome, detail, seq, prev_hash, hash) \
         SELECT $1, $2, $3, $4, $5, last_seq, prev_hash, last_hash FROM moved",
        row = head::ROW
    )
});

async fn chain_onto_head_in_one_statement(
    txn: &impl ConnectionTrait,
    at: DateTime<Utc>,
    entry: AuditEntry,
) -> Result<(), DbErr> {
    let values: Vec<sea_orm::Value> = vec![
        at.into(),
        entry.action.into(),
        entry.subject.into(),
        entry.outcome.into(),
        entry.detail.into(),
        at.timestamp_micros().into(),
    ];
    let written = txn
        .execute_raw(Statement::from_sql_and_values(DbBackend::Postgres, APPEND_IN_ONE_STATEMENT.as_str(), values))
        .await?;
    if written.rows_affected() == 0 {
        return Err(no_head());
    }
    Ok(())
}

/// `at` without its nanoseconds: what PostgreSQL keeps, and so what the hash covers everywhere.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// What [`verify_chain`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows read before the first broken link (all of them if none).
    pub entries_checked: u64,
    /// The id of the first row whose link is broken, and why.
    pub first_broken: Option<(i64, String)>,
    /// Hash of the last row checked ([`GENESIS_HASH`] for an empty log).
    pub last_hash: String,
}

impl ChainReport {
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// Rows read per query by [`verify_chain`]: the log is walked a page at a time.
const VERIFY_PAGE: u64 = 1000;

/// Walks the whole log in id order (the order appends commit: the head lock serialises them) and
/// checks each row's sequence number, link to its predecessor and hash, then that the chain
/// reaches the head (rows removed from the end break the chain too). The head is read first, so
/// rows appended while the walk runs are checked too and never mistaken for a broken end.
pub async fn verify_chain(db: &impl ConnectionTrait) -> Result<ChainReport, DbErr> {
    let head = head::Entity::find_by_id(head::ROW).one(db).await?;
    let mut checked: u64 = 0;
    let mut previous_hash = GENESIS_HASH.to_owned();
    let mut previous_seq: i64 = 0;
    let mut last_id: Option<i64> = None;
    let broken = |checked, id, reason: String, last_hash: String| ChainReport {
        entries_checked: checked,
        first_broken: Some((id, reason)),
        last_hash,
    };
    let Some(head) = head else {
        return Ok(broken(0, 0, "audit_head has no row: is the audit log migrated?".into(), previous_hash));
    };
    loop {
        let mut query = Entity::find().order_by_asc(Column::Id).limit(VERIFY_PAGE);
        if let Some(last_id) = last_id {
            query = query.filter(Column::Id.gt(last_id));
        }
        let page = query.all(db).await?;
        let page_len = page.len() as u64;
        for row in page {
            let (Some(seq), Some(prev_hash), Some(hash)) = (row.seq, row.prev_hash.as_deref(), row.hash.as_deref())
            else {
                return Ok(broken(checked, row.id, "the entry is not chained".into(), previous_hash));
            };
            if seq != previous_seq + 1 {
                let reason = format!(
                    "sequence number {seq} follows {previous_seq}: an entry is missing, inserted or moved here"
                );
                return Ok(broken(checked, row.id, reason, previous_hash));
            }
            if prev_hash != previous_hash {
                let reason = "prev_hash is not the hash of the entry before: an entry is missing, inserted or altered";
                return Ok(broken(checked, row.id, reason.into(), previous_hash));
            }
            let expected = entry_hash(seq, row.at, &row.action, &row.subject, &row.outcome, &row.detail, prev_hash);
            if hash != expected {
                let reason = "the entry does not match its hash: it was altered".into();
                return Ok(broken(checked, row.id, reason, previous_hash));
            }
            checked += 1;
            previous_seq = seq;
            previous_hash = expected;
            last_id = Some(row.id);
        }
        if page_len < VERIFY_PAGE {
            break;
        }
    }
    let ends_before_head = previous_seq < head.last_seq;
    let ends_elsewhere = previous_seq == head.last_seq && previous_hash != head.last_hash;
    if ends_before_head || ends_elsewhere {
        let reason = format!(
            "the chain ends at sequence number {previous_seq} but its head names {}: entries after this one are \
             missing or altered",
            head.last_seq
        );
        return Ok(broken(checked, last_id.unwrap_or(0), reason, previous_hash));
    }
    Ok(ChainReport { entries_checked: checked, first_broken: None, last_hash: previous_hash })
}

/// Which rows [`list_entries`] returns: newest first, ids within `min_id..=max_id` (`None`:
/// unbounded) and below `before_id` (the page token), at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryQuery {
    pub min_id: Option<i64>,
    pub max_id: Option<i64>,
    pub before_id: Option<i64>,
    pub limit: u64,
}

/// A page of audit rows, newest first.
pub async fn list_entries(db: &impl ConnectionTrait, query: EntryQuery) -> Result<Vec<Model>, DbErr> {
    let mut select = Entity::find().order_by_desc(Column::Id).limit(query.limit);
    if let Some(min_id) = query.min_id {
        select = select.filter(Column::Id.gte(min_id));
    }
    if let Some(max_id) = query.max_id {
        select = select.filter(Column::Id.lte(max_id));
    }
    if let Some(before_id) = query.before_id {
        select = select.filter(Column::Id.lt(before_id));
    }
    select.all(db).await
}

#[cfg(test)]
mod tests {
    use sea_orm::{Database, EntityTrait, Statement, TransactionTrait};
    use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};

    use super::*;

    async fn migrated() -> DatabaseConnection {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        CreateAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        ChainAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        db
    }

    fn at() -> DateTime<Utc> {
        "2117-07-01T08:00:00.123456789Z".parse().unwrap()
    }

    #[tokio::test]
    async fn the_migrations_create_the_table_and_append_writes_a_chained_row_in_a_transaction() {
        let db = migrated().await;
        assert_eq!(CreateAuditLog.name(), "m20261127_000000_create_audit_log");
        assert_eq!(ChainAuditLog.name(), "m20261127_900000_chain_audit_log");

        let txn = db.begin().await.unwrap();
        append(&txn, at(), AuditEntry::new("verify", "110***********1234", "APPROVED", "detail")).await.unwrap();
        txn.rollback().await.unwrap();
        assert!(Entity::find().all(&db).await.unwrap().is_empty(), "rolled back with its transaction");

        let txn = db.begin().await.unwrap();
        append(&txn, at(), AuditEntry::new("verify", "110***********1234", "APPROVED", "detail")).await.unwrap();
        txn.commit().await.unwrap();
        append(&db, at(), AuditEntry::new("verify", "110***********1234", "REFUSED", "again")).await.unwrap();
        let rows = Entity::find().order_by_asc(Column::Id).all(&db).await.unwrap();
        let at = micros(at());
        let first = entry_hash(1, at, "verify", "110***********1234", "APPROVED", "detail", GENESIS_HASH);
        assert_eq!(
            rows[0],
            Model {
                id: 1,
                at,
                action: "verify".into(),
                subject: "110***********1234".into(),
                outcome: "APPROVED".into(),
                detail: "detail".into(),
                seq: Some(1),
                prev_hash: Some(GENESIS_HASH.into()),
                hash: Some(first.clone()),
            },
            "the rollback left no gap in the sequence"
        );
        assert_eq!((rows[1].seq, rows[1].prev_hash.as_deref()), (Some(2), Some(first.as_str())));
        let report = verify_chain(&db).await.unwrap();
        assert_eq!(report.entries_checked, 2);
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(Some(report.last_hash), rows[1].hash);
    }

    #[test]
    fn the_hash_covers_every_field_and_their_boundaries() {
        let base = entry_hash(1, at(), "a", "b", "c", "d", GENESIS_HASH);
        assert_eq!(base.len(), 64);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let others = [
            entry_hash(2, at(), "a", "b", "c", "d", GENESIS_HASH),
            entry_hash(1, at() + chrono::Duration::microseconds(1), "a", "b", "c", "d", GENESIS_HASH),
            entry_hash(1, at(), "ab", "", "c", "d", GENESIS_HASH),
            entry_hash(1, at(), "a", "b", "c", "d ", GENESIS_HASH),
            entry_hash(1, at(), "a", "b", "cd", "", GENESIS_HASH),
            entry_hash(1, at(), "a", "b", "c", "d", &base),
        ];
        for other in others {
            assert_ne!(other, base);
        }
    }

    async fn tamper(db: &DatabaseConnection, sql: &str) {
        db.execute_raw(Statement::from_string(DbBackend::Sqlite, sql)).await.unwrap();
    }

    async fn three_rows() -> DatabaseConnection {
        let db = migrated().await;
        for outcome in ["one", "two", "three"] {
            append(&db, at(), AuditEntry::new("verify", "s", outcome, "d")).await.unwrap();
        }
        db
    }

    #[tokio::test]
    async fn verification_names_the_first_altered_removed_or_inserted_row() {
        let db = three_rows().await;
        tamper(&db, "UPDATE audit_log SET detail = 'changed' WHERE id = 2").await;
        let report = verify_chain(&db).await.unwrap();
        assert_eq!(report.entries_checked, 1);
        let (id, reason) = report.first_broken.unwrap();
        assert_eq!(id, 2);
        assert!(reason.contains("altered"), "{reason}");

        let db = three_rows().await;
        tamper(&db, "DELETE FROM audit_log WHERE id = 2").await;
        assert_eq!(verify_chain(&db).await.unwrap().first_broken.unwrap().0, 3);

        let db = three_rows().await;
        tamper(&db, "DELETE FROM audit_log WHERE id = 3").await;
        let (id, reason) = verify_chain(&db).await.unwrap().first_broken.unwrap();
        assert_eq!(id, 2, "the head still names the removed last row");
        assert!(reason.contains("missing"), "{reason}");

        let db = three_rows().await;
        tamper(&db, "INSERT INTO audit_log (at, action, subject, outcome, detail) VALUES ('2117-07-01 08:00:00', 'x', 'y', 'z', 'w')")
            .await;
        let (id, reason) = verify_chain(&db).await.unwrap().first_broken.unwrap();
        assert_eq!(id, 4);
        assert!(reason.contains("not chained"), "{reason}");
    }

    #[tokio::test]
    async fn the_migration_chains_rows_written_before_it_and_appends_continue_the_chain() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        CreateAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        for n in 0..3 {
            tamper(
                &db,
                &format!(
                    "INSERT INTO audit_log (at, action, subject, outcome, detail) \
                     VALUES ('2117-07-01 08:00:00.123456789+00:00', 'old', 's', 'o', 'row {n}')"
                ),
            )
            .await;
        }
        ChainAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        append(&db, at(), AuditEntry::new("new", "s", "o", "d")).await.unwrap();
        let report = verify_chain(&db).await.unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.entries_checked, 4);
    }

    #[tokio::test]
    async fn entries_are_listed_newest_first_within_the_range_and_below_the_page_token() {
        let db = migrated().await;
        for n in 0..6 {
            append(&db, at(), AuditEntry::new("a", "s", "o", format!("{n}"))).await.unwrap();
        }
        let ids = |rows: Vec<Model>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let all = EntryQuery { limit: 10, ..Default::default() };
        assert_eq!(ids(list_entries(&db, all).await.unwrap()), [6, 5, 4, 3, 2, 1]);
        let page = EntryQuery { min_id: Some(2), max_id: Some(5), before_id: Some(5), limit: 2 };
        assert_eq!(ids(list_entries(&db, page).await.unwrap()), [4, 3]);
    }

    /// Concurrent writers on PostgreSQL: each append waits for the head, so no two take the same
    /// predecessor; appends rolled back with their transaction leave no gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_concurrent_appends_chain_without_forks_or_gaps() {
        let Some(scratch) = yidi_testkit::postgres_for_tests("audit_chain").await.unwrap() else { return };
        let mut options = sea_orm::ConnectOptions::new(scratch.url().to_owned());
        options.max_connections(8).sqlx_logging(false);
        let db = Database::connect(options).await.unwrap();
        CreateAuditLog.up(&SchemaManager::new(&db)).await.unwrap();
        ChainAuditLog.up(&SchemaManager::new(&db)).await.unwrap();

        const WRITERS: usize = 8;
        const APPENDS: usize = 25;
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let db = db.clone();
                tokio::spawn(async move {
                    for n in 0..APPENDS {
                        // Multi-byte text: the server's hash counts bytes, as entry_hash does.
                        let entry = AuditEntry::new("race", format!("写入者 {writer}"), "o", format!("append {n} ✓"));
                        match n % 3 {
                            0 => append(&db, Utc::now(), entry).await.unwrap(),
                            1 => {
                                let txn = yidi_runtime::db::begin(&db).await.unwrap();
                                append(&txn, Utc::now(), entry).await.unwrap();
                                tokio::task::yield_now().await;
                                txn.commit().await.unwrap();
                            }
                            _ => {
                                let txn = db.begin().await.unwrap();
                                append(&txn, Utc::now(), entry).await.unwrap();
                                txn.rollback().await.unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let committed = (WRITERS * (0..APPENDS).filter(|n| n % 3 != 2).count()) as u64;
        let report = verify_chain(&db).await.unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.entries_checked, committed);
        let seqs: Vec<i64> = Entity::find()
            .order_by_asc(Column::Seq)
            .all(&db)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=committed as i64).collect::<Vec<_>>(), "gapless, no fork");

        // Altering one row is reported at that row, on PostgreSQL too.
        let target = Entity::find().filter(Column::Seq.eq(100)).one(&db).await.unwrap().unwrap();
        let sql = format!("UPDATE audit_log SET subject = 'someone else' WHERE id = {}", target.id);
        db.execute_raw(Statement::from_string(DbBackend::Postgres, sql)).await.unwrap();
        let report = verify_chain(&db).await.unwrap();
        assert_eq!(report.first_broken.map(|(id, _)| id), Some(target.id));
        assert_eq!(report.entries_checked, 99);
        db.close().await.unwrap();
        scratch.drop().await.unwrap();
    }
}
