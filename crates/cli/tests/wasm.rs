//! WebAssembly functions end to end: the real server, the example component and the
//! test fixtures (sources beside their .wasm files), reached through routes, a JWT route,
//! `invoke`, a subscription, a cron fire and async invokes; limits (a busy loop, memory
//! past its limit, an outbound call to a host not listed) and bad components at deploy.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// The example's component under another manifest.
fn hello_with(dir: &Path, manifest: &str) -> std::path::PathBuf {
    let f = dir.join("fn");
    std::fs::create_dir_all(&f).expect("mkdir");
    std::fs::copy(
        example("wasm-hello").join("hello.wasm"),
        f.join("hello.wasm"),
    )
    .expect("copy");
    std::fs::write(f.join("nimbus.toml"), manifest).expect("manifest");
    f
}

fn invoke(s: &Server, name: &str, data: &str) -> Value {
    let out = s.cli(&["invoke", name, "--data", data, "--output", "json", "--logs"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", stdout_of(&out), stderr_of(&out)))
}

#[test]
fn the_example_serves_routes_jwt_routes_invokes_and_is_metered() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start_jwt();
    let d = s.json(&["deploy", example("wasm-hello").to_str().expect("path")]);
    assert_eq!(d["version"], 1, "{d}");

    // The route: the first request after deploy is the cold start.
    let r = s
        .http()
        .get(s.url("/hello-wasm/ada?x=1"))
        .send()
        .expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-nimbus-cold-start"], "true");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().expect("json");
    assert_eq!(body["message"], "hello, ada!");
    assert_eq!(body["path"], "/hello-wasm/ada");
    let r = s.http().get(s.url("/hello-wasm/bob")).send().expect("GET");
    assert_eq!(r.headers()["x-nimbus-cold-start"], "false");
    assert_eq!(r.json::<Value>().expect("json")["message"], "hello, bob!");
    // Evicting drops the loaded component: the next request is cold again.
    s.ok(&["evict", "hello-wasm"]);
    let r = s.http().get(s.url("/hello-wasm/eve")).send().expect("GET");
    assert_eq!(r.headers()["x-nimbus-cold-start"], "true");

    // Invoke: the event arrives as a POST with the JSON body; the JSON answer is the result.
    let env = invoke(&s, "hello-wasm", r#"{"name":"cy"}"#);
    assert_eq!(env["status"], "success", "{env}");
    assert_eq!(env["result"]["method"], "POST", "{env}");
    assert_eq!(env["result"]["body_bytes"], 13, "{env}");
    assert!(
        env["logs"]
            .as_str()
            .is_some_and(|l| l.contains("handled POST /")),
        "{env}"
    );

    // The same component behind a JWT route.
    let f = hello_with(
        tmp.path(),
        "name = \"hello-jwt\"\nruntime = \"wasm\"\nhandler = \"hello.wasm\"\n\
         [env]\nGREETING = \"welcome\"\n\
         [[http]]\nmethod = \"GET\"\npath = \"/members/{name}\"\nauth = \"jwt\"\n",
    );
    s.ok(&["deploy", f.to_str().expect("path")]);
    assert_eq!(
        s.http()
            .get(s.url("/members/dee"))
            .send()
            .expect("GET")
            .status(),
        401
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let pem = std::fs::read(fixture("jwt").join("test-key.pem")).expect("pem");
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("test-1".into());
    let token = encode(
        &h,
        &json!({"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "u1", "exp": now + 300}),
        &EncodingKey::from_rsa_pem(&pem).expect("key"),
    )
    .expect("sign");
    let r = s
        .http()
        .get(s.url("/members/dee"))
        .bearer_auth(&token)
        .send()
        .expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().expect("json")["message"], "welcome, dee!");

    // Metering as for processes: a record per call with the cold flag and the peak of
    // linear memory.
    let usage = wait_for("records", Duration::from_secs(10), || {
        let u = s.json(&["usage"]);
        let row = u["usage"]
            .as_array()?
            .iter()
            .find(|r| r["function"] == "hello-wasm")?
            .clone();
        (row["invocations"] == 4).then_some(row)
    });
    assert_eq!(usage["cold_starts"], 2, "{usage}");
    assert_eq!(usage["errors"], 0, "{usage}");
    let id = env["requestId"].as_str().expect("id");
    let rec: Value = s
        .admin(reqwest::Method::GET, &format!("/v1/invocations/{id}"))
        .send()
        .expect("record")
        .json()
        .expect("json");
    assert_eq!(rec["memory_mb"], 64, "{rec}");
    assert_eq!(rec["cold_start"], false, "{rec}");
    let peak = rec["peak_memory_bytes"].as_u64().unwrap_or(0);
    assert!((64 * 1024..=64 << 20).contains(&peak), "{rec}");
    let billed = rec["billed_ms"].as_u64().expect("billed");
    assert!(billed >= 1, "{rec}");
    assert!(
        rec["logs"]
            .as_str()
            .is_some_and(|l| l.contains("handled POST /")),
        "{rec}"
    );
}

#[test]
fn events_cron_and_async_invokes_reach_a_component() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start();
    s.ok(&["topic", "create", "greetings"]);
    let f = hello_with(
        tmp.path(),
        "name = \"hello-events\"\nruntime = \"wasm\"\nhandler = \"hello.wasm\"\n\
         [[events]]\ntopic = \"greetings\"\n\
         [[cron]]\nname = \"hourly\"\nschedule = \"@every 1h\"\n",
    );
    s.ok(&["deploy", f.to_str().expect("path")]);
    s.ok(&[
        "publish",
        "greetings",
        "--type",
        "greeting.sent",
        "--source",
        "test",
        "--data",
        r#"{"to":"ada"}"#,
    ]);
    let fired = s.json(&["cron", "trigger", "hello-events", "hourly"]);
    let cron_id = fired["request_id"].as_str().expect("id").to_string();
    let queued = s.json(&["invoke", "hello-events", "--async", "--data", "{}"]);
    let async_id = queued["request_id"]
        .as_str()
        .or(queued["requestId"].as_str())
        .unwrap_or_else(|| panic!("{queued}"))
        .to_string();
    for id in [&cron_id, &async_id] {
        wait_for("the invocation to succeed", Duration::from_secs(20), || {
            (s.json(&["invocation", "get", id])["status"] == "succeeded").then_some(())
        });
    }
    // The event was delivered: the component logged a POST for it.
    wait_for("the event's delivery", Duration::from_secs(20), || {
        let u = s.json(&["usage"]);
        let n = u["usage"]
            .as_array()?
            .iter()
            .find(|r| r["function"] == "hello-events")?["invocations"]
            .as_u64()?;
        (n >= 3).then_some(())
    });
    let logs = s.ok(&["logs", "hello-events", "--limit", "100"]);
    assert!(logs.matches("handled POST /").count() >= 3, "{logs}");
}

#[test]
fn limits_hold_and_the_host_keeps_serving() {
    let s = Server::start();
    s.ok(&["deploy", fixture("wasm-tricks").to_str().expect("path")]);
    let get = |p: &str| s.http().get(s.url(p)).send().expect("GET");

    // A guest that never returns: 504 at its 2 s timeout, and the server still answers.
    let started = Instant::now();
    let r = get("/tricks/loop");
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().expect("json")["error"]["code"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Many at once do not starve the others: the loops yield at every epoch tick.
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let url = s.url("/tricks/loop");
            std::thread::spawn(move || reqwest::blocking::get(url).map(|r| r.status().as_u16()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = get("/tricks/env?name=TRICK_ENV");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().expect("text"), "from-manifest");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "served in {:?} beside 4 loops",
        t.elapsed()
    );
    for l in loops {
        assert_eq!(l.join().expect("thread").expect("GET"), 504);
    }

    // Memory past memory_mb (64): 502 out_of_memory; below it, fine.
    let r = get("/tricks/grow?mb=100");
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.json::<Value>().expect("json")["error"]["code"],
        "out_of_memory"
    );
    assert_eq!(get("/tricks/grow?mb=16").status(), 200);

    // An outbound call to a host the manifest does not list is refused by the host.
    let r = get("/tricks/fetch?url=http%3A%2F%2Fexample.com%2F");
    assert_eq!(r.status(), 502);
    assert!(r.text().expect("text").contains("HttpRequestDenied"));
    // A listed one on loopback is still refused without the operator's flag.
    let r = get("/tricks/fetch?url=http%3A%2F%2F127.0.0.1%3A9%2F");
    assert_eq!(r.status(), 502);
    assert!(r.text().expect("text").contains("DestinationIpProhibited"));

    // No files unless asked, and the platform's own files are not reachable.
    assert_eq!(get("/tricks/file?path=/etc/passwd").status(), 404);
    // A panic is a crash (502) with its message in the logs.
    let r = get("/tricks/panic");
    assert_eq!(r.status(), 502);
    let logs = wait_for("the crash's logs", Duration::from_secs(10), || {
        let l = s.ok(&["logs", "tricks", "--limit", "50"]);
        l.contains("tricks panicked on purpose").then_some(l)
    });
    assert!(logs.contains("panicked"), "{logs}");
    // Headers, status and cookies go through as sent.
    let r = s
        .http()
        .post(s.url("/tricks/echo?status=201"))
        .header("x-test", "1")
        .body("payload")
        .send()
        .expect("POST");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-wasm"], "tricks");
    let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies.len(), 2);
    let echo: Value = r.json().expect("json");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "payload");
    assert_eq!(echo["path_with_query"], "/tricks/echo?status=201");
    assert!(
        echo["headers"]
            .as_array()
            .is_some_and(|h| h.iter().any(|p| p[0] == "x-test" && p[1] == "1")),
        "{echo}"
    );
}

#[test]
fn allowed_outbound_hosts_and_files_work_when_granted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start_args(&["--wasm-allow-private-outbound"]);
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = upstream.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in upstream.incoming().flatten().take(4) {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
            );
        }
    });
    let f = tmp.path().join("tricks");
    copy_dir(&fixture("wasm-tricks"), &f);
    let manifest = std::fs::read_to_string(f.join("nimbus.toml")).expect("manifest");
    std::fs::write(
        f.join("nimbus.toml"),
        format!("{manifest}\n[wasm]\nfiles = true\n"),
    )
    .expect("write");
    std::fs::write(f.join("data.txt"), "packaged with the function").expect("write");
    s.ok(&["deploy", f.to_str().expect("path")]);
    let get = |p: &str| s.http().get(s.url(p)).send().expect("GET");
    let r = get(&format!(
        "/tricks/fetch?url=http%3A%2F%2F127.0.0.1%3A{port}%2Fping"
    ));
    assert_eq!(r.text().expect("text"), "upstream 200: pong");
    let r = get("/tricks/file?path=/var/task/data.txt");
    assert_eq!(r.text().expect("text"), "packaged with the function");
    let r = get("/tricks/write?path=/var/task/new.txt");
    assert_eq!(r.status(), 403);
}

#[test]
fn components_that_cannot_serve_are_refused_at_deploy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start();
    for (fixture_name, needle) in [
        ("wasm-invalid", "is not WebAssembly"),
        ("wasm-command", "does not export wasi:http/incoming-handler"),
    ] {
        let o = s.cli(&["deploy", fixture(fixture_name).to_str().expect("path")]);
        assert!(!o.status.success(), "{fixture_name} deployed");
        let err = stderr_of(&o);
        assert!(err.contains(needle), "{fixture_name}: {err}");
        let errors: Vec<_> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one line says what is wrong: {err}");
    }
    // Over the API: 400 with its code, and nothing was stored.
    let o = s
        .admin(reqwest::Method::GET, "/v1/functions")
        .send()
        .expect("list")
        .json::<Value>()
        .expect("json");
    assert_eq!(o.as_array().map(Vec::len), Some(0), "{o}");
    let f = hello_with(
        tmp.path(),
        "name = \"bad-hosts\"\nruntime = \"wasm\"\nhandler = \"hello.wasm\"\n\
         allowed_outbound_hosts = [\"api.example.com\"]\n",
    );
    let o = s.cli(&["deploy", f.to_str().expect("path")]);
    assert!(
        stderr_of(&o).contains("allowed_outbound_hosts"),
        "{}",
        stderr_of(&o)
    );
    // A component header over garbage gets as far as the compiler (a child process),
    // whose reason comes back as the deploy error.
    let mut junk = b"\0asm\x0d\0\x01\0".to_vec();
    junk.extend_from_slice(&[0xff; 64]);
    std::fs::write(f.join("hello.wasm"), junk).expect("write");
    std::fs::write(
        f.join("nimbus.toml"),
        "name = \"junk\"\nruntime = \"wasm\"\nhandler = \"hello.wasm\"\n",
    )
    .expect("manifest");
    let o = s.cli(&["deploy", f.to_str().expect("path")]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("is not a valid WebAssembly component"),
        "{}",
        stderr_of(&o)
    );
    // The server is fine afterwards.
    s.ok(&["deploy", example("wasm-hello").to_str().expect("path")]);
    let r = s.http().get(s.url("/hello-wasm/ok")).send().expect("GET");
    assert_eq!(r.status(), 200);
}

/// Whether this toolchain can build wasm32-wasip2 (CI installs the target).
fn wasip2_target_installed() -> bool {
    std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .is_some_and(|root| Path::new(&root).join("lib/rustlib/wasm32-wasip2").is_dir())
}

#[test]
fn init_writes_a_component_that_builds_deploys_and_serves() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start();
    let dir = tmp.path().join("greeter");
    s.ok(&[
        "init",
        "greeter",
        "--runtime",
        "wasm",
        "--dir",
        dir.to_str().expect("path"),
    ]);
    for f in [
        "nimbus.toml",
        "Cargo.toml",
        "build.sh",
        "src/lib.rs",
        ".gitignore",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    if !wasip2_target_installed() {
        eprintln!("wasm32-wasip2 is not installed (rustup target add wasm32-wasip2): not building");
        return;
    }
    let built = std::process::Command::new("sh")
        .arg(dir.join("build.sh"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run build.sh");
    assert!(built.status.success(), "build.sh: {}", stderr_of(&built));
    let d = s.json(&["deploy", dir.to_str().expect("path")]);
    // The build output under target/ stays home: only the sources and app.wasm go up.
    assert!(d["size"].as_u64().is_some_and(|n| n < 2 << 20), "{d}");
    let r = s.http().get(s.url("/greeter/ada")).send().expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().expect("json")["message"], "hello, ada!");
}

#[test]
fn a_deployed_component_survives_sigkill_and_a_lost_compile_cache() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let get = |s: &Server| {
        let r = s.http().get(s.url("/hello-wasm/kay")).send().expect("GET");
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    let mut s = Server::start_with(&data, &[]);
    s.ok(&["deploy", example("wasm-hello").to_str().expect("path")]);
    assert_eq!(get(&s).0, 200);
    s.kill9();
    // Restarted: the acknowledged deploy is there, loaded from the compile cache.
    let mut s = Server::start_with(&data, &[]);
    let (status, body) = get(&s);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello, kay!"), "{body}");
    s.kill9();
    // The cache is only a cache: without it the component is compiled again on first use.
    std::fs::remove_dir_all(data.join("wasm-cache")).expect("rm cache");
    let s = Server::start_with(&data, &[]);
    let (status, body) = get(&s);
    assert_eq!(status, 200, "{body}");
    assert!(
        std::fs::read_dir(data.join("wasm-cache"))
            .expect("cache")
            .any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "cwasm"))),
        "recompiled into the cache"
    );
}
