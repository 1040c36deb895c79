//! A card's registration receipt: the registry's signature that the card of a (number, serial)
//! digest was registered by a sequence of its log, and until when the card is valid. The card
//! carries it (the producer writes it into the chip; `GetCardReceipt`), as a certificate carries
//! its CT timestamps.
//!
//! With it a relying party knows the card is in every snapshot of that sequence or later, so it
//! needs no coverage filter to tell the card from a pair that was never registered: a pair
//! without a receipt that verifies is never answered locally. That is what lets the snapshot be
//! the status filter alone ([`crate::Filter::encode_status_only`]).
//!
//! Encoding (version 1): the tag `yidi.card-receipt.v1` (length-prefixed), `registry_id` and
//! `key_id` (length-prefixed UTF-8), the card's key digest (32 bytes, [`CardKey::digest`]),
//! `sequence` (u64 big-endian), `signed_at` (i64 seconds, u32 nanoseconds, big-endian), a byte 1
//! and `valid_until` as days since 0001-01-01 (i32 big-endian), or a byte 0 for a card without a
//! last day, then the Ed25519 signature (64 bytes) over every byte before it.
use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
use ed25519_dalek::SigningKey;
use yidi_domain::Directory;

use crate::{
    FormatError,
    key::CardKey,
    signed::{VerifyError, append_signature, split_signature, verify_signature},
    wire::{Reader, put, put_time},
};

const TAG: &[u8] = b"yidi.card-receipt.v1";

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardReceipt {
    pub registry_id: String,
    pub key_id: String,
    /// [`CardKey::digest`] of the card's (number, serial): the receipt names neither.
    pub card: [u8; 32],
    /// The card was registered at or before this sequence of the registry's log.
    pub sequence: u64,
    pub signed_at: DateTime<Utc>,
    /// The card's last day; None for a card valid without limit.
    pub valid_until: Option<NaiveDate>,
}

impl CardReceipt {
    fn encode(&self, out: &mut Vec<u8>) {
        put(out, TAG);
        put(out, self.registry_id.as_bytes());
        put(out, self.key_id.as_bytes());
        out.extend_from_slice(&self.card);
        out.extend_from_slice(&self.sequence.to_be_bytes());
        put_time(out, self.signed_at);
        match self.valid_until {
            Some(day) => {
                out.push(1);
                out.extend_from_slice(&day.num_days_from_ce().to_be_bytes());
            }
            None => out.push(0),
        }
    }

    /// The signed encoding, by `key` (whose id `key_id` names).
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        append_signature(out, key)
    }

    /// Reads `bytes` and accepts them only if signed by a registry of `directory` with a key it
    /// lists that was valid at `signed_at`, and unaltered since.
    pub fn verify(bytes: &[u8], directory: &Directory) -> Result<Self, VerifyError> {
        let (signed, signature) = split_signature(bytes)?;
        let mut reader = Reader::new(signed);
        if reader.field()? != TAG {
            return Err(FormatError::Invalid("tag").into());
        }
        let registry_id = reader.text()?;
        let key_id = reader.text()?;
        let card: [u8; 32] = reader.take(32)?.try_into().map_err(|_| FormatError::Truncated)?;
        let sequence = reader.u64()?;
        let signed_at = reader.time()?;
        let valid_until = match reader.u8()? {
            0 => None,
            1 => {
                let days = i32::from_be_bytes(reader.take(4)?.try_into().map_err(|_| FormatError::Truncated)?);
                Some(NaiveDate::from_num_days_from_ce_opt(days).ok_or(FormatError::Invalid("valid_until"))?)
            }
            _ => return Err(FormatError::Invalid("valid_until presence").into()),
        };
        if !reader.is_empty() {
            return Err(FormatError::Trailing.into());
        }
        verify_signature(directory, &registry_id, &key_id, signed, signature, signed_at)?;
        Ok(Self { registry_id, key_id, card, sequence, signed_at, valid_until })
    }

    /// Whether this is the receipt of the card `key` names.
    pub fn is_for(&self, key: &CardKey) -> bool {
        &self.card == key.digest()
    }

    /// Whether the card may expire between `from` and `until`, in any time zone: a snapshot made
    /// at `from` and usable until `until` leaves such cards out (they are asked online).
    pub fn may_expire_between(&self, from: DateTime<Utc>, until: DateTime<Utc>) -> bool {
        let Some(last_day) = self.valid_until else { return false };
        let first = from.date_naive().checked_sub_days(Days::new(1)).unwrap_or(NaiveDate::MIN);
        let last = until.date_naive().checked_add_days(Days::new(1)).unwrap_or(NaiveDate::MAX);
        (first..=last).contains(&last_day)
    }
}
