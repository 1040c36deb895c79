//! The `yidi.v1.Intake` gRPC service: validation (proto → domain), then service.rs, then domain →
//! proto. Invalid input never reaches service.rs.
use std::pin::Pin;

use prost::Message;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use yidi_domain::ApplicationKind;
use yidi_grpc::{
    ApiError, FieldViolations,
    caller::{caller_of, ensure_acting_for_itself},
    convert::{document_from_proto, kind_to_proto, refusal_to_proto, state_from_proto, state_to_proto, timestamp},
    page::{self, Filter, page_size},
};
use yidi_idempotency::IdempotencyKey;
use yidi_proto::v1 as pb;

use crate::{
    handlers::DispatchNotice,
    service::{Applicant, ApplicationView, Intake},
    withdrawal::WithdrawError,
};

/// Longest accepted card serial, document number or agent number.
const MAX_SHORT: usize = 64;

pub struct IntakeGrpc {
    intake: Intake,
}

impl IntakeGrpc {
    pub fn new(intake: Intake) -> Self {
        Self { intake }
    }

    fn today(&self) -> chrono::NaiveDate {
        self.intake.clock().today()
    }

    /// Validates the applicant and card serial of a loss report or its withdrawal.
    fn applicant_and_serial(
        &self,
        raw_applicant: Option<&pb::Applicant>,
        raw_serial: &str,
    ) -> Result<(Applicant, String), ApiError> {
        let mut v = FieldViolations::new();
        let applicant = applicant(&mut v, raw_applicant, self.today());
        let serial = card_serial(&mut v, raw_serial);
        v.finish()?;
        let (Some(applicant), Some(serial)) = (applicant, serial) else {
            return Err(malformed());
        };
        Ok((applicant, serial))
    }
}

/// Validates the person at the counter; every problem is reported under `applicant.*`.
fn applicant(
    v: &mut FieldViolations,
    applicant: Option<&pb::Applicant>,
    today: chrono::NaiveDate,
) -> Option<Applicant> {
    let empty = pb::Applicant::default();
    let a = applicant.unwrap_or(&empty);
    let id_number = v.id_number("applicant.id_number", &a.id_number, today);
    let province = v.province("applicant.declared_province", &a.declared_province).map(str::to_owned);
    let live = a.live.clone().unwrap_or_default();
    let face = v.template("applicant.live.face_template", &live.face_template).map(<[u8]>::to_vec);
    let fingerprint = v.template("applicant.live.fingerprint_template", &live.fingerprint_template).map(<[u8]>::to_vec);
    let document = a.document.clone().unwrap_or_default();
    let document_kind =
        v.enumeration::<pb::DocumentKind>("applicant.document.kind", document.kind).and_then(document_from_proto);
    v.required("applicant.document.number", &document.number, MAX_SHORT);
    let agent = v.bounded("applicant.agent_id_number", &a.agent_id_number, MAX_SHORT).map(str::to_owned);
    Some(Applicant {
        id_number: id_number?,
        declared_province: province?,
        face_template: face?,
        fingerprint_template: fingerprint?,
        document_kind: document_kind?,
        agent_id_number: agent?,
    })
}

fn card_serial(v: &mut FieldViolations, value: &str) -> Option<String> {
    // Optional: empty means the citizen's current card, as the home bureau's register knows it.
    v.bounded("card_serial", value, MAX_SHORT).map(str::to_owned)
}

fn malformed() -> ApiError {
    ApiError::Internal("validation passed without a value".into())
}

fn application_id(raw: &str) -> Result<String, ApiError> {
    let mut v = FieldViolations::new();
    let id = v.resource_id("application_id", raw).map(str::to_owned);
    v.finish()?;
    id.ok_or_else(malformed)
}

pub fn to_proto(view: ApplicationView) -> pb::Application {
    pb::Application {
        application_id: view.application_id,
        kind: kind_to_proto(view.kind) as i32,
        state: state_to_proto(view.state) as i32,
        refusal_reason: view.refusal_reason.map_or(pb::RefusalReason::Unspecified, refusal_to_proto) as i32,
        id_number_masked: view.id_number_masked,
        home_bureau_id: view.home_bureau_id,
        previous_card_serial: view.previous_card_serial,
        new_card_serial: view.new_card_serial,
        order_id: view.order_id,
        loss_recorded: view.loss_recorded,
        created_at: Some(timestamp(view.created_at)),
        updated_at: Some(timestamp(view.updated_at)),
        last_error: view.last_error,
        history: view
            .history
            .into_iter()
            .map(|h| pb::StateChange {
                state: state_to_proto(h.state) as i32,
                at: Some(timestamp(h.at)),
                note: h.note,
                bureau_id: h.bureau_id,
            })
            .collect(),
    }
}

/// The face the home bureau enrolled, from the signed decision stored with the application
/// (`None`: unreadable); collection (C3) matches the live face against it.
fn enrolled_face(stored_decision: &[u8]) -> Option<Vec<u8>> {
    let signed = pb::SignedDecision::decode(stored_decision).ok()?;
    Some(signed.decision.and_then(|d| d.card).map(|card| card.face_template).unwrap_or_default())
}

/// Caller, method and `idempotency-key` of a keyed call (see `Intake::submit`).
fn request_key<T>(request: &Request<T>, method: &str) -> Option<String> {
    let key = request.extensions().get::<IdempotencyKey>()?;
    let caller = caller_of(request.extensions()).map(|caller| caller.id().to_owned()).unwrap_or_default();
    Some(format!("{caller}\n{method}\n{}", key.0))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchApplicationResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::intake_server::Intake for IntakeGrpc {
    async fn submit_application(
        &self,
        request: Request<pb::SubmitApplicationRequest>,
    ) -> Result<Response<pb::SubmitApplicationResponse>, Status> {
        let request_key = request_key(&request, "SubmitApplication");
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let kind = match v.enumeration::<pb::ApplicationKind>("kind", request.kind) {
            Some(pb::ApplicationKind::Replacement) => Some(ApplicationKind::Replacement),
            Some(pb::ApplicationKind::Renewal) => Some(ApplicationKind::Renewal),
            Some(pb::ApplicationKind::LossReport) => {
                v.add("kind", "a loss report alone is lodged with ReportLoss; use ReportLoss");
                None
            }
            _ => None,
        };
        let applicant = applicant(&mut v, request.applicant.as_ref(), self.today());
        let serial = card_serial(&mut v, &request.card_serial);
        v.finish()?;
        let (Some(kind), Some(applicant), Some(serial)) = (kind, applicant, serial) else {
            return Err(malformed().into());
        };
        let view = self.intake.submit(kind, applicant, serial, request_key).await?;
        Ok(Response::new(pb::SubmitApplicationResponse { application: Some(to_proto(view)) }))
    }

    async fn get_application(
        &self,
        request: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::GetApplicationResponse>, Status> {
        let id = application_id(&request.get_ref().application_id)?;
        let view = self.intake.get(&id).await?;
        Ok(Response::new(pb::GetApplicationResponse { application: Some(to_proto(view)) }))
    }

    async fn get_application_timeline(
        &self,
        request: Request<pb::GetApplicationTimelineRequest>,
    ) -> Result<Response<pb::GetApplicationTimelineResponse>, Status> {
        let id = application_id(&request.get_ref().application_id)?;
        let mut view = self.intake.get(&id).await?;
        let deliveries = std::mem::take(&mut view.deliveries);
        Ok(Response::new(pb::GetApplicationTimelineResponse {
            application: Some(to_proto(view)),
            deliveries: deliveries.into_iter().map(yidi_outbox::rpc::to_proto).collect(),
        }))
    }

    async fn get_application_outcome(
        &self,
        request: Request<pb::GetApplicationOutcomeRequest>,
    ) -> Result<Response<pb::GetApplicationOutcomeResponse>, Status> {
        let mut v = FieldViolations::new();
        let raw = request.get_ref();
        let id = v.resource_id("application_id", &raw.application_id).map(str::to_owned);
        let asker = v.required("home_bureau_id", &raw.home_bureau_id, MAX_SHORT).map(str::to_owned);
        v.finish()?;
        let (Some(id), Some(asker)) = (id, asker) else {
            return Err(malformed().into());
        };
        ensure_acting_for_itself(request.extensions(), "home_bureau_id", &asker)?;
        let outcome = self.intake.outcome(&id, &asker).await?;
        let answer = if outcome.ended { pb::ApplicationOutcome::Ended } else { pb::ApplicationOutcome::Open };
        Ok(Response::new(pb::GetApplicationOutcomeResponse {
            application_id: id,
            outcome: answer as i32,
            state: state_to_proto(outcome.state) as i32,
            new_card_serial: outcome.new_card_serial.unwrap_or_default(),
            updated_at: Some(timestamp(outcome.updated_at)),
        }))
    }

    async fn notify_order_dispatched(
        &self,
        request: Request<pb::NotifyOrderDispatchedRequest>,
    ) -> Result<Response<pb::NotifyOrderDispatchedResponse>, Status> {
        let mut v = FieldViolations::new();
        let raw = request.get_ref();
        let id = v.resource_id("application_id", &raw.application_id).map(str::to_owned);
        let order_id = v.resource_id("order_id", &raw.order_id).map(str::to_owned);
        let serial = v.required("card_serial", &raw.card_serial, MAX_SHORT).map(str::to_owned);
        let producer = v.required("producer_id", &raw.producer_id, MAX_SHORT).map(str::to_owned);
        v.finish()?;
        let (Some(application_id), Some(order_id), Some(card_serial), Some(producer_id)) =
            (id, order_id, serial, producer)
        else {
            return Err(malformed().into());
        };
        ensure_acting_for_itself(request.extensions(), "producer_id", &producer_id)?;
        let notice = DispatchNotice { application_id, order_id, card_serial, producer_id };
        let state = self.intake.order_dispatched(notice).await?;
        Ok(Response::new(pb::NotifyOrderDispatchedResponse { state: state_to_proto(state) as i32 }))
    }

    async fn list_applications(
        &self,
        request: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let state = match pb::ApplicationState::try_from(request.state) {
            Ok(pb::ApplicationState::Unspecified) => None,
            Ok(state) => state_from_proto(state),
            Err(_) => {
                v.add("state", format!("unknown value {}", request.state));
                None
            }
        };
        let filter = Filter::new("intake.applications", &[&request.state.to_string()]);
        let after = page::decode(&mut v, "page_token", &request.page_token, filter);
        v.finish()?;
        let (views, next) = self.intake.list(state, after, page_size(request.page_size)).await?;
        Ok(Response::new(pb::ListApplicationsResponse {
            applications: views.into_iter().map(to_proto).collect(),
            next_page_token: next.map(|key| page::encode(filter, &key)).unwrap_or_default(),
        }))
    }

    type WatchApplicationStream = WatchStream;

    async fn watch_application(
        &self,
        request: Request<pb::WatchApplicationRequest>,
    ) -> Result<Response<Self::WatchApplicationStream>, Status> {
        let id = application_id(&request.get_ref().application_id)?;
        let receiver = self.intake.watch(&id).await?;
        let stream = ReceiverStream::new(receiver)
            .map(|view| Ok(pb::WatchApplicationResponse { application: Some(to_proto(view)) }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_application(
        &self,
        request: Request<pb::CancelApplicationRequest>,
    ) -> Result<Response<pb::CancelApplicationResponse>, Status> {
        let id = application_id(&request.get_ref().application_id)?;
        let view = self.intake.cancel(&id).await?;
        Ok(Response::new(pb::CancelApplicationResponse { application: Some(to_proto(view)) }))
    }

    async fn collect_card(
        &self,
        request: Request<pb::CollectCardRequest>,
    ) -> Result<Response<pb::CollectCardResponse>, Status> {
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let id = v.resource_id("application_id", &request.application_id).map(str::to_owned);
        let live = request.live.unwrap_or_default();
        let face = v.template("live.face_template", &live.face_template).map(<[u8]>::to_vec);
        v.finish()?;
        let (Some(id), Some(face)) = (id, face) else {
            return Err(malformed().into());
        };
        let view = self.intake.collect(&id, &face, enrolled_face).await?;
        Ok(Response::new(pb::CollectCardResponse { application: Some(to_proto(view)) }))
    }

    async fn report_loss(
        &self,
        request: Request<pb::ReportLossRequest>,
    ) -> Result<Response<pb::ReportLossResponse>, Status> {
        let request_key = request_key(&request, "ReportLoss");
        let request = request.into_inner();
        let (applicant, serial) = self.applicant_and_serial(request.applicant.as_ref(), &request.card_serial)?;
        let view = self.intake.submit(ApplicationKind::LossReport, applicant, serial, request_key).await?;
        Ok(Response::new(pb::ReportLossResponse { application: Some(to_proto(view)) }))
    }

    async fn withdraw_loss_report(
        &self,
        request: Request<pb::WithdrawLossReportRequest>,
    ) -> Result<Response<pb::WithdrawLossReportResponse>, Status> {
        let request = request.into_inner();
        let (applicant, serial) = self.applicant_and_serial(request.applicant.as_ref(), &request.card_serial)?;
        match self.intake.withdraw_loss_report(applicant, serial).await {
            Ok(answer) => Ok(Response::new(pb::WithdrawLossReportResponse {
                card_serial: answer.card_serial,
                status: answer.status,
                changed_at: answer.changed_at,
            })),
            Err(WithdrawError::Api(error)) => Err(error.into()),
            // The registry's (or home bureau's) answer, unchanged: code, message and details.
            Err(WithdrawError::Peer(status)) => Err(*status),
        }
    }
}
