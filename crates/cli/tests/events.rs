//! Topics and durable publishing end to end: the CLI and the three HTTP modes
//! (structured, batch, binary), de-duplication, API keys with `publish:<topic>`, bad
//! input, retention, and the crash test: producers publishing while the server is
//! SIGKILLed and restarted, after which every acknowledged event is in the topic.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn publish_http(
    s: &Server,
    topic: &str,
    content_type: &str,
    body: String,
    auth: Option<(&str, &str)>,
) -> reqwest::blocking::Response {
    let mut r = s
        .http()
        .post(s.url(&format!("/v1/topics/{topic}/events")))
        .header("content-type", content_type)
        .body(body);
    if let Some((h, v)) = auth {
        r = r.header(h, v);
    }
    r.send().expect("publish")
}

fn read_all(s: &Server, topic: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let v: Value = s
            .admin(
                reqwest::Method::GET,
                &format!("/v1/topics/{topic}/events?from={from}&limit=5000"),
            )
            .send()
            .expect("read")
            .json()
            .expect("json");
        let events = v["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            return out;
        }
        from = v["next_offset"].as_i64().expect("next");
        out.extend(events);
    }
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": "t.created", "data": {"n": id}})
}

#[test]
fn topics_and_publishing_over_the_cli_and_http() {
    let s = Server::start();
    s.ok(&["topic", "create", "orders", "--retention", "7d"]);
    let e = s.cli(&["topic", "create", "orders"]);
    assert!(!e.status.success());
    assert!(
        stderr_of(&e).contains("already exists"),
        "{}",
        stderr_of(&e)
    );
    for (args, want) in [
        (vec!["topic", "create", "Bad Name"], "name"),
        (
            vec!["topic", "create", "x", "--retention", "0s"],
            "retention",
        ),
        (
            vec!["topic", "create", "x", "--max-bytes", "lots"],
            "max_bytes",
        ),
    ] {
        let o = s.cli(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr_of(&o).contains(want), "{args:?}: {}", stderr_of(&o));
    }

    // CLI publish: acknowledged with an offset; the same id again is a duplicate.
    let out = s.ok(&[
        "publish",
        "orders",
        "--type",
        "order.created",
        "--source",
        "shop",
        "--data",
        r#"{"amount": 5}"#,
        "--key",
        "customer-42",
        "--id",
        "o-1",
    ]);
    assert!(out.contains("at offset 0"), "{out}");
    let again = s.ok(&[
        "publish",
        "orders",
        "--type",
        "order.created",
        "--source",
        "shop",
        "--id",
        "o-1",
    ]);
    assert!(again.contains("duplicate"), "{again}");

    // Structured, batch and binary over HTTP with the admin token.
    let token = s.token();
    let bearer = format!("Bearer {token}");
    let admin = Some(("authorization", bearer.as_str()));
    let r = publish_http(
        &s,
        "orders",
        "application/cloudevents+json",
        event("h-1").to_string(),
        admin,
    );
    assert_eq!(r.status(), 200);
    let v: Value = r.json().expect("json");
    assert_eq!(v["results"][0]["offset"], 1);
    let batch = json!([event("b-1"), event("b-2"), event("h-1")]).to_string();
    let v: Value = publish_http(
        &s,
        "orders",
        "application/cloudevents-batch+json",
        batch,
        admin,
    )
    .json()
    .expect("json");
    let dups: Vec<bool> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["duplicate"].as_bool().expect("bool"))
        .collect();
    assert_eq!(dups, vec![false, false, true]);
    let r = s
        .http()
        .post(s.url("/v1/topics/orders/events"))
        .header("authorization", &bearer)
        .header("ce-specversion", "1.0")
        .header("ce-id", "bin-1")
        .header("ce-source", "/shop")
        .header("ce-type", "order.paid")
        .header("ce-partitionkey", "customer-42")
        .header("content-type", "application/json")
        .body(r#"{"paid": true}"#)
        .send()
        .expect("binary");
    assert_eq!(r.status(), 200);

    let events = read_all(&s, "orders");
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["o-1", "h-1", "b-1", "b-2", "bin-1"]);
    assert_eq!(events[0]["event"]["data"]["amount"], 5);
    assert_eq!(events[0]["event"]["partitionkey"], "customer-42");
    assert_eq!(events[4]["event"]["data"]["paid"], true);
    assert!(events[4]["event"]["time"].is_string(), "time is stamped");

    let stats = s.ok(&["topic", "stats", "orders"]);
    assert!(stats.contains("events     5"), "{stats}");
    let listed = s.json(&["topic", "ls"]);
    assert_eq!(listed[0]["count"], 5);

    // Bad input: clear 4xx, nothing stored.
    for (ct, body, status) in [
        ("application/cloudevents+json", "{".to_string(), 400),
        (
            "application/cloudevents+json",
            json!({"id": "x"}).to_string(),
            400,
        ),
        (
            "application/cloudevents-batch+json",
            json!([event("ok"), {"specversion": "1.0"}]).to_string(),
            400,
        ),
        ("text/csv", "a,b".to_string(), 415),
    ] {
        let r = publish_http(&s, "orders", ct, body, admin);
        assert_eq!(r.status(), status);
        let v: Value = r.json().expect("error body");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // Oversized: one event over 1 MiB is refused (400), a request over 16 MiB before
    // it is read (413); neither stores anything.
    let mut big = event("big");
    big["data"] = json!("x".repeat(1024 * 1024 + 1));
    let r = publish_http(
        &s,
        "orders",
        "application/cloudevents+json",
        big.to_string(),
        admin,
    );
    assert_eq!(r.status(), 400);
    // Declared over the limit: answered 413 from the head alone (the server does not
    // read the body, so a client still sending would see the connection close).
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&s.addr).expect("connect");
        write!(
            c,
            "POST /v1/topics/orders/events HTTP/1.1\r\nhost: x\r\nauthorization: {bearer}\r\n\
             content-type: application/cloudevents-batch+json\r\ncontent-length: {}\r\n\r\n[",
            16 * 1024 * 1024 + 1
        )
        .expect("write head");
        let mut head = [0u8; 12];
        c.read_exact(&mut head).expect("read status");
        assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    }
    let r = publish_http(
        &s,
        "nope",
        "application/cloudevents+json",
        event("x").to_string(),
        admin,
    );
    assert_eq!(r.status(), 404);
    assert_eq!(read_all(&s, "orders").len(), 5);
    let o = s.cli(&["publish", "nope", "--type", "t", "--source", "s"]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("not found"), "{}", stderr_of(&o));

    s.ok(&["topic", "rm", "orders"]);
    assert!(!s.cli(&["topic", "get", "orders"]).status.success());
}

#[test]
fn api_keys_publish_only_to_their_topics() {
    let s = Server::start_args(&["--control-listen", "127.0.0.1:0"]);
    s.ok(&["topic", "create", "orders"]);
    s.ok(&["topic", "create", "audit"]);
    let key = s.json(&["keys", "create", "producer", "--scope", "publish:orders"])["key"]
        .as_str()
        .expect("key")
        .to_string();
    let body = || event(&uuid()).to_string();
    let ct = "application/cloudevents+json";
    // On the public listener: no credentials, a wrong topic, the admin token (which
    // belongs on the control listener only), then the right key.
    assert_eq!(publish_http(&s, "orders", ct, body(), None).status(), 401);
    assert_eq!(
        publish_http(&s, "audit", ct, body(), Some(("x-api-key", &key))).status(),
        403
    );
    let bearer = format!("Bearer {}", s.token());
    assert_eq!(
        publish_http(&s, "orders", ct, body(), Some(("authorization", &bearer))).status(),
        401
    );
    let r = publish_http(&s, "orders", ct, body(), Some(("x-api-key", &key)));
    assert_eq!(r.status(), 200);
    // Reading stays an admin matter.
    let r = s
        .http()
        .get(s.url("/v1/topics/orders/events"))
        .header("x-api-key", &key)
        .send()
        .expect("read");
    assert!(r.status().is_client_error(), "{}", r.status());
}

fn uuid() -> String {
    format!("{:032x}", rand_u128())
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let a = h.finish() as u128;
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(a as u64);
    (a << 64) | h.finish() as u128
}

#[test]
fn retention_removes_old_and_oversized_events() {
    let s = Server::start_args(&["--topic-retention-interval", "100ms"]);
    s.ok(&["topic", "create", "short", "--retention", "1s"]);
    s.ok(&["topic", "create", "small", "--max-bytes", "2KB"]);
    for i in 0..10 {
        let id = format!("e{i}");
        s.ok(&[
            "publish", "short", "--type", "t", "--source", "s", "--id", &id,
        ]);
        s.ok(&[
            "publish",
            "small",
            "--type",
            "t",
            "--source",
            "s",
            "--id",
            &id,
            "--data",
            &format!("\"{}\"", "x".repeat(400)),
        ]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let short = s.json(&["topic", "get", "short"]);
        let small = s.json(&["topic", "get", "small"]);
        let small_ok = small["bytes"].as_i64().expect("bytes") <= 2000;
        if short["count"] == 0 && small_ok {
            assert!(small["count"].as_i64().expect("count") >= 1, "{small}");
            // Offsets are never reused.
            assert_eq!(small["next_offset"], 10);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retention did not run: {short} {small}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn acknowledged_events_survive_sigkill() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Arc::new(Mutex::new(Server::start_with(&data, &[])));
    server
        .lock()
        .expect("lock")
        .ok(&["topic", "create", "crash"]);
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let kills = 3;
    let mut producers = Vec::new();
    for p in 0..4 {
        let (server, acked, stop) = (Arc::clone(&server), Arc::clone(&acked), Arc::clone(&stop));
        producers.push(std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (url, token) = {
                    let s = server.lock().expect("lock");
                    (s.url("/v1/topics/crash/events"), s.token())
                };
                let id = format!("p{p}-{i}");
                let r = client
                    .post(url)
                    .bearer_auth(token)
                    .header("content-type", "application/cloudevents+json")
                    .body(event(&id).to_string())
                    .send();
                if let Ok(r) = r
                    && r.status() == 200
                {
                    acked.lock().expect("lock").insert(id);
                }
                i += 1;
            }
        }));
    }
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(700));
        let mut s = server.lock().expect("lock");
        s.kill9();
        *s = Server::start_with(&data, &[]);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.join().expect("producer");
    }
    let s = server.lock().expect("lock");
    let stored: BTreeSet<String> = read_all(&s, "crash")
        .iter()
        .map(|e| e["event"]["id"].as_str().expect("id").to_string())
        .collect();
    let acked = acked.lock().expect("lock");
    let lost: Vec<&String> = acked.difference(&stored).collect();
    eprintln!(
        "crash test: {} acknowledged, {} stored, lost {} over {kills} kills",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(
        acked.len() > 100,
        "too few publishes to mean anything: {}",
        acked.len()
    );
    assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");
}
