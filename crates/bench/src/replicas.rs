//! Issue 15: the registry as 1, 2 and 3 replicas on one PostgreSQL database. CheckCard spread
//! over every replica beside the echo baseline (mutual TLS, access layer on, as shipped), and how
//! long a write takes to reach each replica: its status event read from every replica's
//! `WatchRevocations` stream.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use yidi_demo::topology::{HOME_JIANGXI, Process};
use yidi_domain::{CardData, Decision, DecisionPurpose, IdNumber, Particulars};
use yidi_grpc::{balance::Balanced, convert::signed_decision_to_proto};
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_runtime::scratch::ScratchDatabase;
use yidi_status_filter::CardKey;

use crate::{
    Options, cards,
    checks::{check_card, run_echo},
    load::{self, LoadSpec, histogram},
    process::{self, BenchCerts, CLOCK, Server, Target},
    report::{LATENCY_COLUMNS, Report, Table, latency_row, ms, thousands},
};

/// Most replicas measured.
const MOST_REPLICAS: usize = 3;
/// Loss reports of the feed-lag run, one at a time.
const WRITES: usize = 300;
/// Pause between two of them: each is measured alone, not queued behind the last.
const WRITE_PAUSE: Duration = Duration::from_millis(20);

pub async fn replicas(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let certs = BenchCerts::create(&options.work.join("certs"))?;
    let dir = options.work.join("replicas");
    let database = ScratchDatabase::create(&options.postgres_url, "bench_replicas")
        .await
        .with_context(|| format!("creating a database on {}", options.postgres_url))?;
    eprintln!("replicas: loading {} cards", options.cards);
    cards::load(database.url(), options.cards).await?;
    let keys = process::prepare_registry_dir(&dir, Some(&certs))?;
    let echo = process::start_echo(&options.work, Some(&certs)).await?;
    let env: Vec<(&str, &str)> = options.registry_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let mut table = Table::new(
        &format!("CheckCard over 1, 2 and 3 registry replicas, mutual TLS ({} cards)", thousands(options.cards as f64)),
        LATENCY_COLUMNS,
    );
    let mut replicas: Vec<Server> = Vec::new();
    for count in 1..=MOST_REPLICAS {
        let name = format!("replica-{count}");
        eprintln!("replicas: starting {name}");
        replicas
            .push(process::spawn_registry(&dir, &options.bin_dir, database.url(), Some(&certs), &env, &name).await?);
        let targets: Vec<Target> = replicas.iter().map(|server| server.target.clone()).collect();
        for connections in &options.connection_levels {
            let spec = LoadSpec {
                connections: *connections,
                in_flight: 1,
                warmup: options.warmup,
                duration: options.duration,
            };
            let baseline = run_echo(&echo, spec).await?;
            table.row(latency_row("echo (baseline)", &baseline, None));
            let cards = options.cards;
            let result = load::drive(&targets, spec, move |channel, n| check_card(channel, n, cards)).await?;
            let label = format!("CheckCard, {count} replica{}", if count == 1 { "" } else { "s" });
            table.row(latency_row(&label, &result, Some(&baseline)));
            report.runs.push((format!("tls_echo_{count}r_{connections}x1"), baseline));
            report.runs.push((format!("tls_check_{count}r_{connections}x1"), result));
        }
    }
    table.note(format!(
        "Each row: {:.0} s after {:.0} s warm-up, closed loop, one request in flight per connection. With n replicas \
         the load generator opens the given number of connections to each and spreads its calls round robin over \
         them (the `Balanced` channel every bureau's client uses); the echo baseline before each row gets the \
         connections alone. Every process shares the machine's cores with the load generator, so more replicas \
         here add no cores: they show what replication costs a check (feed follower, fencing), not scale-out.",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64()
    ));
    report.tables.push(table);

    let jiangxi = keys.of(HOME_JIANGXI).last().context("no key of the Jiangxi home bureau")?;
    let lag = feed_lag(&certs, &replicas, options.cards, &jiangxi.id, &jiangxi.key).await?;
    report.tables.push(lag.table(replicas.len()));
    report.value("feed_lag", lag.summary());

    for server in replicas {
        server.stop().await?;
    }
    echo.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Microsecond histograms of the feed-lag run.
struct Lag {
    /// Loss report sent → acknowledged (every replica applied it or fenced).
    acknowledged: Histogram<u64>,
    /// Loss report sent → its event out of one replica's stream (every replica, every write).
    each_replica: Histogram<u64>,
    /// Loss report sent → its event out of the last replica's stream.
    slowest_replica: Histogram<u64>,
    /// First replica's event → last replica's event, per write.
    first_to_last: Histogram<u64>,
}

impl Lag {
    fn table(&self, replicas: usize) -> Table {
        let mut table = Table::new(
            &format!("Feed lag: a loss report reaching {replicas} registry replicas (PostgreSQL, mutual TLS)"),
            &["interval", "p50 ms", "p99 ms", "max ms", "samples"],
        );
        for (name, histogram) in [
            ("write sent → acknowledged", &self.acknowledged),
            ("write sent → event out of a replica's stream (each replica)", &self.each_replica),
            ("write sent → event out of the slowest replica", &self.slowest_replica),
            ("first replica's event → last replica's event", &self.first_to_last),
        ] {
            table.row(vec![
                name.to_owned(),
                ms(histogram.value_at_quantile(0.5)),
                ms(histogram.value_at_quantile(0.99)),
                ms(histogram.max()),
                histogram.len().to_string(),
            ]);
        }
        table.note(format!(
            "{WRITES} ReportLoss calls one at a time ({} ms apart) through a `Balanced` channel over the replicas, \
             as the station; each replica's WatchRevocations stream read as the relying party. \"Write sent\" \
             precedes the commit by the call's own work (decision check, lock, transaction), so the second and third \
             rows bound commit → applied from above; the last row is how much later the slowest replica applied \
             an entry than the first (usually the writer, which applies its own commit at once).",
            WRITE_PAUSE.as_millis()
        ));
        table
    }

    fn summary(&self) -> serde_json::Value {
        let quantiles = |h: &Histogram<u64>| serde_json::json!({ "p50_us": h.value_at_quantile(0.5), "p99_us": h.value_at_quantile(0.99), "max_us": h.max() });
        serde_json::json!({
            "acknowledged": quantiles(&self.acknowledged),
            "each_replica": quantiles(&self.each_replica),
            "slowest_replica": quantiles(&self.slowest_replica),
            "first_to_last": quantiles(&self.first_to_last),
        })
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// [`WRITES`] loss reports of even (Jiangxi) cards, one at a time, through every replica in
/// turn; when each one's status event came out of each replica's revocation stream.
async fn feed_lag(
    certs: &BenchCerts,
    replicas: &[Server],
    cards: u64,
    key_id: &str,
    key: &ed25519_dalek::SigningKey,
) -> anyhow::Result<Lag> {
    ensure!(cards >= 2 * WRITES as u64, "the feed-lag run needs {} cards", 2 * WRITES);
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(usize, Vec<u8>, Instant)>();
    let mut watchers = Vec::new();
    for (replica, server) in replicas.iter().enumerate() {
        let channel = server.target.connect().await?;
        let request = pb::WatchRevocationsRequest { after_sequence: 0 };
        let mut stream = LossRegistryClient::new(channel).watch_revocations(request).await?.into_inner();
        let arrivals = arrivals.clone();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if arrivals.send((replica, event.card_digest, Instant::now())).is_err() {
                    break;
                }
            }
        }));
    }
    drop(arrivals);
    let station = Process::Intake.bureau_id();
    let registry = Process::Registry.bureau_id();
    let mut endpoints = Vec::new();
    for server in replicas {
        let tls = certs.client_as(station, registry)?;
        let target = Target { url: server.target.url.clone(), tls: Some(tls) };
        endpoints.push((target.url.clone(), target.connect().await?));
    }
    let mut client = LossRegistryClient::new(Balanced::new(endpoints));

    let mut sent = HashMap::new();
    let mut acknowledged = histogram()?;
    for write in 0..WRITES {
        let (id_number, serial) = cards::card(2 * write as u64);
        let decision = loss_decision(&id_number, &serial, write, key_id)?.sign(key);
        let request = pb::LossRegistryReportLossRequest {
            decision: Some(signed_decision_to_proto(&decision)),
            request_id: String::new(),
        };
        let began = Instant::now();
        let answer = client.report_loss(request).await.with_context(|| format!("loss report {write}"))?.into_inner();
        acknowledged.record(micros(began.elapsed()))?;
        if answer.status != pb::CardStatus::ReportedLost as i32 || answer.already_reported {
            bail!("loss report {write} answered {answer:?}");
        }
        sent.insert(CardKey::new(&id_number, &serial).digest().to_vec(), began);
        tokio::time::sleep(WRITE_PAUSE).await;
    }

    let mut seen: HashMap<Vec<u8>, Vec<Instant>> = HashMap::new();
    let expected = WRITES * replicas.len();
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received < expected {
        let Ok(Some((_, digest, at))) = tokio::time::timeout_at(deadline, arrived.recv()).await else {
            bail!("only {received} of {expected} status events came out of the replicas' streams");
        };
        if sent.contains_key(&digest) {
            seen.entry(digest).or_default().push(at);
            received += 1;
        }
    }
    for watcher in watchers {
        watcher.abort();
    }
    let mut lag =
        Lag { acknowledged, each_replica: histogram()?, slowest_replica: histogram()?, first_to_last: histogram()? };
    for (digest, began) in &sent {
        let arrivals = seen.get(digest).context("a write no replica announced")?;
        ensure!(arrivals.len() == replicas.len(), "a write announced {} times", arrivals.len());
        for at in arrivals {
            lag.each_replica.record(micros(at.saturating_duration_since(*began)))?;
        }
        let (first, last) = (arrivals.iter().min(), arrivals.iter().max());
        if let (Some(first), Some(last)) = (first, last) {
            lag.slowest_replica.record(micros(last.saturating_duration_since(*began)))?;
            lag.first_to_last.record(micros(last.saturating_duration_since(*first)))?;
        }
    }
    Ok(lag)
}

/// The Jiangxi home bureau's loss decision about synthetic card (`id_number`, `serial`),
/// addressed to the registry, valid at the bench's fixed clock.
fn loss_decision(id_number: &str, serial: &str, write: usize, key_id: &str) -> anyhow::Result<Decision> {
    let now: DateTime<Utc> = CLOCK.parse()?;
    let id = IdNumber::parse(id_number, now.date_naive()).map_err(|error| anyhow::anyhow!("{id_number}: {error}"))?;
    Ok(Decision {
        decision_id: format!("bench-loss-{write}"),
        purpose: DecisionPurpose::ReportLoss,
        bureau_id: HOME_JIANGXI.into(),
        key_id: key_id.into(),
        addressee_id: Process::Registry.bureau_id().into(),
        application_id: format!("bench-loss-application-{write}"),
        station_id: Process::Intake.bureau_id().into(),
        application_kind: None,
        card: CardData {
            holder: Particulars {
                id_number: id_number.into(),
                name: "Bench Holder".into(),
                sex: id.sex(),
                birth_date: id.birth_date(),
                registration_province: id.province_code().into(),
                address: "Nanchang".into(),
            },
            face_template: Vec::new(),
            valid_from: id.birth_date(),
            valid_until: None,
        },
        previous_card_serial: serial.into(),
        issued_at: now,
        expires_at: now + chrono::Duration::hours(1),
        transfer_to_bureau_id: String::new(),
    })
}
