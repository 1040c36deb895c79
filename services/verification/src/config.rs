//! `VerificationConfig`: the common sections plus `[signing]`, `[register]`, `[biometrics]` and
//! `[verification]`.
use std::path::PathBuf;
use yidi_bureau::BureauConfig;

use serde::Deserialize;
use yidi_runtime::{
    config::ConfigError,
    signing::{KeyFileConfig, KeySources},
};

yidi_bureau::bureau_config! {
    pub struct VerificationConfig {
        pub signing: SigningConfig,
        #[serde(default)]
        pub register: RegisterConfig,
        #[serde(default)]
        pub biometrics: BiometricsConfig,
        #[serde(default)]
        pub verification: OpenMarksConfig,
    }
}

/// `[signing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// A folder of key files `<key id>.key` (base64 of the 32-byte Ed25519 seed), re-read while
    /// running: a new key is put in place by adding its file.
    #[serde(default)]
    pub key_dir: Option<PathBuf>,
    /// `[[signing.keys]]`: key files, each with the directory key id it stands for.
    #[serde(default)]
    pub keys: Vec<KeyFileConfig>,
    /// A decision expires this many seconds after it is issued.
    #[serde(default = "default_decision_ttl_seconds")]
    pub decision_ttl_seconds: u64,
}

fn default_decision_ttl_seconds() -> u64 {
    604_800
}

impl SigningConfig {
    pub fn sources(&self) -> KeySources {
        KeySources { key_dir: self.key_dir.clone(), keys: self.keys.clone() }
    }
}

/// `[register]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// A population JSON file imported at start (citizens of this bureau not yet registered).
    #[serde(default)]
    pub import_path: Option<PathBuf>,
}

/// `[biometrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BiometricsConfig {
    pub face_threshold: f32,
    pub fingerprint_threshold: f32,
}

impl Default for BiometricsConfig {
    fn default() -> Self {
        Self { face_threshold: 0.90, fingerprint_threshold: 0.95 }
    }
}

/// `[verification]`: K5, open applications whose close never came.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenMarksConfig {
    /// An application held open this many seconds after its approval is asked about at the
    /// station that lodged it; closed here if the station says it ended.
    pub ask_station_after_seconds: u64,
    /// How often such applications are looked for (and asked about again while they stay open).
    pub ask_station_every_seconds: u64,
}

impl Default for OpenMarksConfig {
    fn default() -> Self {
        Self { ask_station_after_seconds: 3600, ask_station_every_seconds: 300 }
    }
}

impl OpenMarksConfig {
    pub fn ask_after(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.ask_station_after_seconds).unwrap_or(i64::MAX))
    }

    pub fn every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ask_station_every_seconds)
    }
}

/// Shortest and longest wait before a station is asked (K5): a minute, a year.
const ASK_STATION_AFTER_SECONDS: std::ops::RangeInclusive<u64> = 60..=366 * 24 * 3600;

/// Longest accepted decision lifetime: one year.
const MAX_DECISION_TTL_SECONDS: u64 = 366 * 24 * 3600;

impl VerificationConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.sections().validate()?;
        self.signing.sources().validate("signing")?;
        if self.signing.decision_ttl_seconds == 0 || self.signing.decision_ttl_seconds > MAX_DECISION_TTL_SECONDS {
            return Err(ConfigError::key(
                "signing.decision_ttl_seconds",
                format!("must be between 1 and {MAX_DECISION_TTL_SECONDS}"),
            ));
        }
        if let Some(path) = &self.register.import_path
            && path.as_os_str().is_empty()
        {
            return Err(ConfigError::key("register.import_path", "must not be empty when set"));
        }
        if !ASK_STATION_AFTER_SECONDS.contains(&self.verification.ask_station_after_seconds) {
            return Err(ConfigError::key(
                "verification.ask_station_after_seconds",
                format!(
                    "must be between {} and {}",
                    ASK_STATION_AFTER_SECONDS.start(),
                    ASK_STATION_AFTER_SECONDS.end()
                ),
            ));
        }
        if !(1..=86_400).contains(&self.verification.ask_station_every_seconds) {
            return Err(ConfigError::key("verification.ask_station_every_seconds", "must be 1 to 86400"));
        }
        for (key, value) in [
            ("biometrics.face_threshold", self.biometrics.face_threshold),
            ("biometrics.fingerprint_threshold", self.biometrics.fingerprint_threshold),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(ConfigError::key(key, format!("must be in (0, 1], found {value}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<VerificationConfig, toml::de::Error> {
        toml::from_str(&format!(
            "[server]\nbureau_id = \"home-jiangxi\"\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite::memory:\"\n\
             [directory]\npath = \"d.toml\"\n[tls]\nplaintext = true\n[signing]\nkey_dir = \"k\"\n{extra}"
        ))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = config("").unwrap();
        assert_eq!(config.signing.decision_ttl_seconds, 604_800);
        assert!((config.biometrics.face_threshold - 0.90).abs() < f32::EPSILON);
        assert!((config.biometrics.fingerprint_threshold - 0.95).abs() < f32::EPSILON);
        assert!(config.register.import_path.is_none());
        assert_eq!(config.verification.ask_station_after_seconds, 3600);
        assert_eq!(config.verification.ask_station_every_seconds, 300);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_bad_threshold_names_its_key() {
        let config = config("[biometrics]\nface_threshold = 1.5\n").unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("biometrics.face_threshold"), "{error}");
    }

    #[test]
    fn k5_a_bad_wait_before_asking_the_station_names_its_key() {
        for (extra, key) in [
            ("ask_station_after_seconds = 59", "verification.ask_station_after_seconds"),
            ("ask_station_after_seconds = 40000000", "verification.ask_station_after_seconds"),
            ("ask_station_every_seconds = 0", "verification.ask_station_every_seconds"),
            ("ask_station_every_seconds = 86401", "verification.ask_station_every_seconds"),
        ] {
            let config = config(&format!("[verification]\n{extra}\n")).unwrap();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(key), "{extra}: {error}");
        }
        let shortest = config("[verification]\nask_station_after_seconds = 60\nask_station_every_seconds = 1\n");
        assert!(shortest.unwrap().validate().is_ok());
        assert!(config("[verification]\nask_station = 1\n").is_err(), "unknown keys are refused");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(config("[signing2]\nx = 1\n").is_err());
    }
}
