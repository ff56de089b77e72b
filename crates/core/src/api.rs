//! JSON bodies of the control API (`/v1/...`), shared by the server and the CLI.

use serde::{Deserialize, Serialize};

use crate::FunctionConfig;
use crate::invoke::FunctionError;
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
    pub error: Option<FunctionError>,
    pub cold_start: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_duration_ms: Option<f64>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}
