//! One sea-orm entity per table.
pub mod cards;
pub mod hits;
pub mod loss_reports;
pub mod registration_transfers;
pub mod registry_feed;
pub mod status_events;

use sea_orm::entity::prelude::*;
use yidi_domain::StoredCardStatus;

/// `cards.status` and `status_events.status`: a [`StoredCardStatus`], stored as these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum CardStatusColumn {
    #[sea_orm(string_value = "valid")]
    Valid,
    #[sea_orm(string_value = "reported_lost")]
    ReportedLost,
    #[sea_orm(string_value = "revoked")]
    Revoked,
    #[sea_orm(string_value = "made")]
    Made,
    #[sea_orm(string_value = "voided")]
    Voided,
}

impl From<StoredCardStatus> for CardStatusColumn {
    fn from(status: StoredCardStatus) -> Self {
        match status {
            StoredCardStatus::Valid => Self::Valid,
            StoredCardStatus::ReportedLost => Self::ReportedLost,
            StoredCardStatus::Revoked => Self::Revoked,
            StoredCardStatus::Made => Self::Made,
            StoredCardStatus::Voided => Self::Voided,
        }
    }
}

impl From<CardStatusColumn> for StoredCardStatus {
    fn from(status: CardStatusColumn) -> Self {
        match status {
            CardStatusColumn::Valid => Self::Valid,
            CardStatusColumn::ReportedLost => Self::ReportedLost,
            CardStatusColumn::Revoked => Self::Revoked,
            CardStatusColumn::Made => Self::Made,
            CardStatusColumn::Voided => Self::Voided,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_statuses_are_stored_as_before() {
        for status in StoredCardStatus::ALL {
            let column = CardStatusColumn::from(status);
            assert_eq!(column.to_value(), status.as_str());
            assert_eq!(StoredCardStatus::from(column), status);
        }
    }
}
