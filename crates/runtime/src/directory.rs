//! Loading the bureau directory and the signing keys, and generating keys for demos and tests;
//! the [`DirectoryHandle`] that re-reads the directory while a service runs.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::{sync::watch, task::JoinHandle};
use yidi_domain::{Bureau, BureauKey, Directory, Operator, OperatorAccess, RelyingParty, Role};

use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum DirectoryFileError {
    #[error("directory {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
}

/// One `[[bureaus]]` entry of the directory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BureauEntry {
    pub id: String,
    pub role: Role,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jurisdiction: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// The bureau's gRPC endpoint, when it runs as one process. Give this or `endpoints`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// Its endpoints when it runs as several replicas: callers spread their calls over them and
    /// fail over between them. Give this or `endpoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// `[[bureaus.keys]]`: the signing keys (home bureaus; the registry), with ids and windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyEntry>,
}

/// One `[[bureaus.keys]]` entry: a public key, its id, and when what it signs is accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    /// RFC 3339, a TOML date-time or a string.
    #[serde(serialize_with = "write_instant", deserialize_with = "read_instant")]
    pub valid_from: DateTime<Utc>,
    /// RFC 3339; absent while the key is not scheduled for retirement.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "write_optional_instant",
        deserialize_with = "read_optional_instant"
    )]
    pub valid_until: Option<DateTime<Utc>>,
}

impl BureauEntry {
    /// Where the bureau is reached: `endpoint`, or the `endpoints` list; exactly one of the two,
    /// without an empty or repeated endpoint.
    pub fn all_endpoints(&self) -> Result<Vec<String>, String> {
        let endpoints = match (self.endpoint.is_empty(), self.endpoints.is_empty()) {
            (false, true) => vec![self.endpoint.clone()],
            (true, false) => self.endpoints.clone(),
            (true, true) => return Err(format!("bureau {}: give its endpoint (or endpoints)", self.id)),
            (false, false) => {
                return Err(format!("bureau {}: give endpoint (one) or endpoints (several), not both", self.id));
            }
        };
        for (i, endpoint) in endpoints.iter().enumerate() {
            if endpoint.trim().is_empty() {
                return Err(format!("bureau {}: endpoints must not be empty", self.id));
            }
            if endpoints[..i].contains(endpoint) {
                return Err(format!("bureau {}: endpoint {endpoint:?} is listed twice", self.id));
            }
        }
        Ok(endpoints)
    }
}

impl KeyEntry {
    pub fn new(id: impl Into<String>, key: &VerifyingKey, valid_from: DateTime<Utc>) -> Self {
        Self { id: id.into(), public_key: encode_public_key(key), valid_from, valid_until: None }
    }
}

/// TOML writes an instant as a native offset date-time; strings are accepted too.
fn write_instant<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let text = at.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    match text.parse::<toml::value::Datetime>() {
        Ok(datetime) => datetime.serialize(serializer),
        Err(_) => serializer.serialize_str(&text),
    }
}

fn write_optional_instant<S: Serializer>(at: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => write_instant(at, serializer),
        None => serializer.serialize_none(),
    }
}

fn parse_instant(value: toml::Value) -> Result<DateTime<Utc>, String> {
    let text = match value {
        toml::Value::String(text) => text,
        toml::Value::Datetime(datetime) => datetime.to_string(),
        other => return Err(format!("expected an RFC 3339 date-time, found {}", other.type_str())),
    };
    DateTime::parse_from_rfc3339(&text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| format!("{text:?} is not an RFC 3339 date-time with offset: {e}"))
}

fn read_instant<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    parse_instant(toml::Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

fn read_optional_instant<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    read_instant(deserializer).map(Some)
}

/// One `[[relying_parties]]` entry: a bank, hotel, airline... that may check cards.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelyingPartyEntry {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// One `[[operators]]` entry: a person operating one bureau's service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub id: String,
    /// The bureau whose service he operates.
    pub bureau: String,
    pub access: OperatorAccess,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryFile {
    pub bureaus: Vec<BureauEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relying_parties: Vec<RelyingPartyEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<OperatorEntry>,
}

impl DirectoryFile {
    pub fn read(path: &Path) -> Result<Self, DirectoryFileError> {
        let invalid = |message: String| DirectoryFileError::Invalid { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        toml::from_str(&text).map_err(|e| invalid(e.to_string()))
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = toml::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }

    pub fn to_directory(&self) -> Result<Directory, String> {
        let mut bureaus = Vec::with_capacity(self.bureaus.len());
        for entry in &self.bureaus {
            let mut keys = Vec::with_capacity(entry.keys.len());
            for key in &entry.keys {
                let public_key = decode_public_key(&key.public_key)
                    .map_err(|e| format!("bureau {} key {}: public_key {e}", entry.id, key.id))?;
                keys.push(BureauKey {
                    id: key.id.clone(),
                    public_key,
                    valid_from: key.valid_from,
                    valid_until: key.valid_until,
                });
            }
            bureaus.push(Bureau {
                id: entry.id.clone(),
                role: entry.role,
                name: entry.name.clone(),
                jurisdiction: entry.jurisdiction.clone(),
                region: entry.region.clone(),
                endpoints: entry.all_endpoints()?,
                keys,
            });
        }
        let relying_parties = self
            .relying_parties
            .iter()
            .map(|entry| RelyingParty { id: entry.id.clone(), name: entry.name.clone() })
            .collect();
        let operators = self
            .operators
            .iter()
            .map(|entry| Operator { id: entry.id.clone(), bureau_id: entry.bureau.clone(), access: entry.access })
            .collect();
        Directory::new(bureaus)
            .and_then(|directory| directory.with_principals(relying_parties, operators))
            .map_err(|e| e.to_string())
    }
}

/// Reads and validates the directory file.
pub fn load(path: &Path) -> Result<Directory, DirectoryFileError> {
    let text = read_text(path)?;
    parse(path, &text)
}

fn read_text(path: &Path) -> Result<String, DirectoryFileError> {
    std::fs::read_to_string(path)
        .map_err(|e| DirectoryFileError::Invalid { path: path.display().to_string(), message: e.to_string() })
}

fn parse(path: &Path, text: &str) -> Result<Directory, DirectoryFileError> {
    let invalid = |message: String| DirectoryFileError::Invalid { path: path.display().to_string(), message };
    let file: DirectoryFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    file.to_directory().map_err(invalid)
}

/// The directory a service uses now. It is re-read while the service runs (key rotation, new
/// bureaus): on SIGHUP and whenever the file's content changes. A file that does not load keeps
/// the directory in force, and the error is logged. Readers take [`DirectoryHandle::current`]
/// once per request, so one request sees one directory.
#[derive(Debug, Clone)]
pub struct DirectoryHandle {
    current: Arc<watch::Sender<Arc<Directory>>>,
    /// None: a directory given in memory (tests), never re-read.
    path: Option<PathBuf>,
    /// The file content last looked at, loaded or refused: polling acts only on a change.
    last_seen: Arc<Mutex<Option<String>>>,
}

/// What one look at the directory file found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The file is as last seen (nothing was parsed).
    Unchanged,
    /// A new directory is in force.
    Replaced,
}

impl DirectoryHandle {
    /// Loads the directory file; fails if it does not load.
    pub fn load(path: &Path) -> Result<Self, DirectoryFileError> {
        let text = read_text(path)?;
        let directory = parse(path, &text)?;
        let (sender, _) = watch::channel(Arc::new(directory));
        Ok(Self { current: Arc::new(sender), path: Some(path.to_owned()), last_seen: Arc::new(Mutex::new(Some(text))) })
    }

    /// A directory that never changes (tests, embedded tools).
    pub fn fixed(directory: Directory) -> Self {
        let (sender, _) = watch::channel(Arc::new(directory));
        Self { current: Arc::new(sender), path: None, last_seen: Arc::default() }
    }

    /// The directory in force.
    pub fn current(&self) -> Arc<Directory> {
        self.current.borrow().clone()
    }

    /// Notified at each replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Directory>> {
        self.current.subscribe()
    }

    /// Re-reads the file. `forced` (SIGHUP) parses it even when its content looks unchanged. On an
    /// error the directory in force stays.
    pub fn reload(&self, forced: bool) -> Result<Reloaded, DirectoryFileError> {
        let Some(path) = &self.path else { return Ok(Reloaded::Unchanged) };
        let text = read_text(path)?;
        {
            let mut last_seen = self.last_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !forced && last_seen.as_deref() == Some(text.as_str()) {
                return Ok(Reloaded::Unchanged);
            }
            *last_seen = Some(text.clone());
        }
        let directory = parse(path, &text)?;
        self.current.send_replace(Arc::new(directory));
        Ok(Reloaded::Replaced)
    }

    /// Re-reads the file every `every` and on SIGHUP until `shutdown`, logging what happens.
    pub fn spawn_reloader(&self, every: Duration, shutdown: Shutdown) -> JoinHandle<()> {
        let handle = self.clone();
        crate::reload::spawn("directory", every, shutdown, move |forced| match handle.reload(forced) {
            Ok(Reloaded::Replaced) => tracing::info!(forced, "directory reloaded"),
            Ok(Reloaded::Unchanged) => {}
            Err(error) => tracing::error!(%error, "directory not reloaded: the one in force stays"),
        })
    }
}

pub fn decode_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = BASE64.decode(text.trim()).map_err(|e| e.to_string())?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| "must be 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

pub fn encode_public_key(key: &VerifyingKey) -> String {
    BASE64.encode(key.as_bytes())
}

/// A fresh key from the operating system's random source.
pub fn generate_signing_key() -> SigningKey {
    // ed25519-dalek 3 takes rand_core 0.10 generators; derive from 32 random bytes instead.
    let seed: [u8; 32] = rand::random();
    SigningKey::from_bytes(&seed)
}

/// Reads a signing key file: base64 of the 32-byte seed.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, DirectoryFileError> {
    let error = |message: String| DirectoryFileError::Key { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let bytes = BASE64.decode(text.trim()).map_err(|e| error(e.to_string()))?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| error("must hold 32 bytes".into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a signing key file readable by its owner only.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> std::io::Result<()> {
    std::fs::write(path, BASE64.encode(key.to_bytes()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGISTRY: &str = r#"
[[bureaus]]
id = "registry-national"
role = "registry"
"#;

    fn endpoints_of(lines: &str) -> Result<Vec<String>, DirectoryFileError> {
        let directory = parse(Path::new("directory.toml"), &format!("{REGISTRY}{lines}"))?;
        Ok(directory.get("registry-national").map(|bureau| bureau.endpoints.clone()).unwrap_or_default())
    }

    #[test]
    fn a_bureau_is_reached_at_its_endpoint_or_at_each_of_its_endpoints() {
        let one = endpoints_of(r#"endpoint = "https://registry:50054""#).unwrap();
        assert_eq!(one, ["https://registry:50054"]);
        let several =
            endpoints_of(r#"endpoints = ["https://registry-0.registry:50054", "https://registry-1.registry:50054"]"#)
                .unwrap();
        assert_eq!(several, ["https://registry-0.registry:50054", "https://registry-1.registry:50054"]);
    }

    #[test]
    fn a_bureau_without_an_endpoint_with_both_keys_or_with_one_endpoint_twice_is_refused() {
        let refused = |lines: &str| endpoints_of(lines).unwrap_err().to_string();
        assert!(refused("").contains("give its endpoint"), "{}", refused(""));
        assert!(refused("endpoints = []").contains("give its endpoint"));
        let both = refused("endpoint = \"https://a:1\"\nendpoints = [\"https://b:1\"]");
        assert!(both.contains("not both"), "{both}");
        let twice = refused(r#"endpoints = ["https://a:1", "https://a:1"]"#);
        assert!(twice.contains("listed twice"), "{twice}");
        assert!(refused(r#"endpoints = ["https://a:1", " "]"#).contains("must not be empty"));
    }

    #[test]
    fn one_endpoint_is_written_as_endpoint_and_several_as_endpoints() {
        let entry = |endpoint: &str, endpoints: &[&str]| BureauEntry {
            id: "registry-national".into(),
            role: Role::Registry,
            name: String::new(),
            jurisdiction: Vec::new(),
            region: String::new(),
            endpoint: endpoint.into(),
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            keys: Vec::new(),
        };
        let written = |entry: BureauEntry| {
            toml::to_string_pretty(&DirectoryFile { bureaus: vec![entry], ..DirectoryFile::default() }).unwrap()
        };
        let one = written(entry("https://a:1", &[]));
        assert!(one.contains(r#"endpoint = "https://a:1""#) && !one.contains("endpoints"), "{one}");
        let several = written(entry("", &["https://a:1", "https://b:1"]));
        assert!(several.contains("endpoints = [") && !several.contains("endpoint ="), "{several}");
        let read: DirectoryFile = toml::from_str(&several).unwrap();
        assert_eq!(read.to_directory().unwrap().get("registry-national").unwrap().endpoints.len(), 2);
    }
}
