//! What the API takes (issue 25, items 17 and 18), end to end over the real binary:
//! archive entry names that are too long, too deep or read as paths by other tools;
//! JSON endpoints' media type and encoding; header bytes that are not UTF-8; JWTs issued
//! in the future; expired API keys as `keys ls` shows them.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

const MANIFEST: &str =
    "name = \"input-names\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n";
const MAIN_PY: &[u8] = b"def handler(event, context):\n    return event\n";

/// A ustar header for a name of any bytes: up to 100 inline, longer ones after a GNU
/// long-name record (what GNU tar writes).
fn named_entry(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    if name.len() > 100 {
        let mut record = name.to_vec();
        record.push(0);
        out.extend_from_slice(&header("././@LongLink", record.len(), b'L', "", "0000644"));
        pad_to_block(out, &record);
    }
    let mut h = header("placeholder", data.len(), b'0', "", "0000644");
    h[..100].fill(0);
    let inline = &name[..name.len().min(100)];
    h[..inline.len()].copy_from_slice(inline);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    pad_to_block(out, data);
}

fn pad_to_block(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

// ---------------------------------------------------------------- item 17

#[test]
fn archive_names_too_long_too_deep_or_misread_are_refused_and_nothing_is_stored() {
    let s = Server::start();
    let huge = vec![b'a'; 4000];
    let deep = format!("{}main.py", "d/".repeat(65));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a 4,000-byte name", huge, "aaaa"),
        (
            "a 256-byte component",
            format!("{}/x", "c".repeat(256)).into_bytes(),
            "cccc",
        ),
        ("65 levels deep", deep.into_bytes(), "d/d/d/"),
        ("backslash dot-dot", br"..\..\x".to_vec(), r"..\..\x"),
        ("drive letter", br"C:\x".to_vec(), r"C:\x"),
        ("drive-relative", b"C:x".to_vec(), "C:x"),
        (
            "fullwidth dots and slash",
            "\u{FF0E}\u{FF0E}\u{FF0F}x".into(),
            "\u{FF0E}\u{FF0E}",
        ),
        ("division slash", "a\u{2215}..\u{2215}b".into(), "a\u{2215}"),
        ("overlong slash", b"a\xC0\xAFb".to_vec(), "a"),
        ("newline", b"evil\nname".to_vec(), "evil"),
    ];
    for (case, name, shown) in cases {
        let body = tar_with(MANIFEST, |b| {
            named_entry(b, b"main.py", MAIN_PY);
            named_entry(b, &name, b"x");
        });
        let resp = s
            .admin(reqwest::Method::POST, "/v1/functions")
            .body(body)
            .send()
            .expect("deploy");
        let status = resp.status().as_u16();
        let v: Value = resp.json().expect("json body");
        assert_eq!(status, 400, "{case}: {v}");
        assert_eq!(v["error"]["code"], "invalid_archive", "{case}: {v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains(shown), "{case}: the entry is named: {msg}");
        assert!(
            msg.len() < 400,
            "{case}: the name is cut for display: {msg}"
        );
        assert!(
            !msg.contains('\n'),
            "{case}: no raw control characters: {msg:?}"
        );
        let data = s.data.to_string_lossy();
        assert!(
            !msg.contains(data.as_ref()),
            "{case}: no staging path: {msg}"
        );
    }
    let ls = s.json(&["ls"]);
    assert_eq!(ls, json!([]), "no function was created");
    for dir in ["blobs", "code", "tmp"] {
        let path = s.data.join("artifacts").join(dir);
        assert_eq!(count_entries(&path), 0, "artifacts/{dir} is empty");
    }
    let log = s.stderr();
    assert!(!log.contains("control API request failed"), "no 500: {log}");
    assert!(!log.contains("File name too long"), "{log}");
}

// ---------------------------------------------------------------- item 18

fn error_of(r: reqwest::blocking::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    let message = v["error"]["message"].as_str().unwrap_or("").to_string();
    (status, code, message)
}

/// Every control endpoint that takes a JSON body, with a body it would accept.
fn json_endpoints() -> Vec<(reqwest::Method, &'static str, Value)> {
    use reqwest::Method as M;
    vec![
        (
            M::PUT,
            "/v1/functions/input-echo/aliases/stable",
            json!({"version": 1}),
        ),
        (
            M::POST,
            "/v1/functions/input-echo/rollback",
            json!({"alias": "live"}),
        ),
        (M::POST, "/v1/functions/input-echo/invoke", json!({"a": 1})),
        (
            M::POST,
            "/v1/functions/input-echo/scale",
            json!({"min_instances": 1}),
        ),
        (
            M::POST,
            "/v1/routes",
            json!({"method": "GET", "path": "/added", "function": "input-echo"}),
        ),
        (
            M::POST,
            "/v1/keys",
            json!({"name": "k1", "scopes": ["invoke:*"]}),
        ),
        (M::POST, "/v1/topics", json!({"name": "t1"})),
        (
            M::POST,
            "/v1/subscriptions",
            json!({"name": "s1", "topic": "t1", "function": "input-echo"}),
        ),
        (M::POST, "/v1/subscriptions/s1/reset", json!({"offset": 0})),
    ]
}

#[test]
fn json_endpoints_refuse_bodies_not_declared_as_json_with_415() {
    let s = Server::start();
    s.ok(&["deploy", fixture("input-echo-py").to_str().expect("path")]);
    let before_keys = s.json(&["keys", "ls"]);
    for (method, path, body) in json_endpoints() {
        for ct in [
            Some("text/plain"),
            None,
            Some("application/x-www-form-urlencoded"),
            Some("application/json; charset=iso-8859-1"),
        ] {
            let mut r = s.admin(method.clone(), path).body(body.to_string());
            if let Some(ct) = ct {
                r = r.header("content-type", ct);
            }
            let (status, code, message) = error_of(r.send().expect("send"));
            assert_eq!(
                (status, code.as_str()),
                (415, "unsupported_media_type"),
                "{method} {path} with {ct:?}: {message}"
            );
            assert!(!message.is_empty(), "{method} {path}: a message is given");
        }
    }
    // Nothing was done by any of them.
    assert_eq!(s.json(&["keys", "ls"]), before_keys);
    let topics = s
        .admin(reqwest::Method::GET, "/v1/topics")
        .send()
        .expect("topics");
    assert_eq!(topics.json::<Value>().expect("json"), json!([]));
    let aliases = s.json(&["alias", "ls", "input-echo"]);
    assert!(!aliases.to_string().contains("stable"), "{aliases}");

    // JSON media types with parameters and structured suffixes are accepted.
    for (i, ct) in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=\"UTF-8\"",
        "application/vnd.nimbus+json",
    ]
    .iter()
    .enumerate()
    {
        let r = s
            .admin(reqwest::Method::POST, "/v1/topics")
            .header("content-type", *ct)
            .body(json!({"name": format!("ok{i}")}).to_string())
            .send()
            .expect("create topic");
        assert_eq!(r.status().as_u16(), 201, "{ct}");
    }
    // Bodiless requests need no type: a rollback's body is optional.
    s.ok(&["deploy", fixture("input-echo-py").to_str().expect("path")]);
    let r = s
        .admin(reqwest::Method::POST, "/v1/functions/input-echo/rollback")
        .send()
        .expect("rollback");
    assert_eq!(
        r.status().as_u16(),
        409,
        "only one version: a conflict, not 415"
    );
    // The CLI sends JSON as JSON everywhere.
    s.ok(&["keys", "create", "cli-key", "--scope", "invoke:input-echo"]);
    s.ok(&["topic", "create", "cli-topic"]);
    s.ok(&["alias", "set", "input-echo", "stable", "1"]);
    s.ok(&["scale", "input-echo", "--min", "0"]);
    let out = s.json(&["invoke", "input-echo", "--data", "{\"x\": \"\u{e9}\"}"]);
    assert_eq!(out["result"]["event"]["x"], "\u{e9}", "{out}");
}

#[test]
fn invoke_refuses_invalid_utf8_and_lone_surrogates_like_every_json_endpoint() {
    let s = Server::start();
    s.ok(&["deploy", fixture("input-echo-py").to_str().expect("path")]);
    let invoke = |body: Vec<u8>, is_async: bool| {
        let mut r = s
            .admin(reqwest::Method::POST, "/v1/functions/input-echo/invoke")
            .header("content-type", "application/json")
            .body(body);
        if is_async {
            r = r.header("x-nimbus-invocation-type", "Event");
        }
        r.send().expect("invoke")
    };
    let bad: [(&str, &[u8]); 5] = [
        ("a lone high surrogate", br#""\ud800""#),
        ("a lone low surrogate in an object", br#"{"k": "a\udc00b"}"#),
        ("a lone surrogate in a key", br#"{"\ud83d": 1}"#),
        ("a Latin-1 byte", b"{\"k\": \"caf\xe9\"}"),
        ("an overlong slash", b"[\"\xc0\xaf\"]"),
    ];
    for (case, body) in bad {
        for is_async in [false, true] {
            let (status, code, message) = error_of(invoke(body.to_vec(), is_async));
            assert_eq!(
                (status, code.as_str()),
                (400, "bad_request"),
                "{case} (async: {is_async}): {message}"
            );
            assert!(message.contains("invalid JSON"), "{case}: {message}");
        }
    }
    // The same bytes on another JSON endpoint: the same answer.
    let r = s
        .admin(reqwest::Method::POST, "/v1/topics")
        .header("content-type", "application/json")
        .body(br#"{"name": "t\ud800"}"#.to_vec())
        .send()
        .expect("topic");
    assert_eq!(error_of(r).1, "bad_request");
    // A proper surrogate pair and plain UTF-8 reach the function intact.
    let r = invoke(
        "{\"pair\": \"\\ud83d\\ude00\", \"utf8\": \"caf\u{e9}\"}".into(),
        false,
    );
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().expect("json");
    assert_eq!(v["result"]["event"]["pair"], "\u{1F600}", "{v}");
    assert_eq!(v["result"]["event"]["utf8"], "caf\u{e9}", "{v}");
    // None of the refused ones ran: the good call's log line is the only one.
    let ran = || {
        let page: Value = s
            .admin(
                reqwest::Method::GET,
                "/v1/functions/input-echo/logs?since=10m",
            )
            .send()
            .and_then(|r| r.json())
            .unwrap_or(Value::Null);
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        let n = entries
            .iter()
            .filter(|e| {
                e["logs"]
                    .as_str()
                    .is_some_and(|l| l.contains("input-echo invoked"))
            })
            .count();
        (n > 0).then_some(n)
    };
    let n = wait_for(
        "the good call's log",
        std::time::Duration::from_secs(30),
        ran,
    );
    assert_eq!(n, 1, "refused events must not reach the function");
}

#[test]
fn header_bytes_that_are_not_utf8_reach_functions_as_replacement_characters() {
    use std::io::{Read, Write};
    let s = Server::start();
    s.ok(&["deploy", fixture("input-echo-py").to_str().expect("path")]);
    let mut sock = std::net::TcpStream::connect(&s.addr).expect("connect");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut req = Vec::new();
    req.extend_from_slice(b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    req.extend_from_slice(b"x-latin: caf\xe9 au lait\r\n");
    req.extend_from_slice(b"x-ascii: plain\r\n");
    req.extend_from_slice(b"cookie: who=\xff\xfe; ok=1\r\n\r\n");
    sock.write_all(&req).expect("write");
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).expect("body");
    let v: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["headers"]["x-latin"], "caf\u{FFFD} au lait", "{v}");
    assert_eq!(v["headers"]["x-ascii"], "plain", "{v}");
    assert_eq!(
        v["event"]["cookies"],
        json!(["who=\u{FFFD}\u{FFFD}", "ok=1"]),
        "{v}"
    );
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn jwt_with_iat(iat: Option<i64>) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let pem = std::fs::read(fixture("jwt").join("test-key.pem")).expect("pem");
    let key = EncodingKey::from_rsa_pem(&pem).expect("rsa key");
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("test-1".into());
    let now = unix_now();
    let mut claims = json!({
        "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "user-7",
        "exp": now + 300, "nbf": now - 10, "scope": "read",
    });
    if let (Some(iat), Some(c)) = (iat, claims.as_object_mut()) {
        c.insert("iat".into(), iat.into());
    }
    encode(&h, &claims, &key).expect("sign")
}

#[test]
fn jwts_issued_in_the_future_are_refused() {
    let s = Server::start_jwt();
    s.ok(&["deploy", fixture("jwt-py").to_str().expect("path")]);
    let call = |token: &str| {
        let r = s
            .http()
            .get(s.url("/me"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .expect("request");
        r.status().as_u16()
    };
    let now = unix_now();
    for (case, iat) in [
        ("no iat", None),
        ("iat now", Some(now)),
        ("iat past", Some(now - 3600)),
    ] {
        assert_eq!(call(&jwt_with_iat(iat)), 200, "{case}");
    }
    for (case, iat) in [
        ("a minute ahead", now + 60),
        ("a day ahead", now + 86_400),
        ("ten years ahead", now + 10 * 365 * 86_400),
    ] {
        assert_eq!(call(&jwt_with_iat(Some(iat))), 401, "{case}");
    }
}

#[test]
fn keys_ls_shows_expired_keys_as_expired() {
    let s = Server::start();
    // `--expires` takes a duration; the shortest is 1ms, long gone by the listing.
    s.ok(&[
        "keys",
        "create",
        "short",
        "--scope",
        "invoke:x",
        "--expires",
        "1ms",
    ]);
    s.ok(&[
        "keys",
        "create",
        "long",
        "--scope",
        "invoke:x",
        "--expires",
        "30d",
    ]);
    s.ok(&["keys", "create", "forever", "--scope", "invoke:x"]);
    s.ok(&[
        "keys",
        "create",
        "gone",
        "--scope",
        "invoke:x",
        "--expires",
        "1ms",
    ]);
    s.ok(&["keys", "revoke", "gone"]);
    std::thread::sleep(std::time::Duration::from_millis(50));

    let list = s.json(&["keys", "ls"]);
    let status = |name: &str| {
        list.as_array()
            .and_then(|a| a.iter().find(|k| k["name"] == name))
            .map(|k| k["status"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(status("short"), "expired", "{list}");
    assert_eq!(status("long"), "active", "{list}");
    assert_eq!(status("forever"), "active", "{list}");
    assert_eq!(status("gone"), "revoked", "{list}");

    let table = s.ok(&["keys", "ls"]);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().any(|w| w == name))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"))
            .to_string()
    };
    assert!(row("short").contains("expired"), "{table}");
    assert!(!row("short").contains("active"), "{table}");
    assert!(row("long").contains("active"), "{table}");
    assert!(row("gone").contains("revoked"), "{table}");
}
