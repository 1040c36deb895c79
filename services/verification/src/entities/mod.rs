//! One file per table.
pub mod citizens;
pub mod verifications;
