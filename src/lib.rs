//! callout: a gRPC sidecar that executes HTTP actions for workflow engines.
#![forbid(unsafe_code)]

mod accept;
pub mod action;

/// Generated protobuf and gRPC code. Used only at the gRPC edge (`api`) and by clients.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("callout.v1");
    /// Encoded descriptors of the contract and its imports, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("callout_descriptor");
}
pub mod api;
pub mod attempt;
pub mod client;
pub mod config;
pub mod cut_off;
pub mod durable;
pub mod exec;
pub mod fleet;
pub mod fmt;
mod gathered_writes;
pub mod metrics;
pub mod render;
pub mod runtime;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
