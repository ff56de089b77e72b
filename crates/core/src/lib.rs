//! nimbus-core: the vocabulary every other crate shares.
//!
//! Owns: the function manifest (`nimbus.toml`) and its validation, the validated
//! [`FunctionConfig`], route paths and the route table, the invocation types and the
//! [`Invoker`] trait that layer-2 crates meet through, and the JSON types of the
//! control API (so the CLI and the server cannot drift apart).
//!
//! Must not touch: the network, the disk, processes or clocks beyond `SystemTime::now`.
//! Everything here is pure so it can be unit-tested and fuzzed in isolation.
#![forbid(unsafe_code)]

pub mod api;
pub mod duration;
pub mod invoke;
pub mod manifest;
pub mod routes;

pub use invoke::{
    FunctionError, InstanceInfo, InvocationRecord, InvokeError, InvokeOutcome, InvokeRequest,
    InvokeStatus, Invoker, RecordSink, Target, Trigger,
};
pub use manifest::{
    AuthKind, Concurrency, FunctionConfig, ManifestError, Network, RouteSpec, Runtime,
};

/// Largest request or response payload a synchronous invocation accepts (Lambda's 6 MB).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// A fresh request id (UUID v4, as Lambda's `aws_request_id`).
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
