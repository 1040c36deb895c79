//! The card-status index: every card's status in memory, so that a check (CheckCard, CheckCards)
//! never waits on the database (S1, C4). It is loaded from the database at start-up and updated
//! from the registry's ordered log in its order (every replica's, whoever wrote), before a write is
//! acknowledged (`feed`), so the next check sees each acknowledged change.
//!
//! Compact, for a nation's 1.4 billion cards (docs/SCALING.md): a card loaded at start-up costs
//! one 30-byte record in a sorted array, found by binary search; nothing else. The serial (up to
//! 12 characters of `0-9A-Z`, as every producer issues them) is packed into a `u64` key; the
//! identity number and the status into another `u64`; last change (microseconds), last valid day
//! and home bureau into the rest. The index is split into [`SHARDS`] shards by a hash of the key,
//! each behind its own lock: cards registered while running go to a small hash table of their
//! shard, merged into the shard's array once it holds more than 1/128 of it, so the merge copies
//! one shard (1/256 of the cards) and never doubles the whole index. A card whose serial or number
//! does not pack (never issued so, but accepted) is kept in a small side table under its strings,
//! so the index is exact for every card.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use chrono::{DateTime, NaiveDate, Utc};
use yidi_domain::StoredCardStatus;

/// Serial characters that pack; a packed serial is base 37 with 0 as "no character".
const SERIAL_ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// Longest serial that packs: 37^12 < 2^63.
const MAX_PACKED_SERIAL_LEN: usize = 12;
/// `valid_until` of a card that never expires.
const NO_END: i32 = i32::MIN;
/// Shards of the packed index (a power of two: the shard is the top bits of the key's hash).
pub const SHARDS: usize = 256;
/// A shard's new cards are merged into its array once they are more than 1/128 of it (and more
/// than a few thousand), so the hash table's larger per-card cost stays under a byte per card.
const MERGE_RATIO: usize = 128;
const MERGE_AT_LEAST: usize = 4096;
/// A packed identity number is below 10^17 × 11 < 2^60: the status takes the top bits.
const STATUS_SHIFT: u32 = 60;
const NUMBER_MASK: u64 = (1 << STATUS_SHIFT) - 1;

/// A card's state as a check needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardState {
    pub status: StoredCardStatus,
    pub valid_until: Option<NaiveDate>,
    pub status_changed_at: DateTime<Utc>,
    /// The holder's home bureau, resolved with [`CardIndex::bureau_id`] (only hits need its name).
    pub home_bureau: BureauRef,
}

/// A home bureau as the index stores it: a position in its table of bureau ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BureauRef(u16);

/// What a card is, for [`CardIndex::insert`].
#[derive(Debug, Clone, Copy)]
pub struct IndexedCard<'a> {
    pub serial: &'a str,
    pub id_number: &'a str,
    pub home_bureau_id: &'a str,
    pub status: StoredCardStatus,
    pub valid_until: Option<NaiveDate>,
    pub status_changed_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("more than {} home bureaus", u16::MAX)]
    TooManyBureaus,
}

/// One card of a shard's sorted array: 30 bytes, 2-aligned (fields are only ever copied, never
/// borrowed, so packing needs no unsafe code).
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(2))]
struct Record {
    key: u64,
    /// The packed identity number, and the status code above [`STATUS_SHIFT`].
    number_and_status: u64,
    /// Microseconds since the Unix epoch.
    status_changed_at: i64,
    /// Days since 0001-01-01 (CE), or [`NO_END`].
    valid_until: i32,
    home_bureau: u16,
}

/// A card outside the sorted arrays: registered since start-up, or under strings that do not pack.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id_number: u64,
    /// Microseconds since the Unix epoch.
    status_changed_at: i64,
    /// Days since 0001-01-01 (CE), or [`NO_END`].
    valid_until: i32,
    home_bureau: u16,
    status: u8,
}

/// Keys are packed serials, already well spread in their low digits; one multiply-xorshift round
/// (splitmix64's finaliser) spreads them over every bit, far cheaper than SipHash. Nobody outside
/// chooses serials (producers do), so hash flooding is not a concern.
fn spread(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Default)]
struct SerialHasher(u64);

impl Hasher for SerialHasher {
    fn finish(&self) -> u64 {
        spread(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type NewCards = HashMap<u64, Entry, BuildHasherDefault<SerialHasher>>;

fn shard_of(key: u64) -> usize {
    // The top bits of the hash pick the shard; the table inside hashes the same key again, so
    // the shards' tables still use all of their bits.
    (spread(key) >> (64 - SHARDS.trailing_zeros())) as usize
}

#[derive(Default)]
struct Shard {
    /// Sorted by key, one record a card.
    loaded: Vec<Record>,
    /// Cards registered since the last merge; never a key of `loaded`.
    added: NewCards,
}

#[derive(Default)]
struct Bureaus {
    ids: Vec<String>,
    refs: HashMap<String, u16>,
}

/// See the module documentation.
pub struct CardIndex {
    shards: Vec<RwLock<Shard>>,
    /// Cards whose serial or identity number does not pack, under their strings.
    unpacked: RwLock<HashMap<String, (String, Entry)>>,
    bureaus: RwLock<Bureaus>,
}

impl Default for CardIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

/// `0-9A-Z`, at most 12 characters → a unique non-zero `u64`.
pub fn pack_serial(serial: &str) -> Option<u64> {
    let bytes = serial.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_PACKED_SERIAL_LEN {
        return None;
    }
    let mut packed: u64 = 0;
    for byte in bytes {
        let digit = SERIAL_ALPHABET.iter().position(|c| c == byte)?;
        packed = packed * 37 + digit as u64 + 1;
    }
    Some(packed)
}

/// 17 digits and a check character (`0-9` or `X`) → a unique `u64` (digits × 11 + check).
pub fn pack_id_number(id_number: &str) -> Option<u64> {
    let bytes = id_number.as_bytes();
    if bytes.len() != 18 {
        return None;
    }
    let mut packed: u64 = 0;
    for byte in &bytes[..17] {
        if !byte.is_ascii_digit() {
            return None;
        }
        packed = packed * 10 + u64::from(byte - b'0');
    }
    let check = match bytes[17] {
        b'X' => 10,
        digit if digit.is_ascii_digit() => u64::from(digit - b'0'),
        _ => return None,
    };
    Some(packed * 11 + check)
}

fn status_code(status: StoredCardStatus) -> u8 {
    match status {
        StoredCardStatus::Valid => 0,
        StoredCardStatus::ReportedLost => 1,
        StoredCardStatus::Revoked => 2,
        StoredCardStatus::Made => 3,
        StoredCardStatus::Voided => 4,
    }
}

fn status_from_code(code: u8) -> StoredCardStatus {
    match code {
        0 => StoredCardStatus::Valid,
        1 => StoredCardStatus::ReportedLost,
        3 => StoredCardStatus::Made,
        4 => StoredCardStatus::Voided,
        // Never written; were it read, "revoked" is the answer that accepts nothing.
        _ => StoredCardStatus::Revoked,
    }
}

fn encode_day(day: Option<NaiveDate>) -> i32 {
    day.map_or(NO_END, |d| chrono::Datelike::num_days_from_ce(&d))
}

fn decode_day(days: i32) -> Option<NaiveDate> {
    if days == NO_END { None } else { NaiveDate::from_num_days_from_ce_opt(days) }
}

fn decode_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

impl Entry {
    fn state(self) -> CardState {
        CardState {
            status: status_from_code(self.status),
            valid_until: decode_day(self.valid_until),
            status_changed_at: decode_time(self.status_changed_at),
            home_bureau: BureauRef(self.home_bureau),
        }
    }

    fn record(self, key: u64) -> Record {
        Record {
            key,
            number_and_status: (self.id_number & NUMBER_MASK) | (u64::from(self.status) << STATUS_SHIFT),
            status_changed_at: self.status_changed_at,
            valid_until: self.valid_until,
            home_bureau: self.home_bureau,
        }
    }
}

impl Record {
    fn entry(self) -> Entry {
        let number_and_status = self.number_and_status;
        Entry {
            id_number: number_and_status & NUMBER_MASK,
            status_changed_at: self.status_changed_at,
            valid_until: self.valid_until,
            home_bureau: self.home_bureau,
            // Three bits hold every code (0–4).
            status: (number_and_status >> STATUS_SHIFT) as u8,
        }
    }

    fn key(&self) -> u64 {
        self.key
    }
}

impl Shard {
    fn position(&self, key: u64) -> Option<usize> {
        self.loaded.binary_search_by_key(&key, Record::key).ok()
    }

    fn get(&self, key: u64) -> Option<Entry> {
        match self.position(key) {
            Some(at) => Some(self.loaded[at].entry()),
            None => self.added.get(&key).copied(),
        }
    }

    fn put(&mut self, key: u64, entry: Entry) {
        match self.position(key) {
            Some(at) => self.loaded[at] = entry.record(key),
            None => {
                self.added.insert(key, entry);
                if self.added.len() > MERGE_AT_LEAST.max(self.loaded.len() / MERGE_RATIO) {
                    self.merge();
                }
            }
        }
    }

    /// Moves the new cards into the sorted array (one allocation of exactly the size needed).
    fn merge(&mut self) {
        let mut added: Vec<Record> = self.added.drain().map(|(key, entry)| entry.record(key)).collect();
        added.sort_unstable_by_key(Record::key);
        let mut merged = Vec::with_capacity(self.loaded.len() + added.len());
        let (mut old, mut new) = (self.loaded.iter().copied().peekable(), added.into_iter().peekable());
        loop {
            let next = match (old.peek(), new.peek()) {
                (Some(a), Some(b)) if a.key() <= b.key() => old.next(),
                (Some(_), Some(_)) | (None, Some(_)) => new.next(),
                (Some(_), None) => old.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        self.loaded = merged;
        self.added = NewCards::default();
    }

    fn len(&self) -> usize {
        self.loaded.len() + self.added.len()
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A writer that panicked left whole entries (each update is one assignment): keep serving.
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Bureaus {
    fn reference(lock: &RwLock<Self>, id: &str) -> Result<u16, IndexError> {
        if let Some(existing) = read(lock).refs.get(id) {
            return Ok(*existing);
        }
        let mut bureaus = write(lock);
        if let Some(existing) = bureaus.refs.get(id) {
            return Ok(*existing);
        }
        let next = u16::try_from(bureaus.ids.len()).map_err(|_| IndexError::TooManyBureaus)?;
        bureaus.ids.push(id.to_owned());
        bureaus.refs.insert(id.to_owned(), next);
        Ok(next)
    }
}

/// Builds an index from the cards read at start-up: each card is appended to its shard's array,
/// and [`IndexLoader::finish`] sorts the shards once, so loading costs no hash table and no copy.
pub struct IndexLoader {
    index: CardIndex,
}

impl IndexLoader {
    pub fn push(&mut self, card: IndexedCard<'_>) -> Result<(), IndexError> {
        let entry = self.index.entry(card)?;
        match (pack_serial(card.serial), pack_id_number(card.id_number)) {
            (Some(key), Some(_)) => {
                let shard =
                    self.index.shards[shard_of(key)].get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
                shard.loaded.push(entry.record(key));
            }
            _ => self.index.insert_unpacked(card, entry),
        }
        Ok(())
    }

    /// The index, each shard sorted (a serial read twice keeps one record: serials are unique
    /// in the database, so this never happens there).
    pub fn finish(mut self) -> CardIndex {
        for shard in &mut self.index.shards {
            let shard = shard.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
            shard.loaded.sort_by_key(Record::key);
            shard.loaded.dedup_by_key(|record| record.key());
            shard.loaded.shrink_to_fit();
        }
        self.index
    }
}

impl CardIndex {
    /// An empty index with room for `cards` cards loaded by [`IndexLoader`].
    pub fn with_capacity(cards: usize) -> Self {
        // A little slack per shard: the hash does not split the cards exactly evenly.
        let per_shard = if cards == 0 { 0 } else { cards / SHARDS + cards / SHARDS / 32 + 16 };
        Self {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard { loaded: Vec::with_capacity(per_shard), ..Shard::default() }))
                .collect(),
            unpacked: RwLock::default(),
            bureaus: RwLock::default(),
        }
    }

    /// A loader for about `cards` cards.
    pub fn loader(cards: usize) -> IndexLoader {
        IndexLoader { index: Self::with_capacity(cards) }
    }

    fn entry(&self, card: IndexedCard<'_>) -> Result<Entry, IndexError> {
        Ok(Entry {
            id_number: pack_id_number(card.id_number).unwrap_or(0),
            status_changed_at: card.status_changed_at.timestamp_micros(),
            valid_until: encode_day(card.valid_until),
            home_bureau: Bureaus::reference(&self.bureaus, card.home_bureau_id)?,
            status: status_code(card.status),
        })
    }

    fn insert_unpacked(&self, card: IndexedCard<'_>, entry: Entry) {
        write(&self.unpacked).insert(card.serial.to_owned(), (card.id_number.to_owned(), entry));
    }

    /// Adds or replaces a card.
    pub fn insert(&self, card: IndexedCard<'_>) -> Result<(), IndexError> {
        let entry = self.entry(card)?;
        match (pack_serial(card.serial), pack_id_number(card.id_number)) {
            (Some(key), Some(_)) => write(&self.shards[shard_of(key)]).put(key, entry),
            _ => self.insert_unpacked(card, entry),
        }
        Ok(())
    }

    /// The state of card `serial` if its holder's number is `id_number` (C4: otherwise unknown).
    pub fn get(&self, serial: &str, id_number: &str) -> Option<CardState> {
        if let (Some(key), Some(number)) = (pack_serial(serial), pack_id_number(id_number))
            && let Some(entry) = read(&self.shards[shard_of(key)]).get(key)
        {
            return (entry.id_number == number).then(|| entry.state());
        }
        match read(&self.unpacked).get(serial) {
            Some((holder, entry)) if holder == id_number => Some(entry.state()),
            _ => None,
        }
    }

    /// The id of a home bureau the index refers to.
    pub fn bureau_id(&self, bureau: BureauRef) -> String {
        read(&self.bureaus).ids.get(usize::from(bureau.0)).cloned().unwrap_or_default()
    }

    /// Number of cards indexed.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| read(shard).len()).sum::<usize>() + read(&self.unpacked).len()
    }

    /// Bytes the index holds for its cards (arrays and tables by their capacity), for the scale
    /// figures of docs/SCALING.md.
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(u64, Entry)>() + 1;
        let shards: usize = self
            .shards
            .iter()
            .map(|shard| {
                let shard = read(shard);
                shard.loaded.capacity() * std::mem::size_of::<Record>() + shard.added.capacity() * entry
            })
            .sum();
        shards + read(&self.unpacked).capacity() * (entry + 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 123_456_000).unwrap()
    }

    const HOLDER: &str = "36070220961106000X";

    fn card<'a>(serial: &'a str, id_number: &'a str) -> IndexedCard<'a> {
        IndexedCard {
            serial,
            id_number,
            home_bureau_id: "home-jiangxi",
            status: StoredCardStatus::Valid,
            valid_until: NaiveDate::from_ymd_opt(2130, 1, 31),
            status_changed_at: at(4_000_000_000),
        }
    }

    #[test]
    fn serials_pack_uniquely_and_only_when_short_upper_case_alphanumeric() {
        let a = pack_serial("JX0001000000").unwrap();
        assert_ne!(a, pack_serial("JX0001000001").unwrap());
        assert_ne!(pack_serial("0").unwrap(), pack_serial("00").unwrap(), "length is part of the value");
        assert!(pack_serial("ZZZZZZZZZZZZ").is_some());
        assert_eq!(pack_serial("ZZZZZZZZZZZZZ"), None);
        assert_eq!(pack_serial("jx0001000000"), None);
        assert_eq!(pack_serial(""), None);
    }

    #[test]
    fn id_numbers_pack_with_their_check_character() {
        let x = pack_id_number(HOLDER).unwrap();
        assert_ne!(x, pack_id_number("360702209611060009").unwrap());
        assert_eq!(pack_id_number("36070220961106000x"), None, "stored numbers are upper case");
        assert_eq!(pack_id_number("3607022096110600"), None);
    }

    #[test]
    fn c4_a_card_is_found_only_under_its_holder_s_number() {
        let index = CardIndex::with_capacity(4);
        index.insert(card("JX0001000000", HOLDER)).unwrap();
        let state = index.get("JX0001000000", HOLDER).unwrap();
        assert_eq!(state.status, StoredCardStatus::Valid);
        assert_eq!(state.status_changed_at, at(4_000_000_000));
        assert_eq!(state.valid_until, NaiveDate::from_ymd_opt(2130, 1, 31));
        assert_eq!(index.bureau_id(state.home_bureau), "home-jiangxi");
        assert_eq!(index.get("JX0001000000", "360702209611060009"), None);
        assert_eq!(index.get("JX0001000001", HOLDER), None);
    }

    #[test]
    fn s1_a_status_change_is_seen_by_the_next_lookup() {
        let index = CardIndex::with_capacity(4);
        index.insert(card("JX0001000000", HOLDER)).unwrap();
        let mut lost = card("JX0001000000", HOLDER);
        (lost.status, lost.status_changed_at) = (StoredCardStatus::ReportedLost, at(4_000_000_100));
        index.insert(lost).unwrap();
        let state = index.get("JX0001000000", HOLDER).unwrap();
        assert_eq!((state.status, state.status_changed_at), (StoredCardStatus::ReportedLost, at(4_000_000_100)));
        assert_eq!(index.len(), 1, "replaced, not added");
    }

    #[test]
    fn cards_that_do_not_pack_are_kept_exactly_too() {
        let index = CardIndex::with_capacity(4);
        let mut odd = card("legacy-serial-that-is-long", HOLDER);
        odd.valid_until = None;
        index.insert(odd).unwrap();
        index.insert(card("JX1", "not-a-number")).unwrap();
        assert_eq!(index.get("legacy-serial-that-is-long", HOLDER).unwrap().valid_until, None);
        assert_eq!(index.get("legacy-serial-that-is-long", "360702209611060009"), None);
        assert!(index.get("JX1", "not-a-number").is_some());
        let mut revoked = card("legacy-serial-that-is-long", HOLDER);
        (revoked.status, revoked.status_changed_at) = (StoredCardStatus::Revoked, at(5));
        index.insert(revoked).unwrap();
        assert_eq!(index.get("legacy-serial-that-is-long", HOLDER).unwrap().status, StoredCardStatus::Revoked);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_loaded_card_takes_30_bytes() {
        assert_eq!(std::mem::size_of::<Record>(), 30);
    }

    fn numbered(n: u64) -> (String, String) {
        let birth = NaiveDate::from_ymd_opt(1990, 1, 1).unwrap();
        let number = yidi_domain::IdNumber::compose("360702", birth, (n % 1000) as u16).as_str().to_owned();
        (format!("JX{n:010}"), number)
    }

    #[test]
    fn loaded_cards_and_cards_added_later_are_found_changed_and_merged_exactly() {
        let mut loader = CardIndex::loader(20_000);
        for n in 0..20_000 {
            let (serial, number) = numbered(n);
            loader.push(card(&serial, &number)).unwrap();
        }
        let index = loader.finish();
        // Enough new cards that every shard merges at least once.
        for n in 20_000..(20_000 + SHARDS as u64 * (MERGE_AT_LEAST as u64 + 2)) {
            let (serial, number) = numbered(n);
            let mut new = card(&serial, &number);
            new.status = StoredCardStatus::Made;
            index.insert(new).unwrap();
            if n % 7 == 0 {
                new.status = StoredCardStatus::Valid;
                index.insert(new).unwrap();
            }
        }
        assert!(index.shards.iter().any(|shard| read(shard).added.len() < read(shard).loaded.len() / 2));
        let total = 20_000 + SHARDS as u64 * (MERGE_AT_LEAST as u64 + 2);
        assert_eq!(index.len() as u64, total);
        for n in (0..total).step_by(97) {
            let (serial, number) = numbered(n);
            let state = index.get(&serial, &number).unwrap();
            let expected = if n < 20_000 || n % 7 == 0 { StoredCardStatus::Valid } else { StoredCardStatus::Made };
            assert_eq!(state.status, expected, "card {n}");
            assert_eq!(state.valid_until, NaiveDate::from_ymd_opt(2130, 1, 31));
            let (_, other) = numbered(n + 1);
            assert_eq!(index.get(&serial, &other), None, "C4: another number");
        }
        // Every status code survives its packing next to the number.
        let (serial, number) = numbered(3);
        for status in [
            StoredCardStatus::Valid,
            StoredCardStatus::ReportedLost,
            StoredCardStatus::Revoked,
            StoredCardStatus::Made,
            StoredCardStatus::Voided,
        ] {
            let mut changed = card(&serial, &number);
            (changed.status, changed.status_changed_at) = (status, at(9));
            index.insert(changed).unwrap();
            assert_eq!(index.get(&serial, &number).map(|s| (s.status, s.status_changed_at)), Some((status, at(9))));
        }
    }
}
