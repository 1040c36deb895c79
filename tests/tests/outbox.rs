//! Nothing lost between bureaus: a home bureau down for longer than the retry budget leaves the
//! application waiting on a dead letter that operators see and retry; two station replicas on
//! one PostgreSQL database deliver every message once.
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectionTrait, Database, Statement};
use tonic::{Code, transport::Channel};
use yidi_proto::v1::{self as pb, intake_client::IntakeClient, outbox_client::OutboxClient};
use yidi_tests::{
    Db, NATIONAL_DAY, applicant, on_both_databases, serial, start,
    topology::{self, Process},
};

/// A short retry budget, so that "longer than the budget" is a few seconds.
const SHORT_BUDGET: &str = "[worker]\nrespond_within_ms = 300\n\n[outbox]\nmax_attempts = 3\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\ncall_timeout_ms = 2000\npoll_ms = 50\n";

fn delivery<'a>(timeline: &'a pb::GetApplicationTimelineResponse, topic: &str) -> Option<&'a pb::OutboxMessage> {
    timeline.deliveries.iter().find(|m| m.topic == topic)
}

/// Polls the application's timeline until `done` holds (45 s at most).
async fn wait_for_timeline(
    intake: &mut IntakeClient<Channel>,
    application_id: &str,
    what: &str,
    done: impl Fn(&pb::GetApplicationTimelineResponse) -> bool,
) -> anyhow::Result<pb::GetApplicationTimelineResponse> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let timeline = intake
            .get_application_timeline(pb::GetApplicationTimelineRequest { application_id: application_id.into() })
            .await?
            .into_inner();
        if done(&timeline) {
            return Ok(timeline);
        }
        if Instant::now() > deadline {
            bail!("never reached {what}: {timeline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn home_bureau_down_past_the_retry_budget_leaves_a_dead_letter_that_an_operator_retries(
    db: Db,
) -> anyhow::Result<()> {
    let Some(mut t) = start(db, NATIONAL_DAY, |options| {
        options.extra_config.insert(Process::Intake, SHORT_BUDGET.into());
    })
    .await?
    else {
        return Ok(());
    };
    t.suite.terminate(Process::HomeJiangxi).await?;
    let citizen = t.ordinary("36", 0)?;
    let submitted = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    let id = submitted.application_id.clone();

    // Every attempt fails (the home bureau is down); after the third the message is dead, and the
    // application shows where it waits and why.
    let mut intake = t.intake().await?;
    let timeline = wait_for_timeline(&mut intake, &id, "a dead verify message", |t| {
        delivery(t, "verify").is_some_and(|m| m.state == pb::OutboxMessageState::Dead as i32)
    })
    .await?;
    let dead = delivery(&timeline, "verify").context("verify message")?;
    let stuck = timeline.application.clone().context("application")?;
    ensure!(dead.attempts == 3, "the budget is three attempts: {dead:?}");
    ensure!(dead.target_bureau_id == citizen.home_bureau_id, "{dead:?}");
    ensure!(!dead.last_error.is_empty() && stuck.last_error == dead.last_error, "{stuck:?}");
    ensure!(stuck.state == pb::ApplicationState::Verifying as i32, "{stuck:?}");
    let verifying = stuck.history.last().context("history")?;
    ensure!(verifying.bureau_id == topology::STATION, "the station sent it: {verifying:?}");

    // The operator's list of dead letters holds it.
    let mut outbox = OutboxClient::new(t.channel(Process::Intake).await?);
    let listed = outbox
        .list_outbox_messages(pb::ListOutboxMessagesRequest {
            state: pb::OutboxMessageState::Dead as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(listed.messages.iter().any(|m| m.message_id == dead.message_id), "{listed:?}");

    // Back up, and retried by the operator: the application completes, each step once.
    t.suite.restart(Process::HomeJiangxi).await?;
    let retried = outbox
        .retry_dead_letter(pb::RetryDeadLetterRequest {
            message_id: dead.message_id.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .message
        .context("message")?;
    ensure!(retried.state == pb::OutboxMessageState::Pending as i32 && retried.attempts == 0, "{retried:?}");
    t.wait_for_state(&id, pb::ApplicationState::ReadyForCollection).await?;
    let timeline = wait_for_timeline(&mut intake, &id, "ready", |_| true).await?;
    let ready = timeline.application.clone().context("application")?;
    for topic in ["verify", "report_loss", "place_order", "await_order"] {
        let sent: Vec<_> = timeline.deliveries.iter().filter(|m| m.topic == topic).collect();
        ensure!(sent.len() == 1, "one {topic} message: {:?}", timeline.deliveries);
        ensure!(sent[0].state == pb::OutboxMessageState::Delivered as i32, "{topic}: {:?}", sent[0]);
    }
    ensure!(ready.last_error.is_empty(), "nothing waits any more: {ready:?}");
    let steps: Vec<(i32, &str)> = ready.history.iter().map(|h| (h.state, h.bureau_id.as_str())).collect();
    ensure!(
        steps.contains(&(pb::ApplicationState::Approved as i32, citizen.home_bureau_id.as_str())),
        "the home bureau approved it: {steps:?}"
    );

    // Only dead letters are retried.
    let again = outbox
        .retry_dead_letter(pb::RetryDeadLetterRequest {
            message_id: dead.message_id.clone(),
            request_id: String::new(),
        })
        .await;
    ensure!(again.as_ref().is_err_and(|s| s.code() == Code::FailedPrecondition), "{again:?}");
    let unknown = outbox
        .retry_dead_letter(pb::RetryDeadLetterRequest {
            message_id: "no-such-message".into(),
            request_id: String::new(),
        })
        .await;
    ensure!(unknown.as_ref().is_err_and(|s| s.code() == Code::NotFound), "{unknown:?}");
    t.stop().await
}

on_both_databases!(
    home_bureau_down_past_the_retry_budget_leaves_a_dead_letter_that_an_operator_retries,
    a_stalled_home_bureau_holds_up_only_its_own_applications,
);

/// Sends `signal` (STOP, CONT) to a bureau's process.
async fn signal(t: &yidi_tests::TestSuite, process: Process, signal: &str) -> anyhow::Result<()> {
    let pid = t.suite.pid(process).context("running")?;
    let status = tokio::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await?;
    ensure!(status.success(), "kill -{signal} {pid}");
    Ok(())
}

/// A home bureau that accepts connections but never answers (paused) costs its own applications
/// one deadline per attempt; the other bureau's applications go through meanwhile, unhindered.
async fn a_stalled_home_bureau_holds_up_only_its_own_applications(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |options| {
        let outbox =
            "[worker]\nrespond_within_ms = 200\n\n[outbox]\ncall_timeout_ms = 1500\nconcurrency = 4\npoll_ms = 50\n";
        options.extra_config.insert(Process::Intake, outbox.into());
    })
    .await?
    else {
        return Ok(());
    };
    signal(&t, Process::HomeSichuan, "STOP").await?;
    let mut stalled = Vec::new();
    for n in 0..6 {
        let citizen = t.ordinary("51", n)?;
        stalled.push(t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?.application_id);
    }
    let began = Instant::now();
    let citizen = t.ordinary("36", 0)?;
    let flowing = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?.application_id;
    t.wait_for_state(&flowing, pb::ApplicationState::ReadyForCollection).await?;
    let took = began.elapsed();
    ensure!(took < Duration::from_secs(15), "the Jiangxi application took {took:?} behind the stalled bureau");
    let mut intake = t.intake().await?;
    for id in &stalled {
        let timeline = wait_for_timeline(&mut intake, id, "a failed attempt", |t| {
            delivery(t, "verify").is_some_and(|m| m.attempts >= 1)
        })
        .await?;
        let verify = delivery(&timeline, "verify").context("verify")?;
        ensure!(verify.last_error.contains("home-sichuan"), "{verify:?}");
    }
    signal(&t, Process::HomeSichuan, "CONT").await?;
    for id in &stalled {
        t.wait_for_state(id, pb::ApplicationState::ReadyForCollection).await?;
    }
    t.stop().await
}

/// Two station replicas share one PostgreSQL database (and so one outbox): applications lodged at
/// either are delivered by whichever claims them first, and no message is ever taken twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_station_replicas_on_one_postgresql_database_deliver_each_message_once() -> anyhow::Result<()> {
    let Some(t) = start(Db::Postgres, NATIONAL_DAY, |options| {
        options.extra_config.insert(Process::Intake, "[outbox]\npoll_ms = 50\n".into());
    })
    .await?
    else {
        return Ok(());
    };
    let replica = t.suite.start_replica(Process::Intake).await?;
    let replica_channel = wait_for_channel(&replica.endpoint()).await?;
    let mut counters = [t.intake().await?, IntakeClient::new(replica_channel)];
    let mut ids = Vec::new();
    for n in 0..12 {
        let citizen = t.ordinary(if n % 2 == 0 { "36" } else { "51" }, n / 2)?;
        let counter = &mut counters[n % 2];
        let answer = counter
            .submit_application(pb::SubmitApplicationRequest {
                kind: pb::ApplicationKind::Replacement as i32,
                applicant: Some(applicant(&citizen)),
                card_serial: serial(&citizen),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        ids.push(answer.application.context("application")?.application_id);
    }
    for id in &ids {
        t.wait_for_state(id, pb::ApplicationState::ReadyForCollection).await?;
    }

    let station = Database::connect(t.suite.database_url(Process::Intake)).await?;
    let rows = station
        .query_all_raw(Statement::from_string(
            station.get_database_backend(),
            "SELECT topic, state, claims, settled_by FROM outbox_messages",
        ))
        .await?;
    let mut settled_by = std::collections::BTreeSet::new();
    for row in &rows {
        let topic: String = row.try_get("", "topic")?;
        let state: String = row.try_get("", "state")?;
        let claims: i32 = row.try_get("", "claims")?;
        ensure!(state == "delivered", "{topic} is {state}");
        if topic == "await_order" {
            // The fallback poll of the order: settled by the producer's notice, never taken.
            ensure!(claims == 0, "the station asked for an order {claims} times although it was told");
            continue;
        }
        ensure!(claims == 1, "a {topic} message was taken {claims} times");
        settled_by.insert(row.try_get::<Option<String>>("", "settled_by")?.unwrap_or_default());
    }
    ensure!(rows.len() == ids.len() * 4, "four messages per replacement: {}", rows.len());
    ensure!(settled_by.len() == 2, "both replicas delivered: {settled_by:?}");
    // The producer made one card per application.
    let producer = Database::connect(t.suite.database_url(Process::Issuance)).await?;
    let orders = producer
        .query_one_raw(Statement::from_string(
            producer.get_database_backend(),
            "SELECT COUNT(*) AS n, COUNT(DISTINCT application_id) AS apps FROM orders",
        ))
        .await?
        .context("count")?;
    let (n, apps): (i64, i64) = (orders.try_get("", "n")?, orders.try_get("", "apps")?);
    ensure!(n == ids.len() as i64 && apps == n, "{n} orders for {apps} applications");
    station.close().await?;
    producer.close().await?;
    ensure!(replica.terminate().await? == Some(0), "the replica stops cleanly");
    t.stop().await
}

async fn wait_for_channel(endpoint: &str) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let channel = Channel::from_shared(endpoint.to_owned())?.connect().await;
        if let Ok(channel) = channel
            && yidi_grpc::client::wait_until_serving(&channel, Duration::from_secs(10)).await
        {
            return Ok(channel);
        }
        if Instant::now() > deadline {
            bail!("the replica at {endpoint} never served");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
