//! Per-route authentication and per-key rate limits.
//!
//! `api_key` routes take a key in `x-api-key` or `Authorization: Bearer`, check it
//! against the [`KeySet`] snapshot (a revocation reaches the gateway with the store's
//! next change notification, well within a second), then the key's scopes, then its
//! token bucket. Every refusal is the JSON error body with as little detail as
//! possible: an unknown, forged, malformed or expired key all read "invalid API key".

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderValue, StatusCode};
use nimbus_core::keys::{self, KeyRefusal, KeySet, Rate};

use crate::error_response;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Token buckets per key id. They outlive key-set snapshots (a snapshot is rebuilt on
/// every store change, a bucket must not refill because someone deployed), and are
/// replaced only when the key's rate changes.
#[derive(Default)]
pub struct KeyLimiters {
    buckets: Mutex<HashMap<String, (Rate, Arc<Limiter>)>>,
}

impl KeyLimiters {
    fn get(&self, id: &str, rate: Rate) -> Arc<Limiter> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((r, l)) = map.get(id)
            && *r == rate
        {
            return Arc::clone(l);
        }
        let l = Arc::new(RateLimiter::direct(quota(rate)).with_middleware());
        map.insert(id.to_string(), (rate, Arc::clone(&l)));
        l
    }
}

fn quota(rate: Rate) -> Quota {
    let one = NonZeroU32::MIN;
    let per_cell = rate.per.duration() / rate.requests.max(1);
    Quota::with_period(per_cell)
        .unwrap_or_else(|| Quota::per_second(one))
        .allow_burst(NonZeroU32::new(rate.burst).unwrap_or(one))
}

/// The caller a route let through: what the function learns about it.
pub struct Caller {
    pub key_id: String,
    pub key_name: String,
    /// `RateLimit-*` headers for the response, when the key is rate limited.
    pub rate_headers: Vec<(&'static str, HeaderValue)>,
}

/// The key presented on a request, if any.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key") {
        return v.to_str().ok().map(str::trim);
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(message: &str) -> Response {
    let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"nimbus\""),
    );
    r
}

/// Authenticates an `api_key` route's request for invoking `function`.
pub fn check_api_key(
    keys: &KeySet,
    limiters: &KeyLimiters,
    headers: &HeaderMap,
    function: &str,
    now_ms: i64,
) -> Result<Caller, Box<Response>> {
    let Some(presented) = presented_key(headers) else {
        return Err(Box::new(unauthorized("missing API key")));
    };
    let entry = match keys.authenticate(presented, now_ms) {
        Ok(e) => e,
        Err(why) => {
            let why = match why {
                KeyRefusal::Malformed => "malformed",
                KeyRefusal::Unknown => "unknown",
                KeyRefusal::Expired => "expired",
            };
            tracing::info!(reason = why, function, "API key refused");
            return Err(Box::new(unauthorized("invalid API key")));
        }
    };
    if !keys::allows(&entry.scopes, "invoke", function) {
        tracing::info!(key = %entry.name, function, "API key lacks the invoke scope");
        return Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this API key may not call this route",
        )));
    }
    let mut rate_headers = Vec::new();
    if let Some(rate) = entry.rate {
        let limiter = limiters.get(&entry.id, rate);
        let limit = HeaderValue::from(rate.burst);
        match limiter.check() {
            Ok(snapshot) => {
                rate_headers.push(("ratelimit-limit", limit));
                rate_headers.push((
                    "ratelimit-remaining",
                    HeaderValue::from(snapshot.remaining_burst_capacity()),
                ));
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut r = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "rate limit exceeded for this API key",
                );
                let h = r.headers_mut();
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                h.insert("ratelimit-limit", limit);
                h.insert("ratelimit-remaining", HeaderValue::from(0u32));
                h.insert("ratelimit-reset", HeaderValue::from(secs.max(1)));
                return Err(Box::new(r));
            }
        }
    }
    Ok(Caller {
        key_id: entry.id.clone(),
        key_name: entry.name.clone(),
        rate_headers,
    })
}

/// Headers that carry credentials: never passed on to the function.
pub fn is_credential_header(name: &str) -> bool {
    matches!(name, "x-api-key" | "authorization")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::keys::{KeyEntry, generate, parse_rate};

    fn set(scopes: &[&str], rate: Option<&str>) -> (KeySet, String) {
        let k = generate();
        let entry = KeyEntry {
            id: k.id.clone(),
            name: "ci".into(),
            hash: k.hash.to_vec(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            rate: rate.map(|r| parse_rate(r).expect("rate")),
            expires_at_ms: None,
        };
        (KeySet::new([entry]), k.key)
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            HeaderValue::from_str(value).expect("value"),
        );
        h
    }

    #[test]
    fn keys_in_either_header_pass_and_others_do_not() {
        let (keys, key) = set(&["invoke:hello"], None);
        let l = KeyLimiters::default();
        assert!(check_api_key(&keys, &l, &headers("x-api-key", &key), "hello", 0).is_ok());
        let bearer = headers("authorization", &format!("bearer {key}"));
        assert!(check_api_key(&keys, &l, &bearer, "hello", 0).is_ok());
        let status = |h: &HeaderMap, f: &str| {
            check_api_key(&keys, &l, h, f, 0)
                .err()
                .map(|r| r.status().as_u16())
        };
        assert_eq!(status(&HeaderMap::new(), "hello"), Some(401));
        assert_eq!(status(&headers("x-api-key", "nope"), "hello"), Some(401));
        assert_eq!(
            status(&headers("authorization", &format!("Basic {key}")), "hello"),
            Some(401)
        );
        assert_eq!(status(&headers("x-api-key", &key), "other"), Some(403));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_429_with_retry_after() {
        let (keys, key) = set(&["invoke:*"], Some("1/m:3"));
        let l = KeyLimiters::default();
        let h = headers("x-api-key", &key);
        for left in [2u32, 1, 0] {
            let c = check_api_key(&keys, &l, &h, "f", 0)
                .map_err(|r| r.status())
                .expect("ok");
            let remaining = c
                .rate_headers
                .iter()
                .find(|(n, _)| *n == "ratelimit-remaining");
            assert_eq!(
                remaining.map(|(_, v)| v.clone()),
                Some(HeaderValue::from(left))
            );
        }
        let r = check_api_key(&keys, &l, &h, "f", 0).err().expect("limited");
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("s")
            .parse()
            .expect("n");
        assert!((1..=60).contains(&retry), "{retry}");
    }
}
