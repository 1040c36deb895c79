//! The station's outbox handlers: what it sends the other bureaus (one [`Topic`] per step),
//! delivered from its outbox (see `yidi_outbox`): verification by the home bureau → the loss report to the registry →
//! the order to the producer → following the order until the card is dispatched → telling the
//! home bureau the application ended (K5). Each step's answer is recorded in one transaction with
//! the message it answers and the message the next step owes, so a crash anywhere leaves either
//! the step undone (and its message still pending) or done (and the next one queued).
use std::time::Duration;

use prost::Message;
use tracing::Instrument;
use yidi_audit::AuditEntry;
use yidi_domain::{ApplicationKind, ApplicationState, mask::mask_id_number};
use yidi_grpc::ApiError;
use yidi_outbox::{self as outbox, Delivery, Handler, NewMessage};
use yidi_proto::v1 as pb;

use crate::{
    entities::application,
    peers::PeerError,
    repo::{Changes, Messages, Transition},
    service::{Inner, Intake},
    topic::Topic,
};

/// What a newly approved application owes next: its loss report (K1, K3) or its card. A
/// replacement approved without a loss decision is a first card (K4: at home only), with no card
/// to report lost: it goes straight to the order.
fn after_approval(
    intake: &Intake,
    model: &application::Model,
    kind: ApplicationKind,
    loss_decision: bool,
) -> Option<NewMessage> {
    let station = &intake.inner.station;
    match kind {
        ApplicationKind::LossReport => Some(Topic::ReportLoss.message(&model.application_id, &station.registry_id)),
        ApplicationKind::Replacement if loss_decision => {
            Some(Topic::ReportLoss.message(&model.application_id, &station.registry_id))
        }
        ApplicationKind::Replacement | ApplicationKind::Renewal => {
            Some(Topic::PlaceOrder.message(&model.application_id, &station.producer_id))
        }
    }
}

/// The home bureau's signed decision as stored with the application (see `verify_step`).
fn decode_decision(bytes: Option<&[u8]>) -> Option<pb::SignedDecision> {
    pb::SignedDecision::decode(bytes?).ok()
}

/// Between polls of an order still in production: half the time it has waited so far, from 1 s
/// up to 30 s, so a slow order costs few calls. The poll is the fallback: the producer tells the
/// station when it dispatches the card (`NotifyOrderDispatched`, see [`Intake::order_dispatched`]),
/// and the first poll waits `worker.order_poll_after_ms` for that.
pub fn poll_interval(waited: Duration) -> Duration {
    (waited / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Why a step did not complete, mapped onto the outbox's outcomes.
fn from_peer(error: PeerError) -> Delivery {
    if error.is_transient() { Delivery::Retry(error.to_string()) } else { Delivery::Fail(error.to_string()) }
}

fn from_api(error: ApiError) -> Delivery {
    match error {
        ApiError::Database(error) => Delivery::Retry(format!("station database: {error}")),
        other => Delivery::Fail(other.to_string()),
    }
}

/// Whether the application, as it is now, still needs what `topic` sends.
fn still_owed(topic: Topic, model: &application::Model) -> bool {
    use ApplicationState as S;
    let state = model.state.into();
    match topic {
        Topic::Verify => matches!(state, S::Received | S::Verifying),
        Topic::ReportLoss => state == S::Approved && !model.loss_recorded,
        Topic::PlaceOrder => state == S::Approved || (state == S::InProduction && model.order_id.is_none()),
        Topic::AwaitOrder => state == S::InProduction,
        Topic::CloseApplication => matches!(state, S::Collected | S::Cancelled) && !model.home_notified,
        // Repeat-safe at the registry: delivered until it answers.
        Topic::RecordCollection => state == S::Collected,
    }
}

impl Intake {
    async fn read(&self, application_id: &str) -> Result<application::Model, Delivery> {
        match self.inner.repo.get(application_id).await {
            Ok(Some(model)) => Ok(model),
            Ok(None) => Err(Delivery::Fail(format!("application {application_id} does not exist"))),
            Err(error) => Err(Delivery::Retry(format!("station database: {error}"))),
        }
    }
}

impl Handler for Intake {
    async fn deliver(&self, message: &outbox::Model) -> Delivery {
        let model = match self.read(&message.subject).await {
            Ok(model) => model,
            Err(outcome) => return outcome,
        };
        // A topic this station does not send is undeliverable: a dead letter at once.
        let topic = match message.topic.parse::<Topic>() {
            Ok(topic) => topic,
            Err(unknown) => return Delivery::Fail(unknown.to_string()),
        };
        let state = ApplicationState::from(model.state);
        // The step continues the trace of the request that lodged the application.
        let span = tracing::info_span!("application_step", application_id = %model.application_id, %topic, state = state.as_str());
        yidi_runtime::telemetry::continue_trace(&span, model.trace_context.as_deref());
        let outcome = step(self, message, topic, &model).instrument(span).await;
        match &outcome {
            // Watchers are told once the message is settled (`settled` below).
            Delivery::Delivered | Delivery::Answered => {}
            // A failure of a step no longer due (the application was cancelled meanwhile) is no
            // one's concern: it must neither be retried nor mark the application.
            Delivery::Retry(error) | Delivery::Fail(error) => {
                if let Ok(now) = self.read(&message.subject).await
                    && !still_owed(topic, &now)
                {
                    let state = ApplicationState::from(now.state);
                    return Delivery::Dropped(format!("application is {} ({error})", state.as_str()));
                }
            }
            Delivery::Later { .. } | Delivery::Dropped(_) => {}
        }
        outcome
    }

    async fn settled(&self, message: &outbox::Model) {
        // Watchers see attempts, errors and dead letters as they happen.
        self.publish(&message.subject);
    }
}

/// What a step works on: the station, the message being delivered and the application as read for it.
#[derive(Clone, Copy)]
struct Step<'a> {
    intake: &'a Intake,
    inner: &'a Inner,
    message: &'a outbox::Model,
    model: &'a application::Model,
    id: &'a str,
    kind: ApplicationKind,
    state: ApplicationState,
}

async fn step(intake: &Intake, message: &outbox::Model, topic: Topic, model: &application::Model) -> Delivery {
    let (kind, state): (ApplicationKind, ApplicationState) = (model.kind.into(), model.state.into());
    if !still_owed(topic, model) {
        return overtaken(model, state);
    }
    let step = Step { intake, inner: &intake.inner, message, model, id: &model.application_id, kind, state };
    let result = match topic {
        Topic::Verify => verify_step(step).await,
        Topic::ReportLoss => report_loss_step(step).await,
        Topic::PlaceOrder => place_order_step(step).await,
        Topic::AwaitOrder => await_order_step(step).await,
        Topic::CloseApplication => close_step(step).await,
        Topic::RecordCollection => record_collection_step(step).await,
    };
    result.unwrap_or_else(from_api)
}

fn overtaken(model: &application::Model, state: ApplicationState) -> Delivery {
    Delivery::Dropped(format!("application {} is {}", model.application_id, state.as_str()))
}

async fn verify_step(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { intake, inner, message, model, id, kind, state } = step;
    match state {
        ApplicationState::Received => {
            let sent = Transition {
                application_id: id,
                from: &[ApplicationState::Received],
                to: ApplicationState::Verifying,
                changes: Changes::default(),
                note: format!("sent to home bureau {}", model.home_bureau_id),
                audit: None,
                messages: Messages::default(),
            };
            if inner.repo.transition(sent, intake.clock().now()).await? {
                intake.publish(id);
            } else {
                // Moved on meanwhile (cancelled, or sent by another replica): judged on the new state.
                let now = match intake.read(id).await {
                    Ok(now) => now,
                    Err(outcome) => return Ok(outcome),
                };
                let state = ApplicationState::from(now.state);
                if state != ApplicationState::Verifying {
                    return Ok(overtaken(&now, state));
                }
            }
        }
        ApplicationState::Verifying => {}
        other => return Ok(overtaken(model, other)),
    }
    let issue = kind.makes_a_card();
    let request = pb::VerifyRequest {
        application_id: model.application_id.clone(),
        station_id: inner.station.id.clone(),
        purpose: if issue { pb::DecisionPurpose::IssueCard } else { pb::DecisionPurpose::ReportLoss } as i32,
        kind: yidi_grpc::convert::kind_to_proto(kind) as i32,
        id_number: model.id_number.clone(),
        card_serial: model.previous_card_serial.clone(),
        live: Some(pb::Biometrics {
            face_template: model.live_face_template.clone(),
            fingerprint_template: model.live_fingerprint_template.clone(),
        }),
        producer_id: if issue { inner.station.producer_id.clone() } else { String::new() },
        declared_province: model.declared_province.clone(),
        request_id: String::new(),
    };
    let answer = match inner.peers.verify(&model.home_bureau_id, request, &message.id).await {
        Ok(answer) => answer,
        Err(error) => return Ok(from_peer(error)),
    };
    let masked = mask_id_number(&model.id_number);
    if let Some(decision) = answer.decision {
        let decision_id = decision.decision.as_ref().map(|d| d.decision_id.clone()).unwrap_or_default();
        let loss_decision = answer.loss_decision.is_some();
        let changes = Changes {
            // The home bureau names the card concerned (the register's current card when none was given).
            previous_card_serial: decision
                .decision
                .as_ref()
                .map(|d| d.previous_card_serial.clone())
                .filter(|s| !s.is_empty()),
            decision: Some(decision.encode_to_vec()),
            loss_decision: answer.loss_decision.map(|d| d.encode_to_vec()),
            ..Changes::default()
        };
        let approved = Transition {
            application_id: id,
            from: &[ApplicationState::Verifying],
            to: ApplicationState::Approved,
            changes,
            note: format!("approved by {} (decision {decision_id})", model.home_bureau_id),
            audit: Some(AuditEntry::new("verification", masked, "approved", format!("decision {decision_id}"))),
            messages: Messages::answering(&message.id).and_owe(after_approval(intake, model, kind, loss_decision)),
        };
        if inner.repo.transition(approved, intake.clock().now()).await? {
            tracing::info!(application_id = %id, %decision_id, "approved by the home bureau");
            return Ok(Delivery::Answered);
        }
        return approved_after_cancel(step).await;
    }
    let Some(reason) =
        pb::RefusalReason::try_from(answer.refusal_reason).ok().and_then(yidi_grpc::convert::refusal_from_proto)
    else {
        return Ok(Delivery::Fail(format!("{} answered neither a decision nor a known refusal", model.home_bureau_id)));
    };
    let refused = Transition {
        application_id: id,
        from: &[ApplicationState::Verifying],
        to: ApplicationState::Refused,
        changes: Changes { refusal_reason: Some(reason), ..Changes::default() },
        note: format!("refused by {}: {}", model.home_bureau_id, reason.code()),
        audit: Some(AuditEntry::new("verification", masked, "refused", reason.code())),
        messages: Messages::answering(&message.id),
    };
    if inner.repo.transition(refused, intake.clock().now()).await? {
        tracing::info!(application_id = %id, reason = reason.code(), "refused by the home bureau");
        return Ok(Delivery::Answered);
    }
    Ok(Delivery::Dropped(format!("application {id} moved on while the home bureau refused it")))
}

/// K5: the home bureau approved an application the station had moved on from meanwhile. If it
/// was cancelled, the home bureau now holds it open: a close is owed unless one is still on its way
/// (a close already delivered may have come before this approval was committed).
async fn approved_after_cancel(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { intake, inner, message, id, kind, .. } = step;
    let now = match intake.read(id).await {
        Ok(now) => now,
        Err(outcome) => return Ok(outcome),
    };
    let state = ApplicationState::from(now.state);
    if state != ApplicationState::Cancelled || !crate::service::owes_a_close(kind) {
        return Ok(Delivery::Dropped(format!("application {id} moved on while the home bureau approved it")));
    }
    let (changes, owed) = if now.home_notified {
        (Changes { home_notified: Some(false), ..Changes::default() }, Some(crate::service::closing(&now)))
    } else {
        (Changes::default(), None)
    };
    let queued = owed.is_some();
    let entry = AuditEntry::new(
        "verification",
        mask_id_number(&now.id_number),
        "approved_after_cancel",
        format!("application {id}: the home bureau is told it was cancelled"),
    );
    let messages = Messages::answering(&message.id).and_owe(owed);
    if !inner.repo.update_in_state(id, state, changes, Some(entry), messages, intake.clock().now()).await? {
        return Ok(Delivery::Retry(format!("application {id} changed while its late approval was answered")));
    }
    tracing::info!(application_id = %id, close_queued = queued, "approved after a cancel: the home bureau is told");
    Ok(Delivery::Answered)
}

/// K1, K3: the loss report is filed before any card is ordered.
async fn report_loss_step(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { intake, inner, message, model, id, kind, state } = step;
    if state != ApplicationState::Approved {
        return Ok(overtaken(model, state));
    }
    if model.loss_recorded {
        return Ok(Delivery::Dropped(format!("the loss report of application {id} is already recorded")));
    }
    let decision = match kind {
        ApplicationKind::LossReport => decode_decision(model.decision.as_deref()),
        _ => decode_decision(model.loss_decision.as_deref()),
    };
    let Some(decision) = decision else {
        return Ok(Delivery::Fail("the stored loss decision is unreadable".into()));
    };
    let registry = &inner.station.registry_id;
    let detail = match inner.peers.report_loss(registry, decision, &message.id).await {
        Ok(response) => format!(
            "card {} {}",
            response.card_serial,
            if response.already_reported { "already reported" } else { "reported lost" }
        ),
        // Our decision was used before (we reported, then crashed before recording it).
        Err(error) if error.code() == Some(tonic::Code::AlreadyExists) => {
            format!("card {} already reported by this application", model.previous_card_serial)
        }
        Err(error) => return Ok(from_peer(error)),
    };
    let changes = Changes { loss_recorded: true, ..Changes::default() };
    let audit = Some(AuditEntry::new("loss_report", mask_id_number(&model.id_number), "recorded", detail));
    let recorded = if kind.makes_a_card() {
        // The card is ordered next: the application enters production in this same transaction
        // (one commit fewer than a separate step; see `place_order_step`).
        let producer = &inner.station.producer_id;
        let ordering = Transition {
            application_id: id,
            from: &[ApplicationState::Approved],
            to: ApplicationState::InProduction,
            changes,
            note: format!("ordering from {producer}"),
            audit,
            messages: Messages::answering(&message.id).and_owe(Some(Topic::PlaceOrder.message(id, producer))),
        };
        inner.repo.transition(ordering, intake.clock().now()).await?
    } else {
        let messages = Messages::answering(&message.id);
        let now = intake.clock().now();
        inner.repo.update_in_state(id, ApplicationState::Approved, changes, audit, messages, now).await?
    };
    if !recorded {
        return Ok(Delivery::Dropped(format!("application {id} moved on while its loss report was filed")));
    }
    tracing::info!(application_id = %id, "loss report recorded by the registry");
    Ok(Delivery::Answered)
}

/// Orders the card. The intent is recorded first: once IN_PRODUCTION the application can no longer
/// be cancelled, so a cancel either wins before (and no order is placed) or is refused.
async fn place_order_step(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { intake, inner, message, model, id, state, .. } = step;
    let producer = &inner.station.producer_id;
    match state {
        ApplicationState::Approved => {
            let ordering = Transition {
                application_id: id,
                from: &[ApplicationState::Approved],
                to: ApplicationState::InProduction,
                changes: Changes::default(),
                note: format!("ordering from {producer}"),
                audit: None,
                messages: Messages::default(),
            };
            if !inner.repo.transition(ordering, intake.clock().now()).await? {
                return Ok(Delivery::Retry(format!("application {id} changed while ordering; judged again")));
            }
            intake.publish(id);
        }
        ApplicationState::InProduction if model.order_id.is_none() => {}
        other => return Ok(overtaken(model, other)),
    }
    let Some(decision) = decode_decision(model.decision.as_deref()) else {
        return Ok(Delivery::Fail("the stored decision is unreadable".into()));
    };
    let decision_id = decision.decision.as_ref().map(|d| d.decision_id.clone()).unwrap_or_default();
    // Idempotent at the producer: a decision already used answers ALREADY_EXISTS, and the order is
    // then looked up by its decision.
    let order = match inner.peers.place_order(producer, decision, &message.id).await {
        Ok(order) => order,
        Err(error) if error.code() == Some(tonic::Code::AlreadyExists) => {
            match inner.peers.get_order(producer, &inner.station.id, "", &decision_id).await {
                Ok(order) => order,
                Err(error) => return Ok(from_peer(error)),
            }
        }
        Err(error) => return Ok(from_peer(error)),
    };
    let changes = Changes {
        order_id: Some(order.order_id.clone()),
        new_card_serial: Some(order.card_serial.clone()).filter(|s| !s.is_empty()),
        ..Changes::default()
    };
    let stored = inner
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
            Messages::answering(&message.id).and_owe(Some(await_order(inner, id))),
            intake.clock().now(),
        )
        .await?;
    if !stored {
        return Ok(Delivery::Retry(format!("application {id} changed while its order was stored")));
    }
    tracing::info!(application_id = %id, order_id = %order.order_id, "order placed");
    Ok(Delivery::Answered)
}

/// Follows the order until the producer has dispatched the card to the station.
async fn await_order_step(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { intake, inner, message, model, id, state, .. } = step;
    if state != ApplicationState::InProduction {
        return Ok(overtaken(model, state));
    }
    let Some(order_id) = model.order_id.clone() else {
        return Ok(Delivery::Fail(format!("application {id} has no order to follow")));
    };
    let order = match inner.peers.get_order(&inner.station.producer_id, &inner.station.id, &order_id, "").await {
        Ok(order) => order,
        Err(error) => return Ok(from_peer(error)),
    };
    if order.state != pb::OrderState::Dispatched as i32 {
        let waited = (chrono::Utc::now() - message.created_at).to_std().unwrap_or_default();
        // What the producer is struggling with, if anything, shows on the message.
        let note = Some(order.last_error).filter(|e| !e.is_empty());
        return Ok(Delivery::Later { after: poll_interval(waited), note });
    }
    let how = format!("found by asking {}", inner.station.producer_id);
    if inner.repo.transition(card_dispatched(model, &order_id, &order.card_serial, &how), intake.clock().now()).await? {
        tracing::info!(application_id = %id, %order_id, "card dispatched (found by polling the producer)");
        return Ok(Delivery::Answered);
    }
    Ok(Delivery::Dropped(format!("application {id} moved on while its card was dispatched")))
}

/// The fallback poll of an order just placed: due only after `worker.order_poll_after_ms`, by when
/// the producer has normally told the station the card is dispatched (and this message is settled
/// without ever being sent).
fn await_order(inner: &Inner, application_id: &str) -> NewMessage {
    let after = chrono::Duration::from_std(inner.order_poll_after).unwrap_or_else(|_| chrono::Duration::zero());
    NewMessage {
        not_before: Some(chrono::Utc::now() + after),
        ..Topic::AwaitOrder.message(application_id, &inner.station.producer_id)
    }
}

/// IN_PRODUCTION → READY_FOR_COLLECTION: the producer dispatched the card of `order_id`, as it
/// told us or as we found by asking (`how`). Settles, in the same transaction, whatever still
/// waits on the order: the fallback poll, and a PlaceOrder whose answer is still being stored.
fn card_dispatched<'a>(model: &'a application::Model, order_id: &str, card_serial: &str, how: &str) -> Transition<'a> {
    let id = model.application_id.as_str();
    Transition {
        application_id: id,
        from: &[ApplicationState::InProduction],
        to: ApplicationState::ReadyForCollection,
        changes: Changes {
            order_id: Some(order_id.to_owned()),
            new_card_serial: Some(card_serial.to_owned()).filter(|s| !s.is_empty()),
            ..Changes::default()
        },
        note: format!("card {card_serial} dispatched to the station"),
        audit: Some(AuditEntry::new(
            "card_dispatched",
            mask_id_number(&model.id_number),
            "ready_for_collection",
            format!("order {order_id} card {card_serial} ({how})"),
        )),
        messages: Messages::default().settling(id, vec![Topic::AwaitOrder.as_str(), Topic::PlaceOrder.as_str()]),
    }
}

/// What the producer says in `NotifyOrderDispatched`, validated.
#[derive(Debug, Clone)]
pub struct DispatchNotice {
    pub application_id: String,
    pub order_id: String,
    pub card_serial: String,
    pub producer_id: String,
}

impl Intake {
    /// The producer tells the station the card of an order placed here is dispatched: the
    /// application is ready at once. Repeat-safe (a notice for an application already ready or
    /// collected answers its state). Only the entrusted producer is heard, and only about an order
    /// it was given: a notice naming another order or card is refused, never applied.
    pub async fn order_dispatched(&self, notice: DispatchNotice) -> Result<ApplicationState, ApiError> {
        let producer = &self.inner.station.producer_id;
        if &notice.producer_id != producer {
            return Err(ApiError::PermissionDenied {
                reason: "NOT_THE_PRODUCER",
                message: format!("this station orders its cards from {producer:?}, not {:?}", notice.producer_id),
            });
        }
        let id = notice.application_id.as_str();
        // Twice at most: a transition lost to a concurrent one (the fallback poll) is judged again.
        for _ in 0..2 {
            let model = match self.inner.repo.get(id).await? {
                Some(model) => model,
                None => return Err(ApiError::not_found("application", id)),
            };
            let state = ApplicationState::from(model.state);
            let names = |stored: &Option<String>, told: &str| stored.as_deref().is_none_or(|stored| stored == told);
            if !names(&model.order_id, &notice.order_id) || !names(&model.new_card_serial, &notice.card_serial) {
                return Err(ApiError::precondition(
                    "ORDER_MISMATCH",
                    format!(
                        "application {id} awaits order {} card {}, not order {} card {}",
                        model.order_id.as_deref().unwrap_or("?"),
                        model.new_card_serial.as_deref().unwrap_or("?"),
                        notice.order_id,
                        notice.card_serial
                    ),
                ));
            }
            match state {
                ApplicationState::InProduction => {
                    let how = format!("told by {producer}");
                    let ready = card_dispatched(&model, &notice.order_id, &notice.card_serial, &how);
                    if self.inner.repo.transition(ready, self.clock().now()).await? {
                        tracing::info!(application_id = %id, order_id = %notice.order_id, "card dispatched (told by the producer)");
                        self.publish(id);
                        return Ok(ApplicationState::ReadyForCollection);
                    }
                }
                ApplicationState::ReadyForCollection | ApplicationState::Collected => return Ok(state),
                other => {
                    return Err(ApiError::precondition(
                        "NOT_IN_PRODUCTION",
                        format!("application {id} is {}: it awaits no card", other.as_str()),
                    ));
                }
            }
        }
        Err(ApiError::unavailable(&self.inner.station.id, format!("application {id} is changing; try again")))
    }
}

/// Tells the home bureau the application ended, so it is no longer open there (K5).
async fn close_step(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { intake, inner, message, model, state, .. } = step;
    if !matches!(state, ApplicationState::Collected | ApplicationState::Cancelled) {
        return Ok(Delivery::Fail(format!("application {} is {}, not ended", model.application_id, state.as_str())));
    }
    if model.home_notified {
        return Ok(Delivery::Dropped("the home bureau was already told".into()));
    }
    let request = pb::CloseApplicationRequest {
        application_id: model.application_id.clone(),
        final_state: yidi_grpc::convert::state_to_proto(state) as i32,
        new_card_serial: if state == ApplicationState::Collected {
            model.new_card_serial.clone().unwrap_or_default()
        } else {
            String::new()
        },
        station_id: inner.station.id.clone(),
        request_id: String::new(),
    };
    match inner.peers.close_application(&model.home_bureau_id, request, &message.id).await {
        Ok(_) => {}
        // Never opened there. A cancel never gets this from a home bureau that remembers a close
        // arriving before its Verify (K5); only a bureau without that would answer it.
        Err(error) if error.code() == Some(tonic::Code::NotFound) => {}
        Err(error) => return Ok(from_peer(error)),
    }
    let changes = Changes { home_notified: Some(true), ..Changes::default() };
    let recorded = inner
        .repo
        .update_in_state(
            &model.application_id,
            state,
            changes,
            None,
            Messages::answering(&message.id),
            intake.clock().now(),
        )
        .await?;
    tracing::info!(application_id = %model.application_id, state = state.as_str(), "home bureau notified");
    // Not recorded (the application changed meanwhile): the dispatcher marks the message.
    Ok(if recorded { Delivery::Answered } else { Delivery::Delivered })
}

/// C3, S1: the registry learns of the hand-over; only then is the new card valid and the old one
/// revoked. Until it answers, relying parties are told the card awaits collection: never "valid"
/// too early.
async fn record_collection_step(step: Step<'_>) -> Result<Delivery, ApiError> {
    let Step { inner, message, model, id, state, .. } = step;
    if state != ApplicationState::Collected {
        return Ok(overtaken(model, state));
    }
    let Some(serial) = model.new_card_serial.clone() else {
        return Ok(Delivery::Fail(format!("application {id} was collected without a card serial")));
    };
    let request = pb::RecordCollectionRequest {
        station_id: inner.station.id.clone(),
        id_number: model.id_number.clone(),
        card_serial: serial,
        request_id: String::new(),
    };
    let response = match inner.peers.record_collection(&inner.station.registry_id, request, &message.id).await {
        Ok(response) => response,
        Err(error) => return Ok(from_peer(error)),
    };
    tracing::info!(
        application_id = %id,
        card = %response.card_serial,
        revoked = response.revoked_card_serials.len(),
        "collection recorded by the registry"
    );
    Ok(Delivery::Delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_polled_from_one_second_up_to_thirty() {
        assert_eq!(poll_interval(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(poll_interval(Duration::from_secs(8)), Duration::from_secs(4));
        assert_eq!(poll_interval(Duration::from_secs(3600)), Duration::from_secs(30));
    }
}
