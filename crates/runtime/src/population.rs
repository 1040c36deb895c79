//! The population file: a synthetic register shared by the demo, the tests and the import at
//! start-up of the home bureaus (their citizens) and the registry (the cards already issued).
use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use yidi_domain::{Credit, Particulars, Registration};

/// Templates travel as base64 in JSON, as grpcurl expects for `bytes` fields.
mod base64_bytes {
    use super::*;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        BASE64.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A card issued before the suite ran, as the registry imports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistingCard {
    pub serial: String,
    pub valid_from: NaiveDate,
    /// None: long-term.
    pub valid_until: Option<NaiveDate>,
    /// Whether a loss report already stands for it.
    #[serde(default)]
    pub reported_lost: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Citizen {
    /// Written flat in the file: `id_number`, `name`, `sex`, `birth_date`, ... at the citizen's level.
    #[serde(flatten)]
    pub person: Particulars,
    /// The home bureau holding the registration.
    pub home_bureau_id: String,
    /// What this citizen demonstrates, e.g. `replacement`, `face_mismatch` (docs/RUNBOOK.md, "Population").
    pub scenario: String,
    pub credit: Credit,
    pub registration: Registration,
    /// None: never held a card (K4).
    pub card: Option<ExistingCard>,
    /// Enrolled templates in the home bureau's register.
    #[serde(with = "base64_bytes")]
    pub face_template: Vec<u8>,
    #[serde(with = "base64_bytes")]
    pub fingerprint_template: Vec<u8>,
    /// What the person at the counter presents: equal to the register for the citizen himself,
    /// someone else's for an impostor scenario.
    #[serde(with = "base64_bytes")]
    pub live_face_template: Vec<u8>,
    #[serde(with = "base64_bytes")]
    pub live_fingerprint_template: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Population {
    pub citizens: Vec<Citizen>,
}

#[derive(Debug, thiserror::Error)]
#[error("population file {path}: {message}")]
pub struct PopulationError {
    pub path: String,
    pub message: String,
}

impl Population {
    pub fn read(path: &Path) -> Result<Self, PopulationError> {
        let error = |message: String| PopulationError { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| error(e.to_string()))
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}
