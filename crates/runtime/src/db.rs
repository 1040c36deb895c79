//! Database connections: SQLite (embedded default) or PostgreSQL, chosen by the URL.
use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult,
    QueryResult, Statement, TransactionOptions, TransactionTrait, prelude::async_trait,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::DatabaseConfig;

/// Connects, creating the SQLite file (and its folder) if needed.
pub async fn connect(config: &DatabaseConfig) -> Result<DatabaseConnection, DbErr> {
    if let Some(rest) = config.url.strip_prefix("sqlite://") {
        let path = rest.split('?').next().unwrap_or_default();
        if let Some(parent) = std::path::Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| DbErr::Custom(format!("database.url: {e}")))?;
        }
    }
    let mut options = ConnectOptions::new(config.url.clone());
    options
        .max_connections(config.max_connections)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10))
        // sqlx's default, kept on purpose: every connection handed out is pinged first (one round
        // trip), so after the server restarts or cuts connections no request meets a dead one
        // (yidi-tests' `postgres_connections_cut_mid_flow_lose_and_duplicate_nothing`). Pinging only
        // connections idle for a while was tried: the first request on each cut connection failed.
        .test_before_acquire(true)
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        // WAL lets readers run beside the writer. journal_mode=WAL is persistent (stored in the database
        // file), so setting it once through any one pooled connection covers them all. Per-connection
        // pragmas would not: this statement reaches only one connection of the pool. They are not needed
        // either: sqlx opens every connection with foreign_keys=ON and a busy timeout (5 s by default)
        // that queues writers instead of failing them.
        db.execute_unprepared("PRAGMA journal_mode=WAL;").await?;
    }
    Ok(db)
}

/// A database transaction inside its own span, `db.transaction` (with `db.system`), which lasts
/// from `begin` until it is committed, rolled back or dropped (a rollback). It is used as a
/// connection exactly like sea-orm's transaction, whose calls it passes on.
#[derive(Debug)]
pub struct Transaction {
    txn: DatabaseTransaction,
    span: tracing::Span,
}

/// `db.system` as OpenTelemetry's database conventions name it.
fn db_system(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Sqlite => "sqlite",
        DbBackend::Postgres => "postgresql",
        _ => "other_sql",
    }
}

/// `count` bind placeholders for hand-written SQL: `$1`, `$2`, … on PostgreSQL, `?` elsewhere.
pub fn placeholders(backend: DbBackend, count: usize) -> Vec<String> {
    (1..=count).map(|n| if backend == DbBackend::Postgres { format!("${n}") } else { "?".to_owned() }).collect()
}

/// Begins a transaction (with sea-orm's default options) in its own span.
pub async fn begin(db: &DatabaseConnection) -> Result<Transaction, DbErr> {
    begin_with_options(db, TransactionOptions::default()).await
}

/// Begins a transaction with `options` (e.g. SQLite's IMMEDIATE mode) in its own span (none when
/// tracing is off: the span would only carry what a trace shows).
pub async fn begin_with_options(db: &DatabaseConnection, options: TransactionOptions) -> Result<Transaction, DbErr> {
    let span = if crate::telemetry::tracing_on() {
        tracing::info_span!("db.transaction", db.system = db_system(db.get_database_backend()))
    } else {
        tracing::Span::none()
    };
    let txn = db.begin_with_options(options).instrument(span.clone()).await?;
    Ok(Transaction { txn, span })
}

impl Transaction {
    pub async fn commit(self) -> Result<(), DbErr> {
        let Self { txn, span } = self;
        span.set_attribute("db.transaction.outcome", "commit");
        txn.commit().instrument(span).await
    }

    pub async fn rollback(self) -> Result<(), DbErr> {
        let Self { txn, span } = self;
        span.set_attribute("db.transaction.outcome", "rollback");
        txn.rollback().instrument(span).await
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Transaction {
    fn get_database_backend(&self) -> DbBackend {
        self.txn.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.txn.execute_raw(stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.txn.execute_unprepared(sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.txn.query_one_raw(stmt).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.txn.query_all_raw(stmt).await
    }

    fn support_returning(&self) -> bool {
        self.txn.support_returning()
    }

    fn is_mock_connection(&self) -> bool {
        self.txn.is_mock_connection()
    }
}
