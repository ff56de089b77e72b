//! The `@connections` management API: `POST|GET|DELETE /v1/connections/{id}`, with
//! API Gateway's answers (410 `gone` for a connection that is not open, as its
//! GoneException) so client code written for AWS works unchanged.
//!
//! Callers: the admin token (`Authorization: Bearer`), or an API key with the
//! `connections` scope (`x-api-key` or Bearer), subject to the key's rate limit.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::routing::post;
use http::request::Parts;
use http::{HeaderValue, StatusCode};

use super::MAX_MESSAGE_BYTES;
use super::registry::SendError;
use crate::{GatewayState, auth, error_response};

pub(crate) fn router(state: GatewayState) -> Router {
    Router::new()
        .route(
            "/v1/connections/{id}",
            post(push).get(describe).delete(close),
        )
        .with_state(state)
}

fn gone(id: &str) -> Response {
    error_response(
        StatusCode::GONE,
        "gone",
        &format!("connection `{id}` is not open"),
    )
}

fn authorize(st: &GatewayState, parts: &Parts) -> Result<(), Box<Response>> {
    auth::platform_caller(st, parts, "connections", "")
}

/// `PostToConnection`: the body goes to the client as one frame, text when UTF-8.
async fn push(State(st): State<GatewayState>, Path(id): Path<String>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(r) = authorize(&st, &parts) {
        return *r;
    }
    let Some(conn) = st.connections.get(&id) else {
        return gone(&id);
    };
    let body = match crate::read_limited(body, MAX_MESSAGE_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let msg = match std::str::from_utf8(&body) {
        Ok(t) => axum::extract::ws::Message::text(t),
        Err(_) => axum::extract::ws::Message::binary(body),
    };
    match conn.send(msg) {
        Ok(()) => empty(StatusCode::OK),
        Err(SendError::Gone) => gone(&id),
        Err(SendError::Full) => error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "the connection is not reading: its send queue is full",
        ),
    }
}

/// `GetConnection`.
async fn describe(
    State(st): State<GatewayState>,
    Path(id): Path<String>,
    parts: Parts,
) -> Response {
    if let Err(r) = authorize(&st, &parts) {
        return *r;
    }
    let Some(conn) = st.connections.get(&id).filter(|c| !c.is_closed()) else {
        return gone(&id);
    };
    let iso = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let body = serde_json::json!({
        "connectionId": conn.info.id,
        "connectedAt": iso(conn.info.connected_at_ms),
        "lastActiveAt": iso(conn.last_active_ms()),
        "identity": {"sourceIp": conn.info.source_ip, "userAgent": conn.info.user_agent},
    });
    let mut r = Response::new(Body::from(body.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `DeleteConnection`: closes with 1000; the socket task runs `$disconnect`.
async fn close(State(st): State<GatewayState>, Path(id): Path<String>, parts: Parts) -> Response {
    if let Err(r) = authorize(&st, &parts) {
        return *r;
    }
    let Some(conn) = st.connections.get(&id) else {
        return gone(&id);
    };
    match conn.request_close(1000, "") {
        Ok(()) => empty(StatusCode::NO_CONTENT),
        Err(_) => gone(&id),
    }
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}
