//! The one call this bureau makes to another: a registration transfer delivered to the registry
//! (S4), synchronously, while the operator waits.
use std::{future::Future, pin::Pin, time::Duration};

use yidi_domain::SignedDecision;
use yidi_grpc::{
    ApiError,
    client::{self, Peers},
    convert::signed_decision_to_proto,
};
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};

use crate::service::{TransferRecorded, TransferSink};

pub struct RegistryLink {
    peers: Peers,
    call_timeout: Duration,
}

impl RegistryLink {
    pub fn new(peers: Peers, call_timeout: Duration) -> Self {
        Self { peers, call_timeout }
    }

    async fn transfer(&self, registry_id: &str, decision: &SignedDecision) -> Result<TransferRecorded, ApiError> {
        let channel = self.peers.channel(registry_id).map_err(|e| ApiError::unavailable(registry_id, e.to_string()))?;
        let mut request = tonic::Request::new(transfer_request(decision));
        request.set_timeout(self.call_timeout);
        match LossRegistryClient::new(channel).transfer_registration(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(TransferRecorded {
                    card_serials: response.card_serials,
                    already_transferred: response.already_transferred,
                })
            }
            Err(status) if client::is_transient(status.code()) => {
                Err(ApiError::unavailable(registry_id, format!("{:?}: {}", status.code(), status.message())))
            }
            Err(status) => Err(ApiError::precondition(
                "REGISTRY_REFUSED",
                format!("{registry_id} refused the transfer: {:?}: {}", status.code(), status.message()),
            )),
        }
    }
}

/// The transfer of `decision`, keyed by its decision id: a retry (by the operator, or by the
/// channel on another registry replica) is then answered as the first call was (AIP-155).
fn transfer_request(decision: &SignedDecision) -> pb::LossRegistryTransferRegistrationRequest {
    pb::LossRegistryTransferRegistrationRequest {
        decision: Some(signed_decision_to_proto(decision)),
        request_id: format!("transfer-{}", decision.decision.decision_id),
    }
}

impl TransferSink for RegistryLink {
    fn deliver<'a>(
        &'a self,
        registry_id: &'a str,
        decision: &'a SignedDecision,
    ) -> Pin<Box<dyn Future<Output = Result<TransferRecorded, ApiError>> + Send + 'a>> {
        Box::pin(self.transfer(registry_id, decision))
    }
}
