//! Every refusal of the rulebook, with its reason code, through the real suite.
use yidi_proto::v1 as pb;
use yidi_tests::{
    Db, NATIONAL_DAY, TestSuite, applicant, applicant_with, on_both_databases, reason, serial, start, violated_fields,
};

on_both_databases!(
    s3_home_bureau_refusals_carry_their_reason,
    s2_agents_are_refused_at_the_counter,
    k5_a_second_open_application_is_refused,
    n1_invalid_numbers_are_refused_at_the_edge_and_write_nothing,
);

/// Submits a replacement and waits for the home bureau's answer.
async fn refusal_for(
    t: &TestSuite,
    citizen: &yidi_runtime::population::Citizen,
    kind: pb::ApplicationKind,
) -> anyhow::Result<i32> {
    let application = t.submit(kind, citizen, serial(citizen)).await?;
    let refused = t.wait_for_state(&application.application_id, pb::ApplicationState::Refused).await?;
    Ok(refused.refusal_reason)
}

async fn s3_home_bureau_refusals_carry_their_reason(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    use pb::{ApplicationKind::*, RefusalReason as R};
    let cases = [
        ("face_mismatch", "36", Replacement, R::FaceMismatch),
        ("fingerprint_mismatch", "51", Replacement, R::FingerprintMismatch),
        ("bad_credit", "36", Replacement, R::BadCreditRecord),
        ("deceased", "51", Replacement, R::RegistrationCancelled),
        // K4: never held a card.
        ("first_application", "36", Replacement, R::FirstApplication),
        ("unknown_citizen", "36", Replacement, R::UnknownCitizen),
        // K2: the card is years from expiry.
        ("not_yet_renewable", "51", Renewal, R::NotYetRenewable),
    ];
    for (scenario, province, kind, expected) in cases {
        let citizen = t.citizen(scenario, province)?;
        let got = refusal_for(&t, &citizen, kind).await?;
        assert_eq!(got, expected as i32, "{scenario}: got {:?}", pb::RefusalReason::try_from(got));
    }

    // A deceased citizen's registration is cancelled by the register upkeep RPC, and then refused.
    let citizen = t.ordinary("51", 5)?;
    let mut home = t.home(yidi_tests::topology::Process::HomeSichuan).await?;
    home.record_death(pb::RecordDeathRequest {
        id_number: citizen.person.id_number.clone(),
        date_of_death: "2118-02-01".into(),
        request_id: String::new(),
    })
    .await?;
    assert_eq!(refusal_for(&t, &citizen, Replacement).await?, R::RegistrationCancelled as i32);
    let citizen = t.ordinary("51", 6)?;
    t.record_bad_credit(yidi_tests::topology::Process::HomeSichuan, &citizen).await?;
    assert_eq!(refusal_for(&t, &citizen, Replacement).await?, R::BadCreditRecord as i32);
    t.stop().await
}

async fn s2_agents_are_refused_at_the_counter(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut intake = t.intake().await?;
    let citizen = t.citizen("agent_not_allowed", "36")?;
    let relative = t.ordinary("36", 7)?;
    let mut by_agent = applicant(&citizen);
    by_agent.agent_id_number = relative.person.id_number.clone();
    let refused = t.report_loss_as(by_agent, serial(&citizen)).await.expect_err("agents are refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused), "REFUSAL_REASON_AGENT_NOT_ALLOWED");

    // P4: from the national phase on, a work-unit proof is not accepted.
    let citizen = t.citizen("document_not_accepted", "36")?;
    let refused = intake
        .submit_application(pb::SubmitApplicationRequest {
            kind: pb::ApplicationKind::Replacement as i32,
            applicant: Some(applicant_with(&citizen, pb::DocumentKind::WorkUnitProof)),
            card_serial: serial(&citizen),
            request_id: String::new(),
        })
        .await
        .expect_err("document refused");
    assert_eq!(reason(&refused), "REFUSAL_REASON_DOCUMENT_NOT_ACCEPTED");

    // Nothing was lodged for either refusal.
    let listed = intake.list_applications(pb::ListApplicationsRequest::default()).await?.into_inner();
    assert!(listed.applications.is_empty(), "{listed:?}");
    t.stop().await
}

async fn k5_a_second_open_application_is_refused(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let citizen = t.citizen("application_already_open", "51")?;
    let first = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    t.wait_for(&first.application_id, "approved or later", |a| {
        a.state >= pb::ApplicationState::Approved as i32 && a.state != pb::ApplicationState::Refused as i32
    })
    .await?;
    let second = refusal_for(&t, &citizen, pb::ApplicationKind::Replacement).await?;
    assert_eq!(second, pb::RefusalReason::ApplicationAlreadyOpen as i32);
    t.stop().await
}

async fn n1_invalid_numbers_are_refused_at_the_edge_and_write_nothing(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut intake = t.intake().await?;
    let citizen = t.ordinary("36", 8)?;
    let good = citizen.person.id_number.clone();
    let wrong_check = format!("{}{}", &good[..17], if &good[17..] == "0" { "1" } else { "0" });
    let bad_date = format!("{}20181332{}", &good[..6], &good[14..]);
    for bad in [&good[..17], wrong_check.as_str(), bad_date.as_str(), "36010219900307ABCD"] {
        let mut request = applicant(&citizen);
        request.id_number = bad.to_owned();
        let refused = intake
            .submit_application(pb::SubmitApplicationRequest {
                kind: pb::ApplicationKind::Replacement as i32,
                applicant: Some(request),
                card_serial: serial(&citizen),
                request_id: String::new(),
            })
            .await
            .expect_err("invalid number");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(violated_fields(&refused).contains(&"applicant.id_number".to_owned()), "{bad}: {refused:?}");
    }
    // Unknown enum values and missing fields are named too.
    let refused = intake
        .submit_application(pb::SubmitApplicationRequest {
            kind: 42,
            applicant: None,
            card_serial: String::new(),
            request_id: String::new(),
        })
        .await
        .expect_err("empty request");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let fields = violated_fields(&refused);
    assert!(fields.iter().any(|f| f == "kind"), "{fields:?}");
    // Oversized strings are refused before they reach a database or a log.
    let mut oversized = applicant(&citizen);
    if let Some(document) = oversized.document.as_mut() {
        document.number = "9".repeat(10_000);
    }
    let refused = intake
        .report_loss(pb::ReportLossRequest {
            applicant: Some(oversized),
            card_serial: "X".repeat(5_000),
            request_id: String::new(),
        })
        .await
        .expect_err("oversized strings");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let fields = violated_fields(&refused);
    assert!(fields.contains(&"applicant.document.number".to_owned()), "{fields:?}");
    assert!(fields.contains(&"card_serial".to_owned()), "{fields:?}");
    let listed = intake.list_applications(pb::ListApplicationsRequest::default()).await?.into_inner();
    assert!(listed.applications.is_empty(), "nothing written: {listed:?}");

    // The registry refuses an invalid number the same way.
    let refused = t
        .registry()
        .await?
        .check_card(pb::CheckCardRequest {
            id_number: wrong_check,
            card_serial: serial(&citizen),
            relying_party: "bank".into(),
            nonce: Vec::new(),
        })
        .await
        .expect_err("invalid number");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    t.stop().await
}
