//! Everything needed to run the whole suite on one machine: bureau keys and the directory
//! (`topology`), the demo CA and certificates (`certs`), the deterministic synthetic population (`population`), and the launcher that
//! starts each bureau as its own process (`suite`). Used by the `yidi-demo` command and by the
//! integration tests, so the demo and the tests run the same thing.
#![forbid(unsafe_code)]

pub mod certs;
pub mod population;
pub mod suite;
pub mod topology;
