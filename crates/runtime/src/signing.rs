//! The private keys a bureau signs with (home bureaus: decisions; the registry: status answers),
//! read from key files named in its configuration and re-read while it runs, so that a new key can
//! be put in place and an old one dropped without a restart.
//!
//! Which key signs is decided by the directory: the held key with the latest `valid_from` among
//! those the directory lists for this bureau, with the same public key, as valid at that instant.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde::Deserialize;
use tokio::task::JoinHandle;
use yidi_domain::Directory;

use crate::{
    config::ConfigError,
    directory::{DirectoryFileError, read_signing_key},
    shutdown::Shutdown,
};

/// File name ending of a key file in `key_dir`; the part before it is the key id.
pub const KEY_FILE_SUFFIX: &str = ".key";

/// One `[[signing.keys]]` entry: a key file and the directory key id it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFileConfig {
    pub id: String,
    pub path: PathBuf,
}

/// Where a bureau's signing keys are: listed files and/or every `<key id>.key` file of a folder.
/// As a config section (the registry's `[signing]`): `key_dir` and `[[signing.keys]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySources {
    /// A folder of key files `<key id>.key`, re-read while running.
    #[serde(default)]
    pub key_dir: Option<PathBuf>,
    /// Key files with the directory key id each stands for.
    #[serde(default)]
    pub keys: Vec<KeyFileConfig>,
}

impl KeySources {
    /// At least one source; listed ids are unique and non-empty. `section` prefixes the keys named.
    pub fn validate(&self, section: &'static str) -> Result<(), ConfigError> {
        let key = |name: &'static str| match (section, name) {
            ("signing", "key_dir") => "signing.key_dir",
            ("signing", _) => "signing.keys",
            (_, "key_dir") => "key_dir",
            _ => "keys",
        };
        if self.key_dir.is_none() && self.keys.is_empty() {
            return Err(ConfigError::key(key("keys"), "list at least one key file, or set signing.key_dir"));
        }
        if let Some(dir) = &self.key_dir
            && dir.as_os_str().is_empty()
        {
            return Err(ConfigError::key(key("key_dir"), "must not be empty when set"));
        }
        let mut seen = std::collections::HashSet::new();
        for file in &self.keys {
            if file.id.trim().is_empty() || file.path.as_os_str().is_empty() {
                return Err(ConfigError::key(key("keys"), "every entry needs an id and a path"));
            }
            if !seen.insert(file.id.as_str()) {
                return Err(ConfigError::key(key("keys"), format!("key id {:?} is listed twice", file.id)));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error(transparent)]
    File(#[from] DirectoryFileError),
    #[error("key folder {path}: {message}")]
    Folder { path: String, message: String },
    #[error("key id {0:?} is in two key files with different keys")]
    Conflict(String),
    #[error("{0}")]
    Unusable(String),
}

/// The key chosen to sign with now.
#[derive(Clone)]
pub struct ActiveKey {
    pub id: String,
    pub key: SigningKey,
}

impl std::fmt::Debug for ActiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// The private keys a bureau holds, by key id.
pub struct KeyRing {
    bureau_id: String,
    sources: KeySources,
    held: RwLock<Arc<BTreeMap<String, SigningKey>>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("bureau_id", &self.bureau_id).field("held", &self.held_ids()).finish()
    }
}

/// Every key file of the sources, read; `lenient` skips (and logs) files that do not read.
fn read_all(sources: &KeySources, lenient: bool) -> Result<BTreeMap<String, SigningKey>, KeyRingError> {
    let mut found: Vec<(String, PathBuf)> =
        sources.keys.iter().map(|file| (file.id.clone(), file.path.clone())).collect();
    if let Some(dir) = &sources.key_dir {
        found.extend(key_dir_files(dir)?);
    }
    let mut held = BTreeMap::new();
    for (id, path) in found {
        let key = match read_signing_key(&path) {
            Ok(key) => key,
            Err(error) if lenient => {
                tracing::error!(%error, key_id = %id, "signing key file not read: the key held before stays, if any");
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        if let Some(other) = held.get(&id)
            && other != &key
        {
            return Err(KeyRingError::Conflict(id));
        }
        held.insert(id, key);
    }
    Ok(held)
}

fn key_dir_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, KeyRingError> {
    let folder = |message: String| KeyRingError::Folder { path: dir.display().to_string(), message };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| folder(e.to_string()))? {
        let path = entry.map_err(|e| folder(e.to_string()))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some(id) = name.strip_suffix(KEY_FILE_SUFFIX)
            && !id.is_empty()
            && path.is_file()
        {
            files.push((id.to_owned(), path.clone()));
        }
    }
    Ok(files)
}

impl KeyRing {
    /// Reads every key file; any that does not read is an error (start-up).
    pub fn load(bureau_id: impl Into<String>, sources: KeySources) -> Result<Self, KeyRingError> {
        let held = read_all(&sources, false)?;
        Ok(Self { bureau_id: bureau_id.into(), sources, held: RwLock::new(Arc::new(held)) })
    }

    /// Keys given in memory (tests).
    pub fn fixed(bureau_id: impl Into<String>, keys: impl IntoIterator<Item = (String, SigningKey)>) -> Self {
        Self {
            bureau_id: bureau_id.into(),
            sources: KeySources::default(),
            held: RwLock::new(Arc::new(keys.into_iter().collect())),
        }
    }

    fn held(&self) -> Arc<BTreeMap<String, SigningKey>> {
        self.held.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn held_ids(&self) -> Vec<String> {
        self.held().keys().cloned().collect()
    }

    /// Re-reads the key files. A file that no longer reads keeps its key (a half-written file must
    /// not stop signing); a file that is gone drops it. Returns whether the held set changed.
    pub fn reload(&self) -> Result<bool, KeyRingError> {
        if self.sources == KeySources::default() {
            return Ok(false);
        }
        let mut fresh = read_all(&self.sources, true)?;
        let before = self.held();
        for (id, key) in before.iter() {
            let still_configured = self.sources.keys.iter().any(|file| &file.id == id)
                || self.sources.key_dir.as_ref().is_some_and(|dir| dir.join(format!("{id}{KEY_FILE_SUFFIX}")).exists());
            if still_configured && !fresh.contains_key(id) {
                fresh.insert(id.clone(), key.clone());
            }
        }
        let changed =
            fresh.len() != before.len() || fresh.iter().zip(before.iter()).any(|((a, ka), (b, kb))| a != b || ka != kb);
        if changed {
            *self.held.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        }
        Ok(changed)
    }

    /// Held keys the directory lists under the same id with another public key: never used.
    pub fn mismatched(&self, directory: &Directory) -> Vec<String> {
        let Some(bureau) = directory.get(&self.bureau_id) else { return Vec::new() };
        self.held()
            .iter()
            .filter(|(id, key)| bureau.key(id).is_some_and(|listed| listed.public_key != key.verifying_key()))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The key to sign with at `at`: held, listed by the directory for this bureau with the same
    /// public key, valid at `at`; of those the one valid from the latest instant.
    pub fn select(&self, directory: &Directory, at: DateTime<Utc>) -> Option<ActiveKey> {
        let bureau = directory.get(&self.bureau_id)?;
        let held = self.held();
        bureau
            .keys
            .iter()
            .filter(|listed| listed.is_valid_at(at))
            .filter_map(|listed| {
                let key = held.get(&listed.id)?;
                (listed.public_key == key.verifying_key()).then_some((listed, key))
            })
            .max_by(|(a, _), (b, _)| a.valid_from.cmp(&b.valid_from).then_with(|| a.id.cmp(&b.id)))
            .map(|(listed, key)| ActiveKey { id: listed.id.clone(), key: key.clone() })
    }

    /// Start-up check: no held key contradicts the directory, and one can sign at `now`.
    pub fn check(&self, directory: &Directory, now: DateTime<Utc>) -> Result<ActiveKey, KeyRingError> {
        let mismatched = self.mismatched(directory);
        if !mismatched.is_empty() {
            return Err(KeyRingError::Unusable(format!(
                "key id(s) {mismatched:?}: the key file does not match the directory's public_key of {}",
                self.bureau_id
            )));
        }
        self.select(directory, now).ok_or_else(|| {
            KeyRingError::Unusable(format!(
                "none of the keys held ({:?}) is listed for {} in the directory as valid now",
                self.held_ids(),
                self.bureau_id
            ))
        })
    }

    /// Re-reads the key files every `every` and on SIGHUP until `shutdown`, logging what happens.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration, shutdown: Shutdown) -> JoinHandle<()> {
        let ring = Arc::clone(self);
        crate::reload::spawn("signing keys", every, shutdown, move |_| match ring.reload() {
            Ok(true) => tracing::info!(held = ?ring.held_ids(), "signing keys reloaded"),
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "signing keys not reloaded: the keys held stay"),
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use yidi_domain::{Bureau, BureauKey, Role};

    use super::*;
    use crate::directory::write_signing_key;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2118, 1, 1, hour, 0, 0).unwrap()
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn listed(id: &str, seed: u8, from: u32, until: Option<u32>) -> BureauKey {
        BureauKey {
            id: id.into(),
            public_key: key(seed).verifying_key(),
            valid_from: at(from),
            valid_until: until.map(at),
        }
    }

    fn directory(keys: Vec<BureauKey>) -> Directory {
        Directory::new(vec![Bureau::new("home", Role::Verification).with_jurisdiction(["36"]).with_keys(keys)]).unwrap()
    }

    #[test]
    fn the_newest_key_valid_now_that_is_held_signs() {
        let ring = KeyRing::fixed("home", [("k1".to_owned(), key(1)), ("k2".to_owned(), key(2))]);
        let only_k1 = directory(vec![listed("k1", 1, 0, None)]);
        assert_eq!(ring.select(&only_k1, at(5)).map(|k| k.id), Some("k1".into()));
        let both = directory(vec![listed("k1", 1, 0, Some(10)), listed("k2", 2, 4, None)]);
        assert_eq!(ring.select(&both, at(3)).map(|k| k.id), Some("k1".into()), "k2 not yet valid");
        assert_eq!(ring.select(&both, at(5)).map(|k| k.id), Some("k2".into()), "newest wins");
        // A newer key listed but not held: the held one signs.
        let k3_unheld = directory(vec![listed("k1", 1, 0, None), listed("k3", 3, 4, None)]);
        assert_eq!(ring.select(&k3_unheld, at(5)).map(|k| k.id), Some("k1".into()));
        // Retired: nothing to sign with.
        let retired = directory(vec![listed("k1", 1, 0, Some(2))]);
        assert!(ring.select(&retired, at(5)).is_none());
        assert!(matches!(ring.check(&retired, at(5)), Err(KeyRingError::Unusable(_))));
    }

    #[test]
    fn a_key_file_that_contradicts_the_directory_never_signs() {
        let ring = KeyRing::fixed("home", [("k1".to_owned(), key(9))]);
        let dir = directory(vec![listed("k1", 1, 0, None)]);
        assert!(ring.select(&dir, at(5)).is_none());
        assert_eq!(ring.mismatched(&dir), vec!["k1".to_owned()]);
        assert!(ring.check(&dir, at(5)).is_err());
    }

    #[test]
    fn key_files_are_re_read_and_a_broken_one_keeps_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        write_signing_key(&keys.join("k1.key"), &key(1)).unwrap();
        std::fs::write(keys.join("notes.txt"), "ignored").unwrap();
        let ring = KeyRing::load("home", KeySources { key_dir: Some(keys.clone()), keys: vec![] }).unwrap();
        assert_eq!(ring.held_ids(), vec!["k1".to_owned()]);
        write_signing_key(&keys.join("k2.key"), &key(2)).unwrap();
        assert!(ring.reload().unwrap());
        assert_eq!(ring.held_ids(), vec!["k1".to_owned(), "k2".to_owned()]);
        assert!(!ring.reload().unwrap(), "nothing changed");
        std::fs::write(keys.join("k2.key"), "half-writ").unwrap();
        assert!(!ring.reload().unwrap(), "a broken file keeps the key held");
        std::fs::remove_file(keys.join("k1.key")).unwrap();
        assert!(ring.reload().unwrap());
        assert_eq!(ring.held_ids(), vec!["k2".to_owned()]);
    }

    #[test]
    fn sources_are_validated() {
        assert!(KeySources::default().validate("signing").is_err());
        let twice = KeyFileConfig { id: "k".into(), path: "a".into() };
        let sources = KeySources { key_dir: None, keys: vec![twice.clone(), twice] };
        assert!(sources.validate("signing").unwrap_err().to_string().contains("signing.keys"));
    }
}
