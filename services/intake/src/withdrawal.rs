//! K6: withdrawing a loss report, in person and synchronously: the counter rules, then the home
//! bureau's decision, then the registry. Nothing is stored but audit rows; the registry's (or
//! home bureau's) own refusal reaches the caller unchanged.
use yidi_audit::AuditEntry;
use yidi_grpc::ApiError;
use yidi_proto::v1 as pb;

use crate::{
    peers::PeerError,
    service::{Applicant, Intake},
};

/// Why a withdrawal failed: one of ours, or the registry's (or home bureau's) own answer, which
/// is passed to the caller unchanged.
#[derive(Debug)]
pub enum WithdrawError {
    Api(ApiError),
    Peer(Box<tonic::Status>),
}

impl From<ApiError> for WithdrawError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

impl Intake {
    /// K6: withdraw a loss report, in person; synchronous.
    pub async fn withdraw_loss_report(
        &self,
        applicant: Applicant,
        card_serial: String,
    ) -> Result<pb::LossRegistryWithdrawLossReportResponse, WithdrawError> {
        const ACTION: &str = "withdraw_loss_report";
        let home = self.counter_check(ACTION, &applicant).await?;
        let masked = applicant.id_number.masked();
        let request = pb::VerifyRequest {
            application_id: uuid::Uuid::new_v4().to_string(),
            station_id: self.inner.station.id.clone(),
            purpose: pb::DecisionPurpose::WithdrawLossReport as i32,
            kind: pb::ApplicationKind::Unspecified as i32,
            id_number: applicant.id_number.as_str().to_owned(),
            card_serial: card_serial.clone(),
            live: Some(pb::Biometrics {
                face_template: applicant.face_template.clone(),
                fingerprint_template: applicant.fingerprint_template.clone(),
            }),
            producer_id: String::new(),
            declared_province: applicant.declared_province.clone(),
            request_id: String::new(),
        };
        let key = request.application_id.clone();
        let answer = self.inner.peers.verify(&home.id, request, &key).await.map_err(peer_error)?;
        let Some(decision) = answer.decision else {
            let reason = pb::RefusalReason::try_from(answer.refusal_reason)
                .ok()
                .and_then(yidi_grpc::convert::refusal_from_proto)
                .ok_or_else(|| {
                    ApiError::unavailable(&home.id, "answered neither a decision nor a known refusal reason")
                })?;
            self.audit_or_log(AuditEntry::new(ACTION, masked, "refused", reason.code())).await;
            return Err(ApiError::Refused(reason).into());
        };
        let registry = self.inner.station.registry_id.clone();
        match self.inner.peers.withdraw_loss_report(&registry, decision, &key).await {
            // The registry has acted (or answered): its answer stands even if the audit write fails.
            Ok(response) => {
                self.audit_or_log(AuditEntry::new(ACTION, masked, "withdrawn", format!("card {card_serial}"))).await;
                tracing::info!(card = %card_serial, "loss report withdrawn");
                Ok(response)
            }
            Err(error) => {
                self.audit_or_log(AuditEntry::new(ACTION, masked, "failed", format!("card {card_serial}: {error}")))
                    .await;
                Err(peer_error(error))
            }
        }
    }
}

fn peer_error(error: PeerError) -> WithdrawError {
    if error.is_unavailable() {
        return WithdrawError::Api(ApiError::unavailable(error.peer().to_owned(), error.to_string()));
    }
    match error {
        PeerError::Status { status, .. } => WithdrawError::Peer(status),
        other => WithdrawError::Api(ApiError::unavailable(other.peer().to_owned(), other.to_string())),
    }
}
