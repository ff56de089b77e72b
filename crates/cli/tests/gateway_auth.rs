//! API-key routes end to end: keys made with the CLI, presented over HTTP to the real
//! gateway; missing, malformed, forged, unscoped, expired and revoked keys; the rate
//! limit and its recovery; credentials kept from the function.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn create_key(s: &Server, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["keys", "create", name];
    args.extend_from_slice(extra);
    let v = s.json(&args);
    let key = v["key"].as_str().expect("key in answer").to_string();
    assert!(key.starts_with("nmb_"), "{v}");
    key
}

fn get(s: &Server, path: &str, key: Option<(&str, &str)>) -> reqwest::blocking::Response {
    let mut r = s.http().get(s.url(path));
    if let Some((h, v)) = key {
        r = r.header(h, v);
    }
    r.send().expect("request")
}

fn error_code(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().expect("JSON error body");
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn api_key_routes_admit_only_live_scoped_keys() {
    let s = Server::start();
    s.ok(&["deploy", fixture("keyed-py").to_str().expect("path")]);
    let key = create_key(&s, "ci", &["--scope", "invoke:keyed"]);
    let other = create_key(&s, "elsewhere", &["--scope", "invoke:hello"]);

    // The open route of the same function needs nothing.
    assert_eq!(get(&s, "/open", None).status(), 200);

    // No key, junk, a forged key with a real id, a key for another function.
    let r = get(&s, "/keyed/a", None);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"nimbus\"");
    assert_eq!(error_code(r), (401, "unauthorized".into()));
    assert_eq!(
        error_code(get(&s, "/keyed/a", Some(("x-api-key", "nope")))).0,
        401
    );
    let forged = format!("{}{}", &key[..key.len() - 4], "0000");
    assert_eq!(
        error_code(get(&s, "/keyed/a", Some(("x-api-key", &forged)))).0,
        401
    );
    assert_eq!(
        error_code(get(&s, "/keyed/a", Some(("x-api-key", &other)))),
        (403, "forbidden".into())
    );

    // The right key, either way; the function sees who called, not the secret.
    for (h, v) in [
        ("x-api-key", key.clone()),
        ("authorization", format!("Bearer {key}")),
    ] {
        let r = get(&s, "/keyed/a", Some((h, &v)));
        assert_eq!(r.status(), 200);
        let body: Value = r.json().expect("json");
        assert_eq!(body["authorizer"]["apiKey"]["name"], "ci", "{body}");
        assert_eq!(body["sawCredentials"], serde_json::json!([]), "{body}");
    }

    // Listing never shows a secret.
    let listed = s.ok(&["keys", "ls", "-o", "json"]);
    assert!(!listed.contains(&key[20..]), "{listed}");
    assert!(listed.contains("\"ci\""));

    // Revocation takes effect within a second.
    s.ok(&["keys", "revoke", "ci"]);
    let revoked_at = Instant::now();
    loop {
        let status = get(&s, "/keyed/a", Some(("x-api-key", &key)))
            .status()
            .as_u16();
        if status == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still {status} after 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let listed = s.json(&["keys", "ls"]);
    assert!(listed[0]["revoked_at_ms"].is_i64() || listed[1]["revoked_at_ms"].is_i64());
}

#[test]
fn expired_keys_are_refused() {
    let s = Server::start();
    s.ok(&["deploy", fixture("keyed-py").to_str().expect("path")]);
    let key = create_key(&s, "short", &["--scope", "invoke:*", "--expires", "1500ms"]);
    assert_eq!(get(&s, "/keyed/x", Some(("x-api-key", &key))).status(), 200);
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(
        error_code(get(&s, "/keyed/x", Some(("x-api-key", &key)))).0,
        401
    );
}

#[test]
fn rate_limited_keys_get_429_then_recover() {
    let s = Server::start();
    s.ok(&["deploy", fixture("keyed-py").to_str().expect("path")]);
    // 2 per second, burst 3.
    let key = create_key(&s, "slow", &["--scope", "invoke:keyed", "--rate", "2/s:3"]);
    let unlimited = create_key(&s, "fast", &["--scope", "invoke:keyed"]);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let r = get(&s, "/keyed/r", Some(("x-api-key", &key)));
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_string());
            assert_eq!(r.headers()["ratelimit-remaining"], "0");
        } else {
            assert!(r.headers().contains_key("ratelimit-remaining"));
        }
        statuses.push(r.status().as_u16());
    }
    // The burst passes; what follows at once is refused (a little refill may slip in).
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Another key is not affected.
    assert_eq!(
        get(&s, "/keyed/r", Some(("x-api-key", &unlimited))).status(),
        200
    );
    // And the limited key recovers after the refill.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(get(&s, "/keyed/r", Some(("x-api-key", &key))).status(), 200);
}

#[test]
fn quotas_are_spent_per_key_and_survive_a_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let mut s = Server::start_with(&data, &[]);
    s.ok(&["deploy", fixture("keyed-py").to_str().expect("path")]);
    let key = create_key(
        &s,
        "metered",
        &["--scope", "invoke:keyed", "--quota", "3/day"],
    );
    let other = create_key(
        &s,
        "other",
        &["--scope", "invoke:keyed", "--quota", "3/day"],
    );
    for left in ["2", "1", "0"] {
        let r = get(&s, "/keyed/q", Some(("x-api-key", &key)));
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-limit"], "3");
        assert_eq!(r.headers()["ratelimit-remaining"], left);
    }
    let spent = |s: &Server| {
        let r = get(s, "/keyed/q", Some(("x-api-key", &key)));
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("text")
            .parse()
            .expect("seconds");
        // Until the next UTC midnight.
        assert!((1..=86_400).contains(&retry), "{retry}");
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        assert_eq!(error_code(r), (429, "quota_exceeded".into()));
    };
    spent(&s);
    assert_eq!(
        get(&s, "/keyed/q", Some(("x-api-key", &other))).status(),
        200
    );

    // Counters reach the store within about a second; a SIGKILL then loses nothing.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = s.json(&["keys", "ls"]);
        let used = listed
            .as_array()
            .and_then(|a| a.iter().find(|k| k["name"] == "metered"))
            .map(|k| k["quota_used"].clone());
        if used == Some(serde_json::json!(3)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "quota use not persisted: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.ok(&["keys", "ls"]).contains("3 of 3/day"));
    s.kill9();
    let s = Server::start_with(&data, &[]);
    spent(&s);
    let r = get(&s, "/keyed/q", Some(("x-api-key", &other)));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-remaining"], "1");
    for bad in ["0/day", "5/week", "lots"] {
        let o = s.cli(&[
            "keys", "create", "bad", "--scope", "invoke:*", "--quota", bad,
        ]);
        assert!(!o.status.success());
        assert!(stderr_of(&o).contains("quota"), "{}", stderr_of(&o));
    }
}

#[test]
fn bad_key_requests_get_clear_errors() {
    let s = Server::start();
    for (args, want) in [
        (vec!["keys", "create", "x", "--scope", "root"], "scopes"),
        (
            vec![
                "keys", "create", "x", "--scope", "invoke:a", "--rate", "fast",
            ],
            "rate",
        ),
        (
            vec![
                "keys",
                "create",
                "x",
                "--scope",
                "invoke:a",
                "--expires",
                "soon",
            ],
            "expires_in",
        ),
        (
            vec!["keys", "create", "Bad Name", "--scope", "invoke:a"],
            "name",
        ),
        (vec!["keys", "revoke", "nobody"], "not found"),
    ] {
        let o = s.cli(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr_of(&o);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    create_key(&s, "dup", &["--scope", "invoke:a"]);
    let o = s.cli(&["keys", "create", "dup", "--scope", "invoke:a"]);
    assert!(
        stderr_of(&o).contains("already exists"),
        "{}",
        stderr_of(&o)
    );
    // The API answers in the JSON error shape.
    let r = s
        .admin(reqwest::Method::POST, "/v1/keys")
        .header("content-type", "application/json")
        .body("{")
        .send()
        .expect("post");
    assert_eq!(error_code(r).0, 400);
}

fn request(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> reqwest::blocking::Response {
    let mut r = s.http().request(method, s.url(path));
    for (h, v) in headers {
        r = r.header(*h, *v);
    }
    r.send().expect("request")
}

#[test]
fn cors_preflights_are_answered_by_the_gateway_and_answers_carry_the_rules() {
    let s = Server::start();
    s.ok(&["deploy", fixture("cors-py").to_str().expect("path")]);
    let key = create_key(&s, "web", &["--scope", "invoke:corsy"]);
    let app = "https://app.example.com";

    // The preflight needs no key (browsers send none) and never reaches the function.
    let r = request(
        &s,
        reqwest::Method::OPTIONS,
        "/app/items",
        &[
            ("origin", app),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type, x-api-key"),
        ],
    );
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], app);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(h["access-control-allow-headers"], "content-type, x-api-key");
    assert_eq!(h["access-control-max-age"], "600");

    // Another origin, a method or header outside the rules: refused.
    for (origin, method, hdrs) in [
        ("https://evil.example.com", "POST", "content-type"),
        (app, "DELETE", "content-type"),
        (app, "POST", "x-secret"),
    ] {
        let r = request(
            &s,
            reqwest::Method::OPTIONS,
            "/app/items",
            &[
                ("origin", origin),
                ("access-control-request-method", method),
                ("access-control-request-headers", hdrs),
            ],
        );
        assert_eq!(r.status(), 403, "{origin} {method} {hdrs}");
        assert!(!r.headers().contains_key("access-control-allow-origin"));
    }

    // The real request: allowed origin gets the headers, also on a 401.
    let r = request(
        &s,
        reqwest::Method::POST,
        "/app/items",
        &[("origin", app), ("x-api-key", &key)],
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], app);
    assert_eq!(
        r.headers()["access-control-expose-headers"],
        "x-nimbus-request-id"
    );
    let r = request(&s, reqwest::Method::GET, "/app/items", &[("origin", app)]);
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], app);
    let r = request(
        &s,
        reqwest::Method::GET,
        "/app/items",
        &[("origin", "https://evil.example.com"), ("x-api-key", &key)],
    );
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[test]
fn route_and_per_client_rate_limits_answer_429() {
    let s = Server::start();
    s.ok(&["deploy", fixture("cors-py").to_str().expect("path")]);
    let statuses = |path: &str, n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| get(&s, path, None).status().as_u16())
            .collect()
    };
    assert_eq!(statuses("/per-ip", 3), vec![200, 200, 429]);
    assert_eq!(statuses("/per-route", 2), vec![200, 429]);
    let r = get(&s, "/per-route", None);
    let retry = r.headers()["retry-after"]
        .to_str()
        .unwrap_or("")
        .to_string();
    assert!(
        retry.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s)),
        "{retry}"
    );
    assert_eq!(error_code(r), (429, "rate_limited".into()));
    // A redeploy (a store change) does not refill the buckets.
    s.ok(&["keys", "create", "touch", "--scope", "invoke:corsy"]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(statuses("/per-route", 1), vec![429]);
}

#[test]
fn bad_route_options_are_refused_at_deploy_naming_the_field() {
    let s = Server::start();
    let tmp = tempfile::tempdir().expect("tmp");
    for (route_extra, field) in [
        (
            r#"cors = { origins = ["*"], credentials = true }"#,
            "cors.credentials",
        ),
        (
            r#"cors = { origins = ["app.example.com"] }"#,
            "cors.origins",
        ),
        (r#"cors = { origins = ["*"], colour = "red" }"#, "colour"),
        (r#"rate = "lots""#, "rate"),
        (r#"rate_per_ip = "0/s""#, "rate_per_ip"),
    ] {
        let dir = tmp.path().join(field.replace('.', "-"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("main.py"), "def handler(e, c):\n    return 1\n").expect("write");
        std::fs::write(
            dir.join("nimbus.toml"),
            format!("name = \"opt\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n[[http]]\nmethod = \"GET\"\npath = \"/o\"\n{route_extra}\n"),
        )
        .expect("write");
        let o = s.cli(&["deploy", dir.to_str().expect("path")]);
        assert!(!o.status.success(), "{route_extra} deployed");
        assert!(
            stderr_of(&o).contains(field),
            "{route_extra}: {}",
            stderr_of(&o)
        );
    }
}

#[test]
fn gateway_metrics_access_log_and_trace_context() {
    let s = Server::start_args(&["--access-log", "--log-format", "json"]);
    s.ok(&["deploy", fixture("cors-py").to_str().expect("path")]);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(&s, "/per-ip", Some(("traceparent", tp)));
    assert_eq!(r.status(), 200);
    let body: Value = r.json().expect("json");
    assert_eq!(
        body["trace"], tp,
        "the caller's trace context reaches the function"
    );
    // With a malformed one (or none) there is none: traces are propagated, not made up.
    let body: Value = get(&s, "/per-ip", Some(("traceparent", "00-zz-bad-01")))
        .json()
        .expect("json");
    assert!(body["trace"].is_null(), "{body}");
    assert_eq!(get(&s, "/per-ip", None).status(), 429);
    assert_eq!(get(&s, "/app/x", None).status(), 401);
    assert_eq!(get(&s, "/nowhere", None).status(), 404);

    let metrics = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    for want in [
        r#"nimbus_gateway_requests_total{route="GET /per-ip",status="200"} 2"#,
        r#"nimbus_gateway_requests_total{route="GET /per-ip",status="429"} 1"#,
        r#"nimbus_gateway_requests_total{route="unmatched",status="404"} 1"#,
        r#"nimbus_gateway_throttles_total{route="GET /per-ip",limit="client"} 1"#,
        r#"nimbus_gateway_auth_failures_total{route="ANY /app/{proxy+}",status="401"} 1"#,
        "nimbus_gateway_request_duration_seconds",
    ] {
        assert!(metrics.contains(want), "missing `{want}` in:\n{metrics}");
    }
    // One JSON access line per request, with the route and status.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = s.stderr();
        let lines: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "nimbus_access")
            .collect();
        if lines.len() >= 5 {
            let throttled = lines
                .iter()
                .find(|v| v["fields"]["status"] == 429)
                .expect("429 line");
            assert_eq!(throttled["fields"]["route"], "GET /per-ip", "{throttled}");
            assert_eq!(throttled["fields"]["path"], "/per-ip");
            assert!(lines.iter().all(|v| v["fields"]["request_id"].is_string()));
            assert!(!log.contains("nmb_"), "no key in the logs");
            break;
        }
        assert!(Instant::now() < deadline, "access lines: {lines:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn encoded_and_dotted_paths_cannot_reach_a_protected_route() {
    let s = Server::start();
    s.ok(&["deploy", fixture("keyed-py").to_str().expect("path")]);
    // Raw request lines, so no client normalises the path first.
    for path in [
        "/open/../keyed/a",
        "/open/%2e%2e/keyed/a",
        "/open/%2E%2E%2Fkeyed%2Fa",
        "//keyed/a",
        "/keyed%2fa",
        "/%6beyed/a",
        "/./keyed/a",
        "/open/..%2f..%2fkeyed/a",
    ] {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&s.addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            matches!(status, 400 | 401 | 404),
            "{path} answered {status}: {answer}"
        );
        assert!(
            !answer.contains("sawCredentials"),
            "{path} reached the protected function"
        );
    }
}
