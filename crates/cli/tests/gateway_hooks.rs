//! Custom code on a route's way through, end to end: a Lambda authorizer (allow, deny,
//! missing identity, a crashing or garbled authorizer, cached and uncached answers,
//! identity from the query string), header rewrites, and transform functions on the
//! request (changed, or answered at once) and the response.

mod common;

use common::*;
use serde_json::Value;

fn deploy_all(s: &Server) {
    for f in ["hooks-authz", "hooks-xf", "hooks-py"] {
        s.ok(&["deploy", fixture(f).to_str().expect("path")]);
    }
}

fn get(s: &Server, path: &str, auth: Option<&str>) -> reqwest::blocking::Response {
    let mut r = s.http().get(s.url(path));
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.send().expect("request")
}

fn code(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().expect("JSON error body");
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn lambda_authorizers_decide_and_their_answers_are_cached() {
    let s = Server::start();
    deploy_all(&s);

    let r = get(&s, "/authz/1", Some("Bearer letmein"));
    assert_eq!(r.status(), 200);
    let body: Value = r.json().expect("json");
    let ctx = &body["authorizer"]["lambda"];
    assert_eq!(ctx["user"], "ada", "{body}");
    // API Gateway's authorizer payload 2.0: a REQUEST event without the body.
    assert_eq!(ctx["type"], "REQUEST");
    assert_eq!(ctx["routeKey"], "GET /authz/{id}");
    assert_eq!(ctx["sawBody"], false);
    let first_run = ctx["runs"].as_u64().expect("runs");

    // Cached for the same identity and route: the authorizer did not run again.
    let again: Value = get(&s, "/authz/2", Some("Bearer letmein"))
        .json()
        .expect("json");
    assert_eq!(
        again["authorizer"]["lambda"]["runs"].as_u64(),
        Some(first_run)
    );

    // Denied, missing, crashing, garbled: 403, 401, then 500 without detail.
    assert_eq!(
        code(get(&s, "/authz/1", Some("Bearer nope"))),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(get(&s, "/authz/1", None)),
        (401, "unauthorized".into())
    );
    for bad in ["Bearer crash", "Bearer garbage"] {
        let r = get(&s, "/authz/1", Some(bad));
        let (status, c) = code(r);
        assert_eq!((status, c.as_str()), (500, "authorizer_error"), "{bad}");
    }
    // The cached denial holds too: still 403.
    assert_eq!(code(get(&s, "/authz/1", Some("Bearer nope"))).0, 403);

    // ttl 0: asked every time.
    let runs = |r: reqwest::blocking::Response| {
        let v: Value = r.json().expect("json");
        v["authorizer"]["lambda"]["runs"].as_u64().expect("runs")
    };
    let a = runs(get(&s, "/authz-fresh", Some("Bearer letmein")));
    let b = runs(get(&s, "/authz-fresh", Some("Bearer letmein")));
    assert!(b > a, "uncached route reused an answer: {a} then {b}");

    // Identity from the query string.
    assert_eq!(get(&s, "/authz-query?token=letmein", None).status(), 200);
    assert_eq!(code(get(&s, "/authz-query", Some("Bearer letmein"))).0, 401);
    assert_eq!(code(get(&s, "/authz-query?token=wrong", None)).0, 403);

    // Denials are counted as auth failures.
    let metrics = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("metrics");
    let text = metrics.text().expect("text");
    assert!(
        text.lines()
            .any(|l| l.starts_with("nimbus_gateway_auth_failures_total") && l.contains("authz")),
        "{text}"
    );
}

#[test]
fn rewrites_and_transforms_change_requests_and_responses() {
    let s = Server::start();
    deploy_all(&s);
    let r = s
        .http()
        .post(s.url("/xf?orig=1"))
        .header("x-drop", "secret")
        .header("x-tenant", "forged")
        .body("hello")
        .send()
        .expect("request");
    // The response transform set the status and a header; the rewrite removed one.
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-response-transformed"], "yes");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(!r.headers().contains_key("x-nimbus-version"));
    let body: Value = r.json().expect("json");
    assert_eq!(body["wrapped"], true, "{body}");
    // What the function saw: rewritten headers, the transformed body and query.
    assert_eq!(body["headers"]["x-tenant"], "acme", "{body}");
    assert!(body["headers"].get("x-drop").is_none(), "{body}");
    assert_eq!(body["headers"]["x-transformed"], "yes");
    assert_eq!(body["body"], "HELLO");
    assert_eq!(body["rawQueryString"], "added=1");
    assert_eq!(body["rawPath"], "/xf");

    // A request transform can answer by itself; the function is not called.
    let r = s
        .http()
        .post(s.url("/xf"))
        .body("block")
        .send()
        .expect("request");
    assert_eq!(r.status(), 418);
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.text().expect("text"), "blocked by the transform");
}

#[test]
fn bad_hook_settings_are_refused_at_deploy_naming_the_field() {
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    for (extra, field) in [
        ("auth = \"authorizer\"", "http[0].authorizer"),
        ("authorizer = \"Bad Name\"", "http[0].authorizer"),
        (
            "auth = \"api_key\"\nauthorizer = \"a\"",
            "http[0].authorizer",
        ),
        (
            "authorizer = \"a\"\nauthorizer_ttl = \"2h\"",
            "http[0].authorizer_ttl",
        ),
        (
            "authorizer = \"a\"\nidentity_source = [\"Authorization\"]",
            "http[0].identity_source",
        ),
        (
            "request_headers = { set = { \"content-length\" = \"1\" } }",
            "http[0].request_headers.set",
        ),
        (
            "response_headers = { remove = [\"bad name\"] }",
            "http[0].response_headers.remove",
        ),
        ("request_headers = { add = {} }", "unknown field `add`"),
        ("transform_request = \"../x\"", "http[0].transform_request"),
    ] {
        let f = dir.path().join("f");
        let _ = std::fs::remove_dir_all(&f);
        std::fs::create_dir_all(&f).expect("dir");
        std::fs::write(f.join("main.py"), "def handler(e, c):\n    return 1\n").expect("code");
        std::fs::write(
            f.join("nimbus.toml"),
            format!(
                "name = \"bad\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n[[http]]\npath = \"/b\"\n{extra}\n"
            ),
        )
        .expect("manifest");
        let o = s.cli(&["deploy", f.to_str().expect("path")]);
        assert!(!o.status.success(), "{extra} deployed");
        let err = stderr_of(&o);
        assert!(err.contains(field), "{extra}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
