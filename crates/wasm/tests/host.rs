//! The host against real components: the example and the test fixture built for
//! wasm32-wasip2 (their sources sit beside the .wasm files).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nimbus_core::outbound::OutboundRule;
use nimbus_wasm::{Failure, Host, HostConfig, Invocation, OutboundPolicy};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tricks() -> PathBuf {
    root().join("crates/cli/tests/fixtures/wasm-tricks/tricks.wasm")
}

fn host(dir: &Path) -> Arc<Host> {
    Host::new(HostConfig {
        cache_dir: dir.join("cache"),
        max_instances: 16,
        allow_private_outbound: false,
        compiler: None,
    })
    .expect("host")
}

fn get(path: &str) -> http::Request<Bytes> {
    http::Request::get(path)
        .header("host", "localhost")
        .body(Bytes::new())
        .expect("request")
}

fn inv(request: http::Request<Bytes>) -> Invocation {
    Invocation {
        request,
        env: Arc::new(vec![("TRICK_ENV".into(), "from-test".into())]),
        files: None,
        outbound: OutboundPolicy::default(),
        memory_bytes: 64 << 20,
        timeout: Duration::from_secs(2),
        fuel: None,
        log_limit: 64 * 1024,
        max_response_bytes: 6 << 20,
    }
}

fn body(r: &http::Response<Bytes>) -> String {
    String::from_utf8_lossy(r.body()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_answers_and_logs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let h = host(tmp.path());
    let app = h
        .load(&root().join("examples/wasm-hello/hello.wasm"))
        .expect("load");
    let mut i = inv(get("/hello-wasm/ada"));
    i.env = Arc::new(vec![("GREETING".into(), "hi".into())]);
    let done = app.handle(i).await;
    let resp = done.result.expect("response");
    assert_eq!(resp.status(), 200);
    assert!(
        body(&resp).contains("\"message\":\"hi, ada!\""),
        "{}",
        body(&resp)
    );
    assert!(
        done.logs.contains("handled GET /hello-wasm/ada"),
        "{}",
        done.logs
    );
    assert!(done.peak_memory_bytes > 0);
    // The second load finds the compiled file in the cache.
    let files: Vec<_> = std::fs::read_dir(tmp.path().join("cache"))
        .expect("cache")
        .collect();
    assert_eq!(files.len(), 1);
    h.load(&root().join("examples/wasm-hello/hello.wasm"))
        .expect("reload");
    assert_eq!(
        std::fs::read_dir(tmp.path().join("cache"))
            .expect("cache")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_stop_the_guest_and_the_host_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tmp");
    let h = host(tmp.path());
    let app = h.load(&tricks()).expect("load");

    let mut i = inv(get("/tricks/loop"));
    i.timeout = Duration::from_millis(300);
    let t = Instant::now();
    let done = app.handle(i).await;
    assert_eq!(done.result.err(), Some(Failure::Timeout));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let mut i = inv(get("/tricks/sleep?ms=5000"));
    i.timeout = Duration::from_millis(300);
    assert_eq!(app.handle(i).await.result.err(), Some(Failure::Timeout));

    let done = app.handle(inv(get("/tricks/grow?mb=200"))).await;
    assert_eq!(done.result.err(), Some(Failure::OutOfMemory));
    let done = app.handle(inv(get("/tricks/grow?mb=8"))).await;
    assert_eq!(done.result.expect("grew").status(), 200);
    assert!(
        done.peak_memory_bytes >= 8 << 20,
        "{}",
        done.peak_memory_bytes
    );

    let mut i = inv(get("/tricks/loop"));
    i.fuel = Some(1_000_000);
    assert_eq!(app.handle(i).await.result.err(), Some(Failure::OutOfFuel));

    let done = app.handle(inv(get("/tricks/panic"))).await;
    assert!(
        matches!(done.result, Err(Failure::Trap(_))),
        "{:?}",
        done.result.err()
    );
    assert!(
        done.logs.contains("tricks panicked on purpose"),
        "{}",
        done.logs
    );

    // A response over the limit is refused, not truncated (echo answers with the body).
    let mut i = inv(http::Request::post("/tricks/echo")
        .header("host", "localhost")
        .body(Bytes::from(vec![b'a'; 2 << 20]))
        .expect("request"));
    i.max_response_bytes = 1 << 20;
    assert_eq!(
        app.handle(i).await.result.err(),
        Some(Failure::ResponseTooLarge)
    );

    let done = app.handle(inv(get("/tricks/env?name=TRICK_ENV"))).await;
    assert_eq!(body(&done.result.expect("env")), "from-test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_folder_is_read_only_and_only_when_asked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let h = host(tmp.path());
    let app = h.load(&tricks()).expect("load");
    let code = tmp.path().join("code");
    std::fs::create_dir_all(&code).expect("mkdir");
    std::fs::write(code.join("data.txt"), "packaged").expect("write");

    let done = app
        .handle(inv(get("/tricks/file?path=/var/task/data.txt")))
        .await;
    assert_eq!(done.result.expect("resp").status(), 404);

    let mut i = inv(get("/tricks/file?path=/var/task/data.txt"));
    i.files = Some(code.clone());
    assert_eq!(body(&app.handle(i).await.result.expect("read")), "packaged");
    let mut i = inv(get("/tricks/write?path=/var/task/new.txt"));
    i.files = Some(code.clone());
    assert_eq!(app.handle(i).await.result.expect("write").status(), 403);
    assert!(!code.join("new.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_go_only_where_allowed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let h = host(tmp.path());
    let app = h.load(&tricks()).expect("load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong")
                .await;
        }
    });
    let url = format!("http://127.0.0.1:{port}/ping");
    let fetch = format!(
        "/tricks/fetch?url={}",
        url.replace(':', "%3A").replace('/', "%2F")
    );
    let rules = |r: &[&str]| {
        Arc::new(
            r.iter()
                .map(|s| OutboundRule::parse(s).expect("rule"))
                .collect::<Vec<_>>(),
        )
    };

    // Not listed: denied.
    let done = app.handle(inv(get(&fetch))).await;
    let r = done.result.expect("resp");
    assert_eq!(r.status(), 502);
    assert!(body(&r).contains("HttpRequestDenied"), "{}", body(&r));

    // Listed, but loopback without the operator's permission: refused too.
    let mut i = inv(get(&fetch));
    i.outbound = OutboundPolicy {
        rules: rules(&["http://127.0.0.1:*"]),
        allow_private: false,
    };
    let r = app.handle(i).await.result.expect("resp");
    assert_eq!(r.status(), 502);
    assert!(body(&r).contains("DestinationIpProhibited"), "{}", body(&r));

    // Listed and allowed.
    let mut i = inv(get(&fetch));
    i.outbound = OutboundPolicy {
        rules: rules(&["http://127.0.0.1:*"]),
        allow_private: true,
    };
    let r = app.handle(i).await.result.expect("resp");
    assert_eq!(body(&r), "upstream 200: pong");
}

#[test]
fn components_that_cannot_serve_are_refused_with_reasons() {
    let tmp = tempfile::tempdir().expect("tmp");
    let h = host(tmp.path());
    let fixtures = root().join("crates/cli/tests/fixtures");
    let e = h
        .prepare(&fixtures.join("wasm-invalid/app.wasm"))
        .expect_err("invalid");
    assert!(e.to_string().contains("is not WebAssembly"), "{e}");
    let e = h
        .prepare(&fixtures.join("wasm-command/command.wasm"))
        .expect_err("command");
    assert!(
        e.to_string()
            .contains("does not export wasi:http/incoming-handler"),
        "{e}"
    );
    let module = tmp.path().join("module.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").expect("write");
    let e = h.prepare(&module).expect_err("module");
    assert!(e.to_string().contains("core WebAssembly module"), "{e}");
}
