//! Custom code on a route's way through: Lambda authorizers (their answers cached per
//! identity), `transform_request` / `transform_response` functions, and header
//! rewrites.
//!
//! Owns: calling those functions through the [`Invoker`](nimbus_core::Invoker) and
//! reading their answers strictly: an authorizer that fails or answers anything but
//! `{"isAuthorized": bool, ...}` denies (fail closed); a transform that fails ends the
//! request with a 5xx that says nothing about its internals.
//! Must not touch: the route's own target (the caller invokes or proxies it), the
//! route table, credentials beyond reading the identity sources.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use nimbus_core::route_options::{Authorizer, HeaderRewrite, IdentitySource};
use nimbus_core::{InvokeRequest, InvokeStatus, Target, Trigger};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{GatewayState, error_response, invoke_error_response, observe};

/// Past this many cached answers, expired ones are dropped; past twice as many, all.
const CACHE_PRUNE_ABOVE: usize = 10_000;

struct Cached {
    allowed: bool,
    context: Value,
    expires: Instant,
}

/// Authorizer answers by route and identity. Keys are SHA-256 digests, so the cache
/// never holds a caller's token.
#[derive(Default)]
pub struct AuthorizerCache {
    map: Mutex<HashMap<[u8; 32], Cached>>,
}

impl AuthorizerCache {
    fn get(&self, key: &[u8; 32]) -> Option<(bool, Value)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|c| c.expires > Instant::now())
            .map(|c| (c.allowed, c.context.clone()))
    }

    fn put(&self, key: [u8; 32], allowed: bool, context: Value, ttl: Duration) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if map.len() >= CACHE_PRUNE_ABOVE {
            map.retain(|_, c| c.expires > now);
            if map.len() >= 2 * CACHE_PRUNE_ABOVE {
                map.clear();
            }
        }
        map.insert(
            key,
            Cached {
                allowed,
                context,
                expires: now + ttl,
            },
        );
    }
}

/// The identity of a request: the values of the authorizer's sources, in order; None
/// when one is missing or empty.
fn identity(sources: &[IdentitySource], headers: &HeaderMap, query: &str) -> Option<Vec<String>> {
    sources
        .iter()
        .map(|s| match s {
            IdentitySource::Header(h) => {
                let joined = headers
                    .get_all(h.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(",");
                (!joined.is_empty()).then_some(joined)
            }
            IdentitySource::Query(q) => query
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| nimbus_core::routes::percent_decode(k) == *q)
                .map(|(_, v)| nimbus_core::routes::percent_decode(&v.replace('+', " ")))
                .filter(|v| !v.is_empty()),
        })
        .collect()
}

fn cache_key(function: &str, route_key: &str, values: &[String]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [function, route_key]
        .into_iter()
        .chain(values.iter().map(String::as_str))
    {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// Asks the route's authorizer about a request (or reuses its cached answer). Ok is
/// the `context` it returned, for `requestContext.authorizer.lambda`.
pub(crate) async fn authorize(
    st: &GatewayState,
    spec: &Authorizer,
    route_key: &str,
    parts: &http::request::Parts,
    event: impl FnOnce() -> Value,
    request_id: &str,
) -> Result<Value, Response> {
    let Some(values) = identity(
        &spec.identity_source,
        &parts.headers,
        parts.uri.query().unwrap_or(""),
    ) else {
        return Err(crate::auth::unauthorized("missing credentials"));
    };
    let key = cache_key(&spec.function, route_key, &values);
    let forbidden = || {
        crate::auth::failed(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "forbidden",
        ))
    };
    if spec.ttl_ms > 0
        && let Some((allowed, context)) = st.authorizers.get(&key)
    {
        return if allowed {
            Ok(context)
        } else {
            Err(forbidden())
        };
    }
    // API Gateway's authorizer payload 2.0: the request event without its body.
    let mut ev = event();
    if let Some(obj) = ev.as_object_mut() {
        obj.remove("body");
        obj.remove("isBase64Encoded");
        obj.insert("type".into(), "REQUEST".into());
        obj.insert(
            "routeArn".into(),
            format!("arn:nimbus:execute-api:local:000000000000:nimbus/$default/{route_key}").into(),
        );
        obj.insert("identitySource".into(), values.clone().into());
    }
    let answer = match call(st, &spec.function, &ev, request_id, parts).await {
        Ok(bytes) => bytes,
        Err(_) => {
            // Fail closed, and do not cache: the next request asks again.
            tracing::warn!(authorizer = %spec.function, route = route_key, "authorizer failed; denying");
            return Err(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "authorizer_error",
                "the authorizer could not decide",
            ));
        }
    };
    let parsed: Option<(bool, Value)> =
        serde_json::from_slice::<Value>(&answer).ok().and_then(|v| {
            let allowed = v.get("isAuthorized")?.as_bool()?;
            let context = match v.get("context") {
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(c @ Value::Object(_)) => c.clone(),
                Some(_) => return None,
            };
            Some((allowed, context))
        });
    let Some((allowed, context)) = parsed else {
        tracing::warn!(authorizer = %spec.function, "authorizer answer is not {{isAuthorized, context}}; denying");
        return Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "authorizer_error",
            "the authorizer could not decide",
        ));
    };
    if spec.ttl_ms > 0 {
        st.authorizers.put(
            key,
            allowed,
            context.clone(),
            Duration::from_millis(spec.ttl_ms),
        );
    }
    if allowed {
        Ok(context)
    } else {
        Err(forbidden())
    }
}

/// Invokes a route's helper function (authorizer, transform) with a JSON event; Ok is
/// its successful result. A failure is logged here and answered by the caller.
async fn call(
    st: &GatewayState,
    function: &str,
    event: &Value,
    request_id: &str,
    parts: &http::request::Parts,
) -> Result<Bytes, Response> {
    let payload = serde_json::to_vec(event).map_err(|_| internal())?;
    let req = InvokeRequest {
        request_id: nimbus_core::new_request_id(),
        function: function.to_string(),
        target: Target::Alias("live".into()),
        trigger: Trigger::Hook,
        payload: payload.into(),
        trace: observe::traceparent(&parts.headers),
    };
    let outcome = match st.invoker.invoke(req).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(function, request_id, error = %e, "route hook could not be invoked");
            return Err(invoke_error_response(&e));
        }
    };
    match outcome.status {
        InvokeStatus::Success(bytes) => Ok(bytes),
        other => {
            tracing::warn!(
                function,
                request_id,
                code = other.code(),
                "route hook failed"
            );
            Err(internal())
        }
    }
}

fn internal() -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}

fn transform_failed() -> Response {
    error_response(
        StatusCode::BAD_GATEWAY,
        "transform_error",
        "a transform of this route failed",
    )
}

/// Sets and removes headers as a route's rewrite says.
pub(crate) fn rewrite(headers: &mut HeaderMap, rw: &HeaderRewrite) {
    for name in &rw.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &rw.set {
        // Both were validated at deploy; a value that still does not parse is skipped.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
}

/// What `transform_request` decided.
pub(crate) enum Transformed {
    /// Go on with these parts and body.
    Request(http::request::Parts, Bytes),
    /// Answer with this; the target is not called.
    Respond(Response),
}

/// Calls `transform_request` with the request's event; it returns the event changed
/// (any of `headers`, `cookies`, `body` + `isBase64Encoded`, `rawPath`,
/// `rawQueryString`), or a response (`statusCode`, ...) to answer at once.
pub(crate) async fn transform_request(
    st: &GatewayState,
    function: &str,
    mut parts: http::request::Parts,
    body: Bytes,
    event: Value,
    request_id: &str,
) -> Result<Transformed, Response> {
    let answer = call(st, function, &event, request_id, &parts)
        .await
        .map_err(|_| transform_failed())?;
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&answer) else {
        tracing::warn!(function, "transform_request did not return an object");
        return Err(transform_failed());
    };
    if obj.contains_key("statusCode") {
        return Ok(Transformed::Respond(crate::map_result(&answer)));
    }
    let bad = |what: &str| {
        tracing::warn!(
            function,
            what,
            "transform_request returned an unusable field"
        );
        transform_failed()
    };
    if let Some(h) = obj.get("headers") {
        let Value::Object(h) = h else {
            return Err(bad("headers"));
        };
        let mut headers = HeaderMap::new();
        for (k, v) in h {
            let Some(text) = v.as_str() else {
                return Err(bad("headers"));
            };
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(text),
            ) else {
                return Err(bad("headers"));
            };
            if crate::is_hop_header(n.as_str()) || n == http::header::CONTENT_LENGTH {
                continue;
            }
            headers.insert(n, v);
        }
        // The event carries the host among its headers; keep the one that was sent if
        // the transform dropped it.
        if let Some(host) = parts.headers.get(http::header::HOST)
            && !headers.contains_key(http::header::HOST)
        {
            headers.insert(http::header::HOST, host.clone());
        }
        parts.headers = headers;
    }
    if let Some(c) = obj.get("cookies") {
        let Some(list) = c.as_array() else {
            return Err(bad("cookies"));
        };
        let joined = list
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("; ");
        parts.headers.remove(http::header::COOKIE);
        if !joined.is_empty() {
            let v = HeaderValue::from_str(&joined).map_err(|_| bad("cookies"))?;
            parts.headers.insert(http::header::COOKIE, v);
        }
    }
    let body = match obj.get("body") {
        None => body,
        Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => {
            if obj.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
                Bytes::from(B64.decode(s).map_err(|_| bad("body"))?)
            } else {
                Bytes::from(s.clone())
            }
        }
        Some(other) => Bytes::from(other.to_string()),
    };
    if body.len() > st.max_body {
        return Err(bad("body"));
    }
    let path = match obj.get("rawPath") {
        None => parts.uri.path().to_string(),
        Some(Value::String(p)) if p.starts_with('/') => p.clone(),
        Some(_) => return Err(bad("rawPath")),
    };
    let query = match obj.get("rawQueryString") {
        None => parts.uri.query().map(str::to_string),
        Some(Value::String(q)) if q.is_empty() => None,
        Some(Value::String(q)) => Some(q.clone()),
        Some(_) => return Err(bad("rawQueryString")),
    };
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let pq: http::uri::PathAndQuery = pq.parse().map_err(|_| bad("rawPath"))?;
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(pq);
    parts.uri = http::Uri::from_parts(uri).map_err(|_| bad("rawPath"))?;
    Ok(Transformed::Request(parts, body))
}

/// Calls `transform_response` with `{request, response}` and answers with what it
/// returns (Lambda's proxy response format).
pub(crate) async fn transform_response(
    st: &GatewayState,
    function: &str,
    request_event: Value,
    parts: &http::request::Parts,
    resp: Response,
    request_id: &str,
) -> Response {
    let (rp, body) = resp.into_parts();
    let body = match crate::read_limited(body, st.max_body).await {
        Ok(b) => b,
        Err(_) => return transform_failed(),
    };
    let mut headers = serde_json::Map::new();
    for (n, v) in &rp.headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(n.as_str()) {
            Some(Value::String(prev)) => {
                prev.push(',');
                prev.push_str(&v);
            }
            _ => {
                headers.insert(n.as_str().to_string(), Value::String(v));
            }
        }
    }
    let (body_text, b64) = match std::str::from_utf8(&body) {
        Ok(t) => (t.to_string(), false),
        Err(_) => (B64.encode(&body), true),
    };
    let event = serde_json::json!({
        "request": request_event,
        "response": {
            "statusCode": rp.status.as_u16(),
            "headers": headers,
            "body": body_text,
            "isBase64Encoded": b64,
        }
    });
    match call(st, function, &event, request_id, parts).await {
        Ok(answer) => crate::map_result(&answer),
        Err(_) => transform_failed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_come_from_headers_and_the_query_and_missing_ones_are_none() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        let src = [
            IdentitySource::Header("authorization".into()),
            IdentitySource::Query("tenant".into()),
        ];
        assert_eq!(
            identity(&src, &h, "a=1&tenant=acme%20co"),
            Some(vec!["Bearer t".to_string(), "acme co".to_string()])
        );
        assert_eq!(identity(&src, &h, "a=1"), None);
        assert_eq!(identity(&src, &h, "tenant="), None);
        assert_eq!(identity(&src, &HeaderMap::new(), "tenant=x"), None);
    }

    #[test]
    fn cache_keys_separate_routes_and_cannot_be_forged_by_joining() {
        let a = cache_key("auth", "GET /a", &["x".into(), "y".into()]);
        assert_ne!(a, cache_key("auth", "GET /b", &["x".into(), "y".into()]));
        assert_ne!(a, cache_key("auth", "GET /a", &["xy".into()]));
        assert_ne!(a, cache_key("auth", "GET /a", &["x".into(), "y ".into()]));
        assert_eq!(a, cache_key("auth", "GET /a", &["x".into(), "y".into()]));
    }

    #[test]
    fn answers_expire_and_the_cache_stays_bounded() {
        let c = AuthorizerCache::default();
        c.put([1; 32], true, Value::Null, Duration::from_secs(60));
        c.put([2; 32], false, Value::Null, Duration::ZERO);
        assert_eq!(c.get(&[1; 32]).map(|a| a.0), Some(true));
        assert_eq!(c.get(&[2; 32]), None, "expired");
        for i in 0..(2 * CACHE_PRUNE_ABOVE as u32 + 5) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 9;
            c.put(k, true, Value::Null, Duration::from_secs(60));
        }
        let n = c.map.lock().expect("lock").len();
        assert!(n <= 2 * CACHE_PRUNE_ABOVE, "{n}");
    }

    #[test]
    fn rewrites_remove_then_set() {
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("a=1"));
        h.insert("x-tenant", HeaderValue::from_static("evil"));
        let rw = HeaderRewrite {
            set: [("x-tenant".to_string(), "acme".to_string())].into(),
            remove: vec!["cookie".into()],
        };
        rewrite(&mut h, &rw);
        assert!(!h.contains_key("cookie"));
        assert_eq!(h["x-tenant"], "acme");
    }
}
