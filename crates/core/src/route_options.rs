//! What a route may carry besides its target: CORS, rate limits, JWT scopes, a
//! timeout, and whether it is a WebSocket route. Parsed from a manifest's `[[http]]`
//! and `[[websocket]]` tables, stored with the route, applied by the gateway.

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
    /// A `[[websocket]]` route: `GET` with `Upgrade: websocket` opens a connection
    /// whose `$connect`, messages and `$disconnect` reach the function. Stored as an
    /// ordinary route so conflicts are checked like any other and the store needs no
    /// new table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub websocket: bool,
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
