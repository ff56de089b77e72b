//! Harness for end-to-end tests: the real `nimbus` binary on 127.0.0.1:0 with a temp
//! data dir, driven through its CLI and over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nimbus");

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    /// Where the control API listens, when `--control-listen` split it off.
    pub control_addr: Option<String>,
    pub data: PathBuf,
    pub cgroup_parent: String,
    _tmp: Option<tempfile::TempDir>,
    pub stderr_log: PathBuf,
}

/// Issuer and audience of the JWT fixtures (`fixtures/jwt`).
pub const JWT_ISSUER: &str = "https://idp.example.com";
pub const JWT_AUDIENCE: &str = "nimbus-api";

/// Polls `f` until it gives a value; fails the test after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Server {
    pub fn start() -> Server {
        Server::start_args(&[])
    }

    /// A server that verifies JWTs against the fixture keys (`fixtures/jwt/jwks.json`).
    pub fn start_jwt() -> Server {
        let jwks = fixture("jwt").join("jwks.json");
        Server::start_args(&[
            "--jwks-file",
            jwks.to_str().expect("path"),
            "--jwt-issuer",
            JWT_ISSUER,
            "--jwt-audience",
            JWT_AUDIENCE,
        ])
    }

    /// Starts a server on a temp data dir with extra `serve` flags.
    pub fn start_args(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut s = Server::launch(&data, "127.0.0.1:0", None, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server with extra `serve` flags on a data dir the caller owns.
    pub fn start_with(data: &Path, extra: &[&str]) -> Server {
        Server::launch(data, "127.0.0.1:0", None, extra)
    }

    /// Starts a server on an existing data dir (for restart tests).
    pub fn start_on(data: &Path, listen: &str, cgroup_parent: Option<String>) -> Server {
        Server::launch(data, listen, cgroup_parent, &[])
    }

    fn launch(data: &Path, listen: &str, cgroup_parent: Option<String>, extra: &[&str]) -> Server {
        let cgroup_parent = cgroup_parent.unwrap_or_else(|| {
            format!(
                "nimbus-test-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::SeqCst)
            )
        });
        std::fs::create_dir_all(data).expect("data dir");
        let stderr_log = data.with_extension("stderr.log");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_log)
            .expect("stderr log");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen])
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .env("NIMBUS_CGROUP_PARENT", &cgroup_parent)
            .env("NIMBUS_CACHE_DIR", data.join("../cache"))
            .env_remove("NIMBUS_TOKEN")
            .env_remove("NIMBUS_SERVER")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn nimbus serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("serve printed nothing; stderr: {}", read(&stderr_log)));
        let addr = first
            .strip_prefix("nimbus listening on http://")
            .or_else(|| first.strip_prefix("nimbus listening on https://"))
            .unwrap_or_else(|| panic!("unexpected first line `{first}`"))
            .to_string();
        let control_addr = extra.contains(&"--control-listen").then(|| {
            let line = lines.next().and_then(Result::ok).unwrap_or_default();
            line.strip_prefix("nimbus control API on http://")
                .unwrap_or_else(|| panic!("unexpected second line `{line}`"))
                .to_string()
        });
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child: Some(child),
            addr,
            control_addr,
            data: data.to_path_buf(),
            cgroup_parent,
            _tmp: None,
            stderr_log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A URL on the control API's listener (the same as `url` unless split off).
    pub fn control_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.control_addr.as_deref().unwrap_or(&self.addr),
            path
        )
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string()
    }

    /// Runs a CLI verb against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("NIMBUS_SERVER", self.control_url(""))
            .env("NIMBUS_DATA_DIR", &self.data)
            .env("NIMBUS_CACHE_DIR", self.data.join("../cache"))
            .env_remove("NIMBUS_TOKEN")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cli");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut si = child.stdin.take().expect("stdin");
            si.write_all(input).expect("write stdin");
        }
        child.wait_with_output().expect("cli output")
    }

    /// Runs a CLI verb that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "nimbus {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client")
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http()
            .request(method, self.control_url(path))
            .bearer_auth(self.token())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        wait_timeout(&mut child, Duration::from_secs(20)).expect("server exits after SIGTERM")
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn stderr(&self) -> String {
        read(&self.stderr_log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies a folder (for tests that edit a function between deploys).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let dest = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).expect("copy");
        }
    }
}

// Hand-made archives: the tar crate refuses to build the hostile entries tests need.

pub fn tar_with(manifest: &str, extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut raw = Vec::new();
    raw_entry(&mut raw, "nimbus.toml", manifest.as_bytes(), "0000644");
    extra(&mut raw);
    raw.extend_from_slice(&[0u8; 1024]);
    gzip(&raw)
}

/// A ustar header written by hand; `mode` is 7 octal digits.
pub fn header(name: &str, size: usize, kind: u8, link: &str, mode: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(mode.as_bytes());
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    let sz = format!("{size:011o}");
    h[124..135].copy_from_slice(sz.as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let cs = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(cs.as_bytes());
    h
}

pub fn raw_entry(out: &mut Vec<u8>, name: &str, data: &[u8], mode: &str) {
    out.extend_from_slice(&header(name, data.len(), b'0', "", mode));
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

pub fn symlink_entry(out: &mut Vec<u8>, name: &str, target: &str) {
    out.extend_from_slice(&header(name, 0, b'2', target, "0000777"));
}

pub fn gzip(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(raw).expect("gzip");
    e.finish().expect("gzip")
}

/// Runs `serve` with `args` on a fresh data dir and checks it refuses to start, saying
/// `want` on stderr.
pub fn serve_refuses(args: &[&str], want: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .args(args)
        .output()
        .expect("run serve");
    assert!(!o.status.success(), "{args:?} started");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(want), "{args:?}: {err}");
}

/// Invokes through the control API with logs: the HTTP status and the envelope.
pub fn invoke(s: &Server, function: &str, event: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = s
        .admin(
            reqwest::Method::POST,
            &format!("/v1/functions/{function}/invoke?logs=true"),
        )
        .header("content-type", "application/json")
        .body(event.to_string())
        .send()
        .unwrap_or_else(|e| panic!("invoke {function} {event}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("invoke {function}: {status} non-JSON body ({e}): {text}"));
    (status, v)
}

/// The ids of `function`'s live instances, sorted, as `nimbus instances` lists them.
pub fn instance_ids(s: &Server, function: &str) -> Vec<String> {
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

/// Host pids of every process in an instance cgroup of `function` under this server.
/// Instance ids come from the platform (a stem cell keeps its `stem-...` id after it is
/// given a function); fresh instances are also found by their name
/// (`<function>-...`) after the platform has forgotten them, which is what leftover
/// checks look for. Instances live in the server's own cgroup below its parent.
pub fn instance_pids(s: &Server, function: &str) -> Vec<u32> {
    let ids = instance_ids(s, function);
    let mut needles: Vec<String> = ids.iter().map(|id| format!("/{id}\n")).collect();
    needles.push(format!("/{function}-"));
    let parent = format!("/{}/", s.cgroup_parent);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|pid: &u32| {
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            cg.contains(&parent) && needles.iter().any(|n| cg.contains(n.as_str()))
        })
        .collect()
}
