//! `RegistryConfig`: the common sections plus `[signing]`, `[registry]` and `[import]`.
use std::path::PathBuf;

use serde::Deserialize;
use yidi_common::{
    clock::{Clock, ClockConfig},
    config::{ConfigError, DatabaseConfig, DirectoryConfig, ServerConfig},
    idempotency::IdempotencyConfig,
    signing::{KeyFileConfig, KeySources},
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
    /// The keys CheckCard answers are signed with.
    pub signing: SigningConfig,
    #[serde(default)]
    pub registry: ChecksConfig,
    /// `[tls]`: mutual TLS files, or `plaintext = true`; neither fails start-up.
    #[serde(default)]
    pub tls: TlsConfig,
    /// `[idempotency]`: how long answers to repeated mutating calls are kept.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    #[serde(default)]
    pub import: ImportConfig,
}

/// `[signing]`: as a home bureau's, for status statements.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// A folder of key files `<key id>.key`, re-read while running.
    #[serde(default)]
    pub key_dir: Option<PathBuf>,
    /// `[[signing.keys]]`: key files with the directory key id each stands for.
    #[serde(default)]
    pub keys: Vec<KeyFileConfig>,
}

impl SigningConfig {
    pub fn sources(&self) -> KeySources {
        KeySources { key_dir: self.key_dir.clone(), keys: self.keys.clone() }
    }
}

/// `[registry]`: limits on relying parties' checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// C4: CheckCard/CheckCards misses (UNKNOWN) one caller may make in a burst, and regains per
    /// minute; beyond it, RESOURCE_EXHAUSTED.
    pub check_misses_per_minute: u32,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self { check_misses_per_minute: 60 }
    }
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
        self.signing.sources().validate("signing")?;
        if self.registry.check_misses_per_minute == 0 {
            return Err(ConfigError::key("registry.check_misses_per_minute", "must be at least 1"));
        }
        if let Some(path) = &self.import.path
            && path.as_os_str().is_empty()
        {
            return Err(ConfigError::key("import.path", "must not be empty when set"));
        }
        Ok(())
    }
}
