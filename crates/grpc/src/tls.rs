//! Mutual TLS between bureaus: the `[tls]` configuration section, the certificate files it names,
//! and the identity a peer certificate carries.
//!
//! Every bureau, relying party and operator holds a certificate of the private CA whose subject
//! alternative name (DNS) is its id in the directory. Servers demand a client certificate chained
//! to the CA; clients verify the server under the *bureau id* as TLS name, so host names in
//! compose or Kubernetes do not matter. Plaintext is possible only when configured explicitly.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use yidi_runtime::config::ConfigError;

/// `[tls]`: either all of `ca`, `cert`, `key` (mutual TLS) or `plaintext = true`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM of the CA that issued every certificate of the directory (`ca.pem`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM of this bureau's certificate (`<bureau id>.pem`), presented as server and as client.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM of this bureau's private key (`<bureau id>.key`).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Serve and call without TLS: callers are then unauthenticated. Only for the embedded demo.
    #[serde(default)]
    pub plaintext: bool,
}

/// How a bureau talks to others: as configured in `[tls]`, files read and checked.
#[derive(Debug, Clone)]
pub enum Transport {
    /// `tls.plaintext = true`: no TLS, no caller identity.
    Plaintext,
    /// Mutual TLS with the CA and this bureau's certificate.
    MutualTls(Arc<TlsFiles>),
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::MutualTls(_))
    }

    /// The URL scheme endpoints must use: `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }
}

impl TlsConfig {
    /// Checks the section's shape: all three files or explicit plaintext, never both, never neither.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let given = [("tls.ca", &self.ca), ("tls.cert", &self.cert), ("tls.key", &self.key)];
        let set: Vec<&str> = given
            .iter()
            .filter(|(_, path)| path.as_ref().is_some_and(|p| !p.as_os_str().is_empty()))
            .map(|(k, _)| *k)
            .collect();
        if self.plaintext {
            if set.is_empty() {
                return Ok(());
            }
            return Err(ConfigError::key(
                "tls.plaintext",
                format!("is true, but {} is set too: choose mutual TLS or plaintext", set.join(", ")),
            ));
        }
        if set.is_empty() {
            return Err(ConfigError::key(
                "tls",
                "is required: set tls.ca, tls.cert and tls.key (mutual TLS), or tls.plaintext = true to serve without TLS",
            ));
        }
        if let Some((missing, _)) = given.iter().find(|(key, _)| !set.contains(key)) {
            return Err(ConfigError::key(
                missing,
                "is required with mutual TLS (tls.ca, tls.cert and tls.key go together)",
            ));
        }
        Ok(())
    }

    /// Validates the section and reads the files it names.
    pub fn load(&self) -> Result<Transport, ConfigError> {
        self.validate()?;
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) if !self.plaintext => {
                Ok(Transport::MutualTls(Arc::new(TlsFiles::read(ca, cert, key)?)))
            }
            _ => Ok(Transport::Plaintext),
        }
    }
}

/// The PEM files of one principal: the CA, its certificate and its key.
#[derive(Clone)]
pub struct TlsFiles {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsFiles").finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Reads and checks the three PEM files; each error names its configuration key.
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<Self, ConfigError> {
        let read = |config_key: &'static str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| ConfigError::key(config_key, format!("cannot read {}: {e}", path.display())))
        };
        let files =
            Self { ca_pem: read("tls.ca", ca)?, cert_pem: read("tls.cert", cert)?, key_pem: read("tls.key", key)? };
        let certificates = |config_key: &'static str, path: &Path, pem: &[u8]| {
            let count = CertificateDer::pem_slice_iter(pem)
                .try_fold(0usize, |count, cert| cert.map(|_| count + 1))
                .map_err(|e| ConfigError::key(config_key, format!("{}: {e}", path.display())))?;
            if count == 0 {
                return Err(ConfigError::key(config_key, format!("{}: no PEM certificate in it", path.display())));
            }
            Ok(())
        };
        certificates("tls.ca", ca, &files.ca_pem)?;
        certificates("tls.cert", cert, &files.cert_pem)?;
        PrivateKeyDer::from_pem_slice(&files.key_pem)
            .map_err(|e| ConfigError::key("tls.key", format!("{}: no usable PEM private key: {e}", key.display())))?;
        Ok(files)
    }

    /// From PEM text already in memory (tests, harness).
    pub fn from_pem(ca_pem: impl Into<Vec<u8>>, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self { ca_pem: ca_pem.into(), cert_pem: cert_pem.into(), key_pem: key_pem.into() }
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// Server side: present our certificate and REQUIRE a client certificate chained to the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity()).client_ca_root(self.ca()).client_auth_optional(false)
    }

    /// Client side: trust only the CA, present our certificate, and expect the server to prove it
    /// is `server_id` (a bureau id of the directory).
    pub fn client_config(&self, server_id: &str) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca()).identity(self.identity()).domain_name(server_id)
    }
}

/// Why a peer certificate names no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the client certificate names no DNS subject alternative name (the principal id)")]
    NoName,
    #[error(
        "the client certificate names {0} DNS subject alternative names; exactly one (the principal id) is expected"
    )]
    SeveralNames(usize),
}

/// The principal id a (CA-verified) end-entity certificate names: its one DNS subject alternative
/// name. The TLS handshake has already checked the chain; this only reads the name.
pub fn certificate_identity(certificate: &CertificateDer<'_>) -> Result<String, PeerIdentityError> {
    let parsed =
        webpki::EndEntityCert::try_from(certificate).map_err(|e| PeerIdentityError::Unparsable(format!("{e:?}")))?;
    let names: Vec<&str> = parsed.valid_dns_names().collect();
    match names.as_slice() {
        [] => Err(PeerIdentityError::NoName),
        [name] => Ok((*name).to_owned()),
        several => Err(PeerIdentityError::SeveralNames(several.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ca: bool, cert: bool, key: bool, plaintext: bool) -> TlsConfig {
        let path = |set: bool, name: &str| set.then(|| PathBuf::from(name));
        TlsConfig { ca: path(ca, "ca.pem"), cert: path(cert, "x.pem"), key: path(key, "x.key"), plaintext }
    }

    fn error(config: TlsConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn tls_must_be_configured_or_plaintext_chosen_explicitly() {
        assert!(error(config(false, false, false, false)).contains("configuration key tls: is required"));
        assert!(config(false, false, false, true).validate().is_ok());
        assert!(config(true, true, true, false).validate().is_ok());
        assert!(error(config(true, false, true, false)).contains("tls.cert"));
        assert!(error(config(true, true, false, false)).contains("tls.key"));
        assert!(error(config(true, true, true, true)).contains("tls.plaintext"));
    }

    #[test]
    fn unreadable_files_name_their_key() {
        let error = config(true, true, true, false).load().unwrap_err().to_string();
        assert!(error.contains("tls.ca") && error.contains("ca.pem"), "{error}");
    }
}
