//! Plumbing every yidi service shares, so that four services never carry four copies of it:
//! the audit log, configuration, mutual TLS and caller identity, the injected clock, the bureau directory and keys, database
//! connections, the start-up sequence, the gRPC server with health and reflection,
//! error-to-Status mapping, request validation, proto ↔ domain conversions, tracing, the shutdown
//! signal, and scratch PostgreSQL databases for tests.
#![forbid(unsafe_code)]

pub mod access;
pub mod audit;
pub mod audit_rpc;
pub mod caller;
pub mod client;
pub mod clock;
pub mod config;
pub mod convert;
pub mod db;
pub mod directory;
pub mod error;
pub mod health;
pub mod idempotency;
pub mod outbox;
pub mod outbox_rpc;
pub mod overload;
pub mod population;
pub mod reload;
pub mod rpc_telemetry;
pub mod scratch_db;
pub mod security;
pub mod server;
pub mod shutdown;
pub mod signing;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod validate;

pub use clock::Clock;
pub use error::{ApiError, FieldViolations};
pub use shutdown::Shutdown;
