//! Microbenchmarks of the rules every request runs: identity number validation (N1, N2), decision
//! signing and verification (S4), and the acceptance policy (P0–P4). `cargo bench -p yidi-domain`.
use std::hint::black_box;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use yidi_domain::{
    ApplicationKind, Bureau, CardData, Decision, DecisionPurpose, Directory, DocumentKind, IdNumber, Particulars,
    PolicyTimeline, Role, Sex, biometrics::TEMPLATE_LEN, decision::Expectation,
};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2118, 3, 1, 9, 0, 0).single().unwrap_or_default()
}

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
}

fn home_bureau(key: &SigningKey) -> Bureau {
    Bureau {
        id: "home-jiangxi".into(),
        role: Role::Verification,
        name: "Jiangxi".into(),
        jurisdiction: vec!["36".into()],
        region: String::new(),
        endpoints: Vec::new(),
        keys: vec![yidi_domain::BureauKey {
            id: "k1".into(),
            public_key: key.verifying_key(),
            valid_from: chrono::DateTime::UNIX_EPOCH,
            valid_until: None,
        }],
    }
}

fn decision(id_number: &str) -> Decision {
    Decision {
        decision_id: "0b7e5d9a-2f43-4c1e-9a55-3c3f1f0e8a11".into(),
        purpose: DecisionPurpose::IssueCard,
        bureau_id: "home-jiangxi".into(),
        key_id: "k1".into(),
        addressee_id: "producer-zhejiang".into(),
        application_id: "5a0c1d3e-7b2f-4e8a-9c1d-2e3f4a5b6c7d".into(),
        station_id: "station-hangzhou".into(),
        application_kind: Some(ApplicationKind::Replacement),
        card: CardData {
            holder: Particulars {
                id_number: id_number.into(),
                name: "Zhou Nawei".into(),
                sex: Sex::Female,
                birth_date: day(1996, 11, 6),
                registration_province: "36".into(),
                address: "Nanchang".into(),
            },
            face_template: vec![0x5A; TEMPLATE_LEN],
            valid_from: day(2118, 3, 1),
            valid_until: Some(day(2138, 3, 1)),
        },
        previous_card_serial: "JX0001000000".into(),
        issued_at: now(),
        expires_at: now() + Duration::days(7),
        transfer_to_bureau_id: String::new(),
    }
}

fn id_number(c: &mut Criterion) {
    let valid = IdNumber::compose("360702", day(1996, 11, 6), 3).as_str().to_owned();
    let today = day(2118, 3, 1);
    c.bench_function("id_number/parse_valid", |b| b.iter(|| IdNumber::parse(black_box(&valid), today)));
    let mut wrong_check = valid.clone();
    wrong_check.replace_range(17..18, if valid.ends_with('0') { "1" } else { "0" });
    c.bench_function("id_number/parse_bad_check_character", |b| {
        b.iter(|| IdNumber::parse(black_box(&wrong_check), today))
    });
}

fn decisions(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let directory = Directory::new(vec![home_bureau(&key)]).unwrap_or_else(|e| panic!("directory: {e}"));
    let id = IdNumber::compose("360702", day(1996, 11, 6), 3).as_str().to_owned();
    let unsigned = decision(&id);
    c.bench_function("decision/canonical_bytes", |b| b.iter(|| black_box(&unsigned).canonical_bytes()));
    c.bench_function("decision/sign", |b| b.iter(|| black_box(unsigned.clone()).sign(&key)));
    let signed = unsigned.clone().sign(&key);
    let expected =
        || Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: "producer-zhejiang", now: now() };
    c.bench_function("decision/verify", |b| {
        b.iter(|| black_box(&signed).verify(&directory, expected()).map(|d| d.decision_id.len()))
    });
}

fn policy(c: &mut Criterion) {
    let timeline = PolicyTimeline::default();
    let national = day(2118, 3, 1);
    let pilot = day(2116, 1, 1);
    c.bench_function("policy/check_national", |b| {
        b.iter(|| timeline.check(black_box("330106"), "36", national, DocumentKind::HouseholdRegisterBook))
    });
    c.bench_function("policy/check_pilot_refused", |b| {
        b.iter(|| timeline.check(black_box("330106"), "51", pilot, DocumentKind::WorkUnitProof))
    });
}

criterion_group!(hot_path, id_number, decisions, policy);
criterion_main!(hot_path);
