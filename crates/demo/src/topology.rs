//! The demo topology: one station, two home bureaus, the producer and the registry; key
//! generation (with ids and validity windows) and the directory file.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use yidi_domain::{OperatorAccess, Role};
use yidi_runtime::{
    directory::{
        BureauEntry, DirectoryFile, KeyEntry, OperatorEntry, RelyingPartyEntry, generate_signing_key, write_signing_key,
    },
    signing::KEY_FILE_SUFFIX,
};

pub const STATION: &str = "station-hangzhou";
pub const STATION_REGION: &str = "330106";
pub const HOME_JIANGXI: &str = "home-jiangxi";
pub const HOME_SICHUAN: &str = "home-sichuan";
pub const PRODUCER: &str = "producer-zhejiang";
pub const REGISTRY: &str = "registry-national";
/// The demo's relying party: a bank that checks cards at the registry.
pub const RELYING_PARTY: &str = "bank-demo";

/// The operator of `bureau_id`'s service with `access`: `op-<bureau>-read` / `op-<bureau>-admin`.
pub fn operator_id(bureau_id: &str, access: OperatorAccess) -> String {
    match access {
        OperatorAccess::Read => format!("op-{bureau_id}-read"),
        OperatorAccess::Admin => format!("op-{bureau_id}-admin"),
    }
}

/// A bureau process of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Process {
    Intake,
    HomeJiangxi,
    HomeSichuan,
    Issuance,
    Registry,
}

impl Process {
    pub const ALL: [Self; 5] = [Self::Registry, Self::HomeJiangxi, Self::HomeSichuan, Self::Issuance, Self::Intake];

    pub fn bureau_id(self) -> &'static str {
        match self {
            Self::Intake => STATION,
            Self::HomeJiangxi => HOME_JIANGXI,
            Self::HomeSichuan => HOME_SICHUAN,
            Self::Issuance => PRODUCER,
            Self::Registry => REGISTRY,
        }
    }

    /// The binary (and configuration name) of the service it runs.
    pub fn service(self) -> &'static str {
        match self {
            Self::Intake => "intake",
            Self::HomeJiangxi | Self::HomeSichuan => "verification",
            Self::Issuance => "issuance",
            Self::Registry => "registry",
        }
    }

    /// The default port on 127.0.0.1.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Intake => 50051,
            Self::HomeJiangxi => 50052,
            Self::Issuance => 50053,
            Self::Registry => 50054,
            Self::HomeSichuan => 50056,
        }
    }

    /// Host names of the bureau's replicas in `docker-compose.yml` (the registry runs two).
    pub fn compose_hosts(self) -> &'static [&'static str] {
        match self {
            Self::Intake => &["intake"],
            Self::HomeJiangxi => &["verification-jiangxi"],
            Self::HomeSichuan => &["verification-sichuan"],
            Self::Issuance => &["issuance"],
            Self::Registry => &["registry", "registry-2"],
        }
    }

    /// Host names of the bureau's replicas in `deploy/k8s` (Services of the namespace; the
    /// registry's three StatefulSet replicas behind its headless Service).
    pub fn k8s_hosts(self) -> &'static [&'static str] {
        match self {
            Self::Registry => &["registry-0.registry", "registry-1.registry", "registry-2.registry"],
            other => other.compose_hosts(),
        }
    }

    /// Short name for files and databases.
    pub fn slug(self) -> &'static str {
        match self {
            Self::Intake => "intake",
            Self::HomeJiangxi => "verification_jiangxi",
            Self::HomeSichuan => "verification_sichuan",
            Self::Issuance => "issuance",
            Self::Registry => "registry",
        }
    }
}

/// One signing key of a bureau: its directory id and window, and the private key.
#[derive(Debug, Clone)]
pub struct SuiteKey {
    pub id: String,
    pub key: SigningKey,
    pub valid_from: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
}

/// When generated keys become valid: early enough for any demo or test clock.
pub fn generated_keys_valid_from() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z").map(|at| at.to_utc()).unwrap_or(DateTime::UNIX_EPOCH)
}

/// The bureaus that sign: the home bureaus (decisions) and the registry (status answers).
pub const SIGNING_BUREAUS: [&str; 3] = [HOME_JIANGXI, HOME_SICHUAN, REGISTRY];

/// Signing keys of the bureaus that sign, by bureau id, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_bureau: BTreeMap<String, Vec<SuiteKey>>,
}

impl Keys {
    /// Every key of `bureau`, oldest first.
    pub fn of(&self, bureau: &str) -> &[SuiteKey] {
        self.by_bureau.get(bureau).map(Vec::as_slice).unwrap_or_default()
    }

    /// The key of `bureau` named `key_id`.
    pub fn get(&self, bureau: &str, key_id: &str) -> Option<&SuiteKey> {
        self.of(bureau).iter().find(|k| k.id == key_id)
    }

    pub fn push(&mut self, bureau: &str, key: SuiteKey) {
        self.by_bureau.entry(bureau.to_owned()).or_default().push(key);
    }

    pub fn get_mut(&mut self, bureau: &str, key_id: &str) -> Option<&mut SuiteKey> {
        self.by_bureau.get_mut(bureau)?.iter_mut().find(|k| k.id == key_id)
    }

    fn entries(&self, bureau: &str) -> Vec<KeyEntry> {
        self.of(bureau)
            .iter()
            .map(|k| KeyEntry {
                valid_until: k.valid_until,
                ..KeyEntry::new(&k.id, &k.key.verifying_key(), k.valid_from)
            })
            .collect()
    }
}

/// The newest key of a bureau (the one it signs with unless a rotation is under way).
impl std::ops::Index<&str> for Keys {
    type Output = SuiteKey;

    fn index(&self, bureau: &str) -> &SuiteKey {
        match self.of(bureau).last() {
            Some(key) => key,
            None => panic!("no key for {bureau}"),
        }
    }
}

/// The folder of `bureau`'s private key files (`<key id>.key`): its `signing.key_dir`.
pub fn key_dir(dir: &Path, bureau: &str) -> PathBuf {
    dir.join("keys").join(bureau)
}

/// A fresh key id: the bureau, the day and a random suffix.
pub fn new_key_id(bureau: &str) -> String {
    format!("{bureau}-{}-{:04x}", Utc::now().format("%Y%m%d"), rand::random::<u16>())
}

/// Generates a key for `bureau` valid from `valid_from`, writes it to its key folder (mode 0600)
/// and adds it to `keys`. The directory is not rewritten.
pub fn add_key(dir: &Path, keys: &mut Keys, bureau: &str, id: &str, valid_from: DateTime<Utc>) -> anyhow::Result<()> {
    let folder = key_dir(dir, bureau);
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let key = generate_signing_key();
    write_signing_key(&folder.join(format!("{id}{KEY_FILE_SUFFIX}")), &key)?;
    keys.push(bureau, SuiteKey { id: id.to_owned(), key, valid_from, valid_until: None });
    Ok(())
}

/// Generates keys for the bureaus that sign and writes them to `dir/keys/<bureau>/` (mode 0600),
/// and writes `dir/directory.toml` with their public keys and the given ports on loopback.
pub fn write_keys_and_directory(dir: &Path, ports: &BTreeMap<Process, u16>) -> anyhow::Result<Keys> {
    write_keys_and_directory_with(dir, |process| vec![loopback_endpoint(ports[&process])])
}

/// As [`write_keys_and_directory`], with each bureau's endpoints (one, or one per replica) given
/// by `endpoints`.
pub fn write_keys_and_directory_with(dir: &Path, endpoints: impl Fn(Process) -> Vec<String>) -> anyhow::Result<Keys> {
    let keys = generate_keys(dir)?;
    write_directory(dir, &keys, endpoints)?;
    Ok(keys)
}

pub fn loopback_endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// `https://127.0.0.1:<port>` with mutual TLS, `http://...` without.
pub fn loopback_endpoint_with(tls: bool, port: u16) -> String {
    format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" })
}

/// Generates one key (with a generated id) for each bureau that signs, in `dir/keys/<bureau>/`.
/// Key files of earlier runs are removed: a fresh start has fresh keys.
pub fn generate_keys(dir: &Path) -> anyhow::Result<Keys> {
    let mut keys = Keys::default();
    for bureau in SIGNING_BUREAUS {
        let folder = key_dir(dir, bureau);
        if folder.exists() {
            std::fs::remove_dir_all(&folder).with_context(|| format!("removing {}", folder.display()))?;
        }
        add_key(dir, &mut keys, bureau, &new_key_id(bureau), generated_keys_valid_from())?;
    }
    Ok(keys)
}

/// Writes `dir/directory.toml`: every bureau with its endpoints, the signing ones with their keys,
/// the demo relying party, and a read and an admin operator for every bureau.
pub fn write_directory(dir: &Path, keys: &Keys, endpoints: impl Fn(Process) -> Vec<String>) -> anyhow::Result<()> {
    let entry = |process: Process, role, name: &str| {
        let id = process.bureau_id();
        // One endpoint is written as `endpoint`, as a directory of single processes always was.
        let (endpoint, endpoints) = match <[String; 1]>::try_from(endpoints(process)) {
            Ok([one]) => (one, Vec::new()),
            Err(several) => (String::new(), several),
        };
        BureauEntry {
            id: id.into(),
            role,
            name: name.into(),
            jurisdiction: vec![],
            region: String::new(),
            endpoint,
            endpoints,
            keys: keys.entries(id),
        }
    };
    let directory = DirectoryFile {
        bureaus: vec![
            BureauEntry {
                region: STATION_REGION.into(),
                ..entry(Process::Intake, Role::Intake, "Hangzhou Xihu accepting station (Zhejiang)")
            },
            BureauEntry {
                jurisdiction: vec!["36".into()],
                ..entry(Process::HomeJiangxi, Role::Verification, "Jiangxi household registration bureau")
            },
            BureauEntry {
                jurisdiction: vec!["51".into()],
                ..entry(Process::HomeSichuan, Role::Verification, "Sichuan household registration bureau")
            },
            entry(Process::Issuance, Role::Issuance, "Zhejiang entrusted card producer"),
            entry(Process::Registry, Role::Registry, "National loss registry"),
        ],
        relying_parties: vec![RelyingPartyEntry { id: RELYING_PARTY.into(), name: "Demo bank (card checks)".into() }],
        operators: Process::ALL
            .iter()
            .flat_map(|process| {
                [OperatorAccess::Read, OperatorAccess::Admin].map(|access| OperatorEntry {
                    id: operator_id(process.bureau_id(), access),
                    bureau: process.bureau_id().into(),
                    access,
                })
            })
            .collect(),
    };
    // Written to a temporary file and renamed: a service re-reading the directory never sees half of it.
    let path = dir.join("directory.toml");
    let temporary = dir.join("directory.toml.new");
    directory.write(&temporary)?;
    std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
