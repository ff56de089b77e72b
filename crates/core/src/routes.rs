//! Route paths (`/hello/{name}`, `/files/{proxy+}`) and the table that matches requests.
//!
//! The same table serves the gateway (matching) and the control plane (rejecting a
//! conflicting route at deploy), so a deploy can never install a route the gateway
//! would silently refuse.

use std::collections::BTreeMap;

/// Paths the platform keeps for itself; routes may not shadow them.
pub const RESERVED_PREFIXES: &[&str] = &["/v1", "/metrics", "/health", "/2015-03-31"];

/// Checks a route path: `/`-separated segments of literals, `{param}`, or a final
/// greedy `{param+}`; no empty, `.` or `..` segments.
pub fn validate_route_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{path}` must start with `/`"));
    }
    if path.len() > 1024 {
        return Err("is longer than 1024 characters".into());
    }
    for reserved in RESERVED_PREFIXES {
        if path == *reserved || path.starts_with(&format!("{reserved}/")) {
            return Err(format!(
                "`{path}` is reserved for the platform ({reserved})"
            ));
        }
    }
    if path == "/" {
        return Ok(());
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let mut names = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if seg.is_empty() {
            if last {
                return Err(format!("`{path}` must not end with `/`"));
            }
            return Err(format!("`{path}` has an empty segment (`//`)"));
        }
        if *seg == "." || *seg == ".." {
            return Err(format!("`{path}` has a `{seg}` segment"));
        }
        if let Some(inner) = seg.strip_prefix('{') {
            let Some(inner) = inner.strip_suffix('}') else {
                return Err(format!("`{path}`: segment `{seg}` has an unclosed `{{`"));
            };
            let (name, greedy) = match inner.strip_suffix('+') {
                Some(n) => (n, true),
                None => (inner, false),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`{path}`: parameter `{seg}` must be `{{name}}` or `{{name+}}` with a-z, 0-9, `_`"
                ));
            }
            if greedy && !last {
                return Err(format!("`{path}`: greedy `{seg}` must be the last segment"));
            }
            if names.contains(&name) {
                return Err(format!("`{path}`: parameter `{name}` appears twice"));
            }
            names.push(name);
        } else if !seg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~!$&'()*,;=:@".contains(c))
        {
            return Err(format!(
                "`{path}`: segment `{seg}` may only hold letters, digits and -._~!$&'()*,;=:@"
            ));
        }
    }
    Ok(())
}

/// The shape of a path with parameter names erased: `/a/{x}` and `/a/{y}` are the
/// same route, and so would be ambiguous.
fn shape(path: &str) -> String {
    path.split('/')
        .map(|s| {
            if s.ends_with("+}") {
                "{+}"
            } else if s.starts_with('{') {
                "{}"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

pub fn same_shape(a: &str, b: &str) -> bool {
    shape(a) == shape(b)
}

/// Our path syntax to matchit's (`{proxy+}` -> `{*proxy}`).
fn to_matchit(path: &str) -> String {
    path.split('/')
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix("+}")) {
                Some(name) => format!("{{*{name}}}"),
                None => s.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks a route's host: a DNS name (`api.example.com`) or a wildcard over its
/// subdomains (`*.example.com`), lower-case, without a port. Returns it lower-cased.
pub fn validate_host(host: &str) -> Result<String, String> {
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    if !is_dns_name(name) {
        return Err(format!(
            "`{host}` is not a host name: labels of a-z, 0-9 and `-` joined by `.` (e.g. api.example.com), optionally starting with `*.`, without a port"
        ));
    }
    if lower.starts_with("*.") && !name.contains('.') {
        return Err(format!(
            "`{host}`: a wildcard must be the first label of a name with at least two labels (e.g. *.example.com)"
        ));
    }
    Ok(lower)
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Checks an upstream URL: `http://host[:port][/base/path]`, no userinfo, query or
/// fragment. Returns it with a trailing `/` of the base path removed, so the request
/// path can be appended as is.
pub fn validate_upstream_url(url: &str) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "`{url}` must start with http:// (https upstreams are not supported yet)"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(format!("`{url}` must not carry a user or password"));
    }
    if path.contains(['?', '#']) || authority.contains(['?', '#']) {
        return Err(format!("`{url}` must not have a query or fragment"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(format!("`{url}`: unclosed `[` in the host"));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{url}`: `{addr}` is not an IPv6 address"));
        }
        match after {
            "" => (addr, None),
            p => match p.strip_prefix(':') {
                Some(p) => (addr, Some(p)),
                None => return Err(format!("`{url}`: junk after the IPv6 address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !authority.starts_with('[') && !is_dns_name(&host.to_ascii_lowercase()) {
        return Err(format!("`{url}`: `{host}` is not a host name or address"));
    }
    if let Some(p) = port
        && !matches!(p.parse::<u16>(), Ok(1..))
    {
        return Err(format!("`{url}`: port `{p}` is not 1..65535"));
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@%".contains(&b))
    {
        return Err(format!(
            "`{url}`: the base path has characters a URL may not hold"
        ));
    }
    if path.contains("//") || path.split('/').any(|s| s == "." || s == "..") {
        return Err(format!(
            "`{url}`: the base path has an empty, `.` or `..` segment"
        ));
    }
    Ok(format!("http://{authority}{}", path.trim_end_matches('/')))
}

/// The host a request asked for (`Host`, or HTTP/2's `:authority`): lower-cased and
/// without its port; `None` when absent or not a plausible name.
pub fn request_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        // IPv6 literals never match a route host (those are names); keep them whole.
        &raw[..raw.find(']').map_or(raw.len(), |i| i + 1)]
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// One installed route: what it matches and what it points at (a function's alias, or
/// upstream HTTP services).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteEntry {
    pub method: String,
    pub path: String,
    /// The function that owns the route: its target, or for an upstream route from a
    /// manifest its owner (replaced on the next deploy). Empty for a route added with
    /// `route add --upstream`.
    #[serde(default)]
    pub function: String,
    #[serde(default)]
    pub alias: String,
    /// Only requests for this host (`api.example.com`, `*.example.com`); empty: any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Upstream base URLs; when there are any, the gateway proxies to them instead of
    /// invoking the function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<String>,
    #[serde(default)]
    pub auth: crate::AuthKind,
    #[serde(
        default,
        skip_serializing_if = "crate::route_options::RouteOptions::is_empty"
    )]
    pub options: crate::route_options::RouteOptions,
}

impl RouteEntry {
    /// `GET /x`, or `GET api.example.com/x` for a host route: metric labels, bucket
    /// names and conflict messages.
    pub fn route_key(&self) -> String {
        if self.host.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            format!("{} {}{}", self.method, self.host, self.path)
        }
    }

    /// What the route reaches, for people: `function:alias` or the upstream list.
    pub fn target(&self) -> String {
        if self.upstream.is_empty() {
            format!("{}:{}", self.function, self.alias)
        } else {
            self.upstream.join(", ")
        }
    }

    /// Who a conflict message names: the function, or the upstreams of a route no
    /// function owns.
    fn owner(&self) -> String {
        if self.function.is_empty() {
            format!("upstream {}", self.upstream.join(", "))
        } else {
            format!("function `{}`", self.function)
        }
    }
}

/// A route conflict, naming both routes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route `{new}` of {} conflicts with `{existing}` of {}", owners.0, owners.1)]
pub struct RouteConflict {
    pub new: String,
    /// Empty for a route no function owns.
    pub new_function: String,
    pub existing: String,
    pub existing_function: String,
    /// For people, the new route's then the existing one's: ``function `f` `` or
    /// `upstream http://...` (boxed: the error travels in every `Result` of a build).
    pub owners: Box<(String, String)>,
}

/// A matched route with its decoded path parameters.
#[derive(Debug)]
pub struct RouteMatch<'a> {
    pub entry: &'a RouteEntry,
    pub params: BTreeMap<String, String>,
}

/// Immutable route table; rebuilt whenever routes change and swapped in whole.
#[derive(Default)]
pub struct RouteTable {
    entries: Vec<RouteEntry>,
    /// Route host (`""` for any, `*.example.com` for a wildcard) -> method -> paths.
    by_host: BTreeMap<String, BTreeMap<String, matchit::Router<usize>>>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("entries", &self.entries)
            .finish()
    }
}

impl RouteTable {
    /// Builds a table, refusing any route that overlaps one already in it.
    pub fn build(entries: Vec<RouteEntry>) -> Result<RouteTable, RouteConflict> {
        let mut table = RouteTable::default();
        for entry in entries {
            table.insert(entry)?;
        }
        Ok(table)
    }

    fn insert(&mut self, entry: RouteEntry) -> Result<(), RouteConflict> {
        let conflict = |existing: &RouteEntry| RouteConflict {
            new: entry.route_key(),
            new_function: entry.function.clone(),
            existing: existing.route_key(),
            existing_function: existing.function.clone(),
            owners: Box::new((entry.owner(), existing.owner())),
        };
        // The same path on different hosts is two routes; on one host, one too many.
        let peers = |e: &&RouteEntry| e.method == entry.method && e.host == entry.host;
        if let Some(existing) = self
            .entries
            .iter()
            .filter(peers)
            .find(|e| same_shape(&e.path, &entry.path))
        {
            return Err(conflict(existing));
        }
        let router = self
            .by_host
            .entry(entry.host.clone())
            .or_default()
            .entry(entry.method.clone())
            .or_default();
        let idx = self.entries.len();
        if let Err(e) = router.insert(to_matchit(&entry.path), idx) {
            // matchit refuses e.g. `/a/{x}` next to `/a/{y}/b`; find which route it meant.
            let existing = match &e {
                matchit::InsertError::Conflict { with } => self
                    .entries
                    .iter()
                    .filter(peers)
                    .find(|r| to_matchit(&r.path) == *with),
                _ => None,
            };
            return Err(match existing {
                Some(ex) => conflict(ex),
                None => RouteConflict {
                    new: entry.route_key(),
                    new_function: entry.function.clone(),
                    existing: e.to_string(),
                    existing_function: String::new(),
                    owners: Box::new((entry.owner(), "another route".into())),
                },
            });
        }
        self.entries.push(entry);
        Ok(())
    }

    pub fn entries(&self) -> &[RouteEntry] {
        &self.entries
    }

    /// Matches a raw (still percent-encoded) path requested of `host` (as
    /// [`request_host`] gives it). The most specific host that has a matching path
    /// wins: the exact host, then wildcards from the longest suffix, then host-less
    /// routes. Within one host a method-specific route wins over `ANY`.
    pub fn lookup(
        &self,
        method: &str,
        host: Option<&str>,
        raw_path: &str,
    ) -> Option<RouteMatch<'_>> {
        let mut candidates: Vec<String> = Vec::new();
        if let Some(h) = host.filter(|h| !h.is_empty()) {
            candidates.push(h.to_string());
            let mut rest = h;
            while let Some((_, parent)) = rest.split_once('.') {
                if parent.contains('.') {
                    candidates.push(format!("*.{parent}"));
                }
                rest = parent;
            }
        }
        candidates.push(String::new());
        for h in &candidates {
            let Some(methods) = self.by_host.get(h) else {
                continue;
            };
            for m in [method, "ANY"] {
                let Some(router) = methods.get(m) else {
                    continue;
                };
                if let Ok(found) = router.at(raw_path) {
                    let entry = &self.entries[*found.value];
                    let params = found
                        .params
                        .iter()
                        .map(|(k, v)| (k.to_string(), percent_decode(v)))
                        .collect();
                    return Some(RouteMatch { entry, params });
                }
            }
        }
        None
    }
}

/// Decodes `%XX` escapes; invalid escapes and non-UTF-8 results are kept as written.
/// Whether a body of this content type travels as text in Lambda's events and proxy
/// responses (API Gateway's rule); anything else is base64. An empty type counts as text.
pub fn is_textual(content_type: &str) -> bool {
    let ct = content_type.to_ascii_lowercase();
    ct.is_empty()
        || ct.starts_with("text/")
        || ct.contains("json")
        || ct.contains("xml")
        || ct.contains("javascript")
        || ct.starts_with("application/x-www-form-urlencoded")
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(method: &str, path: &str, function: &str) -> RouteEntry {
        RouteEntry {
            method: method.into(),
            path: path.into(),
            function: function.into(),
            alias: "live".into(),
            host: String::new(),
            upstream: Vec::new(),
            auth: crate::AuthKind::None,
            options: Default::default(),
        }
    }

    fn on_host(host: &str, method: &str, path: &str, function: &str) -> RouteEntry {
        RouteEntry {
            host: host.into(),
            ..entry(method, path, function)
        }
    }

    #[test]
    fn validates_paths() {
        for ok in [
            "/",
            "/hello",
            "/hello/{name}",
            "/files/{proxy+}",
            "/a-b/c.d/{x_1}",
        ] {
            assert_eq!(validate_route_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "hello",
            "/a//b",
            "/a/",
            "/a/../b",
            "/a/{",
            "/a/{}",
            "/a/{x+}/b",
            "/a/{x}/{x}",
            "/v1/functions",
            "/v1",
            "/metrics",
            "/a b",
            "/a/%2e",
        ] {
            assert!(validate_route_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matches_params_and_greedy_tail() {
        let t = RouteTable::build(vec![
            entry("GET", "/hello/{name}", "hello"),
            entry("ANY", "/files/{proxy+}", "files"),
            entry("GET", "/", "root"),
        ])
        .expect("no conflict");
        let m = t.lookup("GET", None, "/hello/ada%20l").expect("match");
        assert_eq!(m.entry.function, "hello");
        assert_eq!(m.params["name"], "ada l");
        let m = t.lookup("DELETE", None, "/files/a/b/c.txt").expect("match");
        assert_eq!(m.params["proxy"], "a/b/c.txt");
        assert!(t.lookup("POST", None, "/hello/ada").is_none());
        assert!(t.lookup("GET", None, "/hello/ada/extra").is_none());
        assert!(t.lookup("GET", None, "/").is_some());
    }

    #[test]
    fn encoded_slash_stays_inside_one_segment() {
        let t = RouteTable::build(vec![entry("GET", "/a/{x}", "f")]).expect("ok");
        let m = t.lookup("GET", None, "/a/b%2Fc").expect("match");
        assert_eq!(m.params["x"], "b/c");
        assert!(t.lookup("GET", None, "/a/b/c").is_none());
    }

    #[test]
    fn conflicts_name_both_routes() {
        let err = RouteTable::build(vec![
            entry("GET", "/hello/{name}", "a"),
            entry("GET", "/hello/{who}", "b"),
        ])
        .expect_err("conflict");
        let msg = err.to_string();
        assert!(
            msg.contains("GET /hello/{who}") && msg.contains("GET /hello/{name}"),
            "{msg}"
        );
        assert!(msg.contains("`a`") && msg.contains("`b`"), "{msg}");
        // Different methods on one path are fine.
        assert!(RouteTable::build(vec![entry("GET", "/x", "a"), entry("POST", "/x", "b")]).is_ok());
    }

    #[test]
    fn hosts_pick_the_most_specific_route() {
        let t = RouteTable::build(vec![
            entry("GET", "/x", "any"),
            on_host("a.example.test", "GET", "/x", "exact"),
            on_host("*.example.test", "GET", "/x", "wild"),
            on_host("*.deep.example.test", "ANY", "/x", "deeper"),
            on_host("only.example.test", "GET", "/only", "only"),
        ])
        .expect("no conflict: same path on different hosts");
        let f = |host: Option<&str>, path: &str| {
            t.lookup("GET", host, path)
                .map(|m| m.entry.function.clone())
        };
        assert_eq!(f(Some("a.example.test"), "/x").as_deref(), Some("exact"));
        assert_eq!(f(Some("b.example.test"), "/x").as_deref(), Some("wild"));
        assert_eq!(f(Some("c.b.example.test"), "/x").as_deref(), Some("wild"));
        assert_eq!(
            f(Some("q.deep.example.test"), "/x").as_deref(),
            Some("deeper")
        );
        assert_eq!(f(Some("example.test"), "/x").as_deref(), Some("any"));
        assert_eq!(f(Some("other.test"), "/x").as_deref(), Some("any"));
        assert_eq!(f(None, "/x").as_deref(), Some("any"));
        assert_eq!(
            f(Some("only.example.test"), "/only").as_deref(),
            Some("only")
        );
        assert_eq!(f(Some("a.example.test"), "/only"), None);
        // A host route's path missing falls back to the host-less routes.
        assert_eq!(f(Some("only.example.test"), "/x").as_deref(), Some("wild"));
    }

    #[test]
    fn same_host_conflicts_name_both_routes() {
        let err = RouteTable::build(vec![
            on_host("a.example.test", "GET", "/x/{id}", "one"),
            on_host("a.example.test", "GET", "/x/{other}", "two"),
        ])
        .expect_err("conflict");
        let msg = err.to_string();
        assert!(
            msg.contains("GET a.example.test/x/{id}")
                && msg.contains("GET a.example.test/x/{other}"),
            "{msg}"
        );
        let upstream = RouteEntry {
            function: String::new(),
            alias: String::new(),
            upstream: vec!["http://127.0.0.1:9001".into()],
            ..entry("GET", "/y", "")
        };
        let err = RouteTable::build(vec![entry("GET", "/y", "f"), upstream]).expect_err("conflict");
        assert!(
            err.to_string().contains("upstream http://127.0.0.1:9001"),
            "{err}"
        );
    }

    #[test]
    fn hosts_are_validated_and_request_hosts_normalized() {
        assert_eq!(
            validate_host("API.Example.com").as_deref(),
            Ok("api.example.com")
        );
        assert_eq!(
            validate_host("*.example.com").as_deref(),
            Ok("*.example.com")
        );
        for bad in [
            "", "*", "*.com", "a.*.com", "a..b", "-a.b", "a.b:80", "a b", "a/b", "*.*.b.c",
        ] {
            assert!(validate_host(bad).is_err(), "{bad}");
        }
        assert_eq!(
            request_host("API.example.com:8080").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            request_host("a.example.com.").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(request_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(request_host(""), None);
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert_eq!(
            validate_upstream_url("http://127.0.0.1:9001").as_deref(),
            Ok("http://127.0.0.1:9001")
        );
        assert_eq!(
            validate_upstream_url("http://svc.internal/base/").as_deref(),
            Ok("http://svc.internal/base")
        );
        assert!(validate_upstream_url("http://[::1]:8080/x").is_ok());
        for bad in [
            "127.0.0.1:9001",
            "ftp://a",
            "https://a",
            "http://",
            "http://user:pw@a",
            "http://a?x=1",
            "http://a/b?x",
            "http://a#f",
            "http://a:0",
            "http://a:99999",
            "http://a:x",
            "http://a b",
            "http://a/../b",
            "http://a//b",
            "http://[::1",
            "http://[zz]",
        ] {
            assert!(validate_upstream_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn old_route_json_still_reads() {
        let e: RouteEntry = serde_json::from_str(
            r#"{"method":"GET","path":"/x","function":"f","alias":"live","auth":"none"}"#,
        )
        .expect("old shape");
        assert!(e.host.is_empty() && e.upstream.is_empty());
        let out = serde_json::to_string(&e).expect("json");
        assert!(!out.contains("host") && !out.contains("upstream"), "{out}");
    }

    #[test]
    fn percent_decode_is_lenient() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%ff"), "%ff");
    }

    /// The route matcher's fuzz target, as a property test (cargo-fuzz needs a nightly
    /// toolchain; this runs in every `cargo test`): arbitrary raw paths built from the
    /// characters that matter for traversal and encoding tricks never panic, and a
    /// match is always exact about the raw path: static routes only for their literal
    /// path, a `{param}` never spanning a `/`, decoding only inside parameters.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn table() -> RouteTable {
            RouteTable::build(vec![
                entry("GET", "/public/{x}", "pub"),
                entry("GET", "/admin", "admin"),
                entry("GET", "/a/b/c", "abc"),
                entry("ANY", "/files/{proxy+}", "files"),
                on_host("a.example.test", "GET", "/admin", "host-admin"),
                on_host("*.example.test", "GET", "/a/b/c", "wild-abc"),
            ])
            .expect("table")
        }

        fn raw_path() -> impl Strategy<Value = String> {
            let atoms = prop::sample::select(vec![
                "/", "/", "/", ".", "..", "%", "%2e", "%2E", "%2f", "%2F", "%25", "%00", "%zz",
                "a", "b", "c", "admin", "public", "files", "x", "{", "}", "*", "+", "?", "#", "\\",
                "~", "é",
            ]);
            prop::collection::vec(atoms, 0..24).prop_map(|v| format!("/{}", v.concat()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
            #[test]
            fn lookups_are_exact_about_raw_paths(
                path in raw_path(),
                get in any::<bool>(),
                host in prop::sample::select(vec![
                    "", "a.example.test", "b.example.test", "example.test", "a.example.test.evil",
                ]),
            ) {
                let t = table();
                let method = if get { "GET" } else { "DELETE" };
                let host = Some(host).filter(|h| !h.is_empty());
                if let Some(m) = t.lookup(method, host, &path) {
                    let on_example = host.is_some_and(|h| h.ends_with(".example.test"));
                    match m.entry.function.as_str() {
                        "admin" => {
                            prop_assert_eq!(&path, "/admin");
                            prop_assert!(host != Some("a.example.test"));
                        }
                        "host-admin" => {
                            prop_assert_eq!(&path, "/admin");
                            prop_assert_eq!(host, Some("a.example.test"));
                        }
                        "abc" => {
                            prop_assert_eq!(&path, "/a/b/c");
                            prop_assert!(!on_example);
                        }
                        "wild-abc" => {
                            prop_assert_eq!(&path, "/a/b/c");
                            prop_assert!(on_example, "{:?}", host);
                        }
                        "pub" => {
                            let rest = path.strip_prefix("/public/").unwrap_or("/");
                            prop_assert!(!rest.is_empty() && !rest.contains('/'), "{}", path);
                            let decoded = percent_decode(rest);
                            prop_assert_eq!(m.params.get("x"), Some(&decoded));
                        }
                        "files" => prop_assert!(path.starts_with("/files/"), "{}", path),
                        other => prop_assert!(false, "unexpected route {}", other),
                    }
                }
                let _ = percent_decode(&path);
            }
        }
    }
}
