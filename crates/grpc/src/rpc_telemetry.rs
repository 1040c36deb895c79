//! A span and metrics per gRPC call, with W3C trace context carried in the request metadata, as
//! one tower layer used on both ends: the server wraps every service it serves
//! (`RpcTelemetryLayer::server`), and every channel to another bureau is wrapped too
//! (`RpcTelemetryLayer::client`, see `client::channel`). Handlers know nothing of it.
//!
//! * Server: reads `traceparent`/`tracestate` from the request headers, opens a server span named
//!   after the gRPC path (`yidi.v1.Intake/SubmitApplication`) as a child of the caller's span.
//! * Client: opens a client span under the current span and writes its `traceparent` into the
//!   outgoing headers, so the callee's server span is its child.
//! * Both: OpenTelemetry semantic attributes (`rpc.system`, `rpc.service`, `rpc.method`,
//!   `rpc.grpc.status_code`) and metrics per method: `rpc.{server,client}.requests` and
//!   `rpc.{server,client}.errors` (counters, by status code) and `rpc.{server,client}.duration`
//!   (histogram, milliseconds).
//!
//! Health probes and reflection get metrics but no span.
//!
//! Telemetry off costs nothing per call: without tracing ([`telemetry::tracing_on`]: no exporter
//! and no sampler configured) no span is built and no trace context read or written; without
//! metrics export ([`telemetry::metrics_on`]) nothing is recorded; with neither, a call passes
//! straight through (the path is not even parsed).
//!
//! A call ends, for its span and its metrics, when its status is known: at once for a response
//! that carries it in its headers (a unary call's error), otherwise with the trailers after the
//! last message, so that a stream's span and latency cover the whole stream and an error in the
//! middle of it is counted; a stream the other end drops counts as CANCELLED.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::Body;
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram},
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::{
    Code,
    codegen::http::{HeaderMap, HeaderName, HeaderValue, Request, Response},
};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use yidi_runtime::telemetry;

/// Which end of a call a layer sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

struct RpcMetrics {
    requests: Counter<u64>,
    errors: Counter<u64>,
    duration: Histogram<f64>,
}

impl RpcMetrics {
    /// Instruments of the global meter provider (a no-op one unless OTLP metrics are configured).
    fn new(side: Side) -> Self {
        let meter = opentelemetry::global::meter("yidi");
        let prefix = match side {
            Side::Server => "rpc.server",
            Side::Client => "rpc.client",
        };
        Self {
            requests: meter
                .u64_counter(format!("{prefix}.requests"))
                .with_description("gRPC calls, by method and status")
                .build(),
            errors: meter
                .u64_counter(format!("{prefix}.errors"))
                .with_description("gRPC calls that ended with a status other than OK, by method and status")
                .build(),
            duration: meter
                .f64_histogram(format!("{prefix}.duration"))
                .with_unit("ms")
                .with_description("gRPC call latency, by method and status")
                .build(),
        }
    }

    fn record(&self, rpc: &Rpc, code: Code, started: Instant) {
        let attributes = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", rpc.service.clone()),
            KeyValue::new("rpc.method", rpc.method.clone()),
            KeyValue::new("rpc.grpc.status_code", i64::from(code as i32)),
        ];
        self.requests.add(1, &attributes);
        if code != Code::Ok {
            self.errors.add(1, &attributes);
        }
        self.duration.record(started.elapsed().as_secs_f64() * 1000.0, &attributes);
    }
}

/// `/yidi.v1.Intake/SubmitApplication` → service `yidi.v1.Intake`, method `SubmitApplication`.
struct Rpc {
    name: String,
    service: String,
    method: String,
}

impl Rpc {
    fn from_path(path: &str) -> Self {
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        Self { name: name.to_owned(), service: service.to_owned(), method: method.to_owned() }
    }

    /// Health probes and reflection are counted but not traced: probes every few seconds would
    /// bury the applications' traces.
    fn is_untraced(&self) -> bool {
        self.service.starts_with("grpc.health.") || self.service.starts_with("grpc.reflection.")
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// The gRPC status in response headers or trailers; none there means OK.
fn status_of(headers: &HeaderMap) -> Code {
    headers
        .get(GRPC_STATUS)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// Whether the span is marked as failed: by the server only for its own faults (OpenTelemetry's
/// gRPC conventions), by the client for any status but OK.
fn is_span_error(side: Side, code: Code) -> bool {
    match side {
        Side::Client => code != Code::Ok,
        Side::Server => matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ),
    }
}

/// The tower layer; see the module documentation.
#[derive(Clone)]
pub struct RpcTelemetryLayer {
    side: Side,
    metrics: Arc<RpcMetrics>,
}

impl std::fmt::Debug for RpcTelemetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTelemetryLayer").field("side", &self.side).finish_non_exhaustive()
    }
}

impl RpcTelemetryLayer {
    pub fn server() -> Self {
        Self { side: Side::Server, metrics: Arc::new(RpcMetrics::new(Side::Server)) }
    }

    pub fn client() -> Self {
        Self { side: Side::Client, metrics: Arc::new(RpcMetrics::new(Side::Client)) }
    }
}

impl<S> tower::Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry { inner, side: self.side, metrics: Arc::clone(&self.metrics) }
    }
}

/// A service (a server's routes or a client's channel) with a span and metrics per call.
#[derive(Clone)]
pub struct RpcTelemetry<S> {
    inner: S,
    side: Side,
    metrics: Arc<RpcMetrics>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RpcTelemetry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTelemetry").field("inner", &self.inner).field("side", &self.side).finish_non_exhaustive()
    }
}

impl<S> RpcTelemetry<S> {
    fn span(&self, rpc: &Rpc, headers: &mut HeaderMap, traced: bool) -> Span {
        if !traced || rpc.is_untraced() {
            return Span::none();
        }
        let propagator = TraceContextPropagator::new();
        // Only the name and kind are `tracing` fields (they show in every log line of the call);
        // the rest are OpenTelemetry attributes only.
        let span = match self.side {
            Side::Server => tracing::info_span!("grpc", otel.name = %rpc.name, otel.kind = "server"),
            Side::Client => tracing::info_span!("grpc_client", otel.name = %rpc.name, otel.kind = "client"),
        };
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", rpc.service.clone());
        span.set_attribute("rpc.method", rpc.method.clone());
        match self.side {
            Side::Server => {
                let parent = propagator.extract(&HeaderExtractor(headers));
                if parent.span().span_context().is_valid() {
                    // Fails only without the OpenTelemetry layer installed: then there is nothing to join.
                    let _ = span.set_parent(parent);
                }
            }
            Side::Client => propagator.inject_context(&span.context(), &mut HeaderInjector(headers)),
        }
        span
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for RpcTelemetry<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let (traced, metered) = (telemetry::tracing_on(), telemetry::metrics_on());
        // The clone is not ready yet; the service that was polled ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !traced && !metered {
            let call = inner.call(request);
            return Box::pin(async move {
                let response = call.await?;
                Ok(response.map(|body| ObservedBody { inner: body, pending: None }))
            });
        }
        let rpc = Rpc::from_path(request.uri().path());
        let span = self.span(&rpc, request.headers_mut(), traced);
        let call_ends = CallEnd {
            span: span.clone(),
            rpc,
            side: self.side,
            metrics: metered.then(|| Arc::clone(&self.metrics)),
            started: Instant::now(),
            recorded: false,
        };
        let call = span.in_scope(|| inner.call(request));
        Box::pin(
            async move {
                let response = match call.await {
                    Ok(response) => response,
                    Err(error) => {
                        // The server's routes never fail; a channel fails when the peer is unreachable.
                        call_ends.record(Code::Unavailable);
                        return Err(error);
                    }
                };
                let (parts, body) = response.into_parts();
                // A status in the headers (trailers-only: every error of a unary call) ends the call now;
                // otherwise it ends with the trailers, after the last message.
                let pending = if parts.headers.contains_key(GRPC_STATUS) || body.is_end_stream() {
                    call_ends.record(status_of(&parts.headers));
                    None
                } else {
                    Some(call_ends)
                };
                Ok(Response::from_parts(parts, ObservedBody { inner: body, pending }))
            }
            .instrument(span),
        )
    }
}

/// What is recorded when a call ends: its span's status and the metrics. A call dropped before
/// its status was known (the other end went away, e.g. a client that stopped a watch, or cancelled
/// a call in flight) ends as CANCELLED.
struct CallEnd {
    span: Span,
    rpc: Rpc,
    side: Side,
    /// None when metrics are not exported.
    metrics: Option<Arc<RpcMetrics>>,
    started: Instant,
    recorded: bool,
}

impl CallEnd {
    /// Records the call's end; its span ends when this (its last handle) is dropped.
    fn record(mut self, code: Code) {
        self.finish(code);
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        if !self.span.is_none() {
            self.span.set_attribute("rpc.grpc.status_code", i64::from(code as i32));
            if is_span_error(self.side, code) {
                self.span.set_status(opentelemetry::trace::Status::error(format!("{code:?}")));
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.record(&self.rpc, code, self.started);
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// A response body that ends its call when the trailers pass (or the stream breaks off, or is
/// dropped), so that a stream's span, status and latency cover the whole stream.
pub struct ObservedBody<B> {
    inner: B,
    pending: Option<CallEnd>,
}

impl<B: Body + Unpin> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(status_of),
            Poll::Ready(Some(Err(_))) => Some(Code::Internal),
            // gRPC always ends with trailers: an end without them is a broken call.
            Poll::Ready(None) => Some(Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = ended
            && let Some(call) = this.pending.take()
        {
            call.record(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_the_service_and_the_method() {
        let rpc = Rpc::from_path("/yidi.v1.Intake/SubmitApplication");
        assert_eq!(rpc.name, "yidi.v1.Intake/SubmitApplication");
        assert_eq!(rpc.service, "yidi.v1.Intake");
        assert_eq!(rpc.method, "SubmitApplication");
        assert!(!rpc.is_untraced());
        assert!(Rpc::from_path("/grpc.health.v1.Health/Check").is_untraced());
        assert!(Rpc::from_path("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").is_untraced());
    }

    #[test]
    fn the_status_comes_from_a_trailers_only_response_or_is_ok() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_of(&headers), Code::Ok);
        headers.insert("grpc-status", HeaderValue::from_static("9"));
        assert_eq!(status_of(&headers), Code::FailedPrecondition);
    }

    /// Counts the spans a subscriber is asked to build.
    struct SpanCounter(Arc<std::sync::atomic::AtomicUsize>);

    impl tracing::Subscriber for SpanCounter {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tracing::span::Id::from_u64(n as u64 + 1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn with_telemetry_off_a_call_builds_no_span_and_carries_no_trace_context() {
        use tower::{Layer, Service, ServiceExt};
        // No exporter, no sampler: `telemetry::init` never ran in this test process.
        assert!(!telemetry::tracing_on() && !telemetry::metrics_on());
        let spans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dispatch = tracing::Dispatch::new(SpanCounter(Arc::clone(&spans)));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |request: Request<()>| {
                if let Ok(mut seen) = seen.lock() {
                    seen.extend(request.headers().keys().map(|name| name.to_string()));
                }
                async { Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::empty())) }
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        tracing::dispatcher::with_default(&dispatch, || {
            for layer in [RpcTelemetryLayer::server(), RpcTelemetryLayer::client()] {
                let mut service = layer.layer(inner.clone());
                let request = Request::builder().uri("/yidi.v1.LossRegistry/CheckCard").body(()).unwrap();
                let response = runtime.block_on(async { service.ready().await.unwrap().call(request).await }).unwrap();
                assert!(response.body().pending.is_none());
            }
        });
        assert_eq!(spans.load(std::sync::atomic::Ordering::SeqCst), 0, "no span was built");
        assert!(seen.lock().unwrap().is_empty(), "no traceparent was written: {:?}", seen.lock().unwrap());
    }

    #[test]
    fn a_refusal_fails_the_client_span_but_not_the_server_span() {
        assert!(is_span_error(Side::Client, Code::PermissionDenied));
        assert!(!is_span_error(Side::Server, Code::PermissionDenied));
        assert!(is_span_error(Side::Server, Code::Internal));
        assert!(!is_span_error(Side::Client, Code::Ok));
    }
}
