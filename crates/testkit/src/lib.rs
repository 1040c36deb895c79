//! Scratch PostgreSQL databases for tests and demos, and the one convention every PostgreSQL test
//! follows:
//!
//! - the server is the one of `YIDI_TEST_POSTGRES_URL` (default [`DEFAULT_TEST_POSTGRES_URL`]);
//! - each run creates its own uniquely named database(s) there and drops them afterwards;
//! - an unreachable server skips the test (it prints `SKIPPED: ...` and passes), unless
//!   `YIDI_REQUIRE_POSTGRES=1`, which makes it fail.
pub mod bureau;
pub mod directory;
pub mod fake;

pub use bureau::{Bureau, Shutdown};
pub use directory::DirectoryBuilder;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

use yidi_runtime::{config::DatabaseConfig, db};

/// The server PostgreSQL tests use when `YIDI_TEST_POSTGRES_URL` is not set.
pub const DEFAULT_TEST_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `YIDI_TEST_POSTGRES_URL`, or [`DEFAULT_TEST_POSTGRES_URL`].
pub fn test_postgres_url() -> String {
    std::env::var("YIDI_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_POSTGRES_URL.to_owned())
}

/// Whether an unreachable server fails the test instead of skipping it (`YIDI_REQUIRE_POSTGRES=1`).
pub fn postgres_required() -> bool {
    std::env::var("YIDI_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The test server's URL if it is reachable. `Ok(None)`: it is not, and not required, so the
/// caller skips its PostgreSQL run (a `SKIPPED: ...` line is printed). `Err`: it is not, and
/// `YIDI_REQUIRE_POSTGRES=1`.
pub async fn postgres_server_for_tests() -> Result<Option<String>, String> {
    let url = test_postgres_url();
    match connect_admin(&url).await {
        Ok(admin) => {
            let _ = admin.close().await;
            Ok(Some(url))
        }
        Err(error) => unreachable(&url, &error).map(|()| None),
    }
}

/// A fresh database named after `label` on the test server, following the convention above.
/// `Ok(None)`: the server is unreachable and not required; the caller skips its PostgreSQL run.
pub async fn postgres_for_tests(label: &str) -> Result<Option<ScratchDatabase>, String> {
    let url = test_postgres_url();
    let admin = match connect_admin(&url).await {
        Ok(admin) => admin,
        Err(error) => return unreachable(&url, &error).map(|()| None),
    };
    let created = ScratchDatabase::create_on(&admin, &url, label).await;
    let _ = admin.close().await;
    created.map(Some).map_err(|error| format!("creating a scratch database on {url}: {error}"))
}

/// Skips (prints why, `Ok`) or fails (`Err`, when PostgreSQL is required).
fn unreachable(url: &str, error: &DbErr) -> Result<(), String> {
    if postgres_required() {
        return Err(format!("PostgreSQL is required (YIDI_REQUIRE_POSTGRES=1) but {url} is unreachable: {error}"));
    }
    eprintln!("SKIPPED: PostgreSQL at {url} is unreachable ({error}); the PostgreSQL run of this test was skipped");
    Ok(())
}

/// A uniquely named database, created on a server and dropped by [`ScratchDatabase::drop`]. One
/// never dropped (a test that panicked) is dropped when the value goes away.
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

async fn connect_admin(url: &str) -> Result<DatabaseConnection, DbErr> {
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

    #[tokio::test]
    async fn a_scratch_database_is_created_usable_and_dropped() {
        let Some(scratch) = postgres_for_tests("scratch_db").await.unwrap() else { return };
        let url = scratch.url().to_owned();
        let db = connect_admin(&url).await.unwrap();
        db.execute_unprepared("CREATE TABLE t (x INT)").await.unwrap();
        db.close().await.unwrap();
        scratch.drop().await.unwrap();
        assert!(connect_admin(&url).await.is_err(), "dropped");

        // One never dropped explicitly goes when the value does.
        let Some(forgotten) = postgres_for_tests("scratch_db").await.unwrap() else { return };
        let url = forgotten.url().to_owned();
        std::mem::drop(forgotten);
        assert!(connect_admin(&url).await.is_err(), "dropped with the value");
    }
}
