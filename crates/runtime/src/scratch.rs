//! Throwaway PostgreSQL databases: created with a unique name on a server, dropped when done (or
//! when the value goes away). The demo's and the benchmarks' PostgreSQL runs put each bureau in
//! one, and so does every PostgreSQL test (through `yidi-testkit`, which adds the tests' rules).
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

use crate::{config::DatabaseConfig, db};

/// The server used when `YIDI_TEST_POSTGRES_URL` is not set.
pub const DEFAULT_TEST_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `YIDI_TEST_POSTGRES_URL`, or [`DEFAULT_TEST_POSTGRES_URL`]: where tests, the demo's and the
/// benchmarks' PostgreSQL runs create their databases unless told otherwise.
pub fn test_postgres_url() -> String {
    std::env::var("YIDI_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_POSTGRES_URL.to_owned())
}

/// A uniquely named database, created on a server and dropped by [`ScratchDatabase::drop`]. One
/// never dropped (a run that panicked) is dropped when the value goes away.
#[derive(Debug)]
pub struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

impl ScratchDatabase {
    /// Creates `yidi_<label>_<random>` on the server of `admin_url` (a URL of a database there
    /// that the user may connect to, e.g. `postgres://postgres@127.0.0.1:5432/test`).
    pub async fn create(admin_url: &str, label: &str) -> Result<Self, DbErr> {
        let admin = connect_admin(admin_url).await?;
        let created = Self::create_on(&admin, admin_url, label).await;
        admin.close().await?;
        created
    }

    async fn create_on(admin: &DatabaseConnection, admin_url: &str, label: &str) -> Result<Self, DbErr> {
        let name = unique_name(label);
        admin.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await?;
        Ok(Self { admin_url: admin_url.to_owned(), url: with_database(admin_url, &name), name, dropped: false })
    }

    /// The URL of the scratch database, for a service's `database.url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop(mut self) -> Result<(), DbErr> {
        drop_database(&self.admin_url, &self.name).await?;
        self.dropped = true;
        Ok(())
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop cannot await, and may run inside a runtime: use a runtime on a thread of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = runtime.block_on(drop_database(&admin_url, &name));
            }
        })
        .join();
    }
}

/// A one-connection pool to `url` (a maintenance database of the server).
pub async fn connect_admin(url: &str) -> Result<DatabaseConnection, DbErr> {
    db::connect(&DatabaseConfig { url: url.to_owned(), max_connections: 1 }).await
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), DbErr> {
    let admin = connect_admin(admin_url).await?;
    let dropped = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
    admin.close().await?;
    dropped.map(|_| ())
}

/// `yidi_<label>_<12 random hex digits>`: lower case, at most 63 bytes (PostgreSQL's limit).
fn unique_name(label: &str) -> String {
    let label: String =
        label.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(40).collect();
    format!("yidi_{label}_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// `postgres://user@host:port/db?query` → the same server (and query) with database `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_replaces_the_one_in_the_url_and_keeps_the_query() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(with_database("postgres://postgres@127.0.0.1:5432", "x"), "postgres://postgres@127.0.0.1:5432/x");
        assert_eq!(with_database("postgres://u:p@h/test?sslmode=disable", "x"), "postgres://u:p@h/x?sslmode=disable");
    }

    #[test]
    fn names_are_unique_lower_case_and_short_enough() {
        let a = unique_name("Intake C3-lifecycle");
        assert!(a.starts_with("yidi_intake_c3_lifecycle_"), "{a}");
        assert_ne!(a, unique_name("Intake C3-lifecycle"));
        assert!(unique_name(&"x".repeat(100)).len() <= 63);
    }
}
