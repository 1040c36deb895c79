//! Status that relying parties carry (issue 16): the registry's signed snapshot of every card's
//! status as an exact filter (Mozilla's `clubcard`, the filter behind Firefox's CRLite), signed
//! deltas, and the view a relying party keeps of them. Pure: no I/O.
//!
//! What a lookup guarantees: for a card the snapshot covers, the answer is exact ("valid" or "not
//! valid", as the registry's index had it). For a pair the registry never registered, the answer
//! is "not covered" except with probability about 2^-coverage_bits per lookup (then the status
//! filter answers arbitrarily). See `filter` for why, and docs/STATUS-SNAPSHOTS.md for the cost.
//! A card presented with its registration receipt ([`CardReceipt`]) needs no coverage: the
//! status filter alone answers it exactly.
#![forbid(unsafe_code)]

mod filter;
mod key;
mod receipt;
mod signed;
mod view;
mod wire;

pub use filter::{Filter, FilterBuilder, FilterCard, Lookup, MAX_COVERAGE_BITS, ProvinceAgain};
pub use key::{CardKey, NO_PROVINCE_BLOCK};
pub use receipt::CardReceipt;
pub use signed::{Header, Kind, StatusFile, VerifyError};
pub use view::{ChainError, StatusView};

/// Why bytes are not a snapshot or delta.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated")]
    Truncated,
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("bytes after the end")]
    Trailing,
}

#[cfg(test)]
mod tests;
