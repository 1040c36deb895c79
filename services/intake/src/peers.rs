//! Calls to the other bureaus, over gRPC, through the channels of [`client::Peers`] (which follow
//! the directory in force).
use std::{future::Future, time::Duration};

use tonic::{Code, Status};
use yidi_grpc::client::{self, Connector, PeerChannel};
use yidi_outbox::IDEMPOTENCY_KEY;
use yidi_proto::v1 as pb;
use yidi_proto::v1::{
    issuance_client::IssuanceClient, loss_registry_client::LossRegistryClient, verification_client::VerificationClient,
};
use yidi_runtime::directory::DirectoryHandle;

/// A failed call to another bureau.
#[derive(Debug)]
pub enum PeerError {
    /// The bureau is not in the directory or its endpoint is unusable.
    Unreachable { peer: String, message: String },
    /// The bureau (or the transport) answered with a status.
    Status { peer: String, status: Box<Status> },
}

impl PeerError {
    /// Whether retrying later may succeed (transport trouble, overload, a directory still to be
    /// fixed), as opposed to a definitive refusal that retrying cannot change
    /// ([`client::is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => client::is_transient(status.code()),
        }
    }

    /// Whether the peer could not be reached at all (transport failure, timeout).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => {
                matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
            }
        }
    }

    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Unreachable { .. } => None,
            Self::Status { status, .. } => Some(status.code()),
        }
    }

    pub fn peer(&self) -> &str {
        match self {
            Self::Unreachable { peer, .. } | Self::Status { peer, .. } => peer,
        }
    }
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable { peer, message } => write!(f, "{peer}: {message}"),
            Self::Status { peer, status } => {
                write!(f, "{peer}: {:?}: {}", status.code(), status.message())
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Peers {
    channels: client::Peers,
    /// The deadline of every call, sent along as `grpc-timeout`.
    call_timeout: Duration,
}

impl Peers {
    pub fn new(directory: DirectoryHandle, connector: Connector, call_timeout: Duration) -> Self {
        Self { channels: client::Peers::new(directory, connector), call_timeout }
    }

    fn channel(&self, bureau_id: &str) -> Result<PeerChannel, PeerError> {
        self.channels
            .channel(bureau_id)
            .map_err(|e| PeerError::Unreachable { peer: bureau_id.to_owned(), message: e.to_string() })
    }

    /// A request carrying `key` as its idempotency key: a redelivery of the same outbox message
    /// is answered by the receiver as the first one was, not acted on twice.
    fn keyed<T>(&self, message: T, key: &str) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Ok(value) = key.parse() {
            request.metadata_mut().insert(IDEMPOTENCY_KEY, value);
        }
        request
    }

    /// A request under the call deadline: the peer sees it and need not work past it.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }

    /// The answer of one call to `peer`, as a [`PeerError`] if it failed.
    async fn answer<T>(
        peer: &str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, PeerError> {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|status| PeerError::Status { peer: peer.to_owned(), status: Box::new(status) })
    }

    pub async fn verify(
        &self,
        home: &str,
        request: pb::VerifyRequest,
        key: &str,
    ) -> Result<pb::VerifyResponse, PeerError> {
        let mut client = VerificationClient::new(self.channel(home)?);
        Self::answer(home, client.verify(self.keyed(request, key))).await
    }

    pub async fn close_application(
        &self,
        home: &str,
        request: pb::CloseApplicationRequest,
        key: &str,
    ) -> Result<pb::CloseApplicationResponse, PeerError> {
        let mut client = VerificationClient::new(self.channel(home)?);
        Self::answer(home, client.close_application(self.keyed(request, key))).await
    }

    pub async fn report_loss(
        &self,
        registry: &str,
        decision: pb::SignedDecision,
        key: &str,
    ) -> Result<pb::LossRegistryReportLossResponse, PeerError> {
        let mut client = LossRegistryClient::new(self.channel(registry)?);
        let request = pb::LossRegistryReportLossRequest { decision: Some(decision), request_id: String::new() };
        Self::answer(registry, client.report_loss(self.keyed(request, key))).await
    }

    pub async fn record_collection(
        &self,
        registry: &str,
        request: pb::RecordCollectionRequest,
        key: &str,
    ) -> Result<pb::RecordCollectionResponse, PeerError> {
        let mut client = LossRegistryClient::new(self.channel(registry)?);
        Self::answer(registry, client.record_collection(self.keyed(request, key))).await
    }

    /// Keyed, so that a registry replica that does not answer can be replaced by another one
    /// without the withdrawal being applied twice.
    pub async fn withdraw_loss_report(
        &self,
        registry: &str,
        decision: pb::SignedDecision,
        key: &str,
    ) -> Result<pb::LossRegistryWithdrawLossReportResponse, PeerError> {
        let mut client = LossRegistryClient::new(self.channel(registry)?);
        let request = pb::LossRegistryWithdrawLossReportRequest { decision: Some(decision), request_id: String::new() };
        Self::answer(registry, client.withdraw_loss_report(self.keyed(request, key))).await
    }

    pub async fn place_order(
        &self,
        producer: &str,
        decision: pb::SignedDecision,
        key: &str,
    ) -> Result<pb::Order, PeerError> {
        let mut client = IssuanceClient::new(self.channel(producer)?);
        let request = pb::PlaceOrderRequest { decision: Some(decision), request_id: String::new() };
        let response = Self::answer(producer, client.place_order(self.keyed(request, key))).await?;
        Self::order_of(producer, "PlaceOrder", response.order)
    }

    pub async fn get_order(
        &self,
        producer: &str,
        station_id: &str,
        order_id: &str,
        decision_id: &str,
    ) -> Result<pb::Order, PeerError> {
        let mut client = IssuanceClient::new(self.channel(producer)?);
        let request = pb::GetOrderRequest {
            order_id: order_id.to_owned(),
            decision_id: decision_id.to_owned(),
            station_id: station_id.to_owned(),
        };
        let response = Self::answer(producer, client.get_order(self.request(request))).await?;
        Self::order_of(producer, "GetOrder", response.order)
    }

    fn order_of(producer: &str, rpc: &str, order: Option<pb::Order>) -> Result<pb::Order, PeerError> {
        order.ok_or_else(|| PeerError::Unreachable {
            peer: producer.to_owned(),
            message: format!("{rpc} answered without an order"),
        })
    }
}
