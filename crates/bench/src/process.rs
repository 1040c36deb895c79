//! The servers under measurement, each a process of its own on loopback: the echo baseline (this
//! binary, `serve-echo`) and the registry (the real `yidi-registry` binary with its own config).
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use yidi_demo::topology::{self, Process};

/// The fixed instant the registry judges by: the national phase, cards of the loader valid.
pub const CLOCK: &str = "2118-03-01T09:00:00Z";

pub struct Server {
    child: Child,
    pub pid: u32,
    pub endpoint: String,
    log: PathBuf,
    /// From spawn until it answered a first request.
    pub startup: Duration,
}

impl Server {
    /// Resident memory (VmRSS) in bytes, from /proc.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(self.pid)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (through `kill`: no unsafe code), then wait.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status().await?;
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("server {} did not stop within 30 s", self.pid)
            }
        }
    }
}

/// Resident memory (VmRSS) of process `pid` in bytes, from /proc.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kb * 1024)
}

async fn spawn(mut command: Command, log: PathBuf, ready: impl AsyncFn(&str) -> bool) -> anyhow::Result<Server> {
    let file = std::fs::File::create(&log)?;
    let began = Instant::now();
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .context("starting a server")?;
    let pid = child.id().context("server has no pid")?;
    let mut server = Server { child, pid, endpoint: String::new(), log, startup: Duration::ZERO };
    // Loading 10M cards takes a while; allow for it.
    let deadline = began + Duration::from_secs(900);
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("server exited at start ({status}):\n{}", server.log_text());
        }
        let address = server
            .log_text()
            .lines()
            .filter_map(|line| line.split_once(" listening on ").map(|(_, a)| a.trim().to_owned()))
            .next_back();
        if let Some(address) = address {
            server.endpoint = format!("http://{address}");
            if ready(&server.endpoint).await {
                server.startup = began.elapsed();
                return Ok(server);
            }
        }
        if Instant::now() > deadline {
            bail!("server not ready in 900 s:\n{}", server.log_text());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn answers_health(endpoint: &str) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(endpoint.to_owned()) else { return false };
    let Ok(channel) = endpoint.connect().await else { return false };
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
    answer.is_ok_and(|a| a.get_ref().status == ServingStatus::Serving as i32)
}

/// The echo baseline, this same executable in another process.
pub async fn start_echo(dir: &Path) -> anyhow::Result<Server> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("serve-echo");
    spawn(command, dir.join("echo.log"), async |endpoint: &str| {
        match tonic::transport::Endpoint::from_shared(endpoint.to_owned()) {
            Ok(e) => match e.connect().await {
                Ok(channel) => crate::echo::call(channel).await.is_ok(),
                Err(_) => false,
            },
            Err(_) => false,
        }
    })
    .await
}

/// The registry binary of `bin_dir` on `database_url` (migrated and loaded at its start), with a
/// directory of freshly generated keys in `dir`.
pub async fn start_registry(dir: &Path, bin_dir: &Path, database_url: &str) -> anyhow::Result<Server> {
    start_registry_with_env(dir, bin_dir, database_url, &[]).await
}

/// [`start_registry`] with extra environment variables (configuration overrides, `YIDI__...`).
pub async fn start_registry_with_env(
    dir: &Path,
    bin_dir: &Path,
    database_url: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir)?;
    let binary = bin_dir.join("yidi-registry");
    if !binary.exists() {
        bail!("{} not found: build the services first (see BENCHMARKS.md)", binary.display());
    }
    topology::write_keys_and_directory_with(dir, |_| topology::loopback_endpoint(1))?;
    let config = dir.join("registry.toml");
    let text = format!(
        "[server]\nbureau_id = \"{id}\"\nlisten = \"127.0.0.1:0\"\n\n[database]\nurl = \"{database_url}\"\n\n\
         [directory]\npath = \"{directory}\"\n\n[tls]\nplaintext = true\n\n[clock]\nfixed = \"{CLOCK}\"\n\n\
         [log]\nformat = \"text\"\nfilter = \"warn,yidi_registry=info\"\n\n\
         [signing]\nkey_dir = \"{key_dir}\"\n",
        id = Process::Registry.bureau_id(),
        directory = dir.join("directory.toml").display(),
        key_dir = topology::key_dir(dir, Process::Registry.bureau_id()).display(),
    );
    std::fs::write(&config, text)?;
    let mut command = Command::new(binary);
    command.arg("--config").arg(&config).env_remove("RUST_LOG").envs(env.iter().copied());
    spawn(command, dir.join("registry.log"), async |endpoint: &str| answers_health(endpoint).await).await
}

/// The seconds the registry said it took to load its card index (its "card index loaded" line).
pub fn index_load_seconds(log: &str) -> Option<f64> {
    log.lines()
        .filter(|line| line.contains("card index loaded"))
        .filter_map(|line| line.split("seconds=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|value| value.parse().ok())
        .next_back()
}
