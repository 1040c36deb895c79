//! The intake migrations on a fresh database, SQLite and PostgreSQL: the retry bookkeeping of
//! `applications` is dropped and the rows written before survive, with their indexes.
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, sea_query::Query};
use yidi_intake_migration::{Migrator, MigratorTrait};
use yidi_testkit::postgres_for_tests;

const DROPPED: [&str; 4] = ["halted", "attempts", "last_error", "next_attempt_at"];

async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    let rows = db.query_all_raw(Statement::from_string(db.get_database_backend(), sql.to_owned())).await.unwrap();
    rows.iter().map(|row| row.try_get_by_index::<String>(0).unwrap()).collect()
}

async fn columns(db: &DatabaseConnection) -> Vec<String> {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'applications' \
             AND table_schema = current_schema() ORDER BY column_name"
        }
        _ => "SELECT name FROM pragma_table_info('applications') ORDER BY name",
    };
    strings(db, sql).await
}

async fn indexes(db: &DatabaseConnection) -> Vec<String> {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'applications' AND indexname LIKE 'idx_%' \
             ORDER BY indexname"
        }
        _ => {
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'applications' \
              AND name LIKE 'idx_%' ORDER BY name"
        }
    };
    strings(db, sql).await
}

/// A row as the worker before the outbox left it, retry bookkeeping included.
async fn insert_old_row(db: &DatabaseConnection, id: &str, state: &str) {
    let at: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let insert = Query::insert()
        .into_table("applications")
        .columns([
            "application_id",
            "kind",
            "state",
            "id_number",
            "declared_province",
            "home_bureau_id",
            "previous_card_serial",
            "document_kind",
            "live_face_template",
            "live_fingerprint_template",
            "loss_recorded",
            "home_notified",
            "halted",
            "attempts",
            "last_error",
            "next_attempt_at",
            "request_key",
            "created_at",
            "updated_at",
        ])
        .values_panic([
            id.into(),
            "replacement".into(),
            state.into(),
            "360102199003071243".into(),
            "36".into(),
            "home-jiangxi".into(),
            "C-1".into(),
            "household_register_book".into(),
            vec![1u8; 64].into(),
            vec![2u8; 64].into(),
            false.into(),
            false.into(),
            true.into(),
            3.into(),
            "home-jiangxi: Unavailable".into(),
            at.into(),
            format!("key-{id}").into(),
            at.into(),
            at.into(),
        ])
        .to_owned();
    db.execute(&insert).await.unwrap();
}

async fn check(url: &str) {
    let db = Database::connect(url).await.unwrap();
    let all = Migrator::migrations().len() as u32;
    Migrator::up(&db, Some(all - 1)).await.unwrap();
    for column in DROPPED {
        assert!(columns(&db).await.iter().any(|c| c == column), "{column} exists before the drop");
    }
    let indexes_before = indexes(&db).await;
    insert_old_row(&db, "app-1", "verifying").await;
    insert_old_row(&db, "app-2", "collected").await;

    Migrator::up(&db, None).await.unwrap();
    let after = columns(&db).await;
    for column in DROPPED {
        assert!(!after.iter().any(|c| c == column), "{column} is dropped: {after:?}");
    }
    assert!(after.iter().any(|c| c == "request_key"), "the other columns stay: {after:?}");
    assert_eq!(indexes(&db).await, indexes_before);
    let rows = strings(
        &db,
        "SELECT application_id || ' ' || kind || ' ' || state || ' ' || request_key FROM applications \
         ORDER BY application_id",
    )
    .await;
    assert_eq!(rows, ["app-1 replacement verifying key-app-1", "app-2 replacement collected key-app-2"]);

    // Reversible: the columns come back, the rows stay.
    Migrator::down(&db, Some(1)).await.unwrap();
    let restored = columns(&db).await;
    for column in DROPPED {
        assert!(restored.iter().any(|c| c == column), "{column} is back after down: {restored:?}");
    }
    assert_eq!(
        strings(&db, "SELECT application_id FROM applications ORDER BY application_id").await,
        ["app-1", "app-2"]
    );
    db.close().await.unwrap();
}

#[tokio::test]
async fn unused_application_columns_are_dropped_and_rows_survive_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("intake.db").display());
    check(&url).await;
}

#[tokio::test]
async fn unused_application_columns_are_dropped_and_rows_survive_on_postgres() {
    let Some(scratch) = postgres_for_tests("intake_migration").await.unwrap() else { return };
    check(scratch.url()).await;
    scratch.drop().await.unwrap();
}
