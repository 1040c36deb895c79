//! Key rotation without downtime (issue 4, "Keys with lifetimes"): a home bureau's second key is
//! added to the directory and to the bureau's key folder, decisions signed with either key are
//! accepted while both are valid, the first key is retired and its decisions are refused from then
//! on. Every bureau re-reads the directory and its key files on SIGHUP: the same processes serve
//! throughout and their health never leaves SERVING.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use yidi_demo::topology::SuiteKey;
use yidi_domain::OperatorAccess;
use yidi_domain::{Decision, DecisionPurpose};
use yidi_grpc::convert::signed_decision_to_proto;
use yidi_proto::v1::{
    self as pb, issuance_client::IssuanceClient, loss_registry_client::LossRegistryClient,
    verification_client::VerificationClient,
};
use yidi_runtime::population::Citizen;
use yidi_tests::{
    Db, NATIONAL_DAY, TestSuite, at, live, on_both_databases, reason, serial, start_tls,
    topology::{self, Process, operator_id},
};

on_both_databases!(s4_key_rotation_keeps_serving_and_refuses_the_retired_key);

const SECOND_KEY: &str = "home-jiangxi-k2";

/// Polls every bureau's health until stopped; counts the answers that were not SERVING.
struct HealthWatch {
    stop: Arc<AtomicBool>,
    checks: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthWatch {
    fn start(t: &TestSuite) -> Self {
        // Each bureau's read-only operator asks, over the suite's mutual TLS.
        let endpoints: Vec<(Process, anyhow::Result<tonic::transport::Endpoint>)> = Process::ALL
            .iter()
            .map(|p| (*p, t.suite.endpoint_as(*p, &operator_id(p.bureau_id(), OperatorAccess::Read))))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop_flag, counter, failed) = (stop.clone(), checks.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut clients = Vec::new();
            for (process, endpoint) in endpoints {
                let channel = endpoint.map(|e| e.connect_lazy());
                if let Ok(channel) = channel {
                    clients.push((process, HealthClient::new(channel)));
                }
            }
            while !stop_flag.load(Ordering::Relaxed) {
                for (process, client) in &mut clients {
                    let answer = client.check(HealthCheckRequest { service: String::new() }).await;
                    counter.fetch_add(1, Ordering::Relaxed);
                    match answer {
                        Ok(a) if a.get_ref().status == ServingStatus::Serving as i32 => {}
                        other => {
                            if let Ok(mut failed) = failed.lock() {
                                failed.push(format!("{}: {other:?}", process.slug()));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { stop, checks, failures, task }
    }

    async fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?;
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        ensure!(failures.is_empty(), "health left SERVING during the rotation: {failures:?}");
        Ok(self.checks.load(Ordering::Relaxed))
    }
}

fn count_in_log(t: &TestSuite, process: Process, needle: &str) -> usize {
    std::fs::read_to_string(t.suite.log_path(process)).unwrap_or_default().matches(needle).count()
}

/// SIGHUP to `processes` (verifiers first, the signer last) and waits until each logged a reload.
async fn reload(t: &TestSuite, processes: &[Process]) -> anyhow::Result<()> {
    for process in processes {
        let before = count_in_log(t, *process, "directory reloaded");
        t.suite.reload(*process).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while count_in_log(t, *process, "directory reloaded") <= before {
            if Instant::now() > deadline {
                bail!("{} did not reload its directory\n{}", process.slug(), t.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A decision as the citizen's home bureau would make it, signed in the test with `key`.
fn decision(
    t: &TestSuite,
    citizen: &Citizen,
    purpose: DecisionPurpose,
    addressee: &str,
    key: &SuiteKey,
) -> pb::SignedDecision {
    let decision = Decision { key_id: key.id.clone(), ..t.decision(citizen, purpose, addressee, at(NATIONAL_DAY)) };
    signed_decision_to_proto(&decision.sign(&key.key))
}

async fn report_loss(t: &TestSuite, decision: pb::SignedDecision) -> Result<pb::CardStatus, tonic::Status> {
    let channel = t.channel_as(Process::Registry, topology::STATION).await;
    let mut registry = LossRegistryClient::new(channel.map_err(|e| tonic::Status::unavailable(e.to_string()))?);
    let answer = registry
        .report_loss(pb::LossRegistryReportLossRequest { decision: Some(decision), request_id: String::new() })
        .await?;
    Ok(answer.into_inner().status())
}

async fn place_order(t: &TestSuite, decision: pb::SignedDecision) -> Result<pb::Order, tonic::Status> {
    let channel = t.channel_as(Process::Issuance, topology::STATION).await;
    let mut issuance = IssuanceClient::new(channel.map_err(|e| tonic::Status::unavailable(e.to_string()))?);
    let answer =
        issuance.place_order(pb::PlaceOrderRequest { decision: Some(decision), request_id: String::new() }).await?;
    answer.into_inner().order.ok_or_else(|| tonic::Status::internal("no order"))
}

/// The key id the home bureau signs a new decision with now (a loss report verified directly).
async fn home_signs_with(t: &TestSuite, citizen: &Citizen) -> anyhow::Result<String> {
    let answer = VerificationClient::new(t.channel_as(Process::HomeJiangxi, topology::STATION).await?)
        .verify(pb::VerifyRequest {
            application_id: uuid::Uuid::new_v4().to_string(),
            station_id: topology::STATION.into(),
            purpose: pb::DecisionPurpose::ReportLoss as i32,
            kind: pb::ApplicationKind::LossReport as i32,
            id_number: citizen.person.id_number.clone(),
            card_serial: serial(citizen),
            live: Some(live(citizen)),
            producer_id: String::new(),
            declared_province: citizen.person.registration_province.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let decision = answer.decision.and_then(|d| d.decision).context("the home bureau approved no decision")?;
    Ok(decision.key_id)
}

/// A replacement through the station, end to end: the home bureau's decisions are accepted by the
/// producer and the registry.
async fn replacement_flow(t: &TestSuite, citizen: &Citizen) -> anyhow::Result<()> {
    let submitted = t.submit(pb::ApplicationKind::Replacement, citizen, serial(citizen)).await?;
    let ready = t.wait_for_state(&submitted.application_id, pb::ApplicationState::ReadyForCollection).await?;
    ensure!(ready.loss_recorded, "the replacement filed its loss report");
    Ok(())
}

async fn wait_until_dispatched(t: &TestSuite, order_id: &str) -> anyhow::Result<()> {
    let mut issuance = t.issuance().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let order = issuance
            .get_order(pb::GetOrderRequest {
                order_id: order_id.to_owned(),
                decision_id: String::new(),
                station_id: String::new(),
            })
            .await?
            .into_inner()
            .order
            .context("order")?;
        if order.state == pb::OrderState::Dispatched as i32 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "order never dispatched\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn s4_key_rotation_keeps_serving_and_refuses_the_retired_key(db: Db) -> anyhow::Result<()> {
    // Over mutual TLS, as the suite runs in production.
    let Some(mut t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let pids: Vec<Option<u32>> = Process::ALL.iter().map(|p| t.suite.pid(*p)).collect();
    let health = HealthWatch::start(&t);
    let k1 = t.suite.keys[topology::HOME_JIANGXI].clone();
    let citizens: Vec<Citizen> = (0..7).map(|n| t.ordinary("36", n)).collect::<anyhow::Result<_>>()?;

    // 1. One key: the flow works and decisions carry k1.
    replacement_flow(&t, &citizens[0]).await?;
    assert_eq!(home_signs_with(&t, &citizens[1]).await?, k1.id);

    // 2. k2 added (valid since before the suite's clock started), its private key given to the
    //    home bureau: the verifiers take the directory first, then the signer.
    t.suite.add_key(topology::HOME_JIANGXI, SECOND_KEY, at(NATIONAL_DAY) - chrono::Duration::hours(1))?;
    let k2 = t.suite.keys[topology::HOME_JIANGXI].clone();
    let keys_reloaded = count_in_log(&t, Process::HomeJiangxi, "signing keys reloaded");
    reload(&t, &[Process::Registry, Process::Issuance, Process::Intake, Process::HomeSichuan, Process::HomeJiangxi])
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_in_log(&t, Process::HomeJiangxi, "signing keys reloaded") <= keys_reloaded {
        ensure!(Instant::now() < deadline, "the home bureau did not re-read its key folder\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New decisions carry k2 (the newest valid key), and go through end to end.
    assert_eq!(home_signs_with(&t, &citizens[2]).await?, SECOND_KEY);
    replacement_flow(&t, &citizens[3]).await?;
    // During the overlap, decisions signed with k1 are still accepted, by the registry and the producer.
    let loss = decision(&t, &citizens[4], DecisionPurpose::ReportLoss, topology::REGISTRY, &k1);
    assert_eq!(report_loss(&t, loss).await?, pb::CardStatus::ReportedLost);
    let order =
        place_order(&t, decision(&t, &citizens[5], DecisionPurpose::IssueCard, topology::PRODUCER, &k1)).await?;
    // Registered at the registry (with its k1 decision) before k1 goes.
    wait_until_dispatched(&t, &order.order_id).await?;

    // 3. k1 retired (from the instant every bureau's clock started): k1 decisions are refused.
    t.suite.retire_key(topology::HOME_JIANGXI, &k1.id, at(NATIONAL_DAY))?;
    reload(&t, &[Process::Registry, Process::Issuance, Process::Intake, Process::HomeSichuan, Process::HomeJiangxi])
        .await?;
    let retired = decision(&t, &citizens[6], DecisionPurpose::ReportLoss, topology::REGISTRY, &k1);
    let refused = report_loss(&t, retired).await.expect_err("k1 retired at the registry");
    assert_eq!(reason(&refused), "DECISION_KEY_RETIRED", "{refused:?}");
    let retired = decision(&t, &citizens[6], DecisionPurpose::IssueCard, topology::PRODUCER, &k1);
    let refused = place_order(&t, retired).await.expect_err("k1 retired at the producer");
    assert_eq!(reason(&refused), "DECISION_KEY_RETIRED", "{refused:?}");
    // k2 decisions are accepted, and the home bureau signs with k2 alone.
    let loss = decision(&t, &citizens[6], DecisionPurpose::ReportLoss, topology::REGISTRY, &k2);
    assert_eq!(report_loss(&t, loss).await?, pb::CardStatus::ReportedLost);
    let after = t.ordinary("36", 7)?;
    replacement_flow(&t, &after).await?;

    // No downtime: the same processes served throughout, and health never left SERVING.
    let checks = health.finish().await?;
    ensure!(checks > 0, "health was never checked");
    let now: Vec<Option<u32>> = Process::ALL.iter().map(|p| t.suite.pid(*p)).collect();
    assert_eq!(now, pids, "no bureau was restarted");
    t.stop().await
}
