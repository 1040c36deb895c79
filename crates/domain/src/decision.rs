//! Signed decisions of a home bureau (S4): canonical encoding, signing and verification.
use chrono::{DateTime, NaiveDate, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::{Deserialize, Serialize};

use crate::{
    application::ApplicationKind,
    directory::{Directory, KeyWindow},
    id_number::Sex,
};

/// Domain separation tag: a signature over a decision can never be mistaken for another message.
/// v2: the signed bytes name the key (`key_id`).
const CANONICAL_TAG: &[u8] = b"yidi.decision.v2";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionPurpose {
    IssueCard,
    ReportLoss,
    WithdrawLossReport,
    /// S4: the citizen's registration moved to the jurisdiction of `transfer_to_bureau_id`.
    TransferRegistration,
}

impl DecisionPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IssueCard => "issue_card",
            Self::ReportLoss => "report_loss",
            Self::WithdrawLossReport => "withdraw_loss_report",
            Self::TransferRegistration => "transfer_registration",
        }
    }
}

/// Who a person is, as the home bureau's register records it and a card prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Particulars {
    pub id_number: String,
    pub name: String,
    pub sex: Sex,
    pub birth_date: NaiveDate,
    /// Two-digit province of the household registration (may differ from the number's, N3).
    pub registration_province: String,
    pub address: String,
}

/// The data a card carries, as the home bureau's register holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardData {
    pub holder: Particulars,
    pub face_template: Vec<u8>,
    pub valid_from: NaiveDate,
    /// None: long-term.
    pub valid_until: Option<NaiveDate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub decision_id: String,
    pub purpose: DecisionPurpose,
    /// The signing home bureau.
    pub bureau_id: String,
    /// Which of the signer's directory keys signed it.
    pub key_id: String,
    /// The producer or registry it is addressed to.
    pub addressee_id: String,
    pub application_id: String,
    pub station_id: String,
    pub application_kind: Option<ApplicationKind>,
    pub card: CardData,
    pub previous_card_serial: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// TRANSFER_REGISTRATION only: the home bureau that holds the citizen's registration from now
    /// on; empty otherwise.
    pub transfer_to_bureau_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDecision {
    pub decision: Decision,
    pub signature: Vec<u8>,
}

/// Why a decision is refused by a producer or the registry (S4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("decision is not signed")]
    Unsigned,
    #[error("signature does not verify: the decision was tampered with or signed by another key")]
    BadSignature,
    #[error("signer {0:?} is not a home bureau in the directory")]
    UnknownSigner(String),
    #[error("signer {signer:?} lists no key {key_id:?} in the directory")]
    UnknownKey { signer: String, key_id: String },
    #[error("key {key_id:?} of {signer:?} was retired at {retired_at}")]
    KeyRetired { signer: String, key_id: String, retired_at: DateTime<Utc> },
    #[error("key {key_id:?} of {signer:?} is valid only from {valid_from}")]
    KeyNotYetValid { signer: String, key_id: String, valid_from: DateTime<Utc> },
    #[error("signer {signer:?} does not hold household registrations of province {province}")]
    WrongJurisdiction { signer: String, province: String },
    #[error("decision is for {found}, expected {expected}")]
    WrongPurpose { expected: &'static str, found: &'static str },
    #[error("decision is addressed to {found:?}, not to {expected:?}")]
    Misaddressed { expected: String, found: String },
    #[error("decision expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("decision is issued in the future ({0})")]
    NotYetValid(DateTime<Utc>),
    #[error("decision {0} was already used")]
    AlreadyUsed(String),
}

impl DecisionError {
    /// Stable code for `ErrorInfo.reason` and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unsigned => "DECISION_UNSIGNED",
            Self::BadSignature => "DECISION_BAD_SIGNATURE",
            Self::UnknownSigner(_) => "DECISION_UNKNOWN_SIGNER",
            Self::UnknownKey { .. } => "DECISION_UNKNOWN_KEY",
            Self::KeyRetired { .. } => "DECISION_KEY_RETIRED",
            Self::KeyNotYetValid { .. } => "DECISION_KEY_NOT_YET_VALID",
            Self::WrongJurisdiction { .. } => "DECISION_WRONG_JURISDICTION",
            Self::WrongPurpose { .. } => "DECISION_WRONG_PURPOSE",
            Self::Misaddressed { .. } => "DECISION_MISADDRESSED",
            Self::Expired(_) => "DECISION_EXPIRED",
            Self::NotYetValid(_) => "DECISION_NOT_YET_VALID",
            Self::AlreadyUsed(_) => "DECISION_ALREADY_USED",
        }
    }
}

/// Appends one length-prefixed field: unambiguous whatever the field contains.
pub(crate) fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

pub(crate) fn put_time(out: &mut Vec<u8>, at: DateTime<Utc>) {
    let mut bytes = at.timestamp().to_be_bytes().to_vec();
    bytes.extend_from_slice(&at.timestamp_subsec_nanos().to_be_bytes());
    put(out, &bytes);
}

/// S4: a signer's key covers a decision only while it is valid, both now and when the decision was
/// issued: a retired key signs nothing more, and a decision cannot be back- or forward-dated into
/// another key's window.
fn check_key_window(
    signer: &str,
    key: &crate::directory::BureauKey,
    instants: [DateTime<Utc>; 2],
) -> Result<(), DecisionError> {
    for at in instants {
        match key.window_at(at) {
            KeyWindow::Valid => {}
            KeyWindow::Retired => {
                return Err(DecisionError::KeyRetired {
                    signer: signer.to_owned(),
                    key_id: key.id.clone(),
                    retired_at: key.valid_until.unwrap_or(at),
                });
            }
            KeyWindow::NotYetValid => {
                return Err(DecisionError::KeyNotYetValid {
                    signer: signer.to_owned(),
                    key_id: key.id.clone(),
                    valid_from: key.valid_from,
                });
            }
        }
    }
    Ok(())
}

impl Decision {
    /// The bytes that are signed: every field, in a fixed order, length-prefixed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.card.face_template.len());
        put(&mut out, CANONICAL_TAG);
        put(&mut out, self.decision_id.as_bytes());
        put(&mut out, self.purpose.as_str().as_bytes());
        put(&mut out, self.bureau_id.as_bytes());
        put(&mut out, self.key_id.as_bytes());
        put(&mut out, self.addressee_id.as_bytes());
        put(&mut out, self.application_id.as_bytes());
        put(&mut out, self.station_id.as_bytes());
        put(&mut out, self.application_kind.map(ApplicationKind::as_str).unwrap_or("").as_bytes());
        let card = &self.card;
        put(&mut out, card.holder.id_number.as_bytes());
        put(&mut out, card.holder.name.as_bytes());
        put(
            &mut out,
            match card.holder.sex {
                Sex::Male => b"male",
                Sex::Female => b"female",
            },
        );
        put(&mut out, card.holder.birth_date.to_string().as_bytes());
        put(&mut out, card.holder.registration_province.as_bytes());
        put(&mut out, card.holder.address.as_bytes());
        put(&mut out, &card.face_template);
        put(&mut out, card.valid_from.to_string().as_bytes());
        put(&mut out, card.valid_until.map(|d| d.to_string()).unwrap_or_default().as_bytes());
        put(&mut out, self.previous_card_serial.as_bytes());
        put_time(&mut out, self.issued_at);
        put_time(&mut out, self.expires_at);
        // Only present when set, so every decision without it keeps the bytes (and signatures) it
        // always had; with a fixed number of fields before it, the encoding stays unambiguous.
        if !self.transfer_to_bureau_id.is_empty() {
            put(&mut out, self.transfer_to_bureau_id.as_bytes());
        }
        out
    }

    pub fn sign(self, key: &SigningKey) -> SignedDecision {
        let signature = key.sign(&self.canonical_bytes()).to_bytes().to_vec();
        SignedDecision { decision: self, signature }
    }
}

/// What the verifier expects of a decision.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    pub purpose: DecisionPurpose,
    /// The verifier's own id (producer or registry), or for the registry checking a card
    /// registration, the producer that presents it.
    pub addressee_id: &'a str,
    pub now: DateTime<Utc>,
}

impl SignedDecision {
    /// S4: the decision is signed by the home bureau whose jurisdiction holds the citizen, with a
    /// key the directory lists for it and that is valid now and was valid when the decision was
    /// issued, untampered, for this purpose, addressed to `expected.addressee_id`, and within its
    /// validity. Single use is the caller's check (it needs the caller's store).
    pub fn verify(&self, directory: &Directory, expected: Expectation<'_>) -> Result<&Decision, DecisionError> {
        let decision = &self.decision;
        if self.signature.is_empty() {
            return Err(DecisionError::Unsigned);
        }
        let signer = directory
            .get_with_role(&decision.bureau_id, crate::directory::Role::Verification)
            .ok_or_else(|| DecisionError::UnknownSigner(decision.bureau_id.clone()))?;
        let key = signer
            .key(&decision.key_id)
            .ok_or_else(|| DecisionError::UnknownKey { signer: signer.id.clone(), key_id: decision.key_id.clone() })?;
        let signature = Signature::from_slice(&self.signature).map_err(|_| DecisionError::BadSignature)?;
        key.public_key.verify(&decision.canonical_bytes(), &signature).map_err(|_| DecisionError::BadSignature)?;
        // Genuine, but is the key still (and was it then) in force?
        check_key_window(&signer.id, key, [expected.now, decision.issued_at])?;
        // Signed by a real home bureau, but is it this citizen's home bureau?
        if !signer.holds_jurisdiction_over(&decision.card.holder.registration_province) {
            return Err(DecisionError::WrongJurisdiction {
                signer: signer.id.clone(),
                province: decision.card.holder.registration_province.clone(),
            });
        }
        if decision.purpose != expected.purpose {
            return Err(DecisionError::WrongPurpose {
                expected: expected.purpose.as_str(),
                found: decision.purpose.as_str(),
            });
        }
        if decision.addressee_id != expected.addressee_id {
            return Err(DecisionError::Misaddressed {
                expected: expected.addressee_id.to_owned(),
                found: decision.addressee_id.clone(),
            });
        }
        if expected.now >= decision.expires_at {
            return Err(DecisionError::Expired(decision.expires_at));
        }
        // A small allowance for clock skew between bureaus.
        if decision.issued_at > expected.now + chrono::Duration::minutes(5) {
            return Err(DecisionError::NotYetValid(decision.issued_at));
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::directory::{Bureau, BureauKey, Role};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn listed(id: &str, key: &SigningKey, valid_from: DateTime<Utc>, valid_until: Option<DateTime<Utc>>) -> BureauKey {
        BureauKey { id: id.into(), public_key: key.verifying_key(), valid_from, valid_until }
    }

    fn home_with(id: &str, province: &str, keys: Vec<BureauKey>) -> Bureau {
        Bureau::new(id, Role::Verification).with_name(id).with_jurisdiction([province]).with_keys(keys)
    }

    fn home(id: &str, province: &str, key: &SigningKey) -> Bureau {
        home_with(id, province, vec![listed("k1", key, now() - chrono::Duration::days(365), None)])
    }

    fn directory() -> Directory {
        Directory::new(vec![home("home-jx", "36", &key(1)), home("home-sc", "51", &key(2))]).unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2118, 1, 1, 9, 0, 0).unwrap()
    }

    fn decision() -> Decision {
        let day = NaiveDate::from_ymd_opt(2118, 1, 1).unwrap();
        Decision {
            decision_id: "d-1".into(),
            purpose: DecisionPurpose::IssueCard,
            bureau_id: "home-jx".into(),
            key_id: "k1".into(),
            addressee_id: "producer-zj".into(),
            application_id: "a-1".into(),
            station_id: "station-hz".into(),
            application_kind: Some(ApplicationKind::Replacement),
            card: CardData {
                holder: Particulars {
                    id_number: "36010219900307123X".into(),
                    name: "Li Na".into(),
                    sex: Sex::Female,
                    birth_date: NaiveDate::from_ymd_opt(1990, 3, 7).unwrap(),
                    registration_province: "36".into(),
                    address: "Nanchang".into(),
                },
                face_template: vec![1, 2, 3],
                valid_from: day,
                valid_until: None,
            },
            previous_card_serial: "S1".into(),
            issued_at: now(),
            expires_at: now() + chrono::Duration::days(7),
            transfer_to_bureau_id: String::new(),
        }
    }

    fn expect(addressee: &str) -> Expectation<'_> {
        Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: addressee, now: now() }
    }

    #[test]
    fn s4_a_decision_signed_by_the_home_bureau_verifies() {
        let signed = decision().sign(&key(1));
        assert!(signed.verify(&directory(), expect("producer-zj")).is_ok());
    }

    #[test]
    fn s4_unsigned_and_tampered_decisions_are_refused() {
        let mut signed = decision().sign(&key(1));
        signed.decision.card.holder.name = "Someone Else".into();
        assert_eq!(signed.verify(&directory(), expect("producer-zj")), Err(DecisionError::BadSignature));
        let mut unsigned = decision().sign(&key(1));
        unsigned.signature.clear();
        assert_eq!(unsigned.verify(&directory(), expect("producer-zj")), Err(DecisionError::Unsigned));
    }

    #[test]
    fn s4_a_bureau_cannot_sign_for_another_jurisdictions_citizen() {
        let mut forged = decision();
        forged.bureau_id = "home-sc".into();
        let signed = forged.sign(&key(2));
        assert!(matches!(
            signed.verify(&directory(), expect("producer-zj")),
            Err(DecisionError::WrongJurisdiction { .. })
        ));
    }

    #[test]
    fn s4_misaddressed_expired_and_wrong_purpose_are_refused() {
        let signed = decision().sign(&key(1));
        assert!(matches!(
            signed.verify(&directory(), expect("producer-other")),
            Err(DecisionError::Misaddressed { .. })
        ));
        let late = Expectation { now: now() + chrono::Duration::days(8), ..expect("producer-zj") };
        assert!(matches!(signed.verify(&directory(), late), Err(DecisionError::Expired(_))));
        let as_loss = Expectation { purpose: DecisionPurpose::ReportLoss, ..expect("producer-zj") };
        assert!(matches!(signed.verify(&directory(), as_loss), Err(DecisionError::WrongPurpose { .. })));
    }

    #[test]
    fn s4_a_key_not_in_the_directory_is_refused() {
        let mut stranger = decision();
        stranger.bureau_id = "home-nowhere".into();
        let signed = stranger.sign(&key(9));
        assert!(matches!(signed.verify(&directory(), expect("producer-zj")), Err(DecisionError::UnknownSigner(_))));
        let impostor = decision().sign(&key(9));
        assert_eq!(impostor.verify(&directory(), expect("producer-zj")), Err(DecisionError::BadSignature));
    }

    /// k1 retires at `now() + 1 day`; k2 is valid from `now() - 1 hour`.
    fn rotating_directory() -> Directory {
        let jx = home_with(
            "home-jx",
            "36",
            vec![
                listed("k1", &key(1), now() - chrono::Duration::days(365), Some(now() + chrono::Duration::days(1))),
                listed("k2", &key(3), now() - chrono::Duration::hours(1), None),
            ],
        );
        Directory::new(vec![jx, home("home-sc", "51", &key(2))]).unwrap()
    }

    fn signed_with(key_id: &str, signing_key: &SigningKey) -> SignedDecision {
        Decision { key_id: key_id.into(), ..decision() }.sign(signing_key)
    }

    #[test]
    fn s4_during_a_rotation_both_keys_verify() {
        let directory = rotating_directory();
        assert!(signed_with("k1", &key(1)).verify(&directory, expect("producer-zj")).is_ok());
        assert!(signed_with("k2", &key(3)).verify(&directory, expect("producer-zj")).is_ok());
    }

    #[test]
    fn s4_a_decision_must_name_a_key_the_signer_lists() {
        let refused = signed_with("k9", &key(1)).verify(&rotating_directory(), expect("producer-zj")).map(|_| ());
        assert!(matches!(refused, Err(DecisionError::UnknownKey { .. })));
        assert_eq!(refused.unwrap_err().code(), "DECISION_UNKNOWN_KEY");
        // The right key id with another key's signature is a bad signature, not a valid decision.
        let swapped = signed_with("k2", &key(1)).verify(&rotating_directory(), expect("producer-zj")).map(|_| ());
        assert_eq!(swapped, Err(DecisionError::BadSignature));
    }

    #[test]
    fn s4_a_retired_key_is_refused() {
        let after = Expectation { now: now() + chrono::Duration::days(2), ..expect("producer-zj") };
        let refused = signed_with("k1", &key(1)).verify(&rotating_directory(), after).map(|_| ());
        assert!(matches!(refused, Err(DecisionError::KeyRetired { .. })));
        assert_eq!(refused.unwrap_err().code(), "DECISION_KEY_RETIRED");
        assert!(signed_with("k2", &key(3)).verify(&rotating_directory(), after).is_ok());
    }

    #[test]
    fn s4_a_key_not_yet_valid_is_refused() {
        let jx = home_with("home-jx", "36", vec![listed("k1", &key(1), now() + chrono::Duration::days(1), None)]);
        let directory = Directory::new(vec![jx]).unwrap();
        let refused = signed_with("k1", &key(1)).verify(&directory, expect("producer-zj")).map(|_| ());
        assert!(matches!(refused, Err(DecisionError::KeyNotYetValid { .. })));
        assert_eq!(refused.unwrap_err().code(), "DECISION_KEY_NOT_YET_VALID");
    }

    #[test]
    fn s4_the_key_must_cover_the_time_of_issue() {
        // k2 became valid an hour ago: a decision dated two hours ago cannot carry it.
        let backdated = Decision { key_id: "k2".into(), issued_at: now() - chrono::Duration::hours(2), ..decision() };
        let refused = backdated.sign(&key(3)).verify(&rotating_directory(), expect("producer-zj")).map(|_| ());
        assert!(matches!(refused, Err(DecisionError::KeyNotYetValid { .. })));
        // k1 retires in a day: a decision dated after that, checked within the clock-skew allowance.
        let retire = now() + chrono::Duration::days(1);
        let postdated = Decision { issued_at: retire + chrono::Duration::minutes(1), ..decision() };
        let checked = Expectation { now: retire - chrono::Duration::minutes(1), ..expect("producer-zj") };
        let refused = postdated.sign(&key(1)).verify(&rotating_directory(), checked).map(|_| ());
        assert!(matches!(refused, Err(DecisionError::KeyRetired { .. })));
    }

    #[test]
    fn s4_canonical_encoding_separates_fields() {
        let mut a = decision();
        let mut b = decision();
        a.card.holder.name = "ab".into();
        a.card.holder.address = "c".into();
        b.card.holder.name = "a".into();
        b.card.holder.address = "bc".into();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Changes field `which` of a signed decision to `text` (or `bytes`); false if that is no change.
        fn tamper(decision: &mut Decision, which: usize, text: &str, bytes: &[u8]) -> bool {
            let slot: &mut String = match which {
                0 => &mut decision.decision_id,
                1 => &mut decision.bureau_id,
                2 => &mut decision.addressee_id,
                3 => &mut decision.application_id,
                4 => &mut decision.station_id,
                5 => &mut decision.card.holder.id_number,
                6 => &mut decision.card.holder.name,
                7 => &mut decision.card.holder.registration_province,
                8 => &mut decision.card.holder.address,
                9 => &mut decision.previous_card_serial,
                10 => &mut decision.key_id,
                11 => &mut decision.transfer_to_bureau_id,
                _ => {
                    let changed = decision.card.face_template != bytes;
                    decision.card.face_template = bytes.to_vec();
                    return changed;
                }
            };
            let changed = slot != text;
            *slot = text.to_owned();
            changed
        }

        proptest! {
            #[test]
            fn s4_any_change_to_a_signed_decision_is_refused(
                which in 0usize..13,
                text in "[A-Za-z0-9 -]{0,20}",
                bytes in proptest::collection::vec(any::<u8>(), 0..16),
                days in -400i64..400,
            ) {
                let mut signed = decision().sign(&key(1));
                let mut changed = tamper(&mut signed.decision, which, &text, &bytes);
                if days != 0 && which == 12 {
                    signed.decision.card.valid_from += chrono::Duration::days(days);
                    changed = true;
                }
                prop_assume!(changed);
                prop_assert!(signed.verify(&directory(), expect("producer-zj")).is_err());
            }

            #[test]
            fn s4_arbitrary_signature_bytes_never_verify(signature in proptest::collection::vec(any::<u8>(), 0..130)) {
                let mut signed = decision().sign(&key(1));
                prop_assume!(signed.signature != signature);
                signed.signature = signature;
                prop_assert!(signed.verify(&directory(), expect("producer-zj")).is_err());
            }

            #[test]
            fn s4_canonical_bytes_tell_any_two_decisions_apart(
                which in 0usize..13,
                text in "[A-Za-z0-9 -]{0,20}",
                bytes in proptest::collection::vec(any::<u8>(), 0..16),
            ) {
                let mut other = decision();
                prop_assume!(tamper(&mut other, which, &text, &bytes));
                prop_assert_ne!(decision().canonical_bytes(), other.canonical_bytes());
            }
        }
    }
}
