//! The acceptance policy's phase boundaries (P0–P4), each on a suite whose clock stands on the day.
use anyhow::Context;
use yidi_proto::v1 as pb;
use yidi_runtime::population::Citizen;
use yidi_tests::{Db, TestSuite, applicant_with, on_both_databases, reason, serial, start, topology::Process};

on_both_databases!(
    p0_before_the_pilot_nobody_is_accepted_outside_home,
    p1_pilot_pairs_with_pilot_documents,
    p2_a_city_opens_on_its_own_date,
    p3_national_acceptance_from_2117_07_01,
);

/// Files a loss report; `Ok(None)` when the station accepted it (and the loss was recorded),
/// `Ok(Some(reason))` when the counter refused it.
async fn try_report(t: &TestSuite, citizen: &Citizen, document: pb::DocumentKind) -> anyhow::Result<Option<String>> {
    let mut intake = t.intake().await?;
    let answer = intake
        .report_loss(pb::ReportLossRequest {
            applicant: Some(applicant_with(citizen, document)),
            card_serial: serial(citizen),
            request_id: String::new(),
        })
        .await;
    match answer {
        Ok(answer) => {
            let application = answer.into_inner().application.context("application")?;
            t.wait_for(&application.application_id, "loss recorded", |a| a.loss_recorded).await?;
            Ok(None)
        }
        Err(status) => {
            anyhow::ensure!(status.code() == tonic::Code::FailedPrecondition, "unexpected {status:?}");
            Ok(Some(reason(&status)))
        }
    }
}

const NOT_HERE: &str = "REFUSAL_REASON_NOT_ACCEPTED_HERE";
const DOCUMENT: &str = "REFUSAL_REASON_DOCUMENT_NOT_ACCEPTED";

async fn p0_before_the_pilot_nobody_is_accepted_outside_home(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, "2115-06-30", |_| {}).await? else { return Ok(()) };
    // Jiangxi is Zhejiang's pilot partner, but the pilot has not started.
    let jiangxi = t.ordinary("36", 0)?;
    assert_eq!(try_report(&t, &jiangxi, pb::DocumentKind::ValidCertificate).await?.as_deref(), Some(NOT_HERE));
    assert_eq!(try_report(&t, &jiangxi, pb::DocumentKind::HouseholdRegisterBook).await?.as_deref(), Some(NOT_HERE));
    t.stop().await
}

async fn p1_pilot_pairs_with_pilot_documents(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, "2115-07-01", |_| {}).await? else { return Ok(()) };
    let jiangxi = t.ordinary("36", 0)?;
    // P4: during the pilot the household register book is not the document asked for...
    assert_eq!(try_report(&t, &jiangxi, pb::DocumentKind::HouseholdRegisterBook).await?.as_deref(), Some(DOCUMENT));
    // ...a valid certificate or the work unit's proof is.
    assert_eq!(try_report(&t, &jiangxi, pb::DocumentKind::ValidCertificate).await?, None);
    let work_unit = t.ordinary("36", 1)?;
    assert_eq!(try_report(&t, &work_unit, pb::DocumentKind::WorkUnitProof).await?, None);
    // Sichuan is paired with Chongqing, not Zhejiang.
    let sichuan = t.citizen("not_accepted_here", "51")?;
    assert_eq!(try_report(&t, &sichuan, pb::DocumentKind::ValidCertificate).await?.as_deref(), Some(NOT_HERE));
    t.stop().await
}

/// The station's city (Hangzhou, 3301) opens for applicants from anywhere on 2116-04-01.
fn hangzhou_opens(options: &mut yidi_demo::suite::SuiteOptions) {
    options.extra_config.insert(
        Process::Intake,
        "[[policy.city_openings]]\nregion = \"3301\"\nname = \"Hangzhou\"\nfrom = \"2116-04-01\"\n".into(),
    );
}

async fn p2_a_city_opens_on_its_own_date(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, "2116-03-31", hangzhou_opens).await? else { return Ok(()) };
    let sichuan = t.ordinary("51", 0)?;
    assert_eq!(try_report(&t, &sichuan, pb::DocumentKind::HouseholdRegisterBook).await?.as_deref(), Some(NOT_HERE));
    t.stop().await?;

    let Some(t) = start(db, "2116-04-01", hangzhou_opens).await? else { return Ok(()) };
    let sichuan = t.ordinary("51", 0)?;
    // P4: from P2 on, the household register book or a residence permit.
    assert_eq!(try_report(&t, &sichuan, pb::DocumentKind::ValidCertificate).await?.as_deref(), Some(DOCUMENT));
    assert_eq!(try_report(&t, &sichuan, pb::DocumentKind::HouseholdRegisterBook).await?, None);
    let permit = t.ordinary("51", 1)?;
    assert_eq!(try_report(&t, &permit, pb::DocumentKind::ResidencePermit).await?, None);
    t.stop().await
}

async fn p3_national_acceptance_from_2117_07_01(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, "2117-06-30", |_| {}).await? else { return Ok(()) };
    let sichuan = t.ordinary("51", 0)?;
    assert_eq!(try_report(&t, &sichuan, pb::DocumentKind::HouseholdRegisterBook).await?.as_deref(), Some(NOT_HERE));
    t.stop().await?;

    let Some(t) = start(db, "2117-07-01", |_| {}).await? else { return Ok(()) };
    let sichuan = t.ordinary("51", 0)?;
    assert_eq!(try_report(&t, &sichuan, pb::DocumentKind::HouseholdRegisterBook).await?, None);
    t.stop().await
}
