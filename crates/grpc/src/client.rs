//! Channels to other bureaus. Connections are lazy: a bureau that is down fails the calls made to
//! it (with UNAVAILABLE, retried by the caller), never the start of the service that calls it.
//! Every call through them has a client span and carries the trace context (`rpc_telemetry`). A
//! bureau listed at several endpoints (replicas) gets one channel over all of them, which spreads
//! the calls and fails over between them ([`crate::balance`]).
//!
//! [`Peers`] hands out the channel of a bureau as the directory in force names it, so a directory
//! reload that moves a bureau is followed by the next call; [`is_transient`] is the one answer to
//! "is this failed call worth repeating?" for every caller (outbox deliveries, the idempotency
//! layer's choice of what to store).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tonic::{
    Code,
    codegen::http::{self, HeaderValue},
    transport::{Channel, Endpoint},
};
use tower::Layer;
use yidi_domain::Bureau;
use yidi_runtime::directory::DirectoryHandle;

use crate::{
    balance::Balanced,
    rpc_telemetry::{RpcTelemetry, RpcTelemetryLayer},
    tls::Transport,
};

/// The deadline of a call to another bureau that sets none itself (`Request::set_timeout`). A call
/// that sets one keeps it, shorter or longer: the channel has no timeout of its own, so that
/// `outbox.call_timeout_ms` above this is honoured.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata key of a call's deadline (gRPC over HTTP/2).
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A channel to another bureau, as every generated client takes it (`IntakeClient<PeerChannel>`):
/// one client span per call, the default deadline, then the bureau's endpoints ([`Balanced`]).
pub type PeerChannel = RpcTelemetry<DefaultDeadline<Balanced>>;

/// Whether a call that failed with `code` may succeed if repeated later, as opposed to an answer
/// the receiver decided, which the same request meets again. Every bureau (the outbox's deliveries,
/// the issuance registrar, the idempotency layer's choice of what to store) asks this one function.
///
/// Definitive, decided by the receiver about this request:
/// - `InvalidArgument`, `OutOfRange`: the request is malformed or out of bounds; the same bytes
///   get the same answer.
/// - `NotFound`, `AlreadyExists`, `FailedPrecondition`: the receiver looked at its state and the
///   request does not apply to it (no such card; another serial holds it; a decision already used).
///   What would change that is a new request, not a repeat.
/// - `PermissionDenied`, `Unauthenticated`: the receiver's policy (the directory, the access rules)
///   refused this caller; an operator's change, not time, makes it pass.
/// - `Unimplemented`: the receiver does not serve the method (a wrong endpoint or version).
///
/// Worth retrying, as they say nothing about the request:
/// - `Unavailable`, `ResourceExhausted`: the receiver is down, starting or shedding load.
/// - `DeadlineExceeded`, `Cancelled`: no answer in time, or the call was abandoned (a shutdown on
///   either side); it may have been done, which the idempotency key makes safe to repeat.
/// - `Aborted`: a conflict with a concurrent change (a serialization failure); a repeat runs alone.
/// - `Internal`, `Unknown`: the receiver failed (its database, a bug); a repeat may meet a healthy
///   replica or a recovered database.
/// - `DataLoss`: the receiver reports corrupt data of its own, not a fault of the request; the
///   retry budget bounds it and a dead letter shows it to operators.
///
/// `Ok` is no failure: `false` (nothing to repeat).
pub fn is_transient(code: Code) -> bool {
    match code {
        Code::Ok
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => false,
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss => true,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bureau {bureau}: endpoint {endpoint:?} must start with {scheme}:// ({why})")]
    Scheme { bureau: String, endpoint: String, scheme: &'static str, why: &'static str },
    #[error("bureau {bureau}: endpoint {endpoint:?}: {source}")]
    Endpoint { bureau: String, endpoint: String, source: tonic::transport::Error },
    #[error("bureau {bureau} lists no endpoint")]
    NoEndpoint { bureau: String },
}

/// Makes the channels of one bureau to the others, as its `[tls]` section says: with mutual TLS,
/// every channel trusts only the CA, presents this bureau's certificate and expects the server to
/// prove it is the bureau the directory names (its id is the TLS name, whatever the host).
#[derive(Debug, Clone)]
pub struct Connector {
    transport: Transport,
}

impl Connector {
    pub fn new(transport: Transport) -> Self {
        Self { transport }
    }

    pub fn plaintext() -> Self {
        Self { transport: Transport::Plaintext }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// A lazy channel to `bureau`, balanced over the endpoints the directory lists for it, failing
    /// over between them ([`Balanced`]).
    pub fn channel(&self, bureau: &Bureau) -> Result<PeerChannel, ConnectError> {
        if bureau.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoint { bureau: bureau.id.clone() });
        }
        let channels = bureau
            .endpoints
            .iter()
            .map(|endpoint| Ok((endpoint.clone(), self.endpoint_channel(bureau, endpoint)?)))
            .collect::<Result<Vec<_>, ConnectError>>()?;
        Ok(RpcTelemetryLayer::client().layer(DefaultDeadline::new(Balanced::new(channels))))
    }

    /// A lazy channel to one endpoint of `bureau`.
    fn endpoint_channel(&self, bureau: &Bureau, endpoint: &str) -> Result<Channel, ConnectError> {
        let scheme = self.transport.scheme();
        if !endpoint.starts_with(&format!("{scheme}://")) {
            let why = if self.transport.is_tls() {
                "tls is configured, so every peer is called over mutual TLS"
            } else {
                "tls.plaintext is set, so peers are called without TLS"
            };
            return Err(ConnectError::Scheme { bureau: bureau.id.clone(), endpoint: endpoint.to_owned(), scheme, why });
        }
        let invalid =
            |source| ConnectError::Endpoint { bureau: bureau.id.clone(), endpoint: endpoint.to_owned(), source };
        // No `timeout` here: tonic would cap every call's own `grpc-timeout` at it.
        let mut builder = Endpoint::from_shared(endpoint.to_owned())
            .map_err(invalid)?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        if let Transport::MutualTls(files) = &self.transport {
            builder = builder.tls_config(files.client_config(&bureau.id)).map_err(invalid)?;
        }
        Ok(builder.connect_lazy())
    }
}

/// Gives a call without a deadline of its own [`DEFAULT_CALL_TIMEOUT`] (as `grpc-timeout`, which
/// the channel enforces and the peer sees); a call with one keeps it.
#[derive(Debug, Clone)]
pub struct DefaultDeadline<S> {
    inner: S,
    /// `grpc-timeout` in milliseconds (`10000m`); always valid ASCII.
    deadline: Option<HeaderValue>,
}

impl<S> DefaultDeadline<S> {
    fn new(inner: S) -> Self {
        let deadline = HeaderValue::from_str(&format!("{}m", DEFAULT_CALL_TIMEOUT.as_millis())).ok();
        Self { inner, deadline }
    }
}

impl<S, B> tower::Service<http::Request<B>> for DefaultDeadline<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !request.headers().contains_key(GRPC_TIMEOUT)
            && let Some(deadline) = &self.deadline
        {
            request.headers_mut().insert(GRPC_TIMEOUT, deadline.clone());
        }
        self.inner.call(request)
    }
}

/// Why no channel could be had for a bureau: a configuration matter, worth retrying once the
/// directory is fixed (it is re-read while the service runs).
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    #[error("not in the directory")]
    NotInDirectory,
    #[error(transparent)]
    Endpoint(#[from] ConnectError),
}

/// The channels of one bureau to the others, following the directory in force: the channel for a
/// bureau is kept while its endpoints stay the same, and replaced on the first call after a reload
/// that changed them (SIGHUP, or a change of the file), without a restart.
#[derive(Debug, Clone)]
pub struct Peers {
    directory: DirectoryHandle,
    connector: Connector,
    /// Per bureau id: its channel and the endpoints it was built for.
    channels: Arc<Mutex<HashMap<String, BuiltFor>>>,
}

/// A bureau's channel and the endpoints it was built for.
type BuiltFor = (Vec<String>, PeerChannel);

impl Peers {
    pub fn new(directory: DirectoryHandle, connector: Connector) -> Self {
        Self { directory, connector, channels: Arc::default() }
    }

    pub fn directory(&self) -> &DirectoryHandle {
        &self.directory
    }

    /// The channel to `bureau_id` at the endpoints the directory in force lists for it.
    pub fn channel(&self, bureau_id: &str) -> Result<PeerChannel, Unreachable> {
        let directory = self.directory.current();
        let bureau = directory.get(bureau_id).ok_or(Unreachable::NotInDirectory)?;
        // A poisoned lock only means another caller panicked mid-insert; the map is still valid.
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((endpoints, channel)) = channels.get(bureau_id)
            && *endpoints == bureau.endpoints
        {
            return Ok(channel.clone());
        }
        let channel = self.connector.channel(bureau)?;
        channels.insert(bureau_id.to_owned(), (bureau.endpoints.clone(), channel.clone()));
        Ok(channel)
    }
}

/// Whether the server behind `channel` answers SERVING to the standard health check (a server
/// still migrating its database answers NOT_SERVING; one not listening fails the call).
pub async fn is_serving(channel: &Channel) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let answer = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await;
    answer.is_ok_and(|answer| answer.into_inner().status == ServingStatus::Serving as i32)
}

/// Waits until the server behind `channel` is SERVING; `false` if `within` passed first.
pub async fn wait_until_serving(channel: &Channel, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if is_serving(channel).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_classified_once_as_definitive_or_worth_retrying() {
        let definitive = [
            Code::Ok,
            Code::InvalidArgument,
            Code::OutOfRange,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Unimplemented,
        ];
        let worth_retrying = [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
        ];
        for code in definitive {
            assert!(!is_transient(code), "{code:?}");
        }
        for code in worth_retrying {
            assert!(is_transient(code), "{code:?}");
        }
        // Every code of the wire (0..=16) is in exactly one list.
        for value in 0..=16 {
            let code = Code::from_i32(value);
            let listed = definitive.contains(&code) as u8 + worth_retrying.contains(&code) as u8;
            assert_eq!(listed, 1, "{code:?}");
        }
    }

    #[tokio::test]
    async fn a_call_without_a_deadline_gets_the_default_and_one_with_a_deadline_keeps_it() {
        use tower::{Service, ServiceExt};
        let echo = tower::service_fn(|request: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(request.headers().get(GRPC_TIMEOUT).cloned())
        });
        let mut service = DefaultDeadline::new(echo);
        let bare = http::Request::new(());
        let sent = service.ready().await.unwrap().call(bare).await.unwrap();
        assert_eq!(sent.unwrap(), "10000m");
        let mut bounded = http::Request::new(());
        bounded.headers_mut().insert(GRPC_TIMEOUT, HeaderValue::from_static("30S"));
        let sent = service.ready().await.unwrap().call(bounded).await.unwrap();
        assert_eq!(sent.unwrap(), "30S");
    }
}
