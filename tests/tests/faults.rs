//! Fault tests (issue 5): a bureau killed with SIGKILL in the middle of the flows, then started
//! again on the same port and database, must not lose an application, make a card twice, or leave
//! a loss report half-recorded. Checked through the RPCs and each bureau's own database
//! (`yidi_tests::reconcile`), never through a service's internals.
use std::time::Duration;

use anyhow::{Context, ensure};
use sea_orm::{ConnectionTrait, Database, Statement};

use yidi_demo::suite::DEMO_OUTBOX;
use yidi_proto::v1::{self as pb, outbox_client::OutboxClient};
use yidi_tests::{
    Db, NATIONAL_DAY, TestSuite, on_both_databases,
    reconcile::{self, Acknowledged, Databases, Outcome},
    serial, start,
    topology::Process,
};

on_both_databases!(
    verification_killed_mid_flow_loses_and_duplicates_nothing,
    issuance_killed_mid_flow_loses_and_duplicates_nothing,
    registry_killed_mid_flow_loses_and_duplicates_nothing,
    a_home_bureau_down_for_8_s_on_the_demos_settings_leaves_no_dead_letter,
);

/// Long enough for every application to settle after a restart, retry backoff included.
const SETTLE_WITHIN: Duration = Duration::from_secs(40);

async fn start_for_faults(db: Db) -> anyhow::Result<Option<TestSuite>> {
    start(db, NATIONAL_DAY, |options| {
        // Submissions answer at once, so a batch is in flight together while the bureau dies.
        options.extra_config.insert(Process::Intake, "[worker]\nrespond_within_ms = 0\n".into());
        // Orders stay in production a while, so the producer dies with some of them unfinished.
        options.production_delay_ms = 800;
        options.renewable_per_province = 2;
    })
    .await
}

/// Lodges one part of the batch: `round` 0 or 1 takes different citizens. Every kind, both
/// provinces: replacements (K1), renewals (K2), loss reports (K3).
async fn submit_round(t: &TestSuite, round: usize) -> anyhow::Result<Vec<Acknowledged>> {
    let mut acknowledged = Vec::new();
    let renewable: Vec<_> = ["36", "51"]
        .into_iter()
        .flat_map(|province| {
            t.suite
                .population
                .citizens
                .iter()
                .filter(move |c| c.scenario == "renewal" && c.person.registration_province == province)
        })
        .cloned()
        .collect();
    for province in ["36", "51"] {
        let replaced = t.ordinary(province, round * 4)?;
        let application = t.submit(pb::ApplicationKind::Replacement, &replaced, serial(&replaced)).await?;
        acknowledged.push(Acknowledged { application_id: application.application_id, expect: Outcome::CardReady });
        let replaced = t.ordinary(province, round * 4 + 1)?;
        let application = t.submit(pb::ApplicationKind::Replacement, &replaced, serial(&replaced)).await?;
        acknowledged.push(Acknowledged { application_id: application.application_id, expect: Outcome::CardReady });

        let lost = t.ordinary(province, round * 4 + 2)?;
        let application = t.report_loss(&lost).await?;
        acknowledged.push(Acknowledged { application_id: application.application_id, expect: Outcome::LossRecorded });
    }
    // Three renewable citizens per province: the scenario's and two more.
    for citizen in renewable.iter().skip(round * 3).take(3) {
        let application = t.submit(pb::ApplicationKind::Renewal, citizen, serial(citizen)).await?;
        acknowledged.push(Acknowledged { application_id: application.application_id, expect: Outcome::CardReady });
    }
    Ok(acknowledged)
}

/// Waits until one of the applications is in `state` (at most 30 s).
async fn wait_for_any(t: &TestSuite, acknowledged: &[Acknowledged], state: pb::ApplicationState) -> anyhow::Result<()> {
    wait_until(t, acknowledged, state.as_str_name(), |now| now.iter().any(|a| a.state == state as i32)).await
}

/// Waits until the applications, as the station answers now, are `what` `done` says (at most 30 s).
async fn wait_until(
    t: &TestSuite,
    acknowledged: &[Acknowledged],
    what: &str,
    done: impl Fn(&[pb::Application]) -> bool,
) -> anyhow::Result<()> {
    let mut intake = t.intake().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut now = Vec::new();
        for application in acknowledged {
            let answer = intake
                .get_application(pb::GetApplicationRequest { application_id: application.application_id.clone() })
                .await?
                .into_inner()
                .application
                .context("no application in answer")?;
            now.push(answer);
        }
        if done(&now) {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "the applications never reached {what}\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every application settles, then checks the four bureaus agree, by database and by RPC.
async fn settle_and_check(t: &TestSuite, acknowledged: &[Acknowledged]) -> anyhow::Result<()> {
    let databases = Databases::of(&t.suite);
    let left = reconcile::wait_until_settled(&databases, SETTLE_WITHIN).await?;
    ensure!(left.is_empty(), "unsettled after {SETTLE_WITHIN:?}: {left:#?}\n{}", t.logs());
    let report = reconcile::reconcile(&databases, acknowledged).await?;
    ensure!(report.is_clean(), "{report}\n{}", t.logs());

    // The same seen as the callers see it: the station, the producer, the registry.
    let mut intake = t.intake().await?;
    let mut issuance = t.issuance().await?;
    let mut registry = t.registry().await?;
    for expected in acknowledged {
        let application = intake
            .get_application(pb::GetApplicationRequest { application_id: expected.application_id.clone() })
            .await?
            .into_inner()
            .application
            .context("no application in answer")?;
        let citizen = t
            .suite
            .population
            .citizens
            .iter()
            .find(|c| c.card.as_ref().is_some_and(|card| card.serial == application.previous_card_serial))
            .context("no citizen holds the application's card")?;
        let status = |serial: &str| pb::CheckCardRequest {
            id_number: citizen.person.id_number.clone(),
            card_serial: serial.to_owned(),
            relying_party: "fault-test".into(),
            nonce: Vec::new(),
        };
        let old = registry.check_card(status(&application.previous_card_serial)).await?.into_inner().status;
        match expected.expect {
            Outcome::CardReady => {
                ensure!(application.state == pb::ApplicationState::ReadyForCollection as i32, "{application:?}");
                let order = issuance
                    .get_order(pb::GetOrderRequest {
                        order_id: application.order_id.clone(),
                        decision_id: String::new(),
                        station_id: String::new(),
                    })
                    .await?
                    .into_inner()
                    .order
                    .context("no order in answer")?;
                ensure!(order.state == pb::OrderState::Dispatched as i32, "{order:?}");
                ensure!(order.card_serial == application.new_card_serial, "{order:?} vs {application:?}");
                let new = registry.check_card(status(&application.new_card_serial)).await?.into_inner().status;
                ensure!(new == pb::CardStatus::AwaitingCollection as i32, "new card of {application:?} is {new}");
                let kind = pb::ApplicationKind::try_from(application.kind)?;
                // C3: the old card keeps its status until the new one is handed over.
                let old_until_collected = if kind == pb::ApplicationKind::Renewal {
                    pb::CardStatus::Valid
                } else {
                    pb::CardStatus::ReportedLost
                };
                ensure!(old == old_until_collected as i32, "old card of {application:?} is {old}");
                ensure!(application.loss_recorded == (kind == pb::ApplicationKind::Replacement), "{application:?}");
            }
            Outcome::LossRecorded => {
                ensure!(application.loss_recorded, "{application:?}");
                ensure!(old == pb::CardStatus::ReportedLost as i32, "reported card of {application:?} is {old}");
                ensure!(application.order_id.is_empty(), "a loss report made an order: {application:?}");
            }
            Outcome::Refused => ensure!(application.state == pb::ApplicationState::Refused as i32, "{application:?}"),
            Outcome::Collected => {
                ensure!(application.state == pb::ApplicationState::Collected as i32, "{application:?}")
            }
        }
    }
    Ok(())
}

/// Kills `processes`, lodges the second round while they are down, and brings them back on the
/// same databases.
async fn second_round_while_down(
    t: &mut TestSuite,
    processes: &[Process],
    acknowledged: &mut Vec<Acknowledged>,
) -> anyhow::Result<()> {
    for process in processes {
        t.suite.kill(*process).await?;
    }
    acknowledged.extend(submit_round(t, 1).await?);
    tokio::time::sleep(Duration::from_millis(700)).await;
    for process in processes {
        t.suite.restart(*process).await?;
    }
    Ok(())
}

/// Both home bureaus die while the first round is being verified; the second round is lodged
/// while they are down; they come back on the same databases.
async fn verification_killed_mid_flow_loses_and_duplicates_nothing(db: Db) -> anyhow::Result<()> {
    let Some(mut t) = start_for_faults(db).await? else { return Ok(()) };
    let mut acknowledged = submit_round(&t, 0).await?;
    second_round_while_down(&mut t, &[Process::HomeJiangxi, Process::HomeSichuan], &mut acknowledged).await?;
    settle_and_check(&t, &acknowledged).await?;
    t.stop().await
}

/// The producer dies with orders in production (placed, not yet registered or dispatched), while
/// the station keeps placing and polling.
async fn issuance_killed_mid_flow_loses_and_duplicates_nothing(db: Db) -> anyhow::Result<()> {
    let Some(mut t) = start_for_faults(db).await? else { return Ok(()) };
    let mut acknowledged = submit_round(&t, 0).await?;
    wait_for_any(&t, &acknowledged, pb::ApplicationState::InProduction).await?;
    second_round_while_down(&mut t, &[Process::Issuance], &mut acknowledged).await?;
    // Again once the second round is being ordered.
    wait_for_any(&t, &acknowledged[acknowledged.len() / 2..], pb::ApplicationState::InProduction).await?;
    t.suite.kill(Process::Issuance).await?;
    t.suite.restart(Process::Issuance).await?;
    settle_and_check(&t, &acknowledged).await?;
    t.stop().await
}

/// The registry dies while loss reports are being filed and cards registered.
async fn registry_killed_mid_flow_loses_and_duplicates_nothing(db: Db) -> anyhow::Result<()> {
    let Some(mut t) = start_for_faults(db).await? else { return Ok(()) };
    let mut acknowledged = submit_round(&t, 0).await?;
    wait_for_any(&t, &acknowledged, pb::ApplicationState::Approved).await?;
    second_round_while_down(&mut t, &[Process::Registry], &mut acknowledged).await?;
    // Again while the producer registers the first cards.
    wait_for_any(&t, &acknowledged, pb::ApplicationState::InProduction).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    t.suite.kill(Process::Registry).await?;
    t.suite.restart(Process::Registry).await?;
    settle_and_check(&t, &acknowledged).await?;
    t.stop().await
}

/// Short outages heal by themselves: on the demo's retry budget (`DEMO_OUTBOX`, which outlasts a
/// 30 s restart), a home bureau killed during a batch and started again 8 s later leaves no dead
/// letter, and every application completes with no operator action.
async fn a_home_bureau_down_for_8_s_on_the_demos_settings_leaves_no_dead_letter(db: Db) -> anyhow::Result<()> {
    let Some(mut t) = start(db, NATIONAL_DAY, |options| {
        let station = format!("{DEMO_OUTBOX}\n[worker]\nrespond_within_ms = 0\n");
        options.extra_config.insert(Process::Intake, station);
        options.production_delay_ms = 200;
        options.renewable_per_province = 2;
    })
    .await?
    else {
        return Ok(());
    };
    let mut acknowledged = submit_round(&t, 0).await?;
    t.suite.kill(Process::HomeJiangxi).await?;
    acknowledged.extend(submit_round(&t, 1).await?);
    tokio::time::sleep(Duration::from_secs(8)).await;
    t.suite.restart(Process::HomeJiangxi).await?;
    settle_and_check(&t, &acknowledged).await?;
    let mut outbox = OutboxClient::new(t.channel(Process::Intake).await?);
    let dead = outbox
        .list_outbox_messages(pb::ListOutboxMessagesRequest {
            state: pb::OutboxMessageState::Dead as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .messages;
    ensure!(dead.is_empty(), "dead letters after an 8 s outage: {dead:#?}");
    t.stop().await
}

/// PostgreSQL going away under load, as a server restart does to its clients: every connection of
/// the five bureaus is terminated (`pg_terminate_backend`) twice mid-flow. Restarting the shared
/// server itself is left to the soak (RELIABILITY.md); this takes the same reconnect path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_cut_mid_flow_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let Some(admin_url) = yidi_testkit::postgres_server_for_tests().await.map_err(anyhow::Error::msg)? else {
        return Ok(());
    };
    let Some(t) = start_for_faults(Db::Postgres).await? else { return Ok(()) };
    let names: Vec<String> = Process::ALL
        .iter()
        .map(|p| {
            let url = t.suite.database_url(*p);
            url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default().to_owned()
        })
        .collect();
    let admin = Database::connect(&admin_url).await?;
    let cut = async || -> anyhow::Result<u64> {
        let list = names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname IN ({list}) AND pid <> pg_backend_pid()"
        );
        let rows = admin.query_all_raw(Statement::from_string(admin.get_database_backend(), sql)).await?;
        Ok(rows.len() as u64)
    };
    let mut acknowledged = submit_round(&t, 0).await?;
    let first = cut().await?;
    ensure!(first > 0, "no bureau connection to terminate");
    // The station's next requests find their pooled connections dead: they must not fail.
    acknowledged.extend(submit_round(&t, 1).await?);
    wait_for_any(&t, &acknowledged, pb::ApplicationState::InProduction).await?;
    cut().await?;
    settle_and_check(&t, &acknowledged).await?;
    admin.close().await?;
    t.stop().await
}

/// Issue 15, done-when 5: the home bureau and the producer each run as two replicas on one
/// PostgreSQL database, both listed in the directory, so the station's Verify and PlaceOrder calls
/// (and the producer's outbox) spread over both. Mid-batch one replica of each is killed with
/// SIGKILL and not started again: every application still settles, exactly once, and no message
/// ends as a dead letter. PostgreSQL only: on SQLite a bureau's database is one file owned by one
/// process, so there is nothing for a second replica to share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_verification_and_issuance_with_one_replica_of_each_killed_settle_each_application_once()
-> anyhow::Result<()> {
    const BATCH: usize = 40;
    let Some(mut t) = start(Db::Postgres, NATIONAL_DAY, |options| {
        let station = "[worker]\nrespond_within_ms = 0\n\n[outbox]\ncall_timeout_ms = 2000\npoll_ms = 50\n";
        options.extra_config.insert(Process::Intake, station.into());
        // A short call deadline keeps the lease short (deadline + 5 s): the messages the killed
        // producer had claimed go to the other replica within seconds.
        options.extra_config.insert(Process::Issuance, "[outbox]\ncall_timeout_ms = 2000\npoll_ms = 50\n".into());
        // Orders stay in production a while, so the killed producer leaves some unfinished.
        options.production_delay_ms = 800;
        options.citizens_per_province = BATCH + 20;
    })
    .await?
    else {
        return Ok(());
    };
    let home_replica = t.suite.add_replica(Process::HomeJiangxi).await?;
    let mut producer_replica = t.suite.add_replica(Process::Issuance).await?;
    // The bureaus re-read the directory on SIGHUP, asynchronously.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut acknowledged = lodge_replacements(&t, 0..BATCH / 2).await?;
    // Killed mid-flow: some orders placed (on either producer), others still being verified.
    let ordered = |now: &[pb::Application]| now.iter().filter(|a| !a.order_id.is_empty()).count() >= 6;
    wait_until(&t, &acknowledged, "six orders", ordered).await?;
    t.suite.kill(Process::HomeJiangxi).await?;
    producer_replica.kill().await?;
    acknowledged.extend(lodge_replacements(&t, BATCH / 2..BATCH).await?);
    settle_and_check(&t, &acknowledged).await?;

    // No dead letter at the station or at the producer.
    for process in [Process::Intake, Process::Issuance] {
        let db = Database::connect(t.suite.database_url(process)).await?;
        let dead = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM outbox_messages WHERE state = 'dead'",
            ))
            .await?
            .context("count")?
            .try_get::<i64>("", "n")?;
        db.close().await?;
        ensure!(dead == 0, "{dead} dead letters at {}\n{}", process.slug(), t.logs());
    }
    // Both replicas of each bureau did part of the work before the kill.
    let logged = |path: &std::path::Path, line: &str| {
        std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.contains(line)).count()
    };
    for (process, replica_log, line) in [
        (Process::HomeJiangxi, &home_replica.log_path, "verification approved"),
        (Process::Issuance, &producer_replica.log_path, "order placed: in production"),
    ] {
        let (own, replica) = (logged(&t.suite.log_path(process), line), logged(replica_log, line));
        ensure!(own > 0 && replica > 0, "{}: {line:?} {own} times, at its replica {replica} times", process.slug());
    }
    ensure!(home_replica.terminate().await? == Some(0), "the surviving replica stops cleanly");
    t.stop().await
}

/// Lodges a replacement for each of the Jiangxi citizens `citizens` (ordinary ones, by index).
async fn lodge_replacements(t: &TestSuite, citizens: std::ops::Range<usize>) -> anyhow::Result<Vec<Acknowledged>> {
    let mut acknowledged = Vec::new();
    for n in citizens {
        let citizen = t.ordinary("36", n)?;
        let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
        acknowledged.push(Acknowledged { application_id: application.application_id, expect: Outcome::CardReady });
    }
    Ok(acknowledged)
}
