//! Upstream routes: the gateway as a reverse proxy in front of HTTP services.
//!
//! Owns: the pooled HTTP/1 client (built once, shared by every upstream route),
//! choosing an upstream per request (round-robin over the ones not marked down; when
//! all are down, the one whose down period ends first, so an outage of the health
//! state never becomes an outage of the route), passive health (a connect error, a
//! timeout or a 502/503/504 answer marks an upstream down for the route's
//! `upstream_down_for`), the one retry a connect failure allows, forwarding the
//! request (hop-by-hop headers and nimbus API keys removed, `X-Forwarded-*`,
//! `Forwarded` and the request id added) and streaming both bodies.
//!
//! Must not touch: route matching and admission (rate limits and auth ran in `admit`
//! before a byte reaches this module), the store, functions. Health is keyed by route
//! key and URL and lives in `GatewayState`, so it outlives route-table snapshots.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::response::Response;
use http::header::{CONNECTION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nimbus_core::route_options::{DEFAULT_UPSTREAM_DOWN_FOR_MS, DEFAULT_UPSTREAM_TIMEOUT_MS};
use nimbus_core::routes::RouteEntry;

use crate::{Admitted, error_response, is_hop_header, observe};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Past this many health entries, the ones no longer down are forgotten.
const PRUNE_ABOVE: usize = 10_000;

/// A connect that takes this long counts as a connect failure (retryable) rather
/// than eating the whole route timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy's shared state: one client, and the health of every upstream.
pub struct Upstreams {
    client: Client<HttpConnector, TakeBody>,
    health: Mutex<Health>,
}

impl Default for Upstreams {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build(connector);
        Upstreams {
            client,
            health: Mutex::default(),
        }
    }
}

/// Round-robin cursors per route and the instants upstreams stay down until.
#[derive(Default)]
struct Health {
    cursors: HashMap<String, usize>,
    down_until: HashMap<String, Instant>,
}

fn health_key(route: &str, url: &str) -> String {
    format!("{route} {url}")
}

impl Health {
    /// The next upstream of `urls` to try, skipping `tried`. Down ones are skipped;
    /// when every candidate is down, the one back soonest, unless `healthy_only`.
    fn pick(
        &mut self,
        route: &str,
        urls: &[String],
        tried: &[usize],
        healthy_only: bool,
        now: Instant,
    ) -> Option<usize> {
        let n = urls.len();
        if n == 0 {
            return None;
        }
        let cursor = self.cursors.entry(route.to_string()).or_insert(0);
        let start = *cursor % n;
        *cursor = cursor.wrapping_add(1);
        let mut soonest: Option<(usize, Instant)> = None;
        for i in 0..n {
            let idx = (start + i) % n;
            if tried.contains(&idx) {
                continue;
            }
            match self.down_until.get(&health_key(route, &urls[idx])) {
                Some(until) if *until > now => {
                    if soonest.is_none_or(|(_, t)| *until < t) {
                        soonest = Some((idx, *until));
                    }
                }
                _ => return Some(idx),
            }
        }
        if healthy_only {
            None
        } else {
            soonest.map(|(i, _)| i)
        }
    }

    /// Marks `url` down until `now + for_`; true when it was up before.
    fn mark_down(&mut self, route: &str, url: &str, for_: Duration, now: Instant) -> bool {
        if self.down_until.len() >= PRUNE_ABOVE {
            self.down_until.retain(|_, until| *until > now);
        }
        self.down_until
            .insert(health_key(route, url), now + for_)
            .is_none_or(|until| until <= now)
    }

    fn mark_up(&mut self, route: &str, url: &str) {
        self.down_until.remove(&health_key(route, url));
    }
}

impl Upstreams {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The request body, handed to at most one attempt: an attempt that failed to
/// connect never polled it, so it is still in the slot for the retry. An attempt
/// that did poll it took it; then nothing is retried (a byte may have been sent).
struct TakeBody {
    slot: Arc<Mutex<Option<http_body_util::Limited<Body>>>>,
    taken: Option<http_body_util::Limited<Body>>,
    hint: SizeHint,
}

impl http_body::Body for TakeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            this.taken = this.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        match this.taken.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(Some(Err("request body already consumed".into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.hint.exact() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// Header names a `Connection` header lists: hop-by-hop for this hop only.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn strip_hop_headers(headers: &mut HeaderMap) {
    for name in connection_listed(headers) {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_header(n.as_str()) || n.as_str() == "proxy-connection")
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// What the upstream learns of the request besides its own headers.
struct Forwarding<'a> {
    client_ip: &'a str,
    host: Option<&'a str>,
    proto: &'static str,
    request_id: &'a str,
}

/// The headers sent upstream: the caller's, minus hop-by-hop ones, names with an
/// underscore, the caller's `Host` (the upstream gets its own) and, behind an
/// `api_key` route, the nimbus credential; plus where the request came from.
fn forward_headers(incoming: &HeaderMap, strip_credentials: bool, f: &Forwarding<'_>) -> HeaderMap {
    let mut h = incoming.clone();
    strip_hop_headers(&mut h);
    // CGI and WSGI servers turn `-` and `_` alike into `_` (`Content_Length` becomes
    // CONTENT_LENGTH), so such a name can stand in for a framing or trusted header
    // behind this proxy; nginx drops them too (`underscores_in_headers off`).
    let underscored: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for name in underscored {
        h.remove(name);
    }
    h.remove(HOST);
    h.remove("x-nimbus-request-id");
    if strip_credentials {
        h.remove("x-api-key");
        h.remove(http::header::AUTHORIZATION);
    }
    let joined = |name: &str| {
        let prior: Vec<&str> = incoming
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!prior.is_empty()).then(|| prior.join(", "))
    };
    let xff = match joined("x-forwarded-for") {
        Some(prior) => format!("{prior}, {}", f.client_ip),
        None => f.client_ip.to_string(),
    };
    let for_node = if f.client_ip.contains(':') {
        format!("\"[{}]\"", f.client_ip)
    } else {
        f.client_ip.to_string()
    };
    let mut element = format!("for={for_node};proto={}", f.proto);
    if let Some(host) = f.host
        && host
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        element.push_str(&format!(";host=\"{host}\""));
    }
    let forwarded = match joined("forwarded") {
        Some(prior) => format!("{prior}, {element}"),
        None => element,
    };
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set("x-forwarded-for", &xff);
    set("x-forwarded-proto", f.proto);
    if let Some(host) = f.host {
        set("x-forwarded-host", host);
    }
    set("forwarded", &forwarded);
    set("x-nimbus-request-id", f.request_id);
    h
}

/// How one attempt ended, for the metrics.
fn outcome_label(status: Option<StatusCode>, what: &'static str) -> String {
    status.map_or_else(|| what.to_string(), |s| s.as_u16().to_string())
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn bad_gateway() -> Response {
    error_response(
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
        "no upstream of this route could be reached",
    )
}

/// Proxies an admitted request to one of the route's upstreams.
pub(crate) async fn proxy(
    st: &crate::GatewayState,
    entry: &RouteEntry,
    route_key: &str,
    parts: &http::request::Parts,
    body: Body,
    admitted: &Admitted,
    request_id: &str,
) -> Response {
    let limit = st.max_body;
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return crate::payload_too_large(limit);
    }
    let hint = http_body::Body::size_hint(&body);
    let slot = Arc::new(Mutex::new(Some(http_body_util::Limited::new(body, limit))));
    let client_ip = crate::client_ip(&parts.extensions);
    let host = crate::request_host_raw(parts);
    let proto = if parts
        .extensions
        .get::<nimbus_core::TlsConnection>()
        .is_some()
    {
        "https"
    } else {
        "http"
    };
    let headers = forward_headers(
        &parts.headers,
        admitted.strips_credentials(),
        &Forwarding {
            client_ip: &client_ip,
            host: host.as_deref(),
            proto,
            request_id,
        },
    );
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let timeout_ms = entry
        .options
        .timeout_ms
        .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_MS);
    let down_for = Duration::from_millis(
        entry
            .options
            .upstream_down_for_ms
            .unwrap_or(DEFAULT_UPSTREAM_DOWN_FOR_MS),
    );
    let ups = &st.upstreams;
    let mut tried: Vec<usize> = Vec::new();
    loop {
        // The retry goes only to an upstream believed healthy: a second down one
        // would just double the caller's wait.
        let retry = !tried.is_empty();
        let Some(idx) =
            ups.health()
                .pick(route_key, &entry.upstream, &tried, retry, Instant::now())
        else {
            return bad_gateway();
        };
        tried.push(idx);
        let base = &entry.upstream[idx];
        let uri: http::Uri = match format!("{base}{path_and_query}").parse() {
            Ok(u) => u,
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the request target cannot be forwarded",
                );
            }
        };
        let mut req = http::Request::new(TakeBody {
            slot: Arc::clone(&slot),
            taken: None,
            hint,
        });
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = headers.clone();
        if let Some(authority) = uri.authority()
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(HOST, v);
        }
        *req.uri_mut() = uri;
        let sent =
            tokio::time::timeout(Duration::from_millis(timeout_ms), ups.client.request(req)).await;
        let mark_down = |why: &'static str| {
            if ups
                .health()
                .mark_down(route_key, base, down_for, Instant::now())
            {
                tracing::warn!(route = route_key, upstream = %base, reason = why, "upstream marked down");
                observe::upstream_marked_down(base);
            }
        };
        match sent {
            Ok(Ok(resp)) => {
                let status = resp.status();
                observe::upstream_request(route_key, base, &outcome_label(Some(status), ""));
                if matches!(status.as_u16(), 502..=504) {
                    mark_down("answered 502/503/504");
                } else {
                    ups.health().mark_up(route_key, base);
                }
                let mut resp = resp.map(Body::new);
                strip_hop_headers(resp.headers_mut());
                return resp;
            }
            Ok(Err(e)) if e.is_connect() => {
                observe::upstream_request(route_key, base, "connect_error");
                tracing::info!(route = route_key, upstream = %base, error = %e, "upstream connect failed");
                mark_down("connect failed");
                let untouched = slot.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                if untouched && tried.len() < 2 && entry.upstream.len() > 1 {
                    continue;
                }
                return bad_gateway();
            }
            Ok(Err(e)) => {
                if is_length_limit(&e) {
                    return crate::payload_too_large(limit);
                }
                observe::upstream_request(route_key, base, "error");
                tracing::info!(route = route_key, upstream = %base, error = %e, "upstream request failed");
                return bad_gateway();
            }
            Err(_) => {
                observe::upstream_request(route_key, base, "timeout");
                mark_down("timed out");
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    &format!("the upstream did not answer within the route's {timeout_ms} ms"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://u{i}")).collect()
    }

    #[test]
    fn round_robin_skips_down_upstreams_until_they_return() {
        let mut h = Health::default();
        let u = urls(3);
        let t0 = Instant::now();
        let picks: Vec<_> = (0..6)
            .filter_map(|_| h.pick("r", &u, &[], false, t0))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert!(h.mark_down("r", &u[1], Duration::from_secs(10), t0));
        assert!(
            !h.mark_down("r", &u[1], Duration::from_secs(10), t0),
            "already down"
        );
        let picks: Vec<_> = (0..4)
            .filter_map(|_| h.pick("r", &u, &[], false, t0))
            .collect();
        assert!(!picks.contains(&1), "{picks:?}");
        // Another route's view of the same URL is its own.
        assert_eq!(h.pick("other", &u, &[], false, t0), Some(0));
        assert_eq!(h.pick("other", &u, &[], false, t0), Some(1));
        let later = t0 + Duration::from_secs(11);
        let picks: Vec<_> = (0..3)
            .filter_map(|_| h.pick("r", &u, &[], false, later))
            .collect();
        assert!(picks.contains(&1), "back after its down period: {picks:?}");
        assert!(
            h.mark_down("r", &u[1], Duration::from_secs(10), later),
            "was up again"
        );
        h.mark_up("r", &u[1]);
        assert!(h.mark_down("r", &u[1], Duration::from_secs(1), later));
    }

    #[test]
    fn all_down_fails_open_to_the_one_back_soonest() {
        let mut h = Health::default();
        let u = urls(3);
        let t0 = Instant::now();
        h.mark_down("r", &u[0], Duration::from_secs(30), t0);
        h.mark_down("r", &u[1], Duration::from_secs(5), t0);
        h.mark_down("r", &u[2], Duration::from_secs(20), t0);
        for _ in 0..3 {
            assert_eq!(h.pick("r", &u, &[], false, t0), Some(1));
        }
        assert_eq!(h.pick("r", &u, &[1], false, t0), Some(2));
        assert_eq!(
            h.pick("r", &u, &[], true, t0),
            None,
            "a retry wants a healthy one"
        );
        assert_eq!(h.pick("r", &u, &[0, 1, 2], false, t0), None);
        assert_eq!(h.pick("r", &[], &[], false, t0), None);
    }

    #[test]
    fn retry_excludes_what_was_tried() {
        let mut h = Health::default();
        let u = urls(2);
        let t0 = Instant::now();
        assert_eq!(h.pick("r", &u, &[], false, t0), Some(0));
        h.mark_down("r", &u[0], Duration::from_secs(10), t0);
        assert_eq!(h.pick("r", &u, &[0], true, t0), Some(1));
        h.mark_down("r", &u[1], Duration::from_secs(10), t0);
        assert_eq!(h.pick("r", &u, &[0], true, t0), None);
    }

    #[test]
    fn forwarded_headers_drop_hops_and_credentials_and_say_where_from() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("host", "api.example.test"),
            ("x-api-key", "nmb_secret"),
            ("authorization", "Bearer nmb_secret"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-custom", "kept"),
            ("x-nimbus-request-id", "forged"),
            ("transfer_encoding", "chunked"),
            ("content_length", "5"),
            ("x_forwarded_for", "10.9.9.9"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let f = Forwarding {
            client_ip: "127.0.0.1",
            host: Some("api.example.test"),
            proto: "http",
            request_id: "rid",
        };
        let out = forward_headers(&h, true, &f);
        for gone in [
            "connection",
            "keep-alive",
            "x-hop",
            "te",
            "host",
            "x-api-key",
            "authorization",
            "transfer_encoding",
            "content_length",
            "x_forwarded_for",
        ] {
            assert!(!out.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(out["x-custom"], "kept");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "api.example.test");
        assert_eq!(
            out["forwarded"],
            "for=127.0.0.1;proto=http;host=\"api.example.test\""
        );
        assert_eq!(out["x-nimbus-request-id"], "rid");
        // Without an API key route, the caller's Authorization is theirs to relay.
        let out = forward_headers(
            &h,
            false,
            &Forwarding {
                client_ip: "::1",
                ..f
            },
        );
        assert!(out.contains_key("authorization"));
        assert!(
            out["forwarded"]
                .to_str()
                .unwrap_or("")
                .starts_with("for=\"[::1]\"")
        );
    }
}
