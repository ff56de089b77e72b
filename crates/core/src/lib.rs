//! nimbus-core: the vocabulary every other crate shares.
//!
//! Owns: the function manifest (`nimbus.toml`) and its validation, the validated
//! [`FunctionConfig`], route paths and the route table, the invocation types and the
//! [`Invoker`] trait that layer-2 crates meet through, API keys (format, hashing,
//! scopes, rates), and the JSON types of the
//! control API (so the CLI and the server cannot drift apart).
//!
//! Must not touch: the network, the disk, processes or clocks beyond `SystemTime::now`.
//! Everything here is pure so it can be unit-tested and fuzzed in isolation.
#![forbid(unsafe_code)]

pub mod api;
pub mod body;
pub mod capacity;
pub mod cron;
pub mod duration;
pub mod events;
pub mod filter;
pub mod invoke;
pub mod keys;
pub mod manifest;
pub mod outbound;
pub mod result;
pub mod retry;
pub mod route_options;
pub mod routes;
pub mod storage;
pub mod subscription;
pub mod text;

pub use invoke::{
    FunctionError, InstanceInfo, InvocationRecord, InvokeError, InvokeOutcome, InvokeRequest,
    InvokeStatus, Invoker, RecordSink, Target, Trigger,
};
pub use manifest::{
    AuthKind, Concurrency, FunctionConfig, ManifestError, Network, RouteSpec, Runtime, WasmOptions,
};

/// Largest request or response payload a synchronous invocation accepts (Lambda's 6 MB).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// A fresh request id: a UUID, like Lambda's `aws_request_id`, but version 7 (time
/// ordered, monotonic within the process). Invocation records are keyed by it, so
/// ordered ids make every index insert land on the B-tree's last page instead of a
/// random one: at thousands of invocations per second, random v4 keys cost the
/// metering writer a page read per record once the table outgrew SQLite's cache.
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Unix time in milliseconds (0 before 1970, saturating far in the future).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Eight random hex digits, for names that must not repeat (instance ids). Not a
/// request id prefix: those are time-ordered and repeat within a second.
pub fn short_random_id() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// Marks a request that arrived over TLS (the listener attaches it), so what the
/// gateway tells upstreams (`X-Forwarded-Proto`) is true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsConnection;

/// The listener's slot (of `--max-connections`) held by a TCP connection, attached to
/// each of its requests. A request that becomes a WebSocket keeps a clone for the
/// socket's life: once upgraded the connection is no longer hyper's, and without it
/// open WebSockets would not count against the cap.
#[derive(Clone)]
pub struct ConnectionSlot(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionSlot")
    }
}

/// A TLS client certificate the listener verified against its client CA (mTLS). The
/// listener attaches it to each request of the connection; the gateway requires it on
/// `auth = "mtls"` routes and hands it to functions as API Gateway does
/// (`requestContext.authentication.clientCert`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientCert {
    #[serde(rename = "subjectDN")]
    pub subject_dn: String,
    #[serde(rename = "issuerDN")]
    pub issuer_dn: String,
    #[serde(rename = "serialNumber")]
    pub serial_number: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    #[serde(rename = "fingerprintSha256")]
    pub fingerprint_sha256: String,
    #[serde(rename = "clientCertPem")]
    pub pem: String,
    pub validity: CertValidity,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertValidity {
    #[serde(rename = "notBefore")]
    pub not_before: String,
    #[serde(rename = "notAfter")]
    pub not_after: String,
}
