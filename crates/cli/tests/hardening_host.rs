//! Issue 25, "the server and the host": servers sharing a host (cgroup ownership), the
//! host's capacity budget, and a full data dir.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

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

/// Instance cgroup directories called `id` under `parent`, in any hierarchy.
fn cgroups_named(parent: &str, id: &str) -> Vec<String> {
    let out = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "5", "-type", "d", "-path"])
        .arg(format!("*/{parent}/*/{id}"))
        .output()
        .expect("find");
    stdout_of(&out).lines().map(str::to_string).collect()
}

#[test]
fn servers_sharing_a_cgroup_parent_keep_each_others_instances() {
    let parent = format!("nimbus-host-{}-shared", std::process::id());
    let (t1, t2) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let (d1, d2) = (t1.path().join("data"), t2.path().join("data"));
    let (mut s1, id1) = warm_server(&d1, &parent);
    let (s2, id2) = warm_server(&d2, &parent);

    // s1 dies without cleaning up and comes back: its start-up reaps what it left, and
    // nothing of s2's.
    s1.kill9();
    assert!(
        !cgroups_named(&parent, &id1).is_empty(),
        "no orphan to reap"
    );
    let s1 = Server::start_on(&d1, "127.0.0.1:0", Some(parent.clone()));
    let (cold, msg) = hello(&s2, "c");
    assert_eq!(msg, "hello c");
    assert_eq!(cold, false, "s2's instance survived s1's restart");
    assert_eq!(instance_ids(&s2, "hello"), vec![id2.clone()]);
    assert_eq!(hello(&s1, "d").0, true, "s1 starts afresh");
    // ... having reaped its own orphan, which no server would ever talk to again.
    assert!(cgroups_named(&parent, &id1).is_empty(), "s1's orphan left");
    assert!(!cgroups_named(&parent, &id2).is_empty(), "s2's cgroup gone");

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

    // A call waiting at a spent budget takes an instance the moment one goes idle.
    let busy = [call("1.5"), call("1.5")];
    wait_for("both instances busy", Duration::from_secs(5), || {
        let list = s.json(&["instances", "sleepy-py"]);
        let n = list
            .as_array()
            .map_or(0, |l| l.iter().filter(|i| i["state"] == "busy").count());
        (n == 2).then_some(())
    });
    let (code, _, body) = call("0").join().expect("waiting call");
    assert_eq!(code, 200, "{body}");
    for b in busy {
        assert_eq!(b.join().expect("busy call").0, 200);
    }
    assert_eq!(instance_ids(&s, "sleepy-py").len(), 2);

    // Moving `live` to a version whose floor no longer fits is refused as well.
    let dir = tempfile::tempdir().expect("tmp");
    let deploy_min = |name: &str, min: u32| {
        let d = dir.path().join(format!("{name}-{min}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("main.py"), "def handler(e, c):\n    return 1\n").expect("w");
        let manifest = format!(
            "name = \"{name}\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n\
             concurrency = {{ min_instances = {min}, max_instances = 2 }}\n"
        );
        std::fs::write(d.join("nimbus.toml"), manifest).expect("w");
        s.json(&["deploy", d.to_str().expect("path")])["version"].clone()
    };
    assert_eq!(deploy_min("floored", 1), 1);
    assert_eq!(deploy_min("floored", 0), 2);
    deploy_min("other", 2);
    for args in [
        &["alias", "set", "floored", "live", "1"][..],
        &["rollback", "floored"][..],
    ] {
        let out = s.cli(args);
        assert!(
            !out.status.success(),
            "{args:?}: live moved past the budget"
        );
        let err = stderr_of(&out);
        assert!(err.contains("budget (2 instances"), "{args:?}: {err}");
    }
    assert_eq!(status(&s)["floor"]["instances"], 2);
}

/// A tmpfs mounted for one test, unmounted (lazily, so a straggler cannot fail it)
/// when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount a tmpfs (the test needs root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes 1 MiB blocks into `path` until the filesystem refuses (ENOSPC).
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let block = vec![0x5au8; 1 << 20];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    let _ = f.sync_all();
}

fn health(s: &Server) -> String {
    let r = s.http().get(s.url("/health")).send().expect("health");
    assert_eq!(r.status(), 200);
    r.text().unwrap_or_default()
}

fn metric(s: &Server, name: &str) -> Option<f64> {
    let text = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("metrics")
        .text()
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The writes the issue lists: (what, status, error code).
fn writes(s: &Server, n: u32) -> Vec<(&'static str, u16, String)> {
    let code = |r: reqwest::blocking::Response| {
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap_or(Value::Null);
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    };
    let manifest =
        format!("name = \"filler-{n}\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n");
    let archive = tar_with(&manifest, |raw| {
        raw_entry(
            raw,
            "main.py",
            b"def handler(e, c):\n    return 1\n",
            "0000644",
        )
    });
    let mut out = Vec::new();
    let r = s
        .admin(reqwest::Method::POST, "/v1/functions")
        .body(archive)
        .send();
    let (st, c) = code(r.expect("deploy"));
    out.push(("deploy", st, c));
    let r = s
        .admin(reqwest::Method::POST, "/v1/functions/hello/invoke")
        .header("x-nimbus-invocation-type", "Event")
        .json(&serde_json::json!({"name": "async"}))
        .send();
    let (st, c) = code(r.expect("async invoke"));
    out.push(("async invoke", st, c));
    let r = s
        .admin(reqwest::Method::POST, "/v1/topics")
        .json(&serde_json::json!({"name": format!("t{n}")}))
        .send();
    let (st, c) = code(r.expect("topic create"));
    out.push(("topic create", st, c));
    let r = s
        .admin(reqwest::Method::POST, "/v1/topics/orders/events")
        .header("content-type", "application/cloudevents+json")
        .json(&serde_json::json!({"specversion": "1.0", "id": format!("e{n}"), "source": "test", "type": "t"}))
        .send();
    let (st, c) = code(r.expect("publish"));
    out.push(("publish", st, c));
    out
}

#[test]
fn a_full_data_dir_answers_507_stays_healthy_for_reads_and_recovers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let _mount = Tmpfs::mount(&data, "64m");
    let s = Server::start_with(&data, &[]);
    s.ok(&["deploy", example("python-hello").to_str().expect("path")]);
    s.ok(&["topic", "create", "orders"]);
    assert_eq!(hello(&s, "warm").1, "hello warm");
    assert_eq!(health(&s), "ok\n");
    assert_eq!(metric(&s, "nimbus_storage_full"), Some(0.0));

    fill(&data.join("filler"));
    wait_for("/health to say degraded", Duration::from_secs(10), || {
        health(&s).starts_with("degraded").then_some(())
    });
    assert_eq!(metric(&s, "nimbus_storage_full"), Some(1.0));
    assert_eq!(status(&s)["storage_full"], true);
    assert!(s.ok(&["status"]).contains("storage: FULL"));
    for (what, status, code) in writes(&s, 1) {
        assert_eq!(
            (what, status, code.as_str()),
            (what, 507, "insufficient_storage")
        );
    }
    // What needs no write is still served: sync invokes, over the CLI and a route.
    for name in ["a", "b"] {
        assert_eq!(hello(&s, name).1, format!("hello {name}"));
    }
    let r = s
        .http()
        .get(s.url("/hello/route"))
        .send()
        .expect("GET route");
    assert_eq!(r.status(), 200);
    // Two seconds full: the state change is logged once, the checkpoint failure at
    // most once, not every 500 ms.
    std::thread::sleep(Duration::from_secs(2));
    let log = s.stderr();
    assert_eq!(log.matches("the data dir is full").count(), 1, "{log}");
    assert!(log.matches("event log checkpoint").count() <= 1, "{log}");

    std::fs::remove_file(data.join("filler")).expect("free space");
    wait_for("/health to say ok", Duration::from_secs(10), || {
        (health(&s) == "ok\n").then_some(())
    });
    assert_eq!(metric(&s, "nimbus_storage_full"), Some(0.0));
    assert_eq!(status(&s)["storage_full"], false);
    let after = writes(&s, 2);
    let want = [
        ("deploy", 201),
        ("async invoke", 202),
        ("topic create", 201),
        ("publish", 200),
    ];
    for ((what, status, code), (w, st)) in after.into_iter().zip(want) {
        assert_eq!((what, status), (w, st), "{code}");
    }
    assert_eq!(s.stderr().matches("has room again").count(), 1);
}
