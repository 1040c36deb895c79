//! In-process gRPC tests: the real server on an SQLite temp file, the generated client, decisions
//! signed in the test by keys listed in a directory file written here.
use std::{path::PathBuf, time::Duration};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use ed25519_dalek::SigningKey;
use sea_orm::{ConnectionTrait, Statement};
use tokio_stream::StreamExt;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use yidi_domain::{
    CardData, Decision, DecisionPurpose, IdNumber, Role, Sex, SignedDecision,
    status::{SignedStatusStatement, StatementError},
};
use yidi_domain::{Credit, Particulars, Registration};
use yidi_grpc::server_config::ServerConfig;
use yidi_grpc::{
    balance::Balanced,
    convert::{signed_decision_to_proto, status_statement_from_proto},
    tls::TlsConfig,
};
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_registry::config::{ChecksConfig, ImportConfig, RegistryConfig, SigningConfig};
use yidi_runtime::{
    clock::ClockConfig,
    config::{DatabaseConfig, DirectoryConfig},
    directory::{DirectoryFile, KeyEntry, generate_signing_key, write_signing_key},
    population::{Citizen, ExistingCard, Population},
    telemetry::LogConfig,
};
use yidi_testkit::{Bureau, DirectoryBuilder, directory::write_key_dir, postgres_for_tests};

const REGISTRY: &str = "registry-national";
const PRODUCER: &str = "producer-zhejiang";
const OTHER_PRODUCER: &str = "producer-other";
const JIANGXI: &str = "home-jiangxi";
const STATION: &str = "station-hangzhou";
const OTHER_STATION: &str = "station-chengdu";
const SICHUAN: &str = "home-sichuan";
/// Every signing bureau's key id here (ids are unique per bureau only).
const KEY_ID: &str = "k1";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2118, 1, 1, 9, 0, 0).unwrap()
}

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// A Jiangxi citizen (registered in 36) with a legacy card.
struct Person {
    id: String,
    card: String,
}

fn person(sequence: u16, card: &str) -> Person {
    Person { id: IdNumber::compose("360102", day(1990, 3, 7), sequence).as_str().to_owned(), card: card.into() }
}

/// What the register holds of `p`, and what decisions about `p` print on a card.
fn card_data(p: &Person) -> CardData {
    CardData {
        holder: Particulars {
            id_number: p.id.clone(),
            name: "Test Person".into(),
            sex: Sex::Male,
            birth_date: day(1990, 3, 7),
            registration_province: "36".into(),
            address: "Nanchang".into(),
        },
        face_template: vec![1, 2, 3],
        valid_from: day(2118, 1, 1),
        valid_until: Some(day(2138, 1, 1)),
    }
}

fn citizen(p: &Person, valid_until: Option<NaiveDate>, reported_lost: bool) -> Citizen {
    let card = card_data(p);
    Citizen {
        person: card.holder,
        home_bureau_id: JIANGXI.into(),
        scenario: "replacement".into(),
        credit: Credit::Good,
        registration: Registration::Active,
        card: Some(ExistingCard { serial: p.card.clone(), valid_from: day(2100, 1, 1), valid_until, reported_lost }),
        face_template: vec![1, 2, 3],
        fingerprint_template: vec![4, 5, 6],
        live_face_template: vec![1, 2, 3],
        live_fingerprint_template: vec![4, 5, 6],
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    db_url: String,
    jiangxi: SigningKey,
    sichuan: SigningKey,
    directory_path: PathBuf,
    client: LossRegistryClient<Channel>,
    bureau: Option<Bureau>,
    config: RegistryConfig,
}

async fn start(config: RegistryConfig) -> (LossRegistryClient<Channel>, Bureau) {
    let bureau = Bureau::start(|listener, shutdown| yidi_registry::serve(config, listener, shutdown)).await.unwrap();
    (LossRegistryClient::new(bureau.channel()), bureau)
}

fn key_valid_from() -> DateTime<Utc> {
    now() - chrono::Duration::days(30)
}

impl Harness {
    async fn new(citizens: Vec<Citizen>) -> Self {
        Self::with_database(citizens, None).await
    }

    /// `database_url`: None for an SQLite file in the temp folder.
    async fn with_database(citizens: Vec<Citizen>, database_url: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jiangxi = generate_signing_key();
        let sichuan = generate_signing_key();
        let registry_key = generate_signing_key();
        let key_dir = write_key_dir(dir.path(), KEY_ID, &registry_key).unwrap();
        let directory_path = DirectoryBuilder::new()
            .bureau(STATION, Role::Intake)
            .bureau(OTHER_STATION, Role::Intake)
            .bureau(JIANGXI, Role::Verification)
            .jurisdiction(&["36"])
            .key(KEY_ID, &jiangxi, key_valid_from())
            .bureau(SICHUAN, Role::Verification)
            .jurisdiction(&["51"])
            .key(KEY_ID, &sichuan, key_valid_from())
            .bureau(PRODUCER, Role::Issuance)
            .bureau(OTHER_PRODUCER, Role::Issuance)
            .bureau(REGISTRY, Role::Registry)
            .key(KEY_ID, &registry_key, key_valid_from())
            .write_into(dir.path())
            .unwrap();
        let population_path = dir.path().join("population.json");
        Population { citizens }.write(&population_path).unwrap();
        let db_url =
            database_url.unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("registry.db").display()));
        let config = RegistryConfig {
            server: ServerConfig {
                shutdown_grace_seconds: 1,
                ..ServerConfig::new(REGISTRY, "127.0.0.1:0".parse().unwrap())
            },
            database: DatabaseConfig { url: db_url.clone(), max_connections: 4 },
            // Short, so that the rotation test sees a new directory soon.
            directory: DirectoryConfig { path: directory_path.clone(), reload_seconds: 1 },
            clock: ClockConfig::fixed_at(now()),
            log: LogConfig::default(),
            signing: SigningConfig { key_dir: Some(key_dir), keys: vec![] },
            // Tests check many unknown cards; the limit has its own test.
            registry: ChecksConfig { check_misses_per_minute: 1_000_000, ..ChecksConfig::default() },
            tls: TlsConfig { plaintext: true, ..TlsConfig::default() },
            idempotency: Default::default(),
            import: ImportConfig { path: Some(population_path) },
        };
        let (client, bureau) = start(config.clone()).await;
        let mut harness =
            Self { _dir: dir, db_url, jiangxi, sichuan, directory_path, client, bureau: Some(bureau), config };
        harness.ready().await;
        harness
    }

    /// Waits until the server answers (migrated and imported); the check writes nothing.
    async fn ready(&mut self) {
        let probe = IdNumber::compose("360102", day(1990, 3, 7), 1);
        self.check(probe.as_str(), "PROBE").await;
    }

    /// Another replica: the same configuration and database, its own id.
    async fn replica(&self, replica_id: &str) -> (Client, Bureau) {
        self.replica_with(replica_id, |_| {}).await
    }

    /// As [`Self::replica`], with `configure` applied to its configuration.
    async fn replica_with(&self, replica_id: &str, configure: impl FnOnce(&mut RegistryConfig)) -> (Client, Bureau) {
        let mut config = self.config.clone();
        config.registry.replica_id = replica_id.into();
        configure(&mut config);
        let (mut client, bureau) = start(config).await;
        let probe = IdNumber::compose("360102", day(1990, 3, 7), 1);
        // Serving once it has joined the replicas and applied the log.
        for _ in 0..100 {
            match check_at(&mut client, probe.as_str(), "PROBE", "bank-of-test").await {
                Ok(_) => return (client, bureau),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("replica {replica_id} never served");
    }

    async fn shutdown(&mut self) {
        if let Some(bureau) = self.bureau.take() {
            bureau.stop().await.unwrap();
        }
    }

    async fn restart(&mut self) {
        self.shutdown().await;
        let (client, bureau) = start(self.config.clone()).await;
        self.client = client;
        self.bureau = Some(bureau);
        self.ready().await;
    }

    /// Restarts with the clock standing at `instant` (in the default zone, Asia/Shanghai).
    async fn restart_at(&mut self, instant: &str) {
        self.config.clock = ClockConfig::fixed_at(instant.parse().unwrap());
        self.restart().await;
    }

    async fn count(&self, table: &str) -> i64 {
        let db =
            yidi_runtime::db::connect(&DatabaseConfig { url: self.db_url.clone(), max_connections: 1 }).await.unwrap();
        let row = db
            .query_one_raw(Statement::from_string(db.get_database_backend(), format!("SELECT COUNT(*) FROM {table}")))
            .await
            .unwrap()
            .unwrap();
        let n: i64 = row.try_get_by_index(0).unwrap();
        db.close().await.unwrap();
        n
    }

    fn decision(&self, purpose: DecisionPurpose, p: &Person, decision_id: &str, addressee: &str) -> Decision {
        Decision {
            decision_id: decision_id.into(),
            purpose,
            bureau_id: JIANGXI.into(),
            key_id: KEY_ID.into(),
            addressee_id: addressee.into(),
            application_id: "00000000-0000-0000-0000-000000000001".into(),
            station_id: STATION.into(),
            application_kind: None,
            card: card_data(p),
            previous_card_serial: p.card.clone(),
            issued_at: now(),
            expires_at: now() + chrono::Duration::days(7),
            transfer_to_bureau_id: String::new(),
        }
    }

    fn loss(&self, p: &Person, decision_id: &str) -> SignedDecision {
        self.decision(DecisionPurpose::ReportLoss, p, decision_id, REGISTRY).sign(&self.jiangxi)
    }

    fn withdrawal(&self, p: &Person, decision_id: &str) -> SignedDecision {
        self.decision(DecisionPurpose::WithdrawLossReport, p, decision_id, REGISTRY).sign(&self.jiangxi)
    }

    fn issue(&self, p: &Person, decision_id: &str) -> SignedDecision {
        self.decision(DecisionPurpose::IssueCard, p, decision_id, PRODUCER).sign(&self.jiangxi)
    }

    async fn report_loss(&mut self, signed: &SignedDecision) -> Result<pb::LossRegistryReportLossResponse, Status> {
        report_loss_at(&mut self.client, signed).await
    }

    async fn withdraw(
        &mut self,
        signed: &SignedDecision,
    ) -> Result<pb::LossRegistryWithdrawLossReportResponse, Status> {
        withdraw_at(&mut self.client, signed).await
    }

    async fn register(
        &mut self,
        signed: &SignedDecision,
        producer: &str,
        serial: &str,
    ) -> Result<pb::RegisterCardResponse, Status> {
        register_at(&mut self.client, signed, producer, serial).await
    }

    /// C3: the lodging station reports that `p` collected `serial`.
    async fn collect(&mut self, p: &Person, serial: &str) -> Result<pb::RecordCollectionResponse, Status> {
        self.collect_at(STATION, p, serial).await
    }

    async fn collect_at(
        &mut self,
        station: &str,
        p: &Person,
        serial: &str,
    ) -> Result<pb::RecordCollectionResponse, Status> {
        collect_through(&mut self.client, station, &p.id, serial).await
    }

    async fn check(&mut self, id: &str, serial: &str) -> pb::CheckCardResponse {
        self.try_check(id, serial, "bank-of-test").await.unwrap()
    }

    async fn try_check(&mut self, id: &str, serial: &str, party: &str) -> Result<pb::CheckCardResponse, Status> {
        check_at(&mut self.client, id, serial, party).await
    }

    async fn hits(&mut self, bureau: &str) -> Result<Vec<pb::Hit>, Status> {
        let request = pb::ListHitsRequest { home_bureau_id: bureau.into(), page_size: 0, page_token: String::new() };
        self.client.list_hits(request).await.map(|r| r.into_inner().hits)
    }
}

type Client = LossRegistryClient<Channel>;

async fn report_loss_at(
    client: &mut Client,
    signed: &SignedDecision,
) -> Result<pb::LossRegistryReportLossResponse, Status> {
    let request = pb::LossRegistryReportLossRequest {
        decision: Some(signed_decision_to_proto(signed)),
        request_id: String::new(),
    };
    client.report_loss(request).await.map(|r| r.into_inner())
}

async fn withdraw_at(
    client: &mut Client,
    signed: &SignedDecision,
) -> Result<pb::LossRegistryWithdrawLossReportResponse, Status> {
    let request = pb::LossRegistryWithdrawLossReportRequest {
        decision: Some(signed_decision_to_proto(signed)),
        request_id: String::new(),
    };
    client.withdraw_loss_report(request).await.map(|r| r.into_inner())
}

async fn register_at(
    client: &mut Client,
    signed: &SignedDecision,
    producer: &str,
    serial: &str,
) -> Result<pb::RegisterCardResponse, Status> {
    let request = pb::RegisterCardRequest {
        decision: Some(signed_decision_to_proto(signed)),
        producer_id: producer.into(),
        card_serial: serial.into(),
        request_id: String::new(),
    };
    client.register_card(request).await.map(|r| r.into_inner())
}

async fn collect_through(
    client: &mut Client,
    station: &str,
    id: &str,
    serial: &str,
) -> Result<pb::RecordCollectionResponse, Status> {
    let request = pb::RecordCollectionRequest {
        station_id: station.into(),
        id_number: id.into(),
        card_serial: serial.into(),
        request_id: String::new(),
    };
    client.record_collection(request).await.map(|r| r.into_inner())
}

async fn check_at(client: &mut Client, id: &str, serial: &str, party: &str) -> Result<pb::CheckCardResponse, Status> {
    let request = pb::CheckCardRequest {
        id_number: id.into(),
        card_serial: serial.into(),
        relying_party: party.into(),
        nonce: Vec::new(),
    };
    client.check_card(request).await.map(|r| r.into_inner())
}

fn status_of(code: i32) -> pb::CardStatus {
    pb::CardStatus::try_from(code).unwrap()
}

fn violations(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

fn reason(status: &Status) -> String {
    status.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

#[tokio::test]
async fn s1_loss_report_is_seen_by_the_next_check() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);

    let loss = h.loss(&p, "loss-1");
    let answer = h.report_loss(&loss).await.unwrap();
    assert_eq!(answer.card_serial, p.card);
    assert_eq!(status_of(answer.status), pb::CardStatus::ReportedLost);
    assert!(!answer.already_reported);

    let check = h.check(&p.id, &p.card).await;
    assert_eq!(status_of(check.status), pb::CardStatus::ReportedLost);
    assert_eq!(check.status_changed_at, answer.changed_at);

    // The same decision again: idempotent, nothing written.
    let events = h.count("status_events").await;
    let again = h.report_loss(&loss).await.unwrap();
    assert!(again.already_reported);
    assert_eq!(status_of(again.status), pb::CardStatus::ReportedLost);
    assert_eq!(h.count("status_events").await, events);
    assert_eq!(h.count("loss_reports").await, 1);

    // A second, different report of a card already lost: recorded, no status change.
    let second = h.report_loss(&h.loss(&p, "loss-2")).await.unwrap();
    assert!(second.already_reported);
    assert_eq!(h.count("loss_reports").await, 2);
    assert_eq!(h.count("status_events").await, events);

    // It survives a restart (committed, not cached).
    h.restart().await;
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost);
    h.shutdown().await;
}

/// S1 through the card index: every committed change (loss report, withdrawal, revocation by a
/// newer card) is what the very next check answers, and what the index loads after a restart.
#[tokio::test]
async fn s1_check_right_after_loss_report_sees_reported_lost() {
    let p = person(123, "JX0001000000");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);

    let reported = h.report_loss(&h.loss(&p, "loss-1")).await.unwrap();
    let check = h.check(&p.id, &p.card).await;
    assert_eq!(status_of(check.status), pb::CardStatus::ReportedLost);
    assert_eq!(check.status_changed_at, reported.changed_at);

    let withdrawn = h.withdraw(&h.withdrawal(&p, "withdraw-1")).await.unwrap();
    let check = h.check(&p.id, &p.card).await;
    assert_eq!(status_of(check.status), pb::CardStatus::Valid);
    assert_eq!(check.status_changed_at, withdrawn.changed_at);

    let reported = h.report_loss(&h.loss(&p, "loss-2")).await.unwrap();
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost);
    assert!(!reported.already_reported);

    let registered = h.register(&h.issue(&p, "issue-1"), PRODUCER, "JX0001000099").await.unwrap();
    assert_eq!(status_of(registered.status), pb::CardStatus::AwaitingCollection);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost, "until the hand-over");
    assert_eq!(status_of(h.check(&p.id, "JX0001000099").await.status), pb::CardStatus::AwaitingCollection);
    let collected = h.collect(&p, "JX0001000099").await.unwrap();
    assert_eq!(collected.revoked_card_serials, vec![p.card.clone()]);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Revoked);
    assert_eq!(status_of(h.check(&p.id, "JX0001000099").await.status), pb::CardStatus::Valid);

    // The index is the database's: the same answers after a restart reloads it.
    h.restart().await;
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Revoked);
    assert_eq!(status_of(h.check(&p.id, "JX0001000099").await.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

/// C4 and the fast path: checks of valid cards are answered without the database (here: with the
/// cards table gone), while a check of a lost card still writes its hit.
#[tokio::test]
async fn c4_valid_card_checks_never_read_the_database() {
    let p = person(123, "JX0001000000");
    let q = person(124, "JX0001000001");
    let mut h = Harness::new(vec![citizen(&p, None, false), citizen(&q, None, true)]).await;
    let db = yidi_runtime::db::connect(&DatabaseConfig { url: h.db_url.clone(), max_connections: 1 }).await.unwrap();
    db.execute_unprepared("ALTER TABLE cards RENAME TO cards_elsewhere").await.unwrap();

    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);
    assert_eq!(status_of(h.check(&q.id, &p.card).await.status), pb::CardStatus::Unknown);
    let batch = pb::CheckCardsRequest {
        cards: vec![
            pb::CardQuery { id_number: p.id.clone(), card_serial: p.card.clone() },
            pb::CardQuery { id_number: p.id.clone(), card_serial: "JX0009999999".into() },
        ],
        relying_party: "bank-of-test".into(),
    };
    let results = h.client.check_cards(batch).await.unwrap().into_inner().results;
    let statuses: Vec<_> = results.iter().map(|r| status_of(r.status)).collect();
    assert_eq!(statuses, [pb::CardStatus::Valid, pb::CardStatus::Unknown]);

    assert_eq!(status_of(h.check(&q.id, &q.card).await.status), pb::CardStatus::ReportedLost);
    let hits = h.hits(JIANGXI).await.unwrap();
    assert_eq!(hits.iter().map(|hit| hit.card_serial.as_str()).collect::<Vec<_>>(), [q.card.as_str()]);

    db.execute_unprepared("ALTER TABLE cards_elsewhere RENAME TO cards").await.unwrap();
    db.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn s1_new_card_revokes_older_cards() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    let first = h.register(&h.issue(&p, "issue-1"), PRODUCER, "ZJ-1001").await.unwrap();
    assert_eq!(first.card_serial, "ZJ-1001");
    assert_eq!(status_of(first.status), pb::CardStatus::AwaitingCollection);
    let collected = h.collect(&p, "ZJ-1001").await.unwrap();
    assert_eq!(status_of(collected.status), pb::CardStatus::Valid);
    assert_eq!(collected.revoked_card_serials, vec![p.card.clone()]);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Revoked);
    assert_eq!(status_of(h.check(&p.id, "ZJ-1001").await.status), pb::CardStatus::Valid);

    // The newer card was lost too; the next card revokes it once collected.
    let newer = Person { id: p.id.clone(), card: "ZJ-1001".into() };
    h.report_loss(&h.loss(&newer, "loss-1")).await.unwrap();
    let second = h.register(&h.issue(&p, "issue-2"), PRODUCER, "ZJ-1002").await.unwrap();

    // The producer retries the same registration: the same answer, nothing written.
    let events = h.count("status_events").await;
    let again = h.register(&h.issue(&p, "issue-2"), PRODUCER, "ZJ-1002").await.unwrap();
    assert_eq!(again, second);
    assert_eq!(h.count("status_events").await, events);

    assert_eq!(h.collect(&p, "ZJ-1002").await.unwrap().revoked_card_serials, vec!["ZJ-1001".to_owned()]);
    assert_eq!(status_of(h.check(&p.id, "ZJ-1001").await.status), pb::CardStatus::Revoked);
    assert_eq!(status_of(h.check(&p.id, "ZJ-1002").await.status), pb::CardStatus::Valid);

    // The feed holds every change in commit order: each collection, then what it revoked.
    let mut stream =
        h.client.watch_revocations(pb::WatchRevocationsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
        seen.push((event.card_serial, status_of(event.status)));
    }
    assert_eq!(
        seen,
        vec![
            ("ZJ-1001".to_owned(), pb::CardStatus::Valid),
            (p.card.clone(), pb::CardStatus::Revoked),
            ("ZJ-1001".to_owned(), pb::CardStatus::ReportedLost),
            ("ZJ-1002".to_owned(), pb::CardStatus::Valid),
            ("ZJ-1001".to_owned(), pb::CardStatus::Revoked),
        ]
    );
    drop(stream);
    h.shutdown().await;
}

/// C3: a made card is not valid until the station that lodged the application reports its
/// hand-over; a renewal's old card, never lost, stays valid meanwhile.
#[tokio::test]
async fn c3_a_made_card_is_valid_only_once_its_collection_is_recorded() {
    let p = person(123, "JX-0001");
    let stranger = person(124, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, false), citizen(&stranger, None, false)]).await;
    h.register(&h.issue(&p, "issue-1"), PRODUCER, "ZJ-1").await.unwrap();
    assert_eq!(status_of(h.check(&p.id, "ZJ-1").await.status), pb::CardStatus::AwaitingCollection);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid, "renewal: the old card");
    // Only the lodging station reports it, and only under the holder's number.
    let before = counts(&h).await;
    let error = h.collect_at(OTHER_STATION, &p, "ZJ-1").await.unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    assert_eq!(reason(&error), "NOT_THE_COLLECTING_STATION");
    assert_refusal_wrote_only_audit(&h, before).await;
    let error = h.collect(&stranger, "ZJ-1").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let error = h.collect(&p, "").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    // A loss report of a card its holder never had is refused.
    let made = Person { id: p.id.clone(), card: "ZJ-1".into() };
    assert_eq!(reason(&h.report_loss(&h.loss(&made, "loss-1")).await.unwrap_err()), "CARD_NOT_HANDED_OVER");

    let collected = h.collect(&p, "ZJ-1").await.unwrap();
    assert_eq!(status_of(collected.status), pb::CardStatus::Valid);
    assert_eq!(collected.revoked_card_serials, vec![p.card.clone()]);
    assert!(!collected.already_recorded);
    assert_eq!(status_of(h.check(&p.id, "ZJ-1").await.status), pb::CardStatus::Valid);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Revoked);
    // The station's outbox repeats it: the same answer, nothing written.
    let events = h.count("status_events").await;
    let again = h.collect(&p, "ZJ-1").await.unwrap();
    assert!(again.already_recorded);
    assert_eq!(
        (again.revoked_card_serials, again.collected_at),
        (collected.revoked_card_serials, collected.collected_at)
    );
    assert_eq!(h.count("status_events").await, events);
    // The index is the database's.
    h.restart().await;
    assert_eq!(status_of(h.check(&p.id, "ZJ-1").await.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

/// C3: a card not collected within the deadline is voided (at start-up and by the periodic sweep);
/// the holder's older card keeps the status it had, and the void card can never be handed over.
#[tokio::test]
async fn c3_a_card_never_collected_is_voided_and_the_old_card_keeps_its_status() {
    let p = person(123, "JX-0001");
    let q = person(124, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, false), citizen(&q, None, false)]).await;
    h.report_loss(&h.loss(&p, "loss-p")).await.unwrap();
    h.register(&h.issue(&p, "issue-p"), PRODUCER, "ZJ-P").await.unwrap();
    h.register(&h.issue(&q, "issue-q"), PRODUCER, "ZJ-Q").await.unwrap();
    // K6, C3: with a replacement made, the loss report stands.
    let error = h.withdraw(&h.withdrawal(&p, "found-early")).await.unwrap_err();
    assert_eq!(reason(&error), "REFUSAL_REASON_LOSS_REPORT_FINAL");

    // A day past the deadline.
    let deadline = i64::from(h.config.registry.collection_deadline_days);
    h.config.clock.fixed = Some(now() + chrono::Duration::days(deadline + 1));
    h.restart().await;
    for serial in ["ZJ-P", "ZJ-Q"] {
        let id = if serial == "ZJ-P" { &p.id } else { &q.id };
        assert_eq!(status_of(h.check(id, serial).await.status), pb::CardStatus::Voided, "{serial}");
    }
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost, "as before");
    assert_eq!(status_of(h.check(&q.id, &q.card).await.status), pb::CardStatus::Valid, "as before");
    let error = h.collect(&p, "ZJ-P").await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "CARD_VOIDED");
    // No replacement is pending any more: the old card was found, and its loss report withdrawn.
    let mut withdrawal = h.decision(DecisionPurpose::WithdrawLossReport, &p, "found-late", REGISTRY);
    withdrawal.issued_at = h.config.clock.fixed.unwrap();
    withdrawal.expires_at = withdrawal.issued_at + chrono::Duration::days(7);
    let found = h.withdraw(&withdrawal.sign(&h.jiangxi)).await.unwrap();
    assert_eq!(status_of(found.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

#[tokio::test]
async fn s1_watch_revocations_sends_history_then_live_changes_and_ends_on_shutdown() {
    let p = person(123, "JX-0001");
    let q = person(135, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, false), citizen(&q, None, false)]).await;
    h.report_loss(&h.loss(&p, "loss-p")).await.unwrap();
    let mut stream =
        h.client.watch_revocations(pb::WatchRevocationsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    // Sequences are the log's: the imports took the first ones (no status events).
    assert_eq!(first.card_serial, "JX-0001");
    // A live change arrives on the open stream.
    h.report_loss(&h.loss(&q, "loss-q")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((second.sequence, second.card_serial.as_str()), (first.sequence + 1, "JX-0002"));
    assert_eq!(status_of(second.status), pb::CardStatus::ReportedLost);
    // after_sequence skips what the watcher has.
    let mut later = h
        .client
        .watch_revocations(pb::WatchRevocationsRequest { after_sequence: first.sequence })
        .await
        .unwrap()
        .into_inner();
    let only = tokio::time::timeout(Duration::from_secs(5), later.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(only.sequence, second.sequence);
    // Shutdown ends the streams.
    h.bureau.as_mut().unwrap().trigger_shutdown();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap();
    assert!(end.is_none() || end.is_some_and(|r| r.is_err()), "stream must end on shutdown");
    h.shutdown().await;
}

/// Asserts that a refused request left cards, loss reports and events untouched and wrote one audit row.
async fn assert_refusal_wrote_only_audit(h: &Harness, before: (i64, i64, i64, i64)) {
    assert_eq!(h.count("cards").await, before.0);
    assert_eq!(h.count("loss_reports").await, before.1);
    assert_eq!(h.count("status_events").await, before.2);
    assert_eq!(h.count("audit_log").await, before.3 + 1, "a refusal is audited");
}

async fn counts(h: &Harness) -> (i64, i64, i64, i64) {
    (h.count("cards").await, h.count("loss_reports").await, h.count("status_events").await, h.count("audit_log").await)
}

#[tokio::test]
async fn s4_registry_refuses_unsigned_decision() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    let mut unsigned = h.loss(&p, "loss-1");
    unsigned.signature.clear();
    let before = counts(&h).await;
    let error = h.report_loss(&unsigned).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert_eq!(reason(&error), "DECISION_UNSIGNED");
    assert_refusal_wrote_only_audit(&h, before).await;
    let mut unsigned_issue = h.issue(&p, "issue-1");
    unsigned_issue.signature.clear();
    let error = h.register(&unsigned_issue, PRODUCER, "ZJ-1").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

#[tokio::test]
async fn s4_registry_refuses_tampered_decision() {
    let p = person(123, "JX-0001");
    let victim = person(135, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, false), citizen(&victim, None, false)]).await;
    // Signed for p's card, redirected to someone else's card.
    let mut tampered = h.loss(&p, "loss-1");
    tampered.decision.previous_card_serial = victim.card.clone();
    tampered.decision.card.holder.id_number = victim.id.clone();
    let before = counts(&h).await;
    let error = h.report_loss(&tampered).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(reason(&error), "DECISION_BAD_SIGNATURE");
    assert_refusal_wrote_only_audit(&h, before).await;
    // A longer validity written into an issuance decision.
    let mut longer = h.issue(&p, "issue-1");
    longer.decision.card.valid_until = None;
    let error = h.register(&longer, PRODUCER, "ZJ-1").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(status_of(h.check(&victim.id, &victim.card).await.status), pb::CardStatus::Valid);
    assert_eq!(status_of(h.check(&p.id, "ZJ-1").await.status), pb::CardStatus::Unknown);
    h.shutdown().await;
}

#[tokio::test]
async fn s4_registry_refuses_wrong_jurisdiction() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    // Sichuan signs, correctly with its own key, for a citizen registered in Jiangxi.
    let mut decision = h.decision(DecisionPurpose::ReportLoss, &p, "loss-1", REGISTRY);
    decision.bureau_id = SICHUAN.into();
    let forged = decision.sign(&h.sichuan);
    let before = counts(&h).await;
    let error = h.report_loss(&forged).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    assert_refusal_wrote_only_audit(&h, before).await;
    let mut issue = h.decision(DecisionPurpose::IssueCard, &p, "issue-1", PRODUCER);
    issue.bureau_id = SICHUAN.into();
    let error = h.register(&issue.sign(&h.sichuan), PRODUCER, "ZJ-1").await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    h.shutdown().await;
}

#[tokio::test]
async fn s4_registry_refuses_misaddressed_decision() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    // A loss report addressed to the producer.
    let to_producer = h.decision(DecisionPurpose::ReportLoss, &p, "loss-1", PRODUCER).sign(&h.jiangxi);
    let before = counts(&h).await;
    let error = h.report_loss(&to_producer).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "DECISION_MISADDRESSED");
    assert_refusal_wrote_only_audit(&h, before).await;
    // An issuance decision for one producer presented by another.
    let issue = h.issue(&p, "issue-1");
    let error = h.register(&issue, OTHER_PRODUCER, "ZJ-1").await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_MISADDRESSED");
    // A "producer" that is no issuance bureau.
    let to_registry = h.decision(DecisionPurpose::IssueCard, &p, "issue-2", REGISTRY).sign(&h.jiangxi);
    let error = h.register(&to_registry, REGISTRY, "ZJ-2").await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    // Wrong purpose: an issuance decision used as a loss report.
    let error =
        h.report_loss(&h.decision(DecisionPurpose::IssueCard, &p, "x", REGISTRY).sign(&h.jiangxi)).await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_PURPOSE");
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

#[tokio::test]
async fn s4_registry_refuses_expired_decision() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    let mut decision = h.decision(DecisionPurpose::ReportLoss, &p, "loss-1", REGISTRY);
    decision.issued_at = now() - chrono::Duration::days(8);
    decision.expires_at = now() - chrono::Duration::days(1);
    let expired = decision.sign(&h.jiangxi);
    let before = counts(&h).await;
    let error = h.report_loss(&expired).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "DECISION_EXPIRED");
    assert_refusal_wrote_only_audit(&h, before).await;
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

#[tokio::test]
async fn s4_registry_refuses_replayed_decision() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    // An issuance decision registers one card only.
    let issue = h.issue(&p, "issue-1");
    h.register(&issue, PRODUCER, "ZJ-1").await.unwrap();
    let before = counts(&h).await;
    let error = h.register(&issue, PRODUCER, "ZJ-2").await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert_eq!(reason(&error), "DECISION_ALREADY_USED");
    assert_refusal_wrote_only_audit(&h, before).await;
    h.collect(&p, "ZJ-1").await.unwrap();
    // A withdrawal decision is used once.
    let current = Person { id: p.id.clone(), card: "ZJ-1".into() };
    h.report_loss(&h.loss(&current, "loss-1")).await.unwrap();
    let withdrawal = h.withdrawal(&current, "found-1");
    h.withdraw(&withdrawal).await.unwrap();
    h.report_loss(&h.loss(&current, "loss-2")).await.unwrap();
    let error = h.withdraw(&withdrawal).await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert_eq!(status_of(h.check(&p.id, "ZJ-1").await.status), pb::CardStatus::ReportedLost);
    // A serial registers once.
    let error = h.register(&h.issue(&p, "issue-3"), PRODUCER, "ZJ-1").await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "CARD_SERIAL_EXISTS");
    h.shutdown().await;
}

#[tokio::test]
async fn c2_unknown_serial_is_unknown() {
    let p = person(123, "JX-0001");
    let q = person(135, "JX-0002");
    let expired = person(147, "JX-OLD");
    let mut h = Harness::new(vec![
        citizen(&p, None, false),
        citizen(&q, Some(day(2130, 1, 1)), false),
        citizen(&expired, Some(day(2117, 6, 30)), false),
    ])
    .await;
    let unknown = h.check(&p.id, "NO-SUCH-SERIAL").await;
    assert_eq!(status_of(unknown.status), pb::CardStatus::Unknown);
    assert!(unknown.status_changed_at.is_none());
    assert!(unknown.checked_at.is_some());
    // Another holder's serial answers exactly like a serial that does not exist (C4).
    let foreign = h.check(&p.id, &q.card).await;
    assert_eq!(status_of(foreign.status), pb::CardStatus::Unknown);
    assert!(foreign.status_changed_at.is_none());
    // Expired is derived from the date.
    let old = h.check(&expired.id, &expired.card).await;
    assert_eq!(status_of(old.status), pb::CardStatus::Expired);
    assert_eq!(
        old.status_changed_at.map(|t| t.seconds),
        // From the start of 1 July in Beijing.
        Some(Utc.with_ymd_and_hms(2117, 6, 30, 16, 0, 0).unwrap().timestamp())
    );
    assert_eq!(status_of(h.check(&q.id, &q.card).await.status), pb::CardStatus::Valid);
    // A loss report for a serial that is not the holder's: NOT_FOUND.
    let wrong = Person { id: p.id.clone(), card: q.card.clone() };
    let error = h.report_loss(&h.loss(&wrong, "loss-1")).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(status_of(h.check(&q.id, &q.card).await.status), pb::CardStatus::Valid);
    h.shutdown().await;
}

/// 23:30 on 31 December 2117 in Beijing (UTC+8), then 07:30 and 08:30 on 1 January 2118 there,
/// while it is still 31 December in UTC at the first two.
const AROUND_BEIJING_NEW_YEAR: [&str; 3] = ["2117-12-31T15:30:00Z", "2117-12-31T23:30:00Z", "2118-01-01T00:30:00Z"];

#[tokio::test]
async fn c2_a_card_that_expired_yesterday_in_beijing_is_expired_before_utc_midnight() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, Some(day(2117, 12, 31)), false)]).await;
    let expired_since = Utc.with_ymd_and_hms(2117, 12, 31, 16, 0, 0).unwrap().timestamp();
    for (instant, expected) in AROUND_BEIJING_NEW_YEAR.into_iter().zip([
        pb::CardStatus::Valid,
        pb::CardStatus::Expired,
        pb::CardStatus::Expired,
    ]) {
        h.restart_at(instant).await;
        let answer = h.check(&p.id, &p.card).await;
        assert_eq!(status_of(answer.status), expected, "at {instant}");
        if expected == pb::CardStatus::Expired {
            assert_eq!(answer.status_changed_at.map(|t| t.seconds), Some(expired_since), "midnight in Beijing");
        }
    }
    h.shutdown().await;
}

#[tokio::test]
async fn n1_a_number_born_today_in_beijing_is_checked_not_refused() {
    let mut h = Harness::new(Vec::new()).await;
    let newborn = IdNumber::compose("360102", day(2118, 1, 1), 5);
    let [before, at_0730, at_0830] = AROUND_BEIJING_NEW_YEAR;
    h.restart_at(before).await;
    let error = h.try_check(newborn.as_str(), "JX-NEW", "bank-of-test").await.unwrap_err();
    assert_eq!(violations(&error), vec!["id_number".to_owned()], "born tomorrow in Beijing");
    for instant in [at_0730, at_0830] {
        h.restart_at(instant).await;
        assert_eq!(status_of(h.check(newborn.as_str(), "JX-NEW").await.status), pb::CardStatus::Unknown, "{instant}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn c4_check_needs_number_and_serial() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    let error = h.try_check("", &p.card, "bank").await.unwrap_err();
    assert_eq!(violations(&error), vec!["id_number"]);
    let error = h.try_check(&p.id, "", "bank").await.unwrap_err();
    assert_eq!(violations(&error), vec!["card_serial"]);
    let error = h.try_check("", "", "").await.unwrap_err();
    assert_eq!(violations(&error), vec!["id_number", "card_serial", "relying_party"]);
    // N2: a wrong check character is refused at the edge.
    let mut bad = p.id.clone();
    let last = if bad.ends_with('1') { "2" } else { "1" };
    bad.replace_range(17..18, last);
    let error = h.try_check(&bad, &p.card, "bank").await.unwrap_err();
    assert_eq!(violations(&error), vec!["id_number"]);
    let error = h.try_check(&p.id, &p.card, &"x".repeat(129)).await.unwrap_err();
    assert_eq!(violations(&error), vec!["relying_party"]);
    // Lower-case x is normalised (N2).
    let x = IdNumber::compose("360102", day(1990, 3, 7), 0);
    let mut found = None;
    for seq in 0..1000u16 {
        let id = IdNumber::compose("360102", day(1990, 3, 7), seq);
        if id.as_str().ends_with('X') {
            found = Some(id);
            break;
        }
    }
    let id = found.unwrap_or(x);
    let answer = h.try_check(&id.as_str().to_ascii_lowercase(), "NONE", "bank").await.unwrap();
    assert_eq!(status_of(answer.status), pb::CardStatus::Unknown);
    h.shutdown().await;
}

#[tokio::test]
async fn c4_lost_card_check_is_a_hit_for_the_home_bureau() {
    let p = person(123, "JX-0001");
    let q = person(135, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, true), citizen(&q, None, false)]).await;
    // A legacy card imported as reported lost.
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost);
    // A check of a valid card is no hit.
    h.check(&q.id, &q.card).await;
    h.try_check(&p.id, &p.card, "hotel-west-lake").await.unwrap();
    let hits = h.hits(JIANGXI).await.unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].card_serial, p.card);
    assert_eq!(hits[0].id_number, p.id);
    assert!(hits.iter().any(|hit| hit.relying_party == "hotel-west-lake"));
    assert!(hits.iter().all(|hit| hit.card_serial == p.card));
    // Another home bureau sees none of them.
    assert!(h.hits(SICHUAN).await.unwrap().is_empty());
    // Only home bureaus may ask.
    let error = h.hits(PRODUCER).await.unwrap_err();
    assert_eq!(violations(&error), vec!["home_bureau_id"]);
    // Paging.
    let page = h
        .client
        .list_hits(pb::ListHitsRequest { home_bureau_id: JIANGXI.into(), page_size: 1, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.hits.len(), 1);
    let rest = h
        .client
        .list_hits(pb::ListHitsRequest {
            home_bureau_id: JIANGXI.into(),
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.hits.len(), 1);
    // The last page still carries a cursor: polling with it returns nothing until a new hit, then it.
    let poll = |page_token: String| pb::ListHitsRequest { home_bureau_id: JIANGXI.into(), page_size: 0, page_token };
    let idle = h.client.list_hits(poll(rest.next_page_token.clone())).await.unwrap().into_inner();
    assert!(idle.hits.is_empty());
    assert_eq!(idle.next_page_token, rest.next_page_token);
    h.try_check(&p.id, &p.card, "bank-of-nanchang").await.unwrap();
    let new = h.client.list_hits(poll(idle.next_page_token)).await.unwrap().into_inner();
    assert_eq!(new.hits.iter().map(|hit| hit.relying_party.as_str()).collect::<Vec<_>>(), ["bank-of-nanchang"]);
    // The cursor is tied to its bureau.
    let foreign = pb::ListHitsRequest { home_bureau_id: SICHUAN.into(), page_size: 0, page_token: new.next_page_token };
    assert_eq!(violations(&h.client.list_hits(foreign).await.unwrap_err()), vec!["page_token"]);
    h.shutdown().await;
}

#[tokio::test]
async fn k6_withdrawal_restores_valid_but_not_after_revocation() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    // Not reported lost: nothing to withdraw.
    let error = h.withdraw(&h.withdrawal(&p, "found-0")).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "NOT_REPORTED_LOST");

    h.report_loss(&h.loss(&p, "loss-1")).await.unwrap();
    let found = h.withdraw(&h.withdrawal(&p, "found-1")).await.unwrap();
    assert_eq!(status_of(found.status), pb::CardStatus::Valid);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid);

    // Lost again, and this time a replacement is made: from then on the loss report stands, and
    // once the new card is handed over the old one is revoked for good.
    h.report_loss(&h.loss(&p, "loss-2")).await.unwrap();
    h.register(&h.issue(&p, "issue-1"), PRODUCER, "ZJ-1").await.unwrap();
    let error = h.withdraw(&h.withdrawal(&p, "found-2")).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(reason(&error), "REFUSAL_REASON_LOSS_REPORT_FINAL");
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost);
    h.collect(&p, "ZJ-1").await.unwrap();
    let error = h.withdraw(&h.withdrawal(&p, "found-3")).await.unwrap_err();
    assert_eq!(reason(&error), "REFUSAL_REASON_LOSS_REPORT_FINAL");
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Revoked);
    // A loss report of a revoked card is refused too.
    let error = h.report_loss(&h.loss(&p, "loss-3")).await.unwrap_err();
    assert_eq!(reason(&error), "CARD_REVOKED");
    h.shutdown().await;
}

#[tokio::test]
async fn c2_batch_check_answers_in_order_and_caps_at_1000() {
    let p = person(123, "JX-0001");
    let q = person(135, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, true), citizen(&q, None, false)]).await;
    let query = |id: &str, serial: &str| pb::CardQuery { id_number: id.into(), card_serial: serial.into() };
    let request = pb::CheckCardsRequest {
        cards: vec![query(&q.id, &q.card), query(&p.id, "NOPE"), query(&p.id, &p.card), query(&p.id, &q.card)],
        relying_party: "bank".into(),
    };
    let answer = h.client.check_cards(request).await.unwrap().into_inner();
    let got: Vec<(u32, pb::CardStatus)> = answer.results.iter().map(|r| (r.index, status_of(r.status))).collect();
    assert_eq!(
        got,
        vec![
            (0, pb::CardStatus::Valid),
            (1, pb::CardStatus::Unknown),
            (2, pb::CardStatus::ReportedLost),
            (3, pb::CardStatus::Unknown),
        ]
    );
    assert!(answer.results[1].status_changed_at.is_none());
    assert_eq!(h.hits(JIANGXI).await.unwrap().len(), 1, "the lost card's check is a hit");

    let full = pb::CheckCardsRequest { cards: vec![query(&q.id, &q.card); 1000], relying_party: "bank".into() };
    assert_eq!(h.client.check_cards(full).await.unwrap().into_inner().results.len(), 1000);
    let lost = pb::CheckCardsRequest { cards: vec![query(&p.id, &p.card); 1000], relying_party: "bank".into() };
    h.client.check_cards(lost).await.unwrap();
    assert_eq!(h.count("hits").await, 1001, "one hit per lost-card query");

    let over = pb::CheckCardsRequest { cards: vec![query(&q.id, &q.card); 1001], relying_party: "bank".into() };
    assert_eq!(violations(&h.client.check_cards(over).await.unwrap_err()), vec!["cards"]);
    let empty = pb::CheckCardsRequest { cards: vec![], relying_party: "bank".into() };
    assert_eq!(violations(&h.client.check_cards(empty).await.unwrap_err()), vec!["cards"]);
    let bad = pb::CheckCardsRequest {
        cards: vec![query(&q.id, &q.card), query("123", ""), query(&p.id, "")],
        relying_party: String::new(),
    };
    assert_eq!(
        violations(&h.client.check_cards(bad).await.unwrap_err()),
        vec!["cards[1].id_number", "cards[1].card_serial", "cards[2].card_serial", "relying_party",]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn s4_invalid_decision_structure_is_invalid_argument_and_writes_nothing() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    let before = counts(&h).await;
    let error = h
        .client
        .report_loss(pb::LossRegistryReportLossRequest { decision: None, request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(violations(&error), vec!["decision"]);
    let mut no_serial = h.loss(&p, "loss-1");
    no_serial.decision.previous_card_serial.clear();
    let error = h.report_loss(&no_serial).await.unwrap_err();
    assert_eq!(violations(&error), vec!["decision.decision.previous_card_serial"]);
    let error = h.register(&h.issue(&p, "issue-1"), "", "").await.unwrap_err();
    assert_eq!(violations(&error), vec!["producer_id", "card_serial"]);
    assert_eq!(counts(&h).await, before, "invalid input writes nothing, not even audit");
    h.shutdown().await;
}

#[tokio::test]
async fn c2_import_is_idempotent_and_never_overwrites() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    h.report_loss(&h.loss(&p, "loss-1")).await.unwrap();
    // The restart imports the same population again: the card stays reported lost.
    h.restart().await;
    assert_eq!(h.count("cards").await, 1);
    assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost);
    h.shutdown().await;
}

#[test]
fn config_rejects_a_bad_clock_and_a_missing_bureau() {
    let dir = PathBuf::from("d.toml");
    let mut config = RegistryConfig {
        server: ServerConfig {
            shutdown_grace_seconds: 1,
            ..ServerConfig::new(String::new(), "127.0.0.1:0".parse().unwrap())
        },
        database: DatabaseConfig { url: "sqlite::memory:".into(), max_connections: 1 },
        directory: DirectoryConfig::new(dir),
        clock: ClockConfig::default(),
        log: LogConfig::default(),
        signing: SigningConfig { key_dir: Some("keys".into()), keys: vec![] },
        registry: ChecksConfig::default(),
        tls: TlsConfig { plaintext: true, ..TlsConfig::default() },
        idempotency: Default::default(),
        import: ImportConfig::default(),
    };
    assert!(config.validate().unwrap_err().to_string().contains("server.bureau_id"));
    config.server.bureau_id = REGISTRY.into();
    config.clock = ClockConfig { start: Some(now()), ..ClockConfig::fixed_at(now()) };
    assert!(config.validate().unwrap_err().to_string().contains("clock"));
    config.clock = ClockConfig { time_zone: "China/Beijing".into(), ..ClockConfig::default() };
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("clock") && error.contains("time_zone") && error.contains("China/Beijing"), "{error}");
    config.clock = ClockConfig::default();
    config.registry.check_misses_per_minute = 0;
    assert!(config.validate().unwrap_err().to_string().contains("registry.check_misses_per_minute"));
    config.registry = ChecksConfig::default();
    config.signing = SigningConfig::default();
    assert!(config.validate().unwrap_err().to_string().contains("signing"));
}

/// The same rules on PostgreSQL, in a scratch database of the test server (see
/// `yidi_testkit`: skipped when unreachable, unless `YIDI_REQUIRE_POSTGRES=1`).
#[tokio::test]
async fn s1_rules_hold_on_postgres_when_configured() {
    let Some(scratch) = postgres_for_tests("registry").await.unwrap() else { return };
    {
        let p = person(123, "JX-0001");
        let q = person(135, "JX-0002");
        let mut h = Harness::with_database(
            vec![citizen(&p, None, false), citizen(&q, None, true)],
            Some(scratch.url().to_owned()),
        )
        .await;
        let answer = h.report_loss(&h.loss(&p, "loss-1")).await.unwrap();
        assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::ReportedLost);
        assert_eq!(h.check(&p.id, &p.card).await.status_changed_at, answer.changed_at);
        assert!(h.report_loss(&h.loss(&p, "loss-1")).await.unwrap().already_reported);
        let found = h.withdraw(&h.withdrawal(&p, "found-1")).await.unwrap();
        assert_eq!(status_of(found.status), pb::CardStatus::Valid);
        assert_eq!(h.withdraw(&h.withdrawal(&p, "found-1")).await.unwrap_err().code(), Code::AlreadyExists);
        let registered = h.register(&h.issue(&p, "issue-1"), PRODUCER, "ZJ-1").await.unwrap();
        assert_eq!(status_of(registered.status), pb::CardStatus::AwaitingCollection);
        assert_eq!(h.register(&h.issue(&p, "issue-1"), PRODUCER, "ZJ-1").await.unwrap(), registered);
        assert_eq!(h.collect(&p, "ZJ-1").await.unwrap().revoked_card_serials, vec![p.card.clone()]);
        assert_eq!(
            h.register(&h.issue(&p, "issue-1"), PRODUCER, "ZJ-2").await.unwrap_err().code(),
            Code::AlreadyExists
        );
        let query = |id: &str, serial: &str| pb::CardQuery { id_number: id.into(), card_serial: serial.into() };
        let batch = pb::CheckCardsRequest { cards: vec![query(&q.id, &q.card); 1000], relying_party: "bank".into() };
        assert_eq!(h.client.check_cards(batch).await.unwrap().into_inner().results.len(), 1000);
        assert_eq!(h.hits(JIANGXI).await.unwrap().len(), 50, "first page of the 1000 hits");
        let mut stream =
            h.client.watch_revocations(pb::WatchRevocationsRequest { after_sequence: 0 }).await.unwrap().into_inner();
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let event = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
            statuses.push(status_of(event.status));
        }
        use pb::CardStatus::{ReportedLost, Revoked, Valid};
        assert_eq!(statuses, vec![ReportedLost, Valid, Valid, Revoked], "lost, found, ZJ-1 collected, old revoked");
        drop(stream);
        h.restart().await;
        assert_eq!(status_of(h.check(&p.id, "ZJ-1").await.status), pb::CardStatus::Valid);
        h.shutdown().await;
    }
    scratch.drop().await.unwrap();
}

async fn signed_check(
    h: &mut Harness,
    id: &str,
    serial: &str,
    nonce: &[u8],
) -> (pb::CheckCardResponse, SignedStatusStatement) {
    let request = pb::CheckCardRequest {
        id_number: id.into(),
        card_serial: serial.into(),
        relying_party: "bank-of-test".into(),
        nonce: nonce.to_vec(),
    };
    let answer = h.client.check_card(request).await.unwrap().into_inner();
    let signed = status_statement_from_proto(answer.signed_status.as_ref().expect("a signed statement")).unwrap();
    (answer, signed)
}

#[tokio::test]
async fn c4_check_answers_are_signed_and_an_altered_answer_fails() {
    let p = person(123, "JX-0001");
    let q = person(135, "JX-0002");
    let mut h = Harness::new(vec![citizen(&p, None, false), citizen(&q, None, true)]).await;
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();

    let (answer, signed) = signed_check(&mut h, &q.id, &q.card, b"nonce-42").await;
    let statement = signed.verify_answer(&directory, &q.id, &q.card, b"nonce-42").unwrap();
    assert_eq!(statement.registry_id, REGISTRY);
    assert_eq!(statement.key_id, KEY_ID);
    assert_eq!(statement.status, yidi_domain::CardStatus::ReportedLost);
    assert_eq!(status_of(answer.status), pb::CardStatus::ReportedLost);
    assert_eq!(statement.status_changed_at.map(yidi_grpc::convert::timestamp), answer.status_changed_at);
    assert_eq!(Some(yidi_grpc::convert::timestamp(statement.answered_at)), answer.checked_at);
    // The statement names the holder by a hash only.
    let wire = answer.signed_status.as_ref().unwrap().statement.as_ref().unwrap();
    assert_eq!(wire.id_number_sha256, yidi_domain::status::id_number_hash(&q.id).to_vec());
    assert!(!format!("{wire:?}").contains(&q.id));

    // Altered after the fact: the signature no longer holds.
    let mut altered = signed.clone();
    altered.statement.status = yidi_domain::CardStatus::Valid;
    assert_eq!(altered.verify(&directory), Err(StatementError::BadSignature));
    // Another question's answer (nonce replayed for another serial) is not this one's.
    assert_eq!(signed.verify_answer(&directory, &q.id, &q.card, b"other"), Err(StatementError::OtherQuestion));

    // UNKNOWN is signed too, without a time of change.
    let (_, unknown) = signed_check(&mut h, &p.id, "NO-SUCH", b"").await;
    let statement = unknown.verify_answer(&directory, &p.id, "NO-SUCH", b"").unwrap();
    assert_eq!((statement.status, statement.status_changed_at), (yidi_domain::CardStatus::Unknown, None));

    let long = pb::CheckCardRequest {
        id_number: p.id.clone(),
        card_serial: p.card.clone(),
        relying_party: "bank-of-test".into(),
        nonce: vec![0; 65],
    };
    assert_eq!(violations(&h.client.check_card(long).await.unwrap_err()), vec!["nonce"]);
    h.shutdown().await;
}

#[tokio::test]
async fn c4_the_registry_signs_with_a_new_key_once_the_directory_lists_it() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    // Rotation without a restart: the new private key file, then the directory listing it.
    let k2 = generate_signing_key();
    let key_dir = h.config.signing.key_dir.clone().unwrap();
    write_signing_key(&key_dir.join("k2.key"), &k2).unwrap();
    let mut file = DirectoryFile::read(&h.directory_path).unwrap();
    let registry = file.bureaus.iter_mut().find(|b| b.id == REGISTRY).unwrap();
    registry.keys.push(KeyEntry::new("k2", &k2.verifying_key(), now() - chrono::Duration::hours(1)));
    file.write(&h.directory_path).unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, signed) = signed_check(&mut h, &p.id, &p.card, b"n").await;
        if signed.statement.key_id == "k2" {
            let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
            assert!(signed.verify_answer(&directory, &p.id, &p.card, b"n").is_ok());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new key was not taken up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A directory that does not load keeps the one in force: answers stay signed with k2.
    std::fs::write(&h.directory_path, "this is not a directory").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, signed) = signed_check(&mut h, &p.id, &p.card, b"n").await;
    assert_eq!(signed.statement.key_id, "k2");
    h.shutdown().await;
}

#[tokio::test]
async fn c4_repeated_misses_from_one_caller_are_limited_but_hits_are_not() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    h.shutdown().await;
    h.config.registry.check_misses_per_minute = 3;
    // The restart's readiness probe is a miss: two left.
    h.restart().await;
    for _ in 0..50 {
        assert_eq!(status_of(h.check(&p.id, &p.card).await.status), pb::CardStatus::Valid, "hits cost nothing");
    }
    for serial in ["GUESS-1", "GUESS-2"] {
        assert_eq!(status_of(h.check(&p.id, serial).await.status), pb::CardStatus::Unknown);
    }
    let refused = h.try_check(&p.id, "GUESS-3", "bank-of-test").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(reason(&refused), "CHECK_MISSES_EXHAUSTED");
    let retry = refused.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(20), "{retry:?}");
    // While exhausted, a hit is withheld too: answering it would tell hits from misses.
    let withheld = h.try_check(&p.id, &p.card, "bank-of-test").await.unwrap_err();
    assert_eq!(withheld.code(), Code::ResourceExhausted);
    // CheckCards counts each miss.
    let batch = pb::CheckCardsRequest {
        cards: vec![pb::CardQuery { id_number: p.id.clone(), card_serial: "GUESS-4".into() }],
        relying_party: "bank-of-test".into(),
    };
    assert_eq!(h.client.check_cards(batch).await.unwrap_err().code(), Code::ResourceExhausted);
    h.shutdown().await;
}

impl Harness {
    /// A decision about `p` signed by Sichuan, writing Sichuan's province (51) into it.
    fn by_sichuan(&self, purpose: DecisionPurpose, p: &Person, decision_id: &str, addressee: &str) -> SignedDecision {
        let mut decision = self.decision(purpose, p, decision_id, addressee);
        decision.bureau_id = SICHUAN.into();
        decision.card.holder.registration_province = "51".into();
        decision.sign(&self.sichuan)
    }

    /// Jiangxi hands `p` over to Sichuan.
    fn transfer(&self, p: &Person, decision_id: &str) -> SignedDecision {
        let mut decision = self.decision(DecisionPurpose::TransferRegistration, p, decision_id, REGISTRY);
        decision.transfer_to_bureau_id = SICHUAN.into();
        decision.sign(&self.jiangxi)
    }

    async fn transfer_registration(
        &mut self,
        signed: &SignedDecision,
    ) -> Result<pb::LossRegistryTransferRegistrationResponse, Status> {
        let request = pb::LossRegistryTransferRegistrationRequest {
            decision: Some(signed_decision_to_proto(signed)),
            request_id: String::new(),
        };
        self.client.transfer_registration(request).await.map(|r| r.into_inner())
    }
}

/// S4: a citizen's cards follow the home bureau that registered them until that bureau transfers the
/// registration: before, the new bureau's decisions are refused; after, the old bureau's are, and
/// the new bureau's loss report, hits and new card are accepted. A transfer is recorded once.
#[tokio::test]
async fn s4_a_registration_transfer_moves_the_cards_to_the_new_home_bureau() {
    let p = person(140, "JX-0140");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    // Before: Sichuan, even writing its own province, cannot decide about a Jiangxi card.
    let early = h.by_sichuan(DecisionPurpose::ReportLoss, &p, "sc-loss-0", REGISTRY);
    let error = h.report_loss(&early).await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    // Nor hand the citizen over to itself or anyone.
    let mut grab = h.decision(DecisionPurpose::TransferRegistration, &p, "sc-transfer", REGISTRY);
    grab.bureau_id = SICHUAN.into();
    grab.card.holder.registration_province = "51".into();
    grab.transfer_to_bureau_id = JIANGXI.into();
    let error = h.transfer_registration(&grab.sign(&h.sichuan)).await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    // A transfer must name another home bureau.
    let mut nowhere = h.decision(DecisionPurpose::TransferRegistration, &p, "jx-nowhere", REGISTRY);
    nowhere.transfer_to_bureau_id = PRODUCER.into();
    let error = h.transfer_registration(&nowhere.sign(&h.jiangxi)).await.unwrap_err();
    assert_eq!(reason(&error), "TRANSFER_TARGET_INVALID");
    let mut unnamed = h.decision(DecisionPurpose::TransferRegistration, &p, "jx-unnamed", REGISTRY);
    unnamed.transfer_to_bureau_id.clear();
    let error = h.transfer_registration(&unnamed.sign(&h.jiangxi)).await.unwrap_err();
    assert_eq!(violations(&error), vec!["decision.decision.transfer_to_bureau_id"]);
    assert_eq!(h.count("registration_transfers").await, 0);

    // Jiangxi hands the citizen over to Sichuan.
    let transfer = h.transfer(&p, "jx-transfer-1");
    let done = h.transfer_registration(&transfer).await.unwrap();
    assert_eq!(done.home_bureau_id, SICHUAN);
    assert_eq!(done.card_serials, vec![p.card.clone()]);
    assert!(!done.already_transferred);
    // The same decision again, and a new one for the same transfer (the sender never learnt the
    // answer): answered as before, nothing written.
    assert!(h.transfer_registration(&transfer).await.unwrap().already_transferred);
    let again = h.transfer_registration(&h.transfer(&p, "jx-transfer-2")).await.unwrap();
    assert!(again.already_transferred);
    assert_eq!(again.card_serials, vec![p.card.clone()]);
    assert_eq!(h.count("registration_transfers").await, 1);

    // After: the old bureau is refused, the new one accepted, and the index follows at once.
    let error = h.report_loss(&h.loss(&p, "jx-loss-1")).await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    let lost = h.report_loss(&h.by_sichuan(DecisionPurpose::ReportLoss, &p, "sc-loss-1", REGISTRY)).await.unwrap();
    assert_eq!(status_of(lost.status), pb::CardStatus::ReportedLost);
    h.check(&p.id, &p.card).await;
    assert_eq!(h.hits(SICHUAN).await.unwrap().len(), 1, "the hit is the new bureau's");
    assert!(h.hits(JIANGXI).await.unwrap().is_empty());

    // It survives a restart; a new card is registered on the new bureau's decision only.
    h.restart().await;
    let error = h.withdraw(&h.withdrawal(&p, "jx-withdraw")).await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    let error = h.register(&h.issue(&p, "jx-issue"), PRODUCER, "ZJ-0140").await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    let issue = h.by_sichuan(DecisionPurpose::IssueCard, &p, "sc-issue", PRODUCER);
    let made = h.register(&issue, PRODUCER, "ZJ-0140").await.unwrap();
    assert_eq!(status_of(made.status), pb::CardStatus::AwaitingCollection);
    assert_eq!(h.collect(&p, "ZJ-0140").await.unwrap().revoked_card_serials, vec![p.card.clone()]);
    h.shutdown().await;
}

/// S4: a first card (the citizen holds none in force) is registered on a decision of the bureau
/// whose jurisdiction holds the province written in it; once a transfer is recorded, only on the
/// new bureau's.
#[tokio::test]
async fn s4_a_first_card_follows_the_written_province_and_then_the_transfer() {
    let p = person(141, "JX-0141");
    let q = person(142, "JX-0142");
    let mut h = Harness::new(vec![]).await;
    // No card yet: either bureau may register a first card for the province it holds.
    let issue = h.by_sichuan(DecisionPurpose::IssueCard, &q, "sc-first", PRODUCER);
    let made = h.register(&issue, PRODUCER, "ZJ-0142").await.unwrap();
    assert_eq!(status_of(made.status), pb::CardStatus::AwaitingCollection);
    // After a transfer (of a citizen without cards), the old bureau registers no first card.
    let done = h.transfer_registration(&h.transfer(&p, "jx-transfer")).await.unwrap();
    assert!(done.card_serials.is_empty());
    let error = h.register(&h.issue(&p, "jx-first"), PRODUCER, "ZJ-0141").await.unwrap_err();
    assert_eq!(reason(&error), "DECISION_WRONG_JURISDICTION");
    let issue = h.by_sichuan(DecisionPurpose::IssueCard, &p, "sc-first-p", PRODUCER);
    let made = h.register(&issue, PRODUCER, "ZJ-0141").await.unwrap();
    assert_eq!(status_of(made.status), pb::CardStatus::AwaitingCollection);
    h.shutdown().await;
}

/// C4, S1: a statement is signed once per status and served again, yet a loss report followed at
/// once by a check is answered by a statement of the new status, never a cached one of the old
/// (and so is the withdrawal after it), 1,000 times over.
#[tokio::test]
async fn c4_a_check_right_after_a_change_gets_a_statement_of_the_new_status_every_time() {
    let p = person(123, "JX0001000000");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
    let (_, first) = signed_check(&mut h, &p.id, &p.card, b"").await;
    let (_, again) = signed_check(&mut h, &p.id, &p.card, b"").await;
    assert_eq!(again, first, "the same statement is served again, not signed anew");
    for round in 0..1000 {
        let reported = h.report_loss(&h.loss(&p, &format!("loss-{round}"))).await.unwrap();
        let (answer, signed) = signed_check(&mut h, &p.id, &p.card, b"").await;
        let statement = signed.verify_answer(&directory, &p.id, &p.card, b"").unwrap();
        assert_eq!(
            (statement.status, status_of(answer.status)),
            (yidi_domain::CardStatus::ReportedLost, pb::CardStatus::ReportedLost),
            "round {round}: a statement of the old status after the loss report"
        );
        assert_eq!(statement.status_changed_at.map(yidi_grpc::convert::timestamp), reported.changed_at);

        let withdrawn = h.withdraw(&h.withdrawal(&p, &format!("withdraw-{round}"))).await.unwrap();
        let (_, signed) = signed_check(&mut h, &p.id, &p.card, b"").await;
        let statement = signed.verify_answer(&directory, &p.id, &p.card, b"").unwrap();
        assert_eq!(statement.status, yidi_domain::CardStatus::Valid, "round {round}: after the withdrawal");
        assert_eq!(statement.status_changed_at.map(yidi_grpc::convert::timestamp), withdrawn.changed_at);
    }
    h.shutdown().await;
}

/// C4: on a running clock, a cached statement is served again only while more than half of its
/// window is left, so never past its `next_update`; a question with a nonce gets its own.
#[tokio::test]
async fn c4_a_statement_past_its_next_update_is_never_served() {
    let p = person(123, "JX0001000000");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    h.config.registry.statement_validity_seconds = 2;
    h.config.clock = ClockConfig { start: Some(now()), ..ClockConfig::default() };
    h.restart().await;
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
    let mut made = std::collections::BTreeSet::new();
    let until = std::time::Instant::now() + Duration::from_millis(3500);
    while std::time::Instant::now() < until {
        let (answer, signed) = signed_check(&mut h, &p.id, &p.card, b"").await;
        let checked_at = yidi_grpc::convert::from_timestamp(answer.checked_at.as_ref().unwrap()).unwrap();
        let statement = signed.verify_current(&directory, checked_at).unwrap();
        assert_eq!(statement.next_update - statement.answered_at, chrono::Duration::seconds(2));
        assert!(checked_at < statement.answered_at + chrono::Duration::seconds(1), "served with half its window gone");
        made.insert(statement.answered_at);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!((2..=8).contains(&made.len()), "statements made: {made:?}: served again, and renewed in time");

    let (answer, signed) = signed_check(&mut h, &p.id, &p.card, b"nonce-1").await;
    let statement = signed.verify_answer(&directory, &p.id, &p.card, b"nonce-1").unwrap();
    assert_eq!(
        Some(yidi_grpc::convert::timestamp(statement.answered_at)),
        answer.checked_at,
        "signed for the question"
    );
    h.shutdown().await;
}

/// A small deterministic generator, so a failing run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// S1 across replicas (issue 15, done-when 1): `rounds` times a loss report or its withdrawal
/// through a random replica, then at once a check at another one (the same when there is one):
/// the answer reflects the write every time, and carries a sequence at least the write's.
async fn acknowledged_changes_are_seen_by_every_replica(h: &mut Harness, replicas: usize, rounds: usize) {
    let p = person(123, "JX-0001");
    let mut clients = vec![h.client.clone()];
    let mut bureaus = Vec::new();
    for n in 1..replicas {
        let (client, bureau) = h.replica(&format!("replica-{n}")).await;
        clients.push(client);
        bureaus.push(bureau);
    }
    let mut pick = Lcg(15);
    let mut last_sequence = 0;
    for round in 0..rounds {
        let writer = pick.below(replicas);
        let reader = if replicas == 1 { 0 } else { (writer + 1 + pick.below(replicas - 1)) % replicas };
        let expected = if round % 2 == 0 {
            report_loss_at(&mut clients[writer], &h.loss(&p, &format!("loss-{round}"))).await.unwrap();
            pb::CardStatus::ReportedLost
        } else {
            withdraw_at(&mut clients[writer], &h.withdrawal(&p, &format!("found-{round}"))).await.unwrap();
            pb::CardStatus::Valid
        };
        let answer = check_at(&mut clients[reader], &p.id, &p.card, "bank-of-test").await.unwrap();
        assert_eq!(status_of(answer.status), expected, "round {round}: written at {writer}, checked at {reader}");
        assert!(answer.sequence > last_sequence, "round {round}: the answer reflects a newer sequence");
        last_sequence = answer.sequence;
    }
    for bureau in bureaus {
        bureau.stop().await.unwrap();
    }
}

#[tokio::test]
async fn s1_every_acknowledged_change_is_seen_at_once_by_the_one_sqlite_replica() {
    let p = person(123, "JX-0001");
    let mut h = Harness::new(vec![citizen(&p, None, false)]).await;
    acknowledged_changes_are_seen_by_every_replica(&mut h, 1, 1000).await;
    h.shutdown().await;
}

#[tokio::test]
async fn s1_every_acknowledged_change_is_seen_at_once_by_every_replica_on_postgres() {
    let Some(scratch) = postgres_for_tests("registry_replicas").await.unwrap() else { return };
    {
        let p = person(123, "JX-0001");
        let mut h = Harness::with_database(vec![citizen(&p, None, false)], Some(scratch.url().to_owned())).await;
        // What is tested is that an answer is never stale, not that three replicas confirm within
        // the shipped 200 ms while the rest of the suite fills both cores (then a replica refuses
        // with REPLICA_BEHIND, as it should, and the round fails). A longer fence keeps the rule
        // and lets a starved replica confirm late instead of refusing.
        h.config.registry.fence_after_ms = 2_000;
        h.restart().await;
        acknowledged_changes_are_seen_by_every_replica(&mut h, 3, 1000).await;
        h.shutdown().await;
    }
    scratch.drop().await.unwrap();
}

/// What a write through one replica came to.
#[derive(Debug, Default)]
struct Acknowledged {
    registered: Vec<(String, String)>,
    losses: Vec<String>,
    withdrawals: Vec<String>,
    collected: Vec<String>,
}

/// Issue 15, done-when 4: two replicas take registrations, collections, loss reports and
/// withdrawals for one citizen at the same time, round after round. The database serialises them
/// per holder: one current card at the end of every round, every card's history a sequence of
/// allowed moves ending in its status, every acknowledged decision recorded exactly once.
#[tokio::test]
async fn s1_two_replicas_writing_for_one_citizen_at_once_leave_one_current_card() {
    let Some(scratch) = postgres_for_tests("registry_replica_writers").await.unwrap() else { return };
    {
        let first = person(123, "JX-0001");
        let mut h = Harness::with_database(vec![citizen(&first, None, false)], Some(scratch.url().to_owned())).await;
        let (other, other_bureau) = h.replica("replica-b").await;
        let mut acknowledged = Acknowledged::default();
        let mut current = first.card.clone();
        for round in 0..25 {
            let p = Person { id: first.id.clone(), card: current.clone() };
            let (mut a, mut b) = (h.client.clone(), other.clone());
            let (mut c, mut d) = (h.client.clone(), other.clone());
            let (issue_a, issue_b) =
                (h.issue(&p, &format!("issue-{round}-a")), h.issue(&p, &format!("issue-{round}-b")));
            let (loss, found) = (h.loss(&p, &format!("loss-{round}")), h.withdrawal(&p, &format!("found-{round}")));
            let (serial_a, serial_b) = (format!("ZA{round}"), format!("ZB{round}"));
            let make_and_hand_over = |client: &mut Client, issue: SignedDecision, serial: String| {
                let mut client = client.clone();
                let id = p.id.clone();
                async move {
                    let registered = register_at(&mut client, &issue, PRODUCER, &serial).await.is_ok();
                    let collected = registered && collect_through(&mut client, STATION, &id, &serial).await.is_ok();
                    (issue.decision.decision_id.clone(), serial, registered, collected)
                }
            };
            let (made_a, made_b, lost, withdrawn) = tokio::join!(
                make_and_hand_over(&mut a, issue_a, serial_a),
                make_and_hand_over(&mut b, issue_b, serial_b),
                report_loss_at(&mut c, &loss),
                withdraw_at(&mut d, &found),
            );
            for (decision, serial, registered, collected) in [made_a, made_b] {
                if registered {
                    acknowledged.registered.push((decision, serial.clone()));
                }
                if collected {
                    acknowledged.collected.push(serial);
                }
            }
            if lost.is_ok_and(|answer| !answer.already_reported) {
                acknowledged.losses.push(loss.decision.decision_id.clone());
            }
            if withdrawn.is_ok() {
                acknowledged.withdrawals.push(found.decision.decision_id.clone());
            }
            let current_cards = query_strings(
                &scratch,
                &format!(
                    "SELECT serial FROM cards WHERE id_number = '{}' AND status IN ('valid', 'reported_lost')",
                    p.id
                ),
            )
            .await;
            assert_eq!(current_cards.len(), 1, "round {round}: one current card, found {current_cards:?}");
            current = current_cards[0].clone();
        }
        assert!(acknowledged.collected.len() >= 25, "every round handed a card over: {acknowledged:?}");
        assert_single_writer_histories(&scratch, &first.id).await;
        for (decision, serial) in &acknowledged.registered {
            let cards =
                query_strings(&scratch, &format!("SELECT serial FROM cards WHERE decision_id = '{decision}'")).await;
            assert_eq!(cards, vec![serial.clone()], "registration {decision}: recorded once, nothing lost");
        }
        for decision in &acknowledged.losses {
            let reports = query_strings(
                &scratch,
                &format!("SELECT card_serial FROM loss_reports WHERE decision_id = '{decision}'"),
            )
            .await;
            assert_eq!(reports.len(), 1, "loss report {decision}: recorded once");
        }
        for decision in &acknowledged.withdrawals {
            let reports = query_strings(
                &scratch,
                &format!("SELECT card_serial FROM loss_reports WHERE withdraw_decision_id = '{decision}'"),
            )
            .await;
            assert_eq!(reports.len(), 1, "withdrawal {decision}: recorded once");
        }
        other_bureau.stop().await.unwrap();
        h.shutdown().await;
    }
    scratch.drop().await.unwrap();
}

async fn query_strings(scratch: &yidi_testkit::ScratchDatabase, sql: &str) -> Vec<String> {
    let db =
        yidi_runtime::db::connect(&DatabaseConfig { url: scratch.url().to_owned(), max_connections: 1 }).await.unwrap();
    let rows = db.query_all_raw(Statement::from_string(db.get_database_backend(), sql.to_owned())).await.unwrap();
    db.close().await.unwrap();
    rows.iter().map(|row| row.try_get_by_index::<String>(0).unwrap()).collect()
}

/// Every card of the holder went through allowed moves only, from where it began (an imported
/// card valid, a registered one made) to its stored status, in the order of the log.
async fn assert_single_writer_histories(scratch: &yidi_testkit::ScratchDatabase, id_number: &str) {
    use yidi_domain::StoredCardStatus;
    let parse = |status: &str| StoredCardStatus::ALL.into_iter().find(|s| s.as_str() == status).unwrap();
    let cards = query_strings(
        scratch,
        &format!("SELECT serial || ' ' || status || ' ' || COALESCE(decision_id, '') FROM cards WHERE id_number = '{id_number}'"),
    )
    .await;
    let events = query_strings(
        scratch,
        &format!(
            "SELECT e.card_serial || ' ' || e.status FROM status_events e JOIN cards c ON c.serial = e.card_serial \
             WHERE c.id_number = '{id_number}' ORDER BY e.sequence"
        ),
    )
    .await;
    let mut states = std::collections::HashMap::new();
    for card in &cards {
        let fields: Vec<&str> = card.split(' ').collect();
        let registered = fields.get(2).is_some_and(|decision| !decision.is_empty());
        states.insert(fields[0].to_owned(), if registered { StoredCardStatus::Made } else { StoredCardStatus::Valid });
    }
    for event in &events {
        let (serial, status) = event.split_once(' ').unwrap();
        let to = parse(status);
        let from = states[serial];
        assert!(from.can_move_to(to), "{serial}: {} -> {} is no allowed move", from.as_str(), to.as_str());
        states.insert(serial.to_owned(), to);
    }
    for card in &cards {
        let fields: Vec<&str> = card.split(' ').collect();
        assert_eq!(states[fields[0]], parse(fields[1]), "{}: its events end in its status", fields[0]);
    }
}

/// A `yidi-registry` process of the harness's database, directory and keys.
struct ReplicaProcess {
    child: tokio::process::Child,
    client: Client,
    channel: Channel,
}

impl ReplicaProcess {
    async fn start(replica_id: &str, config_path: &std::path::Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_yidi-registry"))
            .env("YIDI_CONFIG", config_path)
            .env("YIDI__REGISTRY__REPLICA_ID", replica_id)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let address = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap();
            let line = line.unwrap_or_else(|| panic!("replica {replica_id} ended before listening"));
            if let Some(address) = line.split("listening on ").nth(1) {
                break address.trim().to_owned();
            }
        };
        // Drained, so that its output never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let mut client = LossRegistryClient::new(channel.clone());
        let probe = IdNumber::compose("360102", day(1990, 3, 7), 1);
        let mut serving = false;
        for _ in 0..200 {
            if check_at(&mut client, probe.as_str(), "PROBE", "bank-of-test").await.is_ok() {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(serving, "replica {replica_id} never served");
        Self { child, client, channel }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// SIGSTOP, returning once every thread has stopped. `kill` returns when the signal is
    /// queued; Linux wakes one thread to begin the group stop, and on a busy machine the others
    /// may run (and answer a check) until it is scheduled. Such an answer precedes the stop and
    /// is not stale; the test is about what the replica says after it.
    async fn stop(&self) {
        self.signal("-STOP");
        let tasks = format!("/proc/{}/task", self.child.id().unwrap());
        for _ in 0..1000 {
            let all_stopped = std::fs::read_dir(&tasks).unwrap().all(|task| {
                let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the command name, which is in parentheses.
                stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
            });
            if all_stopped {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the replica's threads did not all stop within a second");
    }

    async fn health(&self) -> Result<i32, Status> {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let answer = tonic_health::pb::health_client::HealthClient::new(self.channel.clone()).check(request).await?;
        Ok(answer.into_inner().status)
    }
}

/// A check at a replica, asked again while it answers `REPLICA_BEHIND` (a replica starved of CPU
/// on a busy test machine fences itself, rightly; a client would ask another). Any other refusal
/// fails the test.
async fn answered_when_fresh(client: &mut Client, id: &str, serial: &str) -> pb::CheckCardResponse {
    for _ in 0..100 {
        match check_at(client, id, serial, "bank-of-test").await {
            Ok(answer) => return answer,
            Err(status) if reason(&status) == "REPLICA_BEHIND" => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(status) => panic!("check refused: {status:?}"),
        }
    }
    panic!("the replica stayed behind for two seconds");
}

/// The refusal of a check by a replica that is not behind (it then answers REPLICA_BEHIND first).
async fn refused_when_fresh(client: &mut Client, id: &str, serial: &str) -> Status {
    for _ in 0..100 {
        match check_at(client, id, serial, "bank").await {
            Ok(answer) => panic!("answered: {answer:?}"),
            Err(status) if reason(&status) == "REPLICA_BEHIND" => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(status) => return status,
        }
    }
    panic!("the replica stayed behind for two seconds");
}

/// The registry's configuration as a file, for its processes.
fn write_config_file(h: &Harness, db_url: &str) -> PathBuf {
    let key_dir = h.config.signing.key_dir.as_ref().unwrap();
    let config = format!(
        "[server]\nbureau_id = \"{REGISTRY}\"\nlisten = \"127.0.0.1:0\"\nshutdown_grace_seconds = 1\n\n\
         [tls]\nplaintext = true\n\n[database]\nurl = \"{db_url}\"\nmax_connections = 4\n\n\
         [directory]\npath = \"{}\"\n\n[clock]\nfixed = \"{}\"\n\n[signing]\nkey_dir = \"{}\"\n\n\
         [registry]\ncheck_misses_per_minute = 1000000\n",
        h.directory_path.display(),
        now().to_rfc3339(),
        key_dir.display(),
    );
    let path = h._dir.path().join("registry-replica.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Issue 15, done-when 2, with the `yidi-registry` binary: a replica stopped with SIGSTOP cannot
/// prove it is fresh, so the checks and health probes it reads when it resumes (sent while it was
/// stopped, longer ago than the fence bound) are answered UNAVAILABLE `REPLICA_BEHIND` and
/// NOT_SERVING, never with the status it had; meanwhile writes through the other replicas are
/// acknowledged within about the bound; then it catches up from the log and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_a_stopped_replica_answers_no_stale_check_and_catches_up_when_it_resumes() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Some(scratch) = postgres_for_tests("registry_stopped_replica").await.unwrap() else { return };
    {
        let p = person(123, "JX-0001");
        let mut h = Harness::with_database(vec![citizen(&p, None, false)], Some(scratch.url().to_owned())).await;
        let config_path = write_config_file(&h, scratch.url());
        let mut b = ReplicaProcess::start("replica-b", &config_path).await;
        let mut c = ReplicaProcess::start("replica-c", &config_path).await;
        assert_eq!(c.health().await.unwrap(), ServingStatus::Serving as i32);

        c.stop().await;
        let fence = Duration::from_millis(ChecksConfig::default().fence_after_ms);
        let mut checked = c.client.clone();
        let (id, serial) = (p.id.clone(), p.card.clone());
        let stale_check = tokio::spawn(async move { check_at(&mut checked, &id, &serial, "bank-of-test").await });
        let c_channel = c.channel.clone();
        let stale_health = tokio::spawn(async move {
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            tonic_health::pb::health_client::HealthClient::new(c_channel).check(request).await
        });
        let mut slowest = Duration::ZERO;
        for round in 0..6 {
            let started = std::time::Instant::now();
            let expected = if round % 2 == 0 {
                report_loss_at(&mut b.client, &h.loss(&p, &format!("loss-{round}"))).await.unwrap();
                pb::CardStatus::ReportedLost
            } else {
                h.withdraw(&h.withdrawal(&p, &format!("found-{round}"))).await.unwrap();
                pb::CardStatus::Valid
            };
            slowest = slowest.max(started.elapsed());
            let at_a = answered_when_fresh(&mut h.client, &p.id, &p.card).await;
            assert_eq!(status_of(at_a.status), expected);
            let at_b = answered_when_fresh(&mut b.client, &p.id, &p.card).await;
            assert_eq!(status_of(at_b.status), expected);
        }
        // The bound, plus what a busy test machine adds to a write and its check of the replicas.
        assert!(slowest < fence + Duration::from_millis(800), "a write waited {slowest:?} for the stopped replica");
        // Six writes: the card ends valid again; what the stopped replica had is "reported lost"
        // after the first. Its answers read after it resumes must not be older than the last.
        // Held until those answers are in: nobody can read the log's head, so the resumed
        // replica cannot confirm it is fresh before it reads the requests that waited (else the
        // order of its follower and of those requests would decide what the test sees).
        let blocker = sea_orm::Database::connect(scratch.url()).await.unwrap();
        let head_reads_blocked = sea_orm::TransactionTrait::begin(&blocker).await.unwrap();
        head_reads_blocked.execute_unprepared("LOCK TABLE registry_feed_head IN ACCESS EXCLUSIVE MODE").await.unwrap();
        c.signal("-CONT");
        let stale = stale_check.await.unwrap();
        match &stale {
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert_eq!(reason(status), "REPLICA_BEHIND");
            }
            Ok(answer) => panic!("a check read after the stop was answered: {answer:?}"),
        }
        let health = stale_health.await.unwrap().unwrap().into_inner().status;
        assert_eq!(health, ServingStatus::NotServing as i32, "health read after the stop");
        head_reads_blocked.rollback().await.unwrap();
        blocker.close().await.unwrap();

        let mut caught_up = None;
        for _ in 0..100 {
            if let Ok(answer) = check_at(&mut c.client, &p.id, &p.card, "bank-of-test").await {
                caught_up = Some(answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answer = caught_up.expect("the resumed replica serves again");
        assert_eq!(status_of(answer.status), pb::CardStatus::Valid, "it applied every write it missed");
        assert_eq!(c.health().await.unwrap(), ServingStatus::Serving as i32);
        eprintln!("slowest write while a replica was stopped: {slowest:?}");
        drop((b, c));
        h.shutdown().await;
    }
    scratch.drop().await.unwrap();
}

/// One CheckCard of the load: when it started and ended (since the load began), and whether it
/// was answered.
struct LoadCall {
    started: Duration,
    ended: Duration,
    /// None: answered.
    error: Option<String>,
}

/// `tasks` closed loops of CheckCard over `client` until `stop`, each call with a deadline.
fn check_load(
    client: LossRegistryClient<Balanced>,
    people: &[(String, String)],
    tasks: usize,
    began: std::time::Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<LoadCall>>> {
    (0..tasks)
        .map(|task| {
            let (mut client, people, stop) = (client.clone(), people.to_vec(), stop.clone());
            tokio::spawn(async move {
                let mut calls = Vec::new();
                let mut next = task;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (id, serial) = &people[next % people.len()];
                    next += tasks;
                    let mut request = tonic::Request::new(pb::CheckCardRequest {
                        id_number: id.clone(),
                        card_serial: serial.clone(),
                        relying_party: "bank-of-test".into(),
                        nonce: Vec::new(),
                    });
                    request.set_timeout(Duration::from_secs(1));
                    let started = began.elapsed();
                    // The client enforces the deadline too: the server's is only what it is told.
                    let answer = tokio::time::timeout(Duration::from_millis(1500), client.check_card(request)).await;
                    let error = match answer {
                        Ok(Ok(_)) => None,
                        Ok(Err(status)) => {
                            Some(format!("{:?} {} {:?}", status.code(), status.message(), status.metadata()))
                        }
                        Err(_) => Some("deadline passed".into()),
                    };
                    calls.push(LoadCall { started, ended: began.elapsed(), error });
                }
                calls
            })
        })
        .collect()
}

/// Issue 15, done-when 3, with the `yidi-registry` binary: 3 replicas serve a CheckCard load
/// through one [`Balanced`] channel; one is killed with SIGKILL. Only the checks in flight at the
/// kill may fail (the balancer repeats reads on another replica, so usually none does), throughput
/// is back within a second, and the killed replica, restarted with its configuration while a loss
/// was reported through another, catches up from the log and serves.
///
/// A timing test: on two cores shared with the rest of the suite, replicas starved of CPU fence
/// themselves (as they must) and the throughput buckets mean nothing. `.ci/run` runs it alone,
/// after the suite: `cargo nextest run -p yidi-registry --run-ignored only -E 'test(s1_a_replica_killed)'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing under load: run alone (.ci/run does, after the suite)"]
async fn s1_a_replica_killed_under_check_load_fails_only_checks_in_flight_and_catches_up_when_restarted() {
    const TASKS: usize = 8;
    const BUCKET: Duration = Duration::from_millis(100);
    // Calls that start this close to the kill may still have been sent to the dying replica.
    const AROUND_THE_KILL: Duration = Duration::from_millis(100);
    let Some(scratch) = postgres_for_tests("registry_killed_replica").await.unwrap() else { return };
    {
        let people: Vec<Person> = (0..20).map(|i| person(200 + i, &format!("JX-{i:04}"))).collect();
        let citizens = people.iter().map(|p| citizen(p, None, false)).collect();
        let mut h = Harness::with_database(citizens, Some(scratch.url().to_owned())).await;
        let config_path = write_config_file(&h, scratch.url());
        // What this test is about is the kill, not the fence: a bound of a second keeps a replica
        // that the load generator starves for a moment from fencing itself.
        let mut file = std::fs::OpenOptions::new().append(true).open(&config_path).unwrap();
        std::io::Write::write_all(&mut file, b"fence_after_ms = 1000\n").unwrap();
        let mut replicas = Vec::new();
        for replica_id in ["replica-a", "replica-b", "replica-c"] {
            replicas.push(ReplicaProcess::start(replica_id, &config_path).await);
        }
        // The harness's own replica (it migrated and imported) leaves: three replicas, all processes.
        h.shutdown().await;
        let balanced = Balanced::new(
            replicas.iter().enumerate().map(|(i, replica)| (format!("replica-{i}"), replica.channel.clone())),
        );
        let checked: Vec<(String, String)> = people.iter().map(|p| (p.id.clone(), p.card.clone())).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let began = std::time::Instant::now();
        let loops = check_load(LossRegistryClient::new(balanced), &checked, TASKS, began, stop.clone());

        tokio::time::sleep(Duration::from_secs(3)).await;
        let kill_sent = began.elapsed();
        replicas[0].signal("-KILL");
        let status = replicas[0].child.wait().await.unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status:?}");
        let killed = began.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut calls = Vec::new();
        for task in loops {
            calls.extend(task.await.unwrap());
        }
        let ended = began.elapsed();

        // Only checks in flight at the kill failed: started before it (or just after, on a
        // connection not yet known dead), still running when it was sent.
        let failed: Vec<&LoadCall> = calls.iter().filter(|call| call.error.is_some()).collect();
        for call in &failed {
            eprintln!("failed {:?}..{:?}: {:?}", call.started, call.ended, call.error);
        }
        for call in &failed {
            assert!(
                call.started <= killed + AROUND_THE_KILL && call.ended >= kill_sent,
                "a check failed that was not in flight at the kill ({kill_sent:?}..{killed:?}): {:?}..{:?}: {:?}",
                call.started,
                call.ended,
                call.error
            );
        }
        let started_around_the_kill = calls
            .iter()
            .filter(|call| call.started + AROUND_THE_KILL >= kill_sent && call.started <= killed + AROUND_THE_KILL)
            .count();
        assert!(
            failed.len() <= TASKS + started_around_the_kill,
            "{} checks failed; {TASKS} loops, {started_around_the_kill} started around the kill",
            failed.len()
        );

        // Answered checks per 100 ms, by when they ended.
        let buckets = usize::try_from(ended.as_millis() / BUCKET.as_millis()).unwrap() + 1;
        let mut answered = vec![0u32; buckets];
        for call in calls.iter().filter(|call| call.error.is_none()) {
            answered[usize::try_from(call.ended.as_millis() / BUCKET.as_millis()).unwrap()] += 1;
        }
        let bucket_of = |at: Duration| usize::try_from(at.as_millis() / BUCKET.as_millis()).unwrap();
        let mean = |range: std::ops::Range<usize>| {
            let n = range.len();
            f64::from(answered[range].iter().sum::<u32>()) / n as f64
        };
        // Warm-up: the first second (connections, caches); the last bucket is partial.
        let before = mean(bucket_of(Duration::from_secs(1))..bucket_of(kill_sent));
        let after = mean(bucket_of(killed + Duration::from_secs(1))..buckets - 1);
        eprintln!(
            "{} checks, {} failed; per 100 ms: {before:.1} before the kill, {after:.1} from 1 s after; buckets {answered:?}",
            calls.len(),
            failed.len()
        );
        // Half: two replicas are left of three, but on a 2-core machine shared with other work the
        // load is bound by the cores, not by the replicas, and one slow 100 ms is common; a balancer
        // that kept sending to the dead replica would cost calls their deadline or fail them.
        assert!(after >= before / 2.0, "throughput {after:.1} per 100 ms after the kill, {before:.1} before");
        // And no 100 ms from then stalls (a quarter: one bucket is noisier than their mean).
        let slowest = answered[bucket_of(killed + Duration::from_secs(1))..buckets - 1].iter().min().copied();
        assert!(slowest.is_some_and(|n| f64::from(n) >= before / 4.0), "a 100 ms with {slowest:?} answers");

        // While it is down, a loss is reported through another replica (acknowledged once the
        // dead one is fenced); restarted with its configuration, it applies it from the log.
        let lost = &people[0];
        let answer = report_loss_at(&mut replicas[1].client, &h.loss(lost, "loss-while-down")).await;
        answer.unwrap();
        let mut restarted = ReplicaProcess::start("replica-a", &config_path).await;
        let answer = check_at(&mut restarted.client, &lost.id, &lost.card, "bank-of-test").await.unwrap();
        assert_eq!(status_of(answer.status), pb::CardStatus::ReportedLost, "the restarted replica applied the log");
        let other = &people[1];
        let answer = check_at(&mut restarted.client, &other.id, &other.card, "bank-of-test").await.unwrap();
        assert_eq!(status_of(answer.status), pb::CardStatus::Valid);
        // Killed and reaped, so that none still holds a connection when the database is dropped.
        for mut replica in replicas.into_iter().skip(1).chain([restarted]) {
            replica.child.kill().await.unwrap();
        }
    }
    scratch.drop().await.unwrap();
}

/// C4 across replicas (issue 15, point 3): the miss budget of a caller is one, however many
/// replicas it spreads its guesses over.
#[tokio::test]
async fn c4_replicas_share_one_miss_budget_per_caller() {
    let Some(scratch) = postgres_for_tests("registry_shared_budget").await.unwrap() else { return };
    {
        let p = person(123, "JX-0001");
        let h = Harness::with_database(vec![citizen(&p, None, false)], Some(scratch.url().to_owned())).await;
        let five = |config: &mut RegistryConfig| config.registry.check_misses_per_minute = 5;
        let (mut a, a_bureau) = h.replica_with("budget-a", five).await;
        let (mut b, b_bureau) = h.replica_with("budget-b", five).await;
        // The two probes that found them serving and three guesses at replica a spend the five
        // misses of the caller (its address).
        for guess in 0..3 {
            // A replica starved of CPU fences itself (REPLICA_BEHIND) before it counts a miss.
            let answer = answered_when_fresh(&mut a, &p.id, &format!("GUESS-{guess}")).await;
            assert_eq!(status_of(answer.status), pb::CardStatus::Unknown);
        }
        // Replica b learns of it within a sync (a second): its hits are refused too, or the
        // answers would tell hits from misses.
        let started = std::time::Instant::now();
        loop {
            match check_at(&mut b, &p.id, &p.card, "bank").await {
                Err(refused) if reason(&refused) != "REPLICA_BEHIND" => break,
                _ => {}
            }
            assert!(started.elapsed() < Duration::from_secs(3), "replica b never learnt of the exhausted budget");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for client in [&mut a, &mut b] {
            let refused = refused_when_fresh(client, &p.id, "GUESS-X").await;
            assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
            assert_eq!(reason(&refused), "CHECK_MISSES_EXHAUSTED");
        }
        assert_eq!(refused_when_fresh(&mut a, &p.id, &p.card).await.code(), Code::ResourceExhausted);
        a_bureau.stop().await.unwrap();
        b_bureau.stop().await.unwrap();
    }
    scratch.drop().await.unwrap();
}

/// Issue 16: a harness whose registry signs a delta every second, and a relying party's checker.
async fn snapshot_harness(citizens: Vec<Citizen>) -> (Harness, yidi_check::Checker, tempfile::TempDir) {
    let mut h = Harness::new(citizens).await;
    h.config.registry.delta_every_seconds = 1;
    h.restart().await;
    let data = tempfile::tempdir().unwrap();
    let checker = checker_in(&h, data.path(), yidi_runtime::directory::load(&h.directory_path).unwrap());
    (h, checker, data)
}

fn checker_in(h: &Harness, dir: &std::path::Path, directory: yidi_domain::Directory) -> yidi_check::Checker {
    let _ = h;
    yidi_check::Checker::open(dir, directory, checker_settings()).unwrap()
}

fn checker_settings() -> yidi_check::Settings {
    yidi_check::Settings {
        relying_party: "bank-of-test".into(),
        max_age: chrono::Duration::seconds(60),
        renew_after_deltas: yidi_check::RENEW_AFTER_DELTAS,
        status_only: false,
    }
}

/// `count` Jiangxi citizens with cards; every tenth reported lost.
fn snapshot_population(count: u16) -> (Vec<Person>, Vec<Citizen>) {
    let people: Vec<Person> = (0..count).map(|i| person(i, &format!("JX{i:010}"))).collect();
    let citizens = people.iter().enumerate().map(|(i, p)| citizen(p, Some(day(2138, 1, 1)), i % 10 == 3)).collect();
    (people, citizens)
}

async fn snapshot_bytes(h: &mut Harness) -> Vec<u8> {
    let mut chunks = h.client.get_status_snapshot(pb::GetStatusSnapshotRequest::default()).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        bytes.extend(chunk.unwrap().data);
    }
    bytes
}

#[tokio::test]
async fn c4_snapshot_answers_equal_check_card_and_pairs_never_registered_are_never_valid() {
    let (people, citizens) = snapshot_population(400);
    let (mut h, checker, _data) = snapshot_harness(citizens).await;
    checker.sync(&mut h.client).await.unwrap();
    let cards: Vec<pb::CardQuery> =
        people.iter().map(|p| pb::CardQuery { id_number: p.id.clone(), card_serial: p.card.clone() }).collect();
    let online = h
        .client
        .check_cards(pb::CheckCardsRequest { cards: cards.clone(), relying_party: "bank-of-test".into() })
        .await
        .unwrap()
        .into_inner();
    for (query, result) in cards.iter().zip(&online.results) {
        let expected = match status_of(result.status) {
            pb::CardStatus::Valid => yidi_check::Local::Valid,
            _ => yidi_check::Local::NotValid,
        };
        assert_eq!(checker.local(&query.id_number, &query.card_serial, now()), expected, "{}", query.card_serial);
    }
    // Never registered: unknown serials, and known serials under another holder's number.
    for i in 0..10_000u32 {
        let holder = IdNumber::compose(
            "510104",
            day(1980, 1, 1) + chrono::Duration::days(i64::from(i / 1000)),
            (i % 1000) as u16,
        );
        let serial = if i % 2 == 0 { format!("ZZ{i:010}") } else { people[i as usize % people.len()].card.clone() };
        let local = checker.local(holder.as_str(), &serial, now());
        assert_ne!(local, yidi_check::Local::Valid, "{holder:?} {serial}");
    }
}

/// Issue 16 with receipts: a relying party keeping only the status filter answers every card
/// presented with its receipt as CheckCard does, learns a loss from the next delta, and never
/// answers a pair without the pair's own receipt.
#[tokio::test]
async fn c4_cards_checked_by_their_receipts_against_the_status_only_snapshot_answer_as_check_card() {
    let (people, citizens) = snapshot_population(200);
    let (mut h, _, _data) = snapshot_harness(citizens).await;
    let data = tempfile::tempdir().unwrap();
    let settings = yidi_check::Settings { status_only: true, ..checker_settings() };
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
    let checker = yidi_check::Checker::open(data.path(), directory, settings).unwrap();
    checker.sync(&mut h.client).await.unwrap();
    let full = snapshot_bytes(&mut h).await;
    let status_only = std::fs::metadata(data.path().join("snapshot.bin")).unwrap().len();
    // 200 cards: the header, signature and block index weigh most; see the bench for a nation.
    assert!(status_only * 4 < full.len() as u64, "{status_only} bytes without coverage, {} with", full.len());
    let mut receipts = Vec::new();
    for p in &people {
        let (bytes, receipt) = checker.fetch_receipt(&mut h.client, &p.id, &p.card).await.unwrap();
        assert!(bytes.len() < 200, "{}", bytes.len());
        let online = check_at(&mut h.client, &p.id, &p.card, "bank-of-test").await.unwrap();
        let expected = match status_of(online.status) {
            pb::CardStatus::Valid => yidi_check::Local::Valid,
            _ => yidi_check::Local::NotValid,
        };
        assert_eq!(checker.local_with(&p.id, &p.card, Some(&receipt), now()), expected, "{}", p.card);
        assert_eq!(checker.local(&p.id, &p.card, now()), yidi_check::Local::NotCovered, "no receipt, no coverage");
        receipts.push(receipt);
    }
    // Never registered: no receipt to fetch, and another card's receipt does not fit.
    let stranger = IdNumber::compose("510104", day(1980, 1, 1), 7);
    let missing = checker.fetch_receipt(&mut h.client, stranger.as_str(), &people[0].card).await.unwrap_err();
    assert!(matches!(missing, yidi_check::CheckError::Rpc(ref s) if s.code() == Code::NotFound), "{missing}");
    for (i, receipt) in receipts.iter().enumerate() {
        let other = &people[(i + 1) % people.len()];
        let local = checker.local_with(&other.id, &other.card, Some(receipt), now());
        assert_eq!(local, yidi_check::Local::NotCovered, "{}'s receipt lent to {}", people[i].card, other.card);
        let local = checker.local_with(stranger.as_str(), &people[i].card, Some(receipt), now());
        assert_eq!(local, yidi_check::Local::NotCovered);
    }
    let mut altered = checker.fetch_receipt(&mut h.client, &people[0].id, &people[0].card).await.unwrap().0;
    altered[60] ^= 1;
    assert!(checker.verify_receipt(&altered).is_err(), "a changed byte");
    // A loss report reaches the status-only client with the next delta.
    let p = people
        .iter()
        .zip(&receipts)
        .find(|(p, r)| checker.local_with(&p.id, &p.card, Some(r), now()) == yidi_check::Local::Valid);
    let (p, receipt) = p.unwrap();
    h.report_loss(&h.loss(p, "loss-by-receipt")).await.unwrap();
    let reported = std::time::Instant::now();
    while checker.local_with(&p.id, &p.card, Some(receipt), now()) != yidi_check::Local::NotValid {
        assert!(reported.elapsed() < Duration::from_secs(5), "the loss never reached the client");
        tokio::time::sleep(Duration::from_millis(100)).await;
        checker.sync(&mut h.client).await.unwrap();
    }
}

#[tokio::test]
async fn s1_a_loss_report_reaches_a_following_client_within_one_delta_and_old_data_asks_online() {
    let (people, citizens) = snapshot_population(20);
    let (mut h, checker, _data) = snapshot_harness(citizens).await;
    let checker = std::sync::Arc::new(checker);
    checker.sync(&mut h.client).await.unwrap();
    let p = &people[0];
    assert_eq!(checker.local(&p.id, &p.card, now()), yidi_check::Local::Valid);
    let following = std::sync::Arc::clone(&checker);
    let mut stream_client = h.client.clone();
    let follower = tokio::spawn(async move { following.follow(&mut stream_client).await });
    h.report_loss(&h.loss(p, "loss-issue16")).await.unwrap();
    let reported = std::time::Instant::now();
    while checker.local(&p.id, &p.card, now()) != yidi_check::Local::NotValid {
        // One delta interval (1 s), and the time to sign and push it.
        assert!(reported.elapsed() < Duration::from_millis(2500), "not learned within a delta interval");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follower.abort();
    // The registry's clock stands still: the data is as of now(). A minute and a second later it is
    // older than the client's limit: no local answer, and the check goes online.
    let later = now() + chrono::Duration::seconds(61);
    let other = &people[1];
    assert!(matches!(checker.local(&other.id, &other.card, later), yidi_check::Local::TooOld { .. }));
    assert!(checker.check_offline(&other.id, &other.card, None, later).is_err(), "never valid from old data");
    let answer = checker.check(&mut h.client, &other.id, &other.card, None, later).await.unwrap();
    assert_eq!((answer.verdict, answer.source), (yidi_check::Verdict::Valid, yidi_check::Source::Online));
}

/// Each delta that covers cards is one more filter a pair never registered may pass by chance, so
/// a following client takes the registry's newer snapshot once it holds enough of them, and goes
/// on answering from it.
#[tokio::test]
async fn c4_a_following_client_takes_a_newer_snapshot_after_enough_deltas() {
    let (people, citizens) = snapshot_population(20);
    let mut h = Harness::new(citizens).await;
    h.config.registry.delta_every_seconds = 1;
    h.config.registry.snapshot_every_seconds = 2;
    h.restart().await;
    let data = tempfile::tempdir().unwrap();
    let settings = yidi_check::Settings { renew_after_deltas: 2, ..checker_settings() };
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
    let checker = std::sync::Arc::new(yidi_check::Checker::open(data.path(), directory, settings).unwrap());
    checker.sync(&mut h.client).await.unwrap();
    let first = checker.snapshot_sequence().unwrap();
    let following = std::sync::Arc::clone(&checker);
    let mut stream_client = h.client.clone();
    let follower = tokio::spawn(async move { following.follow(&mut stream_client).await });
    let lost = &people[..4];
    for (i, p) in lost.iter().enumerate() {
        h.report_loss(&h.loss(p, &format!("loss-renew-{i}"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let began = std::time::Instant::now();
    while checker.snapshot_sequence().unwrap() <= first {
        assert!(!follower.is_finished(), "the follower ended: {:?}", follower.await);
        assert!(began.elapsed() < Duration::from_secs(10), "no newer snapshot taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in lost {
        while checker.local(&p.id, &p.card, now()) != yidi_check::Local::NotValid {
            assert!(began.elapsed() < Duration::from_secs(15), "{} not learned", p.card);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(checker.local(&people[5].id, &people[5].card, now()), yidi_check::Local::Valid);
    follower.abort();
}

#[tokio::test]
async fn c4_a_changed_byte_or_a_retired_key_is_refused_by_the_client() {
    let (people, citizens) = snapshot_population(20);
    let (mut h, checker, data) = snapshot_harness(citizens).await;
    let snapshot = snapshot_bytes(&mut h).await;
    let sequence = checker.accept_snapshot(&snapshot).unwrap();
    h.report_loss(&h.loss(&people[0], "loss-tamper")).await.unwrap();
    let mut deltas = Vec::new();
    while deltas.iter().all(|d: &Vec<u8>| d.len() < 200) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let request = pb::ListStatusDeltasRequest { after_sequence: sequence };
        deltas = h.client.list_status_deltas(request).await.unwrap().into_inner().deltas;
    }
    for bytes in [&snapshot, &deltas[0]] {
        for position in [0, 40, bytes.len() / 2, bytes.len() - 1] {
            let mut altered = bytes.to_vec();
            altered[position] ^= 0x20;
            let refused =
                if bytes == &snapshot { checker.accept_snapshot(&altered) } else { checker.accept_delta(&altered) };
            assert!(refused.is_err(), "byte {position} changed and accepted");
        }
    }
    for delta in &deltas {
        checker.accept_delta(delta).unwrap();
    }
    assert_eq!(checker.local(&people[0].id, &people[0].card, now()), yidi_check::Local::NotValid);
    // The registry's key retired before the snapshot was made.
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
    let mut registry = directory.get(REGISTRY).unwrap().clone();
    for key in &mut registry.keys {
        key.valid_until = Some(now() - chrono::Duration::hours(1));
    }
    let retired = yidi_domain::Directory::new(vec![registry]).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let refusing = checker_in(&h, fresh.path(), retired);
    let error = refusing.accept_snapshot(&snapshot).unwrap_err();
    assert!(error.to_string().contains("was not valid when the file was made"), "{error}");
    // What a client keeps on disk is verified again when it opens.
    drop(checker);
    let reopened = checker_in(&h, data.path(), yidi_runtime::directory::load(&h.directory_path).unwrap());
    assert_eq!(reopened.local(&people[0].id, &people[0].card, now()), yidi_check::Local::NotValid);
    let retired_dir = tempfile::tempdir().unwrap();
    std::fs::copy(data.path().join("snapshot.bin"), retired_dir.path().join("snapshot.bin")).unwrap();
    let directory = yidi_runtime::directory::load(&h.directory_path).unwrap();
    let mut registry = directory.get(REGISTRY).unwrap().clone();
    registry.keys[0].valid_until = Some(now() - chrono::Duration::hours(1));
    let stale = checker_in(&h, retired_dir.path(), yidi_domain::Directory::new(vec![registry]).unwrap());
    assert_eq!(stale.local(&people[0].id, &people[0].card, now()), yidi_check::Local::NoData);
}

#[tokio::test]
async fn c4_local_hits_reported_by_the_client_appear_in_the_home_bureau_s_hits() {
    let (people, citizens) = snapshot_population(20);
    let (mut h, checker, _data) = snapshot_harness(citizens).await;
    checker.sync(&mut h.client).await.unwrap();
    let lost = &people[3];
    let answer = checker.check(&mut h.client, &lost.id, &lost.card, None, now()).await.unwrap();
    assert_eq!((answer.verdict, answer.source), (yidi_check::Verdict::NotValid, yidi_check::Source::Local));
    assert!(h.hits(JIANGXI).await.unwrap().is_empty(), "answered locally: nothing reached the registry yet");
    let valid = &people[4];
    checker.check(&mut h.client, &valid.id, &valid.card, None, now()).await.unwrap();
    assert_eq!(checker.report_hits(&mut h.client).await.unwrap(), 1);
    let hits = h.hits(JIANGXI).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!((hits[0].card_serial.as_str(), hits[0].relying_party.as_str()), (lost.card.as_str(), "bank-of-test"));
    assert_eq!(checker.report_hits(&mut h.client).await.unwrap(), 0, "reported once");
}

#[tokio::test]
async fn c4_a_snapshot_holds_no_serial_and_no_number_of_the_population() {
    let (people, citizens) = snapshot_population(200);
    let (mut h, _checker, _data) = snapshot_harness(citizens).await;
    let snapshot = snapshot_bytes(&mut h).await;
    for p in &people {
        for secret in [&p.id, &p.card, &p.id[6..14].to_owned()] {
            assert!(!snapshot.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} in the snapshot");
        }
    }
}
