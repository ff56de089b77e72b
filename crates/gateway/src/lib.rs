//! nimbus-gateway: the data-plane HTTP entry point for functions.
//!
//! Owns: matching a request against the route table (by host, method and path),
//! what a route demands of its callers (CORS, rate limits per client, route and key,
//! API keys and their quotas, JWTs, mTLS client certificates, Lambda authorizers),
//! header rewrites and transform functions (`hooks`), turning the request into an API
//! Gateway HTTP API payload 2.0 event, invoking the function through [`Invoker`],
//! mapping the function's answer back to an HTTP response (Lambda's proxy-integration
//! rules), or, for an upstream route, proxying to its HTTP services (`upstream`),
//! WebSocket routes and their connections (`ws`: `$connect`/`$default`/`$disconnect`
//! events, the connection registry and the `/v1/connections` API over it), and the
//! gateway's metrics and access log.
//!
//! Must not touch: the store, instances, the control API, listening sockets or TLS (a
//! WebSocket reaches it already upgraded by the listener's hyper). It sees
//! routes, API keys and JWT keys only as `watch` snapshots that `cli` builds (from the
//! store's change feed, a JWKS), client certificates only as the [`nimbus_core::ClientCert`]
//! the listener attached, and functions only through `Arc<dyn Invoker>`.
#![forbid(unsafe_code)]

mod auth;
mod cors;
mod event;
mod hooks;
mod jwt;
mod limits;
mod observe;
mod publish;
mod quota;
mod upstream;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use http::{HeaderValue, StatusCode};
use nimbus_core::api::ErrorBody;
use nimbus_core::keys::KeySet;
use nimbus_core::routes::{RouteMatch, RouteTable};
use nimbus_core::{AuthKind, InvokeError, InvokeRequest, InvokeStatus, Invoker, Target, Trigger};
use tokio::sync::watch;

pub use auth::KeyLimiters;
pub use event::{EventInput, build_event, map_result};
pub use hooks::AuthorizerCache;
pub use jwt::JwtConfig;
pub use limits::Buckets;
pub use quota::{Counted, Quotas};
pub use upstream::Upstreams;
pub use ws::Connections;

#[derive(Clone)]
pub struct GatewayState {
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub invoker: Arc<dyn Invoker>,
    pub max_body: usize,
    /// Live API keys, rebuilt by `cli::serve` on every store change.
    pub keys: watch::Receiver<Arc<KeySet>>,
    /// Token buckets of keys, routes and client addresses.
    pub limiters: Arc<Buckets>,
    /// One `nimbus_access` log line per request.
    pub access_log: bool,
    /// JWT verification for `auth = "jwt"` routes (None: not configured, they refuse).
    pub jwt: watch::Receiver<Option<Arc<JwtConfig>>>,
    /// Quota counters of API keys; `cli::serve` persists them.
    pub quotas: Arc<Quotas>,
    /// Answers of Lambda authorizers, by route and identity.
    pub authorizers: Arc<AuthorizerCache>,
    /// The proxy client and upstream health; like the buckets, outlives snapshots.
    pub upstreams: Arc<Upstreams>,
    /// Open WebSocket connections (shared with the `/v1/connections` API).
    pub connections: Arc<Connections>,
    /// sha256 of the admin token, which may also use `/v1/connections` (None: only
    /// API keys with the `connections` scope may).
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Durable publishing for `/v1/topics/{t}/events` (None: not offered).
    pub publisher: Option<Arc<dyn nimbus_core::events::Publisher>>,
}

/// The gateway as a router: every request that reaches it is a function call.
pub fn router(state: GatewayState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// The gateway's share of the platform API, merged by `cli::serve` beside the control
/// API so that API keys can use it: `/v1/connections/{id}` (WebSocket pushes) and
/// `POST /v1/topics/{topic}/events` (publishing, scope `publish:<topic>`).
pub fn platform_router(state: GatewayState) -> Router {
    ws::api::router(state.clone()).merge(
        Router::new()
            .route(
                "/v1/topics/{name}/events",
                axum::routing::post(publish::publish),
            )
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state),
    )
}

/// The platform API's credential check, for surfaces outside the gateway (`/metrics`):
/// the admin token where `state` carries its digest, or an API key granting `action`
/// on `resource`; failures count toward the client's throttle. Err is the answer.
pub fn platform_auth(
    state: &GatewayState,
    parts: &http::request::Parts,
    action: &str,
    resource: &str,
) -> Result<(), Box<Response>> {
    auth::platform_caller(state, parts, action, resource)
}

pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::to_vec(&ErrorBody::new(code, message)).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(State(st): State<GatewayState>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let request_id = nimbus_core::new_request_id();
    let access = st.access_log.then(|| {
        (
            req.method().to_string(),
            req.uri().path().to_string(),
            client_ip(req.extensions()),
        )
    });
    let mut route = observe::UNMATCHED.to_string();
    let mut resp = dispatch(&st, req, &request_id, &mut route).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-nimbus-request-id", v);
    }
    let secs = started.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    observe::request(&route, status, secs);
    if let Some((method, path, ip)) = access {
        tracing::info!(
            target: "nimbus_access",
            request_id,
            method,
            path,
            route,
            status,
            duration_ms = secs * 1000.0,
            client_ip = ip,
        );
    }
    resp
}

fn client_ip(ext: &http::Extensions) -> String {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "127.0.0.1".into())
}

async fn dispatch(
    st: &GatewayState,
    req: Request,
    request_id: &str,
    route_label: &mut String,
) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.as_str().to_string();
    let raw_path = parts.uri.path().to_string();
    let host = request_host_raw(&parts).and_then(|h| nimbus_core::routes::request_host(&h));
    let host = host.as_deref();
    let table = st.routes.borrow().clone();
    // A preflight asks about the route of the method it names; the gateway answers it
    // when that route has CORS rules (otherwise OPTIONS is routed like any method).
    if let Some(wanted) = cors::preflight_method(&method, &parts.headers)
        && let Some(found) = table.lookup(&wanted, host, &raw_path)
        && let Some(rules) = &found.entry.options.cors
    {
        return cors::preflight(rules, &parts.headers, &wanted);
    }
    let Some(found) = table.lookup(&method, host, &raw_path) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route matches {method} {raw_path}"),
        );
    };
    let route_key = found.entry.route_key();
    route_label.clone_from(&route_key);
    if found.entry.options.websocket {
        return ws::serve(st, &found, &route_key, parts, request_id).await;
    }
    let allow = found
        .entry
        .options
        .cors
        .as_ref()
        .map(|c| cors::allow_headers(c, &parts.headers))
        .unwrap_or_default();
    let mut resp = serve_route(st, &found, &route_key, parts, body, request_id).await;
    if let Some(rw) = &found.entry.options.response_headers {
        hooks::rewrite(resp.headers_mut(), rw);
    }
    let h = resp.headers_mut();
    for (n, v) in allow {
        h.insert(n, v);
    }
    resp
}

/// What a route let through: who called (when it asks), and the `RateLimit-*`
/// headers of the tightest limit the request passed.
pub(crate) struct Admitted {
    pub caller: Option<Caller>,
    pub rate_headers: limits::RateHeaders,
}

impl Admitted {
    /// `requestContext.authorizer` for the function: API Gateway's shapes.
    fn authorizer(&self) -> Option<serde_json::Value> {
        self.caller.as_ref().map(|c| match c {
            Caller::Key(k) => serde_json::json!({"apiKey": {"id": k.key_id, "name": k.key_name}}),
            Caller::Jwt(v) => serde_json::json!({"jwt": {"claims": v.claims, "scopes": v.scopes}}),
            Caller::Lambda(context) => serde_json::json!({"lambda": context}),
        })
    }

    /// An API key is a nimbus credential, kept from whatever the route reaches; a JWT
    /// is the caller's, often relayed on (API Gateway passes it through too).
    fn strips_credentials(&self) -> bool {
        matches!(self.caller, Some(Caller::Key(_)))
    }
}

/// Everything a route demands before its target sees a byte: the per-client and
/// per-route buckets, then its authentication. A refusal is the finished response.
pub(crate) async fn admit(
    st: &GatewayState,
    found: &RouteMatch<'_>,
    route_key: &str,
    parts: &http::request::Parts,
    request_id: &str,
) -> Result<Admitted, Response> {
    let entry = found.entry;
    let source_ip = client_ip(&parts.extensions);
    // Per client first: it bounds what one address can spend on guessing keys.
    let mut rate_headers = Vec::new();
    let opts = &entry.options;
    for (rate, limit) in [(opts.rate_per_ip, "client"), (opts.rate, "route")] {
        let Some(rate) = rate else { continue };
        let bucket = match limit {
            "client" => format!("ip:{route_key}:{source_ip}"),
            _ => format!("route:{route_key}"),
        };
        match st.limiters.take(&bucket, rate, limit) {
            Ok(h) => rate_headers = h,
            Err(r) => {
                observe::throttled(route_key, limit);
                return Err(*r);
            }
        }
    }
    if entry.auth != AuthKind::None
        && let Err(resp) = auth::check_throttle(&parts.extensions)
    {
        observe::throttled(route_key, "auth_failures");
        return Err(*resp);
    }
    let caller = match entry.auth {
        AuthKind::None => None,
        AuthKind::ApiKey => {
            let keys = st.keys.borrow().clone();
            // A route no function owns is granted only by `invoke:*`: asking for the
            // resource `*` matches no narrower scope.
            let resource = if entry.function.is_empty() {
                "*"
            } else {
                entry.function.as_str()
            };
            match auth::check_api_key(
                &keys,
                &st.limiters,
                &st.quotas,
                &parts.headers,
                resource,
                nimbus_core::now_ms(),
            ) {
                Ok(mut c) => {
                    if !c.rate_headers.is_empty() {
                        rate_headers = std::mem::take(&mut c.rate_headers);
                    }
                    Some(Caller::Key(c))
                }
                Err(resp) => {
                    match resp.status().as_u16() {
                        429 => observe::throttled(route_key, "key"),
                        s => observe::auth_failure(route_key, s),
                    }
                    return Err(*resp);
                }
            }
        }
        AuthKind::Jwt => {
            let cfg = st.jwt.borrow().clone();
            match check_jwt(cfg.as_deref(), &parts.headers, &entry.options.scopes) {
                Ok(v) => Some(Caller::Jwt(v)),
                Err(resp) => {
                    observe::auth_failure(route_key, resp.status().as_u16());
                    return Err(*resp);
                }
            }
        }
        // The listener verified the certificate against the client CA; no
        // certificate (or no TLS at all) means no caller.
        AuthKind::Mtls => {
            if parts.extensions.get::<nimbus_core::ClientCert>().is_none() {
                observe::auth_failure(route_key, 401);
                return Err(auth::failed(error_response(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid client certificate is required",
                )));
            }
            None
        }
        AuthKind::Authorizer => {
            let Some(spec) = &entry.options.authorizer else {
                tracing::error!(route = route_key, "authorizer route without an authorizer");
                return Err(auth::unauthorized("unauthorized"));
            };
            let event = || request_event(found, route_key, parts, b"", false, None, request_id);
            match hooks::authorize(st, spec, route_key, parts, event, request_id).await {
                Ok(context) => Some(Caller::Lambda(context)),
                Err(resp) => {
                    observe::auth_failure(route_key, resp.status().as_u16());
                    return Err(resp);
                }
            }
        }
    };
    Ok(Admitted {
        caller,
        rate_headers,
    })
}

async fn serve_route(
    st: &GatewayState,
    found: &RouteMatch<'_>,
    route_key: &str,
    parts: http::request::Parts,
    body: Body,
    request_id: &str,
) -> Response {
    // Credentials before the body: a refused caller never gets to upload anything.
    let admitted = match admit(st, found, route_key, &parts, request_id).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let opts = &found.entry.options;
    let mut parts = parts;
    // After admission, so a rewrite cannot hide or forge the credentials it checked.
    if let Some(rw) = &opts.request_headers {
        hooks::rewrite(&mut parts.headers, rw);
    }
    let is_upstream = !found.entry.upstream.is_empty();
    let event = |parts: &http::request::Parts, body: &[u8]| {
        request_event(
            found,
            route_key,
            parts,
            body,
            admitted.strips_credentials(),
            admitted.authorizer(),
            request_id,
        )
    };
    // An upstream's request body streams through unless a transform must see it whole.
    let (parts, body, stream) = if is_upstream && opts.transform_request.is_none() {
        (parts, Bytes::new(), Some(body))
    } else {
        let body = match read_limited(body, st.max_body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        match &opts.transform_request {
            None => (parts, body, None),
            Some(f) => {
                let ev = event(&parts, &body);
                match hooks::transform_request(st, f, parts, body, ev, request_id).await {
                    Ok(hooks::Transformed::Request(p, b)) => (p, b, None),
                    Ok(hooks::Transformed::Respond(r)) => {
                        return with_headers(r, admitted.rate_headers);
                    }
                    Err(r) => return r,
                }
            }
        }
    };
    let mut resp = if is_upstream {
        let body = stream.unwrap_or_else(|| Body::from(body.clone()));
        upstream::proxy(
            st,
            found.entry,
            route_key,
            &parts,
            body,
            &admitted,
            request_id,
        )
        .await
    } else {
        let trace = observe::traceparent(&parts.headers);
        invoke_function(st, found, event(&parts, &body), trace, request_id).await
    };
    if let Some(f) = &opts.transform_response {
        let ev = event(&parts, &body);
        resp = hooks::transform_response(st, f, ev, &parts, resp, request_id).await;
    }
    with_headers(resp, admitted.rate_headers)
}

fn with_headers(mut resp: Response, headers: limits::RateHeaders) -> Response {
    for (name, value) in headers {
        resp.headers_mut().insert(name, value);
    }
    resp
}

/// The payload 2.0 event of a request on a matched route.
fn request_event(
    found: &RouteMatch<'_>,
    route_key: &str,
    parts: &http::request::Parts,
    body: &[u8],
    strip_credentials: bool,
    authorizer: Option<serde_json::Value>,
    request_id: &str,
) -> serde_json::Value {
    let source_ip = client_ip(&parts.extensions);
    let authentication = parts
        .extensions
        .get::<nimbus_core::ClientCert>()
        .map(|c| serde_json::json!({"clientCert": c}));
    build_event(&EventInput {
        request_id,
        route_key,
        method: parts.method.as_str(),
        raw_path: parts.uri.path(),
        raw_query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        path_params: &found.params,
        body,
        source_ip: &source_ip,
        protocol: version_str(parts.version),
        strip_credentials,
        authorizer,
        authentication,
    })
}

/// The route's function called with the request as a payload 2.0 event, and its
/// answer mapped back to HTTP (Lambda's proxy-integration rules).
async fn invoke_function(
    st: &GatewayState,
    found: &RouteMatch<'_>,
    event: serde_json::Value,
    trace: Option<String>,
    request_id: &str,
) -> Response {
    let payload = match serde_json::to_vec(&event) {
        Ok(p) => p,
        Err(_) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            );
        }
    };
    let function = found.entry.function.clone();
    let req = InvokeRequest {
        request_id: request_id.to_string(),
        function: function.clone(),
        target: Target::Alias(found.entry.alias.clone()),
        trigger: Trigger::Http,
        payload: payload.into(),
        trace,
    };
    let outcome = match found.entry.options.timeout_ms {
        None => st.invoker.invoke(req).await,
        // Giving up on the answer does not cancel the invocation: the worker runs each
        // in its own task (its instance, slot and record stay the worker's).
        Some(ms) => {
            match tokio::time::timeout(std::time::Duration::from_millis(ms), st.invoker.invoke(req))
                .await
            {
                Ok(o) => o,
                Err(_) => {
                    return error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        &format!("the route's timeout of {ms} ms passed"),
                    );
                }
            }
        }
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return invoke_error_response(&e),
    };
    let mut resp = match &outcome.status {
        InvokeStatus::Success(bytes) => map_result(bytes),
        InvokeStatus::FunctionError(fe) => {
            tracing::info!(%function, request_id, error_type = %fe.error_type, "function error");
            // Callers of a public route learn nothing about the code's internals.
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "function_error",
                "Internal Server Error",
            )
        }
        other => error_response(
            StatusCode::from_u16(other.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
            other.code(),
            &other.message(),
        ),
    };
    let h = resp.headers_mut();
    h.insert(
        "x-nimbus-cold-start",
        HeaderValue::from_static(if outcome.cold_start { "true" } else { "false" }),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", outcome.duration_ms)) {
        h.insert("x-nimbus-duration-ms", v);
    }
    if let Ok(v) = HeaderValue::from_str(&outcome.version.to_string()) {
        h.insert("x-nimbus-version", v);
    }
    resp
}

pub fn invoke_error_response(e: &InvokeError) -> Response {
    match e {
        InvokeError::NotFound(m) => error_response(StatusCode::NOT_FOUND, "not_found", m),
        InvokeError::Throttled { retry_after_s, .. } => {
            let mut r = error_response(StatusCode::TOO_MANY_REQUESTS, "throttled", &e.to_string());
            if let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            r
        }
        InvokeError::BadRequest(m) => error_response(StatusCode::BAD_REQUEST, "bad_request", m),
        InvokeError::ShuttingDown => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
        InvokeError::Internal(detail) => {
            tracing::error!(error = %detail, "invocation failed inside the platform");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

/// The host a request named: `Host` (HTTP/1.1) or `:authority` (HTTP/2), as sent.
pub(crate) fn request_host_raw(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
}

pub(crate) fn payload_too_large(limit: usize) -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &format!("request body exceeds {limit} bytes"),
    )
}

/// Reads a body of at most `limit` bytes with the platform's one body reader (a
/// declared length over it is refused before reading); a refusal is the finished
/// answer: 413, 408 when the listener's body deadline passed, 400.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, Response> {
    nimbus_core::body::read_body(body, limit)
        .await
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            error_response(status, e.code(), &e.to_string())
        })
}

/// Who a protected route let through.
pub(crate) enum Caller {
    Key(auth::Caller),
    Jwt(jwt::Verified),
    /// What a Lambda authorizer returned as its `context`.
    Lambda(serde_json::Value),
}

fn check_jwt(
    cfg: Option<&JwtConfig>,
    headers: &http::HeaderMap,
    required: &[String],
) -> Result<jwt::Verified, Box<Response>> {
    let unauthorized = |m: &str| Box::new(auth::unauthorized(m));
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let Some(token) = token else {
        return Err(unauthorized("missing bearer token"));
    };
    let Some(cfg) = cfg else {
        tracing::error!(
            "a jwt route was called but serve has no JWT configuration (--jwks-file or --jwks-url, --jwt-issuer, --jwt-audience)"
        );
        return Err(unauthorized("invalid token"));
    };
    cfg.verify(token, required).map_err(|e| match e {
        jwt::JwtRefusal::Unauthorized(why) => {
            tracing::info!(reason = why, "JWT refused");
            unauthorized("invalid token")
        }
        jwt::JwtRefusal::Forbidden => Box::new(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token lacks a scope this route requires",
        )),
    })
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

/// Header names that describe the hop, not the request; kept out of events.
pub fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "te" | "trailer"
    )
}
