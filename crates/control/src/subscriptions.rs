//! `/v1/subscriptions`: create, list, describe, delete and reset subscriptions
//! outside manifests; and the manifest side, replacing a function's `[[events]]`
//! subscriptions on deploy.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nimbus_core::api::{CreateSubscriptionRequest, ResetSubscriptionRequest, SubscriptionInfo};
use nimbus_store::events::{EventLog, SubscriptionRow, SubscriptionSource};

use crate::json::JsonBody;
use crate::{ApiError, ControlState, blocking};

pub(crate) fn info(events: &EventLog, r: SubscriptionRow) -> Result<SubscriptionInfo, ApiError> {
    let (lag, retrying) = events
        .subscription_lag(&r.spec.name)
        .map_err(ApiError::from_store)?;
    Ok(SubscriptionInfo {
        spec: r.spec,
        source: r.source.as_str().to_string(),
        cursor: r.cursor,
        lag,
        retrying,
        created_at_ms: r.created_at_ms,
    })
}

pub(crate) async fn create(
    State(st): State<Arc<ControlState>>,
    JsonBody(req): JsonBody<CreateSubscriptionRequest>,
) -> Result<(StatusCode, Json<SubscriptionInfo>), ApiError> {
    let function = req
        .function
        .clone()
        .ok_or_else(|| ApiError::BadRequest("function: required".into()))?;
    let default_name = format!("{function}-{}", req.topic);
    let spec = req
        .validate(&function, &default_name)
        .map_err(|(f, m)| ApiError::BadRequest(format!("{f}: {m}")))?;
    let store = Arc::clone(&st.store);
    let f = function.clone();
    blocking(move || {
        store
            .get_function(&f)
            .map_err(ApiError::from_store)?
            .map(|_| ())
            .ok_or_else(|| ApiError::NotFound(format!("function `{f}` not found")))
    })
    .await?;
    let row = st
        .events
        .create_subscription(spec, SubscriptionSource::Api, nimbus_core::now_ms())
        .await
        .map_err(ApiError::from_store)?;
    tracing::info!(subscription = %row.spec.name, topic = %row.spec.topic, function = %function, "subscribed");
    let events = Arc::clone(&st.events);
    let out = blocking(move || info(&events, row)).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

pub(crate) async fn list(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<Vec<SubscriptionInfo>>, ApiError> {
    let events = Arc::clone(&st.events);
    blocking(move || {
        let rows = events.subscriptions().map_err(ApiError::from_store)?;
        rows.into_iter()
            .map(|r| info(&events, r))
            .collect::<Result<Vec<_>, _>>()
            .map(Json)
    })
    .await
}

pub(crate) async fn get(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    let events = Arc::clone(&st.events);
    blocking(move || {
        let r = events.subscription(&name).map_err(ApiError::from_store)?;
        info(&events, r).map(Json)
    })
    .await
}

pub(crate) async fn remove(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    let events = Arc::clone(&st.events);
    let n = name.clone();
    let before = blocking(move || {
        let r = events.subscription(&n).map_err(ApiError::from_store)?;
        info(&events, r)
    })
    .await?;
    st.events
        .delete_subscription(&name)
        .await
        .map_err(ApiError::from_store)?;
    tracing::info!(subscription = %name, "unsubscribed");
    Ok(Json(before))
}

pub(crate) async fn reset(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ResetSubscriptionRequest>,
) -> Result<Json<SubscriptionInfo>, ApiError> {
    let events = Arc::clone(&st.events);
    let n = name.clone();
    let offset = blocking(move || {
        let r = events.subscription(&n).map_err(ApiError::from_store)?;
        match (req.to, req.offset) {
            (Some(_), Some(_)) | (None, None) => Err(ApiError::BadRequest(
                "give exactly one of `to` (RFC 3339 time) and `offset`".into(),
            )),
            (None, Some(o)) if o < 0 => {
                Err(ApiError::BadRequest("offset: must be 0 or more".into()))
            }
            (None, Some(o)) => Ok(o),
            (Some(t), None) => {
                let at = chrono::DateTime::parse_from_rfc3339(&t).map_err(|e| {
                    ApiError::BadRequest(format!(
                        "to: `{t}` is not an RFC 3339 time such as 2026-11-01T00:00:00Z: {e}"
                    ))
                })?;
                events
                    .offset_at(&r.spec.topic, at.timestamp_millis())
                    .map_err(ApiError::from_store)
            }
        }
    })
    .await?;
    let row = st
        .events
        .reset_subscription(&name, offset)
        .await
        .map_err(ApiError::from_store)?;
    tracing::info!(subscription = %name, cursor = row.cursor, "subscription reset");
    let events = Arc::clone(&st.events);
    Ok(Json(blocking(move || info(&events, row)).await?))
}

/// Installs a deployed function's `[[events]]` subscriptions. Runs after the version
/// is stored (state.db and events.db are separate files with no shared transaction);
/// the deploy checked the topics just before storing, so this fails only if a topic
/// was deleted in between, and then says so.
pub(crate) async fn apply_manifest(
    st: &ControlState,
    config: &nimbus_core::FunctionConfig,
) -> Result<(), ApiError> {
    let specs = nimbus_core::subscription::from_manifest(&config.name, &config.events)
        .map_err(|(f, m)| ApiError::InvalidManifest(format!("nimbus.toml: field `{f}`: {m}")))?;
    st.events
        .replace_manifest_subscriptions(&config.name, specs, nimbus_core::now_ms())
        .await
        .map_err(|e| match e {
            nimbus_store::Error::NotFound(m) | nimbus_store::Error::Conflict(m) => {
                ApiError::Conflict(format!(
                    "the version was stored but its subscriptions were not installed: {m}; deploy again"
                ))
            }
            other => ApiError::from_store(other),
        })?;
    Ok(())
}

/// Before storing a version: every `[[events]]` topic and dead-letter topic must
/// exist, and no name may belong to another function's or an API subscription.
pub(crate) fn check_manifest(
    events: &EventLog,
    config: &nimbus_core::FunctionConfig,
) -> Result<(), ApiError> {
    let specs = nimbus_core::subscription::from_manifest(&config.name, &config.events)
        .map_err(|(f, m)| ApiError::InvalidManifest(format!("nimbus.toml: field `{f}`: {m}")))?;
    for (i, s) in specs.iter().enumerate() {
        for (field, topic) in std::iter::once(("topic", &s.topic))
            .chain(s.dead_letter.iter().map(|d| ("dead_letter", d)))
        {
            match events.topic(topic) {
                Ok(_) => {}
                Err(nimbus_store::Error::NotFound(_)) => {
                    return Err(ApiError::InvalidManifest(format!(
                        "nimbus.toml: field `events[{i}].{field}`: topic `{topic}` not found; create it first (nimbus topic create {topic})"
                    )));
                }
                Err(e) => return Err(ApiError::from_store(e)),
            }
        }
        match events.subscription(&s.name) {
            Ok(r) if r.source != SubscriptionSource::Manifest || r.spec.function != config.name => {
                return Err(ApiError::Conflict(format!(
                    "nimbus.toml: field `events[{i}].name`: subscription `{}` already exists (for function `{}`); give this one another `name`",
                    s.name, r.spec.function
                )));
            }
            Ok(_) | Err(nimbus_store::Error::NotFound(_)) => {}
            Err(e) => return Err(ApiError::from_store(e)),
        }
    }
    Ok(())
}
