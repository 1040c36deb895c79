//! `grpc.health.v1.Health` for one service: NOT_SERVING while the service starts (its database is
//! being migrated), SERVING once it is ready, NOT_SERVING again from the moment shutdown begins.
//!
//! Our own implementation rather than `tonic_health`'s reporter: its `Watch` streams never end, so
//! a load balancer or `grpcurl` watching health would hold every graceful shutdown until the grace
//! period runs out. Here a `Watch` stream sends the final NOT_SERVING and then ends.
use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
};

use futures::StreamExt;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{Health, HealthServer},
};

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listening, but its database is not migrated yet: NOT_SERVING.
    Starting,
    /// SERVING.
    Serving,
    /// Serving, but cannot answer now (a registry replica behind its log): NOT_SERVING until it
    /// can, without ending `Watch` streams.
    Behind,
    /// Shutting down: NOT_SERVING, and `Watch` streams end after saying so.
    Stopping,
}

impl Phase {
    fn serving_status(self) -> ServingStatus {
        match self {
            Self::Serving => ServingStatus::Serving,
            Self::Starting | Self::Behind | Self::Stopping => ServingStatus::NotServing,
        }
    }
}

/// Whether a serving service can answer right now (asked by every `Check`).
type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Sets the phase the health service reports.
#[derive(Clone)]
pub struct HealthPhase {
    sender: watch::Sender<Phase>,
    ready: Arc<OnceLock<ReadyCheck>>,
}

impl std::fmt::Debug for HealthPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthPhase").field("phase", &self.get()).finish_non_exhaustive()
    }
}

impl HealthPhase {
    pub fn set(&self, phase: Phase) {
        self.sender.send_replace(phase);
    }

    /// Serving ↔ behind, for `Watch` streams; never once stopping (nor before serving).
    pub fn set_behind(&self, behind: bool) {
        self.sender.send_if_modified(|phase| match (*phase, behind) {
            (Phase::Serving, true) => {
                *phase = Phase::Behind;
                true
            }
            (Phase::Behind, false) => {
                *phase = Phase::Serving;
                true
            }
            _ => false,
        });
    }

    /// While serving, `Check` also asks `ready` and says NOT_SERVING when it is false (a registry
    /// replica behind its log). Asked at each call, so the answer is never older than the call;
    /// `Watch` streams follow the phase only ([`Self::set_behind`]). The first check set stays.
    pub fn set_ready_check(&self, ready: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.ready.set(Arc::new(ready));
    }

    pub fn get(&self) -> Phase {
        *self.sender.borrow()
    }
}

/// The health service for the service named `service_name`; "" (the whole server) reports the same.
pub fn health_service(service_name: &'static str) -> (HealthPhase, HealthServer<ServiceHealth>) {
    let (sender, receiver) = watch::channel(Phase::Starting);
    let ready = Arc::new(OnceLock::new());
    let health = ServiceHealth { service_name, receiver, ready: Arc::clone(&ready) };
    (HealthPhase { sender, ready }, HealthServer::new(health))
}

pub struct ServiceHealth {
    service_name: &'static str,
    receiver: watch::Receiver<Phase>,
    ready: Arc<OnceLock<ReadyCheck>>,
}

impl std::fmt::Debug for ServiceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealth").field("service_name", &self.service_name).finish_non_exhaustive()
    }
}

impl ServiceHealth {
    fn knows(&self, service: &str) -> bool {
        service.is_empty() || service == self.service_name
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: status.into() }
}

#[tonic::async_trait]
impl Health for ServiceHealth {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !self.knows(&service) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let phase = *self.receiver.borrow();
        // The readiness check, when there is one, is exact at the call; the phase may be a tick late.
        let status = match (phase, self.ready.get()) {
            (Phase::Serving | Phase::Behind, Some(ready)) if ready() => ServingStatus::Serving,
            (Phase::Serving | Phase::Behind, Some(_)) => ServingStatus::NotServing,
            (phase, _) => phase.serving_status(),
        };
        Ok(Response::new(answer(status)))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let mut receiver = self.receiver.clone();
        // The protocol: an unknown service is answered SERVICE_UNKNOWN on the stream, not with an
        // error; that stream too ends when the server stops.
        if !self.knows(&service) {
            let until_stopping = futures::stream::once(async move {
                let _ = receiver.wait_for(|phase| *phase == Phase::Stopping).await;
            })
            .filter_map(|()| async { None });
            let stream =
                futures::stream::once(async { Ok(answer(ServingStatus::ServiceUnknown)) }).chain(until_stopping);
            return Ok(Response::new(Box::pin(stream)));
        }
        // The current status first, then one answer per change; after Stopping's NOT_SERVING, the end.
        let stream =
            futures::stream::unfold((receiver, None), |(mut receiver, last_sent): (_, Option<Phase>)| async move {
                let phase = match last_sent {
                    Some(Phase::Stopping) => return None,
                    None => *receiver.borrow_and_update(),
                    Some(previous) => {
                        let sent = previous.serving_status();
                        *receiver
                            .wait_for(|phase| phase.serving_status() != sent || *phase == Phase::Stopping)
                            .await
                            .ok()?
                    }
                };
                Some((Ok(answer(phase.serving_status())), (receiver, Some(phase))))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_is_not_serving_and_never_undoes_a_start_or_a_stop() {
        let (phase, _server) = health_service("yidi.v1.LossRegistry");
        phase.set_behind(true);
        assert_eq!(phase.get(), Phase::Starting, "not before serving");
        phase.set(Phase::Serving);
        phase.set_behind(true);
        assert_eq!(phase.get(), Phase::Behind);
        assert_eq!(Phase::Behind.serving_status(), ServingStatus::NotServing);
        phase.set_behind(false);
        assert_eq!(phase.get(), Phase::Serving);
        phase.set(Phase::Stopping);
        phase.set_behind(true);
        phase.set_behind(false);
        assert_eq!(phase.get(), Phase::Stopping, "a stop stays a stop");
    }
}
