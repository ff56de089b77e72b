//! The listener's limits over raw sockets: slow and silent clients are cut off at the
//! header deadline while others are served, oversized heads are refused, and a request
//! with both Content-Length and Transfer-Encoding cannot smuggle a second one.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(&s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c
}

/// Reads until the server closes; returns what it sent and how long that took.
fn read_to_close(mut c: TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("server kept the connection open: {e}"),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn slowloris_and_silent_clients_are_cut_off_at_the_header_deadline() {
    let s = Server::start_args(&["--header-timeout", "1s"]);
    // A slow client: part of a head, then one byte now and then.
    let mut slow = connect(&s);
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let trickle = {
        let mut c = slow.try_clone().expect("clone");
        std::thread::spawn(move || {
            for _ in 0..30 {
                if c.write_all(b"X").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let silent = connect(&s);
    // A client that made one request and then idles on the kept-alive connection.
    let mut idle = connect(&s);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // Meanwhile a normal client is served at once.
    let started = Instant::now();
    assert_eq!(
        s.http().get(s.url("/health")).send().expect("get").status(),
        200
    );
    assert!(started.elapsed() < Duration::from_millis(900));
    let (_, slow_took) = read_to_close(slow);
    assert!(
        slow_took < Duration::from_secs(3),
        "slow client held on for {slow_took:?}"
    );
    let (_, silent_took) = read_to_close(silent);
    assert!(
        silent_took < Duration::from_secs(3),
        "silent client held on for {silent_took:?}"
    );
    let (answer, idle_took) = read_to_close(idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        idle_took < Duration::from_secs(3),
        "idle client held on for {idle_took:?}"
    );
    let _ = trickle.join();
}

#[test]
fn oversized_heads_and_smuggling_shapes_are_refused() {
    let s = Server::start_args(&["--max-header-bytes", "16384"]);
    let mut c = connect(&s);
    let big = "a".repeat(40 * 1024);
    let req = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = c.write_all(req.as_bytes());
    let (answer, _) = read_to_close(c);
    assert!(
        answer.starts_with("HTTP/1.1 431")
            || answer.starts_with("HTTP/1.1 400")
            || answer.is_empty(),
        "{answer}"
    );

    // Content-Length and Transfer-Encoding together: the chunked framing wins and the
    // connection closes after the answer, so a request hidden behind the body (as a
    // front proxy going by Content-Length would see it) is never served.
    let mut c = connect(&s);
    c.write_all(
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/functions HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("write");
    let (answer, _) = read_to_close(c);
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        !answer.contains("unauthorized"),
        "the smuggled request was served: {answer}"
    );

    // The server is still fine.
    assert_eq!(
        s.http().get(s.url("/health")).send().expect("get").status(),
        200
    );
}

#[test]
fn the_control_api_can_live_on_its_own_listener() {
    let s = Server::start_args(&["--control-listen", "127.0.0.1:0"]);
    assert_ne!(s.control_addr.as_deref(), Some(s.addr.as_str()));
    s.ok(&["deploy", example("python-hello").to_str().expect("path")]);
    let http = s.http();
    // Functions and /health on the public listener; nothing of the control API there.
    assert_eq!(
        http.get(s.url("/hello/ada")).send().expect("get").status(),
        200
    );
    assert_eq!(
        http.get(s.url("/health")).send().expect("get").status(),
        200
    );
    let r = http
        .get(s.url("/v1/functions"))
        .bearer_auth(s.token())
        .send()
        .expect("get");
    assert_eq!(r.status(), 404, "the admin API answered on the public port");
    assert_eq!(
        http.get(s.url("/metrics")).send().expect("get").status(),
        404
    );
    // The control listener has the API and the metrics, and no functions.
    assert_eq!(
        s.admin(reqwest::Method::GET, "/v1/functions")
            .send()
            .expect("get")
            .status(),
        200
    );
    assert_eq!(
        s.admin(reqwest::Method::GET, "/metrics")
            .send()
            .expect("get")
            .status(),
        200
    );
    assert_eq!(
        http.get(s.control_url("/hello/ada"))
            .send()
            .expect("get")
            .status(),
        404
    );
}

#[test]
fn routes_can_be_added_and_removed_outside_manifests() {
    let s = Server::start();
    s.ok(&["deploy", example("python-hello").to_str().expect("path")]);
    let out = s.ok(&[
        "route",
        "add",
        "GET",
        "/v2/greet/{name}",
        "--function",
        "hello",
        "--rate",
        "100/s",
    ]);
    assert!(out.contains("added route GET /v2/greet/{name}"), "{out}");
    let r = s.http().get(s.url("/v2/greet/ada")).send().expect("get");
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("ratelimit-remaining"));
    let ls = s.ok(&["route", "ls"]);
    assert!(
        ls.contains("/v2/greet/{name}") && ls.contains("route 100/s"),
        "{ls}"
    );
    // It survives a redeploy of its function.
    s.ok(&["deploy", example("python-hello").to_str().expect("path")]);
    assert_eq!(
        s.http()
            .get(s.url("/v2/greet/ada"))
            .send()
            .expect("get")
            .status(),
        200
    );
    // Conflicts, reserved paths, unknown functions and manifest routes are refused.
    for (args, want) in [
        (
            vec![
                "route",
                "add",
                "GET",
                "/hello/{other}",
                "--function",
                "hello",
            ],
            "conflicts",
        ),
        (
            vec!["route", "add", "GET", "/v1/x", "--function", "hello"],
            "reserved",
        ),
        (
            vec!["route", "add", "GET", "/y", "--function", "ghost"],
            "not found",
        ),
        (
            vec![
                "route",
                "add",
                "GET",
                "/y",
                "--function",
                "hello",
                "--auth",
                "magic",
            ],
            "auth",
        ),
        (vec!["route", "rm", "GET", "/hello/{name}"], "manifest"),
    ] {
        let o = s.cli(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr_of(&o).contains(want), "{args:?}: {}", stderr_of(&o));
    }
    s.ok(&["route", "rm", "GET", "/v2/greet/{name}"]);
    assert_eq!(
        s.http()
            .get(s.url("/v2/greet/ada"))
            .send()
            .expect("get")
            .status(),
        404
    );
}

#[test]
fn a_route_timeout_answers_504_before_the_functions_own() {
    let s = Server::start();
    s.ok(&["deploy", fixture("timeout-py").to_str().expect("path")]);
    let http = s.http();
    assert_eq!(
        http.get(s.url("/quick?sleep=0"))
            .send()
            .expect("get")
            .status(),
        200
    );
    let started = std::time::Instant::now();
    let r = http.get(s.url("/quick?sleep=2")).send().expect("get");
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let body: serde_json::Value = r.json().expect("json");
    assert_eq!(body["error"]["code"], "timeout");
    // The invocation was not cut short: it finishes and is recorded as a success.
    settled_usage(&s, "timeouty", 2);
    let idle = s.json(&["instances", "timeouty"]);
    assert!(
        idle.as_array()
            .is_some_and(|l| l.iter().all(|i| i["state"] == "idle")),
        "{idle}"
    );
    // A client that hangs up mid-invocation does not cancel it either.
    {
        let mut c = connect(&s);
        c.write_all(b"GET /patient?sleep=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        std::thread::sleep(Duration::from_millis(200));
    }
    settled_usage(&s, "timeouty", 3);
    // The function's own timeout still governs its other route.
    assert_eq!(
        http.get(s.url("/patient?sleep=1"))
            .send()
            .expect("get")
            .status(),
        200
    );
    // A route timeout over the function's is refused at deploy.
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixture("timeout-py"), tmp.path());
    let manifest = std::fs::read_to_string(tmp.path().join("nimbus.toml")).expect("read");
    std::fs::write(
        tmp.path().join("nimbus.toml"),
        manifest.replace("700ms", "9s"),
    )
    .expect("write");
    let o = s.cli(&["deploy", tmp.path().to_str().expect("path")]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("http[0].timeout"),
        "{}",
        stderr_of(&o)
    );
}

/// Waits until `function` has `n` recorded invocations, none failed, and no instance
/// busy: every call ran to its end and was metered.
fn settled_usage(s: &Server, function: &str, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let usage = s.json(&["usage", "--function", function]);
        let row = &usage["usage"][0];
        let busy = s
            .json(&["instances", function])
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["state"] != "idle"));
        if row["invocations"].as_u64() == Some(n) && !busy {
            assert_eq!(row["errors"], 0, "{usage}");
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{usage}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
