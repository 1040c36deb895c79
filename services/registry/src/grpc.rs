//! The `yidi.v1.LossRegistry` gRPC service: validates requests (proto → domain), calls the rules,
//! and answers (domain → proto). Invalid input never reaches the rules.
use std::sync::Arc;

use chrono::NaiveDate;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, codegen::http::Extensions};
use yidi_domain::{IdNumber, Principal, SignedDecision, status::MAX_NONCE_LEN};
use yidi_grpc::{
    ApiError, FieldViolations,
    caller::{caller_of, ensure_acting_for_itself},
    convert::{card_status_to_proto, signed_decision_from_proto, status_statement_to_proto, timestamp},
    page::{self, Filter, page_size},
    validate::MAX_TEXT_LEN,
};
use yidi_proto::v1::{self as pb, loss_registry_server::LossRegistry};

use crate::{
    service::{CardQuery, Collection, Registry},
    snapshot::Snapshots,
};

/// Longest card serial accepted.
pub const MAX_SERIAL_LEN: usize = 64;
/// Longest relying party name accepted.
pub const MAX_RELYING_PARTY_LEN: usize = 128;
/// Most cards per CheckCards call, and hits per ReportLocalHits call.
pub const MAX_BATCH: usize = 1000;
/// Bytes per GetStatusSnapshotResponse: well under the 4 MiB a client accepts by default.
const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

pub struct RegistryGrpc {
    service: Arc<Registry>,
    snapshots: Arc<Snapshots>,
}

impl RegistryGrpc {
    pub fn new(service: Arc<Registry>, snapshots: Arc<Snapshots>) -> Self {
        Self { service, snapshots }
    }

    /// Reads a signed decision and checks the parts the registry stores: the holder's number
    /// (N1, N2) and, for loss and withdrawal decisions, the serial of the card concerned.
    fn decision(
        &self,
        signed: Option<&pb::SignedDecision>,
        needs_previous_serial: bool,
    ) -> Result<SignedDecision, ApiError> {
        let decision = signed_decision_from_proto("decision", signed)?;
        let mut v = FieldViolations::new();
        let today = self.service.today();
        if let Err(error) = IdNumber::parse(&decision.decision.card.holder.id_number, today) {
            v.add("decision.decision.card.id_number", error.to_string());
        }
        if needs_previous_serial {
            v.required(
                "decision.decision.previous_card_serial",
                &decision.decision.previous_card_serial,
                MAX_SERIAL_LEN,
            );
        }
        v.finish()?;
        Ok(decision)
    }
}

/// Whose misses a check counts against (C4): the authenticated caller, else the peer's address.
fn limit_key<T>(request: &Request<T>) -> String {
    if let Some(caller) = caller_of(request.extensions()) {
        return format!("caller:{}", caller.id());
    }
    match request.remote_addr() {
        Some(address) => format!("ip:{}", address.ip()),
        None => "unknown".to_owned(),
    }
}

/// Who a check is recorded for (the hits a home bureau reads name it): on an authenticated port the
/// caller, unless the request names someone; a relying party may name only itself. On a plaintext
/// port, whatever the request declares.
fn checking_party(extensions: &Extensions, declared: &str) -> Result<String, ApiError> {
    match caller_of(extensions) {
        Some(caller) if declared.is_empty() => Ok(caller.id().to_owned()),
        _ => ensure_acting_for_itself(extensions, "relying_party", declared).map(|()| declared.to_owned()),
    }
}

fn relying_party(v: &mut FieldViolations, value: &str) -> Option<String> {
    v.required("relying_party", value, MAX_RELYING_PARTY_LEN).map(str::to_owned)
}

/// Issue 16 point 5: a relying party's revocation stream names no card; its digest stands in.
fn event_to_proto(
    event: crate::repo::StatusEvent,
    card_digest: Option<[u8; 32]>,
    with_serial: bool,
) -> pb::WatchRevocationsResponse {
    // What the card became at that instant (expiry is no event).
    let status = event.status.effective(None, NaiveDate::MIN);
    pb::WatchRevocationsResponse {
        sequence: event.sequence,
        card_serial: if with_serial { event.card_serial } else { String::new() },
        status: card_status_to_proto(status) as i32,
        changed_at: Some(timestamp(event.changed_at)),
        card_digest: card_digest.map(Vec::from).unwrap_or_default(),
    }
}

fn delta_to_proto(delta: &crate::snapshot::Signed) -> pb::WatchStatusDeltasResponse {
    pb::WatchStatusDeltasResponse {
        from_sequence: delta.from_sequence,
        sequence: delta.sequence,
        delta: delta.bytes.clone(),
    }
}

fn snapshot_required(after: u64) -> ApiError {
    ApiError::precondition(
        "STATUS_SNAPSHOT_REQUIRED",
        format!("no kept delta starts at sequence {after}: fetch a new snapshot (GetStatusSnapshot)"),
    )
}

#[tonic::async_trait]
impl LossRegistry for RegistryGrpc {
    async fn report_loss(
        &self,
        request: Request<pb::LossRegistryReportLossRequest>,
    ) -> Result<Response<pb::LossRegistryReportLossResponse>, Status> {
        let extensions = request.extensions().clone();
        let request = request.into_inner();
        let signed = self.decision(request.decision.as_ref(), true)?;
        ensure_acting_for_itself(&extensions, "decision.station_id", &signed.decision.station_id)?;
        let outcome = self.service.report_loss(signed).await?;
        Ok(Response::new(pb::LossRegistryReportLossResponse {
            card_serial: outcome.card_serial,
            status: card_status_to_proto(outcome.status) as i32,
            changed_at: Some(timestamp(outcome.changed_at)),
            already_reported: outcome.already_reported,
        }))
    }

    async fn withdraw_loss_report(
        &self,
        request: Request<pb::LossRegistryWithdrawLossReportRequest>,
    ) -> Result<Response<pb::LossRegistryWithdrawLossReportResponse>, Status> {
        let extensions = request.extensions().clone();
        let request = request.into_inner();
        let signed = self.decision(request.decision.as_ref(), true)?;
        ensure_acting_for_itself(&extensions, "decision.station_id", &signed.decision.station_id)?;
        let outcome = self.service.withdraw_loss_report(signed).await?;
        Ok(Response::new(pb::LossRegistryWithdrawLossReportResponse {
            card_serial: outcome.card_serial,
            status: card_status_to_proto(outcome.status) as i32,
            changed_at: Some(timestamp(outcome.changed_at)),
        }))
    }

    async fn transfer_registration(
        &self,
        request: Request<pb::LossRegistryTransferRegistrationRequest>,
    ) -> Result<Response<pb::LossRegistryTransferRegistrationResponse>, Status> {
        let extensions = request.extensions().clone();
        let request = request.into_inner();
        let signed = self.decision(request.decision.as_ref(), false)?;
        let mut v = FieldViolations::new();
        v.required("decision.decision.transfer_to_bureau_id", &signed.decision.transfer_to_bureau_id, MAX_TEXT_LEN);
        v.finish()?;
        // Only the signer delivers its transfer.
        ensure_acting_for_itself(&extensions, "decision.bureau_id", &signed.decision.bureau_id)?;
        let outcome = self.service.transfer_registration(signed).await?;
        Ok(Response::new(pb::LossRegistryTransferRegistrationResponse {
            home_bureau_id: outcome.home_bureau_id,
            card_serials: outcome.card_serials,
            transferred_at: Some(timestamp(outcome.transferred_at)),
            already_transferred: outcome.already_transferred,
        }))
    }

    async fn register_card(
        &self,
        request: Request<pb::RegisterCardRequest>,
    ) -> Result<Response<pb::RegisterCardResponse>, Status> {
        ensure_acting_for_itself(request.extensions(), "producer_id", &request.get_ref().producer_id)?;
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let producer_id = v.required("producer_id", &request.producer_id, MAX_TEXT_LEN).map(str::to_owned);
        let card_serial = v.required("card_serial", &request.card_serial, MAX_SERIAL_LEN).map(str::to_owned);
        let signed = match self.decision(request.decision.as_ref(), false) {
            Ok(signed) => Some(signed),
            Err(ApiError::InvalidArgument(more)) => {
                for (field, description) in more.iter() {
                    v.add(field.clone(), description.clone());
                }
                None
            }
            Err(other) => return Err(other.into()),
        };
        v.finish()?;
        let (Some(signed), Some(producer_id), Some(card_serial)) = (signed, producer_id, card_serial) else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let outcome = self.service.register_card(signed, producer_id, card_serial).await?;
        // `revoked_card_serials` stays empty: older cards are revoked at collection.
        Ok(Response::new(pb::RegisterCardResponse {
            card_serial: outcome.card_serial,
            status: card_status_to_proto(outcome.status) as i32,
            ..Default::default()
        }))
    }

    async fn record_collection(
        &self,
        request: Request<pb::RecordCollectionRequest>,
    ) -> Result<Response<pb::RecordCollectionResponse>, Status> {
        ensure_acting_for_itself(request.extensions(), "station_id", &request.get_ref().station_id)?;
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let station_id = v.required("station_id", &request.station_id, MAX_TEXT_LEN).map(str::to_owned);
        let id_number = v.id_number("id_number", &request.id_number, self.service.today());
        let card_serial = v.required("card_serial", &request.card_serial, MAX_SERIAL_LEN).map(str::to_owned);
        v.finish()?;
        let (Some(station_id), Some(id_number), Some(card_serial)) = (station_id, id_number, card_serial) else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let outcome = self.service.collect(Collection { station_id, id_number, card_serial }).await?;
        Ok(Response::new(pb::RecordCollectionResponse {
            card_serial: outcome.card_serial,
            status: card_status_to_proto(outcome.status) as i32,
            revoked_card_serials: outcome.revoked_card_serials,
            already_recorded: outcome.already_recorded,
            collected_at: Some(timestamp(outcome.collected_at)),
        }))
    }

    async fn check_card(
        &self,
        request: Request<pb::CheckCardRequest>,
    ) -> Result<Response<pb::CheckCardResponse>, Status> {
        let caller = limit_key(&request);
        let checking = checking_party(request.extensions(), &request.get_ref().relying_party)?;
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let id_number = v.id_number("id_number", &request.id_number, self.service.today());
        let card_serial = v.required("card_serial", &request.card_serial, MAX_SERIAL_LEN).map(str::to_owned);
        let relying_party = relying_party(&mut v, &checking);
        if request.nonce.len() > MAX_NONCE_LEN {
            v.add("nonce", format!("must be at most {MAX_NONCE_LEN} bytes"));
        }
        v.finish()?;
        let (Some(id_number), Some(card_serial), Some(relying_party)) = (id_number, card_serial, relying_party) else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let query = CardQuery { id_number, card_serial };
        let (results, checked_at, sequence) =
            self.service.check_cards(std::slice::from_ref(&query), &relying_party, &caller).await?;
        let result = results.into_iter().next().ok_or_else(|| ApiError::Internal("no result".into()))?;
        let signed = self.service.sign_status(&query, &result, checked_at, request.nonce);
        Ok(Response::new(pb::CheckCardResponse {
            status: card_status_to_proto(result.status) as i32,
            status_changed_at: result.status_changed_at.map(timestamp),
            checked_at: Some(timestamp(checked_at)),
            signed_status: signed.as_deref().map(status_statement_to_proto),
            sequence,
        }))
    }

    async fn check_cards(
        &self,
        request: Request<pb::CheckCardsRequest>,
    ) -> Result<Response<pb::CheckCardsResponse>, Status> {
        let caller = limit_key(&request);
        let checking = checking_party(request.extensions(), &request.get_ref().relying_party)?;
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        if request.cards.is_empty() || request.cards.len() > MAX_BATCH {
            v.add("cards", format!("must hold 1 to {MAX_BATCH} queries, found {}", request.cards.len()));
            // Per-item problems of an oversized batch are not worth reporting.
            relying_party(&mut v, &checking);
            return Err(ApiError::InvalidArgument(v).into());
        }
        let today = self.service.today();
        let mut queries = Vec::with_capacity(request.cards.len());
        for (index, query) in request.cards.iter().enumerate() {
            // Field paths are formatted only for a query that fails: a valid 1,000-card batch would
            // otherwise format 2,000 of them per call.
            let mut item = FieldViolations::new();
            let id_number = item.id_number("id_number", &query.id_number, today);
            let card_serial = item.required("card_serial", &query.card_serial, MAX_SERIAL_LEN);
            for (field, description) in item.iter() {
                v.add(format!("cards[{index}].{field}"), description.clone());
            }
            if let (Some(id_number), Some(card_serial)) = (id_number, card_serial) {
                queries.push(CardQuery { id_number, card_serial: card_serial.to_owned() });
            }
        }
        let relying_party = relying_party(&mut v, &checking);
        v.finish()?;
        let Some(relying_party) = relying_party else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let (results, checked_at, sequence) = self.service.check_cards(&queries, &relying_party, &caller).await?;
        Ok(Response::new(pb::CheckCardsResponse {
            results: results
                .into_iter()
                .enumerate()
                .map(|(index, result)| pb::CardCheckResult {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    status: card_status_to_proto(result.status) as i32,
                    status_changed_at: result.status_changed_at.map(timestamp),
                })
                .collect(),
            checked_at: Some(timestamp(checked_at)),
            sequence,
        }))
    }

    type WatchRevocationsStream = ReceiverStream<Result<pb::WatchRevocationsResponse, Status>>;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        // Bureaus and operators keep the serial; relying parties (C4) get the digest only.
        let with_serial = !matches!(caller_of(request.extensions()), Some(c) if matches!(c.principal, Principal::RelyingParty { .. }));
        let after = request.into_inner().after_sequence;
        let (events_tx, mut events_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(64);
        let service = Arc::clone(&self.service);
        let snapshots = Arc::clone(&self.snapshots);
        tokio::spawn(async move { service.watch(after, events_tx).await });
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // The caller went away: dropping `events_rx` ends the watch.
                    () = out_tx.closed() => break,
                    item = events_rx.recv() => {
                        let Some(item) = item else { break };
                        let item = match item {
                            Ok(event) if with_serial => Ok(event_to_proto(event, None, true)),
                            Ok(event) => match snapshots.card_digest(&event.card_serial).await {
                                Ok(digest) => Ok(event_to_proto(event, digest, false)),
                                Err(error) => Err(Status::from(error)),
                            },
                            Err(error) => Err(Status::from(error)),
                        };
                        if out_tx.send(item).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    type GetStatusSnapshotStream = ReceiverStream<Result<pb::GetStatusSnapshotResponse, Status>>;

    async fn get_status_snapshot(
        &self,
        request: Request<pb::GetStatusSnapshotRequest>,
    ) -> Result<Response<Self::GetStatusSnapshotStream>, Status> {
        let status_only = request.get_ref().status_only;
        let snapshot = self.snapshots.latest().await;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let bytes = if status_only { &snapshot.status_only } else { &snapshot.bytes };
            let total_bytes = bytes.len() as u64;
            for (index, data) in bytes.chunks(SNAPSHOT_CHUNK_BYTES).enumerate() {
                let chunk = pb::GetStatusSnapshotResponse {
                    sequence: snapshot.sequence,
                    total_bytes,
                    offset: (index * SNAPSHOT_CHUNK_BYTES) as u64,
                    data: data.to_vec(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_status_deltas(
        &self,
        request: Request<pb::ListStatusDeltasRequest>,
    ) -> Result<Response<pb::ListStatusDeltasResponse>, Status> {
        let after = request.into_inner().after_sequence;
        let deltas = self.snapshots.deltas_after(after).ok_or_else(|| snapshot_required(after))?;
        Ok(Response::new(pb::ListStatusDeltasResponse { deltas: deltas.iter().map(|d| d.bytes.clone()).collect() }))
    }

    type WatchStatusDeltasStream = ReceiverStream<Result<pb::WatchStatusDeltasResponse, Status>>;

    async fn watch_status_deltas(
        &self,
        request: Request<pb::WatchStatusDeltasRequest>,
    ) -> Result<Response<Self::WatchStatusDeltasStream>, Status> {
        let mut after = request.into_inner().after_sequence;
        // Subscribe before reading the kept ones, so that none signed in between is missed.
        let mut live = self.snapshots.subscribe();
        let kept = self.snapshots.deltas_after(after).ok_or_else(|| snapshot_required(after))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = 0;
            for delta in &kept {
                (after, last) = (delta.sequence, delta.index);
                if tx.send(Ok(delta_to_proto(delta))).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    received = live.recv() => match received {
                        // Not already sent as a kept one, and the next in the chain.
                        Ok(delta) if delta.index > last && delta.from_sequence == after => {
                            (after, last) = (delta.sequence, delta.index);
                            if tx.send(Ok(delta_to_proto(&delta))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Fell behind: the kept deltas are the way back.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let _ = tx.send(Err(Status::from(snapshot_required(after)))).await;
                            return;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_card_receipt(
        &self,
        request: Request<pb::GetCardReceiptRequest>,
    ) -> Result<Response<pb::GetCardReceiptResponse>, Status> {
        let caller = limit_key(&request);
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let id_number = v.id_number("id_number", &request.id_number, self.service.today());
        let card_serial = v.required("card_serial", &request.card_serial, MAX_SERIAL_LEN).map(str::to_owned);
        v.finish()?;
        let (Some(id_number), Some(card_serial)) = (id_number, card_serial) else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let (receipt, sequence) = self.service.card_receipt(&CardQuery { id_number, card_serial }, &caller).await?;
        Ok(Response::new(pb::GetCardReceiptResponse { receipt, sequence }))
    }

    async fn report_local_hits(
        &self,
        request: Request<pb::ReportLocalHitsRequest>,
    ) -> Result<Response<pb::ReportLocalHitsResponse>, Status> {
        let checking = checking_party(request.extensions(), &request.get_ref().relying_party)?;
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        if request.hits.is_empty() || request.hits.len() > MAX_BATCH {
            v.add("hits", format!("must hold 1 to {MAX_BATCH} checks, found {}", request.hits.len()));
            return Err(ApiError::InvalidArgument(v).into());
        }
        let today = self.service.today();
        let mut hits = Vec::with_capacity(request.hits.len());
        for (index, hit) in request.hits.iter().enumerate() {
            let mut item = FieldViolations::new();
            let id_number = item.id_number("id_number", &hit.id_number, today);
            let card_serial = item.required("card_serial", &hit.card_serial, MAX_SERIAL_LEN);
            let checked_at = hit
                .checked_at
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)));
            for (field, description) in item.iter() {
                v.add(format!("hits[{index}].{field}"), description.clone());
            }
            if let (Some(id_number), Some(card_serial)) = (id_number, card_serial) {
                hits.push((id_number, card_serial.to_owned(), checked_at));
            }
        }
        let relying_party = relying_party(&mut v, &checking);
        v.finish()?;
        let Some(relying_party) = relying_party else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let recorded = self.snapshots.report_hits(&relying_party, hits).await?;
        Ok(Response::new(pb::ReportLocalHitsResponse { recorded: u32::try_from(recorded).unwrap_or(u32::MAX) }))
    }

    async fn list_hits(&self, request: Request<pb::ListHitsRequest>) -> Result<Response<pb::ListHitsResponse>, Status> {
        // A home bureau reads the hits on its own citizens only.
        ensure_acting_for_itself(request.extensions(), "home_bureau_id", &request.get_ref().home_bureau_id)?;
        let request = request.into_inner();
        let mut v = FieldViolations::new();
        let home_bureau_id = v.required("home_bureau_id", &request.home_bureau_id, MAX_TEXT_LEN).map(str::to_owned);
        if let Some(id) = &home_bureau_id
            && !self.service.is_home_bureau(id)
        {
            v.add("home_bureau_id", format!("{id:?} is not a home bureau (verification) in the directory"));
        }
        // The cursor is the last hit returned; a bureau polls with it to get only newer hits.
        let filter = Filter::new("registry.hits", &[&request.home_bureau_id]);
        let after = page::decode(&mut v, "page_token", &request.page_token, filter).unwrap_or(0);
        v.finish()?;
        let Some(home_bureau_id) = home_bureau_id else {
            return Err(ApiError::Internal("validation incomplete".into()).into());
        };
        let (hits, next) = self.service.list_hits(&home_bureau_id, after, page_size(request.page_size)).await?;
        Ok(Response::new(pb::ListHitsResponse {
            hits: hits
                .into_iter()
                .map(|hit| pb::Hit {
                    card_serial: hit.card_serial,
                    id_number: hit.id_number,
                    relying_party: hit.relying_party,
                    checked_at: Some(timestamp(hit.checked_at)),
                })
                .collect(),
            next_page_token: page::encode(filter, &next),
        }))
    }
}
