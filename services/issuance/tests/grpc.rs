//! In-process gRPC tests of the producer: the real server on an SQLite temp file, a fake
//! registry where one is needed, and the generated clients.
use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use ed25519_dalek::SigningKey;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use tempfile::TempDir;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::{Code, Status, service::Routes, transport::Channel};
use tonic_types::StatusExt;
use yidi_domain::{
    ApplicationKind, CardData, Decision, DecisionPurpose, IdNumber, Particulars, Role, SignedDecision,
    mask::mask_id_number,
};
use yidi_grpc::server_config::ServerConfig;
use yidi_grpc::{convert::signed_decision_to_proto, tls::TlsConfig};
use yidi_issuance::config::{IssuanceConfig, ProductionConfig};
use yidi_outbox::OutboxConfig;
use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient};
use yidi_runtime::{
    clock::ClockConfig,
    config::{DatabaseConfig, DirectoryConfig},
    directory::generate_signing_key,
    telemetry::LogConfig,
};
use yidi_testkit::{
    Bureau, DirectoryBuilder,
    fake::{IntakeFake, RegistryFake, intake_server, registry_server, serve_fakes, serve_fakes_on},
    postgres_for_tests,
};

const PRODUCER: &str = "producer-zhejiang";
const WAIT: Duration = Duration::from_secs(15);

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2118, 3, 1, 9, 0, 0).unwrap()
}

// ---------------------------------------------------------------- fake registry

#[derive(Clone, Default)]
struct FakeRegistry {
    calls: Arc<Mutex<Vec<pb::RegisterCardRequest>>>,
    refuse: Option<Code>,
}

impl FakeRegistry {
    fn calls(&self) -> Vec<pb::RegisterCardRequest> {
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl RegistryFake for FakeRegistry {
    async fn register_card(&self, request: pb::RegisterCardRequest) -> Result<pb::RegisterCardResponse, Status> {
        self.calls.lock().unwrap().push(request.clone());
        if let Some(code) = self.refuse {
            return Err(Status::new(code, "refused by the fake registry"));
        }
        Ok(pb::RegisterCardResponse {
            card_serial: request.card_serial,
            status: pb::CardStatus::AwaitingCollection as i32,
            ..Default::default()
        })
    }
}

fn spawn_registry(listener: TcpListener, fake: FakeRegistry) -> JoinHandle<()> {
    serve_fakes_on(listener, Routes::new(registry_server(fake)))
}

/// A fake registry on a fresh port.
async fn start_registry(fake: FakeRegistry) -> (String, JoinHandle<()>) {
    serve_fakes(Routes::new(registry_server(fake))).await.unwrap()
}

// ---------------------------------------------------------------- fake station

/// A station that records the producer's notices, answering the first `unavailable` of them
/// UNAVAILABLE (a station restarting).
#[derive(Clone, Default)]
struct FakeStation {
    notices: Arc<Mutex<Vec<pb::NotifyOrderDispatchedRequest>>>,
    unavailable: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl IntakeFake for FakeStation {
    async fn notify_order_dispatched(
        &self,
        request: tonic::Request<pb::NotifyOrderDispatchedRequest>,
    ) -> Result<tonic::Response<pb::NotifyOrderDispatchedResponse>, Status> {
        self.notices.lock().unwrap().push(request.into_inner());
        let left = self.unavailable.load(Ordering::SeqCst);
        if left > 0 {
            self.unavailable.store(left - 1, Ordering::SeqCst);
            return Err(Status::unavailable("station restarting"));
        }
        let state = pb::ApplicationState::ReadyForCollection as i32;
        Ok(tonic::Response::new(pb::NotifyOrderDispatchedResponse { state }))
    }
}

/// A producer whose registry (a fake) answers every registration.
async fn producer_and_registry() -> (Producer, JoinHandle<()>) {
    let (endpoint, registry) = start_registry(FakeRegistry::default()).await;
    (Producer::start(Options::new(&endpoint)).await, registry)
}

// ---------------------------------------------------------------- the producer under test

struct Producer {
    _dir: TempDir,
    database_url: String,
    jiangxi: SigningKey,
    sichuan: SigningKey,
    client: IssuanceClient<Channel>,
    bureau: Option<Bureau>,
}

struct Options {
    registry_endpoint: String,
    delay_ms: u64,
    /// Backoff between registration attempts (with jitter: half to all of it).
    retry_interval_ms: u64,
    /// Default: an SQLite file in the temp dir.
    database_url: Option<String>,
    /// Where the station is served; by default it has no endpoint (its notices are never delivered).
    station_endpoint: Option<String>,
    /// The directory lists the registry at a closed port too, first: a replica that is down.
    registry_replica_down: bool,
}

impl Options {
    fn new(registry_endpoint: &str) -> Self {
        Self {
            registry_endpoint: registry_endpoint.to_owned(),
            delay_ms: 50,
            retry_interval_ms: 100,
            database_url: None,
            station_endpoint: None,
            registry_replica_down: false,
        }
    }
}

fn key_valid_from() -> DateTime<Utc> {
    now() - chrono::Duration::days(30)
}

impl Producer {
    async fn start(options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jiangxi = generate_signing_key();
        let sichuan = generate_signing_key();
        let mut directory = DirectoryBuilder::new().bureau("station-hangzhou", Role::Intake);
        if let Some(endpoint) = &options.station_endpoint {
            directory = directory.endpoint(endpoint.clone());
        }
        let directory_path = directory
            .bureau("home-jiangxi", Role::Verification)
            .jurisdiction(&["36"])
            .key("k1", &jiangxi, key_valid_from())
            .bureau("home-sichuan", Role::Verification)
            .jurisdiction(&["51"])
            .key("k1", &sichuan, key_valid_from())
            .bureau(PRODUCER, Role::Issuance)
            .bureau("producer-other", Role::Issuance)
            .bureau("registry-national", Role::Registry)
            .endpoints(
                options
                    .registry_replica_down
                    .then(yidi_testkit::bureau::closed_endpoint)
                    .into_iter()
                    .chain([options.registry_endpoint.clone()]),
            )
            .write_into(dir.path())
            .unwrap();
        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("issuance.db").display()));
        let mut producer = Self {
            _dir: dir,
            database_url,
            jiangxi,
            sichuan,
            client: IssuanceClient::new(Channel::from_static("http://127.0.0.1:1").connect_lazy()),
            bureau: None,
        };
        producer.launch(&options, directory_path).await;
        producer
    }

    async fn launch(&mut self, options: &Options, directory_path: PathBuf) {
        let config = IssuanceConfig {
            server: ServerConfig {
                shutdown_grace_seconds: 2,
                ..ServerConfig::new(PRODUCER, "127.0.0.1:0".parse().unwrap())
            },
            database: DatabaseConfig { url: self.database_url.clone(), max_connections: 4 },
            directory: DirectoryConfig::new(directory_path),
            clock: ClockConfig::fixed_at(now()),
            log: LogConfig::default(),
            tls: TlsConfig { plaintext: true, ..TlsConfig::default() },
            idempotency: Default::default(),
            production: ProductionConfig { delay_ms: options.delay_ms, serial_prefix: "ZJ".into() },
            outbox: OutboxConfig {
                backoff_initial_ms: options.retry_interval_ms,
                backoff_max_ms: options.retry_interval_ms,
                poll_ms: 20,
                ..OutboxConfig::default()
            },
        };
        let bureau =
            Bureau::start(|listener, shutdown| yidi_issuance::serve(config, listener, shutdown)).await.unwrap();
        self.client = IssuanceClient::new(bureau.channel());
        self.bureau = Some(bureau);
    }

    async fn shutdown(&mut self) {
        if let Some(bureau) = self.bureau.take() {
            bureau.stop().await.unwrap();
        }
    }

    fn decision(&self, id: &str) -> Decision {
        let birth = NaiveDate::from_ymd_opt(1990, 3, 7).unwrap();
        let id_number = IdNumber::compose("360102", birth, 124);
        Decision {
            decision_id: id.into(),
            purpose: DecisionPurpose::IssueCard,
            bureau_id: "home-jiangxi".into(),
            key_id: "k1".into(),
            addressee_id: PRODUCER.into(),
            application_id: uuid::Uuid::new_v4().to_string(),
            station_id: "station-hangzhou".into(),
            application_kind: Some(ApplicationKind::Replacement),
            card: CardData {
                holder: Particulars {
                    id_number: id_number.as_str().into(),
                    name: "Li Na".into(),
                    sex: id_number.sex(),
                    birth_date: birth,
                    registration_province: "36".into(),
                    address: "12 Bayi Avenue, Nanchang".into(),
                },
                face_template: vec![7, 1, 8, 2, 8],
                // Deliberately not today (the clock's date): the producer must print these, not recompute.
                valid_from: NaiveDate::from_ymd_opt(2118, 2, 27).unwrap(),
                valid_until: Some(NaiveDate::from_ymd_opt(2138, 2, 27).unwrap()),
            },
            previous_card_serial: "ZJ0000000001".into(),
            issued_at: now() - chrono::Duration::minutes(1),
            expires_at: now() + chrono::Duration::days(7),
            transfer_to_bureau_id: String::new(),
        }
    }

    fn signed(&self, id: &str) -> SignedDecision {
        self.decision(id).sign(&self.jiangxi)
    }

    async fn place(&mut self, decision: pb::SignedDecision) -> Result<pb::Order, Status> {
        let response = self
            .client
            .place_order(pb::PlaceOrderRequest { decision: Some(decision), request_id: String::new() })
            .await?;
        Ok(response.into_inner().order.expect("order"))
    }

    async fn get(&mut self, decision_id: &str) -> Result<pb::Order, Status> {
        let request =
            pb::GetOrderRequest { order_id: String::new(), decision_id: decision_id.into(), station_id: String::new() };
        Ok(self.client.get_order(request).await?.into_inner().order.expect("order"))
    }

    async fn db(&self) -> DatabaseConnection {
        Database::connect(&self.database_url).await.unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        let db = self.db().await;
        let row =
            db.query_one_raw(Statement::from_string(db.get_database_backend(), sql.to_owned())).await.unwrap().unwrap();
        let n = row.try_get::<i64>("", "n").unwrap();
        db.close().await.unwrap();
        n
    }

    /// Every state the order passes through, from WatchOrder, until the stream ends.
    async fn watch_to_end(&mut self, order_id: &str) -> Vec<pb::Order> {
        let mut stream = self
            .client
            .watch_order(pb::WatchOrderRequest { order_id: order_id.into(), station_id: String::new() })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        tokio::time::timeout(WAIT, async {
            while let Some(message) = stream.next().await {
                seen.push(message.unwrap().order.unwrap());
            }
        })
        .await
        .expect("the watch ends once the order is dispatched");
        seen
    }

    async fn wait_for(&mut self, decision_id: &str, done: impl Fn(&pb::Order) -> bool) -> pb::Order {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let order = self.get(decision_id).await.unwrap();
            if done(&order) {
                return order;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out; last seen {order:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn reason(status: &Status) -> String {
    status.get_error_details().error_info().map(|info| info.reason.clone()).unwrap_or_default()
}

/// A refused decision: the code and reason, one audit row, no order.
async fn assert_refused(producer: &mut Producer, decision: pb::SignedDecision, code: Code, expected_reason: &str) {
    let decision_id = decision.decision.as_ref().unwrap().decision_id.clone();
    let status = producer.place(decision).await.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected_reason, "{status:?}");
    assert_eq!(producer.get(&decision_id).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM orders").await, 0);
    assert_eq!(
        producer
            .count(&format!(
                "SELECT COUNT(*) AS n FROM audit_log WHERE action = 'place_order' AND outcome = '{}'",
                expected_reason.to_lowercase()
            ))
            .await,
        1
    );
}

/// The fields named by a status's `BadRequest` violations.
fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn state(order: &pb::Order) -> pb::OrderState {
    pb::OrderState::try_from(order.state).unwrap()
}

// ---------------------------------------------------------------- S4 refusals

#[tokio::test]
async fn s4_issuance_refuses_unsigned_decision() {
    let (mut producer, _registry) = producer_and_registry().await;
    let mut decision = signed_decision_to_proto(&producer.signed("d-unsigned"));
    decision.signature.clear();
    assert_refused(&mut producer, decision, Code::InvalidArgument, "DECISION_UNSIGNED").await;
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_refuses_tampered_decision() {
    let (mut producer, _registry) = producer_and_registry().await;
    let mut decision = signed_decision_to_proto(&producer.signed("d-tampered"));
    decision.decision.as_mut().unwrap().card.as_mut().unwrap().name = "Someone Else".into();
    assert_refused(&mut producer, decision, Code::InvalidArgument, "DECISION_BAD_SIGNATURE").await;
    // A decision signed with a key that is not the named bureau's is the same forgery.
    let forged = signed_decision_to_proto(&producer.decision("d-forged").sign(&generate_signing_key()));
    let status = producer.place(forged).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "DECISION_BAD_SIGNATURE");
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_refuses_wrong_jurisdiction() {
    let (mut producer, _registry) = producer_and_registry().await;
    // Sichuan's bureau, with its own genuine key, signs for a citizen registered in Jiangxi.
    let mut decision = producer.decision("d-jurisdiction");
    decision.bureau_id = "home-sichuan".into();
    let signed = decision.sign(&producer.sichuan);
    assert_refused(
        &mut producer,
        signed_decision_to_proto(&signed),
        Code::FailedPrecondition,
        "DECISION_WRONG_JURISDICTION",
    )
    .await;
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_refuses_misaddressed_decision() {
    let (mut producer, _registry) = producer_and_registry().await;
    let mut decision = producer.decision("d-misaddressed");
    decision.addressee_id = "producer-other".into();
    let signed = decision.sign(&producer.jiangxi);
    assert_refused(&mut producer, signed_decision_to_proto(&signed), Code::FailedPrecondition, "DECISION_MISADDRESSED")
        .await;
    // A decision for another purpose is not an order either.
    let mut loss = producer.decision("d-loss");
    loss.purpose = DecisionPurpose::ReportLoss;
    let status = producer.place(signed_decision_to_proto(&loss.sign(&producer.jiangxi))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "DECISION_WRONG_PURPOSE");
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_refuses_expired_decision() {
    let (mut producer, _registry) = producer_and_registry().await;
    let mut decision = producer.decision("d-expired");
    decision.issued_at = now() - chrono::Duration::days(8);
    decision.expires_at = now() - chrono::Duration::seconds(1);
    let signed = decision.sign(&producer.jiangxi);
    assert_refused(&mut producer, signed_decision_to_proto(&signed), Code::FailedPrecondition, "DECISION_EXPIRED")
        .await;
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_refuses_replayed_decision() {
    let (mut producer, _registry) = producer_and_registry().await;
    let decision = signed_decision_to_proto(&producer.signed("d-replayed"));
    let first = producer.place(decision.clone()).await.unwrap();
    let status = producer.place(decision).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(reason(&status), "DECISION_ALREADY_USED");
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM orders").await, 1);
    assert_eq!(producer.get("d-replayed").await.unwrap().order_id, first.order_id);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log WHERE outcome = 'decision_already_used'").await, 1);
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_rejects_malformed_requests_with_field_violations() {
    let (mut producer, _registry) = producer_and_registry().await;
    let status = producer
        .client
        .place_order(pb::PlaceOrderRequest { decision: None, request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = violated_fields(&status);
    assert_eq!(fields, vec!["decision".to_owned()]);

    let mut decision = signed_decision_to_proto(&producer.signed("d-malformed"));
    {
        let inner = decision.decision.as_mut().unwrap();
        inner.card.as_mut().unwrap().valid_from = "27/02/2118".into();
        inner.expires_at = None;
    }
    let status = producer.place(decision).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = violated_fields(&status);
    assert!(fields.contains(&"decision.decision.card.valid_from".to_owned()), "{fields:?}");
    assert!(fields.contains(&"decision.decision.expires_at".to_owned()), "{fields:?}");

    let both = pb::GetOrderRequest {
        order_id: uuid::Uuid::new_v4().to_string(),
        decision_id: "d".into(),
        station_id: String::new(),
    };
    assert_eq!(producer.client.get_order(both).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        producer.client.get_order(pb::GetOrderRequest::default()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let unknown = pb::GetOrderRequest {
        order_id: uuid::Uuid::new_v4().to_string(),
        decision_id: String::new(),
        station_id: String::new(),
    };
    assert_eq!(producer.client.get_order(unknown).await.unwrap_err().code(), Code::NotFound);
    let bad_watch = pb::WatchOrderRequest { order_id: "nope".into(), station_id: String::new() };
    assert_eq!(producer.client.watch_order(bad_watch).await.unwrap_err().code(), Code::InvalidArgument);
    // Invalid input writes nothing, not even an audit row.
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM orders").await, 0);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log").await, 0);
    producer.shutdown().await;
}

// ---------------------------------------------------------------- production

#[tokio::test]
async fn s4_issuance_order_is_registered_and_dispatched() {
    let fake = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    let mut producer = Producer::start(Options { delay_ms: 300, ..Options::new(&endpoint) }).await;
    let signed = producer.signed("d-happy");
    let placed = producer.place(signed_decision_to_proto(&signed)).await.unwrap();
    assert_eq!(state(&placed), pb::OrderState::InProduction);
    assert!(placed.card_serial.starts_with("ZJ") && placed.card_serial.len() == 12, "{}", placed.card_serial);
    assert_eq!(placed.id_number_masked, mask_id_number(&signed.decision.card.holder.id_number));
    assert_ne!(placed.id_number_masked, signed.decision.card.holder.id_number);
    assert_eq!(placed.station_id, "station-hangzhou");
    assert_eq!(placed.application_id, signed.decision.application_id);

    let states: Vec<pb::OrderState> = producer.watch_to_end(&placed.order_id).await.iter().map(state).collect();
    assert_eq!(states, vec![pb::OrderState::InProduction, pb::OrderState::Registered, pb::OrderState::Dispatched]);
    let order = producer.get("d-happy").await.unwrap();
    assert_eq!(state(&order), pb::OrderState::Dispatched);
    assert_eq!(order.last_error, "");
    assert_eq!(fake.calls().len(), 1);
    // Watching a dispatched order: its state, then the end.
    let again = producer.watch_to_end(&placed.order_id).await;
    assert_eq!(again.iter().map(state).collect::<Vec<_>>(), vec![pb::OrderState::Dispatched]);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'dispatch'").await, 1);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'register_card'").await, 1);
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_tells_the_station_once_the_card_is_dispatched_until_it_answers() {
    let registry = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(registry.clone()).await;
    let station = FakeStation::default();
    station.unavailable.store(2, Ordering::SeqCst);
    let (station_endpoint, _station) = serve_fakes(Routes::new(intake_server(station.clone()))).await.unwrap();
    let options = Options { delay_ms: 0, station_endpoint: Some(station_endpoint), ..Options::new(&endpoint) };
    let mut producer = Producer::start(options).await;
    let placed = producer.place(signed_decision_to_proto(&producer.signed("d-told"))).await.unwrap();
    let mut told = Vec::new();
    for _ in 0..300 {
        told = station.notices.lock().unwrap().clone();
        if told.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Twice refused (the station restarting), told again until it answered.
    assert_eq!(told.len(), 3, "{told:?}");
    let expected = pb::NotifyOrderDispatchedRequest {
        application_id: placed.application_id.clone(),
        order_id: placed.order_id.clone(),
        card_serial: placed.card_serial.clone(),
        producer_id: PRODUCER.into(),
        request_id: String::new(),
    };
    assert!(told.iter().all(|notice| notice == &expected), "{told:?}");
    assert_eq!(state(&producer.get("d-told").await.unwrap()), pb::OrderState::Dispatched);
    // Registered and dispatched once, whatever the notices cost.
    assert_eq!(registry.calls().len(), 1);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'dispatch'").await, 1);
    let delivered = "SELECT COUNT(*) AS n FROM outbox_messages WHERE state = 'delivered'";
    for _ in 0..100 {
        if producer.count(delivered).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(producer.count(delivered).await, 1, "the message is settled once the station answered");
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_keeps_card_data_verbatim() {
    let fake = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    let mut producer = Producer::start(Options::new(&endpoint)).await;
    let signed = producer.signed("d-verbatim");
    let sent = signed_decision_to_proto(&signed);
    let placed = producer.place(sent.clone()).await.unwrap();
    // C1 is the home bureau's: the validity printed is the decision's, not recomputed for today.
    assert_eq!(placed.valid_from, "2118-02-27");
    assert_eq!(placed.valid_until, "2138-02-27");
    producer.wait_for("d-verbatim", |o| state(o) == pb::OrderState::Dispatched).await;

    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    let registered = &calls[0];
    assert_eq!(registered.producer_id, PRODUCER);
    assert_eq!(registered.card_serial, placed.card_serial);
    // The registered card carries exactly the decision's data, signature included.
    assert_eq!(registered.decision.as_ref(), Some(&sent));
    let back = yidi_grpc::convert::signed_decision_from_proto("decision", registered.decision.as_ref()).unwrap();
    assert_eq!(back, signed);
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_retries_registration_until_the_registry_answers() {
    // A port with nobody listening yet.
    let reserved = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let mut producer = Producer::start(Options::new(&format!("http://{address}"))).await;
    let placed = producer.place(signed_decision_to_proto(&producer.signed("d-retry"))).await.unwrap();
    let failing = producer.wait_for("d-retry", |o| !o.last_error.is_empty()).await;
    assert_eq!(state(&failing), pb::OrderState::InProduction);
    assert!(failing.last_error.contains("registry-national"), "{}", failing.last_error);
    // Let it fail a few more times, then bring the registry up on that port.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fake = FakeRegistry::default();
    let _registry = spawn_registry(TcpListener::bind(address).await.unwrap(), fake.clone());
    let done = producer.wait_for("d-retry", |o| state(o) == pb::OrderState::Dispatched).await;
    assert_eq!(done.order_id, placed.order_id);
    assert_eq!(done.last_error, "");
    assert_eq!(fake.calls().len(), 1);
    assert!(producer.count("SELECT attempts AS n FROM orders").await >= 3, "failed attempts are counted");
    producer.shutdown().await;
}

/// Issue 15 point 4: the registry listed at two endpoints, the first one down: the registration
/// (keyed) fails over within its call, with no failed attempt on the order.
#[tokio::test]
async fn a_registration_fails_over_to_the_registry_replica_that_is_up() {
    let fake = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    let mut producer = Producer::start(Options { registry_replica_down: true, ..Options::new(&endpoint) }).await;
    producer.place(signed_decision_to_proto(&producer.signed("d-failover"))).await.unwrap();
    let done = producer.wait_for("d-failover", |o| state(o) == pb::OrderState::Dispatched).await;
    assert_eq!(done.last_error, "");
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(producer.count("SELECT attempts AS n FROM orders").await, 1, "one attempt, which succeeded");
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_stops_retrying_when_the_registry_refuses() {
    let fake = FakeRegistry { refuse: Some(Code::PermissionDenied), ..FakeRegistry::default() };
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    let mut producer = Producer::start(Options::new(&endpoint)).await;
    producer.place(signed_decision_to_proto(&producer.signed("d-refused"))).await.unwrap();
    let refused = producer.wait_for("d-refused", |o| !o.last_error.is_empty()).await;
    assert_eq!(state(&refused), pb::OrderState::InProduction);
    assert!(refused.last_error.contains("PermissionDenied"), "{}", refused.last_error);
    // Several retry intervals later, still exactly one call.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(state(&producer.get("d-refused").await.unwrap()), pb::OrderState::InProduction);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log WHERE outcome = 'refused_by_registry'").await, 1);
    producer.shutdown().await;
}

#[tokio::test]
async fn s4_issuance_orders_survive_a_restart() {
    let fake = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    // Long production: the service stops before the card is made.
    let options = Options { delay_ms: 60_000, ..Options::new(&endpoint) };
    let mut producer = Producer::start(options).await;
    let placed = producer.place(signed_decision_to_proto(&producer.signed("d-restart"))).await.unwrap();
    producer.shutdown().await;
    assert!(fake.calls().is_empty());

    let directory_path = producer._dir.path().join("directory.toml");
    producer.launch(&Options { delay_ms: 50, ..Options::new(&endpoint) }, directory_path).await;
    let done = producer.wait_for("d-restart", |o| state(o) == pb::OrderState::Dispatched).await;
    assert_eq!(done.order_id, placed.order_id);
    assert_eq!(done.card_serial, placed.card_serial);
    // Still single-use after the restart.
    let replay = producer.place(signed_decision_to_proto(&producer.signed("d-restart"))).await.unwrap_err();
    assert_eq!(replay.code(), Code::AlreadyExists);
    producer.shutdown().await;
}

/// The same rules on PostgreSQL, in a scratch database of the test server (see
/// `yidi_testkit`: skipped when unreachable, unless `YIDI_REQUIRE_POSTGRES=1`).
#[tokio::test]
async fn s4_issuance_works_on_postgresql() {
    let Some(scratch) = postgres_for_tests("issuance").await.unwrap() else { return };
    let fake = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    let options = Options { database_url: Some(scratch.url().to_owned()), ..Options::new(&endpoint) };
    let mut producer = Producer::start(options).await;
    let sent = signed_decision_to_proto(&producer.signed("d-postgres"));
    let placed = producer.place(sent.clone()).await.unwrap();
    let states: Vec<pb::OrderState> = producer.watch_to_end(&placed.order_id).await.iter().map(state).collect();
    assert_eq!(states.last(), Some(&pb::OrderState::Dispatched));
    assert_eq!(fake.calls()[0].decision.as_ref(), Some(&sent));
    let replay = producer.place(sent).await.unwrap_err();
    assert_eq!(replay.code(), Code::AlreadyExists);
    let mut expired = producer.decision("d-postgres-expired");
    expired.expires_at = now() - chrono::Duration::seconds(1);
    let expired = signed_decision_to_proto(&expired.sign(&producer.jiangxi));
    assert_eq!(producer.place(expired).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM orders").await, 1);
    assert_eq!(producer.count("SELECT COUNT(*) AS n FROM audit_log").await, 5);
    producer.shutdown().await;
    scratch.drop().await.unwrap();
}

/// Two replicas of the producer on one PostgreSQL database (SQLite is one file per process): a
/// WatchOrder held at one replica sees the dispatch committed by the other's outbox worker, which
/// is published only in that other process, because the watch re-reads its order.
#[tokio::test]
async fn a_watch_at_one_replica_sees_the_dispatch_made_by_the_other() {
    let Some(scratch) = postgres_for_tests("issuance_replicas").await.unwrap() else { return };
    let (endpoint, _registry) = start_registry(FakeRegistry::default()).await;
    // The watched replica cannot make the card: its production is long and its directory lists the
    // registry at a closed port, so only the other replica can dispatch.
    let watched = Options {
        delay_ms: 60_000,
        database_url: Some(scratch.url().to_owned()),
        ..Options::new(&yidi_testkit::bureau::closed_endpoint())
    };
    let mut watched = Producer::start(watched).await;
    let placed = watched.place(signed_decision_to_proto(&watched.signed("d-replicas"))).await.unwrap();
    let watch = tokio::spawn({
        let mut watched_client = watched.client.clone();
        let order_id = placed.order_id.clone();
        async move {
            let request = pb::WatchOrderRequest { order_id, station_id: String::new() };
            let mut stream = watched_client.watch_order(request).await.unwrap().into_inner();
            let mut seen = Vec::new();
            while let Some(message) = stream.next().await {
                seen.push(state(&message.unwrap().order.unwrap()));
            }
            seen
        }
    });
    // Started with a short production time, the other replica brings the order's message forward.
    let other = Options { delay_ms: 50, database_url: Some(scratch.url().to_owned()), ..Options::new(&endpoint) };
    let mut other = Producer::start(other).await;
    let seen = tokio::time::timeout(WAIT, watch).await.expect("the watch ends once the card is dispatched").unwrap();
    assert_eq!(seen.first(), Some(&pb::OrderState::InProduction));
    assert_eq!(seen.last(), Some(&pb::OrderState::Dispatched));
    assert_eq!(watched.count("SELECT COUNT(*) AS n FROM orders").await, 1);
    other.shutdown().await;
    watched.shutdown().await;
    scratch.drop().await.unwrap();
}

/// Start-up fails, naming the key, when the directory has no registry or this bureau is no producer.
#[tokio::test]
async fn s4_issuance_refuses_to_start_with_a_wrong_directory() {
    let dir = tempfile::tempdir().unwrap();
    let key = generate_signing_key();
    let cases = [
        (
            "directory.path",
            DirectoryBuilder::new()
                .bureau("home-jiangxi", Role::Verification)
                .jurisdiction(&["36"])
                .key("k1", &key, key_valid_from())
                .bureau(PRODUCER, Role::Issuance),
        ),
        (
            "directory.path",
            DirectoryBuilder::new()
                .bureau(PRODUCER, Role::Issuance)
                .bureau("registry-a", Role::Registry)
                .bureau("registry-b", Role::Registry),
        ),
        (
            "server.bureau_id",
            DirectoryBuilder::new().bureau(PRODUCER, Role::Intake).bureau("registry-national", Role::Registry),
        ),
    ];
    for (index, (key_name, directory)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("directory-{index}.toml"));
        directory.build().write(&path).unwrap();
        let config = IssuanceConfig {
            server: ServerConfig {
                shutdown_grace_seconds: 1,
                ..ServerConfig::new(PRODUCER, "127.0.0.1:0".parse().unwrap())
            },
            database: DatabaseConfig {
                url: format!("sqlite://{}?mode=rwc", dir.path().join(format!("db-{index}.db")).display()),
                max_connections: 2,
            },
            directory: DirectoryConfig::new(path),
            clock: ClockConfig::default(),
            log: LogConfig::default(),
            tls: TlsConfig { plaintext: true, ..TlsConfig::default() },
            idempotency: Default::default(),
            production: ProductionConfig::default(),
            outbox: OutboxConfig::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = tokio::time::timeout(WAIT, yidi_issuance::serve(config, listener, std::future::pending())).await;
        let error = result.expect("start-up fails at once").unwrap_err().to_string();
        assert!(error.contains(key_name), "case {index}: {error}");
    }
}

#[tokio::test]
async fn s4_one_station_is_refused_another_stations_order() {
    let fake = FakeRegistry::default();
    let (endpoint, _registry) = start_registry(fake.clone()).await;
    let mut producer = Producer::start(Options::new(&endpoint)).await;
    let placed = producer.place(signed_decision_to_proto(&producer.signed("d-own"))).await.unwrap();
    assert_eq!(placed.station_id, "station-hangzhou");
    let ask = |station: &str| pb::GetOrderRequest {
        order_id: placed.order_id.clone(),
        decision_id: String::new(),
        station_id: station.into(),
    };
    // The station that placed it sees it; another station is refused, by order id or by decision.
    assert_eq!(producer.client.get_order(ask("station-hangzhou")).await.unwrap().into_inner().order.unwrap(), placed);
    let status = producer.client.get_order(ask("station-ningbo")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "ORDER_OF_ANOTHER_STATION");
    let by_decision = pb::GetOrderRequest {
        order_id: String::new(),
        decision_id: "d-own".into(),
        station_id: "station-ningbo".into(),
    };
    assert_eq!(reason(&producer.client.get_order(by_decision).await.unwrap_err()), "ORDER_OF_ANOTHER_STATION");
    let watch = pb::WatchOrderRequest { order_id: placed.order_id.clone(), station_id: "station-ningbo".into() };
    assert_eq!(reason(&producer.client.watch_order(watch).await.unwrap_err()), "ORDER_OF_ANOTHER_STATION");
    producer.shutdown().await;
}
