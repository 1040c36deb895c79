//! Channels to other bureaus. Connections are lazy: a bureau that is down fails the calls made to
//! it (with UNAVAILABLE, retried by the caller), never the start of the service that calls it.
//! Every call through them has a client span and carries the trace context (`rpc_telemetry`).
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tower::Layer;
use yidi_domain::Bureau;

use crate::{
    rpc_telemetry::{RpcTelemetry, RpcTelemetryLayer},
    tls::Transport,
};

/// Per-call deadline towards another bureau.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to another bureau, as every generated client takes it (`IntakeClient<PeerChannel>`).
pub type PeerChannel = RpcTelemetry<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bureau {bureau}: endpoint {endpoint:?} must start with {scheme}:// ({why})")]
    Scheme { bureau: String, endpoint: String, scheme: &'static str, why: &'static str },
    #[error("bureau {bureau}: endpoint {endpoint:?}: {source}")]
    Endpoint { bureau: String, endpoint: String, source: tonic::transport::Error },
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

    /// A lazy channel to `bureau` at its directory endpoint.
    pub fn channel(&self, bureau: &Bureau) -> Result<PeerChannel, ConnectError> {
        let endpoint = &bureau.endpoint;
        let scheme = self.transport.scheme();
        if !endpoint.starts_with(&format!("{scheme}://")) {
            let why = if self.transport.is_tls() {
                "tls is configured, so every peer is called over mutual TLS"
            } else {
                "tls.plaintext is set, so peers are called without TLS"
            };
            return Err(ConnectError::Scheme { bureau: bureau.id.clone(), endpoint: endpoint.clone(), scheme, why });
        }
        let invalid = |source| ConnectError::Endpoint { bureau: bureau.id.clone(), endpoint: endpoint.clone(), source };
        let mut builder = Endpoint::from_shared(endpoint.clone())
            .map_err(invalid)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true);
        if let Transport::MutualTls(files) = &self.transport {
            builder = builder.tls_config(files.client_config(&bureau.id)).map_err(invalid)?;
        }
        Ok(RpcTelemetryLayer::client().layer(builder.connect_lazy()))
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
