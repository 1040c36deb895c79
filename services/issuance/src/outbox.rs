//! The producer's outbox handlers: once an order's production time has passed, its outbox message
//! (queued with the order, due at that time) registers the card with the registry (presenting the
//! stored signed decision verbatim), dispatches it, and tells the station (NotifyOrderDispatched).
//!
//! One message carries the three steps, so they cost one claim and one settlement: the
//! registration and the dispatch are committed in one transaction (the registry's answer is what
//! makes the card dispatchable; nothing waits in between), and the message stays pending until the
//! station has been told, so a lost notice is sent again. The station never depends on the notice
//! alone: it still asks for the order (GetOrder) when it has not been told for long.
use std::{fmt, str::FromStr, time::Duration};

use prost::Message;
use tonic::Code;
use tracing::Instrument;
use uuid::Uuid;
use yidi_audit::AuditEntry;
use yidi_grpc::client::{self, Peers};
use yidi_outbox::{Delivery, Handler, IDEMPOTENCY_KEY};
use yidi_proto::v1::{self as pb, intake_client::IntakeClient, loss_registry_client::LossRegistryClient};
use yidi_runtime::Clock;

use crate::{
    order::{Order, OrderEvents, OrderState},
    repo::{Attempt, Repo},
};

/// How the worker treats a registry's answer (a `Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The registry refused the card; retrying cannot change that.
    Definitive,
    /// Transport problem or a registry that is down or overloaded: retry.
    Transient,
}

/// Definitive: the registry judged the request (PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS
/// for a different serial, INVALID_ARGUMENT...); the codes every bureau retries are transient
/// ([`client::is_transient`]).
pub fn classify(code: Code) -> Verdict {
    if client::is_transient(code) { Verdict::Transient } else { Verdict::Definitive }
}

/// What the producer's outbox messages are about, as stored in `outbox_messages.topic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Register an order's card with the registry, dispatch it, then tell the station (subject:
    /// the order id). The name is the one stored rows carry.
    RegisterCard,
}

impl Topic {
    pub const ALL: [Self; 1] = [Self::RegisterCard];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RegisterCard => "register_card",
        }
    }
}

/// A stored topic this producer never queues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown topic {0:?}")]
pub struct UnknownTopic(pub String);

impl FromStr for Topic {
    type Err = UnknownTopic;

    fn from_str(s: &str) -> Result<Self, UnknownTopic> {
        Self::ALL.into_iter().find(|topic| topic.as_str() == s).ok_or_else(|| UnknownTopic(s.to_owned()))
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the handler records its work through: the producer's orders, clock and watchers.
pub struct Production {
    pub repo: Repo,
    pub clock: Clock,
    /// This producer's bureau id, presented to the registry.
    pub bureau_id: String,
    pub events: OrderEvents,
}

/// Delivers the producer's outbox: each order's card registration with the registry, its
/// dispatch to the station, and the notice telling the station.
pub struct Registrar {
    production: Production,
    /// The registry's channel, as the directory in force lists its endpoint.
    peers: Peers,
    registry_id: String,
    /// The deadline of every call, sent along as `grpc-timeout`.
    call_timeout: Duration,
}

impl Registrar {
    pub fn new(production: Production, peers: Peers, registry_id: String, call_timeout: Duration) -> Self {
        Self { production, peers, registry_id, call_timeout }
    }
}

impl Handler for Registrar {
    async fn deliver(&self, message: &yidi_outbox::Model) -> Delivery {
        // Undeliverable like any message this producer cannot act on: a dead letter for operators.
        match message.topic.parse::<Topic>() {
            Ok(Topic::RegisterCard) => self.register_card(message).await,
            Err(error) => Delivery::Fail(error.to_string()),
        }
    }
}

impl Registrar {
    async fn register_card(&self, message: &yidi_outbox::Model) -> Delivery {
        let Ok(order_id) = Uuid::parse_str(&message.subject) else {
            return Delivery::Fail(format!("{:?} is not an order id", message.subject));
        };
        let (order, signed_decision) = match self.production.repo.find_with_decision(order_id).await {
            Ok(Some(found)) => found,
            Ok(None) => return Delivery::Fail(format!("order {order_id} does not exist")),
            Err(error) => return Delivery::Retry(format!("producer database: {error}")),
        };
        // The work continues the trace of the PlaceOrder request (and so of the application).
        let span = tracing::info_span!("order_step", order_id = %order.order_id, state = %order.state);
        yidi_runtime::telemetry::continue_trace(&span, order.trace_context.as_deref());
        match order.state {
            OrderState::InProduction => self.register(order, &signed_decision, &message.id).instrument(span).await,
            // Registered by an older version that dispatched in a second step: only the dispatch
            // and the notice are left.
            OrderState::Registered => self.dispatch(order).instrument(span).await,
            // Dispatched, but the station has not acknowledged the notice yet.
            OrderState::Dispatched => self.notify(&order).instrument(span).await,
        }
    }

    /// `stored`: the order's signed decision as PlaceOrder stored it (protobuf bytes).
    async fn register(&self, order: Order, stored: &[u8], message_id: &str) -> Delivery {
        let decision = match pb::SignedDecision::decode(stored) {
            Ok(decision) => decision,
            Err(error) => {
                let message = format!("stored decision cannot be decoded: {error}");
                return self.failed(&order, Verdict::Definitive, message).await;
            }
        };
        let mut request = tonic::Request::new(pb::RegisterCardRequest {
            decision: Some(decision),
            producer_id: self.production.bureau_id.clone(),
            card_serial: order.card_serial.clone(),
            request_id: String::new(),
        });
        request.set_timeout(self.call_timeout);
        // A redelivery is answered by the registry as the first delivery was.
        if let Ok(key) = message_id.parse() {
            request.metadata_mut().insert(IDEMPOTENCY_KEY, key);
        }
        let channel = match self.peers.channel(&self.registry_id) {
            Ok(channel) => channel,
            Err(error) => {
                let message = format!("registry {}: {error}", self.registry_id);
                return self.failed(&order, Verdict::Transient, message).await;
            }
        };
        match LossRegistryClient::new(channel).register_card(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if !response.card_serial.is_empty() && response.card_serial != order.card_serial {
                    tracing::warn!(
                        order_id = %order.order_id,
                        card_serial = %order.card_serial,
                        answered = %response.card_serial,
                        "registry answered for another serial"
                    );
                }
                let now = self.production.clock.now();
                let registered = AuditEntry {
                    action: "register_card",
                    subject: order.card_serial.clone(),
                    outcome: "registered".into(),
                    detail: format!(
                        "order {} registered with {}; awaiting collection",
                        order.order_id, self.registry_id
                    ),
                };
                // Registered and dispatched in one transaction: a crash before it commits leaves
                // the order in production and the message pending, and the registry answers the
                // redelivery (same idempotency key) as it answered this one.
                let audits = vec![registered, dispatched_audit(&order)];
                let transition = self
                    .production
                    .repo
                    .transition(order.order_id, OrderState::InProduction, OrderState::Dispatched, now, audits)
                    .await;
                match transition {
                    Ok(Some(dispatched)) => {
                        tracing::info!(order_id = %order.order_id, card_serial = %order.card_serial, "card registered and dispatched");
                        // Watchers see both steps, as they were taken.
                        let registered = Order { state: OrderState::Registered, ..dispatched.clone() };
                        self.production.events.publish(&registered);
                        self.production.events.publish(&dispatched);
                        self.notify(&dispatched).await
                    }
                    Ok(None) => Delivery::Retry(format!("order {} changed while registering", order.order_id)),
                    Err(error) => Delivery::Retry(format!("cannot record the registration: {error}")),
                }
            }
            Err(status) => {
                let message = format!("registry {}: {:?}: {}", self.registry_id, status.code(), status.message());
                self.failed(&order, classify(status.code()), message).await
            }
        }
    }

    /// Keeps the failure visible on the order (GetOrder, and so the station's application).
    async fn failed(&self, order: &Order, verdict: Verdict, message: String) -> Delivery {
        let now = self.production.clock.now();
        let (attempt, audit) = match verdict {
            Verdict::Transient => (Attempt::Retry(message.clone()), None),
            Verdict::Definitive => {
                let audit = AuditEntry {
                    action: "register_card",
                    subject: order.card_serial.clone(),
                    outcome: "refused_by_registry".into(),
                    detail: format!("order {}: {message}", order.order_id),
                };
                (Attempt::Refused(message.clone()), Some(audit))
            }
        };
        match self.production.repo.record_attempt(order.order_id, attempt, now, audit).await {
            Ok(Some(updated)) => self.production.events.publish(&updated),
            Ok(None) => {}
            Err(error) => tracing::warn!(order_id = %order.order_id, %error, "cannot record the failed attempt"),
        }
        match verdict {
            Verdict::Transient => Delivery::Retry(message),
            Verdict::Definitive => Delivery::Fail(message),
        }
    }

    /// Dispatches an order registered by an older version (which dispatched in a second step).
    async fn dispatch(&self, order: Order) -> Delivery {
        let now = self.production.clock.now();
        let audits = vec![dispatched_audit(&order)];
        match self
            .production
            .repo
            .transition(order.order_id, OrderState::Registered, OrderState::Dispatched, now, audits)
            .await
        {
            Ok(Some(dispatched)) => {
                tracing::info!(order_id = %order.order_id, card_serial = %order.card_serial, "card dispatched");
                self.production.events.publish(&dispatched);
                self.notify(&dispatched).await
            }
            Ok(None) => Delivery::Retry(format!("order {} changed while dispatching", order.order_id)),
            Err(error) => Delivery::Retry(format!("cannot record the dispatch: {error}")),
        }
    }

    /// Tells the station its card is dispatched (Intake.NotifyOrderDispatched). Sent without an
    /// idempotency key: the station's answer depends only on its application's state, so a
    /// repeat is harmless and the station stores no answer for it. A station that cannot be
    /// reached is told again later (the message stays pending); one that does not know the RPC
    /// (an older version) finds the order by polling, so the notice is dropped.
    async fn notify(&self, order: &Order) -> Delivery {
        let station = &order.station_id;
        let channel = match self.peers.channel(station) {
            Ok(channel) => channel,
            Err(error) => return Delivery::Retry(format!("station {station}: {error}")),
        };
        let mut request = tonic::Request::new(pb::NotifyOrderDispatchedRequest {
            application_id: order.application_id.clone(),
            order_id: order.order_id.to_string(),
            card_serial: order.card_serial.clone(),
            producer_id: self.production.bureau_id.clone(),
            request_id: String::new(),
        });
        request.set_timeout(self.call_timeout);
        match IntakeClient::new(channel).notify_order_dispatched(request).await {
            Ok(_) => {
                tracing::info!(order_id = %order.order_id, %station, "station told: card dispatched");
                Delivery::Delivered
            }
            Err(status) if status.code() == Code::Unimplemented => {
                Delivery::Dropped(format!("station {station} takes no notices; it polls the order"))
            }
            Err(status) => {
                let message = format!("station {station}: {:?}: {}", status.code(), status.message());
                match classify(status.code()) {
                    Verdict::Transient => Delivery::Retry(message),
                    Verdict::Definitive => Delivery::Fail(message),
                }
            }
        }
    }
}

/// The audit row of a dispatch.
fn dispatched_audit(order: &Order) -> AuditEntry {
    AuditEntry {
        action: "dispatch",
        subject: order.card_serial.clone(),
        outcome: "dispatched".into(),
        detail: format!("order {} sent to station {}", order.order_id, order.station_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_read_back_as_stored_and_unknown_ones_are_errors() {
        for topic in Topic::ALL {
            assert_eq!(topic.as_str().parse::<Topic>(), Ok(topic));
        }
        assert_eq!("register_card".parse::<Topic>(), Ok(Topic::RegisterCard), "the string rows hold today");
        assert_eq!("dispatch".parse::<Topic>(), Err(UnknownTopic("dispatch".into())));
    }

    #[test]
    fn s4_registry_refusals_are_final_and_outages_are_retried() {
        for code in [Code::PermissionDenied, Code::FailedPrecondition, Code::AlreadyExists, Code::InvalidArgument] {
            assert_eq!(classify(code), Verdict::Definitive, "{code:?}");
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Unknown, Code::Internal, Code::ResourceExhausted]
        {
            assert_eq!(classify(code), Verdict::Transient, "{code:?}");
        }
    }
}
