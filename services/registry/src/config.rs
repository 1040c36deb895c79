//! `RegistryConfig`: the common sections plus `[signing]`, `[registry]` and `[import]`.
use std::path::PathBuf;
use yidi_bureau::BureauConfig;

use serde::Deserialize;
use yidi_runtime::{config::ConfigError, signing::KeySources};

yidi_bureau::bureau_config! {
    pub struct RegistryConfig {
        /// The keys CheckCard answers are signed with.
        pub signing: SigningConfig,
        #[serde(default)]
        pub registry: ChecksConfig,
        #[serde(default)]
        pub import: ImportConfig,
    }
}

/// `[signing]`: as a home bureau's, for status statements: `key_dir` and `[[signing.keys]]`.
pub type SigningConfig = KeySources;

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
        self.sections().validate()?;
        self.signing.validate("signing")?;
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
