//! `nimbus.toml`: parsing and validation into a [`FunctionConfig`].
//!
//! Every error names the file, the field and what is allowed, because the manifest is
//! the one place users type by hand.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::routes::validate_route_path;

pub const MANIFEST_FILE: &str = "nimbus.toml";
pub const MEMORY_MIN_MB: u32 = 64;
pub const MEMORY_MAX_MB: u32 = 10_240;
pub const DEFAULT_MEMORY_MB: u32 = 128;
pub const TIMEOUT_MIN_MS: u64 = 1_000;
pub const TIMEOUT_MAX_MS: u64 = 15 * 60 * 1_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;
pub const MAX_ENV_BYTES: usize = 4 * 1024;
pub const MAX_INSTANCES_LIMIT: u32 = 1_000;

/// A manifest problem: which file, which field, what is wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: field `{}`: {}", self.file, self.field, self.message)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Python3,
    Node,
    Exec,
    Wasm,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python3 => "python3",
            Runtime::Node => "node",
            Runtime::Exec => "exec",
            Runtime::Wasm => "wasm",
        }
    }

    /// Accepts our names and Lambda's runtime identifiers (`python3.12`, `nodejs20.x`),
    /// so an existing Lambda definition ports without renaming.
    pub fn parse(name: &str) -> Option<Runtime> {
        match name {
            "python3" | "python" => Some(Runtime::Python3),
            "node" | "nodejs" => Some(Runtime::Node),
            "exec" => Some(Runtime::Exec),
            "wasm" => Some(Runtime::Wasm),
            n if n.starts_with("python3.") && n[8..].chars().all(|c| c.is_ascii_digit()) => {
                Some(Runtime::Python3)
            }
            n if n.starts_with("nodejs") && n.ends_with(".x") => Some(Runtime::Node),
            _ => None,
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    None,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    #[default]
    None,
    ApiKey,
    Jwt,
    Mtls,
    /// A Lambda authorizer function decides (`authorizer = "fn"`).
    Authorizer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    pub max_instances: u32,
    pub min_instances: u32,
    pub idle_timeout_ms: u64,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            max_instances: 10,
            min_instances: 0,
            idle_timeout_ms: 5 * 60 * 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// Upper-case method, or `ANY`.
    pub method: String,
    pub path: String,
    /// Only requests for this host; empty: any host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Upstream URLs the gateway proxies to instead of invoking the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<String>,
    #[serde(default)]
    pub auth: AuthKind,
    #[serde(
        default,
        skip_serializing_if = "crate::route_options::RouteOptions::is_empty"
    )]
    pub options: crate::route_options::RouteOptions,
}

impl RouteSpec {
    /// `GET /hello/{name}`: API Gateway's route key (`GET host/path` on a host).
    pub fn route_key(&self) -> String {
        if self.host.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            format!("{} {}{}", self.method, self.host, self.path)
        }
    }
}

/// A validated function definition; what a version stores and a worker runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionConfig {
    pub name: String,
    pub runtime: Runtime,
    /// The runtime as the user wrote it (`python3.12`), for the operator's interpreter map.
    pub runtime_name: String,
    pub handler: String,
    pub memory_mb: u32,
    pub timeout_ms: u64,
    #[serde(default)]
    pub description: String,
    pub concurrency: Concurrency,
    pub network: Network,
    pub env: BTreeMap<String, String>,
    pub routes: Vec<RouteSpec>,
    /// Validated [`CronSpec`](crate::cron::CronSpec)s as JSON (see [`Self::cron_specs`]);
    /// kept as values so versions stored before cron was validated still decode.
    #[serde(default)]
    pub cron: Vec<serde_json::Value>,
    /// Kept verbatim until the broker owns its schema.
    #[serde(default)]
    pub events: Vec<serde_json::Value>,
    /// Capabilities of a `wasm` function (empty for the others).
    #[serde(default)]
    pub wasm: WasmOptions,
}

/// What a WebAssembly function may do beyond computing: everything is denied unless
/// listed here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WasmOptions {
    /// `allowed_outbound_hosts`: the only URLs outgoing `wasi:http` requests may reach.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<crate::outbound::OutboundRule>,
    /// `[wasm] files = true`: the function folder, read-only, at `/var/task`.
    #[serde(default)]
    pub files: bool,
    /// `[wasm] fuel = N`: instructions (roughly) one invocation may run.
    #[serde(default)]
    pub fuel: Option<u64>,
}

impl FunctionConfig {
    /// The cron triggers. Entries that do not decode (stored by a build that kept
    /// `[[cron]]` raw) are left out rather than failing the whole function.
    pub fn cron_specs(&self) -> Vec<crate::cron::CronSpec> {
        self.cron
            .iter()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// The file the handler lives in, relative to the function folder, for the checks at
    /// deploy that the handler exists.
    pub fn handler_candidates(&self) -> Vec<String> {
        match self.runtime {
            Runtime::Python3 => {
                let module = self.handler.rsplit_once('.').map_or("", |(m, _)| m);
                let base = module.replace('.', "/");
                vec![format!("{base}.py"), format!("{base}/__init__.py")]
            }
            Runtime::Node => {
                let file = self.handler.rsplit_once('.').map_or("", |(f, _)| f);
                ["js", "mjs", "cjs"]
                    .iter()
                    .map(|ext| format!("{file}.{ext}"))
                    .collect()
            }
            Runtime::Exec | Runtime::Wasm => vec![self.handler.clone()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: Option<String>,
    runtime: Option<String>,
    handler: Option<String>,
    memory_mb: Option<i64>,
    timeout: Option<toml::Value>,
    description: Option<String>,
    concurrency: Option<RawConcurrency>,
    network: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, toml::Value>,
    #[serde(default)]
    http: Vec<RawRoute>,
    #[serde(default)]
    websocket: Vec<RawWebSocket>,
    #[serde(default)]
    cron: Vec<toml::Value>,
    #[serde(default)]
    events: Vec<toml::Value>,
    allowed_outbound_hosts: Option<Vec<String>>,
    wasm: Option<RawWasm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWasm {
    files: Option<bool>,
    fuel: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConcurrency {
    max_instances: Option<i64>,
    min_instances: Option<i64>,
    idle_timeout: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: Option<String>,
    path: Option<String>,
    auth: Option<String>,
    cors: Option<crate::route_options::RawCors>,
    rate: Option<String>,
    rate_per_ip: Option<String>,
    scopes: Option<Vec<String>>,
    timeout: Option<toml::Value>,
    authorizer: Option<String>,
    authorizer_ttl: Option<toml::Value>,
    identity_source: Option<Vec<String>>,
    request_headers: Option<crate::route_options::RawHeaderRewrite>,
    response_headers: Option<crate::route_options::RawHeaderRewrite>,
    transform_request: Option<String>,
    transform_response: Option<String>,
    host: Option<String>,
    upstream: Option<Vec<String>>,
    upstream_down_for: Option<String>,
}

/// A `[[websocket]]` table: a path whose connections reach the function.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebSocket {
    path: Option<String>,
    auth: Option<String>,
    rate: Option<String>,
    rate_per_ip: Option<String>,
    scopes: Option<Vec<String>>,
}

pub const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "ANY",
];

/// Env names Lambda reserves for the platform; a manifest may not override them.
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// Function names appear in URLs and file names: keep them boring.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= 64;
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok_len && first_ok && rest_ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: use 1-64 characters of a-z, 0-9, `-` and `_`, starting with a letter or digit"
        ))
    }
}

/// Parses and validates a manifest. `file` is only used to name the source in errors.
pub fn parse_manifest(file: &str, text: &str) -> Result<FunctionConfig, ManifestError> {
    let err = |field: &str, message: String| ManifestError {
        file: file.to_string(),
        field: field.to_string(),
        message,
    };
    let raw: RawManifest = toml::from_str(text).map_err(|e| {
        // toml's message spans several lines with a caret; users want one line.
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        err("", format!("invalid TOML: {msg}{at}"))
    })?;

    let name = raw.name.ok_or_else(|| err("name", "is required".into()))?;
    validate_name(&name).map_err(|m| err("name", m))?;

    let runtime_name = raw.runtime.ok_or_else(|| {
        err(
            "runtime",
            "is required (python3, node, exec or wasm)".into(),
        )
    })?;
    let runtime = Runtime::parse(&runtime_name).ok_or_else(|| {
        err(
            "runtime",
            format!("unknown runtime `{runtime_name}`; allowed: python3, node, exec, wasm"),
        )
    })?;

    let wasm = parse_wasm_options(runtime, raw.allowed_outbound_hosts, raw.wasm, &raw.network)
        .map_err(|(field, m)| err(field, m))?;

    let handler = raw
        .handler
        .ok_or_else(|| err("handler", "is required".into()))?;
    validate_handler(runtime, &handler).map_err(|m| err("handler", m))?;

    let memory_mb = match raw.memory_mb {
        None => DEFAULT_MEMORY_MB,
        Some(m) if (MEMORY_MIN_MB as i64..=MEMORY_MAX_MB as i64).contains(&m) => m as u32,
        Some(m) => {
            return Err(err(
                "memory_mb",
                format!("{m} is outside the allowed range {MEMORY_MIN_MB}..{MEMORY_MAX_MB} (MB)"),
            ));
        }
    };

    let timeout_ms = match &raw.timeout {
        None => DEFAULT_TIMEOUT_MS,
        Some(v) => {
            let ms = duration_value_ms(v).map_err(|m| err("timeout", m))?;
            if !(TIMEOUT_MIN_MS..=TIMEOUT_MAX_MS).contains(&ms) {
                return Err(err(
                    "timeout",
                    format!(
                        "{} is outside the allowed range 1s..15m",
                        crate::duration::format_ms(ms)
                    ),
                ));
            }
            ms
        }
    };

    let mut concurrency = Concurrency::default();
    if let Some(c) = raw.concurrency {
        if let Some(max) = c.max_instances {
            if !(1..=MAX_INSTANCES_LIMIT as i64).contains(&max) {
                return Err(err(
                    "concurrency.max_instances",
                    format!("{max} is outside the allowed range 1..{MAX_INSTANCES_LIMIT}"),
                ));
            }
            concurrency.max_instances = max as u32;
        }
        if let Some(min) = c.min_instances {
            if min < 0 || min > concurrency.max_instances as i64 {
                return Err(err(
                    "concurrency.min_instances",
                    format!(
                        "{min} must be between 0 and max_instances ({})",
                        concurrency.max_instances
                    ),
                ));
            }
            concurrency.min_instances = min as u32;
        }
        if let Some(v) = c.idle_timeout {
            let ms = duration_value_ms(&v).map_err(|m| err("concurrency.idle_timeout", m))?;
            if !(1_000..=24 * 3_600_000).contains(&ms) {
                return Err(err(
                    "concurrency.idle_timeout",
                    "must be between 1s and 24h".into(),
                ));
            }
            concurrency.idle_timeout_ms = ms;
        }
    }

    let network = match raw.network.as_deref() {
        None | Some("none") => Network::None,
        Some("egress") => Network::Egress,
        Some(other) => {
            return Err(err(
                "network",
                format!("unknown value `{other}`; allowed: none, egress"),
            ));
        }
    };

    let mut env = BTreeMap::new();
    let mut env_bytes = 0;
    for (k, v) in raw.env {
        let field = format!("env.{k}");
        if k.is_empty()
            || k.starts_with(|c: char| c.is_ascii_digit())
            || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(err(
                &field,
                "names may only hold A-Z, a-z, 0-9 and `_`, and not start with a digit".into(),
            ));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            return Err(err(&field, "is reserved for the platform".into()));
        }
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err(err(&field, "must be a string, number or boolean".into())),
        };
        env_bytes += k.len() + value.len();
        env.insert(k, value);
    }
    if env_bytes > MAX_ENV_BYTES {
        return Err(err(
            "env",
            format!("variables take {env_bytes} bytes; at most {MAX_ENV_BYTES} are allowed"),
        ));
    }

    let mut routes: Vec<RouteSpec> = Vec::new();
    for (i, r) in raw.http.into_iter().enumerate() {
        let field = |f: &str| format!("http[{i}].{f}");
        let method = r
            .method
            .unwrap_or_else(|| "ANY".into())
            .to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(err(
                &field("method"),
                format!("unknown method `{method}`; allowed: {}", METHODS.join(", ")),
            ));
        }
        let path = r
            .path
            .ok_or_else(|| err(&field("path"), "is required".into()))?;
        validate_route_path(&path).map_err(|m| err(&field("path"), m))?;
        let auth = match (r.auth.as_deref(), &r.authorizer) {
            // Naming an authorizer is asking for one.
            (None, Some(_)) | (Some("authorizer"), _) => AuthKind::Authorizer,
            (text, _) => parse_auth(text).map_err(|m| {
                err(
                    &field("auth"),
                    m.replace("jwt, mtls", "jwt, mtls, authorizer"),
                )
            })?,
        };
        let authorizer = match (auth, r.authorizer) {
            (AuthKind::Authorizer, None) => {
                return Err(err(
                    &field("authorizer"),
                    "auth = \"authorizer\" needs the authorizer function's name".into(),
                ));
            }
            (AuthKind::Authorizer, Some(function)) => {
                validate_name(&function).map_err(|m| err(&field("authorizer"), m))?;
                let ttl_ms = match &r.authorizer_ttl {
                    None => crate::route_options::DEFAULT_AUTHORIZER_TTL_MS,
                    Some(v) => {
                        let ms =
                            duration_value_ms(v).map_err(|m| err(&field("authorizer_ttl"), m))?;
                        if ms > crate::route_options::MAX_AUTHORIZER_TTL_MS {
                            return Err(err(&field("authorizer_ttl"), "must be at most 1h".into()));
                        }
                        ms
                    }
                };
                let sources = r
                    .identity_source
                    .unwrap_or_else(|| vec!["$request.header.Authorization".into()]);
                if sources.is_empty() || sources.len() > 8 {
                    return Err(err(&field("identity_source"), "give 1 to 8 sources".into()));
                }
                let identity_source = sources
                    .iter()
                    .map(|s| crate::route_options::IdentitySource::parse(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| err(&field("identity_source"), m))?;
                Some(crate::route_options::Authorizer {
                    function,
                    ttl_ms,
                    identity_source,
                })
            }
            (_, Some(_)) => {
                return Err(err(
                    &field("authorizer"),
                    "only applies to auth = \"authorizer\" routes".into(),
                ));
            }
            (_, None) => {
                if r.authorizer_ttl.is_some() || r.identity_source.is_some() {
                    return Err(err(
                        &field("authorizer_ttl"),
                        "only applies to routes with an authorizer".into(),
                    ));
                }
                None
            }
        };
        let rewrite = |name: &str, raw: Option<crate::route_options::RawHeaderRewrite>| {
            raw.map(crate::route_options::parse_rewrite)
                .transpose()
                .map_err(|(f, m)| err(&field(&format!("{name}.{f}")), m))
        };
        let request_headers = rewrite("request_headers", r.request_headers)?;
        let response_headers = rewrite("response_headers", r.response_headers)?;
        for (name, f) in [
            ("transform_request", &r.transform_request),
            ("transform_response", &r.transform_response),
        ] {
            if let Some(f) = f {
                validate_name(f).map_err(|m| err(&field(name), m))?;
            }
        }
        let scopes = parse_scopes(auth, r.scopes).map_err(|m| err(&field("scopes"), m))?;
        let cors = r
            .cors
            .map(crate::route_options::parse_cors)
            .transpose()
            .map_err(|(f, m)| err(&field(&format!("cors.{f}")), m))?;
        let rate =
            crate::route_options::parse_route_rate(r.rate).map_err(|m| err(&field("rate"), m))?;
        let rate_per_ip = crate::route_options::parse_route_rate(r.rate_per_ip)
            .map_err(|m| err(&field("rate_per_ip"), m))?;
        let host = match &r.host {
            None => String::new(),
            Some(h) => crate::routes::validate_host(h).map_err(|m| err(&field("host"), m))?,
        };
        let upstream = match &r.upstream {
            None => Vec::new(),
            Some(u) => {
                crate::route_options::parse_upstreams(u).map_err(|m| err(&field("upstream"), m))?
            }
        };
        let upstream_down_for_ms = match &r.upstream_down_for {
            None => None,
            Some(_) if upstream.is_empty() => {
                return Err(err(
                    &field("upstream_down_for"),
                    "only applies to routes with an `upstream` list".into(),
                ));
            }
            Some(t) => Some(
                crate::route_options::parse_down_for(t)
                    .map_err(|m| err(&field("upstream_down_for"), m))?,
            ),
        };
        // An upstream route's wait has nothing to do with the function's timeout.
        let route_timeout_max = if upstream.is_empty() {
            timeout_ms
        } else {
            TIMEOUT_MAX_MS
        };
        let route_timeout_ms = match &r.timeout {
            None => None,
            Some(v) => {
                let ms = duration_value_ms(v).map_err(|m| err(&field("timeout"), m))?;
                if ms == 0 || ms > route_timeout_max {
                    return Err(err(
                        &field("timeout"),
                        format!(
                            "must be more than 0 and at most {route_timeout_max} ms (the function's timeout, or 15m for an upstream route)"
                        ),
                    ));
                }
                Some(ms)
            }
        };
        let options = crate::route_options::RouteOptions {
            cors,
            rate,
            rate_per_ip,
            scopes,
            timeout_ms: route_timeout_ms,
            authorizer,
            request_headers,
            response_headers,
            transform_request: r.transform_request,
            transform_response: r.transform_response,
            upstream_down_for_ms,
            websocket: false,
        };
        let spec = RouteSpec {
            method,
            path,
            host,
            upstream,
            auth,
            options,
        };
        if let Some(prev) = routes.iter().find(|p| {
            p.method == spec.method
                && p.host == spec.host
                && crate::routes::same_shape(&p.path, &spec.path)
        }) {
            return Err(err(
                &field("path"),
                format!(
                    "duplicate route `{}`: it overlaps `{}`",
                    spec.route_key(),
                    prev.route_key()
                ),
            ));
        }
        routes.push(spec);
    }

    // A WebSocket route is a `GET` route with `options.websocket`: the route table
    // checks it against every other route, here and at deploy.
    for (i, w) in raw.websocket.into_iter().enumerate() {
        let field = |f: &str| format!("websocket[{i}].{f}");
        let path = w
            .path
            .ok_or_else(|| err(&field("path"), "is required".into()))?;
        validate_route_path(&path).map_err(|m| err(&field("path"), m))?;
        let auth = parse_auth(w.auth.as_deref()).map_err(|m| err(&field("auth"), m))?;
        let scopes = parse_scopes(auth, w.scopes).map_err(|m| err(&field("scopes"), m))?;
        let rate =
            crate::route_options::parse_route_rate(w.rate).map_err(|m| err(&field("rate"), m))?;
        let rate_per_ip = crate::route_options::parse_route_rate(w.rate_per_ip)
            .map_err(|m| err(&field("rate_per_ip"), m))?;
        let spec = RouteSpec {
            method: "GET".into(),
            host: String::new(),
            path,
            upstream: Vec::new(),
            auth,
            options: crate::route_options::RouteOptions {
                rate,
                rate_per_ip,
                scopes,
                websocket: true,
                ..Default::default()
            },
        };
        if let Some(prev) = routes.iter().find(|p| {
            p.method == "GET" && p.host.is_empty() && crate::routes::same_shape(&p.path, &spec.path)
        }) {
            let what = if prev.options.websocket {
                format!("websocket `{}`", prev.path)
            } else {
                format!("route `{}`", prev.route_key())
            };
            return Err(err(
                &field("path"),
                format!(
                    "`{}` overlaps {what} (a WebSocket is a GET route)",
                    spec.path
                ),
            ));
        }
        routes.push(spec);
    }

    let to_json =
        |field: &str, v: Vec<toml::Value>| -> Result<Vec<serde_json::Value>, ManifestError> {
            v.into_iter()
                .map(|t| serde_json::to_value(t).map_err(|e| err(field, e.to_string())))
                .collect()
        };

    let events = to_json("events", raw.events)?;
    // Checked here so a bad filter or bound fails the deploy with its field named;
    // stored raw and re-read by the control API when it installs them.
    crate::subscription::from_manifest(&name, &events).map_err(|(f, m)| err(&f, m))?;
    let mut cron = Vec::with_capacity(raw.cron.len());
    let mut cron_names = std::collections::BTreeSet::new();
    for (i, v) in raw.cron.iter().enumerate() {
        let spec = crate::cron::CronSpec::from_toml(i, v).map_err(|(f, m)| err(&f, m))?;
        if !cron_names.insert(spec.name.clone()) {
            return Err(err(
                &format!("cron[{i}].name"),
                format!("`{}` is used by another [[cron]]", spec.name),
            ));
        }
        cron.push(
            serde_json::to_value(&spec).map_err(|e| err(&format!("cron[{i}]"), e.to_string()))?,
        );
    }

    Ok(FunctionConfig {
        name,
        runtime,
        runtime_name,
        handler,
        memory_mb,
        timeout_ms,
        description: raw.description.unwrap_or_default(),
        concurrency,
        network,
        env,
        routes,
        cron,
        events,
        wasm,
    })
}

/// Size of the largest fuel budget accepted: far beyond any timeout, but it keeps the
/// arithmetic on the host's counter away from overflow.
pub const MAX_WASM_FUEL: u64 = 1 << 50;

fn parse_wasm_options(
    runtime: Runtime,
    hosts: Option<Vec<String>>,
    raw: Option<RawWasm>,
    network: &Option<String>,
) -> Result<WasmOptions, (&'static str, String)> {
    if runtime != Runtime::Wasm {
        if hosts.is_some() {
            return Err((
                "allowed_outbound_hosts",
                "applies only to `runtime = \"wasm\"`; process functions use `network = \"egress\"`"
                    .into(),
            ));
        }
        if raw.is_some() {
            return Err(("wasm", "applies only to `runtime = \"wasm\"`".into()));
        }
        return Ok(WasmOptions::default());
    }
    if network.as_deref().is_some_and(|n| n != "none") {
        return Err((
            "network",
            "a wasm function has no sockets; list the URLs it may call in `allowed_outbound_hosts`"
                .into(),
        ));
    }
    let mut opts = WasmOptions::default();
    for text in hosts.unwrap_or_default() {
        let rule = crate::outbound::OutboundRule::parse(&text)
            .map_err(|m| ("allowed_outbound_hosts", m))?;
        opts.allowed_outbound_hosts.push(rule);
    }
    if let Some(w) = raw {
        opts.files = w.files.unwrap_or(false);
        opts.fuel = match w.fuel {
            None => None,
            Some(n) if n > 0 && (n as u64) <= MAX_WASM_FUEL => Some(n as u64),
            Some(n) => {
                return Err((
                    "wasm.fuel",
                    format!("{n} is outside the allowed range 1..{MAX_WASM_FUEL}"),
                ));
            }
        };
    }
    Ok(opts)
}

fn parse_auth(text: Option<&str>) -> Result<AuthKind, String> {
    match text {
        None | Some("none") => Ok(AuthKind::None),
        Some("api_key") => Ok(AuthKind::ApiKey),
        Some("jwt") => Ok(AuthKind::Jwt),
        Some("mtls") => Ok(AuthKind::Mtls),
        Some(other) => Err(format!(
            "unknown value `{other}`; allowed: none, api_key, jwt, mtls"
        )),
    }
}

fn parse_scopes(auth: AuthKind, scopes: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let scopes = scopes.unwrap_or_default();
    if !scopes.is_empty() && auth != AuthKind::Jwt {
        return Err(
            "only applies to auth = \"jwt\" routes (API keys carry their own scopes)".into(),
        );
    }
    if let Some(bad) = scopes.iter().find(|s| {
        s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_whitespace() || c.is_control())
    }) {
        return Err(format!("`{bad}` is not a scope"));
    }
    Ok(scopes)
}

fn duration_value_ms(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::String(s) => parse_duration(s).map(|d| d.as_millis() as u64),
        toml::Value::Integer(i) if *i >= 0 => Ok((*i as u64).saturating_mul(1000)),
        _ => Err("must be a duration such as \"5s\" or a number of seconds".into()),
    }
}

fn validate_handler(runtime: Runtime, handler: &str) -> Result<(), String> {
    if handler.is_empty() {
        return Err("must not be empty".into());
    }
    if handler.starts_with('/') || handler.split('/').any(|s| s == ".." || s.is_empty()) {
        return Err(format!(
            "`{handler}` must be a relative path inside the function folder"
        ));
    }
    match runtime {
        Runtime::Python3 | Runtime::Node => {
            let Some((file, func)) = handler.rsplit_once('.') else {
                return Err(format!(
                    "`{handler}` must be `file.function` (for example `main.handler`)"
                ));
            };
            let ident = |s: &str| {
                !s.is_empty()
                    && !s.starts_with(|c: char| c.is_ascii_digit())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
            };
            if file.is_empty() || !ident(func) {
                return Err(format!(
                    "`{handler}` must be `file.function` (for example `main.handler`)"
                ));
            }
            Ok(())
        }
        Runtime::Exec | Runtime::Wasm => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "hello"
runtime = "python3"
handler = "main.handler"
memory_mb = 256
timeout = "5s"
concurrency = { max_instances = 4, idle_timeout = "2m" }
[env]
GREETING = "hi"
N = 3
[[http]]
method = "get"
path = "/hello/{name}"
[[http]]
path = "/files/{proxy+}"
"#;

    #[test]
    fn parses_a_full_manifest() {
        let c = parse_manifest("nimbus.toml", GOOD).expect("valid");
        assert_eq!(c.name, "hello");
        assert_eq!(c.runtime, Runtime::Python3);
        assert_eq!(c.memory_mb, 256);
        assert_eq!(c.timeout_ms, 5_000);
        assert_eq!(c.concurrency.max_instances, 4);
        assert_eq!(c.concurrency.idle_timeout_ms, 120_000);
        assert_eq!(c.env.get("N").map(String::as_str), Some("3"));
        assert_eq!(c.routes[0].method, "GET");
        assert_eq!(c.routes[1].method, "ANY");
        assert_eq!(c.handler_candidates()[0], "main.py");
    }

    fn field_err(text: &str) -> ManifestError {
        parse_manifest("fn/nimbus.toml", text).expect_err("must fail")
    }

    fn base(extra: &str) -> String {
        format!("name = \"f\"\nruntime = \"node\"\nhandler = \"index.handler\"\n{extra}")
    }

    #[test]
    fn errors_name_file_field_and_allowed_values() {
        let e = field_err("name = \"f\"\nruntime = \"ruby\"\nhandler = \"a.b\"\n");
        assert_eq!(e.field, "runtime");
        let s = e.to_string();
        assert!(s.starts_with("fn/nimbus.toml: field `runtime`"), "{s}");
        assert!(s.contains("python3, node"), "{s}");

        let e = field_err(&base("memory_mb = 63"));
        assert_eq!(e.field, "memory_mb");
        assert!(e.message.contains("64..10240"));
        assert!(parse_manifest("x", &base("memory_mb = 64")).is_ok());
        assert!(parse_manifest("x", &base("memory_mb = 10240")).is_ok());
        assert_eq!(field_err(&base("memory_mb = 10241")).field, "memory_mb");

        assert_eq!(field_err(&base("timeout = \"999ms\"")).field, "timeout");
        assert!(parse_manifest("x", &base("timeout = \"1s\"")).is_ok());
        assert!(parse_manifest("x", &base("timeout = \"15m\"")).is_ok());
        assert_eq!(field_err(&base("timeout = \"901s\"")).field, "timeout");
        assert_eq!(field_err(&base("timeout = \"soon\"")).field, "timeout");
    }

    #[test]
    fn rejects_bad_routes_and_duplicates() {
        let e = field_err(&base("[[http]]\nmethod = \"GET\"\npath = \"no-slash\""));
        assert_eq!(e.field, "http[0].path");
        let e = field_err(&base(
            "[[http]]\nmethod = \"GET\"\npath = \"/a/{x}\"\n[[http]]\nmethod = \"GET\"\npath = \"/a/{y}\"",
        ));
        assert_eq!(e.field, "http[1].path");
        assert!(e.message.contains("duplicate route"), "{}", e.message);
        let e = field_err(&base("[[http]]\nmethod = \"FETCH\"\npath = \"/a\""));
        assert_eq!(e.field, "http[0].method");
    }

    #[test]
    fn upstream_and_host_routes_parse_or_name_the_field() {
        let c = parse_manifest(
            "x",
            &base(
                "[[http]]\npath = \"/legacy/{proxy+}\"\nhost = \"*.Example.com\"\nupstream = [\"http://127.0.0.1:9001/\", \"http://127.0.0.1:9002/base\"]\nupstream_down_for = \"2s\"\ntimeout = \"60s\"",
            ),
        )
        .expect("valid");
        let r = &c.routes[0];
        assert_eq!(r.host, "*.example.com");
        assert_eq!(
            r.upstream,
            vec!["http://127.0.0.1:9001", "http://127.0.0.1:9002/base"]
        );
        assert_eq!(r.options.upstream_down_for_ms, Some(2_000));
        assert_eq!(r.options.timeout_ms, Some(60_000));
        assert_eq!(r.route_key(), "ANY *.example.com/legacy/{proxy+}");
        for (extra, f) in [
            ("upstream = [\"ftp://a\"]", "http[0].upstream"),
            ("upstream = []", "http[0].upstream"),
            ("upstream = [\"http://u:p@a\"]", "http[0].upstream"),
            ("upstream = [\"http://a?q=1\"]", "http[0].upstream"),
            ("host = \"a.b:80\"", "http[0].host"),
            ("upstream_down_for = \"5s\"", "http[0].upstream_down_for"),
            (
                "upstream = [\"http://a\"]\nupstream_down_for = \"5h\"",
                "http[0].upstream_down_for",
            ),
        ] {
            let e = field_err(&base(&format!("[[http]]\npath = \"/a\"\n{extra}")));
            assert_eq!(e.field, f, "{extra}: {e}");
        }
        // The same path on two hosts is two routes.
        assert!(
            parse_manifest(
                "x",
                &base("[[http]]\npath = \"/a\"\nhost = \"a.test\"\n[[http]]\npath = \"/a\""),
            )
            .is_ok()
        );
    }

    #[test]
    fn websocket_tables_become_get_routes_with_the_flag() {
        let c = parse_manifest(
            "x",
            &base(
                "[[http]]\nmethod = \"POST\"\npath = \"/chat\"\n[[websocket]]\npath = \"/chat\"\n[[websocket]]\npath = \"/keyed\"\nauth = \"api_key\"\nrate = \"10/s\"",
            ),
        )
        .expect("valid");
        let ws: Vec<_> = c.routes.iter().filter(|r| r.options.websocket).collect();
        assert_eq!(ws.len(), 2);
        assert_eq!(ws[0].method, "GET");
        assert_eq!(ws[0].path, "/chat");
        assert_eq!(ws[1].auth, AuthKind::ApiKey);
        assert!(ws[1].options.rate.is_some());
        // Plain routes keep their JSON exactly as before.
        let plain = serde_json::to_string(&c.routes[0]).expect("json");
        assert!(!plain.contains("websocket"), "{plain}");
        let flagged = serde_json::to_string(ws[0]).expect("json");
        assert!(flagged.contains("\"websocket\":true"), "{flagged}");
    }

    #[test]
    fn bad_websocket_tables_name_the_field() {
        assert_eq!(
            field_err(&base("[[websocket]]\nauth = \"none\"")).field,
            "websocket[0].path"
        );
        assert_eq!(
            field_err(&base("[[websocket]]\npath = \"/v1/chat\"")).field,
            "websocket[0].path"
        );
        assert_eq!(
            field_err(&base("[[websocket]]\npath = \"/a\"\nauth = \"magic\"")).field,
            "websocket[0].auth"
        );
        assert_eq!(
            field_err(&base("[[websocket]]\npath = \"/a\"\nrate = \"lots\"")).field,
            "websocket[0].rate"
        );
        assert_eq!(
            field_err(&base("[[websocket]]\npath = \"/a\"\nmethod = \"GET\"")).field,
            ""
        );
        let e = field_err(&base(
            "[[http]]\nmethod = \"GET\"\npath = \"/c/{x}\"\n[[websocket]]\npath = \"/c/{room}\"",
        ));
        assert_eq!(e.field, "websocket[0].path");
        assert!(e.message.contains("overlaps"), "{}", e.message);
        let e = field_err(&base(
            "[[websocket]]\npath = \"/c\"\n[[websocket]]\npath = \"/c\"",
        ));
        assert_eq!(e.field, "websocket[1].path");
    }

    #[test]
    fn rejects_missing_fields_unknown_keys_and_bad_toml() {
        assert_eq!(
            field_err("runtime = \"node\"\nhandler = \"a.b\"").field,
            "name"
        );
        assert_eq!(
            field_err("name = \"f\"\nruntime = \"node\"").field,
            "handler"
        );
        assert!(
            field_err(&base("memroy_mb = 5"))
                .message
                .contains("memroy_mb")
        );
        assert!(field_err("name = ").message.contains("line 1"));
    }

    #[test]
    fn rejects_bad_names_handlers_and_env() {
        assert_eq!(
            field_err("name = \"Hello World\"\nruntime = \"node\"\nhandler = \"a.b\"").field,
            "name"
        );
        assert_eq!(
            field_err("name = \"f\"\nruntime = \"python3\"\nhandler = \"main\"").field,
            "handler"
        );
        assert_eq!(
            field_err("name = \"f\"\nruntime = \"exec\"\nhandler = \"../x\"").field,
            "handler"
        );
        assert_eq!(
            field_err(&base("[env]\nAWS_LAMBDA_FUNCTION_NAME = \"x\"")).field,
            "env.AWS_LAMBDA_FUNCTION_NAME"
        );
        assert_eq!(field_err(&base("[env]\n\"A-B\" = \"x\"")).field, "env.A-B");
        let big = format!("[env]\nBIG = \"{}\"", "x".repeat(5000));
        assert_eq!(field_err(&base(&big)).field, "env");
    }

    #[test]
    fn cron_tables_are_validated_and_stored_as_specs() {
        let c = parse_manifest(
            "x",
            &base("[[cron]]\nschedule = \"*/5 * * * *\"\n[[cron]]\nname = \"n\"\nschedule = \"@every 30s\"\ntimezone = \"Europe/Berlin\"\npayload = { k = \"v\" }"),
        )
        .expect("valid");
        let specs = c.cron_specs();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "cron-0");
        assert_eq!(specs[1].timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(specs[1].payload, serde_json::json!({"k": "v"}));
        let e = field_err(&base(
            "[[cron]]\nschedule = \"@hourly\"\n[[cron]]\nschedule = \"* * *\"",
        ));
        assert_eq!(e.field, "cron[1].schedule");
        assert!(e.to_string().contains("field `cron[1].schedule`"), "{e}");
        let e = field_err(&base(
            "[[cron]]\nname = \"a\"\nschedule = \"@hourly\"\n[[cron]]\nname = \"a\"\nschedule = \"@daily\"",
        ));
        assert_eq!(e.field, "cron[1].name");
    }

    #[test]
    fn accepts_lambda_runtime_identifiers() {
        assert_eq!(Runtime::parse("python3.12"), Some(Runtime::Python3));
        assert_eq!(Runtime::parse("nodejs20.x"), Some(Runtime::Node));
        assert_eq!(Runtime::parse("python3.x1"), None);
        assert_eq!(Runtime::parse("ruby3.3"), None);
    }
}
