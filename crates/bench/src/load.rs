//! The load generator: a fixed number of HTTP/2 connections, each with a fixed number of requests
//! in flight (one task each, closed loop), for a fixed time after a warm-up; latencies go into an
//! HdrHistogram.
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use yidi_grpc::balance::Balanced;

use crate::process::Target;

/// How hard and how long to drive a server.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadSpec {
    pub connections: usize,
    /// Requests in flight on each connection.
    pub in_flight: usize,
    #[serde(serialize_with = "seconds")]
    pub warmup: Duration,
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What one run measured (only requests that started after the warm-up and ended in the window).
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub spec: LoadSpec,
    pub requests: u64,
    pub errors: u64,
    /// Items answered (cards checked); equals `requests` for single-item calls.
    pub items: u64,
    pub requests_per_second: f64,
    pub items_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub first_error: Option<String>,
}

struct Tally {
    histogram: Histogram<u64>,
    errors: u64,
    items: u64,
    first_error: Option<String>,
}

/// A latency histogram of microseconds: 1 µs to 60 s, three significant digits (every run's).
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

/// Opens `connections` connections to each of `targets` (one server, or the replicas of one
/// bureau; each connection with its own TLS session over mutual TLS). Connection i to every target
/// makes channel i, which spreads its calls over them and fails over as the bureaus' own calls do
/// ([`Balanced`]).
pub async fn connect(targets: &[Target], connections: usize) -> anyhow::Result<Vec<Balanced>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut replicas = Vec::with_capacity(targets.len());
        for target in targets {
            replicas.push((target.url.clone(), target.connect().await?));
        }
        channels.push(Balanced::new(replicas));
    }
    Ok(channels)
}

/// Drives `call(channel, n)` (n counts each task's calls, for picking inputs) as `spec` says.
/// `call` answers the number of items the call covered.
pub async fn drive<F, Fut>(targets: &[Target], spec: LoadSpec, call: F) -> anyhow::Result<LoadResult>
where
    F: Fn(Balanced, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, tonic::Status>> + Send,
{
    let channels = connect(targets, spec.connections).await?;
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (c, channel) in channels.iter().enumerate() {
        for f in 0..spec.in_flight {
            let channel = channel.clone();
            let call = Arc::clone(&call);
            let seed = (c * spec.in_flight + f) as u64;
            tasks.spawn(async move {
                let mut tally = Tally { histogram: histogram()?, errors: 0, items: 0, first_error: None };
                // Each task walks its own stride of inputs.
                let mut n = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let outcome = call(channel.clone(), n).await;
                    n = n.wrapping_add(1);
                    let ended = Instant::now();
                    if began < measure_from || ended > end {
                        continue;
                    }
                    match outcome {
                        Ok(items) => {
                            let micros = u64::try_from(ended.duration_since(began).as_micros()).unwrap_or(u64::MAX);
                            tally.histogram.saturating_record(micros.max(1));
                            tally.items += items;
                        }
                        Err(status) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert_with(|| status.to_string());
                        }
                    }
                }
                anyhow::Ok(tally)
            });
        }
    }
    let mut total = Tally { histogram: histogram()?, errors: 0, items: 0, first_error: None };
    while let Some(joined) = tasks.join_next().await {
        let tally = joined??;
        total.histogram.add(&tally.histogram).context("merging histograms")?;
        total.errors += tally.errors;
        total.items += tally.items;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    drop(channels);
    let window = spec.duration.as_secs_f64();
    let h = &total.histogram;
    Ok(LoadResult {
        spec,
        requests: h.len(),
        errors: total.errors,
        items: total.items,
        requests_per_second: h.len() as f64 / window,
        items_per_second: total.items as f64 / window,
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        first_error: total.first_error,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tonic::{Request, Response, Status};

    use super::*;
    use crate::echo::pb;

    /// An echo that counts its calls.
    struct Counting(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl pb::echo_server::Echo for Counting {
        async fn echo(&self, request: Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(Response::new(pb::EchoResponse { payload: request.into_inner().payload }))
        }
    }

    async fn counting_echo() -> (Target, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::echo_server::EchoServer::new(Counting(Arc::clone(&calls))))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (Target { url, tls: None }, calls)
    }

    #[tokio::test]
    async fn the_load_is_spread_over_every_replica_of_the_target() {
        let (first, first_calls) = counting_echo().await;
        let (second, second_calls) = counting_echo().await;
        let spec =
            LoadSpec { connections: 2, in_flight: 2, warmup: Duration::ZERO, duration: Duration::from_millis(300) };
        let result = drive(&[first, second], spec, |channel, _| crate::echo::call(channel)).await.unwrap();
        assert_eq!(result.errors, 0, "{:?}", result.first_error);
        let (first, second) = (first_calls.load(Ordering::Relaxed), second_calls.load(Ordering::Relaxed));
        assert!(first > 10 && second > 10, "{first} and {second} calls");
        assert!(first.abs_diff(second) <= 4, "round robin per connection: {first} and {second} calls");
    }
}
