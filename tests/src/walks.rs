//! Walks through the suite written once, run by several tests (plaintext, mutual TLS).
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_stream::StreamExt;
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_status_filter::CardKey;

use crate::{
    TestSuite, card_check, live, reason, serial,
    topology::{Process, RELYING_PARTY},
};

/// K1, the happy path of the seed: a Jiangxi citizen living in Zhejiang lost his card. The
/// station calls the home bureau, the registry and the producer, the producer calls the registry
/// (on a TLS suite each presenting its own certificate); a relying party checks the cards and
/// watches the revocations.
pub async fn replacement_across_provinces(t: &TestSuite) -> anyhow::Result<()> {
    let citizen = t.citizen("replacement", "36")?;
    let old_serial = serial(&citizen);
    let mut bank = LossRegistryClient::new(t.channel_as(Process::Registry, RELYING_PARTY).await?);
    let check = |serial: String| card_check(&citizen, serial, RELYING_PARTY);
    let before = bank.check_card(check(old_serial.clone())).await?.into_inner();
    assert_eq!(before.status, pb::CardStatus::Valid as i32);

    let old_digest = CardKey::new(&citizen.person.id_number, &old_serial).digest().to_vec();
    let mut revocations = bank.watch_revocations(pb::WatchRevocationsRequest { after_sequence: 0 }).await?.into_inner();

    let mut intake = t.intake().await?;
    let submitted = t.submit(pb::ApplicationKind::Replacement, &citizen, old_serial.clone()).await?;
    assert_eq!(submitted.home_bureau_id, "home-jiangxi");
    assert!(!submitted.id_number_masked.contains(&citizen.person.id_number[6..14]), "number is masked");

    let ready = t.wait_for_state(&submitted.application_id, pb::ApplicationState::ReadyForCollection).await?;
    assert!(ready.loss_recorded, "K1: the replacement filed the loss report at the registry");
    let new_serial = ready.new_card_serial.clone();
    assert!(!new_serial.is_empty() && new_serial != old_serial);

    // C3: the new card is made but not yet handed over: not valid, and the old card stays
    // reported lost until it is.
    let old = bank.check_card(check(old_serial.clone())).await?.into_inner();
    assert_eq!(old.status, pb::CardStatus::ReportedLost as i32);
    let new = bank.check_card(check(new_serial.clone())).await?.into_inner();
    assert_eq!(new.status, pb::CardStatus::AwaitingCollection as i32);

    // C3: handed over only after a fresh face match.
    let mut stranger = live(&citizen);
    stranger.face_template = t.ordinary("51", 0)?.face_template;
    let refused = intake
        .collect_card(pb::CollectCardRequest {
            application_id: ready.application_id.clone(),
            live: Some(stranger),
            request_id: String::new(),
        })
        .await
        .expect_err("a stranger cannot collect the card");
    assert_eq!(reason(&refused), "REFUSAL_REASON_FACE_MISMATCH");
    let collected = intake
        .collect_card(pb::CollectCardRequest {
            application_id: ready.application_id.clone(),
            live: Some(live(&citizen)),
            request_id: String::new(),
        })
        .await?
        .into_inner()
        .application
        .context("application")?;
    assert_eq!(collected.state, pb::ApplicationState::Collected as i32);
    let states: Vec<i32> = collected.history.iter().map(|h| h.state).collect();
    use pb::ApplicationState as S;
    assert_eq!(
        states,
        [S::Received, S::Verifying, S::Approved, S::InProduction, S::ReadyForCollection, S::Collected]
            .map(|s| s as i32)
    );

    // S1: the old card was reported lost, then revoked by the collection of the new card, which
    // is valid from then on.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), revocations.next())
            .await
            .context("revocation stream stalled")?
            .context("stream ended")??;
        // Issue 16: a relying party is told the card's digest, never its serial (on a plaintext
        // suite there is no authenticated caller, and the serial is kept).
        let (serial, digest) =
            if t.suite.is_tls() { (String::new(), old_digest.clone()) } else { (old_serial.clone(), Vec::new()) };
        if event.card_serial == serial && event.card_digest == digest {
            seen.push(event.status);
        }
    }
    assert_eq!(seen, vec![pb::CardStatus::ReportedLost as i32, pb::CardStatus::Revoked as i32]);
    let old = bank.check_card(check(old_serial.clone())).await?.into_inner();
    assert_eq!(old.status, pb::CardStatus::Revoked as i32);
    let new = bank.check_card(check(new_serial.clone())).await?.into_inner();
    assert_eq!(new.status, pb::CardStatus::Valid as i32);

    // The home bureau now knows the new card as current; the application is closed (K5).
    let mut home = t.home(Process::HomeJiangxi).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record =
            home.get_citizen(pb::GetCitizenRequest { id_number: citizen.person.id_number.clone() }).await?.into_inner();
        if record.current_card_serial == new_serial && record.open_application_ids.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "home bureau never learned the new card: {record:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
