//! Channels to other bureaus. Connections are lazy: a bureau that is down fails the calls made to
//! it (with UNAVAILABLE, retried by the caller), never the start of the service that calls it.
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Per-call deadline towards another bureau.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}
