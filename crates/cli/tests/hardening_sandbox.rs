//! Issue 25, items 3 to 6, end to end inside the sandbox: orphans are reaped by the
//! instance's pid 1, nothing runs between invocations, only four socket families can be
//! created, and empty files fill `/tmp` with `ENOSPC` rather than the memory cgroup.
//! Fixtures are under `fixtures/sandbox-*`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const EPERM: i64 = 1;
const ENOSPC: i64 = 28;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn deploy(s: &Server, fixture_name: &str) {
    s.ok(&["deploy", path_str(&fixture(fixture_name))]);
}

/// An invocation that must succeed; returns the function's result.
fn call(s: &Server, function: &str, event: Value) -> Value {
    let (status, env) = invoke(s, function, &event);
    assert!(
        status == 200 && env["status"] == "success",
        "{function} {event}: HTTP {status}: {env}"
    );
    env["result"].clone()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// utime + stime of `pid`, in clock ticks; `None` once it is gone.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its `)`.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

// ---------------------------------------------------------------- item 3: zombies

/// 150 calls on one warm instance, each leaving an orphan that dies 10 ms later. Before
/// pid 1 reaped, the zombies filled the instance's 64 pids and `fork` failed from
/// about the 60th call on.
fn leaks_keep_working(s: &Server, function: &str) {
    let first = call(s, function, json!({}));
    for i in 1..150 {
        let r = call(s, function, json!({}));
        assert_eq!(
            r["pid"], first["pid"],
            "call {i} ran on another instance: {r}"
        );
    }
    let last = call(s, function, json!({"settle": true}));
    assert_eq!(last["pid"], first["pid"], "{last}");
    assert!(
        last["zombies"].as_i64().is_some_and(|z| z <= 2),
        "zombies left after 150 leaks: {last}"
    );
}

#[test]
fn orphans_are_reaped_in_fresh_python_and_exec_instances() {
    let s = Server::start_args(&["--stem-cells", "0"]);
    deploy(&s, "sandbox-zombies-py");
    deploy(&s, "sandbox-zombies-exec");
    leaks_keep_working(&s, "zombies-py");
    leaks_keep_working(&s, "zombies-exec");
}

/// Waits until the maintainer reports a ready stem cell for `runtime`, so the next
/// cold start of that runtime is served by one.
fn wait_for_stem(s: &Server, runtime: &str) {
    let gauge = format!("nimbus_stem_cells{{runtime=\"{runtime}\"}}");
    wait_for(
        &format!("a {runtime} stem cell"),
        Duration::from_secs(30),
        || {
            let metrics = s
                .admin(reqwest::Method::GET, "/metrics")
                .send()
                .and_then(|r| r.text())
                .unwrap_or_default();
            metrics
                .lines()
                .any(|l| {
                    l.starts_with(&gauge)
                        && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)
                })
                .then_some(())
        },
    );
}

#[test]
fn orphans_are_reaped_in_stem_cells_of_both_runtimes() {
    let s = Server::start();
    deploy(&s, "sandbox-zombies-py");
    deploy(&s, "sandbox-zombies-node");
    for (f, runtime) in [("zombies-py", "python3"), ("zombies-node", "node")] {
        wait_for_stem(&s, runtime);
        leaks_keep_working(&s, f);
        let ids = s.json(&["instances", f]);
        assert!(
            ids.as_array().is_some_and(|l| l
                .iter()
                .any(|i| i["id"].as_str().is_some_and(|id| id.starts_with("stem-")))),
            "{f} did not run in a stem cell: {ids}"
        );
    }
}

// ---------------------------------------------------------------- item 4: freezing

/// A detached grandchild that ignores SIGTERM and spins uses no CPU between
/// invocations; the next invocation works; idle retirement still kills it.
#[test]
fn a_detached_spinner_gets_no_cpu_between_invocations() {
    let s = Server::start_args(&["--stem-cells", "0"]);
    deploy(&s, "sandbox-freeze-py");
    let first = call(&s, "freeze-py", json!({"mode": "spawn"}));
    let spinner = wait_for("the spinner", Duration::from_secs(10), || {
        instance_pids(&s, "freeze-py")
            .into_iter()
            .find(|p| comm(*p) == "nimbus-spinner")
    });
    // Let a freeze that is still settling settle.
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(spinner).expect("spinner alive");
    std::thread::sleep(Duration::from_secs(2));
    let after = cpu_ticks(spinner).expect("spinner alive");
    assert!(
        after - before <= 2,
        "the spinner ran between invocations: {} ticks in 2 s",
        after - before
    );

    // Thawed for the next invocation, on the same instance, and again frozen after it.
    let next = call(&s, "freeze-py", json!({"mode": "ping"}));
    assert_eq!(next["pid"], first["pid"], "{next}");
    assert!(next["spinner_ticks"].as_u64().is_some(), "{next}");
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(spinner).expect("spinner alive");
    std::thread::sleep(Duration::from_secs(1));
    let after = cpu_ticks(spinner).expect("spinner alive");
    assert!(
        after - before <= 1,
        "{} ticks after the second call",
        after - before
    );

    // idle_timeout = 4s: the maintainer retires the frozen instance, spinner and all.
    let started = Instant::now();
    wait_for("the idle instance to go", Duration::from_secs(30), || {
        instance_pids(&s, "freeze-py").is_empty().then_some(())
    });
    assert!(
        cpu_ticks(spinner).is_none(),
        "spinner {spinner} outlived its instance"
    );
    eprintln!("retired after {:?}", started.elapsed());

    // A new instance starts and answers.
    call(&s, "freeze-py", json!({"mode": "ping"}));
}

/// Evicting a frozen instance kills everything in it at once.
#[test]
fn a_frozen_instance_can_be_evicted() {
    let s = Server::start_args(&["--stem-cells", "0"]);
    deploy(&s, "sandbox-freeze-py");
    call(&s, "freeze-py", json!({"mode": "spawn"}));
    wait_for("the spinner", Duration::from_secs(10), || {
        instance_pids(&s, "freeze-py")
            .into_iter()
            .find(|p| comm(*p) == "nimbus-spinner")
    });
    s.ok(&["evict", "freeze-py"]);
    wait_for(
        "the evicted instance to go",
        Duration::from_secs(10),
        || instance_pids(&s, "freeze-py").is_empty().then_some(()),
    );
    call(&s, "freeze-py", json!({"mode": "ping"}));
}

// ---------------------------------------------------------------- item 5: socket families

#[test]
fn only_four_socket_families_can_be_created() {
    let s = Server::start_args(&["--stem-cells", "0"]);
    deploy(&s, "sandbox-sockets-py");
    let r = call(&s, "sockets-py", json!({}));
    let allowed = [
        "unix",
        "unix_dgram",
        "inet_tcp",
        "inet_udp",
        "inet6_tcp",
        "netlink_route",
    ];
    let sockets = r["socket"].as_object().expect("socket results");
    assert!(sockets.len() > 30, "{r}");
    let wrong: Vec<String> = sockets
        .iter()
        .filter(|(name, got)| {
            if allowed.contains(&name.as_str()) {
                *got != "ok"
            } else {
                got["errno"] != EPERM
            }
        })
        .map(|(name, got)| format!("{name}: {got}"))
        .collect();
    assert!(wrong.is_empty(), "wrong outcomes: {wrong:#?}");
    assert_eq!(r["socketpair"]["unix"], "ok", "{r}");
    for name in ["vsock", "netlink_audit", "tipc"] {
        assert_eq!(
            r["socketpair"][name]["errno"], EPERM,
            "socketpair {name}: {r}"
        );
    }
    assert_eq!(r["getaddrinfo"], "ok", "{r}");
}

// ---------------------------------------------------------------- item 6: /tmp inodes

#[test]
fn empty_files_end_in_enospc_not_an_oom_kill() {
    let s = Server::start_args(&["--stem-cells", "0"]);
    deploy(&s, "sandbox-inodes-py");
    let first = call(&s, "inodes-py", json!({}));
    // 128 MB: /tmp is 64 MiB with one inode per 16 KiB, /dev/shm half of that.
    for (dir, most) in [("/tmp/many", 4096), ("/dev/shm/many", 2048)] {
        let (status, env) = invoke(
            &s,
            "inodes-py",
            &json!({"mode": "fill", "dir": dir, "limit": 200000}),
        );
        assert!(
            status == 200 && env["status"] == "success",
            "filling {dir}: HTTP {status}: {env}"
        );
        let r = &env["result"];
        assert_eq!(r["errno"], ENOSPC, "filling {dir}: {r}");
        assert!(
            r["files"].as_u64().is_some_and(|n| n > 100 && n <= most),
            "filling {dir}: {r}"
        );
        let again = call(&s, "inodes-py", json!({}));
        assert_eq!(
            again["pid"], first["pid"],
            "the instance was replaced: {again}"
        );
    }
}

// ---------------------------------------------------------------- stem cells and limits

#[test]
fn stem_cells_get_the_same_scratch_caps() {
    let s = Server::start();
    deploy(&s, "sandbox-inodes-py");
    wait_for_stem(&s, "python3");
    let (status, env) = invoke(
        &s,
        "inodes-py",
        &json!({"mode": "fill", "dir": "/dev/shm/many", "limit": 200000}),
    );
    assert_eq!(status, 200, "{env}");
    assert_eq!(env["result"]["errno"], ENOSPC, "{env}");
    assert!(
        env["result"]["files"].as_u64().is_some_and(|n| n <= 2048),
        "{env}"
    );
    let ids = s.json(&["instances", "inodes-py"]);
    assert!(
        ids.to_string().contains("\"stem-"),
        "not a stem cell: {ids}"
    );
}
