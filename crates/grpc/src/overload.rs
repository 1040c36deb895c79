//! Load shedding: a bounded number of calls run at once, a bounded number wait, the rest are
//! refused at once, so that excess load costs the excess callers a fast refusal instead of
//! costing everyone their deadlines.
//!
//! A call that finds every slot busy waits in the queue, but never longer than the queue's
//! patience nor past its own `grpc-timeout`: a call that could not finish in time anyway is
//! better refused now (UNAVAILABLE, retryable) than run late. A call that finds the queue full is
//! refused with RESOURCE_EXHAUSTED. Both carry `RetryInfo` and ErrorInfo reason `OVERLOADED`.
//! Health checks are never shed: an orchestrator must see a loaded server as alive.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    Code, Status,
    body::Body,
    codegen::http::{HeaderMap, Request},
};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    error::ERROR_DOMAIN,
    layer::{CallFuture, Inner, Intercept, InterceptLayer},
};

/// How much a server takes on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Calls running at once.
    pub max_in_flight: usize,
    /// Calls waiting for a slot; beyond that, RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// The longest a call waits for a slot (less if its deadline is nearer).
    pub max_queue_wait: Duration,
}

impl Default for Limits {
    /// `server.max_in_flight`, `server.max_queued`, `server.max_queue_wait_ms` when unset.
    fn default() -> Self {
        Self { max_in_flight: 256, max_queued: 1024, max_queue_wait: Duration::from_millis(1000) }
    }
}

/// Largest request message a service decodes (tonic's default is 4 MiB): every yidi request is a
/// few KiB at most (strings bounded by `validate`, templates 4 KiB), so anything near this is
/// hostile. The registry allows more for its 1,000-card CheckCards batches.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// What the caller is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// What the server's connections share: the slots, the queue, the count of refusals.
#[derive(Debug)]
pub struct LoadShedding {
    limits: Limits,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    shed: AtomicU64,
}

/// The tower layer; one per server, shared by all its connections.
pub type LoadShedLayer = InterceptLayer<LoadShedding>;

impl LoadShedding {
    /// The layer shedding beyond `limits`.
    pub fn layer(limits: Limits) -> LoadShedLayer {
        InterceptLayer::new(Self {
            limits,
            slots: Arc::new(Semaphore::new(limits.max_in_flight)),
            queued: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
        })
    }

    /// Calls refused so far.
    pub fn shed_count(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}

impl Intercept for LoadShedding {
    fn intercept<S: Inner>(self: Arc<Self>, mut inner: S, request: Request<Body>) -> CallFuture {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(inner.call(request));
        }
        let deadline = grpc_timeout(request.headers());
        Box::pin(async move {
            let _slot = match self.take_slot(deadline).await {
                Ok(slot) => slot,
                Err(status) => {
                    self.shed.fetch_add(1, Ordering::Relaxed);
                    return Ok(status.into_http());
                }
            };
            inner.call(request).await
        })
    }
}

impl LoadShedding {
    async fn take_slot(&self, deadline: Option<Duration>) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(slot);
        }
        let limits = self.limits;
        if self.queued.fetch_add(1, Ordering::AcqRel) >= limits.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded(
                Code::ResourceExhausted,
                format!(
                    "server overloaded: {} calls running and {} waiting; try again shortly",
                    limits.max_in_flight, limits.max_queued
                ),
            ));
        }
        let patience = deadline.map_or(limits.max_queue_wait, |d| d.min(limits.max_queue_wait));
        let waited = tokio::time::timeout(patience, Arc::clone(&self.slots).acquire_owned()).await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(slot)) => Ok(slot),
            // Timed out, or the semaphore was closed (it never is).
            _ => Err(overloaded(
                Code::Unavailable,
                format!("server overloaded: no free slot within {} ms; try again shortly", patience.as_millis()),
            )),
        }
    }
}

fn overloaded(code: Code, message: String) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(RETRY_AFTER));
    details.set_error_info("OVERLOADED", ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(code, message, details)
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><unit>`, unit one of
/// H M S m u n), if it sent one that parses.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.is_empty() || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use tokio::sync::Notify;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use std::convert::Infallible;

    use tonic::codegen::http::Response;
    use tower::{Layer, Service};

    fn request(path: &str, timeout: Option<&str>) -> Request<Body> {
        let mut builder = Request::builder().uri(path);
        if let Some(timeout) = timeout {
            builder = builder.header("grpc-timeout", timeout);
        }
        builder.body(Body::empty()).unwrap()
    }

    fn status_of(response: &Response<Body>) -> Option<Status> {
        Status::from_header_map(response.headers())
    }

    #[test]
    fn grpc_timeout_headers_parse_in_every_unit_and_garbage_is_ignored() {
        let parse = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99n"), Some(Duration::from_nanos(99)));
        assert_eq!(parse("10"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse("1234567890S"), None, "at most 8 digits");
        assert_eq!(parse("-1S"), None);
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    /// A service whose calls block until released, counting how many ran.
    fn blocking_service(
        release: Arc<Notify>,
        ran: Arc<AtomicUsize>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone + Send + 'static
    {
        service_fn(move |_: Request<Body>| {
            let release = Arc::clone(&release);
            let ran = Arc::clone(&ran);
            async move {
                ran.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        })
    }

    #[tokio::test]
    async fn excess_calls_are_queued_then_refused_and_health_is_never_shed() {
        let limits = Limits { max_in_flight: 2, max_queued: 1, max_queue_wait: Duration::from_secs(5) };
        let layer = LoadShedding::layer(limits);
        let release = Arc::new(Notify::new());
        let ran = Arc::new(AtomicUsize::new(0));
        let service = layer.layer(blocking_service(Arc::clone(&release), Arc::clone(&ran)));

        let running: Vec<_> = (0..2)
            .map(|_| tokio::spawn(service.clone().oneshot(request("/yidi.v1.Intake/GetApplication", None))))
            .collect();
        let queued = tokio::spawn(service.clone().oneshot(request("/yidi.v1.Intake/GetApplication", None)));
        while ran.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;

        let refused = service.clone().oneshot(request("/yidi.v1.Intake/GetApplication", None)).await.unwrap();
        let status = status_of(&refused).expect("refused with a status");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(status.get_error_details().error_info().map(|i| i.reason.clone()).as_deref(), Some("OVERLOADED"));
        assert!(status.get_error_details().retry_info().is_some(), "tells when to retry");
        assert_eq!(layer.shared().shed_count(), 1);

        // Health passes even now (it runs on the blocked service too: release it afterwards).
        let health = tokio::spawn(service.clone().oneshot(request("/grpc.health.v1.Health/Check", None)));
        while ran.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }

        // Releasing lets the queued call run; everything admitted completes.
        while ran.load(Ordering::SeqCst) < 4 {
            release.notify_waiters();
            tokio::task::yield_now().await;
        }
        release.notify_waiters();
        for call in running {
            assert!(status_of(&call.await.unwrap().unwrap()).is_none());
        }
        assert!(status_of(&queued.await.unwrap().unwrap()).is_none(), "the queued call ran");
        assert!(status_of(&health.await.unwrap().unwrap()).is_none());
    }

    #[tokio::test]
    async fn a_queued_call_gives_up_at_its_own_deadline_with_unavailable() {
        let limits = Limits { max_in_flight: 1, max_queued: 10, max_queue_wait: Duration::from_secs(30) };
        let layer = LoadShedding::layer(limits);
        let release = Arc::new(Notify::new());
        let ran = Arc::new(AtomicUsize::new(0));
        let service = layer.layer(blocking_service(Arc::clone(&release), Arc::clone(&ran)));
        let running = tokio::spawn(service.clone().oneshot(request("/yidi.v1.Intake/GetApplication", None)));
        while ran.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }

        let started = std::time::Instant::now();
        let late = service.clone().oneshot(request("/yidi.v1.Intake/GetApplication", Some("100m"))).await.unwrap();
        let waited = started.elapsed();
        let status = status_of(&late).expect("refused");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(5), "waited {waited:?}");
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the late call never ran");

        release.notify_waiters();
        assert!(status_of(&running.await.unwrap().unwrap()).is_none());
    }
}
