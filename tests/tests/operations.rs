//! What an operator relies on when a bureau is stopped: the real binaries, SIGTERM, over gRPC.
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use yidi_proto::v1 as pb;
use yidi_tests::{Db, NATIONAL_DAY, on_both_databases, serial, start, topology::Process};

on_both_databases!(shutdown_turns_health_not_serving_ends_every_stream_and_exits_zero);

/// SIGTERM to each bureau in turn while streams are open on all of them: each one's health watch
/// sees NOT_SERVING and then ends, the application and revocation watches end cleanly (no error),
/// and every process exits with 0 well before its grace period (10 s) would cut anything off.
async fn shutdown_turns_health_not_serving_ends_every_stream_and_exits_zero(db: Db) -> anyhow::Result<()> {
    let Some(mut t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let citizen = t.citizen("replacement", "36")?;
    let submitted = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    let watch_request = pb::WatchApplicationRequest { application_id: submitted.application_id.clone() };
    let mut application = t.intake().await?.watch_application(watch_request).await?.into_inner();
    let revocation_request = pb::WatchRevocationsRequest { after_sequence: 0 };
    let mut revocations = t.registry().await?.watch_revocations(revocation_request).await?.into_inner();

    let mut health = Vec::new();
    for process in Process::ALL {
        let request = HealthCheckRequest { service: String::new() };
        let mut watch = HealthClient::new(t.channel(process).await?).watch(request).await?.into_inner();
        let first = watch.message().await?.context("a first health answer")?;
        assert_eq!(first.status, ServingStatus::Serving as i32, "{process:?} serves");
        health.push((process, watch));
    }

    // The station first, as an operator draining the suite would.
    for (process, mut watch) in health.into_iter().rev() {
        let began = Instant::now();
        let exit = t.suite.terminate(process).await?;
        assert_eq!(exit, Some(0), "{process:?} exits with 0 on SIGTERM");
        assert!(began.elapsed() < Duration::from_secs(5), "{process:?} stopped in {:?}", began.elapsed());
        let last = promptly(watch.message()).await??.context("a last health answer")?;
        assert_eq!(last.status, ServingStatus::NotServing as i32, "{process:?} says NOT_SERVING");
        assert!(promptly(watch.message()).await??.is_none(), "{process:?}: the health watch ends cleanly");
    }
    while let Some(update) = promptly(application.message()).await?? {
        assert_eq!(update.application.map(|a| a.application_id), Some(submitted.application_id.clone()));
    }
    while promptly(revocations.message()).await??.is_some() {}
    Ok(())
}

/// A stream that neither answers nor ends within a few seconds fails the test instead of hanging it.
async fn promptly<T>(next: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(5), next).await.context("the stream neither answered nor ended")
}
