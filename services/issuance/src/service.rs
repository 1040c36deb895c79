//! The producer's rules (S4): an order only for a decision signed by the citizen's home bureau,
//! addressed to this producer, unexpired and not used before; the card data is kept verbatim.
use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;
use yidi_audit::AuditEntry;
use yidi_domain::{DecisionError, DecisionPurpose, SignedDecision, decision::Expectation, mask::mask_id_number};
use yidi_grpc::ApiError;
use yidi_outbox::NewMessage;
use yidi_runtime::{Clock, directory::DirectoryHandle};

use crate::{
    order::{Order, OrderEvents},
    outbox::Topic,
    repo::{InsertError, NewOrder, Repo},
};

/// How many fresh serials PlaceOrder draws before giving up on a collision streak.
const SERIAL_DRAWS: usize = 8;
/// Ten decimal digits.
const SERIAL_SPACE: u64 = 10_000_000_000;

/// A validated PlaceOrder: the decision as read, and its protobuf encoding as received.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub signed: SignedDecision,
    /// The decision's protobuf encoding, stored and forwarded to the registry verbatim.
    pub encoded: Vec<u8>,
}

/// How GetOrder names an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderKey {
    Id(Uuid),
    Decision(String),
}

/// A fresh card serial: `{prefix}{10 digits}` (C2; uniqueness is the database's unique key).
pub fn new_serial(prefix: &str) -> String {
    format!("{prefix}{:010}", rand::random_range(0..SERIAL_SPACE))
}

pub struct IssuanceService {
    repo: Repo,
    directory: DirectoryHandle,
    clock: Clock,
    bureau_id: String,
    serial_prefix: String,
    delay: Duration,
    /// The registry cards are registered with.
    registry_id: String,
    /// Wakes the outbox dispatcher when an order is placed.
    wake: Arc<Notify>,
    events: OrderEvents,
}

/// What the service is made of.
pub struct IssuanceParts {
    pub repo: Repo,
    pub directory: DirectoryHandle,
    pub clock: Clock,
    pub bureau_id: String,
    pub serial_prefix: String,
    pub delay: Duration,
    pub registry_id: String,
    pub wake: Arc<Notify>,
    /// Shared with the outbox handler, which publishes the registrations and dispatches.
    pub events: OrderEvents,
}

impl IssuanceService {
    pub fn new(parts: IssuanceParts) -> Self {
        let IssuanceParts { repo, directory, clock, bureau_id, serial_prefix, delay, registry_id, wake, events } =
            parts;
        Self { repo, directory, clock, bureau_id, serial_prefix, delay, registry_id, wake, events }
    }

    /// Every committed change of an order.
    pub fn subscribe(&self) -> broadcast::Receiver<Order> {
        self.events.subscribe()
    }

    /// PlaceOrder (S4).
    pub async fn place_order(&self, request: OrderRequest) -> Result<Order, ApiError> {
        let now = self.clock.now();
        let decision = &request.signed.decision;
        let subject = mask_id_number(&decision.card.holder.id_number);
        let expected = Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: &self.bureau_id, now };
        if let Err(error) = request.signed.verify(&self.directory.current(), expected) {
            return Err(self.refuse(subject, &decision.decision_id, error).await);
        }
        if self.repo.decision_used(&decision.decision_id).await? {
            let error = DecisionError::AlreadyUsed(decision.decision_id.clone());
            return Err(self.refuse(subject, &decision.decision_id, error).await);
        }
        let ready_at = now + chrono::Duration::from_std(self.delay).unwrap_or_else(|_| chrono::Duration::zero());
        for _ in 0..SERIAL_DRAWS {
            let order_id = Uuid::new_v4();
            let serial = new_serial(&self.serial_prefix);
            let order = NewOrder {
                order_id,
                decision_id: decision.decision_id.clone(),
                application_id: decision.application_id.clone(),
                station_id: decision.station_id.clone(),
                id_number: decision.card.holder.id_number.clone(),
                card_serial: serial.clone(),
                signed_decision: request.encoded.clone(),
                // The validity printed is the decision's, never recomputed here.
                valid_from: decision.card.valid_from,
                valid_until: decision.card.valid_until,
                ready_at,
                trace_context: yidi_runtime::telemetry::current_traceparent(),
                now,
            };
            let audit = AuditEntry {
                action: "place_order",
                subject: subject.clone(),
                outcome: "accepted".into(),
                detail: format!(
                    "order {order_id} for decision {} of {}, card {serial}",
                    decision.decision_id, decision.bureau_id
                ),
            };
            // Registered with the registry once made: the production time as the clock counts it,
            // at most `delay` from now in real time (a fixed or shifted clock cannot stall it).
            let left = (ready_at - now).to_std().unwrap_or(Duration::ZERO).min(self.delay);
            let registration = NewMessage {
                not_before: Some(Utc::now() + chrono::Duration::from_std(left).unwrap_or_default()),
                ..NewMessage::new(Topic::RegisterCard.as_str(), order_id.to_string(), &self.registry_id)
            };
            match self.repo.insert_order(order, audit, registration).await {
                Ok(order) => {
                    tracing::info!(
                        order_id = %order.order_id,
                        decision_id = %order.decision_id,
                        card_serial = %order.card_serial,
                        id_number = %order.id_number_masked,
                        "order placed: in production"
                    );
                    self.events.publish(&order);
                    self.wake.notify_one();
                    return Ok(order);
                }
                Err(InsertError::SerialTaken) => continue,
                Err(InsertError::DecisionUsed) => {
                    let error = DecisionError::AlreadyUsed(decision.decision_id.clone());
                    return Err(self.refuse(subject, &decision.decision_id, error).await);
                }
                Err(InsertError::Db(error)) => return Err(error.into()),
            }
        }
        Err(ApiError::Internal("no free card serial after several draws".into()))
    }

    /// Records a refused decision in the audit log (and nothing else), then returns the refusal,
    /// or the database error if it cannot be written (yidi_audit, "When an audit write fails").
    async fn refuse(&self, subject: String, decision_id: &str, error: DecisionError) -> ApiError {
        tracing::warn!(decision_id, id_number = %subject, reason = error.code(), "decision refused");
        let audit = AuditEntry {
            action: "place_order",
            subject,
            outcome: error.code().to_lowercase(),
            detail: format!("decision {decision_id}: {error}"),
        };
        match self.repo.audit(self.clock.now(), audit).await {
            Ok(()) => ApiError::Decision(error),
            Err(audit_error) => audit_error,
        }
    }

    /// GetOrder.
    pub async fn get_order(&self, key: &OrderKey) -> Result<Order, ApiError> {
        let found = match key {
            OrderKey::Id(id) => self.repo.find(*id).await?,
            OrderKey::Decision(decision_id) => self.repo.find_by_decision(decision_id).await?,
        };
        found.ok_or_else(|| match key {
            OrderKey::Id(id) => ApiError::not_found("order", id.to_string()),
            OrderKey::Decision(decision_id) => ApiError::not_found("order for decision", decision_id.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c2_serials_are_prefix_and_ten_digits() {
        for _ in 0..200 {
            let serial = new_serial("ZJ");
            assert_eq!(serial.len(), 12, "{serial}");
            assert!(serial.starts_with("ZJ"));
            assert!(serial[2..].chars().all(|c| c.is_ascii_digit()), "{serial}");
        }
        assert_ne!(new_serial("ZJ"), new_serial("ZJ"));
    }
}
