//! `[server]`: where a bureau listens and how much load it takes.
use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use yidi_runtime::config::ConfigError;

use crate::overload::Limits;

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// This bureau's id in the directory.
    pub bureau_id: String,
    /// Address to listen on, e.g. `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// Seconds in-flight requests get to finish after a shutdown signal.
    #[serde(default = "default_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// Optional plaintext address serving only `grpc.health.v1.Health`, for probes that cannot
    /// present a client certificate (kubelet, `grpc_health_probe`), e.g. `0.0.0.0:8081`.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Calls served at once; more wait in the queue (health checks are never counted).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Calls waiting for a slot; beyond that, RESOURCE_EXHAUSTED. 0: no waiting.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// The longest a call waits for a slot before UNAVAILABLE (less if its deadline is nearer).
    #[serde(default = "default_max_queue_wait_ms")]
    pub max_queue_wait_ms: u64,
}

fn default_grace_seconds() -> u64 {
    10
}

fn default_max_in_flight() -> usize {
    Limits::default().max_in_flight
}

fn default_max_queued() -> usize {
    Limits::default().max_queued
}

fn default_max_queue_wait_ms() -> u64 {
    u64::try_from(Limits::default().max_queue_wait.as_millis()).unwrap_or(u64::MAX)
}

/// Beyond this many slots a semaphore cannot be built; far beyond any sensible limit anyway.
const MOST_IN_FLIGHT: usize = tokio::sync::Semaphore::MAX_PERMITS;

impl ServerConfig {
    /// `bureau_id` listening on `listen`, everything else at its default.
    pub fn new(bureau_id: impl Into<String>, listen: SocketAddr) -> Self {
        Self {
            bureau_id: bureau_id.into(),
            listen,
            shutdown_grace_seconds: default_grace_seconds(),
            health_listen: None,
            max_in_flight: default_max_in_flight(),
            max_queued: default_max_queued(),
            max_queue_wait_ms: default_max_queue_wait_ms(),
        }
    }

    /// The load-shedding limits, checked.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        if self.max_in_flight == 0 || self.max_in_flight > MOST_IN_FLIGHT {
            return Err(ConfigError::key(
                "server.max_in_flight",
                format!("must be between 1 and {MOST_IN_FLIGHT}, found {}", self.max_in_flight),
            ));
        }
        if self.max_queue_wait_ms == 0 {
            return Err(ConfigError::key("server.max_queue_wait_ms", "must be at least 1"));
        }
        Ok(Limits {
            max_in_flight: self.max_in_flight,
            max_queued: self.max_queued,
            max_queue_wait: Duration::from_millis(self.max_queue_wait_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_limits_default_and_a_zero_names_its_key() {
        let server: ServerConfig = toml::from_str("bureau_id = \"x\"\nlisten = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(server.limits().unwrap(), Limits::default());

        let no_slots = ServerConfig { max_in_flight: 0, ..server.clone() };
        assert!(no_slots.limits().unwrap_err().to_string().contains("server.max_in_flight"));
        let no_patience = ServerConfig { max_queue_wait_ms: 0, ..server.clone() };
        assert!(no_patience.limits().unwrap_err().to_string().contains("server.max_queue_wait_ms"));
        let no_waiting_room = ServerConfig { max_queued: 0, ..server };
        assert_eq!(no_waiting_room.limits().unwrap().max_queued, 0, "refusing whatever finds every slot busy");
    }
}
