//! The production worker: once an order's production time has passed, registers the card with
//! the registry (presenting the stored signed decision verbatim), then dispatches it.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use prost::Message;
use tokio::time::Instant;
use tonic::Code;
use tracing::Instrument;
use uuid::Uuid;
use yidi_common::{Shutdown, audit::AuditEntry, client::PeerChannel};
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};

use crate::{
    repo::{Attempt, Order, OrderState},
    service::IssuanceService,
};

/// What became of one attempt at moving an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Nothing more to do for this order (dispatched, refused, or gone).
    Done,
    /// Try again after the retry interval.
    RetryLater,
    /// Shutting down.
    Stop,
}

/// How the worker treats a registry's answer (a `Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The registry refused the card; retrying cannot change that.
    Definitive,
    /// Transport problem or a registry that is down or overloaded: retry.
    Transient,
}

/// Definitive: the registry judged the request (PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS
/// for a different serial, INVALID_ARGUMENT). Everything else may pass on a later attempt.
pub fn classify(code: Code) -> Verdict {
    match code {
        Code::PermissionDenied | Code::FailedPrecondition | Code::AlreadyExists | Code::InvalidArgument => {
            Verdict::Definitive
        }
        _ => Verdict::Transient,
    }
}

pub struct Worker {
    service: Arc<IssuanceService>,
    client: LossRegistryClient<PeerChannel>,
    registry_id: String,
    retry_interval: Duration,
    shutdown: Shutdown,
}

impl Worker {
    pub fn new(
        service: Arc<IssuanceService>,
        channel: PeerChannel,
        registry_id: String,
        retry_interval: Duration,
        shutdown: Shutdown,
    ) -> Self {
        Self { service, client: LossRegistryClient::new(channel), registry_id, retry_interval, shutdown }
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        let wake = self.service.wake();
        // When each pending order is next due, in real (tokio) time.
        let mut schedule: HashMap<Uuid, Instant> = HashMap::new();
        loop {
            if self.shutdown.is_triggered() {
                break;
            }
            match self.service.repo().pending().await {
                Ok(pending) => {
                    let live: HashSet<Uuid> = pending.iter().map(|o| o.order_id).collect();
                    schedule.retain(|id, _| live.contains(id));
                    for order in &pending {
                        schedule.entry(order.order_id).or_insert_with(|| self.first_due(order));
                    }
                }
                Err(error) => tracing::warn!(%error, "production worker: cannot read pending orders"),
            }
            let now = Instant::now();
            let mut due: Vec<(Uuid, Instant)> =
                schedule.iter().filter(|(_, at)| **at <= now).map(|(id, at)| (*id, *at)).collect();
            due.sort_by_key(|(_, at)| *at);
            for (order_id, _) in due {
                match self.advance(order_id).await {
                    Next::Done => {
                        schedule.remove(&order_id);
                    }
                    Next::RetryLater => {
                        schedule.insert(order_id, Instant::now() + self.retry_interval);
                    }
                    Next::Stop => return,
                }
            }
            let timer = Instant::now() + self.retry_interval;
            let next = schedule.values().copied().min().map_or(timer, |at| at.min(timer));
            tokio::select! {
                () = self.shutdown.wait() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep_until(next) => {}
            }
        }
        tracing::info!("production worker stopped");
    }

    /// When an order first becomes due: the production time left by the clock (at most the
    /// configured delay, so a fixed or shifted clock cannot stall it), from now in real time.
    fn first_due(&self, order: &Order) -> Instant {
        let left = (order.ready_at - self.service.clock().now()).to_std().unwrap_or(Duration::ZERO);
        Instant::now() + left.min(self.service.delay())
    }

    async fn advance(&mut self, order_id: Uuid) -> Next {
        let order = match self.service.repo().find(order_id).await {
            Ok(Some(order)) => order,
            Ok(None) => return Next::Done,
            Err(error) => {
                tracing::warn!(%order_id, %error, "production worker: cannot read order");
                return Next::RetryLater;
            }
        };
        // The work continues the trace of the PlaceOrder request (and so of the application).
        let span = tracing::info_span!("order_step", order_id = %order.order_id, state = order.state.as_str());
        yidi_common::telemetry::continue_trace(&span, order.trace_context.as_deref());
        match order.state {
            OrderState::InProduction if order.retry_stopped => Next::Done,
            OrderState::InProduction => self.register(order).instrument(span).await,
            OrderState::Registered => self.dispatch(order).instrument(span).await,
            OrderState::Dispatched => Next::Done,
        }
    }

    async fn register(&mut self, order: Order) -> Next {
        let stored = match self.service.repo().signed_decision(order.order_id).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Next::Done,
            Err(error) => {
                tracing::warn!(order_id = %order.order_id, %error, "production worker: cannot read decision");
                return Next::RetryLater;
            }
        };
        let decision = match pb::SignedDecision::decode(stored.as_slice()) {
            Ok(decision) => decision,
            Err(error) => {
                return self
                    .failed(&order, Verdict::Definitive, format!("stored decision cannot be decoded: {error}"))
                    .await;
            }
        };
        let request = pb::RegisterCardRequest {
            decision: Some(decision),
            producer_id: self.service.bureau_id().to_owned(),
            card_serial: order.card_serial.clone(),
        };
        let shutdown = self.shutdown.clone();
        let answer = tokio::select! {
            () = shutdown.wait() => return Next::Stop,
            answer = self.client.register_card(request) => answer,
        };
        match answer {
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
                let now = self.service.clock().now();
                let audit = AuditEntry {
                    action: "register_card",
                    subject: order.card_serial.clone(),
                    outcome: "registered".into(),
                    detail: format!(
                        "order {} registered with {}; revoked {} older card(s)",
                        order.order_id,
                        self.registry_id,
                        response.revoked_card_serials.len()
                    ),
                };
                let transition = self
                    .service
                    .repo()
                    .transition(order.order_id, OrderState::InProduction, OrderState::Registered, now, audit)
                    .await;
                match transition {
                    Ok(Some(registered)) => {
                        tracing::info!(order_id = %order.order_id, card_serial = %order.card_serial, "card registered");
                        self.service.publish(&registered);
                        self.dispatch(registered).await
                    }
                    Ok(None) => Next::Done,
                    Err(error) => {
                        tracing::warn!(order_id = %order.order_id, %error, "cannot record registration; will retry");
                        Next::RetryLater
                    }
                }
            }
            Err(status) => {
                let message = format!("registry {}: {:?}: {}", self.registry_id, status.code(), status.message());
                self.failed(&order, classify(status.code()), message).await
            }
        }
    }

    async fn failed(&self, order: &Order, verdict: Verdict, message: String) -> Next {
        let now = self.service.clock().now();
        let (attempt, audit, next) = match verdict {
            Verdict::Transient => {
                tracing::warn!(order_id = %order.order_id, error = %message, "registration failed; will retry");
                (Attempt::Retry(message), None, Next::RetryLater)
            }
            Verdict::Definitive => {
                tracing::warn!(order_id = %order.order_id, error = %message, "registration refused; not retrying");
                let audit = AuditEntry {
                    action: "register_card",
                    subject: order.card_serial.clone(),
                    outcome: "refused_by_registry".into(),
                    detail: format!("order {}: {message}", order.order_id),
                };
                (Attempt::Refused(message), Some(audit), Next::Done)
            }
        };
        match self.service.repo().record_attempt(order.order_id, attempt, now, audit).await {
            Ok(Some(updated)) => {
                self.service.publish(&updated);
                next
            }
            Ok(None) => Next::Done,
            Err(error) => {
                tracing::warn!(order_id = %order.order_id, %error, "cannot record the failed attempt");
                Next::RetryLater
            }
        }
    }

    async fn dispatch(&self, order: Order) -> Next {
        let now = self.service.clock().now();
        let audit = AuditEntry {
            action: "dispatch",
            subject: order.card_serial.clone(),
            outcome: "dispatched".into(),
            detail: format!("order {} sent to station {}", order.order_id, order.station_id),
        };
        match self
            .service
            .repo()
            .transition(order.order_id, OrderState::Registered, OrderState::Dispatched, now, audit)
            .await
        {
            Ok(Some(dispatched)) => {
                tracing::info!(order_id = %order.order_id, card_serial = %order.card_serial, "card dispatched");
                self.service.publish(&dispatched);
                Next::Done
            }
            Ok(None) => Next::Done,
            Err(error) => {
                tracing::warn!(order_id = %order.order_id, %error, "cannot record dispatch; will retry");
                Next::RetryLater
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
