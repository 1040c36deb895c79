//! One file per table, and the string columns' values.
pub mod citizens;
pub mod verifications;

use sea_orm::entity::prelude::*;
use yidi_domain::{ApplicationKind, ApplicationState, Credit, DecisionPurpose, Registration, Sex};

/// A string column holding a domain enum: the stored strings, and the conversions both ways (the
/// domain crate knows no sea-orm).
macro_rules! stored_enum {
    ($(#[$doc:meta])* $name:ident <=> $domain:ident, $db_type:tt { $($variant:ident = $value:tt),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
        #[sea_orm(rs_type = "String", db_type = $db_type)]
        pub enum $name {
            $(#[sea_orm(string_value = $value)] $variant,)+
        }

        impl From<$domain> for $name {
            fn from(value: $domain) -> Self {
                match value {
                    $($domain::$variant => Self::$variant,)+
                }
            }
        }

        impl From<$name> for $domain {
            fn from(value: $name) -> Self {
                match value {
                    $($name::$variant => Self::$variant,)+
                }
            }
        }
    };
}

stored_enum! {
    /// `citizens.sex`.
    StoredSex <=> Sex, "String(StringLen::N(16))" { Male = "male", Female = "female" }
}

stored_enum! {
    /// `citizens.credit_status`.
    StoredCredit <=> Credit, "String(StringLen::N(16))" { Good = "good", Bad = "bad" }
}

stored_enum! {
    /// `citizens.registration_status`.
    StoredRegistration <=> Registration, "String(StringLen::N(16))" { Active = "active", Cancelled = "cancelled" }
}

stored_enum! {
    /// `verifications.purpose`.
    StoredPurpose <=> DecisionPurpose, "String(StringLen::N(32))" {
        IssueCard = "issue_card",
        ReportLoss = "report_loss",
        WithdrawLossReport = "withdraw_loss_report",
        TransferRegistration = "transfer_registration",
    }
}

stored_enum! {
    /// `verifications.kind`.
    StoredKind <=> ApplicationKind, "String(StringLen::N(32))" {
        Replacement = "replacement",
        Renewal = "renewal",
        LossReport = "loss_report",
    }
}

/// `verifications.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum StoredOutcome {
    #[sea_orm(string_value = "approved")]
    Approved,
    #[sea_orm(string_value = "refused")]
    Refused,
}

/// `verifications.closed_state`: the final states an application is closed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(32))")]
pub enum StoredClosedState {
    #[sea_orm(string_value = "collected")]
    Collected,
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

impl From<StoredClosedState> for ApplicationState {
    fn from(state: StoredClosedState) -> Self {
        match state {
            StoredClosedState::Collected => Self::Collected,
            StoredClosedState::Cancelled => Self::Cancelled,
        }
    }
}

impl TryFrom<ApplicationState> for StoredClosedState {
    type Error = DbErr;

    fn try_from(state: ApplicationState) -> Result<Self, DbErr> {
        match state {
            ApplicationState::Collected => Ok(Self::Collected),
            ApplicationState::Cancelled => Ok(Self::Cancelled),
            other => Err(DbErr::Custom(format!("an application is never closed as {}", other.as_str()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows written before these enums read back unchanged: the strings are the domain's.
    #[test]
    fn enum_columns_are_stored_as_before() {
        for purpose in [DecisionPurpose::IssueCard, DecisionPurpose::ReportLoss, DecisionPurpose::WithdrawLossReport] {
            assert_eq!(StoredPurpose::from(purpose).to_value(), purpose.as_str());
            assert_eq!(DecisionPurpose::from(StoredPurpose::from(purpose)), purpose);
        }
        for kind in [ApplicationKind::Replacement, ApplicationKind::Renewal, ApplicationKind::LossReport] {
            assert_eq!(StoredKind::from(kind).to_value(), kind.as_str());
        }
        for state in [ApplicationState::Collected, ApplicationState::Cancelled] {
            let stored = StoredClosedState::try_from(state).map(|s| s.to_value()).ok();
            assert_eq!(stored.as_deref(), Some(state.as_str()));
        }
        assert!(StoredClosedState::try_from(ApplicationState::Approved).is_err());
        let strings = |values: Vec<String>| values.join(",");
        assert_eq!(strings(StoredSex::values()), "male,female");
        assert_eq!(strings(StoredCredit::values()), "good,bad");
        assert_eq!(strings(StoredRegistration::values()), "active,cancelled");
        assert_eq!(strings(StoredOutcome::values()), "approved,refused");
    }
}
