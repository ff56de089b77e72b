//! Issue 25, "the server and the host": servers sharing a host (cgroup ownership), the
//! host's capacity budget, and a full data dir.

mod common;

use std::path::Path;

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
