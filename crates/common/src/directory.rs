//! Loading the bureau directory and the signing keys, and generating keys for demos and tests.
use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use yidi_domain::{Bureau, Directory, Operator, OperatorAccess, RelyingParty, Role};

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
    pub endpoint: String,
    /// Base64 of the 32-byte Ed25519 public key (home bureaus).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
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
            let public_key = if entry.public_key.is_empty() {
                None
            } else {
                Some(decode_public_key(&entry.public_key).map_err(|e| format!("bureau {}: public_key {e}", entry.id))?)
            };
            bureaus.push(Bureau {
                id: entry.id.clone(),
                role: entry.role,
                name: entry.name.clone(),
                jurisdiction: entry.jurisdiction.clone(),
                region: entry.region.clone(),
                endpoint: entry.endpoint.clone(),
                public_key,
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
    DirectoryFile::read(path)?
        .to_directory()
        .map_err(|message| DirectoryFileError::Invalid { path: path.display().to_string(), message })
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
