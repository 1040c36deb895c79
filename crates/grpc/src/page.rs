//! Page tokens for every List RPC: opaque, keyset-based and tied to the filter they were issued for.
//!
//! A token is the URL-safe base64 (no padding) of a small versioned record: a version byte, the
//! first 8 bytes of the SHA-256 of the list's name and filter, and the sort key of the last row of
//! the page. The next page is the rows strictly after that key in the list's order (a `WHERE` on the
//! key, never an `OFFSET`), so rows inserted or changed between two pages are neither repeated nor
//! skipped. A token presented with another filter, or to another list, is refused on `page_token`.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, Condition};
use sha2::{Digest, Sha256};

use crate::error::FieldViolations;

/// Page size when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: u64 = 500;

const VERSION: u8 = 1;
const FILTER_LEN: usize = 8;

/// Page size for list calls: 0 is the default (50), anything above 500 is clamped to 500.
pub fn page_size(raw: u32) -> u64 {
    match u64::from(raw) {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    }
}

/// The list and filter a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter([u8; FILTER_LEN]);

impl Filter {
    /// The filter of `list` (e.g. "intake.applications") with these parameters, in a fixed order.
    pub fn new(list: &str, parameters: &[&str]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(list.as_bytes());
        for parameter in parameters {
            // Length-prefixed, so ("ab", "") and ("a", "b") differ.
            hasher.update((parameter.len() as u64).to_be_bytes());
            hasher.update(parameter.as_bytes());
        }
        let digest = hasher.finalize();
        let mut bytes = [0; FILTER_LEN];
        bytes.copy_from_slice(&digest[..FILTER_LEN]);
        Self(bytes)
    }
}

/// The sort key of a row, as a token carries it.
pub trait PageKey: Sized {
    fn write(&self, out: &mut Vec<u8>);
    fn read(bytes: &[u8]) -> Option<Self>;
}

/// A row id from a sequence (audit entries, hits).
impl PageKey for i64 {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }

    fn read(bytes: &[u8]) -> Option<Self> {
        Some(i64::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// A creation time with the row's id to break ties (applications, outbox messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeId {
    pub at: DateTime<Utc>,
    pub id: String,
}

impl PageKey for TimeId {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.at.timestamp().to_be_bytes());
        out.extend_from_slice(&self.at.timestamp_subsec_nanos().to_be_bytes());
        out.extend_from_slice(self.id.as_bytes());
    }

    fn read(bytes: &[u8]) -> Option<Self> {
        let seconds = i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let nanos = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?);
        let id = std::str::from_utf8(bytes.get(12..)?).ok()?;
        if id.is_empty() || id.len() > 64 {
            return None;
        }
        Some(Self { at: DateTime::from_timestamp(seconds, nanos)?, id: id.to_owned() })
    }
}

impl TimeId {
    /// Rows after this key in newest-first order: `(at, id) < (self.at, self.id)`.
    pub fn older<C: ColumnTrait>(&self, at: C, id: C) -> Condition {
        Condition::any().add(at.lt(self.at)).add(Condition::all().add(at.eq(self.at)).add(id.lt(self.id.as_str())))
    }
}

/// The token for the page after the row with `key`.
pub fn encode<K: PageKey>(filter: Filter, key: &K) -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.push(VERSION);
    bytes.extend_from_slice(&filter.0);
    key.write(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key a request's page token carries: `None` for the first page (an empty token). A token
/// that is not one of ours, or was issued for another filter, is a violation on `field`.
pub fn decode<K: PageKey>(violations: &mut FieldViolations, field: &str, raw: &str, filter: Filter) -> Option<K> {
    if raw.is_empty() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok().filter(|b| b.len() <= 256);
    let Some(bytes) = bytes.filter(|b| b.first() == Some(&VERSION) && b.len() > 1 + FILTER_LEN) else {
        violations.add(field, "is not a token from a previous page");
        return None;
    };
    if bytes[1..=FILTER_LEN] != filter.0 {
        violations.add(field, "was issued for another filter: send the same filter as the first page, or no token");
        return None;
    }
    let key = K::read(&bytes[1 + FILTER_LEN..]);
    if key.is_none() {
        violations.add(field, "is not a token from a previous page");
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_to_50_and_are_clamped_to_500() {
        assert_eq!(page_size(0), 50);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(500), 500);
        assert_eq!(page_size(10_000), 500);
    }

    #[test]
    fn tokens_round_trip_and_are_tied_to_their_filter() {
        let filter = Filter::new("intake.applications", &["RECEIVED"]);
        let key = TimeId { at: DateTime::from_timestamp(4_000_000_000, 123_456_000).unwrap(), id: "a-b".into() };
        let token = encode(filter, &key);
        let mut violations = FieldViolations::new();
        assert_eq!(decode::<TimeId>(&mut violations, "page_token", &token, filter), Some(key));
        assert_eq!(decode::<TimeId>(&mut violations, "page_token", "", filter), None);
        assert!(violations.is_empty());

        let other = Filter::new("intake.applications", &["REFUSED"]);
        assert_eq!(decode::<TimeId>(&mut violations, "page_token", &token, other), None);
        let other_list = Filter::new("outbox.messages", &["RECEIVED"]);
        assert_eq!(decode::<TimeId>(&mut violations, "page_token", &token, other_list), None);
        assert_eq!(violations.iter().count(), 2);
    }

    #[test]
    fn foreign_tokens_are_refused() {
        let filter = Filter::new("audit.entries", &[]);
        let mut violations = FieldViolations::new();
        for raw in ["50", "x", "!!!", &URL_SAFE_NO_PAD.encode([2u8; 17]), &URL_SAFE_NO_PAD.encode([1u8; 12])] {
            assert_eq!(decode::<i64>(&mut violations, "page_token", raw, filter), None, "{raw}");
        }
        assert_eq!(violations.iter().count(), 5);
        assert_eq!(decode::<i64>(&mut violations, "page_token", &encode(filter, &42i64), filter), Some(42));
    }
}
