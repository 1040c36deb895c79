//! The policy of every RPC as the contract states it: `option (yidi.v1.policy)` on each method of
//! `proto/yidi/v1` (see `policy.proto`), read once from the embedded [`FILE_DESCRIPTOR_SET`].
//! Who may call a method (the access matrix) and whether it mutates (idempotency keys) are derived
//! from [`method_policies`]; nothing else lists the RPCs.
//!
//! prost-types' `MethodOptions` has no room for the extension (prost drops unknown fields on
//! decode), so the set is decoded into the small mirror messages of [`mirror`] instead: they keep
//! only the package, service and method names and, in the method options, the one extension field,
//! decoded straight into the generated [`Policy`]. prost skips every other field.
use std::sync::OnceLock;

use prost::Message;

use crate::{FILE_DESCRIPTOR_SET, v1::Grant};

/// The field number of `(yidi.v1.policy)` in `google.protobuf.MethodOptions` (`policy.proto`).
pub const POLICY_FIELD_NUMBER: u32 = 50100;

/// The policy of one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodPolicy {
    /// The gRPC path, `/yidi.v1.Intake/SubmitApplication`.
    pub path: String,
    /// The fully qualified service, `yidi.v1.Intake`.
    pub service: String,
    /// The method, `SubmitApplication`.
    pub method: String,
    /// The kinds of caller admitted; empty (nobody) if the method declares no policy.
    pub grants: Vec<Grant>,
    /// Whether a call changes state that a repeat could duplicate.
    pub mutating: bool,
    /// The field number of `string request_id` (AIP-155) in the request message, if it has one.
    pub request_id_field: Option<u32>,
}

/// The name of the request id field every mutating request carries (AIP-155).
pub const REQUEST_ID_FIELD: &str = "request_id";

/// Every method of every service of the contract, in the order of the descriptor set (files in
/// name order, dependencies first; methods as declared), parsed on first use.
pub fn method_policies() -> &'static [MethodPolicy] {
    static POLICIES: OnceLock<Vec<MethodPolicy>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        // The set is built by build.rs from the same sources; it cannot fail to decode.
        parse(FILE_DESCRIPTOR_SET).expect("the embedded file descriptor set decodes")
    })
}

/// The policy of the method at a gRPC path, if the contract has that method.
pub fn policy_of(path: &str) -> Option<&'static MethodPolicy> {
    method_policies().iter().find(|p| p.path == path)
}

/// Reads the policy of every method of an encoded `FileDescriptorSet`. A method without the option
/// gets no grant (denied to all) and counts as read-only; GRANT_UNSPECIFIED and values this build
/// does not know admit nobody. The unit tests hold the contract to better than that.
pub fn parse(encoded: &[u8]) -> Result<Vec<MethodPolicy>, prost::DecodeError> {
    let set = mirror::FileDescriptorSet::decode(encoded)?;
    let mut policies = Vec::new();
    // Fully qualified message name → the number of its request_id field.
    let mut request_ids = std::collections::HashMap::new();
    for file in &set.file {
        for message in &file.message_type {
            if let Some(field) = message.field.iter().find(|f| f.name == REQUEST_ID_FIELD) {
                let number = u32::try_from(field.number).unwrap_or(0);
                request_ids.insert(format!(".{}.{}", file.package, message.name), number);
            }
        }
    }
    for file in &set.file {
        for service in &file.service {
            let full = if file.package.is_empty() {
                service.name.clone()
            } else {
                format!("{}.{}", file.package, service.name)
            };
            for method in &service.method {
                let policy = method.options.as_ref().and_then(|o| o.policy.clone()).unwrap_or_default();
                policies.push(MethodPolicy {
                    path: format!("/{full}/{}", method.name),
                    service: full.clone(),
                    method: method.name.clone(),
                    grants: policy
                        .grants
                        .iter()
                        .filter_map(|g| Grant::try_from(*g).ok())
                        .filter(|g| *g != Grant::Unspecified)
                        .collect(),
                    mutating: policy.mutating,
                    request_id_field: request_ids.get(&method.input_type).copied(),
                });
            }
        }
    }
    Ok(policies)
}

/// Just enough of `google/protobuf/descriptor.proto` to read the policies (same field numbers).
mod mirror {
    use crate::v1::Policy;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FileDescriptorSet {
        #[prost(message, repeated, tag = "1")]
        pub file: Vec<FileDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FileDescriptorProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub package: String,
        #[prost(message, repeated, tag = "4")]
        pub message_type: Vec<DescriptorProto>,
        #[prost(message, repeated, tag = "6")]
        pub service: Vec<ServiceDescriptorProto>,
        /// The extensions the file declares (for the test of the field number).
        #[prost(message, repeated, tag = "7")]
        pub extension: Vec<FieldDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DescriptorProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub field: Vec<FieldDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServiceDescriptorProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub method: Vec<MethodDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MethodDescriptorProto {
        #[prost(string, tag = "1")]
        pub name: String,
        /// Fully qualified, with a leading dot: `.yidi.v1.SubmitApplicationRequest`.
        #[prost(string, tag = "2")]
        pub input_type: String,
        #[prost(message, optional, tag = "4")]
        pub options: Option<MethodOptions>,
    }

    /// `google.protobuf.MethodOptions` reduced to the `(yidi.v1.policy)` extension; the tag is
    /// [`super::POLICY_FIELD_NUMBER`] (a test keeps the two, and `policy.proto`, equal).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MethodOptions {
        #[prost(message, optional, tag = "50100")]
        pub policy: Option<Policy>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FieldDescriptorProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int32, tag = "3")]
        pub number: i32,
        #[prost(string, tag = "2")]
        pub extendee: String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{
        Policy, audit_server, intake_server, issuance_server, loss_registry_server, outbox_server, verification_server,
    };

    /// The services the bureaus serve (each bureau its own, plus Audit and Outbox on every port).
    const SERVED: [&str; 6] = [
        intake_server::SERVICE_NAME,
        verification_server::SERVICE_NAME,
        issuance_server::SERVICE_NAME,
        loss_registry_server::SERVICE_NAME,
        audit_server::SERVICE_NAME,
        outbox_server::SERVICE_NAME,
    ];

    fn set() -> mirror::FileDescriptorSet {
        mirror::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn every_method_of_every_service_declares_a_policy_with_a_grant() {
        let mut faults = Vec::new();
        for file in set().file {
            for service in file.service {
                for method in service.method {
                    let path = format!("/{}.{}/{}", file.package, service.name, method.name);
                    match method.options.and_then(|o| o.policy) {
                        None => faults.push(format!("{path}: no option (yidi.v1.policy)")),
                        Some(policy) if policy.grants.is_empty() => faults.push(format!("{path}: no grant")),
                        Some(policy) => {
                            for grant in policy.grants {
                                if !matches!(Grant::try_from(grant), Ok(g) if g != Grant::Unspecified) {
                                    faults.push(format!("{path}: grant {grant} admits nobody"));
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(
            faults.is_empty(),
            "every RPC needs `option (yidi.v1.policy) = {{grants: [...], mutating: ...}}`: {faults:#?}"
        );
        assert!(method_policies().iter().all(|p| !p.grants.is_empty()));
    }

    #[test]
    fn the_table_has_every_method_served_and_nothing_else() {
        // An independent reading of the set: prost-types keeps every name (only options are lost).
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let described: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                file.service.iter().flat_map(move |service| {
                    service
                        .method
                        .iter()
                        .map(move |method| format!("/{}.{}/{}", file.package(), service.name(), method.name()))
                })
            })
            .collect();
        let table: Vec<&str> = method_policies().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(table, described);

        let mut services: Vec<&str> = method_policies().iter().map(|p| p.service.as_str()).collect();
        services.sort_unstable();
        services.dedup();
        let mut served = SERVED.to_vec();
        served.sort_unstable();
        assert_eq!(services, served, "the contract's services are the served ones");
        for policy in method_policies() {
            assert_eq!(policy.path, format!("/{}/{}", policy.service, policy.method));
        }
    }

    #[test]
    fn the_table_holds_the_contracts_policies() {
        use Grant::*;
        let policy = |path: &str| {
            let p = policy_of(path).unwrap_or_else(|| panic!("{path} is in the table"));
            (p.grants.clone(), p.mutating)
        };
        assert_eq!(policy("/yidi.v1.Intake/SubmitApplication"), (vec![OperatorAdmin], true));
        assert_eq!(policy("/yidi.v1.Intake/GetApplication"), (vec![OperatorRead], false));
        assert_eq!(policy("/yidi.v1.Verification/Verify"), (vec![Station], true));
        assert_eq!(policy("/yidi.v1.Issuance/GetOrder"), (vec![Station, OperatorRead], false));
        assert_eq!(policy("/yidi.v1.LossRegistry/RegisterCard"), (vec![Producer], true));
        assert_eq!(policy("/yidi.v1.LossRegistry/RecordCollection"), (vec![Station], true));
        assert_eq!(policy("/yidi.v1.LossRegistry/CheckCard"), (vec![RelyingParty, Station, OperatorRead], false));
        assert_eq!(policy("/yidi.v1.LossRegistry/ListHits"), (vec![HomeBureau, OperatorRead], false));
        assert_eq!(policy("/yidi.v1.Audit/VerifyAuditChain"), (vec![OperatorRead], false));
        assert_eq!(policy("/yidi.v1.Audit/ListAuditEntries"), (vec![OperatorRead], false));
        assert_eq!(policy("/yidi.v1.Outbox/RetryDeadLetter"), (vec![OperatorAdmin], true));
        assert_eq!(policy_of("/yidi.v1.LossRegistry/DropAllCards"), None);
        assert_eq!(policy_of("/grpc.health.v1.Health/Check"), None, "the plumbing is not the contract's");
        assert_eq!(policy("/yidi.v1.LossRegistry/TransferRegistration"), (vec![HomeBureau], true));
        assert_eq!(policy("/yidi.v1.Verification/TransferRegistration"), (vec![OperatorAdmin], true));
        assert_eq!(policy("/yidi.v1.Intake/GetApplicationOutcome"), (vec![HomeBureau], false));
        assert_eq!(policy("/yidi.v1.Intake/NotifyOrderDispatched"), (vec![Producer], true));
        assert_eq!(policy("/yidi.v1.LossRegistry/ReportLocalHits"), (vec![RelyingParty, Station], true));
        assert_eq!(
            policy("/yidi.v1.LossRegistry/GetCardReceipt"),
            (vec![Producer, Station, RelyingParty, OperatorRead], false)
        );
        assert_eq!(method_policies().len(), 38);
        assert_eq!(method_policies().iter().filter(|p| p.mutating).count(), 19);
    }

    #[test]
    fn every_mutating_request_and_no_other_carries_a_request_id() {
        for policy in method_policies() {
            assert_eq!(policy.request_id_field.is_some(), policy.mutating, "{}: request_id (AIP-155)", policy.path);
        }
        assert_eq!(policy_of("/yidi.v1.Intake/SubmitApplication").unwrap().request_id_field, Some(4));
    }

    #[test]
    fn the_option_has_the_field_number_of_the_contract() {
        let declared: Vec<(String, i32, String)> = set()
            .file
            .into_iter()
            .filter(|f| f.name == "yidi/v1/policy.proto")
            .flat_map(|f| f.extension)
            .map(|e| (e.name, e.number, e.extendee))
            .collect();
        assert_eq!(
            declared,
            [("policy".to_owned(), POLICY_FIELD_NUMBER as i32, ".google.protobuf.MethodOptions".to_owned())]
        );
        // The mirror's tag is the same number.
        let encoded = mirror::MethodOptions { policy: Some(Policy::default()) }.encode_to_vec();
        let (tag, _) = prost::encoding::decode_key(&mut encoded.as_slice()).unwrap();
        assert_eq!(tag, POLICY_FIELD_NUMBER);
    }

    #[test]
    fn the_prost_types_set_would_lose_the_option_and_the_embedded_bytes_keep_it() {
        let lossy = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap().encode_to_vec();
        assert!(parse(&lossy).unwrap().iter().all(|p| p.grants.is_empty() && !p.mutating));
        assert!(parse(FILE_DESCRIPTOR_SET).unwrap().iter().all(|p| !p.grants.is_empty()));
    }
}
