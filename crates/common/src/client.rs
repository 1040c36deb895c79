//! Channels to other bureaus. Connections are lazy: a bureau that is down fails the calls made to
//! it (with UNAVAILABLE, retried by the caller), never the start of the service that calls it.
//! Every call through them has a client span and carries the trace context (`rpc_telemetry`).
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tower::Layer;

use crate::rpc_telemetry::{RpcTelemetry, RpcTelemetryLayer};

/// Per-call deadline towards another bureau.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to another bureau, as every generated client takes it (`IntakeClient<PeerChannel>`).
pub type PeerChannel = RpcTelemetry<Channel>;

pub fn channel(endpoint: &str) -> Result<PeerChannel, tonic::transport::Error> {
    let channel = Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(RpcTelemetryLayer::client().layer(channel))
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
