//! Stand-in services for tests of the plumbing: a server needs some service to serve.
use std::time::Duration;

use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use yidi_proto::v1::{self as pb, issuance_server::IssuanceServer};

/// A stand-in service: `GetOrder` waits `delay`, then answers NOT_FOUND; the rest is
/// unimplemented.
#[derive(Debug, Clone, Default)]
pub struct SlowIssuance {
    pub delay: Duration,
}

#[tonic::async_trait]
impl pb::issuance_server::Issuance for SlowIssuance {
    async fn place_order(
        &self,
        _: GrpcRequest<pb::PlaceOrderRequest>,
    ) -> Result<GrpcResponse<pb::PlaceOrderResponse>, Status> {
        Err(Status::unimplemented("test service"))
    }

    async fn get_order(
        &self,
        _: GrpcRequest<pb::GetOrderRequest>,
    ) -> Result<GrpcResponse<pb::GetOrderResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        Err(Status::not_found("no orders here"))
    }

    type WatchOrderStream = futures::stream::Empty<Result<pb::WatchOrderResponse, Status>>;

    async fn watch_order(
        &self,
        _: GrpcRequest<pb::WatchOrderRequest>,
    ) -> Result<GrpcResponse<Self::WatchOrderStream>, Status> {
        Err(Status::unimplemented("test service"))
    }
}

pub type TestService = IssuanceServer<SlowIssuance>;
