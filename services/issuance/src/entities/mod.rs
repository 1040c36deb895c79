//! One file per table.
pub mod orders;
