//! Signed status answers of the registry (C4, like OCSP): what a relying party was told about one
//! card, signed so that it can prove it afterwards. The statement holds a hash of the holder's
//! number, never the number itself: the relying party, who asked with the number, can recompute it.
//!
//! A statement holds from `answered_at` (OCSP's thisUpdate) until `next_update`: the registry
//! signs a statement once per card and status and serves it again until half its window is gone
//! (unless the status changed: then a new one), so that an answer costs no signature; a relying
//! party relies on one only before its `next_update` ([`StatusStatement::is_current`]). A
//! question with a nonce gets a statement signed for it. The rule, the encoding and test vectors:
//! `docs/STATUS-STATEMENTS.md`.
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use sha2::{Digest, Sha256};

use crate::{
    card::CardStatus,
    decision::{put, put_time},
    directory::{Directory, KeyWindow, Role},
};

/// Domain separation tag: a status signature can never be mistaken for a decision's, or the reverse.
/// v2: with `next_update`.
const CANONICAL_TAG: &[u8] = b"yidi.status.v2";
/// Domain separation tag of the holder-number hash.
const ID_NUMBER_HASH_TAG: &[u8] = b"yidi.status.id_number.v1";
/// Longest nonce a relying party may send.
pub const MAX_NONCE_LEN: usize = 64;

/// SHA-256 of the (normalised, upper-case) holder number under its own tag.
pub fn id_number_hash(id_number: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(ID_NUMBER_HASH_TAG);
    hasher.update(id_number.trim().to_ascii_uppercase().as_bytes());
    hasher.finalize().into()
}

/// What the registry answered about one card, at one time, to one question (its nonce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusStatement {
    pub registry_id: String,
    /// The registry's directory key that signed the statement.
    pub key_id: String,
    pub card_serial: String,
    /// [`id_number_hash`] of the number the question named.
    pub id_number_hash: [u8; 32],
    pub status: CardStatus,
    /// When the card entered `status`; None for UNKNOWN.
    pub status_changed_at: Option<DateTime<Utc>>,
    /// When the statement was made: the status held then (OCSP's thisUpdate).
    pub answered_at: DateTime<Utc>,
    /// Until when the statement may be relied on (exclusive; OCSP's nextUpdate).
    pub next_update: DateTime<Utc>,
    /// The relying party's nonce, echoed (empty if it sent none).
    pub nonce: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedStatusStatement {
    pub statement: StatusStatement,
    pub signature: Vec<u8>,
}

/// Why a status statement does not prove what it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    #[error("{0:?} is not a registry in the directory")]
    UnknownRegistry(String),
    #[error("registry {registry:?} lists no key {key_id:?}")]
    UnknownKey { registry: String, key_id: String },
    #[error("key {key_id:?} was not valid when the statement was made")]
    KeyNotValid { key_id: String },
    #[error("signature does not verify: the statement was altered or signed by another key")]
    BadSignature,
    #[error("the statement answers another question (number, serial or nonce differ)")]
    OtherQuestion,
    #[error("the statement is not current: it holds from {answered_at} until {next_update}, not at {at}")]
    NotCurrent { answered_at: DateTime<Utc>, next_update: DateTime<Utc>, at: DateTime<Utc> },
}

fn status_name(status: CardStatus) -> &'static [u8] {
    match status {
        CardStatus::Valid => b"valid",
        CardStatus::ReportedLost => b"reported_lost",
        CardStatus::Revoked => b"revoked",
        CardStatus::Expired => b"expired",
        CardStatus::Unknown => b"unknown",
        CardStatus::AwaitingCollection => b"awaiting_collection",
        CardStatus::Voided => b"voided",
    }
}

impl StatusStatement {
    /// The bytes that are signed: every field, in a fixed order, length-prefixed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(192 + self.nonce.len());
        put(&mut out, CANONICAL_TAG);
        put(&mut out, self.registry_id.as_bytes());
        put(&mut out, self.key_id.as_bytes());
        put(&mut out, self.card_serial.as_bytes());
        put(&mut out, &self.id_number_hash);
        put(&mut out, status_name(self.status));
        match self.status_changed_at {
            Some(at) => put_time(&mut out, at),
            None => put(&mut out, b""),
        }
        put_time(&mut out, self.answered_at);
        put_time(&mut out, self.next_update);
        put(&mut out, &self.nonce);
        out
    }

    /// Whether the statement may be relied on at `at`: from `answered_at` until before `next_update`.
    pub fn is_current(&self, at: DateTime<Utc>) -> bool {
        self.answered_at <= at && at < self.next_update
    }

    pub fn sign(self, key: &SigningKey) -> SignedStatusStatement {
        let signature = key.sign(&self.canonical_bytes()).to_bytes().to_vec();
        SignedStatusStatement { statement: self, signature }
    }

    /// Whether this statement answers the question (number, serial, nonce) the relying party asked.
    pub fn answers(&self, id_number: &str, card_serial: &str, nonce: &[u8]) -> bool {
        self.id_number_hash == id_number_hash(id_number) && self.card_serial == card_serial && self.nonce == nonce
    }
}

impl SignedStatusStatement {
    /// The statement was signed by a registry of the directory, with a key it lists and that was
    /// valid when the answer was given, and has not been altered since.
    pub fn verify(&self, directory: &Directory) -> Result<&StatusStatement, StatementError> {
        let statement = &self.statement;
        let registry = directory
            .get_with_role(&statement.registry_id, Role::Registry)
            .ok_or_else(|| StatementError::UnknownRegistry(statement.registry_id.clone()))?;
        let key = registry.key(&statement.key_id).ok_or_else(|| StatementError::UnknownKey {
            registry: registry.id.clone(),
            key_id: statement.key_id.clone(),
        })?;
        let signature = Signature::from_slice(&self.signature).map_err(|_| StatementError::BadSignature)?;
        key.public_key.verify(&statement.canonical_bytes(), &signature).map_err(|_| StatementError::BadSignature)?;
        if key.window_at(statement.answered_at) != KeyWindow::Valid {
            return Err(StatementError::KeyNotValid { key_id: key.id.clone() });
        }
        Ok(statement)
    }

    /// [`Self::verify`], and the statement is current at `at` (a relying party's clock).
    pub fn verify_current(&self, directory: &Directory, at: DateTime<Utc>) -> Result<&StatusStatement, StatementError> {
        let statement = self.verify(directory)?;
        if !statement.is_current(at) {
            return Err(StatementError::NotCurrent {
                answered_at: statement.answered_at,
                next_update: statement.next_update,
                at,
            });
        }
        Ok(statement)
    }

    /// [`Self::verify`], and the statement answers exactly this question.
    pub fn verify_answer(
        &self,
        directory: &Directory,
        id_number: &str,
        card_serial: &str,
        nonce: &[u8],
    ) -> Result<&StatusStatement, StatementError> {
        let statement = self.verify(directory)?;
        if !statement.answers(id_number, card_serial, nonce) {
            return Err(StatementError::OtherQuestion);
        }
        Ok(statement)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::directory::{Bureau, BureauKey};

    const NUMBER: &str = "36010219900307123X";

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2118, 1, 1, hour, 0, 0).unwrap()
    }

    fn directory() -> Directory {
        Directory::new(vec![Bureau {
            id: "registry".into(),
            role: Role::Registry,
            name: String::new(),
            jurisdiction: vec![],
            region: String::new(),
            endpoints: Vec::new(),
            keys: vec![BureauKey {
                id: "r1".into(),
                public_key: key().verifying_key(),
                valid_from: at(0),
                valid_until: Some(at(12)),
            }],
        }])
        .unwrap()
    }

    fn statement() -> StatusStatement {
        StatusStatement {
            registry_id: "registry".into(),
            key_id: "r1".into(),
            card_serial: "S1".into(),
            id_number_hash: id_number_hash(NUMBER),
            status: CardStatus::ReportedLost,
            status_changed_at: Some(at(1)),
            answered_at: at(2),
            next_update: at(3),
            nonce: b"nonce-1".to_vec(),
        }
    }

    #[test]
    fn c4_a_signed_answer_verifies_against_the_directory() {
        let signed = statement().sign(&key());
        assert_eq!(signed.verify(&directory()), Ok(&statement()));
        assert!(signed.verify_answer(&directory(), "36010219900307123x", "S1", b"nonce-1").is_ok());
        assert_eq!(signed.verify_answer(&directory(), NUMBER, "S1", b"other"), Err(StatementError::OtherQuestion));
    }

    #[test]
    fn c4_an_altered_answer_fails() {
        let mut signed = statement().sign(&key());
        signed.statement.status = CardStatus::Valid;
        assert_eq!(signed.verify(&directory()), Err(StatementError::BadSignature));
        let mut signed = statement().sign(&key());
        signed.statement.answered_at = at(3);
        assert_eq!(signed.verify(&directory()), Err(StatementError::BadSignature));
        let mut signed = statement().sign(&key());
        signed.statement.next_update = at(4);
        assert_eq!(signed.verify(&directory()), Err(StatementError::BadSignature));
        let mut signed = statement().sign(&key());
        signed.statement.nonce.clear();
        assert_eq!(signed.verify(&directory()), Err(StatementError::BadSignature));
        let forged = statement().sign(&SigningKey::from_bytes(&[6; 32]));
        assert_eq!(forged.verify(&directory()), Err(StatementError::BadSignature));
    }

    #[test]
    fn c4_an_answer_outside_its_keys_window_or_by_an_unknown_key_fails() {
        let late = StatusStatement { answered_at: at(13), ..statement() }.sign(&key());
        assert!(matches!(late.verify(&directory()), Err(StatementError::KeyNotValid { .. })));
        let unknown = StatusStatement { key_id: "r9".into(), ..statement() }.sign(&key());
        assert!(matches!(unknown.verify(&directory()), Err(StatementError::UnknownKey { .. })));
    }

    #[test]
    fn c4_a_statement_is_relied_on_only_from_its_answer_until_before_its_next_update() {
        let signed = statement().sign(&key());
        let half_past = |hour| at(hour) + chrono::Duration::minutes(30);
        assert!(signed.verify_current(&directory(), at(2)).is_ok());
        assert!(signed.verify_current(&directory(), half_past(2)).is_ok());
        for stale in [at(3), half_past(3)] {
            assert!(matches!(signed.verify_current(&directory(), stale), Err(StatementError::NotCurrent { .. })));
        }
        assert!(matches!(signed.verify_current(&directory(), half_past(1)), Err(StatementError::NotCurrent { .. })));
    }

    /// `docs/status-statement-vectors.json`: what a relying party in any language checks its
    /// implementation against (hash, canonical bytes, signature; altered ones must fail).
    #[test]
    fn c4_the_documented_test_vectors_hold() {
        let text = include_str!("../../../docs/status-statement-vectors.json");
        let file: serde_json::Value = serde_json::from_str(text).unwrap();
        let hex = |value: &serde_json::Value| -> Vec<u8> {
            let text = value.as_str().unwrap();
            (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
        };
        let time = |value: &serde_json::Value| value.as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
        let vectors = file["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 3);
        for vector in vectors {
            let name = vector["name"].as_str().unwrap();
            let seed: [u8; 32] = hex(&file["private_key_seed"]).try_into().unwrap();
            let key = SigningKey::from_bytes(&seed);
            assert_eq!(key.verifying_key().to_bytes().to_vec(), hex(&file["public_key"]), "{name}");
            let s = &vector["statement"];
            let status = match s["status"].as_str().unwrap() {
                "valid" => CardStatus::Valid,
                "reported_lost" => CardStatus::ReportedLost,
                "revoked" => CardStatus::Revoked,
                "expired" => CardStatus::Expired,
                "unknown" => CardStatus::Unknown,
                "awaiting_collection" => CardStatus::AwaitingCollection,
                "voided" => CardStatus::Voided,
                other => panic!("{name}: status {other}"),
            };
            let number = s["id_number"].as_str().unwrap();
            assert_eq!(id_number_hash(number).to_vec(), hex(&vector["id_number_sha256"]), "{name}");
            let statement = StatusStatement {
                registry_id: s["registry_id"].as_str().unwrap().into(),
                key_id: s["key_id"].as_str().unwrap().into(),
                card_serial: s["card_serial"].as_str().unwrap().into(),
                id_number_hash: id_number_hash(number),
                status,
                status_changed_at: s["status_changed_at"].as_str().map(|_| time(&s["status_changed_at"])),
                answered_at: time(&s["answered_at"]),
                next_update: time(&s["next_update"]),
                nonce: hex(&s["nonce"]),
            };
            assert_eq!(statement.canonical_bytes(), hex(&vector["canonical_bytes"]), "{name}");
            let signed = statement.clone().sign(&key);
            assert_eq!(signed.signature, hex(&vector["signature"]), "{name}: Ed25519 is deterministic");
            let public = key.verifying_key();
            let signature = Signature::from_slice(&hex(&vector["signature"])).unwrap();
            assert!(public.verify(&hex(&vector["canonical_bytes"]), &signature).is_ok(), "{name}");
            for altered in vector["altered_canonical_bytes_must_fail"].as_array().unwrap_or(&Vec::new()) {
                assert!(public.verify(&hex(altered), &signature).is_err(), "{name}: an altered statement verified");
            }
            assert!(statement.is_current(time(&vector["current_at"])), "{name}");
            assert!(!statement.is_current(time(&vector["not_current_at"])), "{name}");
        }
    }

    #[test]
    fn c4_the_statement_never_holds_the_number() {
        let bytes = statement().canonical_bytes();
        assert!(!bytes.windows(NUMBER.len()).any(|w| w == NUMBER.as_bytes()));
    }
}
