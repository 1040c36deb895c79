//! The flows end to end: the real binaries as separate processes, driven over gRPC.
use anyhow::Context;
use yidi_proto::v1 as pb;
use yidi_proto::v1::audit_client::AuditClient;
use yidi_tests::{
    Db, NATIONAL_DAY, applicant, live, on_both_databases, reason, serial, start, start_tls, topology::Process, walks,
};

on_both_databases!(
    k1_replacement_across_provinces_end_to_end,
    k3_loss_report_alone_invalidates_the_card_everywhere,
    k6_withdrawal_needs_a_fresh_fingerprint_and_ends_at_revocation,
    k2_renewal_inside_the_window_makes_a_new_card,
    n3_routing_follows_the_declared_registration_not_the_number,
    c4_a_relying_party_must_name_number_and_serial,
    lifecycle_cancellation_only_before_production,
    lifecycle_the_producer_tells_the_station_over_mutual_tls,
);

/// The happy path of the seed over plaintext: a Jiangxi citizen living in Zhejiang lost his card.
async fn k1_replacement_across_provinces_end_to_end(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    walks::replacement_across_provinces(&t).await?;
    t.stop().await
}

async fn k3_loss_report_alone_invalidates_the_card_everywhere(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let citizen = t.citizen("loss_report", "51")?;
    let reported = t.report_loss(&citizen).await?;
    assert_eq!(reported.kind, pb::ApplicationKind::LossReport as i32);
    // The answer comes once the registry has recorded the loss: the card is invalid everywhere.
    assert!(reported.loss_recorded, "{reported:?}");
    assert_eq!(reported.state, pb::ApplicationState::Approved as i32);
    assert!(reported.new_card_serial.is_empty(), "K3: no new card");

    // S1 + C4: every relying party sees it at once, and the check is a hit for the home bureau.
    let mut registry = t.registry().await?;
    let answer = registry
        .check_card(pb::CheckCardRequest {
            id_number: citizen.person.id_number.clone(),
            card_serial: serial(&citizen),
            relying_party: "railway-gate-7".into(),
            nonce: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(answer.status, pb::CardStatus::ReportedLost as i32);
    assert!(answer.status_changed_at.is_some());
    let hits = registry
        .list_hits(pb::ListHitsRequest {
            home_bureau_id: "home-sichuan".into(),
            page_size: 50,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .hits;
    assert!(hits.iter().any(|h| h.card_serial == serial(&citizen) && h.relying_party == "railway-gate-7"));
    let other = registry
        .list_hits(pb::ListHitsRequest {
            home_bureau_id: "home-jiangxi".into(),
            page_size: 50,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .hits;
    assert!(other.iter().all(|h| h.card_serial != serial(&citizen)), "another bureau does not see it");
    t.stop().await
}

async fn k6_withdrawal_needs_a_fresh_fingerprint_and_ends_at_revocation(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut intake = t.intake().await?;
    let mut registry = t.registry().await?;

    // A card reported lost, then found: withdrawal with a fresh fingerprint match.
    let citizen = t.citizen("withdrawal", "36")?;
    let mut wrong_finger = applicant(&citizen);
    if let Some(live) = wrong_finger.live.as_mut() {
        live.fingerprint_template = t.ordinary("36", 1)?.fingerprint_template;
    }
    let refused = intake
        .withdraw_loss_report(pb::WithdrawLossReportRequest {
            applicant: Some(wrong_finger),
            card_serial: serial(&citizen),
            request_id: String::new(),
        })
        .await
        .expect_err("someone else's finger");
    assert_eq!(reason(&refused), "REFUSAL_REASON_FINGERPRINT_MISMATCH");
    let withdrawn = intake
        .withdraw_loss_report(pb::WithdrawLossReportRequest {
            applicant: Some(applicant(&citizen)),
            card_serial: serial(&citizen),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(withdrawn.status, pb::CardStatus::Valid as i32);
    let check = registry
        .check_card(pb::CheckCardRequest {
            id_number: citizen.person.id_number.clone(),
            card_serial: serial(&citizen),
            relying_party: "hotel".into(),
            nonce: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(check.status, pb::CardStatus::Valid as i32);

    // While a replacement is open (here: made, not yet collected) the home bureau refuses the
    // withdrawal: the new card would revoke the card declared valid again. (Once revoked, the
    // registry's refusal is final: registry `k6_withdrawal_restores_valid_but_not_after_revocation`.)
    let citizen = t.citizen("loss_report_final", "36")?;
    let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    t.wait_for_state(&application.application_id, pb::ApplicationState::ReadyForCollection).await?;
    let refused = intake
        .withdraw_loss_report(pb::WithdrawLossReportRequest {
            applicant: Some(applicant(&citizen)),
            card_serial: serial(&citizen),
            request_id: String::new(),
        })
        .await
        .expect_err("a new card is pending");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason(&refused), "REFUSAL_REASON_NEW_CARD_PENDING", "{refused:?}");
    t.stop().await
}

async fn k2_renewal_inside_the_window_makes_a_new_card(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let citizen = t.citizen("renewal", "51")?;
    let application = t.submit(pb::ApplicationKind::Renewal, &citizen, serial(&citizen)).await?;
    let ready = t.wait_for_state(&application.application_id, pb::ApplicationState::ReadyForCollection).await?;
    assert!(!ready.loss_recorded, "a renewal files no loss report");

    // C1: the new card's term follows the holder's age on the day of issue.
    let order = t
        .issuance()
        .await?
        .get_order(pb::GetOrderRequest { order_id: ready.order_id.clone(), ..Default::default() })
        .await?
        .into_inner()
        .order
        .context("order")?;
    let term = yidi_domain::card::term_for(citizen.person.birth_date, t.today);
    assert_eq!(order.valid_from, term.valid_from.to_string());
    assert_eq!(order.valid_until, term.valid_until.map(|d| d.to_string()).unwrap_or_default());
    assert_eq!(order.state, pb::OrderState::Dispatched as i32);

    // C3: the old card stays valid until the renewed one is handed over; then it is revoked (S1).
    let mut registry = t.registry().await?;
    let check = |serial: String| pb::CheckCardRequest {
        id_number: citizen.person.id_number.clone(),
        card_serial: serial,
        relying_party: "bank".into(),
        nonce: Vec::new(),
    };
    let old = registry.check_card(check(serial(&citizen))).await?.into_inner();
    assert_eq!(old.status, pb::CardStatus::Valid as i32);
    let new = registry.check_card(check(ready.new_card_serial.clone())).await?.into_inner();
    assert_eq!(new.status, pb::CardStatus::AwaitingCollection as i32);
    t.intake()
        .await?
        .collect_card(pb::CollectCardRequest {
            application_id: ready.application_id.clone(),
            live: Some(live(&citizen)),
            request_id: String::new(),
        })
        .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let new = registry.check_card(check(ready.new_card_serial.clone())).await?.into_inner();
        if new.status == pb::CardStatus::Valid as i32 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the collection never reached the registry: {new:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let old = registry.check_card(check(serial(&citizen))).await?.into_inner();
    assert_eq!(old.status, pb::CardStatus::Revoked as i32);
    t.stop().await
}

async fn n3_routing_follows_the_declared_registration_not_the_number(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    // Number from Zhejiang (33...), household registration moved to Jiangxi.
    let moved = t.citizen("registration_moved", "36")?;
    assert!(moved.person.id_number.starts_with("33"));
    let application = t.report_loss(&moved).await?;
    assert_eq!(application.home_bureau_id, "home-jiangxi");
    t.wait_for(&application.application_id, "loss recorded", |a| a.loss_recorded).await?;

    // Declaring the wrong province routes to a bureau that does not hold the citizen.
    let citizen = t.ordinary("36", 2)?;
    let mut wrong = applicant(&citizen);
    wrong.declared_province = "51".into();
    let application = t.report_loss_as(wrong, serial(&citizen)).await?;
    assert_eq!(application.home_bureau_id, "home-sichuan");
    let refused = t.wait_for_state(&application.application_id, pb::ApplicationState::Refused).await?;
    assert_eq!(refused.refusal_reason, pb::RefusalReason::UnknownCitizen as i32);
    t.stop().await
}

async fn c4_a_relying_party_must_name_number_and_serial(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut registry = t.registry().await?;
    let citizen = t.ordinary("36", 0)?;
    let other = t.ordinary("36", 1)?;
    let request = |id: &str, serial: &str| pb::CheckCardRequest {
        id_number: id.into(),
        card_serial: serial.into(),
        relying_party: "bank".into(),
        nonce: Vec::new(),
    };
    let valid = registry.check_card(request(&citizen.person.id_number, &serial(&citizen))).await?.into_inner();
    assert_eq!(valid.status, pb::CardStatus::Valid as i32);
    // Another person's serial with this number: indistinguishable from a serial that does not exist.
    let mismatched = registry.check_card(request(&citizen.person.id_number, &serial(&other))).await?.into_inner();
    assert_eq!(mismatched.status, pb::CardStatus::Unknown as i32);
    assert!(mismatched.status_changed_at.is_none());
    let missing = registry.check_card(request(&citizen.person.id_number, "")).await.expect_err("serial required");
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(yidi_tests::violated_fields(&missing).contains(&"card_serial".to_owned()));

    // C2: the batch answers each card in order.
    let batch = registry
        .check_cards(pb::CheckCardsRequest {
            cards: vec![
                pb::CardQuery { id_number: citizen.person.id_number.clone(), card_serial: serial(&citizen) },
                pb::CardQuery { id_number: citizen.person.id_number.clone(), card_serial: "ZZ0000000000".into() },
            ],
            relying_party: "bank".into(),
        })
        .await?
        .into_inner();
    let statuses: Vec<i32> = batch.results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![pb::CardStatus::Valid as i32, pb::CardStatus::Unknown as i32]);
    t.stop().await
}

async fn lifecycle_cancellation_only_before_production(db: Db) -> anyhow::Result<()> {
    let Some(mut t) = start(db, NATIONAL_DAY, |options| {
        options.extra_config.insert(Process::Intake, "[worker]\nrespond_within_ms = 500\n".into());
    })
    .await?
    else {
        return Ok(());
    };
    let mut intake = t.intake().await?;

    // The home bureau is down: the application waits in VERIFYING and can be cancelled.
    t.suite.terminate(Process::HomeJiangxi).await?;
    let waiting = t.ordinary("36", 4)?;
    let application = t.submit(pb::ApplicationKind::Renewal, &waiting, serial(&waiting)).await?;
    assert_eq!(application.state, pb::ApplicationState::Verifying as i32, "{application:?}");
    let cancelled = intake
        .cancel_application(pb::CancelApplicationRequest {
            application_id: application.application_id.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .application
        .context("application")?;
    assert_eq!(cancelled.state, pb::ApplicationState::Cancelled as i32);
    t.suite.restart(Process::HomeJiangxi).await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let still = t.wait_for_state(&application.application_id, pb::ApplicationState::Cancelled).await?;
    assert_eq!(still.history.last().map(|h| h.state), Some(pb::ApplicationState::Cancelled as i32));

    let citizen = t.ordinary("51", 3)?;
    let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    let ready = t.wait_for_state(&application.application_id, pb::ApplicationState::ReadyForCollection).await?;
    let refused = intake
        .cancel_application(pb::CancelApplicationRequest {
            application_id: ready.application_id.clone(),
            request_id: String::new(),
        })
        .await
        .expect_err("too late to cancel");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let unknown = intake
        .get_application(pb::GetApplicationRequest { application_id: uuid::Uuid::new_v4().to_string() })
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let malformed = intake
        .get_application(pb::GetApplicationRequest { application_id: "nope".into() })
        .await
        .expect_err("malformed id");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    t.stop().await
}

/// Told, not polled: with production delay 0 and a station that would first ask the producer after
/// ten minutes, the card is ready well within the suite's wait, so the producer's notice did it
/// (over mutual TLS, through the access layer: only a producer may tell). The station's audit row
/// says how it learnt.
async fn lifecycle_the_producer_tells_the_station_over_mutual_tls(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |options| {
        options.production_delay_ms = 0;
        options.extra_config.insert(Process::Intake, "[worker]\norder_poll_after_ms = 600000\n".into());
    })
    .await?
    else {
        return Ok(());
    };
    let citizen = t.ordinary("36", 5)?;
    let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    let ready = t.wait_for_state(&application.application_id, pb::ApplicationState::ReadyForCollection).await?;
    assert!(!ready.new_card_serial.is_empty(), "{ready:?}");
    let mut audit = AuditClient::new(t.channel(Process::Intake).await?);
    let entries = audit
        .list_audit_entries(pb::ListAuditEntriesRequest { page_size: 500, ..Default::default() })
        .await?
        .into_inner()
        .entries;
    let dispatched: Vec<_> = entries.iter().filter(|e| e.action == "card_dispatched").collect();
    anyhow::ensure!(dispatched.len() == 1, "one dispatch recorded: {dispatched:?}");
    anyhow::ensure!(dispatched[0].detail.contains("told by producer-zhejiang"), "{:?}", dispatched[0]);
    t.stop().await
}
