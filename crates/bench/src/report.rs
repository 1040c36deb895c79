//! Results: each table as Markdown (pasted into BENCHMARKS.md) and everything as JSON.
use std::path::Path;

use serde::Serialize;

use crate::load::LoadResult;

#[derive(Debug, Default, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Self {
        Self { title: title.into(), columns: columns.iter().map(|c| (*c).to_owned()).collect(), ..Self::default() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| {} |\n|", self.title, self.columns.join(" | "));
        for _ in &self.columns {
            out.push_str("---|");
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        for note in &self.notes {
            out.push_str(&format!("\n{note}\n"));
        }
        out
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub command: String,
    pub started_at: String,
    pub machine: String,
    pub tables: Vec<Table>,
    /// Raw measurements, by name.
    pub runs: Vec<(String, LoadResult)>,
    pub values: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn new(command: &str) -> Self {
        Self {
            command: command.into(),
            started_at: chrono::Utc::now().to_rfc3339(),
            machine: machine(),
            ..Self::default()
        }
    }

    pub fn value(&mut self, name: &str, value: impl Serialize) {
        self.values.insert(name.into(), serde_json::to_value(value).unwrap_or_default());
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("## yidi-bench {} ({})\n\nMachine: {}\n\n", self.command, self.started_at, self.machine);
        for table in &self.tables {
            out.push_str(&table.markdown());
            out.push('\n');
        }
        out
    }

    /// Writes `<dir>/<command>.json` and `<dir>/<command>.md`; prints the Markdown.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{}.json", self.command)), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join(format!("{}.md", self.command)), self.markdown())?;
        println!("{}", self.markdown());
        println!("(written to {})", dir.join(format!("{}.{{json,md}}", self.command)).display());
        Ok(())
    }
}

/// CPU model, cores, memory and load, from /proc.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{model}, {cores} cores, {memory} RAM, load average {}", load_average())
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

pub fn thousands(value: f64) -> String {
    let n = value.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency row: name, requests/s, ratio, p50, p90, p99, p99.9 (ms), errors.
pub fn latency_row(name: &str, result: &LoadResult, baseline: Option<&LoadResult>) -> Vec<String> {
    let ratio = baseline
        .filter(|b| b.requests_per_second > 0.0)
        .map(|b| format!("{:.2}x", result.requests_per_second / b.requests_per_second))
        .unwrap_or_else(|| "1.00x (baseline)".into());
    vec![
        name.to_owned(),
        format!("{}×{}", result.spec.connections, result.spec.in_flight),
        thousands(result.requests_per_second),
        ratio,
        ms(result.p50_us),
        ms(result.p90_us),
        ms(result.p99_us),
        ms(result.p999_us),
        result.errors.to_string(),
    ]
}

pub const LATENCY_COLUMNS: &[&str] =
    &["target", "connections×in flight", "requests/s", "vs echo", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors"];
