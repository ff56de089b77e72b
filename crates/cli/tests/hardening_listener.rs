//! The listener against hostile clients (issue 25, items 11 to 15), over raw sockets
//! where framing matters: bodies that never arrive or trickle (408, and the slots they
//! held freed), declared sizes over the limit (413 from the head), ambiguous hosts and
//! framing (400/501/414 and close, underscored names kept from upstreams), failed
//! authentication throttled per client address, and `/metrics` behind credentials.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(&s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    c
}

/// Reads until the server closes; returns what it sent and how long that took. A
/// read timeout (the server kept the connection open) returns what came so far.
fn read_to_close(c: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends a raw request and reads the answer until the server closes.
fn exchange(s: &Server, raw: &[u8]) -> (String, Duration) {
    let mut c = connect(s);
    c.write_all(raw).expect("write");
    read_to_close(&mut c)
}

/// A POST head to a function route that reads its body, declaring 1000 bytes.
const STALLED_HEAD: &[u8] =
    b"POST /hello-any/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{";

#[test]
fn bodies_that_never_arrive_or_trickle_get_408_and_slow_fine_ones_are_served() {
    let s = Server::start_args(&["--body-timeout", "2s", "--body-min-rate", "100"]);
    s.ok(&["deploy", fixture("any-route").to_str().expect("path")]);

    // One byte of a declared thousand, then silence.
    let (answer, took) = exchange(&s, STALLED_HEAD);
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "silent body answered after {took:?}"
    );

    // The control API's bodies are on the same deadline.
    let token = s.token();
    let head = format!(
        "POST /v1/functions/any-route/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    let (answer, took) = exchange(&s, head.as_bytes());
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(took < Duration::from_secs(8), "invoke body held {took:?}");

    // One byte a second: far below the minimum rate.
    let mut c = connect(&s);
    c.write_all(STALLED_HEAD).expect("write");
    let trickle = {
        let mut c = c.try_clone().expect("clone");
        std::thread::spawn(move || {
            for _ in 0..60 {
                std::thread::sleep(Duration::from_secs(1));
                if c.write_all(b" ").is_err() {
                    return;
                }
            }
        })
    };
    let (answer, took) = read_to_close(&mut c);
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(
        took < Duration::from_secs(8),
        "trickle held on for {took:?}"
    );
    let _ = trickle.join();

    // 1000 bytes over 3 s: longer than the timeout alone, faster than the rate.
    let mut c = connect(&s);
    c.write_all(b"POST /hello-any/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n")
        .expect("write");
    for _ in 0..10 {
        c.write_all(&[b'a'; 100]).expect("write");
        std::thread::sleep(Duration::from_millis(300));
    }
    let (answer, _) = read_to_close(&mut c);
    assert_eq!(status_of(&answer), 201, "{answer}");
    assert!(answer.ends_with(&"a".repeat(1000)), "{answer}");
}

#[test]
fn stalled_bodies_no_longer_starve_the_connection_slots() {
    let s = Server::start_args(&["--max-connections", "20", "--body-timeout", "2s"]);
    s.ok(&["deploy", fixture("any-route").to_str().expect("path")]);
    let stalled_at = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(STALLED_HEAD).expect("write");
            c
        })
        .collect();
    // Every slot is taken before /health asks.
    std::thread::sleep(Duration::from_millis(500));
    let mut health = connect(&s);
    health
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    health
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let (answer, took) = read_to_close(&mut health);
    assert_eq!(status_of(&answer), 200, "/health starved: {answer:?}");
    assert!(took < Duration::from_secs(8), "/health waited {took:?}");
    // Answered only once the stalled bodies' deadline freed their slots.
    assert!(
        stalled_at.elapsed() >= Duration::from_millis(1900),
        "slots were not all held"
    );
    for c in &mut stalled {
        let (answer, _) = read_to_close(c);
        assert_eq!(status_of(&answer), 408, "{answer}");
    }
}

#[test]
fn a_deploy_declaring_more_than_the_limit_is_413_from_the_head() {
    let s = Server::start();
    let token = s.token();
    for declared in ["10737418240", &(140u64 * 1024 * 1024).to_string()] {
        let mut c = connect(&s);
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // Nothing of the body is sent: the answer must come from the head alone.
        write!(
            c,
            "POST /v1/functions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/gzip\r\nContent-Length: {declared}\r\n\r\n"
        )
        .expect("write");
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(status_of(&answer), 413, "declared {declared}: {answer:?}");
        assert!(answer.contains("payload_too_large"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // An honest deploy still works.
    s.ok(&["deploy", fixture("any-route").to_str().expect("path")]);
}

/// A tiny HTTP service recording the heads it receives.
fn recording_upstream(name: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            if let Ok(mut l) = log.lock() {
                l.push(String::from_utf8_lossy(&head).to_ascii_lowercase());
            }
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                name.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn ambiguous_hosts_and_framing_are_refused_and_closed() {
    let s = Server::start();
    let (a_url, a_seen) = recording_upstream("a");
    let (b_url, b_seen) = recording_upstream("b");
    for (url, host) in [(&a_url, "a.example.test"), (&b_url, "b.example.test")] {
        s.ok(&[
            "route",
            "add",
            "GET",
            "/who",
            "--upstream",
            url,
            "--host",
            host,
        ]);
    }
    // Each host reaches its own service.
    let (answer, _) = exchange(
        &s,
        b"GET /who HTTP/1.1\r\nHost: b.example.test\r\nConnection: close\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with('b'),
        "{answer}"
    );
    let before = (a_seen.lock().map(|v| v.len()).unwrap_or(0), 1);

    let refused = |raw: &str, want: u16| {
        let (answer, took) = exchange(&s, raw.as_bytes());
        assert_eq!(status_of(&answer), want, "{raw:?} -> {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{raw:?} left open: {answer}"
        );
        assert!(took < Duration::from_secs(5));
    };
    // Two Host headers, in either order: neither function answers.
    refused(
        "GET /who HTTP/1.1\r\nHost: b.example.test\r\nHost: a.example.test\r\n\r\n",
        400,
    );
    refused(
        "GET /who HTTP/1.1\r\nHost: a.example.test\r\nHost: b.example.test\r\n\r\n",
        400,
    );
    refused("GET /health HTTP/1.1\r\n\r\n", 400);
    refused(
        "POST /who HTTP/1.1\r\nHost: a.example.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    );
    refused(
        "POST /who HTTP/1.1\r\nHost: a.example.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    );
    refused(
        "POST /who HTTP/1.1\r\nHost: a.example.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    );
    let long = format!("/who?{}", "q".repeat(9000));
    refused(
        &format!("GET {long} HTTP/1.1\r\nHost: a.example.test\r\n\r\n"),
        414,
    );
    assert_eq!(
        (
            a_seen.lock().map(|v| v.len()).unwrap_or(0),
            b_seen.lock().map(|v| v.len()).unwrap_or(0)
        ),
        before,
        "a refused request reached an upstream"
    );
    // HTTP/1.0 needs no Host; a target under the limit is served.
    let (answer, _) = exchange(&s, b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(status_of(&answer), 200, "{answer}");
    let fine = format!("/who?{}", "q".repeat(8000));
    let (answer, _) = exchange(
        &s,
        format!("GET {fine} HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(status_of(&answer), 200, "{answer}");

    // Underscored names never reach an upstream, where CGI would read them as dashes.
    let (answer, _) = exchange(
        &s,
        b"GET /who HTTP/1.1\r\nHost: a.example.test\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\nX_Real_Ip: 10.0.0.1\r\nX-Kept: yes\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&answer), 200, "{answer}");
    let last = a_seen
        .lock()
        .ok()
        .and_then(|v| v.last().cloned())
        .unwrap_or_default();
    assert!(last.contains("x-kept: yes"), "{last}");
    for name in ["transfer_encoding", "content_length", "x_real_ip"] {
        assert!(!last.contains(name), "{name} was forwarded: {last}");
    }
}

/// A client whose connections come from `ip` (any address of 127.0.0.0/8).
fn client_from(ip: [u8; 4]) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .local_address(IpAddr::from(ip))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

#[test]
fn failed_authentication_is_throttled_per_client_address() {
    // 5 failures at once, then one a minute: the test never waits for a refill.
    let s = Server::start_args(&["--auth-failure-rate", "1/m:5"]);
    s.ok(&["deploy", fixture("keyed-py").to_str().expect("path")]);
    s.ok(&["deploy", fixture("jwt-py").to_str().expect("path")]);
    let key = s.json(&["keys", "create", "ci", "--scope", "invoke:keyed"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let token = s.token();
    let (guesser, other) = (client_from([127, 0, 0, 2]), client_from([127, 0, 0, 1]));
    let admin = |c: &reqwest::blocking::Client, t: &str| {
        c.get(s.url("/v1/functions"))
            .bearer_auth(t)
            .send()
            .expect("get")
    };
    // Wrong admin tokens, a wrong API key and a bad JWT all count as one client's.
    for i in 0..3 {
        assert_eq!(admin(&guesser, &format!("nmb_wrong{i}")).status(), 401);
    }
    let r = guesser
        .get(s.url("/keyed/a"))
        .header("x-api-key", "nmb_bad")
        .send();
    assert_eq!(r.expect("get").status(), 401);
    let r = guesser.get(s.url("/me")).bearer_auth("not.a.jwt").send();
    assert_eq!(r.expect("get").status(), 401);

    // Past the limit: 429 with Retry-After, whatever is presented, right or wrong.
    let r = admin(&guesser, "nmb_wrong9");
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        admin(&guesser, &token).status(),
        429,
        "a right guess showed"
    );
    let r = guesser
        .get(s.url("/keyed/a"))
        .header("x-api-key", &key)
        .send();
    assert_eq!(r.expect("get").status(), 429);
    // Public routes stay public for it.
    assert_eq!(
        guesser.get(s.url("/open")).send().expect("get").status(),
        200
    );

    // Another address is not slowed, with the right credentials or after its own
    // (fewer) failures.
    assert_eq!(admin(&other, &token).status(), 200);
    assert_eq!(admin(&other, "nmb_wrong").status(), 401);
    let r = other
        .get(s.url("/keyed/a"))
        .header("x-api-key", &key)
        .send();
    assert_eq!(r.expect("get").status(), 200);

    let text = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(value("nimbus_auth_failures_total") >= 6, "{text}");
    assert!(value("nimbus_auth_throttled_total") >= 3, "{text}");
}

#[test]
fn metrics_take_the_admin_token_or_a_metrics_key() {
    let s = Server::start();
    let get = |bearer: Option<&str>| {
        let mut r = s.http().get(s.url("/metrics"));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        r.send().expect("get")
    };
    let anonymous = get(None);
    assert_eq!(anonymous.status(), 401);
    assert!(
        !anonymous.text().unwrap_or_default().contains("nimbus_"),
        "metrics shown without credentials"
    );
    let r = get(Some(&s.token()));
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap_or_default().contains("# TYPE"));
    let key = |name: &str, scope: &str| {
        s.json(&["keys", "create", name, "--scope", scope])["key"]
            .as_str()
            .expect("key")
            .to_string()
    };
    let (scoped, unscoped) = (key("prom", "metrics"), key("app", "invoke:*"));
    let r = get(Some(&scoped));
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap_or_default().contains("# TYPE"));
    assert_eq!(get(Some(&unscoped)).status(), 403);
    let r = s
        .http()
        .get(s.url("/metrics"))
        .header("x-api-key", &scoped)
        .send();
    assert_eq!(r.expect("get").status(), 200);
}
