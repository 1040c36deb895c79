//! C4: repeated misses (number and serial that do not belong together) from one caller are limited,
//! so that serials cannot be enumerated. A token bucket per caller: each miss takes a token, tokens
//! come back at `per_minute` a minute up to `per_minute`. Hits take nothing.
//!
//! A caller whose bucket is empty is refused every check until a token is back, hits included:
//! answering its hits while refusing its misses would tell the two apart, the very thing the limit
//! is there to stop.
//!
//! Replicas on one PostgreSQL database share the buckets ([`MissBudgets::Shared`]): N replicas do
//! not give a caller N budgets.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use yidi_runtime::db;

/// Above this many callers tracked, buckets that have refilled are forgotten.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct MissLimiter {
    capacity: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// The caller may try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub retry_after: Duration,
}

impl MissLimiter {
    /// `per_minute` ≥ 1: misses allowed in a burst, and regained per minute.
    pub fn new(per_minute: u32) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self { capacity, per_second: capacity / 60.0, buckets: Mutex::default() }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        Bucket { tokens: (bucket.tokens + elapsed * self.per_second).min(self.capacity), updated: now }
    }

    fn wait_for_one(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens).max(0.0) / self.per_second).max(0.001))
    }

    /// The decision for `misses` out of `tokens`, and the tokens left. Refused when there is no
    /// token left, or fewer than the misses (the bucket is then emptied: a batch of guesses costs
    /// what it would have cost one by one).
    fn take(&self, tokens: f64, misses: usize) -> (Result<(), Exhausted>, f64) {
        if tokens < 1.0 {
            (Err(Exhausted { retry_after: self.wait_for_one(tokens) }), tokens)
        } else if (misses as f64) <= tokens {
            (Ok(()), tokens - misses as f64)
        } else {
            (Err(Exhausted { retry_after: self.wait_for_one(0.0) }), 0.0)
        }
    }

    fn buckets(&self, now: Instant) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > PRUNE_ABOVE {
            let capacity = self.capacity;
            buckets.retain(|_, bucket| self.refilled(*bucket, now).tokens < capacity);
        }
        buckets
    }

    /// Whether `caller` may be told answers of which `misses` are misses ([`Self::take`]).
    pub fn admit(&self, caller: &str, misses: usize, now: Instant) -> Result<(), Exhausted> {
        let mut buckets = self.buckets(now);
        let full = Bucket { tokens: self.capacity, updated: now };
        let bucket = buckets.get(caller).map_or(full, |bucket| self.refilled(*bucket, now));
        let (result, tokens) = self.take(bucket.tokens, misses);
        if misses > 0 || buckets.contains_key(caller) {
            buckets.insert(caller.to_owned(), Bucket { tokens, updated: now });
        }
        result
    }

    /// Remembers that `caller` had `tokens` left at `now` (as the shared budgets said).
    fn remember(&self, caller: &str, tokens: f64, now: Instant) {
        self.buckets(now).insert(caller.to_owned(), Bucket { tokens, updated: now });
    }
}

/// C4: the miss budgets of the callers, of this replica alone or shared by all.
#[derive(Debug)]
pub enum MissBudgets {
    /// One replica (SQLite): the buckets live in this process.
    Local(MissLimiter),
    /// Replicas on one PostgreSQL database: every check with a miss takes its tokens from
    /// `registry_miss_budgets` under the caller's row lock. A check without a miss never touches
    /// the database: it is refused when the bucket this replica last saw for the caller is empty.
    Shared { db: DatabaseConnection, seen: MissLimiter },
}

impl MissBudgets {
    /// `per_minute` as [`MissLimiter::new`]; shared on PostgreSQL.
    pub fn new(per_minute: u32, db: &DatabaseConnection) -> Self {
        match db.get_database_backend() {
            DbBackend::Postgres => Self::Shared { db: db.clone(), seen: MissLimiter::new(per_minute) },
            _ => Self::Local(MissLimiter::new(per_minute)),
        }
    }

    /// As [`MissLimiter::admit`], across every replica.
    pub async fn admit(&self, caller: &str, misses: usize, now: Instant) -> Result<(), Exhausted> {
        match self {
            Self::Local(limiter) => limiter.admit(caller, misses, now),
            Self::Shared { seen, .. } if misses == 0 => seen.admit(caller, 0, now),
            Self::Shared { db, seen } => match take_shared(db, seen, caller, misses).await {
                Ok((result, tokens)) => {
                    seen.remember(caller, tokens, now);
                    result
                }
                Err(error) => {
                    // Counted here alone rather than not at all.
                    tracing::warn!(%error, "shared miss budgets unavailable: counted by this replica");
                    seen.admit(caller, misses, now)
                }
            },
        }
    }
}

impl MissBudgets {
    /// PostgreSQL: learns which callers are out of misses at any replica, so that this one refuses
    /// their hits too (within one sync of the exhaustion), and forgets the buckets that are full
    /// again. Nothing to do on SQLite.
    pub async fn sync(&self, now: Instant) -> Result<(), DbErr> {
        let Self::Shared { db, seen } = self else { return Ok(()) };
        // A bucket refills at `per_second`; one older than a full refill holds nothing to learn.
        let full_after = seen.capacity / seen.per_second;
        let exhausted = db
            .query_all_raw(pg(
                "SELECT caller, tokens + EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 * $1 AS tokens \
                 FROM registry_miss_budgets WHERE tokens < 1 \
                 AND updated_at > clock_timestamp() - $2 * interval '1 second'",
                vec![seen.per_second.into(), full_after.into()],
            ))
            .await?;
        for row in exhausted {
            let caller: String = row.try_get("", "caller")?;
            let tokens: f64 = row.try_get("", "tokens")?;
            if tokens < 1.0 {
                seen.remember(&caller, tokens, now);
            }
        }
        db.execute_raw(pg(
            "DELETE FROM registry_miss_budgets WHERE updated_at < clock_timestamp() - $1 * interval '1 second'",
            vec![full_after.into()],
        ))
        .await?;
        Ok(())
    }
}

fn pg(sql: &str, values: Vec<sea_orm::Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// Takes `misses` from the caller's shared bucket in one transaction (the row locked throughout).
async fn take_shared(
    db: &DatabaseConnection,
    limiter: &MissLimiter,
    caller: &str,
    misses: usize,
) -> Result<(Result<(), Exhausted>, f64), DbErr> {
    let txn = db::begin(db).await?;
    txn.execute_raw(pg(
        "INSERT INTO registry_miss_budgets (caller, tokens, updated_at) VALUES ($1, $2, clock_timestamp()) \
         ON CONFLICT (caller) DO NOTHING",
        vec![caller.into(), limiter.capacity.into()],
    ))
    .await?;
    let row = txn
        .query_one_raw(pg(
            "SELECT tokens, EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 AS elapsed, \
             clock_timestamp() AS read_at FROM registry_miss_budgets WHERE caller = $1 FOR UPDATE",
            vec![caller.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("registry_miss_budgets".into()))?;
    let tokens: f64 = row.try_get("", "tokens")?;
    let elapsed: f64 = row.try_get("", "elapsed")?;
    let read_at: chrono::DateTime<chrono::Utc> = row.try_get("", "read_at")?;
    let refilled = (tokens + elapsed.max(0.0) * limiter.per_second).min(limiter.capacity);
    let (result, left) = limiter.take(refilled, misses);
    txn.execute_raw(pg(
        "UPDATE registry_miss_budgets SET tokens = $2, updated_at = $3 WHERE caller = $1",
        vec![caller.into(), left.into(), read_at.into()],
    ))
    .await?;
    txn.commit().await?;
    Ok((result, left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c4_misses_are_limited_per_caller_and_come_back_with_time() {
        let limiter = MissLimiter::new(3);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.admit("bank", 1, start), Ok(()));
        }
        let refused = limiter.admit("bank", 1, start).unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(19) && refused.retry_after <= Duration::from_secs(20));
        assert_eq!(limiter.admit("hotel", 1, start), Ok(()), "another caller has its own bucket");
        assert_eq!(limiter.admit("bank", 1, start + Duration::from_secs(20)), Ok(()), "one token back in 20 s");
        assert!(limiter.admit("bank", 1, start + Duration::from_secs(21)).is_err());
    }

    #[test]
    fn c4_hits_cost_nothing_but_an_exhausted_caller_learns_nothing() {
        let limiter = MissLimiter::new(2);
        let start = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limiter.admit("bank", 0, start), Ok(()));
        }
        assert_eq!(limiter.admit("bank", 2, start), Ok(()));
        assert!(limiter.admit("bank", 0, start).is_err(), "no token: hits are withheld too");
    }

    #[test]
    fn c4_a_batch_with_more_misses_than_tokens_is_refused_and_empties_the_bucket() {
        let limiter = MissLimiter::new(5);
        let start = Instant::now();
        assert!(limiter.admit("bank", 6, start).is_err());
        assert!(limiter.admit("bank", 0, start).is_err());
        assert_eq!(limiter.admit("bank", 5, start + Duration::from_secs(60)), Ok(()));
    }
}
