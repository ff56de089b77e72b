//! nimbus-control: the control-plane REST API under `/v1`.
//!
//! Owns: admin authentication, deploys (upload -> content-addressed artifact -> immutable
//! version -> alias `live`), listing and deleting functions, versions and aliases,
//! rollback, synchronous invocation for the CLI, and the read side of metering (usage,
//! memory recommendations, logs, invocation records). Every error is one [`ApiError`]
//! with an explicit status and a `{"error": {"code", "message"}}` body.
//!
//! Must not touch: instances (it invokes through `Arc<dyn Invoker>`), or the gateway's
//! routing (routes reach the gateway through the store's change feed).
#![forbid(unsafe_code)]

mod capacity;
mod error;
mod invocations;
mod json;
mod keys;
mod metering;
mod routes;
mod scaling;
mod subscriptions;
mod topics;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use nimbus_artifacts::ArtifactStore;
use nimbus_core::api::{
    AliasInfo, DeployResponse, FunctionDetail, FunctionSummary, InvokeResponse, RollbackResponse,
    SetAliasRequest, VersionInfo,
};
use nimbus_core::manifest::{MANIFEST_FILE, parse_manifest};
use nimbus_core::{InvokeRequest, Invoker, Target, Trigger};
use nimbus_store::Store;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub use error::ApiError;
use json::JsonBody;
pub use metering::{RecommendationsResponse, UsageResponse};

/// Everything the control API works with; built by `cli::serve`.
pub struct ControlState {
    pub store: Arc<Store>,
    /// Topics, events and their delivery state.
    pub events: Arc<nimbus_store::events::EventLog>,
    pub artifacts: Arc<ArtifactStore>,
    pub invoker: Arc<dyn Invoker>,
    /// sha256 of the admin token: comparing digests keeps the comparison's timing
    /// independent of how much of a guess was right.
    pub admin_token_sha256: [u8; 32],
    pub unpack_limits: nimbus_artifacts::Limits,
    /// Invocation records, logs and the usage queries over them.
    pub metering: Arc<nimbus_store::Recorder>,
    pub max_payload: usize,
    /// The store generation each gateway snapshot (routes, API keys) has caught up
    /// with. A change is acknowledged only once they reflect it, so a route works and
    /// a revoked key is refused the moment the CLI says so.
    pub applied: Vec<tokio::sync::watch::Receiver<u64>>,
    /// Region named in Scheduled Events of manual cron fires.
    pub region: String,
    /// Compiles and checks `wasm` functions at deploy (and fills the compile cache).
    pub wasm: Arc<nimbus_wasm::Host>,
    /// The host's instance budget, shared with the worker that reserves from it.
    pub capacity: Arc<nimbus_core::capacity::Capacity>,
    /// Whether the data dir is full now (the server's storage probe).
    pub storage_full: tokio::sync::watch::Receiver<bool>,
}

pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The `/v1` API. Paths are absolute, so the caller merges rather than nests it.
pub fn router(state: Arc<ControlState>) -> Router {
    Router::new()
        .route("/v1/functions", get(list_functions).post(deploy))
        .route(
            "/v1/functions/{name}",
            get(get_function).delete(delete_function),
        )
        .route("/v1/functions/{name}/versions", get(list_versions))
        .route("/v1/functions/{name}/aliases", get(list_aliases))
        .route("/v1/functions/{name}/aliases/{alias}", put(set_alias))
        .route("/v1/functions/{name}/rollback", post(rollback))
        .route("/v1/functions/{name}/invoke", post(invoke))
        .route("/v1/functions/{name}/evict", post(evict))
        .route("/v1/functions/{name}/scale", post(scaling::scale))
        .route("/v1/instances", get(scaling::list_instances))
        .route("/v1/status", get(capacity::status))
        .route(
            "/v1/routes",
            get(list_routes).post(routes::add).delete(routes::remove),
        )
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{name}", axum::routing::delete(keys::revoke))
        .route("/v1/topics", get(topics::list).post(topics::create))
        .route("/v1/topics/{name}", get(topics::get).delete(topics::remove))
        // POST (publish) on the same path is the gateway's; axum merges the methods.
        .route("/v1/topics/{name}/events", get(topics::read))
        .route(
            "/v1/subscriptions",
            get(subscriptions::list).post(subscriptions::create),
        )
        .route(
            "/v1/subscriptions/{name}",
            get(subscriptions::get).delete(subscriptions::remove),
        )
        .route("/v1/subscriptions/{name}/reset", post(subscriptions::reset))
        .route("/v1/usage", get(metering::usage))
        .route("/v1/usage/recommendations", get(metering::recommendations))
        .route("/v1/functions/{name}/logs", get(metering::logs))
        .route("/v1/invocations/{request_id}", get(invocations::get))
        .route("/v1/cron", get(invocations::list_cron))
        .route(
            "/v1/cron/{function}/{name}/trigger",
            post(invocations::trigger_cron),
        )
        .route("/v1/{*rest}", axum::routing::any(unknown_path))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), settle))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_admin,
        ))
        .with_state(state)
}

/// How long a change waits for the gateway's snapshots before it is acknowledged anyway.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// After a successful change, waits until every snapshot has caught up with it.
async fn settle(State(st): State<Arc<ControlState>>, req: Request, next: Next) -> Response {
    let changes = !matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    let resp = next.run(req).await;
    if changes && resp.status().is_success() {
        let want = *st.store.subscribe().borrow();
        for rx in &st.applied {
            let mut rx = rx.clone();
            if tokio::time::timeout(SETTLE_TIMEOUT, rx.wait_for(|g| *g >= want))
                .await
                .is_err()
            {
                tracing::warn!(
                    want,
                    "a gateway snapshot lags the store; acknowledging anyway"
                );
            }
        }
    }
    resp
}

async fn require_admin(State(st): State<Arc<ControlState>>, req: Request, next: Next) -> Response {
    // A client past its failed authentications is refused before the token is looked
    // at, so a right guess then reads the same as a wrong one.
    if let Some(t) = req.extensions().get::<nimbus_core::body::AuthThrottled>() {
        return ApiError::AuthThrottled {
            retry_after_s: t.retry_after_secs(),
        }
        .into_response();
    }
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|t| {
        let d = token_digest(t);
        d.iter()
            .zip(st.admin_token_sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    });
    if !ok {
        let mut r = ApiError::Unauthorized.into_response();
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"nimbus\""),
        );
        return r;
    }
    next.run(req).await
}

async fn unknown_path() -> ApiError {
    ApiError::NotFound("no such API path".into())
}

/// Runs a store or disk operation off the async threads.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task: {e}")))?
}

async fn deploy(State(st): State<Arc<ControlState>>, body: Body) -> Result<Response, ApiError> {
    let limit = st.unpack_limits.max_archive_bytes;
    let too_large =
        || ApiError::PayloadTooLarge(format!("archive exceeds {} MiB", limit / (1024 * 1024)));
    // From the head, like every other body: a declared size over the limit costs nothing.
    nimbus_core::body::check_declared(&body, limit).map_err(|_| too_large())?;
    // Stream the upload to disk: archives can be far larger than we want in memory.
    let tmp = tempfile::NamedTempFile::new_in(st.artifacts.tmp_dir())
        .map_err(|e| ApiError::from_io("create upload file", e))?;
    let (std_file, tmp_path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(std_file);
    let mut written: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::from_body(nimbus_core::body::BodyError::from_body_error(&e)))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(too_large());
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::from_io("write upload", e))?;
    }
    if written == 0 {
        return Err(ApiError::BadRequest(
            "empty upload: send a tar.gz of the function folder".into(),
        ));
    }
    file.flush()
        .await
        .map_err(|e| ApiError::from_io("write upload", e))?;
    drop(file);

    let st2 = Arc::clone(&st);
    let (config, resp, created) = blocking(move || {
        let ingested = st2
            .artifacts
            .ingest(&tmp_path, &st2.unpack_limits)
            .map_err(|e| {
                // A hostile upload is worth an operator's attention; the entry name in
                // it is escaped by the server's log writer.
                if matches!(e, nimbus_artifacts::Error::UnsafeEntry { .. }) {
                    tracing::warn!(error = %e, "deploy refused: unsafe archive");
                }
                ApiError::from_artifacts(e)
            })?;
        let text = ingested.manifest.as_deref().ok_or_else(|| {
            ApiError::InvalidManifest(format!(
                "the archive has no {MANIFEST_FILE} at its root"
            ))
        })?;
        let config = parse_manifest(MANIFEST_FILE, text)
            .map_err(|e| ApiError::InvalidManifest(e.to_string()))?;
        let candidates = config.handler_candidates();
        if !candidates
            .iter()
            .any(|c| ingested.code_dir.join(c).is_file())
        {
            return Err(ApiError::InvalidManifest(format!(
                "{MANIFEST_FILE}: field `handler`: `{}` not found: expected {} in the function folder",
                config.handler,
                candidates.join(" or ")
            )));
        }
        if config.runtime == nimbus_core::Runtime::Wasm {
            st2.wasm
                .prepare(&ingested.code_dir.join(&config.handler))
                .map_err(|e| match e {
                    nimbus_wasm::Error::Invalid(m) => ApiError::InvalidComponent(m),
                    other => ApiError::Internal(other.to_string()),
                })?;
        }
        // Every manifest section is acted on now; the field stays for future notices.
        let warnings: Vec<String> = Vec::new();
        // Topics are checked before the version is stored, so a manifest naming a
        // missing topic is refused with nothing changed.
        subscriptions::check_manifest(&st2.events, &config)?;
        let _floors = st2.capacity.lock_floors();
        capacity::check_deploy(&st2, &config)?;
        let result = st2
            .store
            .deploy(&ingested.digest, ingested.size, &config)
            .map_err(ApiError::from_store)?;
        Ok((
            config.clone(),
            DeployResponse {
                name: config.name.clone(),
                version: result.version.version,
                digest: ingested.digest,
                size: ingested.size,
                created: result.created,
                warnings,
            },
            result.created,
        ))
    })
    .await?;
    // Replaced on every deploy, like manifest routes (also when nothing new was made:
    // a deploy is how a user says "make it so").
    subscriptions::apply_manifest(&st, &config).await?;
    tracing::info!(function = %resp.name, version = resp.version, created, "deployed");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(resp)).into_response())
}

async fn list_functions(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<Vec<FunctionSummary>>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || {
        let rows = store.list_functions().map_err(ApiError::from_store)?;
        let mut out = Vec::with_capacity(rows.len());
        for f in rows {
            let shown = f.live_version.unwrap_or(f.latest_version);
            let v = store
                .get_version(&f.name, shown)
                .map_err(ApiError::from_store)?;
            out.push(FunctionSummary {
                runtime: v
                    .as_ref()
                    .map(|v| v.config.runtime_name.clone())
                    .unwrap_or_default(),
                memory_mb: v.as_ref().map(|v| v.config.memory_mb).unwrap_or_default(),
                name: f.name,
                live_version: f.live_version,
                latest_version: f.latest_version,
                updated_at: f.updated_at,
            });
        }
        Ok(Json(out))
    })
    .await
}

fn not_found_fn(name: &str) -> ApiError {
    ApiError::NotFound(format!("function `{name}` not found"))
}

fn require_function(store: &Store, name: &str) -> Result<nimbus_store::FunctionRow, ApiError> {
    store
        .get_function(name)
        .map_err(ApiError::from_store)?
        .ok_or_else(|| not_found_fn(name))
}

fn alias_info(a: nimbus_store::AliasRow) -> AliasInfo {
    AliasInfo {
        name: a.name,
        version: a.version,
    }
}

async fn get_function(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<FunctionDetail>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || {
        let f = require_function(&store, &name)?;
        let shown = f.live_version.unwrap_or(f.latest_version);
        let v = store
            .get_version(&name, shown)
            .map_err(ApiError::from_store)?
            .ok_or_else(|| not_found_fn(&name))?;
        let aliases = store
            .list_aliases(&name)
            .map_err(ApiError::from_store)?
            .into_iter()
            .map(alias_info)
            .collect();
        let routes = store
            .routes()
            .map_err(ApiError::from_store)?
            .into_iter()
            .filter(|r| r.function == name)
            .collect();
        Ok(Json(FunctionDetail {
            name: f.name,
            created_at: f.created_at,
            latest_version: f.latest_version,
            aliases,
            routes,
            config: v.config,
        }))
    })
    .await
}

async fn delete_function(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let st2 = Arc::clone(&st);
    let n = name.clone();
    let unused =
        blocking(move || st2.store.delete_function(&n).map_err(ApiError::from_store)).await?;
    // Nothing is left to deliver to: its subscriptions, manifest or not, go with it.
    if let Err(e) = st.events.delete_function_subscriptions(&name).await {
        tracing::error!(function = %name, error = %e, "delete the function's subscriptions");
    }
    st.invoker.evict(&name).await;
    let artifacts = Arc::clone(&st.artifacts);
    blocking(move || {
        for digest in unused {
            if let Err(e) = artifacts.remove(&digest) {
                // The function is gone either way; an orphan blob only costs disk.
                tracing::warn!(%digest, error = %e, "remove unused artifact");
            }
        }
        Ok(())
    })
    .await?;
    tracing::info!(function = %name, "deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_versions(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<VersionInfo>>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || {
        require_function(&store, &name)?;
        let aliases = store.list_aliases(&name).map_err(ApiError::from_store)?;
        let versions = store.list_versions(&name).map_err(ApiError::from_store)?;
        Ok(Json(
            versions
                .into_iter()
                .map(|v| VersionInfo {
                    aliases: aliases
                        .iter()
                        .filter(|a| a.version == v.version)
                        .map(|a| a.name.clone())
                        .collect(),
                    version: v.version,
                    digest: v.digest,
                    size: v.size,
                    created_at: v.created_at,
                    runtime: v.config.runtime_name,
                    handler: v.config.handler,
                    memory_mb: v.config.memory_mb,
                })
                .collect(),
        ))
    })
    .await
}

async fn list_aliases(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<AliasInfo>>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || {
        require_function(&store, &name)?;
        Ok(Json(
            store
                .list_aliases(&name)
                .map_err(ApiError::from_store)?
                .into_iter()
                .map(alias_info)
                .collect(),
        ))
    })
    .await
}

async fn set_alias(
    State(st): State<Arc<ControlState>>,
    Path((name, alias)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetAliasRequest>,
) -> Result<Json<AliasInfo>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || {
        let _floors = st.capacity.lock_floors();
        if alias == "live" {
            capacity::check_live(&st, &name, req.version)?;
        }
        let row = store
            .set_alias(&name, &alias, req.version)
            .map_err(ApiError::from_store)?;
        tracing::info!(function = %name, %alias, version = row.version, "alias set");
        Ok(Json(alias_info(row)))
    })
    .await
}

#[derive(Deserialize, Default)]
struct RollbackRequest {
    alias: Option<String>,
}

async fn rollback(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<Option<RollbackRequest>>,
) -> Result<Json<RollbackResponse>, ApiError> {
    let req = req.unwrap_or_default();
    let alias = req.alias.unwrap_or_else(|| "live".into());
    let store = Arc::clone(&st.store);
    blocking(move || {
        let _floors = st.capacity.lock_floors();
        if alias == "live" {
            capacity::check_rollback(&st, &name)?;
        }
        let (from, to) = store
            .rollback(&name, &alias)
            .map_err(ApiError::from_store)?;
        tracing::info!(function = %name, %alias, from, to, "rolled back");
        Ok(Json(RollbackResponse {
            name,
            alias,
            from,
            to,
        }))
    })
    .await
}

#[derive(Deserialize)]
struct InvokeQuery {
    version: Option<u32>,
    alias: Option<String>,
    #[serde(default)]
    logs: bool,
}

async fn invoke(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
    query: Result<Query<InvokeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let is_async = invocations::is_async(&headers)?;
    let target = match (q.version, q.alias) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give either `version` or `alias`, not both".into(),
            ));
        }
        (Some(v), None) => Target::Version(v),
        (None, Some(a)) => Target::Alias(a),
        (None, None) => Target::default(),
    };
    let limit = if is_async {
        invocations::MAX_ASYNC_PAYLOAD.min(st.max_payload)
    } else {
        st.max_payload
    };
    // The event reaches the function as it was sent, so it is checked like every other
    // JSON body, not merely parsed: no invalid UTF-8 or lone surrogate gets through.
    let payload = json::json_bytes(&headers, body, limit)
        .await?
        .unwrap_or_else(|| bytes::Bytes::from_static(b"null"));
    if is_async {
        return invocations::invoke_async(st, name, target, &headers, payload).await;
    }
    let outcome = st
        .invoker
        .invoke(InvokeRequest {
            trace: None,
            request_id: nimbus_core::new_request_id(),
            function: name,
            target,
            trigger: Trigger::Api,
            payload,
        })
        .await
        .map_err(ApiError::from_invoke)?;
    let status = StatusCode::from_u16(outcome.status.http_status())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let envelope = InvokeResponse::from_outcome(&outcome, q.logs);
    let mut resp = (status, Json(envelope)).into_response();
    nimbus_headers(resp.headers_mut(), &outcome);
    Ok(resp)
}

/// The `X-Nimbus-*` headers every invocation answer carries.
pub fn nimbus_headers(h: &mut HeaderMap, o: &nimbus_core::InvokeOutcome) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    put("x-nimbus-request-id", o.request_id.clone());
    put("x-nimbus-cold-start", o.cold_start.to_string());
    put("x-nimbus-duration-ms", format!("{:.3}", o.duration_ms));
    put("x-nimbus-version", o.version.to_string());
}

/// Retires every instance of a function, so the next call is a cold start.
async fn evict(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = Arc::clone(&st.store);
    let n = name.clone();
    blocking(move || require_function(&store, &n)).await?;
    let evicted = st.invoker.evict(&name).await;
    Ok(Json(
        serde_json::json!({ "name": name, "evicted": evicted }),
    ))
}

async fn list_routes(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<Vec<nimbus_core::routes::RouteEntry>>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || Ok(Json(store.routes().map_err(ApiError::from_store)?))).await
}

/// Reads a JSON or event body with the platform's one reader: a declared length over
/// `limit` is refused before a byte is read, a body cut off by the listener's
/// deadline is 408.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    nimbus_core::body::read_body(body, limit)
        .await
        .map_err(ApiError::from_body)
}
