//! The audit trail through the real suite: every bureau's hash chain verifies over the Audit RPC,
//! an entry altered in a bureau's database is reported at that entry, and neither the audit rows
//! nor the logs of any bureau hold a full identity number, a name or a biometric template.
use std::collections::HashSet;

use anyhow::Context;
use base64::Engine;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use yidi_proto::v1::{self as pb, audit_client::AuditClient};
use yidi_runtime::population::Citizen;
use yidi_tests::{Db, NATIONAL_DAY, TestSuite, applicant, live, on_both_databases, serial, start, topology::Process};

on_both_databases!(
    every_bureaus_audit_chain_verifies_and_an_altered_entry_is_reported_at_that_entry,
    neither_audit_rows_nor_logs_hold_a_full_number_a_name_or_a_template,
);

async fn audit(t: &TestSuite, process: Process) -> anyhow::Result<AuditClient<tonic::transport::Channel>> {
    Ok(AuditClient::new(t.channel(process).await?))
}

async fn verify(t: &TestSuite, process: Process) -> anyhow::Result<pb::VerifyAuditChainResponse> {
    Ok(audit(t, process).await?.verify_audit_chain(pb::VerifyAuditChainRequest {}).await?.into_inner())
}

/// The bureau's own database, as its operator (or an intruder) would reach it.
async fn database(t: &TestSuite, process: Process) -> anyhow::Result<DatabaseConnection> {
    Ok(Database::connect(t.suite.database_url(process)).await?)
}

/// A replacement lodged, approved, made, refused once at collection and then collected, plus a
/// refusal by the other home bureau: every bureau has audit entries.
async fn replacement_with_refusals(t: &TestSuite) -> anyhow::Result<()> {
    let citizen = t.citizen("replacement", "36")?;
    let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
    let ready = t.wait_for_state(&application.application_id, pb::ApplicationState::ReadyForCollection).await?;
    let mut intake = t.intake().await?;
    let mut stranger = live(&citizen);
    stranger.face_template = t.ordinary("51", 0)?.face_template;
    let collect = |live| pb::CollectCardRequest {
        application_id: ready.application_id.clone(),
        live: Some(live),
        request_id: String::new(),
    };
    intake.collect_card(collect(stranger)).await.expect_err("a stranger cannot collect the card");
    intake.collect_card(collect(live(&citizen))).await?;

    let impostor = t.citizen("face_mismatch", "51")?;
    let refused = t.submit(pb::ApplicationKind::Replacement, &impostor, serial(&impostor)).await?;
    t.wait_for_state(&refused.application_id, pb::ApplicationState::Refused).await?;
    // The home bureau hears of the collection (K5) in the background: wait for its entry.
    let mut home = audit(t, Process::HomeJiangxi).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let entries = home
            .list_audit_entries(pb::ListAuditEntriesRequest { page_size: 500, ..Default::default() })
            .await?
            .into_inner()
            .entries;
        if entries.iter().any(|e| e.action == "close_application") {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the home bureau never closed the application");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn every_bureaus_audit_chain_verifies_and_an_altered_entry_is_reported_at_that_entry(
    db: Db,
) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    replacement_with_refusals(&t).await?;

    for process in Process::ALL {
        let report = verify(&t, process).await?;
        assert!(report.intact, "{}: {report:?}", process.slug());
        assert!(report.entries_checked > 0, "{}: no entries", process.slug());

        // The newest entry lists first and ends the chain.
        let mut client = audit(&t, process).await?;
        let page = client
            .list_audit_entries(pb::ListAuditEntriesRequest { page_size: 500, ..Default::default() })
            .await?
            .into_inner();
        assert_eq!(page.entries.len() as i64, report.entries_checked, "{}", process.slug());
        assert_eq!(page.entries[0].hash, report.last_hash);
        assert!(page.entries.windows(2).all(|w| w[0].prev_hash == w[1].hash && w[0].seq == w[1].seq + 1));

        // Alter one entry (the middle one) behind the service's back: reported at that entry.
        let target = &page.entries[page.entries.len() / 2];
        let database = database(&t, process).await?;
        let backend = database.get_database_backend();
        let altered = format!("UPDATE audit_log SET outcome = 'approved' || outcome WHERE id = {}", target.id);
        database.execute_raw(Statement::from_string(backend, altered)).await?;
        database.close().await?;
        let report = verify(&t, process).await?;
        assert!(!report.intact, "{}: {report:?}", process.slug());
        assert_eq!(report.first_broken_id, target.id, "{}: {report:?}", process.slug());
        assert_eq!(report.entries_checked, target.seq - 1, "{}: {report:?}", process.slug());
        assert!(report.first_broken_reason.contains("altered"), "{}: {report:?}", process.slug());
    }
    t.stop().await
}

/// What must never be written down: each citizen's full number and name, and their templates
/// (base64, hex, and the start of a `Debug` print of the bytes).
struct Secrets {
    numbers: HashSet<String>,
    texts: Vec<(String, String)>,
}

impl Secrets {
    fn new(all: &[Citizen], used: &[&Citizen]) -> Self {
        let numbers = all.iter().map(|c| c.person.id_number.clone()).collect();
        let mut texts = Vec::new();
        for citizen in used {
            let who = &citizen.person.id_number[14..];
            texts.push((format!("name of …{who}"), citizen.person.name.clone()));
            for (what, template) in [
                ("face template", &citizen.face_template),
                ("fingerprint template", &citizen.fingerprint_template),
                ("live face template", &citizen.live_face_template),
                ("live fingerprint template", &citizen.live_fingerprint_template),
            ] {
                let debug = format!("{:?}", &template[..8]);
                texts.push((format!("{what} of …{who} (base64)"), base64::prelude::BASE64_STANDARD.encode(template)));
                texts.push((format!("{what} of …{who} (hex)"), hex(template)));
                texts.push((format!("{what} of …{who} (Debug)"), debug.trim_end_matches(']').to_owned()));
            }
        }
        Self { numbers, texts }
    }

    /// What `text` discloses: full numbers of the population (any run of 17 digits and a digit or
    /// X that is one), and the names and templates of the citizens used.
    fn found_in(&self, text: &str) -> Vec<String> {
        let bytes = text.as_bytes();
        let mut found: Vec<String> = (0..bytes.len().saturating_sub(17))
            .filter(|&i| i == 0 || !bytes[i - 1].is_ascii_digit())
            .filter_map(|i| text.get(i..i + 18))
            .filter(|candidate| self.numbers.contains(*candidate))
            .map(|number| format!("identity number {number}"))
            .collect();
        found.extend(
            self.texts.iter().filter(|(_, secret)| text.contains(secret.as_str())).map(|(what, _)| what.clone()),
        );
        found
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every audit row of a bureau, as one text per row.
async fn audit_rows(t: &TestSuite, process: Process) -> anyhow::Result<Vec<String>> {
    let database = database(t, process).await?;
    let backend = database.get_database_backend();
    let query = "SELECT id, action, subject, outcome, detail FROM audit_log ORDER BY id";
    let rows = database.query_all_raw(Statement::from_string(backend, query)).await?;
    let mut texts = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("", "id")?;
        let fields: Vec<String> = ["action", "subject", "outcome", "detail"]
            .iter()
            .map(|column| row.try_get::<String>("", column))
            .collect::<Result<_, _>>()?;
        texts.push(format!("{id}: {}", fields.join(" | ")));
    }
    database.close().await?;
    Ok(texts)
}

async fn neither_audit_rows_nor_logs_hold_a_full_number_a_name_or_a_template(db: Db) -> anyhow::Result<()> {
    let Some(t) = start(db, NATIONAL_DAY, |_| {}).await? else { return Ok(()) };
    let mut intake = t.intake().await?;
    let mut registry = t.registry().await?;
    let mut used = Vec::new();

    // A full replacement with a refusal at collection, and a refusal by the other home bureau.
    replacement_with_refusals(&t).await?;
    used.extend([t.citizen("replacement", "36")?, t.citizen("face_mismatch", "51")?, t.ordinary("51", 0)?]);

    // Refusals by the home bureaus, each with its reason.
    for (scenario, province) in [
        ("fingerprint_mismatch", "51"),
        ("bad_credit", "36"),
        ("deceased", "51"),
        ("first_application", "36"),
        ("unknown_citizen", "36"),
    ] {
        let citizen = t.citizen(scenario, province)?;
        let application = t.submit(pb::ApplicationKind::Replacement, &citizen, serial(&citizen)).await?;
        t.wait_for_state(&application.application_id, pb::ApplicationState::Refused).await?;
        used.push(citizen);
    }

    // Refusals at the counter: an agent (whose own number is sent too), a document not accepted.
    let citizen = t.citizen("agent_not_allowed", "36")?;
    let agent = t.ordinary("36", 7)?;
    let mut by_agent = applicant(&citizen);
    by_agent.agent_id_number = agent.person.id_number.clone();
    t.report_loss_as(by_agent, serial(&citizen)).await.expect_err("agents are refused");
    used.extend([citizen, agent]);

    // A loss report, a refused and a granted withdrawal, register upkeep by the home bureau.
    let citizen = t.citizen("loss_report", "51")?;
    t.report_loss(&citizen).await?;
    used.push(citizen);
    let citizen = t.citizen("withdrawal", "36")?;
    let stranger = t.ordinary("36", 1)?;
    let mut wrong_finger = applicant(&citizen);
    if let Some(live) = wrong_finger.live.as_mut() {
        live.fingerprint_template = stranger.fingerprint_template.clone();
    }
    let withdraw = |applicant| pb::WithdrawLossReportRequest {
        applicant: Some(applicant),
        card_serial: serial(&citizen),
        request_id: String::new(),
    };
    intake.withdraw_loss_report(withdraw(wrong_finger)).await.expect_err("someone else's finger");
    intake.withdraw_loss_report(withdraw(applicant(&citizen))).await?;
    used.extend([citizen, stranger]);
    let mut home = t.home(Process::HomeSichuan).await?;
    let deceased = t.ordinary("51", 5)?;
    home.record_death(pb::RecordDeathRequest {
        id_number: deceased.person.id_number.clone(),
        date_of_death: "2118-02-01".into(),
        request_id: String::new(),
    })
    .await?;
    let indebted = t.ordinary("51", 6)?;
    t.record_bad_credit(Process::HomeSichuan, &indebted).await?;
    used.extend([deceased, indebted]);

    // A relying party naming a card that is not the holder's: a miss, not an answer.
    let other = t.ordinary("36", 2)?;
    let _ = registry
        .check_card(pb::CheckCardRequest {
            id_number: other.person.id_number.clone(),
            card_serial: serial(&used[0]),
            relying_party: "test-bank".into(),
            nonce: Vec::new(),
        })
        .await;
    used.push(other);

    let used: Vec<&Citizen> = used.iter().collect();
    let secrets = Secrets::new(&t.suite.population.citizens, &used);
    // The grep finds what it looks for.
    let planted = format!("lodged by {} ({})", used[0].person.id_number, used[0].person.name);
    assert_eq!(secrets.found_in(&planted).len(), 2, "{:?}", secrets.found_in(&planted));
    // (A template may be found under more than one label: a live template is often the enrolled one.)
    let planted = format!("face {}", base64::prelude::BASE64_STANDARD.encode(&used[1].live_face_template));
    assert!(secrets.found_in(&planted).iter().any(|what| what.starts_with("live face template")), "{planted}");
    let planted = format!("Applicant {{ face_template: {:?} }}", used[2].face_template);
    assert!(secrets.found_in(&planted).iter().any(|what| what.ends_with("(Debug)")), "{planted}");
    let planted = format!("fingerprint {}", hex(&used[3].fingerprint_template));
    assert!(secrets.found_in(&planted).iter().any(|what| what.ends_with("(hex)")), "{planted}");
    assert!(secrets.found_in(&format!("{}-not-a-number", &used[0].person.id_number[..17])).is_empty());

    let mut disclosed = Vec::new();
    let mut rows_read = 0;
    for process in Process::ALL {
        for row in audit_rows(&t, process).await? {
            rows_read += 1;
            for secret in secrets.found_in(&row) {
                disclosed.push(format!("{} audit row {row}: {secret}", process.slug()));
            }
        }
        let log = std::fs::read_to_string(t.suite.log_path(process))
            .with_context(|| format!("reading {}'s log", process.slug()))?;
        anyhow::ensure!(!log.is_empty(), "{} logged nothing", process.slug());
        for (n, line) in log.lines().enumerate() {
            for secret in secrets.found_in(line) {
                disclosed.push(format!("{} log line {}: {secret}: {line}", process.slug(), n + 1));
            }
        }
    }
    assert!(rows_read > 20, "the flows wrote audit rows: {rows_read}");
    assert!(disclosed.is_empty(), "disclosed:\n{}", disclosed.join("\n"));
    t.stop().await
}
