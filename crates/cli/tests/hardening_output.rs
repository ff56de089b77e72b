//! What functions' output costs the server and shows its readers (issue 25, items 7
//! and 16): a chatty function under load keeps the server's memory, disk, records and
//! shutdown bounded; escape sequences from a function or an archive reach neither a
//! terminal nor the server's log as themselves.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;
/// `--log-retention-bytes` of the chatty server.
const RETENTION: u64 = 20 * MIB;
/// What else the data dir holds (databases' pages beyond the logs, one write batch in
/// the WAL, runtimes, the artifact): generous, the unbounded case grows by ~150 MB/s.
const DISK_SLACK: u64 = 24 * MIB;
/// The unbounded case passed 1.5 GiB within 4 s.
const RSS_LIMIT: u64 = 400 * MIB;
const LOAD: Duration = Duration::from_secs(10);
const CLIENTS: usize = 4;

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The value of an unlabelled series in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Calls the chatty route until `stop`, keeping the request id of every answered call.
fn hammer(url: String, stop: Arc<AtomicBool>, ids: Arc<Mutex<Vec<String>>>) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    while !stop.load(Ordering::Relaxed) {
        let Ok(resp) = http.get(&url).send() else {
            // The server is going away (SIGTERM): refused connections are expected.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let id = resp
            .headers()
            .get("x-nimbus-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if resp.status() == 200
            && resp.bytes().is_ok_and(|b| &b[..] == b"ok")
            && let Some(id) = id
        {
            ids.lock().expect("ids").push(id);
        }
    }
}

#[test]
fn a_chatty_function_under_load_keeps_memory_disk_records_and_shutdown_bounded() {
    let retention = RETENTION.to_string();
    let mut s = Server::start_args(&["--log-retention-bytes", &retention, "--drain-timeout", "5s"]);
    s.json(&["deploy", fixture("output-chatty").to_str().expect("path")]);
    let url = s.url("/output-chatty");
    let warm = s.http().get(&url).send().expect("first call");
    assert_eq!(warm.status(), 200);
    let baseline_rss = vm_rss(s.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, stop, ids) = (url.clone(), Arc::clone(&stop), Arc::clone(&ids));
            std::thread::spawn(move || hammer(url, stop, ids))
        })
        .collect();
    let (mut max_rss, mut max_disk) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < LOAD {
        max_rss = max_rss.max(vm_rss(s.pid()));
        max_disk = max_disk.max(dir_size(&s.data));
        std::thread::sleep(Duration::from_millis(200));
    }
    let calls_so_far = ids.lock().expect("ids").len();
    let page = s
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    let dropped = metric(&page, "nimbus_metering_log_bodies_dropped_total");
    let kept = metric(&page, "nimbus_metering_log_bytes");
    eprintln!(
        "{calls_so_far} calls in {LOAD:?}: RSS {} MiB (baseline {} MiB), data dir {} MiB, \
         log bodies dropped {dropped:?}, log bytes kept {kept:?}",
        max_rss / MIB,
        baseline_rss / MIB,
        max_disk / MIB
    );

    // SIGTERM with the clients still calling: the server stops within its drain time.
    let mut child = s.child.take().expect("running");
    let term = Instant::now();
    signal(child.id(), "TERM");
    let exited = wait_timeout(&mut child, Duration::from_secs(10));
    let took = term.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        exited.is_some(),
        "the server ignored SIGTERM for 10 s under load"
    );
    eprintln!("stopped {took:?} after SIGTERM");

    assert!(
        calls_so_far > 50,
        "too little load to judge: {calls_so_far} calls"
    );
    assert!(
        max_rss < RSS_LIMIT,
        "server RSS reached {} MiB",
        max_rss / MIB
    );
    assert!(
        max_disk < RETENTION + DISK_SLACK,
        "the data dir reached {} MiB with {} MiB of log retention",
        max_disk / MIB,
        RETENTION / MIB
    );
    assert!(
        dropped.is_some() && kept.is_some_and(|k| k <= RETENTION as f64),
        "metering series missing or over the bound: dropped {dropped:?}, kept {kept:?}"
    );

    // Every answered call has its record, log body kept or not.
    let ids = ids.lock().expect("ids").clone();
    let again = Server::start_on(&s.data, "127.0.0.1:0", Some(s.cgroup_parent.clone()));
    let mut missing = Vec::new();
    for id in &ids {
        let r = again
            .admin(reqwest::Method::GET, &format!("/v1/invocations/{id}"))
            .send()
            .expect("invocation record");
        if r.status() != 200 {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} answered calls have no record: {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(5)]
    );
}

/// The escape sequences `fixtures/output-escapes` writes, as a terminal would get them.
const HOSTILE: &str =
    "title:\x1b]0;pwned-title\x07 clip:\x1b]52;c;aGVsbG8=\x07 dsr:\x1b[6n fake\rCR";
/// The same, as the CLI shows them by default.
const SHOWN: &str =
    r"title:\x1b]0;pwned-title\x07 clip:\x1b]52;c;aGVsbG8=\x07 dsr:\x1b[6n fake\rCR";

/// Escaped output: the sequences visible as text, no control character but line
/// breaks and tabs, and the function's own lines still lines.
fn assert_escaped(what: &str, text: &str) {
    assert!(text.contains(SHOWN), "{what}: escapes not shown:\n{text:?}");
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "{what}: a control character got through:\n{text:?}"
    );
    assert!(text.contains("after\tTAB"), "{what}: tab lost:\n{text:?}");
}

fn assert_raw(what: &str, text: &str) {
    assert!(
        text.contains(HOSTILE),
        "{what} --raw: not verbatim:\n{text:?}"
    );
}

#[test]
fn a_functions_escape_sequences_are_shown_escaped_unless_raw() {
    let s = Server::start();
    s.json(&["deploy", fixture("output-escapes").to_str().expect("path")]);

    let out = s.cli(&["invoke", "output-escapes", "--logs"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_escaped("invoke --logs", &stderr_of(&out));
    assert!(
        stderr_of(&out).lines().any(|l| l == "before"),
        "{}",
        stderr_of(&out)
    );
    let out = s.cli(&["invoke", "output-escapes", "--logs", "--raw"]);
    assert_raw("invoke --logs", &stderr_of(&out));

    let env = s.json(&["invoke", "output-escapes"]);
    let id = env["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("no request id: {env}"))
        .to_string();

    let logs = s.ok(&["logs", "output-escapes"]);
    assert_escaped("logs", &logs);
    assert_raw("logs", &s.ok(&["logs", "output-escapes", "--raw"]));

    let shown = s.ok(&["invocation", "get", &id]);
    assert_escaped("invocation get", &shown);
    assert_raw(
        "invocation get",
        &s.ok(&["invocation", "get", &id, "--raw"]),
    );

    // A function error's message is one value on the `error:` line: escaped whole.
    let out = s.cli(&["invoke", "output-escapes", "--data", r#"{"fail":true}"#]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("error: RuntimeError: boom {SHOWN}")),
        "{err:?}"
    );
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");
    let out = s.cli(&[
        "invoke",
        "output-escapes",
        "--data",
        r#"{"fail":true}"#,
        "--raw",
    ]);
    assert!(stderr_of(&out).contains(HOSTILE), "{:?}", stderr_of(&out));

    // The server's answers too: the CLI's `error:` line for an API error.
    let out = s.cli(&["invoke", "no\x1b]0;t\x07such"]);
    let err = stderr_of(&out);
    assert!(err.contains(r"no\x1b]0;t\x07such"), "{err:?}");
    assert!(!err.contains('\x1b'), "{err:?}");
}

/// A GNU long-name entry, so the name can be longer than a ustar header holds.
fn long_name_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut meta = name.as_bytes().to_vec();
    meta.push(0);
    out.extend_from_slice(&header("././@LongLink", meta.len(), b'L', "", "0000644"));
    out.extend_from_slice(&meta);
    out.extend(std::iter::repeat_n(0u8, (512 - meta.len() % 512) % 512));
    raw_entry(out, "placeholder", data, "0000644");
}

#[test]
fn an_archive_entry_name_cannot_forge_a_line_of_the_server_log() {
    let s = Server::start();
    // A name with a newline and an escape sequence inside: the deploy is refused and
    // the server logs the refusal, naming the entry.
    let name = "a\nERROR nimbus_control: FORGED line\x1b[31m.txt".to_string();
    let manifest = "name = \"forge\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n";
    let archive = tar_with(manifest, |raw| long_name_entry(raw, &name, b"x"));
    let resp = s
        .admin(reqwest::Method::POST, "/v1/functions")
        .header("content-type", "application/gzip")
        .body(archive)
        .send()
        .expect("deploy");
    assert!(!resp.status().is_success(), "{}", resp.status());
    let log = wait_for(
        "the entry name in the server log",
        Duration::from_secs(10),
        || {
            let log = s.stderr();
            log.contains("FORGED line").then_some(log)
        },
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("ERROR nimbus_control: FORGED")),
        "a forged line:\n{log}"
    );
    assert!(!log.contains('\x1b'), "a raw escape in the log:\n{log:?}");
    assert!(
        log.contains(r"\nERROR nimbus_control: FORGED line\x1b[31m"),
        "the name is not shown escaped:\n{log}"
    );
}
