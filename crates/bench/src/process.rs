//! The servers under measurement, each a process of its own on loopback: the echo baseline (this
//! binary, `serve-echo`) and the registry (the real `yidi-registry` binary with its own config).
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use yidi_demo::{
    certs::{CaChoice, CertDir, write_certificates},
    topology::{self, Process, RELYING_PARTY},
};
use yidi_grpc::balance::Balanced;

/// The fixed instant the registry judges by: the national phase, cards of the loader valid.
pub const CLOCK: &str = "2118-03-01T09:00:00Z";

/// The principal id of the echo baseline's certificate (it serves; nobody calls as it).
pub const ECHO_ID: &str = "bench-echo";

/// Certificates of a run, made the way the demo makes them (`yidi-demo certs`): a fresh CA, and a
/// certificate for the registry, for the echo, for the demo's relying party, which the load
/// generator presents (the directory lets it call CheckCard and CheckCards), and for the demo's
/// station, which forwards loss reports (the replicas' feed-lag run).
#[derive(Debug, Clone)]
pub struct BenchCerts {
    pub certs: CertDir,
}

impl BenchCerts {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let certs = CertDir::new(dir);
        let ids = [Process::Registry.bureau_id(), ECHO_ID, RELYING_PARTY, Process::Intake.bureau_id()];
        write_certificates(&certs, ids, CaChoice::New)?;
        Ok(Self { certs })
    }

    /// The client side of a call to `server_id`, as the relying party.
    fn client(&self, server_id: &str) -> anyhow::Result<ClientTlsConfig> {
        self.client_as(RELYING_PARTY, server_id)
    }

    /// The client side of a call to `server_id`, as `caller` (one of [`Self::create`]'s).
    pub fn client_as(&self, caller: &str, server_id: &str) -> anyhow::Result<ClientTlsConfig> {
        Ok(self.certs.files(caller)?.client_config(server_id))
    }

    /// The `[tls]` section of `id`'s configuration.
    fn config_section(&self, id: &str) -> String {
        format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
            self.certs.ca_pem().display(),
            self.certs.cert(id).display(),
            self.certs.key(id).display()
        )
    }
}

/// How the load generator reaches a server: its address and, over mutual TLS, the client side
/// (the CA, the relying party's certificate, and the name the server must prove).
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub tls: Option<ClientTlsConfig>,
}

impl Target {
    /// For table titles.
    pub fn transport(&self) -> &'static str {
        if self.tls.is_some() { "mutual TLS" } else { "plaintext" }
    }

    /// One connection (HTTP/2, Nagle off).
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())?.tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        endpoint.connect().await.with_context(|| format!("connecting to {}", self.url))
    }
}

pub struct Server {
    child: Child,
    pub pid: u32,
    pub target: Target,
    log: PathBuf,
    /// From spawn until it answered a first request.
    pub startup: Duration,
}

impl Server {
    /// The load generator's targets: this server alone.
    pub fn targets(&self) -> &[Target] {
        std::slice::from_ref(&self.target)
    }

    /// Resident memory (VmRSS) in bytes, from /proc.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(self.pid)
    }

    /// The server's log so far (a byte that is not UTF-8 spoils one character, not the whole log).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default()
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
    memory_of(pid, "VmRSS")
}

/// Peak resident memory (VmHWM) of process `pid` in bytes, from /proc.
pub fn peak_rss_of(pid: u32) -> anyhow::Result<u64> {
    memory_of(pid, "VmHWM")
}

/// A `kB` line of /proc/PID/status, in bytes.
fn memory_of(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc/PID/status"))?;
    Ok(kb * 1024)
}

/// Linux reports process and machine CPU time in USER_HZ ticks, 100 a second on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) process `pid` has used so far, in seconds, from /proc/PID/stat.
pub fn cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it start past its ')'.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the state (field 3).
    let ticks = |index: usize| -> anyhow::Result<f64> {
        Ok(fields.get(index).context("short /proc/PID/stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

/// CPU time the whole machine has spent busy (everything but idle and I/O wait), in seconds,
/// summed over its cores, from /proc/stat.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<f64> = line.split_whitespace().skip(1).map(|t| t.parse::<f64>()).collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    Ok(busy / TICKS_PER_SECOND)
}

async fn spawn(
    mut command: Command,
    log: PathBuf,
    tls: Option<ClientTlsConfig>,
    ready: impl AsyncFn(&Target) -> bool,
) -> anyhow::Result<Server> {
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
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut server = Server { child, pid, target: Target { url: String::new(), tls }, log, startup: Duration::ZERO };
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
            server.target.url = format!("{scheme}://{address}");
            if ready(&server.target).await {
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

async fn answers_health(target: &Target) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let Ok(channel) = target.connect().await else { return false };
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
    answer.is_ok_and(|a| a.get_ref().status == ServingStatus::Serving as i32)
}

/// The echo baseline, this same executable in another process; over mutual TLS with `tls` (the
/// same handshake and client-certificate check as the registry's port, no access layer).
pub async fn start_echo(dir: &Path, tls: Option<&BenchCerts>) -> anyhow::Result<Server> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("serve-echo");
    if let Some(certs) = tls {
        command.arg("--tls-dir").arg(&certs.certs.dir);
    }
    let client = tls.map(|certs| certs.client(ECHO_ID)).transpose()?;
    let log = dir.join(if tls.is_some() { "echo-tls.log" } else { "echo.log" });
    spawn(command, log, client, async |target: &Target| match target.connect().await {
        Ok(channel) => crate::echo::call(Balanced::new([(target.url.clone(), channel)])).await.is_ok(),
        Err(_) => false,
    })
    .await
}

/// The registry binary of `bin_dir` on `database_url` (migrated and loaded at its start), with a
/// directory of freshly generated keys in `dir`; over mutual TLS with the access layer on with
/// `tls`, else `tls.plaintext = true`; with extra environment variables (configuration
/// overrides, `YIDI__...`).
pub async fn start_registry_with_env(
    dir: &Path,
    bin_dir: &Path,
    database_url: &str,
    tls: Option<&BenchCerts>,
    env: &[(&str, &str)],
) -> anyhow::Result<Server> {
    prepare_registry_dir(dir, tls)?;
    spawn_registry(dir, bin_dir, database_url, tls, env, "registry").await
}

/// Fresh keys of every signing bureau and the directory (the registry's endpoint a placeholder:
/// the load generator is given the address) in `dir`.
pub fn prepare_registry_dir(dir: &Path, tls: Option<&BenchCerts>) -> anyhow::Result<topology::Keys> {
    std::fs::create_dir_all(dir)?;
    topology::write_keys_and_directory_with(dir, |_| vec![topology::loopback_endpoint_with(tls.is_some(), 1)])
}

/// One registry process with the keys and directory of `dir` ([`prepare_registry_dir`]);
/// `name` names its configuration and log there, so that replicas of one registry share a folder.
pub async fn spawn_registry(
    dir: &Path,
    bin_dir: &Path,
    database_url: &str,
    tls: Option<&BenchCerts>,
    env: &[(&str, &str)],
    name: &str,
) -> anyhow::Result<Server> {
    let binary = bin_dir.join("yidi-registry");
    if !binary.exists() {
        bail!("{} not found: build the services first (see BENCHMARKS.md)", binary.display());
    }
    let id = Process::Registry.bureau_id();
    let tls_section = match tls {
        Some(certs) => certs.config_section(id),
        None => "plaintext = true".to_owned(),
    };
    let config = dir.join(format!("{name}.toml"));
    let text = format!(
        "[server]\nbureau_id = \"{id}\"\nlisten = \"127.0.0.1:0\"\n\n[database]\nurl = \"{database_url}\"\n\n\
         [directory]\npath = \"{directory}\"\n\n[tls]\n{tls_section}\n\n[clock]\nfixed = \"{CLOCK}\"\n\n\
         [log]\nformat = \"text\"\nfilter = \"warn,yidi_registry=info\"\n\n\
         [signing]\nkey_dir = \"{key_dir}\"\n",
        directory = dir.join("directory.toml").display(),
        key_dir = topology::key_dir(dir, Process::Registry.bureau_id()).display(),
    );
    std::fs::write(&config, text)?;
    let mut command = Command::new(binary);
    command.arg("--config").arg(&config).env_remove("RUST_LOG").envs(env.iter().copied());
    let client = tls.map(|certs| certs.client(id)).transpose()?;
    spawn(command, dir.join(format!("{name}.log")), client, async |target: &Target| answers_health(target).await).await
}

/// The seconds the registry said it took to load its card index: its "card index loaded" line, in
/// the text format (`... card index loaded cards=N seconds=S [trace_id=...]`) or in JSON
/// (`"fields":{"message":"card index loaded",...,"seconds":S}`), the last one of the log.
pub fn index_load_seconds(log: &str) -> Option<f64> {
    log_field(log, "card index loaded", "seconds")
}

/// Field `field` of the last log line with `message` (text or JSON format), as a number.
pub fn log_field(log: &str, message: &str, field: &str) -> Option<f64> {
    log.lines().filter(|line| line.contains(message)).filter_map(|line| number_field(line, field)).next_back()
}

fn number_field(line: &str, field: &str) -> Option<f64> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        return json.pointer(&format!("/fields/{field}")).and_then(serde_json::Value::as_f64);
    }
    let prefix = format!("{field}=");
    line.split_whitespace().find_map(|pair| pair.strip_prefix(prefix.as_str())).and_then(|value| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_from_proc() {
        // Spin until /proc says this process used 50 ms more CPU; on a busy machine that takes
        // longer than 50 ms of wall time, never less.
        let (started, before) = (std::time::Instant::now(), cpu_seconds_of(std::process::id()).unwrap());
        let mut x = 0u64;
        while cpu_seconds_of(std::process::id()).unwrap() < before + 0.05 {
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "CPU time never grew");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(35),
            "50 ms of CPU (in 10 ms ticks) in {:?}",
            started.elapsed()
        );
        assert!(machine_busy_seconds().unwrap() >= before + 0.05);
    }

    #[test]
    fn resident_and_peak_memory_are_read_from_proc() {
        let (rss, peak) = (rss_of(std::process::id()).unwrap(), peak_rss_of(std::process::id()).unwrap());
        assert!(rss > 0 && peak >= rss, "rss {rss}, peak {peak}");
    }

    #[test]
    fn the_index_load_is_read_from_a_text_or_a_json_log() {
        let text = "yidi-registry listening on 127.0.0.1:1\n\
            2026-12-03T11:53:02.405973Z  INFO yidi_registry: status signing keys loaded key_id=k\n\
            2026-12-03T11:53:02.428504Z  INFO yidi_registry: card index loaded cards=1000 seconds=0.0127 \
            trace_id=0af7651916cd43dd8448eb211c80319c span_id=b7ad6b7169203331\n";
        assert_eq!(index_load_seconds(text), Some(0.0127));
        let json = r#"{"timestamp":"x","level":"INFO","fields":{"message":"card index loaded","cards":10,"seconds":26.5},"target":"yidi_registry"}"#;
        assert_eq!(index_load_seconds(json), Some(26.5));
        assert_eq!(index_load_seconds("yidi-registry listening on 127.0.0.1:1\n"), None);
    }
}
