//! K5: an application this bureau has held open for long is asked about at the station that lodged
//! it, and closed here if the station says it ended (its close may have been lost on the way: a
//! dead letter, a station restored from a backup). Nothing is closed on doubt: a station that does
//! not answer, or answers NOT_FOUND, leaves the application open until the next sweep.
use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use yidi_domain::ApplicationState;
use yidi_grpc::ApiError;
use yidi_runtime::shutdown::Shutdown;

use crate::{
    repo::OpenMark,
    service::{Closing, Verifier},
};

/// What a station says of one of its applications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StationAnswer {
    /// Still going.
    Open,
    /// Nothing more will happen to it.
    Ended {
        state: ApplicationState,
        /// The card handed over, for a collection.
        new_card_serial: Option<String>,
        at: DateTime<Utc>,
    },
}

/// Asks a station how an application stands (the gRPC call is `stations::StationLink`). Any
/// failure, NOT_FOUND included, is an error: the application stays open.
pub trait StationOutcomes: Send + Sync {
    fn ask<'a>(
        &'a self,
        station_id: &'a str,
        application_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<StationAnswer, ApiError>> + Send + 'a>>;
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Open applications asked about.
    pub asked: usize,
    /// Closed because their station said they ended.
    pub closed: usize,
    /// Left open: the station did not answer, did not know them, or answered what cannot close them.
    pub unanswered: usize,
}

/// Open applications read at a time.
const PAGE: u64 = 200;

impl Verifier {
    /// Asks the station of every application held open since before `now - ask_after`, and closes
    /// those the station says ended, as its close would have.
    pub async fn ask_stations(&self, ask_after: chrono::Duration) -> Result<Swept, ApiError> {
        let opened_before = self.clock.now() - ask_after;
        let mut swept = Swept::default();
        let mut after_id = 0;
        loop {
            let marks = self.repo.open_marks(opened_before, after_id, PAGE).await?;
            for mark in &marks {
                after_id = mark.id;
                swept.asked += 1;
                if self.ask_station(mark).await {
                    swept.closed += 1;
                } else {
                    swept.unanswered += 1;
                }
            }
            if (marks.len() as u64) < PAGE {
                return Ok(swept);
            }
        }
    }

    /// Asks about one open application; true if it was closed (or found closed) here.
    async fn ask_station(&self, mark: &OpenMark) -> bool {
        let OpenMark { application_id, station_id, opened_at, .. } = mark;
        let (state, new_card_serial) = match self.stations.ask(station_id, application_id).await {
            Ok(StationAnswer::Ended { state, new_card_serial, .. })
                if matches!(state, ApplicationState::Collected | ApplicationState::Cancelled) =>
            {
                (state, new_card_serial)
            }
            Ok(StationAnswer::Open) => {
                tracing::debug!(application_id, station_id, %opened_at, "open application still open at its station");
                return false;
            }
            Ok(StationAnswer::Ended { state, .. }) => {
                tracing::warn!(
                    application_id,
                    station_id,
                    state = state.as_str(),
                    "the station says an application approved here ended in a state that closes nothing; left open"
                );
                return false;
            }
            Err(error) => {
                tracing::warn!(application_id, station_id, %error, "cannot learn whether an open application ended; asked again at the next sweep");
                return false;
            }
        };
        let closing = Closing {
            application_id,
            station_id,
            final_state: state,
            new_card_serial: new_card_serial.as_deref(),
            asked: true,
        };
        match self.close_application(closing).await {
            Ok(closed) => closed,
            Err(error) => {
                tracing::warn!(application_id, station_id, %error, "the station says the application ended, but it cannot be closed here");
                false
            }
        }
    }

    /// Sweeps now, then every `every`, until shutdown.
    pub fn spawn_station_sweeper(
        self: Arc<Self>,
        ask_after: chrono::Duration,
        every: std::time::Duration,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
                    swept = self.ask_stations(ask_after) => match swept {
                        Ok(Swept { asked: 0, .. }) => {}
                        Ok(Swept { asked, closed, unanswered }) => {
                            tracing::info!(asked, closed, unanswered, "open applications asked about at their stations");
                        }
                        Err(error) => tracing::warn!(%error, "cannot read the open applications to ask their stations about"),
                    },
                }
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }
}
