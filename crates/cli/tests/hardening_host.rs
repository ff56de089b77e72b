//! Issue 25, "the server and the host": servers sharing a host (cgroup ownership), the
//! host's capacity budget, and a full data dir.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The ids of `function`'s instances, sorted.
fn instance_ids(s: &Server, function: &str) -> Vec<String> {
    let mut ids: Vec<String> = s
        .json(&["instances", function])
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|i| i["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Invokes `hello` and returns (coldStart, result message).
fn hello(s: &Server, name: &str) -> (Value, String) {
    let r = s.json(&[
        "invoke",
        "hello",
        "--data",
        &format!(r#"{{"name":"{name}"}}"#),
    ]);
    let msg = r["result"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (r["coldStart"].clone(), msg)
}

/// Starts a server on `data` under the shared `parent`, deploys `hello` and warms one
/// instance; returns the server and that instance's id.
fn warm_server(data: &Path, parent: &str) -> (Server, String) {
    let s = Server::start_on(data, "127.0.0.1:0", Some(parent.to_string()));
    s.ok(&["deploy", example("python-hello").to_str().expect("path")]);
    assert_eq!(hello(&s, "a").0, true, "first call is cold");
    assert_eq!(hello(&s, "b").0, false, "second call is warm");
    let ids = instance_ids(&s, "hello");
    assert_eq!(ids.len(), 1, "{ids:?}");
    (s, ids[0].clone())
}

#[test]
fn servers_sharing_a_cgroup_parent_keep_each_others_instances() {
    let parent = format!("nimbus-host-{}-shared", std::process::id());
    let (t1, t2) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let (d1, d2) = (t1.path().join("data"), t2.path().join("data"));
    let (mut s1, _) = warm_server(&d1, &parent);
    let (s2, id2) = warm_server(&d2, &parent);

    // s1 dies without cleaning up and comes back: its start-up reaps what it left, and
    // nothing of s2's.
    s1.kill9();
    let s1 = Server::start_on(&d1, "127.0.0.1:0", Some(parent.clone()));
    let (cold, msg) = hello(&s2, "c");
    assert_eq!(msg, "hello c");
    assert_eq!(cold, false, "s2's instance survived s1's restart");
    assert_eq!(instance_ids(&s2, "hello"), vec![id2.clone()]);
    assert_eq!(hello(&s1, "d").0, true, "s1 starts afresh");

    // A second server on s2's data dir is refused before it touches anything.
    let o = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&d2)
        .env("NIMBUS_CGROUP_PARENT", &parent)
        .output()
        .expect("run serve");
    assert!(
        !o.status.success(),
        "a second server on one data dir started"
    );
    let err = stderr_of(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("in use by another nimbus serve") && err.contains(&s2.pid().to_string()),
        "{err}"
    );
    for name in ["e", "f"] {
        let (cold, msg) = hello(&s2, name);
        assert_eq!((cold, msg), (Value::Bool(false), format!("hello {name}")));
    }
    assert_eq!(instance_ids(&s2, "hello"), vec![id2]);
}

fn status(s: &Server) -> Value {
    s.json(&["status"])
}

#[test]
fn the_host_budget_refuses_floors_that_cannot_fit_and_throttles_past_it() {
    let s = Server::start_args(&["--max-instances", "2"]);
    let st = status(&s);
    assert_eq!(st["budget"]["max_instances"], 2, "{st}");
    let mem_total_mb = std::fs::read_to_string("/proc/meminfo")
        .expect("meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("MemTotal")
        / 1024;
    let mem = st["budget"]["max_memory_mb"].as_u64().unwrap_or(0);
    assert!(
        mem > 0 && mem <= mem_total_mb * 3 / 4,
        "default memory budget {mem} MB"
    );

    // A floor of 1000 instances is refused at deploy, naming the budget; nothing stored.
    let f = fixture("host-min1000");
    let out = s.cli(&["deploy", f.to_str().expect("path")]);
    assert!(!out.status.success(), "min_instances = 1000 deployed");
    let err = stderr_of(&out);
    assert!(err.contains("budget (2 instances"), "{err}");
    let manifest = std::fs::read_to_string(f.join("nimbus.toml")).expect("manifest");
    let archive = tar_with(&manifest, |raw| {
        raw_entry(
            raw,
            "main.py",
            b"def handler(e, c):\n    return 1\n",
            "0000644",
        )
    });
    let r = s
        .admin(reqwest::Method::POST, "/v1/functions")
        .body(archive)
        .send()
        .expect("deploy");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().expect("json");
    assert_eq!(body["error"]["code"], "over_capacity", "{body}");
    assert!(
        !s.cli(&["get", "host-min1000"]).status.success(),
        "stored anyway"
    );

    // The same through scale: refused, the scaling unchanged.
    s.ok(&["deploy", fixture("sleepy-py").to_str().expect("path")]);
    let r = s
        .admin(reqwest::Method::POST, "/v1/functions/sleepy-py/scale")
        .json(&serde_json::json!({"min_instances": 1000, "max_instances": 1000}))
        .send()
        .expect("scale");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("budget (2 instances"),
        "{body}"
    );
    let got = s.json(&["get", "sleepy-py"]);
    assert_eq!(got["config"]["concurrency"]["min_instances"], 0, "{got}");
    assert_eq!(status(&s)["floor"]["instances"], 0);

    // At run time: two instances run, the third cold start is 429, never a third sandbox.
    let call = |secs: &str| {
        let url = s.url(&format!("/sleepy?sleep={secs}"));
        std::thread::spawn(move || {
            let r = reqwest::blocking::Client::new()
                .get(url)
                .send()
                .expect("GET");
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
                r.text().unwrap_or_default(),
            )
        })
    };
    let busy = [call("6"), call("6")];
    wait_for("two instances in use", Duration::from_secs(20), || {
        (status(&s)["usage"]["instances"] == 2).then_some(())
    });
    let (code, retry_after, body) = call("0").join().expect("third");
    assert_eq!(code, 429, "{body}");
    assert!(retry_after, "429 without Retry-After");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["error"]["code"], "throttled", "{body}");
    assert_eq!(instance_ids(&s, "sleepy-py").len(), 2);
    let table = s.ok(&["status"]);
    assert!(
        table.contains("budget") && table.contains("in use"),
        "{table}"
    );
    for b in busy {
        let (code, _, body) = b.join().expect("busy call");
        assert_eq!(code, 200, "{body}");
    }
    // Within the budget again: served warm.
    let r = s.json(&["invoke", "sleepy-py"]);
    assert_eq!(r["coldStart"], false, "{r}");
}
