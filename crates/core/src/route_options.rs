//! What a route may carry besides its target: CORS, rate limits, JWT scopes, a
//! timeout, a custom authorizer, header rewrites, transform functions, upstream health
//! settings, and whether it is a WebSocket route. Parsed from a manifest's `[[http]]`
//! and `[[websocket]]` tables, stored with the route, applied by the gateway.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::{Rate, parse_rate};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// One bucket for every caller of the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// One bucket per client IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_ip: Option<Rate>,
    /// OAuth scopes a JWT must carry for `auth = "jwt"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// How long the gateway waits for the function (at most the function's timeout;
    /// the function itself runs on to its own deadline, as behind API Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `auth = "authorizer"`: the function that decides, and how its answers are cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorizer: Option<Authorizer>,
    /// Headers set or removed on the request before the target sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRewrite>,
    /// Headers set or removed on every answer of the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRewrite>,
    /// A function given the request (payload 2.0) that returns it changed, or answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform_request: Option<String>,
    /// A function given the request and the response that returns the response changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform_response: Option<String>,
    /// How long an upstream that failed is skipped (default
    /// [`DEFAULT_UPSTREAM_DOWN_FOR_MS`]); upstream routes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_down_for_ms: Option<u64>,
    /// A `[[websocket]]` route: `GET` with `Upgrade: websocket` opens a connection
    /// whose `$connect`, messages and `$disconnect` reach the function. Stored as an
    /// ordinary route so conflicts are checked like any other and the store needs no
    /// new table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub websocket: bool,
}

/// A Lambda authorizer (API Gateway HTTP API, payload 2.0, simple responses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorizer {
    pub function: String,
    /// How long an answer is reused for the same identity; 0 asks every time.
    pub ttl_ms: u64,
    /// Where the identity is read; a request missing any of them is refused with 401
    /// without calling the authorizer (as API Gateway does).
    pub identity_source: Vec<IdentitySource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// A request header, by lower-case name.
    Header(String),
    /// A query-string parameter.
    Query(String),
}

impl IdentitySource {
    /// `$request.header.Authorization`, `$request.querystring.token`.
    pub fn parse(text: &str) -> Result<IdentitySource, String> {
        let bad = || format!("`{text}` is not $request.header.NAME or $request.querystring.NAME");
        if let Some(h) = text.strip_prefix("$request.header.") {
            if !is_token(h) {
                return Err(bad());
            }
            return Ok(IdentitySource::Header(h.to_ascii_lowercase()));
        }
        if let Some(q) = text.strip_prefix("$request.querystring.") {
            if q.is_empty() || q.len() > 256 {
                return Err(bad());
            }
            return Ok(IdentitySource::Query(q.to_string()));
        }
        Err(bad())
    }
}

impl std::fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentitySource::Header(h) => write!(f, "$request.header.{h}"),
            IdentitySource::Query(q) => write!(f, "$request.querystring.{q}"),
        }
    }
}

/// Headers to set (replacing any sent) and to remove, by lower-case name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRewrite {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A `request_headers` / `response_headers` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaderRewrite {
    set: Option<BTreeMap<String, String>>,
    remove: Option<Vec<String>>,
}

/// Headers a rewrite may not touch: they frame the message or name the hop, and
/// changing them would let a route smuggle requests or break the connection.
const FIXED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// Validates a header rewrite table; errors are `(subfield, message)`.
pub(crate) fn parse_rewrite(raw: RawHeaderRewrite) -> Result<HeaderRewrite, (String, String)> {
    let mut out = HeaderRewrite::default();
    let name_ok = |field: &str, n: &str| -> Result<String, (String, String)> {
        let lower = n.to_ascii_lowercase();
        if !is_token(n) || n.len() > 256 {
            return Err((field.into(), format!("`{n}` is not a header name")));
        }
        if FIXED_HEADERS.contains(&lower.as_str()) {
            return Err((
                field.into(),
                format!("`{n}` frames the message and cannot be rewritten"),
            ));
        }
        Ok(lower)
    };
    for (n, v) in raw.set.unwrap_or_default() {
        let name = name_ok("set", &n)?;
        if v.len() > 8192 || v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err((
                "set".into(),
                format!("the value of `{n}` is not a header value"),
            ));
        }
        out.set.insert(name, v);
    }
    for n in raw.remove.unwrap_or_default() {
        out.remove.push(name_ok("remove", &n)?);
    }
    if out.set.len() + out.remove.len() > 64 {
        return Err(("set".into(), "at most 64 headers per rewrite".into()));
    }
    Ok(out)
}

/// How long an upstream that failed (connect error, timeout, 502/503/504) is skipped.
pub const DEFAULT_UPSTREAM_DOWN_FOR_MS: u64 = 10_000;
/// How long the gateway waits for an upstream's answer when the route names no timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 30_000;
/// At most this many upstreams per route.
pub const MAX_UPSTREAMS: usize = 32;

/// Validates a route's upstream list (non-empty, each URL valid, no duplicates),
/// normalized.
pub fn parse_upstreams(urls: &[String]) -> Result<Vec<String>, String> {
    if urls.is_empty() {
        return Err("give at least one URL (e.g. [\"http://127.0.0.1:9001\"])".into());
    }
    if urls.len() > MAX_UPSTREAMS {
        return Err(format!("at most {MAX_UPSTREAMS} upstreams per route"));
    }
    let mut out: Vec<String> = Vec::with_capacity(urls.len());
    for u in urls {
        let v = crate::routes::validate_upstream_url(u)?;
        if out.contains(&v) {
            return Err(format!("`{u}` is listed twice"));
        }
        out.push(v);
    }
    Ok(out)
}

/// `upstream_down_for`: a duration between 100 ms and 1 h.
pub fn parse_down_for(text: &str) -> Result<u64, String> {
    let ms = crate::duration::parse_duration(text)?.as_millis() as u64;
    if !(100..=3_600_000).contains(&ms) {
        return Err(format!("`{text}` is outside the allowed range 100ms..1h"));
    }
    Ok(ms)
}

impl RouteOptions {
    pub fn is_empty(&self) -> bool {
        self == &RouteOptions::default()
    }
}

/// Cross-origin rules of a route; the gateway answers preflights itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cors {
    /// `https://app.example.com` (scheme, host, optional port) or `*`.
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    /// Request headers a caller may send; `*` allows any.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub credentials: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
}

impl Cors {
    /// Whether `origin` (the `Origin` header, verbatim) may call.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    pub fn allows_method(&self, method: &str) -> bool {
        self.methods
            .iter()
            .any(|m| m == "*" || m.eq_ignore_ascii_case(method))
    }

    /// Whether every header of an `Access-Control-Request-Headers` list is allowed.
    pub fn allows_headers(&self, requested: &str) -> bool {
        if self.headers.iter().any(|h| h == "*") {
            return true;
        }
        requested
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .all(|h| self.headers.iter().any(|a| a.eq_ignore_ascii_case(h)))
    }
}

/// The `cors` table of a manifest route, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCors {
    origins: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    headers: Option<Vec<String>>,
    expose_headers: Option<Vec<String>>,
    credentials: Option<bool>,
    max_age: Option<toml::Value>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

/// Validates a manifest `cors` table; errors are `(subfield, message)`.
pub(crate) fn parse_cors(raw: RawCors) -> Result<Cors, (String, String)> {
    let origins = raw.origins.unwrap_or_default();
    if origins.is_empty() {
        return Err((
            "origins".into(),
            "give at least one origin (e.g. [\"https://app.example.com\"] or [\"*\"])".into(),
        ));
    }
    if let Some(bad) = origins.iter().find(|o| !valid_origin(o)) {
        return Err((
            "origins".into(),
            format!("`{bad}` is not an origin: scheme://host[:port] without a path, or *"),
        ));
    }
    let credentials = raw.credentials.unwrap_or(false);
    if credentials && origins.iter().any(|o| o == "*") {
        return Err((
            "credentials".into(),
            "cannot be true with origin *: browsers refuse credentials for any origin".into(),
        ));
    }
    let methods: Vec<String> = raw
        .methods
        .unwrap_or_else(|| vec!["GET".into(), "HEAD".into(), "POST".into()])
        .into_iter()
        .map(|m| m.to_ascii_uppercase())
        .collect();
    if let Some(bad) = methods.iter().find(|m| *m != "*" && !is_token(m)) {
        return Err(("methods".into(), format!("`{bad}` is not a method")));
    }
    let headers = raw.headers.unwrap_or_default();
    let expose_headers = raw.expose_headers.unwrap_or_default();
    for (name, list) in [("headers", &headers), ("expose_headers", &expose_headers)] {
        if let Some(bad) = list.iter().find(|h| *h != "*" && !is_token(h)) {
            return Err((name.into(), format!("`{bad}` is not a header name")));
        }
    }
    let max_age_s = match raw.max_age {
        None => None,
        Some(toml::Value::Integer(i)) if i >= 0 => Some(i as u64),
        Some(toml::Value::String(s)) => Some(
            crate::duration::parse_duration(&s)
                .map_err(|m| ("max_age".to_string(), m))?
                .as_secs(),
        ),
        Some(_) => {
            return Err((
                "max_age".into(),
                "must be seconds or a duration such as \"10m\"".into(),
            ));
        }
    };
    Ok(Cors {
        origins,
        methods,
        headers,
        expose_headers,
        credentials,
        max_age_s,
    })
}

/// Longest an authorizer's answer may be cached: an hour, as API Gateway allows.
pub const MAX_AUTHORIZER_TTL_MS: u64 = 3_600_000;
/// API Gateway's default for Lambda authorizers.
pub const DEFAULT_AUTHORIZER_TTL_MS: u64 = 300_000;

pub(crate) fn parse_route_rate(text: Option<String>) -> Result<Option<Rate>, String> {
    text.as_deref().map(parse_rate).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(origins: &[&str], credentials: bool) -> RawCors {
        RawCors {
            origins: Some(origins.iter().map(|s| s.to_string()).collect()),
            methods: Some(vec!["get".into(), "POST".into()]),
            headers: Some(vec!["Content-Type".into(), "x-api-key".into()]),
            expose_headers: None,
            credentials: Some(credentials),
            max_age: Some(toml::Value::String("10m".into())),
        }
    }

    #[test]
    fn cors_rules_parse_and_match() {
        let c = parse_cors(raw(&["https://app.example.com"], true)).expect("cors");
        assert_eq!(c.methods, vec!["GET", "POST"]);
        assert_eq!(c.max_age_s, Some(600));
        assert!(c.allows_origin("https://app.example.com"));
        assert!(!c.allows_origin("https://evil.example.com"));
        assert!(!c.allows_origin("https://app.example.com.evil.net"));
        assert!(c.allows_method("post"));
        assert!(!c.allows_method("DELETE"));
        assert!(c.allows_headers("content-type, X-API-Key"));
        assert!(!c.allows_headers("content-type, x-other"));
        assert!(c.allows_headers(""));
    }

    #[test]
    fn identity_sources_and_rewrites_parse_or_name_the_field() {
        assert_eq!(
            IdentitySource::parse("$request.header.Authorization"),
            Ok(IdentitySource::Header("authorization".into()))
        );
        assert_eq!(
            IdentitySource::parse("$request.querystring.token"),
            Ok(IdentitySource::Query("token".into()))
        );
        for bad in [
            "Authorization",
            "$request.header.",
            "$request.header.a b",
            "$context.x",
        ] {
            assert!(IdentitySource::parse(bad).is_err(), "{bad}");
        }
        let rw = |set: &[(&str, &str)], remove: &[&str]| {
            parse_rewrite(RawHeaderRewrite {
                set: Some(
                    set.iter()
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .collect(),
                ),
                remove: Some(remove.iter().map(|s| s.to_string()).collect()),
            })
        };
        let ok = rw(&[("X-Tenant", "acme")], &["Cookie"]).expect("ok");
        assert_eq!(ok.set["x-tenant"], "acme");
        assert_eq!(ok.remove, vec!["cookie"]);
        let field = |r: Result<HeaderRewrite, (String, String)>| r.err().map(|(f, _)| f);
        assert_eq!(field(rw(&[("bad name", "v")], &[])).as_deref(), Some("set"));
        assert_eq!(field(rw(&[("x", "a\nb")], &[])).as_deref(), Some("set"));
        assert_eq!(
            field(rw(&[("Content-Length", "1")], &[])).as_deref(),
            Some("set")
        );
        assert_eq!(
            field(rw(&[], &["transfer-encoding"])).as_deref(),
            Some("remove")
        );
    }

    #[test]
    fn bad_cors_tables_name_the_field() {
        let field = |r: RawCors| parse_cors(r).err().map(|(f, _)| f);
        assert_eq!(field(raw(&[], false)).as_deref(), Some("origins"));
        assert_eq!(
            field(raw(&["app.example.com"], false)).as_deref(),
            Some("origins")
        );
        assert_eq!(
            field(raw(&["https://a.com/path"], false)).as_deref(),
            Some("origins")
        );
        assert_eq!(field(raw(&["*"], true)).as_deref(), Some("credentials"));
        let mut r = raw(&["*"], false);
        r.headers = Some(vec!["bad header".into()]);
        assert_eq!(field(r).as_deref(), Some("headers"));
    }
}
