//! Stand-in services: for tests of the plumbing (a server needs some service to serve), and fake
//! peers a bureau under test calls.
use std::time::Duration;

use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use yidi_proto::v1::{
    self as pb, intake_server::IntakeServer, issuance_server::IssuanceServer, loss_registry_server::LossRegistryServer,
};

/// The issuance calls a fake producer answers; every call it does not override answers
/// UNIMPLEMENTED. Each gets the whole request (extensions and metadata included), as a layer in
/// front of the service leaves it. Serve it with [`issuance_server`].
#[tonic::async_trait]
pub trait IssuanceFake: Send + Sync + 'static {
    async fn place_order(
        &self,
        _: GrpcRequest<pb::PlaceOrderRequest>,
    ) -> Result<GrpcResponse<pb::PlaceOrderResponse>, Status> {
        Err(unimplemented_by_test_service())
    }

    async fn get_order(
        &self,
        _: GrpcRequest<pb::GetOrderRequest>,
    ) -> Result<GrpcResponse<pb::GetOrderResponse>, Status> {
        Err(unimplemented_by_test_service())
    }
}

fn unimplemented_by_test_service() -> Status {
    Status::unimplemented("test service")
}

/// An [`IssuanceFake`] as an Issuance service.
#[derive(Debug, Clone, Default)]
pub struct FakeIssuance<T>(pub T);

pub fn issuance_server<T: IssuanceFake>(fake: T) -> IssuanceServer<FakeIssuance<T>> {
    IssuanceServer::new(FakeIssuance(fake))
}

#[tonic::async_trait]
impl<T: IssuanceFake> pb::issuance_server::Issuance for FakeIssuance<T> {
    async fn place_order(
        &self,
        request: GrpcRequest<pb::PlaceOrderRequest>,
    ) -> Result<GrpcResponse<pb::PlaceOrderResponse>, Status> {
        self.0.place_order(request).await
    }

    async fn get_order(
        &self,
        request: GrpcRequest<pb::GetOrderRequest>,
    ) -> Result<GrpcResponse<pb::GetOrderResponse>, Status> {
        self.0.get_order(request).await
    }

    type WatchOrderStream = futures::stream::Empty<Result<pb::WatchOrderResponse, Status>>;

    async fn watch_order(
        &self,
        _: GrpcRequest<pb::WatchOrderRequest>,
    ) -> Result<GrpcResponse<Self::WatchOrderStream>, Status> {
        Err(unimplemented_by_test_service())
    }
}

/// A stand-in service: `GetOrder` waits `delay`, then answers NOT_FOUND; the rest is
/// unimplemented.
#[derive(Debug, Clone, Default)]
pub struct SlowIssuance {
    pub delay: Duration,
}

#[tonic::async_trait]
impl IssuanceFake for SlowIssuance {
    async fn get_order(
        &self,
        _: GrpcRequest<pb::GetOrderRequest>,
    ) -> Result<GrpcResponse<pb::GetOrderResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        Err(Status::not_found("no orders here"))
    }
}

pub type TestService = IssuanceServer<FakeIssuance<SlowIssuance>>;

/// Serves fake peers (`Routes::new(a).add_service(b)`) on a fresh loopback port until the test
/// ends; returns their `http://` endpoint.
pub async fn serve_fakes(routes: tonic::service::Routes) -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    Ok((endpoint, serve_fakes_on(listener, routes)))
}

/// Serves fake peers on `listener` until the test ends.
pub fn serve_fakes_on(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    })
}

fn unimplemented_by_fake() -> Status {
    Status::unimplemented("fake")
}

/// The registry calls a fake registry answers; every call it does not override, and every call
/// not listed here, answers UNIMPLEMENTED. Serve it with [`registry_server`].
#[tonic::async_trait]
pub trait RegistryFake: Send + Sync + 'static {
    async fn report_loss(
        &self,
        _: pb::LossRegistryReportLossRequest,
    ) -> Result<pb::LossRegistryReportLossResponse, Status> {
        Err(unimplemented_by_fake())
    }

    async fn withdraw_loss_report(
        &self,
        _: pb::LossRegistryWithdrawLossReportRequest,
    ) -> Result<pb::LossRegistryWithdrawLossReportResponse, Status> {
        Err(unimplemented_by_fake())
    }

    async fn register_card(&self, _: pb::RegisterCardRequest) -> Result<pb::RegisterCardResponse, Status> {
        Err(unimplemented_by_fake())
    }

    async fn record_collection(&self, _: pb::RecordCollectionRequest) -> Result<pb::RecordCollectionResponse, Status> {
        Err(unimplemented_by_fake())
    }

    async fn transfer_registration(
        &self,
        _: pb::LossRegistryTransferRegistrationRequest,
    ) -> Result<pb::LossRegistryTransferRegistrationResponse, Status> {
        Err(unimplemented_by_fake())
    }
}

/// A [`RegistryFake`] as a LossRegistry service.
#[derive(Debug, Clone)]
pub struct FakeRegistry<T>(pub T);

pub fn registry_server<T: RegistryFake>(fake: T) -> LossRegistryServer<FakeRegistry<T>> {
    LossRegistryServer::new(FakeRegistry(fake))
}

#[tonic::async_trait]
impl<T: RegistryFake> pb::loss_registry_server::LossRegistry for FakeRegistry<T> {
    async fn report_loss(
        &self,
        request: GrpcRequest<pb::LossRegistryReportLossRequest>,
    ) -> Result<GrpcResponse<pb::LossRegistryReportLossResponse>, Status> {
        self.0.report_loss(request.into_inner()).await.map(GrpcResponse::new)
    }

    async fn withdraw_loss_report(
        &self,
        request: GrpcRequest<pb::LossRegistryWithdrawLossReportRequest>,
    ) -> Result<GrpcResponse<pb::LossRegistryWithdrawLossReportResponse>, Status> {
        self.0.withdraw_loss_report(request.into_inner()).await.map(GrpcResponse::new)
    }

    async fn register_card(
        &self,
        request: GrpcRequest<pb::RegisterCardRequest>,
    ) -> Result<GrpcResponse<pb::RegisterCardResponse>, Status> {
        self.0.register_card(request.into_inner()).await.map(GrpcResponse::new)
    }

    async fn record_collection(
        &self,
        request: GrpcRequest<pb::RecordCollectionRequest>,
    ) -> Result<GrpcResponse<pb::RecordCollectionResponse>, Status> {
        self.0.record_collection(request.into_inner()).await.map(GrpcResponse::new)
    }

    async fn transfer_registration(
        &self,
        request: GrpcRequest<pb::LossRegistryTransferRegistrationRequest>,
    ) -> Result<GrpcResponse<pb::LossRegistryTransferRegistrationResponse>, Status> {
        self.0.transfer_registration(request.into_inner()).await.map(GrpcResponse::new)
    }

    async fn check_card(
        &self,
        _: GrpcRequest<pb::CheckCardRequest>,
    ) -> Result<GrpcResponse<pb::CheckCardResponse>, Status> {
        Err(unimplemented_by_fake())
    }

    async fn check_cards(
        &self,
        _: GrpcRequest<pb::CheckCardsRequest>,
    ) -> Result<GrpcResponse<pb::CheckCardsResponse>, Status> {
        Err(unimplemented_by_fake())
    }

    type WatchRevocationsStream = futures::stream::Empty<Result<pb::WatchRevocationsResponse, Status>>;

    async fn watch_revocations(
        &self,
        _: GrpcRequest<pb::WatchRevocationsRequest>,
    ) -> Result<GrpcResponse<Self::WatchRevocationsStream>, Status> {
        Err(unimplemented_by_fake())
    }

    async fn list_hits(
        &self,
        _: GrpcRequest<pb::ListHitsRequest>,
    ) -> Result<GrpcResponse<pb::ListHitsResponse>, Status> {
        Err(unimplemented_by_fake())
    }

    type GetStatusSnapshotStream = futures::stream::Empty<Result<pb::GetStatusSnapshotResponse, Status>>;

    async fn get_status_snapshot(
        &self,
        _: GrpcRequest<pb::GetStatusSnapshotRequest>,
    ) -> Result<GrpcResponse<Self::GetStatusSnapshotStream>, Status> {
        Err(unimplemented_by_fake())
    }

    async fn list_status_deltas(
        &self,
        _: GrpcRequest<pb::ListStatusDeltasRequest>,
    ) -> Result<GrpcResponse<pb::ListStatusDeltasResponse>, Status> {
        Err(unimplemented_by_fake())
    }

    type WatchStatusDeltasStream = futures::stream::Empty<Result<pb::WatchStatusDeltasResponse, Status>>;

    async fn watch_status_deltas(
        &self,
        _: GrpcRequest<pb::WatchStatusDeltasRequest>,
    ) -> Result<GrpcResponse<Self::WatchStatusDeltasStream>, Status> {
        Err(unimplemented_by_fake())
    }

    async fn get_card_receipt(
        &self,
        _: GrpcRequest<pb::GetCardReceiptRequest>,
    ) -> Result<GrpcResponse<pb::GetCardReceiptResponse>, Status> {
        Err(unimplemented_by_fake())
    }

    async fn report_local_hits(
        &self,
        _: GrpcRequest<pb::ReportLocalHitsRequest>,
    ) -> Result<GrpcResponse<pb::ReportLocalHitsResponse>, Status> {
        Err(unimplemented_by_fake())
    }
}

/// The intake calls a fake station answers: the one question a home bureau asks it (K5) and the
/// producer's notice of a dispatched card; every other call answers UNIMPLEMENTED. Serve it with [`intake_server`].
#[tonic::async_trait]
pub trait IntakeFake: Send + Sync + 'static {
    async fn get_application_outcome(
        &self,
        _: GrpcRequest<pb::GetApplicationOutcomeRequest>,
    ) -> Result<GrpcResponse<pb::GetApplicationOutcomeResponse>, Status> {
        Err(unimplemented_by_fake())
    }

    /// What a producer tells the station when it dispatches a card.
    async fn notify_order_dispatched(
        &self,
        _: GrpcRequest<pb::NotifyOrderDispatchedRequest>,
    ) -> Result<GrpcResponse<pb::NotifyOrderDispatchedResponse>, Status> {
        Err(unimplemented_by_fake())
    }
}

/// An [`IntakeFake`] as an Intake service.
#[derive(Debug, Clone)]
pub struct FakeIntake<T>(pub T);

pub fn intake_server<T: IntakeFake>(fake: T) -> IntakeServer<FakeIntake<T>> {
    IntakeServer::new(FakeIntake(fake))
}

/// The Intake service of [`FakeIntake`]: `get_application_outcome` and `notify_order_dispatched`
/// as the fake answers them, and
/// the calls listed (`name(Request) -> Response`) UNIMPLEMENTED.
macro_rules! fake_intake {
    ($($name:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl<T: IntakeFake> pb::intake_server::Intake for FakeIntake<T> {
            async fn get_application_outcome(
                &self,
                request: GrpcRequest<pb::GetApplicationOutcomeRequest>,
            ) -> Result<GrpcResponse<pb::GetApplicationOutcomeResponse>, Status> {
                self.0.get_application_outcome(request).await
            }

            async fn notify_order_dispatched(
                &self,
                request: GrpcRequest<pb::NotifyOrderDispatchedRequest>,
            ) -> Result<GrpcResponse<pb::NotifyOrderDispatchedResponse>, Status> {
                self.0.notify_order_dispatched(request).await
            }

            type WatchApplicationStream = futures::stream::Empty<Result<pb::WatchApplicationResponse, Status>>;

            $(
                async fn $name(&self, _: GrpcRequest<$request>) -> Result<GrpcResponse<$response>, Status> {
                    Err(unimplemented_by_fake())
                }
            )*
        }
    };
}

fake_intake! {
    submit_application(pb::SubmitApplicationRequest) -> pb::SubmitApplicationResponse;
    get_application(pb::GetApplicationRequest) -> pb::GetApplicationResponse;
    get_application_timeline(pb::GetApplicationTimelineRequest) -> pb::GetApplicationTimelineResponse;
    list_applications(pb::ListApplicationsRequest) -> pb::ListApplicationsResponse;
    watch_application(pb::WatchApplicationRequest) -> Self::WatchApplicationStream;
    cancel_application(pb::CancelApplicationRequest) -> pb::CancelApplicationResponse;
    collect_card(pb::CollectCardRequest) -> pb::CollectCardResponse;
    report_loss(pb::ReportLossRequest) -> pb::ReportLossResponse;
    withdraw_loss_report(pb::WithdrawLossReportRequest) -> pb::WithdrawLossReportResponse;
}
