//! `yidi-bench`: measures the registry's checks against a bare tonic echo in the same run, the
//! card index at 10M cards, and the replacement flow against PostgreSQL's commit rate; writes
//! JSON and Markdown into `target/bench/` (BENCHMARKS.md shows how to run it).
#![forbid(unsafe_code)]

mod cards;
mod checks;
mod echo;
mod flow;
mod load;
mod overload;
mod process;
mod raw;
mod replicas;
mod report;
mod snapshot;
mod soak;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use yidi_runtime::scratch::test_postgres_url;

const USAGE: &str = "\
usage: yidi-bench <command> [options]

commands:
  all        registry + scale + replicas + write + overload (every table of BENCHMARKS.md)
  registry   CheckCard vs the echo baseline (PostgreSQL and SQLite), CheckCards, h2load cross-check
  scale      100k vs 10M cards: load, start-up, RSS per card, CheckCard latency
  write      the replacement flow on PostgreSQL vs the commit rate of the same server
  overload   the registry at twice its capacity, open loop with deadlines: with load shedding vs
             without (limits nothing reaches); fails if nothing was shed or accepted calls were late
  replicas   CheckCard over 1, 2 and 3 registry replicas on one PostgreSQL (mutual TLS) beside the echo,
             and the feed lag of 300 loss reports to every replica (each one's revocation stream)
  smoke      a few seconds of echo, CheckCard and CheckCards on SQLite (CI; no thresholds)
  snapshot   issue 16 in process: status snapshot bytes per card and per non-valid card, build
             time, a delta of 1,000 changes, local check latency (--cards 1000000,10000000,
             --coverage-bits 24)
  soak       applications of every kind while random bureaus are killed (SIGKILL) and restarted;
             reconciles the databases, exits non-zero on anything lost, duplicated or unsettled

options:
  --seconds S        measured seconds per run (default 10; smoke 1); soak: bound on the run (default 600);
                     overload: the open-loop run (capacity: a third of it, at least 2)
  --warmup S         warm-up seconds per run (default 2; smoke 0.3)
  --cards N          cards for the registry runs (default 100000; smoke 1000)
  --scale-cards N    cards for the large scale run (default 10000000)
  --connections L    comma-separated connection counts for CheckCard (default 1,8,32)
  --flow-levels L    applications in flight for the replacement flow (default 8,32,128)
  --workload W       overload: lost (CheckCard of cards reported lost, each writes a hit;
                     default) or valid (CheckCard of valid cards, from memory)
  --commit-max N     most connections of the commit-rate runs (1, 8, 32; default 32)
  --postgres URL     server for scratch databases (default $YIDI_TEST_POSTGRES_URL or the test server);
                     soak runs on SQLite unless it is given
  --applications N   soak: applications, a third of each kind (default 300)
  --kills K          soak: at least this many kills (default 10)
  --callers C        soak: callers submitting at once (default 8)
  --seed S           soak: seed of the random kills (default: from the clock)
  --replicated       soak: every bureau (station, home bureaus, producer, registry) runs as two
                     replicas (both in the directory; kills fall on either); needs --postgres
  --registry-env K=V an environment variable for the registries of registry, scale and smoke
                     (repeatable), e.g. YIDI__REGISTRY__STATEMENT_CACHE_ENTRIES=0 (a signature per
                     answer) or OTEL_TRACES_SAMPLER=always_on (spans without an exporter)
  --out DIR          where reports go (default target/bench)
  --bin-dir DIR      folder of the yidi-* binaries (default: this executable's)
";

/// What every measurement reads.
pub struct Options {
    pub duration: Duration,
    pub warmup: Duration,
    pub cards: u64,
    pub scale_cards: u64,
    pub connection_levels: Vec<usize>,
    /// Applications in flight (closed loop) of the replacement-flow runs.
    pub flow_levels: Vec<usize>,
    /// Most connections of the commit-rate runs.
    pub commit_max: usize,
    /// Which cards the overload runs check.
    pub workload: overload::Workload,
    pub postgres_url: String,
    pub out: PathBuf,
    pub work: PathBuf,
    pub bin_dir: PathBuf,
    pub applications: usize,
    pub kills: usize,
    pub callers: usize,
    pub seed: u64,
    /// `--postgres` was given (the soak then runs on PostgreSQL).
    pub postgres_given: bool,
    /// `--registry-env`: added to the registries' environment.
    pub registry_env: Vec<(String, String)>,
    /// `--replicated` (soak).
    pub replicated: bool,
}

fn parse(command: &str, args: &[String]) -> anyhow::Result<Options> {
    let smoke = command == "smoke";
    let bin_dir = yidi_demo::suite::default_bin_dir()?;
    let mut options = Options {
        duration: Duration::from_secs_f64(match command {
            "smoke" => 1.0,
            "soak" => 600.0,
            _ => 10.0,
        }),
        warmup: Duration::from_secs_f64(if smoke { 0.3 } else { 2.0 }),
        cards: if smoke { 1000 } else { 100_000 },
        scale_cards: 10_000_000,
        connection_levels: vec![1, 8, 32],
        flow_levels: vec![8, 32, 128],
        commit_max: 32,
        workload: overload::Workload::Lost,
        postgres_url: test_postgres_url(),
        out: checks::default_out(&bin_dir),
        work: PathBuf::new(),
        bin_dir,
        applications: 300,
        kills: 10,
        callers: 8,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        postgres_given: false,
        registry_env: Vec::new(),
        replicated: false,
    };
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        // The one flag without a value.
        if flag == "--replicated" {
            options.replicated = true;
            continue;
        }
        let value = rest.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => options.duration = Duration::from_secs_f64(value.parse()?),
            "--warmup" => options.warmup = Duration::from_secs_f64(value.parse()?),
            "--cards" => options.cards = value.parse()?,
            "--scale-cards" => options.scale_cards = value.parse()?,
            "--connections" => {
                options.connection_levels = value.split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?;
            }
            "--flow-levels" => options.flow_levels = levels(value)?,
            "--commit-max" => options.commit_max = value.parse()?,
            "--workload" => options.workload = overload::Workload::parse(value)?,
            "--postgres" => {
                options.postgres_url = value.clone();
                options.postgres_given = true;
            }
            "--applications" => options.applications = value.parse()?,
            "--kills" => options.kills = value.parse()?,
            "--callers" => options.callers = value.parse()?,
            "--seed" => options.seed = value.parse()?,
            "--registry-env" => {
                let (key, value) =
                    value.split_once('=').with_context(|| format!("--registry-env {value}: KEY=VALUE"))?;
                options.registry_env.push((key.to_owned(), value.to_owned()));
            }
            "--out" => options.out = PathBuf::from(value),
            "--bin-dir" => options.bin_dir = PathBuf::from(value),
            other => bail!("unknown option {other}\n\n{USAGE}"),
        }
    }
    options.work = options.out.join(format!("work-{command}"));
    std::fs::create_dir_all(&options.work)?;
    Ok(options)
}

/// `1,8,32` → [1, 8, 32].
fn levels(value: &str) -> anyhow::Result<Vec<usize>> {
    Ok(value.split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first().cloned() else {
        print!("{USAGE}");
        return Ok(());
    };
    if command == "serve-echo" {
        return echo::serve(&args[1..]).await;
    }
    if command == "snapshot" {
        return snapshot::run(&args[1..]);
    }
    let options = parse(&command, &args[1..])?;
    if command == "soak" {
        let soak = soak::SoakOptions {
            applications: options.applications,
            kills: options.kills,
            max: options.duration,
            postgres: options.postgres_given.then(|| options.postgres_url.clone()),
            seed: options.seed,
            concurrency: options.callers,
            replicated: options.replicated,
        };
        if !soak::soak(&soak, &options.bin_dir, &options.work).await? {
            std::process::exit(1);
        }
        return Ok(());
    }
    let mut report = report::Report::new(&command);
    let mut problems = Vec::new();
    match command.as_str() {
        "registry" => checks::registry(&options, &mut report).await?,
        "scale" => checks::scale(&options, &mut report).await?,
        "write" => flow::write(&options, &mut report).await?,
        "smoke" => checks::smoke(&options, &mut report).await?,
        "replicas" => replicas::replicas(&options, &mut report).await?,
        "overload" => problems = overload::overload(&options, &mut report, options.workload).await?,
        "all" => {
            checks::registry(&options, &mut report).await?;
            checks::scale(&options, &mut report).await?;
            replicas::replicas(&options, &mut report).await?;
            flow::write(&options, &mut report).await?;
            problems = overload::overload(&options, &mut report, options.workload).await?;
        }
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            return Ok(());
        }
        other => bail!("unknown command {other}\n\n{USAGE}"),
    }
    report.machine = report::machine();
    report.write(&options.out)?;
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}
