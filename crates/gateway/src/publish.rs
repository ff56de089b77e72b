//! `POST /v1/topics/{topic}/events`: publishing CloudEvents over HTTP, for the admin
//! and for external producers holding an API key with `publish:<topic>` (so they need
//! no admin credentials). Structured (`application/cloudevents+json`, or JSON with a
//! `specversion`), batched (`application/cloudevents-batch+json`, all or nothing) and
//! binary mode (`ce-*` headers). The answer comes only after the events are durable
//! (the [`Publisher`](nimbus_core::events::Publisher) contract); a duplicate id within
//! the topic's dedup window is acknowledged with the offset it already has.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use nimbus_core::events::{self, EventError, PublishError};

use crate::{GatewayState, auth, error_response};

/// Largest publish request: a batch of events.
pub const MAX_PUBLISH_BODY: usize = 16 * 1024 * 1024;

pub(crate) async fn publish(
    State(st): State<GatewayState>,
    Path(topic): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(r) = auth::platform_caller(&st, &parts, "publish", &topic) {
        return *r;
    }
    let Some(publisher) = st.publisher.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "publishing is not enabled on this server",
        );
    };
    let body = match crate::read_limited(body, MAX_PUBLISH_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let now = nimbus_core::now_ms();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let ct = content_type.as_deref().unwrap_or("");
    let parsed = if parts.headers.contains_key("ce-specversion") {
        let ce: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("ce-"))
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        events::parse_binary(&ce, content_type.as_deref(), &body, now).map(|e| vec![e])
    } else if ct.starts_with("application/cloudevents-batch+json") {
        events::parse_batch(&body, now)
    } else if ct.starts_with("application/cloudevents+json")
        || ct.starts_with("application/json")
        || ct.is_empty()
    {
        events::parse_structured(&body, now).map(|e| vec![e])
    } else {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/cloudevents+json, application/cloudevents-batch+json, or binary mode (ce-* headers)",
        );
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e @ (EventError::Invalid(_) | EventError::InBatch { .. })) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_event", &e.to_string());
        }
    };
    match publisher.publish(&topic, parsed).await {
        Ok(results) => (
            StatusCode::OK,
            Json(serde_json::json!({ "topic": topic, "results": results })),
        )
            .into_response(),
        Err(PublishError::NotFound(m)) => error_response(StatusCode::NOT_FOUND, "not_found", &m),
        Err(PublishError::Unavailable(m)) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &m)
        }
        Err(e @ PublishError::StorageFull) => error_response(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            &e.to_string(),
        ),
    }
}
