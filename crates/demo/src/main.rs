//! `yidi-demo`: runs the whole suite on loopback (default), or generates keys or the population.
//!
//! ```text
//! yidi-demo [run] [--dir var/demo] [--date 2118-03-01] [--citizens 200] [--postgres URL] [--tls]
//! yidi-demo keygen [--dir var/demo] [--tls]  # keys + directory.toml for the default ports
//! yidi-demo keygen --compose [--dir D]      # the same, endpoints (https) named as in docker-compose.yml
//! yidi-demo keygen --k8s [--dir D]          # the same, endpoints (https) named as in deploy/k8s
//! yidi-demo certs --directory D --out DIR [--new-ca]  # a CA + a certificate per principal
//! yidi-demo population [--date D] [--citizens N] --out FILE
//! yidi-demo health ENDPOINT                  # gRPC health check (container probes)
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, bail};
use chrono::{NaiveDate, NaiveTime};
use yidi_demo::{
    certs::{CaChoice, CertDir, write_certificates},
    suite::{Backend, ClockSetting, DEMO_OUTBOX, Suite, SuiteOptions, default_bin_dir},
    topology::{self, Process},
};

struct Args {
    command: String,
    dir: PathBuf,
    date: NaiveDate,
    citizens: usize,
    postgres: Option<String>,
    out: Option<PathBuf>,
    compose: bool,
    k8s: bool,
    endpoint: Option<String>,
    tls: bool,
    directory: Option<PathBuf>,
    new_ca: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        command: "run".into(),
        dir: PathBuf::from("var/demo"),
        // The national phase (P3), so every province is accepted at the Zhejiang station.
        date: NaiveDate::from_ymd_opt(2118, 3, 1).context("default date")?,
        citizens: 200,
        postgres: None,
        out: None,
        compose: false,
        k8s: false,
        endpoint: None,
        tls: false,
        directory: None,
        new_ca: false,
    };
    let mut raw = std::env::args().skip(1);
    while let Some(arg) = raw.next() {
        let mut value = |name: &str| raw.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "run" | "keygen" | "population" | "certs" => args.command = arg,
            "health" => {
                args.command = arg;
                args.endpoint = Some(value("health")?);
            }
            "--compose" => args.compose = true,
            "--k8s" => args.k8s = true,
            "--tls" => args.tls = true,
            "--new-ca" => args.new_ca = true,
            "--directory" => args.directory = Some(PathBuf::from(value("--directory")?)),
            "--dir" => args.dir = PathBuf::from(value("--dir")?),
            "--date" => {
                let text = value("--date")?;
                args.date = NaiveDate::parse_from_str(&text, "%Y-%m-%d").with_context(|| format!("--date {text}"))?;
            }
            "--citizens" => args.citizens = value("--citizens")?.parse().context("--citizens")?,
            "--postgres" => args.postgres = Some(value("--postgres")?),
            "--out" => args.out = Some(PathBuf::from(value("--out")?)),
            "-h" | "--help" => {
                println!("{}", include_str!("usage.txt"));
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    match args.command.as_str() {
        "keygen" => {
            if args.compose || args.k8s {
                // Compose and Kubernetes run every bureau over mutual TLS.
                topology::write_keys_and_directory_with(&args.dir, |p| {
                    let hosts = if args.k8s { p.k8s_hosts() } else { p.compose_hosts() };
                    hosts.iter().map(|host| format!("https://{host}:{}", p.default_port())).collect()
                })?;
            } else {
                topology::write_keys_and_directory_with(&args.dir, |p| {
                    vec![topology::loopback_endpoint_with(args.tls, p.default_port())]
                })?;
            }
            println!(
                "wrote {0}/keys/<bureau>/<key id>.key (private, mode 0600) and {0}/directory.toml",
                args.dir.display()
            );
        }
        "population" => {
            let out = args.out.context("population needs --out FILE")?;
            yidi_demo::population::generate(args.date, args.citizens).write(&out)?;
            println!("wrote {}", out.display());
        }
        "certs" => certs(&args)?,
        "health" => health(args.endpoint.as_deref().unwrap_or_default()).await?,
        _ => run(args).await?,
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let start = args.date.and_time(NaiveTime::from_hms_opt(9, 0, 0).context("time")?).and_utc();
    let mut options = SuiteOptions::new(args.dir.clone(), default_bin_dir()?, start);
    options.default_ports = true;
    options.citizens_per_province = args.citizens;
    options.production_delay_ms = 2000;
    // A retry budget that outlasts a restart, with short call deadlines (see `DEMO_OUTBOX`).
    options.extra_config.insert(Process::Intake, DEMO_OUTBOX.into());
    options.clock = ClockSetting::Start(start);
    if let Some(url) = args.postgres {
        options.backend = Backend::Postgres { admin_url: url };
    }
    options.tls = args.tls;
    println!("starting the yidi suite (clock starts at {start}) ...");
    let suite = Suite::start(options).await?;
    println!();
    for process in [Process::Intake, Process::HomeJiangxi, Process::HomeSichuan, Process::Issuance, Process::Registry] {
        println!(
            "  {:<13} {:<18} 127.0.0.1:{}   log {}",
            process.service(),
            process.bureau_id(),
            suite.ports[&process],
            suite.log_path(process).display()
        );
    }
    println!();
    println!("population: {}", suite.dir.join("population.json").display());
    if suite.is_tls() {
        let certs = suite.certs();
        println!("certs:      {} (CA, and a certificate + key per principal)", certs.dir.display());
        println!(
            "try:        grpcurl -cacert {0}/ca.pem -cert {0}/op-station-hangzhou-read.pem -key {0}/op-station-hangzhou-read.key -authority station-hangzhou 127.0.0.1:50051 list",
            certs.dir.display()
        );
    } else {
        println!("try:        grpcurl -plaintext 127.0.0.1:50051 list");
    }
    println!("A bureau that exits on its own is started again. Ctrl-C stops every service.");
    let suite = supervise(suite).await?;
    println!("stopping ...");
    suite.stop().await?;
    println!("all services stopped cleanly");
    Ok(())
}

/// Keeps the suite running until Ctrl-C: a bureau whose process exits without being asked to (a
/// crash, an operator's `kill`) is started again on the same port and database, and the output says
/// so. A bureau that cannot start is tried again every second.
async fn supervise(mut suite: Suite) -> anyhow::Result<Suite> {
    let shutdown = yidi_runtime::shutdown::signal();
    tokio::pin!(shutdown);
    let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut down: Vec<Process> = Vec::new();
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(suite),
            _ = every_second.tick() => {}
        }
        for (process, status) in suite.exited()? {
            println!("{} ({}) exited unexpectedly ({status}); restarting it", process.slug(), process.bureau_id());
            down.push(process);
        }
        let mut still_down = Vec::new();
        for process in down.drain(..) {
            match suite.restart(process).await {
                Ok(()) => println!("{} restarted on {}", process.slug(), suite.endpoint(process)),
                Err(error) => {
                    println!("{} did not restart ({error:#}); trying again in a second", process.slug());
                    suite.kill(process).await?;
                    still_down.push(process);
                }
            }
        }
        down = still_down;
    }
}

/// `certs --directory D --out DIR [--new-ca]`: a certificate and key for every principal of the
/// directory, signed by the CA in DIR (kept if present, unless `--new-ca`).
fn certs(args: &Args) -> anyhow::Result<()> {
    let directory_path = args.directory.clone().unwrap_or_else(|| args.dir.join("directory.toml"));
    let out = args.out.clone().unwrap_or_else(|| args.dir.join("certs"));
    let directory = yidi_runtime::directory::load(&directory_path)?;
    let mut ids: Vec<&str> = directory.principal_ids().collect();
    ids.sort_unstable();
    let choice = if args.new_ca { CaChoice::New } else { CaChoice::KeepExisting };
    let created = write_certificates(&CertDir::new(&out), ids.iter().copied(), choice)?;
    let ca = if created { "a new CA" } else { "the existing CA" };
    println!("wrote {} certificates signed by {ca} into {}:", ids.len(), out.display());
    println!("  ca.pem (public), ca.key (private, mode 0600)");
    for id in ids {
        println!("  {id}.pem, {id}.key");
    }
    Ok(())
}

/// Exits 0 when the service at `endpoint` answers SERVING to the standard gRPC health check.
async fn health(endpoint: &str) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let url = if endpoint.starts_with("http") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let channel =
        tonic::transport::Endpoint::from_shared(url)?.timeout(std::time::Duration::from_secs(3)).connect().await?;
    let status = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?.into_inner();
    if status.status == ServingStatus::Serving as i32 {
        println!("SERVING");
        Ok(())
    } else {
        bail!("not serving ({})", status.status)
    }
}
