//! The directory of bureaus: who they are, their role, jurisdiction, endpoints and signing keys.
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
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
    /// gRPC endpoints, e.g. `http://127.0.0.1:50052`: one, or one per replica. Callers spread their
    /// calls over them and fail over between them.
    pub endpoints: Vec<String>,
    /// Ed25519 keys it signs with (home bureaus: decisions; the registry: status answers), each
    /// with its id and validity window. Several at once during a rotation.
    pub keys: Vec<BureauKey>,
}

/// One signing key of a bureau and the window in which what it signs is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BureauKey {
    /// Named by every signed message, so the verifier knows which key to use.
    pub id: String,
    pub public_key: VerifyingKey,
    pub valid_from: DateTime<Utc>,
    /// None: until a later directory retires it.
    pub valid_until: Option<DateTime<Utc>>,
}

/// Where an instant lies relative to a key's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWindow {
    NotYetValid,
    Valid,
    Retired,
}

impl BureauKey {
    pub fn window_at(&self, at: DateTime<Utc>) -> KeyWindow {
        if at < self.valid_from {
            KeyWindow::NotYetValid
        } else if self.valid_until.is_some_and(|until| at >= until) {
            KeyWindow::Retired
        } else {
            KeyWindow::Valid
        }
    }

    pub fn is_valid_at(&self, at: DateTime<Utc>) -> bool {
        self.window_at(at) == KeyWindow::Valid
    }
}

impl Bureau {
    /// A bureau with only its id and role, unnamed, holding no jurisdiction, without region,
    /// endpoint or keys; the `with_*` methods add those (for directories built in code).
    pub fn new(id: impl Into<String>, role: Role) -> Self {
        Self {
            id: id.into(),
            role,
            name: String::new(),
            jurisdiction: Vec::new(),
            region: String::new(),
            endpoints: Vec::new(),
            keys: Vec::new(),
        }
    }

    pub fn with_name(self, name: impl Into<String>) -> Self {
        Self { name: name.into(), ..self }
    }

    pub fn with_jurisdiction(self, provinces: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self { jurisdiction: provinces.into_iter().map(Into::into).collect(), ..self }
    }

    pub fn with_endpoints(self, endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self { endpoints: endpoints.into_iter().map(Into::into).collect(), ..self }
    }

    pub fn with_keys(self, keys: Vec<BureauKey>) -> Self {
        Self { keys, ..self }
    }

    pub fn holds_jurisdiction_over(&self, province: &str) -> bool {
        self.role == Role::Verification && self.jurisdiction.iter().any(|p| p == province)
    }

    /// The key this bureau lists under `key_id`.
    pub fn key(&self, key_id: &str) -> Option<&BureauKey> {
        self.keys.iter().find(|k| k.id == key_id)
    }
}

/// A bank, hotel, airline... allowed to ask the registry whether a card is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelyingParty {
    pub id: String,
    pub name: String,
}

/// A person operating the service of one bureau.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub id: String,
    /// The bureau whose service he operates.
    pub bureau_id: String,
    pub access: OperatorAccess,
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    bureaus: HashMap<String, Bureau>,
    relying_parties: HashMap<String, RelyingParty>,
    operators: HashMap<String, Operator>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("bureau id {0:?} is listed twice")]
    DuplicateId(String),
    #[error("province {province} is in the jurisdiction of both {first} and {second}")]
    OverlappingJurisdiction { province: String, first: String, second: String },
    #[error("home bureau {0:?} lists no signing key")]
    MissingKey(String),
    #[error("bureau {bureau:?} lists key id {key_id:?} twice")]
    DuplicateKeyId { bureau: String, key_id: String },
    #[error("bureau {bureau:?} key {key_id:?}: valid_from must be before valid_until")]
    EmptyKeyWindow { bureau: String, key_id: String },
    #[error("bureau {bureau:?} has a key with an empty id")]
    EmptyKeyId { bureau: String },
    /// Bureaus, relying parties and operators share one name space: a certificate names one of them.
    #[error("principal id {0:?} is listed twice (bureaus, relying parties and operators share one id space)")]
    DuplicatePrincipal(String),
    #[error("operator {operator:?} operates bureau {bureau:?}, which is not in the directory")]
    UnknownOperatedBureau { operator: String, bureau: String },
}

/// Key ids are unique per bureau (a signed message names one key), and every window is non-empty.
fn check_keys(bureau: &Bureau) -> Result<(), DirectoryError> {
    let mut seen = HashSet::new();
    for key in &bureau.keys {
        if key.id.trim().is_empty() {
            return Err(DirectoryError::EmptyKeyId { bureau: bureau.id.clone() });
        }
        if !seen.insert(key.id.as_str()) {
            return Err(DirectoryError::DuplicateKeyId { bureau: bureau.id.clone(), key_id: key.id.clone() });
        }
        if key.valid_until.is_some_and(|until| until <= key.valid_from) {
            return Err(DirectoryError::EmptyKeyWindow { bureau: bureau.id.clone(), key_id: key.id.clone() });
        }
    }
    Ok(())
}

impl Directory {
    pub fn new(bureaus: Vec<Bureau>) -> Result<Self, DirectoryError> {
        let mut by_id = HashMap::new();
        let mut province_owner: HashMap<String, String> = HashMap::new();
        for bureau in bureaus {
            check_keys(&bureau)?;
            if bureau.role == Role::Verification {
                if bureau.keys.is_empty() {
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
        Ok(Self { bureaus: by_id, ..Self::default() })
    }

    /// Adds the principals that are not bureaus: relying parties and operators. Ids are unique
    /// across bureaus, relying parties and operators, and an operator's bureau must be listed.
    pub fn with_principals(
        mut self,
        relying_parties: Vec<RelyingParty>,
        operators: Vec<Operator>,
    ) -> Result<Self, DirectoryError> {
        for party in relying_parties {
            if self.principal(&party.id).is_some() {
                return Err(DirectoryError::DuplicatePrincipal(party.id));
            }
            self.relying_parties.insert(party.id.clone(), party);
        }
        for operator in operators {
            if self.principal(&operator.id).is_some() {
                return Err(DirectoryError::DuplicatePrincipal(operator.id));
            }
            if !self.bureaus.contains_key(&operator.bureau_id) {
                return Err(DirectoryError::UnknownOperatedBureau {
                    operator: operator.id,
                    bureau: operator.bureau_id,
                });
            }
            self.operators.insert(operator.id.clone(), operator);
        }
        Ok(self)
    }

    /// Who `id` is: a bureau, a relying party or an operator; `None` if the directory does not
    /// know it.
    pub fn principal(&self, id: &str) -> Option<Principal> {
        if let Some(bureau) = self.bureaus.get(id) {
            return Some(Principal::Bureau { id: bureau.id.clone(), role: bureau.role });
        }
        if let Some(party) = self.relying_parties.get(id) {
            return Some(Principal::RelyingParty { id: party.id.clone() });
        }
        self.operators.get(id).map(|operator| Principal::Operator {
            id: operator.id.clone(),
            bureau_id: operator.bureau_id.clone(),
            access: operator.access,
        })
    }

    /// Every principal id (bureaus, relying parties, operators), e.g. to issue certificates.
    pub fn principal_ids(&self) -> impl Iterator<Item = &str> {
        self.bureaus.keys().chain(self.relying_parties.keys()).chain(self.operators.keys()).map(String::as_str)
    }

    pub fn relying_parties(&self) -> impl Iterator<Item = &RelyingParty> {
        self.relying_parties.values()
    }

    pub fn operators(&self) -> impl Iterator<Item = &Operator> {
        self.operators.values()
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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use ed25519_dalek::SigningKey;

    use super::*;

    fn at(year: i32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap()
    }

    fn key(id: &str, from: i32, until: Option<i32>) -> BureauKey {
        BureauKey {
            id: id.into(),
            public_key: SigningKey::from_bytes(&[7; 32]).verifying_key(),
            valid_from: at(from),
            valid_until: until.map(at),
        }
    }

    fn home(keys: Vec<BureauKey>) -> Bureau {
        Bureau::new("home", Role::Verification).with_jurisdiction(["36"]).with_keys(keys)
    }

    #[test]
    fn a_key_window_is_closed_at_its_start_and_open_at_its_end() {
        let k = key("k1", 2100, Some(2101));
        assert_eq!(k.window_at(at(2099)), KeyWindow::NotYetValid);
        assert_eq!(k.window_at(at(2100)), KeyWindow::Valid);
        assert_eq!(k.window_at(at(2101) - chrono::Duration::nanoseconds(1)), KeyWindow::Valid);
        assert_eq!(k.window_at(at(2101)), KeyWindow::Retired);
        assert!(key("k2", 2100, None).is_valid_at(at(3000)));
    }

    #[test]
    fn keys_are_found_by_id() {
        let bureau = home(vec![key("k1", 2100, None), key("k2", 2101, None)]);
        assert_eq!(bureau.key("k2").map(|k| k.valid_from), Some(at(2101)));
        assert!(bureau.key("k3").is_none());
    }

    #[test]
    fn duplicate_key_ids_empty_windows_and_keyless_home_bureaus_are_refused() {
        let twice = home(vec![key("k1", 2100, None), key("k1", 2101, None)]);
        assert!(matches!(Directory::new(vec![twice]), Err(DirectoryError::DuplicateKeyId { .. })));
        let empty = home(vec![key("k1", 2100, Some(2100))]);
        assert!(matches!(Directory::new(vec![empty]), Err(DirectoryError::EmptyKeyWindow { .. })));
        let backwards = home(vec![key("k1", 2101, Some(2100))]);
        assert!(matches!(Directory::new(vec![backwards]), Err(DirectoryError::EmptyKeyWindow { .. })));
        let unnamed = home(vec![key(" ", 2100, None)]);
        assert!(matches!(Directory::new(vec![unnamed]), Err(DirectoryError::EmptyKeyId { .. })));
        assert!(matches!(Directory::new(vec![home(vec![])]), Err(DirectoryError::MissingKey(_))));
        assert!(Directory::new(vec![home(vec![key("k1", 2100, Some(2101)), key("k2", 2100, None)])]).is_ok());
    }

    fn bureau(id: &str, role: Role) -> Bureau {
        Bureau {
            id: id.into(),
            role,
            name: id.into(),
            jurisdiction: Vec::new(),
            region: String::new(),
            endpoints: vec!["https://127.0.0.1:1".into()],
            keys: Vec::new(),
        }
    }

    fn directory() -> Directory {
        Directory::new(vec![bureau("registry-national", Role::Registry), bureau("station", Role::Intake)]).unwrap()
    }

    fn operator(id: &str, bureau_id: &str) -> Operator {
        Operator { id: id.into(), bureau_id: bureau_id.into(), access: OperatorAccess::Read }
    }

    #[test]
    fn principals_resolve_bureaus_relying_parties_and_operators() {
        let directory = directory()
            .with_principals(
                vec![RelyingParty { id: "bank-demo".into(), name: "Demo bank".into() }],
                vec![operator("op-registry-read", "registry-national")],
            )
            .unwrap();
        assert_eq!(
            directory.principal("station"),
            Some(Principal::Bureau { id: "station".into(), role: Role::Intake })
        );
        assert_eq!(directory.principal("bank-demo"), Some(Principal::RelyingParty { id: "bank-demo".into() }));
        assert_eq!(
            directory.principal("op-registry-read"),
            Some(Principal::Operator {
                id: "op-registry-read".into(),
                bureau_id: "registry-national".into(),
                access: OperatorAccess::Read
            })
        );
        assert_eq!(directory.principal("stranger"), None);
        assert_eq!(directory.principal_ids().count(), 4);
    }

    #[test]
    fn principal_ids_are_unique_across_kinds_and_operators_need_their_bureau() {
        let clash =
            directory().with_principals(vec![RelyingParty { id: "station".into(), name: String::new() }], vec![]);
        assert_eq!(clash.unwrap_err(), DirectoryError::DuplicatePrincipal("station".into()));
        let clash = directory().with_principals(
            vec![RelyingParty { id: "bank".into(), name: String::new() }],
            vec![operator("bank", "station")],
        );
        assert_eq!(clash.unwrap_err(), DirectoryError::DuplicatePrincipal("bank".into()));
        let orphan = directory().with_principals(vec![], vec![operator("op-x", "nowhere")]);
        assert!(matches!(orphan.unwrap_err(), DirectoryError::UnknownOperatedBureau { .. }));
    }
}
