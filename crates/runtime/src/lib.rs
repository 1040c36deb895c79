//! What a bureau process needs besides gRPC: layered configuration, the injected clock, the
//! shutdown signal, periodic reloads, database connections, the bureau directory and signing keys,
//! the population file, throwaway PostgreSQL databases, and telemetry start-up.
#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod db;
pub mod directory;
pub mod population;
pub mod reload;
pub mod scratch;
pub mod shutdown;
pub mod signing;
pub mod telemetry;

pub use clock::Clock;
pub use shutdown::Shutdown;
