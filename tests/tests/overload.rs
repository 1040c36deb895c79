//! Load shedding in the real registry binary, configured with one slot and no queue: a stalled
//! caller (request headers sent, body never) holds the slot, so the next call is refused at once
//! with RESOURCE_EXHAUSTED (reason OVERLOADED) while health still says SERVING; the stalled call
//! ends at its deadline (tonic keeps it on both sides), and the slot serves real questions again.
use std::{
    str::FromStr,
    time::{Duration, Instant},
};

use tonic::{Code, codegen::http::uri::PathAndQuery};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_types::StatusExt;
use yidi_proto::v1 as pb;
use yidi_tests::{Db, NATIONAL_DAY, card_check, raw::RawCodec, serial, start, topology::Process};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_caller_holds_only_its_slot_until_its_deadline_and_the_excess_is_refused_at_once()
-> anyhow::Result<()> {
    let Some(t) = start(Db::Sqlite, NATIONAL_DAY, |options| {
        options.server_config.insert(Process::Registry, "max_in_flight = 1\nmax_queued = 0\n".into());
    })
    .await?
    else {
        return Ok(());
    };
    let channel = t.channel(Process::Registry).await?;
    let citizen = t.citizen("replacement", "36")?;
    let check = card_check(&citizen, serial(&citizen), "test-bank");
    let stall_for = Duration::from_secs(3);

    // The other bureaus call the registry too: until the stalled call has the slot, try again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (stalled, stalled_at) = loop {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await?;
        let mut request = tonic::Request::new(tokio_stream::pending::<Vec<u8>>());
        request.set_timeout(stall_for);
        let path = PathAndQuery::from_str("/yidi.v1.LossRegistry/CheckCard")?;
        let began = Instant::now();
        let call = tokio::spawn(async move { grpc.client_streaming(request, path, RawCodec).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !call.is_finished() {
            break (call, began);
        }
        let refused = call.await?.expect_err("a call without a request message is never answered OK");
        anyhow::ensure!(refused.code() == Code::ResourceExhausted, "the stalled call: {refused:?}");
        anyhow::ensure!(Instant::now() < deadline, "the slot never came free");
    };

    let began = Instant::now();
    let refused = pb::loss_registry_client::LossRegistryClient::new(channel.clone())
        .check_card(check.clone())
        .await
        .expect_err("the only slot is held");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(began.elapsed() < Duration::from_secs(1), "refused at once: {:?}", began.elapsed());
    assert_eq!(refused.get_error_details().error_info().map(|info| info.reason.clone()).as_deref(), Some("OVERLOADED"));
    assert!(refused.get_error_details().retry_info().is_some(), "says when to try again");
    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await?;
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32, "health is never shed");

    let cut_off = stalled.await?.expect_err("the stalled call never sent its message");
    assert!(matches!(cut_off.code(), Code::Cancelled | Code::DeadlineExceeded), "{cut_off:?}");
    let held = stalled_at.elapsed();
    assert!(held >= stall_for && held < stall_for + Duration::from_secs(3), "cut off at its deadline: {held:?}");

    // The slot is free again (other bureaus' calls may take it for a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match pb::loss_registry_client::LossRegistryClient::new(channel.clone()).check_card(check.clone()).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => anyhow::bail!("after the stalled call: {status:?}"),
        }
    };
    assert_eq!(answer.status, pb::CardStatus::Valid as i32, "the registry answers real questions again");
    t.stop().await
}
