//! In-process gRPC tests of the intake station: the real server on an SQLite temp file, with small
//! fake peers (home bureaus, registry, producer) in one tonic server.
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, NaiveDate, Utc};
use ed25519_dalek::SigningKey;
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, service::Routes, transport::Channel};
use tonic_types::StatusExt;
use yidi_domain::{
    ApplicationKind, CardData, Decision, DecisionPurpose, IdNumber, Particulars, RefusalReason, Role, Sex,
    biometrics::with_sensor_noise,
};
use yidi_grpc::{ApiError, convert::signed_decision_to_proto};
use yidi_intake::config::IntakeConfig;
use yidi_proto::v1 as pb;
use yidi_proto::v1::intake_client::IntakeClient;
use yidi_testkit::{
    Bureau, DirectoryBuilder,
    bureau::closed_endpoint,
    fake::{RegistryFake, registry_server, serve_fakes},
    postgres_for_tests,
};

const STATION: &str = "station-hangzhou";
const PRODUCER: &str = "producer-zhejiang";
const REGISTRY: &str = "registry-national";
/// Serial for which the fake registry refuses a withdrawal (a replacement was made).
const FINAL_SERIAL: &str = "CARD-FINAL";

fn register_face() -> Vec<u8> {
    (0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 9) as u8).collect()
}

fn register_fingerprint() -> Vec<u8> {
    (0..64u32).map(|i| (i.wrapping_mul(40503) >> 3) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Fake peers

#[derive(Default)]
struct FakeState {
    refusal: Mutex<Option<pb::RefusalReason>>,
    hold_verify: AtomicBool,
    /// Verify answers this status instead of an answer.
    verify_error: Mutex<Option<Code>>,
    /// While set, PlaceOrder and ReportLoss do not answer.
    hold_order: AtomicBool,
    /// The producer's `last_error` on every order it answers.
    order_error: Mutex<String>,
    hold_loss: AtomicBool,
    place_order_calls: AtomicUsize,
    get_order_calls: AtomicUsize,
    report_loss_calls: AtomicUsize,
    release_verify: Notify,
    dispatched: AtomicBool,
    verify_calls: AtomicUsize,
    loss_reports: Mutex<Vec<String>>,
    orders: Mutex<Vec<String>>,
    closed: Mutex<Vec<(String, i32, String)>>,
    /// `declared_province` of every Verify request received.
    verify_provinces: Mutex<Vec<String>>,
    /// `station_id` of every CloseApplication request received.
    close_stations: Mutex<Vec<String>>,
    /// (station_id, id_number, card_serial) of every RecordCollection request received.
    collections: Mutex<Vec<(String, String, String)>>,
    now: Mutex<Option<DateTime<Utc>>>,
}

#[derive(Clone)]
struct Fakes {
    state: Arc<FakeState>,
    key: Arc<SigningKey>,
}

impl Fakes {
    fn decision(&self, request: &pb::VerifyRequest, purpose: DecisionPurpose, addressee: &str) -> pb::SignedDecision {
        let now = self.state.now.lock().unwrap().unwrap_or_else(Utc::now);
        let today = yidi_runtime::Clock::fixed(now).today();
        let id = IdNumber::parse(&request.id_number, today).unwrap();
        let decision = Decision {
            decision_id: format!("{}-{}", request.application_id, purpose.as_str()),
            purpose,
            bureau_id: "home-jiangxi".into(),
            key_id: "k1".into(),
            addressee_id: addressee.into(),
            application_id: request.application_id.clone(),
            station_id: request.station_id.clone(),
            application_kind: pb::ApplicationKind::try_from(request.kind)
                .ok()
                .and_then(yidi_grpc::convert::kind_from_proto),
            card: CardData {
                holder: Particulars {
                    id_number: request.id_number.clone(),
                    name: "Li Na".into(),
                    sex: Sex::Female,
                    birth_date: id.birth_date(),
                    registration_province: id.province_code().into(),
                    address: "Nanchang".into(),
                },
                face_template: register_face(),
                valid_from: today,
                valid_until: None,
            },
            previous_card_serial: request.card_serial.clone(),
            issued_at: now,
            expires_at: now + chrono::Duration::days(7),
            transfer_to_bureau_id: String::new(),
        };
        signed_decision_to_proto(&decision.sign(&self.key))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::verification_server::Verification for Fakes {
    async fn verify(&self, request: Request<pb::VerifyRequest>) -> Result<Response<pb::VerifyResponse>, Status> {
        let request = request.into_inner();
        self.state.verify_calls.fetch_add(1, Ordering::SeqCst);
        self.state.verify_provinces.lock().unwrap().push(request.declared_province.clone());
        if self.state.hold_verify.load(Ordering::SeqCst) {
            self.state.release_verify.notified().await;
        }
        if let Some(code) = *self.state.verify_error.lock().unwrap() {
            return Err(Status::new(code, "fake failure"));
        }
        if let Some(reason) = *self.state.refusal.lock().unwrap() {
            return Ok(Response::new(pb::VerifyResponse { refusal_reason: reason as i32, ..Default::default() }));
        }
        let response = match pb::DecisionPurpose::try_from(request.purpose) {
            Ok(pb::DecisionPurpose::IssueCard) => pb::VerifyResponse {
                decision: Some(self.decision(&request, DecisionPurpose::IssueCard, &request.producer_id)),
                // As the real home bureau: a first card (no card named, K4 at home) has no loss decision.
                loss_decision: (request.kind == pb::ApplicationKind::Replacement as i32
                    && !request.card_serial.is_empty())
                .then(|| self.decision(&request, DecisionPurpose::ReportLoss, REGISTRY)),
                refusal_reason: 0,
            },
            Ok(pb::DecisionPurpose::ReportLoss) => pb::VerifyResponse {
                decision: Some(self.decision(&request, DecisionPurpose::ReportLoss, REGISTRY)),
                ..Default::default()
            },
            Ok(pb::DecisionPurpose::WithdrawLossReport) => pb::VerifyResponse {
                decision: Some(self.decision(&request, DecisionPurpose::WithdrawLossReport, REGISTRY)),
                ..Default::default()
            },
            _ => return Err(Status::invalid_argument("purpose")),
        };
        Ok(Response::new(response))
    }

    async fn get_citizen(&self, _: Request<pb::GetCitizenRequest>) -> Result<Response<pb::GetCitizenResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn record_death(
        &self,
        _: Request<pb::RecordDeathRequest>,
    ) -> Result<Response<pb::RecordDeathResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn record_credit_status(
        &self,
        _: Request<pb::RecordCreditStatusRequest>,
    ) -> Result<Response<pb::RecordCreditStatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn transfer_registration(
        &self,
        _: Request<pb::TransferRegistrationRequest>,
    ) -> Result<Response<pb::TransferRegistrationResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn close_application(
        &self,
        request: Request<pb::CloseApplicationRequest>,
    ) -> Result<Response<pb::CloseApplicationResponse>, Status> {
        let r = request.into_inner();
        self.state.close_stations.lock().unwrap().push(r.station_id.clone());
        self.state.closed.lock().unwrap().push((r.application_id, r.final_state, r.new_card_serial));
        Ok(Response::new(pb::CloseApplicationResponse { closed: true }))
    }
}

fn serial_of(decision: &Option<pb::SignedDecision>) -> String {
    decision.as_ref().and_then(|d| d.decision.as_ref()).map(|d| d.previous_card_serial.clone()).unwrap_or_default()
}

#[tonic::async_trait]
impl RegistryFake for Fakes {
    async fn report_loss(
        &self,
        request: pb::LossRegistryReportLossRequest,
    ) -> Result<pb::LossRegistryReportLossResponse, Status> {
        self.state.report_loss_calls.fetch_add(1, Ordering::SeqCst);
        while self.state.hold_loss.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let serial = serial_of(&request.decision);
        self.state.loss_reports.lock().unwrap().push(serial.clone());
        Ok(pb::LossRegistryReportLossResponse {
            card_serial: serial,
            status: pb::CardStatus::ReportedLost as i32,
            changed_at: None,
            already_reported: false,
        })
    }

    async fn withdraw_loss_report(
        &self,
        request: pb::LossRegistryWithdrawLossReportRequest,
    ) -> Result<pb::LossRegistryWithdrawLossReportResponse, Status> {
        let serial = serial_of(&request.decision);
        if serial == FINAL_SERIAL {
            return Err(ApiError::Refused(RefusalReason::LossReportFinal).into());
        }
        Ok(pb::LossRegistryWithdrawLossReportResponse {
            card_serial: serial,
            status: pb::CardStatus::Valid as i32,
            changed_at: None,
        })
    }

    async fn record_collection(
        &self,
        request: pb::RecordCollectionRequest,
    ) -> Result<pb::RecordCollectionResponse, Status> {
        let mut collections = self.state.collections.lock().unwrap();
        let already_recorded = collections.iter().any(|c| c.2 == request.card_serial);
        collections.push((request.station_id, request.id_number, request.card_serial.clone()));
        Ok(pb::RecordCollectionResponse {
            card_serial: request.card_serial,
            status: pb::CardStatus::Valid as i32,
            revoked_card_serials: Vec::new(),
            already_recorded,
            collected_at: None,
        })
    }
}

impl Fakes {
    fn order(&self, decision_id: &str, application_id: &str) -> pb::Order {
        let state = if self.state.dispatched.load(Ordering::SeqCst) {
            pb::OrderState::Dispatched
        } else {
            pb::OrderState::InProduction
        };
        pb::Order {
            order_id: format!("00000000-0000-4000-8000-{:012}", decision_id.len()),
            decision_id: decision_id.into(),
            application_id: application_id.into(),
            station_id: STATION.into(),
            state: state as i32,
            card_serial: "NEW-0001".into(),
            last_error: self.state.order_error.lock().unwrap().clone(),
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl pb::issuance_server::Issuance for Fakes {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        self.state.place_order_calls.fetch_add(1, Ordering::SeqCst);
        while self.state.hold_order.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = request.into_inner().decision.and_then(|d| d.decision).unwrap_or_default();
        if d.purpose != pb::DecisionPurpose::IssueCard as i32 || d.addressee_id != PRODUCER {
            return Err(Status::permission_denied("not for us"));
        }
        self.state.orders.lock().unwrap().push(d.decision_id.clone());
        Ok(Response::new(pb::PlaceOrderResponse { order: Some(self.order(&d.decision_id, &d.application_id)) }))
    }

    async fn get_order(&self, request: Request<pb::GetOrderRequest>) -> Result<Response<pb::GetOrderResponse>, Status> {
        let r = request.into_inner();
        self.state.get_order_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(pb::GetOrderResponse { order: Some(self.order(&r.decision_id, "")) }))
    }

    type WatchOrderStream = BoxStream<pb::WatchOrderResponse>;

    async fn watch_order(&self, _: Request<pb::WatchOrderRequest>) -> Result<Response<Self::WatchOrderStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    client: IntakeClient<Channel>,
    fakes: Arc<FakeState>,
    bureau: Option<Bureau>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(now: &str) -> Self {
        Self::start_with(now, true).await
    }

    /// `home_reachable: false` points the home bureaus at a closed port.
    async fn start_with(now: &str, home_reachable: bool) -> Self {
        Self::start_on(now, home_reachable, None).await
    }

    /// `database_url: None` uses an SQLite file in a temporary folder.
    async fn start_on(now: &str, home_reachable: bool, database_url: Option<String>) -> Self {
        Self::start_full(now, home_reachable, database_url, "").await
    }

    /// `outbox`: more `[outbox]` settings, one a line. The fake producer never tells the station
    /// of a dispatch, so the station asks it at once (`worker.order_poll_after_ms = 0`).
    async fn start_full(now: &str, home_reachable: bool, database_url: Option<String>, outbox: &str) -> Self {
        Self::start_polling_after(now, home_reachable, database_url, outbox, 0).await
    }

    /// `order_poll_after_ms`: how long the station waits to be told before asking the producer.
    async fn start_polling_after(
        now: &str,
        home_reachable: bool,
        database_url: Option<String>,
        outbox: &str,
        order_poll_after_ms: u64,
    ) -> Self {
        Self::start_listed(now, home_reachable, database_url, outbox, order_poll_after_ms, false).await
    }

    /// Every peer listed at two endpoints, the first a closed port: a replica that is down. One
    /// attempt per outbox message: a call that did not fail over would be a dead letter.
    async fn start_with_a_replica_down(now: &str) -> Self {
        Self::start_listed(now, true, None, "max_attempts = 1", 0, true).await
    }

    async fn start_listed(
        now: &str,
        home_reachable: bool,
        database_url: Option<String>,
        outbox: &str,
        order_poll_after_ms: u64,
        a_replica_down: bool,
    ) -> Self {
        let now: DateTime<Utc> = now.parse().unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let state = Arc::new(FakeState::default());
        *state.now.lock().unwrap() = Some(now);
        let fakes = Fakes { state: state.clone(), key: Arc::new(key.clone()) };
        let (fake_endpoint, _) = serve_fakes(
            Routes::new(pb::verification_server::VerificationServer::new(fakes.clone()))
                .add_service(registry_server(fakes.clone()))
                .add_service(pb::issuance_server::IssuanceServer::new(fakes)),
        )
        .await
        .unwrap();
        let home_endpoint = if home_reachable { fake_endpoint.clone() } else { closed_endpoint() };
        let listed = |endpoint: &str| {
            let mut endpoints = vec![endpoint.to_owned()];
            if a_replica_down {
                endpoints.insert(0, closed_endpoint());
            }
            endpoints
        };
        let dir = tempfile::tempdir().unwrap();
        let directory_path = DirectoryBuilder::new()
            .bureau(STATION, Role::Intake)
            .region("330106")
            .bureau("home-jiangxi", Role::Verification)
            .jurisdiction(&["36"])
            .endpoints(listed(&home_endpoint))
            .key("k1", &key, DateTime::UNIX_EPOCH)
            .bureau("home-zhejiang", Role::Verification)
            .jurisdiction(&["33"])
            .endpoints(listed(&home_endpoint))
            .key("k1", &key, DateTime::UNIX_EPOCH)
            .bureau(PRODUCER, Role::Issuance)
            .endpoints(listed(&fake_endpoint))
            .bureau(REGISTRY, Role::Registry)
            .endpoints(listed(&fake_endpoint))
            .write_into(dir.path())
            .unwrap();
        let database_url =
            database_url.unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("intake.db").display()));
        let config_text = format!(
            r#"
[server]
bureau_id = "{STATION}"
listen = "127.0.0.1:0"
shutdown_grace_seconds = 1
[database]
url = "{}"
[directory]
path = "{}"
[tls]
plaintext = true
[clock]
fixed = "{}"
[station]
producer_id = "{PRODUCER}"
[worker]
respond_within_ms = 3000
order_poll_after_ms = {}
[outbox]
poll_ms = 20
{}
"#,
            database_url,
            directory_path.display(),
            now.to_rfc3339(),
            order_poll_after_ms,
            outbox,
        );
        let config: IntakeConfig = toml::from_str(&config_text).unwrap();
        let bureau = Bureau::start(|listener, shutdown| yidi_intake::serve(config, listener, shutdown)).await.unwrap();
        let client = IntakeClient::new(bureau.channel());
        Self { client, fakes: state, bureau: Some(bureau), _dir: dir }
    }

    async fn stop(mut self) {
        if let Some(bureau) = self.bureau.take() {
            bureau.stop().await.unwrap();
        }
    }

    async fn get(&mut self, id: &str) -> pb::Application {
        self.client
            .get_application(pb::GetApplicationRequest { application_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .application
            .unwrap()
    }

    async fn wait_for(&mut self, id: &str, what: &str, done: impl Fn(&pb::Application) -> bool) -> pb::Application {
        for _ in 0..500 {
            let application = self.get(id).await;
            if done(&application) {
                return application;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}: {:?}", self.get(id).await);
    }

    /// Submits an application the station accepts.
    async fn submitted(&mut self, request: pb::SubmitApplicationRequest) -> pb::Application {
        self.client.submit_application(request).await.unwrap().into_inner().application.unwrap()
    }

    async fn cancel(&mut self, application_id: String) -> Result<pb::Application, Status> {
        let request = pb::CancelApplicationRequest { application_id, request_id: String::new() };
        Ok(self.client.cancel_application(request).await?.into_inner().application.unwrap())
    }

    async fn collect(&mut self, id: &str, live: Option<pb::Biometrics>) -> Result<pb::Application, Status> {
        let request = pb::CollectCardRequest { application_id: id.to_owned(), live, request_id: String::new() };
        Ok(self.client.collect_card(request).await?.into_inner().application.unwrap())
    }

    async fn report_loss(&mut self, applicant: pb::Applicant, card_serial: &str) -> Result<pb::Application, Status> {
        let request = pb::ReportLossRequest {
            applicant: Some(applicant),
            card_serial: card_serial.into(),
            request_id: String::new(),
        };
        Ok(self.client.report_loss(request).await?.into_inner().application.unwrap())
    }

    /// A renewal lodged while the home bureau holds its Verify, then cancelled (VERIFYING → CANCELLED).
    async fn cancelled_while_verifying(&mut self) -> String {
        self.fakes.hold_verify.store(true, Ordering::SeqCst);
        let id = self.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
        let cancelled = self.cancel(id.clone()).await.unwrap();
        assert_eq!(cancelled.state, pb::ApplicationState::Cancelled as i32);
        id
    }

    /// Waits until nothing about the application is pending in the outbox; answers it then.
    async fn wait_drained(&mut self, id: &str) -> pb::Application {
        for _ in 0..500 {
            let request = pb::GetApplicationTimelineRequest { application_id: id.into() };
            let timeline = self.client.get_application_timeline(request).await.unwrap().into_inner();
            if timeline.deliveries.iter().all(|d| d.state != pb::OutboxMessageState::Pending as i32) {
                return timeline.application.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for the outbox to drain: {:?}", self.get(id).await);
    }

    /// The producer dispatches the card; the holder collects it (a live face close to the registered one).
    async fn dispatched_and_collected(&mut self, id: &str) -> pb::Application {
        self.fakes.dispatched.store(true, Ordering::SeqCst);
        self.wait_until_ready(id).await;
        let live = pb::Biometrics {
            face_template: with_sensor_noise(&register_face(), 5, 9),
            fingerprint_template: Vec::new(),
        };
        let collected = self.collect(id, Some(live)).await.unwrap();
        assert_eq!(collected.state, pb::ApplicationState::Collected as i32);
        collected
    }

    async fn wait_until_ready(&mut self, id: &str) -> pb::Application {
        self.wait_for(id, "ready", |a| a.state == pb::ApplicationState::ReadyForCollection as i32).await
    }

    async fn list_all(&mut self) -> Vec<pb::Application> {
        self.client.list_applications(pb::ListApplicationsRequest::default()).await.unwrap().into_inner().applications
    }
}

/// A Jiangxi citizen at the counter with the household register book.
fn jiangxi_applicant() -> pb::Applicant {
    applicant(&jiangxi_citizen(), "36", pb::DocumentKind::HouseholdRegisterBook)
}

fn jiangxi_citizen() -> String {
    IdNumber::compose("360102", NaiveDate::from_ymd_opt(1990, 3, 7).unwrap(), 124).as_str().to_owned()
}

fn zhejiang_citizen() -> String {
    IdNumber::compose("330102", NaiveDate::from_ymd_opt(1985, 5, 1).unwrap(), 31).as_str().to_owned()
}

fn applicant(id_number: &str, province: &str, document: pb::DocumentKind) -> pb::Applicant {
    pb::Applicant {
        id_number: id_number.into(),
        declared_province: province.into(),
        live: Some(pb::Biometrics {
            face_template: with_sensor_noise(&register_face(), 6, 1),
            fingerprint_template: with_sensor_noise(&register_fingerprint(), 4, 2),
        }),
        document: Some(pb::Document { kind: document as i32, number: "DOC-1".into() }),
        agent_id_number: String::new(),
    }
}

fn submit(kind: ApplicationKind, applicant: pb::Applicant) -> pb::SubmitApplicationRequest {
    pb::SubmitApplicationRequest {
        kind: yidi_grpc::convert::kind_to_proto(kind) as i32,
        applicant: Some(applicant),
        card_serial: "OLD-0001".into(),
        request_id: String::new(),
    }
}

fn reason(status: &Status) -> String {
    status.get_details_error_info().map(|info| info.reason).unwrap_or_default()
}

fn states(application: &pb::Application) -> Vec<pb::ApplicationState> {
    application.history.iter().map(|h| pb::ApplicationState::try_from(h.state).unwrap()).collect()
}

const NATIONAL: &str = "2118-01-01T09:00:00Z";

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn s2_agent_is_refused_at_the_counter() {
    let mut h = Harness::start(NATIONAL).await;
    let mut person = jiangxi_applicant();
    person.agent_id_number = zhejiang_citizen();
    let status = h.client.submit_application(submit(ApplicationKind::Replacement, person.clone())).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "REFUSAL_REASON_AGENT_NOT_ALLOWED");
    let status = h.report_loss(person, "OLD-0001").await.unwrap_err();
    assert_eq!(reason(&status), "REFUSAL_REASON_AGENT_NOT_ALLOWED");
    assert!(h.list_all().await.is_empty(), "a refusal writes no application");
    assert_eq!(h.fakes.verify_calls.load(Ordering::SeqCst), 0, "never reaches the home bureau");
    h.stop().await;
}

#[tokio::test]
async fn p0_nobody_is_accepted_outside_home_before_the_pilot() {
    let mut h = Harness::start("2115-06-01T09:00:00Z").await;
    let outsider = applicant(&jiangxi_citizen(), "36", pb::DocumentKind::WorkUnitProof);
    let status = h.client.submit_application(submit(ApplicationKind::Renewal, outsider)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "REFUSAL_REASON_NOT_ACCEPTED_HERE");
    assert!(h.list_all().await.is_empty());
    // A citizen of the station's own province is served.
    let local = applicant(&zhejiang_citizen(), "33", pb::DocumentKind::HouseholdRegisterBook);
    let application = h.submitted(submit(ApplicationKind::Renewal, local)).await;
    assert_ne!(application.state, pb::ApplicationState::Refused as i32);
    assert_eq!(application.home_bureau_id, "home-zhejiang");
    h.stop().await;
}

/// What the station answers `request` with when its clock stands at `instant`.
async fn submit_at(instant: &str, request: pb::SubmitApplicationRequest) -> Result<pb::Application, Status> {
    let mut h = Harness::start(instant).await;
    let answer = h.client.submit_application(request).await.map(|r| r.into_inner().application.unwrap());
    h.stop().await;
    answer
}

/// Asserts that `request` is accepted (and routed to `home`) at 07:30 and 08:30 in Beijing (UTC+8)
/// on `boundary`, while it is still the day before in UTC at 07:30; answers the error it gets at
/// 23:30 in Beijing the day before.
async fn refused_until_beijing_midnight(boundary: &str, request: pb::SubmitApplicationRequest, home: &str) -> Status {
    let day: NaiveDate = boundary.parse().unwrap();
    let before = day.pred_opt().unwrap();
    for instant in [format!("{before}T23:30:00Z"), format!("{day}T00:30:00Z")] {
        let application = submit_at(&instant, request.clone()).await.unwrap();
        assert_eq!(application.home_bureau_id, home, "{boundary} in Beijing at {instant}");
    }
    submit_at(&format!("{before}T15:30:00Z"), request).await.unwrap_err()
}

#[tokio::test]
async fn p1_the_pilot_begins_at_midnight_in_beijing() {
    // A Jiangxi applicant at the Hangzhou station: the pilot pair 33–36 from 2115-07-01.
    let request =
        submit(ApplicationKind::Renewal, applicant(&jiangxi_citizen(), "36", pb::DocumentKind::WorkUnitProof));
    let status = refused_until_beijing_midnight("2115-07-01", request, "home-jiangxi").await;
    assert_eq!(reason(&status), "REFUSAL_REASON_NOT_ACCEPTED_HERE", "30 June in Beijing: P0");
}

#[tokio::test]
async fn p3_national_acceptance_begins_at_midnight_in_beijing() {
    // The household register book is a P3/P4 document: not accepted from Jiangxi under the pilot.
    let request = submit(ApplicationKind::Renewal, jiangxi_applicant());
    let status = refused_until_beijing_midnight("2117-07-01", request, "home-jiangxi").await;
    assert_eq!(reason(&status), "REFUSAL_REASON_DOCUMENT_NOT_ACCEPTED", "30 June in Beijing: still the pilot");
}

#[tokio::test]
async fn n1_a_citizen_born_today_in_beijing_is_served_at_the_counter() {
    let newborn = IdNumber::compose("330102", NaiveDate::from_ymd_opt(2118, 1, 1).unwrap(), 44);
    let request =
        submit(ApplicationKind::Renewal, applicant(newborn.as_str(), "33", pb::DocumentKind::HouseholdRegisterBook));
    let status = refused_until_beijing_midnight("2118-01-01", request, "home-zhejiang").await;
    assert_eq!(status.code(), Code::InvalidArgument, "born tomorrow in Beijing");
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, vec!["applicant.id_number".to_owned()]);
}

#[tokio::test]
async fn p4_pilot_documents_only_during_the_pilot() {
    let mut h = Harness::start("2115-09-01T09:00:00Z").await;
    let book = jiangxi_applicant();
    let status = h.client.submit_application(submit(ApplicationKind::Renewal, book)).await.unwrap_err();
    assert_eq!(reason(&status), "REFUSAL_REASON_DOCUMENT_NOT_ACCEPTED");
    let proof = applicant(&jiangxi_citizen(), "36", pb::DocumentKind::WorkUnitProof);
    let application = h.submitted(submit(ApplicationKind::Renewal, proof)).await;
    assert_eq!(application.home_bureau_id, "home-jiangxi");
    h.stop().await;

    // After the pilot (national phase) the pilot documents are no longer accepted.
    let mut h = Harness::start(NATIONAL).await;
    let proof = applicant(&jiangxi_citizen(), "36", pb::DocumentKind::WorkUnitProof);
    let status = h.client.submit_application(submit(ApplicationKind::Renewal, proof)).await.unwrap_err();
    assert_eq!(reason(&status), "REFUSAL_REASON_DOCUMENT_NOT_ACCEPTED");
    h.stop().await;
}

#[tokio::test]
async fn n1_invalid_id_number_is_refused_with_field_violation() {
    let mut h = Harness::start(NATIONAL).await;
    let mut id = jiangxi_citizen();
    let last = if id.ends_with('0') { '1' } else { '0' };
    id.pop();
    id.push(last);
    let mut person = applicant(&id, "36", pb::DocumentKind::HouseholdRegisterBook);
    person.live = Some(pb::Biometrics { face_template: Vec::new(), fingerprint_template: register_fingerprint() });
    let status = h.client.submit_application(submit(ApplicationKind::Replacement, person)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert!(fields.contains(&"applicant.id_number".to_owned()), "{fields:?}");
    assert!(fields.contains(&"applicant.live.face_template".to_owned()), "all violations are collected: {fields:?}");
    assert!(h.list_all().await.is_empty(), "nothing written");
    assert_eq!(h.fakes.verify_calls.load(Ordering::SeqCst), 0);
    h.stop().await;
}

#[tokio::test]
async fn k1_replacement_runs_from_received_to_collected_and_cancels_only_before_production() {
    let mut h = Harness::start(NATIONAL).await;
    let person = jiangxi_applicant();
    let submitted = h.submitted(submit(ApplicationKind::Replacement, person)).await;
    let id = submitted.application_id.clone();
    assert!(submitted.state >= pb::ApplicationState::Approved as i32, "answers after the home bureau: {submitted:?}");
    assert!(!submitted.id_number_masked.contains("19900307"), "the number is masked");

    let mut watch = h
        .client
        .watch_application(pb::WatchApplicationRequest { application_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap().application.unwrap();
    assert_eq!(first.application_id, id);

    let in_production = h
        .wait_for(&id, "ordered", |a| a.state == pb::ApplicationState::InProduction as i32 && !a.order_id.is_empty())
        .await;
    assert!(in_production.loss_recorded, "K1 files the loss report too");
    assert_eq!(h.fakes.loss_reports.lock().unwrap().as_slice(), ["OLD-0001"]);
    assert_eq!(in_production.new_card_serial, "NEW-0001");
    // Cancellation only before production.
    let status = h.cancel(id.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "NOT_CANCELLABLE");
    // Not ready: no collection.
    let live =
        pb::Biometrics { face_template: with_sensor_noise(&register_face(), 5, 9), fingerprint_template: Vec::new() };
    let status = h.collect(&id, Some(live.clone())).await.unwrap_err();
    assert_eq!(reason(&status), "NOT_READY_FOR_COLLECTION");

    h.fakes.dispatched.store(true, Ordering::SeqCst);
    h.wait_until_ready(&id).await;
    let collected = h.collect(&id, Some(live)).await.unwrap();
    assert_eq!(collected.state, pb::ApplicationState::Collected as i32);
    use pb::ApplicationState as S;
    assert_eq!(
        states(&collected),
        [S::Received, S::Verifying, S::Approved, S::InProduction, S::ReadyForCollection, S::Collected]
    );

    // The watch saw every state up to the final one, then ended.
    let mut seen = vec![pb::ApplicationState::try_from(first.state).unwrap()];
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap() {
        let state = pb::ApplicationState::try_from(message.unwrap().application.unwrap().state).unwrap();
        if seen.last() != Some(&state) {
            seen.push(state);
        }
    }
    assert_eq!(seen.last(), Some(&S::Collected), "{seen:?}");
    assert!(seen.contains(&S::ReadyForCollection), "{seen:?}");

    // The home bureau is told the application ended, with the card handed over (K5).
    eventually(250, 20, || !h.fakes.closed.lock().unwrap().is_empty()).await;
    let closed = h.fakes.closed.lock().unwrap().clone();
    assert_eq!(closed, vec![(id.clone(), S::Collected as i32, "NEW-0001".to_owned())]);
    assert_eq!(h.fakes.close_stations.lock().unwrap().as_slice(), [STATION], "CloseApplication names the station");
    let provinces = h.fakes.verify_provinces.lock().unwrap().clone();
    assert!(!provinces.is_empty() && provinces.iter().all(|p| p == "36"), "Verify carries the declared province");
    h.stop().await;
}

#[tokio::test]
async fn k5_cancellation_before_production_stops_the_worker_and_tells_the_home_bureau() {
    let mut h = Harness::start(NATIONAL).await;
    h.fakes.hold_verify.store(true, Ordering::SeqCst);
    let person = jiangxi_applicant();
    let mut request = submit(ApplicationKind::Renewal, person);
    request.card_serial = "OLD-0002".into();
    // The home bureau does not answer within respond_within: the current state is returned.
    let submitted = h.client.submit_application(request).await.unwrap().into_inner().application.unwrap();
    let id = submitted.application_id;
    assert_eq!(submitted.state, pb::ApplicationState::Verifying as i32);
    let cancelled = h.cancel(id.clone()).await.unwrap();
    assert_eq!(cancelled.state, pb::ApplicationState::Cancelled as i32);
    // The home bureau answers late: the worker must not move a cancelled application on.
    h.fakes.release_verify.notify_waiters();
    h.fakes.hold_verify.store(false, Ordering::SeqCst);
    let settled = h.wait_drained(&id).await;
    assert_eq!(settled.state, pb::ApplicationState::Cancelled as i32);
    assert!(h.fakes.orders.lock().unwrap().is_empty(), "no card is made");
    // Told once, or twice when the late approval came after the close (K5).
    let closed = h.fakes.closed.lock().unwrap().clone();
    assert!(matches!(closed.len(), 1 | 2), "{closed:?}");
    assert!(closed.iter().all(|c| *c == (id.clone(), pb::ApplicationState::Cancelled as i32, String::new())));
    let status = h.cancel(id).await.unwrap_err();
    assert_eq!(reason(&status), "NOT_CANCELLABLE");
    h.stop().await;
}

#[tokio::test]
async fn k5_a_cancel_before_the_verify_left_still_tells_the_home_bureau() {
    // One delivery at a time: while the first application's Verify is held, the second's waits.
    let mut h = Harness::start_full(NATIONAL, true, None, "concurrency = 1").await;
    h.fakes.hold_verify.store(true, Ordering::SeqCst);
    let first = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await;
    assert_eq!(first.state, pb::ApplicationState::Verifying as i32);
    let local = applicant(&zhejiang_citizen(), "33", pb::DocumentKind::HouseholdRegisterBook);
    let second = h.submitted(submit(ApplicationKind::Renewal, local)).await;
    assert_eq!(second.state, pb::ApplicationState::Received as i32, "its Verify is still queued");
    let id = second.application_id;
    let cancelled = h.cancel(id.clone()).await.unwrap();
    assert_eq!(cancelled.state, pb::ApplicationState::Cancelled as i32);
    // Its Verify might have been on the way: the home bureau is told all the same.
    h.fakes.hold_verify.store(false, Ordering::SeqCst);
    h.fakes.release_verify.notify_waiters();
    let closed = wait_closed(&h, &id).await;
    assert!(closed.contains(&(id.clone(), pb::ApplicationState::Cancelled as i32, String::new())), "{closed:?}");
    assert_eq!(h.fakes.close_stations.lock().unwrap().as_slice(), [STATION]);
    let drained = h.wait_drained(&id).await;
    assert_eq!(drained.state, pb::ApplicationState::Cancelled as i32);
    assert_eq!(h.fakes.verify_calls.load(Ordering::SeqCst), 1, "only the first application's Verify left");
    h.stop().await;
}

#[tokio::test]
async fn k5_an_approval_after_the_close_is_answered_with_another_close() {
    let mut h = Harness::start(NATIONAL).await;
    let id = h.cancelled_while_verifying().await;
    let cancel = (id.clone(), pb::ApplicationState::Cancelled as i32, String::new());
    assert_eq!(wait_closed(&h, &id).await, vec![cancel.clone()]);
    h.wait_drained(&id).await;
    // The home bureau approves afterwards (its Verify was committed after the close, by a bureau
    // that did not remember the close): it holds the application open, so it is told again.
    h.fakes.hold_verify.store(false, Ordering::SeqCst);
    h.fakes.release_verify.notify_waiters();
    eventually(250, 20, || h.fakes.closed.lock().unwrap().len() >= 2).await;
    assert_eq!(h.fakes.closed.lock().unwrap().clone(), vec![cancel.clone(), cancel]);
    let after = h.wait_drained(&id).await;
    assert_eq!(after.state, pb::ApplicationState::Cancelled as i32);
    assert!(h.fakes.orders.lock().unwrap().is_empty(), "no card is made");
    assert!(after.last_error.is_empty(), "{after:?}");
    h.stop().await;
}

#[tokio::test]
async fn lifecycle_a_cancel_while_the_order_is_being_placed_is_refused() {
    let mut h = Harness::start(NATIONAL).await;
    h.fakes.hold_order.store(true, Ordering::SeqCst);
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    eventually(500, 10, || h.fakes.place_order_calls.load(Ordering::SeqCst) > 0).await;
    assert_eq!(h.fakes.place_order_calls.load(Ordering::SeqCst), 1, "PlaceOrder is under way");
    let ordering = h.get(&id).await;
    assert_eq!(ordering.state, pb::ApplicationState::InProduction as i32, "intent recorded before the call");
    assert!(ordering.order_id.is_empty());
    assert!(ordering.history.iter().any(|e| e.note.starts_with("ordering from")), "{ordering:?}");
    // The producer is slow; the cancel arrives meanwhile and is refused.
    let status = h.cancel(id.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "NOT_CANCELLABLE");
    h.fakes.hold_order.store(false, Ordering::SeqCst);
    let ordered = h.wait_for(&id, "order stored", |a| !a.order_id.is_empty()).await;
    assert_eq!(ordered.state, pb::ApplicationState::InProduction as i32);
    assert_eq!(ordered.new_card_serial, "NEW-0001");
    assert_eq!(h.fakes.orders.lock().unwrap().len(), 1, "ordered once");
    h.stop().await;
}

#[tokio::test]
async fn k3_a_loss_report_being_filed_is_no_longer_cancellable() {
    let mut h = Harness::start(NATIONAL).await;
    h.fakes.hold_loss.store(true, Ordering::SeqCst);
    let person = jiangxi_applicant();
    let id = h.report_loss(person, "OLD-0005").await.unwrap().application_id;
    eventually(500, 10, || h.fakes.report_loss_calls.load(Ordering::SeqCst) > 0).await;
    let filing = h.get(&id).await;
    assert_eq!(filing.state, pb::ApplicationState::Approved as i32);
    assert!(!filing.loss_recorded);
    let status = h.cancel(id.clone()).await.unwrap_err();
    assert_eq!(reason(&status), "NOT_CANCELLABLE");
    h.fakes.hold_loss.store(false, Ordering::SeqCst);
    let recorded = h.wait_for(&id, "loss recorded", |a| a.loss_recorded).await;
    assert_eq!(recorded.state, pb::ApplicationState::Approved as i32);
    h.stop().await;
}

/// Polls `done` up to `tries` times, `interval_ms` apart; the caller asserts what it waited for.
/// K4 at home: a first application (no card to name) at a station of the citizen's own province is
/// approved without a loss decision and goes straight to the order: no loss step, no dead letter.
#[tokio::test]
async fn k4_a_first_application_at_home_completes_without_a_loss_step() {
    let mut h = Harness::start(NATIONAL).await;
    let local = applicant(&zhejiang_citizen(), "33", pb::DocumentKind::HouseholdRegisterBook);
    let mut request = submit(ApplicationKind::Replacement, local);
    request.card_serial.clear();
    let submitted = h.submitted(request).await;
    let id = submitted.application_id.clone();
    assert_eq!(submitted.home_bureau_id, "home-zhejiang");
    let ordered = h
        .wait_for(&id, "ordered", |a| a.state == pb::ApplicationState::InProduction as i32 && !a.order_id.is_empty())
        .await;
    assert!(!ordered.loss_recorded, "no card, no loss report");
    assert!(ordered.previous_card_serial.is_empty());
    assert_eq!(h.fakes.report_loss_calls.load(Ordering::SeqCst), 0, "the registry hears of no loss");
    let collected = h.dispatched_and_collected(&id).await;
    assert!(collected.last_error.is_empty(), "{collected:?}");
    let timeline = h
        .client
        .get_application_timeline(pb::GetApplicationTimelineRequest { application_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let topics: Vec<&str> = timeline.deliveries.iter().map(|m| m.topic.as_str()).collect();
    assert!(!topics.contains(&"report_loss"), "{topics:?}");
    let dead = pb::OutboxMessageState::Dead as i32;
    assert!(timeline.deliveries.iter().all(|m| m.state != dead), "no dead letter: {:?}", timeline.deliveries);
    wait_closed(&h, &id).await;
    h.stop().await;
}

async fn eventually(tries: usize, interval_ms: u64, done: impl Fn() -> bool) {
    for _ in 0..tries {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}

async fn wait_closed(h: &Harness, id: &str) -> Vec<(String, i32, String)> {
    eventually(250, 20, || h.fakes.closed.lock().unwrap().iter().any(|c| c.0 == id)).await;
    h.fakes.closed.lock().unwrap().clone()
}

#[tokio::test]
async fn k5_a_halted_application_cancelled_is_still_closed_at_the_home_bureau() {
    let mut h = Harness::start(NATIONAL).await;
    *h.fakes.verify_error.lock().unwrap() = Some(Code::PermissionDenied);
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    let halted = h.wait_for(&id, "halted", |a| !a.last_error.is_empty()).await;
    assert_eq!(halted.state, pb::ApplicationState::Verifying as i32);
    let cancelled = h.cancel(id.clone()).await.unwrap();
    assert_eq!(cancelled.state, pb::ApplicationState::Cancelled as i32);
    assert!(cancelled.last_error.is_empty(), "the error is cleared: {cancelled:?}");
    let closed = wait_closed(&h, &id).await;
    assert_eq!(closed, vec![(id.clone(), pb::ApplicationState::Cancelled as i32, String::new())]);
    h.stop().await;
}

#[tokio::test]
async fn k5_a_failure_after_a_cancel_does_not_mark_the_cancelled_application() {
    let mut h = Harness::start(NATIONAL).await;
    let id = h.cancelled_while_verifying().await;
    // The home bureau now fails definitively for the step that ran before the cancel.
    *h.fakes.verify_error.lock().unwrap() = Some(Code::PermissionDenied);
    h.fakes.hold_verify.store(false, Ordering::SeqCst);
    h.fakes.release_verify.notify_waiters();
    let closed = wait_closed(&h, &id).await;
    assert_eq!(closed, vec![(id.clone(), pb::ApplicationState::Cancelled as i32, String::new())]);
    let after = h.get(&id).await;
    assert_eq!(after.state, pb::ApplicationState::Cancelled as i32);
    assert!(after.last_error.is_empty(), "{after:?}");
    h.stop().await;
}

#[tokio::test]
async fn lifecycle_the_producers_trouble_is_visible_on_the_application() {
    let mut h = Harness::start(NATIONAL).await;
    *h.fakes.order_error.lock().unwrap() = "printer jammed".into();
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    let waiting = h.wait_for(&id, "the producer's error", |a| a.last_error == "printer jammed").await;
    assert_eq!(waiting.state, pb::ApplicationState::InProduction as i32);
    h.fakes.order_error.lock().unwrap().clear();
    h.fakes.dispatched.store(true, Ordering::SeqCst);
    let ready = h.wait_until_ready(&id).await;
    assert!(ready.last_error.is_empty(), "{ready:?}");
    h.stop().await;
}

#[tokio::test]
async fn c3_card_handed_over_only_after_face_match() {
    let mut h = Harness::start(NATIONAL).await;
    h.fakes.dispatched.store(true, Ordering::SeqCst);
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    h.wait_until_ready(&id).await;
    let stranger: Vec<u8> = register_face().iter().map(|b| !b).collect();
    let status = h
        .collect(&id, Some(pb::Biometrics { face_template: stranger, fingerprint_template: Vec::new() }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "REFUSAL_REASON_FACE_MISMATCH");
    assert_eq!(h.get(&id).await.state, pb::ApplicationState::ReadyForCollection as i32, "nothing changed");
    let status = h.collect(&id, None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let collected = h
        .collect(
            &id,
            Some(pb::Biometrics {
                face_template: with_sensor_noise(&register_face(), 8, 3),
                fingerprint_template: Vec::new(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(collected.state, pb::ApplicationState::Collected as i32);
    // C3: the registry is told of the hand-over (the card becomes valid only then), once.
    eventually(250, 20, || !h.fakes.collections.lock().unwrap().is_empty()).await;
    let collections = h.fakes.collections.lock().unwrap().clone();
    assert_eq!(collections, [(STATION.to_owned(), jiangxi_applicant().id_number, "NEW-0001".to_owned())]);
    h.stop().await;
}

#[tokio::test]
async fn k3_loss_report_is_recorded_and_then_no_longer_cancellable() {
    let mut h = Harness::start(NATIONAL).await;
    let person = jiangxi_applicant();
    let reported = h.report_loss(person, "OLD-0003").await.unwrap();
    assert_eq!(reported.kind, pb::ApplicationKind::LossReport as i32);
    let id = reported.application_id;
    let recorded = h.wait_for(&id, "loss recorded", |a| a.loss_recorded).await;
    assert_eq!(recorded.state, pb::ApplicationState::Approved as i32);
    assert_eq!(h.fakes.loss_reports.lock().unwrap().as_slice(), ["OLD-0003"]);
    assert!(h.fakes.orders.lock().unwrap().is_empty(), "a loss report alone makes no card");
    let status = h.cancel(id.clone()).await.unwrap_err();
    assert_eq!(reason(&status), "NOT_CANCELLABLE");
    // The watch of a recorded loss report ends after its current state.
    let mut watch =
        h.client.watch_application(pb::WatchApplicationRequest { application_id: id }).await.unwrap().into_inner();
    assert!(watch.next().await.unwrap().is_ok());
    assert!(tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().is_none());
    // Submitting a loss report through SubmitApplication is refused as invalid.
    let person = jiangxi_applicant();
    let status = h.client.submit_application(submit(ApplicationKind::LossReport, person)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn s3_a_refusal_of_the_home_bureau_is_final_with_its_reason() {
    let mut h = Harness::start(NATIONAL).await;
    *h.fakes.refusal.lock().unwrap() = Some(pb::RefusalReason::BadCreditRecord);
    let person = jiangxi_applicant();
    let application = h.submitted(submit(ApplicationKind::Replacement, person)).await;
    assert_eq!(application.state, pb::ApplicationState::Refused as i32);
    assert_eq!(application.refusal_reason, pb::RefusalReason::BadCreditRecord as i32);
    let refused = h
        .client
        .list_applications(pb::ListApplicationsRequest {
            state: pb::ApplicationState::Refused as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .applications;
    assert_eq!(refused.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn k6_withdrawal_answers_the_card_status_and_passes_the_registry_refusal_unchanged() {
    let mut h = Harness::start(NATIONAL).await;
    let person = jiangxi_applicant();
    let answer = h
        .client
        .withdraw_loss_report(pb::WithdrawLossReportRequest {
            applicant: Some(person.clone()),
            card_serial: "OLD-0004".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.card_serial, "OLD-0004");
    assert_eq!(answer.status, pb::CardStatus::Valid as i32);
    assert_eq!(h.fakes.verify_provinces.lock().unwrap().as_slice(), ["36"], "Verify carries the declared province");
    let status = h
        .client
        .withdraw_loss_report(pb::WithdrawLossReportRequest {
            applicant: Some(person),
            card_serial: FINAL_SERIAL.into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    let expected: Status = ApiError::Refused(RefusalReason::LossReportFinal).into();
    assert_eq!(status.code(), expected.code());
    assert_eq!(status.message(), expected.message());
    assert_eq!(reason(&status), "REFUSAL_REASON_LOSS_REPORT_FINAL");
    assert!(h.list_all().await.is_empty(), "a withdrawal is not an application");
    h.stop().await;
}

/// Issue 15 point 4: every peer of the station (home bureau, producer, registry) listed at two
/// endpoints, one of them a closed port: a replacement runs to collection, and a withdrawal is
/// answered, through the endpoint that is up, each call failing over within itself (the outbox
/// gets one attempt per message).
#[tokio::test]
async fn every_peer_with_a_replica_down_is_reached_through_the_other_from_submission_to_collection() {
    let mut h = Harness::start_with_a_replica_down(NATIONAL).await;
    let id = h.submitted(submit(ApplicationKind::Replacement, jiangxi_applicant())).await.application_id;
    let ordered = h.wait_for(&id, "ordered", |a| !a.order_id.is_empty()).await;
    assert!(ordered.loss_recorded, "ReportLoss reached the registry");
    assert_eq!(h.fakes.loss_reports.lock().unwrap().as_slice(), ["OLD-0001"]);
    let collected = h.dispatched_and_collected(&id).await;
    assert!(collected.last_error.is_empty(), "no call failed: {}", collected.last_error);
    eventually(250, 20, || !h.fakes.closed.lock().unwrap().is_empty()).await;

    let withdrawn = h
        .client
        .withdraw_loss_report(pb::WithdrawLossReportRequest {
            applicant: Some(jiangxi_applicant()),
            card_serial: "OLD-0004".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(withdrawn.status, pb::CardStatus::Valid as i32);
    h.stop().await;
}

#[tokio::test]
async fn s4_an_unreachable_home_bureau_is_retried_with_the_error_visible() {
    let mut h = Harness::start_with(NATIONAL, false).await;
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    let waiting = h.wait_for(&id, "an error recorded", |a| !a.last_error.is_empty()).await;
    assert_eq!(waiting.state, pb::ApplicationState::Verifying as i32, "stays verifying; never decided locally");
    let status =
        h.client.get_application(pb::GetApplicationRequest { application_id: "not-an-id".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = h
        .client
        .get_application(pb::GetApplicationRequest { application_id: "00000000-0000-4000-8000-000000000000".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    h.stop().await;
}

/// The same lifecycle on PostgreSQL, in a scratch database of the test server (see
/// `yidi_testkit`: skipped when unreachable, unless `YIDI_REQUIRE_POSTGRES=1`).
#[tokio::test]
async fn c3_lifecycle_on_postgresql() {
    let Some(scratch) = postgres_for_tests("intake").await.unwrap() else { return };
    let mut h = Harness::start_on(NATIONAL, true, Some(scratch.url().to_owned())).await;
    h.fakes.dispatched.store(true, Ordering::SeqCst);
    let id = h.submitted(submit(ApplicationKind::Replacement, jiangxi_applicant())).await.application_id;
    let ready = h.wait_until_ready(&id).await;
    assert!(ready.loss_recorded);
    let collected = h
        .collect(&id, Some(pb::Biometrics { face_template: register_face(), fingerprint_template: Vec::new() }))
        .await
        .unwrap();
    assert_eq!(collected.state, pb::ApplicationState::Collected as i32);
    assert_eq!(collected.history.len(), 6);
    let listed = h.list_all().await;
    assert!(listed.iter().any(|a| a.application_id == id));
    h.stop().await;
    scratch.drop().await.unwrap();
}

/// K5: the home bureau asks whether an application it holds open ended here.
async fn outcome(h: &mut Harness, id: &str, home: &str) -> Result<pb::GetApplicationOutcomeResponse, Status> {
    let request = pb::GetApplicationOutcomeRequest { application_id: id.into(), home_bureau_id: home.into() };
    Ok(h.client.get_application_outcome(request).await?.into_inner())
}

#[tokio::test]
async fn k5_the_station_tells_an_application_s_outcome_only_to_its_home_bureau() {
    let mut h = Harness::start(NATIONAL).await;
    let submitted = h.submitted(submit(ApplicationKind::Replacement, jiangxi_applicant())).await;
    let id = submitted.application_id;
    assert_eq!(submitted.home_bureau_id, "home-jiangxi");
    let open = outcome(&mut h, &id, "home-jiangxi").await.unwrap();
    assert_eq!(open.outcome, pb::ApplicationOutcome::Open as i32, "{open:?}");
    assert_eq!(open.application_id, id);
    assert!(open.new_card_serial.is_empty());

    // Another home bureau learns nothing: as for an application that does not exist.
    let other = outcome(&mut h, &id, "home-zhejiang").await.unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    let unknown = outcome(&mut h, "00000000-0000-4000-8000-000000000000", "home-jiangxi").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        other.message().replace(&id, "<id>"),
        unknown.message().replace("00000000-0000-4000-8000-000000000000", "<id>")
    );
    // The asker names itself.
    let anonymous = outcome(&mut h, &id, " ").await.unwrap_err();
    assert_eq!(anonymous.code(), Code::InvalidArgument);
    assert!(anonymous.message().contains("home_bureau_id:"), "{}", anonymous.message());

    // Collected: ended, with the card handed over.
    h.fakes.dispatched.store(true, Ordering::SeqCst);
    h.wait_until_ready(&id).await;
    let live =
        pb::Biometrics { face_template: with_sensor_noise(&register_face(), 5, 9), fingerprint_template: Vec::new() };
    let collected = h.collect(&id, Some(live)).await.unwrap();
    let ended = outcome(&mut h, &id, "home-jiangxi").await.unwrap();
    assert_eq!(ended.outcome, pb::ApplicationOutcome::Ended as i32, "{ended:?}");
    assert_eq!(ended.state, pb::ApplicationState::Collected as i32);
    assert_eq!(ended.new_card_serial, "NEW-0001");
    assert_eq!(ended.updated_at, collected.updated_at);
    assert_eq!(outcome(&mut h, &id, "home-zhejiang").await.unwrap_err().code(), Code::NotFound);

    // Cancelled: ended, without a card.
    let cancelled = h.cancelled_while_verifying().await;
    let ended = outcome(&mut h, &cancelled, "home-jiangxi").await.unwrap();
    assert_eq!(ended.outcome, pb::ApplicationOutcome::Ended as i32);
    assert_eq!(ended.state, pb::ApplicationState::Cancelled as i32);
    assert!(ended.new_card_serial.is_empty());
    h.fakes.release_verify.notify_waiters();
    h.stop().await;
}

/// A Jiangxi citizen distinct for each `sequence`.
fn jiangxi_citizen_number(sequence: u16) -> String {
    IdNumber::compose("360102", NaiveDate::from_ymd_opt(1991, 4, 2).unwrap(), sequence).as_str().to_owned()
}

async fn page(
    h: &mut Harness,
    state: pb::ApplicationState,
    page_token: String,
) -> Result<pb::ListApplicationsResponse, Status> {
    let request = pb::ListApplicationsRequest { state: state as i32, page_size: 3, page_token };
    Ok(h.client.list_applications(request).await?.into_inner())
}

#[tokio::test]
async fn list_applications_pages_are_stable_under_inserts_and_state_changes() {
    let mut h = Harness::start(NATIONAL).await;
    let lodge = |sequence: u16| {
        let person = applicant(&jiangxi_citizen_number(sequence), "36", pb::DocumentKind::HouseholdRegisterBook);
        submit(ApplicationKind::Renewal, person)
    };
    let mut throughout = Vec::new();
    for sequence in 100..107 {
        throughout.push(h.submitted(lodge(sequence)).await.application_id);
    }
    let mut seen = Vec::new();
    let mut added = 0;
    let mut token = String::new();
    for round in 0.. {
        let answer = page(&mut h, pb::ApplicationState::Unspecified, token).await.unwrap();
        seen.extend(answer.applications.iter().map(|a| a.application_id.clone()));
        token = answer.next_page_token;
        if token.is_empty() {
            break;
        }
        // Between pages: new applications are lodged, and older ones move on to the next state.
        h.submitted(lodge(200 + round)).await;
        added += 1;
        if round == 1 {
            h.fakes.dispatched.store(true, Ordering::SeqCst);
            for id in &throughout {
                h.wait_until_ready(id).await;
            }
            let live = pb::Biometrics {
                face_template: with_sensor_noise(&register_face(), 5, 9),
                fingerprint_template: Vec::new(),
            };
            h.collect(&throughout[3], Some(live)).await.unwrap();
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no application twice: {seen:?}");
    for id in &throughout {
        assert!(seen.contains(id), "{id} existed throughout but was not listed: {seen:?}");
    }

    // A token belongs to its filter; an oversized page is clamped, not refused.
    let first = page(&mut h, pb::ApplicationState::ReadyForCollection, String::new()).await.unwrap();
    assert!(!first.next_page_token.is_empty());
    let status = page(&mut h, pb::ApplicationState::Collected, first.next_page_token.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(), ["page_token"]);
    let mut ready: Vec<String> = first.applications.into_iter().map(|a| a.application_id).collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let answer = page(&mut h, pb::ApplicationState::ReadyForCollection, token).await.unwrap();
        ready.extend(answer.applications.into_iter().map(|a| a.application_id));
        token = answer.next_page_token;
    }
    let collected = &throughout[3];
    assert!(throughout.iter().all(|id| ready.contains(id) == (id != collected)), "{ready:?}");
    let all = pb::ListApplicationsRequest { page_size: 10_000, ..Default::default() };
    let all = h.client.list_applications(all).await.unwrap().into_inner();
    assert!(all.next_page_token.is_empty());
    assert_eq!(all.applications.len(), throughout.len() + added);
    h.stop().await;
}

#[tokio::test]
async fn a_retried_submission_with_the_same_request_id_is_answered_with_the_same_application() {
    let mut h = Harness::start(NATIONAL).await;
    let mut request = submit(ApplicationKind::Renewal, jiangxi_applicant());
    request.request_id = "6f1c2d7e-2b1a-4c8e-9a51-0d3b8f7c4e21".into();
    let first = h.submitted(request.clone()).await;
    let again = h.submitted(request.clone()).await;
    assert_eq!(again.application_id, first.application_id, "answered, not lodged again");
    assert_eq!(h.list_all().await.len(), 1);
    // The same request_id with another request is refused.
    let mut other = request.clone();
    other.card_serial = "OLD-0009".into();
    let status = h.client.submit_application(other).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    // The header stays accepted, but must agree with the field.
    let mut both = Request::new(request);
    both.metadata_mut().insert("idempotency-key", "another-key".parse().unwrap());
    let status = h.client.submit_application(both).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(), ["request_id"]);
    assert_eq!(h.list_all().await.len(), 1);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Told, not polled: the producer's notice of a dispatched card

/// A renewal waiting IN_PRODUCTION on a station that asks the producer only after
/// `order_poll_after_ms`; answers the application with its order.
async fn in_production(order_poll_after_ms: u64) -> (Harness, pb::Application) {
    let mut h = Harness::start_polling_after(NATIONAL, true, None, "", order_poll_after_ms).await;
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    let ordered = h.wait_for(&id, "an order", |a| !a.order_id.is_empty()).await;
    assert_eq!(ordered.state, pb::ApplicationState::InProduction as i32);
    (h, ordered)
}

fn notice(application: &pb::Application, producer: &str) -> pb::NotifyOrderDispatchedRequest {
    pb::NotifyOrderDispatchedRequest {
        application_id: application.application_id.clone(),
        order_id: application.order_id.clone(),
        card_serial: application.new_card_serial.clone(),
        producer_id: producer.into(),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn lifecycle_a_card_is_ready_as_soon_as_the_producer_tells_the_station() {
    // The station would first ask after ten minutes: only the notice can make it ready now.
    let (mut h, ordered) = in_production(600_000).await;
    let id = ordered.application_id.clone();
    assert_eq!(ordered.new_card_serial, "NEW-0001");
    h.fakes.dispatched.store(true, Ordering::SeqCst);

    let told = h.client.notify_order_dispatched(notice(&ordered, PRODUCER)).await.unwrap().into_inner();
    assert_eq!(told.state, pb::ApplicationState::ReadyForCollection as i32);
    // Ready when the notice is answered: no poll interval was waited for.
    let ready = h.get(&id).await;
    assert_eq!(ready.state, pb::ApplicationState::ReadyForCollection as i32);
    assert_eq!(h.fakes.get_order_calls.load(Ordering::SeqCst), 0, "the station never asked the producer");
    let note = &ready.history.last().unwrap().note;
    assert_eq!(note, "card NEW-0001 dispatched to the station");
    // The fallback poll is settled with it: nothing about the application is pending any more.
    let drained = h.wait_drained(&id).await;
    assert_eq!(drained.state, pb::ApplicationState::ReadyForCollection as i32);

    // Repeat-safe: a notice sent again (the producer did not hear the answer) changes nothing.
    let again = h.client.notify_order_dispatched(notice(&ordered, PRODUCER)).await.unwrap().into_inner();
    assert_eq!(again.state, pb::ApplicationState::ReadyForCollection as i32);
    assert_eq!(h.get(&id).await.history.len(), ready.history.len());
    h.stop().await;
}

#[tokio::test]
async fn lifecycle_a_notice_from_another_producer_or_about_another_order_is_refused() {
    let (mut h, ordered) = in_production(600_000).await;
    let other = h.client.notify_order_dispatched(notice(&ordered, "producer-other")).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    let mut wrong_order = notice(&ordered, PRODUCER);
    wrong_order.order_id = "00000000-0000-4000-8000-999999999999".into();
    let wrong = h.client.notify_order_dispatched(wrong_order).await.unwrap_err();
    assert_eq!((wrong.code(), reason(&wrong).as_str()), (Code::FailedPrecondition, "ORDER_MISMATCH"));
    let mut wrong_card = notice(&ordered, PRODUCER);
    wrong_card.card_serial = "NEW-9999".into();
    let wrong = h.client.notify_order_dispatched(wrong_card).await.unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    let mut unknown = notice(&ordered, PRODUCER);
    unknown.application_id = "00000000-0000-4000-8000-000000000001".into();
    assert_eq!(h.client.notify_order_dispatched(unknown).await.unwrap_err().code(), Code::NotFound);
    let malformed = pb::NotifyOrderDispatchedRequest { producer_id: PRODUCER.into(), ..Default::default() };
    assert_eq!(h.client.notify_order_dispatched(malformed).await.unwrap_err().code(), Code::InvalidArgument);
    // Nothing of it moved the application.
    assert_eq!(h.get(&ordered.application_id).await.state, pb::ApplicationState::InProduction as i32);
    h.stop().await;
}

#[tokio::test]
async fn lifecycle_a_lost_notice_is_made_good_by_the_fallback_poll() {
    // The producer never tells (its notice is lost): the station asks once its wait is over.
    let (mut h, ordered) = in_production(300).await;
    let id = ordered.application_id.clone();
    h.fakes.dispatched.store(true, Ordering::SeqCst);
    let ready = h.wait_until_ready(&id).await;
    assert_eq!(ready.new_card_serial, "NEW-0001");
    assert!(h.fakes.get_order_calls.load(Ordering::SeqCst) >= 1, "found by asking the producer");
    // A notice arriving late, after the poll found the card, is answered all the same.
    let late = h.client.notify_order_dispatched(notice(&ordered, PRODUCER)).await.unwrap().into_inner();
    assert_eq!(late.state, pb::ApplicationState::ReadyForCollection as i32);
    h.stop().await;
}

#[tokio::test]
async fn lifecycle_a_notice_before_the_order_is_stored_makes_the_application_ready_once() {
    // The producer is quick: its notice arrives while the station still waits for PlaceOrder's answer.
    let mut h = Harness::start_polling_after(NATIONAL, true, None, "", 600_000).await;
    h.fakes.hold_order.store(true, Ordering::SeqCst);
    let id = h.submitted(submit(ApplicationKind::Renewal, jiangxi_applicant())).await.application_id;
    eventually(500, 10, || h.fakes.place_order_calls.load(Ordering::SeqCst) > 0).await;
    let ordering = h.get(&id).await;
    assert_eq!((ordering.state, ordering.order_id.as_str()), (pb::ApplicationState::InProduction as i32, ""));
    let decision_id = format!("{id}-{}", DecisionPurpose::IssueCard.as_str());
    let order_id = format!("00000000-0000-4000-8000-{:012}", decision_id.len());
    let early = pb::NotifyOrderDispatchedRequest {
        application_id: id.clone(),
        order_id: order_id.clone(),
        card_serial: "NEW-0001".into(),
        producer_id: PRODUCER.into(),
        request_id: String::new(),
    };
    let told = h.client.notify_order_dispatched(early).await.unwrap().into_inner();
    assert_eq!(told.state, pb::ApplicationState::ReadyForCollection as i32);
    // PlaceOrder answers late: its answer finds the application ready and changes nothing.
    h.fakes.hold_order.store(false, Ordering::SeqCst);
    let settled = h.wait_drained(&id).await;
    assert_eq!(settled.state, pb::ApplicationState::ReadyForCollection as i32);
    assert_eq!((settled.order_id.as_str(), settled.new_card_serial.as_str()), (order_id.as_str(), "NEW-0001"));
    assert!(settled.last_error.is_empty(), "{settled:?}");
    let request = pb::GetApplicationTimelineRequest { application_id: id.clone() };
    let timeline = h.client.get_application_timeline(request).await.unwrap().into_inner();
    let dead = pb::OutboxMessageState::Dead as i32;
    assert!(timeline.deliveries.iter().all(|d| d.state != dead), "{:?}", timeline.deliveries);
    assert_eq!(h.fakes.place_order_calls.load(Ordering::SeqCst), 1);
    h.stop().await;
}
