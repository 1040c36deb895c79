//! Application kinds, the lifecycle state machine and refusal reasons.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplicationKind {
    /// K1
    Replacement,
    /// K2
    Renewal,
    /// K3
    LossReport,
}

impl ApplicationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replacement => "replacement",
            Self::Renewal => "renewal",
            Self::LossReport => "loss_report",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Replacement, Self::Renewal, Self::LossReport].into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the application ends with a new card (and so is "open" until collected, K5).
    pub fn makes_a_card(self) -> bool {
        matches!(self, Self::Replacement | Self::Renewal)
    }
}

/// received → verifying → refused | approved → in production → ready for collection → collected;
/// cancelled from any state before production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplicationState {
    Received,
    Verifying,
    Refused,
    Approved,
    InProduction,
    ReadyForCollection,
    Collected,
    Cancelled,
}

impl ApplicationState {
    pub const ALL: [Self; 8] = [
        Self::Received,
        Self::Verifying,
        Self::Refused,
        Self::Approved,
        Self::InProduction,
        Self::ReadyForCollection,
        Self::Collected,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Verifying => "verifying",
            Self::Refused => "refused",
            Self::Approved => "approved",
            Self::InProduction => "in_production",
            Self::ReadyForCollection => "ready_for_collection",
            Self::Collected => "collected",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether `self → next` is a transition of the lifecycle.
    pub fn can_move_to(self, next: Self) -> bool {
        use ApplicationState::*;
        matches!(
            (self, next),
            (Received, Verifying)
                | (Verifying, Refused | Approved)
                | (Approved, InProduction)
                | (InProduction, ReadyForCollection)
                | (ReadyForCollection, Collected)
                | (Received | Verifying | Approved, Cancelled)
        )
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Refused | Self::Collected | Self::Cancelled)
    }

    /// Cancellation is possible only before production.
    pub fn is_cancellable(self) -> bool {
        self.can_move_to(Self::Cancelled)
    }
}

/// Every refusal the rulebook names; carried to the caller as its reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    #[error("a first application is never accepted in a different place (K4)")]
    FirstApplication,
    #[error("the live face does not match the register (S2, S3; C3 at collection)")]
    FaceMismatch,
    #[error("the live fingerprints do not match the register (S2, S3)")]
    FingerprintMismatch,
    #[error("the citizen has a bad credit record (S3)")]
    BadCreditRecord,
    #[error("the citizen's household registration is cancelled (S3)")]
    RegistrationCancelled,
    #[error("only the applicant in person may apply; agents are refused (S2)")]
    AgentNotAllowed,
    #[error("this station does not accept applicants of that province on this date (P0-P3)")]
    NotAcceptedHere,
    #[error("the document shown is not accepted in this phase (P4)")]
    DocumentNotAccepted,
    #[error("the citizen is not on the register of this bureau's jurisdiction (N3)")]
    UnknownCitizen,
    #[error("the card cannot be renewed yet (K2)")]
    NotYetRenewable,
    #[error("the citizen already has an open application (K5)")]
    ApplicationAlreadyOpen,
    #[error("the card named is not the citizen's current card")]
    CardNotCurrent,
    #[error("the loss report can no longer be withdrawn: a replacement card was made (K6)")]
    LossReportFinal,
    #[error("the loss report cannot be withdrawn while an application for a new card is open (K6)")]
    NewCardPending,
}

impl RefusalReason {
    pub const ALL: [Self; 14] = [
        Self::FirstApplication,
        Self::FaceMismatch,
        Self::FingerprintMismatch,
        Self::BadCreditRecord,
        Self::RegistrationCancelled,
        Self::AgentNotAllowed,
        Self::NotAcceptedHere,
        Self::DocumentNotAccepted,
        Self::UnknownCitizen,
        Self::NotYetRenewable,
        Self::ApplicationAlreadyOpen,
        Self::CardNotCurrent,
        Self::LossReportFinal,
        Self::NewCardPending,
    ];

    /// Stable code, stored in databases and used as `ErrorInfo.reason` (upper-case).
    pub fn code(self) -> &'static str {
        match self {
            Self::FirstApplication => "FIRST_APPLICATION",
            Self::FaceMismatch => "FACE_MISMATCH",
            Self::FingerprintMismatch => "FINGERPRINT_MISMATCH",
            Self::BadCreditRecord => "BAD_CREDIT_RECORD",
            Self::RegistrationCancelled => "REGISTRATION_CANCELLED",
            Self::AgentNotAllowed => "AGENT_NOT_ALLOWED",
            Self::NotAcceptedHere => "NOT_ACCEPTED_HERE",
            Self::DocumentNotAccepted => "DOCUMENT_NOT_ACCEPTED",
            Self::UnknownCitizen => "UNKNOWN_CITIZEN",
            Self::NotYetRenewable => "NOT_YET_RENEWABLE",
            Self::ApplicationAlreadyOpen => "APPLICATION_ALREADY_OPEN",
            Self::CardNotCurrent => "CARD_NOT_CURRENT",
            Self::LossReportFinal => "LOSS_REPORT_FINAL",
            Self::NewCardPending => "NEW_CARD_PENDING",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::ApplicationState::*;
    use super::*;

    #[test]
    fn lifecycle_follows_the_rulebook() {
        let path = [Received, Verifying, Approved, InProduction, ReadyForCollection, Collected];
        for pair in path.windows(2) {
            assert!(pair[0].can_move_to(pair[1]), "{:?} -> {:?}", pair[0], pair[1]);
        }
        assert!(Verifying.can_move_to(Refused));
        assert!(!Received.can_move_to(Approved), "verification cannot be skipped");
        assert!(!Refused.can_move_to(Approved), "a refusal is final");
        assert!(!Collected.can_move_to(Cancelled));
    }

    #[test]
    fn cancellation_only_before_production() {
        for state in ApplicationState::ALL {
            let expected = matches!(state, Received | Verifying | Approved);
            assert_eq!(state.is_cancellable(), expected, "{state:?}");
        }
    }

    #[test]
    fn codes_round_trip() {
        for state in ApplicationState::ALL {
            assert_eq!(ApplicationState::parse(state.as_str()), Some(state));
        }
        for reason in RefusalReason::ALL {
            assert_eq!(RefusalReason::from_code(reason.code()), Some(reason));
        }
    }
}
