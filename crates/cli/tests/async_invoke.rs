//! Async invocation end to end: 202 at once, status from queued/running to succeeded
//! with the result, retries then `failed` with an on-failure destination record,
//! on-success destinations, bad input, and the crash test: invocations queued while
//! the server is SIGKILLed twice during dispatch all run at least once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn invoke_async(s: &Server, function: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut r = s
        .admin(
            reqwest::Method::POST,
            &format!("/v1/functions/{function}/invoke"),
        )
        .header("x-nimbus-invocation-type", "Event")
        .header("content-type", "application/json")
        .body(body.to_string());
    for (h, v) in headers {
        r = r.header(*h, *v);
    }
    let resp = r.send().expect("invoke");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn status(s: &Server, id: &str) -> Value {
    s.json(&["invocation", "get", id])
}

/// Polls an invocation until it reaches one of `want`, or panics after `limit`.
fn wait_status(s: &Server, id: &str, want: &[&str], limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = status(s, id);
        if want.iter().any(|w| v["status"] == *w) {
            return v;
        }
        assert!(start.elapsed() < limit, "{id} stuck: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn topic_events(s: &Server, topic: &str) -> Vec<Value> {
    let v: Value = s
        .admin(
            reqwest::Method::GET,
            &format!("/v1/topics/{topic}/events?from=0&limit=1000"),
        )
        .send()
        .expect("read")
        .json()
        .expect("json");
    v["events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["event"].clone()).collect())
        .unwrap_or_default()
}

fn wait_events(s: &Server, topic: &str, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let e = topic_events(s, topic);
        if e.len() >= n || start.elapsed() > Duration::from_secs(20) {
            return e;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn async_invocations_run_retry_and_publish_destinations() {
    let s = Server::start_args(&["--async-retry-base", "100ms"]);
    s.ok(&["deploy", fixture("async-py").to_str().expect("path")]);
    s.ok(&["topic", "create", "done"]);
    s.ok(&["topic", "create", "dlq"]);

    // A slow function: the 202 comes at once, the result later.
    let t = Instant::now();
    let (code, queued) = invoke_async(&s, "async-py", json!({"sleep": 1.5}), &[]);
    assert_eq!(code, 202, "{queued}");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    let id = queued["request_id"].as_str().expect("id").to_string();
    let early = status(&s, &id);
    assert!(
        early["status"] == "queued" || early["status"] == "running",
        "{early}"
    );
    let done = wait_status(&s, &id, &["succeeded"], Duration::from_secs(30));
    assert_eq!(done["attempts"], 1, "{done}");
    assert_eq!(done["result"]["id"], id.as_str(), "{done}");
    assert_eq!(done["result"]["echo"]["sleep"], 1.5);
    assert_eq!(done["source"], "api");

    // On-success destination, through the CLI.
    let out = s.ok(&[
        "invoke",
        "async-py",
        "--async",
        "--data",
        r#"{"n": 7}"#,
        "--on-success",
        "done",
    ]);
    let ok_id = out.trim().to_string();
    wait_status(&s, &ok_id, &["succeeded"], Duration::from_secs(30));
    let events = wait_events(&s, "done", 1);
    assert_eq!(events.len(), 1, "{events:?}");
    let rec = &events[0]["data"];
    assert_eq!(events[0]["type"], "nimbus.invocation.success");
    assert_eq!(rec["version"], "1.0");
    assert_eq!(rec["requestContext"]["requestId"], ok_id.as_str());
    assert_eq!(rec["requestContext"]["condition"], "Success");
    assert_eq!(rec["requestContext"]["approximateInvokeCount"], 1);
    assert!(
        rec["requestContext"]["functionArn"]
            .as_str()
            .is_some_and(|a| a.contains(":function:async-py:")),
        "{rec}"
    );
    assert_eq!(rec["requestPayload"], json!({"n": 7}));
    assert_eq!(rec["responseContext"]["statusCode"], 200);
    assert_eq!(rec["responseContext"]["executedVersion"], "1");
    assert_eq!(rec["responsePayload"]["echo"], json!({"n": 7}));
    assert!(rec["timestamp"].is_string());

    // A failing function: 1 + max_retries attempts, then failed with the last error
    // and an on-failure record. Lambda's X-Amz-Invocation-Type works too.
    let (code, q) = invoke_async(
        &s,
        "async-py",
        json!({"fail": true}),
        &[
            ("x-amz-invocation-type", "Event"),
            ("x-nimbus-max-retries", "1"),
            ("x-nimbus-on-failure", "dlq"),
        ],
    );
    assert_eq!(code, 202, "{q}");
    let fid = q["request_id"].as_str().expect("id").to_string();
    let failed = wait_status(&s, &fid, &["failed"], Duration::from_secs(30));
    assert_eq!(failed["attempts"], 2, "{failed}");
    assert_eq!(failed["max_attempts"], 2);
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("asked to fail")),
        "{failed}"
    );
    assert!(
        failed["record"].is_object(),
        "metering record merged: {failed}"
    );
    let dlq = wait_events(&s, "dlq", 1);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let rec = &dlq[0]["data"];
    assert_eq!(dlq[0]["type"], "nimbus.invocation.failure");
    assert_eq!(rec["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(rec["requestContext"]["approximateInvokeCount"], 2);
    assert_eq!(rec["responseContext"]["functionError"], "Unhandled");
    assert_eq!(rec["responsePayload"]["errorType"], "ValueError");
    assert_eq!(rec["requestPayload"], json!({"fail": true}));

    // Bad input.
    let (code, e) = invoke_async(&s, "nope", json!({}), &[]);
    assert_eq!(code, 404, "{e}");
    for (h, v) in [
        ("x-nimbus-invocation-type", "Sometimes"),
        ("x-nimbus-max-retries", "3"),
        ("x-nimbus-max-retries", "two"),
        ("x-nimbus-max-event-age", "7h"),
        ("x-nimbus-on-failure", "no-such-topic"),
    ] {
        let resp = s
            .admin(reqwest::Method::POST, "/v1/functions/async-py/invoke")
            .header(
                "x-nimbus-invocation-type",
                if h == "x-nimbus-invocation-type" {
                    v
                } else {
                    "Event"
                },
            )
            .header(h, v)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .expect("invoke");
        assert_eq!(resp.status().as_u16(), 400, "{h}: {v}");
    }
    // Async options without the async type are refused rather than ignored.
    let resp = s
        .admin(reqwest::Method::POST, "/v1/functions/async-py/invoke")
        .header("x-nimbus-max-retries", "1")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .expect("invoke");
    assert_eq!(resp.status().as_u16(), 400);
    let o = s.cli(&["invoke", "async-py", "--async", "--max-retries", "3"]);
    assert!(!o.status.success());
    let err = stderr_of(&o);
    assert!(err.contains("max retries"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let o = s.cli(&["invocation", "get", "no-such-id"]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("not found"), "{}", stderr_of(&o));
}

#[test]
fn accepted_invocations_survive_sigkill_during_dispatch() {
    const N: usize = 40;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let mut s = Server::start_with(&data, &[]);
    s.ok(&["deploy", fixture("async-py").to_str().expect("path")]);
    let mut ids = BTreeSet::new();
    for i in 0..N {
        let (code, q) = invoke_async(&s, "async-py", json!({"sleep": 0.3, "i": i}), &[]);
        assert_eq!(code, 202, "{q}");
        ids.insert(q["request_id"].as_str().expect("id").to_string());
    }
    // Twice: let dispatch get going, then SIGKILL mid-flight and restart.
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(1200));
        s.kill9();
        s = Server::start_with(&data, &[]);
        eprintln!("crash round {round}: restarted");
    }
    let start = Instant::now();
    let mut attempts: BTreeMap<String, u64> = BTreeMap::new();
    for id in &ids {
        let v = wait_status(
            &s,
            id,
            &["succeeded"],
            Duration::from_secs(120).saturating_sub(start.elapsed()),
        );
        attempts.insert(id.clone(), v["attempts"].as_u64().unwrap_or(0));
    }
    // Attempts count claims: a claim cut off by the SIGKILL may or may not have run
    // the function before the crash, so >1 is a possible duplicate (at-least-once).
    let again: Vec<_> = attempts.iter().filter(|(_, a)| **a > 1).collect();
    eprintln!(
        "crash test: {N} accepted, {N} succeeded, {} started more than once (possible duplicates): {again:?}",
        again.len()
    );
    assert_eq!(attempts.len(), N);
}
