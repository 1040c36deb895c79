//! One file per table.
pub mod audit_log;
pub mod orders;
