//! The background worker: drives each application through verification → registry → issuance,
//! and tells the home bureau when an application ends. One task per application at a time; a
//! failure of one application never stops the others.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message;
use sea_orm::{ActiveValue::Set, DbErr};
use tokio::{task::JoinSet, time::Instant};
use tracing::Instrument;
use yidi_common::{ApiError, audit::AuditEntry};
use yidi_domain::{ApplicationKind, ApplicationState, mask::mask_id_number};
use yidi_proto::v1 as pb;

use crate::{
    entities::application,
    peers::PeerError,
    repo::{self, Transition},
    service::{Intake, decode_decision, is_final, parse_kind_state},
};

/// Why a step did not complete.
#[derive(Debug)]
enum Failure {
    /// Try again after a backoff.
    Retry(String),
    /// Retrying cannot help; left for operators.
    Halt(String),
    Database(DbErr),
}

impl From<DbErr> for Failure {
    fn from(error: DbErr) -> Self {
        Self::Database(error)
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::Database(error) => Self::Database(error),
            other => Self::Halt(other.to_string()),
        }
    }
}

fn from_peer(error: PeerError) -> Failure {
    if error.is_transient() { Failure::Retry(error.to_string()) } else { Failure::Halt(error.to_string()) }
}

/// Exponential from 0.5 s, at most 30 s.
pub fn backoff(attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 16)).unwrap_or(0);
    Duration::from_millis(500u64.saturating_mul(1u64 << exponent)).min(Duration::from_secs(30))
}

/// Between polls of an order still in production: from 1 s, doubling, at most 30 s.
pub fn poll_interval(polls: u32) -> Duration {
    Duration::from_secs(1u64 << polls.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// What a step left to do.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Something changed; there may be more to do now.
    More,
    /// Nothing to do until something else changes it.
    Idle,
    /// Waiting on a peer (an order in production): ask again later, less often each time.
    Poll,
}

impl From<bool> for Next {
    fn from(changed: bool) -> Self {
        if changed { Self::More } else { Self::Idle }
    }
}

/// Removes the application from the in-flight set when its task ends (or is aborted).
struct InFlight {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.id);
        }
    }
}

pub async fn run(intake: Intake, tick: Duration) {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let retry_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let polls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let shutdown = intake.inner.shutdown.clone();
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            () = intake.inner.wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
        while tasks.try_join_next().is_some() {}
        let pending = match intake.inner.repo.pending().await {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!(%error, "worker could not read pending applications");
                continue;
            }
        };
        // Forget the timers of applications that no longer need anything.
        let wanted: HashSet<&String> = pending.iter().collect();
        if let Ok(mut retry_at) = retry_at.lock() {
            retry_at.retain(|id, _| wanted.contains(id));
        }
        if let Ok(mut polls) = polls.lock() {
            polls.retain(|id, _| wanted.contains(id));
        }
        let now = Instant::now();
        for id in pending {
            let due = retry_at.lock().map(|r| r.get(&id).is_none_or(|at| *at <= now)).unwrap_or(true);
            if !due {
                continue;
            }
            let Ok(mut set) = in_flight.lock() else {
                continue;
            };
            if !set.insert(id.clone()) {
                continue;
            }
            drop(set);
            let guard = InFlight { set: in_flight.clone(), id: id.clone() };
            let intake = intake.clone();
            let retry_at = retry_at.clone();
            let polls = polls.clone();
            tasks.spawn(async move {
                let _guard = guard;
                let delay = drive(&intake, &id, &polls).await;
                if let Ok(mut retry_at) = retry_at.lock() {
                    match delay {
                        Some(delay) => retry_at.insert(id, Instant::now() + delay),
                        None => retry_at.remove(&id),
                    };
                }
            });
        }
    }
    tasks.shutdown().await;
    tracing::info!("worker stopped");
}

/// Advances one application as far as it goes now. Returns a retry delay after a failure.
async fn drive(intake: &Intake, id: &str, polls: &Mutex<HashMap<String, u32>>) -> Option<Duration> {
    let outcome = drive_once(intake, id).await;
    let Ok(mut polls) = polls.lock() else {
        return outcome.unwrap_or(Some(poll_interval(1)));
    };
    match outcome {
        Ok(delay) => {
            polls.remove(id);
            delay
        }
        Err(()) => {
            let count = polls.entry(id.to_owned()).or_default();
            *count = count.saturating_add(1);
            Some(poll_interval(*count))
        }
    }
}

/// Advances one application as far as it goes now. `Err(())`: waiting on an order.
async fn drive_once(intake: &Intake, id: &str) -> Result<Option<Duration>, ()> {
    Ok(loop {
        let model = match intake.inner.repo.get(id).await {
            Ok(Some(model)) => model,
            Ok(None) => return Ok(None),
            Err(error) => {
                tracing::warn!(application_id = %id, %error, "worker could not read the application");
                return Ok(Some(backoff(1)));
            }
        };
        let closing = !model.home_notified
            && ApplicationState::parse(&model.state)
                .is_some_and(|s| matches!(s, ApplicationState::Collected | ApplicationState::Cancelled));
        if model.halted && !closing {
            return Ok(None);
        }
        // The step continues the trace of the request that lodged the application.
        let span = tracing::info_span!("application_step", application_id = %id, state = %model.state);
        yidi_common::telemetry::continue_trace(&span, model.trace_context.as_deref());
        if let Some(outcome) = advance(intake, &model).instrument(span).await {
            break outcome?;
        }
    })
}

/// One step of `drive_once` and what it leaves: `None` to go on with the next step, otherwise
/// what `drive_once` returns.
async fn advance(intake: &Intake, model: &application::Model) -> Option<Result<Option<Duration>, ()>> {
    let id = model.application_id.as_str();
    match step(intake, model).await {
        Ok(Next::More) => {
            intake.publish(id).await;
            None
        }
        Ok(Next::Idle) => Some(Ok(None)),
        Ok(Next::Poll) => Some(Err(())),
        Err(Failure::Database(error)) => {
            tracing::warn!(application_id = %id, %error, "database error while advancing");
            Some(Ok(Some(backoff(1))))
        }
        Err(failure) => {
            let (message, halt) = match failure {
                Failure::Retry(message) => (message, false),
                Failure::Halt(message) => (message, true),
                Failure::Database(_) => (String::new(), false),
            };
            let Ok(ran_in) = parse_kind_state(model).map(|(_, state)| state) else {
                return Some(Ok(Some(backoff(1))));
            };
            let current = match intake.inner.repo.get(id).await {
                Ok(Some(current)) => current,
                _ => return Some(Ok(Some(backoff(1)))),
            };
            if current.state != model.state {
                // Moved on meanwhile (e.g. cancelled): the failure is of a step no longer due.
                tracing::info!(application_id = %id, error = %message, "step failed but the application moved on");
                return Some(Ok(None));
            }
            let attempts = current.attempts.saturating_add(1);
            let delay = backoff(attempts);
            let next = (!halt).then(|| intake.clock().now() + chrono::Duration::from_std(delay).unwrap_or_default());
            if halt {
                tracing::warn!(application_id = %id, error = %message, "peer refused definitively; application halted");
            } else {
                tracing::info!(application_id = %id, error = %message, ?delay, "peer call failed; will retry");
            }
            let recorded = intake
                .inner
                .repo
                .record_failure(id, ran_in, attempts, &message, next, halt, intake.clock().now())
                .await;
            match recorded {
                Ok(true) => intake.publish(id).await,
                Ok(false) => return Some(Ok(None)),
                Err(error) => {
                    tracing::warn!(application_id = %id, %error, "could not record a failure")
                }
            }
            Some(Ok((!halt).then_some(delay)))
        }
    }
}

/// Clears the error bookkeeping after progress.
fn progress_changes() -> application::ActiveModel {
    let mut changes = repo::changes();
    changes.attempts = Set(0);
    changes.last_error = Set(None);
    changes.next_attempt_at = Set(None);
    changes
}

/// One step. `Ok(true)`: something changed and there may be more to do.
async fn step(intake: &Intake, model: &application::Model) -> Result<Next, Failure> {
    let (kind, state) = parse_kind_state(model)?;
    let inner = &intake.inner;
    let now = || intake.clock().now();
    let id = model.application_id.as_str();
    match state {
        ApplicationState::Received => Ok(inner
            .repo
            .transition(
                Transition {
                    application_id: id,
                    from: &[ApplicationState::Received],
                    to: ApplicationState::Verifying,
                    changes: repo::changes(),
                    condition: None,
                    note: format!("sent to home bureau {}", model.home_bureau_id),
                    audit: None,
                },
                now(),
            )
            .await?
            .into()),
        ApplicationState::Verifying => verify(intake, model, kind).await.map(Next::from),
        ApplicationState::Approved if !is_final(kind, state, model.loss_recorded) => {
            approved(intake, model, kind).await.map(Next::from)
        }
        ApplicationState::InProduction if model.order_id.is_none() => place_order(intake, model).await.map(Next::from),
        ApplicationState::InProduction => {
            let order_id = model.order_id.clone().unwrap_or_default();
            let order = inner.peers.get_order(&inner.station.producer_id, &order_id, "").await.map_err(from_peer)?;
            if order.state != pb::OrderState::Dispatched as i32 {
                // Show why it waits (or that it no longer has trouble) on the application.
                let error = Some(order.last_error.clone()).filter(|e| !e.is_empty());
                if error != model.last_error {
                    let mut changes = progress_changes();
                    changes.last_error = Set(error.map(|e| e.chars().take(1000).collect()));
                    if inner.repo.update_in_state(id, ApplicationState::InProduction, changes, None, now()).await? {
                        intake.publish(id).await;
                    }
                }
                return Ok(Next::Poll);
            }
            let mut changes = progress_changes();
            if !order.card_serial.is_empty() {
                changes.new_card_serial = Set(Some(order.card_serial.clone()));
            }
            Ok(inner
                .repo
                .transition(
                    Transition {
                        application_id: id,
                        from: &[ApplicationState::InProduction],
                        to: ApplicationState::ReadyForCollection,
                        changes,
                        condition: None,
                        note: format!("card {} dispatched to the station", order.card_serial),
                        audit: Some(AuditEntry::new(
                            "card_dispatched",
                            mask_id_number(&model.id_number),
                            "ready_for_collection",
                            format!("order {order_id} card {}", order.card_serial),
                        )),
                    },
                    now(),
                )
                .await?
                .into())
        }
        ApplicationState::Collected | ApplicationState::Cancelled if !model.home_notified => {
            close(intake, model, state).await?;
            Ok(Next::Idle)
        }
        _ => Ok(Next::Idle),
    }
}

async fn verify(intake: &Intake, model: &application::Model, kind: ApplicationKind) -> Result<bool, Failure> {
    let inner = &intake.inner;
    let issue = kind.makes_a_card();
    let request = pb::VerifyRequest {
        application_id: model.application_id.clone(),
        station_id: inner.station.id.clone(),
        purpose: if issue { pb::DecisionPurpose::IssueCard } else { pb::DecisionPurpose::ReportLoss } as i32,
        kind: yidi_common::convert::kind_to_proto(kind) as i32,
        id_number: model.id_number.clone(),
        card_serial: model.previous_card_serial.clone(),
        live: Some(pb::Biometrics {
            face_template: model.live_face_template.clone(),
            fingerprint_template: model.live_fingerprint_template.clone(),
        }),
        producer_id: if issue { inner.station.producer_id.clone() } else { String::new() },
        declared_province: model.declared_province.clone(),
    };
    let answer = inner.peers.verify(&model.home_bureau_id, request).await.map_err(from_peer)?;
    let masked = mask_id_number(&model.id_number);
    let id = model.application_id.as_str();
    if let Some(decision) = answer.decision {
        let decision_id = decision.decision.as_ref().map(|d| d.decision_id.clone()).unwrap_or_default();
        let mut changes = progress_changes();
        // The home bureau names the card concerned (the register's current card when none was given).
        if let Some(previous) =
            decision.decision.as_ref().map(|d| d.previous_card_serial.clone()).filter(|s| !s.is_empty())
        {
            changes.previous_card_serial = Set(previous);
        }
        changes.decision = Set(Some(decision.encode_to_vec()));
        changes.loss_decision = Set(answer.loss_decision.map(|d| d.encode_to_vec()));
        let applied = inner
            .repo
            .transition(
                Transition {
                    application_id: id,
                    from: &[ApplicationState::Verifying],
                    to: ApplicationState::Approved,
                    changes,
                    condition: None,
                    note: format!("approved by {} (decision {decision_id})", model.home_bureau_id),
                    audit: Some(AuditEntry::new("verification", masked, "approved", format!("decision {decision_id}"))),
                },
                intake.clock().now(),
            )
            .await?;
        if applied {
            tracing::info!(application_id = %id, %decision_id, "approved by the home bureau");
        }
        return Ok(applied);
    }
    let reason = pb::RefusalReason::try_from(answer.refusal_reason)
        .ok()
        .and_then(yidi_common::convert::refusal_from_proto)
        .ok_or_else(|| {
            Failure::Halt(format!("{} answered neither a decision nor a known refusal", model.home_bureau_id))
        })?;
    let mut changes = progress_changes();
    changes.refusal_reason = Set(Some(reason.code().to_owned()));
    let applied = inner
        .repo
        .transition(
            Transition {
                application_id: id,
                from: &[ApplicationState::Verifying],
                to: ApplicationState::Refused,
                changes,
                condition: None,
                note: format!("refused by {}: {}", model.home_bureau_id, reason.code()),
                audit: Some(AuditEntry::new("verification", masked, "refused", reason.code())),
            },
            intake.clock().now(),
        )
        .await?;
    if applied {
        tracing::info!(application_id = %id, reason = reason.code(), "refused by the home bureau");
    }
    Ok(applied)
}

async fn approved(intake: &Intake, model: &application::Model, kind: ApplicationKind) -> Result<bool, Failure> {
    let inner = &intake.inner;
    let id = model.application_id.as_str();
    let masked = mask_id_number(&model.id_number);
    let decision = decode_decision(model.decision.as_deref())
        .ok_or_else(|| Failure::Halt("the stored decision is unreadable".into()))?;
    // K1, K3: file the loss report first.
    let loss_decision = match kind {
        ApplicationKind::LossReport => Some(decision.clone()),
        ApplicationKind::Replacement => decode_decision(model.loss_decision.as_deref()),
        ApplicationKind::Renewal => None,
    };
    if !model.loss_recorded
        && let Some(loss_decision) = loss_decision
    {
        let registry = &inner.station.registry_id;
        let detail = match inner.peers.report_loss(registry, loss_decision).await {
            Ok(response) => format!(
                "card {} {}",
                response.card_serial,
                if response.already_reported { "already reported" } else { "reported lost" }
            ),
            // Our decision was used before (we reported, then crashed before recording it).
            Err(error) if error.code() == Some(tonic::Code::AlreadyExists) => {
                format!("card {} already reported by this application", model.previous_card_serial)
            }
            Err(error) => return Err(from_peer(error)),
        };
        let mut changes = progress_changes();
        changes.loss_recorded = Set(true);
        let applied = inner
            .repo
            .update_in_state(
                id,
                ApplicationState::Approved,
                changes,
                Some(AuditEntry::new("loss_report", masked, "recorded", detail)),
                intake.clock().now(),
            )
            .await?;
        if !applied {
            return Ok(false);
        }
        tracing::info!(application_id = %id, "loss report recorded by the registry");
        intake.publish(id).await;
        if kind == ApplicationKind::LossReport {
            return Ok(false);
        }
    }
    if !kind.makes_a_card() {
        return Ok(false);
    }
    // Record the intent before calling the producer: once IN_PRODUCTION the application can no
    // longer be cancelled, so a cancel either wins here (and no order is placed) or is refused.
    let producer = &inner.station.producer_id;
    Ok(inner
        .repo
        .transition(
            Transition {
                application_id: id,
                from: &[ApplicationState::Approved],
                to: ApplicationState::InProduction,
                changes: progress_changes(),
                condition: None,
                note: format!("ordering from {producer}"),
                audit: None,
            },
            intake.clock().now(),
        )
        .await?)
}

/// IN_PRODUCTION without an order yet: place it (idempotent: a decision already used answers
/// ALREADY_EXISTS, and the order is then looked up by its decision) and store it.
async fn place_order(intake: &Intake, model: &application::Model) -> Result<bool, Failure> {
    let inner = &intake.inner;
    let id = model.application_id.as_str();
    let decision = decode_decision(model.decision.as_deref())
        .ok_or_else(|| Failure::Halt("the stored decision is unreadable".into()))?;
    let producer = &inner.station.producer_id;
    let decision_id = decision.decision.as_ref().map(|d| d.decision_id.clone()).unwrap_or_default();
    let order = match inner.peers.place_order(producer, decision).await {
        Ok(order) => order,
        Err(error) if error.code() == Some(tonic::Code::AlreadyExists) => {
            inner.peers.get_order(producer, "", &decision_id).await.map_err(from_peer)?
        }
        Err(error) => return Err(from_peer(error)),
    };
    let mut changes = progress_changes();
    changes.order_id = Set(Some(order.order_id.clone()));
    if !order.card_serial.is_empty() {
        changes.new_card_serial = Set(Some(order.card_serial.clone()));
    }
    let applied = inner
        .repo
        .update_in_state(
            id,
            ApplicationState::InProduction,
            changes,
            Some(AuditEntry::new(
                "issuance",
                mask_id_number(&model.id_number),
                "ordered",
                format!("order {} card {} decision {decision_id}", order.order_id, order.card_serial),
            )),
            intake.clock().now(),
        )
        .await?;
    if applied {
        tracing::info!(application_id = %id, order_id = %order.order_id, "order placed");
    }
    Ok(applied)
}

/// Tells the home bureau the application ended, so it is no longer open there (K5).
async fn close(intake: &Intake, model: &application::Model, state: ApplicationState) -> Result<(), Failure> {
    let inner = &intake.inner;
    let request = pb::CloseApplicationRequest {
        application_id: model.application_id.clone(),
        final_state: yidi_common::convert::state_to_proto(state) as i32,
        new_card_serial: if state == ApplicationState::Collected {
            model.new_card_serial.clone().unwrap_or_default()
        } else {
            String::new()
        },
        station_id: inner.station.id.clone(),
    };
    match inner.peers.close_application(&model.home_bureau_id, request).await {
        Ok(_) => {}
        // The home bureau never opened it: nothing to close.
        Err(error) if error.code() == Some(tonic::Code::NotFound) => {}
        // Telling the home bureau is never given up (K5 keeps the application open there).
        Err(error) => return Err(Failure::Retry(error.to_string())),
    }
    let mut changes = progress_changes();
    changes.home_notified = Set(true);
    inner.repo.update_in_state(&model.application_id, state, changes, None, intake.clock().now()).await?;
    tracing::info!(application_id = %model.application_id, state = state.as_str(), "home bureau notified");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_exponential_from_half_a_second_up_to_thirty() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_millis(1000));
        assert_eq!(backoff(3), Duration::from_millis(2000));
        assert_eq!(backoff(10), Duration::from_secs(30));
        assert_eq!(backoff(1000), Duration::from_secs(30));
    }

    #[test]
    fn orders_are_polled_from_one_second_up_to_thirty() {
        assert_eq!(poll_interval(1), Duration::from_secs(1));
        assert_eq!(poll_interval(2), Duration::from_secs(2));
        assert_eq!(poll_interval(5), Duration::from_secs(16));
        assert_eq!(poll_interval(6), Duration::from_secs(30));
        assert_eq!(poll_interval(u32::MAX), Duration::from_secs(30));
    }
}
