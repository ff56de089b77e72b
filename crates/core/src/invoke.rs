//! One invocation, as every trigger (API, gateway, events, cron) asks for it and as
//! the worker answers it. Layer-2 crates only ever see a worker as `Arc<dyn Invoker>`.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Which version to run: an alias resolved at call time, or a fixed version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Alias(String),
    Version(u32),
}

impl Default for Target {
    fn default() -> Self {
        Target::Alias("live".into())
    }
}

/// What started an invocation; recorded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Api,
    Http,
    Event,
    Cron,
    /// A route's helper (Lambda authorizer, request or response transform): a JSON event
    /// in, a JSON answer out, whatever the function's runtime.
    Hook,
}

#[derive(Debug, Clone)]
pub struct InvokeRequest {
    pub request_id: String,
    pub function: String,
    pub target: Target,
    pub trigger: Trigger,
    /// The event, as JSON bytes.
    pub payload: Bytes,
    /// W3C `traceparent` of the call, handed to the function (`traceId` in its frame).
    pub trace: Option<String>,
}

/// An error the handler raised, in Lambda's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionError {
    pub error_type: String,
    pub error_message: String,
    #[serde(default)]
    pub stack_trace: Vec<String>,
}

/// How an invocation ended once it reached an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeStatus {
    /// The handler returned; the result as JSON bytes.
    Success(Bytes),
    /// The handler raised (or the module failed to load).
    FunctionError(FunctionError),
    /// The deadline passed; the instance was killed.
    Timeout,
    /// The instance's cgroup killed it for using more memory than allowed.
    OutOfMemory,
    /// The instance died or broke the protocol.
    Crashed(String),
    /// The result exceeded the payload limit.
    ResultTooLarge,
    /// The result cannot be decoded (not UTF-8, not JSON, nested too deep): no reader
    /// could hand it on, so it is never reported as a success.
    InvalidResult(crate::result::InvalidResult),
    /// The sandbox could not be set up; nothing ran.
    SandboxFailed(String),
}

impl InvokeStatus {
    pub fn is_success(&self) -> bool {
        matches!(self, InvokeStatus::Success(_))
    }

    /// A short machine-readable label, used as an error code and a metric label.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeStatus::Success(_) => "success",
            InvokeStatus::FunctionError(_) => "function_error",
            InvokeStatus::Timeout => "timeout",
            InvokeStatus::OutOfMemory => "out_of_memory",
            InvokeStatus::Crashed(_) => "function_crashed",
            InvokeStatus::ResultTooLarge => "result_too_large",
            InvokeStatus::InvalidResult(_) => "invalid_result",
            InvokeStatus::SandboxFailed(_) => "sandbox_failed",
        }
    }

    /// The HTTP status a platform failure maps to (DESIGN.md section 4).
    pub fn http_status(&self) -> u16 {
        match self {
            InvokeStatus::Success(_) | InvokeStatus::FunctionError(_) => 200,
            InvokeStatus::Timeout => 504,
            InvokeStatus::OutOfMemory
            | InvokeStatus::Crashed(_)
            | InvokeStatus::ResultTooLarge
            | InvokeStatus::InvalidResult(_) => 502,
            InvokeStatus::SandboxFailed(_) => 500,
        }
    }

    /// A message safe to show a caller: no host paths or internal chains.
    pub fn message(&self) -> String {
        match self {
            InvokeStatus::Success(_) => "ok".into(),
            InvokeStatus::FunctionError(e) => format!("{}: {}", e.error_type, e.error_message),
            InvokeStatus::Timeout => "the function did not finish before its timeout".into(),
            InvokeStatus::OutOfMemory => {
                "the function used more memory than its memory_mb limit".into()
            }
            InvokeStatus::Crashed(detail) => format!("the function instance crashed: {detail}"),
            InvokeStatus::ResultTooLarge => format!(
                "the function's result exceeds the {} MB limit",
                crate::MAX_PAYLOAD_BYTES / (1024 * 1024)
            ),
            InvokeStatus::InvalidResult(why) => {
                format!("the function's result cannot be decoded: {why}")
            }
            InvokeStatus::SandboxFailed(_) => "the function's sandbox could not be started".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InvokeOutcome {
    pub request_id: String,
    pub function: String,
    pub version: u32,
    pub status: InvokeStatus,
    pub cold_start: bool,
    /// Time to start the instance and load the handler, when this was a cold start.
    pub init_duration_ms: Option<f64>,
    pub duration_ms: f64,
    /// What the function wrote to stdout/stderr during this invocation (capped).
    pub logs: String,
    pub memory_mb: u32,
    /// Peak memory used by the instance during this invocation, when measured.
    pub peak_memory_bytes: Option<u64>,
    /// CPU time used by the instance during this invocation, when measured.
    pub cpu_ms: Option<f64>,
}

/// What the platform keeps of every invocation: the metering record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRecord {
    pub request_id: String,
    pub function: String,
    pub version: u32,
    pub trigger: Trigger,
    /// Unix time in milliseconds when the invocation started.
    pub started_at_ms: i64,
    pub duration_ms: f64,
    /// Whole milliseconds billed: duration plus init (on a cold start), rounded up.
    pub billed_ms: u64,
    pub memory_mb: u32,
    /// memory_mb / 1024 * billed_ms / 1000.
    pub gb_seconds: f64,
    /// Peak memory the instance actually used during this invocation (cgroup).
    pub peak_memory_bytes: Option<u64>,
    /// CPU time the instance used during this invocation (cgroup).
    pub cpu_ms: Option<f64>,
    pub cold_start: bool,
    pub init_duration_ms: Option<f64>,
    /// `success`, `function_error`, `timeout`, ... ([`InvokeStatus::code`]).
    pub status: String,
    pub error_type: Option<String>,
    /// What the function printed (capped by the worker).
    pub logs: String,
}

impl InvocationRecord {
    pub fn billed(duration_ms: f64, init_ms: Option<f64>) -> u64 {
        (duration_ms + init_ms.unwrap_or(0.0)).max(0.0).ceil() as u64
    }

    pub fn gb_seconds(memory_mb: u32, billed_ms: u64) -> f64 {
        f64::from(memory_mb) / 1024.0 * billed_ms as f64 / 1000.0
    }
}

/// Where the worker hands finished records. Must not block: implementations queue.
pub trait RecordSink: Send + Sync + 'static {
    fn record(&self, record: InvocationRecord);
}

/// Failures before any instance was involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    #[error("{0}")]
    NotFound(String),
    #[error("too many concurrent invocations of `{function}`; retry in {retry_after_s}s")]
    Throttled {
        function: String,
        retry_after_s: u64,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("the platform is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs functions. Implemented by the worker; used by the control API, the gateway,
/// the broker and the scheduler.
pub trait Invoker: Send + Sync + 'static {
    fn invoke(&self, req: InvokeRequest) -> BoxFuture<'_, Result<InvokeOutcome, InvokeError>>;

    /// Retires every instance of a function (after `rm`, or to force a cold start);
    /// returns how many were retired.
    fn evict(&self, function: &str) -> BoxFuture<'_, usize>;

    /// The live instances, of one function or all.
    fn instances(&self, function: Option<String>) -> BoxFuture<'_, Vec<InstanceInfo>>;
}

/// One live instance as `nimbus instances` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub function: String,
    pub version: u32,
    /// `starting`, `idle`, `busy` or `draining`.
    pub state: String,
    pub age_ms: u64,
    pub idle_ms: Option<u64>,
    pub invocations: u64,
    /// Memory the instance's cgroup holds now.
    pub memory_bytes: Option<u64>,
    pub memory_mb: u32,
}
