//! CORS per route: preflights answered by the gateway, the allow headers added to
//! every answer (errors included, so a browser can read why it was refused).

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use nimbus_core::route_options::Cors;

use crate::error_response;

/// Whether a request is a CORS preflight: OPTIONS with an Origin and the method the
/// real request will use.
pub fn preflight_method(method: &str, headers: &HeaderMap) -> Option<String> {
    if method != "OPTIONS" || !headers.contains_key(header::ORIGIN) {
        return None;
    }
    headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
        .map(|m| m.trim().to_ascii_uppercase())
}

fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// The headers that let `origin` read the answer, if it may.
pub fn allow_headers(cors: &Cors, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let Some(origin) = origin(headers).filter(|o| cors.allows_origin(o)) else {
        return Vec::new();
    };
    let any = cors.origins.iter().any(|o| o == "*") && !cors.credentials;
    let mut out = Vec::new();
    let value = if any { "*" } else { origin };
    if let Ok(v) = HeaderValue::from_str(value) {
        out.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, v));
    }
    if !any {
        out.push((header::VARY, HeaderValue::from_static("origin")));
    }
    if cors.credentials {
        out.push((
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ));
    }
    if !cors.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cors.expose_headers.join(", "))
    {
        out.push((header::ACCESS_CONTROL_EXPOSE_HEADERS, v));
    }
    out
}

/// The gateway's answer to a preflight for a route with these rules.
pub fn preflight(cors: &Cors, headers: &HeaderMap, method: &str) -> Response {
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let allowed = origin(headers).is_some_and(|o| cors.allows_origin(o))
        && cors.allows_method(method)
        && cors.allows_headers(requested);
    if !allowed {
        return error_response(
            StatusCode::FORBIDDEN,
            "cors_refused",
            "this origin, method or header is not allowed by the route's CORS rules",
        );
    }
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    for (n, v) in allow_headers(cors, headers) {
        h.insert(n, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cors.methods.join(", ")) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    let allow_h = if cors.headers.iter().any(|h| h == "*") {
        requested.to_string()
    } else {
        cors.headers.join(", ")
    };
    if !allow_h.is_empty()
        && let Ok(v) = HeaderValue::from_str(&allow_h)
    {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    if let Some(age) = cors.max_age_s {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
    }
    h.append(
        header::VARY,
        HeaderValue::from_static("access-control-request-method, access-control-request-headers"),
    );
    r
}
