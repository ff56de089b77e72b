//! Real sandboxes on this machine (tests run as root, like CI). Each test has its own
//! parent cgroup so parallel tests cannot see each other's instances.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_sandbox::{
    CgroupVersion, Error, Host, HostConfig, Instance, InstanceSpec, Isolation, Limits,
};

mod common;
use common::*;

fn host(name: &str) -> Host {
    common::host("test", name)
}

fn spec(id: &str, program: &str, args: &[&str]) -> InstanceSpec {
    let mut limits = Limits::for_memory(128);
    // Tests are about isolation, not CPU share: keep them fast.
    limits.cpu_millis = 1000;
    InstanceSpec {
        id: id.to_string(),
        program: PathBuf::from(program),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        workdir: PathBuf::from("/"),
        limits,
        isolation: Isolation::default(),
    }
}

fn sh(id: &str, script: &str) -> InstanceSpec {
    spec(id, "/bin/sh", &["-c", script])
}

struct Run {
    status: std::process::ExitStatus,
    output: String,
}

fn run(inst: &mut Instance) -> Run {
    let out = inst.take_output().expect("output");
    let status = wait_timeout(inst, Duration::from_secs(30));
    let output = read_output(&out, Duration::from_secs(5));
    Run { status, output }
}

fn read_frame(s: &mut UnixStream) -> (u8, serde_json::Value) {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("frame header");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("frame body");
    (head[0], serde_json::from_slice(&body).expect("frame json"))
}

fn write_frame(s: &mut UnixStream, kind: u8, v: &serde_json::Value) {
    let body = v.to_string();
    let mut f = vec![kind];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body.as_bytes());
    s.write_all(&f).expect("write frame");
}

#[test]
fn detect_finds_this_hosts_cgroup_version() {
    let h = host("detect");
    let expected = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    };
    assert_eq!(h.cgroup_version(), Some(expected));
    for d in h.cgroup_parent_dirs() {
        assert!(d.is_dir(), "{} missing", d.display());
    }
    let dirs = h.cgroup_parent_dirs().to_vec();
    drop(h);
    for d in dirs {
        assert!(!d.exists(), "parent {} left behind", d.display());
    }
}

#[test]
fn runs_as_pid2_under_a_reaper_with_own_proc_hostname_and_only_lo() {
    let h = host("ns");
    let mut i = h
        .spawn(&sh(
            "ns",
            "echo pid=$$; echo procs=$(ls /proc | grep -c '^[0-9]'); \
             echo host=$(cat /proc/sys/kernel/hostname); \
             echo ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)",
        ))
        .expect("spawn");
    let r = run(&mut i);
    assert!(r.status.success(), "{:?} {}", r.status, r.output);
    // Pid 1 is the instance's reaper (reaper.rs); the program is its first child.
    assert!(r.output.contains("pid=2\n"), "{}", r.output);
    assert!(r.output.contains("host=nimbus\n"), "{}", r.output);
    assert!(r.output.contains("ifaces=lo,\n"), "{}", r.output);
    let procs: u32 = r
        .output
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.parse().ok())
        .expect("procs line");
    assert!(
        (2..=5).contains(&procs),
        "sees {procs} processes: {}",
        r.output
    );
    assert!(i.cpu_usage_ns().is_some_and(|n| n > 0));
    assert!(i.memory_peak_bytes().is_some_and(|n| n > 0));
}

#[test]
fn loopback_is_up_but_the_host_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let h = host("net");
    let script = format!(
        "import socket\n\
         s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n\
         c = socket.create_connection(s.getsockname(), timeout=2); print('lo ok')\n\
         try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('host reached')\n\
         except OSError as e:\n    print('host unreachable', e)\n"
    );
    let mut i = h
        .spawn(&spec("net", &python().0, &["-c", &script]))
        .expect("spawn");
    let r = run(&mut i);
    assert!(r.status.success(), "{:?} {}", r.status, r.output);
    assert!(r.output.contains("lo ok"), "{}", r.output);
    assert!(r.output.contains("host unreachable"), "{}", r.output);
    assert!(
        listener.accept().is_err(),
        "the sandbox connected to the host"
    );
}

#[test]
fn env_is_exactly_the_specs() {
    let h = host("env");
    let mut s = spec("env", "/usr/bin/env", &[]);
    s.env = vec![("A".into(), "1".into()), ("B".into(), "two words=x".into())];
    let mut i = h.spawn(&s).expect("spawn");
    let r = run(&mut i);
    assert!(r.status.success());
    assert_eq!(r.output, "A=1\nB=two words=x\n");
}

#[test]
fn stdout_and_stderr_share_the_output_pipe_and_only_fds_0_to_3_are_open() {
    let h = host("out");
    let mut i = h
        .spawn(&sh(
            "out",
            // No pipe or command substitution: those would add sh's own pipe fds.
            "echo to-out; echo to-err >&2; echo fds; ls /proc/$$/fd; echo end",
        ))
        .expect("spawn");
    let r = run(&mut i);
    assert!(r.status.success());
    assert!(r.output.contains("to-out\n"), "{}", r.output);
    assert!(r.output.contains("to-err\n"), "{}", r.output);
    assert!(r.output.contains("fds\n0\n1\n2\n3\nend\n"), "{}", r.output);
}

#[test]
fn control_fd_works_both_ways() {
    let h = host("ctl");
    let script = "import os, json, struct\n\
                  f = os.fdopen(3, 'r+b', buffering=0)\n\
                  def rd(n):\n    b = b''\n    while len(b) < n:\n        c = f.read(n - len(b))\n        assert c\n        b += c\n    return b\n\
                  h = rd(5); body = json.loads(rd(struct.unpack('>I', h[1:])[0]))\n\
                  out = json.dumps({'echo': body['x'].upper(), 'kind': chr(h[0])}).encode()\n\
                  f.write(b'S' + struct.pack('>I', len(out)) + out)\n";
    let mut i = h
        .spawn(&spec("ctl", &python().0, &["-c", script]))
        .expect("spawn");
    let mut ctl = i.take_control().expect("control");
    assert!(i.take_control().is_none());
    write_frame(&mut ctl, b'I', &serde_json::json!({"x": "hello"}));
    let (kind, body) = read_frame(&mut ctl);
    assert_eq!(kind, b'S');
    assert_eq!(body, serde_json::json!({"echo": "HELLO", "kind": "I"}));
    let r = run(&mut i);
    assert!(r.status.success(), "{:?} {}", r.status, r.output);
    // Init closed its copy: EOF once the program exits.
    let mut rest = Vec::new();
    ctl.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
}

#[test]
fn memory_limit_oom_kills() {
    let h = host("oom");
    let mut s = spec(
        "oom",
        &python().0,
        &[
            "-c",
            "b = bytearray(b'x') * (256 << 20); print('survived', len(b))",
        ],
    );
    s.limits.memory_mb = 64;
    let mut i = h.spawn(&s).expect("spawn");
    let r = run(&mut i);
    assert!(!r.output.contains("survived"), "{}", r.output);
    assert_eq!(
        r.status.code(),
        Some(128 + 9),
        "{:?} {}",
        r.status,
        r.output
    );
    assert!(i.oom_killed());
    let peak = i.memory_peak_bytes().expect("peak");
    assert!(peak <= 64 << 20, "peak {peak} above the limit");
}

#[test]
fn small_program_is_not_reported_oom() {
    let h = host("nooom");
    let mut i = h.spawn(&sh("nooom", "exit 3")).expect("spawn");
    let r = run(&mut i);
    assert_eq!(r.status.code(), Some(3));
    assert!(!i.oom_killed());
}

#[test]
fn pids_limit_stops_forks() {
    let h = host("pids");
    let mut s = sh(
        "pids",
        "for i in $(seq 20); do sleep 30 & done; echo forked-all; wait",
    );
    s.limits.pids_max = 8;
    let mut i = h.spawn(&s).expect("spawn");
    let out = i.take_output().expect("output");
    let status = wait_timeout(&mut i, Duration::from_secs(20));
    let text = read_output(&out, Duration::from_millis(500));
    assert!(text.to_lowercase().contains("fork"), "{status:?} {text}");
    assert!(!text.contains("forked-all"), "{text}");
}

fn gone(pid: i32) -> bool {
    // A zombie still has /proc/<pid>; "gone" means reaped as well as dead.
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn kill_takes_down_the_tree_and_drop_cleans_up() {
    let h = host("kill");
    let mut i = h
        .spawn(&sh("kill", "sleep 100 & sleep 100 & echo ready; wait"))
        .expect("spawn");
    let out = i.take_output().expect("output");
    let seen = read_until(&out, "ready", Duration::from_secs(10));
    assert!(seen.contains("ready"), "{seen}");
    let dirs = i.cgroup_dirs();
    assert!(!dirs.is_empty());
    let pids = pids_in(&dirs);
    // init, sh and two sleeps.
    assert!(pids.len() >= 4, "{pids:?}");
    let started = Instant::now();
    i.kill();
    let status = i.wait().expect("wait");
    assert!(
        status.signal() == Some(9) || status.code() == Some(128 + 9),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !pids.iter().all(|p| gone(*p)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let alive: Vec<i32> = pids.iter().copied().filter(|p| !gone(*p)).collect();
    assert!(alive.is_empty(), "still there (or zombies): {alive:?}");
    drop(i);
    for d in &dirs {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
}

#[test]
fn drop_of_a_running_instance_kills_and_removes_cgroups() {
    let h = host("drop");
    let i = h.spawn(&sh("drop", "sleep 100")).expect("spawn");
    let dirs = i.cgroup_dirs();
    let pid = i.pid() as i32;
    drop(i);
    assert!(gone(pid), "init {pid} not reaped");
    for d in &dirs {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
}

#[test]
fn sigterm_is_forwarded() {
    let h = host("term");
    let script = "import signal, sys, time\n\
                  signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n\
                  print('ready', flush=True)\n\
                  time.sleep(30)\n";
    let mut i = h
        .spawn(&spec("term", &python().0, &["-c", script]))
        .expect("spawn");
    let out = i.take_output().expect("output");
    assert!(read_until(&out, "ready", Duration::from_secs(10)).contains("ready"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    assert_eq!(
        wait_timeout(&mut i, Duration::from_secs(10)).code(),
        Some(7)
    );
}

fn expect_setup_failure(s: &InstanceSpec, message_start: &str) {
    let h = host(&s.id);
    let mut i = h.spawn(s).expect("spawn");
    let mut ctl = i.take_control().expect("control");
    let (kind, body) = read_frame(&mut ctl);
    assert_eq!(kind, b'X');
    assert_eq!(body["errorType"], "Sandbox.SetupFailed");
    let msg = body["errorMessage"].as_str().expect("message");
    assert!(msg.starts_with(message_start), "{msg}");
    let r = run(&mut i);
    assert_eq!(r.status.code(), Some(125), "{}", r.output);
}

#[test]
fn missing_workdir_fails_closed() {
    let mut s = sh("badwd", "echo should-not-run");
    s.workdir = PathBuf::from("/does/not/exist");
    expect_setup_failure(&s, "chdir /does/not/exist: ");
}

#[test]
fn missing_program_fails_closed() {
    let s = spec("badprog", "/does/not/exist", &[]);
    expect_setup_failure(&s, "execve /does/not/exist: ");
}

#[test]
fn invalid_spec_is_refused_before_anything_starts() {
    let h = host("invalid");
    let s = sh("../escape", "true");
    assert!(matches!(h.spawn(&s), Err(Error::ValidateSpec(_))));
    let mut s = sh("nolimit", "true");
    s.limits.pids_max = 0;
    assert!(matches!(h.spawn(&s), Err(Error::ValidateSpec(_))));
}

#[test]
fn duplicate_live_id_is_refused() {
    let h = host("dup");
    let _a = h.spawn(&sh("same", "sleep 10")).expect("spawn");
    assert!(matches!(
        h.spawn(&sh("same", "true")),
        Err(Error::CreateCgroup { .. })
    ));
}

#[test]
fn insecure_mode_runs_plain_processes() {
    let cfg = HostConfig {
        init_exe: PathBuf::from(INIT),
        insecure_no_sandbox: true,
        parent: "unused".into(),
        ..HostConfig::default()
    };
    let h = Host::detect(cfg).expect("detect");
    let mut i = h.spawn(&sh("plain", "echo pid=$$")).expect("spawn");
    let r = run(&mut i);
    assert!(r.status.success());
    assert!(!r.output.contains("pid=1\n"), "{}", r.output);
    assert_eq!(r.output, format!("pid={}\n", i.pid()));
    assert!(i.cgroup_dirs().is_empty());
    assert!(!i.oom_killed());
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Not an assertion: prints spawn-to-exit of /bin/true in the sandbox next to
/// util-linux `unshare` doing the same namespaces. Run with
/// `cargo test -p nimbus-sandbox --release --test sandbox -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run explicitly"]
fn bench_spawn_to_exec() {
    const N: usize = 100;
    let h = host("bench");
    let code = tempfile::tempdir().expect("tempdir");
    let mut full = Vec::new();
    for n in 0..N {
        let mut s = spec(&format!("f{n}"), "/bin/true", &[]);
        s.isolation = Isolation::function(
            2100,
            2100,
            nimbus_sandbox::Rootfs::new(code.path()),
            nimbus_sandbox::Network::None,
        );
        let t = Instant::now();
        let mut i = h.spawn(&s).expect("spawn");
        let st = i.wait().expect("wait");
        full.push(t.elapsed());
        assert!(st.success());
    }
    let mut egress = Vec::new();
    for n in 0..if h.egress_available() { 20 } else { 0 } {
        let mut s = spec(&format!("e{n}"), "/bin/true", &[]);
        s.isolation = Isolation::function(
            2100,
            2100,
            nimbus_sandbox::Rootfs::new(code.path()),
            nimbus_sandbox::Network::Egress {
                allow_host_loopback: false,
            },
        );
        let t = Instant::now();
        let mut i = h.spawn(&s).expect("spawn");
        let st = i.wait().expect("wait");
        egress.push(t.elapsed());
        assert!(st.success());
    }
    let mut to_exit = Vec::new();
    let mut lifecycle = Vec::new();
    for n in 0..N {
        let t = Instant::now();
        let mut i = h
            .spawn(&spec(&format!("b{n}"), "/bin/true", &[]))
            .expect("spawn");
        let s = i.wait().expect("wait");
        to_exit.push(t.elapsed());
        drop(i);
        lifecycle.push(t.elapsed());
        assert!(s.success());
    }
    let mut unshare = Vec::new();
    for _ in 0..N {
        let t = Instant::now();
        let s = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--net",
                "--mount",
                "--ipc",
                "--uts",
                "/bin/true",
            ])
            .status()
            .expect("unshare");
        unshare.push(t.elapsed());
        assert!(s.success());
    }
    let insecure = Host::detect(HostConfig {
        init_exe: PathBuf::from(INIT),
        insecure_no_sandbox: true,
        ..HostConfig::default()
    })
    .expect("detect");
    let mut init_only = Vec::new();
    for n in 0..N {
        let t = Instant::now();
        let mut i = insecure
            .spawn(&spec(&format!("p{n}"), "/bin/true", &[]))
            .expect("spawn");
        i.wait().expect("wait");
        init_only.push(t.elapsed());
    }
    let mut plain = Vec::new();
    for _ in 0..N {
        let t = Instant::now();
        Command::new("/bin/true").status().expect("true");
        plain.push(t.elapsed());
    }
    println!("median of {N}:");
    println!(
        "  full isolation (rootfs, uid, seccomp) spawn -> /bin/true exited  {:?}",
        median(full)
    );
    if !egress.is_empty() {
        println!(
            "  ... plus egress (slirp4netns), median of {}              {:?}",
            egress.len(),
            median(egress)
        );
    }
    println!(
        "  namespaces + cgroups only: spawn -> /bin/true exited  {:?}",
        median(to_exit)
    );
    println!(
        "  sandbox spawn -> exited, cgroups gone  {:?}",
        median(lifecycle)
    );
    println!(
        "  unshare --pid --fork --net --mount --ipc --uts /bin/true  {:?}",
        median(unshare)
    );
    println!(
        "  init, no sandbox (insecure mode)       {:?}",
        median(init_only)
    );
    println!(
        "  plain /bin/true                        {:?}",
        median(plain)
    );
}
