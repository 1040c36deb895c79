//! Issue 5: a mutating call repeated with the same `idempotency-key` gets the first answer again
//! and writes nothing, also after the bureau restarted; the same key with another request is
//! refused. Through the real suite, at the station, a home bureau and the registry.
use anyhow::Context;
use sea_orm::ConnectionTrait;
use yidi_domain::DecisionPurpose;
use yidi_grpc::convert::signed_decision_to_proto;
use yidi_idempotency::{HEADER, KEY_REUSED, REPLAYED_HEADER};
use yidi_proto::v1::{self as pb, audit_client::AuditClient};
use yidi_tests::{
    Db, NATIONAL_DAY, TestSuite, applicant, at, on_both_databases, reason, serial, start, topology, topology::Process,
};

on_both_databases!(
    a_repeated_mutating_call_with_its_key_gets_the_first_answer_and_writes_nothing_also_after_a_restart,
    a_station_that_died_before_keeping_its_answer_answers_a_repeat_with_the_application_it_lodged,
);

/// `message` sent with `key` as its `idempotency-key`.
fn keyed<T>(message: T, key: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(HEADER, key.parse()?);
    Ok(request)
}

fn is_replay<T>(response: &tonic::Response<T>) -> bool {
    response.metadata().get(REPLAYED_HEADER).is_some_and(|value| value == "true")
}

/// What a bureau has written: its audit entries (the chain verifies), and for the station its
/// applications.
async fn written(t: &TestSuite, process: Process) -> anyhow::Result<(i64, usize)> {
    let report = AuditClient::new(t.channel(process).await?)
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await?
        .into_inner();
    anyhow::ensure!(report.intact, "{}: {report:?}", process.slug());
    let applications = if process == Process::Intake {
        let listed = t
            .intake()
            .await?
            .list_applications(pb::ListApplicationsRequest { page_size: 500, ..Default::default() })
            .await?
            .into_inner();
        listed.applications.len()
    } else {
        0
    };
    Ok((report.entries_checked, applications))
}

/// The first answers, to be repeated.
struct Calls {
    submit: pb::SubmitApplicationRequest,
    submitted: pb::SubmitApplicationResponse,
    cancel: pb::CancelApplicationRequest,
    cancelled: pb::CancelApplicationResponse,
    credit: pb::RecordCreditStatusRequest,
    recorded: pb::RecordCreditStatusResponse,
    loss: pb::LossRegistryReportLossRequest,
    reported: pb::LossRegistryReportLossResponse,
}

const BUREAUS: [Process; 3] = [Process::Intake, Process::HomeSichuan, Process::Registry];

/// Repeats every call with its key: each answer is the first one, replayed, and no bureau writes.
async fn repeat_all(t: &TestSuite, calls: &Calls, when: &str) -> anyhow::Result<()> {
    let mut before = Vec::new();
    for process in BUREAUS {
        before.push(written(t, process).await?);
    }
    let mut intake = t.intake().await?;
    let submitted = intake.submit_application(keyed(calls.submit.clone(), "submit-1")?).await?;
    assert!(is_replay(&submitted), "{when}: submit");
    assert_eq!(submitted.get_ref(), &calls.submitted, "{when}: submit");
    let cancelled = intake.cancel_application(keyed(calls.cancel.clone(), "cancel-1")?).await?;
    assert!(is_replay(&cancelled), "{when}: cancel");
    assert_eq!(cancelled.get_ref(), &calls.cancelled, "{when}: cancel");
    let recorded =
        t.home(Process::HomeSichuan).await?.record_credit_status(keyed(calls.credit.clone(), "credit-1")?).await?;
    assert!(is_replay(&recorded), "{when}: credit status");
    assert_eq!(recorded.get_ref(), &calls.recorded, "{when}: credit status");
    let reported = t.registry().await?.report_loss(keyed(calls.loss.clone(), "loss-1")?).await?;
    assert!(is_replay(&reported), "{when}: loss report");
    assert_eq!(reported.get_ref(), &calls.reported, "{when}: loss report");

    for (process, before) in BUREAUS.into_iter().zip(before) {
        assert_eq!(written(t, process).await?, before, "{when}: {} wrote something", process.slug());
    }
    Ok(())
}

async fn a_repeated_mutating_call_with_its_key_gets_the_first_answer_and_writes_nothing_also_after_a_restart(
    db: Db,
) -> anyhow::Result<()> {
    let Some(mut t) = start(db, NATIONAL_DAY, |options| {
        options.extra_config.insert(Process::Intake, "[worker]\nrespond_within_ms = 500\n".into());
    })
    .await?
    else {
        return Ok(());
    };
    // The home bureau of the applicant is down: the application waits in VERIFYING, so the
    // station's worker writes nothing while the test counts, and it can be cancelled.
    t.suite.terminate(Process::HomeJiangxi).await?;
    let citizen = t.ordinary("36", 4)?;
    let submit = pb::SubmitApplicationRequest {
        kind: pb::ApplicationKind::Renewal as i32,
        applicant: Some(applicant(&citizen)),
        card_serial: serial(&citizen),
        request_id: String::new(),
    };
    let mut intake = t.intake().await?;
    let submitted = intake.submit_application(keyed(submit.clone(), "submit-1")?).await?;
    assert!(!is_replay(&submitted));
    let submitted = submitted.into_inner();
    let application_id = submitted.application.as_ref().context("application")?.application_id.clone();
    let cancel = pb::CancelApplicationRequest { application_id, request_id: String::new() };
    let cancelled = intake.cancel_application(keyed(cancel.clone(), "cancel-1")?).await?.into_inner();
    let application = cancelled.application.as_ref().context("application")?;
    assert_eq!(application.state, pb::ApplicationState::Cancelled as i32);

    let credit = pb::RecordCreditStatusRequest {
        id_number: t.ordinary("51", 6)?.person.id_number,
        credit_status: pb::CreditStatus::Bad as i32,
        note: "court order".into(),
        request_id: String::new(),
    };
    let recorded = t
        .home(Process::HomeSichuan)
        .await?
        .record_credit_status(keyed(credit.clone(), "credit-1")?)
        .await?
        .into_inner();

    let lost = t.ordinary("36", 5)?;
    let decision = t
        .decision(&lost, DecisionPurpose::ReportLoss, topology::REGISTRY, at(NATIONAL_DAY))
        .sign(&t.suite.keys[topology::HOME_JIANGXI].key);
    let loss = pb::LossRegistryReportLossRequest {
        decision: Some(signed_decision_to_proto(&decision)),
        request_id: String::new(),
    };
    let reported = t.registry().await?.report_loss(keyed(loss.clone(), "loss-1")?).await?.into_inner();
    assert_eq!(reported.status, pb::CardStatus::ReportedLost as i32, "{reported:?}");

    let calls = Calls { submit, submitted, cancel, cancelled, credit, recorded, loss, reported };
    repeat_all(&t, &calls, "repeated at once").await?;
    for process in BUREAUS {
        t.suite.terminate(process).await?;
        t.suite.restart(process).await?;
    }
    repeat_all(&t, &calls, "repeated after a restart").await?;

    // The same key with another request: refused, nothing written, nothing replayed.
    let before = written(&t, Process::Intake).await?;
    let other = t.ordinary("36", 6)?;
    let reused = pb::SubmitApplicationRequest { applicant: Some(applicant(&other)), ..calls.submit.clone() };
    let refused = t.intake().await?.submit_application(keyed(reused, "submit-1")?).await.expect_err("key reused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(reason(&refused), KEY_REUSED);
    let refused = t
        .home(Process::HomeSichuan)
        .await?
        .record_credit_status(keyed(
            pb::RecordCreditStatusRequest { note: "another".into(), ..calls.credit },
            "credit-1",
        )?)
        .await
        .expect_err("key reused");
    assert_eq!(reason(&refused), KEY_REUSED);
    assert_eq!(written(&t, Process::Intake).await?, before);
    t.stop().await
}

/// The window the layer leaves open: the station committed the application, then died before the
/// layer kept its answer (simulated by deleting the kept answer). The repeat reaches the station,
/// which finds the application by its key instead of lodging a second one.
async fn a_station_that_died_before_keeping_its_answer_answers_a_repeat_with_the_application_it_lodged(
    db: Db,
) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else {
        return Ok(());
    };
    let citizen = t.ordinary("51", 7)?;
    let report = pb::ReportLossRequest {
        applicant: Some(applicant(&citizen)),
        card_serial: serial(&citizen),
        request_id: String::new(),
    };
    let mut intake = t.intake().await?;
    let first = intake.report_loss(keyed(report.clone(), "loss-at-counter")?).await?.into_inner();
    let lodged = first.application.context("application")?;
    let station = sea_orm::Database::connect(t.suite.database_url(Process::Intake)).await?;
    let forgotten = station
        .execute_raw(sea_orm::Statement::from_string(station.get_database_backend(), "DELETE FROM idempotent_requests"))
        .await?;
    anyhow::ensure!(forgotten.rows_affected() == 1, "the layer had kept the first answer");

    let repeat = intake.report_loss(keyed(report, "loss-at-counter")?).await?;
    anyhow::ensure!(!is_replay(&repeat), "the layer had nothing to replay");
    let again = repeat.into_inner().application.context("application")?;
    anyhow::ensure!(again.application_id == lodged.application_id, "{again:?} vs {lodged:?}");
    let (applications, _) = written(&t, Process::Intake).await.map(|(_, n)| (n, ()))?;
    anyhow::ensure!(applications == 1, "one application, not {applications}");
    station.close().await?;
    t.stop().await
}
