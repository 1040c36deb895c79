//! Decision decoding and verification (S4) on arbitrary bytes: decoding the protobuf, converting
//! it to a domain decision and verifying it must never panic, and nothing the fuzzer makes without
//! the home bureau's private key may ever verify.
#![no_main]

use std::sync::LazyLock;

use chrono::{TimeZone, Utc};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use yidi_grpc::convert::signed_decision_from_proto;
use yidi_domain::{
    DecisionPurpose, Directory,
    decision::Expectation,
    directory::{Bureau, BureauKey, Role},
};
use yidi_proto::v1 as pb;

static DIRECTORY: LazyLock<Directory> = LazyLock::new(|| {
    let home = |id: &str, province: &str, seed: u8| {
        let key = BureauKey {
            id: "k1".into(),
            public_key: SigningKey::from_bytes(&[seed; 32]).verifying_key(),
            valid_from: chrono::DateTime::UNIX_EPOCH,
            valid_until: None,
        };
        Bureau::new(id, Role::Verification).with_name(id).with_jurisdiction([province]).with_keys(vec![key])
    };
    Directory::new(vec![home("home-jiangxi", "36", 1), home("home-sichuan", "51", 2)]).expect("a valid directory")
});

fuzz_target!(|data: &[u8]| {
    let Ok(message) = pb::SignedDecision::decode(data) else { return };
    let Ok(signed) = signed_decision_from_proto("decision", Some(&message)) else { return };
    let now = Utc.with_ymd_and_hms(2118, 3, 1, 9, 0, 0).unwrap();
    for purpose in [DecisionPurpose::IssueCard, DecisionPurpose::ReportLoss, DecisionPurpose::WithdrawLossReport] {
        for addressee_id in ["producer-zhejiang", "registry-national"] {
            let verified = signed.verify(&DIRECTORY, Expectation { purpose, addressee_id, now });
            assert!(verified.is_err(), "a decision nobody signed verified: {signed:?}");
        }
    }
});
