//! proto ↔ domain conversions shared by the services.
use chrono::{DateTime, NaiveDate, Utc};
use yidi_domain::{
    ApplicationKind, ApplicationState, CardData, CardStatus, Decision, DecisionPurpose, DocumentKind, Particulars,
    RefusalReason, SignedDecision,
    id_number::Sex,
    status::{SignedStatusStatement, StatusStatement},
};
use yidi_proto::v1 as pb;

use crate::error::{ApiError, FieldViolations};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

pub fn from_timestamp(at: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).ok()?)
}

pub fn kind_to_proto(kind: ApplicationKind) -> pb::ApplicationKind {
    match kind {
        ApplicationKind::Replacement => pb::ApplicationKind::Replacement,
        ApplicationKind::Renewal => pb::ApplicationKind::Renewal,
        ApplicationKind::LossReport => pb::ApplicationKind::LossReport,
    }
}

pub fn kind_from_proto(kind: pb::ApplicationKind) -> Option<ApplicationKind> {
    match kind {
        pb::ApplicationKind::Unspecified => None,
        pb::ApplicationKind::Replacement => Some(ApplicationKind::Replacement),
        pb::ApplicationKind::Renewal => Some(ApplicationKind::Renewal),
        pb::ApplicationKind::LossReport => Some(ApplicationKind::LossReport),
    }
}

pub fn state_to_proto(state: ApplicationState) -> pb::ApplicationState {
    match state {
        ApplicationState::Received => pb::ApplicationState::Received,
        ApplicationState::Verifying => pb::ApplicationState::Verifying,
        ApplicationState::Refused => pb::ApplicationState::Refused,
        ApplicationState::Approved => pb::ApplicationState::Approved,
        ApplicationState::InProduction => pb::ApplicationState::InProduction,
        ApplicationState::ReadyForCollection => pb::ApplicationState::ReadyForCollection,
        ApplicationState::Collected => pb::ApplicationState::Collected,
        ApplicationState::Cancelled => pb::ApplicationState::Cancelled,
    }
}

pub fn state_from_proto(state: pb::ApplicationState) -> Option<ApplicationState> {
    ApplicationState::ALL.into_iter().find(|s| state_to_proto(*s) == state)
}

pub fn refusal_to_proto(reason: RefusalReason) -> pb::RefusalReason {
    match reason {
        RefusalReason::FirstApplication => pb::RefusalReason::FirstApplication,
        RefusalReason::FaceMismatch => pb::RefusalReason::FaceMismatch,
        RefusalReason::FingerprintMismatch => pb::RefusalReason::FingerprintMismatch,
        RefusalReason::BadCreditRecord => pb::RefusalReason::BadCreditRecord,
        RefusalReason::RegistrationCancelled => pb::RefusalReason::RegistrationCancelled,
        RefusalReason::AgentNotAllowed => pb::RefusalReason::AgentNotAllowed,
        RefusalReason::NotAcceptedHere => pb::RefusalReason::NotAcceptedHere,
        RefusalReason::DocumentNotAccepted => pb::RefusalReason::DocumentNotAccepted,
        RefusalReason::UnknownCitizen => pb::RefusalReason::UnknownCitizen,
        RefusalReason::NotYetRenewable => pb::RefusalReason::NotYetRenewable,
        RefusalReason::ApplicationAlreadyOpen => pb::RefusalReason::ApplicationAlreadyOpen,
        RefusalReason::CardNotCurrent => pb::RefusalReason::CardNotCurrent,
        RefusalReason::LossReportFinal => pb::RefusalReason::LossReportFinal,
        RefusalReason::NewCardPending => pb::RefusalReason::NewCardPending,
    }
}

pub fn refusal_from_proto(reason: pb::RefusalReason) -> Option<RefusalReason> {
    RefusalReason::ALL.into_iter().find(|r| refusal_to_proto(*r) == reason)
}

pub fn card_status_to_proto(status: CardStatus) -> pb::CardStatus {
    match status {
        CardStatus::Valid => pb::CardStatus::Valid,
        CardStatus::ReportedLost => pb::CardStatus::ReportedLost,
        CardStatus::Revoked => pb::CardStatus::Revoked,
        CardStatus::Expired => pb::CardStatus::Expired,
        CardStatus::Unknown => pb::CardStatus::Unknown,
        CardStatus::AwaitingCollection => pb::CardStatus::AwaitingCollection,
        CardStatus::Voided => pb::CardStatus::Voided,
    }
}

pub fn card_status_from_proto(status: pb::CardStatus) -> Option<CardStatus> {
    match status {
        pb::CardStatus::Unspecified => None,
        pb::CardStatus::Valid => Some(CardStatus::Valid),
        pb::CardStatus::ReportedLost => Some(CardStatus::ReportedLost),
        pb::CardStatus::Revoked => Some(CardStatus::Revoked),
        pb::CardStatus::Expired => Some(CardStatus::Expired),
        pb::CardStatus::Unknown => Some(CardStatus::Unknown),
        pb::CardStatus::AwaitingCollection => Some(CardStatus::AwaitingCollection),
        pb::CardStatus::Voided => Some(CardStatus::Voided),
    }
}

pub fn status_statement_to_proto(signed: &SignedStatusStatement) -> pb::SignedStatusStatement {
    let s = &signed.statement;
    pb::SignedStatusStatement {
        statement: Some(pb::StatusStatement {
            registry_id: s.registry_id.clone(),
            key_id: s.key_id.clone(),
            card_serial: s.card_serial.clone(),
            id_number_sha256: s.id_number_hash.to_vec(),
            status: card_status_to_proto(s.status) as i32,
            status_changed_at: s.status_changed_at.map(timestamp),
            answered_at: Some(timestamp(s.answered_at)),
            nonce: s.nonce.clone(),
            next_update: Some(timestamp(s.next_update)),
        }),
        signature: signed.signature.clone(),
    }
}

/// Reads a signed status statement (a relying party checking what it was told); None if malformed.
pub fn status_statement_from_proto(signed: &pb::SignedStatusStatement) -> Option<SignedStatusStatement> {
    let s = signed.statement.as_ref()?;
    let status = card_status_from_proto(pb::CardStatus::try_from(s.status).ok()?)?;
    let status_changed_at = match &s.status_changed_at {
        Some(at) => Some(from_timestamp(at)?),
        None => None,
    };
    Some(SignedStatusStatement {
        statement: StatusStatement {
            registry_id: s.registry_id.clone(),
            key_id: s.key_id.clone(),
            card_serial: s.card_serial.clone(),
            id_number_hash: s.id_number_sha256.as_slice().try_into().ok()?,
            status,
            status_changed_at,
            answered_at: from_timestamp(s.answered_at.as_ref()?)?,
            next_update: from_timestamp(s.next_update.as_ref()?)?,
            nonce: s.nonce.clone(),
        },
        signature: signed.signature.clone(),
    })
}

pub fn document_from_proto(kind: pb::DocumentKind) -> Option<DocumentKind> {
    match kind {
        pb::DocumentKind::Unspecified => None,
        pb::DocumentKind::HouseholdRegisterBook => Some(DocumentKind::HouseholdRegisterBook),
        pb::DocumentKind::ResidencePermit => Some(DocumentKind::ResidencePermit),
        pb::DocumentKind::ValidCertificate => Some(DocumentKind::ValidCertificate),
        pb::DocumentKind::WorkUnitProof => Some(DocumentKind::WorkUnitProof),
    }
}

pub fn purpose_to_proto(purpose: DecisionPurpose) -> pb::DecisionPurpose {
    match purpose {
        DecisionPurpose::IssueCard => pb::DecisionPurpose::IssueCard,
        DecisionPurpose::ReportLoss => pb::DecisionPurpose::ReportLoss,
        DecisionPurpose::WithdrawLossReport => pb::DecisionPurpose::WithdrawLossReport,
        DecisionPurpose::TransferRegistration => pb::DecisionPurpose::TransferRegistration,
    }
}

pub fn purpose_from_proto(purpose: pb::DecisionPurpose) -> Option<DecisionPurpose> {
    match purpose {
        pb::DecisionPurpose::Unspecified => None,
        pb::DecisionPurpose::IssueCard => Some(DecisionPurpose::IssueCard),
        pb::DecisionPurpose::ReportLoss => Some(DecisionPurpose::ReportLoss),
        pb::DecisionPurpose::WithdrawLossReport => Some(DecisionPurpose::WithdrawLossReport),
        pb::DecisionPurpose::TransferRegistration => Some(DecisionPurpose::TransferRegistration),
    }
}

fn optional_date(date: Option<NaiveDate>) -> String {
    date.map(|d| d.to_string()).unwrap_or_default()
}

pub fn signed_decision_to_proto(signed: &SignedDecision) -> pb::SignedDecision {
    let d = &signed.decision;
    let (card, holder) = (&d.card, &d.card.holder);
    pb::SignedDecision {
        decision: Some(pb::Decision {
            decision_id: d.decision_id.clone(),
            purpose: purpose_to_proto(d.purpose) as i32,
            bureau_id: d.bureau_id.clone(),
            key_id: d.key_id.clone(),
            addressee_id: d.addressee_id.clone(),
            application_id: d.application_id.clone(),
            station_id: d.station_id.clone(),
            application_kind: d.application_kind.map_or(pb::ApplicationKind::Unspecified, kind_to_proto) as i32,
            card: Some(pb::CardData {
                id_number: holder.id_number.clone(),
                name: holder.name.clone(),
                sex: match holder.sex {
                    Sex::Male => pb::Sex::Male,
                    Sex::Female => pb::Sex::Female,
                } as i32,
                birth_date: holder.birth_date.to_string(),
                registration_province: holder.registration_province.clone(),
                address: holder.address.clone(),
                face_template: card.face_template.clone(),
                valid_from: card.valid_from.to_string(),
                valid_until: optional_date(card.valid_until),
            }),
            previous_card_serial: d.previous_card_serial.clone(),
            issued_at: Some(timestamp(d.issued_at)),
            expires_at: Some(timestamp(d.expires_at)),
            transfer_to_bureau_id: d.transfer_to_bureau_id.clone(),
        }),
        signature: signed.signature.clone(),
    }
}

/// Reads a signed decision from a request. Structure problems are field violations under `field`;
/// whether the decision is genuine is for `SignedDecision::verify`.
pub fn signed_decision_from_proto(
    field: &str,
    signed: Option<&pb::SignedDecision>,
) -> Result<SignedDecision, ApiError> {
    let mut v = FieldViolations::new();
    let Some(signed) = signed else {
        return Err(FieldViolations::single(field, "is required"));
    };
    let Some(d) = signed.decision.as_ref() else {
        return Err(FieldViolations::single(format!("{field}.decision"), "is required"));
    };
    let Some(card) = d.card.as_ref() else {
        return Err(FieldViolations::single(format!("{field}.decision.card"), "is required"));
    };
    let f = |name: &str| format!("{field}.decision.{name}");
    let purpose = v.enumeration::<pb::DecisionPurpose>(&f("purpose"), d.purpose).and_then(purpose_from_proto);
    let kind = match pb::ApplicationKind::try_from(d.application_kind) {
        Ok(kind) => kind_from_proto(kind),
        Err(_) => {
            v.add(f("application_kind"), format!("unknown value {}", d.application_kind));
            None
        }
    };
    let sex = match pb::Sex::try_from(card.sex) {
        Ok(pb::Sex::Male) => Some(Sex::Male),
        Ok(pb::Sex::Female) => Some(Sex::Female),
        _ => {
            v.add(f("card.sex"), "must be SEX_MALE or SEX_FEMALE");
            None
        }
    };
    let birth_date = v.date(&f("card.birth_date"), &card.birth_date);
    let valid_from = v.date(&f("card.valid_from"), &card.valid_from);
    let valid_until = if card.valid_until.is_empty() {
        Some(None)
    } else {
        v.date(&f("card.valid_until"), &card.valid_until).map(Some)
    };
    let issued_at = d.issued_at.as_ref().and_then(from_timestamp);
    if issued_at.is_none() {
        v.add(f("issued_at"), "is required");
    }
    let expires_at = d.expires_at.as_ref().and_then(from_timestamp);
    if expires_at.is_none() {
        v.add(f("expires_at"), "is required");
    }
    // Decision ids are UUIDs; the bound keeps derived keys within every database column.
    v.required(&f("decision_id"), &d.decision_id, 64);
    for (name, value) in
        [("bureau_id", &d.bureau_id), ("addressee_id", &d.addressee_id), ("card.id_number", &card.id_number)]
    {
        v.required(&f(name), value, crate::validate::MAX_TEXT_LEN);
    }
    for (name, value) in [
        // An empty or unlisted key id is the verifier's DECISION_UNKNOWN_KEY, not bad input.
        ("key_id", &d.key_id),
        ("application_id", &d.application_id),
        ("station_id", &d.station_id),
        ("card.name", &card.name),
        ("card.address", &card.address),
        ("card.registration_province", &card.registration_province),
        ("previous_card_serial", &d.previous_card_serial),
        ("transfer_to_bureau_id", &d.transfer_to_bureau_id),
    ] {
        v.bounded(&f(name), value, crate::validate::MAX_TEXT_LEN);
    }
    if card.face_template.len() > crate::validate::MAX_TEMPLATE_LEN {
        v.add(f("card.face_template"), "is too large");
    }
    if signed.signature.len() > 128 {
        v.add(format!("{field}.signature"), "is too large");
    }
    v.finish()?;
    let (
        Some(purpose),
        Some(sex),
        Some(birth_date),
        Some(valid_from),
        Some(valid_until),
        Some(issued_at),
        Some(expires_at),
    ) = (purpose, sex, birth_date, valid_from, valid_until, issued_at, expires_at)
    else {
        return Err(FieldViolations::single(field, "is malformed"));
    };
    Ok(SignedDecision {
        decision: Decision {
            decision_id: d.decision_id.clone(),
            purpose,
            bureau_id: d.bureau_id.clone(),
            key_id: d.key_id.clone(),
            addressee_id: d.addressee_id.clone(),
            application_id: d.application_id.clone(),
            station_id: d.station_id.clone(),
            application_kind: kind,
            card: CardData {
                holder: Particulars {
                    id_number: card.id_number.clone(),
                    name: card.name.clone(),
                    sex,
                    birth_date,
                    registration_province: card.registration_province.clone(),
                    address: card.address.clone(),
                },
                face_template: card.face_template.clone(),
                valid_from,
                valid_until,
            },
            previous_card_serial: d.previous_card_serial.clone(),
            issued_at,
            expires_at,
            transfer_to_bureau_id: d.transfer_to_bureau_id.clone(),
        },
        signature: signed.signature.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s4_decisions_survive_the_wire_unchanged() {
        let at = DateTime::from_timestamp(4_700_000_000, 123).unwrap();
        let decision = Decision {
            decision_id: "d".into(),
            purpose: DecisionPurpose::IssueCard,
            bureau_id: "b".into(),
            key_id: "k".into(),
            addressee_id: "p".into(),
            application_id: "a".into(),
            station_id: "s".into(),
            application_kind: Some(ApplicationKind::Renewal),
            card: CardData {
                holder: Particulars {
                    id_number: "11010519491231002X".into(),
                    name: "n".into(),
                    sex: Sex::Female,
                    birth_date: NaiveDate::from_ymd_opt(1949, 12, 31).unwrap(),
                    registration_province: "11".into(),
                    address: "x".into(),
                },
                face_template: vec![1, 2],
                valid_from: NaiveDate::from_ymd_opt(2118, 1, 1).unwrap(),
                valid_until: None,
            },
            previous_card_serial: "s1".into(),
            issued_at: at,
            expires_at: at,
            transfer_to_bureau_id: "b2".into(),
        };
        let signed = SignedDecision { decision, signature: vec![7; 64] };
        let back = signed_decision_from_proto("decision", Some(&signed_decision_to_proto(&signed))).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.decision.canonical_bytes(), signed.decision.canonical_bytes());
    }

    #[test]
    fn c4_status_statements_survive_the_wire_unchanged() {
        let at = DateTime::from_timestamp(4_700_000_000, 5_000).unwrap();
        for status_changed_at in [Some(at), None] {
            let signed = SignedStatusStatement {
                statement: StatusStatement {
                    registry_id: "r".into(),
                    key_id: "k".into(),
                    card_serial: "S".into(),
                    id_number_hash: [9; 32],
                    status: CardStatus::Revoked,
                    status_changed_at,
                    answered_at: at,
                    next_update: at + chrono::Duration::minutes(5),
                    nonce: vec![1, 2, 3],
                },
                signature: vec![7; 64],
            };
            assert_eq!(status_statement_from_proto(&status_statement_to_proto(&signed)), Some(signed));
        }
    }
}
