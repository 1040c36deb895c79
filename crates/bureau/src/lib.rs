//! Starts a bureau: the configuration sections every bureau has, the gRPC server with health,
//! reflection, audit, outbox and idempotency mounted, and the shared start-up from a validated
//! configuration to serving.
#![forbid(unsafe_code)]

pub mod config;
pub mod process;
pub mod server;
pub mod startup;

pub use config::{BureauConfig, Sections};
