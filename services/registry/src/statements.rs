//! C4: signed status statements made once and served again, OCSP's way. A check without a nonce
//! is answered with the card's cached statement while that one still says what the index says
//! (status and time of change), was signed with the key the registry signs with now, and has more
//! than half of its window (`answered_at` .. `next_update`) left; otherwise a new statement is
//! signed and cached. A status change replaces the card's statement before it is acknowledged
//! (`Registry::index_events`), and even a statement cached by a check racing the change is never
//! served: it no longer matches the index.
//!
//! The cache is bounded: [`SHARDS`] shards, each holding two generations of at most
//! `entries / (2 × SHARDS)` cards; when the young one is full, the old one is dropped and the young
//! one becomes old (a card found in the old one moves back to the young one).
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, PoisonError},
};

use chrono::{DateTime, Utc};
use yidi_domain::{
    CardStatus,
    status::{SignedStatusStatement, StatusStatement},
};

use crate::service::CheckResult;

const SHARDS: usize = 16;

type Statement = Arc<SignedStatusStatement>;

#[derive(Default)]
struct Generations {
    young: HashMap<String, Statement>,
    old: HashMap<String, Statement>,
}

/// The newest statement of recently checked cards, by serial.
pub struct StatementCache {
    shards: Vec<Mutex<Generations>>,
    per_generation: usize,
    hasher: RandomState,
}

impl StatementCache {
    /// A cache of at most `entries` statements; 0: nothing is cached (every answer is signed).
    pub fn new(entries: usize) -> Self {
        let shards = if entries == 0 { 0 } else { SHARDS };
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            per_generation: entries.div_ceil(2 * SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, serial: &str) -> Option<std::sync::MutexGuard<'_, Generations>> {
        if self.shards.is_empty() {
            return None;
        }
        let index = (self.hasher.hash_one(serial) as usize) % self.shards.len();
        // A panic while holding a shard leaves whole maps behind: the data is still sound.
        Some(self.shards[index].lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The cached statement of `serial`, if any.
    pub fn get(&self, serial: &str) -> Option<Statement> {
        let mut shard = self.shard(serial)?;
        if let Some(statement) = shard.young.get(serial) {
            return Some(Arc::clone(statement));
        }
        let statement = shard.old.remove(serial)?;
        Self::insert(&mut shard, self.per_generation, serial, Arc::clone(&statement));
        Some(statement)
    }

    /// Caches `statement` as `serial`'s, replacing any other.
    pub fn put(&self, serial: &str, statement: Statement) {
        if let Some(mut shard) = self.shard(serial) {
            shard.old.remove(serial);
            Self::insert(&mut shard, self.per_generation, serial, statement);
        }
    }

    fn insert(shard: &mut Generations, per_generation: usize, serial: &str, statement: Statement) {
        if shard.young.len() >= per_generation && !shard.young.contains_key(serial) {
            shard.old = std::mem::take(&mut shard.young);
        }
        shard.young.insert(serial.to_owned(), statement);
    }

    /// Forgets `serial`'s statement; whether there was one.
    pub fn remove(&self, serial: &str) -> bool {
        let Some(mut shard) = self.shard(serial) else { return false };
        let young = shard.young.remove(serial).is_some();
        shard.old.remove(serial).is_some() || young
    }

    /// Statements held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.young.len() + shard.old.len()
            })
            .sum()
    }
}

/// Whether a check may be answered by `cached` (see the module documentation): a check without a
/// nonce of a known card, at `now`, whose live answer is `result`, that the registry would sign
/// with `key_id`, under the holder-number hash `id_number_hash`.
pub fn reusable(
    cached: &StatusStatement,
    key_id: &str,
    id_number_hash: &[u8; 32],
    result: &CheckResult,
    now: DateTime<Utc>,
) -> bool {
    let window = cached.next_update - cached.answered_at;
    result.status != CardStatus::Unknown
        && cached.nonce.is_empty()
        && cached.key_id == key_id
        && cached.id_number_hash == *id_number_hash
        && cached.status == result.status
        && cached.status_changed_at == result.status_changed_at
        && cached.answered_at <= now
        && now < cached.answered_at + window / 2
        && now < cached.next_update
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};
    use ed25519_dalek::SigningKey;
    use yidi_domain::status::id_number_hash;

    use super::*;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2118, 3, 1, 9, minute, 0).unwrap()
    }

    fn statement(serial: &str) -> StatusStatement {
        StatusStatement {
            registry_id: "registry".into(),
            key_id: "k1".into(),
            card_serial: serial.into(),
            id_number_hash: id_number_hash("36010219900307123X"),
            status: CardStatus::Valid,
            status_changed_at: Some(at(0)),
            answered_at: at(10),
            next_update: at(20),
            nonce: Vec::new(),
        }
    }

    fn signed(serial: &str) -> Statement {
        Arc::new(statement(serial).sign(&SigningKey::from_bytes(&[3; 32])))
    }

    #[test]
    fn c4_a_statement_is_served_again_only_while_it_says_what_the_index_says_and_half_its_window_is_left() {
        let s = statement("S1");
        let hash = id_number_hash("36010219900307123X");
        let valid = CheckResult { status: CardStatus::Valid, status_changed_at: Some(at(0)) };
        assert!(reusable(&s, "k1", &hash, &valid, at(10)));
        assert!(reusable(&s, "k1", &hash, &valid, at(15) - Duration::nanoseconds(1)));
        // Half the window gone, or past next_update: never served, a new one is signed.
        for late in [at(15), at(19), at(20), at(40)] {
            assert!(!reusable(&s, "k1", &hash, &valid, late), "{late}");
        }
        let lost = CheckResult { status: CardStatus::ReportedLost, status_changed_at: Some(at(12)) };
        assert!(!reusable(&s, "k1", &hash, &lost, at(12)), "the status changed");
        let again = CheckResult { status: CardStatus::Valid, status_changed_at: Some(at(13)) };
        assert!(!reusable(&s, "k1", &hash, &again, at(13)), "lost and found again since");
        assert!(!reusable(&s, "k2", &hash, &valid, at(11)), "the registry signs with another key now");
        assert!(!reusable(&s, "k1", &id_number_hash("510104199001010011"), &valid, at(11)), "another number");
        let with_nonce = StatusStatement { nonce: b"n".to_vec(), ..statement("S1") };
        assert!(!reusable(&with_nonce, "k1", &hash, &valid, at(11)), "another question's answer");
        assert!(!reusable(&s, "k1", &hash, &valid, at(9)), "made after the check");
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_checked() {
        let cache = StatementCache::new(64);
        for i in 0..10_000 {
            cache.put(&format!("S{i}"), signed(&format!("S{i}")));
            assert!(cache.len() <= 64, "{} statements held", cache.len());
        }
        cache.put("HOT", signed("HOT"));
        for i in 0..1_000 {
            cache.put(&format!("T{i}"), signed(&format!("T{i}")));
            // Checked often, it stays.
            assert!(cache.get("HOT").is_some(), "lost after {i}");
        }
        assert!(cache.remove("HOT"));
        assert!(cache.get("HOT").is_none());
        assert!(!cache.remove("HOT"));
        let off = StatementCache::new(0);
        off.put("S1", signed("S1"));
        assert!(off.get("S1").is_none());
    }
}
