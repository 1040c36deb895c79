//! `IntakeConfig`: the common sections plus `[station]`, `[policy]`, `[worker]`, `[outbox]`,
//! `[biometrics]`.
use serde::Deserialize;
use yidi_bureau::BureauConfig;
use yidi_domain::PolicyTimeline;
use yidi_outbox::OutboxConfig;
use yidi_runtime::config::ConfigError;

yidi_bureau::bureau_config! {
    pub struct IntakeConfig {
        pub station: StationConfig,
        #[serde(default)]
        pub policy: PolicyTimeline,
        #[serde(default)]
        pub worker: WorkerConfig,
        /// `[outbox]`: how the station's messages to the other bureaus are delivered.
        #[serde(default)]
        pub outbox: OutboxConfig,
        #[serde(default)]
        pub biometrics: BiometricsConfig,
    }
}

/// `[station]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationConfig {
    /// The producer this station entrusts; an issuance bureau in the directory.
    pub producer_id: String,
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// How long SubmitApplication / ReportLoss wait for the home bureau's answer.
    pub respond_within_ms: u64,
    /// How long after ordering a card the station first asks the producer about the order
    /// (GetOrder), then every 15 to 30 s. The producer tells the station when it dispatches the
    /// card (NotifyOrderDispatched), so this poll only covers a notice that was lost.
    pub order_poll_after_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { respond_within_ms: 5000, order_poll_after_ms: 30_000 }
    }
}

/// `[biometrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BiometricsConfig {
    /// Face match threshold at collection (C3).
    pub face_threshold: f32,
}

impl Default for BiometricsConfig {
    fn default() -> Self {
        Self { face_threshold: 0.90 }
    }
}

impl IntakeConfig {
    /// Checks the values that need no directory; `serve` checks the directory-dependent ones.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.sections().validate()?;
        if self.station.producer_id.trim().is_empty() {
            return Err(ConfigError::key("station.producer_id", "must name the entrusted producer"));
        }
        self.policy.validate().map_err(|message| ConfigError::key("policy", message))?;
        self.outbox.validate()?;
        if self.worker.respond_within_ms > 60_000 {
            return Err(ConfigError::key("worker.respond_within_ms", "must be at most 60000"));
        }
        if self.worker.order_poll_after_ms > 3_600_000 {
            return Err(ConfigError::key("worker.order_poll_after_ms", "must be at most 3600000"));
        }
        let threshold = self.biometrics.face_threshold;
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(ConfigError::key("biometrics.face_threshold", "must be in (0, 1]"));
        }
        Ok(())
    }
}
