//! The read path: CheckCard against the echo baseline, CheckCards batches, the h2load
//! cross-check, and the 10M-card scale run.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use tonic::Status;
use yidi_grpc::balance::Balanced;
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_runtime::scratch::ScratchDatabase;

use crate::{
    Options, cards, echo,
    load::{self, LoadResult, LoadSpec},
    process::{self, BenchCerts, Server},
    raw,
    report::{LATENCY_COLUMNS, Report, Table, latency_row, thousands},
};

/// The demo's relying party: over mutual TLS the load generator presents its certificate, and a
/// relying party may check cards only in its own name.
pub const RELYING_PARTY: &str = yidi_demo::topology::RELYING_PARTY;
/// Cards per CheckCards call (the registry's limit).
pub const BATCH: usize = 1000;
/// Distinct pre-encoded batches the load generator cycles through.
const BATCHES: u64 = 32;

pub fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn check_request(i: u64) -> pb::CheckCardRequest {
    let (id_number, card_serial) = cards::card(i);
    pb::CheckCardRequest { id_number, card_serial, relying_party: RELYING_PARTY.into(), nonce: Vec::new() }
}

/// One CheckCard of a random loaded card; anything but VALID is an error.
pub async fn check_card(channel: Balanced, n: u64, count: u64) -> Result<u64, Status> {
    let answer = LossRegistryClient::new(channel).check_card(check_request(mix(n) % count)).await?.into_inner();
    if answer.status != pb::CardStatus::Valid as i32 {
        return Err(Status::internal(format!("card {} answered status {}", mix(n) % count, answer.status)));
    }
    // Every answer must be verifiable: a signed statement of the status it gives (verifying each
    // signature here would take the cores the server needs; the registry's tests verify them).
    let signed = answer.signed_status.as_ref().and_then(|s| s.statement.as_ref().map(|st| (st, &s.signature)));
    if !signed.is_some_and(|(statement, signature)| statement.status == answer.status && signature.len() == 64) {
        return Err(Status::internal(format!("card {}: the answer carries no signed statement", mix(n) % count)));
    }
    Ok(1)
}

/// [`BATCHES`] CheckCards requests of [`BATCH`] random loaded cards, encoded.
fn batches(count: u64, size: usize) -> Vec<prost::bytes::Bytes> {
    (0..BATCHES)
        .map(|b| {
            let request = pb::CheckCardsRequest {
                cards: (0..size as u64)
                    .map(|k| {
                        let (id_number, card_serial) = cards::card(mix(b * 1_000_003 + k) % count);
                        pb::CardQuery { id_number, card_serial }
                    })
                    .collect(),
                relying_party: RELYING_PARTY.into(),
            };
            prost::bytes::Bytes::from(prost::Message::encode_to_vec(&request))
        })
        .collect()
}

async fn check_cards(channel: Balanced, batch: prost::bytes::Bytes, size: usize) -> Result<u64, Status> {
    let answer: pb::CheckCardsResponse = raw::unary(channel, "/yidi.v1.LossRegistry/CheckCards", batch).await?;
    let valid = answer.results.iter().filter(|r| r.status == pb::CardStatus::Valid as i32).count();
    if answer.results.len() != size || valid != size {
        return Err(Status::internal(format!("{} results, {valid} valid, of {size}", answer.results.len())));
    }
    Ok(size as u64)
}

pub async fn run_echo(server: &Server, spec: LoadSpec) -> anyhow::Result<LoadResult> {
    load::drive(server.targets(), spec, |channel, _| echo::call(channel)).await
}

pub async fn run_check(server: &Server, spec: LoadSpec, count: u64) -> anyhow::Result<LoadResult> {
    load::drive(server.targets(), spec, move |channel, n| check_card(channel, n, count)).await
}

pub async fn run_batch(server: &Server, spec: LoadSpec, count: u64, size: usize) -> anyhow::Result<LoadResult> {
    let batches = std::sync::Arc::new(batches(count, size));
    load::drive(server.targets(), spec, move |channel, n| {
        let batch = batches[(n % BATCHES) as usize].clone();
        check_cards(channel, batch, size)
    })
    .await
}

/// The registry on `url`, with the environment `--registry-env` gives.
async fn start_registry(options: &Options, dir: &Path, url: &str, tls: Option<&BenchCerts>) -> anyhow::Result<Server> {
    let env: Vec<(&str, &str)> = options.registry_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    process::start_registry_with_env(dir, &options.bin_dir, url, tls, &env).await
}

/// A registry on a fresh database holding `count` synthetic cards.
pub struct LoadedRegistry {
    pub server: Server,
    pub database: Option<ScratchDatabase>,
    pub load_seconds: f64,
    pub count: u64,
    url: String,
    dir: PathBuf,
}

impl LoadedRegistry {
    /// Over mutual TLS (access layer on) with `tls`, plaintext without.
    pub async fn start(
        options: &Options,
        label: &str,
        postgres: bool,
        count: u64,
        tls: Option<&BenchCerts>,
    ) -> anyhow::Result<Self> {
        let dir = options.work.join(label);
        std::fs::create_dir_all(&dir)?;
        let (url, database) = if postgres {
            let database = ScratchDatabase::create(&options.postgres_url, &format!("bench_{label}"))
                .await
                .with_context(|| format!("creating a database on {}", options.postgres_url))?;
            (database.url().to_owned(), Some(database))
        } else {
            let file = dir.join("registry.db");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
            (format!("sqlite://{}?mode=rwc", file.display()), None)
        };
        eprintln!("{label}: loading {count} cards");
        let load_seconds = cards::load(&url, count).await?;
        eprintln!("{label}: loaded in {load_seconds:.1} s; starting the registry");
        let server = start_registry(options, &dir, &url, tls).await?;
        Ok(Self { server, database, load_seconds, count, url, dir })
    }

    /// The registry stopped and started again on the same cards, over `tls` or plaintext.
    pub async fn restart(self, options: &Options, tls: Option<&BenchCerts>) -> anyhow::Result<Self> {
        self.server.stop().await?;
        let server = start_registry(options, &self.dir, &self.url, tls).await?;
        Ok(Self { server, ..self })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await?;
        if let Some(database) = self.database {
            database.drop().await?;
        }
        Ok(())
    }
}

fn spec(options: &Options, connections: usize, in_flight: usize) -> LoadSpec {
    LoadSpec { connections, in_flight, warmup: options.warmup, duration: options.duration }
}

/// CheckCard vs the echo at several concurrencies (PostgreSQL and SQLite registries) and
/// CheckCards, first over mutual TLS with the access layer on (what ships; the echo over the same
/// TLS), then plaintext for reference; and the h2load cross-check (plaintext: h2load presents no
/// client certificate).
pub async fn registry(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let count = options.cards;
    let certs = BenchCerts::create(&options.work.join("certs"))?;
    let mut postgres = LoadedRegistry::start(options, "check_postgres", true, count, Some(&certs)).await?;
    let mut sqlite = LoadedRegistry::start(options, "check_sqlite", false, count, Some(&certs)).await?;
    for tls in [Some(&certs), None] {
        if tls.is_none() {
            postgres = postgres.restart(options, None).await?;
            sqlite = sqlite.restart(options, None).await?;
        }
        let echo_server = process::start_echo(&options.work, tls).await?;
        check_against_echo(options, report, &echo_server, &postgres, &sqlite).await?;
        check_cards_table(options, report, &postgres).await?;
        if tls.is_none() {
            h2load(options, report, &echo_server, &postgres).await?;
        }
        echo_server.stop().await?;
    }
    postgres.stop().await?;
    sqlite.stop().await?;
    Ok(())
}

/// Run names: `tls_...` over mutual TLS, unprefixed (as before) plaintext.
fn run_name(server: &Server, name: &str) -> String {
    if server.target.tls.is_some() { format!("tls_{name}") } else { name.to_owned() }
}

async fn check_against_echo(
    options: &Options,
    report: &mut Report,
    echo_server: &Server,
    postgres: &LoadedRegistry,
    sqlite: &LoadedRegistry,
) -> anyhow::Result<()> {
    let count = postgres.count;
    let mut table = Table::new(
        &format!(
            "CheckCard vs bare tonic echo, {} ({} cards)",
            postgres.server.target.transport(),
            thousands(count as f64)
        ),
        LATENCY_COLUMNS,
    );
    for connections in &options.connection_levels {
        let spec = spec(options, *connections, 1);
        let baseline = run_echo(echo_server, spec).await?;
        table.row(latency_row("echo (baseline)", &baseline, None));
        let pg = run_check(&postgres.server, spec, count).await?;
        table.row(latency_row("CheckCard, registry on PostgreSQL", &pg, Some(&baseline)));
        let lite = run_check(&sqlite.server, spec, count).await?;
        table.row(latency_row("CheckCard, registry on SQLite", &lite, Some(&baseline)));
        report.runs.push((run_name(echo_server, &format!("echo_{connections}x1")), baseline));
        report.runs.push((run_name(&postgres.server, &format!("check_postgres_{connections}x1")), pg));
        report.runs.push((run_name(&sqlite.server, &format!("check_sqlite_{connections}x1")), lite));
    }
    let how = if postgres.server.target.tls.is_some() {
        "Mutual TLS with the demo's certificates: the load generator presents the relying party's \
         certificate, the registry's access layer checks it against the directory, and the echo \
         demands a client certificate of the same CA (no access layer: it has none)."
    } else {
        "Plaintext (`tls.plaintext = true`: no TLS, no caller identity, access layer off), for reference."
    };
    table.note(format!(
        "Each row: {:.0} s after {:.0} s warm-up; connections × requests in flight per connection, closed loop. \
         Load generator (tonic client) in the same machine; servers are separate processes. {how}",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64()
    ));
    report.tables.push(table);
    Ok(())
}

async fn check_cards_table(options: &Options, report: &mut Report, postgres: &LoadedRegistry) -> anyhow::Result<()> {
    let mut batch_table = Table::new(
        &format!("CheckCards (1,000 cards per call, PostgreSQL registry), {}", postgres.server.target.transport()),
        &["connections×in flight", "calls/s", "card checks/s", "p50 ms", "p99 ms", "errors"],
    );
    for (connections, in_flight) in [(1, 1), (2, 2), (4, 2)] {
        let result = run_batch(&postgres.server, spec(options, connections, in_flight), postgres.count, BATCH).await?;
        batch_table.row(vec![
            format!("{connections}×{in_flight}"),
            thousands(result.requests_per_second),
            thousands(result.items_per_second),
            crate::report::ms(result.p50_us),
            crate::report::ms(result.p99_us),
            result.errors.to_string(),
        ]);
        report.runs.push((run_name(&postgres.server, &format!("check_cards_{connections}x{in_flight}")), result));
    }
    report.tables.push(batch_table);
    Ok(())
}

/// Requests/s h2load reaches on `path` of `endpoint` with `body` (a gRPC frame), or why not.
async fn h2load_run(options: &Options, endpoint: &str, path: &str, body: &Path) -> Result<f64, String> {
    let args = h2load_args(options, &format!("{endpoint}{path}"), body);
    let output = tokio::process::Command::new("h2load").args(&args).output().await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    let failed = text.lines().any(|l| l.starts_with("requests:") && !l.contains(" 0 failed, 0 errored"));
    match rps {
        Some(rps) if !failed => Ok(rps),
        _ => Err(format!("h2load output not understood or requests failed:\n```\n{text}\n```")),
    }
}

fn h2load_args(options: &Options, url: &str, body: &Path) -> Vec<String> {
    [
        "-c",
        "32",
        "-m",
        "1",
        "-D",
        &options.duration.as_secs().max(1).to_string(),
        "--warm-up-time",
        &options.warmup.as_secs().max(1).to_string(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-d",
        &body.display().to_string(),
        url,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect()
}

/// h2load, a much lighter client than tonic, on the echo and on CheckCard at 32 connections: the
/// ratio each client measures is what must agree (on two shared cores the client's own CPU cost
/// sets how much is left for the server, so absolute figures differ with the client).
async fn h2load(
    options: &Options,
    report: &mut Report,
    echo_server: &Server,
    registry: &LoadedRegistry,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.out)?;
    let check_body = options.out.join("check_card_request.bin");
    std::fs::write(&check_body, raw::grpc_frame(&check_request(12_345 % registry.count)))?;
    let echo_body = options.out.join("echo_request.bin");
    std::fs::write(&echo_body, raw::grpc_frame(&echo::pb::EchoRequest { payload: vec![7; echo::PAYLOAD_LEN] }))?;
    let spec = spec(options, 32, 1);
    let mut table = Table::new(
        "h2load cross-check (32 connections × 1 stream)",
        &["client", "echo requests/s", "CheckCard requests/s", "CheckCard / echo"],
    );
    let echo_tonic = run_echo(echo_server, spec).await?;
    let check_tonic = run_check(&registry.server, spec, registry.count).await?;
    let ratio = |check: f64, echo: f64| format!("{:.2}", check / echo.max(1.0));
    table.row(vec![
        "yidi-bench (tonic)".into(),
        thousands(echo_tonic.requests_per_second),
        thousands(check_tonic.requests_per_second),
        ratio(check_tonic.requests_per_second, echo_tonic.requests_per_second),
    ]);
    let echo_h2 = h2load_run(options, &echo_server.target.url, "/yidi.bench.v1.Echo/Echo", &echo_body).await;
    let check_h2 =
        h2load_run(options, &registry.server.target.url, "/yidi.v1.LossRegistry/CheckCard", &check_body).await;
    match (echo_h2, check_h2) {
        (Ok(echo_rps), Ok(check_rps)) => {
            let tonic_ratio = check_tonic.requests_per_second / echo_tonic.requests_per_second.max(1.0);
            let h2_ratio = check_rps / echo_rps.max(1.0);
            table.row(vec!["h2load".into(), thousands(echo_rps), thousands(check_rps), ratio(check_rps, echo_rps)]);
            table.note(format!(
                "The CheckCard/echo ratios differ by {:.0}% between the two clients. \
                 Command (body files written by yidi-bench into target/bench/): `h2load {}`",
                (h2_ratio / tonic_ratio - 1.0).abs() * 100.0,
                h2load_args(options, "http://127.0.0.1:PORT/yidi.v1.LossRegistry/CheckCard", &check_body)
                    .iter()
                    .map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() })
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            report.value("h2load_echo_rps", echo_rps);
            report.value("h2load_check_rps", check_rps);
        }
        (echo, check) => {
            for error in [echo.err(), check.err()].into_iter().flatten() {
                table.note(format!("h2load not measured ({error}); install Debian's nghttp2-client"));
            }
        }
    }
    report.runs.push(("h2load_reference_tonic_echo_32x1".into(), echo_tonic));
    report.runs.push(("h2load_reference_tonic_check_32x1".into(), check_tonic));
    report.tables.push(table);
    Ok(())
}

/// 100k vs 10M cards: load time, start-up (index load), resident memory, CheckCard latency; over
/// mutual TLS (what ships), the echo too.
pub async fn scale(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let certs = BenchCerts::create(&options.work.join("certs"))?;
    let echo_server = process::start_echo(&options.work, Some(&certs)).await?;
    let empty = LoadedRegistry::start(options, "scale_empty", true, 0, Some(&certs)).await?;
    warm(&empty.server).await;
    let rss_empty = empty.server.rss_bytes()?;
    empty.stop().await?;

    let mut table = Table::new(
        &format!(
            "Scale: the card index at {} and at {} cards (PostgreSQL, mutual TLS)",
            thousands(options.cards as f64),
            thousands(options.scale_cards as f64)
        ),
        &[
            "cards",
            "load (COPY) s",
            "registry start-up s",
            "index load s",
            "index B/card",
            "first snapshot s",
            "RSS MiB",
            "RSS B/card",
            "peak RSS B/card",
            "CheckCard req/s",
            "vs echo",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
        ],
    );
    let spec = spec(options, 32, 1);
    let mut p99s = Vec::new();
    for count in [options.cards, options.scale_cards] {
        let label = format!("scale_{count}");
        let registry = LoadedRegistry::start(options, &label, true, count, Some(&certs)).await?;
        // Measured once the first status snapshot is built (it reads every card, once an hour by
        // default): a steady registry, not one that is still building.
        let snapshot_seconds = first_snapshot(&registry.server).await?;
        warm(&registry.server).await;
        let rss = registry.server.rss_bytes()?;
        let peak = process::peak_rss_of(registry.server.pid)?;
        let log = registry.server.log_text();
        let index_seconds = process::index_load_seconds(&log);
        let index_bytes = process::log_field(&log, "card index loaded", "bytes");
        let baseline = run_echo(&echo_server, spec).await?;
        let result = run_check(&registry.server, spec, count).await?;
        let per_card = |bytes: u64| bytes.saturating_sub(rss_empty) as f64 / count.max(1) as f64;
        table.row(vec![
            thousands(count as f64),
            format!("{:.1}", registry.load_seconds),
            format!("{:.1}", registry.server.startup.as_secs_f64()),
            index_seconds.map(|s| format!("{s:.1}")).unwrap_or_else(|| "?".into()),
            index_bytes.map(|b| format!("{:.1}", b / count.max(1) as f64)).unwrap_or_else(|| "?".into()),
            format!("{snapshot_seconds:.1}"),
            format!("{:.1}", rss as f64 / 1024.0 / 1024.0),
            format!("{:.1}", per_card(rss)),
            format!("{:.1}", per_card(peak)),
            thousands(result.requests_per_second),
            format!("{:.2}x", result.requests_per_second / baseline.requests_per_second.max(1.0)),
            crate::report::ms(result.p50_us),
            crate::report::ms(result.p99_us),
            crate::report::ms(result.p999_us),
        ]);
        report.value(&format!("rss_bytes_{count}"), rss);
        report.value(&format!("bytes_per_card_{count}"), per_card(rss));
        report.value(&format!("peak_bytes_per_card_{count}"), per_card(peak));
        p99s.push(result.p99_us);
        report.runs.push((format!("scale_echo_{count}"), baseline));
        report.runs.push((format!("scale_check_{count}"), result));
        registry.stop().await?;
    }
    report.value("rss_bytes_empty", rss_empty);
    if let [small, large] = p99s[..] {
        table.note(format!(
            "p99 at {} cards / p99 at {} cards = {:.2}. RSS of a registry on an empty database: {:.1} MiB. \
             Index B/card: the index's own heap bytes (its log line) per card. RSS B/card = (RSS − that) / cards, \
             RSS read from /proc/PID/status once the first status snapshot is built and a few checks made; peak \
             RSS B/card the same with VmHWM, the most the process held (building the snapshot holds every card's \
             key for a while). The CheckCard run follows the build.",
            thousands(options.scale_cards as f64),
            thousands(options.cards as f64),
            large as f64 / small.max(1) as f64,
            rss_empty as f64 / 1024.0 / 1024.0
        ));
    }
    report.tables.push(table);
    echo_server.stop().await?;
    Ok(())
}

/// Waits (15 minutes at most) until the registry logs its first status snapshot; the seconds it
/// says the build took.
async fn first_snapshot(server: &Server) -> anyhow::Result<f64> {
    for _ in 0..9000 {
        if let Some(seconds) = process::log_field(&server.log_text(), "status snapshot built", "seconds") {
            return Ok(seconds);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no status snapshot within 15 minutes:\n{}", server.log_text())
}

/// A few calls so that lazily allocated parts (connections, buffers) count in the RSS.
async fn warm(server: &Server) {
    let spec = LoadSpec { connections: 2, in_flight: 1, warmup: Duration::ZERO, duration: Duration::from_millis(500) };
    let _ = load::drive(server.targets(), spec, |channel, _| async move {
        LossRegistryClient::new(channel).check_card(check_request(0)).await.map(|_| 1)
    })
    .await;
}

/// A few seconds of everything the read path has, tiny, on SQLite: so the harness cannot rot.
/// Plaintext, then one point over mutual TLS (echo and CheckCard).
pub async fn smoke(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let count = options.cards;
    let certs = BenchCerts::create(&options.work.join("certs"))?;
    let echo_server = process::start_echo(&options.work, None).await?;
    let registry = LoadedRegistry::start(options, "smoke_sqlite", false, count, None).await?;
    let spec = spec(options, 4, 1);
    let baseline = run_echo(&echo_server, spec).await?;
    let check = run_check(&registry.server, spec, count).await?;
    let batch = run_batch(&registry.server, spec, count, 100.min(count as usize)).await?;
    echo_server.stop().await?;
    let registry = registry.restart(options, Some(&certs)).await?;
    let tls_echo_server = process::start_echo(&options.work, Some(&certs)).await?;
    let tls_baseline = run_echo(&tls_echo_server, spec).await?;
    let tls_check = run_check(&registry.server, spec, count).await?;
    let mut table = Table::new("Smoke (debug build, SQLite, no thresholds)", LATENCY_COLUMNS);
    table.row(latency_row("echo (baseline), plaintext", &baseline, None));
    table.row(latency_row("CheckCard, plaintext", &check, Some(&baseline)));
    table.row(latency_row("CheckCards of 100, plaintext", &batch, Some(&baseline)));
    table.row(latency_row("echo (baseline), mutual TLS", &tls_baseline, None));
    table.row(latency_row("CheckCard, mutual TLS, access layer on", &tls_check, Some(&tls_baseline)));
    report.tables.push(table);
    let failed: Vec<String> = [&baseline, &check, &batch, &tls_baseline, &tls_check]
        .iter()
        .filter(|r| r.requests == 0 || r.errors > 0)
        .map(|r| format!("{} requests, {} errors, first: {:?}", r.requests, r.errors, r.first_error))
        .collect();
    report.runs.extend([
        ("echo".into(), baseline),
        ("check".into(), check),
        ("batch".into(), batch),
        ("tls_echo".into(), tls_baseline),
        ("tls_check".into(), tls_check),
    ]);
    tls_echo_server.stop().await?;
    registry.stop().await?;
    anyhow::ensure!(failed.is_empty(), "smoke run failed: {}", failed.join("; "));
    Ok(())
}

/// Where reports go by default: `target/bench` next to the profile folder of the binary.
pub fn default_out(bin_dir: &Path) -> std::path::PathBuf {
    bin_dir.parent().unwrap_or(bin_dir).join("bench")
}
