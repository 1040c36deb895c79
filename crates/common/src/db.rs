//! Database connections: SQLite (embedded default) or PostgreSQL, chosen by the URL.
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};

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
