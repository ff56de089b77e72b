//! Stem cells on this machine (run as root): a blank instance gets its code later.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_sandbox::{
    Bind, Error, Host, HostConfig, Instance, InstanceSpec, Isolation, Limits, Network, Rootfs,
};

mod common;
use common::*;

fn host(name: &str) -> Host {
    let h = common::host("stem", name);
    assert!(
        h.stem_cells_available(),
        "this kernel should support stem cells"
    );
    h
}

fn stem_rootfs(runtime: Option<&Path>) -> Rootfs {
    let mut r = Rootfs::stem();
    let prefix = &python().1;
    if !prefix.starts_with("/usr/") {
        r.ro_binds.push(Bind::same(prefix));
    }
    r.runtime_dir = runtime.map(Path::to_path_buf);
    r
}

fn stem_spec(
    id: &str,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    rootfs: Rootfs,
) -> InstanceSpec {
    let mut limits = Limits::for_memory(256);
    limits.cpu_millis = 1000;
    let mut e: Vec<(String, String)> = vec![("PATH".into(), "/usr/bin:/bin".into())];
    e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    InstanceSpec {
        id: id.to_string(),
        program: PathBuf::from(program),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: e,
        workdir: PathBuf::from("/"),
        limits,
        isolation: Isolation::function(61000, 61000, rootfs, Network::None),
    }
}

#[test]
fn shell_stem_sees_code_appear_read_only_and_never_holds_fd4() {
    let h = host("sh");
    let code = readable_dir(&[("handler.txt", "the code\n")]);
    let script = "echo waiting; while [ ! -e /var/task/handler.txt ]; do sleep 0.01; done; \
                  cat /var/task/handler.txt; ls -l /proc/$$/fd > /tmp/fds; cat /tmp/fds; \
                  if touch /var/task/new 2>/dev/null; then echo writable; else echo read-only; fi; \
                  grep ' /var/task ' /proc/self/mountinfo";
    let s = stem_spec("sh", "/bin/sh", &["-c", script], &[], stem_rootfs(None));
    let mut inst = h.spawn(&s).expect("spawn");
    assert!(inst.is_stem());
    let out = inst.take_output().expect("output");
    let first = read_until(&out, "waiting", Duration::from_secs(10));
    assert!(first.contains("waiting"), "{first}");
    let t = Instant::now();
    inst.assign_code(code.path()).expect("assign");
    eprintln!("assign_code took {:?}", t.elapsed());
    // Assigning twice would stack mounts: refused.
    let again = inst.assign_code(code.path()).expect_err("second assign");
    assert!(again.to_string().contains("already assigned"), "{again}");
    let status = wait_timeout_20s(&mut inst);
    let text = read_until(&out, "\u{0}", Duration::from_secs(2));
    assert!(status.success(), "{status:?}\n{first}{text}");
    assert!(text.contains("the code"), "{text}");
    // The shell's own sockets (listed by a child, so the shell holds no pipe to it):
    // the control socket, never init's fd 4.
    let sockets: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("-> socket:"))
        .filter_map(|l| l.split(" -> ").next()?.split_whitespace().last())
        .collect();
    assert_eq!(sockets, ["3"], "{text}");
    assert!(text.contains("read-only"), "{text}");
    let mnt = text
        .lines()
        .find(|l| l.contains(" /var/task "))
        .expect("mountinfo line");
    for opt in ["ro", "nosuid", "nodev"] {
        assert!(
            mnt.split(' ')
                .nth(5)
                .unwrap_or("")
                .split(',')
                .any(|o| o == opt),
            "{mnt}"
        );
    }
}

// ------------------------------------------------------------------ real shims

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The shims as the worker installs them: a directory the instance uid can read.
fn runtime_dir() -> tempfile::TempDir {
    let d = readable_dir(&[]);
    for (from, to) in [
        ("runtimes/python/bootstrap.py", "bootstrap.py"),
        ("runtimes/node/bootstrap.mjs", "bootstrap.mjs"),
    ] {
        std::fs::copy(Path::new(REPO).join(from), d.path().join(to)).expect("copy shim");
    }
    d
}

fn node() -> Option<String> {
    ["/usr/bin/node", "/usr/local/bin/node"]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
}

#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Node,
}

/// What the worker puts in every stem cell's environment: nothing of the function.
const STEM_ENV: [(&str, &str); 7] = [
    ("NIMBUS_STEM", "1"),
    ("NIMBUS_CONTROL_FD", "3"),
    ("LANG", "C.UTF-8"),
    ("HOME", "/tmp"),
    ("TZ", "UTC"),
    ("AWS_REGION", "local"),
    ("LAMBDA_RUNTIME_DIR", "/var/runtime"),
];

fn shim_spec(id: &str, lang: Lang, runtime: &Path) -> Option<InstanceSpec> {
    let (program, args) = match lang {
        Lang::Python => (
            python().0.clone(),
            vec!["-I", "-S", "/var/runtime/bootstrap.py"],
        ),
        Lang::Node => (node()?, vec!["/var/runtime/bootstrap.mjs"]),
    };
    Some(stem_spec(
        id,
        &program,
        &args,
        &STEM_ENV,
        stem_rootfs(Some(runtime)),
    ))
}

fn read_frame(s: &mut UnixStream) -> Option<(u8, serde_json::Value)> {
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    // Results carry their invocation's request id and a newline before the JSON
    // (docs/runtime-protocol.md, "Result ownership").
    if matches!(head[0], b'S' | b'E') {
        let at = body
            .iter()
            .position(|b| *b == b'\n')
            .expect("tagged result");
        assert!(at > 0, "an empty result tag");
        body.drain(..=at);
    }
    Some((head[0], serde_json::from_slice(&body).expect("frame json")))
}

fn write_frame(s: &mut UnixStream, kind: u8, v: &serde_json::Value) {
    let body = v.to_string();
    let mut f = vec![kind];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body.as_bytes());
    s.write_all(&f).expect("write frame");
}

/// A stem cell that said `R {"stem": true}`.
struct Stem {
    inst: Instance,
    control: UnixStream,
    output: OwnedFd,
}

impl Stem {
    fn start(h: &Host, id: &str, lang: Lang, runtime: &Path) -> Option<Stem> {
        let spec = shim_spec(id, lang, runtime)?;
        let mut inst = h.spawn(&spec).expect("spawn stem");
        let mut control = inst.take_control().expect("control");
        let output = inst.take_output().expect("output");
        let ready = read_frame(&mut control);
        let Some((b'R', r)) = ready else {
            panic!(
                "{lang:?} stem not ready: {ready:?}\n{}",
                read_until(&output, "\u{0}", Duration::from_millis(200))
            );
        };
        assert_eq!(r["stem"], true, "{r}");
        Some(Stem {
            inst,
            control,
            output,
        })
    }

    /// `A` for `handler`; returns the shim's answer (`R` or `F`).
    fn assign(&mut self, handler: &str, memory_mb: u32) -> (u8, serde_json::Value) {
        let a = serde_json::json!({
            "handler": handler,
            "env": {"GREETING": "hi"},
            "functionName": "stemfn",
            "functionVersion": "4",
            "memoryLimitMB": memory_mb,
            "logGroupName": "/aws/lambda/stemfn",
            "logStreamName": "s",
        });
        write_frame(&mut self.control, b'A', &a);
        self.frame()
    }

    fn frame(&mut self) -> (u8, serde_json::Value) {
        match read_frame(&mut self.control) {
            Some(f) => f,
            None => panic!(
                "no frame; output:\n{}",
                read_until(&self.output, "\u{0}", Duration::from_millis(200))
            ),
        }
    }

    fn invoke(&mut self, event: serde_json::Value) -> (u8, serde_json::Value) {
        let req = serde_json::json!({
            "requestId": "r1",
            "deadlineMs": 4_000_000_000_000u64,
            "invokedFunctionArn": "arn",
            "event": event,
        });
        write_frame(&mut self.control, b'I', &req);
        self.frame()
    }
}

const PY_MAIN: &str = r#"
import os, sys
kept = []
def handler(e, c):
    if isinstance(e, dict) and "alloc_mb" in e:
        kept.append(bytearray(e["alloc_mb"] * 1024 * 1024))
        return len(kept)
    try:
        open("/var/task/new-file", "w")
        task = "writable"
    except OSError as err:
        task = err.errno
    sockets = []
    for fd in os.listdir("/proc/self/fd"):
        try:  # the listing's own fd is gone by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                sockets.append(int(fd))
        except FileNotFoundError:
            pass
    st = os.statvfs("/tmp")
    return {"event": e, "cwd": os.getcwd(), "code": open("main.py").read().startswith(CODE),
            "task": task, "sockets": sorted(sockets), "uid": os.getuid(),
            "greeting": os.environ.get("GREETING"), "name": c.function_name,
            "mem": c.memory_limit_in_mb, "stem": os.environ.get("NIMBUS_STEM"),
            "tmp": st.f_blocks * st.f_frsize}
"#;

fn py_code() -> tempfile::TempDir {
    let text = format!("{PY_MAIN}CODE = {PY_MAIN:?}\n");
    readable_dir(&[("main.py", &text)])
}

#[test]
fn python_stem_gets_code_then_serves_invocations() {
    let h = host("py");
    let rt = runtime_dir();
    let code = py_code();
    let mut s = Stem::start(&h, "py", Lang::Python, rt.path()).expect("python");
    s.inst.assign_code(code.path()).expect("assign");
    s.inst.set_memory_mb(128).expect("memory");
    s.inst.set_pids_max(32).expect("pids");
    s.inst.set_tmp_bytes(8 << 20).expect("tmp");
    assert_eq!(
        s.assign("main.handler", 128),
        (b'R', serde_json::json!({"taggedResults": true}))
    );
    let (kind, r) = s.invoke(serde_json::json!({"k": [1, 2]}));
    assert_eq!(kind, b'S', "{r}");
    assert_eq!(r["event"], serde_json::json!({"k": [1, 2]}));
    assert_eq!(r["cwd"], "/var/task");
    assert_eq!(r["code"], true, "the code at /var/task is the assigned one");
    assert_eq!(r["task"], libc::EROFS, "/var/task must be read-only: {r}");
    assert_eq!(
        r["sockets"],
        serde_json::json!([3]),
        "only the control socket: {r}"
    );
    assert_eq!(r["uid"], 61000);
    assert_eq!(
        (&r["greeting"], &r["name"], &r["mem"]),
        (&"hi".into(), &"stemfn".into(), &"128".into())
    );
    assert!(r["stem"].is_null(), "{r}");
    assert_eq!(r["tmp"], 8 << 20, "{r}");
    // An assignment never happens twice.
    let again = s.inst.assign_code(code.path()).expect_err("second assign");
    assert!(matches!(again, Error::AssignCode(_)), "{again}");
}

#[test]
fn node_stem_gets_code_then_serves_invocations() {
    let h = host("node");
    let rt = runtime_dir();
    let code = readable_dir(&[(
        "index.js",
        "const fs = require('fs');\n\
         exports.handler = async (e, c) => ({ event: e, cwd: process.cwd(),\n\
           name: c.functionName, greeting: process.env.GREETING,\n\
           files: fs.readdirSync('.'), uid: process.getuid() });\n",
    )]);
    let Some(mut s) = Stem::start(&h, "node", Lang::Node, rt.path()) else {
        eprintln!("node is not installed; skipped");
        return;
    };
    s.inst.assign_code(code.path()).expect("assign");
    assert_eq!(
        s.assign("index.handler", 256),
        (b'R', serde_json::json!({"taggedResults": true}))
    );
    let (kind, r) = s.invoke(serde_json::json!("x"));
    assert_eq!(kind, b'S', "{r}");
    assert_eq!(
        r,
        serde_json::json!({"event": "x", "cwd": "/var/task", "name": "stemfn",
                           "greeting": "hi", "files": ["index.js"], "uid": 61000})
    );
}

#[test]
fn bad_handler_after_assignment_fails_init() {
    let h = host("bad");
    let rt = runtime_dir();
    let code = readable_dir(&[("main.py", "other = 1\n")]);
    let mut s = Stem::start(&h, "bad", Lang::Python, rt.path()).expect("python");
    s.inst.assign_code(code.path()).expect("assign");
    let (kind, err) = s.assign("main.handler", 128);
    assert_eq!(kind, b'F', "{err}");
    assert_eq!(err["errorType"], "Runtime.HandlerNotFound");
    assert_eq!(wait_timeout_20s(&mut s.inst).code(), Some(1));
}

#[test]
fn assign_code_fails_cleanly_and_only_for_stems() {
    let h = host("missing");
    let rt = runtime_dir();
    let mut s = Stem::start(&h, "missing", Lang::Python, rt.path()).expect("python");
    let err = s
        .inst
        .assign_code(Path::new("/does/not/exist/nimbus"))
        .expect_err("missing dir");
    assert!(
        matches!(&err, Error::AssignCode(m) if m.contains("/does/not/exist/nimbus")),
        "{err}"
    );
    let file = readable_dir(&[("f", "x")]);
    let err = s
        .inst
        .assign_code(&file.path().join("f"))
        .expect_err("a file");
    assert!(err.to_string().contains("not a directory"), "{err}");
    let err = s
        .inst
        .assign_code(Path::new("relative"))
        .expect_err("relative");
    assert!(matches!(err, Error::AssignCode(_)), "{err}");
    // Those failed on the host's side: the cell is intact and can still be assigned.
    let code = py_code();
    s.inst
        .assign_code(code.path())
        .expect("assign after failures");
    assert_eq!(s.assign("main.handler", 128).0, b'R');
    assert_eq!(s.invoke(serde_json::json!(1)).0, b'S');

    // An instance with its code from the start is no stem cell.
    let mut plain = stem_spec("plain", "/bin/sleep", &["10"], &[], {
        let mut r = stem_rootfs(None);
        r.code_dir = Some(code.path().to_path_buf());
        r
    });
    plain.id = "plain".into();
    let inst = h.spawn(&plain).expect("spawn");
    assert!(!inst.is_stem());
    let err = inst.assign_code(code.path()).expect_err("not a stem");
    assert!(err.to_string().contains("not a stem cell"), "{err}");
    assert!(inst.set_tmp_bytes(1 << 20).is_err());
}

#[test]
fn lowered_memory_limit_is_enforced_and_refused_below_usage() {
    let h = host("mem");
    let rt = runtime_dir();
    let code = py_code();
    let mut s = Stem::start(&h, "mem", Lang::Python, rt.path()).expect("python");
    s.inst.assign_code(code.path()).expect("assign");
    assert_eq!(s.assign("main.handler", 64).0, b'R');
    // 40 MB kept alive: a 32 MB limit is below what the instance uses.
    assert_eq!(
        s.invoke(serde_json::json!({"alloc_mb": 40})),
        (b'S', 1.into())
    );
    let err = s.inst.set_memory_mb(32).expect_err("below usage");
    assert!(
        matches!(&err, Error::SetLimit(m) if m.contains("exceeds")),
        "{err}"
    );
    assert!(s.inst.set_memory_mb(8).is_err(), "below the minimum");
    s.inst.set_memory_mb(96).expect("lower to 96");
    // 40 + 80 MB is past 96 MB: the cgroup kills it.
    write_frame(
        &mut s.control,
        b'I',
        &serde_json::json!({"requestId": "r", "deadlineMs": 4_000_000_000_000u64,
                            "invokedFunctionArn": "a", "event": {"alloc_mb": 80}}),
    );
    assert!(
        read_frame(&mut s.control).is_none(),
        "expected the instance to die"
    );
    let status = wait_timeout_20s(&mut s.inst);
    assert!(!status.success());
    assert!(s.inst.oom_killed(), "{status:?}");
}

#[test]
fn stem_cells_need_the_sandbox() {
    let cfg = HostConfig {
        init_exe: PathBuf::from(INIT),
        insecure_no_sandbox: true,
        ..HostConfig::default()
    };
    let h = Host::detect(cfg).expect("insecure host");
    assert!(!h.stem_cells_available());
    let s = stem_spec("insecure", "/bin/true", &[], &[], Rootfs::stem());
    assert!(matches!(h.spawn(&s), Err(Error::StemUnavailable(_))));
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

/// Stem cold start: from `assign_code` to the shim's `R` after `A` (what a cold
/// invocation waits for on top of a warm one). Also the mount step alone.
#[test]
#[ignore = "measurement; run explicitly"]
fn bench_stem_cold_start() {
    const N: usize = 50;
    let h = host("bench");
    let rt = runtime_dir();
    let py = readable_dir(&[("main.py", "def handler(e, c):\n    return e\n")]);
    // The same, compiled ahead (as a deploy step could): the read-only /var/task has no
    // room for the __pycache__ an import would otherwise write.
    let pyc = readable_dir(&[("main.py", "def handler(e, c):\n    return e\n")]);
    let ok = Command::new(&python().0)
        .args(["-m", "compileall", "-q"])
        .arg(pyc.path())
        .status()
        .expect("compileall");
    assert!(ok.success());
    std::fs::set_permissions(
        pyc.path().join("__pycache__"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let esm = readable_dir(&[("index.mjs", "export const handler = async (e) => e;\n")]);
    let cjs = readable_dir(&[("index.js", "exports.handler = async (e) => e;\n")]);
    for (name, lang, code, handler) in [
        ("python", Lang::Python, py.path(), "main.handler"),
        (
            "python, precompiled",
            Lang::Python,
            pyc.path(),
            "main.handler",
        ),
        ("node, ESM", Lang::Node, esm.path(), "index.handler"),
        ("node, CommonJS", Lang::Node, cjs.path(), "index.handler"),
    ] {
        let (mut total, mut mount, mut idle) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..N {
            let Some(mut s) = Stem::start(&h, &format!("b{i}"), lang, rt.path()) else {
                eprintln!("{lang:?}: not installed");
                break;
            };
            // A stem waits in the pool before it is used.
            std::thread::sleep(Duration::from_millis(20));
            idle.extend(s.inst.memory_current_bytes());
            let t = Instant::now();
            s.inst.assign_code(code).expect("assign");
            mount.push(t.elapsed());
            let (kind, _) = s.assign(handler, 128);
            total.push(t.elapsed());
            assert_eq!(kind, b'R');
            assert_eq!(s.invoke(serde_json::json!(1)).0, b'S');
        }
        if !total.is_empty() {
            eprintln!(
                "{name} stem cold start (assign_code -> R), median of {}: {:.2} ms \
                 (assign_code alone {:.3} ms); max {:.2} ms; idle stem memory {:.1} MiB",
                total.len(),
                median_ms(total.clone()),
                median_ms(mount),
                total
                    .iter()
                    .max()
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .unwrap_or(0.0),
                {
                    idle.sort();
                    idle.get(idle.len() / 2).copied().unwrap_or(0) as f64 / 1048576.0
                }
            );
        }
    }
}

fn wait_timeout_20s(inst: &mut Instance) -> std::process::ExitStatus {
    wait_timeout(inst, Duration::from_secs(20))
}
