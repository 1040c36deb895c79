//! The `yidi.v1.Issuance` gRPC service: validation (proto → domain), calls into the rules,
//! domain → proto. Invalid input never reaches the rules.
use std::sync::Arc;

use prost::Message;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;
use yidi_domain::Principal;
use yidi_grpc::{
    ApiError, FieldViolations,
    caller::{Caller, caller_of, ensure_acting_for_itself},
    convert::{signed_decision_from_proto, timestamp},
    validate::MAX_TEXT_LEN,
};
use yidi_proto::v1::{self as pb, issuance_server::Issuance};
use yidi_runtime::Shutdown;

use crate::{
    order::{Order, OrderState},
    service::{IssuanceService, OrderKey, OrderRequest},
};

/// How often a watch re-reads its order from the database: a change committed by another replica
/// of this producer (its outbox worker took the order's message) is published only in that
/// replica's process, so a watch held here learns of it by reading.
const WATCH_REREAD: std::time::Duration = std::time::Duration::from_secs(1);

pub struct IssuanceGrpc {
    service: Arc<IssuanceService>,
    shutdown: Shutdown,
}

impl IssuanceGrpc {
    pub fn new(service: Arc<IssuanceService>, shutdown: Shutdown) -> Self {
        Self { service, shutdown }
    }
}

fn state_to_proto(state: OrderState) -> pb::OrderState {
    match state {
        OrderState::InProduction => pb::OrderState::InProduction,
        OrderState::Registered => pb::OrderState::Registered,
        OrderState::Dispatched => pb::OrderState::Dispatched,
    }
}

fn order_to_proto(order: &Order) -> pb::Order {
    pb::Order {
        order_id: order.order_id.to_string(),
        decision_id: order.decision_id.clone(),
        application_id: order.application_id.clone(),
        station_id: order.station_id.clone(),
        state: state_to_proto(order.state) as i32,
        card_serial: order.card_serial.clone(),
        id_number_masked: order.id_number_masked.clone(),
        valid_from: order.valid_from.to_string(),
        valid_until: order.valid_until.map(|d| d.to_string()).unwrap_or_default(),
        created_at: Some(timestamp(order.created_at)),
        updated_at: Some(timestamp(order.updated_at)),
        last_error: order.last_error.clone(),
    }
}

/// An order id: a UUID.
fn order_id(violations: &mut FieldViolations, field: &str, value: &str) -> Option<Uuid> {
    let value = violations.resource_id(field, value)?;
    Uuid::parse_str(value).map_err(|_| violations.add(field, format!("{value:?} is not a UUID"))).ok()
}

pub fn validate_place_order(request: &pb::PlaceOrderRequest) -> Result<OrderRequest, ApiError> {
    let signed = signed_decision_from_proto("decision", request.decision.as_ref())?;
    let encoded = request.decision.as_ref().map(Message::encode_to_vec).unwrap_or_default();
    Ok(OrderRequest { signed, encoded })
}

pub fn validate_get_order(request: &pb::GetOrderRequest) -> Result<OrderKey, ApiError> {
    let mut violations = FieldViolations::new();
    let key = match (request.order_id.is_empty(), request.decision_id.is_empty()) {
        (true, true) => {
            violations.add("order_id", "one of order_id or decision_id is required");
            None
        }
        (false, false) => {
            violations.add("decision_id", "give either order_id or decision_id, not both");
            None
        }
        (false, true) => order_id(&mut violations, "order_id", &request.order_id).map(OrderKey::Id),
        (true, false) => violations
            .required("decision_id", &request.decision_id, MAX_TEXT_LEN)
            .map(|_| OrderKey::Decision(request.decision_id.clone())),
    };
    violations.finish()?;
    key.ok_or_else(|| FieldViolations::single("order_id", "is malformed"))
}

pub fn validate_watch_order(request: &pb::WatchOrderRequest) -> Result<Uuid, ApiError> {
    let mut violations = FieldViolations::new();
    let id = order_id(&mut violations, "order_id", &request.order_id);
    violations.finish()?;
    id.ok_or_else(|| FieldViolations::single("order_id", "is malformed"))
}

/// Orders only move forward; this key grows with every change (each change either moves the
/// state or counts an attempt), so a stale broadcast is recognised and skipped.
fn progress(order: &Order) -> (u8, i32, bool) {
    let rank = match order.state {
        OrderState::InProduction => 0,
        OrderState::Registered => 1,
        OrderState::Dispatched => 2,
    };
    (rank, order.attempts, order.retry_stopped)
}

/// S4: an order is shown only to the station that placed it. The station asking is the caller on
/// mutual TLS (a `station_id` it names must be its own), else the `station_id` the request names;
/// operators (and plaintext requests naming no station) see every order.
fn ensure_own_order(extensions: &tonic::codegen::http::Extensions, named: &str, order: &Order) -> Result<(), ApiError> {
    if !named.is_empty() {
        ensure_acting_for_itself(extensions, "station_id", named)?;
    }
    let asking = match caller_of(extensions) {
        Some(Caller { principal: Principal::Bureau { id, .. } | Principal::RelyingParty { id } }) => Some(id.as_str()),
        _ => Some(named).filter(|named| !named.is_empty()),
    };
    match asking {
        Some(station) if station != order.station_id => Err(ApiError::PermissionDenied {
            reason: "ORDER_OF_ANOTHER_STATION",
            message: format!("order {} was placed by another station than {station:?}", order.order_id),
        }),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl Issuance for IssuanceGrpc {
    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::PlaceOrderResponse>, Status> {
        let extensions = request.extensions().clone();
        let request = validate_place_order(request.get_ref())?;
        ensure_acting_for_itself(&extensions, "decision.station_id", &request.signed.decision.station_id)?;
        let order = self.service.place_order(request).await?;
        Ok(Response::new(pb::PlaceOrderResponse { order: Some(order_to_proto(&order)) }))
    }

    async fn get_order(&self, request: Request<pb::GetOrderRequest>) -> Result<Response<pb::GetOrderResponse>, Status> {
        let key = validate_get_order(request.get_ref())?;
        let order = self.service.get_order(&key).await?;
        ensure_own_order(request.extensions(), &request.get_ref().station_id, &order)?;
        Ok(Response::new(pb::GetOrderResponse { order: Some(order_to_proto(&order)) }))
    }

    type WatchOrderStream = ReceiverStream<Result<pb::WatchOrderResponse, Status>>;

    async fn watch_order(
        &self,
        request: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let id = validate_watch_order(request.get_ref())?;
        // Subscribe before reading, so no change between the read and the first receive is lost.
        let mut changes = self.service.subscribe();
        let current = self.service.get_order(&OrderKey::Id(id)).await?;
        ensure_own_order(request.extensions(), &request.get_ref().station_id, &current)?;
        let (sender, receiver) = mpsc::channel(16);
        let service = Arc::clone(&self.service);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut last = current;
            if sender.send(Ok(pb::WatchOrderResponse { order: Some(order_to_proto(&last)) })).await.is_err() {
                return;
            }
            let mut reread = tokio::time::interval(WATCH_REREAD);
            reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate: the order was just read.
            reread.tick().await;
            while !last.state.is_final() {
                let published = tokio::select! {
                    () = shutdown.wait() => return,
                    () = sender.closed() => return,
                    // A failed read is not the watch's end: the next tick or change reads again.
                    _ = reread.tick() => match service.get_order(&OrderKey::Id(id)).await {
                        Ok(order) => Some(order),
                        Err(error) => {
                            tracing::debug!(order_id = %id, %error, "watch: cannot re-read the order");
                            continue;
                        }
                    },
                    received = changes.recv() => match received {
                        Ok(order) if order.order_id == id => Some(order),
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => None,
                        Err(RecvError::Closed) => return,
                    },
                };
                let order = match published {
                    Some(order) => order,
                    None => match service.get_order(&OrderKey::Id(id)).await {
                        Ok(order) => order,
                        Err(error) => {
                            let _ = sender.send(Err(error.into())).await;
                            return;
                        }
                    },
                };
                if progress(&order) <= progress(&last) {
                    continue;
                }
                last = order;
                if sender.send(Ok(pb::WatchOrderResponse { order: Some(order_to_proto(&last)) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s4_get_order_needs_exactly_one_key() {
        let neither = pb::GetOrderRequest::default();
        assert!(matches!(validate_get_order(&neither), Err(ApiError::InvalidArgument(_))));
        let both = pb::GetOrderRequest {
            order_id: Uuid::new_v4().to_string(),
            decision_id: "d".into(),
            station_id: String::new(),
        };
        assert!(matches!(validate_get_order(&both), Err(ApiError::InvalidArgument(_))));
        let bad = pb::GetOrderRequest {
            order_id: "not-a-uuid".into(),
            decision_id: String::new(),
            station_id: String::new(),
        };
        assert!(matches!(validate_get_order(&bad), Err(ApiError::InvalidArgument(_))));
        let id = Uuid::new_v4();
        let good =
            pb::GetOrderRequest { order_id: id.to_string(), decision_id: String::new(), station_id: String::new() };
        assert_eq!(validate_get_order(&good).unwrap(), OrderKey::Id(id));
        let by_decision =
            pb::GetOrderRequest { order_id: String::new(), decision_id: "d-1".into(), station_id: String::new() };
        assert_eq!(validate_get_order(&by_decision).unwrap(), OrderKey::Decision("d-1".into()));
    }

    #[test]
    fn s4_a_missing_decision_is_invalid_argument() {
        let error = validate_place_order(&pb::PlaceOrderRequest::default()).unwrap_err();
        assert!(error.to_string().contains("decision"), "{error}");
        assert!(matches!(error, ApiError::InvalidArgument(_)));
    }
}
