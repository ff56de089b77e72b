//! Per-route authentication and per-key rate limits.
//!
//! `api_key` routes take a key in `x-api-key` or `Authorization: Bearer`, check it
//! against the [`KeySet`] snapshot (a revocation reaches the gateway with the store's
//! next change notification, well within a second), then the key's scopes, then its
//! token bucket. Every refusal is the JSON error body with as little detail as
//! possible: an unknown, forged, malformed or expired key all read "invalid API key".

use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode};
use nimbus_core::body::{AuthOutcome, AuthThrottled};
use nimbus_core::keys::{self, KeyRefusal, KeySet};

use crate::error_response;
use crate::limits::{Buckets, RateHeaders};
use crate::quota::Quotas;

/// Per-key token buckets.
pub type KeyLimiters = Buckets;

/// The caller a route let through: what the function learns about it.
pub struct Caller {
    pub key_id: String,
    pub key_name: String,
    /// `RateLimit-*` headers for the response, when the key is rate limited.
    pub rate_headers: RateHeaders,
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

/// 401 with the JSON error body and a Bearer challenge, for every credential refusal;
/// marked for the listener, which counts them per client address.
pub(crate) fn unauthorized(message: &str) -> Response {
    let mut r = failed(error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        message,
    ));
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"nimbus\""),
    );
    r
}

/// Marks a refusal as a failed authentication (a wrong or missing credential, an
/// authorizer's denial) for the listener's count.
pub(crate) fn failed(mut r: Response) -> Response {
    r.extensions_mut().insert(AuthOutcome::Failed);
    r
}

/// 429 for a client the listener throttled after too many failed authentications,
/// answered before any credential is looked at: a guess, right or wrong, teaches the
/// guesser nothing until `Retry-After` has passed.
pub fn check_throttle(ext: &http::Extensions) -> Result<(), Box<Response>> {
    let Some(t) = ext.get::<AuthThrottled>() else {
        return Ok(());
    };
    let mut r = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_auth_failures",
        "too many failed authentications from this address; retry later",
    );
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(t.retry_after_secs()),
    );
    r.extensions_mut().insert(AuthOutcome::Throttled);
    Err(Box::new(r))
}

/// Authenticates an `api_key` route's request for invoking `function`.
pub fn check_api_key(
    keys: &KeySet,
    limiters: &KeyLimiters,
    quotas: &Quotas,
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
            tracing::info!(reason = refusal(why), function, "API key refused");
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
    let rate_headers = spend(limiters, quotas, entry, now_ms)?;
    Ok(Caller {
        key_id: entry.id.clone(),
        key_name: entry.name.clone(),
        rate_headers,
    })
}

fn refusal(why: KeyRefusal) -> &'static str {
    match why {
        KeyRefusal::Malformed => "malformed",
        KeyRefusal::Unknown => "unknown",
        KeyRefusal::Expired => "expired",
    }
}

/// Takes a token from the key's bucket, then counts the request against its quota;
/// Ok holds the `RateLimit-*` headers of whichever limit is nearer to refusing.
fn spend(
    limiters: &KeyLimiters,
    quotas: &Quotas,
    entry: &keys::KeyEntry,
    now_ms: i64,
) -> Result<RateHeaders, Box<Response>> {
    let mut rate_headers = match entry.rate {
        Some(rate) => limiters.take(&format!("key:{}", entry.id), rate, "API key")?,
        None => Vec::new(),
    };
    // The quota after the bucket: a request the rate limit refuses spends no quota.
    if let Some(quota) = entry.quota {
        let quota_headers = quotas.take(&entry.id, quota, now_ms)?;
        if rate_headers.is_empty() || remaining(&quota_headers) < remaining(&rate_headers) {
            rate_headers = quota_headers;
        }
    }
    Ok(rate_headers)
}

fn remaining(h: &RateHeaders) -> u64 {
    h.iter()
        .find(|(n, _)| *n == "ratelimit-remaining")
        .and_then(|(_, v)| v.to_str().ok()?.parse().ok())
        .unwrap_or(u64::MAX)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Who may use the gateway's share of the platform API (`/v1/connections`,
/// `/v1/topics/{t}/events`): the admin token (Bearer; only where `serve` gave the
/// gateway its digest), or an API key whose scopes grant `action` on `resource`,
/// subject to the key's rate limit. The refusal is the finished response.
pub fn platform_caller(
    st: &crate::GatewayState,
    parts: &http::request::Parts,
    action: &str,
    resource: &str,
) -> Result<(), Box<Response>> {
    check_throttle(&parts.extensions)?;
    let headers = &parts.headers;
    let token = bearer(headers);
    if let (Some(t), Some(digest)) = (token, st.admin_token_sha256.as_ref())
        && keys::verify(t, digest)
    {
        return Ok(());
    }
    let presented = match headers.get("x-api-key") {
        Some(v) => v.to_str().ok().map(str::trim),
        None => token,
    };
    let Some(presented) = presented else {
        return Err(Box::new(unauthorized(&format!(
            "missing credentials: the admin token or an API key with the {action} scope"
        ))));
    };
    let set = st.keys.borrow().clone();
    let entry = match set.authenticate(presented, nimbus_core::now_ms()) {
        Ok(e) => e,
        Err(why) => {
            tracing::info!(
                reason = refusal(why),
                action,
                "platform API: credentials refused"
            );
            return Err(Box::new(unauthorized("invalid credentials")));
        }
    };
    if !keys::allows(&entry.scopes, action, resource) {
        tracing::info!(key = %entry.name, action, resource, "API key lacks the scope");
        return Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            &if resource.is_empty() {
                format!("this API key lacks the {action} scope")
            } else {
                format!("this API key lacks the {action}:{resource} scope")
            },
        )));
    }
    spend(&st.limiters, &st.quotas, entry, nimbus_core::now_ms()).map(|_| ())
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
            quota: None,
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
        assert!(
            check_api_key(
                &keys,
                &l,
                &Quotas::default(),
                &headers("x-api-key", &key),
                "hello",
                0
            )
            .is_ok()
        );
        let bearer = headers("authorization", &format!("bearer {key}"));
        assert!(check_api_key(&keys, &l, &Quotas::default(), &bearer, "hello", 0).is_ok());
        let status = |h: &HeaderMap, f: &str| {
            check_api_key(&keys, &l, &Quotas::default(), h, f, 0)
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
            let c = check_api_key(&keys, &l, &Quotas::default(), &h, "f", 0)
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
        let r = check_api_key(&keys, &l, &Quotas::default(), &h, "f", 0)
            .err()
            .expect("limited");
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("s")
            .parse()
            .expect("n");
        assert!((1..=60).contains(&retry), "{retry}");
    }

    #[test]
    fn a_throttled_client_is_refused_unchecked_and_failures_are_marked() {
        let mut ext = http::Extensions::new();
        assert!(check_throttle(&ext).is_ok());
        ext.insert(AuthThrottled {
            retry_after: std::time::Duration::from_millis(2500),
        });
        let r = check_throttle(&ext).expect_err("throttled");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.extensions().get(), Some(&AuthOutcome::Throttled));
        let (keys, _) = set(&["invoke:*"], None);
        let r = check_api_key(
            &keys,
            &KeyLimiters::default(),
            &Quotas::default(),
            &headers("x-api-key", "nmb_guess"),
            "f",
            0,
        )
        .err()
        .expect("refused");
        assert_eq!(r.extensions().get(), Some(&AuthOutcome::Failed));
    }
}
