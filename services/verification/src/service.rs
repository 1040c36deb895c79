//! The rules of the home bureau (no tonic types): takes validated domain values.
use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use yidi_audit::AuditEntry;
use yidi_domain::{
    ApplicationKind, ApplicationState, BiometricMatcher, CardData, Decision, DecisionPurpose, Directory, IdNumber,
    RefusalReason, Role, SignedDecision, card, mask,
};
use yidi_domain::{Credit, Registration};
use yidi_grpc::ApiError;
use yidi_runtime::{
    Clock,
    directory::DirectoryHandle,
    signing::{ActiveKey, KeyRing},
};

use crate::repo::{Citizen, NewVerification, Repo, Tx, Verification, is_unique_violation};

/// A Verify request, validated.
#[derive(Debug, Clone)]
pub struct VerifyInput {
    pub application_id: String,
    pub station_id: String,
    pub purpose: DecisionPurpose,
    /// Some for ISSUE_CARD (replacement/renewal) and REPORT_LOSS (loss report); None for withdrawal.
    pub kind: Option<ApplicationKind>,
    pub id_number: IdNumber,
    pub card_serial: String,
    /// Empty for a withdrawal (not matched).
    pub live_face: Vec<u8>,
    pub live_fingerprint: Vec<u8>,
    /// The producer for ISSUE_CARD; empty otherwise.
    pub producer_id: String,
    /// N3: the registration province declared at the counter, by which the station routed the request.
    pub declared_province: String,
}

/// What Verify answers: a refusal, or the signed decisions.
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    Refused(RefusalReason),
    Approved { decision: &'a SignedDecision, loss_decision: Option<&'a SignedDecision> },
}

/// Encodes an answer as it is stored and replayed; the wire format is the gRPC face's
/// (`grpc::encode_answer`).
pub type EncodeAnswer = fn(Answer<'_>) -> Vec<u8>;

/// The answer to Verify, encoded, as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyAnswer {
    pub response: Vec<u8>,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CitizenView {
    pub id_number_masked: String,
    pub name_masked: String,
    pub registration_province: String,
    pub registration: Registration,
    pub credit: Credit,
    pub current_card_serial: Option<String>,
    pub current_card_valid_until: Option<NaiveDate>,
    pub open_application_ids: Vec<String>,
}

/// What the registry answered to a registration transfer (S4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecorded {
    /// The citizen's cards that follow the new home bureau now.
    pub card_serials: Vec<String>,
    /// The registry had recorded this transfer already.
    pub already_transferred: bool,
}

/// A registration transfer, done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferView {
    pub new_home_bureau_id: String,
    pub card_serials: Vec<String>,
    pub transferred_at: DateTime<Utc>,
    pub decision_id: String,
}

/// Delivers a signed transfer decision to the registry (the gRPC call is `registry::RegistryLink`);
/// an error the registry decided is a FAILED_PRECONDITION, trouble reaching it UNAVAILABLE.
pub trait TransferSink: Send + Sync {
    fn deliver<'a>(
        &'a self,
        registry_id: &'a str,
        decision: &'a SignedDecision,
    ) -> Pin<Box<dyn Future<Output = Result<TransferRecorded, ApiError>> + Send + 'a>>;
}

pub struct Verifier {
    pub(crate) repo: Repo,
    pub(crate) clock: Clock,
    pub(crate) directory: DirectoryHandle,
    pub(crate) bureau_id: String,
    pub(crate) jurisdiction: Vec<String>,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) ttl: Duration,
    pub(crate) matcher: Arc<dyn BiometricMatcher>,
    pub(crate) encode: EncodeAnswer,
    pub(crate) registry: Arc<dyn TransferSink>,
}

/// A station's CloseApplication (K5), validated.
#[derive(Debug, Clone, Copy)]
pub struct Closing<'a> {
    pub application_id: &'a str,
    pub station_id: &'a str,
    pub final_state: ApplicationState,
    /// The card handed over, for a collection.
    pub new_card_serial: Option<&'a str>,
}

/// What the register and the request say, judged by rules 1–7 of the brief; first failure wins.
pub struct Facts<'a> {
    pub citizen: Option<&'a Citizen>,
    pub jurisdiction: &'a [String],
    /// Open ISSUE_CARD applications of the citizen other than this one (K5; K6 for a withdrawal).
    pub other_open_applications: usize,
    /// The six-digit address code of the lodging station (its directory `region`); empty when unknown,
    /// which counts as a different place.
    pub station_region: &'a str,
    pub today: NaiveDate,
}

/// Rules 1–7, in order. `Ok` means approve.
pub fn judge(input: &VerifyInput, facts: &Facts<'_>, matcher: &dyn BiometricMatcher) -> Result<(), RefusalReason> {
    // 1. N3: on this bureau's register, within its jurisdiction.
    let Some(citizen) = facts.citizen else {
        return Err(RefusalReason::UnknownCitizen);
    };
    if !facts.jurisdiction.contains(&citizen.person.registration_province) {
        return Err(RefusalReason::UnknownCitizen);
    }
    // The station routed by, and judged its acceptance policy on, the declared province: the register
    // must confirm it, or the request was routed (and judged) on a false premise.
    if citizen.person.registration_province != input.declared_province {
        return Err(RefusalReason::UnknownCitizen);
    }
    // 2. S3: registration cancelled (deceased).
    if citizen.registration == Registration::Cancelled {
        return Err(RefusalReason::RegistrationCancelled);
    }
    // 3. S2, S3, K6: the person at the counter is the citizen.
    if input.purpose != DecisionPurpose::WithdrawLossReport
        && !matcher.match_face(&input.live_face, &citizen.face_template).matched
    {
        return Err(RefusalReason::FaceMismatch);
    }
    if !matcher.match_fingerprint(&input.live_fingerprint, &citizen.fingerprint_template).matched {
        return Err(RefusalReason::FingerprintMismatch);
    }
    // Rules 4 and 5 are refusals "in a different place" (S3, K4): outside the registration province.
    let different_place = !facts.station_region.starts_with(&citizen.person.registration_province);
    // 4. S3: credit record.
    if different_place && citizen.credit == Credit::Bad {
        return Err(RefusalReason::BadCreditRecord);
    }
    // 5. K4: a first application is never accepted in a different place.
    if different_place && citizen.current_card_serial.is_none() {
        return Err(RefusalReason::FirstApplication);
    }
    // 6. The card named, if any, is the current one (a citizen rarely knows a lost card's serial). A
    // loss report or withdrawal concerns the current card, so a citizen without one has nothing to
    // report or find.
    match citizen.current_card_serial.as_deref() {
        Some(current) if !input.card_serial.is_empty() && current != input.card_serial => {
            return Err(RefusalReason::CardNotCurrent);
        }
        None if !input.card_serial.is_empty() || input.purpose != DecisionPurpose::IssueCard => {
            return Err(RefusalReason::CardNotCurrent);
        }
        _ => {}
    }
    // 7. K6: a withdrawal while a new card is on its way would be undone by that card's registration.
    if input.purpose == DecisionPurpose::WithdrawLossReport && facts.other_open_applications > 0 {
        return Err(RefusalReason::NewCardPending);
    }
    // 7. K5 and K2.
    if input.purpose == DecisionPurpose::IssueCard {
        if facts.other_open_applications > 0 {
            return Err(RefusalReason::ApplicationAlreadyOpen);
        }
        if input.kind == Some(ApplicationKind::Renewal)
            && !card::renewable(citizen.current_card_valid_until, facts.today)
        {
            return Err(RefusalReason::NotYetRenewable);
        }
    }
    Ok(())
}

/// A repeat of (application, purpose) gets the stored answer only when it is the same request:
/// same station, same citizen, same kind. Anything else is a reused id, refused without the stored
/// body (it holds signed decisions with the citizen's full personal data, and the live biometrics of
/// the repeat are never checked).
fn replay(row: Verification, input: &VerifyInput) -> Result<VerifyAnswer, ApiError> {
    let same =
        row.station_id == input.station_id && row.id_number == input.id_number.as_str() && row.kind == input.kind;
    if !same {
        tracing::warn!(
            application_id = %input.application_id,
            station_id = %input.station_id,
            purpose = input.purpose.as_str(),
            "verify refused: application id reused for a different request"
        );
        return Err(ApiError::precondition(
            "APPLICATION_ID_REUSED",
            format!(
                "application {} was already verified for {} with a different station, citizen or kind",
                input.application_id,
                input.purpose.as_str()
            ),
        ));
    }
    Ok(VerifyAnswer { response: row.response, replayed: true })
}

/// The verification row of `input` as a refusal leaves it: neither decision nor term, not open.
fn verification_of(input: &VerifyInput, response: Vec<u8>, created_at: DateTime<Utc>) -> NewVerification {
    NewVerification {
        application_id: input.application_id.clone(),
        purpose: input.purpose,
        station_id: input.station_id.clone(),
        id_number: input.id_number.as_str().to_owned(),
        kind: input.kind,
        refusal_reason: None,
        decision_id: None,
        loss_decision_id: None,
        response,
        valid_from: None,
        valid_until: None,
        open: false,
        created_at,
    }
}

/// The card data of a decision about `citizen`, as the register holds them.
fn card_data(citizen: &Citizen, valid_from: NaiveDate, valid_until: Option<NaiveDate>) -> CardData {
    CardData { holder: citizen.person.clone(), face_template: citizen.face_template.clone(), valid_from, valid_until }
}

fn truncate_to_seconds(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at)
}

impl Verifier {
    /// The directory in force.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.current()
    }

    /// S4: the newest key the directory lists for this bureau as valid at `issued_at` (rotation).
    fn signing_key(&self, directory: &Directory, issued_at: DateTime<Utc>) -> Result<ActiveKey, ApiError> {
        self.keys.select(directory, issued_at).ok_or_else(|| {
            tracing::error!(held = ?self.keys.held_ids(), "no signing key is valid now: decisions cannot be signed");
            ApiError::precondition(
                "NO_SIGNING_KEY",
                format!("{} holds no signing key the directory lists as valid now", self.bureau_id),
            )
        })
    }

    pub fn today(&self) -> NaiveDate {
        self.clock.today()
    }

    /// The national registry the loss decisions are addressed to.
    fn registry_id(&self) -> Result<String, ApiError> {
        let directory = self.directory.current();
        let mut registries: Vec<&str> = directory.with_role(Role::Registry).map(|b| b.id.as_str()).collect();
        registries.sort_unstable();
        registries
            .first()
            .map(|id| (*id).to_owned())
            .ok_or_else(|| ApiError::precondition("NO_REGISTRY", "the directory lists no registry bureau"))
    }

    pub async fn verify(&self, input: VerifyInput) -> Result<VerifyAnswer, ApiError> {
        let answer = self.verify_with_replay(&input).await;
        if let Err(error @ ApiError::FailedPrecondition { .. }) = &answer {
            let detail = format!(
                "application {} purpose {} station {}: {error}",
                input.application_id,
                input.purpose.as_str(),
                input.station_id
            );
            self.audit_refusal("verify", input.id_number.masked(), error, detail).await?;
        }
        answer
    }

    /// Writes the audit row of a request refused before anything changed (its transaction, if
    /// any, rolled back).
    async fn audit_refusal(
        &self,
        action: &'static str,
        subject: String,
        error: &ApiError,
        detail: String,
    ) -> Result<(), ApiError> {
        let entry = AuditEntry::new(action, subject, format!("refused:{}", error.reason()), detail);
        Ok(self.repo.audit(self.clock.now(), entry).await?)
    }

    async fn verify_with_replay(&self, input: &VerifyInput) -> Result<VerifyAnswer, ApiError> {
        match self.verify_once(input).await {
            Err(ApiError::Database(error)) if is_unique_violation(&error) => {
                // A concurrent call with the same (application, purpose) won: answer as it did.
                match self.repo.verification(&input.application_id, input.purpose).await? {
                    Some(row) => replay(row, input),
                    None => Err(ApiError::Database(error)),
                }
            }
            other => other,
        }
    }

    async fn verify_once(&self, input: &VerifyInput) -> Result<VerifyAnswer, ApiError> {
        let registry_id =
            if input.purpose == DecisionPurpose::IssueCard && input.kind != Some(ApplicationKind::Replacement) {
                None
            } else {
                Some(self.registry_id()?)
            };
        let tx = self.repo.begin().await?;
        if let Some(row) = tx.verification(&input.application_id, input.purpose).await? {
            return replay(row, input);
        }
        let now = self.clock.now();
        let today = self.clock.date_of(now);
        let citizen = tx.citizen_for_update(input.id_number.as_str()).await?;
        let other_open_applications = if input.purpose != DecisionPurpose::ReportLoss {
            tx.open_application_ids(input.id_number.as_str())
                .await?
                .into_iter()
                .filter(|id| *id != input.application_id)
                .count()
        } else {
            0
        };
        // The station was checked against the directory at validation; unknown counts as a different place.
        let directory = self.directory.current();
        let station_region = directory
            .get_with_role(&input.station_id, Role::Intake)
            .map(|station| station.region.as_str())
            .unwrap_or_default();
        let facts = Facts {
            citizen: citizen.as_ref(),
            jurisdiction: &self.jurisdiction,
            other_open_applications,
            station_region,
            today,
        };
        let masked = input.id_number.masked();
        let verdict = judge(input, &facts, self.matcher.as_ref());
        let (citizen, registry_id) = match (verdict, citizen.as_ref(), registry_id) {
            (Ok(()), Some(citizen), registry_id) => (citizen, registry_id),
            (Err(reason), _, _) => return self.refuse(tx, input, reason, &masked, now).await,
            // judge() never approves an unknown citizen; refuse rather than panic.
            (Ok(()), None, _) => return self.refuse(tx, input, RefusalReason::UnknownCitizen, &masked, now).await,
        };
        self.approve(tx, input, citizen, registry_id, &masked, now).await
    }

    async fn refuse(
        &self,
        tx: Tx,
        input: &VerifyInput,
        reason: RefusalReason,
        masked: &str,
        now: DateTime<Utc>,
    ) -> Result<VerifyAnswer, ApiError> {
        let response = (self.encode)(Answer::Refused(reason));
        tx.insert_verification(NewVerification {
            refusal_reason: Some(reason.code()),
            ..verification_of(input, response.clone(), now)
        })
        .await?;
        let detail = format!(
            "application {} purpose {} station {}: {}",
            input.application_id,
            input.purpose.as_str(),
            input.station_id,
            reason
        );
        tx.audit(now, AuditEntry::new("verify", masked, reason.code(), &detail)).await?;
        tx.commit().await?;
        tracing::info!(id_number = masked, application_id = %input.application_id, reason = reason.code(), "verification refused");
        Ok(VerifyAnswer { response, replayed: false })
    }

    /// A decision to be signed by `key`; `input` is the station's request it answers (None for an
    /// operator's, such as a transfer).
    #[allow(clippy::too_many_arguments)]
    fn decision(
        &self,
        input: Option<&VerifyInput>,
        purpose: DecisionPurpose,
        addressee_id: &str,
        card: CardData,
        current_card_serial: &str,
        issued_at: DateTime<Utc>,
        key: &ActiveKey,
    ) -> Decision {
        Decision {
            decision_id: uuid::Uuid::new_v4().to_string(),
            purpose,
            bureau_id: self.bureau_id.clone(),
            key_id: key.id.clone(),
            addressee_id: addressee_id.to_owned(),
            application_id: input.map(|i| i.application_id.clone()).unwrap_or_default(),
            station_id: input.map(|i| i.station_id.clone()).unwrap_or_default(),
            application_kind: input.and_then(|i| i.kind),
            card,
            previous_card_serial: current_card_serial.to_owned(),
            issued_at,
            expires_at: issued_at + self.ttl,
            transfer_to_bureau_id: String::new(),
        }
    }

    async fn approve(
        &self,
        tx: Tx,
        input: &VerifyInput,
        citizen: &Citizen,
        registry_id: Option<String>,
        masked: &str,
        now: DateTime<Utc>,
    ) -> Result<VerifyAnswer, ApiError> {
        let issued_at = truncate_to_seconds(now);
        let today = self.clock.date_of(now);
        // Chosen for the instant the decisions carry, which the key must cover.
        let key = self.signing_key(&self.directory.current(), issued_at)?;
        // judge() approved, so the citizen holds a card and any serial named is this one.
        let current = citizen.current_card_serial.clone().unwrap_or_else(|| input.card_serial.clone());
        let card_data = |valid_from, valid_until| card_data(citizen, valid_from, valid_until);
        let registry = |registry_id: &Option<String>| {
            registry_id.clone().ok_or_else(|| ApiError::Internal("registry addressee missing".into()))
        };
        let (decision, loss_decision, term) = match input.purpose {
            DecisionPurpose::IssueCard => {
                // C1: the term of the new card, by age on the day of issue.
                let term = card::term_for(citizen.person.birth_date, today);
                let data = card_data(term.valid_from, term.valid_until);
                let decision = self
                    .decision(
                        Some(input),
                        DecisionPurpose::IssueCard,
                        &input.producer_id,
                        data.clone(),
                        &current,
                        issued_at,
                        &key,
                    )
                    .sign(&key.key);
                // K1: a replacement files the loss report too (if there is a card to lose: a first
                // card, accepted only at home, has none).
                let loss = if input.kind == Some(ApplicationKind::Replacement) && citizen.current_card_serial.is_some()
                {
                    Some(
                        self.decision(
                            Some(input),
                            DecisionPurpose::ReportLoss,
                            &registry(&registry_id)?,
                            data,
                            &current,
                            issued_at,
                            &key,
                        )
                        .sign(&key.key),
                    )
                } else {
                    None
                };
                (decision, loss, Some(term))
            }
            purpose => {
                // The card concerned is the current one.
                let valid_from = citizen.current_card_valid_from.unwrap_or(today);
                let data = card_data(valid_from, citizen.current_card_valid_until);
                let registry_id = registry(&registry_id)?;
                let decision =
                    self.decision(Some(input), purpose, &registry_id, data, &current, issued_at, &key).sign(&key.key);
                (decision, None, None)
            }
        };
        let response = (self.encode)(Answer::Approved { decision: &decision, loss_decision: loss_decision.as_ref() });
        let decision_id = decision.decision.decision_id.clone();
        let loss_decision_id = loss_decision.as_ref().map(|d| d.decision.decision_id.clone());
        tx.insert_verification(NewVerification {
            decision_id: Some(decision_id.clone()),
            loss_decision_id: loss_decision_id.clone(),
            valid_from: term.map(|t| t.valid_from),
            valid_until: term.and_then(|t| t.valid_until),
            open: input.purpose == DecisionPurpose::IssueCard,
            ..verification_of(input, response.clone(), now)
        })
        .await?;
        let detail = format!(
            "application {} purpose {} station {} addressee {} decision {}{}",
            input.application_id,
            input.purpose.as_str(),
            input.station_id,
            decision.decision.addressee_id,
            decision_id,
            loss_decision_id.map(|id| format!(" loss decision {id}")).unwrap_or_default()
        );
        tx.audit(now, AuditEntry::new("verify", masked, "APPROVED", &detail)).await?;
        tx.commit().await?;
        tracing::info!(id_number = masked, application_id = %input.application_id, purpose = input.purpose.as_str(), "verification approved");
        Ok(VerifyAnswer { response, replayed: false })
    }

    pub async fn get_citizen(&self, id_number: &IdNumber) -> Result<CitizenView, ApiError> {
        let citizen = self
            .repo
            .citizen(id_number.as_str())
            .await?
            .ok_or_else(|| ApiError::not_found("citizen", id_number.masked()))?;
        let open_application_ids = self.repo.open_application_ids(id_number.as_str()).await?;
        Ok(CitizenView {
            id_number_masked: id_number.masked(),
            name_masked: mask::mask_name(&citizen.person.name),
            registration_province: citizen.person.registration_province,
            registration: citizen.registration,
            credit: citizen.credit,
            current_card_serial: citizen.current_card_serial,
            current_card_valid_until: citizen.current_card_valid_until,
            open_application_ids,
        })
    }

    /// Cancels the registration of a deceased citizen (idempotent).
    pub async fn record_death(
        &self,
        id_number: &IdNumber,
        date_of_death: NaiveDate,
    ) -> Result<DateTime<Utc>, ApiError> {
        let now = self.clock.now();
        let masked = id_number.masked();
        let tx = self.repo.begin().await?;
        let citizen = tx
            .citizen_for_update(id_number.as_str())
            .await?
            .ok_or_else(|| ApiError::not_found("citizen", masked.clone()))?;
        if date_of_death < citizen.person.birth_date {
            return Err(yidi_grpc::FieldViolations::single("date_of_death", "must not be before the birth date"));
        }
        let changed = tx.cancel_registration(id_number.as_str(), date_of_death, now).await?;
        let outcome = if changed { "CANCELLED" } else { "ALREADY_CANCELLED" };
        let detail = format!("date of death {date_of_death}");
        tx.audit(now, AuditEntry::new("record_death", masked.as_str(), outcome, detail)).await?;
        tx.commit().await?;
        tracing::info!(id_number = %masked, outcome, "death recorded");
        Ok(now)
    }

    pub async fn record_credit_status(
        &self,
        id_number: &IdNumber,
        credit: Credit,
        note: &str,
    ) -> Result<DateTime<Utc>, ApiError> {
        let now = self.clock.now();
        let masked = id_number.masked();
        let tx = self.repo.begin().await?;
        if tx.citizen_for_update(id_number.as_str()).await?.is_none() {
            return Err(ApiError::not_found("citizen", masked));
        }
        tx.set_credit(id_number.as_str(), credit, now).await?;
        let outcome = match credit {
            Credit::Good => "GOOD",
            Credit::Bad => "BAD",
        };
        tx.audit(now, AuditEntry::new("record_credit_status", masked.as_str(), outcome, note)).await?;
        tx.commit().await?;
        tracing::info!(id_number = %masked, outcome, "credit status recorded");
        Ok(now)
    }

    /// S4: the citizen's household registration moved to `new_province`, in another home bureau's
    /// jurisdiction. A transfer decision naming that bureau is signed and delivered to the registry
    /// (which from then on follows the new bureau's decisions for the citizen's cards); once the
    /// registry has recorded it, the citizen's register entry names the new province, so this
    /// bureau no longer serves the citizen (N3: UNKNOWN_CITIZEN). Refused while an application of
    /// the citizen is open (K5), which would be left with a bureau that no longer decides for them.
    pub async fn transfer_registration(
        &self,
        id_number: &IdNumber,
        new_province: &str,
    ) -> Result<TransferView, ApiError> {
        let transferred = self.transfer_once(id_number, new_province).await;
        if let Err(error @ ApiError::FailedPrecondition { .. }) = &transferred {
            let detail = format!("to province {new_province}: {error}");
            self.audit_refusal("transfer_registration", id_number.masked(), error, detail).await?;
        }
        transferred
    }

    async fn transfer_once(&self, id_number: &IdNumber, new_province: &str) -> Result<TransferView, ApiError> {
        let now = self.clock.now();
        let issued_at = truncate_to_seconds(now);
        let masked = id_number.masked();
        let directory = self.directory.current();
        let new_bureau = directory.home_bureau_for(new_province).map(|b| b.id.clone()).ok_or_else(|| {
            ApiError::precondition(
                "NO_HOME_BUREAU",
                format!("no home bureau of the directory holds province {new_province}"),
            )
        })?;
        if new_bureau == self.bureau_id {
            return Err(ApiError::precondition(
                "SAME_HOME_BUREAU",
                format!("province {new_province} is within this bureau's own jurisdiction"),
            ));
        }
        let registry_id = self.registry_id()?;
        let tx = self.repo.begin().await?;
        let citizen = tx
            .citizen_for_update(id_number.as_str())
            .await?
            .filter(|c| self.jurisdiction.contains(&c.person.registration_province))
            .ok_or_else(|| ApiError::not_found("citizen", masked.clone()))?;
        if citizen.registration == Registration::Cancelled {
            return Err(ApiError::precondition("REGISTRATION_CANCELLED", "the citizen's registration is cancelled"));
        }
        let open = tx.open_application_ids(id_number.as_str()).await?;
        if !open.is_empty() {
            return Err(ApiError::precondition(
                "APPLICATION_OPEN",
                format!("application {} of the citizen is open; it must end first (K5)", open.join(", ")),
            ));
        }
        let key = self.signing_key(&directory, issued_at)?;
        let valid_from = citizen.current_card_valid_from.unwrap_or(self.clock.date_of(now));
        let card = card_data(&citizen, valid_from, citizen.current_card_valid_until);
        let current = citizen.current_card_serial.clone().unwrap_or_default();
        let purpose = DecisionPurpose::TransferRegistration;
        let decision = Decision {
            transfer_to_bureau_id: new_bureau.clone(),
            ..self.decision(None, purpose, &registry_id, card, &current, issued_at, &key)
        }
        .sign(&key.key);
        // The registry first: until it has recorded the transfer, the citizen stays on this register
        // (a failure here changes nothing, and a retry with a new decision is answered as the first).
        let recorded = self.registry.deliver(&registry_id, &decision).await?;
        let decision_id = decision.decision.decision_id;
        tx.move_registration(id_number.as_str(), new_province, now).await?;
        let detail = format!(
            "province {} to {new_province}, home bureau {new_bureau}; decision {decision_id}; cards [{}]{}",
            citizen.person.registration_province,
            recorded.card_serials.join(", "),
            if recorded.already_transferred { " (already recorded by the registry)" } else { "" }
        );
        tx.audit(now, AuditEntry::new("transfer_registration", masked.as_str(), "TRANSFERRED", detail)).await?;
        tx.commit().await?;
        tracing::info!(id_number = %masked, to = %new_bureau, "registration transferred");
        Ok(TransferView {
            new_home_bureau_id: new_bureau,
            card_serials: recorded.card_serials,
            transferred_at: now,
            decision_id,
        })
    }

    /// K5: the application ended; for a collection the new card becomes the current one. Only the
    /// station that lodged the application may close it.
    pub async fn close_application(&self, closing: Closing<'_>) -> Result<bool, ApiError> {
        let closed = self.close_once(closing).await;
        if let Err(error @ ApiError::FailedPrecondition { .. }) = &closed {
            let Closing { application_id, station_id, final_state, .. } = closing;
            let detail =
                format!("application {application_id} {} by station {station_id}: {error}", final_state.as_str());
            self.audit_refusal("close_application", application_id.to_owned(), error, detail).await?;
        }
        closed
    }

    async fn close_once(&self, closing: Closing<'_>) -> Result<bool, ApiError> {
        let Closing { application_id, station_id, final_state, new_card_serial } = closing;
        let now = self.clock.now();
        let tx = self.repo.begin().await?;
        let row = tx
            .verification(application_id, DecisionPurpose::IssueCard)
            .await?
            .ok_or_else(|| ApiError::not_found("application", application_id))?;
        if row.station_id != station_id {
            tracing::warn!(application_id, station_id, "close refused: not the lodging station");
            return Err(ApiError::precondition(
                "NOT_THE_LODGING_STATION",
                format!("application {application_id} was not lodged at station {station_id}"),
            ));
        }
        // Lock the citizen's row (PostgreSQL) before changing anything of theirs.
        tx.citizen_for_update(&row.id_number).await?;
        let state = final_state.as_str();
        if let Some(closed) = row.closed_state {
            return if closed == final_state {
                Ok(true)
            } else {
                Err(ApiError::precondition(
                    "APPLICATION_ALREADY_CLOSED",
                    format!("application {application_id} was already closed as {}", closed.as_str()),
                ))
            };
        }
        if final_state == ApplicationState::Collected && row.refusal_reason.is_some() {
            return Err(ApiError::precondition(
                "APPLICATION_REFUSED",
                format!("application {application_id} was refused; no card can have been collected"),
            ));
        }
        if !tx.close_verification(row.id, final_state, now).await? {
            return Err(ApiError::precondition(
                "APPLICATION_ALREADY_CLOSED",
                format!("application {application_id} is closed"),
            ));
        }
        let masked = mask::mask_id_number(&row.id_number);
        let mut detail = format!("application {application_id} {state} by station {station_id}");
        if let (ApplicationState::Collected, Some(serial)) = (final_state, new_card_serial) {
            tx.set_current_card(&row.id_number, serial, row.valid_from, row.valid_until, now).await?;
            detail.push_str(&format!("; current card is now {serial}"));
        }
        tx.audit(now, AuditEntry::new("close_application", masked.as_str(), state.to_ascii_uppercase(), detail))
            .await?;
        tx.commit().await?;
        tracing::info!(id_number = %masked, application_id, state, "application closed");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use yidi_domain::{Particulars, SimulatedMatcher, biometrics::with_sensor_noise};

    use super::*;

    fn template(seed: u8) -> Vec<u8> {
        (0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 ^ seed.wrapping_mul(97)).collect()
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2118, 1, 1).unwrap_or_default()
    }

    fn id() -> IdNumber {
        IdNumber::compose("360102", NaiveDate::from_ymd_opt(1990, 3, 7).unwrap_or_default(), 123)
    }

    fn citizen() -> Citizen {
        Citizen {
            person: Particulars {
                id_number: id().as_str().to_owned(),
                name: "Li Na".into(),
                sex: yidi_domain::Sex::Male,
                birth_date: NaiveDate::from_ymd_opt(1990, 3, 7).unwrap_or_default(),
                registration_province: "36".into(),
                address: "Nanchang".into(),
            },
            face_template: template(1),
            fingerprint_template: template(2),
            credit: Credit::Good,
            registration: Registration::Active,
            date_of_death: None,
            current_card_serial: Some("S1".into()),
            current_card_valid_from: NaiveDate::from_ymd_opt(2100, 1, 1),
            current_card_valid_until: NaiveDate::from_ymd_opt(2120, 1, 1),
        }
    }

    fn input(purpose: DecisionPurpose, kind: Option<ApplicationKind>) -> VerifyInput {
        VerifyInput {
            application_id: "a-1".into(),
            station_id: "station".into(),
            purpose,
            kind,
            id_number: id(),
            card_serial: "S1".into(),
            live_face: with_sensor_noise(&template(1), 5, 1),
            live_fingerprint: with_sensor_noise(&template(2), 5, 2),
            producer_id: "producer".into(),
            declared_province: "36".into(),
        }
    }

    /// Judged for a station in Hangzhou (Zhejiang): a different place for this Jiangxi citizen.
    fn judge_with(input: &VerifyInput, citizen: &Citizen, open: usize) -> Result<(), RefusalReason> {
        judge_at("330106", input, citizen, open)
    }

    fn judge_at(
        station_region: &str,
        input: &VerifyInput,
        citizen: &Citizen,
        open: usize,
    ) -> Result<(), RefusalReason> {
        let jurisdiction = vec!["36".to_owned()];
        let facts = Facts {
            citizen: Some(citizen),
            jurisdiction: &jurisdiction,
            other_open_applications: open,
            station_region,
            today: today(),
        };
        judge(input, &facts, &SimulatedMatcher::default())
    }

    #[test]
    fn s2_the_citizen_in_person_is_approved() {
        let replacement = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        assert_eq!(judge_with(&replacement, &citizen(), 0), Ok(()));
    }

    #[test]
    fn n3_a_citizen_of_another_jurisdiction_is_unknown() {
        let mut other = citizen();
        other.person.registration_province = "51".into();
        let request = input(DecisionPurpose::ReportLoss, Some(ApplicationKind::LossReport));
        assert_eq!(judge_with(&request, &other, 0), Err(RefusalReason::UnknownCitizen));
        let jurisdiction = vec!["36".to_owned()];
        let facts = Facts {
            citizen: None,
            jurisdiction: &jurisdiction,
            other_open_applications: 0,
            station_region: "330106",
            today: today(),
        };
        assert_eq!(judge(&request, &facts, &SimulatedMatcher::default()), Err(RefusalReason::UnknownCitizen));
    }

    #[test]
    fn n3_the_declared_province_must_be_the_registers() {
        let mut request = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        request.declared_province = "33".into();
        assert_eq!(judge_with(&request, &citizen(), 0), Err(RefusalReason::UnknownCitizen));
        // Named before any other refusal: the request never belonged to this judgement.
        let mut c = citizen();
        c.credit = Credit::Bad;
        assert_eq!(judge_with(&request, &c, 0), Err(RefusalReason::UnknownCitizen));
        request.declared_province = "36".into();
        assert_eq!(judge_with(&request, &c, 0), Err(RefusalReason::BadCreditRecord));
    }

    #[test]
    fn s3_refusals_come_in_the_rulebook_order() {
        // Deceased AND impostor AND bad credit: the cancelled registration is named first.
        let mut c = citizen();
        c.registration = Registration::Cancelled;
        c.credit = Credit::Bad;
        let mut request = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        request.live_face = template(9);
        assert_eq!(judge_with(&request, &c, 0), Err(RefusalReason::RegistrationCancelled));
        c.registration = Registration::Active;
        assert_eq!(judge_with(&request, &c, 0), Err(RefusalReason::FaceMismatch));
        request.live_face = template(1);
        assert_eq!(judge_with(&request, &c, 0), Err(RefusalReason::BadCreditRecord));
    }

    #[test]
    fn k6_withdrawal_needs_a_fingerprint_match_but_no_face() {
        let mut request = input(DecisionPurpose::WithdrawLossReport, None);
        request.live_face = Vec::new();
        assert_eq!(judge_with(&request, &citizen(), 0), Ok(()));
        request.live_fingerprint = template(9);
        assert_eq!(judge_with(&request, &citizen(), 0), Err(RefusalReason::FingerprintMismatch));
    }

    #[test]
    fn k6_a_withdrawal_while_a_new_card_is_pending_is_refused() {
        let mut request = input(DecisionPurpose::WithdrawLossReport, None);
        request.live_face = Vec::new();
        assert_eq!(judge_with(&request, &citizen(), 1), Err(RefusalReason::NewCardPending));
        assert_eq!(judge_with(&request, &citizen(), 0), Ok(()));
        // The person is judged first: a stranger learns nothing of the open application.
        request.live_fingerprint = template(9);
        assert_eq!(judge_with(&request, &citizen(), 1), Err(RefusalReason::FingerprintMismatch));
    }

    #[test]
    fn k2_renewal_only_within_90_days_of_expiry() {
        let request = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Renewal));
        assert_eq!(judge_with(&request, &citizen(), 0), Err(RefusalReason::NotYetRenewable));
        let mut c = citizen();
        c.current_card_valid_until = NaiveDate::from_ymd_opt(2118, 3, 1);
        assert_eq!(judge_with(&request, &c, 0), Ok(()));
        c.current_card_valid_until = None;
        assert_eq!(
            judge_with(&request, &c, 0),
            Err(RefusalReason::NotYetRenewable),
            "long-term cards are never renewed"
        );
    }

    #[test]
    fn k5_a_second_open_application_is_refused_but_not_a_loss_report() {
        let request = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        assert_eq!(judge_with(&request, &citizen(), 1), Err(RefusalReason::ApplicationAlreadyOpen));
        let loss = input(DecisionPurpose::ReportLoss, Some(ApplicationKind::LossReport));
        assert_eq!(judge_with(&loss, &citizen(), 1), Ok(()));
    }

    #[test]
    fn k4_never_held_a_card_is_a_first_application() {
        let mut c = citizen();
        c.current_card_serial = None;
        let request = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        assert_eq!(judge_with(&request, &c, 0), Err(RefusalReason::FirstApplication));
    }

    #[test]
    fn s3_bad_credit_and_k4_first_application_are_refusals_in_a_different_place_only() {
        let mut c = citizen();
        c.credit = Credit::Bad;
        let request = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        assert_eq!(judge_at("330106", &request, &c, 0), Err(RefusalReason::BadCreditRecord));
        assert_eq!(judge_at("", &request, &c, 0), Err(RefusalReason::BadCreditRecord), "unknown region: not home");
        assert_eq!(judge_at("360102", &request, &c, 0), Ok(()), "at home in Jiangxi");
        c.credit = Credit::Good;
        c.current_card_serial = None;
        let mut first = input(DecisionPurpose::IssueCard, Some(ApplicationKind::Replacement));
        first.card_serial.clear();
        assert_eq!(judge_at("330106", &first, &c, 0), Err(RefusalReason::FirstApplication));
        assert_eq!(judge_at("360102", &first, &c, 0), Ok(()));
        // At home too, a citizen without a card has no card to name, report lost or find.
        assert_eq!(judge_at("360102", &request, &c, 0), Err(RefusalReason::CardNotCurrent));
        let mut loss = input(DecisionPurpose::ReportLoss, Some(ApplicationKind::LossReport));
        loss.card_serial.clear();
        assert_eq!(judge_at("360102", &loss, &c, 0), Err(RefusalReason::CardNotCurrent));
    }

    #[test]
    fn k1_an_old_card_is_not_current() {
        let mut request = input(DecisionPurpose::ReportLoss, Some(ApplicationKind::LossReport));
        request.card_serial = "S0".into();
        assert_eq!(judge_with(&request, &citizen(), 0), Err(RefusalReason::CardNotCurrent));
    }
}
