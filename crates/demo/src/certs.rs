//! Certificates for demos and tests (`yidi-demo certs`): a private CA and, for every principal of
//! the directory (bureaus, relying parties, operators), a certificate and key.
//!
//! A leaf names its principal id as common name and as its one DNS subject alternative name (the
//! identity the servers read, and the TLS name clients verify a bureau under), and may serve and
//! call (EKU serverAuth + clientAuth). Keys are written mode 0600; none of this is ever committed.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{Datelike, Duration, NaiveDate, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use yidi_grpc::tls::TlsFiles;

/// The CA's subject: fixed, so that an existing CA can sign again from its key alone.
const CA_COMMON_NAME: &str = "yidi demo CA";
const CA_ORGANIZATION: &str = "yidi";

/// The certificate authority of a certificates folder.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// The CA files and leaf files of a certificates folder.
#[derive(Debug, Clone)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn cert(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pem"))
    }

    pub fn key(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }

    /// The CA, certificate and key of `id`, as a client or server presents them.
    pub fn files(&self, id: &str) -> anyhow::Result<TlsFiles> {
        TlsFiles::read(&self.ca_pem(), &self.cert(id), &self.key(id)).map_err(anyhow::Error::new)
    }
}

/// Valid from yesterday (clock skew between hosts) for `days`.
fn set_validity(params: &mut CertificateParams, today: NaiveDate, days: i64) {
    let ymd = |date: NaiveDate| {
        // Month and day always fit a u8.
        date_time_ymd(date.year(), date.month() as u8, date.day() as u8)
    };
    params.not_before = ymd(today - Duration::days(1));
    params.not_after = ymd(today + Duration::days(days));
}

fn ca_params(today: NaiveDate) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, today, 10 * 365);
    params
}

impl CertificateAuthority {
    /// A fresh CA.
    pub fn generate() -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let params = ca_params(Utc::now().date_naive());
        let pem = params.self_signed(&key).context("self-signing the CA")?.pem();
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    /// The CA of `ca.pem` + `ca.key`. Signing needs only the key and the (fixed) subject.
    pub fn read(certs: &CertDir) -> anyhow::Result<Self> {
        let pem =
            std::fs::read_to_string(certs.ca_pem()).with_context(|| format!("reading {}", certs.ca_pem().display()))?;
        let key_pem =
            std::fs::read_to_string(certs.ca_key()).with_context(|| format!("reading {}", certs.ca_key().display()))?;
        let key =
            KeyPair::from_pem(&key_pem).with_context(|| format!("{}: not a PEM key", certs.ca_key().display()))?;
        Ok(Self { issuer: Issuer::new(ca_params(Utc::now().date_naive()), key), pem })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate and key for principal `id` (PEM): CN and DNS SAN = `id`, serverAuth + clientAuth.
    pub fn issue(&self, id: &str) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut params = CertificateParams::new(vec![id.to_owned()])
            .with_context(|| format!("{id:?} cannot be a certificate name (a DNS name is needed)"))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, id);
        name.push(DnType::OrganizationName, CA_ORGANIZATION);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, Utc::now().date_naive(), 2 * 365);
        let cert = params.signed_by(&key, &self.issuer).with_context(|| format!("signing {id}'s certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues `id`'s certificate into `certs` (`<id>.pem`, `<id>.key` mode 0600).
    pub fn issue_into(&self, certs: &CertDir, id: &str) -> anyhow::Result<()> {
        let (cert, key) = self.issue(id)?;
        std::fs::write(certs.cert(id), cert)?;
        write_private(&certs.key(id), key.as_bytes())
    }

    fn write(&self, certs: &CertDir) -> anyhow::Result<()> {
        std::fs::write(certs.ca_pem(), &self.pem)?;
        write_private(&certs.ca_key(), self.issuer.key().serialize_pem().as_bytes())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Whether `certs` reuses the CA it holds or replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaChoice {
    /// Keep `ca.pem`/`ca.key` if present (certificates issued before stay valid), else make one.
    KeepExisting,
    /// Make a new CA: every certificate issued before stops being trusted.
    New,
}

/// Writes the CA (unless kept) and a certificate + key for every principal id into `certs.dir`.
/// Returns whether the CA was created.
pub fn write_certificates<'a>(
    certs: &CertDir,
    ids: impl IntoIterator<Item = &'a str>,
    choice: CaChoice,
) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&certs.dir).with_context(|| format!("creating {}", certs.dir.display()))?;
    let existing = certs.ca_pem().exists() && certs.ca_key().exists();
    let created = choice == CaChoice::New || !existing;
    let ca = if created {
        let ca = CertificateAuthority::generate()?;
        ca.write(certs)?;
        ca
    } else {
        CertificateAuthority::read(certs)?
    };
    let mut count = 0;
    for id in ids {
        ca.issue_into(certs, id)?;
        count += 1;
    }
    if count == 0 {
        bail!("the directory lists no principals to issue certificates for");
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    use super::*;

    fn pem_der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_kept_ca_issues_certificates_chained_to_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path());
        assert!(write_certificates(&certs, ["registry-national"], CaChoice::KeepExisting).unwrap());
        let first_ca = std::fs::read_to_string(certs.ca_pem()).unwrap();
        assert!(!write_certificates(&certs, ["bank-demo"], CaChoice::KeepExisting).unwrap());
        assert_eq!(std::fs::read_to_string(certs.ca_pem()).unwrap(), first_ca, "the CA was kept");
        let ca_der = pem_der(&first_ca);
        let ca = webpki::EndEntityCert::try_from(&ca_der).unwrap();
        for id in ["registry-national", "bank-demo"] {
            certs.files(id).unwrap();
            let leaf_der = pem_der(&std::fs::read_to_string(certs.cert(id)).unwrap());
            let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
            assert_eq!(leaf.issuer(), ca.subject(), "{id} is issued by the (kept) CA");
            assert_eq!(leaf.valid_dns_names().collect::<Vec<_>>(), [id]);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(certs.key(id)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{id}'s key is private");
            }
        }
        assert!(write_certificates(&certs, ["bank-demo"], CaChoice::New).unwrap());
        assert_ne!(std::fs::read_to_string(certs.ca_pem()).unwrap(), first_ca);
    }
}
