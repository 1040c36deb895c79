//! The question this bureau asks a station (K5): has an application it holds open ended there?
use std::{future::Future, pin::Pin, time::Duration};

use yidi_domain::ApplicationState;
use yidi_grpc::{
    ApiError,
    client::Peers,
    convert::{from_timestamp, state_from_proto},
};
use yidi_proto::v1::{self as pb, intake_client::IntakeClient};

use crate::open_marks::{StationAnswer, StationOutcomes};

pub struct StationLink {
    peers: Peers,
    /// This bureau, as it names itself to the station.
    bureau_id: String,
    call_timeout: Duration,
}

impl StationLink {
    pub fn new(peers: Peers, bureau_id: String, call_timeout: Duration) -> Self {
        Self { peers, bureau_id, call_timeout }
    }

    async fn outcome(&self, station_id: &str, application_id: &str) -> Result<StationAnswer, ApiError> {
        let unavailable = |message: String| ApiError::unavailable(station_id, message);
        let channel = self.peers.channel(station_id).map_err(|e| unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(pb::GetApplicationOutcomeRequest {
            application_id: application_id.to_owned(),
            home_bureau_id: self.bureau_id.clone(),
        });
        request.set_timeout(self.call_timeout);
        let answer = IntakeClient::new(channel)
            .get_application_outcome(request)
            .await
            .map_err(|status| unavailable(format!("{:?}: {}", status.code(), status.message())))?
            .into_inner();
        match pb::ApplicationOutcome::try_from(answer.outcome) {
            Ok(pb::ApplicationOutcome::Open) => Ok(StationAnswer::Open),
            Ok(pb::ApplicationOutcome::Ended) => {
                let state = pb::ApplicationState::try_from(answer.state).ok().and_then(state_from_proto);
                let at = answer.updated_at.as_ref().and_then(from_timestamp);
                let serial = Some(answer.new_card_serial.trim().to_owned()).filter(|s| !s.is_empty());
                match (state, at, serial) {
                    // A collection closes only with the card handed over, which becomes the current one.
                    (Some(ApplicationState::Collected), _, None) | (None, _, _) | (_, None, _) => Err(unavailable(
                        format!("an ended application without a readable state, time or collected card: {answer:?}"),
                    )),
                    (Some(state), Some(at), serial) => Ok(StationAnswer::Ended {
                        state,
                        new_card_serial: serial.filter(|_| state == ApplicationState::Collected),
                        at,
                    }),
                }
            }
            _ => Err(unavailable(format!("an outcome this bureau does not know: {}", answer.outcome))),
        }
    }
}

impl StationOutcomes for StationLink {
    fn ask<'a>(
        &'a self,
        station_id: &'a str,
        application_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<StationAnswer, ApiError>> + Send + 'a>> {
        Box::pin(self.outcome(station_id, application_id))
    }
}
