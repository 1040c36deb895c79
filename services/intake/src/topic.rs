//! What the station sends the other bureaus: one outbox topic per step of an application, and
//! the messages each step owes. The topic is stored as its string in `outbox_messages.topic`;
//! the strings must never change (queued rows read back through them).
use std::{fmt, str::FromStr};

use yidi_outbox::NewMessage;

/// One outbox topic of the station; delivered by `handlers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Verification of the applicant by the home bureau.
    Verify,
    /// The loss report, filed with the registry (K1, K3).
    ReportLoss,
    /// The order of the new card, placed with the producer.
    PlaceOrder,
    /// Following the order until the card is dispatched to the station.
    AwaitOrder,
    /// Telling the home bureau the application ended (K5).
    CloseApplication,
    /// Telling the registry the card was handed over, so it becomes valid (C3, S1).
    RecordCollection,
}

/// A stored topic this station does not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown topic {0:?}")]
pub struct UnknownTopic(pub String);

impl Topic {
    pub const ALL: [Self; 6] = [
        Self::Verify,
        Self::ReportLoss,
        Self::PlaceOrder,
        Self::AwaitOrder,
        Self::CloseApplication,
        Self::RecordCollection,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::ReportLoss => "report_loss",
            Self::PlaceOrder => "place_order",
            Self::AwaitOrder => "await_order",
            Self::CloseApplication => "close_application",
            Self::RecordCollection => "record_collection",
        }
    }

    /// A message of this topic about `application_id`, to `target`.
    pub fn message(self, application_id: &str, target: &str) -> NewMessage {
        NewMessage::new(self.as_str(), application_id, target)
    }
}

impl FromStr for Topic {
    type Err = UnknownTopic;

    fn from_str(stored: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|topic| topic.as_str() == stored).ok_or_else(|| UnknownTopic(stored.to_owned()))
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_read_back_from_their_stored_strings_and_unknown_ones_are_errors() {
        let stored: Vec<_> = Topic::ALL.iter().map(|topic| topic.as_str()).collect();
        assert_eq!(
            stored,
            ["verify", "report_loss", "place_order", "await_order", "close_application", "record_collection"]
        );
        for topic in Topic::ALL {
            assert_eq!(topic.as_str().parse(), Ok(topic));
        }
        assert_eq!("collect".parse::<Topic>(), Err(UnknownTopic("collect".into())));
    }
}
