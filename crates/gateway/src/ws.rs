//! WebSocket routes (API Gateway WebSocket semantics).
//!
//! Owns: upgrading a request on a `[[websocket]]` route (after [`crate::admit`], so
//! a route's rate limits and auth apply on connect, and after the function's
//! `$connect` said yes), each connection's socket task (its `$default` messages
//! invoked one at a time in order, the answers sent back, pushes and closes from the
//! registry, the limits every connection has: message size, idle time, lifetime),
//! `$disconnect` exactly once per connection, the registry of live connections and
//! the `@connections` management API over it (`/v1/connections/{id}`, see [`api`]).
//!
//! Must not touch: the socket below the WebSocket protocol (the listener in `cli`
//! owns TCP, TLS and the HTTP upgrade), the store, or instances (functions are
//! reached through `Arc<dyn Invoker>` like every route's).

pub(crate) mod api;
mod event;
mod registry;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use http::{HeaderValue, StatusCode};
use nimbus_core::routes::RouteMatch;
use nimbus_core::{InvokeError, InvokeOutcome, InvokeRequest, InvokeStatus, Target, Trigger};
use tokio::sync::mpsc;

pub use registry::Connections;
use registry::{Conn, ConnInfo};

use crate::{GatewayState, error_response, observe};

/// API Gateway's limits, which clients written for it expect.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
pub const MAX_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// Frames waiting to be written to one client (replies and pushes).
const OUTBOUND_QUEUE: usize = 64;
/// Messages waiting for the function on one connection; past it the socket is not
/// read (TCP backpressure on the client) until the function catches up.
const INBOUND_QUEUE: usize = 16;
/// How long a closing handshake may take before the socket is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

fn is_upgrade(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

/// A request on a WebSocket route: the upgrade, or why not.
pub(crate) async fn serve(
    st: &GatewayState,
    found: &RouteMatch<'_>,
    route_key: &str,
    mut parts: http::request::Parts,
    request_id: &str,
) -> Response {
    // Credentials first: an unauthenticated caller learns nothing about the route.
    let admitted = match crate::admit(st, found, route_key, &parts, request_id).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if !is_upgrade(&parts.headers) {
        let mut r = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this is a WebSocket route: connect with Upgrade: websocket",
        );
        r.headers_mut()
            .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => {
            let status = rejection.status();
            return error_response(status, "bad_request", &rejection.body_text());
        }
    };
    if st.connections.is_closing() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down",
        );
    }
    let headers = &parts.headers;
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let info = ConnInfo {
        id: registry::new_connection_id(),
        function: found.entry.function.clone(),
        alias: found.entry.alias.clone(),
        connected_at_ms: nimbus_core::now_ms(),
        source_ip: crate::client_ip(&parts.extensions),
        user_agent: headers
            .get(http::header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
        domain: host.split(':').next().unwrap_or("").to_string(),
        authorizer: admitted.authorizer(),
    };
    let kind = event::Kind::Connect {
        headers,
        raw_query: parts.uri.query().unwrap_or(""),
        strip_credentials: admitted.strips_credentials(),
    };
    let ev = event::build(&info, request_id, info.connected_at_ms, &kind);
    let trace = observe::traceparent(headers);
    let refused = |status: u16| {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        error_response(
            status,
            "connect_refused",
            "the function refused the connection",
        )
    };
    match invoke(st, &info, &ev, request_id, trace).await {
        Ok(o) => match &o.status {
            InvokeStatus::Success(bytes) => {
                if let Err(status) = event::connect_verdict(bytes) {
                    return refused(status);
                }
            }
            InvokeStatus::FunctionError(fe) => {
                tracing::info!(function = %info.function, request_id, error_type = %fe.error_type, "$connect raised");
                return refused(403);
            }
            other => {
                return error_response(
                    StatusCode::from_u16(other.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
                    other.code(),
                    &other.message(),
                );
            }
        },
        Err(e) => return crate::invoke_error_response(&e),
    }

    let running = st.connections.running();
    let slot = parts
        .extensions
        .get::<nimbus_core::ConnectionSlot>()
        .cloned();
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let conn = Arc::new(Conn::new(info, tx));
    let on_fail = (st.clone(), Arc::clone(&conn));
    let st = st.clone();
    let mut resp = upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_failed_upgrade(move |e| {
            // `$connect` said yes, so its state (a stored connection id) is cleaned up.
            let (st, conn) = on_fail;
            tracing::info!(connection_id = %conn.info.id, error = %e, "WebSocket upgrade failed");
            tokio::spawn(async move { disconnect(&st, &conn.info, 1006, "upgrade failed").await });
        })
        .on_upgrade(move |socket| async move {
            run(st, conn, rx, socket).await;
            drop((running, slot));
        });
    for (name, value) in admitted.rate_headers {
        resp.headers_mut().insert(name, value);
    }
    resp
}

async fn invoke(
    st: &GatewayState,
    conn: &ConnInfo,
    event: &serde_json::Value,
    request_id: &str,
    trace: Option<String>,
) -> Result<InvokeOutcome, InvokeError> {
    let payload = serde_json::to_vec(event)
        .map_err(|e| InvokeError::Internal(format!("encode WebSocket event: {e}")))?;
    st.invoker
        .invoke(InvokeRequest {
            request_id: request_id.to_string(),
            function: conn.function.clone(),
            target: Target::Alias(conn.alias.clone()),
            trigger: Trigger::Http,
            payload: payload.into(),
            trace,
        })
        .await
}

/// One connection, from the completed upgrade to its `$disconnect`.
async fn run(
    st: GatewayState,
    conn: Arc<Conn>,
    mut rx: mpsc::Receiver<Message>,
    mut socket: WebSocket,
) {
    let (code, reason) = if st.connections.register(Arc::clone(&conn)) {
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
        let handler = tokio::spawn(handle_messages(st.clone(), Arc::clone(&conn), in_rx));
        let end = pump(&conn, &mut socket, &mut rx, &in_tx).await;
        st.connections.remove(&conn.info.id);
        conn.mark_closed();
        drop(in_tx);
        // A message the function is handling finishes first, so `$disconnect` is
        // always the connection's last event; queued ones are dropped.
        let _ = handler.await;
        end
    } else {
        // The server began draining between `$connect` and the upgrade.
        close(&mut socket, 1001, "Going away").await;
        conn.mark_closed();
        (1001, "Going away".to_string())
    };
    drop(socket);
    disconnect(&st, &conn.info, code, &reason).await;
}

async fn disconnect(st: &GatewayState, conn: &ConnInfo, code: u16, reason: &str) {
    let request_id = nimbus_core::new_request_id();
    let kind = event::Kind::Disconnect { code, reason };
    let ev = event::build(conn, &request_id, nimbus_core::now_ms(), &kind);
    match invoke(st, conn, &ev, &request_id, None).await {
        Ok(o) if o.status.is_success() => {}
        Ok(o) => {
            tracing::info!(connection_id = %conn.id, request_id, status = o.status.code(), "$disconnect failed")
        }
        Err(e) => {
            tracing::info!(connection_id = %conn.id, request_id, error = %e, "$disconnect failed")
        }
    }
}

/// A message from the client, for the function.
struct Inbound {
    body: Vec<u8>,
    binary: bool,
}

/// Moves frames between the socket, the function and the registry until the
/// connection ends; returns the close code and reason `$disconnect` reports.
async fn pump(
    conn: &Conn,
    socket: &mut WebSocket,
    rx: &mut mpsc::Receiver<Message>,
    in_tx: &mpsc::Sender<Inbound>,
) -> (u16, String) {
    let lifetime = tokio::time::sleep(MAX_LIFETIME);
    tokio::pin!(lifetime);
    let mut idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    loop {
        tokio::select! {
            frame = socket.recv() => {
                idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                conn.touch(nimbus_core::now_ms());
                let msg = match frame {
                    None => return (1006, "connection lost".into()),
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return read_failed(socket, e).await,
                };
                let inbound = match msg {
                    Message::Text(t) => Inbound { body: t.as_str().as_bytes().to_vec(), binary: false },
                    Message::Binary(b) => Inbound { body: b.to_vec(), binary: true },
                    // tungstenite answers pings itself; either way the client is alive.
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(frame) => {
                        let (code, reason) = frame
                            .map(|f| (f.code, f.reason.as_str().to_string()))
                            .unwrap_or((1005, String::new()));
                        // Reading on lets tungstenite send its close reply.
                        finish_close(socket).await;
                        return (code, reason);
                    }
                };
                observe::websocket_message("in");
                // A full queue stops reading (backpressure), but never a close.
                tokio::select! {
                    sent = in_tx.send(inbound) => if sent.is_err() {
                        return (1011, "message handler stopped".into());
                    },
                    (code, reason) = conn.close_requested() => {
                        close(socket, code, reason).await;
                        return (code, reason.into());
                    }
                }
            }
            out = rx.recv() => match out {
                Some(m) => {
                    idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                    conn.touch(nimbus_core::now_ms());
                    observe::websocket_message("out");
                    if socket.send(m).await.is_err() {
                        return (1006, "connection lost".into());
                    }
                }
                // The connection holds a sender for as long as this runs.
                None => return (1011, "internal error".into()),
            },
            (code, reason) = conn.close_requested() => {
                close(socket, code, reason).await;
                return (code, reason.into());
            }
            () = tokio::time::sleep_until(idle_deadline) => {
                close(socket, 1001, "Going away").await;
                return (1001, "idle timeout".into());
            }
            () = &mut lifetime => {
                close(socket, 1001, "Going away").await;
                return (1001, "connection lifetime reached".into());
            }
        }
    }
}

async fn read_failed(socket: &mut WebSocket, e: axum::Error) -> (u16, String) {
    let e = e.into_inner();
    let too_big = e
        .downcast_ref::<tungstenite::Error>()
        .is_some_and(|t| matches!(t, tungstenite::Error::Capacity(_)));
    if too_big {
        // The rest of the oversized frame is never read (it could be any length):
        // send the close and drop the socket without waiting for the reply.
        let frame = CloseFrame {
            code: 1009,
            reason: "Message too big".into(),
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
        return (1009, "Message too big".into());
    }
    tracing::debug!(error = %e, "WebSocket read failed");
    (1006, "connection lost".into())
}

/// Sends a close frame and waits (briefly) for the client's, so it sees a clean close.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame))))
        .await
        .is_ok()
    {
        finish_close(socket).await;
    }
}

async fn finish_close(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

/// The connection's `$default` messages, one at a time so the function sees them in
/// the order they came.
async fn handle_messages(st: GatewayState, conn: Arc<Conn>, mut in_rx: mpsc::Receiver<Inbound>) {
    while let Some(m) = in_rx.recv().await {
        if conn.is_closed() {
            break;
        }
        let request_id = nimbus_core::new_request_id();
        let message_id = registry::new_message_id();
        let kind = event::Kind::Message {
            message_id: &message_id,
            body: &m.body,
            binary: m.binary,
        };
        let ev = event::build(&conn.info, &request_id, nimbus_core::now_ms(), &kind);
        let answer = match invoke(&st, &conn.info, &ev, &request_id, None).await {
            Ok(o) => match o.status {
                InvokeStatus::Success(bytes) => event::reply(&bytes),
                other => {
                    tracing::info!(connection_id = %conn.info.id, request_id, status = other.code(), "WebSocket message failed");
                    Some(event::error_frame(&conn.info.id, &request_id))
                }
            },
            Err(e) => {
                tracing::info!(connection_id = %conn.info.id, request_id, error = %e, "WebSocket message failed");
                Some(event::error_frame(&conn.info.id, &request_id))
            }
        };
        if let Some(reply) = answer
            && let Err(e) = conn.send(reply)
        {
            tracing::debug!(connection_id = %conn.info.id, ?e, "reply dropped");
        }
    }
}
