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

/// `[registry]`: limits on relying parties' checks, and how this replica stands among the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// C4: CheckCard/CheckCards misses (UNKNOWN) one caller may make in a burst, and regains per
    /// minute; beyond it, RESOURCE_EXHAUSTED.
    pub check_misses_per_minute: u32,
    /// C3: days a made card may await collection; after that it is voided and can never become
    /// valid (the holder applies again).
    pub collection_deadline_days: u32,
    /// C3: how often cards past the collection deadline are looked for and voided.
    pub void_sweep_every_seconds: u64,
    /// C4: how long a signed status statement may be relied on (`next_update` − `answered_at`);
    /// one is served again until half of it is gone.
    pub statement_validity_seconds: u64,
    /// C4: statements held for serving again (the most recently checked cards); 0 signs every answer.
    pub statement_cache_entries: usize,
    /// S1 across replicas: a replica answers checks only within this many milliseconds after it
    /// last proved it had applied the whole log (else UNAVAILABLE `REPLICA_BEHIND`, health
    /// NOT_SERVING); a write is acknowledged at the latest this long after its commit.
    pub fence_after_ms: u64,
    /// How often a replica reads the head of the log besides the notifications (milliseconds);
    /// below half the fence bound, so a replica nothing changes for stays confirmed.
    pub feed_poll_ms: u64,
    /// This replica's id among those on the same database; empty: host, process id and start time.
    pub replica_id: String,
    /// Issue 16: how often a new status snapshot of every card is built (one is built at start).
    pub snapshot_every_seconds: u64,
    /// Issue 16: how often a status delta is signed and pushed (an empty one when nothing changed):
    /// a relying party following the deltas learns a loss report within this time.
    pub delta_every_seconds: u64,
    /// Issue 16: columns of the snapshot's coverage filter; a pair never registered is answered
    /// "not covered" except with probability 2^-bits, at about bits/8 bytes per card.
    pub snapshot_coverage_bits: u8,
    /// Issue 16: how long a snapshot (with its deltas) may be used; a card expiring sooner is not
    /// covered (a relying party asks online).
    pub snapshot_usable_seconds: u64,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            check_misses_per_minute: 60,
            collection_deadline_days: 180,
            void_sweep_every_seconds: 60,
            statement_validity_seconds: 600,
            statement_cache_entries: 250_000,
            fence_after_ms: 200,
            feed_poll_ms: 50,
            replica_id: String::new(),
            snapshot_every_seconds: 3600,
            delta_every_seconds: 60,
            snapshot_coverage_bits: 24,
            snapshot_usable_seconds: 7 * 86_400,
        }
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

impl ChecksConfig {
    /// The snapshot keys as the snapshot maker takes them.
    pub fn snapshot_settings(&self) -> crate::snapshot::SnapshotSettings {
        crate::snapshot::SnapshotSettings {
            snapshot_every: std::time::Duration::from_secs(self.snapshot_every_seconds),
            delta_every: std::time::Duration::from_secs(self.delta_every_seconds),
            coverage_bits: self.snapshot_coverage_bits,
            usable_for: chrono::Duration::seconds(i64::try_from(self.snapshot_usable_seconds).unwrap_or(i64::MAX)),
        }
    }
}

impl RegistryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.sections().validate()?;
        self.signing.validate("signing")?;
        if self.registry.check_misses_per_minute == 0 {
            return Err(ConfigError::key("registry.check_misses_per_minute", "must be at least 1"));
        }
        if !(1..=3650).contains(&self.registry.collection_deadline_days) {
            return Err(ConfigError::key("registry.collection_deadline_days", "must be 1 to 3650"));
        }
        if !(1..=86_400).contains(&self.registry.void_sweep_every_seconds) {
            return Err(ConfigError::key("registry.void_sweep_every_seconds", "must be 1 to 86400"));
        }
        if !(2..=604_800).contains(&self.registry.statement_validity_seconds) {
            return Err(ConfigError::key("registry.statement_validity_seconds", "must be 2 to 604800 (a week)"));
        }
        if self.registry.statement_cache_entries > 100_000_000 {
            return Err(ConfigError::key("registry.statement_cache_entries", "must be at most 100000000"));
        }
        if !(20..=60_000).contains(&self.registry.fence_after_ms) {
            return Err(ConfigError::key("registry.fence_after_ms", "must be 20 to 60000"));
        }
        if self.registry.feed_poll_ms == 0 || self.registry.feed_poll_ms * 2 > self.registry.fence_after_ms {
            return Err(ConfigError::key(
                "registry.feed_poll_ms",
                "must be at least 1 and at most half of fence_after_ms",
            ));
        }
        if self.registry.replica_id.len() > 256 {
            return Err(ConfigError::key("registry.replica_id", "must be at most 256 characters"));
        }
        if !(1..=604_800).contains(&self.registry.snapshot_every_seconds) {
            return Err(ConfigError::key("registry.snapshot_every_seconds", "must be 1 to 604800 (a week)"));
        }
        if !(1..=86_400).contains(&self.registry.delta_every_seconds) {
            return Err(ConfigError::key("registry.delta_every_seconds", "must be 1 to 86400"));
        }
        if !(1..=yidi_status_filter::MAX_COVERAGE_BITS).contains(&self.registry.snapshot_coverage_bits) {
            return Err(ConfigError::key("registry.snapshot_coverage_bits", "must be 1 to 32"));
        }
        if !(60..=31 * 86_400).contains(&self.registry.snapshot_usable_seconds) {
            return Err(ConfigError::key("registry.snapshot_usable_seconds", "must be 60 to 2678400 (31 days)"));
        }
        if let Some(path) = &self.import.path
            && path.as_os_str().is_empty()
        {
            return Err(ConfigError::key("import.path", "must not be empty when set"));
        }
        Ok(())
    }
}
