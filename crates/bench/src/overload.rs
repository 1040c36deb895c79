//! Overload: the registry driven at twice its capacity, open loop, every call with a deadline
//! (`grpc-timeout`), once with load shedding configured small and once with limits so large that
//! it never sheds; both on a fresh PostgreSQL database, in the same run.
//!
//! The calls are CheckCard of cards reported lost: each such check writes a hit before it answers,
//! so a call waits for one of the database pool's connections and the pool, not the CPU, bounds
//! the rate. That is the overload shedding is for: calls piling up inside the server. (A check of
//! a valid card never leaves memory; at twice its rate the two shared cores are saturated, and
//! the backlog forms in the runtime's queue before any layer sees the call: `--workload valid`
//! measures that case.)
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use sea_orm::{ConnectionTrait, Database};
use serde::Serialize;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use yidi_grpc::balance::Balanced;
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_runtime::scratch::ScratchDatabase;

use crate::{
    Options, cards,
    checks::{check_request, mix},
    load::{self, LoadSpec, histogram},
    process::{self, Server},
    report::{Report, Table, ms, thousands},
};

/// The deadline every call of the open-loop runs carries, as `grpc-timeout`.
const DEADLINE: Duration = Duration::from_millis(200);
/// Connections of the load generator.
const CONNECTIONS: usize = 16;
/// Offered rate over measured capacity.
const OVERLOAD_FACTOR: f64 = 2.0;
/// Closed-loop workers of the capacity measurement (connections × in flight).
const CAPACITY_SPEC: (usize, usize) = (8, 4);

/// Which cards are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// Cards reported lost: every check writes a hit (database-bound).
    Lost,
    /// Valid cards: answered from the in-memory index (CPU-bound).
    Valid,
}

impl Workload {
    pub fn parse(value: &str) -> anyhow::Result<Self> {
        match value {
            "lost" => Ok(Self::Lost),
            "valid" => Ok(Self::Valid),
            other => anyhow::bail!("--workload is lost or valid, not {other}"),
        }
    }

    fn expected(self) -> pb::CardStatus {
        match self {
            Self::Lost => pb::CardStatus::ReportedLost,
            Self::Valid => pb::CardStatus::Valid,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Lost => "CheckCard of cards reported lost (each writes a hit: database-bound)",
            Self::Valid => "CheckCard of valid cards (in-memory index: CPU-bound)",
        }
    }
}

/// One server configuration under test.
#[derive(Debug, Clone, Copy, Serialize)]
struct Limits {
    name: &'static str,
    max_in_flight: usize,
    max_queued: usize,
    max_queue_wait_ms: u64,
}

/// Twice the database pool (8) in flight, a short queue whose patience ends well before the
/// deadline, so that a call either runs at once or is refused at once.
const SHEDDING: Limits = Limits { name: "shedding", max_in_flight: 16, max_queued: 32, max_queue_wait_ms: 50 };
/// Limits nothing reaches: no call is ever refused.
const NO_SHEDDING: Limits = Limits {
    name: "no shedding (baseline)",
    max_in_flight: 1_000_000,
    max_queued: 1_000_000,
    max_queue_wait_ms: 60_000,
};

/// What one open-loop run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OverloadResult {
    pub target_rate: f64,
    pub seconds: f64,
    pub issued: u64,
    pub accepted: u64,
    /// Accepted calls whose answer came after their deadline.
    pub accepted_late: u64,
    pub resource_exhausted: u64,
    pub unavailable: u64,
    /// DEADLINE_EXCEEDED or CANCELLED: cut off at its deadline (by the server, or by the tonic
    /// client, which keeps the deadline it sends too): taken on, then too late.
    pub expired: u64,
    /// No answer at all long after the deadline (the client gave up).
    pub unanswered: u64,
    pub other_errors: u64,
    pub first_other_error: Option<String>,
    pub accepted_p50_us: u64,
    pub accepted_p99_us: u64,
    pub accepted_max_us: u64,
    pub refused_p50_us: u64,
    pub refused_p99_us: u64,
    pub rss_before: u64,
    pub rss_peak: u64,
    pub rss_after: u64,
}

impl OverloadResult {
    fn shed(&self) -> u64 {
        self.resource_exhausted + self.unavailable
    }
}

struct Tally {
    accepted: Histogram<u64>,
    refused: Histogram<u64>,
    result: OverloadResult,
}

fn is_overloaded(status: &Status) -> bool {
    status.get_error_details().error_info().is_some_and(|info| info.reason == "OVERLOADED")
}

/// One CheckCard with `deadline` as its `grpc-timeout`; the card's status.
async fn check(channel: Balanced, n: u64, count: u64, deadline: Duration) -> Result<i32, Status> {
    let mut request = tonic::Request::new(check_request(mix(n) % count));
    request.set_timeout(deadline);
    Ok(LossRegistryClient::new(channel).check_card(request).await?.into_inner().status)
}

/// Calls at `rate` per second for `duration`, each on the next connection, whatever the answers
/// (open loop), while sampling the server's RSS.
async fn open_loop(
    server: &Server,
    rate: f64,
    duration: Duration,
    workload: Workload,
    count: u64,
) -> anyhow::Result<OverloadResult> {
    let channels = load::connect(server.targets(), CONNECTIONS).await?;
    let tally = Arc::new(Mutex::new(Tally {
        accepted: histogram()?,
        refused: histogram()?,
        result: OverloadResult { target_rate: rate, seconds: duration.as_secs_f64(), ..OverloadResult::default() },
    }));
    let rss_before = server.rss_bytes()?;
    let pid = server.pid;
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut peak = rss_before;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(rss) = process::rss_of(pid) {
                    peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };

    let expected = workload.expected() as i32;
    let start = Instant::now();
    let end = start + duration;
    let mut issued = 0u64;
    let mut calls = tokio::task::JoinSet::new();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = ((now - start).as_secs_f64() * rate) as u64;
        while issued < due {
            let channel = channels[(issued % CONNECTIONS as u64) as usize].clone();
            let tally = Arc::clone(&tally);
            let n = issued;
            calls.spawn(async move {
                let began = Instant::now();
                // The client stops waiting long after the deadline.
                let answer = tokio::time::timeout(DEADLINE * 10, check(channel, n, count, DEADLINE)).await;
                let took = began.elapsed();
                let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
                let mut tally = tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match answer {
                    Ok(Ok(status)) if status == expected => {
                        tally.accepted.saturating_record(micros);
                        tally.result.accepted += 1;
                        if took > DEADLINE {
                            tally.result.accepted_late += 1;
                        }
                    }
                    Ok(Ok(status)) => {
                        tally.result.other_errors += 1;
                        tally.result.first_other_error.get_or_insert_with(|| format!("answered status {status}"));
                    }
                    Ok(Err(status)) => match status.code() {
                        Code::ResourceExhausted if is_overloaded(&status) => {
                            tally.refused.saturating_record(micros);
                            tally.result.resource_exhausted += 1;
                        }
                        Code::Unavailable if is_overloaded(&status) => {
                            tally.refused.saturating_record(micros);
                            tally.result.unavailable += 1;
                        }
                        Code::DeadlineExceeded | Code::Cancelled => tally.result.expired += 1,
                        _ => {
                            tally.result.other_errors += 1;
                            tally.result.first_other_error.get_or_insert_with(|| status.to_string());
                        }
                    },
                    Err(_) => tally.result.unanswered += 1,
                }
            });
            issued += 1;
        }
        while calls.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while calls.join_next().await.is_some() {}
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let rss_peak = sampler.await?;
    drop(channels);
    // What the server keeps once the load is gone (buffers it did not give back).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = server.rss_bytes()?;

    let tally = tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut result = tally.result.clone();
    result.issued = issued;
    result.accepted_p50_us = tally.accepted.value_at_quantile(0.50);
    result.accepted_p99_us = tally.accepted.value_at_quantile(0.99);
    result.accepted_max_us = tally.accepted.max();
    result.refused_p50_us = tally.refused.value_at_quantile(0.50);
    result.refused_p99_us = tally.refused.value_at_quantile(0.99);
    result.rss_before = rss_before;
    result.rss_peak = rss_peak;
    result.rss_after = rss_after;
    Ok(result)
}

/// A registry with `limits` on a fresh PostgreSQL database of `count` cards (all reported lost
/// for [`Workload::Lost`]).
async fn start(
    options: &Options,
    limits: Limits,
    workload: Workload,
    label: &str,
) -> anyhow::Result<(Server, ScratchDatabase)> {
    let dir = options.work.join(label);
    std::fs::create_dir_all(&dir)?;
    let database = ScratchDatabase::create(&options.postgres_url, &format!("bench_{label}"))
        .await
        .with_context(|| format!("creating a database on {}", options.postgres_url))?;
    cards::load(database.url(), options.cards).await?;
    if workload == Workload::Lost {
        let db = Database::connect(database.url()).await?;
        db.execute_unprepared("UPDATE cards SET status = 'reported_lost'").await?;
        db.close().await?;
    }
    let in_flight = limits.max_in_flight.to_string();
    let queued = limits.max_queued.to_string();
    let wait = limits.max_queue_wait_ms.to_string();
    let env = [
        ("YIDI__SERVER__MAX_IN_FLIGHT", in_flight.as_str()),
        ("YIDI__SERVER__MAX_QUEUED", queued.as_str()),
        ("YIDI__SERVER__MAX_QUEUE_WAIT_MS", wait.as_str()),
        // A line per hit would measure the log file.
        ("YIDI__LOG__FILTER", "warn"),
    ];
    let server = process::start_registry_with_env(&dir, &options.bin_dir, database.url(), None, &env).await?;
    Ok((server, database))
}

/// Closed-loop calls/s (accepted ones) at [`CAPACITY_SPEC`].
async fn capacity(options: &Options, server: &Server, workload: Workload) -> anyhow::Result<load::LoadResult> {
    let (connections, in_flight) = CAPACITY_SPEC;
    let spec = LoadSpec {
        connections,
        in_flight,
        warmup: options.warmup,
        duration: (options.duration / 3).max(Duration::from_secs(2)),
    };
    let count = options.cards;
    let expected = workload.expected() as i32;
    load::drive(server.targets(), spec, move |channel, n| async move {
        let status = check(channel, n, count, Duration::from_secs(5)).await?;
        if status == expected { Ok(1) } else { Err(Status::internal(format!("answered status {status}"))) }
    })
    .await
}

/// An error message short enough for a table cell.
fn first_words(message: &str) -> String {
    let flat = message.replace(['|', '\n'], " ");
    if flat.len() <= 80 { flat } else { format!("{}…", flat.chars().take(80).collect::<String>()) }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1024.0 / 1024.0)
}

/// Both servers at twice the capacity measured. Answers what went wrong in the
/// shedding run (nothing shed, accepted calls late), after adding the tables to `report`.
pub async fn overload(options: &Options, report: &mut Report, workload: Workload) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(options.cards > 0, "--cards must be at least 1");
    // Both servers first, each measured closed loop; the offered rate is twice the better of the
    // two, so that neither run is spared by a measurement the shared cores made low.
    let mut servers = Vec::new();
    let mut capacities = Vec::new();
    for (index, limits) in [SHEDDING, NO_SHEDDING].into_iter().enumerate() {
        eprintln!("overload: {}: loading {} cards, starting the registry", limits.name, options.cards);
        let (server, database) = start(options, limits, workload, &format!("overload_{index}")).await?;
        let measured = capacity(options, &server, workload).await?;
        eprintln!("overload: {}: closed-loop capacity {:.0} calls/s", limits.name, measured.requests_per_second);
        servers.push((limits, server, database));
        capacities.push((limits, measured));
    }
    let best = capacities.iter().map(|(_, c)| c.requests_per_second).fold(0.0, f64::max);
    let rate = best * OVERLOAD_FACTOR;
    // The shedding server first: the baseline leaves the database busy with abandoned work.
    let mut results = Vec::new();
    for (limits, server, database) in servers {
        eprintln!("overload: {}: {rate:.0} calls/s open loop for {:?}", limits.name, options.duration);
        let result = open_loop(&server, rate, options.duration, workload, options.cards).await?;
        eprintln!("overload: {}: {result:?}", limits.name);
        server.stop().await?;
        database.drop().await?;
        results.push((limits, result));
    }

    let mut table = Table::new(
        &format!("Overload at twice capacity: {}", workload.describe()),
        &[
            "server (in flight / queued / queue wait ms)",
            "closed-loop capacity calls/s",
            "offered calls/s",
            "accepted calls/s",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
            "cut off at the deadline (either side)",
            "unanswered after 10× the deadline",
            "other errors (first)",
            "accepted p50 / p99 / max ms",
            "accepted after their deadline",
            "refusal p50 / p99 ms",
            "RSS MiB before / peak / after",
        ],
    );
    for ((limits, capacity), (_, result)) in capacities.iter().zip(&results) {
        table.row(vec![
            format!(
                "{} ({} / {} / {})",
                limits.name,
                thousands(limits.max_in_flight as f64),
                thousands(limits.max_queued as f64),
                thousands(limits.max_queue_wait_ms as f64)
            ),
            thousands(capacity.requests_per_second),
            thousands(result.issued as f64 / result.seconds),
            thousands(result.accepted as f64 / result.seconds),
            result.resource_exhausted.to_string(),
            result.unavailable.to_string(),
            result.expired.to_string(),
            result.unanswered.to_string(),
            match &result.first_other_error {
                Some(first) if result.other_errors > 0 => format!("{} ({})", result.other_errors, first_words(first)),
                _ => result.other_errors.to_string(),
            },
            format!("{} / {} / {}", ms(result.accepted_p50_us), ms(result.accepted_p99_us), ms(result.accepted_max_us)),
            result.accepted_late.to_string(),
            format!("{} / {}", ms(result.refused_p50_us), ms(result.refused_p99_us)),
            format!("{} / {} / {}", mib(result.rss_before), mib(result.rss_peak), mib(result.rss_after)),
        ]);
    }
    table.note(format!(
        "Capacity: {}×{} closed loop, {:.0} s after {:.0} s warm-up; then {:.0} s open loop at {OVERLOAD_FACTOR}× the \
         better of the two capacities over {CONNECTIONS} connections, every call with a {} ms deadline (grpc-timeout). Registry \
         on PostgreSQL (pool of 8), {} cards, log filter `warn`. Accepted = answered with the card's status; \
         \"after their deadline\" is measured by the client, from sending to the answer; tonic's \
         client keeps the deadline it sends as well, so a call the server would have answered late mostly shows \
         up as cut off. Refusals carry ErrorInfo \
         reason OVERLOADED. RSS from /proc/PID/status: before the open-loop run, its peak (sampled every 50 ms), 2 s \
         after it.",
        CAPACITY_SPEC.0,
        CAPACITY_SPEC.1,
        (options.duration / 3).max(Duration::from_secs(2)).as_secs_f64(),
        options.warmup.as_secs_f64(),
        options.duration.as_secs_f64(),
        DEADLINE.as_millis(),
        thousands(options.cards as f64),
    ));
    report.tables.push(table);
    for ((limits, capacity), (_, result)) in capacities.into_iter().zip(&results) {
        report.runs.push((format!("capacity {}", limits.name), capacity));
        report.value(&format!("overload {}", limits.name), result);
    }

    let mut problems = Vec::new();
    if let Some((_, shed)) = results.iter().find(|(limits, _)| limits.name == SHEDDING.name) {
        if shed.shed() == 0 {
            problems.push("the shedding server refused nothing at twice its capacity".to_owned());
        }
        // Taken on but too late: answered after the deadline, or cut off there. ~0: one in a
        // thousand is allowed for the scheduling of client and server on the shared cores.
        let late = shed.accepted_late + shed.expired;
        if late > (shed.accepted + shed.expired) / 1000 {
            problems.push(format!(
                "{late} of {} calls the shedding server took on missed their deadline",
                shed.accepted + shed.expired
            ));
        }
        if shed.accepted == 0 {
            problems.push("the shedding server accepted nothing".to_owned());
        }
    }
    Ok(problems)
}
