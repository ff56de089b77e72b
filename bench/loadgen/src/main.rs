//! loadgen: the client side of `bench/run.py`, so every HTTP figure (nimbus and the
//! hyper floor alike) is measured by the same code.
//!
//! Owns: HTTP/1.1 keep-alive connections to loopback addresses only, closed-loop load
//! (each connection sends its next request when the previous answer has been read in
//! full; so requests/s is what N callers waiting on each answer get, not what an
//! open-loop arrival rate would show), every latency recorded, and a JSON summary on
//! stdout. Also the cold-start loop (evict, then one request, over one persistent
//! connection) and a process start-to-exit timer for interpreter baselines.
//! Must not: talk to anything but 127.0.0.0/8 or ::1, or interpret results (the
//! harness compares figures; this tool only measures).
#![forbid(unsafe_code)]

mod publish;
mod stats;
mod target;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::stats::Stats;
use crate::target::Target;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Closed-loop HTTP/1.1 load and timers for bench/run.py"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load one URL over N keep-alive connections; prints latency percentiles and rps.
    Run(RunArgs),
    /// Cold starts: evict, then one gateway GET; evict, then one invoke API call.
    Cold(ColdArgs),
    /// Time a process from spawn to exit, N times (interpreter start-up baselines).
    Spawn(SpawnArgs),
    /// Durable publish load: CloudEvents POSTed by N producers, each awaiting its ack.
    Publish(publish::PublishArgs),
    /// The disk's fsync rate (1 KiB append + fdatasync), the floor for durable acks.
    Fsync(publish::FsyncArgs),
}

#[derive(Args)]
struct RunArgs {
    /// http://127.0.0.1:PORT/path (loopback only).
    #[arg(long)]
    url: String,
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Measure this many requests in total (across all connections)...
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u64>,
    /// ...or for this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Unrecorded requests sent first (total across connections).
    #[arg(long, default_value_t = 0)]
    warmup_requests: u64,
    /// Unrecorded seconds of load sent first.
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
    /// Client runtime threads; 1 keeps the client on one core, leaving the rest to
    /// the server under test.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Extra request header, `name: value` (repeatable), e.g. an API key.
    #[arg(long = "header")]
    headers: Vec<String>,
}

#[derive(Args)]
struct ColdArgs {
    /// Gateway URL of the function, e.g. http://127.0.0.1:PORT/hello/ada.
    #[arg(long)]
    url: String,
    /// Base URL of the control API (same listener), e.g. http://127.0.0.1:PORT.
    #[arg(long)]
    api: String,
    /// Function name (for /v1/functions/NAME/evict and /invoke).
    #[arg(long)]
    function: String,
    /// Admin token; read from this environment variable so it never shows in `ps`.
    #[arg(long, default_value = "NIMBUS_TOKEN")]
    token_env: String,
    /// Event for the invoke API.
    #[arg(long, default_value = r#"{"name":"ada"}"#)]
    data: String,
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Pause between an eviction and the cold request: a real cold start follows idle
    /// time, not a teardown still in progress (and lets any pre-started pool refill).
    #[arg(long, default_value_t = 100)]
    pause_ms: u64,
}

#[derive(Args)]
struct SpawnArgs {
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed runs first (page cache, dynamic loader caches).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Run(a) => runtime(a.threads).and_then(|rt| rt.block_on(run(a))),
        Cmd::Cold(a) => runtime(1).and_then(|rt| rt.block_on(cold(a))),
        Cmd::Spawn(a) => spawn(&a),
        Cmd::Publish(a) => runtime(1).and_then(|rt| rt.block_on(publish::publish(a))),
        Cmd::Fsync(a) => publish::fsync(&a),
    };
    match out {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().context("start async runtime")
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    target: Target,
    tx: SendRequest<Full<Bytes>>,
    /// Headers every load request carries (`run --header`).
    extra: Arc<Vec<(&'static str, String)>>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Conn {
    async fn open(target: &Target) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connect to {}", target.addr))?;
        tcp.set_nodelay(true).context("set TCP_NODELAY")?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP/1.1 handshake")?;
        // The connection's I/O runs beside the requests; it ends when `tx` is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            target: target.clone(),
            tx,
            extra: Arc::new(Vec::new()),
        })
    }

    /// Sends one request and reads the whole answer.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.target.host);
        for (k, v) in headers {
            req = req.header(*k, HeaderValue::from_str(v).context("header value")?);
        }
        let req = req.body(Full::new(body)).context("build request")?;
        self.tx.ready().await.context("connection ready")?;
        let resp = self.tx.send_request(req).await.context("send request")?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.context("read body")?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// When a phase of load ends.
#[derive(Clone)]
enum Stop {
    At(Instant),
    /// Requests left to send, shared by all connections.
    Budget(Arc<AtomicU64>),
}

impl Stop {
    fn new(requests: Option<u64>, secs: Option<f64>) -> Stop {
        match (requests, secs) {
            (Some(n), _) => Stop::Budget(Arc::new(AtomicU64::new(n))),
            (None, Some(s)) => Stop::At(Instant::now() + Duration::from_secs_f64(s.max(0.0))),
            (None, None) => Stop::Budget(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Takes the right to send one more request.
    fn take(&self) -> bool {
        match self {
            Stop::At(t) => Instant::now() < *t,
            Stop::Budget(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

#[derive(Default)]
struct Tally {
    /// Latency of every 2xx answer, in milliseconds.
    ok_ms: Vec<f64>,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.ok_ms.extend(o.ok_ms);
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.transport_errors += o.transport_errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// One connection's closed loop: send, read the whole answer, repeat until `stop`.
async fn drive(mut conn: Conn, stop: Stop, record: bool) -> (Conn, Tally) {
    let mut t = Tally::default();
    let path = conn.target.path.clone();
    let extra = Arc::clone(&conn.extra);
    while stop.take() {
        let started = Instant::now();
        match conn.send(Method::GET, &path, &extra, Bytes::new()).await {
            Ok(a) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                if record {
                    *t.statuses.entry(a.status.as_u16()).or_default() += 1;
                    if a.status.is_success() {
                        t.ok_ms.push(ms);
                    }
                }
            }
            Err(e) => {
                t.transport_errors += 1;
                if t.first_error.is_none() {
                    t.first_error = Some(format!("{e:#}"));
                }
                // The server dropped this connection; carry on with a fresh one, or
                // stop this loop if it cannot be had.
                match Conn::open(&conn.target).await {
                    Ok(c) => conn = c,
                    Err(_) => break,
                }
            }
        }
    }
    (conn, t)
}

async fn phase(conns: Vec<Conn>, stop: Stop, record: bool) -> anyhow::Result<(Vec<Conn>, Tally)> {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(drive(c, stop.clone(), record)))
        .collect();
    let mut back = Vec::new();
    let mut all = Tally::default();
    for t in tasks {
        let (c, tally) = t.await.context("load task")?;
        back.push(c);
        all.merge(tally);
    }
    Ok((back, all))
}

async fn run(a: RunArgs) -> anyhow::Result<Value> {
    let target = Target::parse(&a.url)?;
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if a.requests.is_none() && a.duration.is_none() {
        bail!("give --requests N or --duration SECS");
    }
    let mut extra = Vec::new();
    for h in &a.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header `{h}` is not `name: value`"))?;
        // Header names must be 'static for the request builder; a handful per run.
        let name: &'static str = Box::leak(name.trim().to_ascii_lowercase().into_boxed_str());
        extra.push((name, value.trim().to_string()));
    }
    let extra = Arc::new(extra);
    let mut conns = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let mut c = Conn::open(&target).await?;
        c.extra = Arc::clone(&extra);
        conns.push(c);
    }
    if a.warmup_requests > 0 {
        conns = phase(conns, Stop::new(Some(a.warmup_requests), None), false)
            .await?
            .0;
    }
    if a.warmup_secs > 0.0 {
        conns = phase(conns, Stop::new(None, Some(a.warmup_secs)), false)
            .await?
            .0;
    }
    let started = Instant::now();
    let (conns, tally) = phase(conns, Stop::new(a.requests, a.duration), true).await?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(conns);
    let ok = tally.ok_ms.len() as u64;
    let answered: u64 = tally.statuses.values().sum();
    Ok(json!({
        "url": a.url,
        "connections": a.connections,
        "closed_loop": true,
        "client_threads": a.threads,
        "elapsed_s": elapsed,
        "answered": answered,
        "ok": ok,
        "statuses": tally.statuses,
        "transport_errors": tally.transport_errors,
        "first_error": tally.first_error,
        "rps": if elapsed > 0.0 { ok as f64 / elapsed } else { 0.0 },
        "latency_ms": Stats::of(tally.ok_ms),
    }))
}

fn header_f64(h: &HeaderMap, name: &str) -> Option<f64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn expect_ok(a: &Answer, what: &str) -> anyhow::Result<()> {
    if a.status.is_success() {
        return Ok(());
    }
    let body = String::from_utf8_lossy(&a.body[..a.body.len().min(300)]).into_owned();
    bail!("{what}: HTTP {}: {body}", a.status)
}

async fn cold(a: ColdArgs) -> anyhow::Result<Value> {
    let gw = Target::parse(&a.url)?;
    let api = Target::parse(&a.api)?;
    if api.addr != gw.addr {
        bail!("--url and --api must be the same server (one persistent connection)");
    }
    let token = std::env::var(&a.token_env)
        .with_context(|| format!("read the admin token from ${}", a.token_env))?;
    let auth = [("authorization", format!("Bearer {}", token.trim()))];
    let json_auth = [
        ("authorization", format!("Bearer {}", token.trim())),
        ("content-type", "application/json".to_string()),
    ];
    let base = api.path.trim_end_matches('/');
    let name = target::encode_segment(&a.function);
    let evict_path = format!("{base}/v1/functions/{name}/evict");
    let invoke_path = format!("{base}/v1/functions/{name}/invoke");
    let body = Bytes::from(a.data.clone());
    let pause = Duration::from_millis(a.pause_ms);

    let mut c = Conn::open(&gw).await?;
    let (mut gw_client, mut gw_server) = (Vec::new(), Vec::new());
    let (mut api_client, mut api_init, mut api_run, mut api_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut gw_not_cold, mut api_not_cold) = (0u64, 0u64);
    for _ in 0..a.runs {
        let ev = c
            .send(Method::POST, &evict_path, &auth, Bytes::new())
            .await?;
        expect_ok(&ev, "evict")?;
        tokio::time::sleep(pause).await;
        let t = Instant::now();
        let r = c.send(Method::GET, &gw.path, &[], Bytes::new()).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        expect_ok(&r, "gateway request")?;
        gw_client.push(ms);
        if let Some(d) = header_f64(&r.headers, "x-nimbus-duration-ms") {
            gw_server.push(d);
        }
        if r.headers
            .get("x-nimbus-cold-start")
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            gw_not_cold += 1;
        }

        let ev = c
            .send(Method::POST, &evict_path, &auth, Bytes::new())
            .await?;
        expect_ok(&ev, "evict")?;
        tokio::time::sleep(pause).await;
        let t = Instant::now();
        let r = c
            .send(Method::POST, &invoke_path, &json_auth, body.clone())
            .await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        expect_ok(&r, "invoke API")?;
        let v: Value = serde_json::from_slice(&r.body).context("parse invoke response")?;
        if v["status"] != "success" {
            bail!("invoke {} did not succeed: {v}", a.function);
        }
        api_client.push(ms);
        let init = v["initDurationMs"].as_f64().unwrap_or(0.0);
        let run = v["durationMs"].as_f64().unwrap_or(0.0);
        if v["coldStart"] != true {
            api_not_cold += 1;
        }
        api_init.push(init);
        api_run.push(run);
        api_total.push(init + run);
    }
    Ok(json!({
        "function": a.function,
        "runs": a.runs,
        "pause_ms": a.pause_ms,
        "gateway": {
            "client_ms": Stats::of(gw_client),
            "server_duration_ms": Stats::of(gw_server),
            "not_cold": gw_not_cold,
        },
        "api": {
            "client_ms": Stats::of(api_client),
            "server_init_ms": Stats::of(api_init),
            "server_duration_ms": Stats::of(api_run),
            "server_total_ms": Stats::of(api_total),
            "not_cold": api_not_cold,
        },
    }))
}

fn spawn(a: &SpawnArgs) -> anyhow::Result<Value> {
    let Some((prog, args)) = a.argv.split_first() else {
        bail!("nothing to run");
    };
    let once = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let st = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("run {prog}"))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !st.success() {
            bail!("{prog} exited with {st}");
        }
        Ok(ms)
    };
    for _ in 0..a.warmup {
        once()?;
    }
    let ms = (0..a.runs)
        .map(|_| once())
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(json!({ "argv": a.argv, "runs": a.runs, "ms": Stats::of(ms) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_hands_out_exactly_n_requests_across_connections() {
        let stop = Stop::new(Some(5), None);
        let a = stop.clone();
        let taken = (0..10).filter(|i| if i % 2 == 0 { a.take() } else { stop.take() });
        assert_eq!(taken.count(), 5);
        assert!(!stop.take());
    }

    #[test]
    fn deadline_stops() {
        assert!(!Stop::new(None, Some(0.0)).take());
        assert!(Stop::new(None, Some(60.0)).take());
    }

    #[test]
    fn duration_header_parses_or_is_absent() {
        let mut h = HeaderMap::new();
        assert_eq!(header_f64(&h, "x-nimbus-duration-ms"), None);
        h.insert("x-nimbus-duration-ms", HeaderValue::from_static("1.250"));
        assert_eq!(header_f64(&h, "x-nimbus-duration-ms"), Some(1.25));
        h.insert("x-nimbus-duration-ms", HeaderValue::from_static("soon"));
        assert_eq!(header_f64(&h, "x-nimbus-duration-ms"), None);
    }

    #[tokio::test]
    async fn measures_a_real_keep_alive_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        // A minimal keep-alive server: one answer per request line block; the first
        // request of each connection gets 503 so statuses are tallied, not hidden.
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut pending = Vec::new();
                    let mut first = true;
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..i + 4);
                            let status = if first { "503 Busy" } else { "200 OK" };
                            first = false;
                            let r = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
                            if s.write_all(r.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let v = run(RunArgs {
            url: format!("http://{addr}/x"),
            connections: 3,
            requests: Some(30),
            duration: None,
            warmup_requests: 0,
            warmup_secs: 0.0,
            threads: 1,
            headers: vec![],
        })
        .await
        .expect("run");
        assert_eq!(v["answered"], 30, "{v}");
        assert_eq!(v["statuses"]["503"], 3, "{v}");
        assert_eq!(v["ok"], 27, "{v}");
        assert_eq!(v["latency_ms"]["n"], 27, "{v}");
        assert_eq!(v["transport_errors"], 0, "{v}");
        assert!(v["rps"].as_f64().expect("rps") > 0.0);
    }

    #[tokio::test]
    async fn refuses_remote_targets() {
        let r = run(RunArgs {
            url: "http://10.1.2.3:80/".into(),
            connections: 1,
            requests: Some(1),
            duration: None,
            warmup_requests: 0,
            warmup_secs: 0.0,
            threads: 1,
            headers: vec![],
        })
        .await;
        assert!(r.is_err());
    }

    #[test]
    fn spawn_times_a_process_and_fails_on_a_bad_exit() {
        let ok = spawn(&SpawnArgs {
            runs: 3,
            warmup: 0,
            argv: vec!["true".into()],
        })
        .expect("true runs");
        assert_eq!(ok["ms"]["n"], 3);
        let bad = spawn(&SpawnArgs {
            runs: 1,
            warmup: 0,
            argv: vec!["false".into()],
        });
        assert!(bad.is_err());
    }
}
