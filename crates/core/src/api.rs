//! JSON bodies of the control API (`/v1/...`), shared by the server and the CLI.

use serde::{Deserialize, Serialize};

use crate::FunctionConfig;
use crate::routes::RouteEntry;

/// `{"error": {"code": "...", "message": "..."}}`, the body of every API error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployResponse {
    pub name: String,
    pub version: u32,
    pub digest: String,
    pub size: u64,
    /// False when the code and config equal the latest version's: nothing new was made.
    pub created: bool,
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AliasInfo {
    pub name: String,
    pub version: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionSummary {
    pub name: String,
    pub runtime: String,
    pub live_version: Option<u32>,
    pub latest_version: u32,
    pub memory_mb: u32,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionDetail {
    pub name: String,
    pub created_at: String,
    pub latest_version: u32,
    pub aliases: Vec<AliasInfo>,
    pub routes: Vec<RouteEntry>,
    /// Config of the version `live` points at (or the latest one).
    pub config: FunctionConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u32,
    pub digest: String,
    pub size: u64,
    pub created_at: String,
    pub runtime: String,
    pub handler: String,
    pub memory_mb: u32,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetAliasRequest {
    pub version: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackResponse {
    pub name: String,
    pub alias: String,
    pub from: u32,
    pub to: u32,
}

/// Result of `POST /v1/functions/{name}/invoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvokeResponse {
    pub request_id: String,
    pub function: String,
    pub version: u32,
    /// `success`, `function_error`, `timeout`, `out_of_memory`, ...
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<InvokeErrorInfo>,
    pub cold_start: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_duration_ms: Option<f64>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

/// Why an invocation failed: our `code`/`message` pair plus Lambda's error fields, so
/// both kinds of client read it without a special case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvokeErrorInfo {
    pub code: String,
    pub message: String,
    #[serde(rename = "errorType")]
    pub error_type: String,
    #[serde(rename = "errorMessage")]
    pub error_message: String,
    #[serde(rename = "stackTrace", default, skip_serializing_if = "Vec::is_empty")]
    pub stack_trace: Vec<String>,
}

impl InvokeResponse {
    /// The envelope for a finished invocation.
    pub fn from_outcome(o: &crate::InvokeOutcome, with_logs: bool) -> InvokeResponse {
        use crate::InvokeStatus;
        let (result, error) = match &o.status {
            InvokeStatus::Success(bytes) => (
                Some(serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)),
                None,
            ),
            InvokeStatus::FunctionError(fe) => (
                None,
                Some(InvokeErrorInfo {
                    code: o.status.code().into(),
                    message: o.status.message(),
                    error_type: fe.error_type.clone(),
                    error_message: fe.error_message.clone(),
                    stack_trace: fe.stack_trace.clone(),
                }),
            ),
            other => (
                None,
                Some(InvokeErrorInfo {
                    code: other.code().into(),
                    message: other.message(),
                    error_type: format!("Nimbus.{}", camel(other.code())),
                    error_message: other.message(),
                    stack_trace: vec![],
                }),
            ),
        };
        InvokeResponse {
            request_id: o.request_id.clone(),
            function: o.function.clone(),
            version: o.version,
            status: o.status.code().into(),
            result,
            error,
            cold_start: o.cold_start,
            init_duration_ms: o.init_duration_ms,
            duration_ms: o.duration_ms,
            logs: with_logs.then(|| o.logs.clone()),
        }
    }
}

fn camel(code: &str) -> String {
    code.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InvokeOutcome, InvokeStatus};

    fn outcome(status: InvokeStatus) -> InvokeOutcome {
        InvokeOutcome {
            request_id: "r".into(),
            function: "f".into(),
            version: 1,
            status,
            cold_start: true,
            init_duration_ms: Some(1.0),
            duration_ms: 2.0,
            logs: "log".into(),
            memory_mb: 128,
            peak_memory_bytes: None,
            cpu_ms: None,
        }
    }

    #[test]
    fn envelope_carries_both_error_conventions() {
        let r = InvokeResponse::from_outcome(&outcome(InvokeStatus::Timeout), false);
        let e = r.error.expect("error");
        assert_eq!(e.code, "timeout");
        assert_eq!(e.error_type, "Nimbus.Timeout");
        assert!(r.logs.is_none());
        let r = InvokeResponse::from_outcome(
            &outcome(InvokeStatus::Success(bytes::Bytes::from_static(
                b"{\"a\":1}",
            ))),
            true,
        );
        assert_eq!(r.result.expect("result")["a"], 1);
        assert_eq!(r.logs.as_deref(), Some("log"));
    }

    #[test]
    fn a_result_at_the_depth_limit_survives_the_envelope_round_trip() {
        let depth = crate::result::MAX_RESULT_DEPTH;
        let deepest = format!(
            "{}1{}",
            "{\"k\":[".repeat(depth / 2),
            "]}".repeat(depth / 2)
        );
        assert_eq!(crate::result::check_result(deepest.as_bytes()), Ok(()));
        let bytes = bytes::Bytes::from(deepest.clone());
        let r = InvokeResponse::from_outcome(&outcome(InvokeStatus::Success(bytes)), false);
        // The CLI reads the whole envelope: the result's depth plus the envelope's own.
        let wire = serde_json::to_vec(&r).expect("serialize");
        let back: InvokeResponse = serde_json::from_slice(&wire).expect("parse envelope");
        assert_eq!(back.result.map(|v| v.to_string()), Some(deepest));
    }

    #[test]
    fn an_undecodable_result_is_a_502_naming_why() {
        let why = crate::result::InvalidResult::DecodeUtf8 { at: 7 };
        let st = InvokeStatus::InvalidResult(why);
        assert_eq!((st.code(), st.http_status()), ("invalid_result", 502));
        let r = InvokeResponse::from_outcome(&outcome(st), false);
        let e = r.error.expect("error");
        assert_eq!(e.error_type, "Nimbus.InvalidResult");
        assert!(
            e.message.contains("invalid UTF-8 at byte 7"),
            "{}",
            e.message
        );
        assert!(r.result.is_none());
    }
}

/// An API key as the control API shows it: never its secret, which only
/// [`CreatedKey`] carries, once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<crate::keys::Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<crate::keys::Quota>,
    /// Requests counted against the quota in its current period (as last persisted:
    /// the gateway writes its counters about once a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_used: Option<u64>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
    /// Whether the gateway accepts the key at the time of the answer: an expired key
    /// is not `active`, though nobody revoked it.
    #[serde(default)]
    pub status: KeyStatus,
}

/// What the gateway does with a key now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    #[default]
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    /// Revocation wins over expiry; expiry is reached at `expires_at_ms` itself, as the
    /// gateway's check (`crate::keys`) has it.
    pub fn at(revoked_at_ms: Option<i64>, expires_at_ms: Option<i64>, now_ms: i64) -> Self {
        if revoked_at_ms.is_some() {
            KeyStatus::Revoked
        } else if expires_at_ms.is_some_and(|t| t <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

impl std::fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        })
    }
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    pub scopes: Vec<String>,
    /// `50/s`, `600/m`, `10/s:20` (burst 20).
    #[serde(default)]
    pub rate: Option<String>,
    /// `10000/day`, `250000/month`.
    #[serde(default)]
    pub quota: Option<String>,
    /// Lifetime, e.g. `30d`, `12h`.
    #[serde(default)]
    pub expires_in: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    /// The key itself: shown this once, stored only as a hash.
    pub key: String,
    #[serde(flatten)]
    pub info: ApiKeyInfo,
}

/// `POST /v1/routes`: a route outside any manifest (it survives deploys). CORS rules
/// are manifest-only.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRouteRequest {
    pub method: String,
    pub path: String,
    /// The target function; empty when the route points at `upstream`.
    #[serde(default)]
    pub function: String,
    #[serde(default)]
    pub alias: Option<String>,
    /// `none` (default), `api_key` or `jwt`.
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub rate: Option<String>,
    #[serde(default)]
    pub rate_per_ip: Option<String>,
    /// Upstream URLs to proxy to instead of a function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<String>,
    /// Only requests for this host (`api.example.com`, `*.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// How long the gateway waits (`5s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// How long a failed upstream is skipped (`10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_down_for: Option<String>,
}

/// `POST /v1/topics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopicRequest {
    pub name: String,
    /// How long events are kept, e.g. `7d` (default 7 days).
    #[serde(default)]
    pub retention: Option<String>,
    /// Size bound, e.g. `1GB` (default 1 GiB); the oldest events go first.
    #[serde(default)]
    pub max_bytes: Option<String>,
    /// How long an event id is remembered for de-duplication, e.g. `10m` (default).
    #[serde(default)]
    pub dedup_window: Option<String>,
}

/// `POST /v1/subscriptions`: the fields of `[[events]]` plus the function.
pub type CreateSubscriptionRequest = crate::subscription::RawSubscription;

/// A subscription with its delivery position, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    #[serde(flatten)]
    pub spec: crate::subscription::SubscriptionSpec,
    /// `manifest` (replaced on each deploy of its function) or `api`.
    pub source: String,
    /// Every offset below it is settled (delivered, filtered out, dead-lettered or dropped).
    pub cursor: i64,
    /// Events of the topic not yet settled.
    pub lag: i64,
    /// Events above the cursor waiting for a retry.
    pub retrying: i64,
    pub created_at_ms: i64,
}

/// `POST /v1/subscriptions/{name}/reset`: exactly one of the two.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetSubscriptionRequest {
    /// RFC 3339: start at the first event published at or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

/// `202` answer of an async invoke: the invocation is durable and queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AsyncInvokeResponse {
    pub request_id: String,
    pub function: String,
    pub status: String,
}

/// `GET /v1/invocations/{id}` for an async invocation: its queue state, plus the
/// metering record of its last attempt once there is one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AsyncInvocationInfo {
    pub request_id: String,
    pub function: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    /// `api` or `cron`.
    pub source: String,
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<crate::InvocationRecord>,
}

/// One fire of a cron, as `nimbus cron ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CronFireInfo {
    pub scheduled_ms: i64,
    pub scheduled_at: String,
    /// `scheduled`, `catch_up`, `manual` or `skipped`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
}

/// `GET /v1/cron`: one cron trigger of a deployed function.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CronInfo {
    pub function: String,
    pub name: String,
    pub schedule: String,
    pub timezone: String,
    pub catch_up: bool,
    pub overlap: String,
    /// The next three fire times (RFC 3339, UTC).
    pub next: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fire: Option<CronFireInfo>,
    /// Recent fires, newest first.
    #[serde(default)]
    pub fires: Vec<CronFireInfo>,
}

/// `POST /v1/cron/{function}/{name}/trigger`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CronTriggerResponse {
    pub function: String,
    pub name: String,
    pub request_id: String,
}

#[cfg(test)]
mod key_status_tests {
    use super::KeyStatus;

    #[test]
    fn expiry_and_revocation_decide_the_status() {
        assert_eq!(KeyStatus::at(None, None, 10), KeyStatus::Active);
        assert_eq!(KeyStatus::at(None, Some(11), 10), KeyStatus::Active);
        assert_eq!(KeyStatus::at(None, Some(10), 10), KeyStatus::Expired);
        assert_eq!(KeyStatus::at(None, Some(5), 10), KeyStatus::Expired);
        assert_eq!(KeyStatus::at(Some(3), Some(5), 10), KeyStatus::Revoked);
        assert_eq!(
            serde_json::to_string(&KeyStatus::Expired).expect("json"),
            "\"expired\""
        );
    }
}
