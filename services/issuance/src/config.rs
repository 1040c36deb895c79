//! `IssuanceConfig`: the common sections plus `[production]`.
use serde::Deserialize;
use yidi_bureau::BureauConfig;
use yidi_domain::{Bureau, Directory, Role};
use yidi_outbox::OutboxConfig;
use yidi_runtime::config::ConfigError;

/// Upper bound on `production.delay_ms` (one hour).
const MAX_INTERVAL_MS: u64 = 3_600_000;

yidi_bureau::bureau_config! {
    pub struct IssuanceConfig {
        #[serde(default)]
        pub production: ProductionConfig,
        /// `[outbox]`: how card registrations are delivered to the registry.
        #[serde(default)]
        pub outbox: OutboxConfig,
    }
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
        self.sections().validate()?;
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
