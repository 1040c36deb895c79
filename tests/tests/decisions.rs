//! S4: the producer and the registry act only on a decision signed by the citizen's home bureau,
//! addressed to them, unexpired and not used before. The test signs decisions itself with the
//! keys the suite generated, forging each way a decision can be wrong.
use std::time::Duration;

use anyhow::Context;
use ed25519_dalek::SigningKey;
use yidi_domain::{Decision, DecisionPurpose, SignedDecision};
use yidi_grpc::convert::signed_decision_to_proto;
use yidi_proto::v1::{self as pb, issuance_client::IssuanceClient, loss_registry_client::LossRegistryClient};
use yidi_runtime::population::Citizen;
use yidi_tests::{
    Db, NATIONAL_DAY, TestSuite, at, on_both_databases, reason, serial, start_tls, topology, topology::Process,
};

on_both_databases!(
    s4_forged_replayed_expired_and_misaddressed_decisions_are_refused_by_issuance_and_registry,
    s4_a_registration_transfer_hands_the_cards_to_the_new_home_bureau,
);

/// Every way a decision can be wrong, each expected to be refused with this `ErrorInfo.reason`.
fn forgeries(
    t: &TestSuite,
    citizen: &Citizen,
    purpose: DecisionPurpose,
    addressee: &str,
) -> Vec<(&'static str, SignedDecision, &'static str)> {
    let jiangxi: &SigningKey = &t.suite.keys[topology::HOME_JIANGXI].key;
    let sichuan = &t.suite.keys[topology::HOME_SICHUAN];
    let now = at(NATIONAL_DAY);
    let genuine = || t.decision(citizen, purpose, addressee, now);

    let mut unsigned = genuine().sign(jiangxi);
    unsigned.signature.clear();
    let mut tampered = genuine().sign(jiangxi);
    tampered.decision.card.holder.name = "Someone Else".into();
    let mut other_bureau = genuine();
    other_bureau.bureau_id = topology::HOME_SICHUAN.into();
    other_bureau.key_id = sichuan.id.clone();
    let wrong_jurisdiction = other_bureau.sign(&sichuan.key);
    let unlisted_key = Decision { key_id: "key-nobody-listed".into(), ..genuine() }.sign(jiangxi);
    let misaddressed = t.decision(citizen, purpose, "producer-elsewhere", now).sign(jiangxi);
    let expired = t.decision(citizen, purpose, addressee, now - chrono::Duration::days(8)).sign(jiangxi);
    let stolen_key = genuine().sign(&yidi_runtime::directory::generate_signing_key());
    vec![
        ("unsigned", unsigned, "DECISION_UNSIGNED"),
        ("tampered", tampered, "DECISION_BAD_SIGNATURE"),
        ("unknown key", stolen_key, "DECISION_BAD_SIGNATURE"),
        ("unlisted key id", unlisted_key, "DECISION_UNKNOWN_KEY"),
        ("wrong jurisdiction", wrong_jurisdiction, "DECISION_WRONG_JURISDICTION"),
        ("misaddressed", misaddressed, "DECISION_MISADDRESSED"),
        ("expired", expired, "DECISION_EXPIRED"),
    ]
}

async fn s4_forged_replayed_expired_and_misaddressed_decisions_are_refused_by_issuance_and_registry(
    db: Db,
) -> anyhow::Result<()> {
    // Over mutual TLS: each decision reaches the producer and the registry from the bureau that
    // would really send it (the station, the producer), admitted by the access matrix, so what
    // refuses it is the decision's own check.
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let citizen = t.ordinary("36", 0)?;
    let mut issuance = IssuanceClient::new(t.channel_as(Process::Issuance, topology::STATION).await?);
    let mut registry = LossRegistryClient::new(t.channel_as(Process::Registry, topology::STATION).await?);
    let mut producer_at_registry = LossRegistryClient::new(t.channel_as(Process::Registry, topology::PRODUCER).await?);

    for (what, forged, expected) in forgeries(&t, &citizen, DecisionPurpose::IssueCard, topology::PRODUCER) {
        let wire = signed_decision_to_proto(&forged);
        let refused = issuance
            .place_order(pb::PlaceOrderRequest { decision: Some(wire.clone()), request_id: String::new() })
            .await
            .expect_err(what);
        assert_eq!(reason(&refused), expected, "issuance, {what}: {refused:?}");
        let refused = producer_at_registry
            .register_card(pb::RegisterCardRequest {
                decision: Some(wire),
                producer_id: topology::PRODUCER.into(),
                card_serial: "ZJ9000000001".into(),
                request_id: String::new(),
            })
            .await
            .expect_err(what);
        assert_eq!(reason(&refused), expected, "registry card, {what}: {refused:?}");
    }
    for (what, forged, expected) in forgeries(&t, &citizen, DecisionPurpose::ReportLoss, topology::REGISTRY) {
        let refused = registry
            .report_loss(pb::LossRegistryReportLossRequest {
                decision: Some(signed_decision_to_proto(&forged)),
                request_id: String::new(),
            })
            .await
            .expect_err(what);
        assert_eq!(reason(&refused), expected, "registry loss, {what}: {refused:?}");
    }
    // A bureau that writes its own province into a decision cannot act on another bureau's
    // citizen: the registry knows which home bureau each card belongs to.
    let sichuan = &t.suite.keys[topology::HOME_SICHUAN];
    let rewritten = |purpose, addressee| {
        let mut d = t.decision(&citizen, purpose, addressee, at(NATIONAL_DAY));
        d.bureau_id = topology::HOME_SICHUAN.into();
        d.key_id = sichuan.id.clone();
        d.card.holder.registration_province = "51".into();
        signed_decision_to_proto(&d.sign(&sichuan.key))
    };
    let refused = registry
        .report_loss(pb::LossRegistryReportLossRequest {
            decision: Some(rewritten(DecisionPurpose::ReportLoss, topology::REGISTRY)),
            request_id: String::new(),
        })
        .await
        .expect_err("rewritten province, loss");
    assert_eq!(reason(&refused), "DECISION_WRONG_JURISDICTION", "{refused:?}");
    let refused = producer_at_registry
        .register_card(pb::RegisterCardRequest {
            decision: Some(rewritten(DecisionPurpose::IssueCard, topology::PRODUCER)),
            producer_id: topology::PRODUCER.into(),
            card_serial: "ZJ9000000003".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("rewritten province, card");
    assert_eq!(reason(&refused), "DECISION_WRONG_JURISDICTION", "{refused:?}");

    // A decision for one purpose is not accepted for another.
    let for_producer = t
        .decision(&citizen, DecisionPurpose::IssueCard, topology::REGISTRY, at(NATIONAL_DAY))
        .sign(&t.suite.keys[topology::HOME_JIANGXI].key);
    let refused = registry
        .report_loss(pb::LossRegistryReportLossRequest {
            decision: Some(signed_decision_to_proto(&for_producer)),
            request_id: String::new(),
        })
        .await
        .expect_err("wrong purpose");
    assert_eq!(reason(&refused), "DECISION_WRONG_PURPOSE");
    // Nothing above changed the card.
    let check = registry
        .check_card(pb::CheckCardRequest {
            id_number: citizen.person.id_number.clone(),
            card_serial: serial(&citizen),
            relying_party: topology::STATION.into(),
            nonce: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(check.status, pb::CardStatus::Valid as i32);

    // A genuine decision works once; replayed, it is refused by both.
    let genuine = signed_decision_to_proto(
        &t.decision(&citizen, DecisionPurpose::IssueCard, topology::PRODUCER, at(NATIONAL_DAY))
            .sign(&t.suite.keys[topology::HOME_JIANGXI].key),
    );
    let order = issuance
        .place_order(pb::PlaceOrderRequest { decision: Some(genuine.clone()), request_id: String::new() })
        .await?
        .into_inner()
        .order
        .context("order")?;
    let replayed = issuance
        .place_order(pb::PlaceOrderRequest { decision: Some(genuine.clone()), request_id: String::new() })
        .await
        .expect_err("replay");
    assert_eq!(replayed.code(), tonic::Code::AlreadyExists);
    assert_eq!(reason(&replayed), "DECISION_ALREADY_USED");
    // Wait until the producer has registered its card, then replay the decision at the registry.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = issuance
            .get_order(pb::GetOrderRequest {
                order_id: order.order_id.clone(),
                decision_id: String::new(),
                station_id: String::new(),
            })
            .await?
            .into_inner()
            .order
            .context("order")?
            .state;
        if state == pb::OrderState::Dispatched as i32 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "order never dispatched\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replayed = producer_at_registry
        .register_card(pb::RegisterCardRequest {
            decision: Some(genuine),
            producer_id: topology::PRODUCER.into(),
            card_serial: "ZJ9000000002".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("a second card for one decision");
    assert_eq!(reason(&replayed), "DECISION_ALREADY_USED");
    t.stop().await
}

/// S4 through the real suite over mutual TLS: Jiangxi's admin operator transfers a citizen's
/// registration to Sichuan, and Jiangxi delivers the decision to the registry under its own
/// certificate. Before, the registry refuses Sichuan's loss decision about the card; after, it
/// refuses Jiangxi's and accepts Sichuan's, and Jiangxi no longer knows the citizen.
async fn s4_a_registration_transfer_hands_the_cards_to_the_new_home_bureau(db: Db) -> anyhow::Result<()> {
    let Some(t) = start_tls(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let citizen = t.ordinary("36", 1)?;
    let mut registry = LossRegistryClient::new(t.channel_as(Process::Registry, topology::STATION).await?);
    let sichuan = &t.suite.keys[topology::HOME_SICHUAN];
    let loss = |signer: &str| {
        let mut d = t.decision(&citizen, DecisionPurpose::ReportLoss, topology::REGISTRY, at(NATIONAL_DAY));
        let signed = if signer == topology::HOME_SICHUAN {
            d.bureau_id = topology::HOME_SICHUAN.into();
            d.key_id = sichuan.id.clone();
            d.card.holder.registration_province = "51".into();
            d.sign(&sichuan.key)
        } else {
            d.sign(&t.suite.keys[topology::HOME_JIANGXI].key)
        };
        pb::LossRegistryReportLossRequest {
            decision: Some(signed_decision_to_proto(&signed)),
            request_id: String::new(),
        }
    };
    let refused = registry.report_loss(loss(topology::HOME_SICHUAN)).await.expect_err("before the transfer");
    assert_eq!(reason(&refused), "DECISION_WRONG_JURISDICTION", "{refused:?}");

    let transfer = pb::TransferRegistrationRequest {
        id_number: citizen.person.id_number.clone(),
        new_province: "51".into(),
        request_id: String::new(),
    };
    let done = t.home(Process::HomeJiangxi).await?.transfer_registration(transfer).await?.into_inner();
    assert_eq!(done.new_home_bureau_id, topology::HOME_SICHUAN);
    assert_eq!(done.card_serials, vec![serial(&citizen)]);

    let refused = registry.report_loss(loss(topology::HOME_JIANGXI)).await.expect_err("after the transfer");
    assert_eq!(reason(&refused), "DECISION_WRONG_JURISDICTION", "{refused:?}");
    let lost = registry.report_loss(loss(topology::HOME_SICHUAN)).await?.into_inner();
    assert_eq!(lost.status, pb::CardStatus::ReportedLost as i32);
    // The old home bureau no longer knows the citizen (N3).
    let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    let refused = t.wait_for_state(&application.application_id, pb::ApplicationState::Refused).await?;
    assert_eq!(refused.refusal_reason, pb::RefusalReason::UnknownCitizen as i32);
    t.stop().await
}
