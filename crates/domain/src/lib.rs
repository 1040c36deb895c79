//! The rulebook (docs/RULES.md) as pure types and functions. Every function that depends on the date
//! takes it as an argument: time is injected by the services, never read here.
#![forbid(unsafe_code)]

pub mod application;
pub mod biometrics;
pub mod card;
pub mod decision;
pub mod directory;
pub mod id_number;
pub mod mask;
pub mod policy;
pub mod register;
pub mod status;

pub use application::{ApplicationKind, ApplicationState, RefusalReason};
pub use biometrics::{BiometricMatcher, MatchOutcome, SimulatedMatcher};
pub use card::{CardStatus, CardTerm, StoredCardStatus};
pub use decision::{CardData, Decision, DecisionError, DecisionPurpose, Particulars, SignedDecision};
pub use directory::{Bureau, BureauKey, Directory, KeyWindow, Operator, OperatorAccess, Principal, RelyingParty, Role};
pub use id_number::{IdNumber, IdNumberError, Sex};
pub use policy::{DocumentKind, Phase, PolicyTimeline};
pub use register::{Credit, Registration};
