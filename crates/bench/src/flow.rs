//! The write path: the whole replacement flow (intake → verification → issuance → registry, five
//! processes, each on its own PostgreSQL database) as completed applications per second at
//! several concurrencies, against the commit rate of the same PostgreSQL server in the same run.
use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tokio_stream::StreamExt;
use yidi_demo::suite::{Backend, ClockSetting, Suite, SuiteOptions};
use yidi_demo::topology::{Process, STATION, operator_id};
use yidi_domain::OperatorAccess;
use yidi_proto::v1::{self as pb, intake_client::IntakeClient};
use yidi_runtime::scratch::ScratchDatabase;
use yidi_runtime::{config::DatabaseConfig, population::Citizen};

use crate::{
    Options,
    process::{cpu_seconds_of, machine_busy_seconds},
    report::{Report, Table, ms, thousands},
};

/// Applications per level: enough that the last in-flight ones weigh little.
fn applications_at(concurrency: usize) -> usize {
    (concurrency * 6).max(96)
}
/// Connections of the commit-rate runs; 32 is about what the five services' pools hold together.
const COMMIT_LEVELS: [usize; 3] = [1, 8, 32];
/// An application not ready for collection by then is a failure.
const FLOW_TIMEOUT: Duration = Duration::from_secs(180);
/// PostgreSQL backends publish their statistics at most this late (PGSTAT_IDLE_INTERVAL is 10 s).
const STATS_DELAY: Duration = Duration::from_secs(11);

async fn connect(url: &str, connections: u32) -> anyhow::Result<DatabaseConnection> {
    Ok(yidi_runtime::db::connect(&DatabaseConfig { url: url.to_owned(), max_connections: connections }).await?)
}

/// Single-row INSERT transactions per second at `connections` concurrent connections.
async fn commit_rate(options: &Options, connections: usize) -> anyhow::Result<f64> {
    let database = ScratchDatabase::create(&options.postgres_url, "bench_commits").await?;
    let db = connect(database.url(), connections as u32).await?;
    db.execute_unprepared(
        "CREATE TABLE commits (id BIGSERIAL PRIMARY KEY, worker INT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let started = Instant::now();
    let measure_from = started + options.warmup;
    let end = measure_from + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let db = db.clone();
        tasks.spawn(async move {
            let mut counted = 0u64;
            let statement = format!("INSERT INTO commits (worker) VALUES ({worker})");
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                db.execute_unprepared(&statement).await?;
                if began >= measure_from && Instant::now() <= end {
                    counted += 1;
                }
            }
            anyhow::Ok(counted)
        });
    }
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        total += joined??;
    }
    db.close().await?;
    database.drop().await?;
    Ok(total as f64 / options.duration.as_secs_f64())
}

/// Per bureau database: transactions committed, rows written.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct DbStats {
    xact_commit: i64,
    rows_written: i64,
}

fn database_url(suite: &Suite, process: Process) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(suite.config_path(process))?;
    let config: toml::Value = toml::from_str(&text)?;
    let url = config.get("database").and_then(|d| d.get("url")).and_then(|u| u.as_str());
    Ok(url.context("no database.url in a bureau's config")?.to_owned())
}

fn database_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default().to_owned()
}

/// The transaction ids (xmin) of every row version now visible in a bureau's tables: each is a
/// transaction that wrote (read-only transactions get no id).
async fn writers(url: &str) -> anyhow::Result<HashSet<String>> {
    let db = connect(url, 1).await?;
    let backend = db.get_database_backend();
    let tables = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'seaql_migrations'",
        ))
        .await?;
    let mut ids = HashSet::new();
    for table in tables {
        let name: String = table.try_get_by_index(0)?;
        let rows = db
            .query_all_raw(Statement::from_string(backend, format!("SELECT DISTINCT xmin::text FROM \"{name}\"")))
            .await?;
        for row in rows {
            ids.insert(row.try_get_by_index::<String>(0)?);
        }
    }
    db.close().await?;
    Ok(ids)
}

/// The next transaction id the server will assign. Only a transaction that writes gets one, and
/// reading this assigns none, so the difference over a level is the writing transactions of the
/// whole server in it: exact, where the xmin count of [`writers`] misses a transaction whose every
/// row was written again later (progress rows, claimed and settled messages).
async fn next_transaction_id(admin: &DatabaseConnection) -> anyhow::Result<i64> {
    let row = admin
        .query_one_raw(Statement::from_string(
            admin.get_database_backend(),
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
        ))
        .await?
        .context("no snapshot")?;
    Ok(row.try_get_by_index(0)?)
}

async fn stats(
    admin: &DatabaseConnection,
    names: &BTreeMap<Process, String>,
) -> anyhow::Result<BTreeMap<Process, DbStats>> {
    let mut out = BTreeMap::new();
    for (process, name) in names {
        let row = admin
            .query_one_raw(Statement::from_string(
                admin.get_database_backend(),
                format!(
                    "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = '{name}'"
                ),
            ))
            .await?
            .context("no statistics for a bureau's database")?;
        out.insert(*process, DbStats { xact_commit: row.try_get_by_index(0)?, rows_written: row.try_get_by_index(1)? });
    }
    Ok(out)
}

/// Submits a replacement for `citizen` and waits until its card is ready for collection.
async fn replace(intake: IntakeClient<tonic::transport::Channel>, citizen: &Citizen) -> anyhow::Result<()> {
    let mut intake = intake;
    let submitted = intake
        .submit_application(pb::SubmitApplicationRequest {
            kind: pb::ApplicationKind::Replacement as i32,
            applicant: Some(yidi_tests::applicant(citizen)),
            card_serial: yidi_tests::serial(citizen),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .application
        .context("no application in the answer")?;
    let mut watch = intake
        .watch_application(pb::WatchApplicationRequest { application_id: submitted.application_id.clone() })
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + FLOW_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, watch.next()).await.context("timed out")?;
        let application = next.context("watch ended")??.application.context("empty update")?;
        match pb::ApplicationState::try_from(application.state) {
            Ok(pb::ApplicationState::ReadyForCollection) => return Ok(()),
            Ok(pb::ApplicationState::Refused | pb::ApplicationState::Cancelled) => {
                bail!(
                    "application {} ended {:?}: {}",
                    application.application_id,
                    application.state,
                    application.last_error
                )
            }
            _ => {}
        }
    }
}

/// CPU seconds used so far by each bureau process, by this load generator and by the whole machine.
struct CpuReading {
    bureaus: BTreeMap<Process, f64>,
    load_generator: f64,
    machine: f64,
}

fn read_cpu(suite: &Suite) -> anyhow::Result<CpuReading> {
    let mut bureaus = BTreeMap::new();
    for process in Process::ALL {
        let pid = suite.pid(process).with_context(|| format!("{} is not running", process.slug()))?;
        bureaus.insert(process, cpu_seconds_of(pid)?);
    }
    Ok(CpuReading { bureaus, load_generator: cpu_seconds_of(std::process::id())?, machine: machine_busy_seconds()? })
}

struct Level {
    concurrency: usize,
    applications: usize,
    seconds: f64,
    latencies: Histogram<u64>,
    failures: Vec<String>,
}

async fn run_level(suite: &Suite, citizens: &Arc<Mutex<Vec<Citizen>>>, concurrency: usize) -> anyhow::Result<Level> {
    let applications = applications_at(concurrency);
    // Over mutual TLS as the station's admin operator, whom SubmitApplication grants.
    let channel = suite.channel_as(Process::Intake, &operator_id(STATION, OperatorAccess::Admin)).await?;
    let remaining = Arc::new(Mutex::new(applications));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let intake = IntakeClient::new(channel.clone());
        let citizens = Arc::clone(citizens);
        let remaining = Arc::clone(&remaining);
        tasks.spawn(async move {
            let mut latencies = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut failures = Vec::new();
            loop {
                {
                    let Ok(mut left) = remaining.lock() else { break };
                    if *left == 0 {
                        break;
                    }
                    *left -= 1;
                }
                let Some(citizen) = citizens.lock().ok().and_then(|mut c| c.pop()) else {
                    failures.push("out of citizens".to_owned());
                    break;
                };
                let began = Instant::now();
                match replace(intake.clone(), &citizen).await {
                    Ok(()) => latencies.saturating_record(began.elapsed().as_micros() as u64),
                    Err(error) => failures.push(format!("{error:#}")),
                }
            }
            anyhow::Ok((latencies, failures))
        });
    }
    let mut level = Level {
        concurrency,
        applications,
        seconds: 0.0,
        latencies: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        failures: Vec::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let (latencies, failures) = joined??;
        level.latencies.add(&latencies)?;
        level.failures.extend(failures);
    }
    level.seconds = started.elapsed().as_secs_f64();
    Ok(level)
}

pub async fn write(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let mut commits = Table::new(
        "PostgreSQL commit rate (single-row INSERT transactions, autocommit), same server, same run",
        &["connections", "commits/s"],
    );
    let mut best_commit_rate: f64 = 0.0;
    for connections in COMMIT_LEVELS.into_iter().filter(|c| *c <= options.commit_max) {
        let rate = commit_rate(options, connections).await?;
        commits.row(vec![connections.to_string(), thousands(rate)]);
        report.value(&format!("commit_rate_{connections}"), rate);
        best_commit_rate = best_commit_rate.max(rate);
    }
    report.tables.push(commits);

    let total: usize = options.flow_levels.iter().map(|c| applications_at(*c)).sum();
    eprintln!("write: starting the suite on PostgreSQL with {total} citizens to replace");
    let now = yidi_tests::at(yidi_tests::NATIONAL_DAY);
    let dir = options.work.join("suite");
    let mut suite_options = SuiteOptions::new(dir, options.bin_dir.clone(), now);
    suite_options.backend = Backend::Postgres { admin_url: options.postgres_url.clone() };
    suite_options.clock = ClockSetting::Start(now);
    suite_options.citizens_per_province = total / 2 + 40;
    suite_options.production_delay_ms = 0;
    // What ships: mutual TLS between the bureaus and from the caller, access layer on.
    suite_options.tls = true;
    let suite = Suite::start(suite_options).await?;
    let citizens: Vec<Citizen> =
        suite.population.citizens.iter().filter(|c| c.scenario == "ordinary" && c.card.is_some()).cloned().collect();
    let citizens = Arc::new(Mutex::new(citizens));
    let urls: BTreeMap<Process, String> =
        Process::ALL.iter().map(|p| database_url(&suite, *p).map(|n| (*p, n))).collect::<Result<_, _>>()?;
    let names: BTreeMap<Process, String> = urls.iter().map(|(p, url)| (*p, database_name(url))).collect();
    let admin = connect(&options.postgres_url, 1).await?;
    // Start-up (imports) must be in the baseline, not in the flow's figures.
    tokio::time::sleep(STATS_DELAY).await;
    let before = stats(&admin, &names).await?;
    let mut writers_before = BTreeMap::new();
    for (process, url) in &urls {
        writers_before.insert(*process, writers(url).await?);
    }

    let mut table = Table::new(
        "Replacement flow on PostgreSQL, mutual TLS: submitted → ready for collection",
        &[
            "applications in flight",
            "applications",
            "completed/s",
            "p50 s",
            "p99 s",
            "failures",
            "writing transactions/application (all five, exact)",
        ],
    );
    let mut cpu = Table::new(
        "CPU per completed application, ms, by process (from /proc; the rest is PostgreSQL, the kernel's \
         softirq work and anything else running)",
        &[
            "applications in flight",
            "station",
            "home bureaus",
            "producer",
            "registry",
            "load generator",
            "the rest",
            "whole machine",
        ],
    );
    let mut completed = 0usize;
    let mut best_rate: f64 = 0.0;
    let mut writing_at_best = 0.0;
    for concurrency in options.flow_levels.iter().copied() {
        let cpu_before = read_cpu(&suite)?;
        let xid_before = next_transaction_id(&admin).await?;
        let level = run_level(&suite, &citizens, concurrency).await?;
        let xid_after = next_transaction_id(&admin).await?;
        let cpu_after = read_cpu(&suite)?;
        let done = level.latencies.len() as usize;
        completed += done;
        let rate = done as f64 / level.seconds;
        let writing = (xid_after - xid_before) as f64 / done.max(1) as f64;
        if rate > best_rate {
            best_rate = rate;
            writing_at_best = writing;
        }
        report.value(&format!("flow_writing_transactions_per_application_{concurrency}"), writing);
        table.row(vec![
            level.concurrency.to_string(),
            level.applications.to_string(),
            format!("{rate:.1}"),
            format!("{:.2}", level.latencies.value_at_quantile(0.5) as f64 / 1e6),
            format!("{:.2}", level.latencies.value_at_quantile(0.99) as f64 / 1e6),
            level.failures.len().to_string(),
            format!("{writing:.1}"),
        ]);
        if let Some(first) = level.failures.first() {
            table.note(format!("First failure at {concurrency}: {first}"));
        }
        let ms_per_app = |seconds: f64| seconds * 1000.0 / done.max(1) as f64;
        let per_app = |seconds: f64| format!("{:.1}", ms_per_app(seconds));
        let used = |process: Process| cpu_after.bureaus[&process] - cpu_before.bureaus[&process];
        let bureaus: f64 = Process::ALL.iter().map(|p| used(*p)).sum();
        let load_generator = cpu_after.load_generator - cpu_before.load_generator;
        let machine = cpu_after.machine - cpu_before.machine;
        cpu.row(vec![
            concurrency.to_string(),
            per_app(used(Process::Intake)),
            per_app(used(Process::HomeJiangxi) + used(Process::HomeSichuan)),
            per_app(used(Process::Issuance)),
            per_app(used(Process::Registry)),
            per_app(load_generator),
            per_app(machine - bureaus - load_generator),
            per_app(machine),
        ]);
        report.value(&format!("flow_cpu_ms_per_application_{concurrency}"), ms_per_app(machine));
        report.value(&format!("flow_rate_{concurrency}"), rate);
        report.value(&format!("flow_p50_ms_{concurrency}"), ms(level.latencies.value_at_quantile(0.5)));
    }

    // Backends publish their statistics when they exit: stop the bureaus, then read.
    let mut suite = suite;
    for process in Process::ALL.into_iter().rev() {
        suite.terminate(process).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = stats(&admin, &names).await?;
    let mut new_writers = BTreeMap::new();
    for (process, url) in &urls {
        let now = writers(url).await?;
        new_writers.insert(*process, now.difference(&writers_before[process]).count());
    }
    admin.close().await?;
    suite.stop().await?;

    let mut per_app = Table::new(
        "What one application costs, per bureau database (pg_stat_database, measured over the whole run)",
        &[
            "bureau",
            "writing transactions/application (≥)",
            "all transactions/application (≤, incl. read-only)",
            "rows written/application",
        ],
    );
    let apps = completed.max(1) as f64;
    let mut writing_total = 0.0;
    for (process, b) in &before {
        let a = after.get(process).copied().unwrap_or_default();
        let writing = new_writers.get(process).copied().unwrap_or_default() as f64 / apps;
        writing_total += writing;
        per_app.row(vec![
            process.bureau_id().to_owned(),
            format!("{writing:.1}"),
            format!("{:.1}", (a.xact_commit - b.xact_commit) as f64 / apps),
            format!("{:.1}", (a.rows_written - b.rows_written) as f64 / apps),
        ]);
    }
    let lower_bound = best_commit_rate / writing_total.max(1.0);
    let bound = best_commit_rate / writing_at_best.max(1.0);
    per_app.row(vec!["**all five**".into(), format!("**{writing_total:.1}**"), String::new(), String::new()]);
    per_app.note(format!(
        "Writing transactions in this table are the distinct transaction ids (xmin) of the row versions the run \
         left, per bureau (read-only transactions get none; a transaction whose every row was later updated again \
         is missed, so this is a lower bound). The flow's table counts them exactly for the whole server: the \
         transaction ids assigned during a level, background writes included (the registry's progress rows, \
         autovacuum's analyses). Bound from the commit rate at the best level: {} commits/s ÷ {writing_at_best:.1} \
         = {bound:.1} applications/s; best measured {best_rate:.1}/s = **{:.2}x** of it ({:.2}x with the lower \
         bound of {writing_total:.1}).",
        thousands(best_commit_rate),
        best_rate / bound.max(f64::MIN_POSITIVE),
        best_rate / lower_bound.max(f64::MIN_POSITIVE),
    ));
    report.value("flow_writing_transactions_per_application", writing_at_best);
    report.value("flow_writing_transactions_per_application_lower_bound", writing_total);
    report.value("flow_commit_bound", bound);
    report.value("flow_applications_completed", completed);
    report.value("flow_best_rate", best_rate);
    report.value("commit_rate_best", best_commit_rate);
    let by_bureau = |stats: &BTreeMap<Process, DbStats>| -> BTreeMap<String, DbStats> {
        stats.iter().map(|(p, s)| (p.bureau_id().to_owned(), *s)).collect()
    };
    report.value("db_stats_before", by_bureau(&before));
    report.value("db_stats_after", by_bureau(&after));
    report.tables.push(table);
    report.tables.push(cpu);
    report.tables.push(per_app);
    Ok(())
}
