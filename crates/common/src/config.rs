//! Layered configuration: defaults (serde) → one TOML file → environment (`YIDI__SECTION__KEY`).
//!
//! The file is `--config <path>` on the command line, else `$YIDI_CONFIG`, else
//! `deploy/config/<service>.toml` if it exists. Every key is documented in `deploy/config/README.md`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, de::DeserializeOwned};

use crate::{clock::ClockConfig, overload::Limits, telemetry::LogConfig, tls::TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File { path: PathBuf, source: Box<config::ConfigError> },
    #[error("configuration: {0}")]
    Invalid(Box<config::ConfigError>),
    #[error("configuration key {key}: {message}")]
    Key { key: &'static str, message: String },
}

impl From<config::ConfigError> for ConfigError {
    fn from(error: config::ConfigError) -> Self {
        Self::Invalid(Box::new(error))
    }
}

impl ConfigError {
    pub fn key(key: &'static str, message: impl Into<String>) -> Self {
        Self::Key { key, message: message.into() }
    }
}

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

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path/to/file.db?mode=rwc` or `postgres://user@host:5432/db`.
    pub url: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    8
}

/// `[directory]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The directory of bureaus (TOML), e.g. `var/demo/directory.toml`.
    pub path: PathBuf,
    /// Seconds between looks at the directory file (and signing key files) for changes; SIGHUP
    /// reloads at once.
    #[serde(default = "default_reload_seconds")]
    pub reload_seconds: u64,
}

fn default_reload_seconds() -> u64 {
    5
}

impl DirectoryConfig {
    pub fn new(path: PathBuf) -> Self {
        Self { path, reload_seconds: default_reload_seconds() }
    }

    pub fn reload_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reload_seconds.max(1))
    }
}

/// The sections every service has.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonSections {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub directory: DirectoryConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Required in effect: absent, start-up fails naming `tls` (see [`TlsConfig::validate`]).
    #[serde(default)]
    pub tls: TlsConfig,
}

/// The configuration file named on the command line or in `$YIDI_CONFIG`, if any.
fn explicit_path() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("YIDI_CONFIG").map(PathBuf::from)
}

/// Loads `T` for `service` from the layers described in the module documentation.
pub fn load<T: DeserializeOwned>(service: &str) -> Result<T, ConfigError> {
    let (path, required) = match explicit_path() {
        Some(path) => (path, true),
        None => (PathBuf::from(format!("deploy/config/{service}.toml")), false),
    };
    let file = config::File::from(path.as_path()).format(config::FileFormat::Toml).required(required);
    let settings = config::Config::builder()
        .add_source(file)
        .add_source(config::Environment::with_prefix("YIDI").prefix_separator("__").separator("__").try_parsing(true))
        .build()
        .map_err(|source| ConfigError::File { path: path.clone(), source: Box::new(source) })?;
    Ok(settings.try_deserialize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_names_its_key() {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(
                "[server]\nbureau_id = \"x\"\nlisten = \"not an address\"\n[database]\nurl = \"sqlite::memory:\"\n[directory]\npath = \"d.toml\"\n",
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap();
        let error = settings.try_deserialize::<CommonSections>().unwrap_err().to_string();
        assert!(error.contains("server.listen"), "{error}");
    }

    #[test]
    fn load_limits_default_and_a_zero_names_its_key() {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(
                "bureau_id = \"x\"\nlisten = \"127.0.0.1:0\"\n",
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap();
        let server = settings.try_deserialize::<ServerConfig>().unwrap();
        assert_eq!(server.limits().unwrap(), Limits::default());

        let no_slots = ServerConfig { max_in_flight: 0, ..server.clone() };
        assert!(no_slots.limits().unwrap_err().to_string().contains("server.max_in_flight"));
        let no_patience = ServerConfig { max_queue_wait_ms: 0, ..server.clone() };
        assert!(no_patience.limits().unwrap_err().to_string().contains("server.max_queue_wait_ms"));
        let no_waiting_room = ServerConfig { max_queued: 0, ..server };
        assert_eq!(no_waiting_room.limits().unwrap().max_queued, 0, "refusing whatever finds every slot busy");
    }
}
