//! What the gateway tells operators: Prometheus metrics by route and status, an
//! access-log line per request (when asked for), and the caller's W3C trace context
//! handed on to functions.
//!
//! Metric names and labels are a public interface:
//! - `nimbus_gateway_requests_total{route,status}` counter; `route` is the matched
//!   route key (`GET /hello/{name}`), or `unmatched` (raw paths would be unbounded)
//! - `nimbus_gateway_request_duration_seconds{route}` histogram
//! - `nimbus_gateway_auth_failures_total{route,status}` counter (401 and 403)
//! - `nimbus_gateway_throttles_total{route,limit}` counter, `limit` = `client` |
//!   `route` | `key`
//! - `nimbus_gateway_upstream_requests_total{route,upstream,status}` counter, one per
//!   attempt; `status` is the upstream's HTTP status, or `connect_error` | `timeout` |
//!   `error`
//! - `nimbus_gateway_upstream_marked_down_total{upstream}` counter
//! - `nimbus_gateway_websocket_connections` gauge: open WebSocket connections
//! - `nimbus_gateway_websocket_messages_total{direction}` counter, `direction` =
//!   `in` (from clients) | `out` (replies and pushes)

use http::HeaderMap;

pub const UNMATCHED: &str = "unmatched";

pub fn request(route: &str, status: u16, seconds: f64) {
    metrics::counter!(
        "nimbus_gateway_requests_total",
        "route" => route.to_string(),
        "status" => status.to_string(),
    )
    .increment(1);
    metrics::histogram!("nimbus_gateway_request_duration_seconds", "route" => route.to_string())
        .record(seconds);
}

pub fn auth_failure(route: &str, status: u16) {
    metrics::counter!(
        "nimbus_gateway_auth_failures_total",
        "route" => route.to_string(),
        "status" => status.to_string(),
    )
    .increment(1);
}

pub fn throttled(route: &str, limit: &'static str) {
    metrics::counter!(
        "nimbus_gateway_throttles_total",
        "route" => route.to_string(),
        "limit" => limit,
    )
    .increment(1);
}

pub fn upstream_request(route: &str, upstream: &str, status: &str) {
    metrics::counter!(
        "nimbus_gateway_upstream_requests_total",
        "route" => route.to_string(),
        "upstream" => upstream.to_string(),
        "status" => status.to_string(),
    )
    .increment(1);
}

pub fn upstream_marked_down(upstream: &str) {
    metrics::counter!(
        "nimbus_gateway_upstream_marked_down_total",
        "upstream" => upstream.to_string(),
    )
    .increment(1);
}

pub fn websocket_connections(open: usize) {
    metrics::gauge!("nimbus_gateway_websocket_connections").set(open as f64);
}

pub fn websocket_message(direction: &'static str) {
    metrics::counter!("nimbus_gateway_websocket_messages_total", "direction" => direction)
        .increment(1);
}

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The caller's `traceparent` when it is a valid W3C one (version 00, lower-case hex,
/// non-zero ids). Only propagated, never made up: a fresh trace per request would cost
/// every invocation an environment update in the function for a trace nobody records.
pub fn traceparent(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    match parts[..] {
        [ver, trace, parent, flags]
            if ver == "00"
                && is_hex(trace, 32)
                && is_hex(parent, 16)
                && is_hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && parent.bytes().any(|b| b != b'0') =>
        {
            Some(v.to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn valid_traceparents_pass_and_others_are_dropped() {
        let mut h = HeaderMap::new();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(good));
        assert_eq!(traceparent(&h).as_deref(), Some(good));
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "junk",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            assert_eq!(traceparent(&h), None, "{bad}");
        }
        assert_eq!(traceparent(&HeaderMap::new()), None);
    }
}
