//! What a home bureau's population register says of a citizen beyond the card data: the credit
//! record (S3) and whether the household registration stands (a cancelled one: deceased).
use serde::{Deserialize, Serialize};

/// The credit record: a bad one is refused in a different place (S3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credit {
    Good,
    Bad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    Active,
    /// Cancelled: the citizen died.
    Cancelled,
}
