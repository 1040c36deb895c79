//! The demo topology: one station, two home bureaus, the producer and the registry; key
//! generation and the directory file.
use std::{collections::BTreeMap, path::Path};

use anyhow::Context;
use ed25519_dalek::SigningKey;
use yidi_common::directory::{
    BureauEntry, DirectoryFile, OperatorEntry, RelyingPartyEntry, encode_public_key, generate_signing_key,
    write_signing_key,
};
use yidi_domain::{OperatorAccess, Role};

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

    /// Host name of the bureau in `docker-compose.yml`.
    pub fn compose_host(self) -> &'static str {
        match self {
            Self::Intake => "intake",
            Self::HomeJiangxi => "verification-jiangxi",
            Self::HomeSichuan => "verification-sichuan",
            Self::Issuance => "issuance",
            Self::Registry => "registry",
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

/// Signing keys of the home bureaus, by bureau id.
pub type Keys = BTreeMap<String, SigningKey>;

/// Generates fresh keys for the home bureaus, writes them to `dir/keys/<bureau>.key` (mode 0600),
/// and writes `dir/directory.toml` with their public keys and the given ports on loopback.
pub fn write_keys_and_directory(dir: &Path, ports: &BTreeMap<Process, u16>) -> anyhow::Result<Keys> {
    write_keys_and_directory_with(dir, |process| loopback_endpoint(ports[&process]))
}

/// As [`write_keys_and_directory`], with each bureau's endpoint given by `endpoint`.
pub fn write_keys_and_directory_with(dir: &Path, endpoint: impl Fn(Process) -> String) -> anyhow::Result<Keys> {
    let keys = generate_keys(dir)?;
    write_directory(dir, &keys, endpoint)?;
    Ok(keys)
}

pub fn loopback_endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// `https://127.0.0.1:<port>` with mutual TLS, `http://...` without.
pub fn loopback_endpoint_with(tls: bool, port: u16) -> String {
    format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" })
}

/// Generates fresh keys for the home bureaus and writes them to `dir/keys/<bureau>.key` (mode 0600).
pub fn generate_keys(dir: &Path) -> anyhow::Result<Keys> {
    let key_dir = dir.join("keys");
    std::fs::create_dir_all(&key_dir).with_context(|| format!("creating {}", key_dir.display()))?;
    let mut keys = Keys::new();
    for home in [HOME_JIANGXI, HOME_SICHUAN] {
        let key = generate_signing_key();
        write_signing_key(&key_dir.join(format!("{home}.key")), &key)?;
        keys.insert(home.to_owned(), key);
    }
    Ok(keys)
}

/// Writes `dir/directory.toml`: every bureau with its endpoint, the home bureaus with their public
/// keys, the demo relying party, and a read and an admin operator for every bureau.
pub fn write_directory(dir: &Path, keys: &Keys, endpoint: impl Fn(Process) -> String) -> anyhow::Result<()> {
    let public = |id: &str| keys.get(id).map(|key| encode_public_key(&key.verifying_key())).unwrap_or_default();
    let entry = |id: &str, role, name: &str| BureauEntry {
        id: id.into(),
        role,
        name: name.into(),
        jurisdiction: vec![],
        region: String::new(),
        endpoint: String::new(),
        public_key: String::new(),
    };
    let directory = DirectoryFile {
        bureaus: vec![
            BureauEntry {
                region: STATION_REGION.into(),
                endpoint: endpoint(Process::Intake),
                ..entry(STATION, Role::Intake, "Hangzhou Xihu accepting station (Zhejiang)")
            },
            BureauEntry {
                jurisdiction: vec!["36".into()],
                endpoint: endpoint(Process::HomeJiangxi),
                public_key: public(HOME_JIANGXI),
                ..entry(HOME_JIANGXI, Role::Verification, "Jiangxi household registration bureau")
            },
            BureauEntry {
                jurisdiction: vec!["51".into()],
                endpoint: endpoint(Process::HomeSichuan),
                public_key: public(HOME_SICHUAN),
                ..entry(HOME_SICHUAN, Role::Verification, "Sichuan household registration bureau")
            },
            BureauEntry {
                endpoint: endpoint(Process::Issuance),
                ..entry(PRODUCER, Role::Issuance, "Zhejiang entrusted card producer")
            },
            BureauEntry {
                endpoint: endpoint(Process::Registry),
                ..entry(REGISTRY, Role::Registry, "National loss registry")
            },
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
    directory.write(&dir.join("directory.toml"))?;
    Ok(())
}
