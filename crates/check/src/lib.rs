//! What a relying party runs (issue 16, docs/STATUS-SNAPSHOTS.md): it keeps the registry's signed
//! status snapshot and the deltas since on disk, verifies every signature against the directory's
//! keys, and answers a check locally when it can:
//!
//! * "valid" or "not valid" from the snapshot and deltas while they are younger than `max_age`
//!   (and the snapshot is within its `usable_until`);
//! * otherwise, or when the card is not covered (never registered, registered since, about to
//!   expire), it asks `CheckCard` online. Fail closed: data older than `max_age` never answers
//!   "valid", online or not.
//!
//! A card presented with its registration receipt (read from the card, or fetched once with
//! [`Checker::fetch_receipt`]) is answered from the snapshot without coverage, so a relying party
//! whose cards carry receipts keeps only the status filter ([`Settings::status_only`]): about a
//! byte per card that is not valid.
//!
//! Checks answered "not valid" locally are kept (on disk) and reported in batches
//! (`ReportLocalHits`), so that the home bureau sees them as it sees online checks (C4).
#![forbid(unsafe_code)]

pub mod store;

use std::{
    path::Path,
    sync::{Mutex, PoisonError, RwLock},
};

use chrono::{DateTime, Utc};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use yidi_domain::Directory;
use yidi_grpc::convert::timestamp;
use yidi_proto::v1::{self as pb, loss_registry_client::LossRegistryClient};
use yidi_status_filter::{CardKey, CardReceipt, ChainError, Lookup, StatusFile, StatusView, VerifyError};

use crate::store::{PendingHit, Store};

pub type Registry = LossRegistryClient<Channel>;

/// Most hits per ReportLocalHits call (the registry's limit).
pub const HIT_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Who checks: named in the hits the home bureau reads.
    pub relying_party: String,
    /// Local answers only from data younger than this (the newest snapshot or delta).
    pub max_age: chrono::Duration,
    /// `follow` takes the registry's newer snapshot once it holds this many deltas that cover
    /// cards: each is one more filter a pair never registered may pass by chance
    /// (docs/STATUS-SNAPSHOTS.md).
    pub renew_after_deltas: usize,
    /// Fetch snapshots without coverage: only cards presented with their receipts are answered
    /// locally (docs/STATUS-SNAPSHOTS.md, "Receipts").
    pub status_only: bool,
}

/// [`Settings::renew_after_deltas`] by default: an hour of the registry's one-minute deltas.
pub const RENEW_AFTER_DELTAS: usize = 60;

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// Reported lost, revoked, expired, awaiting collection or voided.
    NotValid,
    /// The registry does not know the pair (online only).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Online,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub verdict: Verdict,
    pub source: Source,
    /// The registry's status (online answers only).
    pub status: Option<pb::CardStatus>,
}

/// What the local data says, before any fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Valid,
    NotValid,
    NotCovered,
    NoData,
    /// The data is as of `as_of`, older than `max_age` (or past the snapshot's `usable_until`, or
    /// more than five minutes ahead of the clock).
    TooOld {
        as_of: DateTime<Utc>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("refused: {0}")]
    Verify(#[from] VerifyError),
    #[error("does not follow the data held: {0}")]
    Chain(#[from] ChainError),
    #[error("local files: {0}")]
    Io(#[from] std::io::Error),
    #[error("registry: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("no local answer ({0:?}) and asking online is not allowed")]
    NoLocalAnswer(Local),
}

/// See the crate documentation.
pub struct Checker {
    store: Store,
    directory: Directory,
    settings: Settings,
    view: RwLock<Option<StatusView>>,
    /// Serialises writers of the files (snapshot, deltas, hits).
    writing: Mutex<()>,
}

impl Checker {
    /// Opens the folder `dir`, verifying what it holds; files that do not verify are ignored (a
    /// new snapshot is fetched on the next sync).
    pub fn open(dir: &Path, directory: Directory, settings: Settings) -> Result<Self, CheckError> {
        let store = Store::open(dir)?;
        let mut view = None;
        if let Some((snapshot, deltas)) = store.read()? {
            match StatusFile::verify(&snapshot, &directory)
                .map_err(CheckError::from)
                .and_then(|s| Ok(StatusView::new(s)?))
            {
                Ok(mut held) => {
                    for delta in deltas {
                        let applied = StatusFile::verify(&delta, &directory)
                            .map_err(CheckError::from)
                            .and_then(|d| Ok(held.apply(d)?));
                        if let Err(error) = applied {
                            tracing::warn!(%error, "a stored delta is refused; the later ones are not used");
                            break;
                        }
                    }
                    view = Some(held);
                }
                Err(error) => tracing::warn!(%error, "the stored snapshot is refused"),
            }
        }
        Ok(Self { store, directory, settings, view: RwLock::new(view), writing: Mutex::new(()) })
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, Option<StatusView>> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<StatusView>> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The sequence the data reflects, if any is held.
    pub fn sequence(&self) -> Option<u64> {
        self.view().as_ref().map(StatusView::sequence)
    }

    /// When the data held was made.
    pub fn as_of(&self) -> Option<DateTime<Utc>> {
        self.view().as_ref().map(StatusView::as_of)
    }

    /// What the local data says about a card at `now`, without asking anyone.
    pub fn local(&self, id_number: &str, card_serial: &str, now: DateTime<Utc>) -> Local {
        self.local_with(id_number, card_serial, None, now)
    }

    /// The same for a card presented with its receipt ([`Self::verify_receipt`]).
    pub fn local_with(
        &self,
        id_number: &str,
        card_serial: &str,
        receipt: Option<&CardReceipt>,
        now: DateTime<Utc>,
    ) -> Local {
        let view = self.view();
        let Some(view) = view.as_ref() else { return Local::NoData };
        // Data from the future means one of the clocks is wrong: fail closed as for old data.
        let from_the_future = view.as_of() - now > chrono::Duration::minutes(5);
        if now - view.as_of() > self.settings.max_age || now >= view.usable_until() || from_the_future {
            return Local::TooOld { as_of: view.as_of() };
        }
        let key = CardKey::new(id_number, card_serial);
        let lookup = match receipt {
            Some(receipt) => view.lookup_with_receipt(&key, receipt),
            None => view.lookup(&key),
        };
        match lookup {
            Lookup::Valid => Local::Valid,
            Lookup::NotValid => Local::NotValid,
            Lookup::NotCovered => Local::NotCovered,
        }
    }

    /// Reads a card's registration receipt: refused unless a registry of the directory signed it.
    pub fn verify_receipt(&self, bytes: &[u8]) -> Result<CardReceipt, CheckError> {
        Ok(CardReceipt::verify(bytes, &self.directory)?)
    }

    /// Fetches a card's receipt from the registry (`GetCardReceipt`), verified.
    pub async fn fetch_receipt(
        &self,
        registry: &mut Registry,
        id_number: &str,
        card_serial: &str,
    ) -> Result<(Vec<u8>, CardReceipt), CheckError> {
        let request =
            pb::GetCardReceiptRequest { id_number: id_number.to_owned(), card_serial: card_serial.to_owned() };
        let bytes = registry.get_card_receipt(request).await?.into_inner().receipt;
        let receipt = self.verify_receipt(&bytes)?;
        Ok((bytes, receipt))
    }

    /// A local answer, or [`CheckError::NoLocalAnswer`]: never "valid" from data that is too old.
    pub fn check_offline(
        &self,
        id_number: &str,
        card_serial: &str,
        receipt: Option<&CardReceipt>,
        now: DateTime<Utc>,
    ) -> Result<Answer, CheckError> {
        let local = |verdict| Answer { verdict, source: Source::Local, status: None };
        match self.local_with(id_number, card_serial, receipt, now) {
            Local::Valid => Ok(local(Verdict::Valid)),
            Local::NotValid => {
                self.queue_hit(id_number, card_serial, now)?;
                Ok(local(Verdict::NotValid))
            }
            other => Err(CheckError::NoLocalAnswer(other)),
        }
    }

    /// A local answer when there is one, else `CheckCard`'s.
    pub async fn check(
        &self,
        registry: &mut Registry,
        id_number: &str,
        card_serial: &str,
        receipt: Option<&CardReceipt>,
        now: DateTime<Utc>,
    ) -> Result<Answer, CheckError> {
        match self.check_offline(id_number, card_serial, receipt, now) {
            Err(CheckError::NoLocalAnswer(_)) => {}
            answered => return answered,
        }
        let request = pb::CheckCardRequest {
            id_number: id_number.to_owned(),
            card_serial: card_serial.to_owned(),
            relying_party: self.settings.relying_party.clone(),
            nonce: Vec::new(),
        };
        let response = registry.check_card(request).await?.into_inner();
        let status = pb::CardStatus::try_from(response.status).unwrap_or(pb::CardStatus::Unspecified);
        let verdict = match status {
            pb::CardStatus::Valid => Verdict::Valid,
            pb::CardStatus::Unknown | pb::CardStatus::Unspecified => Verdict::Unknown,
            _ => Verdict::NotValid,
        };
        Ok(Answer { verdict, source: Source::Online, status: Some(status) })
    }

    fn queue_hit(&self, id_number: &str, card_serial: &str, now: DateTime<Utc>) -> Result<(), CheckError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = PendingHit { id_number: id_number.to_owned(), card_serial: card_serial.to_owned(), checked_at: now };
        Ok(self.store.add_hit(&hit)?)
    }

    /// Verifies and keeps a snapshot, replacing the data held.
    pub fn accept_snapshot(&self, bytes: &[u8]) -> Result<u64, CheckError> {
        let view = StatusView::new(StatusFile::verify(bytes, &self.directory)?)?;
        let sequence = view.sequence();
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        self.store.save_snapshot(bytes)?;
        *self.view_mut() = Some(view);
        Ok(sequence)
    }

    /// Verifies and applies the next delta (one not newer than the data held is skipped).
    pub fn accept_delta(&self, bytes: &[u8]) -> Result<u64, CheckError> {
        let delta = StatusFile::verify(bytes, &self.directory)?;
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut view = self.view_mut();
        let Some(held) = view.as_mut() else {
            return Err(ChainError::Gap { from: delta.header.from_sequence, at: 0 }.into());
        };
        // An empty delta already held: the registry lists every kept delta starting at a
        // sequence, and the empty ones of the sequence held were seen before.
        let header = &delta.header;
        if header.from_sequence == header.sequence
            && header.sequence == held.sequence()
            && header.built_at <= held.as_of()
        {
            return Ok(held.sequence());
        }
        held.apply(delta)?;
        self.store.append_delta(bytes)?;
        Ok(held.sequence())
    }

    /// Fetches the latest snapshot.
    pub async fn fetch_snapshot(&self, registry: &mut Registry) -> Result<u64, CheckError> {
        match self.fetch_snapshot_after(registry, None).await? {
            Some(sequence) => Ok(sequence),
            None => Err(tonic::Status::data_loss("the registry sent an empty snapshot").into()),
        }
    }

    /// Fetches the latest snapshot if its sequence is past `after` (None: whatever it is); the
    /// stream is dropped after its first chunk otherwise. The sequence reached, if fetched.
    async fn fetch_snapshot_after(
        &self,
        registry: &mut Registry,
        after: Option<u64>,
    ) -> Result<Option<u64>, CheckError> {
        let request = pb::GetStatusSnapshotRequest { status_only: self.settings.status_only };
        let mut chunks = registry.get_status_snapshot(request).await?.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if after.is_some_and(|after| chunk.sequence <= after) {
                return Ok(None);
            }
            if chunk.offset != bytes.len() as u64 {
                return Err(tonic::Status::data_loss("snapshot chunks out of order").into());
            }
            bytes.extend_from_slice(&chunk.data);
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        self.accept_snapshot(&bytes).map(Some)
    }

    /// The sequence of the snapshot held (the deltas since go further: [`Self::sequence`]).
    pub fn snapshot_sequence(&self) -> Option<u64> {
        self.held().map(|(sequence, _)| sequence)
    }

    /// The sequence of the snapshot held, and how many of the deltas held since cover cards.
    fn held(&self) -> Option<(u64, usize)> {
        self.view().as_ref().map(|view| {
            let covering = view.deltas().iter().filter(|delta| delta.filter.counts().0 > 0).count();
            (view.snapshot().header.sequence, covering)
        })
    }

    /// Brings the data up to date: the deltas since the data held, or a new snapshot when there is
    /// none or the registry no longer keeps them. Returns the sequence reached.
    pub async fn sync(&self, registry: &mut Registry) -> Result<u64, CheckError> {
        if self.sequence().is_none() {
            self.fetch_snapshot(registry).await?;
        }
        // Twice at most: the deltas of the data held, else of a new snapshot.
        for _ in 0..2 {
            let sequence = self.sequence().unwrap_or_default();
            match registry.list_status_deltas(pb::ListStatusDeltasRequest { after_sequence: sequence }).await {
                Ok(response) => {
                    let mut reached = sequence;
                    for delta in response.into_inner().deltas {
                        reached = self.accept_delta(&delta)?;
                    }
                    return Ok(reached);
                }
                Err(status) if status.code() == Code::FailedPrecondition => {
                    self.fetch_snapshot(registry).await?;
                }
                Err(status) => return Err(status.into()),
            }
        }
        Err(tonic::Status::failed_precondition("no deltas follow even a new snapshot").into())
    }

    /// Syncs, then applies each delta the registry pushes until the stream ends (the registry
    /// stops) or fails. Once [`Settings::renew_after_deltas`] deltas that cover cards are held,
    /// takes the registry's newer snapshot when there is one (asking again every quarter of that
    /// many deltas while there is none), and follows on from it.
    pub async fn follow(&self, registry: &mut Registry) -> Result<(), CheckError> {
        let renew_after = self.settings.renew_after_deltas.max(1);
        'from_a_snapshot: loop {
            let sequence = self.sync(registry).await?;
            let request = pb::WatchStatusDeltasRequest { after_sequence: sequence };
            let mut deltas = registry.watch_status_deltas(request).await?.into_inner();
            let mut ask_at = renew_after;
            while let Some(delta) = deltas.next().await {
                self.accept_delta(&delta?.delta)?;
                let Some((snapshot, covering)) = self.held() else { continue };
                if covering < ask_at {
                    continue;
                }
                if self.fetch_snapshot_after(registry, Some(snapshot)).await?.is_some() {
                    continue 'from_a_snapshot;
                }
                ask_at = covering + (renew_after / 4).max(1);
            }
            return Ok(());
        }
    }

    /// Reports the checks answered "not valid" locally, in batches; returns how many of them the
    /// registry recorded as hits (checks of cards reported lost).
    pub async fn report_hits(&self, registry: &mut Registry) -> Result<u32, CheckError> {
        let mut recorded = 0;
        loop {
            let pending = self.store.hits()?;
            if pending.is_empty() {
                return Ok(recorded);
            }
            let batch: Vec<pb::LocalHit> = pending
                .iter()
                .take(HIT_BATCH)
                .map(|hit| pb::LocalHit {
                    id_number: hit.id_number.clone(),
                    card_serial: hit.card_serial.clone(),
                    checked_at: Some(timestamp(hit.checked_at)),
                })
                .collect();
            let sent = batch.len();
            let request = pb::ReportLocalHitsRequest {
                relying_party: self.settings.relying_party.clone(),
                hits: batch,
                request_id: String::new(),
            };
            recorded += registry.report_local_hits(request).await?.into_inner().recorded;
            let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
            self.store.drop_hits(sent)?;
        }
    }
}
