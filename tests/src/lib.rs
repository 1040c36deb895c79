//! Test harness: starts the whole suite (real binaries, separate processes, free loopback ports)
//! on SQLite or on fresh PostgreSQL databases, and offers clients and helpers.
//!
//! PostgreSQL: `YIDI_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`), where
//! each suite creates its own databases and drops them. When it is unreachable the PostgreSQL
//! variant of each test is skipped with a message, unless `YIDI_REQUIRE_POSTGRES=1` (set by
//! `.ci/run`), which makes it fail. The convention is `yidi_testkit`'s.
#![forbid(unsafe_code)]

pub mod raw;
pub mod reconcile;
pub mod walks;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use tonic::transport::Channel;
use tonic_types::StatusExt;
use yidi_runtime::population::Citizen;

use yidi_demo::{
    suite::{Backend, ClockSetting, Suite, SuiteOptions, default_bin_dir},
    topology::{Process, operator_id},
};
use yidi_domain::{ApplicationKind, CardData, Decision, DecisionPurpose, OperatorAccess, card::term_for};
use yidi_proto::v1::{
    self as pb, intake_client::IntakeClient, issuance_client::IssuanceClient, loss_registry_client::LossRegistryClient,
    verification_client::VerificationClient,
};

pub use yidi_demo::topology;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Runs a scenario `async fn(Db) -> anyhow::Result<()>` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() -> anyhow::Result<()> {
                    super::$scenario($crate::Db::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() -> anyhow::Result<()> {
                    super::$scenario($crate::Db::Postgres).await
                }
            }
        )*
    };
}

/// 09:00 UTC on a date.
pub fn at(date: &str) -> DateTime<Utc> {
    let day = NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap_or_default();
    day.and_time(NaiveTime::from_hms_opt(9, 0, 0).unwrap_or_default()).and_utc()
}

/// The national phase: every province is accepted at the Zhejiang station.
pub const NATIONAL_DAY: &str = "2118-03-01";

pub struct TestSuite {
    pub suite: Suite,
    pub today: NaiveDate,
    _dir: tempfile::TempDir,
}

/// Starts the suite standing on `date`; `configure` may adjust the options. `Ok(None)`: the
/// PostgreSQL variant is skipped because no server is reachable (and none is required).
pub async fn start(db: Db, date: &str, configure: impl FnOnce(&mut SuiteOptions)) -> anyhow::Result<Option<TestSuite>> {
    let dir = tempfile::Builder::new().prefix("yidi-suite-").tempdir()?;
    let now = at(date);
    let mut options = SuiteOptions::new(dir.path().to_path_buf(), default_bin_dir()?, now);
    options.clock = ClockSetting::Start(now);
    if db == Db::Postgres {
        let Some(url) = yidi_testkit::postgres_server_for_tests().await.map_err(anyhow::Error::msg)? else {
            return Ok(None);
        };
        options.backend = Backend::Postgres { admin_url: url };
    }
    configure(&mut options);
    let suite = Suite::start(options).await?;
    Ok(Some(TestSuite { suite, today: yidi_runtime::Clock::fixed(now).today(), _dir: dir }))
}

/// As [`start`], with mutual TLS on every port (a fresh CA and certificates in the suite folder).
pub async fn start_tls(
    db: Db,
    date: &str,
    configure: impl FnOnce(&mut SuiteOptions),
) -> anyhow::Result<Option<TestSuite>> {
    start(db, date, |options| {
        options.tls = true;
        configure(options);
    })
    .await
}

impl TestSuite {
    /// A channel to `process`; on a TLS suite as that bureau's admin operator (`op-<bureau>-admin`).
    pub async fn channel(&self, process: Process) -> anyhow::Result<Channel> {
        self.channel_as(process, &operator_id(process.bureau_id(), OperatorAccess::Admin)).await
    }

    /// A channel to `process` calling as `principal` (any principal id with a certificate in the
    /// suite's `certs` folder); on a plaintext suite the principal is ignored.
    pub async fn channel_as(&self, process: Process, principal: &str) -> anyhow::Result<Channel> {
        self.suite.channel_as(process, principal).await
    }

    pub async fn intake(&self) -> anyhow::Result<IntakeClient<Channel>> {
        Ok(IntakeClient::new(self.channel(Process::Intake).await?))
    }

    pub async fn registry(&self) -> anyhow::Result<LossRegistryClient<Channel>> {
        Ok(LossRegistryClient::new(self.channel(Process::Registry).await?))
    }

    pub async fn issuance(&self) -> anyhow::Result<IssuanceClient<Channel>> {
        Ok(IssuanceClient::new(self.channel(Process::Issuance).await?))
    }

    pub async fn home(&self, process: Process) -> anyhow::Result<VerificationClient<Channel>> {
        Ok(VerificationClient::new(self.channel(process).await?))
    }

    /// A decision as `citizen`'s home bureau would make it (naming the suite's key of that bureau),
    /// for tests that sign it themselves: forged, replayed, rotated-key decisions.
    pub fn decision(
        &self,
        citizen: &Citizen,
        purpose: DecisionPurpose,
        addressee: &str,
        issued_at: DateTime<Utc>,
    ) -> Decision {
        let term = term_for(citizen.person.birth_date, self.today);
        let Citizen { person, face_template, .. } = citizen.clone();
        Decision {
            decision_id: uuid::Uuid::new_v4().to_string(),
            purpose,
            bureau_id: citizen.home_bureau_id.clone(),
            key_id: self.suite.keys.of(&citizen.home_bureau_id).last().map(|k| k.id.clone()).unwrap_or_default(),
            addressee_id: addressee.into(),
            application_id: uuid::Uuid::new_v4().to_string(),
            station_id: topology::STATION.into(),
            application_kind: (purpose == DecisionPurpose::IssueCard).then_some(ApplicationKind::Replacement),
            card: CardData {
                holder: person,
                face_template,
                valid_from: term.valid_from,
                valid_until: term.valid_until,
            },
            previous_card_serial: serial(citizen),
            issued_at,
            expires_at: issued_at + chrono::Duration::days(7),
            transfer_to_bureau_id: String::new(),
        }
    }

    /// The first citizen of `province` ("36" Jiangxi, "51" Sichuan) labelled `scenario`.
    pub fn citizen(&self, scenario: &str, province: &str) -> anyhow::Result<Citizen> {
        self.suite
            .population
            .citizens
            .iter()
            .find(|c| c.scenario == scenario && c.person.registration_province == province)
            .cloned()
            .with_context(|| format!("no citizen {scenario} in {province}"))
    }

    /// The `n`-th ordinary citizen of a province.
    pub fn ordinary(&self, province: &str, n: usize) -> anyhow::Result<Citizen> {
        self.suite
            .population
            .citizens
            .iter()
            .filter(|c| c.scenario == "ordinary" && c.person.registration_province == province)
            .nth(n)
            .cloned()
            .with_context(|| format!("no ordinary citizen #{n} in {province}"))
    }

    /// Lodges a replacement or renewal for `citizen`, in person with the household register book.
    pub async fn submit(
        &self,
        kind: pb::ApplicationKind,
        citizen: &Citizen,
        card_serial: String,
    ) -> anyhow::Result<pb::Application> {
        self.intake()
            .await?
            .submit_application(pb::SubmitApplicationRequest {
                kind: kind as i32,
                applicant: Some(applicant(citizen)),
                card_serial,
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .application
            .context("no application in answer")
    }

    /// Reports `citizen`'s card lost at the station, in person with the household register book.
    pub async fn report_loss(&self, citizen: &Citizen) -> anyhow::Result<pb::Application> {
        Ok(self.report_loss_as(applicant(citizen), serial(citizen)).await?)
    }

    /// ReportLoss at the station as `applicant` presents it: the application, or the refusal.
    pub async fn report_loss_as(
        &self,
        applicant: pb::Applicant,
        card_serial: String,
    ) -> Result<pb::Application, tonic::Status> {
        let mut intake = self.intake().await.map_err(|error| tonic::Status::unavailable(error.to_string()))?;
        let request = pb::ReportLossRequest { applicant: Some(applicant), card_serial, request_id: String::new() };
        let answer = intake.report_loss(request).await?.into_inner();
        answer.application.ok_or_else(|| tonic::Status::internal("no application in answer"))
    }

    /// The home bureau records a court order against `citizen` (S3: bad credit).
    pub async fn record_bad_credit(&self, home: Process, citizen: &Citizen) -> anyhow::Result<()> {
        self.home(home)
            .await?
            .record_credit_status(pb::RecordCreditStatusRequest {
                id_number: citizen.person.id_number.clone(),
                credit_status: pb::CreditStatus::Bad as i32,
                note: "court order".into(),
                request_id: String::new(),
            })
            .await?;
        Ok(())
    }

    /// Polls the application until `done` holds; fails with the bureaus' logs after `timeout`.
    pub async fn wait_for(
        &self,
        application_id: &str,
        what: &str,
        done: impl Fn(&pb::Application) -> bool,
    ) -> anyhow::Result<pb::Application> {
        let mut intake = self.intake().await?;
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let application = intake
                .get_application(pb::GetApplicationRequest { application_id: application_id.to_owned() })
                .await?
                .into_inner()
                .application
                .context("no application in answer")?;
            if done(&application) {
                return Ok(application);
            }
            if Instant::now() > deadline {
                bail!("application never reached {what}: {application:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_for_state(
        &self,
        application_id: &str,
        state: pb::ApplicationState,
    ) -> anyhow::Result<pb::Application> {
        self.wait_for(application_id, state.as_str_name(), |a| a.state == state as i32).await
    }

    /// Every bureau's recent log lines, for failure messages.
    pub fn logs(&self) -> String {
        Process::ALL
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.slug(), self.suite.log_tail(*p)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.suite.stop().await
    }
}

/// The person at the counter, showing the household register book.
pub fn applicant(citizen: &Citizen) -> pb::Applicant {
    applicant_with(citizen, pb::DocumentKind::HouseholdRegisterBook)
}

pub fn applicant_with(citizen: &Citizen, document: pb::DocumentKind) -> pb::Applicant {
    pb::Applicant {
        id_number: citizen.person.id_number.clone(),
        declared_province: citizen.person.registration_province.clone(),
        live: Some(live(citizen)),
        document: Some(pb::Document {
            kind: document as i32,
            number: format!("DOC-{}", &citizen.person.id_number[14..]),
        }),
        agent_id_number: String::new(),
    }
}

/// What the person at the counter presents (the population's live templates).
pub fn live(citizen: &Citizen) -> pb::Biometrics {
    pb::Biometrics {
        face_template: citizen.live_face_template.clone(),
        fingerprint_template: citizen.live_fingerprint_template.clone(),
    }
}

pub fn serial(citizen: &Citizen) -> String {
    citizen.card.as_ref().map(|c| c.serial.clone()).unwrap_or_default()
}

/// `relying_party`'s check of the card `card_serial` for `citizen`.
pub fn card_check(citizen: &Citizen, card_serial: String, relying_party: &str) -> pb::CheckCardRequest {
    pb::CheckCardRequest {
        id_number: citizen.person.id_number.clone(),
        card_serial,
        relying_party: relying_party.into(),
        nonce: Vec::new(),
    }
}

/// The `ErrorInfo.reason` of a status (e.g. `REFUSAL_REASON_FACE_MISMATCH`).
pub fn reason(status: &tonic::Status) -> String {
    status.get_details_error_info().map(|info| info.reason).unwrap_or_default()
}

/// The fields named by a status's `BadRequest` violations.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
