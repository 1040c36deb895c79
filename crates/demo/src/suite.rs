//! Starts the whole suite, each bureau as its own process of its own binary, with its own
//! database, on loopback; stops it cleanly (SIGTERM, exit code checked).
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use yidi_domain::OperatorAccess;
use yidi_grpc::tls::TlsFiles;
use yidi_runtime::scratch::ScratchDatabase;
use yidi_runtime::{directory::DirectoryFile, population::Population};

use crate::{
    certs::{CaChoice, CertDir, write_certificates},
    topology::{self, Keys, PRODUCER, Process, operator_id},
};

/// Where each bureau keeps its data.
#[derive(Debug, Clone)]
pub enum Backend {
    /// One SQLite file per bureau in the suite's folder.
    Sqlite,
    /// One freshly created PostgreSQL database per bureau, dropped when the suite stops.
    Postgres {
        /// A URL of the server's maintenance database, e.g. `postgres://postgres@127.0.0.1:5432/test`.
        admin_url: String,
    },
}

#[derive(Debug, Clone, Copy)]
pub enum ClockSetting {
    /// Time starts at this instant and runs.
    Start(DateTime<Utc>),
    /// Time stands still.
    Fixed(DateTime<Utc>),
}

#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Folder for configuration, keys, SQLite files and logs.
    pub dir: PathBuf,
    /// Folder holding the `yidi-*` binaries.
    pub bin_dir: PathBuf,
    /// Use the default ports (50051...) instead of free ones.
    pub default_ports: bool,
    pub backend: Backend,
    pub clock: ClockSetting,
    /// A different clock for some bureaus (e.g. to make decisions arrive expired).
    pub clock_overrides: BTreeMap<Process, ClockSetting>,
    pub citizens_per_province: usize,
    /// More citizens per province whose card is inside the renewal window, after the others.
    pub renewable_per_province: usize,
    pub production_delay_ms: u64,
    /// TOML appended to a bureau's configuration file (e.g. a `[policy]` section for the station).
    pub extra_config: BTreeMap<Process, String>,
    /// TOML lines added to a bureau's `[server]` section (e.g. `max_in_flight = 1`).
    pub server_config: BTreeMap<Process, String>,
    /// `[log] format`: "text" or "json".
    pub log_format: String,
    /// Environment variables added to every bureau's (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
    /// Mutual TLS on every port: a fresh CA and a certificate per principal in `dir/certs`.
    /// Without it every bureau is configured `tls.plaintext = true`.
    pub tls: bool,
}

impl SuiteOptions {
    pub fn new(dir: PathBuf, bin_dir: PathBuf, now: DateTime<Utc>) -> Self {
        Self {
            dir,
            bin_dir,
            default_ports: false,
            backend: Backend::Sqlite,
            clock: ClockSetting::Start(now),
            clock_overrides: BTreeMap::new(),
            citizens_per_province: 30,
            renewable_per_province: 0,
            production_delay_ms: 200,
            extra_config: BTreeMap::new(),
            server_config: BTreeMap::new(),
            log_format: "text".into(),
            env: Vec::new(),
            tls: false,
        }
    }
}

/// The station's `[outbox]` in the demo: a retry budget that outlasts a bureau down for 30 s, so a
/// restart never leaves a dead letter, and a short call deadline, so a paused bureau is noticed
/// within 2 s. Ten attempts, the backoff from 1 s doubling to 10 s with equal jitter: between
/// 32.5 s and 65 s of waiting before the last one (docs/RUNBOOK.md, "What the station owes").
pub const DEMO_OUTBOX: &str =
    "[outbox]\ncall_timeout_ms = 2000\nmax_attempts = 10\nbackoff_initial_ms = 1000\nbackoff_max_ms = 10000\n";

/// The registry's fence bound in the demo and the suites built on it: 2 s, not the 200 ms a
/// production replica keeps. The demo's one registry shares two cores with four other bureaus
/// (and, in the tests, with other suites): starved of CPU for 200 ms, it would rightly stop
/// answering checks (REPLICA_BEHIND), which is not what a demo or a flow test is about.
pub const DEMO_REGISTRY: &str = "\n[registry]\nfence_after_ms = 2000\n";

/// The folder of the running executable's sibling binaries (`target/debug` for tests and the demo).
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("YIDI_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no folder")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

pub struct Suite {
    pub dir: PathBuf,
    pub ports: BTreeMap<Process, u16>,
    pub keys: Keys,
    pub population: Population,
    options: SuiteOptions,
    children: BTreeMap<Process, Child>,
    /// With [`Backend::Postgres`], each bureau's scratch database.
    postgres: BTreeMap<Process, ScratchDatabase>,
    /// Ports of the replicas listed in the directory beside a bureau's own process ([`Self::add_replica`]).
    replica_ports: BTreeMap<Process, Vec<u16>>,
}

impl Suite {
    pub async fn start(options: SuiteOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.dir).with_context(|| format!("creating {}", options.dir.display()))?;
        let dir = std::fs::canonicalize(&options.dir)?;
        // Port 0: each bureau binds a free port itself and prints it; nothing is reserved and
        // released beforehand, so no other process can take the port in between.
        let ports =
            Process::ALL.iter().map(|p| (*p, if options.default_ports { p.default_port() } else { 0 })).collect();
        let keys = topology::generate_keys(&dir)?;
        let today = match options.clock {
            // The bureaus' default `clock.time_zone`: the date in China.
            ClockSetting::Start(at) | ClockSetting::Fixed(at) => yidi_runtime::Clock::fixed(at).today(),
        };
        let population = crate::population::generate_with_renewals(
            today,
            options.citizens_per_province,
            options.renewable_per_province,
        );
        population.write(&dir.join("population.json"))?;

        // A fresh start: keys are new, so data signed under old ones must go, and so must old logs.
        for process in Process::ALL {
            let _ = std::fs::remove_file(dir.join(format!("{}.log", process.slug())));
            let _ = std::fs::remove_file(dir.join(format!("{}.pid", process.slug())));
        }
        let postgres = match &options.backend {
            Backend::Sqlite => {
                for process in Process::ALL {
                    for suffix in ["db", "db-wal", "db-shm"] {
                        let _ = std::fs::remove_file(dir.join(format!("{}.{suffix}", process.slug())));
                    }
                }
                BTreeMap::new()
            }
            Backend::Postgres { admin_url } => create_databases(admin_url).await?,
        };
        let mut suite = Self {
            dir,
            ports,
            keys,
            population,
            options,
            children: BTreeMap::new(),
            postgres,
            replica_ports: BTreeMap::new(),
        };
        if suite.options.tls {
            // Every principal of the directory (ports do not change who is in it).
            suite.write_directory()?;
            let directory =
                DirectoryFile::read(&suite.dir.join("directory.toml"))?.to_directory().map_err(anyhow::Error::msg)?;
            write_certificates(&suite.certs(), directory.principal_ids(), CaChoice::New)?;
        }
        // In dependency order, so that each bureau's directory already holds the endpoints of the
        // bureaus it calls: the registry calls nobody, the home bureaus (a registration transfer)
        // and the producer call the registry, the station calls everyone.
        let stages: [&[Process]; 3] = [
            &[Process::Registry],
            &[Process::HomeJiangxi, Process::HomeSichuan, Process::Issuance],
            &[Process::Intake],
        ];
        for stage in stages {
            suite.write_directory()?;
            for process in stage {
                suite.write_config(*process)?;
                suite.spawn(*process)?;
            }
            for process in stage {
                if suite.ports[process] == 0 {
                    let port = suite.wait_for_port(*process).await?;
                    suite.ports.insert(*process, port);
                }
                suite.wait_until_serving(*process).await?;
            }
        }
        // The complete directory, for restarts and for operators.
        suite.write_directory()?;
        for process in Process::ALL {
            suite.write_config(process)?;
        }
        Ok(suite)
    }

    fn write_directory(&self) -> anyhow::Result<()> {
        topology::write_directory(&self.dir, &self.keys, |process| {
            let replicas = self.replica_ports.get(&process).map(Vec::as_slice).unwrap_or_default();
            std::iter::once(self.ports[&process])
                .chain(replicas.iter().copied())
                .map(|port| topology::loopback_endpoint_with(self.options.tls, port))
                .collect()
        })
    }

    /// Whether every port speaks mutual TLS.
    pub fn is_tls(&self) -> bool {
        self.options.tls
    }

    /// The CA and every principal's certificate and key (TLS suites).
    pub fn certs(&self) -> CertDir {
        CertDir::new(self.dir.join("certs"))
    }

    /// A channel to `process` (not yet connected), calling as `principal` (a principal id of the
    /// directory whose certificate is in [`Self::certs`]) on a TLS suite; plaintext otherwise.
    pub fn endpoint_as(&self, process: Process, principal: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(self.endpoint(process))?;
        if !self.options.tls {
            return Ok(endpoint);
        }
        Ok(endpoint.tls_config(self.certs().files(principal)?.client_config(process.bureau_id()))?)
    }

    /// The same with the TLS files given (e.g. a certificate of another CA).
    pub fn endpoint_with(&self, process: Process, files: &TlsFiles) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(self.endpoint(process))?.tls_config(files.client_config(process.bureau_id()))?)
    }

    /// A connected channel to `process` as `principal` (see [`Self::endpoint_as`]).
    pub async fn channel_as(&self, process: Process, principal: &str) -> anyhow::Result<Channel> {
        Ok(self.endpoint_as(process, principal)?.timeout(Duration::from_secs(30)).connect().await?)
    }

    /// Key rotation, step 1: a new key for `bureau` (private key file into its `signing.key_dir`,
    /// public key into the directory) valid from `valid_from`. Running bureaus take it at their
    /// next reload ([`Suite::reload`], or within `directory.reload_seconds`).
    pub fn add_key(&mut self, bureau: &str, key_id: &str, valid_from: DateTime<Utc>) -> anyhow::Result<()> {
        topology::add_key(&self.dir, &mut self.keys, bureau, key_id, valid_from)?;
        self.write_directory()
    }

    /// Key rotation, step 2: the directory retires `key_id` of `bureau` at `at`.
    pub fn retire_key(&mut self, bureau: &str, key_id: &str, at: DateTime<Utc>) -> anyhow::Result<()> {
        let key = self.keys.get_mut(bureau, key_id).with_context(|| format!("{bureau} has no key {key_id}"))?;
        key.valid_until = Some(at);
        self.write_directory()
    }

    /// Asks a running bureau to re-read its directory and key files now (SIGHUP).
    pub async fn reload(&self, process: Process) -> anyhow::Result<()> {
        let pid = self.pid(process).with_context(|| format!("{} is not running", process.slug()))?;
        // `kill` keeps this crate free of unsafe code (no direct libc call).
        let status = Command::new("kill").arg("-HUP").arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -HUP {pid} ({}) failed: {status}", process.slug());
        }
        Ok(())
    }

    /// The process id of a running bureau.
    pub fn pid(&self, process: Process) -> Option<u32> {
        self.children.get(&process).and_then(Child::id)
    }

    /// The port a bureau started on port 0 reports in its "listening on" line.
    async fn wait_for_port(&mut self, process: Process) -> anyhow::Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read_to_string(self.log_path(process)).unwrap_or_default();
            if let Some(port) = reported_port(&log) {
                return Ok(port);
            }
            self.fail_if_exited(process)?;
            if Instant::now() > deadline {
                bail!("{} did not report its port in 60 s:\n{}", process.slug(), self.log_tail(process));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fail_if_exited(&mut self, process: Process) -> anyhow::Result<()> {
        if let Some(child) = self.children.get_mut(&process)
            && let Some(status) = child.try_wait()?
        {
            bail!("{} exited at start ({status}):\n{}", process.slug(), self.log_tail(process));
        }
        Ok(())
    }

    pub fn endpoint(&self, process: Process) -> String {
        topology::loopback_endpoint_with(self.options.tls, self.ports[&process])
    }

    pub fn log_path(&self, process: Process) -> PathBuf {
        self.dir.join(format!("{}.log", process.slug()))
    }

    /// Holds the bureau's process id while it runs, so an operator can pause it (`kill -STOP`) to
    /// simulate an outage (docs/RUNBOOK.md, "Cancel").
    pub fn pid_path(&self, process: Process) -> PathBuf {
        self.dir.join(format!("{}.pid", process.slug()))
    }

    pub fn config_path(&self, process: Process) -> PathBuf {
        self.dir.join(format!("{}.toml", process.slug()))
    }

    /// The bureau's database: its SQLite file, or its scratch PostgreSQL database.
    pub fn database_url(&self, process: Process) -> String {
        match self.postgres.get(&process) {
            None => format!("sqlite://{}?mode=rwc", self.dir.join(format!("{}.db", process.slug())).display()),
            Some(database) => database.url().to_owned(),
        }
    }

    fn write_config(&self, process: Process) -> anyhow::Result<()> {
        std::fs::write(self.config_path(process), self.config_text(process, self.ports[&process]))?;
        Ok(())
    }

    /// The configuration of `process` listening on `port` (0: any free port).
    fn config_text(&self, process: Process, port: u16) -> String {
        let dir = &self.dir;
        let clock = match self.options.clock_overrides.get(&process).unwrap_or(&self.options.clock) {
            ClockSetting::Start(at) => format!("start = \"{}\"", at.to_rfc3339()),
            ClockSetting::Fixed(at) => format!("fixed = \"{}\"", at.to_rfc3339()),
        };
        let population = dir.join("population.json");
        let own = match process {
            Process::HomeJiangxi | Process::HomeSichuan => format!(
                "[signing]\nkey_dir = \"{}\"\n\n[register]\nimport_path = \"{}\"\n",
                topology::key_dir(dir, process.bureau_id()).display(),
                population.display()
            ),
            Process::Registry => format!(
                "[signing]\nkey_dir = \"{}\"\n\n[import]\npath = \"{}\"\n{DEMO_REGISTRY}",
                topology::key_dir(dir, process.bureau_id()).display(),
                population.display()
            ),
            Process::Issuance => format!("[production]\ndelay_ms = {}\n", self.options.production_delay_ms),
            Process::Intake => format!("[station]\nproducer_id = \"{PRODUCER}\"\n"),
        };
        let extra = self.options.extra_config.get(&process).cloned().unwrap_or_default();
        let server = self.options.server_config.get(&process).cloned().unwrap_or_default();
        let tls = if self.options.tls {
            let certs = self.certs();
            format!(
                "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
                certs.ca_pem().display(),
                certs.cert(process.bureau_id()).display(),
                certs.key(process.bureau_id()).display()
            )
        } else {
            "plaintext = true".to_owned()
        };
        format!(
            "# Written by yidi-demo for this run.\n[server]\nbureau_id = \"{id}\"\nlisten = \"127.0.0.1:{port}\"\n{server}\n\
             [database]\nurl = \"{url}\"\n\n[directory]\npath = \"{directory}\"\n\n[tls]\n{tls}\n\n\
             [clock]\n{clock}\n\n[log]\nformat = \"{format}\"\n\n{own}\n{extra}\n",
            id = process.bureau_id(),
            url = self.database_url(process),
            directory = dir.join("directory.toml").display(),
            format = self.options.log_format,
        )
    }

    fn spawn(&mut self, process: Process) -> anyhow::Result<()> {
        let binary = self.options.bin_dir.join(format!("yidi-{}", process.service()));
        if !binary.exists() {
            bail!("{} not found: build the services first (cargo build --workspace --bins)", binary.display());
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(process))?;
        let child = self.launch(&binary, &self.config_path(process), log)?;
        if let Some(pid) = child.id() {
            std::fs::write(self.pid_path(process), format!("{pid}\n"))?;
        }
        self.children.insert(process, child);
        Ok(())
    }

    async fn wait_until_serving(&mut self, process: Process) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.fail_if_exited(process)?;
            // On a TLS suite the bureau's read-only operator asks.
            let operator = operator_id(process.bureau_id(), OperatorAccess::Read);
            let channel = self.endpoint_as(process, &operator)?.connect().await;
            if let Ok(channel) = channel {
                let mut client = HealthClient::new(channel);
                let answer = client.check(HealthCheckRequest { service: String::new() }).await;
                if answer.is_ok_and(|a| a.get_ref().status == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not become healthy in 60 s:\n{}", process.slug(), self.log_tail(process));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines a bureau logged, for failure messages.
    pub fn log_tail(&self, process: Process) -> String {
        let text = std::fs::read_to_string(self.log_path(process)).unwrap_or_default();
        // The error, not the frames of its backtrace (RUST_BACKTRACE may be set): the cause is above.
        let text = text.split("\nStack backtrace:").next().unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Starts a stopped bureau again on the same port and database.
    pub async fn restart(&mut self, process: Process) -> anyhow::Result<()> {
        // Same port as before: the configuration now names it.
        self.write_config(process)?;
        self.spawn(process)?;
        self.wait_until_serving(process).await
    }

    /// Kills a bureau outright (SIGKILL, as a crash or `kill -9` would) and waits until it is gone;
    /// [`Self::restart`] starts it again on the same port and database.
    pub async fn kill(&mut self, process: Process) -> anyhow::Result<()> {
        let Some(mut child) = self.children.remove(&process) else { return Ok(()) };
        let _ = std::fs::remove_file(self.pid_path(process));
        // `Child::kill` sends SIGKILL and reaps the process.
        child.kill().await.with_context(|| format!("killing {}", process.slug()))?;
        Ok(())
    }

    /// The bureaus whose process ended without being asked to (a crash, a `kill` from outside),
    /// each with how it ended. They are forgotten here, so [`Self::restart`] starts them again.
    pub fn exited(&mut self) -> anyhow::Result<Vec<(Process, std::process::ExitStatus)>> {
        let mut exited = Vec::new();
        for (process, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                exited.push((*process, status));
            }
        }
        for (process, _) in &exited {
            self.children.remove(process);
            let _ = std::fs::remove_file(self.pid_path(*process));
        }
        Ok(exited)
    }

    /// Whether a bureau's process is running (started, not stopped or killed).
    pub fn is_running(&self, process: Process) -> bool {
        self.children.contains_key(&process)
    }

    /// Asks a bureau to stop (SIGTERM) and waits; returns its exit code.
    pub async fn terminate(&mut self, process: Process) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.children.remove(&process) else { return Ok(None) };
        let _ = std::fs::remove_file(self.pid_path(process));
        if let Some(pid) = child.id() {
            // `kill` keeps this crate free of unsafe code (no direct libc call).
            Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await?;
        }
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => {
                child.kill().await?;
                bail!("{} did not stop within 20 s of SIGTERM", process.slug())
            }
        }
    }

    /// Runs `binary --config config` with the suite's environment, output to `log`.
    fn launch(&self, binary: &std::path::Path, config: &std::path::Path, log: std::fs::File) -> anyhow::Result<Child> {
        Command::new(binary)
            .arg("--config")
            .arg(config)
            .envs(self.options.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))
    }

    /// Starts a second process of `process`'s binary on the same database and directory entry
    /// (another replica behind the same name), on a free port of its own.
    pub async fn start_replica(&self, process: Process) -> anyhow::Result<Replica> {
        let binary = self.options.bin_dir.join(format!("yidi-{}", process.service()));
        let config_path = self.dir.join(format!("{}-replica.toml", process.slug()));
        let log_path = self.dir.join(format!("{}-replica.log", process.slug()));
        std::fs::write(&config_path, self.config_text(process, 0))?;
        let log = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&log_path)?;
        let child = self.launch(&binary, &config_path, log)?;
        let mut replica = Replica { child, log_path, port: 0, tls: self.options.tls };
        let deadline = Instant::now() + Duration::from_secs(60);
        while replica.port == 0 {
            let log = std::fs::read_to_string(&replica.log_path).unwrap_or_default();
            if let Some(port) = reported_port(&log) {
                replica.port = port;
            } else if Instant::now() > deadline {
                bail!("the {} replica did not report its port in 60 s:\n{log}", process.slug());
            } else if let Some(status) = replica.child.try_wait()? {
                bail!("the {} replica exited at start ({status}):\n{log}", process.slug());
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(replica)
    }

    /// Starts a replica of `process` ([`Self::start_replica`]), waits until it serves, lists it in
    /// the directory beside the bureau's own process and has every bureau of the suite re-read the
    /// directory (SIGHUP), so their calls to `process` spread over both from now on. Replicas
    /// started earlier take the new directory at their next `directory.reload_seconds`.
    pub async fn add_replica(&mut self, process: Process) -> anyhow::Result<Replica> {
        let replica = self.start_replica(process).await?;
        self.wait_until_replica_serves(process, &replica).await?;
        self.replica_ports.entry(process).or_default().push(replica.port);
        self.write_directory()?;
        for running in Process::ALL.into_iter().filter(|p| self.is_running(*p)) {
            self.reload(running).await?;
        }
        Ok(replica)
    }

    /// Starts a killed replica of `process` again on its port (the directory still lists it) and
    /// database, and waits until it serves.
    pub async fn restart_replica(&self, process: Process, replica: &mut Replica) -> anyhow::Result<()> {
        let binary = self.options.bin_dir.join(format!("yidi-{}", process.service()));
        let config_path = self.dir.join(format!("{}-replica.toml", process.slug()));
        std::fs::write(&config_path, self.config_text(process, replica.port))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&replica.log_path)?;
        replica.child = self.launch(&binary, &config_path, log)?;
        self.wait_until_replica_serves(process, replica).await
    }

    /// Waits (60 s at most) until a replica of `process` answers SERVING on health.
    async fn wait_until_replica_serves(&self, process: Process, replica: &Replica) -> anyhow::Result<()> {
        let operator = operator_id(process.bureau_id(), OperatorAccess::Read);
        let endpoint = Endpoint::from_shared(replica.endpoint())?;
        let endpoint = if self.options.tls {
            endpoint.tls_config(self.certs().files(&operator)?.client_config(process.bureau_id()))?
        } else {
            endpoint
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(channel) = endpoint.connect().await
                && yidi_grpc::client::wait_until_serving(&channel, Duration::from_secs(10)).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the {} replica never served", process.slug());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every bureau (SIGTERM, newest first), checks each exited with 0, drops PostgreSQL databases.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for process in Process::ALL.into_iter().rev() {
            match self.terminate(process).await {
                Ok(Some(0) | None) => {}
                Ok(Some(code)) => failures.push(format!("{} exited with {code}", process.slug())),
                Err(error) => failures.push(error.to_string()),
            }
        }
        for (_, database) in std::mem::take(&mut self.postgres) {
            database.drop().await?;
        }
        if failures.is_empty() { Ok(()) } else { bail!("{}", failures.join("; ")) }
    }
}

impl Drop for Suite {
    fn drop(&mut self) {
        // A test that panicked never reached `stop`: kill the bureaus (`kill_on_drop`) before their
        // databases go (each `ScratchDatabase` drops its own).
        self.children.clear();
    }
}

/// The port a bureau started on port 0 reports in its log's last "listening on" line.
fn reported_port(log: &str) -> Option<u16> {
    log.lines()
        .filter_map(|line| line.split_once(" listening on ").map(|(_, address)| address.trim()))
        .filter_map(|address| address.parse::<std::net::SocketAddr>().ok())
        .map(|address| address.port())
        .next_back()
}

/// A second process of a bureau ([`Suite::start_replica`]); killed when dropped.
pub struct Replica {
    child: Child,
    pub log_path: PathBuf,
    pub port: u16,
    tls: bool,
}

impl Replica {
    pub fn endpoint(&self) -> String {
        topology::loopback_endpoint_with(self.tls, self.port)
    }

    /// Kills it outright (SIGKILL, as a crash would) and waits until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        Ok(self.child.kill().await?)
    }

    /// Asks it to stop (SIGTERM) and returns its exit code.
    pub async fn terminate(mut self) -> anyhow::Result<Option<i32>> {
        if let Some(pid) = self.child.id() {
            Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await?;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => {
                self.child.kill().await?;
                bail!("the replica did not stop within 20 s of SIGTERM")
            }
        }
    }
}

/// One scratch database per bureau; those created so far go again if one fails.
async fn create_databases(admin_url: &str) -> anyhow::Result<BTreeMap<Process, ScratchDatabase>> {
    let mut databases = BTreeMap::new();
    for process in Process::ALL {
        let database = ScratchDatabase::create(admin_url, process.slug())
            .await
            .with_context(|| format!("creating {}'s database on PostgreSQL at {admin_url}", process.slug()))?;
        databases.insert(process, database);
    }
    Ok(databases)
}
