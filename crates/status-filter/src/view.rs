//! A snapshot and the deltas applied to it, as a relying party holds them.
use chrono::{DateTime, Utc};

use crate::{
    filter::Lookup,
    key::CardKey,
    receipt::CardReceipt,
    signed::{Kind, StatusFile},
};

/// Why a file does not fit the view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a {0:?} where a {1:?} was expected")]
    WrongKind(Kind, Kind),
    #[error("the delta starts at sequence {from}, the data is at {at}")]
    Gap { from: u64, at: u64 },
    #[error("the delta is from registry {0:?}, the snapshot from another")]
    OtherRegistry(String),
}

/// See the module documentation. Deltas are consulted newest first.
pub struct StatusView {
    snapshot: StatusFile,
    deltas: Vec<StatusFile>,
}

impl StatusView {
    pub fn new(snapshot: StatusFile) -> Result<Self, ChainError> {
        if snapshot.header.kind != Kind::Snapshot {
            return Err(ChainError::WrongKind(snapshot.header.kind, Kind::Snapshot));
        }
        Ok(Self { snapshot, deltas: Vec::new() })
    }

    /// Applies the next delta: it must start where the data is.
    pub fn apply(&mut self, delta: StatusFile) -> Result<(), ChainError> {
        let header = &delta.header;
        if header.kind != Kind::Delta {
            return Err(ChainError::WrongKind(header.kind, Kind::Delta));
        }
        if header.registry_id != self.snapshot.header.registry_id {
            return Err(ChainError::OtherRegistry(header.registry_id.clone()));
        }
        if header.from_sequence != self.sequence() {
            return Err(ChainError::Gap { from: header.from_sequence, at: self.sequence() });
        }
        // An empty delta only says "nothing changed until then": keep its time, not its filter.
        if self.deltas.last().is_some_and(|last| last.filter.counts().0 == 0 && last.ask_online.is_empty()) {
            self.deltas.pop();
        }
        self.deltas.push(delta);
        Ok(())
    }

    /// The last status event reflected.
    pub fn sequence(&self) -> u64 {
        self.deltas.last().map_or(self.snapshot.header.sequence, |d| d.header.sequence)
    }

    /// When the newest file was made: the data is as of then.
    pub fn as_of(&self) -> DateTime<Utc> {
        self.deltas.last().map_or(self.snapshot.header.built_at, |d| d.header.built_at)
    }

    /// After this the snapshot is not used (a new one is needed).
    pub fn usable_until(&self) -> DateTime<Utc> {
        self.snapshot.header.usable_until
    }

    pub fn snapshot(&self) -> &StatusFile {
        &self.snapshot
    }

    pub fn deltas(&self) -> &[StatusFile] {
        &self.deltas
    }

    /// The newest word on a card: the last delta holding it, else the snapshot.
    pub fn lookup(&self, key: &CardKey) -> Lookup {
        self.in_deltas(key).or_else(|| self.snapshot.find(key)).unwrap_or(Lookup::NotCovered)
    }

    fn in_deltas(&self, key: &CardKey) -> Option<Lookup> {
        self.deltas.iter().rev().find_map(|delta| delta.find(key))
    }

    /// The same for a card presented with its receipt (verified by the caller): the snapshot
    /// answers it without coverage when the receipt shows the card registered by the snapshot's
    /// sequence and not expiring while the snapshot is used (such cards are left out of it).
    /// A receipt of another card, another registry, or a later sequence that no delta holds:
    /// not covered.
    pub fn lookup_with_receipt(&self, key: &CardKey, receipt: &CardReceipt) -> Lookup {
        let header = &self.snapshot.header;
        if !receipt.is_for(key) || receipt.registry_id != header.registry_id {
            return Lookup::NotCovered;
        }
        if let Some(found) = self.in_deltas(key) {
            return found;
        }
        if receipt.sequence > header.sequence || receipt.may_expire_between(header.built_at, header.usable_until) {
            return Lookup::NotCovered;
        }
        self.snapshot.find_registered(key).unwrap_or(Lookup::NotCovered)
    }
}
