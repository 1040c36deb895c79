//! The gRPC edge every bureau shares: health, load shedding, mutual TLS and caller identity,
//! access control, the peer client, RPC telemetry, error-to-Status mapping, request validation and
//! proto ↔ domain conversions. It knows no service's RPC names: who may call what comes from the
//! contract's `(yidi.v1.policy)` options.
#![forbid(unsafe_code)]

pub mod access;
pub mod balance;
pub mod body;
pub mod caller;
pub mod client;
pub mod convert;
pub mod error;
pub mod health;
pub mod layer;
pub mod overload;
pub mod page;
pub mod rpc_telemetry;
pub mod security;
pub mod server_config;
pub mod tls;
pub mod validate;

pub use error::{ApiError, FieldViolations};
