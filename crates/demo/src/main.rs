//! `yidi-demo`: runs the whole suite on loopback (default), or generates keys or the population.
//!
//! ```text
//! yidi-demo [run] [--dir var/demo] [--date 2118-03-01] [--citizens 200] [--postgres URL]
//! yidi-demo keygen [--dir var/demo]          # keys + directory.toml for the default ports
//! yidi-demo keygen --compose [--dir D]      # the same, endpoints named as in docker-compose.yml
//! yidi-demo population [--date D] [--citizens N] --out FILE
//! yidi-demo health ENDPOINT                  # gRPC health check (container probes)
//! ```
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, bail};
use chrono::{NaiveDate, NaiveTime};
use yidi_demo::{
    suite::{Backend, ClockSetting, Suite, SuiteOptions, default_bin_dir},
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
    endpoint: Option<String>,
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
        endpoint: None,
    };
    let mut raw = std::env::args().skip(1);
    while let Some(arg) = raw.next() {
        let mut value = |name: &str| raw.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "run" | "keygen" | "population" => args.command = arg,
            "health" => {
                args.command = arg;
                args.endpoint = Some(value("health")?);
            }
            "--compose" => args.compose = true,
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
            if args.compose {
                topology::write_keys_and_directory_with(&args.dir, |p| {
                    format!("http://{}:{}", p.compose_host(), p.default_port())
                })?;
            } else {
                let ports: BTreeMap<Process, u16> = Process::ALL.iter().map(|p| (*p, p.default_port())).collect();
                topology::write_keys_and_directory(&args.dir, &ports)?;
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
    options.clock = ClockSetting::Start(start);
    if let Some(url) = args.postgres {
        options.backend = Backend::Postgres { admin_url: url };
    }
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
    println!("try:        grpcurl -plaintext 127.0.0.1:50051 list");
    println!("Ctrl-C stops every service.");
    yidi_common::shutdown::signal().await;
    println!("stopping ...");
    suite.stop().await?;
    println!("all services stopped cleanly");
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
