//! Async invocations and cron over the control API: the async path of
//! `POST /v1/functions/{name}/invoke` (`X-Nimbus-Invocation-Type: Event`, or Lambda's
//! `X-Amz-Invocation-Type`), `GET /v1/invocations/{id}` (queue state merged with the
//! metering record), `GET /v1/cron` and `POST /v1/cron/{function}/{name}/trigger`.
//!
//! The 202 of an async invoke is sent only after the queued row is durable; the
//! scheduler's dispatcher runs it from there.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nimbus_core::api::{
    AsyncInvocationInfo, AsyncInvokeResponse, CronFireInfo, CronInfo, CronTriggerResponse,
};
use nimbus_core::cron::{CronSpec, rfc3339};
use nimbus_core::{Target, now_ms};
use nimbus_store::events::{
    CronFire, DEFAULT_MAX_RETRIES, FireKind, FireOutcome, InvocationRow, MAX_EVENT_AGE_MS,
    NewInvocation, cron_invocation,
};

use crate::{ApiError, ControlState, blocking, require_function};

/// Largest async event (Lambda's 1 MB for asynchronous invocations).
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;
const MIN_EVENT_AGE_MS: i64 = 60_000;
const ACCOUNT: &str = "000000000000";

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::BadRequest(format!("header {name} is not ASCII"))),
    }
}

const OPTION_HEADERS: [&str; 4] = [
    "x-nimbus-max-retries",
    "x-nimbus-max-event-age",
    "x-nimbus-on-success",
    "x-nimbus-on-failure",
];

/// True for `Event` (async), false for `RequestResponse` or no header (sync).
pub(crate) fn is_async(h: &HeaderMap) -> Result<bool, ApiError> {
    let ours = header(h, "x-nimbus-invocation-type")?;
    let amz = header(h, "x-amz-invocation-type")?;
    let kind = match (ours, amz) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::BadRequest(
                "X-Nimbus-Invocation-Type and X-Amz-Invocation-Type disagree".into(),
            ));
        }
        (Some(a), _) | (None, Some(a)) => Some(a),
        (None, None) => None,
    };
    let is_async = match kind {
        None | Some("RequestResponse") => false,
        Some("Event") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "invocation type `{other}` is not supported; use Event or RequestResponse"
            )));
        }
    };
    if !is_async && let Some(h) = OPTION_HEADERS.iter().find(|n| h.contains_key(**n)) {
        return Err(ApiError::BadRequest(format!(
            "header {h} only applies to async invocations (X-Nimbus-Invocation-Type: Event)"
        )));
    }
    Ok(is_async)
}

struct AsyncOptions {
    max_retries: u32,
    max_age_ms: i64,
    on_success: Option<String>,
    on_failure: Option<String>,
}

fn options(h: &HeaderMap) -> Result<AsyncOptions, ApiError> {
    let max_retries = match header(h, "x-nimbus-max-retries")? {
        None => DEFAULT_MAX_RETRIES,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n <= 2 => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "max retries `{v}` must be 0, 1 or 2"
                )));
            }
        },
    };
    let max_age_ms = match header(h, "x-nimbus-max-event-age")? {
        None => MAX_EVENT_AGE_MS,
        Some(v) => {
            let d = nimbus_core::duration::parse_duration(v)
                .map_err(|m| ApiError::BadRequest(format!("max event age: {m}")))?;
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            if !(MIN_EVENT_AGE_MS..=MAX_EVENT_AGE_MS).contains(&ms) {
                return Err(ApiError::BadRequest(format!(
                    "max event age `{v}` must be between 1m and 6h"
                )));
            }
            ms
        }
    };
    let topic = |name: &str| -> Result<Option<String>, ApiError> {
        Ok(header(h, name)?
            .filter(|t| !t.is_empty())
            .map(str::to_string))
    };
    Ok(AsyncOptions {
        max_retries,
        max_age_ms,
        on_success: topic("x-nimbus-on-success")?,
        on_failure: topic("x-nimbus-on-failure")?,
    })
}

/// Queues an async invocation and answers 202 once it is durable.
pub(crate) async fn invoke_async(
    st: Arc<ControlState>,
    name: String,
    target: Target,
    headers: &HeaderMap,
    payload: bytes::Bytes,
) -> Result<Response, ApiError> {
    let opts = options(headers)?;
    let (store, events) = (Arc::clone(&st.store), Arc::clone(&st.events));
    let (n, t) = (name.clone(), target.clone());
    let topics = [opts.on_success.clone(), opts.on_failure.clone()];
    blocking(move || {
        require_function(&store, &n)?;
        match &t {
            Target::Version(v) => {
                if store.get_version(&n, *v).map_err(ApiError::from_store)?.is_none() {
                    return Err(ApiError::NotFound(format!(
                        "function `{n}` has no version {v}"
                    )));
                }
            }
            Target::Alias(a) => {
                let aliases = store.list_aliases(&n).map_err(ApiError::from_store)?;
                if !aliases.iter().any(|x| &x.name == a) {
                    return Err(ApiError::NotFound(format!(
                        "function `{n}` has no alias `{a}`"
                    )));
                }
            }
        }
        for topic in topics.iter().flatten() {
            match events.topic(topic) {
                Ok(_) => {}
                Err(nimbus_store::Error::NotFound(_)) => {
                    return Err(ApiError::BadRequest(format!(
                        "destination topic `{topic}` does not exist (create it with `nimbus topic create`)"
                    )));
                }
                Err(e) => return Err(ApiError::from_store(e)),
            }
        }
        Ok(())
    })
    .await?;
    let id = nimbus_core::new_request_id();
    st.events
        .enqueue_invocation(
            NewInvocation {
                id: id.clone(),
                function: name.clone(),
                target,
                payload: payload.to_vec(),
                max_attempts: 1 + opts.max_retries,
                max_age_ms: opts.max_age_ms,
                on_success: opts.on_success,
                on_failure: opts.on_failure,
                source: "api".into(),
            },
            now_ms(),
        )
        .await
        .map_err(ApiError::from_store)?;
    tracing::debug!(function = %name, request_id = %id, "async invocation queued");
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(AsyncInvokeResponse {
            request_id: id.clone(),
            function: name,
            status: "queued".into(),
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-nimbus-request-id", v);
    }
    Ok(resp)
}

fn info(row: InvocationRow, record: Option<nimbus_core::InvocationRecord>) -> AsyncInvocationInfo {
    let queued = row.state == nimbus_store::events::InvocationState::Queued;
    AsyncInvocationInfo {
        request_id: row.id,
        function: row.function,
        status: row.state.as_str().into(),
        source: row.source,
        attempts: row.attempts,
        max_attempts: row.max_attempts,
        created_at: rfc3339(row.created_at_ms),
        updated_at: rfc3339(row.updated_at_ms),
        next_attempt_at: queued.then(|| rfc3339(row.next_at_ms)),
        result: row.result.and_then(|r| serde_json::from_slice(&r).ok()),
        error: row.error,
        on_success: row.on_success,
        on_failure: row.on_failure,
        record,
    }
}

/// An async invocation's state (plus its last metering record), or for a synchronous
/// one its metering record as before.
pub(crate) async fn get(
    State(st): State<Arc<ControlState>>,
    Path(request_id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || {
        let record = st
            .metering
            .invocation(&request_id)
            .map_err(ApiError::from_store)?;
        match st
            .events
            .invocation(&request_id)
            .map_err(ApiError::from_store)?
        {
            Some(row) => Ok(Json(info(row, record)).into_response()),
            None => record
                .map(|r| Json(r).into_response())
                .ok_or_else(|| ApiError::NotFound(format!("invocation `{request_id}` not found"))),
        }
    })
    .await
}

fn fire_info(f: CronFire) -> CronFireInfo {
    CronFireInfo {
        scheduled_at: rfc3339(f.scheduled_ms),
        scheduled_ms: f.scheduled_ms,
        kind: f.kind,
        invocation_id: f.invocation_id,
    }
}

/// How many recent fires `GET /v1/cron` returns per cron.
const FIRES_SHOWN: usize = 50;

pub(crate) async fn list_cron(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<Vec<CronInfo>>, ApiError> {
    blocking(move || {
        let specs = st.store.live_cron_specs().map_err(ApiError::from_store)?;
        let now = now_ms();
        let mut out = Vec::with_capacity(specs.len());
        for (function, spec) in specs {
            let (timezone, next) = match spec.parsed() {
                Ok(s) => (
                    s.timezone().to_string(),
                    s.upcoming(now, 3).into_iter().map(rfc3339).collect(),
                ),
                Err(_) => (
                    spec.timezone.clone().unwrap_or_else(|| "UTC".into()),
                    vec![],
                ),
            };
            let fires: Vec<CronFireInfo> = st
                .events
                .cron_fires(&function, &spec.name, FIRES_SHOWN)
                .map_err(ApiError::from_store)?
                .into_iter()
                .map(fire_info)
                .collect();
            out.push(CronInfo {
                last_fire: fires.iter().find(|f| f.kind != "skipped").cloned(),
                function,
                name: spec.name,
                schedule: spec.schedule,
                timezone,
                catch_up: spec.catch_up,
                overlap: spec.overlap.as_str().into(),
                next,
                fires,
            });
        }
        Ok(Json(out))
    })
    .await
}

/// Fires a cron now (for testing): a `manual` fire with the spec's payload.
pub(crate) async fn trigger_cron(
    State(st): State<Arc<ControlState>>,
    Path((function, name)): Path<(String, String)>,
) -> Result<Json<CronTriggerResponse>, ApiError> {
    let store = Arc::clone(&st.store);
    let f = function.clone();
    let specs = blocking(move || {
        require_function(&store, &f)?;
        store.live_cron_specs().map_err(ApiError::from_store)
    })
    .await?;
    let spec: CronSpec = specs
        .into_iter()
        .find(|(f, s)| *f == function && s.name == name)
        .map(|(_, s)| s)
        .ok_or_else(|| ApiError::NotFound(format!("function `{function}` has no cron `{name}`")))?;
    let now = now_ms();
    let inv = cron_invocation(&function, &spec, now, &st.region, ACCOUNT);
    let id = inv.id.clone();
    // A manual fire is the operator asking: it runs even while a scheduled one does.
    let outcome = st
        .events
        .cron_fire(FireKind::Manual, now, false, inv, now)
        .await
        .map_err(ApiError::from_store)?;
    if outcome != FireOutcome::Enqueued {
        return Err(ApiError::Conflict(
            "a fire was just recorded for this millisecond; try again".into(),
        ));
    }
    metrics::counter!(
        "nimbus_cron_fires_total",
        "function" => function.clone(),
        "name" => name.clone(),
        "kind" => "manual",
    )
    .increment(1);
    tracing::info!(%function, cron = %name, request_id = %id, "cron triggered by hand");
    Ok(Json(CronTriggerResponse {
        function,
        name,
        request_id: id,
    }))
}
