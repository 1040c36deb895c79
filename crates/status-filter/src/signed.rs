//! Signed snapshots and deltas: a filter with what it reflects (event sequences), when it was
//! made and until when it may be used, signed by the registry's status key (the key and key ids
//! of signed CheckCard answers, docs/STATUS-STATEMENTS.md).
//!
//! Encoding (version 1): the tag `yidi.status-filter.v1` (length-prefixed), the kind (1 snapshot,
//! 2 delta), `registry_id` and `key_id` (length-prefixed UTF-8), `from_sequence` and `sequence`
//! (u64 big-endian), `built_at` and `usable_until` (i64 seconds, u32 nanoseconds, big-endian), the
//! filter, the count (u32) and 32-byte digests of cards to ask about online, then the Ed25519
//! signature (64 bytes) over every byte before it.
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use yidi_domain::{Directory, KeyWindow, Role};

use crate::{
    FormatError,
    filter::{Filter, Lookup},
    key::CardKey,
    wire::{Reader, put, put_time},
};

const TAG: &[u8] = b"yidi.status-filter.v1";
const SIGNATURE_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Every registered card as of `sequence`.
    Snapshot,
    /// The cards that changed after `from_sequence` up to `sequence`, as they stood when it was made.
    Delta,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub registry_id: String,
    pub key_id: String,
    /// A snapshot: equal to `sequence`.
    pub from_sequence: u64,
    /// Every status event up to this one is reflected (later ones may be too: a delta re-states them).
    pub sequence: u64,
    pub built_at: DateTime<Utc>,
    /// A snapshot (with its deltas) is not used after this instant: a card expiring before it is
    /// not covered. A delta says the same of the cards in it.
    pub usable_until: DateTime<Utc>,
}

/// A snapshot or a delta.
pub struct StatusFile {
    pub header: Header,
    pub filter: Filter,
    /// Digests of covered cards the filter must not answer for (valid now, expiring before
    /// `usable_until`): sorted.
    pub ask_online: Vec<[u8; 32]>,
}

/// Why a snapshot or delta is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed: {0}")]
    Format(#[from] FormatError),
    #[error("{0:?} is not a registry in the directory")]
    UnknownRegistry(String),
    #[error("registry {registry:?} lists no key {key_id:?}")]
    UnknownKey { registry: String, key_id: String },
    #[error("key {key_id:?} was not valid when the file was made (retired or not yet valid)")]
    KeyNotValid { key_id: String },
    #[error("signature does not verify: the file was altered or signed by another key")]
    BadSignature,
}

impl Header {
    fn encode(&self, out: &mut Vec<u8>) {
        put(out, TAG);
        out.push(match self.kind {
            Kind::Snapshot => 1,
            Kind::Delta => 2,
        });
        put(out, self.registry_id.as_bytes());
        put(out, self.key_id.as_bytes());
        out.extend_from_slice(&self.from_sequence.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        put_time(out, self.built_at);
        put_time(out, self.usable_until);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, FormatError> {
        if reader.field()? != TAG {
            return Err(FormatError::Invalid("tag"));
        }
        let kind = match reader.u8()? {
            1 => Kind::Snapshot,
            2 => Kind::Delta,
            _ => return Err(FormatError::Invalid("kind")),
        };
        let header = Self {
            kind,
            registry_id: reader.text()?,
            key_id: reader.text()?,
            from_sequence: reader.u64()?,
            sequence: reader.u64()?,
            built_at: reader.time()?,
            usable_until: reader.time()?,
        };
        if header.from_sequence > header.sequence || (kind == Kind::Snapshot && header.from_sequence != header.sequence)
        {
            return Err(FormatError::Invalid("sequences"));
        }
        Ok(header)
    }
}

impl StatusFile {
    /// The signed encoding, by `key` (whose id the header names).
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        self.sign_parts(key, true)
    }

    /// The same without the filter's coverage: for relying parties that check cards by their
    /// registration receipts ([`crate::CardReceipt`]).
    pub fn sign_status_only(&self, key: &SigningKey) -> Vec<u8> {
        self.sign_parts(key, false)
    }

    fn sign_parts(&self, key: &SigningKey, with_coverage: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.header.encode(&mut out);
        if with_coverage {
            self.filter.encode(&mut out);
        } else {
            self.filter.encode_status_only(&mut out);
        }
        out.extend_from_slice(&(self.ask_online.len() as u32).to_be_bytes());
        for digest in &self.ask_online {
            out.extend_from_slice(digest);
        }
        append_signature(out, key)
    }

    /// Reads `bytes` and accepts them only if signed by a registry of `directory`, with a key it
    /// lists that was valid at `built_at`, and unaltered since.
    pub fn verify(bytes: &[u8], directory: &Directory) -> Result<Self, VerifyError> {
        let (signed, signature) = split_signature(bytes)?;
        let mut reader = Reader::new(signed);
        let header = Header::decode(&mut reader)?;
        verify_signature(directory, &header.registry_id, &header.key_id, signed, signature, header.built_at)?;
        let filter = Filter::decode(&mut reader)?;
        let count = reader.u32()? as usize;
        let digests = reader.take(count.checked_mul(32).ok_or(FormatError::Truncated)?)?;
        let ask_online: Vec<[u8; 32]> = digests.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        if !ask_online.is_sorted() {
            return Err(FormatError::Invalid("ask-online digests unsorted").into());
        }
        if !reader.is_empty() {
            return Err(FormatError::Trailing.into());
        }
        Ok(Self { header, filter, ask_online })
    }

    /// What this file alone says: None if the card is not in it (for a delta: unchanged).
    pub fn find(&self, key: &CardKey) -> Option<Lookup> {
        self.answer(self.filter.lookup(key), key)
    }

    /// What a snapshot says of a card its receipt shows was registered by the snapshot's sequence
    /// (see [`Filter::lookup_registered`]).
    pub fn find_registered(&self, key: &CardKey) -> Option<Lookup> {
        self.answer(self.filter.lookup_registered(key), key)
    }

    fn answer(&self, lookup: Lookup, key: &CardKey) -> Option<Lookup> {
        match lookup {
            Lookup::NotCovered => None,
            _ if self.ask_online.binary_search(key.digest()).is_ok() => Some(Lookup::NotCovered),
            answer => Some(answer),
        }
    }
}

/// `signature` is over `signed` by the key `key_id` of registry `registry_id` in `directory`, and
/// that key was valid at `signed_at`.
pub(crate) fn verify_signature(
    directory: &Directory,
    registry_id: &str,
    key_id: &str,
    signed: &[u8],
    signature: &[u8],
    signed_at: DateTime<Utc>,
) -> Result<(), VerifyError> {
    let registry = directory
        .get_with_role(registry_id, Role::Registry)
        .ok_or_else(|| VerifyError::UnknownRegistry(registry_id.to_owned()))?;
    let key = registry
        .key(key_id)
        .ok_or_else(|| VerifyError::UnknownKey { registry: registry.id.clone(), key_id: key_id.to_owned() })?;
    let signature = Signature::from_slice(signature).map_err(|_| VerifyError::BadSignature)?;
    key.public_key.verify(signed, &signature).map_err(|_| VerifyError::BadSignature)?;
    if key.window_at(signed_at) != KeyWindow::Valid {
        return Err(VerifyError::KeyNotValid { key_id: key.id.clone() });
    }
    Ok(())
}

/// `signed` followed by its Ed25519 signature by `key`.
pub(crate) fn append_signature(mut signed: Vec<u8>, key: &SigningKey) -> Vec<u8> {
    let signature = key.sign(&signed);
    signed.extend_from_slice(&signature.to_bytes());
    signed
}

/// The signed bytes and the signature that ends them.
pub(crate) fn split_signature(bytes: &[u8]) -> Result<(&[u8], &[u8]), FormatError> {
    let split = bytes.len().checked_sub(SIGNATURE_LEN).ok_or(FormatError::Truncated)?;
    Ok(bytes.split_at(split))
}
