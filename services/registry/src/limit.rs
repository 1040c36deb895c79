//! C4: repeated misses (number and serial that do not belong together) from one caller are limited,
//! so that serials cannot be enumerated. A token bucket per caller: each miss takes a token, tokens
//! come back at `per_minute` a minute up to `per_minute`. Hits take nothing.
//!
//! A caller whose bucket is empty is refused every check until a token is back, hits included:
//! answering its hits while refusing its misses would tell the two apart, the very thing the limit
//! is there to stop.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

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

    /// Whether `caller` may be told answers of which `misses` are misses. Refused when it has no
    /// token left, or fewer than its misses (the bucket is then emptied: a batch of guesses costs
    /// what it would have cost one by one).
    pub fn admit(&self, caller: &str, misses: usize, now: Instant) -> Result<(), Exhausted> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > PRUNE_ABOVE {
            let capacity = self.capacity;
            buckets.retain(|_, bucket| self.refilled(*bucket, now).tokens < capacity);
        }
        let full = Bucket { tokens: self.capacity, updated: now };
        let bucket = buckets.get(caller).map_or(full, |bucket| self.refilled(*bucket, now));
        let (result, tokens) = if bucket.tokens < 1.0 {
            (Err(Exhausted { retry_after: self.wait_for_one(bucket.tokens) }), bucket.tokens)
        } else if (misses as f64) <= bucket.tokens {
            (Ok(()), bucket.tokens - misses as f64)
        } else {
            (Err(Exhausted { retry_after: self.wait_for_one(0.0) }), 0.0)
        };
        if misses > 0 || buckets.contains_key(caller) {
            buckets.insert(caller.to_owned(), Bucket { tokens, updated: now });
        }
        result
    }
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
