//! Signed status answers of the registry (C4, like OCSP): what a relying party was told about one
//! card, signed so that it can prove it afterwards. The statement holds a hash of the holder's
//! number, never the number itself: the relying party, who asked with the number, can recompute it.
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use sha2::{Digest, Sha256};

use crate::{
    card::CardStatus,
    decision::{put, put_time},
    directory::{Directory, KeyWindow, Role},
};

/// Domain separation tag: a status signature can never be mistaken for a decision's, or the reverse.
const CANONICAL_TAG: &[u8] = b"yidi.status.v1";
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
    pub answered_at: DateTime<Utc>,
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
        put(&mut out, &self.nonce);
        out
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
            endpoint: String::new(),
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
    fn c4_the_statement_never_holds_the_number() {
        let bytes = statement().canonical_bytes();
        assert!(!bytes.windows(NUMBER.len()).any(|w| w == NUMBER.as_bytes()));
    }
}
