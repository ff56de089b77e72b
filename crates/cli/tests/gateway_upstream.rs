//! Upstream routes end to end: tiny HTTP services started inside the test (plain
//! threads on `std::net::TcpListener`, answering with their name and an echo of what
//! they received), fronted by the real gateway. Round-robin, what is forwarded and
//! what is not, fail-over and recovery, 502 and 504, API keys, manifest upstream
//! routes, host-based routing, and refused input.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// A one-request-per-connection HTTP/1.1 service answering JSON:
/// `{"name", "method", "target", "headers": {lower-case name: value}, "body_len"}`.
struct Upstream {
    name: String,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(name: &str) -> Upstream {
        Upstream::start_on(name, 0, Duration::ZERO)
    }

    fn slow(name: &str, delay: Duration) -> Upstream {
        Upstream::start_on(name, 0, delay)
    }

    fn start_on(name: &str, port: u16, delay: Duration) -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, label) = (Arc::clone(&stop), name.to_string());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let label = label.clone();
                std::thread::spawn(move || answer(conn, &label, delay));
            }
        });
        Upstream {
            name: name.to_string(),
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops accepting and closes the listening socket: later connects are refused.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn restart(&mut self) {
        *self = Upstream::start_on(&self.name, self.port, Duration::ZERO);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

fn answer(mut conn: TcpStream, name: &str, delay: Duration) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = serde_json::Map::new();
    for line in lines {
        if let Some((n, v)) = line.split_once(':') {
            headers.insert(n.trim().to_ascii_lowercase(), json!(v.trim()));
        }
    }
    let mut body = buf[head_end + 4..].to_vec();
    if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse::<usize>().ok())
    {
        while body.len() < len {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    }
    std::thread::sleep(delay);
    let out = json!({
        "name": name,
        "method": method,
        "target": target,
        "headers": headers,
        "body_len": body.len(),
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close, x-upstream-hop\r\nx-upstream-hop: secret\r\nkeep-alive: timeout=5\r\nx-served-by: {name}\r\n\r\n{out}",
        out.len()
    );
    let _ = conn.write_all(resp.as_bytes());
}

fn get_json(s: &Server, path: &str) -> Value {
    let r = s.http().get(s.url(path)).send().expect("request");
    assert_eq!(r.status(), 200, "{path}");
    r.json().expect("json")
}

fn get_host(s: &Server, path: &str, host: &str) -> reqwest::blocking::Response {
    s.http()
        .get(s.url(path))
        .header("host", host)
        .send()
        .expect("request")
}

fn name_of(v: &Value) -> String {
    v["name"].as_str().unwrap_or("").to_string()
}

fn error_code(r: reqwest::blocking::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().expect("JSON error body");
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
        body["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// One request over a raw socket (the headers exactly as written); the answer's
/// head and body.
fn raw_request(s: &Server, request: &str) -> (String, String) {
    let mut c = TcpStream::connect(&s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (head.to_string(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn metrics(s: &Server) -> String {
    s.admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("metrics")
        .text()
        .expect("text")
}

#[test]
fn upstream_routes_balance_forward_exactly_and_fail_over() {
    let s = Server::start();
    let a = Upstream::start("a");
    let mut b = Upstream::start("b");
    let out = s.ok(&[
        "route",
        "add",
        "ANY",
        "/svc/{proxy+}",
        "--upstream",
        &a.url(),
        "--upstream",
        &b.url(),
        "--upstream-down-for",
        "1s",
    ]);
    assert!(out.contains("added route ANY /svc/{proxy+} ->"), "{out}");
    assert!(out.contains(&a.url()) && out.contains(&b.url()), "{out}");

    // Round-robin: consecutive answers alternate.
    let names: Vec<String> = (0..4).map(|_| name_of(&get_json(&s, "/svc/x"))).collect();
    assert_ne!(names[0], names[1], "{names:?}");
    assert_eq!(names[0], names[2], "{names:?}");
    assert_eq!(names[1], names[3], "{names:?}");

    // The raw path and query, exactly; where the request came from.
    let r = s
        .http()
        .get(s.url("/svc/a%2Fb/c.txt?q=1&x=%20y&q=2"))
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-custom", "kept")
        .send()
        .expect("request");
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-nimbus-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    assert!(
        !r.headers().contains_key("x-upstream-hop") && !r.headers().contains_key("keep-alive"),
        "hop-by-hop response headers passed through: {:?}",
        r.headers()
    );
    assert!(r.headers().contains_key("x-served-by"));
    let v: Value = r.json().expect("json");
    assert_eq!(v["target"], "/svc/a%2Fb/c.txt?q=1&x=%20y&q=2", "{v}");
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1", "{v}");
    assert_eq!(h["x-forwarded-proto"], "http", "{v}");
    assert_eq!(h["x-forwarded-host"], s.addr.as_str(), "{v}");
    assert!(
        h["forwarded"]
            .as_str()
            .unwrap_or("")
            .contains("for=127.0.0.1;proto=http"),
        "{v}"
    );
    assert_eq!(h["x-nimbus-request-id"], request_id.as_str(), "{v}");
    assert_eq!(h["x-custom"], "kept", "{v}");
    assert!(
        h["host"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{v}"
    );

    // A body streams through.
    let r = s
        .http()
        .post(s.url("/svc/upload"))
        .body(vec![b'x'; 100_000])
        .send()
        .expect("post");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().expect("json");
    assert_eq!(
        (v["method"].as_str(), v["body_len"].as_u64()),
        (Some("POST"), Some(100_000))
    );

    // Hop-by-hop request headers, including those Connection names, stop here.
    let (head, body) = raw_request(
        &s,
        &format!(
            "GET /svc/hop HTTP/1.1\r\nHost: {}\r\nConnection: close, x-drop-me\r\nX-Drop-Me: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\nX-Stay: 1\r\n\r\n",
            s.addr
        ),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    for gone in ["x-drop-me", "keep-alive", "te"] {
        assert!(v["headers"].get(gone).is_none(), "{gone} forwarded: {v}");
    }
    assert_eq!(v["headers"]["x-stay"], "1", "{v}");

    // One upstream gone: every request still succeeds (the connect failure is retried
    // on the other, and the dead one is skipped from then on).
    b.kill();
    for _ in 0..6 {
        assert_eq!(name_of(&get_json(&s, "/svc/x")), "a");
    }
    let m = metrics(&s);
    let down = format!(
        "nimbus_gateway_upstream_marked_down_total{{upstream=\"{}\"}} 1",
        b.url()
    );
    assert!(m.contains(&down), "{m}");
    assert!(
        m.contains(&format!(
            "nimbus_gateway_upstream_requests_total{{route=\"ANY /svc/{{proxy+}}\",upstream=\"{}\",status=\"connect_error\"}} 1",
            b.url()
        )),
        "{m}"
    );

    // Back after its down period.
    b.restart();
    std::thread::sleep(Duration::from_millis(1200));
    let seen: HashSet<String> = (0..6).map(|_| name_of(&get_json(&s, "/svc/x"))).collect();
    assert!(seen.contains("b") && seen.contains("a"), "{seen:?}");

    // All gone: 502 with the JSON error, no internal error text.
    let mut a = a;
    a.kill();
    b.kill();
    for _ in 0..2 {
        let (status, code, message) =
            error_code(s.http().get(s.url("/svc/x")).send().expect("get"));
        assert_eq!((status, code.as_str()), (502, "bad_gateway"), "{message}");
        assert!(!message.to_lowercase().contains("refused"), "{message}");
    }

    let ls = s.ok(&["route", "ls"]);
    assert!(
        ls.contains("/svc/{proxy+}") && ls.contains(&a.url()),
        "{ls}"
    );
}

#[test]
fn timeouts_api_keys_and_manifest_upstream_routes() {
    let s = Server::start();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let slow = Upstream::slow("slow", Duration::from_secs(3));

    // A slow upstream past the route's timeout: 504.
    s.ok(&[
        "route",
        "add",
        "GET",
        "/slow",
        "--upstream",
        &slow.url(),
        "--timeout",
        "500ms",
    ]);
    let started = Instant::now();
    let (status, code, _) = error_code(s.http().get(s.url("/slow")).send().expect("get"));
    assert_eq!((status, code.as_str()), (504, "timeout"));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // An api_key upstream route: the key is checked, and never reaches the service.
    s.ok(&[
        "route",
        "add",
        "ANY",
        "/keyed-up/{proxy+}",
        "--upstream",
        &a.url(),
        "--auth",
        "api_key",
    ]);
    let narrow = s.json(&["keys", "create", "narrow", "--scope", "invoke:hello"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let any = s.json(&["keys", "create", "any", "--scope", "invoke:*"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let call = |h: Option<(&str, String)>| {
        let mut r = s.http().get(s.url("/keyed-up/x"));
        if let Some((n, v)) = h {
            r = r.header(n, v);
        }
        r.send().expect("request")
    };
    assert_eq!(error_code(call(None)).0, 401);
    assert_eq!(error_code(call(Some(("x-api-key", narrow)))).0, 403);
    for h in [
        ("x-api-key", any.clone()),
        ("authorization", format!("Bearer {any}")),
    ] {
        let r = call(Some(h));
        assert_eq!(r.status(), 200);
        let v: Value = r.json().expect("json");
        let headers = v["headers"].as_object().expect("headers");
        assert!(
            !headers.contains_key("x-api-key") && !headers.contains_key("authorization"),
            "the nimbus key reached the upstream: {v}"
        );
        assert!(!v.to_string().contains(&any[20..]), "{v}");
    }

    // A manifest upstream route (with a base path), owned by its function's deploy.
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("upstream-py");
    copy_dir(&fixture("upstream-py"), &dir);
    let manifest = dir.join("nimbus.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let with = |url: &str| text.replace("http://127.0.0.1:9001", url);
    std::fs::write(&manifest, with(&a.url())).expect("write");
    s.ok(&["deploy", dir.to_str().expect("path")]);
    let v = get_json(&s, "/legacy/x/y?z=1");
    assert_eq!(
        (name_of(&v).as_str(), v["target"].as_str()),
        ("a", Some("/base/legacy/x/y?z=1"))
    );
    // The next deploy replaces it like any of its routes.
    std::fs::write(&manifest, with(&b.url())).expect("write");
    s.ok(&["deploy", dir.to_str().expect("path")]);
    assert_eq!(name_of(&get_json(&s, "/legacy/x")), "b");
    let ls = s.ok(&["route", "ls"]);
    assert!(
        ls.contains("/legacy/{proxy+}") && ls.contains(&format!("{}/base", b.url())),
        "{ls}"
    );

    // A bad upstream in a manifest is refused naming the field.
    std::fs::write(&manifest, with("http://user:pw@127.0.0.1:1")).expect("write");
    let o = s.cli(&["deploy", dir.to_str().expect("path")]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("http[0].upstream"),
        "{}",
        stderr_of(&o)
    );
}

#[test]
fn host_routes_pick_the_most_specific_and_bad_input_is_refused() {
    let s = Server::start();
    let a = Upstream::start("exact");
    let b = Upstream::start("wild");
    let c = Upstream::start("any");
    for (url, host) in [
        (a.url(), Some("A.Example.test")),
        (b.url(), Some("*.example.test")),
        (c.url(), None),
    ] {
        let mut args = vec!["route", "add", "GET", "/h", "--upstream", url.as_str()];
        if let Some(h) = host {
            args.extend(["--host", h]);
        }
        s.ok(&args);
    }
    let name = |host: &str| {
        let r = get_host(&s, "/h", host);
        assert_eq!(r.status(), 200, "{host}");
        name_of(&r.json().expect("json"))
    };
    assert_eq!(name("a.example.test"), "exact");
    assert_eq!(name("A.EXAMPLE.TEST:8080"), "exact");
    assert_eq!(name("b.example.test"), "wild");
    assert_eq!(name("x.y.example.test"), "wild");
    assert_eq!(name("example.test"), "any");
    assert_eq!(name(&s.addr), "any");

    // Same path on the same host conflicts (naming both), on another host it does not.
    s.ok(&[
        "route",
        "add",
        "GET",
        "/p/{x}",
        "--upstream",
        &a.url(),
        "--host",
        "a.example.test",
    ]);
    let o = s.cli(&[
        "route",
        "add",
        "GET",
        "/p/{y}",
        "--upstream",
        &b.url(),
        "--host",
        "a.example.test",
    ]);
    assert!(!o.status.success());
    let err = stderr_of(&o);
    assert!(
        err.contains("GET a.example.test/p/{y}") && err.contains("GET a.example.test/p/{x}"),
        "{err}"
    );
    s.ok(&[
        "route",
        "add",
        "GET",
        "/p/{y}",
        "--upstream",
        &b.url(),
        "--host",
        "b.example.test",
    ]);

    let ls = s.ok(&["route", "ls"]);
    for want in ["a.example.test", "*.example.test", &a.url(), &c.url()] {
        assert!(ls.contains(want), "{want}: {ls}");
    }
    let listed = s.json(&["route", "ls"]);
    let hosts: HashSet<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["host"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        hosts.contains("a.example.test") && hosts.contains(""),
        "{listed}"
    );

    // `route rm` needs the host of a host route.
    let o = s.cli(&["route", "rm", "GET", "/p/{x}"]);
    assert!(!o.status.success(), "removed without --host");
    s.ok(&["route", "rm", "GET", "/h", "--host", "a.example.test"]);
    assert_eq!(name("a.example.test"), "wild");

    // Bad upstream URLs and hosts: one line, naming the field, non-zero exit.
    for (flag, value, field) in [
        ("--upstream", "ftp://127.0.0.1:1", "upstream"),
        ("--upstream", "http://user:pw@127.0.0.1:1", "upstream"),
        ("--upstream", "http://127.0.0.1:1/x?y=1", "upstream"),
        ("--upstream", "127.0.0.1:1", "upstream"),
        ("--host", "a.example.test:80", "host"),
    ] {
        let mut args = vec!["route", "add", "GET", "/bad", flag, value];
        if flag == "--host" {
            args.extend(["--upstream", "http://127.0.0.1:1"]);
        }
        let o = s.cli(&args);
        assert!(!o.status.success(), "{value} accepted");
        let err = stderr_of(&o);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(field) && err.contains(value), "{err}");
    }
    let o = s.cli(&["route", "add", "GET", "/bad"]);
    assert!(
        !o.status.success(),
        "a route with neither a function nor upstreams"
    );
}
