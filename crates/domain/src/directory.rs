//! The directory of bureaus: who they are, their role, jurisdiction, endpoint and public key.
use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An accepting station.
    Intake,
    /// A home bureau (household registration).
    Verification,
    /// An entrusted producer.
    Issuance,
    /// The national loss registry.
    Registry,
}

/// What an operator may do at the one bureau whose service he operates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAccess {
    /// Reads only: Get*, List*, Watch*, audit verification.
    Read,
    /// Reads and acts: counter work, register entries, operator retries.
    Admin,
}

/// Who a caller is, as the directory knows him: the identity a peer certificate names, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A bureau of the directory (station, home bureau, producer, registry).
    Bureau { id: String, role: Role },
    /// A bank, hotel, airline...: may only ask whether a card is valid.
    RelyingParty { id: String },
    /// A person operating one bureau's service.
    Operator { id: String, bureau_id: String, access: OperatorAccess },
}

impl Principal {
    /// The identity named in the certificate (and in the directory).
    pub fn id(&self) -> &str {
        match self {
            Self::Bureau { id, .. } | Self::RelyingParty { id } | Self::Operator { id, .. } => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bureau {
    pub id: String,
    pub role: Role,
    pub name: String,
    /// Two-digit province codes of the household registrations it holds (home bureaus only).
    pub jurisdiction: Vec<String>,
    /// Six-digit address code of the place it serves (stations).
    pub region: String,
    /// gRPC endpoint, e.g. `http://127.0.0.1:50052`.
    pub endpoint: String,
    /// Ed25519 key its decisions are signed with (home bureaus only).
    pub public_key: Option<VerifyingKey>,
}

impl Bureau {
    pub fn holds_jurisdiction_over(&self, province: &str) -> bool {
        self.role == Role::Verification && self.jurisdiction.iter().any(|p| p == province)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    bureaus: HashMap<String, Bureau>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("bureau id {0:?} is listed twice")]
    DuplicateId(String),
    #[error("province {province} is in the jurisdiction of both {first} and {second}")]
    OverlappingJurisdiction { province: String, first: String, second: String },
    #[error("home bureau {0:?} has no public key")]
    MissingKey(String),
}

impl Directory {
    pub fn new(bureaus: Vec<Bureau>) -> Result<Self, DirectoryError> {
        let mut by_id = HashMap::new();
        let mut province_owner: HashMap<String, String> = HashMap::new();
        for bureau in bureaus {
            if bureau.role == Role::Verification {
                if bureau.public_key.is_none() {
                    return Err(DirectoryError::MissingKey(bureau.id));
                }
                for province in &bureau.jurisdiction {
                    if let Some(first) = province_owner.insert(province.clone(), bureau.id.clone()) {
                        return Err(DirectoryError::OverlappingJurisdiction {
                            province: province.clone(),
                            first,
                            second: bureau.id.clone(),
                        });
                    }
                }
            }
            let id = bureau.id.clone();
            if by_id.insert(id.clone(), bureau).is_some() {
                return Err(DirectoryError::DuplicateId(id));
            }
        }
        Ok(Self { bureaus: by_id })
    }

    pub fn get(&self, id: &str) -> Option<&Bureau> {
        self.bureaus.get(id)
    }

    /// A bureau with this id and role.
    pub fn get_with_role(&self, id: &str, role: Role) -> Option<&Bureau> {
        self.get(id).filter(|b| b.role == role)
    }

    /// N3: the home bureau holding household registrations of `province`.
    pub fn home_bureau_for(&self, province: &str) -> Option<&Bureau> {
        self.bureaus.values().find(|b| b.holds_jurisdiction_over(province))
    }

    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Bureau> {
        self.bureaus.values().filter(move |b| b.role == role)
    }
}
