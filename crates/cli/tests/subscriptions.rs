//! Subscriptions end to end: real server, real Python functions. Filtered manifest
//! subscriptions, retries into a dead-letter topic, batches with partial failures,
//! replay by offset and time, topic stats lag, ordered delivery per key under
//! concurrency, and the crash test: the server SIGKILLed twice while deliveries run,
//! after which every acknowledged event was delivered at least once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn ev(id: &str, ty: &str, key: Option<&str>, data: Value) -> Value {
    let mut e = json!({"specversion": "1.0", "id": id, "source": "test", "type": ty, "data": data});
    if let Some(k) = key {
        e["partitionkey"] = k.into();
    }
    e
}

/// One HTTP batch: one commit, so a subscription reads them together.
fn publish(s: &Server, topic: &str, events: Vec<Value>) {
    let r = s
        .admin(reqwest::Method::POST, &format!("/v1/topics/{topic}/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events).to_string())
        .send()
        .expect("publish");
    assert!(
        r.status().is_success(),
        "publish: {}",
        r.text().unwrap_or_default()
    );
}

/// What the function printed, one `SAW` line per event it received, in time order.
fn saw(s: &Server, function: &str) -> Vec<Value> {
    let out = s.cli(&["logs", function, "--limit", "1000"]);
    let mut v: Vec<Value> = stdout_of(&out)
        .lines()
        .filter_map(|l| l.split_once("SAW ").map(|(_, j)| j))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    v.sort_by(|a, b| {
        a["t"]
            .as_f64()
            .partial_cmp(&b["t"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v
}

fn count(seen: &[Value], id: &str) -> usize {
    seen.iter().filter(|e| e["id"] == id).count()
}

fn read_topic(s: &Server, topic: &str) -> Vec<Value> {
    let v: Value = s
        .admin(
            reqwest::Method::GET,
            &format!("/v1/topics/{topic}/events?limit=1000"),
        )
        .send()
        .expect("read")
        .json()
        .expect("json");
    v["events"].as_array().cloned().unwrap_or_default()
}

fn lag(s: &Server, topic: &str, sub: &str) -> i64 {
    let t = s.json(&["topic", "stats", topic]);
    t["subscriptions"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == sub))
        .and_then(|x| x["lag"].as_i64())
        .unwrap_or_else(|| panic!("no subscription {sub} in {t}"))
}

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn filters_dead_letters_batches_replay_and_lag() {
    let s = Server::start_args(&["--event-retry-base", "100ms"]);
    // A manifest subscription to a missing topic is refused, nothing stored.
    let o = s.cli(&["deploy", fixture("sub-manifest-py").to_str().expect("path")]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("topic `orders` not found"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(
        stderr_of(&o)
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{}",
        stderr_of(&o)
    );
    for t in ["orders", "orders-dlq", "jobs", "jobs-dlq"] {
        s.ok(&["topic", "create", t]);
    }
    s.ok(&["deploy", fixture("sub-manifest-py").to_str().expect("path")]);
    s.ok(&["deploy", fixture("sub-py").to_str().expect("path")]);
    let subs = s.json(&["subscription", "ls"]);
    assert_eq!(subs[0]["name"], "sink-manifest-orders", "{subs}");
    assert_eq!(subs[0]["source"], "manifest");

    // Filtered: order.created reaches the function, order.cancelled never does.
    publish(
        &s,
        "orders",
        vec![
            ev("m-1", "order.created", None, json!({"seq": 1})),
            ev("m-2", "order.cancelled", None, json!({"seq": 2})),
        ],
    );
    wait_for("m-1 delivered", WAIT, || {
        (count(&saw(&s, "sink-manifest"), "m-1") == 1).then_some(())
    });
    wait_for("lag 0", WAIT, || {
        (lag(&s, "orders", "sink-manifest-orders") == 0).then_some(())
    });
    assert_eq!(
        count(&saw(&s, "sink-manifest"), "m-2"),
        0,
        "a filtered-out event was delivered"
    );

    // Bad subscriptions: one line, non-zero, naming the problem.
    for (args, want) in [
        (
            vec![
                "subscribe",
                "jobs",
                "--function",
                "sink",
                "--filter",
                r#"{"type":"x"}"#,
            ],
            "filter",
        ),
        (
            vec!["subscribe", "nope", "--function", "sink"],
            "topic `nope` not found",
        ),
        (
            vec!["subscribe", "jobs", "--function", "ghost"],
            "function `ghost` not found",
        ),
        (
            vec![
                "subscribe",
                "jobs",
                "--function",
                "sink",
                "--max-age",
                "soon",
            ],
            "max_age",
        ),
    ] {
        let o = s.cli(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr_of(&o).contains(want), "{args:?}: {}", stderr_of(&o));
    }

    // Retries, then the dead-letter topic, with the error attached.
    s.ok(&[
        "subscribe",
        "jobs",
        "--function",
        "sink",
        "--name",
        "jobs-sub",
        "--max-attempts",
        "3",
        "--dead-letter",
        "jobs-dlq",
    ]);
    publish(
        &s,
        "jobs",
        vec![
            ev("j-1", "job", None, json!({"fail": true})),
            ev("j-2", "job", None, json!({})),
        ],
    );
    let dead = wait_for("a dead letter", WAIT, || {
        read_topic(&s, "jobs-dlq").into_iter().next()
    });
    let d = &dead["event"];
    assert_eq!(d["type"], "nimbus.deadletter", "{d}");
    assert_eq!(d["subscription"], "jobs-sub", "{d}");
    assert_eq!(d["attempts"], 3, "{d}");
    assert_eq!(d["data"]["event"]["id"], "j-1", "{d}");
    assert!(
        d["data"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("failing on purpose"),
        "{d}"
    );
    let seen = wait_for("3 attempts logged", WAIT, || {
        let v = saw(&s, "sink");
        (count(&v, "j-1") >= 3).then_some(v)
    });
    assert_eq!(count(&seen, "j-1"), 3, "attempts of j-1");
    assert_eq!(count(&seen, "j-2"), 1);
    assert_eq!(read_topic(&s, "jobs-dlq").len(), 1);
    let sub = s.json(&["subscription", "get", "jobs-sub"]);
    assert_eq!(
        (sub["lag"].as_i64(), sub["retrying"].as_i64()),
        (Some(0), Some(0)),
        "{sub}"
    );

    // A batch with a partial failure: only the failed item is retried.
    s.ok(&["topic", "create", "bulk"]);
    s.ok(&[
        "subscribe",
        "bulk",
        "--function",
        "sink",
        "--name",
        "bulk-sub",
        "--batch",
        "10",
        "--max-attempts",
        "2",
    ]);
    publish(
        &s,
        "bulk",
        vec![
            ev("b-1", "x", None, json!({})),
            ev("b-2", "x", None, json!({"fail": true})),
            ev("b-3", "x", None, json!({})),
        ],
    );
    let seen = wait_for("b-2 twice", WAIT, || {
        let v = saw(&s, "sink");
        (count(&v, "b-2") >= 2).then_some(v)
    });
    wait_for("bulk settled", WAIT, || {
        (lag(&s, "bulk", "bulk-sub") == 0).then_some(())
    });
    let seen = {
        let _ = seen;
        saw(&s, "sink")
    };
    assert_eq!(
        (
            count(&seen, "b-1"),
            count(&seen, "b-2"),
            count(&seen, "b-3")
        ),
        (1, 2, 1)
    );
    let first = seen.iter().find(|e| e["id"] == "b-1").expect("b-1");
    assert_eq!(
        first["batch"], 3,
        "one invocation carried the three: {first}"
    );

    // Replay by offset: m-1 again (m-2 still filtered out).
    let r = s.ok(&[
        "subscription",
        "reset",
        "sink-manifest-orders",
        "--offset",
        "0",
    ]);
    assert!(r.contains("offset 0"), "{r}");
    wait_for("m-1 replayed", WAIT, || {
        (count(&saw(&s, "sink-manifest"), "m-1") == 2).then_some(())
    });
    // By time: far in the past is offset 0, the future is the end.
    let r = s.json(&[
        "subscription",
        "reset",
        "jobs-sub",
        "--to",
        "2100-01-01T00:00:00Z",
    ]);
    assert_eq!(r["cursor"], 2, "{r}");
    let r = s.json(&[
        "subscription",
        "reset",
        "jobs-sub",
        "--to",
        "2000-01-01T00:00:00Z",
    ]);
    assert_eq!(r["cursor"], 0, "{r}");
    wait_for("j-2 replayed", WAIT, || {
        (count(&saw(&s, "sink"), "j-2") == 2).then_some(())
    });
    let o = s.cli(&["subscription", "reset", "jobs-sub", "--to", "yesterday"]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("RFC 3339"), "{}", stderr_of(&o));

    // Deleting a subscription, then the function: its manifest subscription goes too.
    s.ok(&["subscription", "rm", "bulk-sub"]);
    assert!(!s.cli(&["subscription", "get", "bulk-sub"]).status.success());
    s.ok(&["rm", "sink-manifest"]);
    let names: Vec<String> = s
        .json(&["subscription", "ls"])
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, vec!["jobs-sub".to_string()]);
}

#[test]
fn ordered_delivery_keeps_publish_order_per_key_under_concurrency() {
    let s = Server::start();
    s.ok(&["topic", "create", "seq"]);
    s.ok(&["deploy", fixture("sub-py").to_str().expect("path")]);
    s.ok(&[
        "subscribe",
        "seq",
        "--function",
        "sink",
        "--name",
        "seq-sub",
        "--ordered",
    ]);
    let keys = ["k0", "k1", "k2"];
    let mut events = Vec::new();
    for n in 0..24 {
        let key = keys[n % 3];
        events.push(ev(
            &format!("o-{n}"),
            "x",
            Some(key),
            json!({"seq": n, "sleep": 0.05}),
        ));
    }
    publish(&s, "seq", events);
    let seen = wait_for("all 24", WAIT, || {
        let v = saw(&s, "sink");
        (v.len() >= 24).then_some(v)
    });
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &seen {
        per_key
            .entry(e["key"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(e["seq"].as_i64().unwrap_or(-1));
    }
    for (k, seqs) in &per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {seqs:?}"
        );
        assert_eq!(seqs.len(), 8, "key {k}: {seqs:?}");
    }
    // The keys did run side by side (up to max_instances = 4).
    let t = |i: usize| seen[i]["t"].as_f64().unwrap_or(0.0);
    let overlapping = (1..seen.len()).filter(|&i| t(i) - t(i - 1) < 0.04).count();
    eprintln!(
        "ordered: {overlapping} of {} deliveries started within 40 ms of the previous",
        seen.len()
    );
}

#[test]
fn every_acknowledged_event_is_delivered_across_two_sigkills() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let sink_dir = tmp.path().join("sink");
    std::fs::create_dir_all(&sink_dir).expect("sink dir");
    // The function's uid is not ours: let it append.
    let _ = std::process::Command::new("chmod")
        .arg("0777")
        .arg(&sink_dir)
        .status();
    let sink = sink_dir.join("seen.log");
    let f = tmp.path().join("fn");
    copy_dir(&fixture("sub-py"), &f);
    let manifest = std::fs::read_to_string(f.join("nimbus.toml")).expect("manifest");
    std::fs::write(
        f.join("nimbus.toml"),
        format!("{manifest}\n[env]\nSINK = \"{}\"\n", sink.display()),
    )
    .expect("write");
    // A file outside the sandbox is the one record that outlives a SIGKILL of the
    // server on the function's side; so this test runs functions unsandboxed.
    let flags = ["--insecure-no-sandbox", "--event-retry-base", "100ms"];
    let mut s = Server::start_with(&data, &flags);
    s.ok(&["topic", "create", "crash"]);
    s.ok(&["deploy", f.to_str().expect("path")]);
    s.ok(&[
        "subscribe",
        "crash",
        "--function",
        "sink",
        "--name",
        "crash-sub",
    ]);
    const N: usize = 120;
    let mut acked = BTreeSet::new();
    for chunk in 0..(N / 10) {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                let n = chunk * 10 + i;
                ev(
                    &format!("c-{n}"),
                    "x",
                    None,
                    json!({"seq": n, "sleep": 0.1}),
                )
            })
            .collect();
        publish(&s, "crash", events);
        acked.extend((chunk * 10..chunk * 10 + 10).map(|n| format!("c-{n}")));
    }
    let read_sink = || -> Vec<String> {
        std::fs::read_to_string(&sink)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["id"].as_str().map(String::from))
            .collect()
    };
    for round in 0..2 {
        // Kill while deliveries are running: some seen, not all.
        let before = read_sink().len();
        wait_for("deliveries running", WAIT, || {
            (read_sink().len() >= before + 15).then_some(())
        });
        s.kill9();
        eprintln!(
            "crash test: SIGKILL {} after {} deliveries",
            round + 1,
            read_sink().len()
        );
        s = Server::start_with(&data, &flags);
    }
    wait_for(
        "every acknowledged event delivered",
        Duration::from_secs(120),
        || {
            let seen: BTreeSet<String> = read_sink().into_iter().collect();
            acked.is_subset(&seen).then_some(())
        },
    );
    wait_for("lag 0", WAIT, || {
        (lag(&s, "crash", "crash-sub") == 0).then_some(())
    });
    let all = read_sink();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &all {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let dups: Vec<(&&str, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!(
        "crash test: {} acknowledged, {} deliveries, {} distinct, {} delivered more than once: {:?}",
        acked.len(),
        all.len(),
        counts.len(),
        dups.len(),
        dups
    );
    assert_eq!(counts.len(), N);
}
