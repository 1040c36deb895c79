//! Layered configuration: defaults (serde) → one TOML file → environment (`YIDI__SECTION__KEY`).
//!
//! The file is `--config <path>` on the command line, else `$YIDI_CONFIG`, else
//! `deploy/config/<service>.toml` if it exists. Every key is documented in `deploy/config/README.md`.
use std::path::PathBuf;

use serde::{Deserialize, de::DeserializeOwned};

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
