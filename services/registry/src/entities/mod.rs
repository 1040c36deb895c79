//! One sea-orm entity per table.
pub mod audit_log;
pub mod cards;
pub mod hits;
pub mod loss_reports;
pub mod status_events;
