//! Pools end to end: provisioned concurrency, scale to zero, throttling past
//! max_instances, draining on deploy, and the admin verbs that steer them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn instances(s: &Server, function: &str) -> Vec<Value> {
    s.json(&["instances", function])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls until `pred` holds for the function's instances, or fails after `limit`.
fn wait_instances(
    s: &Server,
    function: &str,
    limit: Duration,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let list = instances(s, function);
        if pred(&list) {
            return list;
        }
        assert!(
            start.elapsed() < limit,
            "instances of {function} never matched; last: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_instances_scale_to_zero_and_min_instances_stay_warm() {
    let s = Server::start();
    let f = fixture("sleepy-py");
    s.ok(&["deploy", f.to_str().expect("path")]);
    assert!(
        instances(&s, "sleepy-py").is_empty(),
        "nothing runs before the first call"
    );

    let r = s.json(&["invoke", "sleepy-py"]);
    assert_eq!(r["coldStart"], true);
    let list = instances(&s, "sleepy-py");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["state"], "idle");
    assert_eq!(list[0]["invocations"], 1);
    assert!(
        list[0]["memoryBytes"]
            .as_u64()
            .or(list[0]["memory_bytes"].as_u64())
            .unwrap_or(0)
            > 0,
        "{list:?}"
    );

    // idle_timeout = 1s: the instance goes away by itself (scale to zero).
    wait_instances(&s, "sleepy-py", Duration::from_secs(5), |l| l.is_empty());

    // Provisioned concurrency: two instances start without any call and stay.
    let scaled = s.json(&["scale", "sleepy-py", "--min", "2"]);
    assert_eq!(scaled["min_instances"], 2, "{scaled}");
    wait_instances(&s, "sleepy-py", Duration::from_secs(10), |l| {
        l.len() == 2 && l.iter().all(|i| i["state"] == "idle")
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        instances(&s, "sleepy-py").len(),
        2,
        "min instances outlive idle_timeout"
    );
    let r = s.json(&["invoke", "sleepy-py"]);
    assert_eq!(
        r["coldStart"], false,
        "a provisioned instance serves warm: {r}"
    );

    // Back to the manifest: the pool is drained and scales to zero again.
    s.ok(&["scale", "sleepy-py", "--reset"]);
    wait_instances(&s, "sleepy-py", Duration::from_secs(5), |l| l.is_empty());

    // Bad input to scale is refused with one line.
    for args in [
        vec!["scale", "sleepy-py", "--min", "3", "--max", "2"],
        vec!["scale", "sleepy-py", "--max", "0"],
        vec!["scale", "nope", "--min", "1"],
        vec!["scale", "sleepy-py"],
    ] {
        let out = s.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(
            stderr_of(&out).lines().count(),
            1,
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
}

#[test]
fn calls_past_max_instances_get_429_with_retry_after() {
    let s = Server::start();
    s.ok(&["deploy", fixture("sleepy-py").to_str().expect("path")]);
    s.ok(&["scale", "sleepy-py", "--max", "1"]);
    let url = s.url("/sleepy?sleep=4");
    let busy = std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
            .get(url)
            .send()
            .map(|r| r.status().as_u16())
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let r = s.http().get(s.url("/sleepy?sleep=0")).send().expect("GET");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let body: Value = r.json().expect("json");
    assert_eq!(body["error"]["code"], "throttled");
    // It queued briefly (about 2 s) before giving up, rather than failing at once.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(busy.join().expect("thread").ok(), Some(200));
    // With the slot free again, calls go through.
    assert_eq!(
        s.http()
            .get(s.url("/sleepy?sleep=0"))
            .send()
            .expect("GET")
            .status(),
        200
    );
}

#[test]
fn a_deploy_drains_the_old_versions_instances() {
    let s = Server::start();
    let dir = s.data.join("../sleepy");
    copy_dir(&fixture("sleepy-py"), &dir);
    let d = dir.to_str().expect("path").to_string();
    s.ok(&["deploy", &d]);
    // A long idle timeout, so only draining can remove the instance.
    s.ok(&["invoke", "sleepy-py"]);
    let list = instances(&s, "sleepy-py");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["version"], 1);

    let m = std::fs::read_to_string(dir.join("nimbus.toml")).expect("manifest");
    std::fs::write(
        dir.join("nimbus.toml"),
        m.replace("idle_timeout = \"1s\"", "idle_timeout = \"5m\""),
    )
    .expect("edit");
    assert_eq!(s.json(&["deploy", &d])["version"], 2);
    wait_instances(&s, "sleepy-py", Duration::from_secs(3), |l| {
        l.iter().all(|i| i["version"] != 1)
    });
    let r = s.json(&["invoke", "sleepy-py"]);
    assert_eq!(r["version"], 2);
    // And an alias move drains too (rollback: live -> 1).
    s.ok(&["rollback", "sleepy-py"]);
    wait_instances(&s, "sleepy-py", Duration::from_secs(3), |l| {
        l.iter().all(|i| i["version"] != 2)
    });
}
