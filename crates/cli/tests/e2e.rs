//! End-to-end: the real binary, real examples, real sandboxes, over the CLI and HTTP.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn deploys_and_runs_the_examples_over_cli_and_http() {
    let s = Server::start();
    for ex in ["python-hello", "node-hello", "exec-hello"] {
        let dep = s.json(&["deploy", example(ex).to_str().expect("path")]);
        assert_eq!(dep["version"], 1, "{dep}");
        assert_eq!(dep["created"], true);
        assert!(
            dep["digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:"))
        );
    }

    for name in ["hello", "hello-node", "hello-exec"] {
        // First call is cold, the second warm, both through the CLI envelope.
        let first = s.json(&["invoke", name, "--data", r#"{"name":"ada"}"#, "--logs"]);
        assert_eq!(first["status"], "success", "{first}");
        assert_eq!(first["result"]["message"], "hello ada", "{first}");
        assert_eq!(first["coldStart"], true, "{first}");
        assert!(
            first["logs"].as_str().is_some_and(|l| l.contains("ada")),
            "{first}"
        );
        let second = s.json(&["invoke", name, "--data", r#"{"name":"bob"}"#]);
        assert_eq!(second["coldStart"], false, "{second}");
        assert_eq!(second["result"]["message"], "hello bob");
    }

    // Evicting forces the next call to be cold again.
    let ev = s.json(&["evict", "hello"]);
    assert_eq!(ev["evicted"], 1, "{ev}");
    let cold = s.json(&["invoke", "hello"]);
    assert_eq!(cold["coldStart"], true, "{cold}");
    assert!(!s.cli(&["evict", "nope"]).status.success());

    // Plain CLI output is the result; --logs adds the function's output on stderr.
    let out = s.cli(&["invoke", "hello", "--data", r#"{"name":"cy"}"#, "--logs"]);
    assert!(out.status.success());
    let result: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(result["message"], "hello cy");
    assert!(stderr_of(&out).contains("cy"), "logs: {}", stderr_of(&out));

    // The event from stdin and from a file.
    let out = s.cli_stdin(
        &["invoke", "hello", "--data", "-"],
        Some(br#"{"name":"stdin"}"#),
    );
    assert!(
        stdout_of(&out).contains("hello stdin"),
        "{}",
        stderr_of(&out)
    );
    let ev = s.data.join("../event.json");
    std::fs::write(&ev, r#"{"name":"file"}"#).expect("write event");
    let out = s.ok(&["invoke", "hello", "--data", &format!("@{}", ev.display())]);
    assert!(out.contains("hello file"));

    // HTTP through the routes in nimbus.toml: payload 2.0 in, JSON out.
    let http = s.http();
    for (path, who) in [
        ("/hello/ada", "ada"),
        ("/hello-node/grace", "grace"),
        ("/hello-exec/linus", "linus"),
    ] {
        let r = http.get(s.url(path)).send().expect("GET");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.headers().contains_key("x-nimbus-request-id"));
        assert!(r.headers().contains_key("x-nimbus-cold-start"));
        assert!(r.headers().contains_key("x-nimbus-duration-ms"));
        let body: Value = r.json().expect("json");
        assert_eq!(body["message"], format!("hello {who}"), "{path}: {body}");
    }
    let r = http.get(s.url("/nope")).send().expect("GET");
    assert_eq!(r.status(), 404);
    let body: Value = r.json().expect("json error");
    assert_eq!(body["error"]["code"], "not_found");

    // Listing verbs work in both output formats.
    let ls = s.json(&["ls"]);
    assert_eq!(ls.as_array().map(Vec::len), Some(3));
    assert!(s.ok(&["ls"]).contains("hello-node"));
    let get = s.json(&["get", "hello"]);
    assert_eq!(get["config"]["runtime"], "python3");
    assert_eq!(get["routes"][0]["path"], "/hello/{name}");
    assert!(s.ok(&["get", "hello"]).contains("/hello/{name}"));
    assert!(s.ok(&["routes"]).contains("/hello-node/{name}"));
}

#[test]
fn versions_aliases_rollback_and_restart_keep_everything() {
    let mut s = Server::start();
    let dir = s.data.join("../fn");
    copy_dir(&example("python-hello"), &dir);
    let d = dir.to_str().expect("path").to_string();

    let v1 = s.json(&["deploy", &d]);
    assert_eq!(v1["version"], 1);
    // Unchanged code and config: no new version.
    let again = s.json(&["deploy", &d]);
    assert_eq!(again["version"], 1);
    assert_eq!(again["created"], false);
    assert!(s.ok(&["deploy", &d]).contains("unchanged"));

    // A config change makes version 2, and live follows it.
    let manifest = std::fs::read_to_string(dir.join("nimbus.toml")).expect("manifest");
    std::fs::write(
        dir.join("nimbus.toml"),
        manifest.replace("GREETING = \"hello\"", "GREETING = \"howdy\""),
    )
    .expect("edit");
    let v2 = s.json(&["deploy", &d]);
    assert_eq!(v2["version"], 2, "{v2}");
    let r = s.json(&["invoke", "hello", "--data", r#"{"name":"ada"}"#]);
    assert_eq!(r["result"]["message"], "howdy ada");
    assert_eq!(r["version"], 2);

    // Pin a version explicitly.
    let r = s.json(&[
        "invoke",
        "hello",
        "--version",
        "1",
        "--data",
        r#"{"name":"ada"}"#,
    ]);
    assert_eq!(r["result"]["message"], "hello ada");

    // Rollback moves live back; the HTTP route follows the alias.
    let rb = s.json(&["rollback", "hello"]);
    assert_eq!((rb["from"].as_u64(), rb["to"].as_u64()), (Some(2), Some(1)));
    let body: Value = s
        .http()
        .get(s.url("/hello/zed"))
        .send()
        .expect("GET")
        .json()
        .expect("json");
    assert_eq!(body["message"], "hello zed");
    let out = s.cli(&["rollback", "hello"]);
    assert!(!out.status.success(), "rollback past version 1 must fail");
    assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));

    s.ok(&["alias", "set", "hello", "live", "2"]);
    s.ok(&["alias", "set", "hello", "canary", "1"]);
    let r = s.json(&["invoke", "hello", "--alias", "canary", "--data", "{}"]);
    assert_eq!(r["version"], 1);
    let versions = s.json(&["versions", "hello"]);
    assert_eq!(versions.as_array().map(Vec::len), Some(2));
    assert_eq!(versions[1]["aliases"][0], "live");

    // Graceful restart: exit code 0 and the state is all there.
    let status = s.terminate();
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    let data = s.data.clone();
    let parent = Some(s.cgroup_parent.clone());
    let mut s2 = Server::start_on(&data, "127.0.0.1:0", parent.clone());
    let r = s2.json(&["invoke", "hello", "--data", r#"{"name":"ada"}"#]);
    assert_eq!(r["result"]["message"], "howdy ada");
    assert_eq!(
        s2.json(&["versions", "hello"]).as_array().map(Vec::len),
        Some(2)
    );

    // A crash (SIGKILL) loses nothing acknowledged either.
    let v3_manifest = std::fs::read_to_string(dir.join("nimbus.toml"))
        .expect("manifest")
        .replace("howdy", "hiya");
    std::fs::write(dir.join("nimbus.toml"), v3_manifest).expect("edit");
    assert_eq!(s2.json(&["deploy", &d])["version"], 3);
    let before = instance_cgroups(&s2.cgroup_parent);
    assert!(
        !before.is_empty(),
        "s2 runs instances (its warm one, its stem cells)"
    );
    s2.kill9();
    let s3 = Server::start_on(&data, "127.0.0.1:0", parent);
    // The killed server's instance cgroups were reaped at start-up (s3's own stem
    // cells may already be there; those are new names).
    let after = instance_cgroups(&s3.cgroup_parent);
    let stale: Vec<_> = before.intersection(&after).collect();
    assert!(stale.is_empty(), "stale instance cgroups remain: {stale:?}");
    let r = s3.json(&["invoke", "hello", "--data", r#"{"name":"ada"}"#]);
    assert_eq!(r["result"]["message"], "hiya ada");
    let aliases = s3.json(&["alias", "ls", "hello"]);
    assert!(aliases.to_string().contains("canary"));

    // rm removes the function, its routes and its versions.
    s3.ok(&["rm", "hello"]);
    let out = s3.cli(&["invoke", "hello"]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("not found"), "{}", stderr_of(&out));
    assert_eq!(
        s3.http()
            .get(s3.url("/hello/ada"))
            .send()
            .expect("GET")
            .status(),
        404
    );
}

#[test]
fn function_errors_timeouts_and_crashes_are_results_not_outages() {
    let s = Server::start();
    for f in ["fails-py", "fails-node", "slow-py", "crash-py"] {
        s.ok(&["deploy", fixture(f).to_str().expect("path")]);
    }
    // A handler exception: Lambda's error shape, non-zero exit, one error line.
    let out = s.cli(&["invoke", "fails-py"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("ZeroDivisionError"),
        "{}",
        stderr_of(&out)
    );
    let env = s.cli(&["invoke", "fails-py", "--output", "json"]);
    let env: Value = serde_json::from_slice(&env.stdout).expect("envelope");
    assert_eq!(env["status"], "function_error");
    assert_eq!(env["error"]["errorType"], "ZeroDivisionError");
    assert!(
        env["error"]["stackTrace"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );

    let env = s.cli(&["invoke", "fails-node", "--output", "json"]);
    let env: Value = serde_json::from_slice(&env.stdout).expect("envelope");
    assert_eq!(env["error"]["errorType"], "TypeError", "{env}");

    // Over HTTP the caller sees a 500 without internals.
    let r = s.http().get(s.url("/fails-py")).send().expect("GET");
    assert_eq!(r.status(), 500);
    let body = r.text().expect("body");
    assert!(!body.contains("ZeroDivisionError"), "{body}");

    // Past the timeout the instance is killed: 504, and the next call works.
    let r = s.http().get(s.url("/slow-py?sleep=5")).send().expect("GET");
    assert_eq!(r.status(), 504);
    let r = s.http().get(s.url("/slow-py?sleep=0")).send().expect("GET");
    assert_eq!(r.status(), 200);
    let out = s.cli(&[
        "invoke",
        "slow-py",
        "--data",
        r#"{"queryStringParameters":{"sleep":"5"}}"#,
    ]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("timeout"), "{}", stderr_of(&out));

    // A process that exits mid-invocation: 502, and the platform keeps serving.
    let r = s.http().get(s.url("/crash-py")).send().expect("GET");
    assert_eq!(r.status(), 502);
    let body: Value = r.json().expect("json");
    assert_eq!(body["error"]["code"], "function_crashed");
    let r = s.http().get(s.url("/fails-py")).send().expect("GET");
    assert_eq!(r.status(), 500, "server still serves");
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing() {
    let s = Server::start();
    let hello = example("python-hello");
    s.ok(&["deploy", hello.to_str().expect("path")]);
    s.ok(&["deploy", fixture("any-route").to_str().expect("path")]);

    for (case, needle) in [
        ("bad/bad-runtime", "runtime"),
        ("bad/bad-memory", "memory_mb"),
        ("bad/bad-timeout", "timeout"),
        ("bad/bad-route", "path"),
        ("bad/dup-route", "duplicate route"),
        ("bad/missing-handler", "handler"),
    ] {
        let out = s.cli(&["deploy", fixture(case).to_str().expect("path")]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{case}: {err}");
        assert_eq!(err.lines().count(), 1, "{case}: one line, got: {err}");
        assert!(err.starts_with("error: "), "{case}: {err}");
        assert!(
            err.contains("nimbus.toml") || case.ends_with("handler"),
            "{case}: {err}"
        );
        assert!(err.contains(needle), "{case}: {err}");
        assert!(!err.contains("panicked"), "{case}: {err}");
    }

    // A failed redeploy of a function leaves the previous version serving.
    let dir = s.data.join("../hello-bad");
    copy_dir(&hello, &dir);
    let m = std::fs::read_to_string(dir.join("nimbus.toml")).expect("manifest");
    std::fs::write(
        dir.join("nimbus.toml"),
        m.replace("memory_mb = 128", "memory_mb = 99999"),
    )
    .expect("edit");
    assert!(
        !s.cli(&["deploy", dir.to_str().expect("path")])
            .status
            .success()
    );
    let r = s.json(&["invoke", "hello", "--data", r#"{"name":"still"}"#]);
    assert_eq!(r["result"]["message"], "hello still");
    assert_eq!(
        s.json(&["versions", "hello"]).as_array().map(Vec::len),
        Some(1)
    );

    // A route that another function already owns is refused at deploy, naming both.
    let clash = s.data.join("../clash");
    copy_dir(&hello, &clash);
    let m = std::fs::read_to_string(clash.join("nimbus.toml")).expect("manifest");
    std::fs::write(
        clash.join("nimbus.toml"),
        m.replace("name = \"hello\"", "name = \"clash\""),
    )
    .expect("edit");
    let out = s.cli(&["deploy", clash.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("conflicts") && err.contains("hello") && err.contains("clash"),
        "{err}"
    );

    // API errors: status code plus the JSON error body.
    let check = |resp: reqwest::blocking::Response, status: u16, code: &str| {
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().expect("JSON error body");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    };
    let http = s.http();
    check(
        http.get(s.url("/v1/functions")).send().expect("req"),
        401,
        "unauthorized",
    );
    check(
        http.get(s.url("/v1/functions"))
            .bearer_auth("nmb_wrong")
            .send()
            .expect("req"),
        401,
        "unauthorized",
    );
    check(
        s.admin(reqwest::Method::GET, "/v1/functions/nope")
            .send()
            .expect("req"),
        404,
        "not_found",
    );
    check(
        s.admin(reqwest::Method::POST, "/v1/functions/nope/invoke")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .expect("req"),
        404,
        "not_found",
    );
    check(
        s.admin(reqwest::Method::POST, "/v1/functions/hello/invoke")
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .expect("req"),
        400,
        "bad_request",
    );
    let big = format!("\"{}\"", "x".repeat(6 * 1024 * 1024 + 10));
    let head = raw_http(
        &s.addr,
        &format!(
            "POST /v1/functions/hello/invoke HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
            s.token(),
            big.len()
        ),
    );
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("payload_too_large"), "{head}");
    let big_file = s.data.join("../big.json");
    std::fs::write(&big_file, &big).expect("write");
    let out = s.cli(&[
        "invoke",
        "hello",
        "--data",
        &format!("@{}", big_file.display()),
    ]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("limit"), "{}", stderr_of(&out));
    // The gateway refuses an oversized body from its Content-Length, before reading it.
    let head = raw_http(
        &s.addr,
        &format!(
            "POST /hello-any/ada HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            big.len()
        ),
    );
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("payload_too_large"), "{head}");
    check(
        s.admin(reqwest::Method::PUT, "/v1/functions/hello/aliases/live")
            .header("content-type", "application/json")
            .body(r#"{"version": 9}"#)
            .send()
            .expect("req"),
        404,
        "not_found",
    );
    check(
        s.admin(reqwest::Method::POST, "/v1/functions")
            .body("this is not a tarball")
            .send()
            .expect("req"),
        400,
        "invalid_archive",
    );

    // CLI: unknown function, bad JSON, unreachable server: one line, non-zero.
    for args in [
        vec!["invoke", "nope"],
        vec!["invoke", "hello", "--data", "{oops"],
        vec!["get", "nope"],
        vec!["alias", "set", "hello", "live", "7"],
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
    let out = std::process::Command::new(BIN)
        .args(["ls", "--server", "http://127.0.0.1:1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("cannot reach"),
        "{}",
        stderr_of(&out)
    );

    // Nothing was lost along the way.
    assert_eq!(s.json(&["ls"]).as_array().map(Vec::len), Some(2));
}

#[test]
fn hostile_archives_are_rejected_with_nothing_written() {
    let s = Server::start();
    let code_dir = s.data.join("artifacts/code");
    let before = std::fs::read_dir(&code_dir).map(|d| d.count()).unwrap_or(0);
    let manifest = "name = \"evil\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "zip slip",
            tar_with(manifest, |b| raw_entry(b, "../escape.py", b"x", "0000644")),
        ),
        (
            "absolute path",
            tar_with(manifest, |b| {
                raw_entry(b, "/tmp/nimbus-abs.py", b"x", "0000644")
            }),
        ),
        (
            "link outside",
            tar_with(manifest, |b| symlink_entry(b, "main.py", "/etc/passwd")),
        ),
    ];
    for (case, body) in cases {
        let r = s
            .admin(reqwest::Method::POST, "/v1/functions")
            .body(body)
            .send()
            .expect("req");
        assert_eq!(r.status(), 400, "{case}");
        let v: Value = r.json().expect("json");
        assert_eq!(v["error"]["code"], "invalid_archive", "{case}: {v}");
    }
    assert!(!std::path::Path::new("/tmp/nimbus-abs.py").exists());
    let after = std::fs::read_dir(&code_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(before, after, "no code dir was created");
    assert_eq!(s.json(&["ls"]).as_array().map(Vec::len), Some(0));
}

/// Sends raw bytes and returns what the server answers before it closes or goes quiet.
fn raw_http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Instance cgroup directories under a server's cgroup parent, in every hierarchy.
fn instance_cgroups(parent: &str) -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-path"])
        // Instances sit in the server's own cgroup below the parent: parent/owner/id.
        .arg(format!("*/{parent}/*/*"))
        .output()
        .expect("find");
    stdout_of(&out).lines().map(str::to_string).collect()
}

#[test]
fn dependencies_travel_in_the_artifact() {
    let s = Server::start();
    for f in ["py-deps", "node-deps"] {
        s.ok(&["deploy", fixture(f).to_str().expect("path")]);
    }
    let r = s.json(&["invoke", "py-deps", "--data", r#"{"name":"ada"}"#]);
    assert_eq!(r["result"]["shout"], "ADA!", "{r}");
    let r = s.json(&["invoke", "node-deps", "--data", r#"{"name":"ada"}"#]);
    assert_eq!(r["status"], "success", "{r}");
    // A second deploy of unchanged dependencies comes from the cache: same version.
    let again = s.json(&["deploy", fixture("py-deps").to_str().expect("path")]);
    assert_eq!(again["created"], false, "{again}");
}

#[test]
fn init_writes_functions_that_deploy_and_run() {
    let s = Server::start();
    for rt in ["python3", "node"] {
        let name = format!("made-{}", rt.trim_end_matches('3'));
        let dir = s.data.join("..").join(&name);
        s.ok(&[
            "init",
            &name,
            "--runtime",
            rt,
            "--dir",
            dir.to_str().expect("path"),
        ]);
        s.ok(&["deploy", dir.to_str().expect("path")]);
        let r = s.json(&["invoke", &name]);
        assert_eq!(r["status"], "success", "{r}");
        let resp = s
            .http()
            .get(s.url(&format!("/{name}")))
            .send()
            .expect("GET");
        assert_eq!(resp.status(), 200);
        // init refuses to overwrite.
        let out = s.cli(&["init", &name, "--dir", dir.to_str().expect("path")]);
        assert!(!out.status.success());
    }
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let mut s = Server::start();
    s.ok(&["deploy", fixture("slow-py").to_str().expect("path")]);
    // Warm up so the in-flight call below is not waiting on a cold start.
    assert_eq!(
        s.http()
            .get(s.url("/slow-py?sleep=0"))
            .send()
            .expect("GET")
            .status(),
        200
    );
    let url = s.url("/slow-py?sleep=1");
    let inflight =
        std::thread::spawn(move || reqwest::blocking::get(url).map(|r| r.status().as_u16()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(inflight.join().expect("thread").ok(), Some(200));
}

#[test]
fn structured_responses_and_greedy_paths_map_like_api_gateway() {
    let s = Server::start();
    s.ok(&["deploy", fixture("any-route").to_str().expect("path")]);
    let r = s
        .http()
        .post(s.url("/hello-any/a/b%2Fc/d.txt?x=1"))
        .header("cookie", "s=1")
        .body("ping")
        .send()
        .expect("POST");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-route"], "ANY /hello-any/{proxy+}");
    let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies.len(), 2);
    assert_eq!(r.text().expect("body"), "ping");
    // A route never matches a path outside its prefix, whatever the encoding.
    for path in ["/hello-anyx/a", "/%68ello-any/a", "/hello-any"] {
        let r = s.http().get(s.url(path)).send().expect("GET");
        assert_eq!(r.status(), 404, "{path}");
    }
}
