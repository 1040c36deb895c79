//! One file per table; `stored` holds the enum columns they share.
pub mod application;
pub mod application_event;
pub mod stored;
