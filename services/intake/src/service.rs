//! The station's rules: counter checks, applications, cancellation, collection, withdrawal.
//! Takes validated domain values; never decides who the applicant is (that is the home bureau's).
use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, broadcast, mpsc};
use yidi_audit::AuditEntry;
use yidi_domain::{
    ApplicationKind, ApplicationState, BiometricMatcher, Bureau, DocumentKind, IdNumber, PolicyTimeline, RefusalReason,
    mask::mask_id_number,
};
use yidi_grpc::{ApiError, client::Connector, page::TimeId};
use yidi_outbox::{self as outbox, MessageState};
use yidi_runtime::{Clock, Shutdown, directory::DirectoryHandle};

use crate::{
    entities::{application, application_event},
    peers::Peers,
    repo::{Changes, Messages, NewApplication, Repo, Transition, WithHistory},
    topic::Topic,
    watchers::{Watchers, publish_marked},
};

/// Who this station is and whom it works with.
#[derive(Debug, Clone)]
pub struct Station {
    pub id: String,
    /// Six-digit address code of the station.
    pub region: String,
    pub producer_id: String,
    pub registry_id: String,
}

/// The person at the counter, validated.
#[derive(Debug, Clone)]
pub struct Applicant {
    pub id_number: IdNumber,
    pub declared_province: String,
    pub face_template: Vec<u8>,
    pub fingerprint_template: Vec<u8>,
    pub document_kind: DocumentKind,
    pub agent_id_number: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub state: ApplicationState,
    pub at: DateTime<Utc>,
    pub note: String,
    /// The bureau that took the step.
    pub bureau_id: String,
}

/// An application as operators and callers see it (no full identity number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplicationView {
    pub application_id: String,
    pub kind: ApplicationKind,
    pub state: ApplicationState,
    pub refusal_reason: Option<RefusalReason>,
    pub id_number_masked: String,
    pub home_bureau_id: String,
    pub previous_card_serial: String,
    pub new_card_serial: String,
    pub order_id: String,
    pub loss_recorded: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why the message the application waits on last failed (or what the peer is doing).
    pub last_error: String,
    pub history: Vec<HistoryEntry>,
    /// The outbox messages about it, oldest first.
    pub deliveries: Vec<outbox::Model>,
}

/// How an application stands, as its home bureau asks (K5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Nothing more will happen to it ([`is_final`]).
    pub ended: bool,
    pub state: ApplicationState,
    /// The card handed over, once collected.
    pub new_card_serial: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl ApplicationView {
    /// Nothing more will happen to it: refused, collected, cancelled, or a recorded loss report.
    pub fn is_final(&self) -> bool {
        is_final(self.kind, self.state, self.loss_recorded)
    }

    /// What the caller at the counter waits for: the home bureau's answer, and for a loss report
    /// also its recording at the registry (K3: the card is invalid everywhere once answered).
    fn is_answered(&self) -> bool {
        match self.kind {
            ApplicationKind::LossReport => self.is_final(),
            _ => past_verifying(self.state),
        }
    }
}

pub fn is_final(kind: ApplicationKind, state: ApplicationState, loss_recorded: bool) -> bool {
    state.is_final() || (kind == ApplicationKind::LossReport && state == ApplicationState::Approved && loss_recorded)
}

/// Whether the home bureau has answered.
fn past_verifying(state: ApplicationState) -> bool {
    !matches!(state, ApplicationState::Received | ApplicationState::Verifying)
}

pub(crate) struct Inner {
    pub repo: Repo,
    pub clock: Clock,
    pub directory: DirectoryHandle,
    pub station: Station,
    pub policy: PolicyTimeline,
    pub matcher: Arc<dyn BiometricMatcher>,
    pub peers: Peers,
    pub watchers: Arc<Watchers>,
    /// Wakes the outbox dispatcher when a message is queued.
    pub wake: Arc<Notify>,
    pub respond_within: Duration,
    pub shutdown: Shutdown,
    /// How long after ordering the station first asks the producer about the order, unless told.
    pub order_poll_after: Duration,
}

/// The intake service; cheap to clone.
#[derive(Clone)]
pub struct Intake {
    pub(crate) inner: Arc<Inner>,
}

pub struct IntakeParts {
    pub repo: Repo,
    pub clock: Clock,
    pub directory: DirectoryHandle,
    /// Channels to the other bureaus (mutual TLS unless configured plaintext).
    pub connector: Connector,
    pub station: Station,
    pub policy: PolicyTimeline,
    pub matcher: Arc<dyn BiometricMatcher>,
    pub respond_within: Duration,
    pub shutdown: Shutdown,
    pub wake: Arc<Notify>,
    /// The deadline of every call to another bureau.
    pub call_timeout: Duration,
    /// `worker.order_poll_after_ms`.
    pub order_poll_after: Duration,
}

impl Intake {
    pub fn new(parts: IntakeParts) -> Self {
        let (watchers, marked) = Watchers::new();
        let peers = Peers::new(parts.directory.clone(), parts.connector, parts.call_timeout);
        let inner = Arc::new(Inner {
            repo: parts.repo,
            clock: parts.clock,
            directory: parts.directory,
            station: parts.station,
            policy: parts.policy,
            matcher: parts.matcher,
            peers,
            watchers,
            wake: parts.wake,
            respond_within: parts.respond_within,
            shutdown: parts.shutdown,
            order_poll_after: parts.order_poll_after,
        });
        tokio::spawn(publish_marked(Arc::downgrade(&inner), marked));
        Self { inner }
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// The application as stored; NOT_FOUND if there is none.
    async fn existing(&self, application_id: &str) -> Result<application::Model, ApiError> {
        self.inner.repo.get(application_id).await?.ok_or_else(|| ApiError::not_found("application", application_id))
    }

    /// Applies `transition` now; `false` if the application was no longer in its `from` state.
    async fn apply(&self, transition: Transition<'_>) -> Result<bool, ApiError> {
        Ok(self.inner.repo.transition(transition, self.now()).await?)
    }

    /// The counter rules, in order: no agent (S2), the acceptance policy (P0–P4), a home bureau
    /// to route to (N3). A refusal writes one audit row and nothing else.
    pub async fn counter_check(&self, action: &'static str, applicant: &Applicant) -> Result<Bureau, ApiError> {
        match self.counter_rules(applicant) {
            Ok(home) => Ok(home),
            Err(reason) => {
                tracing::info!(action, id = %applicant.id_number.masked(), reason = reason.code(), "refused at the counter");
                // Refused here, nothing changed: answered only once on record (yidi_audit, "When
                // an audit write fails").
                let entry = AuditEntry::new(action, applicant.id_number.masked(), "refused", reason.code());
                self.inner.repo.audit(entry, self.now()).await.map_err(ApiError::Database)?;
                Err(ApiError::Refused(reason))
            }
        }
    }

    /// Writes the audit row of something another bureau has already done or decided; a failure
    /// is logged, never returned (yidi_audit, "When an audit write fails").
    pub(crate) async fn audit_or_log(&self, entry: AuditEntry) {
        let (action, outcome) = (entry.action, entry.outcome.clone());
        if let Err(error) = self.inner.repo.audit(entry, self.now()).await {
            tracing::error!(%action, %outcome, %error, "could not write the audit row");
        }
    }

    fn counter_rules(&self, applicant: &Applicant) -> Result<Bureau, RefusalReason> {
        if !applicant.agent_id_number.trim().is_empty() {
            return Err(RefusalReason::AgentNotAllowed);
        }
        self.inner.policy.check(
            &self.inner.station.region,
            &applicant.declared_province,
            self.inner.clock.today(),
            applicant.document_kind,
        )?;
        self.inner
            .directory
            .current()
            .home_bureau_for(&applicant.declared_province)
            .cloned()
            .ok_or(RefusalReason::UnknownCitizen)
    }

    /// SubmitApplication (K1, K2) and ReportLoss (K3): counter rules, then the application is
    /// received and handed to the worker; answers once the home bureau has answered, or after
    /// `respond_within` with the state as it then is.
    ///
    /// `request_key` (caller, method and `idempotency-key`, when the caller sent one) is stored
    /// with the application: a repeat that the idempotency layer could not answer (the station
    /// died between committing and keeping the answer) gets this application, not a second one.
    pub async fn submit(
        &self,
        kind: ApplicationKind,
        applicant: Applicant,
        card_serial: String,
        request_key: Option<String>,
    ) -> Result<ApplicationView, ApiError> {
        if let Some(key) = &request_key
            && let Some(existing) = self.inner.repo.by_request_key(key).await?
        {
            tracing::info!(application_id = %existing.application_id, "repeated request: the application lodged by the first is answered");
            return self.get(&existing.application_id).await;
        }
        let action = if kind == ApplicationKind::LossReport { "report_loss" } else { "submit_application" };
        let home = self.counter_check(action, &applicant).await?;
        let now = self.now();
        let application_id = uuid::Uuid::new_v4().to_string();
        let new = NewApplication {
            application_id: application_id.clone(),
            kind,
            id_number: applicant.id_number.as_str().to_owned(),
            declared_province: applicant.declared_province.clone(),
            home_bureau_id: home.id.clone(),
            previous_card_serial: card_serial,
            document_kind: applicant.document_kind,
            live_face_template: applicant.face_template,
            live_fingerprint_template: applicant.fingerprint_template,
            trace_context: yidi_runtime::telemetry::current_traceparent(),
            request_key: request_key.clone(),
            received_at: now,
        };
        let mut watching = self.inner.watchers.watch(&application_id);
        let received = AuditEntry::new(
            action,
            applicant.id_number.masked(),
            "received",
            format!("application {application_id} for {}", home.id),
        );
        let owed = Messages::owe(Topic::Verify.message(&application_id, &home.id));
        if let Err(error) =
            self.inner.repo.insert_application(new, "received at the counter", Some(received), owed).await
        {
            // The same keyed request, run at once by another replica: its application is the answer.
            if let Some(key) = &request_key
                && let Some(existing) = self.inner.repo.by_request_key(key).await?
            {
                return self.get(&existing.application_id).await;
            }
            return Err(error.into());
        }
        tracing::info!(%application_id, kind = kind.as_str(), id = %applicant.id_number.masked(), home = %home.id, "application received");
        self.publish(&application_id);
        self.inner.wake.notify_one();

        let deadline = tokio::time::Instant::now() + self.inner.respond_within;
        loop {
            // Another replica sharing the database may deliver it: look at the row now and then.
            let wait = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
            match tokio::time::timeout_at(wait, watching.views.recv()).await {
                Err(_) if wait < deadline => {
                    let view = self.get(&application_id).await?;
                    if view.is_answered() {
                        return Ok(view);
                    }
                }
                Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => break,
                Ok(Ok(view)) => {
                    if view.application_id == application_id && view.is_answered() {
                        return Ok(view);
                    }
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    let view = self.get(&application_id).await?;
                    if view.is_answered() {
                        return Ok(view);
                    }
                }
            }
        }
        self.get(&application_id).await
    }

    pub async fn get(&self, application_id: &str) -> Result<ApplicationView, ApiError> {
        let model = self.existing(application_id).await?;
        let events = self.inner.repo.events(application_id).await?;
        let messages = self.inner.repo.messages(application_id).await?;
        Ok(view(model, &events, messages, &self.inner.station))
    }

    /// K5: how the application stands, for its home bureau `asker`, which holds it open and asks
    /// whether it ended. Another bureau's application is NOT_FOUND, as an unknown one is.
    pub async fn outcome(&self, application_id: &str, asker: &str) -> Result<Outcome, ApiError> {
        let model = self
            .inner
            .repo
            .get(application_id)
            .await?
            .filter(|model| model.home_bureau_id == asker)
            .ok_or_else(|| ApiError::not_found("application", application_id))?;
        let kind = model.kind.into();
        let state: ApplicationState = model.state.into();
        Ok(Outcome {
            ended: is_final(kind, state, model.loss_recorded),
            state,
            new_card_serial: model.new_card_serial.filter(|_| state == ApplicationState::Collected),
            updated_at: model.updated_at,
        })
    }

    /// Newest first, after the key `after` (the last row of the previous page); the key of the last
    /// row if there may be more.
    pub async fn list(
        &self,
        state: Option<ApplicationState>,
        after: Option<TimeId>,
        limit: u64,
    ) -> Result<(Vec<ApplicationView>, Option<TimeId>), ApiError> {
        let models = self.inner.repo.list(state, after.as_ref(), limit + 1).await?;
        let more = models.len() as u64 > limit;
        let models: Vec<_> = models.into_iter().take(limit as usize).collect();
        let last = models.last().map(|m| TimeId { at: m.created_at, id: m.application_id.clone() });
        Ok((self.views_of(models).await?, last.filter(|_| more)))
    }

    /// The views of the applications `ids` that exist, in no particular order: one statement on
    /// PostgreSQL, three queries elsewhere, whatever their number.
    pub(crate) async fn views(&self, ids: &[String]) -> Result<Vec<ApplicationView>, ApiError> {
        let stored = self.inner.repo.with_history(ids).await?;
        Ok(self.to_views(stored))
    }

    /// The views of `models`, their events and messages read in one query each.
    async fn views_of(&self, models: Vec<application::Model>) -> Result<Vec<ApplicationView>, ApiError> {
        let stored = self.inner.repo.history_of(models).await?;
        Ok(self.to_views(stored))
    }

    fn to_views(&self, stored: Vec<WithHistory>) -> Vec<ApplicationView> {
        let station = &self.inner.station;
        stored.into_iter().map(|s| view(s.application, &s.events, s.messages, station)).collect()
    }

    /// Tells the application's watchers, if any, that it changed (committed).
    pub(crate) fn publish(&self, application_id: &str) {
        self.inner.watchers.mark(application_id);
    }

    /// The current state, then every change, until a final state or shutdown.
    pub async fn watch(&self, application_id: &str) -> Result<mpsc::Receiver<ApplicationView>, ApiError> {
        let mut watching = self.inner.watchers.watch(application_id);
        let current = self.get(application_id).await?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let id = application_id.to_owned();
        tokio::spawn(async move {
            let mut last = current.clone();
            if tx.send(current).await.is_err() || last.is_final() {
                return;
            }
            loop {
                let next = tokio::select! {
                    () = this.inner.shutdown.wait() => return,
                    () = tx.closed() => return,
                    next = watching.views.recv() => next,
                };
                let view = match next {
                    Ok(view) if view.application_id == id => view,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => match this.get(&id).await {
                        Ok(view) => view,
                        Err(_) => return,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // Skip stale or repeated snapshots.
                if view.history.len() < last.history.len() || view == last {
                    continue;
                }
                last = view.clone();
                if tx.send(view).await.is_err() || last.is_final() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Cancellation before production; a loss report only until the home bureau approved it.
    pub async fn cancel(&self, application_id: &str) -> Result<ApplicationView, ApiError> {
        for _ in 0..5 {
            let model = self.existing(application_id).await?;
            let (kind, state): (ApplicationKind, ApplicationState) = (model.kind.into(), model.state.into());
            // A loss report, once approved, is being filed at the registry: no longer cancellable.
            let loss_filing = kind == ApplicationKind::LossReport
                && !matches!(state, ApplicationState::Received | ApplicationState::Verifying);
            if !state.is_cancellable() || loss_filing {
                let why = if state.is_cancellable() { " and its loss report is being filed" } else { "" };
                return Err(ApiError::precondition(
                    "NOT_CANCELLABLE",
                    format!("application {application_id} is {}{why}; it can no longer be cancelled", state.as_str()),
                ));
            }
            // K5: the home bureau may have heard of it (and keep it open) in any state a cancel
            // leaves: even in RECEIVED its Verify may be on the way. It is always told; a close that
            // arrives first is remembered there and wins over the Verify.
            let tell_home = owes_a_close(kind);
            let changes = Changes { home_notified: Some(!tell_home), ..Changes::default() };
            let owed = if tell_home { Messages::owe(closing(&model)) } else { Messages::default() };
            let owed = owed.dropping(application_id, "the application was cancelled");
            let masked = mask_id_number(&model.id_number);
            let applied = self
                .apply(Transition {
                    application_id,
                    from: &[state],
                    to: ApplicationState::Cancelled,
                    changes,
                    note: format!("cancelled at the counter (was {})", state.as_str()),
                    audit: Some(AuditEntry::new("cancel_application", masked, "cancelled", application_id)),
                    messages: owed,
                })
                .await?;
            if applied {
                tracing::info!(%application_id, "application cancelled");
                self.publish(application_id);
                self.inner.wake.notify_one();
                return self.get(application_id).await;
            }
            // The worker moved it meanwhile: judge again on the new state.
        }
        Err(ApiError::precondition("NOT_CANCELLABLE", format!("application {application_id} is changing; try again")))
    }

    /// C3: the card is handed over only after a fresh face match against the home bureau's record,
    /// read from the stored decision by `enrolled_face` (`None`: the decision is unreadable).
    pub async fn collect(
        &self,
        application_id: &str,
        live_face: &[u8],
        enrolled_face: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<ApplicationView, ApiError> {
        let model = self.existing(application_id).await?;
        let state = model.state.into();
        if state != ApplicationState::ReadyForCollection {
            return Err(not_ready(application_id, state));
        }
        let enrolled = model
            .decision
            .as_deref()
            .and_then(enrolled_face)
            .ok_or_else(|| ApiError::Internal(format!("application {application_id} has no readable decision")))?;
        let outcome = self.inner.matcher.match_face(live_face, &enrolled);
        let masked = mask_id_number(&model.id_number);
        let serial = model.new_card_serial.clone().unwrap_or_default();
        if !outcome.matched {
            tracing::info!(%application_id, score = outcome.score, "collection refused: face mismatch");
            self.inner
                .repo
                .audit(
                    AuditEntry::new(
                        "collect_card",
                        masked,
                        "refused",
                        format!("{} card {serial} score {:.3}", RefusalReason::FaceMismatch.code(), outcome.score),
                    ),
                    self.now(),
                )
                .await?;
            return Err(ApiError::Refused(RefusalReason::FaceMismatch));
        }
        let applied = self
            .apply(Transition {
                application_id,
                from: &[ApplicationState::ReadyForCollection],
                to: ApplicationState::Collected,
                changes: Changes::default(),
                note: format!("card {serial} handed over after a face match"),
                audit: Some(AuditEntry::new(
                    "collect_card",
                    masked,
                    "collected",
                    format!("card {serial} score {:.3}", outcome.score),
                )),
                messages: Messages::owe(closing(&model))
                    .and_owe(Some(Topic::RecordCollection.message(application_id, &self.inner.station.registry_id))),
            })
            .await?;
        if !applied {
            let current = self.get(application_id).await?;
            return Err(not_ready(application_id, current.state));
        }
        tracing::info!(%application_id, card = %serial, "card collected");
        self.publish(application_id);
        self.inner.wake.notify_one();
        self.get(application_id).await
    }
}

/// K5: whether cancelling an application of `kind` owes the home bureau a close: every
/// application that makes a card may be open there, whatever its state (a loss report never is).
pub(crate) fn owes_a_close(kind: ApplicationKind) -> bool {
    kind.makes_a_card()
}

/// Telling the home bureau the application ended (K5), owed by collection and cancellation.
pub(crate) fn closing(model: &application::Model) -> outbox::NewMessage {
    Topic::CloseApplication.message(&model.application_id, &model.home_bureau_id)
}

fn not_ready(application_id: &str, state: ApplicationState) -> ApiError {
    ApiError::precondition(
        "NOT_READY_FOR_COLLECTION",
        format!("application {application_id} is {}, not ready_for_collection", state.as_str()),
    )
}

/// The bureau whose step put an application in `state`: each state is entered by one of them.
fn bureau_of(state: ApplicationState, model: &application::Model, station: &str, producer: &str) -> String {
    match state {
        ApplicationState::Approved | ApplicationState::Refused => model.home_bureau_id.clone(),
        ApplicationState::ReadyForCollection => producer.to_owned(),
        _ => station.to_owned(),
    }
}

/// What the application waits on went wrong last: the newest undelivered message's error.
fn waiting_error(messages: &[outbox::Model]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| matches!(m.message_state(), Some(MessageState::Pending | MessageState::Dead)))
        .and_then(|m| m.last_error.clone())
        .unwrap_or_default()
}

fn view(
    model: application::Model,
    events: &[application_event::Model],
    deliveries: Vec<outbox::Model>,
    station: &Station,
) -> ApplicationView {
    let history = events
        .iter()
        .map(|e| {
            let state = e.state.into();
            let bureau_id = bureau_of(state, &model, &station.id, &station.producer_id);
            HistoryEntry { state, at: e.at, note: e.note.clone(), bureau_id }
        })
        .collect();
    ApplicationView {
        kind: model.kind.into(),
        state: model.state.into(),
        refusal_reason: model.refusal_reason.as_deref().and_then(RefusalReason::from_code),
        id_number_masked: mask_id_number(&model.id_number),
        home_bureau_id: model.home_bureau_id,
        previous_card_serial: model.previous_card_serial,
        new_card_serial: model.new_card_serial.unwrap_or_default(),
        order_id: model.order_id.unwrap_or_default(),
        loss_recorded: model.loss_recorded,
        created_at: model.created_at,
        updated_at: model.updated_at,
        last_error: waiting_error(&deliveries),
        history,
        deliveries,
        application_id: model.application_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3_a_recorded_loss_report_is_final_but_an_unrecorded_one_is_not() {
        assert!(is_final(ApplicationKind::LossReport, ApplicationState::Approved, true));
        assert!(!is_final(ApplicationKind::LossReport, ApplicationState::Approved, false));
        assert!(!is_final(ApplicationKind::Replacement, ApplicationState::Approved, true));
        assert!(is_final(ApplicationKind::Renewal, ApplicationState::Refused, false));
    }

    #[test]
    fn k5_every_cancel_of_an_application_for_a_card_tells_the_home_bureau() {
        assert!(owes_a_close(ApplicationKind::Replacement));
        assert!(owes_a_close(ApplicationKind::Renewal));
        assert!(!owes_a_close(ApplicationKind::LossReport), "a loss report is never open at the home bureau");
    }

    #[test]
    fn submit_answers_once_the_home_bureau_has_answered() {
        assert!(!past_verifying(ApplicationState::Received));
        assert!(!past_verifying(ApplicationState::Verifying));
        assert!(past_verifying(ApplicationState::Approved));
        assert!(past_verifying(ApplicationState::Refused));
        assert!(past_verifying(ApplicationState::Cancelled));
    }
}
