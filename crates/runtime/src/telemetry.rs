//! Logs, traces and metrics.
//!
//! * Logs: structured, on stderr, human-readable or JSON (`[log] format = "json"`). Every line
//!   written inside a span carries the OpenTelemetry `trace_id` and `span_id` of that span, so a
//!   log line can be found from a trace and the other way round.
//! * Traces: every `tracing` span is an OpenTelemetry span, exported over OTLP/gRPC when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Which traces
//!   are recorded is the sampler's choice, `OTEL_TRACES_SAMPLER` (+ `OTEL_TRACES_SAMPLER_ARG`):
//!   `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (the default),
//!   `parentbased_always_off`, `parentbased_traceidratio`. With no exporter and no sampler set
//!   (or `always_off`), tracing is off: no OpenTelemetry layer is installed, the RPC layer builds
//!   no span per call ([`tracing_on`]), log lines carry no trace ids and no trace context is
//!   propagated. A sampler set without an exporter turns tracing on for the logs' ids and the
//!   propagation only, nothing leaves the process.
//! * Metrics: recorded through the global OpenTelemetry meter (see `rpc_telemetry`), exported over
//!   OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._METRICS_ENDPOINT`) is set; otherwise
//!   not recorded at all ([`metrics_on`]).
//!
//! The standard variables are read by the OpenTelemetry SDK itself: `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_*`;
//! `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` switch one signal off.
use std::{
    collections::HashMap,
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry::{
    KeyValue,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    metrics::SdkMeterProvider,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use serde::Deserialize;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter,
    filter::Targets,
    fmt::{
        FmtContext, FormatEvent, FormatFields, MakeWriter,
        format::{Writer, format},
    },
    prelude::*,
    registry::LookupSpan,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, filter: "info,sqlx=warn,sea_orm=warn,h2=warn,tower=warn".into() }
    }
}

pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const OTLP_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
const TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";

/// Whether the installed subscriber records spans (see [`tracing_on`]).
static TRACING: AtomicBool = AtomicBool::new(false);
/// Whether metrics are exported (see [`metrics_on`]).
static METRICS: AtomicBool = AtomicBool::new(false);

/// Whether this process traces: an exporter or a sampler is configured ([`init`]). Off, the RPC
/// layer builds no span per call and injects or reads no trace context.
pub fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Whether this process exports metrics; off, the RPC layer records none.
pub fn metrics_on() -> bool {
    METRICS.load(Ordering::Relaxed)
}
/// How long shutting down may wait for the last spans and metrics to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is reporting: the default `service.name` (`OTEL_SERVICE_NAME` overrides it) and the bureau.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// e.g. `yidi-intake`.
    pub service: &'a str,
    /// e.g. `station-hangzhou`; several bureaus may run the same service.
    pub bureau_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{variable}: {message}")]
    Exporter { variable: &'static str, message: String },
    #[error("{variable}: {message}")]
    Sampler { variable: &'static str, message: String },
}

/// The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name (None: unset). Unlike
/// the SDK, which falls back to `parentbased_always_on` with a warning, a value it cannot read
/// stops the start.
fn sampler_from(name: Option<&str>, arg: Option<&str>) -> Result<Option<Sampler>, TelemetryError> {
    let Some(name) = name.map(str::trim).filter(|name| !name.is_empty()) else {
        return Ok(None);
    };
    let ratio = || {
        let arg = arg.map(str::trim).unwrap_or_default();
        match arg.parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
            _ => Err(TelemetryError::Sampler {
                variable: TRACES_SAMPLER_ARG,
                message: format!("{name} needs a ratio between 0 and 1, found {arg:?}"),
            }),
        }
    };
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    Ok(Some(match name.to_ascii_lowercase().as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
        "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(ratio()?)),
        other => {
            return Err(TelemetryError::Sampler {
                variable: TRACES_SAMPLER,
                message: format!(
                    "unknown sampler {other:?}; one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            });
        }
    }))
}

/// The sampler to trace with, or None when tracing is off: no exporter and no sampler set, or a
/// sampler that never records (`always_off`).
fn tracing_sampler(exported: bool, configured: Option<Sampler>) -> Option<Sampler> {
    match configured {
        Some(Sampler::AlwaysOff) => None,
        Some(sampler) => Some(sampler),
        None if exported => Some(Sampler::ParentBased(Box::new(Sampler::AlwaysOn))),
        None => None,
    }
}

/// The installed providers; [`Telemetry::shutdown`] exports what is still buffered. Call it at exit.
#[must_use = "call shutdown() at exit, or the last spans are lost"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").field("metrics", &self.meter.is_some()).finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Flushes and shuts down the providers. Their calls block (the exporters wait on the network),
    /// so they run on the blocking pool rather than on a runtime worker.
    pub async fn shutdown(self) {
        let Self { tracer, meter } = self;
        let flushed = tokio::task::spawn_blocking(move || {
            // Shutting down exports what is buffered first.
            let traces = tracer.map_or(Ok(()), |tracer| tracer.shutdown_with_timeout(FLUSH_TIMEOUT));
            let metrics = meter.map(|meter| meter.shutdown_with_timeout(FLUSH_TIMEOUT));
            (traces, metrics)
        })
        .await;
        match flushed {
            Ok((Err(error), _)) => eprintln!("telemetry: flushing traces failed: {error}"),
            Ok((_, Some(Err(error)))) => eprintln!("telemetry: flushing metrics failed: {error}"),
            Err(error) => eprintln!("telemetry: flushing failed: {error}"),
            _ => {}
        }
    }
}

/// Whether a signal is exported: an endpoint is configured and the signal is not switched off.
fn exported(signal_endpoint: &str, exporter_switch: &str) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    (set(OTLP_ENDPOINT) || set(signal_endpoint))
        && !std::env::var(exporter_switch).is_ok_and(|value| value.trim().eq_ignore_ascii_case("none"))
}

fn resource(identity: Identity<'_>) -> Resource {
    // The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is the fallback.
    let builder = Resource::builder().with_attribute(KeyValue::new("yidi.bureau_id", identity.bureau_id.to_owned()));
    if std::env::var(SERVICE_NAME).is_ok_and(|name| !name.trim().is_empty()) {
        builder.build()
    } else {
        builder.with_service_name(identity.service.to_owned()).build()
    }
}

/// Installs the global subscriber (logs + spans) and meter provider. Must run inside the tokio
/// runtime (the exporters' channels live on it). A second call in one process (several services
/// in one test) leaves the first subscriber in place.
pub fn init(config: &LogConfig, identity: Identity<'_>) -> Result<Telemetry, TelemetryError> {
    let resource = resource(identity);
    let traces_exported = exported(OTLP_TRACES_ENDPOINT, "OTEL_TRACES_EXPORTER");
    let configured =
        sampler_from(std::env::var(TRACES_SAMPLER).ok().as_deref(), std::env::var(TRACES_SAMPLER_ARG).ok().as_deref())?;
    let tracer = match tracing_sampler(traces_exported, configured) {
        None => None,
        Some(sampler) => {
            let mut tracer = SdkTracerProvider::builder().with_resource(resource.clone()).with_sampler(sampler);
            if traces_exported {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(|e| TelemetryError::Exporter { variable: OTLP_ENDPOINT, message: e.to_string() })?;
                tracer = tracer.with_batch_exporter(exporter);
            }
            Some(tracer.build())
        }
    };
    let meter = if exported(OTLP_METRICS_ENDPOINT, "OTEL_METRICS_EXPORTER") {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter { variable: OTLP_ENDPOINT, message: e.to_string() })?;
        let meter = SdkMeterProvider::builder().with_resource(resource).with_periodic_exporter(exporter).build();
        opentelemetry::global::set_meter_provider(meter.clone());
        Some(meter)
    } else {
        None
    };

    // A second subscriber in one process (several services in one test) is refused: the first
    // stays, and so do the switches it set.
    if subscriber(config, tracer.as_ref(), std::io::stderr).try_init().is_ok() {
        TRACING.store(tracer.is_some(), Ordering::Relaxed);
        METRICS.store(meter.is_some(), Ordering::Relaxed);
    }
    Ok(Telemetry { tracer, meter })
}

/// Logs (to `writer`, filtered by `[log] filter` or `RUST_LOG`) and spans (to `tracer`, if any).
fn subscriber<W>(
    config: &LogConfig,
    tracer: Option<&SdkTracerProvider>,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    // Spans have their own filter: a quieter log must not cut a trace (nor stop its propagation).
    let span_filter = Targets::new()
        .with_default(Level::INFO)
        .with_targets(["h2", "hyper", "tower", "sqlx", "sea_orm"].map(|target| (target, Level::WARN)));
    let spans =
        tracer.map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer.tracer("yidi")).with_filter(span_filter));
    let registry = tracing_subscriber::registry().with(spans);
    // No colours: the ids are added to a line formatted apart, which has none (and log files and
    // collectors want plain text anyway).
    let logs = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false);
    match config.format {
        LogFormat::Text => Box::new(registry.with(logs.event_format(WithTraceIds(format())).with_filter(log_filter))),
        LogFormat::Json => {
            Box::new(registry.with(logs.json().event_format(WithTraceIds(format().json())).with_filter(log_filter)))
        }
    }
}

/// An event format that adds the current OpenTelemetry trace and span ids to every line written
/// inside a span: as the first members of a JSON object, or as trailing `trace_id=… span_id=…`
/// fields of a text line.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        // The OpenTelemetry layer activates a span's context when the span is entered.
        let ids = opentelemetry::Context::map_current(|cx| {
            let span = cx.span();
            let context = span.span_context();
            context.is_valid().then(|| (context.trace_id(), context.span_id()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        if let Some(rest) = line.strip_prefix('{') {
            write!(writer, "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}")
        } else {
            let (body, newline) = line.strip_suffix('\n').map_or((line.as_str(), ""), |body| (body, "\n"));
            write!(writer, "{body} trace_id={trace_id} span_id={span_id}{newline}")
        }
    }
}

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// The W3C `traceparent` of the current span (None outside any trace), to be stored with work
/// that a background worker will carry on later.
pub fn current_traceparent() -> Option<String> {
    let mut carrier = HashMap::new();
    propagator().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes a stored W3C `traceparent` the parent of `span` (a span not yet entered), so that work
/// resumed later joins the trace of the request that started it. Nothing happens without one.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|value| !value.is_empty()) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = propagator().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only without the OpenTelemetry layer (e.g. in-process tests): then there is no trace to join.
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Formats one event inside a span and one outside; returns the lines and the span's ids.
    fn log_lines(format: LogFormat) -> (Vec<String>, String, String) {
        let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let buffer = Arc::clone(&buffer);
            move || SharedBuffer(Arc::clone(&buffer))
        };
        let config = LogConfig { format, ..LogConfig::default() };
        let tracer = SdkTracerProvider::builder().build();
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber(&config, Some(&tracer), writer), || {
            let span = tracing::info_span!("request");
            let context = span.context().span().span_context().clone();
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
            tracing::info!("outside");
            (context.trace_id().to_string(), context.span_id().to_string())
        });
        let text = String::from_utf8(buffer.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        (text.lines().map(str::to_owned).collect(), trace_id, span_id)
    }

    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_lines_inside_a_span_end_with_its_trace_and_span_ids() {
        let (lines, trace_id, span_id) = log_lines(LogFormat::Text);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("inside answer=42"), "{}", lines[0]);
        assert!(lines[0].ends_with(&format!(" trace_id={trace_id} span_id={span_id}")), "{}", lines[0]);
        assert!(!lines[1].contains("trace_id="), "{}", lines[1]);
    }

    #[test]
    fn json_lines_inside_a_span_carry_its_trace_and_span_ids() {
        let (lines, trace_id, span_id) = log_lines(LogFormat::Json);
        let parsed: Vec<serde_json::Value> = lines.iter().filter_map(|line| serde_json::from_str(line).ok()).collect();
        assert_eq!(parsed.len(), 2, "{lines:?}");
        assert_eq!(parsed[0]["trace_id"], trace_id.as_str());
        assert_eq!(parsed[0]["span_id"], span_id.as_str());
        assert_eq!(parsed[0]["fields"]["message"], "inside");
        assert!(parsed[1].get("trace_id").is_none(), "{}", lines[1]);
    }

    #[test]
    fn without_an_exporter_or_a_sampler_nothing_is_traced() {
        let name = |sampler: Option<Sampler>| sampler.map(|s| format!("{s:?}"));
        assert_eq!(name(tracing_sampler(false, None)), None, "off by default");
        assert_eq!(name(tracing_sampler(true, None)), name(Some(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))));
        assert_eq!(name(tracing_sampler(true, Some(Sampler::AlwaysOff))), None, "sampling off");
        let ratio = sampler_from(Some("traceidratio"), Some("0.25")).unwrap();
        assert_eq!(name(tracing_sampler(false, ratio)), Some("TraceIdRatioBased(0.25)".to_owned()));
    }

    #[test]
    fn the_sampler_is_read_from_the_standard_variables_and_a_bad_one_stops_the_start() {
        let name = |sampler: &str, arg: Option<&str>| {
            sampler_from(Some(sampler), arg).map(|s| s.map(|s| format!("{s:?}"))).map_err(|e| e.to_string())
        };
        assert!(sampler_from(None, Some("0.5")).unwrap().is_none());
        assert_eq!(
            name("parentbased_traceidratio", Some("0.1")).unwrap().unwrap(),
            "ParentBased(TraceIdRatioBased(0.1))"
        );
        assert_eq!(name("always_off", None).unwrap().unwrap(), "AlwaysOff");
        assert!(name("traceidratio", None).unwrap_err().contains(TRACES_SAMPLER_ARG));
        assert!(name("traceidratio", Some("2")).unwrap_err().contains(TRACES_SAMPLER_ARG));
        assert!(name("sometimes", None).unwrap_err().contains(TRACES_SAMPLER));
    }

    #[test]
    fn a_stored_traceparent_becomes_the_parent_of_later_work() {
        let config = LogConfig::default();
        let tracer = SdkTracerProvider::builder().build();
        tracing::subscriber::with_default(subscriber(&config, Some(&tracer), std::io::sink), || {
            let request = tracing::info_span!("request");
            let stored = request.in_scope(current_traceparent).unwrap_or_default();
            let request_context = request.context().span().span_context().clone();
            assert!(stored.contains(&request_context.trace_id().to_string()), "{stored}");

            let later = tracing::info_span!("later");
            continue_trace(&later, Some(&stored));
            let later_context = later.context().span().span_context().clone();
            assert_eq!(later_context.trace_id(), request_context.trace_id());
            assert_ne!(later_context.span_id(), request_context.span_id());
        });
    }
}
