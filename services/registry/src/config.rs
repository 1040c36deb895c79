//! `RegistryConfig`: the common sections plus `[import]`.
use std::path::PathBuf;

use serde::Deserialize;
use yidi_common::{
    clock::{Clock, ClockConfig},
    config::{ConfigError, DatabaseConfig, DirectoryConfig, ServerConfig},
    telemetry::LogConfig,
    tls::TlsConfig,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub directory: DirectoryConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[tls]`: mutual TLS files, or `plaintext = true`; neither fails start-up.
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub import: ImportConfig,
}

/// `[import]`: cards issued before the suite ran.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportConfig {
    /// A population JSON file; every citizen's existing card is registered at start (idempotent).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl RegistryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.bureau_id.trim().is_empty() {
            return Err(ConfigError::key("server.bureau_id", "is required (the registry bureau in the directory)"));
        }
        if self.database.url.trim().is_empty() {
            return Err(ConfigError::key("database.url", "is required"));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::key("database.max_connections", "must be at least 1"));
        }
        if self.directory.path.as_os_str().is_empty() {
            return Err(ConfigError::key("directory.path", "is required"));
        }
        self.tls.validate()?;
        Clock::from_config(&self.clock).map_err(|message| ConfigError::key("clock", message))?;
        if let Some(path) = &self.import.path
            && path.as_os_str().is_empty()
        {
            return Err(ConfigError::key("import.path", "must not be empty when set"));
        }
        Ok(())
    }
}
