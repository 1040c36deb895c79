//! Who may call what: the access matrix, denied by default, enforced in one tower layer.
//!
//! Every RPC the suite serves is listed in [`MATRIX`] with the grants that admit a caller; a method
//! that is not listed admits nobody. The contract's RPCs get theirs from their `(yidi.v1.policy)`
//! option ([`yidi_proto::policy`]); health and reflection, the server's own, are open to members.
//! The layer runs after the TLS identity layer has put the
//! authenticated [`Caller`] into the request's extensions: no caller → UNAUTHENTICATED, a caller
//! without a grant → PERMISSION_DENIED naming the role that was missing. Denied calls are written to
//! the audit trail. Finer checks that need the request's content (a station may ask only about its
//! own applications, a producer may register only its own cards) stay with the services, which read
//! the same [`Caller`].
//!
//! docs/ARCHITECTURE.md's access table is generated from [`MATRIX`] by [`markdown_table`] and a test
//! keeps the two equal, so the documentation cannot drift from what is enforced.
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    sync::{
        Arc, LazyLock, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use tokio::sync::mpsc;
use tonic::{
    Code, Status,
    body::Body,
    codegen::http::{Request, Response},
};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};
use yidi_domain::{OperatorAccess, Principal, Role};

use crate::{
    caller::{Caller, caller_of},
    error::ERROR_DOMAIN,
};

/// One way a caller can be admitted to a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Any bureau of this role.
    Bureau(Role),
    /// A relying party (bank, hotel, airline...).
    RelyingParty,
    /// An operator of the serving bureau, read-only or admin.
    OperatorRead,
    /// An operator of the serving bureau with admin access.
    OperatorAdmin,
    /// Anyone the directory knows: health and reflection.
    AnyMember,
}

impl Grant {
    /// The role as the README and PERMISSION_DENIED messages name it.
    pub fn role_name(self) -> &'static str {
        match self {
            Self::Bureau(Role::Intake) => "intake station",
            Self::Bureau(Role::Verification) => "home bureau",
            Self::Bureau(Role::Issuance) => "producer",
            Self::Bureau(Role::Registry) => "registry",
            Self::RelyingParty => "relying party",
            Self::OperatorRead => "operator (read) of this bureau",
            Self::OperatorAdmin => "operator (admin) of this bureau",
            Self::AnyMember => "any directory member",
        }
    }

    /// Whether `principal`, calling the bureau `serving_bureau`, holds this grant.
    pub fn admits(self, principal: &Principal, serving_bureau: &str) -> bool {
        match (self, principal) {
            (Self::AnyMember, _) => true,
            (Self::Bureau(role), Principal::Bureau { role: caller_role, .. }) => role == *caller_role,
            (Self::RelyingParty, Principal::RelyingParty { .. }) => true,
            (Self::OperatorRead, Principal::Operator { bureau_id, .. }) => bureau_id == serving_bureau,
            (Self::OperatorAdmin, Principal::Operator { bureau_id, access, .. }) => {
                bureau_id == serving_bureau && *access == OperatorAccess::Admin
            }
            _ => false,
        }
    }
}

/// What a principal is, in the words of [`Grant::role_name`].
pub fn principal_role_name(principal: &Principal) -> &'static str {
    match principal {
        Principal::Bureau { role, .. } => Grant::Bureau(*role).role_name(),
        Principal::RelyingParty { .. } => Grant::RelyingParty.role_name(),
        Principal::Operator { access: OperatorAccess::Read, .. } => "operator (read)",
        Principal::Operator { access: OperatorAccess::Admin, .. } => "operator (admin)",
    }
}

/// The grants of one method. `method == "*"`: every method of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodRule {
    pub service: &'static str,
    pub method: &'static str,
    pub grants: &'static [Grant],
}

const STATION: Grant = Grant::Bureau(Role::Intake);
const HOME: Grant = Grant::Bureau(Role::Verification);
const PRODUCER: Grant = Grant::Bureau(Role::Issuance);
const READ: Grant = Grant::OperatorRead;
const ADMIN: Grant = Grant::OperatorAdmin;

const fn rule(service: &'static str, method: &'static str, grants: &'static [Grant]) -> MethodRule {
    MethodRule { service, method, grants }
}

/// The access matrix: the policy of every RPC of the contract, then the plumbing's. Anything not
/// listed here is denied.
pub static MATRIX: LazyLock<Vec<MethodRule>> = LazyLock::new(|| {
    let contract = yidi_proto::policy::method_policies().iter().map(|policy| MethodRule {
        service: &policy.service,
        method: &policy.method,
        // Built once per process: the grants live as long as the matrix.
        grants: Vec::leak(policy.grants.iter().filter_map(|g| from_contract(*g)).collect()),
    });
    contract.chain(PLUMBING.iter().copied()).collect()
});

/// The server's own services, which are not in the contract: open to anyone the directory knows.
const PLUMBING: &[MethodRule] = &[
    rule("grpc.health.v1.Health", "*", &[Grant::AnyMember]),
    rule("grpc.reflection.v1.ServerReflection", "*", &[Grant::AnyMember]),
    rule("grpc.reflection.v1alpha.ServerReflection", "*", &[Grant::AnyMember]),
];

/// The grant of the contract's `yidi.v1.Grant`; GRANT_UNSPECIFIED admits nobody.
fn from_contract(grant: yidi_proto::v1::Grant) -> Option<Grant> {
    use yidi_proto::v1::Grant as Contract;
    Some(match grant {
        Contract::Unspecified => return None,
        Contract::Station => STATION,
        Contract::HomeBureau => HOME,
        Contract::Producer => PRODUCER,
        Contract::Registry => Grant::Bureau(Role::Registry),
        Contract::RelyingParty => Grant::RelyingParty,
        Contract::OperatorRead => READ,
        Contract::OperatorAdmin => ADMIN,
        Contract::AnyMember => Grant::AnyMember,
    })
}

/// The rule for a gRPC path `/package.Service/Method`, if any.
pub fn rule_for(path: &str) -> Option<&'static MethodRule> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    MATRIX
        .iter()
        .find(|r| r.service == service && r.method == method)
        .or_else(|| MATRIX.iter().find(|r| r.service == service && r.method == "*"))
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No authenticated caller (should not happen behind the TLS layer; denied all the same).
    Unauthenticated { path: String },
    /// The caller holds none of the grants the method needs.
    RoleMissing { path: String, caller: String, caller_role: &'static str, required: Vec<&'static str> },
}

impl Denial {
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated { .. } => Code::Unauthenticated,
            Self::RoleMissing { .. } => Code::PermissionDenied,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::Unauthenticated { path } => format!("{path} needs an authenticated caller"),
            Self::RoleMissing { path, caller, caller_role, required } if required.is_empty() => {
                format!("{path} is not open to anyone ({caller}, {caller_role}, was refused)")
            }
            Self::RoleMissing { path, caller, caller_role, required } => format!(
                "{path} needs the role {}; {caller} is {} {caller_role}",
                required.join(" or "),
                article(caller_role)
            ),
        }
    }

    pub fn to_status(&self) -> Status {
        let mut metadata = HashMap::new();
        let reason = match self {
            Self::Unauthenticated { path } => {
                metadata.insert("method".to_owned(), path.clone());
                "UNAUTHENTICATED"
            }
            Self::RoleMissing { path, caller, caller_role, required } => {
                metadata.insert("method".to_owned(), path.clone());
                metadata.insert("caller".to_owned(), caller.clone());
                metadata.insert("caller_role".to_owned(), (*caller_role).to_owned());
                metadata.insert("required_role".to_owned(), required.join(" | "));
                "ROLE_MISSING"
            }
        };
        let mut details = ErrorDetails::new();
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(self.code(), self.message(), details)
    }
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

/// Decides one call: `Ok` if `caller` holds a grant of the method at `path` on `serving_bureau`.
pub fn check(path: &str, caller: Option<&Caller>, serving_bureau: &str) -> Result<(), Denial> {
    let Some(caller) = caller else {
        return Err(Denial::Unauthenticated { path: path.to_owned() });
    };
    let grants = rule_for(path).map(|r| r.grants).unwrap_or_default();
    if grants.iter().any(|g| g.admits(&caller.principal, serving_bureau)) {
        return Ok(());
    }
    Err(Denial::RoleMissing {
        path: path.to_owned(),
        caller: caller.id().to_owned(),
        caller_role: principal_role_name(&caller.principal),
        required: grants.iter().map(|g| g.role_name()).collect(),
    })
}

/// The access table of docs/ARCHITECTURE.md: one row per method, one column per kind of caller.
pub fn markdown_table() -> String {
    let columns: [(&str, Grant); 7] = [
        ("station", STATION),
        ("home bureau", HOME),
        ("producer", PRODUCER),
        ("registry", Grant::Bureau(Role::Registry)),
        ("relying party", Grant::RelyingParty),
        ("operator (read)", READ),
        ("operator (admin)", ADMIN),
    ];
    let mut out = String::from("| method |");
    for (name, _) in &columns {
        out.push_str(&format!(" {name} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for rule in MATRIX.iter() {
        out.push_str(&format!("| `{}/{}` |", rule.service, rule.method));
        for (_, column) in &columns {
            // An admin operator holds the read grant too; "any member" admits every column.
            let admitted =
                rule.grants.iter().any(|g| *g == *column || *g == Grant::AnyMember || (*g == READ && *column == ADMIN));
            out.push_str(if admitted { " ✔ |" } else { " |" });
        }
        out.push('\n');
    }
    out
}

/// Where denied calls go: the serving bureau's audit trail, once its database is open.
///
/// Denials are handed to one writer task through a bounded queue, so a caller hammering a
/// forbidden method can neither slow the server down nor make it buffer without limit; what does
/// not fit is counted and logged instead.
#[derive(Clone, Default)]
pub struct DeniedCalls {
    queue: Arc<OnceLock<mpsc::Sender<DeniedCall>>>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for DeniedCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeniedCalls").field("dropped", &self.dropped.load(Ordering::Relaxed)).finish()
    }
}

/// A denied call as the audit trail records it (action `denied_call`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedCall {
    /// The caller's name, or `unknown` when it presented no identity.
    pub subject: String,
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`.
    pub outcome: &'static str,
    pub detail: String,
}

/// How many denials may wait for the audit writer.
const DENIAL_QUEUE: usize = 1024;

impl DeniedCalls {
    /// Starts handing denials to `write` (the audit trail's writer), one at a time, in order (once;
    /// later calls are ignored).
    pub fn start_recording<W, F>(&self, mut write: W)
    where
        W: FnMut(DeniedCall) -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        let (sender, mut receiver) = mpsc::channel::<DeniedCall>(DENIAL_QUEUE);
        if self.queue.set(sender).is_err() {
            return;
        }
        tokio::spawn(async move {
            while let Some(denied) = receiver.recv().await {
                write(denied).await;
            }
        });
    }

    /// Records one denial; never waits.
    pub fn record(&self, denial: &Denial) {
        tracing::warn!(code = ?denial.code(), denial = %denial.message(), "call denied");
        let (subject, outcome) = match denial {
            Denial::Unauthenticated { .. } => ("unknown".to_owned(), "UNAUTHENTICATED"),
            Denial::RoleMissing { caller, .. } => (caller.clone(), "PERMISSION_DENIED"),
        };
        let Some(queue) = self.queue.get() else { return };
        if queue.try_send(DeniedCall { subject, outcome, detail: denial.message() }).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped, "audit queue for denied calls is full: denial logged, not audited");
        }
    }
}

/// The tower layer enforcing [`MATRIX`] for the bureau `serving_bureau`.
#[derive(Debug, Clone)]
pub struct AccessLayer {
    /// `false` on a plaintext server (explicit `tls.plaintext`): no callers, nothing to decide.
    enforced: bool,
    serving_bureau: Arc<str>,
    denied: DeniedCalls,
}

impl AccessLayer {
    pub fn new(serving_bureau: &str, denied: DeniedCalls) -> Self {
        Self { enforced: true, serving_bureau: serving_bureau.into(), denied }
    }

    /// Lets every call through: for plaintext servers only.
    pub fn disabled() -> Self {
        Self { enforced: false, serving_bureau: "".into(), denied: DeniedCalls::default() }
    }

    pub fn denied_calls(&self) -> &DeniedCalls {
        &self.denied
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessControl<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessControl { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct AccessControl<S> {
    inner: S,
    layer: AccessLayer,
}

impl<S> Service<Request<Body>> for AccessControl<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !self.layer.enforced {
            return Either::Right(self.inner.call(request));
        }
        match check(request.uri().path(), caller_of(request.extensions()), &self.layer.serving_bureau) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(denial) => {
                self.layer.denied.record(&denial);
                Either::Left(ready(Ok(denial.to_status().into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use yidi_domain::{OperatorAccess, Principal, Role};

    use super::*;

    fn bureau(id: &str, role: Role) -> Caller {
        Caller { principal: Principal::Bureau { id: id.into(), role } }
    }

    fn operator(id: &str, bureau_id: &str, access: OperatorAccess) -> Caller {
        Caller { principal: Principal::Operator { id: id.into(), bureau_id: bureau_id.into(), access } }
    }

    fn bank() -> Caller {
        Caller { principal: Principal::RelyingParty { id: "bank".into() } }
    }

    fn denied_code(path: &str, caller: &Caller, serving: &str) -> Option<Code> {
        check(path, Some(caller), serving).err().map(|d| d.code())
    }

    #[test]
    fn s4_only_intake_stations_call_verify() {
        let path = "/yidi.v1.Verification/Verify";
        assert_eq!(check(path, Some(&bureau("zj-station", Role::Intake)), "sc-home"), Ok(()));
        for caller in [
            bureau("jx-home", Role::Verification),
            bureau("producer", Role::Issuance),
            bureau("registry", Role::Registry),
            bank(),
            operator("op", "sc-home", OperatorAccess::Admin),
        ] {
            let denial = check(path, Some(&caller), "sc-home").unwrap_err();
            assert_eq!(denial.code(), Code::PermissionDenied, "{caller:?}");
            assert!(denial.message().contains("needs the role intake station"), "{}", denial.message());
        }
    }

    #[test]
    fn s4_only_a_producer_registers_cards() {
        let path = "/yidi.v1.LossRegistry/RegisterCard";
        assert_eq!(check(path, Some(&bureau("producer", Role::Issuance)), "registry"), Ok(()));
        assert_eq!(denied_code(path, &bureau("zj-station", Role::Intake), "registry"), Some(Code::PermissionDenied));
        assert_eq!(
            denied_code(path, &operator("op", "registry", OperatorAccess::Admin), "registry"),
            Some(Code::PermissionDenied)
        );
    }

    #[test]
    fn c4_relying_parties_call_only_status_methods() {
        let allowed: Vec<&str> = MATRIX
            .iter()
            .filter(|r| r.grants.iter().any(|g| g.admits(&bank().principal, "registry")))
            .map(|r| r.method)
            .collect();
        assert_eq!(
            allowed,
            [
                "CheckCard",
                "CheckCards",
                "WatchRevocations",
                "GetStatusSnapshot",
                "ListStatusDeltas",
                "WatchStatusDeltas",
                "GetCardReceipt",
                "ReportLocalHits",
                "*",
                "*",
                "*"
            ]
        );
        let path = "/yidi.v1.LossRegistry/ListHits";
        let denial = check(path, Some(&bank()), "registry").unwrap_err();
        assert_eq!(
            denial.message(),
            "/yidi.v1.LossRegistry/ListHits needs the role home bureau or operator (read) of this bureau; \
             bank is a relying party"
        );
    }

    #[test]
    fn operators_act_only_at_their_own_bureau_and_read_operators_only_read() {
        let submit = "/yidi.v1.Intake/SubmitApplication";
        let get = "/yidi.v1.Intake/GetApplication";
        let admin = operator("clerk", "zj-station", OperatorAccess::Admin);
        let reader = operator("auditor", "zj-station", OperatorAccess::Read);
        assert_eq!(check(submit, Some(&admin), "zj-station"), Ok(()));
        assert_eq!(check(get, Some(&admin), "zj-station"), Ok(()));
        assert_eq!(check(get, Some(&reader), "zj-station"), Ok(()));
        assert_eq!(denied_code(submit, &reader, "zj-station"), Some(Code::PermissionDenied));
        assert_eq!(denied_code(submit, &admin, "sc-station"), Some(Code::PermissionDenied));
        assert_eq!(denied_code(get, &reader, "sc-station"), Some(Code::PermissionDenied));
        assert_eq!(denied_code("/yidi.v1.Audit/VerifyAuditChain", &reader, "sc-station"), Some(Code::PermissionDenied));
        assert_eq!(check("/yidi.v1.Audit/VerifyAuditChain", Some(&reader), "zj-station"), Ok(()));
    }

    #[test]
    fn methods_not_in_the_matrix_are_denied_to_everyone_and_no_caller_is_unauthenticated() {
        for caller in [bureau("zj-station", Role::Intake), bank(), operator("op", "registry", OperatorAccess::Admin)] {
            let denial = check("/yidi.v1.LossRegistry/DropAllCards", Some(&caller), "registry").unwrap_err();
            assert_eq!(denial.code(), Code::PermissionDenied);
            assert!(denial.message().contains("is not open to anyone"), "{}", denial.message());
        }
        assert_eq!(
            check("/not-a-grpc-path", Some(&bank()), "registry").map_err(|d| d.code()),
            Err(Code::PermissionDenied)
        );
        let denial = check("/yidi.v1.LossRegistry/CheckCard", None, "registry").unwrap_err();
        assert_eq!(denial.code(), Code::Unauthenticated);
    }

    #[test]
    fn health_and_reflection_are_open_to_every_member() {
        for caller in [bureau("zj-station", Role::Intake), bank(), operator("op", "elsewhere", OperatorAccess::Read)] {
            assert_eq!(check("/grpc.health.v1.Health/Check", Some(&caller), "registry"), Ok(()));
            assert_eq!(
                check("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Some(&caller), "registry"),
                Ok(())
            );
        }
    }

    #[test]
    fn every_rpc_in_the_descriptor_set_has_a_rule() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(yidi_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut missing = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{full}/{}", method.name());
                    if rule_for(&path).is_none() {
                        missing.push(path);
                    }
                }
            }
        }
        assert!(missing.is_empty(), "methods without a rule (denied to all): {missing:?}");
    }

    #[test]
    fn the_matrix_is_the_contracts_policies_then_health_and_reflection() {
        let policies = yidi_proto::policy::method_policies();
        assert_eq!(MATRIX.len(), policies.len() + PLUMBING.len());
        for (rule, policy) in MATRIX.iter().zip(policies) {
            assert_eq!((rule.service, rule.method), (policy.service.as_str(), policy.method.as_str()));
            let grants: Vec<Grant> = policy.grants.iter().filter_map(|g| from_contract(*g)).collect();
            assert_eq!(rule.grants, grants, "{}", policy.path);
            assert_eq!(rule.grants.len(), policy.grants.len(), "every contract grant is an access grant");
        }
        assert_eq!(MATRIX[policies.len()..], *PLUMBING);
        assert_eq!(rule_for("/yidi.v1.Audit/ListAuditEntries").map(|r| r.grants), Some(&[READ][..]));
        assert_eq!(rule_for("/yidi.v1.Audit/DropTheChain"), None, "no wildcard for a contract service");
    }

    #[test]
    fn the_architecture_doc_shows_the_enforced_matrix() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ARCHITECTURE.md")).unwrap();
        let table = markdown_table();
        let begin = "<!-- access-matrix -->\n";
        let end = "<!-- /access-matrix -->";
        let documented = readme
            .split_once(begin)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(table, _)| table)
            .unwrap_or_default();
        assert_eq!(
            documented, table,
            "docs/ARCHITECTURE.md's table between {begin:?} and {end:?} must be exactly this (generated from \
             access::MATRIX):\n{table}"
        );
    }

    #[tokio::test]
    async fn the_layer_answers_a_denial_without_calling_the_service_and_passes_a_grant_through() {
        use tower::{ServiceExt, service_fn};
        let layer = AccessLayer::new("registry", DeniedCalls::default());
        let service =
            layer.layer(service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(Response::new(Body::empty())) }));

        let mut request = Request::builder().uri("/yidi.v1.LossRegistry/RegisterCard").body(Body::empty()).unwrap();
        request.extensions_mut().insert(bank());
        let response = service.clone().oneshot(request).await.unwrap();
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        assert_eq!(status.code(), Code::PermissionDenied);
        let info = status.get_error_details().error_info().cloned().expect("ErrorInfo");
        assert_eq!(info.reason, "ROLE_MISSING");
        assert_eq!(info.metadata.get("required_role").map(String::as_str), Some("producer"));

        let mut request = Request::builder().uri("/yidi.v1.LossRegistry/CheckCard").body(Body::empty()).unwrap();
        request.extensions_mut().insert(bank());
        let response = service.oneshot(request).await.unwrap();
        assert!(response.headers().get("grpc-status").is_none(), "passed through to the service");
    }
}
