//! One file per table.
pub mod application;
pub mod application_event;
