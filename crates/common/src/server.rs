//! The gRPC server every service runs: its own service plus `grpc.health.v1.Health` and server
//! reflection in both `v1` and `v1alpha` (grpcurl 1.8 speaks only v1alpha), with graceful shutdown.
use std::{convert::Infallible, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    body::Body,
    codegen::http::{Request, Response},
    server::NamedService,
    transport::Server,
};
use tower::Service;

use crate::shutdown::Shutdown;

pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` on `listener` until `shutdown` triggers. Health answers SERVING while up and
/// NOT_SERVING from the moment shutdown begins; in-flight calls then get `grace` to finish.
pub async fn serve<S>(listener: TcpListener, service: S, shutdown: Shutdown, grace: Duration) -> Result<(), ServeError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<S>().await;

    // Every port advertises exactly what it serves; the rich-error types are registered so that
    // grpcurl can decode `google.rpc.BadRequest`/`ErrorInfo` details.
    let descriptor_sets = [
        yidi_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let advertised = [S::NAME, HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA];
    let reflection = || {
        let builder = descriptor_sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure().include_reflection_service(false), |builder, set| {
                builder.register_encoded_file_descriptor_set(set)
            });
        advertised.iter().fold(builder, |builder, name| builder.with_service_name(*name))
    };

    let address = listener.local_addr().ok();
    tracing::info!(service = S::NAME, ?address, "serving");
    let drained = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.wait().await;
            health.set_not_serving::<S>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            tracing::info!(service = S::NAME, "shutting down: draining in-flight calls");
        }
    };
    let server = Server::builder()
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drained);

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(service = S::NAME, "grace period over; dropping calls still in flight");
        }
    }
    Ok(())
}
