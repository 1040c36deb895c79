//! `yidi-check`: a relying party's status checks from the registry's signed snapshot (issue 16).
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use yidi_check::{CheckError, Checker, Settings, Source, Verdict};

const USAGE: &str = "\
usage: yidi-check [options] sync | check ID_NUMBER SERIAL | receipt ID_NUMBER SERIAL FILE | follow | report-hits

  sync          fetch the snapshot (or the deltas since the one held)
  check         answer locally if the data allows, else ask CheckCard online
  receipt       fetch the card's registration receipt (GetCardReceipt) into FILE, verified
  follow        sync, then apply each delta the registry pushes; report local hits every minute
  report-hits   report the checks answered \"not valid\" locally

options:
  --registry URL          the registry (default http://127.0.0.1:50054)
  --directory FILE        the directory whose keys sign snapshots (default deploy/config/directory.toml)
  --data DIR              where the snapshot, deltas and pending hits are kept (default ./yidi-check-data)
  --relying-party NAME    who checks (default bank-demo)
  --max-age-seconds N     answer locally only from data younger than this (default 300)
  --renew-after-deltas N  follow: take the registry's newer snapshot once N deltas that cover
                          cards are held (default 60: an hour of the registry's deltas)
  --status-only           fetch snapshots without coverage: only cards checked with --receipt
                          are answered locally (about 1/300 of the data)
  --receipt FILE          check: the card's registration receipt (read from the card, or
                          fetched with `receipt`)
  --offline               never ask online: refuse (exit 3) when the local data cannot answer
  --now RFC3339           the instant checks are made at (default the system clock; the demo's
                          clock stands in 2118)

exit status of check: 0 valid, 1 not valid or unknown, 3 no answer offline, 2 error";

struct Options {
    registry: String,
    directory: PathBuf,
    data: PathBuf,
    relying_party: String,
    max_age_seconds: i64,
    renew_after_deltas: usize,
    offline: bool,
    status_only: bool,
    receipt: Option<PathBuf>,
    now: Option<chrono::DateTime<chrono::Utc>>,
    command: Vec<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    let mut options = Options {
        registry: "http://127.0.0.1:50054".into(),
        directory: "deploy/config/directory.toml".into(),
        data: "yidi-check-data".into(),
        relying_party: "bank-demo".into(),
        max_age_seconds: 300,
        renew_after_deltas: yidi_check::RENEW_AFTER_DELTAS,
        offline: false,
        status_only: false,
        receipt: None,
        now: None,
        command: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--registry" => options.registry = value("--registry")?,
            "--directory" => options.directory = value("--directory")?.into(),
            "--data" => options.data = value("--data")?.into(),
            "--relying-party" => options.relying_party = value("--relying-party")?,
            "--max-age-seconds" => options.max_age_seconds = value("--max-age-seconds")?.parse()?,
            "--renew-after-deltas" => options.renew_after_deltas = value("--renew-after-deltas")?.parse()?,
            "--offline" => options.offline = true,
            "--status-only" => options.status_only = true,
            "--receipt" => options.receipt = Some(value("--receipt")?.into()),
            "--now" => options.now = Some(value("--now")?.parse()?),
            "-h" | "--help" => bail!("{USAGE}"),
            _ if arg.starts_with("--") => bail!("unknown option {arg}\n{USAGE}"),
            _ => options.command.push(arg),
        }
    }
    Ok(options)
}

async fn registry(options: &Options) -> anyhow::Result<yidi_check::Registry> {
    yidi_check::Registry::connect(options.registry.clone())
        .await
        .with_context(|| format!("connecting to {}", options.registry))
}

async fn run(options: Options) -> anyhow::Result<ExitCode> {
    let directory = yidi_runtime::directory::load(&options.directory)?;
    let settings = Settings {
        relying_party: options.relying_party.clone(),
        max_age: chrono::Duration::seconds(options.max_age_seconds),
        renew_after_deltas: options.renew_after_deltas,
        status_only: options.status_only,
    };
    let checker = Checker::open(&options.data, directory, settings)?;
    let command: Vec<&str> = options.command.iter().map(String::as_str).collect();
    match command.as_slice() {
        ["sync"] => {
            let sequence = checker.sync(&mut registry(&options).await?).await?;
            println!(
                // A 64-bit sequence as a string, as proto3 JSON (and grpcurl) writes one.
                "{{\"sequence\":\"{sequence}\",\"asOf\":\"{}\"}}",
                checker.as_of().map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        ["check", id_number, serial] => {
            let now = options.now.unwrap_or_else(chrono::Utc::now);
            let receipt = match &options.receipt {
                Some(file) => {
                    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                    Some(checker.verify_receipt(&bytes).with_context(|| format!("the receipt {}", file.display()))?)
                }
                None => None,
            };
            let answer = if options.offline {
                checker.check_offline(id_number, serial, receipt.as_ref(), now)
            } else {
                checker.check(&mut registry(&options).await?, id_number, serial, receipt.as_ref(), now).await
            };
            match answer {
                Ok(answer) => {
                    let source = match answer.source {
                        Source::Local => "local",
                        Source::Online => "online",
                    };
                    let (verdict, code) = match answer.verdict {
                        Verdict::Valid => ("valid", 0),
                        Verdict::NotValid => ("not_valid", 1),
                        Verdict::Unknown => ("unknown", 1),
                    };
                    println!("{{\"verdict\":\"{verdict}\",\"source\":\"{source}\"}}");
                    Ok(ExitCode::from(code))
                }
                Err(CheckError::NoLocalAnswer(local)) => {
                    println!("{{\"verdict\":\"no_answer\",\"local\":\"{local:?}\"}}");
                    eprintln!("no local answer ({local:?}): ask online (without --offline)");
                    Ok(ExitCode::from(3))
                }
                Err(error) => Err(error.into()),
            }
        }
        ["receipt", id_number, serial, file] => {
            let (bytes, receipt) = checker.fetch_receipt(&mut registry(&options).await?, id_number, serial).await?;
            std::fs::write(file, &bytes).with_context(|| format!("writing {file}"))?;
            println!("{{\"sequence\":\"{}\",\"bytes\":{}}}", receipt.sequence, bytes.len());
            Ok(ExitCode::SUCCESS)
        }
        ["report-hits"] => {
            let recorded = checker.report_hits(&mut registry(&options).await?).await?;
            println!("{{\"recorded\":{recorded}}}");
            Ok(ExitCode::SUCCESS)
        }
        ["follow"] => {
            let mut client = registry(&options).await?;
            let mut reporter = client.clone();
            let checker = std::sync::Arc::new(checker);
            let reporting = std::sync::Arc::clone(&checker);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    if let Err(error) = reporting.report_hits(&mut reporter).await {
                        eprintln!("hits not reported (kept for the next try): {error}");
                    }
                }
            });
            checker.follow(&mut client).await?;
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("{USAGE}"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("yidi-check: {error:#}");
            ExitCode::from(2)
        }
    }
}
