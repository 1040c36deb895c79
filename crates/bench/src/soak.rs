//! `soak`: applications of every kind through the whole suite while random bureaus are killed
//! (SIGKILL) and started again; at the end the five databases are reconciled
//! (`yidi_tests::reconcile`) and the report says whether anything was lost or duplicated.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use yidi_demo::{
    population::Rng,
    suite::{Backend, ClockSetting, Suite, SuiteOptions},
    topology::Process,
};
use yidi_idempotency as idempotency;
use yidi_proto::v1::{self as pb, intake_client::IntakeClient};
use yidi_runtime::population::Citizen;
use yidi_tests::reconcile::{self, Acknowledged, Databases, Outcome};

/// What `soak` was asked for.
pub struct SoakOptions {
    pub applications: usize,
    pub kills: usize,
    /// Bound on the whole run, start-up excluded.
    pub max: Duration,
    /// PostgreSQL server for the bureaus' databases; SQLite files without it.
    pub postgres: Option<String>,
    pub seed: u64,
    /// Callers submitting at once.
    pub concurrency: usize,
    /// Every bureau that can run as replicas (station, home bureaus, producer) runs as two on its
    /// PostgreSQL database, both in the directory; kills fall on either replica.
    pub replicated: bool,
}

/// Every kill is one of these, chosen at random.
const VICTIMS: [Process; 5] =
    [Process::Intake, Process::HomeJiangxi, Process::HomeSichuan, Process::Issuance, Process::Registry];

/// The bureaus the replicated soak runs as two replicas each: every one.
const REPLICATED: [Process; 5] = VICTIMS;

/// A duration between `low` and `high` milliseconds, drawn from the run's seeded sequence (so a
/// failing run can be repeated).
fn millis(rng: &mut Rng, low: u64, high: u64) -> Duration {
    Duration::from_millis(low + rng.below(high.saturating_sub(low) + 1))
}

/// One application the run lodges: who, what, and how it should end.
#[derive(Debug, Clone)]
struct Planned {
    kind: pb::ApplicationKind,
    citizen: Citizen,
    expect: Outcome,
}

fn kind_label(kind: pb::ApplicationKind) -> &'static str {
    match kind {
        pb::ApplicationKind::Replacement => "replacement",
        pb::ApplicationKind::Renewal => "renewal",
        _ => "loss_report",
    }
}

/// Replacements, loss reports and renewals in turn; every tenth renewal is of a card not yet
/// renewable, which the home bureau must refuse (and nothing may be made for it). Every other new
/// card is collected at the counter as soon as it is ready.
fn plan(applications: usize, ordinary: &[Citizen], renewable: &[Citizen]) -> anyhow::Result<Vec<Planned>> {
    let mut ordinary = ordinary.iter();
    let mut renewable = renewable.iter();
    let mut planned = Vec::with_capacity(applications);
    for index in 0..applications {
        let (kind, citizen, expect) = match index % 3 {
            0 => (pb::ApplicationKind::Replacement, ordinary.next(), Outcome::CardReady),
            1 => (pb::ApplicationKind::LossReport, ordinary.next(), Outcome::LossRecorded),
            _ if (index / 3) % 10 == 9 => (pb::ApplicationKind::Renewal, ordinary.next(), Outcome::Refused),
            _ => (pb::ApplicationKind::Renewal, renewable.next(), Outcome::CardReady),
        };
        let citizen = citizen.context("the population has too few citizens for the plan")?.clone();
        let expect = if expect == Outcome::CardReady && (index / 3) % 2 == 0 { Outcome::Collected } else { expect };
        planned.push(Planned { kind, citizen, expect });
    }
    Ok(planned)
}

/// How one submission went.
#[derive(Debug, Default)]
struct Tally {
    acknowledged: Vec<Acknowledged>,
    /// Acknowledged only after a retry (the first call failed: the station was down).
    after_retry: usize,
    /// Answered by the station's idempotency layer with an earlier attempt's answer.
    replayed: usize,
}

/// One SubmitApplication or ReportLoss, sent with `key` as its `idempotency-key`. Returns the
/// application id and whether the answer was a replay of an earlier attempt's.
async fn submit_once(
    intake: &mut IntakeClient<tonic::transport::Channel>,
    planned: &Planned,
    key: &str,
) -> Result<(String, bool), tonic::Status> {
    let applicant = Some(yidi_tests::applicant(&planned.citizen));
    let card_serial = yidi_tests::serial(&planned.citizen);
    fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = key.parse() {
            request.metadata_mut().insert(idempotency::HEADER, value);
        }
        request
    }
    let replayed = |metadata: &tonic::metadata::MetadataMap| {
        metadata.get(idempotency::REPLAYED_HEADER).is_some_and(|value| value == "true")
    };
    let (application, replay) = if planned.kind == pb::ApplicationKind::LossReport {
        let response = intake
            .report_loss(keyed(pb::ReportLossRequest { applicant, card_serial, request_id: String::new() }, key))
            .await?;
        let replay = replayed(response.metadata());
        (response.into_inner().application, replay)
    } else {
        let request = pb::SubmitApplicationRequest {
            kind: planned.kind as i32,
            applicant,
            card_serial,
            request_id: String::new(),
        };
        let response = intake.submit_application(keyed(request, key)).await?;
        let replay = replayed(response.metadata());
        (response.into_inner().application, replay)
    };
    let application = application.ok_or_else(|| tonic::Status::internal("no application in the answer"))?;
    Ok((application.application_id, replay))
}

/// Lodges one application; while the station is down, tries again until it answers, with the
/// same idempotency key: a call that failed may still have been committed (the station killed
/// after the commit, before the answer), and its repeat must get that application, not a second.
async fn submit(
    mut intake: IntakeClient<tonic::transport::Channel>,
    planned: &Planned,
    deadline: Instant,
    tally: &Mutex<Tally>,
) -> anyhow::Result<String> {
    // One citizen, one application (K5): the citizen names the request.
    let key = format!("soak-{}", planned.citizen.person.id_number);
    let mut failed = false;
    loop {
        match submit_once(&mut intake, planned, &key).await {
            Ok((application_id, replay)) => {
                let mut tally = tally.lock().map_err(|_| anyhow::anyhow!("tally poisoned"))?;
                tally.after_retry += usize::from(failed);
                tally.replayed += usize::from(replay);
                tally
                    .acknowledged
                    .push(Acknowledged { application_id: application_id.clone(), expect: planned.expect });
                return Ok(application_id);
            }
            Err(status) if Instant::now() < deadline => {
                // Refusals at the counter would be a bug of the plan, not an outage: stop on them.
                if matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition) {
                    bail!("{} of {} refused: {status:?}", kind_label(planned.kind), planned.citizen.person.id_number);
                }
                failed = true;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(status) => bail!("gave up submitting at the deadline: {status:?}"),
        }
    }
}

/// The citizen collects the card as soon as it is ready, with a fresh face match (C3); calls that
/// fail (the station down) are tried again until the deadline.
async fn collect(
    mut intake: IntakeClient<tonic::transport::Channel>,
    application_id: &str,
    citizen: &Citizen,
    deadline: Instant,
) -> anyhow::Result<()> {
    while Instant::now() < deadline {
        let request = pb::GetApplicationRequest { application_id: application_id.to_owned() };
        if let Ok(Some(application)) = intake.get_application(request).await.map(|a| a.into_inner().application) {
            match pb::ApplicationState::try_from(application.state) {
                Ok(pb::ApplicationState::ReadyForCollection) => {
                    let request = pb::CollectCardRequest {
                        application_id: application_id.to_owned(),
                        live: Some(yidi_tests::live(citizen)),
                        request_id: String::new(),
                    };
                    // A failed call may have been committed: the next round reads the state again.
                    if intake.collect_card(request).await.is_ok() {
                        return Ok(());
                    }
                }
                Ok(pb::ApplicationState::Collected) => return Ok(()),
                // Anything else final is the reconciliation's to report.
                Ok(pb::ApplicationState::Refused | pb::ApplicationState::Cancelled) => return Ok(()),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("application {application_id} was never collected before the deadline")
}

pub async fn soak(options: &SoakOptions, bin_dir: &std::path::Path, work: &std::path::Path) -> anyhow::Result<bool> {
    let mut rng = Rng(options.seed);
    let per_kind = options.applications.div_ceil(3);
    let now = yidi_tests::at(yidi_tests::NATIONAL_DAY);
    let mut suite_options = SuiteOptions::new(work.join("suite"), bin_dir.to_path_buf(), now);
    suite_options.clock = ClockSetting::Start(now);
    if options.replicated && options.postgres.is_none() {
        // SQLite is one file per process: there is no database for a second replica to share.
        bail!("soak --replicated needs --postgres");
    }
    if let Some(url) = &options.postgres {
        suite_options.backend = Backend::Postgres { admin_url: url.clone() };
    }
    // Replacements, loss reports and refused renewals take ordinary citizens (one application
    // each, K5); the scenario citizens take the first twenty or so places of each province.
    suite_options.citizens_per_province = (2 * per_kind + per_kind / 10) / 2 + 40;
    suite_options.renewable_per_province = per_kind / 2 + 1;
    // Callers get their answer at once, so many applications are in flight at each kill.
    suite_options.extra_config.insert(Process::Intake, "[worker]\nrespond_within_ms = 0\n".into());
    let backend = if options.postgres.is_some() { "PostgreSQL" } else { "SQLite" };
    eprintln!(
        "soak: starting the suite on {backend} ({} citizens per province), seed {}",
        suite_options.citizens_per_province + suite_options.renewable_per_province,
        options.seed
    );
    let mut suite = Suite::start(suite_options).await?;
    let mut replicas = Vec::new();
    if options.replicated {
        for process in REPLICATED {
            replicas.push((process, suite.add_replica(process).await?));
        }
        eprintln!("soak: a second replica of {}", REPLICATED.map(Process::slug).join(", "));
    }
    let databases = Databases::of(&suite);
    let ordinary: Vec<Citizen> =
        suite.population.citizens.iter().filter(|c| c.scenario == "ordinary" && c.card.is_some()).cloned().collect();
    // The scenario's own renewal citizen is left to the tests and the demo.
    let renewable: Vec<Citizen> = ["36", "51"]
        .iter()
        .flat_map(|province| {
            suite
                .population
                .citizens
                .iter()
                .filter(move |c| c.scenario == "renewal" && c.person.registration_province == *province)
                .skip(1)
        })
        .cloned()
        .collect();
    let planned = plan(options.applications, &ordinary, &renewable)?;

    let began = Instant::now();
    let deadline = began + options.max;
    let channel = tonic::transport::Endpoint::from_shared(suite.endpoint(Process::Intake))?
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let queue = Arc::new(Mutex::new(planned.clone().into_iter().enumerate()));
    // Lodging is spread over seven seconds per kill asked for: the longest a kill takes (the
    // pause before it, up to 2.5 s; its outage, up to 1.5 s; the restart, about 3 s in a debug
    // build), so that every kill finds applications in flight, however few and however fast.
    let span = Duration::from_secs(7 * options.kills as u64).min(options.max / 2);
    let slot = span / u32::try_from(planned.len().max(1)).unwrap_or(u32::MAX);
    let submitting = Arc::new(AtomicBool::new(true));
    let mut submitters = tokio::task::JoinSet::new();
    let (to_collect, collectable) = tokio::sync::mpsc::unbounded_channel::<(String, Citizen)>();
    for _ in 0..options.concurrency.max(1) {
        let (queue, tally, to_collect) = (queue.clone(), tally.clone(), to_collect.clone());
        let intake = IntakeClient::new(channel.clone());
        submitters.spawn(async move {
            loop {
                let next = queue.lock().map_err(|_| anyhow::anyhow!("queue poisoned"))?.next();
                let Some((index, planned)) = next else { return anyhow::Ok(()) };
                tokio::time::sleep_until((began + slot * u32::try_from(index).unwrap_or(u32::MAX)).into()).await;
                let application_id = submit(intake.clone(), &planned, deadline, &tally).await?;
                if planned.expect == Outcome::Collected {
                    to_collect.send((application_id, planned.citizen.clone()))?;
                }
            }
        });
    }
    // The collectors end once the submitters have ended (and with them every sender).
    drop(to_collect);
    let collectable = Arc::new(tokio::sync::Mutex::new(collectable));
    for _ in 0..options.concurrency.max(1) {
        let collectable = collectable.clone();
        let intake = IntakeClient::new(channel.clone());
        submitters.spawn(async move {
            loop {
                let next = collectable.lock().await.recv().await;
                let Some((application_id, citizen)) = next else { return anyhow::Ok(()) };
                collect(intake.clone(), &application_id, &citizen, deadline).await?;
            }
        });
    }
    let watch_submitters = {
        let submitting = submitting.clone();
        tokio::spawn(async move {
            let mut outcome = Ok(());
            while let Some(joined) = submitters.join_next().await {
                if let Err(error) = joined.map_err(anyhow::Error::from).and_then(|r| r) {
                    outcome = Err(error);
                }
            }
            submitting.store(false, Ordering::SeqCst);
            outcome
        })
    };

    // Kill while anything is in flight, until at least the asked number of kills is done and
    // every application is lodged; never past the deadline.
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut total_kills = 0;
    let mut kill_log = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(millis(&mut rng, 500, 2500)).await;
        let lodged = !submitting.load(Ordering::SeqCst);
        if lodged && total_kills >= options.kills {
            break;
        }
        if lodged && reconcile::unsettled(&databases).await.is_ok_and(|left| left.is_empty()) {
            // Nothing in flight: killing now would test nothing.
            break;
        }
        // Replicated: the second replica of a bureau is one more victim, drawn like the others.
        let drawn = rng.below((VICTIMS.len() + replicas.len()) as u64) as usize;
        let down = millis(&mut rng, 0, 1500);
        let (victim, of_replica) = match drawn.checked_sub(VICTIMS.len()) {
            None => {
                let victim = VICTIMS[drawn];
                suite.kill(victim).await?;
                (victim, "")
            }
            Some(index) => {
                let (process, replica) = &mut replicas[index];
                replica.kill().await?;
                (*process, " (replica)")
            }
        };
        let label = format!("{}{of_replica}", victim.slug());
        total_kills += 1;
        *kills.entry(format!("{}{of_replica}", victim.bureau_id())).or_default() += 1;
        kill_log.push(format!(
            "{:>6.1} s  kill -9 {label} (down {} ms)",
            began.elapsed().as_secs_f64(),
            down.as_millis()
        ));
        tokio::time::sleep(down).await;
        match drawn.checked_sub(VICTIMS.len()) {
            None => suite.restart(victim).await,
            Some(index) => suite.restart_replica(victim, &mut replicas[index].1).await,
        }
        .with_context(|| format!("restarting {label}"))?;
    }
    let submitted = watch_submitters.await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let unsettled = reconcile::wait_until_settled(&databases, left).await?;
    let elapsed = began.elapsed();
    let tally = std::mem::take(&mut *tally.lock().map_err(|_| anyhow::anyhow!("tally poisoned"))?);
    let reconciliation = reconcile::reconcile(&databases, &tally.acknowledged).await?;

    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for planned in &planned {
        *per_kind.entry(kind_label(planned.kind)).or_default() += 1;
    }
    let lost = reconciliation.lost.len() + planned.len().saturating_sub(tally.acknowledged.len());
    println!("# Soak report");
    println!(
        "backend: {backend}; seed {}; {} callers; elapsed {:.1} s (bound {} s)",
        options.seed,
        options.concurrency,
        elapsed.as_secs_f64(),
        options.max.as_secs()
    );
    println!(
        "planned: {} ({})",
        planned.len(),
        per_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "acknowledged: {} ({} after a retry with the same idempotency key, {} of them replayed answers)",
        tally.acknowledged.len(),
        tally.after_retry,
        tally.replayed
    );
    if options.replicated {
        println!(
            "replicated: {} as two replicas each, each bureau's on one PostgreSQL database",
            REPLICATED.map(Process::slug).join(", ")
        );
    }
    if let Err(error) = &submitted {
        println!("submission stopped: {error:#}");
    }
    println!("kills: {total_kills} ({})", kills.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "));
    for line in &kill_log {
        println!("  {line}");
    }
    print!("{reconciliation}");
    let duplicated = reconciliation.duplicated.len();
    let clean = submitted.is_ok()
        && unsettled.is_empty()
        && reconciliation.is_clean()
        && lost == 0
        && total_kills >= options.kills;
    println!(
        "RESULT: {} — lost {lost}, duplicated {duplicated}, unsettled {}, unexpected {}, over {} applications and {total_kills} kills",
        if clean { "PASS" } else { "FAIL" },
        reconciliation.unsettled.len(),
        reconciliation.unexpected.len(),
        reconciliation.applications,
    );
    if total_kills < options.kills {
        println!("only {total_kills} of {} kills happened before everything settled or the bound", options.kills);
    }
    for (process, replica) in replicas {
        if replica.terminate().await? != Some(0) {
            println!("the {} replica did not stop cleanly", process.slug());
        }
    }
    suite.stop().await?;
    Ok(clean)
}
