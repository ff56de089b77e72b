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

/// One installed route: what it matches and what it points at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteEntry {
    pub method: String,
    pub path: String,
    pub function: String,
    pub alias: String,
    #[serde(default)]
    pub auth: crate::AuthKind,
    #[serde(
        default,
        skip_serializing_if = "crate::route_options::RouteOptions::is_empty"
    )]
    pub options: crate::route_options::RouteOptions,
}

impl RouteEntry {
    pub fn route_key(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A route conflict, naming both routes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "route `{new}` of function `{new_function}` conflicts with `{existing}` of function `{existing_function}`"
)]
pub struct RouteConflict {
    pub new: String,
    pub new_function: String,
    pub existing: String,
    pub existing_function: String,
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
    by_method: BTreeMap<String, matchit::Router<usize>>,
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
        };
        if let Some(existing) = self
            .entries
            .iter()
            .find(|e| e.method == entry.method && same_shape(&e.path, &entry.path))
        {
            return Err(conflict(existing));
        }
        let router = self.by_method.entry(entry.method.clone()).or_default();
        let idx = self.entries.len();
        if let Err(e) = router.insert(to_matchit(&entry.path), idx) {
            // matchit refuses e.g. `/a/{x}` next to `/a/{y}/b`; find which route it meant.
            let existing = match &e {
                matchit::InsertError::Conflict { with } => self
                    .entries
                    .iter()
                    .find(|r| r.method == entry.method && to_matchit(&r.path) == *with),
                _ => None,
            };
            return Err(match existing {
                Some(ex) => conflict(ex),
                None => RouteConflict {
                    new: entry.route_key(),
                    new_function: entry.function.clone(),
                    existing: e.to_string(),
                    existing_function: "?".into(),
                },
            });
        }
        self.entries.push(entry);
        Ok(())
    }

    pub fn entries(&self) -> &[RouteEntry] {
        &self.entries
    }

    /// Matches a raw (still percent-encoded) path. A method-specific route wins over `ANY`.
    pub fn lookup(&self, method: &str, raw_path: &str) -> Option<RouteMatch<'_>> {
        for m in [method, "ANY"] {
            let Some(router) = self.by_method.get(m) else {
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
        None
    }
}

/// Decodes `%XX` escapes; invalid escapes and non-UTF-8 results are kept as written.
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
            auth: crate::AuthKind::None,
            options: Default::default(),
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
        let m = t.lookup("GET", "/hello/ada%20l").expect("match");
        assert_eq!(m.entry.function, "hello");
        assert_eq!(m.params["name"], "ada l");
        let m = t.lookup("DELETE", "/files/a/b/c.txt").expect("match");
        assert_eq!(m.params["proxy"], "a/b/c.txt");
        assert!(t.lookup("POST", "/hello/ada").is_none());
        assert!(t.lookup("GET", "/hello/ada/extra").is_none());
        assert!(t.lookup("GET", "/").is_some());
    }

    #[test]
    fn encoded_slash_stays_inside_one_segment() {
        let t = RouteTable::build(vec![entry("GET", "/a/{x}", "f")]).expect("ok");
        let m = t.lookup("GET", "/a/b%2Fc").expect("match");
        assert_eq!(m.params["x"], "b/c");
        assert!(t.lookup("GET", "/a/b/c").is_none());
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
            fn lookups_are_exact_about_raw_paths(path in raw_path(), get in any::<bool>()) {
                let t = table();
                let method = if get { "GET" } else { "DELETE" };
                if let Some(m) = t.lookup(method, &path) {
                    match m.entry.function.as_str() {
                        "admin" => prop_assert_eq!(&path, "/admin"),
                        "abc" => prop_assert_eq!(&path, "/a/b/c"),
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
