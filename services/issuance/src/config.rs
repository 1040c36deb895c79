//! `IssuanceConfig`: the common sections plus `[production]`.
use serde::Deserialize;
use yidi_common::{
    clock::{Clock, ClockConfig},
    config::{ConfigError, DatabaseConfig, DirectoryConfig, ServerConfig},
    idempotency::IdempotencyConfig,
    outbox::OutboxConfig,
    telemetry::LogConfig,
    tls::TlsConfig,
};
use yidi_domain::{Bureau, Directory, Role};

/// Upper bound on `production.delay_ms` (one hour).
const MAX_INTERVAL_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceConfig {
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
    /// `[idempotency]`: how long answers to repeated mutating calls are kept.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    #[serde(default)]
    pub production: ProductionConfig,
    /// `[outbox]`: how card registrations are delivered to the registry.
    #[serde(default)]
    pub outbox: OutboxConfig,
}

/// `[production]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProductionConfig {
    /// Simulated time to make a card, after which it is registered.
    pub delay_ms: u64,
    /// Two upper-case letters; card serials are `{prefix}{10 digits}`.
    pub serial_prefix: String,
}

impl Default for ProductionConfig {
    fn default() -> Self {
        Self { delay_ms: 500, serial_prefix: "ZJ".into() }
    }
}

impl IssuanceConfig {
    /// Checks the values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.bureau_id.trim().is_empty() {
            return Err(ConfigError::key("server.bureau_id", "is required"));
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
        let prefix = &self.production.serial_prefix;
        if prefix.len() != 2 || !prefix.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(ConfigError::key(
                "production.serial_prefix",
                format!("must be two upper-case letters (A-Z), found {prefix:?}"),
            ));
        }
        if self.production.delay_ms > MAX_INTERVAL_MS {
            return Err(ConfigError::key("production.delay_ms", format!("must be at most {MAX_INTERVAL_MS}")));
        }
        self.outbox.validate()
    }

    /// The registry the cards are registered with: the directory must list exactly one.
    pub fn registry<'d>(&self, directory: &'d Directory) -> Result<&'d Bureau, ConfigError> {
        let registries: Vec<&Bureau> = directory.with_role(Role::Registry).collect();
        match registries.as_slice() {
            [registry] => Ok(registry),
            [] => Err(ConfigError::key(
                "directory.path",
                format!(
                    "{} lists no bureau with role registry; exactly one is required",
                    self.directory.path.display()
                ),
            )),
            many => Err(ConfigError::key(
                "directory.path",
                format!(
                    "{} lists {} bureaus with role registry; exactly one is required",
                    self.directory.path.display(),
                    many.len()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<IssuanceConfig, toml::de::Error> {
        let text = format!(
            "[server]\nbureau_id = \"producer-zhejiang\"\nlisten = \"127.0.0.1:0\"\n\
             [database]\nurl = \"sqlite::memory:\"\n[directory]\npath = \"d.toml\"\n[tls]\nplaintext = true\n{extra}"
        );
        toml::from_str(&text)
    }

    #[test]
    fn c2_production_defaults_are_documented_values() {
        let config = config("").unwrap();
        assert_eq!(config.production.delay_ms, 500);
        assert_eq!(config.production.serial_prefix, "ZJ");
        assert!(config.validate().is_ok());
    }

    #[test]
    fn c2_a_bad_serial_prefix_names_its_key() {
        for prefix in ["zj", "Z", "ZJK", "Z1"] {
            let config = config(&format!("[production]\nserial_prefix = \"{prefix}\"\n")).unwrap();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("production.serial_prefix"), "{prefix}: {error}");
        }
    }

    #[test]
    fn c2_a_zero_retry_budget_and_unknown_keys_are_refused() {
        let config = config("[outbox]\nmax_attempts = 0\n").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("outbox.max_attempts"));
        assert!(self::config("[production]\nspeed = 3\n").is_err());
    }
}
