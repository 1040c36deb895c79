//! Test support, used only as a dev-dependency: in-process bureaus ([`Bureau`]), directories
//! ([`DirectoryBuilder`]), fake peers ([`fake`]), and scratch PostgreSQL databases with the one
//! convention every PostgreSQL test follows:
//!
//! - the server is the one of `YIDI_TEST_POSTGRES_URL` (default [`DEFAULT_TEST_POSTGRES_URL`]);
//! - each run creates its own uniquely named database(s) there and drops them afterwards;
//! - an unreachable server skips the test (it prints `SKIPPED: ...` and passes), unless
//!   `YIDI_REQUIRE_POSTGRES=1`, which makes it fail.
#![forbid(unsafe_code)]

pub mod bureau;
pub mod directory;
pub mod fake;

pub use bureau::{Bureau, Shutdown};
pub use directory::DirectoryBuilder;

use sea_orm::DbErr;
use yidi_runtime::scratch::connect_admin;
pub use yidi_runtime::scratch::{DEFAULT_TEST_POSTGRES_URL, ScratchDatabase, test_postgres_url};

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
    let _ = admin.close().await;
    let created = ScratchDatabase::create(&url, label).await;
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

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait;

    use super::*;

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
