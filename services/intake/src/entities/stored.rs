//! The enum columns, stored as the strings rows have always held (`string_value`s must never
//! change: existing rows read back through them). The domain enums live in `yidi_domain`, which
//! knows nothing of the database, so each column has its own enum here, converted both ways.
use sea_orm::entity::prelude::*;
use yidi_domain::{ApplicationKind, ApplicationState, DocumentKind};

/// `applications.kind`
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum Kind {
    #[sea_orm(string_value = "replacement")]
    Replacement,
    #[sea_orm(string_value = "renewal")]
    Renewal,
    #[sea_orm(string_value = "loss_report")]
    LossReport,
}

/// `applications.state` and `application_events.state`
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum State {
    #[sea_orm(string_value = "received")]
    Received,
    #[sea_orm(string_value = "verifying")]
    Verifying,
    #[sea_orm(string_value = "refused")]
    Refused,
    #[sea_orm(string_value = "approved")]
    Approved,
    #[sea_orm(string_value = "in_production")]
    InProduction,
    #[sea_orm(string_value = "ready_for_collection")]
    ReadyForCollection,
    #[sea_orm(string_value = "collected")]
    Collected,
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

/// `applications.document_kind`
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum Document {
    #[sea_orm(string_value = "household_register_book")]
    HouseholdRegisterBook,
    #[sea_orm(string_value = "residence_permit")]
    ResidencePermit,
    #[sea_orm(string_value = "valid_certificate")]
    ValidCertificate,
    #[sea_orm(string_value = "work_unit_proof")]
    WorkUnitProof,
}

/// Both directions of a one-to-one mapping between a stored enum and its domain enum.
macro_rules! same_variants {
    ($stored:ident, $domain:ident, [$($variant:ident),+ $(,)?]) => {
        impl From<$domain> for $stored {
            fn from(value: $domain) -> Self {
                match value {
                    $($domain::$variant => Self::$variant,)+
                }
            }
        }

        impl From<$stored> for $domain {
            fn from(value: $stored) -> Self {
                match value {
                    $($stored::$variant => Self::$variant,)+
                }
            }
        }
    };
}

same_variants!(Kind, ApplicationKind, [Replacement, Renewal, LossReport]);
same_variants!(
    State,
    ApplicationState,
    [Received, Verifying, Refused, Approved, InProduction, ReadyForCollection, Collected, Cancelled]
);
same_variants!(Document, DocumentKind, [HouseholdRegisterBook, ResidencePermit, ValidCertificate, WorkUnitProof]);

#[cfg(test)]
mod tests {
    use sea_orm::{ActiveEnum, Iterable};

    use super::*;

    /// The strings of rows written before these enums existed must read back unchanged.
    #[test]
    fn stored_strings_are_the_ones_rows_hold() {
        for state in ApplicationState::ALL {
            assert_eq!(State::from(state).to_value(), state.as_str());
            assert_eq!(ApplicationState::from(State::from(state)), state);
        }
        for kind in Kind::iter() {
            assert_eq!(kind.to_value(), ApplicationKind::from(kind).as_str());
        }
        let documents: Vec<String> = Document::iter().map(|d| d.to_value()).collect();
        assert_eq!(documents, ["household_register_book", "residence_permit", "valid_certificate", "work_unit_proof"]);
    }
}
