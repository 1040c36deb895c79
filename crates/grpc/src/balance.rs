//! One bureau at several endpoints (replicas behind one directory entry). [`Balanced`] spreads
//! calls over them round robin and fails over by itself:
//! - an endpoint that could not be reached, answered UNAVAILABLE or let a call's deadline pass is
//!   passed over by new calls for [`PASS_OVER`] (then tried again; while every endpoint is passed
//!   over, all are still tried);
//! - a call moves on to the next endpoint when one cannot be reached or answers UNAVAILABLE, if
//!   repeating it is safe: a read (`mutating: false` in the contract; health checks), a write
//!   carrying an idempotency key (the `idempotency-key` header or a non-empty `request_id`: the
//!   receivers of one bureau share the table that answers a repeat as the first call was
//!   answered), or any call whose connection failed before it was sent. A write without a key that
//!   reached a server is never repeated: it may have been applied;
//! - every endpoint is tried at most once per call, within the call's deadline (`grpc-timeout`:
//!   each further attempt carries what is left of it). A call whose deadline passed is not
//!   repeated (nothing is left of it), but its endpoint is passed over by the next calls.
//!
//! With one endpoint a call goes straight to it.
use std::{
    error::Error as StdError,
    future::Future,
    pin::Pin,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::{
    body::Body,
    codegen::http::{self, HeaderValue},
    transport::Channel,
};
use tower::{Service, ServiceExt};

use crate::{
    body::{Buffered, collect, length_delimited_field},
    overload::grpc_timeout,
};

/// How long new calls pass over an endpoint that failed.
pub const PASS_OVER: Duration = Duration::from_secs(1);

/// The metadata key of a call's idempotency key (the idempotency layer's and the outbox's).
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const GRPC_TIMEOUT: &str = "grpc-timeout";
const GRPC_STATUS: &str = "grpc-status";
/// `grpc-status` of UNAVAILABLE.
const UNAVAILABLE: &[u8] = b"14";
const HEALTH: &str = "/grpc.health.v1.Health/";

/// The error of a call that no endpoint answered.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The instants at which endpoints stop being passed over, as milliseconds since this.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn millis_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct Replica {
    endpoint: String,
    channel: Channel,
    /// Milliseconds since [`EPOCH`]; 0: never failed.
    passed_over_until: AtomicU64,
}

/// The channels to every endpoint of one bureau, as one channel (cheap to clone: clones share the
/// endpoints, the round robin and what failed).
#[derive(Debug, Clone)]
pub struct Balanced {
    replicas: Arc<[Replica]>,
    next: Arc<AtomicUsize>,
}

impl Balanced {
    /// Over `channels`, each with the endpoint it reaches (for logs and errors).
    pub fn new(channels: impl IntoIterator<Item = (String, Channel)>) -> Self {
        let replicas: Vec<Replica> = channels
            .into_iter()
            .map(|(endpoint, channel)| Replica { endpoint, channel, passed_over_until: AtomicU64::new(0) })
            .collect();
        Self { replicas: replicas.into(), next: Arc::default() }
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.replicas.iter().map(|replica| replica.endpoint.as_str())
    }

    /// The endpoints a call tries, in order: round robin from the next one, those not passed over
    /// first.
    fn order(&self) -> Vec<usize> {
        let count = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count.max(1);
        let now = millis_since_epoch(Instant::now());
        let (mut order, passed_over): (Vec<usize>, Vec<usize>) = (0..count)
            .map(|i| (start + i) % count)
            .partition(|&i| self.replicas[i].passed_over_until.load(Ordering::Relaxed) <= now);
        order.extend(passed_over);
        order
    }

    fn pass_over(&self, index: usize) {
        let until = millis_since_epoch(Instant::now() + PASS_OVER);
        self.replicas[index].passed_over_until.store(until, Ordering::Relaxed);
        tracing::debug!(endpoint = %self.replicas[index].endpoint, "endpoint passed over");
    }

    async fn attempt(&self, index: usize, request: http::Request<Body>) -> Outcome {
        let mut channel = self.replicas[index].channel.clone();
        let answer = match channel.ready().await {
            Ok(ready) => ready.call(request).await,
            Err(error) => Err(error),
        };
        let outcome = Outcome::of(answer.map_err(BoxError::from));
        if outcome.endpoint_down() {
            self.pass_over(index);
        }
        outcome
    }

    async fn call_balanced(self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let order = self.order();
        let mut rule = Repeat::of(&request);
        let started = Instant::now();
        let deadline = grpc_timeout(request.headers()).map(|timeout| started + timeout);
        let (parts, body) = request.into_parts();
        let (data, _) = collect(body, None).await.map_err(|error| match error {
            crate::body::CollectError::Body(status) => BoxError::from(status),
            crate::body::CollectError::TooLarge(limit) => format!("request over {limit} bytes").into(),
        })?;
        if let Repeat::IfRequestId(field) = rule {
            let keyed = length_delimited_field(&data, field).is_some_and(|id| !id.is_empty());
            rule = if keyed { Repeat::Always } else { Repeat::IfNeverSent };
        }
        let mut last: Option<Outcome> = None;
        for (attempt, &index) in order.iter().enumerate() {
            let mut parts = parts.clone();
            if attempt > 0
                && let Some(deadline) = deadline
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                parts.headers.insert(GRPC_TIMEOUT, format_timeout(left));
            }
            let outcome = self.attempt(index, http::Request::from_parts(parts, Buffered::body(data.clone()))).await;
            let repeat = match &outcome {
                Outcome::NeverSent(_) => true,
                Outcome::Unavailable(_) | Outcome::Failed(_) => rule == Repeat::Always,
                Outcome::Answered(_) | Outcome::TimedOut(_) => false,
            };
            if !repeat {
                return outcome.into_result();
            }
            last = Some(match last {
                Some(earlier) => earlier.or_more_telling(outcome),
                None => outcome,
            });
        }
        match last {
            Some(outcome) => outcome.into_result(),
            None => Err("the bureau lists no endpoint".into()),
        }
    }
}

/// Whether a call may be sent again to another endpoint after one failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// A read, or a write with an idempotency key.
    Always,
    /// A write that carries its key in field `request_id` (this number) if the caller set it.
    IfRequestId(u32),
    /// A write without a key: only if it never left.
    IfNeverSent,
}

impl Repeat {
    fn of(request: &http::Request<Body>) -> Self {
        let path = request.uri().path();
        match yidi_proto::policy::policy_of(path) {
            Some(policy) if !policy.mutating => Self::Always,
            Some(_) if request.headers().contains_key(IDEMPOTENCY_KEY) => Self::Always,
            Some(policy) => policy.request_id_field.map_or(Self::IfNeverSent, Self::IfRequestId),
            None if path.starts_with(HEALTH) => Self::Always,
            None => Self::IfNeverSent,
        }
    }
}

/// How one attempt ended.
enum Outcome {
    /// A gRPC answer other than UNAVAILABLE (OK or an error the server decided).
    Answered(http::Response<Body>),
    /// The server answered UNAVAILABLE (down, starting, shedding, or a replica behind).
    Unavailable(http::Response<Body>),
    /// The connection could not be made: the request never left.
    NeverSent(BoxError),
    /// The call's deadline passed.
    TimedOut(BoxError),
    /// The transport failed after the request may have left (a connection reset mid-call).
    Failed(BoxError),
}

impl Outcome {
    fn of(answer: Result<http::Response<Body>, BoxError>) -> Self {
        match answer {
            Ok(response) if response.headers().get(GRPC_STATUS).is_some_and(|s| s.as_bytes() == UNAVAILABLE) => {
                Self::Unavailable(response)
            }
            Ok(response) => Self::Answered(response),
            Err(error) if in_chain::<tonic::ConnectError>(error.as_ref()) => Self::NeverSent(error),
            Err(error) if in_chain::<tonic::TimeoutExpired>(error.as_ref()) => Self::TimedOut(error),
            Err(error) => Self::Failed(error),
        }
    }

    /// Whether new calls should pass the endpoint over for a while. One that let a deadline pass
    /// too: a replica that accepts calls but does not answer (stopped, swapping) would otherwise
    /// cost every call sent to it its whole deadline.
    fn endpoint_down(&self) -> bool {
        !matches!(self, Self::Answered(_))
    }

    /// Of two failed attempts, the one to give the caller: a replica's UNAVAILABLE answer (it
    /// carries the reason, e.g. `REPLICA_BEHIND`) over a transport error of another endpoint (a
    /// dead replica, tried last because it was passed over, would otherwise hide it).
    fn or_more_telling(self, later: Self) -> Self {
        match (&self, &later) {
            (Self::Unavailable(_), later) if !matches!(later, Self::Unavailable(_)) => self,
            _ => later,
        }
    }

    fn into_result(self) -> Result<http::Response<Body>, BoxError> {
        match self {
            Self::Answered(response) | Self::Unavailable(response) => Ok(response),
            Self::NeverSent(error) | Self::TimedOut(error) | Self::Failed(error) => Err(error),
        }
    }
}

fn in_chain<E: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<E>() {
            return true;
        }
        next = error.source();
    }
    false
}

/// `left` as a `grpc-timeout` value, in milliseconds (at least 1), or seconds past 8 digits.
fn format_timeout(left: Duration) -> HeaderValue {
    let millis = left.as_millis().max(1);
    let text = if millis < 100_000_000 { format!("{millis}m") } else { format!("{}S", left.as_secs()) };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("1m"))
}

type CallFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

impl Service<http::Request<Body>> for Balanced {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = CallFuture;

    /// Always ready: each call waits for the channel it picks.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let [only] = &*self.replicas {
            let mut channel = only.channel.clone();
            return Box::pin(async move { Ok(channel.ready().await?.call(request).await?) });
        }
        Box::pin(self.clone().call_balanced(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_of_a_deadline_is_sent_in_milliseconds() {
        assert_eq!(format_timeout(Duration::from_millis(2500)), "2500m");
        assert_eq!(format_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(format_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn reads_and_keyed_writes_repeat_and_writes_without_a_key_only_if_never_sent() {
        let request = |path: &str, key: bool| {
            let mut builder = http::Request::builder().uri(format!("http://bureau{path}"));
            if key {
                builder = builder.header(IDEMPOTENCY_KEY, "k1");
            }
            builder.body(Body::empty()).unwrap()
        };
        assert_eq!(Repeat::of(&request("/yidi.v1.LossRegistry/CheckCard", false)), Repeat::Always);
        assert_eq!(Repeat::of(&request("/grpc.health.v1.Health/Check", false)), Repeat::Always);
        assert_eq!(Repeat::of(&request("/yidi.v1.LossRegistry/ReportLoss", true)), Repeat::Always);
        assert_eq!(Repeat::of(&request("/yidi.v1.LossRegistry/ReportLoss", false)), Repeat::IfRequestId(2));
        assert_eq!(Repeat::of(&request("/yidi.bench.v1.Echo/Echo", false)), Repeat::IfNeverSent);
    }

    #[test]
    fn when_every_endpoint_fails_a_replicas_unavailable_answer_is_given_over_a_dead_ones_error() {
        let unavailable = |reason: &str| {
            let response =
                http::Response::builder().header(GRPC_STATUS, "14").header("reason", reason).body(Body::empty());
            Outcome::of(Ok(response.unwrap()))
        };
        let refused = || Outcome::NeverSent("tcp connect error".into());
        let reason = |outcome: Outcome| match outcome.into_result() {
            Ok(response) => response.headers()["reason"].to_str().unwrap().to_owned(),
            Err(error) => error.to_string(),
        };
        assert_eq!(reason(unavailable("behind").or_more_telling(refused())), "behind");
        assert_eq!(reason(refused().or_more_telling(unavailable("behind"))), "behind");
        assert_eq!(reason(unavailable("first").or_more_telling(unavailable("second"))), "second");
        assert_eq!(reason(refused().or_more_telling(Outcome::Failed("reset".into()))), "reset");
    }
}
