//! A directory file for tests: the bureaus a test needs, their keys, written where a bureau's
//! config points.
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use yidi_domain::Role;
use yidi_runtime::directory::{BureauEntry, DirectoryFile, KeyEntry, write_signing_key};

/// The endpoint of a bureau the test never calls.
pub const UNREACHABLE: &str = "http://127.0.0.1:1";

/// Builds a [`DirectoryFile`] one bureau at a time. Each bureau starts with its id as name, no
/// jurisdiction, region or keys, and the [`UNREACHABLE`] endpoint; the setters after
/// [`DirectoryBuilder::bureau`] change the bureau last added.
#[derive(Debug, Default, Clone)]
pub struct DirectoryBuilder {
    bureaus: Vec<BureauEntry>,
}

impl DirectoryBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bureau(mut self, id: &str, role: Role) -> Self {
        self.bureaus.push(BureauEntry {
            id: id.into(),
            role,
            name: id.into(),
            jurisdiction: Vec::new(),
            region: String::new(),
            endpoint: UNREACHABLE.into(),
            endpoints: Vec::new(),
            keys: Vec::new(),
        });
        self
    }

    /// The provinces (two-digit codes) whose citizens the last bureau answers for.
    pub fn jurisdiction(self, provinces: &[&str]) -> Self {
        self.with_last(|b| b.jurisdiction = provinces.iter().map(|p| (*p).to_owned()).collect())
    }

    pub fn region(self, region: &str) -> Self {
        self.with_last(|b| b.region = region.into())
    }

    pub fn endpoint(self, endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        self.with_last(|b| {
            b.endpoint = endpoint;
            b.endpoints.clear();
        })
    }

    /// The last bureau runs as several replicas, reached at `endpoints`.
    pub fn endpoints(self, endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let endpoints = endpoints.into_iter().map(Into::into).collect();
        self.with_last(|b| {
            b.endpoint.clear();
            b.endpoints = endpoints;
        })
    }

    /// Lists `key`'s public half as the last bureau's key `key_id`, valid from `valid_from`.
    pub fn key(self, key_id: &str, key: &SigningKey, valid_from: DateTime<Utc>) -> Self {
        self.with_last(|b| b.keys.push(KeyEntry::new(key_id, &key.verifying_key(), valid_from)))
    }

    /// As [`DirectoryBuilder::key`] when there is a key.
    pub fn maybe_key(self, key_id: &str, key: Option<&SigningKey>, valid_from: DateTime<Utc>) -> Self {
        match key {
            Some(key) => self.key(key_id, key, valid_from),
            None => self,
        }
    }

    fn with_last(mut self, change: impl FnOnce(&mut BureauEntry)) -> Self {
        if let Some(last) = self.bureaus.last_mut() {
            change(last);
        }
        self
    }

    pub fn build(self) -> DirectoryFile {
        DirectoryFile { bureaus: self.bureaus, ..DirectoryFile::default() }
    }

    /// Writes the file to `dir/directory.toml` and returns that path.
    pub fn write_into(self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("directory.toml");
        self.build().write(&path)?;
        Ok(path)
    }
}

/// Writes `key` as `dir/keys/<key_id>.key` (a bureau's `key_dir`) and returns `dir/keys`.
pub fn write_key_dir(dir: &Path, key_id: &str, key: &SigningKey) -> std::io::Result<PathBuf> {
    let key_dir = dir.join("keys");
    std::fs::create_dir_all(&key_dir)?;
    write_signing_key(&key_dir.join(format!("{key_id}.key")), key)?;
    Ok(key_dir)
}
