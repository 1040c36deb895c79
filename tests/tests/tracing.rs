//! One application, one trace: the four bureaus (real binaries) export their spans over OTLP/gRPC
//! to a receiver in this test process, and one replacement is driven to READY_FOR_COLLECTION.
//! Its trace must hold the spans of all four services, each server span a child of the client
//! span that called it, and the database transactions; the logs must carry its trace id, and the
//! per-RPC metrics (a stream's counted when it ends) must arrive too.
//!
//! Run on SQLite only: the tracing layers and the stored trace context are the same code on
//! PostgreSQL, which the rest of the suite covers.
//!
//! Without `OTEL_EXPORTER_OTLP_ENDPOINT` nothing is exported and nothing fails: every other
//! integration test runs the bureaus without it.
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::metric,
    resource::v1::Resource,
    trace::v1::span::SpanKind,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use yidi_proto::v1 as pb;
use yidi_tests::{Db, NATIONAL_DAY, serial, start, topology::Process};

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    kind: i32,
}

/// A metric data point as received: service, metric name, attributes.
#[derive(Debug, Clone)]
struct ReceivedPoint {
    service: String,
    metric: String,
    attributes: HashMap<String, String>,
}

/// The OTLP receiver: what the collector would get.
#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    points: Arc<Mutex<Vec<ReceivedPoint>>>,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect()
}

fn service_name(resource: Option<&Resource>) -> String {
    resource.map(|r| attributes(&r.attributes)).and_then(|mut a| a.remove("service.name")).unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    name: span.name,
                    kind: span.kind,
                });
            }
        }
        self.spans.lock().map_err(|_| Status::internal("poisoned"))?.extend(received);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_metrics in request.into_inner().resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref());
            for metric in resource_metrics.scope_metrics.into_iter().flat_map(|scope| scope.metrics) {
                let points: Vec<HashMap<String, String>> = match &metric.data {
                    Some(metric::Data::Sum(sum)) => sum.data_points.iter().map(|p| attributes(&p.attributes)).collect(),
                    Some(metric::Data::Histogram(histogram)) => {
                        histogram.data_points.iter().map(|p| attributes(&p.attributes)).collect()
                    }
                    _ => Vec::new(),
                };
                received.extend(points.into_iter().map(|attributes| ReceivedPoint {
                    service: service.clone(),
                    metric: metric.name.clone(),
                    attributes,
                }));
            }
        }
        self.points.lock().map_err(|_| Status::internal("poisoned"))?.extend(received);
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Receiver {
    async fn start(&self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .add_service(MetricsServiceServer::new(self.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Ok(address)
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|spans| spans.clone()).unwrap_or_default()
    }

    fn points(&self) -> Vec<ReceivedPoint> {
        self.points.lock().map(|points| points.clone()).unwrap_or_default()
    }
}

const SERVER: i32 = SpanKind::Server as i32;
const CLIENT: i32 = SpanKind::Client as i32;

/// A server span in `trace` and its parent, which must be the caller's client span of the same RPC.
fn check_call(spans: &[ReceivedSpan], caller: &str, callee: &str, rpc: &str) -> Result<(), String> {
    let server = spans
        .iter()
        .find(|s| s.service == callee && s.name == rpc && s.kind == SERVER)
        .ok_or_else(|| format!("no server span {rpc} from {callee}"))?;
    let parent = spans
        .iter()
        .find(|s| s.span_id == server.parent_span_id)
        .ok_or_else(|| format!("the parent of {callee}'s {rpc} span is not in the trace"))?;
    if parent.service != caller || parent.kind != CLIENT || parent.name != rpc {
        return Err(format!("{callee}'s {rpc} span has parent {parent:?}, not {caller}'s client span of {rpc}"));
    }
    Ok(())
}

/// Everything the trace must hold, or what it still lacks.
fn check_trace(spans: &[ReceivedSpan]) -> Result<(), String> {
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for service in ["yidi-intake", "yidi-verification", "yidi-issuance", "yidi-registry"] {
        if !services.contains(service) {
            return Err(format!("no span from {service} (have {services:?})"));
        }
        if !spans.iter().any(|s| s.service == service && s.name == "db.transaction") {
            return Err(format!("no db.transaction span from {service}"));
        }
    }
    check_call(spans, "yidi-intake", "yidi-verification", "yidi.v1.Verification/Verify")?;
    check_call(spans, "yidi-intake", "yidi-registry", "yidi.v1.LossRegistry/ReportLoss")?;
    check_call(spans, "yidi-intake", "yidi-issuance", "yidi.v1.Issuance/PlaceOrder")?;
    check_call(spans, "yidi-issuance", "yidi-registry", "yidi.v1.LossRegistry/RegisterCard")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_application_is_one_trace_across_the_four_bureaus() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let address = receiver.start().await?;
    let Some(t) = start(Db::Sqlite, NATIONAL_DAY, |options| {
        options.log_format = "json".into();
        options.env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{address}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".into()),
        ]
        .map(|(name, value)| (name.to_owned(), value))
        .to_vec();
    })
    .await?
    else {
        bail!("a SQLite suite is never skipped");
    };

    let citizen = t.citizen("replacement", "36")?;
    let submitted = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    t.wait_for_state(&submitted.application_id, pb::ApplicationState::ReadyForCollection).await?;

    // The spans arrive in batches; wait for the whole trace, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (trace_id, trace) = loop {
        let spans = receiver.spans();
        let submit = spans
            .iter()
            .find(|s| s.service == "yidi-intake" && s.name == "yidi.v1.Intake/SubmitApplication" && s.kind == SERVER);
        let outcome = match submit {
            None => Err("no SubmitApplication server span yet".to_owned()),
            Some(submit) => {
                let trace: Vec<ReceivedSpan> =
                    spans.iter().filter(|s| s.trace_id == submit.trace_id).cloned().collect();
                check_trace(&trace).map(|()| (submit.trace_id.clone(), trace))
            }
        };
        match outcome {
            Ok(found) => break found,
            Err(missing) if Instant::now() > deadline => {
                bail!("the application's trace is incomplete: {missing}\nspans: {spans:#?}\n{}", t.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let submit = trace.iter().find(|s| s.name == "yidi.v1.Intake/SubmitApplication").context("submit span")?;
    assert!(submit.parent_span_id.is_empty(), "the counter's request starts the trace");
    // The launcher probed every bureau's health until it served: probes make no traces.
    let probes: Vec<ReceivedSpan> =
        receiver.spans().into_iter().filter(|s| s.name.starts_with("grpc.health")).collect();
    assert!(probes.is_empty(), "health probes were traced: {probes:?}");

    // Logs (JSON here) carry the trace id of the request they were written in.
    let trace_hex = hex(&trace_id);
    for process in [Process::Intake, Process::HomeJiangxi, Process::Issuance, Process::Registry] {
        let log = std::fs::read_to_string(t.suite.log_path(process))?;
        let in_trace = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["trace_id"] == trace_hex.as_str())
            .count();
        assert!(in_trace > 0, "no {} log line carries trace_id {trace_hex}:\n{log}", process.slug());
    }

    // Per-RPC metrics: request count, error count and latency by method and status.
    let unknown = pb::GetApplicationRequest { application_id: uuid::Uuid::new_v4().to_string() };
    let missing = t.intake().await?.get_application(unknown).await.expect_err("no such application");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // A stream's call ends when the stream does: a watch the client drops counts as CANCELLED.
    let watch = pb::WatchApplicationRequest { application_id: submitted.application_id.clone() };
    let mut watching = t.intake().await?.watch_application(watch).await?.into_inner();
    watching.message().await?.context("the watch answers the current state first")?;
    drop(watching);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let points = receiver.points();
        let has = |service: &str, metric: &str, method: &str, code: &str| {
            points.iter().any(|p| {
                p.service == service
                    && p.metric == metric
                    && p.attributes.get("rpc.method").is_some_and(|m| m == method)
                    && p.attributes.get("rpc.grpc.status_code").is_some_and(|c| c == code)
            })
        };
        if has("yidi-intake", "rpc.server.requests", "SubmitApplication", "0")
            && has("yidi-intake", "rpc.server.duration", "SubmitApplication", "0")
            && has("yidi-intake", "rpc.server.errors", "GetApplication", "5")
            && has("yidi-intake", "rpc.server.errors", "WatchApplication", "1")
            && has("yidi-registry", "rpc.server.requests", "RegisterCard", "0")
            && has("yidi-issuance", "rpc.client.requests", "RegisterCard", "0")
        {
            assert!(!has("yidi-intake", "rpc.server.errors", "SubmitApplication", "0"), "an OK call is no error");
            break;
        }
        if Instant::now() > deadline {
            bail!("per-RPC metrics missing: {points:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.stop().await
}
