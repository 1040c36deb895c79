//! One file per table.
pub mod audit_log;
pub mod citizens;
pub mod verifications;
