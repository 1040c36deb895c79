//! One sea-orm entity per table.
pub mod cards;
pub mod hits;
pub mod loss_reports;
pub mod status_events;
