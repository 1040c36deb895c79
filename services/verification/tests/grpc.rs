//! In-process gRPC tests: the real server on an SQLite temp file, talked to with the generated client.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, NaiveDate, Utc};
use ed25519_dalek::SigningKey;
use sea_orm::{ConnectionTrait, Database, Statement};
use tonic::{Code, transport::Channel};
use yidi_domain::{Credit, Registration};
use yidi_domain::{
    DecisionPurpose, Particulars, Role, biometrics::with_sensor_noise, decision::Expectation, id_number::IdNumber,
};
use yidi_grpc::convert::signed_decision_from_proto;
use yidi_proto::v1::{self as pb, verification_client::VerificationClient};
use yidi_runtime::{
    directory::{generate_signing_key, write_signing_key},
    population::{Citizen, ExistingCard, Population},
};
use yidi_testkit::{Bureau, DirectoryBuilder, bureau::closed_endpoint, directory::write_key_dir, postgres_for_tests};
use yidi_verification::config::VerificationConfig;

const HOME: &str = "home-jiangxi";
const STATION: &str = "station-hangzhou";
/// A station in Nanchang, Jiangxi: at home for the Jiangxi-registered population.
const LOCAL_STATION: &str = "station-nanchang";
const PRODUCER: &str = "producer-zhejiang";
const REGISTRY: &str = "registry-national";
const KEY_ID: &str = "jx-1";

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2118-01-01T09:00:00.750Z").unwrap().with_timezone(&Utc)
}

fn key_valid_from() -> DateTime<Utc> {
    now() - chrono::Duration::days(30)
}

fn template(seed: u8) -> Vec<u8> {
    (0..64u32)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) as u8) ^ seed.wrapping_mul(97) ^ (i as u8).wrapping_mul(seed))
        .collect()
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// A person of the test population: seed gives their templates, `card` their current card.
struct Person {
    id: IdNumber,
    seed: u8,
    /// The household-registration province declared at the counter (N3).
    province: String,
}

impl Person {
    fn face(&self) -> Vec<u8> {
        with_sensor_noise(&template(self.seed), 6, u64::from(self.seed))
    }
    fn fingerprint(&self) -> Vec<u8> {
        with_sensor_noise(&template(self.seed.wrapping_add(100)), 6, u64::from(self.seed) + 1)
    }
}

fn person(address: &str, birth: NaiveDate, seq: u16, seed: u8) -> Person {
    Person { id: IdNumber::compose(address, birth, seq), seed, province: address[..2].to_owned() }
}

// The population: index = scenario.
fn replacement() -> Person {
    person("360102", date(2091, 3, 7), 123, 1)
}
fn renewable() -> Person {
    person("360103", date(1960, 5, 1), 11, 2)
}
fn not_renewable() -> Person {
    person("360104", date(2000, 5, 1), 12, 3)
}
fn deceased() -> Person {
    person("360105", date(1950, 1, 1), 13, 4)
}
fn first_timer() -> Person {
    person("360106", date(2001, 1, 1), 14, 5)
}
fn sichuan_registered() -> Person {
    // Jiangxi number, but the household registration moved to Sichuan (N3).
    Person { province: "51".into(), ..person("360107", date(1985, 1, 1), 15, 6) }
}
fn sichuan() -> Person {
    person("510101", date(1985, 1, 1), 16, 7)
}
fn bad_credit() -> Person {
    person("360108", date(1980, 1, 1), 17, 8)
}
/// Turns 46 on 1 January 2118 (C1).
fn turning_46() -> Person {
    person("360109", date(2072, 1, 1), 19, 9)
}
/// Card valid until 1 April 2118: renewable from 1 January 2118, 90 days before (K2).
fn due_on_new_year() -> Person {
    person("360110", date(1980, 6, 1), 21, 10)
}

fn citizen(
    p: &Person,
    province: &str,
    home: &str,
    card: Option<ExistingCard>,
    credit: Credit,
    registration: Registration,
) -> Citizen {
    Citizen {
        person: Particulars {
            id_number: p.id.as_str().to_owned(),
            name: format!("Citizen {}", p.seed),
            sex: p.id.sex(),
            birth_date: p.id.birth_date(),
            registration_province: province.into(),
            address: "1 Bayi Avenue, Nanchang".into(),
        },
        home_bureau_id: home.into(),
        scenario: "test".into(),
        credit,
        registration,
        card,
        face_template: template(p.seed),
        fingerprint_template: template(p.seed.wrapping_add(100)),
        live_face_template: p.face(),
        live_fingerprint_template: p.fingerprint(),
    }
}

fn card(serial: &str, until: Option<NaiveDate>) -> Option<ExistingCard> {
    Some(ExistingCard { serial: serial.into(), valid_from: date(2100, 1, 1), valid_until: until, reported_lost: false })
}

fn population() -> Population {
    use Credit::*;
    use Registration::*;
    Population {
        citizens: vec![
            citizen(&replacement(), "36", HOME, card("JX-0001", Some(date(2125, 1, 1))), Good, Active),
            citizen(&renewable(), "36", HOME, card("JX-0002", Some(date(2118, 2, 1))), Good, Active),
            citizen(&not_renewable(), "36", HOME, card("JX-0003", Some(date(2125, 6, 1))), Good, Active),
            citizen(&deceased(), "36", HOME, card("JX-0004", None), Good, Cancelled),
            citizen(&first_timer(), "36", HOME, None, Good, Active),
            citizen(&sichuan_registered(), "51", HOME, card("JX-0006", None), Good, Active),
            citizen(&sichuan(), "51", "home-sichuan", card("SC-0001", None), Good, Active),
            citizen(&bad_credit(), "36", HOME, card("JX-0008", None), Bad, Active),
            citizen(&turning_46(), "36", HOME, card("JX-0009", Some(date(2125, 1, 1))), Good, Active),
            citizen(&due_on_new_year(), "36", HOME, card("JX-0010", Some(date(2118, 4, 1))), Good, Active),
        ],
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir_path: PathBuf,
    key: SigningKey,
    db_url: String,
}

impl Fixture {
    fn new() -> Self {
        Self::with_database(None)
    }

    /// `database_url`: None for an SQLite file in the temp folder.
    fn with_database(database_url: Option<String>) -> Self {
        Self::build(database_url, None)
    }

    /// With the registry at `endpoint` (a fake).
    fn with_registry(endpoint: String) -> Self {
        Self::build(None, Some(endpoint))
    }

    /// With the stations `STATION` and `station-other` at these endpoints (fakes, or closed ports).
    fn with_stations(station: String, other: String) -> Self {
        Self::build_with(None, None, Some((station, other)))
    }

    fn build(database_url: Option<String>, registry_endpoint: Option<String>) -> Self {
        Self::build_with(database_url, registry_endpoint, None)
    }

    fn build_with(
        database_url: Option<String>,
        registry_endpoint: Option<String>,
        stations: Option<(String, String)>,
    ) -> Self {
        let (station_endpoint, other_endpoint) = stations.unwrap_or_else(|| {
            (yidi_testkit::directory::UNREACHABLE.to_owned(), yidi_testkit::directory::UNREACHABLE.to_owned())
        });
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().to_path_buf();
        let key = generate_signing_key();
        let other = generate_signing_key();
        write_key_dir(&dir_path, KEY_ID, &key).unwrap();
        let directory = DirectoryBuilder::new()
            .bureau(STATION, Role::Intake)
            .region("330106")
            .endpoint(station_endpoint)
            .bureau("station-other", Role::Intake)
            .region("330102")
            .endpoint(other_endpoint)
            .bureau(LOCAL_STATION, Role::Intake)
            .region("360102")
            .bureau(HOME, Role::Verification)
            .jurisdiction(&["36"])
            .key(KEY_ID, &key, key_valid_from())
            .bureau("home-sichuan", Role::Verification)
            .jurisdiction(&["51"])
            .key(KEY_ID, &other, key_valid_from())
            .bureau(PRODUCER, Role::Issuance)
            .bureau(REGISTRY, Role::Registry);
        let directory = match registry_endpoint {
            Some(endpoint) => directory.endpoint(endpoint),
            None => directory,
        };
        directory.write_into(&dir_path).unwrap();
        population().write(&dir_path.join("population.json")).unwrap();
        let db_url =
            database_url.unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir_path.join("verification.db").display()));
        Self { _dir: dir, dir_path, key, db_url }
    }

    fn config(&self, extra: &str) -> VerificationConfig {
        self.config_at(now(), extra)
    }

    /// The configuration with the clock standing at `now` (in the default zone, Asia/Shanghai).
    fn config_at(&self, now: DateTime<Utc>, extra: &str) -> VerificationConfig {
        let text = format!(
            r#"
[server]
bureau_id = "{HOME}"
listen = "127.0.0.1:0"
shutdown_grace_seconds = 1
[database]
url = "{db}"
[directory]
path = "{dir}/directory.toml"
[tls]
plaintext = true
[clock]
fixed = "{now}"
[signing]
key_dir = "{dir}/keys"
[register]
import_path = "{dir}/population.json"
{extra}
"#,
            db = self.db_url,
            dir = self.dir_path.display(),
            now = now.to_rfc3339(),
        );
        toml::from_str(&text).unwrap()
    }

    async fn start(&self) -> Server {
        self.start_with(self.config("")).await.unwrap()
    }

    async fn start_at(&self, instant: &str) -> Server {
        self.start_with(self.config_at(instant.parse().unwrap(), "")).await.unwrap()
    }

    async fn start_with(&self, config: VerificationConfig) -> anyhow::Result<Server> {
        let bureau = Bureau::start(|listener, shutdown| yidi_verification::serve(config, listener, shutdown)).await?;
        Ok(Server { client: VerificationClient::new(bureau.channel()), bureau })
    }

    async fn count(&self, sql: &str) -> i64 {
        let db = Database::connect(&self.db_url).await.unwrap();
        let row =
            db.query_one_raw(Statement::from_string(db.get_database_backend(), sql.to_owned())).await.unwrap().unwrap();
        let n: i64 = row.try_get_by_index(0).unwrap();
        db.close().await.unwrap();
        n
    }
}

struct Server {
    client: VerificationClient<Channel>,
    bureau: Bureau,
}

impl Server {
    async fn verify(&mut self, request: pb::VerifyRequest) -> pb::VerifyResponse {
        self.client.verify(request).await.unwrap().into_inner()
    }

    async fn citizen(&mut self, p: &Person) -> pb::GetCitizenResponse {
        let request = pb::GetCitizenRequest { id_number: p.id.as_str().into() };
        self.client.get_citizen(request).await.unwrap().into_inner()
    }

    async fn stop(self) {
        drop(self.client);
        self.bureau.stop().await.unwrap();
    }
}

fn issue(application_id: &str, p: &Person, kind: pb::ApplicationKind, serial: &str) -> pb::VerifyRequest {
    pb::VerifyRequest {
        application_id: application_id.into(),
        station_id: STATION.into(),
        purpose: pb::DecisionPurpose::IssueCard as i32,
        kind: kind as i32,
        id_number: p.id.as_str().into(),
        card_serial: serial.into(),
        live: Some(pb::Biometrics { face_template: p.face(), fingerprint_template: p.fingerprint() }),
        producer_id: PRODUCER.into(),
        declared_province: p.province.clone(),
        request_id: String::new(),
    }
}

fn report_loss(application_id: &str, p: &Person, serial: &str) -> pb::VerifyRequest {
    pb::VerifyRequest {
        purpose: pb::DecisionPurpose::ReportLoss as i32,
        kind: pb::ApplicationKind::LossReport as i32,
        producer_id: String::new(),
        ..issue(application_id, p, pb::ApplicationKind::LossReport, serial)
    }
}

fn closing(
    application_id: &str,
    state: pb::ApplicationState,
    serial: &str,
    station: &str,
) -> pb::CloseApplicationRequest {
    pb::CloseApplicationRequest {
        application_id: application_id.into(),
        final_state: state as i32,
        new_card_serial: serial.into(),
        station_id: station.into(),
        request_id: String::new(),
    }
}

fn refusal(response: &pb::VerifyResponse) -> pb::RefusalReason {
    assert!(response.decision.is_none() || response.refusal_reason == 0);
    pb::RefusalReason::try_from(response.refusal_reason).unwrap()
}

fn directory(fixture: &Fixture) -> yidi_domain::Directory {
    yidi_runtime::directory::load(&fixture.dir_path.join("directory.toml")).unwrap()
}

#[tokio::test]
async fn s4_an_approved_replacement_carries_decisions_that_verify() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = replacement();
    let response = server.verify(issue("app-1", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::Unspecified);
    let directory = directory(&fixture);

    let decision = signed_decision_from_proto("decision", response.decision.as_ref()).unwrap();
    let expect = Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: PRODUCER, now: now() };
    let d = decision.verify(&directory, expect).unwrap();
    assert_eq!(d.bureau_id, HOME);
    assert_eq!(d.card.holder.id_number, p.id.as_str());
    assert_eq!(d.card.face_template, template(p.seed), "the register's template, not the live capture");
    assert_eq!(d.previous_card_serial, "JX-0001");
    assert_eq!(d.application_kind, Some(yidi_domain::ApplicationKind::Replacement));
    // C1: age 26 on the day of issue → 20 years.
    assert_eq!(d.card.valid_from, date(2118, 1, 1));
    assert_eq!(d.card.valid_until, Some(date(2138, 1, 1)));
    // Whole seconds; 7 days by default.
    assert_eq!(d.issued_at, DateTime::from_timestamp(now().timestamp(), 0).unwrap());
    assert_eq!(d.expires_at - d.issued_at, chrono::Duration::days(7));

    // K1: the loss decision is addressed to the registry, for the card lost.
    let loss = signed_decision_from_proto("loss_decision", response.loss_decision.as_ref()).unwrap();
    let expect = Expectation { purpose: DecisionPurpose::ReportLoss, addressee_id: REGISTRY, now: now() };
    let l = loss.verify(&directory, expect).unwrap();
    assert_eq!(l.previous_card_serial, "JX-0001");
    assert_ne!(l.decision_id, d.decision_id);

    // Signed with this bureau's key: a tampered copy fails.
    let mut tampered = decision.clone();
    tampered.decision.card.holder.name = "Someone Else".into();
    let expect = Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: PRODUCER, now: now() };
    assert!(tampered.verify(&directory, expect).is_err());
    assert_eq!(d.key_id, KEY_ID);
    assert_eq!(fixture.key.verifying_key(), directory.get(HOME).unwrap().key(KEY_ID).unwrap().public_key);

    // Recorded with an audit row, and the application is open (K5).
    let citizen = server.citizen(&p).await;
    assert_eq!(citizen.open_application_ids, vec!["app-1".to_owned()]);
    assert_eq!(citizen.id_number_masked, p.id.masked());
    assert_eq!(citizen.name_masked, "C********");
    assert_eq!(citizen.current_card_serial, "JX-0001");
    assert_eq!(citizen.current_card_valid_until, "2125-01-01");
    server.stop().await;
    assert_eq!(
        fixture.count("SELECT COUNT(*) FROM audit_log WHERE action = 'verify' AND outcome = 'APPROVED'").await,
        1
    );
    assert_eq!(
        fixture.count("SELECT COUNT(*) FROM audit_log WHERE subject LIKE '%20910307%'").await,
        0,
        "no full numbers"
    );
}

#[tokio::test]
async fn s4_a_repeated_verify_returns_the_stored_answer() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let request = report_loss("app-loss", &replacement(), "JX-0001");
    let first = server.verify(request.clone()).await;
    let again = server.verify(request).await;
    assert!(first.decision.is_some());
    assert_eq!(first, again, "same decision id, same signature");
    // A refusal replays too.
    let mut refused = report_loss("app-refused", &replacement(), "JX-0001");
    refused.live.as_mut().unwrap().face_template = template(99);
    let first = server.verify(refused.clone()).await;
    refused.live.as_mut().unwrap().face_template = replacement().face();
    let again = server.verify(refused).await;
    assert_eq!(refusal(&first), pb::RefusalReason::FaceMismatch);
    assert_eq!(first, again);
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications").await, 2);
    assert_eq!(fixture.count("SELECT COUNT(*) FROM audit_log").await, 2);
}

#[tokio::test]
async fn s4_a_reused_application_id_gets_no_stored_answer() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let request = issue("app-reuse", &replacement(), pb::ApplicationKind::Replacement, "JX-0001");
    let first = server.verify(request.clone()).await;
    assert!(first.decision.is_some());
    let reused = |request: pb::VerifyRequest| {
        let mut client = server.client.clone();
        async move {
            let err = client.verify(request).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(err.message().contains("app-reuse"), "{}", err.message());
            // The status details (ErrorInfo) carry the reason; nothing of the stored answer leaks.
            let details = String::from_utf8_lossy(err.details()).into_owned();
            assert!(details.contains("APPLICATION_ID_REUSED"), "{details}");
            let everything = format!("{}{details}", err.message());
            assert!(!everything.contains("Citizen 1") && !everything.contains("20910307"), "{everything}");
        }
    };
    // Another citizen (with their own, matching, biometrics) under the same id.
    reused(issue("app-reuse", &renewable(), pb::ApplicationKind::Replacement, "JX-0002")).await;
    // Another station.
    reused(pb::VerifyRequest { station_id: "station-other".into(), ..request.clone() }).await;
    // Another kind.
    reused(issue("app-reuse", &replacement(), pb::ApplicationKind::Renewal, "JX-0001")).await;
    // The same request still replays.
    let again = server.verify(request).await;
    assert_eq!(first, again);
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications").await, 1);
}

#[tokio::test]
async fn s2_a_face_or_fingerprint_of_someone_else_is_refused() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = replacement();
    let mut request = issue("app-face", &p, pb::ApplicationKind::Replacement, "JX-0001");
    request.live.as_mut().unwrap().face_template = template(42);
    let response = server.verify(request).await;
    assert_eq!(refusal(&response), pb::RefusalReason::FaceMismatch);
    assert!(response.decision.is_none() && response.loss_decision.is_none());

    let mut request = issue("app-finger", &p, pb::ApplicationKind::Replacement, "JX-0001");
    request.live.as_mut().unwrap().fingerprint_template = template(42);
    let response = server.verify(request).await;
    assert_eq!(refusal(&response), pb::RefusalReason::FingerprintMismatch);

    // K6: a withdrawal is judged on a fresh fingerprint only.
    let mut withdraw = report_loss("app-found", &p, "JX-0001");
    withdraw.purpose = pb::DecisionPurpose::WithdrawLossReport as i32;
    withdraw.kind = pb::ApplicationKind::Unspecified as i32;
    withdraw.live.as_mut().unwrap().face_template.clear();
    withdraw.live.as_mut().unwrap().fingerprint_template = template(42);
    let response = server.verify(withdraw.clone()).await;
    assert_eq!(refusal(&response), pb::RefusalReason::FingerprintMismatch);
    withdraw.application_id = "app-found-2".into();
    withdraw.live.as_mut().unwrap().fingerprint_template = p.fingerprint();
    let response = server.verify(withdraw).await;
    let decision = signed_decision_from_proto("decision", response.decision.as_ref()).unwrap();
    let expect = Expectation { purpose: DecisionPurpose::WithdrawLossReport, addressee_id: REGISTRY, now: now() };
    assert_eq!(decision.verify(&directory(&fixture), expect).unwrap().previous_card_serial, "JX-0001");
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications WHERE outcome = 'refused'").await, 3);
}

#[tokio::test]
async fn s3_a_cancelled_registration_and_a_bad_credit_record_are_refused() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let response = server.verify(issue("app-dead", &deceased(), pb::ApplicationKind::Replacement, "JX-0004")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::RegistrationCancelled);
    let response = server.verify(issue("app-credit", &bad_credit(), pb::ApplicationKind::Replacement, "JX-0008")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::BadCreditRecord);

    // Register upkeep: a death recorded today cancels the registration (idempotently).
    let p = replacement();
    let death = pb::RecordDeathRequest {
        id_number: p.id.as_str().into(),
        date_of_death: "2117-12-30".into(),
        request_id: String::new(),
    };
    let answer = server.client.record_death(death.clone()).await.unwrap().into_inner();
    assert_eq!(answer.registration_status, pb::RegistrationStatus::Cancelled as i32);
    server.client.record_death(death).await.unwrap();
    let response = server.verify(issue("app-2", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::RegistrationCancelled);
    let future = pb::RecordDeathRequest {
        id_number: renewable().id.as_str().into(),
        date_of_death: "2118-01-02".into(),
        request_id: String::new(),
    };
    assert_eq!(server.client.record_death(future).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown = pb::RecordDeathRequest {
        id_number: sichuan().id.as_str().into(),
        date_of_death: "2117-01-02".into(),
        request_id: String::new(),
    };
    assert_eq!(server.client.record_death(unknown).await.unwrap_err().code(), Code::NotFound);

    // Credit: bad, then good again.
    let r = renewable();
    let set = |status: pb::CreditStatus| pb::RecordCreditStatusRequest {
        id_number: r.id.as_str().into(),
        credit_status: status as i32,
        note: "court ruling 2117-123".into(),
        request_id: String::new(),
    };
    server.client.record_credit_status(set(pb::CreditStatus::Bad)).await.unwrap();
    let response = server.verify(issue("app-3", &r, pb::ApplicationKind::Renewal, "JX-0002")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::BadCreditRecord);
    server.client.record_credit_status(set(pb::CreditStatus::Good)).await.unwrap();
    let response = server.verify(issue("app-4", &r, pb::ApplicationKind::Renewal, "JX-0002")).await;
    assert!(response.decision.is_some(), "{response:?}");
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM audit_log WHERE action = 'record_death'").await, 2);
    assert_eq!(fixture.count("SELECT COUNT(*) FROM audit_log WHERE action = 'record_credit_status'").await, 2);
}

#[tokio::test]
async fn s3_bad_credit_is_no_refusal_at_a_station_of_the_home_province() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let request = issue("app-home", &bad_credit(), pb::ApplicationKind::Replacement, "JX-0008");
    let away = server.client.verify(issue("app-away", &bad_credit(), pb::ApplicationKind::Replacement, "JX-0008"));
    assert_eq!(refusal(&away.await.unwrap().into_inner()), pb::RefusalReason::BadCreditRecord);
    let response = server.verify(pb::VerifyRequest { station_id: LOCAL_STATION.into(), ..request }).await;
    assert_eq!(refusal(&response), pb::RefusalReason::Unspecified);
    let decision = signed_decision_from_proto("decision", response.decision.as_ref()).unwrap();
    assert_eq!(decision.decision.station_id, LOCAL_STATION);
    assert!(response.loss_decision.is_some(), "K1: the replacement files the loss report");
    server.stop().await;
}

#[tokio::test]
async fn k4_a_first_application_is_refused() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let response = server.verify(issue("app-first", &first_timer(), pb::ApplicationKind::Replacement, "NONE")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::FirstApplication);
    // A card that is not the current one is refused too.
    let response = server.verify(issue("app-old", &replacement(), pb::ApplicationKind::Replacement, "JX-OLD")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::CardNotCurrent);
    server.stop().await;
}

/// K4 at home: a citizen who never held a card applies at a station of the home province, naming no
/// card. The home bureau approves a first card with no loss decision (there is no card to lose),
/// and the card collected becomes the current one.
#[tokio::test]
async fn k4_a_first_application_at_home_is_approved_without_a_loss_decision() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = first_timer();
    let request = pb::VerifyRequest {
        station_id: LOCAL_STATION.into(),
        ..issue("app-first-home", &p, pb::ApplicationKind::Replacement, "")
    };
    let response = server.verify(request).await;
    assert_eq!(refusal(&response), pb::RefusalReason::Unspecified);
    assert!(response.loss_decision.is_none(), "no card, no loss decision");
    let decision = signed_decision_from_proto("decision", response.decision.as_ref()).unwrap();
    assert!(decision.decision.previous_card_serial.is_empty());
    let expect = Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: PRODUCER, now: now() };
    decision.verify(&directory(&fixture), expect).unwrap();
    let close = closing("app-first-home", pb::ApplicationState::Collected, "JX-FIRST", LOCAL_STATION);
    assert!(server.client.close_application(close).await.unwrap().into_inner().closed);
    assert_eq!(server.citizen(&p).await.current_card_serial, "JX-FIRST");
    server.stop().await;
}

/// K6: the home bureau refuses to withdraw a loss report while an application of the citizen for a
/// new card is open (the new card would revoke the card declared valid again); once it is closed,
/// the withdrawal is decided.
#[tokio::test]
async fn k6_a_withdrawal_while_a_new_card_is_pending_is_refused_at_the_home_bureau() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = replacement();
    let open = server.verify(issue("app-open", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert!(open.decision.is_some());
    let mut withdraw = report_loss("app-found", &p, "JX-0001");
    withdraw.purpose = pb::DecisionPurpose::WithdrawLossReport as i32;
    withdraw.kind = pb::ApplicationKind::Unspecified as i32;
    withdraw.live.as_mut().unwrap().face_template.clear();
    let response = server.verify(withdraw.clone()).await;
    assert_eq!(refusal(&response), pb::RefusalReason::NewCardPending);
    let close = closing("app-open", pb::ApplicationState::Cancelled, "", STATION);
    assert!(server.client.close_application(close).await.unwrap().into_inner().closed);
    withdraw.application_id = "app-found-2".into();
    let response = server.verify(withdraw).await;
    assert_eq!(refusal(&response), pb::RefusalReason::Unspecified);
    assert!(response.decision.is_some());
    server.stop().await;
    let refused = "SELECT COUNT(*) FROM verifications WHERE refusal_reason = 'NEW_CARD_PENDING'";
    assert_eq!(fixture.count(refused).await, 1);
}

#[tokio::test]
async fn k5_a_second_open_application_is_refused_until_the_first_is_closed() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = replacement();
    let first = server.verify(issue("app-a", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    let term = signed_decision_from_proto("decision", first.decision.as_ref()).unwrap().decision.card;
    let second = server.verify(issue("app-b", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&second), pb::RefusalReason::ApplicationAlreadyOpen);

    // Closing: unknown application, bad state, then collected with the new card.
    let close = |id: &str, state: pb::ApplicationState, serial: &str| pb::CloseApplicationRequest {
        application_id: id.into(),
        final_state: state as i32,
        new_card_serial: serial.into(),
        station_id: STATION.into(),
        request_id: String::new(),
    };
    // A collection of an application never verified: nothing can have been collected.
    let err =
        server.client.close_application(close("nope", pb::ApplicationState::Collected, "JX-9")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = server.client.close_application(close("app-a", pb::ApplicationState::Approved, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // COLLECTED names the card handed over; the station is required.
    let err = server.client.close_application(close("app-a", pb::ApplicationState::Collected, " ")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("new_card_serial:"), "{}", err.message());
    let anonymous = pb::CloseApplicationRequest {
        station_id: String::new(),
        ..close("app-a", pb::ApplicationState::Cancelled, "")
    };
    let err = server.client.close_application(anonymous).await.unwrap_err();
    assert!(err.message().contains("station_id:"), "{}", err.message());
    // Only the lodging station closes: another station can neither cancel nor collect it.
    for state in [pb::ApplicationState::Cancelled, pb::ApplicationState::Collected] {
        let other =
            pb::CloseApplicationRequest { station_id: "station-other".into(), ..close("app-a", state, "JX-6666") };
        let err = server.client.close_application(other).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(String::from_utf8_lossy(err.details()).contains("NOT_THE_LODGING_STATION"), "{err:?}");
    }
    let collected = close("app-a", pb::ApplicationState::Collected, "JX-1001");
    assert!(server.client.close_application(collected.clone()).await.unwrap().into_inner().closed);
    assert!(server.client.close_application(collected.clone()).await.unwrap().into_inner().closed, "idempotent");
    let other = pb::CloseApplicationRequest { station_id: LOCAL_STATION.into(), ..collected };
    assert_eq!(server.client.close_application(other).await.unwrap_err().code(), Code::FailedPrecondition);
    let err = server.client.close_application(close("app-a", pb::ApplicationState::Cancelled, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let citizen = server.citizen(&p).await;
    assert!(citizen.open_application_ids.is_empty());
    assert_eq!(citizen.current_card_serial, "JX-1001");
    assert_eq!(citizen.current_card_valid_until, term.valid_until.map(|d| d.to_string()).unwrap_or_default());

    // The old card is no longer current; the new one is, and a new application is accepted.
    let old = server.verify(issue("app-c", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&old), pb::RefusalReason::CardNotCurrent);
    let new = server.verify(issue("app-d", &p, pb::ApplicationKind::Replacement, "JX-1001")).await;
    assert!(new.decision.is_some());
    server.stop().await;
    let closes = "SELECT COUNT(*) FROM audit_log WHERE action = 'close_application'";
    assert_eq!(fixture.count(&format!("{closes} AND outcome = 'COLLECTED'")).await, 1);
    // Two closes by another station, two contradicting the first close: each refusal is audited.
    assert_eq!(fixture.count(&format!("{closes} AND outcome LIKE 'refused:%'")).await, 4);
}

#[tokio::test]
async fn k2_a_renewal_before_the_window_is_refused() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let response = server.verify(issue("app-early", &not_renewable(), pb::ApplicationKind::Renewal, "JX-0003")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::NotYetRenewable);
    let response = server.verify(issue("app-due", &renewable(), pb::ApplicationKind::Renewal, "JX-0002")).await;
    let decision = signed_decision_from_proto("decision", response.decision.as_ref()).unwrap();
    assert!(response.loss_decision.is_none(), "a renewal files no loss report");
    // C1: 46 and over on the day of issue → long-term.
    assert_eq!(decision.decision.card.valid_until, None);
    server.stop().await;
}

/// Instants around the first day of 2118 in Beijing (UTC+8): 23:30 on 31 December there, then
/// 07:30 and 08:30 on 1 January, while it is still 31 December in UTC at the first two.
const BEFORE_BEIJING_NEW_YEAR: &str = "2117-12-31T15:30:00Z";
const BEIJING_NEW_YEAR_0730: &str = "2117-12-31T23:30:00Z";
const BEIJING_NEW_YEAR_0830: &str = "2118-01-01T00:30:00Z";

/// The answer to `request` on a fresh register whose clock stands at `instant`.
async fn verify_at(instant: &str, request: pb::VerifyRequest) -> pb::VerifyResponse {
    let fixture = Fixture::new();
    let mut server = fixture.start_at(instant).await;
    let response = server.verify(request).await;
    server.stop().await;
    response
}

#[tokio::test]
async fn c1_a_citizen_turning_46_that_beijing_morning_gets_a_long_term_card() {
    let p = turning_46();
    let term = |response: pb::VerifyResponse| {
        let card = signed_decision_from_proto("decision", response.decision.as_ref()).unwrap().decision.card;
        (card.valid_from, card.valid_until)
    };
    let request = issue("app-term", &p, pb::ApplicationKind::Replacement, "JX-0009");
    let before = term(verify_at(BEFORE_BEIJING_NEW_YEAR, request.clone()).await);
    assert_eq!(before, (date(2117, 12, 31), Some(date(2137, 12, 31))), "still 45 in Beijing: 20 years");
    for instant in [BEIJING_NEW_YEAR_0730, BEIJING_NEW_YEAR_0830] {
        let on_the_day = term(verify_at(instant, request.clone()).await);
        assert_eq!(on_the_day, (date(2118, 1, 1), None), "46 in Beijing at {instant}: long-term");
    }
}

#[tokio::test]
async fn k2_the_renewal_window_opens_at_midnight_in_beijing() {
    let request = issue("app-renew", &due_on_new_year(), pb::ApplicationKind::Renewal, "JX-0010");
    let early = verify_at(BEFORE_BEIJING_NEW_YEAR, request.clone()).await;
    assert_eq!(refusal(&early), pb::RefusalReason::NotYetRenewable, "91 days before expiry in Beijing");
    for instant in [BEIJING_NEW_YEAR_0730, BEIJING_NEW_YEAR_0830] {
        let due = verify_at(instant, request.clone()).await;
        assert!(due.decision.is_some(), "90 days before expiry in Beijing at {instant}: {due:?}");
    }
}

#[tokio::test]
async fn n1_a_citizen_born_today_in_beijing_is_not_born_in_the_future() {
    let fixture = Fixture::new();
    let newborn = IdNumber::compose("360102", date(2118, 1, 1), 33);
    let get = |id: &IdNumber| pb::GetCitizenRequest { id_number: id.as_str().into() };
    let mut server = fixture.start_at(BEFORE_BEIJING_NEW_YEAR).await;
    let error = server.client.get_citizen(get(&newborn)).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "born tomorrow in Beijing");
    assert!(error.message().contains("id_number:") && error.message().contains("future"), "{}", error.message());
    server.stop().await;
    for instant in [BEIJING_NEW_YEAR_0730, BEIJING_NEW_YEAR_0830] {
        let mut server = fixture.start_at(instant).await;
        let error = server.client.get_citizen(get(&newborn)).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "a valid number, not on the register, at {instant}");
        server.stop().await;
    }
}

#[tokio::test]
async fn n3_a_citizen_outside_the_jurisdiction_is_unknown() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    // Registered in Sichuan: another bureau's citizen, never imported here.
    let response = server.verify(report_loss("app-sc", &sichuan(), "SC-0001")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::UnknownCitizen);
    // A Jiangxi number whose registration is in Sichuan.
    let response = server.verify(report_loss("app-moved", &sichuan_registered(), "JX-0006")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::UnknownCitizen);
    // N3: a Jiangxi citizen declared (and so routed and judged) as registered elsewhere is not confirmed,
    // whichever province the station claimed.
    for province in ["33", "51"] {
        let mut request = issue("app-declared", &replacement(), pb::ApplicationKind::Replacement, "JX-0001");
        request.declared_province = province.into();
        request.application_id = format!("app-declared-{province}");
        let response = server.verify(request).await;
        assert_eq!(refusal(&response), pb::RefusalReason::UnknownCitizen);
        assert!(response.decision.is_none() && response.loss_decision.is_none());
    }
    let err =
        server.client.get_citizen(pb::GetCitizenRequest { id_number: sichuan().id.as_str().into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn n1_invalid_requests_name_every_field_and_write_nothing() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let mut request = issue("", &replacement(), pb::ApplicationKind::LossReport, "");
    request.id_number = "360102199003071231".into(); // wrong check character (N2)
    request.station_id = PRODUCER.into(); // not an intake station
    request.producer_id = STATION.into(); // not a producer
    request.declared_province = "99".into(); // not a province (N3)
    request.live = None;
    let err = server.client.verify(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for field in [
        "application_id",
        "station_id",
        "kind",
        "id_number",
        "live.face_template",
        "live.fingerprint_template",
        "producer_id",
        "declared_province",
    ] {
        assert!(err.message().contains(&format!("{field}:")), "{field} missing from {}", err.message());
    }
    let err = server
        .client
        .verify(pb::VerifyRequest { purpose: 0, ..report_loss("x", &replacement(), "JX-0001") })
        .await
        .unwrap_err();
    assert!(err.message().contains("purpose:"), "{}", err.message());
    // N3: the declared province is required.
    let err = server
        .client
        .verify(pb::VerifyRequest { declared_province: String::new(), ..report_loss("x", &replacement(), "JX-0001") })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("declared_province:"), "{}", err.message());
    let err = server
        .client
        .record_credit_status(pb::RecordCreditStatusRequest {
            id_number: replacement().id.as_str().into(),
            credit_status: 0,
            note: "x".repeat(300),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("credit_status:") && err.message().contains("note:"), "{}", err.message());
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications").await, 0);
    assert_eq!(fixture.count("SELECT COUNT(*) FROM audit_log").await, 0);
}

#[tokio::test]
async fn s4_start_refuses_a_key_that_is_not_the_directorys() {
    let fixture = Fixture::new();
    let other_keys = fixture.dir_path.join("other-keys");
    std::fs::create_dir(&other_keys).unwrap();
    write_signing_key(&other_keys.join(format!("{KEY_ID}.key")), &generate_signing_key()).unwrap();
    let mut config = fixture.config("");
    config.signing.key_dir = Some(other_keys.clone());
    let error = format!("{:#}", fixture.start_with(config).await.err().unwrap());
    assert!(error.contains("signing.keys") && error.contains("does not match"), "{error}");
    // A key the directory does not list signs nothing: no usable key, no start.
    std::fs::rename(other_keys.join(format!("{KEY_ID}.key")), other_keys.join("unlisted.key")).unwrap();
    let mut config = fixture.config("");
    config.signing.key_dir = Some(other_keys);
    let error = format!("{:#}", fixture.start_with(config).await.err().unwrap());
    assert!(error.contains("signing.keys") && error.contains("valid now"), "{error}");
    let mut config = fixture.config("");
    config.server.bureau_id = PRODUCER.into();
    let error = fixture.start_with(config).await.err().unwrap().to_string();
    assert!(error.contains("server.bureau_id"), "{error}");
}

#[tokio::test]
async fn n3_the_import_takes_only_this_bureaus_citizens_and_never_overwrites() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let r = renewable();
    server
        .client
        .record_credit_status(pb::RecordCreditStatusRequest {
            id_number: r.id.as_str().into(),
            credit_status: pb::CreditStatus::Bad as i32,
            note: String::new(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM citizens").await, 9, "only this bureau's citizens");
    let mut server = fixture.start().await;
    let citizen = server.citizen(&r).await;
    assert_eq!(citizen.credit_status, pb::CreditStatus::Bad as i32);
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM citizens").await, 9);
}

/// The main flow on PostgreSQL, in a scratch database of the test server (see
/// `yidi_testkit`: skipped when unreachable, unless `YIDI_REQUIRE_POSTGRES=1`).
#[tokio::test]
async fn s4_postgres_verify_replay_and_close() {
    let Some(scratch) = postgres_for_tests("verification").await.unwrap() else { return };
    let fixture = Fixture::with_database(Some(scratch.url().to_owned()));
    let mut server = fixture.start().await;
    let p = replacement();
    let request = issue("pg-app-1", &p, pb::ApplicationKind::Replacement, "JX-0001");
    let first = server.verify(request.clone()).await;
    let again = server.verify(request).await;
    assert_eq!(first, again);
    let decision = signed_decision_from_proto("decision", first.decision.as_ref()).unwrap();
    let expect = Expectation { purpose: DecisionPurpose::IssueCard, addressee_id: PRODUCER, now: now() };
    decision.verify(&directory(&fixture), expect).unwrap();
    let second = server.verify(issue("pg-app-2", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&second), pb::RefusalReason::ApplicationAlreadyOpen);
    let close = closing("pg-app-1", pb::ApplicationState::Collected, "JX-2001", STATION);
    assert!(server.client.close_application(close).await.unwrap().into_inner().closed);
    let citizen = server.citizen(&p).await;
    assert_eq!(citizen.current_card_serial, "JX-2001");
    assert_eq!(citizen.current_card_valid_until, "2138-01-01");
    let death = pb::RecordDeathRequest {
        id_number: deceased().id.as_str().into(),
        date_of_death: "2117-01-01".into(),
        request_id: String::new(),
    };
    server.client.record_death(death).await.unwrap();
    server.stop().await;
    // A restart re-runs the (idempotent) migration and import.
    let server = fixture.start().await;
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM citizens").await, 9);
    assert_eq!(fixture.count("SELECT COUNT(*) FROM audit_log").await, 4);
    scratch.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k5_concurrent_applications_of_one_citizen_open_only_one() {
    let fixture = Fixture::new();
    let server = fixture.start().await;
    let p = replacement();
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut client = server.client.clone();
        // Two calls per application id: a retry must get the same answer.
        let request = issue(&format!("race-{}", i / 2), &p, pb::ApplicationKind::Replacement, "JX-0001");
        calls.push(tokio::spawn(async move { client.verify(request).await.map(|r| r.into_inner()) }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().unwrap());
    }
    let approved: Vec<_> = answers.iter().filter(|a| a.decision.is_some()).collect();
    assert_eq!(approved.len(), 2, "one application approved, answered twice: {answers:?}");
    assert_eq!(approved[0], approved[1]);
    for pair in answers.chunks(2) {
        assert_eq!(pair[0], pair[1], "a retry gets the stored answer");
    }
    assert!(
        answers
            .iter()
            .filter(|a| a.decision.is_none())
            .all(|a| refusal(a) == pb::RefusalReason::ApplicationAlreadyOpen)
    );
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications").await, 3);
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications WHERE open").await, 1);
}

/// A registry that records the transfer decisions it receives and answers with the card named.
#[derive(Clone, Default)]
struct TransferRegistry {
    received: std::sync::Arc<std::sync::Mutex<Vec<pb::SignedDecision>>>,
    /// The `request_id` of each call received.
    keys: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl yidi_testkit::fake::RegistryFake for TransferRegistry {
    async fn transfer_registration(
        &self,
        request: pb::LossRegistryTransferRegistrationRequest,
    ) -> Result<pb::LossRegistryTransferRegistrationResponse, tonic::Status> {
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(tonic::Status::permission_denied("DECISION_WRONG_JURISDICTION"));
        }
        let signed = request.decision.unwrap_or_default();
        let decision = signed.decision.clone().unwrap_or_default();
        self.received.lock().unwrap().push(signed);
        self.keys.lock().unwrap().push(request.request_id);
        Ok(pb::LossRegistryTransferRegistrationResponse {
            home_bureau_id: decision.transfer_to_bureau_id,
            card_serials: vec![decision.previous_card_serial],
            transferred_at: None,
            already_transferred: false,
        })
    }
}

fn has_reason(status: &tonic::Status, reason: &str) -> bool {
    String::from_utf8_lossy(status.details()).contains(reason)
}

#[tokio::test]
async fn k5_a_close_before_its_verify_is_remembered_and_the_verify_is_refused() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = replacement();
    // The station cancelled while its Verify was on the way; the close arrives first.
    let early = closing("app-early", pb::ApplicationState::Cancelled, "", STATION);
    assert!(server.client.close_application(early.clone()).await.unwrap().into_inner().closed);
    assert!(server.client.close_application(early.clone()).await.unwrap().into_inner().closed, "idempotent");
    // Only the station that sent it can be the lodging one.
    let other = pb::CloseApplicationRequest { station_id: "station-other".into(), ..early };
    let err = server.client.close_application(other).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(has_reason(&err, "NOT_THE_LODGING_STATION"), "{err:?}");
    // A collection cannot come before the approval it needs.
    let collected = closing("app-never", pb::ApplicationState::Collected, "JX-9", STATION);
    assert_eq!(server.client.close_application(collected).await.unwrap_err().code(), Code::NotFound);

    // The late Verify (and its redelivery) is refused as cancelled and opens nothing.
    for _ in 0..2 {
        let late = issue("app-early", &p, pb::ApplicationKind::Replacement, "JX-0001");
        let err = server.client.verify(late).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(has_reason(&err, "APPLICATION_CANCELLED"), "{err:?}");
        assert!(err.message().contains("app-early"), "{}", err.message());
    }
    assert!(server.citizen(&p).await.open_application_ids.is_empty());
    // The citizen is free to apply elsewhere at once.
    let next = pb::VerifyRequest {
        station_id: "station-other".into(),
        ..issue("app-next", &p, pb::ApplicationKind::Replacement, "JX-0001")
    };
    assert!(server.verify(next).await.decision.is_some());
    assert_eq!(server.citizen(&p).await.open_application_ids, vec!["app-next".to_owned()]);
    server.stop().await;
    assert_eq!(fixture.count("SELECT COUNT(*) FROM verifications").await, 1);
    assert_eq!(fixture.count("SELECT COUNT(*) FROM early_closes").await, 1);
    let audit = "SELECT COUNT(*) FROM audit_log WHERE";
    let before_verify = format!("{audit} action = 'close_application' AND outcome = 'CANCELLED_BEFORE_VERIFY'");
    assert_eq!(fixture.count(&before_verify).await, 1);
    let refused = format!("{audit} action = 'verify' AND outcome = 'refused:APPLICATION_CANCELLED'");
    assert_eq!(fixture.count(&refused).await, 2, "each refused Verify is audited");
}

/// Verify and close of many applications at once: whichever commits first, nothing stays open.
async fn close_racing_verify(fixture: &Fixture) {
    let server = fixture.start().await;
    let p = replacement();
    for i in 0..12 {
        let id = format!("race-close-{i}");
        let mut verifier = server.client.clone();
        let mut closer = server.client.clone();
        let request = issue(&id, &p, pb::ApplicationKind::Replacement, "");
        let close = closing(&id, pb::ApplicationState::Cancelled, "", STATION);
        let verify = tokio::spawn(async move { verifier.verify(request).await });
        let closed = tokio::spawn(async move { closer.close_application(close).await });
        assert!(closed.await.unwrap().unwrap().into_inner().closed);
        match verify.await.unwrap() {
            Ok(answer) => assert!(answer.into_inner().decision.is_some(), "{id}: approved, then closed"),
            Err(err) => assert!(has_reason(&err, "APPLICATION_CANCELLED"), "{id}: {err:?}"),
        }
        let mut client = server.client.clone();
        let citizen = client.get_citizen(pb::GetCitizenRequest { id_number: p.id.as_str().into() }).await.unwrap();
        assert!(citizen.into_inner().open_application_ids.is_empty(), "{id} left open");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k5_a_close_racing_its_verify_never_leaves_it_open() {
    close_racing_verify(&Fixture::new()).await;
    if let Some(scratch) = postgres_for_tests("verification").await.unwrap() {
        close_racing_verify(&Fixture::with_database(Some(scratch.url().to_owned()))).await;
        scratch.drop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// K5 model: the lodging station as a model (its application states, its outbox, deliveries in
// flight), driving the real home bureau through every interleaving its outbox can produce.

/// An application at the modelled station: its state (as the station's rules move it) and whether
/// the home bureau was told it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtStation {
    Received,
    Verifying,
    /// Approved, possibly in production: cancellable until collected in this model.
    Approved,
    Refused,
    Cancelled,
    Collected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Verify,
    Close,
}

/// What the home bureau answered a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    Approved,
    Refused,
    /// FAILED_PRECONDITION APPLICATION_CANCELLED: a close came first.
    Cancelled,
    Closed,
}

#[derive(Debug)]
struct Message {
    app: usize,
    step: Step,
    /// Neither answered nor dropped.
    pending: bool,
}

/// A delivery claimed by the dispatcher: sent (and answered) later, and recorded later still.
#[derive(Debug)]
struct InFlight {
    message: usize,
    /// The state the step read when it was claimed (the close names it).
    state: AtStation,
    heard: Option<Heard>,
}

struct ModelStation {
    case: usize,
    /// Whether a late approval of a cancelled application queues another close (the station's
    /// rule); off, the home bureau's memory of early closes must suffice alone.
    reclose: bool,
    apps: Vec<(AtStation, bool)>,
    messages: Vec<Message>,
    in_flight: Vec<InFlight>,
    log: Vec<String>,
}

/// xorshift64*: a seeded, reproducible sequence.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

impl ModelStation {
    fn app_id(&self, app: usize) -> String {
        format!("model-{}-{app}", self.case)
    }

    fn owe(&mut self, app: usize, step: Step) {
        self.messages.push(Message { app, step, pending: true });
    }

    fn open(&self) -> Vec<usize> {
        (0..self.apps.len())
            .filter(|&a| matches!(self.apps[a].0, AtStation::Received | AtStation::Verifying | AtStation::Approved))
            .collect()
    }

    fn submit(&mut self) {
        self.apps.push((AtStation::Received, false));
        self.owe(self.apps.len() - 1, Step::Verify);
    }

    /// The station's cancel: every application for a card may be open at home, so a close is owed
    /// in any cancellable state; what is still owed about it is dropped (deliveries in flight go on).
    fn cancel(&mut self, app: usize) {
        if !matches!(self.apps[app].0, AtStation::Received | AtStation::Verifying | AtStation::Approved) {
            return;
        }
        self.apps[app] = (AtStation::Cancelled, false);
        for m in self.messages.iter_mut().filter(|m| m.app == app) {
            m.pending = false;
        }
        self.owe(app, Step::Close);
    }

    fn collect(&mut self, app: usize) {
        if self.apps[app].0 == AtStation::Approved {
            self.apps[app] = (AtStation::Collected, false);
            self.owe(app, Step::Close);
        }
    }

    /// The dispatcher claims a pending message; the step first checks it is still owed.
    fn claim(&mut self, message: usize) {
        let Message { app, step, .. } = self.messages[message];
        let (state, notified) = self.apps[app];
        let owed = match step {
            Step::Verify => matches!(state, AtStation::Received | AtStation::Verifying),
            Step::Close => matches!(state, AtStation::Cancelled | AtStation::Collected) && !notified,
        };
        if !owed {
            self.messages[message].pending = false;
            return;
        }
        if step == Step::Verify {
            self.apps[app].0 = AtStation::Verifying;
        }
        self.in_flight.push(InFlight { message, state: self.apps[app].0, heard: None });
    }

    /// The call to the home bureau.
    async fn send(&mut self, index: usize, server: &mut Server, p: &Person) {
        let InFlight { message, state, .. } = self.in_flight[index];
        let Message { app, step, .. } = self.messages[message];
        let id = self.app_id(app);
        let heard = match step {
            Step::Verify => match server.client.verify(issue(&id, p, pb::ApplicationKind::Replacement, "")).await {
                Ok(answer) if answer.get_ref().decision.is_some() => Heard::Approved,
                Ok(_) => Heard::Refused,
                Err(err) if has_reason(&err, "APPLICATION_CANCELLED") => Heard::Cancelled,
                Err(err) => panic!("case {}: Verify of {id} failed: {err:?}\n{}", self.case, self.log.join("\n")),
            },
            Step::Close => {
                let (final_state, serial) = match state {
                    AtStation::Collected => (pb::ApplicationState::Collected, format!("NEW-{id}")),
                    _ => (pb::ApplicationState::Cancelled, String::new()),
                };
                match server.client.close_application(closing(&id, final_state, &serial, STATION)).await {
                    Ok(_) => Heard::Closed,
                    Err(err) => panic!("case {}: close of {id} failed: {err:?}\n{}", self.case, self.log.join("\n")),
                }
            }
        };
        self.log.push(format!("sent {step:?} {id}: {heard:?}"));
        self.in_flight[index].heard = Some(heard);
    }

    /// The answer recorded, as the station's handlers do: conditional on the state it is in now.
    fn record(&mut self, index: usize) {
        let InFlight { message, heard, .. } = self.in_flight.remove(index);
        let app = self.messages[message].app;
        let (state, notified) = self.apps[app];
        match heard {
            Some(Heard::Approved) if state == AtStation::Verifying => self.apps[app].0 = AtStation::Approved,
            // Approved after a cancel: a close is owed unless one is still on its way.
            Some(Heard::Approved) if state == AtStation::Cancelled && notified && self.reclose => {
                self.apps[app].1 = false;
                self.owe(app, Step::Close);
            }
            Some(Heard::Refused) if state == AtStation::Verifying => self.apps[app].0 = AtStation::Refused,
            Some(Heard::Cancelled) => {
                assert_eq!(
                    state,
                    AtStation::Cancelled,
                    "case {}: refused as cancelled\n{}",
                    self.case,
                    self.log.join("\n")
                )
            }
            Some(Heard::Closed) => self.apps[app].1 = true,
            _ => {}
        }
        self.messages[message].pending = false;
        self.log.push(format!("recorded {:?} of app {app}: now {:?}", heard, self.apps[app]));
    }

    /// Delivers everything owed and in flight, in a random order.
    async fn drain(&mut self, rng: &mut Seeded, server: &mut Server, p: &Person) {
        loop {
            if !self.in_flight.is_empty() {
                let index = rng.below(self.in_flight.len());
                if self.in_flight[index].heard.is_none() {
                    self.send(index, server, p).await;
                }
                self.record(index);
            } else if let Some(message) = self.messages.iter().position(|m| m.pending) {
                self.claim(message);
            } else {
                return;
            }
        }
    }

    /// Whenever the station holds no open application (after the outbox drained), neither does the
    /// home bureau; and the home bureau never holds open one the station has ended.
    async fn check(&self, server: &mut Server, p: &Person) {
        let open_at_home = server.citizen(p).await.open_application_ids;
        let open_here: Vec<String> = self.open().into_iter().map(|a| self.app_id(a)).collect();
        let ours: Vec<&String> =
            open_at_home.iter().filter(|id| id.starts_with(&format!("model-{}-", self.case))).collect();
        assert_eq!(ours.len(), open_at_home.len(), "case {}: another case left {open_at_home:?} open", self.case);
        for id in ours {
            assert!(
                open_here.contains(id),
                "case {}: {id} is open at home but not at the station ({:?})\n{}",
                self.case,
                self.apps,
                self.log.join("\n")
            );
        }
    }
}

#[tokio::test]
async fn k5_open_marks_converge_under_any_interleaving() {
    let fixture = Fixture::new();
    let mut server = fixture.start().await;
    let p = replacement();
    for case in 0..256 {
        let mut rng = Seeded(0x9e37_79b9_7f4a_7c15 ^ (case as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        let mut station = ModelStation {
            case,
            reclose: case % 2 == 0,
            apps: Vec::new(),
            messages: Vec::new(),
            in_flight: Vec::new(),
            log: Vec::new(),
        };
        station.submit();
        for _ in 0..60 {
            let op = rng.below(15);
            match op {
                0 if station.apps.len() < 4 => {
                    station.submit();
                    station.log.push(format!("submit {}", station.apps.len() - 1));
                }
                1 | 2 => {
                    let app = rng.below(station.apps.len());
                    station.log.push(format!("cancel {app} ({:?})", station.apps[app].0));
                    station.cancel(app);
                }
                3 => {
                    let app = rng.below(station.apps.len());
                    station.log.push(format!("collect {app} ({:?})", station.apps[app].0));
                    station.collect(app);
                }
                // A restart: deliveries in flight are lost; their messages stay pending (a
                // delivery already sent is redelivered).
                4 => {
                    station.log.push(format!("restart, {} in flight lost", station.in_flight.len()));
                    station.in_flight.clear();
                }
                // Claim a pending message; now and then one already in flight (its lease ran out:
                // a redelivery).
                5..=7 | 14 => {
                    let redeliver = op == 14;
                    let pending: Vec<usize> = (0..station.messages.len())
                        .filter(|&m| station.messages[m].pending)
                        .filter(|&m| redeliver == station.in_flight.iter().any(|f| f.message == m))
                        .collect();
                    if !pending.is_empty() {
                        station.claim(pending[rng.below(pending.len())]);
                    }
                }
                8..=10 if !station.in_flight.is_empty() => {
                    let index = rng.below(station.in_flight.len());
                    if station.in_flight[index].heard.is_none() {
                        station.send(index, &mut server, &p).await;
                    }
                }
                11..=13 if !station.in_flight.is_empty() => {
                    let index = rng.below(station.in_flight.len());
                    if station.in_flight[index].heard.is_some() {
                        station.record(index);
                    }
                }
                _ => {}
            }
        }
        station.drain(&mut rng, &mut server, &p).await;
        station.check(&mut server, &p).await;
        // Every application the station still holds ends (collected or cancelled); once told, the
        // home bureau holds none.
        for app in station.open() {
            if rng.below(2) == 0 {
                station.collect(app);
            }
            station.cancel(app);
        }
        station.drain(&mut rng, &mut server, &p).await;
        assert!(station.open().is_empty());
        let open_at_home = server.citizen(&p).await.open_application_ids;
        assert!(open_at_home.is_empty(), "case {case}: {open_at_home:?} open at home\n{}", station.log.join("\n"));
    }
    server.stop().await;
}

/// S4: the old home bureau signs a transfer decision naming the new bureau, the registry records it,
/// and only then does the citizen leave this register (UNKNOWN_CITIZEN from then on). Not while an
/// application is open, not to its own jurisdiction or a province no bureau holds, and nothing
/// changes when the registry refuses.
#[tokio::test]
async fn s4_a_registration_transfer_is_signed_delivered_and_leaves_the_register() {
    let registry = TransferRegistry::default();
    let (endpoint, _) = yidi_testkit::fake::serve_fakes(tonic::service::Routes::new(
        yidi_testkit::fake::registry_server(registry.clone()),
    ))
    .await
    .unwrap();
    let fixture = Fixture::with_registry(endpoint);
    let mut server = fixture.start().await;
    let p = replacement();
    let transfer = |p: &Person, province: &str| pb::TransferRegistrationRequest {
        id_number: p.id.as_str().into(),
        new_province: province.into(),
        request_id: String::new(),
    };
    // Not while an application of the citizen is open (K5).
    assert!(server.verify(issue("app-open", &p, pb::ApplicationKind::Replacement, "JX-0001")).await.decision.is_some());
    let error = server.client.transfer_registration(transfer(&p, "51")).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(has_reason(&error, "APPLICATION_OPEN"), "{error:?}");
    let close = closing("app-open", pb::ApplicationState::Cancelled, "", STATION);
    server.client.close_application(close).await.unwrap();
    // Only to another home bureau's province.
    let error = server.client.transfer_registration(transfer(&p, "36")).await.unwrap_err();
    assert!(has_reason(&error, "SAME_HOME_BUREAU"), "{error:?}");
    let error = server.client.transfer_registration(transfer(&p, "11")).await.unwrap_err();
    assert!(has_reason(&error, "NO_HOME_BUREAU"), "{error:?}");
    let error = server.client.transfer_registration(transfer(&p, "99")).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(registry.received.lock().unwrap().is_empty());

    // A refusal by the registry changes nothing here.
    registry.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    let error = server.client.transfer_registration(transfer(&p, "51")).await.unwrap_err();
    assert!(has_reason(&error, "REGISTRY_REFUSED"), "{error:?}");
    assert_eq!(server.citizen(&p).await.registration_province, "36");
    registry.refuse.store(false, std::sync::atomic::Ordering::SeqCst);

    let done = server.client.transfer_registration(transfer(&p, "51")).await.unwrap().into_inner();
    assert_eq!(done.new_home_bureau_id, "home-sichuan");
    assert_eq!(done.card_serials, vec!["JX-0001".to_owned()]);
    let received = registry.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let signed = signed_decision_from_proto("decision", received.first()).unwrap();
    let expect = Expectation { purpose: DecisionPurpose::TransferRegistration, addressee_id: REGISTRY, now: now() };
    let decision = signed.verify(&directory(&fixture), expect).unwrap();
    assert_eq!(decision.decision_id, done.decision_id);
    // Keyed by the decision, so that a retry on another registry replica is answered as the first.
    let keys = registry.keys.lock().unwrap().clone();
    assert_eq!(keys.last().cloned(), Some(format!("transfer-{}", done.decision_id)), "{keys:?}");
    assert_eq!(decision.transfer_to_bureau_id, "home-sichuan");
    assert_eq!(decision.card.holder.registration_province, "36", "signed for the province this bureau holds");
    assert_eq!(decision.previous_card_serial, "JX-0001");

    // The citizen has left this register.
    assert_eq!(server.citizen(&p).await.registration_province, "51");
    let response = server.verify(issue("app-after", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&response), pb::RefusalReason::UnknownCitizen);
    let error = server.client.transfer_registration(transfer(&p, "51")).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    server.stop().await;
    let audited = "SELECT COUNT(*) FROM audit_log WHERE action = 'transfer_registration'";
    assert_eq!(fixture.count(&format!("{audited} AND outcome = 'TRANSFERRED'")).await, 1);
}

// ---------------------------------------------------------------------------------------------
// K5: an application held open for long is asked about at its station.

/// A station that answers `GetApplicationOutcome` as the test sets it (NOT_FOUND for what it was
/// not told about) and records every question.
#[derive(Clone, Default)]
struct OutcomeStation {
    answers: Arc<Mutex<HashMap<String, Result<pb::GetApplicationOutcomeResponse, Code>>>>,
    /// (application id, home bureau id) of each question, in order.
    asked: Arc<Mutex<Vec<(String, String)>>>,
}

impl OutcomeStation {
    fn answer(&self, application_id: &str, answer: Result<pb::GetApplicationOutcomeResponse, Code>) {
        self.answers.lock().unwrap().insert(application_id.to_owned(), answer);
    }

    fn times_asked(&self, application_id: &str) -> usize {
        self.asked.lock().unwrap().iter().filter(|(id, _)| id == application_id).count()
    }

    /// Serves it; its endpoint.
    async fn serve(&self) -> String {
        let routes = tonic::service::Routes::new(yidi_testkit::fake::intake_server(self.clone()));
        yidi_testkit::fake::serve_fakes(routes).await.unwrap().0
    }
}

#[tonic::async_trait]
impl yidi_testkit::fake::IntakeFake for OutcomeStation {
    async fn get_application_outcome(
        &self,
        request: tonic::Request<pb::GetApplicationOutcomeRequest>,
    ) -> Result<tonic::Response<pb::GetApplicationOutcomeResponse>, tonic::Status> {
        let request = request.into_inner();
        self.asked.lock().unwrap().push((request.application_id.clone(), request.home_bureau_id.clone()));
        match self.answers.lock().unwrap().get(&request.application_id).cloned() {
            Some(Ok(answer)) => Ok(tonic::Response::new(answer)),
            Some(Err(code)) => Err(tonic::Status::new(code, "as the test says")),
            None => Err(tonic::Status::not_found("no such application here")),
        }
    }
}

fn outcome(
    application_id: &str,
    outcome: pb::ApplicationOutcome,
    state: pb::ApplicationState,
    serial: &str,
) -> pb::GetApplicationOutcomeResponse {
    pb::GetApplicationOutcomeResponse {
        application_id: application_id.into(),
        outcome: outcome as i32,
        state: state as i32,
        new_card_serial: serial.into(),
        updated_at: Some(yidi_grpc::convert::timestamp(now())),
    }
}

/// The bureau restarted `hours` after `now()`, asking stations every second (after the default hour).
async fn restarted_after(fixture: &Fixture, hours: i64) -> Server {
    let later = now() + chrono::Duration::hours(hours);
    let config = fixture.config_at(later, "[verification]\nask_station_every_seconds = 1\n");
    fixture.start_with(config).await.unwrap()
}

/// Waits (up to 15 s) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn open_ids(server: &mut Server, p: &Person) -> Vec<String> {
    server.citizen(p).await.open_application_ids
}

const ASKED_BY_SWEEP: &str = "SELECT COUNT(*) FROM audit_log WHERE action = 'close_application' \
                              AND detail LIKE '%learnt by asking the station%'";

#[tokio::test]
async fn k5_an_application_whose_close_was_lost_is_closed_once_its_station_says_it_ended() {
    let station = OutcomeStation::default();
    let fixture = Fixture::with_stations(station.serve().await, closed_endpoint());
    let p = replacement();
    let mut server = fixture.start().await;
    assert!(server.verify(issue("app-lost", &p, pb::ApplicationKind::Replacement, "JX-0001")).await.decision.is_some());
    server.stop().await;
    // The station handed the card over; its close never came (a dead letter, say).
    station.answer(
        "app-lost",
        Ok(outcome("app-lost", pb::ApplicationOutcome::Ended, pb::ApplicationState::Collected, "JX-2001")),
    );

    // Open for less than the hour: nobody is asked.
    let mut server = restarted_after(&fixture, 0).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(station.times_asked("app-lost"), 0);
    assert_eq!(open_ids(&mut server, &p).await, ["app-lost"]);
    server.stop().await;

    let mut server = restarted_after(&fixture, 2).await;
    until("the station was asked", || station.times_asked("app-lost") > 0).await;
    let mut closed = false;
    for _ in 0..100 {
        if open_ids(&mut server, &p).await.is_empty() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(closed, "closed once the station said it ended");
    // As the station's close would have: the card handed over is the current one.
    let citizen = server.citizen(&p).await;
    assert_eq!(citizen.current_card_serial, "JX-2001");
    assert_eq!(station.asked.lock().unwrap().first().map(|(_, home)| home.as_str()), Some(HOME));
    // A new application is no longer refused as a second open one.
    let next = server.verify(issue("app-next", &p, pb::ApplicationKind::Replacement, "JX-2001")).await;
    assert!(next.decision.is_some(), "{next:?}");
    // Asked about no more once closed (only app-next, not yet an hour old, is open).
    let asked = station.times_asked("app-lost");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(station.times_asked("app-lost"), asked);
    // The station's late close is answered as a repeat.
    let late = closing("app-lost", pb::ApplicationState::Collected, "JX-2001", STATION);
    assert!(server.client.close_application(late).await.unwrap().into_inner().closed);
    server.stop().await;
    assert_eq!(fixture.count(&format!("{ASKED_BY_SWEEP} AND outcome = 'COLLECTED'")).await, 1);
}

#[tokio::test]
async fn k5_an_application_its_station_still_holds_open_stays_open() {
    let station = OutcomeStation::default();
    let fixture = Fixture::with_stations(station.serve().await, closed_endpoint());
    let p = replacement();
    let mut server = fixture.start().await;
    assert!(server.verify(issue("app-slow", &p, pb::ApplicationKind::Replacement, "JX-0001")).await.decision.is_some());
    server.stop().await;
    let open = outcome("app-slow", pb::ApplicationOutcome::Open, pb::ApplicationState::InProduction, "");
    station.answer("app-slow", Ok(open));
    // So do an ended answer that closes nothing here, and a collection without its card.
    let refused = outcome("app-slow", pb::ApplicationOutcome::Ended, pb::ApplicationState::Refused, "");
    let cardless = outcome("app-slow", pb::ApplicationOutcome::Ended, pb::ApplicationState::Collected, "");

    let mut server = restarted_after(&fixture, 2).await;
    until("asked twice", || station.times_asked("app-slow") >= 2).await;
    assert_eq!(open_ids(&mut server, &p).await, ["app-slow"]);
    for answer in [refused, cardless] {
        let asked = station.times_asked("app-slow");
        station.answer("app-slow", Ok(answer));
        until("asked again", || station.times_asked("app-slow") >= asked + 2).await;
        assert_eq!(open_ids(&mut server, &p).await, ["app-slow"]);
    }
    // Still refused as a second open application.
    let second = server.verify(issue("app-second", &p, pb::ApplicationKind::Replacement, "JX-0001")).await;
    assert_eq!(refusal(&second), pb::RefusalReason::ApplicationAlreadyOpen);
    server.stop().await;
    assert_eq!(fixture.count(ASKED_BY_SWEEP).await, 0);
}

#[tokio::test]
async fn k5_a_station_that_cannot_answer_leaves_the_application_open() {
    let station = OutcomeStation::default();
    // `station-other` is down: nobody listens at its endpoint.
    let fixture = Fixture::with_stations(station.serve().await, closed_endpoint());
    let (down, troubled) = (replacement(), due_on_new_year());
    let mut server = fixture.start().await;
    let at_other = pb::VerifyRequest {
        station_id: "station-other".into(),
        ..issue("app-down", &down, pb::ApplicationKind::Replacement, "JX-0001")
    };
    assert!(server.verify(at_other).await.decision.is_some());
    let renewal = issue("app-troubled", &troubled, pb::ApplicationKind::Renewal, "JX-0010");
    assert!(server.verify(renewal).await.decision.is_some());
    server.stop().await;
    // The other station answers UNAVAILABLE, then does not know the application: doubt either way.
    station.answer("app-troubled", Err(Code::Unavailable));

    let mut server = restarted_after(&fixture, 2).await;
    // Each sweep asks in order of approval: app-down's station has been tried before each of these.
    until("asked twice", || station.times_asked("app-troubled") >= 2).await;
    station.answers.lock().unwrap().remove("app-troubled");
    let asked = station.times_asked("app-troubled");
    until("asked again", || station.times_asked("app-troubled") >= asked + 2).await;
    assert_eq!(open_ids(&mut server, &down).await, ["app-down"]);
    assert_eq!(open_ids(&mut server, &troubled).await, ["app-troubled"]);

    // Once the station answers, the next sweep closes what it says ended; the unreachable one stays.
    let cancelled = outcome("app-troubled", pb::ApplicationOutcome::Ended, pb::ApplicationState::Cancelled, "");
    station.answer("app-troubled", Ok(cancelled));
    let mut closed = false;
    for _ in 0..100 {
        if open_ids(&mut server, &troubled).await.is_empty() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(closed, "closed at a later sweep");
    assert_eq!(server.citizen(&troubled).await.current_card_serial, "JX-0010", "a cancel changes no card");
    assert_eq!(open_ids(&mut server, &down).await, ["app-down"]);
    server.stop().await;
    assert_eq!(fixture.count(&format!("{ASKED_BY_SWEEP} AND outcome = 'CANCELLED'")).await, 1);
}
