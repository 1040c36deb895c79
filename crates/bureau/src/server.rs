//! The gRPC server every service runs: its own service plus `grpc.health.v1.Health` and server
//! reflection in both `v1` and `v1alpha` (grpcurl 1.8 speaks only v1alpha), the `yidi.v1.Audit`
//! service over its audit log, and graceful shutdown.
//!
//! The server answers from the moment its port is bound: while the service starts (database
//! migration, imports) health says NOT_SERVING and the service's own RPCs are UNAVAILABLE, so an
//! orchestrator can tell "starting" from "dead" and no call waits in a listen backlog.
use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use sea_orm::DatabaseConnection;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tonic::{
    body::Body,
    codegen::http::{Request, Response},
    server::NamedService,
    transport::{Server, server::TcpIncoming},
};
use tower::{Service, ServiceExt};
use yidi_proto::v1::{audit_server::AuditServer, outbox_server::OutboxServer};

use yidi_audit::rpc::AuditGrpc;
use yidi_grpc::{
    error::ApiError,
    health::{HealthPhase, Phase, health_service},
    overload::{Limits, LoadShedding},
    rpc_telemetry::RpcTelemetryLayer,
    security::ServerSecurity,
    tls::Transport,
};
use yidi_idempotency::{self as idempotency, IdempotencyLayer, KeyedAnswers};
use yidi_outbox::rpc::OutboxGrpc;
use yidi_runtime::shutdown::Shutdown;

/// How long a client gets to finish the TLS handshake before its connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
pub const AUDIT_SERVICE: &str = yidi_proto::v1::audit_server::SERVICE_NAME;
pub const OUTBOX_SERVICE: &str = yidi_proto::v1::outbox_server::SERVICE_NAME;

type AuditService = AuditServer<AuditGrpc>;
type OutboxService = OutboxServer<OutboxGrpc>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a gRPC service must be to be served.
pub trait GrpcService:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
    + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A server that is listening but whose service is not ready yet.
#[must_use = "a started server answers UNAVAILABLE until `serve` is given its service"]
pub struct Starting<S> {
    service: Arc<OnceLock<S>>,
    /// The Audit service, there once the database is migrated ([`Starting::open_audit`]).
    audit: Arc<OnceLock<AuditService>>,
    /// The Outbox service, likewise ([`Starting::open_outbox`]).
    outbox: Arc<OnceLock<OutboxService>>,
    /// Replays answers to repeated mutating calls once [`Starting::open_idempotency`] gives it
    /// the database.
    idempotency: IdempotencyLayer,
    health: HealthPhase,
    shutdown: Shutdown,
    /// `None` once `serve` has taken it; dropping an unserved `Starting` stops the server.
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl<S> std::fmt::Debug for Starting<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Starting").field("phase", &self.health.get()).finish_non_exhaustive()
    }
}

/// Where a server listens.
#[derive(Debug)]
pub struct Listeners {
    /// The service port, secured as [`ServerSecurity`] says.
    pub main: TcpListener,
    /// Optional plaintext port serving only `grpc.health.v1.Health` (same health state), for
    /// probes that cannot present a client certificate (kubelet, `grpc_health_probe`).
    pub health: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(main: TcpListener) -> Self {
        Self { main, health: None }
    }
}

/// Starts serving on `listeners` at once, with health NOT_SERVING and the service answering
/// UNAVAILABLE until [`Starting::serve`] hands it over. When `shutdown` triggers, health goes
/// NOT_SERVING (health watches end after saying so), no new connection is taken, and calls in
/// flight get `grace` to finish. Every request of the main port passes `security`'s layers
/// (mutual TLS and caller identity, then access), health and reflection included, then the
/// idempotency layer (mutating calls with an `idempotency-key` only); all but health pass the load
/// shedding of `limits` first.
pub fn start<S: GrpcService>(
    listeners: impl Into<Listeners>,
    security: &ServerSecurity,
    shutdown: Shutdown,
    grace: Duration,
    limits: Limits,
) -> Result<Starting<S>, ServeError> {
    let Listeners { main: listener, health: health_listener } = listeners.into();
    let (health, health_server) = health_service(S::NAME);

    // Every port advertises exactly what it serves; the rich-error types are registered so that
    // grpcurl can decode `google.rpc.BadRequest`/`ErrorInfo` details.
    let descriptor_sets = [
        yidi_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let advertised = [S::NAME, AUDIT_SERVICE, OUTBOX_SERVICE, HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA];
    let reflection = || {
        let builder = descriptor_sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure().include_reflection_service(false), |builder, set| {
                builder.register_encoded_file_descriptor_set(set)
            });
        advertised.iter().fold(builder, |builder, name| builder.with_service_name(*name))
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let service = Arc::new(OnceLock::new());
    let audit = Arc::new(OnceLock::new());
    let outbox = Arc::new(OnceLock::new());
    let idempotency = KeyedAnswers::layer();
    let address = listener.local_addr().ok();
    tracing::info!(service = S::NAME, ?address, "listening; not serving until started");
    let drained = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.wait().await;
            health.set(Phase::Stopping);
            tracing::info!(service = S::NAME, "shutting down: draining in-flight calls");
        }
    };
    let builder = match security.transport() {
        Transport::Plaintext => Server::builder(),
        Transport::MutualTls(files) => {
            Server::builder().tls_config(files.server_config().timeout(TLS_HANDSHAKE_TIMEOUT))?
        }
    };
    let health_only = health_listener.map(|listener| {
        tracing::info!(address = ?listener.local_addr().ok(), "plaintext health-only listener");
        let health_server = health_server.clone();
        let drained = {
            let shutdown = shutdown.clone();
            async move { shutdown.wait().await }
        };
        tokio::spawn(
            Server::builder()
                .add_service(health_server)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), drained),
        )
    });
    let server = builder
        .layer(RpcTelemetryLayer::server())
        // Shedding comes after telemetry, so a refused call is still counted and traced, and
        // before security, so that under overload a refusal costs no access check (a call the
        // access check refuses gives its slot back at once). One layer for the port: every
        // connection shares its slots.
        .layer(LoadShedding::layer(limits))
        .layer(security.layers())
        .layer(idempotency.clone())
        .add_service(health_server)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(WhenReady { service: Arc::clone(&service) })
        .add_service(WhenReady { service: Arc::clone(&audit) })
        .add_service(WhenReady { service: Arc::clone(&outbox) })
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), drained);

    let task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Dropped with this task (a failed start aborts it): the health port closes too.
            let _health_only = health_only.map(AbortOnDrop);
            tokio::pin!(server);
            tokio::select! {
                result = &mut server => result?,
                () = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
                    tracing::warn!(service = S::NAME, "grace period over; dropping calls still in flight");
                }
            }
            Ok(())
        })
    };
    Ok(Starting { service, audit, outbox, idempotency, health, shutdown, task: Some(task) })
}

impl<S: GrpcService> Starting<S> {
    /// Serves `yidi.v1.Audit` over `db` (migrated: the audit log exists) from now on; until then it
    /// answers UNAVAILABLE like the service itself.
    pub fn open_audit(&self, db: DatabaseConnection) {
        // A second call keeps the first database: there is one per service.
        let _ = self.audit.set(AuditGrpc::server(db));
    }

    /// Serves `yidi.v1.Outbox` over `db` (migrated: `outbox_messages` exists) from now on; a
    /// re-queued dead letter wakes `wake` (the dispatcher's).
    pub fn open_outbox(&self, db: DatabaseConnection, wake: Arc<Notify>) {
        let _ = self.outbox.set(OutboxGrpc::server(db, wake));
    }

    /// Keeps and replays the answers to mutating calls with an `idempotency-key` in `store`
    /// (migrated: `idempotent_requests` exists) from now on.
    pub fn open_idempotency(&self, store: idempotency::Store) {
        self.idempotency.shared().open(store);
    }

    /// The health the server reports (e.g. to add a readiness check of the service's own).
    pub fn health(&self) -> HealthPhase {
        self.health.clone()
    }

    /// Hands the ready service over (health SERVING, unless shutdown has already begun) and serves
    /// until shutdown has drained.
    pub async fn serve(mut self, service: S) -> Result<(), ServeError> {
        // A second `set` cannot happen: `serve` consumes the only handle.
        let _ = self.service.set(service);
        if !self.shutdown.is_triggered() {
            self.health.set(Phase::Serving);
            tracing::info!(service = S::NAME, "serving");
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    /// Stops the server after a failed start (dropping it does the same, without waiting).
    pub async fn abandon(mut self) {
        self.health.set(Phase::Stopping);
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl<S> Drop for Starting<S> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The service slot: UNAVAILABLE until the service is ready.
struct WhenReady<S> {
    service: Arc<OnceLock<S>>,
}

impl<S> Clone for WhenReady<S> {
    fn clone(&self) -> Self {
        Self { service: Arc::clone(&self.service) }
    }
}

impl<S: NamedService> NamedService for WhenReady<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: GrpcService> Service<Request<Body>> for WhenReady<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self.service.get() {
            Some(service) => Box::pin(service.clone().oneshot(request)),
            None => {
                let status = tonic::Status::from(ApiError::Starting { service: S::NAME });
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use tonic::{Code, Status, transport::Channel};
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_types::StatusExt;
    use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient};

    use super::*;

    pub(crate) use yidi_testkit::fake::{SlowIssuance, TestService, issuance_server};

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    async fn channel(address: SocketAddr) -> Channel {
        Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap()
    }

    async fn health_of(channel: &Channel, service: &str) -> Result<ServingStatus, Status> {
        let answer = HealthClient::new(channel.clone())
            .check(HealthCheckRequest { service: service.into() })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(answer.status).unwrap())
    }

    fn get_order() -> pb::GetOrderRequest {
        pb::GetOrderRequest { order_id: "order-1".into(), ..Default::default() }
    }

    const ENOUGH: Duration = Duration::from_secs(5);

    async fn next(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> Option<i32> {
        let message = tokio::time::timeout(ENOUGH, watch.message()).await.expect("a health update in time");
        message.expect("a healthy stream").map(|answer| answer.status)
    }

    #[tokio::test]
    async fn health_is_not_serving_until_ready_serving_then_not_serving_at_shutdown() {
        let (listener, address) = listener().await;
        let (trigger, shutdown) = Shutdown::new();
        let starting =
            start::<TestService>(listener, &ServerSecurity::plaintext(), shutdown, ENOUGH, Limits::default()).unwrap();
        let channel = channel(address).await;

        // Starting: health answers, the service does not yet.
        assert_eq!(health_of(&channel, "").await.unwrap(), ServingStatus::NotServing);
        assert_eq!(health_of(&channel, "yidi.v1.Issuance").await.unwrap(), ServingStatus::NotServing);
        assert_eq!(health_of(&channel, "yidi.v1.Nothing").await.unwrap_err().code(), Code::NotFound);
        let starting_error = IssuanceClient::new(channel.clone()).get_order(get_order()).await.unwrap_err();
        assert_eq!(starting_error.code(), Code::Unavailable);
        assert_eq!(starting_error.get_error_details().error_info().unwrap().reason, "STARTING");

        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest { service: String::new() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing as i32));

        let serving = tokio::spawn(starting.serve(issuance_server(SlowIssuance::default())));
        assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving as i32));
        assert_eq!(health_of(&channel, "yidi.v1.Issuance").await.unwrap(), ServingStatus::Serving);
        let served = IssuanceClient::new(channel.clone()).get_order(get_order()).await.unwrap_err();
        assert_eq!(served.code(), Code::NotFound, "the service itself answers now");

        trigger.trigger();
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing as i32));
        assert_eq!(next(&mut watch).await, None, "the health watch ends, so it cannot hold the shutdown");
        tokio::time::timeout(ENOUGH, serving).await.expect("drained well within the grace").unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_calls_in_flight_finish_and_bounds_them_by_the_grace_period() {
        for (delay, grace, finishes) in
            [(Duration::from_millis(300), ENOUGH, true), (ENOUGH, Duration::from_millis(200), false)]
        {
            let (listener, address) = listener().await;
            let (trigger, shutdown) = Shutdown::new();
            let starting =
                start::<TestService>(listener, &ServerSecurity::plaintext(), shutdown, grace, Limits::default())
                    .unwrap();
            let serving = tokio::spawn(starting.serve(issuance_server(SlowIssuance { delay })));
            let channel = channel(address).await;
            let in_flight = tokio::spawn(async move { IssuanceClient::new(channel).get_order(get_order()).await });
            tokio::time::sleep(Duration::from_millis(100)).await;

            let began = std::time::Instant::now();
            trigger.trigger();
            tokio::time::timeout(ENOUGH, serving).await.unwrap().unwrap().unwrap();
            if finishes {
                let answer = in_flight.await.unwrap().unwrap_err();
                assert_eq!(answer.code(), Code::NotFound, "the call in flight got its answer: {answer:?}");
            } else {
                // In a process, returning from `serve` ends `main` and with it the stuck call.
                assert!(began.elapsed() < Duration::from_secs(2), "bounded by the grace: {:?}", began.elapsed());
                in_flight.abort();
            }
        }
    }

    #[tokio::test]
    async fn the_health_only_listener_answers_health_and_nothing_else() {
        let (main, _) = listener().await;
        let (health, health_address) = listener().await;
        let (trigger, shutdown) = Shutdown::new();
        let listeners = Listeners { main, health: Some(health) };
        let starting =
            start::<TestService>(listeners, &ServerSecurity::plaintext(), shutdown, ENOUGH, Limits::default()).unwrap();
        let probe = channel(health_address).await;
        assert_eq!(health_of(&probe, "").await.unwrap(), ServingStatus::NotServing);
        let serving = tokio::spawn(starting.serve(issuance_server(SlowIssuance::default())));
        let deadline = std::time::Instant::now() + ENOUGH;
        while health_of(&probe, "yidi.v1.Issuance").await.unwrap() != ServingStatus::Serving {
            assert!(std::time::Instant::now() < deadline, "the health port follows the service's health");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let not_here = IssuanceClient::new(probe.clone()).get_order(get_order()).await.unwrap_err();
        assert_eq!(not_here.code(), Code::Unimplemented, "only health is served there: {not_here:?}");
        trigger.trigger();
        tokio::time::timeout(ENOUGH, serving).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_abandoned_start_stops_listening() {
        let (listener, address) = listener().await;
        let (_trigger, shutdown) = Shutdown::new();
        let starting =
            start::<TestService>(listener, &ServerSecurity::plaintext(), shutdown, ENOUGH, Limits::default()).unwrap();
        starting.abandon().await;
        let refused = Channel::from_shared(format!("http://{address}")).unwrap().connect().await;
        assert!(refused.is_err(), "nothing listens after a failed start");
    }

    /// The server every service runs, with one slot and no queue: while a call holds the slot, the
    /// next is refused at once with RESOURCE_EXHAUSTED (OVERLOADED), health still says SERVING,
    /// and a call whose deadline passes ends there and frees its slot.
    #[tokio::test]
    async fn the_server_sheds_beyond_its_configured_limits_and_health_still_answers() {
        use tonic::transport::Channel;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
        use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient};

        use yidi_grpc::{overload::Limits, security::ServerSecurity};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let limits = Limits { max_in_flight: 1, max_queued: 0, max_queue_wait: Duration::from_secs(1) };
        let grace = Duration::from_secs(5);
        let starting = start::<TestService>(listener, &ServerSecurity::plaintext(), shutdown, grace, limits).unwrap();
        let slow = SlowIssuance { delay: Duration::from_secs(2) };
        let serving = tokio::spawn(starting.serve(issuance_server(slow)));
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let get_order = |timeout: Option<Duration>| {
            let mut request =
                tonic::Request::new(pb::GetOrderRequest { order_id: "order-1".into(), ..Default::default() });
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            let mut client = IssuanceClient::new(channel.clone());
            async move { client.get_order(request).await }
        };

        let holder = tokio::spawn(get_order(None));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let began = std::time::Instant::now();
        let refused = get_order(None).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(began.elapsed() < Duration::from_secs(1), "refused at once, not after the slow call");
        let details = refused.get_error_details();
        assert_eq!(details.error_info().map(|info| info.reason.as_str()), Some("OVERLOADED"));
        assert!(details.retry_info().is_some());
        let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await;
        assert_eq!(health.unwrap().into_inner().status, ServingStatus::Serving as i32, "health is never shed");

        let held = holder.await.unwrap().unwrap_err();
        assert_eq!(held.code(), Code::NotFound, "the call holding the slot ran to its answer: {held:?}");
        // The slot is free again; a call that outlives its deadline ends there (tonic keeps the
        // deadline on both sides) and gives its slot back.
        let began = std::time::Instant::now();
        let expired = get_order(Some(Duration::from_millis(200))).await.unwrap_err();
        assert!(matches!(expired.code(), Code::Cancelled | Code::DeadlineExceeded), "{expired:?}");
        assert!(began.elapsed() < Duration::from_secs(1), "the deadline holds: {:?}", began.elapsed());
        let next = get_order(Some(Duration::from_millis(100))).await.unwrap_err();
        assert_ne!(next.code(), Code::ResourceExhausted, "the expired call gave its slot back: {next:?}");

        trigger.trigger();
        tokio::time::timeout(Duration::from_secs(10), serving).await.unwrap().unwrap().unwrap();
    }
}
