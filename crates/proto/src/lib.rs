//! The `yidi.v1` gRPC contract, generated from `proto/yidi/v1` at build time.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("yidi.v1");
}

pub mod policy;

/// Encoded `FileDescriptorSet` of every `yidi.v1` file, for gRPC server reflection, custom options
/// (`yidi.v1.policy`, read by [`policy`]) included.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/yidi_descriptor.bin"));

pub use prost_types::Timestamp;
