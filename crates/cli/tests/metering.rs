//! End-to-end metering: every invocation leaves a record; usage, logs, recommendations
//! and Prometheus metrics agree with the workload that was run.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Records are written off the invocation path: poll until `done` holds.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn usage_row<'a>(usage: &'a Value, function: &str) -> &'a Value {
    usage["usage"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["function"] == function))
        .unwrap_or_else(|| panic!("no usage row for {function}: {usage}"))
}

fn total_invocations(usage: &Value) -> u64 {
    usage["usage"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["invocations"].as_u64()).sum())
        .unwrap_or(0)
}

/// Runs `invoke` with `-o json` and returns the envelope, whether or not it failed.
fn invoke(s: &Server, name: &str, data: &str) -> Value {
    let out = s.cli(&["invoke", name, "--data", data, "--output", "json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", stdout_of(&out), stderr_of(&out)))
}

#[test]
fn a_known_workload_shows_in_usage_logs_records_and_metrics() {
    let s = Server::start();
    s.json(&["deploy", example("python-hello").to_str().expect("path")]);
    s.json(&["deploy", fixture("fails-py").to_str().expect("path")]);

    let mut ids = Vec::new();
    let mut cold = 0;
    for i in 0..5 {
        let env = invoke(&s, "hello", &format!(r#"{{"name":"n{i}"}}"#));
        assert_eq!(env["status"], "success", "{env}");
        cold += u64::from(env["coldStart"] == true);
        ids.push(env["requestId"].as_str().expect("request id").to_string());
    }
    for _ in 0..2 {
        let env = invoke(&s, "fails-py", "{}");
        assert_eq!(env["status"], "function_error", "{env}");
        cold += u64::from(env["coldStart"] == true);
        ids.push(env["requestId"].as_str().expect("request id").to_string());
    }
    // One cold start per function: sequential calls reuse the warm instance.
    assert_eq!(cold, 2);

    let usage = eventually("7 records", || {
        let u = s.json(&["usage"]);
        (total_invocations(&u) == 7).then_some(u)
    });
    let hello = usage_row(&usage, "hello");
    assert_eq!(hello["invocations"], 5, "{usage}");
    assert_eq!(hello["errors"], 0, "{usage}");
    assert_eq!(hello["cold_starts"], 1, "{usage}");
    let fails = usage_row(&usage, "fails-py");
    assert_eq!(fails["invocations"], 2, "{usage}");
    assert_eq!(fails["errors"], 2, "{usage}");
    assert_eq!(fails["cold_starts"], 1, "{usage}");
    assert!(hello["duration_p50_ms"].as_f64().is_some_and(|d| d > 0.0));
    assert!(hello["duration_p99_ms"].as_f64() >= hello["duration_p50_ms"].as_f64());

    // Every invocation has its record, and usage GB-s is their sum.
    let mut gb_by_fn = std::collections::BTreeMap::<String, f64>::new();
    for id in &ids {
        let r = s
            .admin(reqwest::Method::GET, &format!("/v1/invocations/{id}"))
            .send()
            .expect("GET record");
        assert_eq!(r.status(), 200, "{id}");
        let rec: Value = r.json().expect("record JSON");
        assert_eq!(rec["request_id"], id.as_str());
        assert_eq!(rec["trigger"], "api");
        assert_eq!(rec["memory_mb"], 128);
        let duration = rec["duration_ms"].as_f64().expect("duration");
        let init = rec["init_duration_ms"].as_f64().unwrap_or(0.0);
        let billed = rec["billed_ms"].as_u64().expect("billed");
        assert_eq!(billed, (duration + init).ceil() as u64, "{rec}");
        let gb = rec["gb_seconds"].as_f64().expect("gb");
        assert!((gb - 128.0 / 1024.0 * billed as f64 / 1000.0).abs() < 1e-12);
        // What the instance really used, from its cgroup: a Python interpreter holds
        // megabytes and spends some CPU on every call.
        let peak = rec["peak_memory_bytes"].as_u64().unwrap_or(0);
        assert!(peak > 1024 * 1024 && peak <= 128 * 1024 * 1024, "{rec}");
        assert!(rec["cpu_ms"].as_f64().is_some_and(|c| c > 0.0), "{rec}");
        *gb_by_fn
            .entry(rec["function"].as_str().expect("fn").to_string())
            .or_default() += gb;
        if rec["function"] == "fails-py" {
            assert_eq!(rec["status"], "function_error");
            assert_eq!(rec["error_type"], "ZeroDivisionError", "{rec}");
        }
    }
    for (name, row) in [("hello", hello), ("fails-py", fails)] {
        let gb = row["gb_seconds"].as_f64().expect("gb_seconds");
        assert!(gb > 0.0);
        assert!(
            (gb - gb_by_fn[name]).abs() < 1e-9,
            "{name}: {gb} vs {gb_by_fn:?}"
        );
    }
    let r = s
        .admin(reqwest::Method::GET, "/v1/invocations/no-such-request")
        .send()
        .expect("GET");
    assert_eq!(r.status(), 404);

    // Bucketed usage and the table.
    let by_hour = s.json(&["usage", "--by", "hour", "--function", "hello"]);
    assert_eq!(by_hour["by"], "hour");
    let rows = by_hour["usage"].as_array().expect("rows");
    assert!(
        rows.iter()
            .all(|r| r["function"] == "hello" && r["bucket_start_ms"].is_i64())
    );
    assert_eq!(total_invocations(&by_hour), 5);
    let table = s.ok(&["usage"]);
    assert!(
        table.contains("hello") && table.contains("fails-py"),
        "{table}"
    );

    // One invocation's logs, as "<time> <request id> <line>".
    let out = s.ok(&["logs", "hello", "--request", &ids[2]]);
    let line = out
        .lines()
        .find(|l| l.contains("greeting n2"))
        .unwrap_or_else(|| panic!("no log line in {out}"));
    let fields: Vec<&str> = line.splitn(3, ' ').collect();
    assert_eq!(fields[1], ids[2], "{line}");
    assert!(
        fields[0].ends_with('Z') && fields[0].contains('T'),
        "{line}"
    );
    assert!(
        !out.contains("greeting n1"),
        "other invocations leaked: {out}"
    );
    // Without a request: the recent lines of every invocation.
    let all = s.ok(&["logs", "hello"]);
    assert_eq!(all.matches(" greeting n").count(), 5, "{all}");
    assert!(s.ok(&["logs", "fails-py"]).contains("about to fail"));

    // Prometheus text, with the admin token (it names every function and route).
    let metrics = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .expect("GET /metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().expect("metrics text");
    for want in [
        r#"nimbus_invocations_total{function="hello",version="1",status="success"} 5"#,
        r#"nimbus_invocations_total{function="fails-py",version="1",status="function_error"} 2"#,
        r#"nimbus_cold_starts_total{function="hello"} 1"#,
        "nimbus_invocation_duration_seconds_bucket{function=\"hello\"",
        "nimbus_metering_records_dropped_total 0",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }

    // python-hello needs a few MB of its 128: a smaller size, and what it would save.
    let rec = s.json(&["usage", "--recommend"]);
    let hello_rec = rec["recommendations"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["function"] == "hello"))
        .unwrap_or_else(|| panic!("no recommendation for hello: {rec}"));
    assert_eq!(hello_rec["current_memory_mb"], 128, "{hello_rec}");
    let suggested = hello_rec["recommended_memory_mb"].as_u64();
    assert!(
        suggested.is_some_and(|m| (64..=128).contains(&m)),
        "{hello_rec}"
    );
    if suggested.is_some_and(|m| m < 128) {
        assert_eq!(hello_rec["action"], "lower");
        assert!(
            hello_rec["gb_seconds_saved"]
                .as_f64()
                .is_some_and(|g| g > 0.0)
        );
    }
    assert!(s.ok(&["usage", "--recommend"]).contains("hello"));
}

#[test]
fn bad_queries_are_one_line_errors() {
    let s = Server::start();
    s.json(&["deploy", example("python-hello").to_str().expect("path")]);

    for (path, needle) in [
        ("/v1/usage?since=yesterday", "`since`"),
        ("/v1/usage?by=week", "`by`"),
        ("/v1/functions/hello/logs?limit=0", "`limit`"),
        ("/v1/functions/hello/logs?after=x", "`after`"),
    ] {
        let r = s.admin(reqwest::Method::GET, path).send().expect("GET");
        assert_eq!(r.status(), 400, "{path}");
        let body: Value = r.json().expect("error JSON");
        assert_eq!(body["error"]["code"], "bad_request", "{path}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: {msg}");
    }
    let r = s
        .admin(reqwest::Method::GET, "/v1/functions/nope/logs")
        .send()
        .expect("GET");
    assert_eq!(r.status(), 404);
    // The usage API sits behind the admin token like the rest of /v1.
    let r = s.http().get(s.url("/v1/usage")).send().expect("GET");
    assert_eq!(r.status(), 401);

    for args in [
        &["usage", "--function", "nope"][..],
        &["logs", "nope"][..],
        &["usage", "--since", "soon"][..],
    ] {
        let out = s.cli(args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr_of(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    assert!(stderr_of(&s.cli(&["usage", "--function", "nope"])).contains("`nope` not found"));
    // Nothing ran yet: an empty report, not an error.
    assert!(s.ok(&["usage"]).contains("no invocations"));
}

#[test]
fn logs_follow_prints_new_lines_and_ends_cleanly_on_ctrl_c() {
    let s = Server::start();
    s.json(&["deploy", example("python-hello").to_str().expect("path")]);

    let mut child = Command::new(BIN)
        .args(["logs", "hello", "-f"])
        .env("NIMBUS_SERVER", s.url(""))
        .env("NIMBUS_DATA_DIR", &s.data)
        .env_remove("NIMBUS_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn logs -f");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Let it take its first (empty) page, then make new lines.
    std::thread::sleep(Duration::from_millis(700));
    let mut ids = Vec::new();
    for who in ["follow-1", "follow-2"] {
        let env = invoke(&s, "hello", &format!(r#"{{"name":"{who}"}}"#));
        ids.push(env["requestId"].as_str().expect("id").to_string());
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    assert_eq!(seen.len(), 2, "followed lines: {seen:?}");
    assert!(
        seen[0].contains(&ids[0]) && seen[0].ends_with("greeting follow-1"),
        "{seen:?}"
    );
    assert!(
        seen[1].contains(&ids[1]) && seen[1].ends_with("greeting follow-2"),
        "{seen:?}"
    );

    signal(child.id(), "INT");
    let status =
        wait_timeout(&mut child, Duration::from_secs(10)).expect("logs -f exits on SIGINT");
    assert!(status.success(), "exit status after Ctrl-C: {status:?}");
}
