//! The card-status index: every card's status in memory, so that a check (CheckCard, CheckCards)
//! never waits on the database (S1, C4). It is loaded from the database at start-up and updated
//! from the registry's ordered log in its order (every replica's, whoever wrote), before a write is
//! acknowledged (`feed`), so the next check sees each acknowledged change.
//!
//! Compact: a card costs one hash-table slot of 32 bytes plus one control byte. The serial (up to
//! 12 characters of `0-9A-Z`, as every producer issues them) is packed into a `u64` key; the
//! identity number into a `u64`; status, last change (microseconds) and last valid day into the
//! rest. A card whose serial or number does not pack (never issued so, but accepted) is kept in a
//! small side table under its strings, so the index is exact for every card.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::RwLock,
};

use chrono::{DateTime, NaiveDate, Utc};
use yidi_domain::StoredCardStatus;

/// Serial characters that pack; a packed serial is base 37 with 0 as "no character".
const SERIAL_ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// Longest serial that packs: 37^12 < 2^63.
const MAX_PACKED_SERIAL_LEN: usize = 12;
/// `valid_until` of a card that never expires.
const NO_END: i32 = i32::MIN;

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

/// One card in the packed table (24 bytes; 32 with its key).
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
/// (splitmix64's finaliser) spreads them over every bit the table uses, far cheaper than SipHash.
/// Nobody outside chooses serials (producers do), so hash flooding is not a concern.
#[derive(Default)]
struct SerialHasher(u64);

impl Hasher for SerialHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
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

type PackedTable = HashMap<u64, Entry, BuildHasherDefault<SerialHasher>>;

#[derive(Default)]
struct Inner {
    packed: PackedTable,
    /// Cards whose serial or identity number does not pack, under their strings.
    unpacked: HashMap<String, (String, Entry)>,
    bureaus: Vec<String>,
    bureau_refs: HashMap<String, u16>,
}

/// See the module documentation.
#[derive(Default)]
pub struct CardIndex {
    inner: RwLock<Inner>,
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
}

impl Inner {
    fn bureau_ref(&mut self, id: &str) -> Result<u16, IndexError> {
        if let Some(existing) = self.bureau_refs.get(id) {
            return Ok(*existing);
        }
        let next = u16::try_from(self.bureaus.len()).map_err(|_| IndexError::TooManyBureaus)?;
        self.bureaus.push(id.to_owned());
        self.bureau_refs.insert(id.to_owned(), next);
        Ok(next)
    }
}

impl CardIndex {
    /// An empty index with room for `cards` packed cards, so loading never re-hashes.
    pub fn with_capacity(cards: usize) -> Self {
        let inner =
            Inner { packed: PackedTable::with_capacity_and_hasher(cards, Default::default()), ..Inner::default() };
        Self { inner: RwLock::new(inner) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A writer that panicked left whole entries (each update is one assignment): keep serving.
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds or replaces a card.
    pub fn insert(&self, card: IndexedCard<'_>) -> Result<(), IndexError> {
        let mut inner = self.write();
        let home_bureau = inner.bureau_ref(card.home_bureau_id)?;
        let entry = Entry {
            id_number: pack_id_number(card.id_number).unwrap_or(0),
            status_changed_at: card.status_changed_at.timestamp_micros(),
            valid_until: encode_day(card.valid_until),
            home_bureau,
            status: status_code(card.status),
        };
        match (pack_serial(card.serial), pack_id_number(card.id_number)) {
            (Some(key), Some(_)) => {
                inner.packed.insert(key, entry);
            }
            _ => {
                inner.unpacked.insert(card.serial.to_owned(), (card.id_number.to_owned(), entry));
            }
        }
        Ok(())
    }

    /// The state of card `serial` if its holder's number is `id_number` (C4: otherwise unknown).
    pub fn get(&self, serial: &str, id_number: &str) -> Option<CardState> {
        let inner = self.read();
        if let (Some(key), Some(number)) = (pack_serial(serial), pack_id_number(id_number))
            && let Some(entry) = inner.packed.get(&key)
        {
            return (entry.id_number == number).then(|| entry.state());
        }
        match inner.unpacked.get(serial) {
            Some((holder, entry)) if holder == id_number => Some(entry.state()),
            _ => None,
        }
    }

    /// The id of a home bureau the index refers to.
    pub fn bureau_id(&self, bureau: BureauRef) -> String {
        self.read().bureaus.get(usize::from(bureau.0)).cloned().unwrap_or_default()
    }

    /// Number of cards indexed.
    pub fn len(&self) -> usize {
        let inner = self.read();
        inner.packed.len() + inner.unpacked.len()
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
    fn an_entry_with_its_key_takes_32_bytes() {
        assert_eq!(std::mem::size_of::<(u64, Entry)>(), 32);
    }
}
