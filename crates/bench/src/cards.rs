//! Synthetic cards (valid identity numbers from `yidi_domain`) and the loader that puts millions of
//! them into the registry's database: COPY on PostgreSQL, multi-row inserts on SQLite.
use std::{fmt::Write as _, time::Instant};

use anyhow::Context;
use chrono::{Duration, NaiveDate};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use yidi_demo::topology::{HOME_JIANGXI, HOME_SICHUAN};
use yidi_domain::IdNumber;
use yidi_runtime::config::DatabaseConfig;

/// Serials of synthetic cards: `BN` and ten digits, like a producer's.
const SERIAL_PREFIX: &str = "BN";
/// Rows per COPY chunk or per INSERT statement.
const COPY_CHUNK: u64 = 50_000;
const INSERT_ROWS: u64 = 500;

/// Card `i` of the synthetic population: (identity number, serial). Distinct for distinct `i`
/// (birth day and sequence number come from `i`), valid by N1/N2.
pub fn card(i: u64) -> (String, String) {
    let (county, _) = county_of(i);
    let birth = NaiveDate::from_ymd_opt(1950, 1, 1).unwrap_or_default() + Duration::days((i / 1000) as i64);
    let id = IdNumber::compose(county, birth, (i % 1000) as u16);
    (id.as_str().to_owned(), format!("{SERIAL_PREFIX}{i:010}"))
}

fn county_of(i: u64) -> (&'static str, &'static str) {
    if i.is_multiple_of(2) { ("360102", HOME_JIANGXI) } else { ("510104", HOME_SICHUAN) }
}

/// One `cards` row of card `i`, tab-separated as COPY's text format reads it.
fn copy_line(out: &mut String, i: u64) {
    let (id_number, serial) = card(i);
    let (_, bureau) = county_of(i);
    let _ = writeln!(
        out,
        "{serial}\t{id_number}\t{bureau}\tvalid\t2110-01-01\t2130-01-01\t2110-01-01 00:00:00+00\t2110-01-01 00:00:00+00"
    );
}

fn insert_values(out: &mut String, i: u64) {
    let (id_number, serial) = card(i);
    let (_, bureau) = county_of(i);
    let _ = write!(
        out,
        "('{serial}','{id_number}','{bureau}','valid','2110-01-01','2130-01-01','2110-01-01 00:00:00+00:00','2110-01-01 00:00:00+00:00')"
    );
}

const COLUMNS: &str =
    "serial, id_number, home_bureau_id, status, valid_from, valid_until, status_changed_at, created_at";

/// Creates the registry's schema in `url` and loads cards `0..count`. Returns the seconds it took.
pub async fn load(url: &str, count: u64) -> anyhow::Result<f64> {
    let began = Instant::now();
    let db = yidi_runtime::db::connect(&DatabaseConfig { url: url.to_owned(), max_connections: 2 }).await?;
    yidi_registry_migration::Migrator::up(&db, None).await.context("registry migrations")?;
    match db.get_database_backend() {
        DbBackend::Postgres => copy_postgres(&db, count).await?,
        _ => insert_rows(&db, count).await?,
    }
    db.close().await?;
    Ok(began.elapsed().as_secs_f64())
}

async fn copy_postgres(db: &DatabaseConnection, count: u64) -> anyhow::Result<()> {
    use sea_orm::sqlx::postgres::PgPoolCopyExt;
    let pool = db.get_postgres_connection_pool();
    let mut copy = pool.copy_in_raw(&format!("COPY cards ({COLUMNS}) FROM STDIN")).await?;
    let mut start = 0;
    let mut chunk = String::new();
    while start < count {
        chunk.clear();
        for i in start..(start + COPY_CHUNK).min(count) {
            copy_line(&mut chunk, i);
        }
        copy.send(chunk.as_bytes()).await?;
        start += COPY_CHUNK;
        if start % 1_000_000 == 0 {
            eprintln!("  loaded {start} cards");
        }
    }
    copy.finish().await?;
    db.execute_unprepared("ANALYZE cards").await?;
    Ok(())
}

async fn insert_rows(db: &DatabaseConnection, count: u64) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    let mut start = 0;
    let mut sql = String::new();
    while start < count {
        sql.clear();
        let _ = write!(sql, "INSERT INTO cards ({COLUMNS}) VALUES ");
        for i in start..(start + INSERT_ROWS).min(count) {
            if i > start {
                sql.push(',');
            }
            insert_values(&mut sql, i);
        }
        txn.execute_unprepared(&sql).await?;
        start += INSERT_ROWS;
    }
    txn.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_cards_are_valid_and_distinct() {
        let today = NaiveDate::from_ymd_opt(2118, 3, 1).unwrap();
        let samples = [0, 1, 999, 1000, 9_999_999];
        let cards: Vec<_> = samples.iter().map(|i| card(*i)).collect();
        for (id, serial) in &cards {
            IdNumber::parse(id, today).unwrap();
            assert_eq!(serial.len(), 12);
        }
        let mut ids: Vec<_> = cards.iter().map(|c| c.0.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), samples.len());
    }
}
