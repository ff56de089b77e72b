//! The isolation properties of a function sandbox (rootfs, identity, capabilities,
//! seccomp, /proc, /dev, egress), each checked from inside a real instance. Run as root.
//! Every test here fails if the property it names is missing.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nimbus_sandbox::{Bind, Error, Host, InstanceSpec, Isolation, Limits, Network, Rootfs};

mod common;
use common::*;

fn host(name: &str) -> Host {
    common::host("iso", name)
}

const PROBE: &str = include_str!("syscall_probe.py");

/// A code dir the function uid can read (tempdirs are 0700).
fn code_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(d.path().join("handler.txt"), "the code\n").expect("write");
    d
}

fn rootfs(code: &Path) -> Rootfs {
    let mut r = Rootfs::new(code);
    let prefix = &python().1;
    // The interpreter-prefix bind the worker does (unless it lives under /usr).
    if !prefix.starts_with("/usr/") {
        r.ro_binds.push(Bind::same(prefix));
    }
    r
}

fn secure(id: &str, uid: u32, code: &Path, program: &str, args: &[&str]) -> InstanceSpec {
    let mut limits = Limits::for_memory(128);
    limits.cpu_millis = 1000;
    InstanceSpec {
        id: id.to_string(),
        program: PathBuf::from(program),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        workdir: PathBuf::from("/var/task"),
        limits,
        isolation: Isolation::function(uid, uid, rootfs(code), Network::None),
    }
}

fn sh(id: &str, uid: u32, code: &Path, script: &str) -> InstanceSpec {
    secure(id, uid, code, "/bin/sh", &["-c", script])
}

fn py(id: &str, uid: u32, code: &Path, script: &str) -> InstanceSpec {
    secure(id, uid, code, &python().0, &["-c", script])
}

struct Run {
    status: std::process::ExitStatus,
    output: String,
}

fn run_spec(h: &Host, s: &InstanceSpec) -> Run {
    let mut i = h.spawn(s).expect("spawn");
    let out = i.take_output().expect("output");
    let status = wait_timeout(&mut i, Duration::from_secs(30));
    let output = read_output(&out, Duration::from_secs(5));
    Run { status, output }
}

fn ok(h: &Host, s: &InstanceSpec) -> String {
    let r = run_spec(h, s);
    assert!(r.status.success(), "{:?}\n{}", r.status, r.output);
    r.output
}

/// `key=value` lines of the output.
fn kv(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn only_the_binds_are_visible_and_code_is_read_only() {
    let h = host("fs");
    let code = code_dir();
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "host secret").expect("write");
    let script = format!(
        "echo code=$(cat /var/task/handler.txt)\n\
         touch /var/task/new 2>/dev/null && echo task=writable || echo task=ro\n\
         touch /newfile 2>/dev/null && echo root=writable || echo root=ro\n\
         cat /etc/shadow >/dev/null 2>&1 && echo shadow=read || echo shadow=no\n\
         echo etc=$(ls /etc | tr '\\n' ,)\n\
         echo root_dir=$(ls -A /root | tr '\\n' ,)\n\
         for p in /home /work /sys /old_root {secret} {init} /etc/ssh; do\n\
           test -e $p && echo visible=$p\n\
         done\n\
         echo bin=$(readlink /bin)\n\
         echo dev=$(ls /dev | tr '\\n' ,)\n\
         echo fd_link=$(readlink /dev/fd)\n\
         echo x > /dev/null && echo null=ok\n\
         echo urandom=$(head -c 8 /dev/urandom | wc -c)\n\
         echo x > /dev/full 2>/dev/null || echo full=enospc\n\
         echo end=1\n",
        secret = secret.display(),
        init = INIT,
    );
    let out = ok(&h, &sh("fs", 2001, code.path(), &script));
    let m = kv(&out);
    assert_eq!(m["code"], "the code", "{out}");
    assert_eq!(m["task"], "ro", "{out}");
    assert_eq!(m["root"], "ro", "{out}");
    assert_eq!(m["shadow"], "no", "{out}");
    let etc: Vec<&str> = m["etc"].split(',').filter(|s| !s.is_empty()).collect();
    for f in etc.iter() {
        assert!(
            [
                "passwd",
                "group",
                "hosts",
                "nsswitch.conf",
                "resolv.conf",
                "ssl",
                "ca-certificates"
            ]
            .contains(f),
            "unexpected /etc/{f}: {out}"
        );
    }
    assert!(etc.contains(&"passwd"), "{out}");
    // Only the interpreter prefix (a bind) shows under /root, none of root's files.
    assert!(
        m["root_dir"].is_empty() || m["root_dir"] == ".pyenv,",
        "{out}"
    );
    assert!(!out.contains("visible="), "{out}");
    assert_eq!(m["bin"], "usr/bin", "{out}");
    assert_eq!(
        m["dev"], "fd,full,null,random,shm,stderr,stdin,stdout,urandom,zero,",
        "{out}"
    );
    assert_eq!(m["fd_link"], "/proc/self/fd", "{out}");
    assert_eq!(m["null"], "ok", "{out}");
    assert_eq!(m["urandom"], "8", "{out}");
    assert_eq!(m["full"], "enospc", "{out}");
    assert_eq!(m["end"], "1", "{out}");
}

#[test]
fn mounts_have_the_right_flags() {
    let h = host("flags");
    let code = code_dir();
    let script = "import sys\n\
                  for l in open('/proc/self/mountinfo'):\n    f = l.split()\n    print('mount=' + f[4] + ' ' + f[5])\n";
    let out = ok(&h, &py("flags", 2002, code.path(), script));
    let mounts: BTreeMap<&str, Vec<&str>> = out
        .lines()
        .filter_map(|l| l.strip_prefix("mount="))
        .filter_map(|l| l.split_once(' '))
        .map(|(p, o)| (p, o.split(',').collect()))
        .collect();
    let has = |p: &str, flags: &[&str]| {
        let o = mounts
            .get(p)
            .unwrap_or_else(|| panic!("{p} not mounted: {out}"));
        for f in flags {
            assert!(o.contains(f), "{p} lacks {f}: {o:?}");
        }
    };
    has("/", &["ro", "nosuid", "nodev"]);
    has("/usr", &["ro", "nosuid", "nodev"]);
    has("/var/task", &["ro", "nosuid", "nodev"]);
    has("/tmp", &["rw", "nosuid", "nodev"]);
    has("/proc", &["nosuid", "nodev", "noexec"]);
    has("/proc/sys", &["ro"]);
    // Masked or read-only wherever the host kernel has them.
    if Path::new("/proc/sysrq-trigger").exists() {
        has("/proc/sysrq-trigger", &["ro"]);
    }
    for masked in ["/proc/kcore", "/proc/keys", "/proc/timer_list"] {
        if Path::new(masked).exists() {
            has(masked, &[]);
        }
    }
    has("/dev", &["ro", "nosuid", "noexec"]);
    has("/dev/shm", &["nosuid", "nodev", "noexec"]);
    assert!(!mounts.contains_key("/sys"), "{out}");
    assert!(
        !mounts
            .keys()
            .any(|p| p.starts_with("/old") || p.starts_with("/work")),
        "{out}"
    );
}

#[test]
fn tmp_is_writable_and_limited() {
    let h = host("tmp");
    let code = code_dir();
    let limit: u64 = 1 << 20;
    let script = format!(
        "import os, stat\n\
         print('mode=%o' % stat.S_IMODE(os.stat('/tmp').st_mode))\n\
         with open('/tmp/a', 'wb') as f: f.write(b'x' * ({limit} - 64 * 1024))\n\
         print('near_limit=ok')\n\
         try:\n    \
           with open('/tmp/b', 'wb') as f: f.write(b'y' * 128 * 1024)\n    \
           print('past_limit=ok')\n\
         except OSError as e:\n    print('past_limit=' + os.strerror(e.errno))\n"
    );
    let mut s = py("tmp", 2003, code.path(), &script);
    if let Some(r) = &mut s.isolation.rootfs {
        r.tmp_bytes = limit;
    }
    let m = kv(&ok(&h, &s));
    assert_eq!(m["mode"], "1777");
    assert_eq!(m["near_limit"], "ok");
    assert_eq!(m["past_limit"], "No space left on device");
}

#[test]
fn runs_as_the_given_ids_without_capabilities() {
    let h = host("id");
    let code = code_dir();
    let script = "import os, resource\n\
                  print('uid=%d gid=%d euid=%d groups=%s' % (os.getuid(), os.getgid(), os.geteuid(), os.getgroups()))\n\
                  for l in open('/proc/self/status'):\n    k, _, v = l.partition(':')\n    print(k + '=' + v.strip())\n\
                  for n in ('NOFILE', 'FSIZE', 'CORE'):\n    print('rl_' + n + '=' + str(resource.getrlimit(getattr(resource, 'RLIMIT_' + n))))\n";
    let mut s = py("id", 2004, code.path(), script);
    s.isolation.gid = 3004;
    s.limits.nofile = 77;
    s.limits.fsize_bytes = 1 << 20;
    let out = ok(&h, &s);
    let m = kv(&out);
    assert!(
        out.contains("uid=2004 gid=3004 euid=2004 groups=[]"),
        "{out}"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(m[cap], "0000000000000000", "{cap}: {out}");
    }
    assert_eq!(m["NoNewPrivs"], "1", "{out}");
    assert_eq!(m["Seccomp"], "2", "{out}");
    assert_eq!(m["Groups"], "", "{out}");
    assert_eq!(m["rl_NOFILE"], "(77, 77)", "{out}");
    assert_eq!(m["rl_FSIZE"], "(1048576, 1048576)", "{out}");
    assert_eq!(m["rl_CORE"], "(0, 0)", "{out}");
    // `id` resolves names through the synthetic /etc.
    let out = ok(&h, &sh("id2", 2005, code.path(), "id -u; id -un"));
    assert_eq!(out, "2005\nsbx_user\n");
}

#[test]
fn setuid_binaries_in_the_code_gain_nothing() {
    let h = host("suid");
    let code = code_dir();
    let id = code.path().join("id");
    std::fs::copy("/usr/bin/id", &id).expect("copy id");
    std::os::unix::fs::chown(&id, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o6755)).expect("chmod");
    let out = ok(
        &h,
        &sh(
            "suid",
            2006,
            code.path(),
            "/var/task/id -u; /var/task/id -g",
        ),
    );
    assert_eq!(out, "2006\n2006\n");
}

#[test]
fn symlinks_in_the_code_resolve_inside_the_new_root() {
    let h = host("link");
    let code = code_dir();
    std::os::unix::fs::symlink("/etc/shadow", code.path().join("shadow")).expect("symlink");
    std::os::unix::fs::symlink("/etc", code.path().join("etc")).expect("symlink");
    std::os::unix::fs::symlink("../../../../root", code.path().join("up")).expect("symlink");
    let out = ok(
        &h,
        &sh(
            "link",
            2007,
            code.path(),
            "cat /var/task/shadow 2>/dev/null && echo shadow=read || echo shadow=no\n\
             echo etc=$(ls /var/task/etc/ | tr '\\n' ,)\n\
             grep -c sbx_user /var/task/etc/passwd\n\
             echo up=$(ls -A /var/task/up/ | tr '\\n' ,)\n",
        ),
    );
    assert!(out.contains("shadow=no\n"), "{out}");
    let etc = kv(&out)["etc"].clone();
    assert!(etc.contains("group,") && etc.contains("passwd,"), "{out}");
    assert!(!etc.contains("shadow"), "{out}");
    assert!(out.contains("\n1\n"), "synthetic passwd expected: {out}");
    let up = kv(&out)["up"].clone();
    assert!(up.is_empty() || up == ".pyenv,", "{out}");
}

#[test]
fn proc_shows_only_the_instance_and_masks_kernel_files() {
    let h = host("proc");
    let code = code_dir();
    let out = ok(
        &h,
        &sh(
            "proc",
            2008,
            code.path(),
            "echo pid=$$; echo procs=$(ls /proc | grep -c '^[0-9]')\n\
             echo keys=$(wc -c < /proc/keys)\n\
             echo 1 > /proc/sysrq-trigger 2>/dev/null && echo sysrq=written || echo sysrq=no\n\
             echo h > /proc/sys/kernel/hostname 2>/dev/null && echo sys=written || echo sys=no\n",
        ),
    );
    let m = kv(&out);
    // Pid 1 is the instance's reaper; the program is pid 2.
    assert_eq!(m["pid"], "2", "{out}");
    let procs: u32 = m["procs"].parse().expect("count");
    assert!((2..=5).contains(&procs), "{out}");
    // /proc/keys is /dev/null here (the host's lists this user's keys).
    assert_eq!(m["keys"], "0", "{out}");
    assert_eq!(m["sysrq"], "no", "{out}");
    assert_eq!(m["sys"], "no", "{out}");
}

fn probe(h: &Host, id: &str, uid: u32, seccomp: bool) -> BTreeMap<String, serde_json::Value> {
    let code = code_dir();
    let mut s = py(id, uid, code.path(), PROBE);
    s.isolation.seccomp = seccomp;
    let out = ok(h, &s);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn denied_syscalls_fail_with_eperm() {
    let h = host("sys");
    let filtered = probe(&h, "sys", 2009, true);
    let plain = probe(&h, "sysplain", 2010, false);
    println!("{:<20} {:>12} {:>12}", "syscall", "no seccomp", "seccomp");
    for (k, v) in &filtered {
        println!("{k:<20} {:>12} {:>12}", plain[k].to_string(), v.to_string());
    }
    for (k, v) in &filtered {
        let want = match k.as_str() {
            "clone3" => "ENOSYS",
            "fork_status" => continue,
            "personality_query" => "ok",
            _ => "EPERM",
        };
        assert_eq!(v, want, "{k}");
    }
    assert_eq!(filtered["fork_status"], 7);
    // Without the filter the same calls answer otherwise: the EPERMs above are the
    // filter's, not just a missing capability's.
    for k in [
        "unshare",
        "setns",
        "ptrace",
        "process_vm_readv",
        "keyctl",
        "personality",
        "kcmp",
        "chroot",
        "mount",
        "umount2",
        "perf_event_open",
        "clone3",
        "x32_getpid",
        "i386_getpid",
        "clone_newuser",
        "name_to_handle_at",
        "add_key",
        "request_key",
        "adjtimex",
        "clock_settime",
        "process_vm_writev",
        "open_by_handle_at",
        "open_tree",
        "fsconfig",
        "mount_setattr",
        "pidfd_getfd",
    ] {
        assert_ne!(plain[k], "EPERM", "{k} is EPERM even without seccomp");
        assert_ne!(plain[k], filtered[k], "{k}");
    }
}

fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie is dead; whoever it was reparented to reaps it.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

#[test]
fn program_dies_with_init_after_the_uid_change() {
    let h = host("pdeath");
    let code = code_dir();
    let mut i = h
        .spawn(&sh(
            "pdeath",
            2011,
            code.path(),
            "echo ready; exec sleep 100",
        ))
        .expect("spawn");
    let out = i.take_output().expect("output");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("ready") && Instant::now() < deadline {
        match nix::unistd::read(out.as_raw_fd(), &mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let init = i.pid() as i32;
    let program: Vec<i32> = pids_in(&i.cgroup_dirs())
        .into_iter()
        .filter(|p| *p != init)
        .collect();
    assert!(!program.is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill init");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !program.iter().all(|p| dead(*p)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        program.iter().all(|p| dead(*p)),
        "program outlived init: {program:?}"
    );
}

#[test]
fn missing_required_bind_fails_closed() {
    let h = host("badbind");
    let code = code_dir();
    let mut s = sh("badbind", 2012, code.path(), "echo should-not-run");
    if let Some(r) = &mut s.isolation.rootfs {
        r.ro_binds.push(Bind::same("/does/not/exist"));
    }
    let mut i = h.spawn(&s).expect("spawn");
    let mut ctl = i.take_control().expect("control");
    ctl.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = [0u8; 5];
    ctl.read_exact(&mut head).expect("frame");
    assert_eq!(head[0], b'X');
    let mut body = vec![0u8; u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize];
    ctl.read_exact(&mut body).expect("body");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let msg = v["errorMessage"].as_str().expect("message");
    assert!(
        msg.starts_with("enter rootfs: stat bind source /does/not/exist"),
        "{msg}"
    );
    let out = i.take_output().expect("output");
    let status = wait_timeout(&mut i, Duration::from_secs(10));
    assert_eq!(status.code(), Some(125));
    assert!(!read_output(&out, Duration::from_secs(1)).contains("should-not-run"));
}

// ---- egress ----

fn egress_host(name: &str) -> Option<Host> {
    let h = host(name);
    if !h.egress_available() {
        eprintln!("SKIPPED: slirp4netns is not installed (apt-get install -y slirp4netns)");
        return None;
    }
    Some(h)
}

fn slirp_pids_for(init: u32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("slirp4netns"))
            && args.iter().any(|a| *a == init.to_string())
        {
            v.push(pid);
        }
    }
    v
}

const EGRESS_PROBE: &str = "import fcntl, socket, struct, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
try:\n    a = fcntl.ioctl(s.fileno(), 0x8915, struct.pack('256s', b'tap0'))\n    print('tap0=' + socket.inet_ntoa(a[20:24]))\n\
except OSError as e:\n    print('tap0=none', e)\n\
print('resolv=' + open('/etc/resolv.conf').read().strip())\n\
try:\n    c = socket.create_connection(('10.0.2.2', int(sys.argv[1])), timeout=3)\n    c.sendall(b'hi from the sandbox')\n    c.close()\n    print('host_loopback=reached')\n\
except OSError as e:\n    print('host_loopback=refused', e)\n";

fn egress_run(h: &Host, id: &str, uid: u32, allow: bool) -> (String, Option<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port().to_string();
    let code = code_dir();
    let mut s = secure(
        id,
        uid,
        code.path(),
        &python().0,
        &["-c", EGRESS_PROBE, &port],
    );
    s.isolation.network = Network::Egress {
        allow_host_loopback: allow,
    };
    let mut i = h.spawn(&s).expect("spawn egress");
    let slirp = slirp_pids_for(i.pid());
    assert_eq!(slirp.len(), 1, "one slirp4netns per instance");
    let out = i.take_output().expect("output");
    let status = wait_timeout(&mut i, Duration::from_secs(30));
    let output = read_output(&out, Duration::from_secs(5));
    assert!(status.success(), "{status:?} {output}");
    let got = listener.accept().ok().map(|(mut c, _)| {
        c.set_nonblocking(false).expect("blocking");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut b = String::new();
        let _ = c.read_to_string(&mut b);
        b
    });
    let pid = i.pid();
    drop(i);
    assert!(
        slirp_pids_for(pid).is_empty(),
        "slirp4netns outlived its instance"
    );
    assert!(slirp.iter().all(|p| dead(*p)));
    (output, got)
}

#[test]
fn egress_has_tap0_and_dns_but_not_the_host_loopback() {
    let Some(h) = egress_host("egress") else {
        return;
    };
    let (out, got) = egress_run(&h, "egress", 2013, false);
    let m = kv(&out);
    assert_eq!(m["tap0"], "10.0.2.100", "{out}");
    assert_eq!(m["resolv"], "nameserver 10.0.2.3", "{out}");
    assert!(m["host_loopback"].starts_with("refused"), "{out}");
    assert!(got.is_none(), "the sandbox reached the host's loopback");
}

#[test]
fn egress_may_allow_the_host_loopback() {
    let Some(h) = egress_host("egresslo") else {
        return;
    };
    let (out, got) = egress_run(&h, "egresslo", 2014, true);
    assert_eq!(kv(&out)["host_loopback"], "reached", "{out}");
    assert_eq!(got.as_deref(), Some("hi from the sandbox"));
}

#[test]
fn egress_without_slirp4netns_fails_closed() {
    let mut h = host("noslirp");
    h.set_slirp4netns(None);
    assert!(!h.egress_available());
    let code = code_dir();
    let mut s = sh("noslirp", 2015, code.path(), "echo should-not-run");
    s.isolation.network = Network::Egress {
        allow_host_loopback: false,
    };
    match h.spawn(&s) {
        Err(Error::EgressUnavailable(msg)) => assert!(msg.contains("slirp4netns"), "{msg}"),
        other => panic!("expected EgressUnavailable, got {other:?}"),
    }
}

#[test]
fn egress_whose_slirp4netns_fails_does_not_start() {
    let mut h = host("badslirp");
    h.set_slirp4netns(Some(PathBuf::from("/bin/false")));
    let code = code_dir();
    let mut s = sh("badslirp", 2016, code.path(), "echo should-not-run");
    s.isolation.network = Network::Egress {
        allow_host_loopback: false,
    };
    match h.spawn(&s) {
        Err(Error::StartNetwork(msg)) => assert!(msg.contains("slirp4netns"), "{msg}"),
        other => panic!("expected StartNetwork, got {other:?}"),
    }
    for d in h.cgroup_parent_dirs() {
        let left: Vec<_> = std::fs::read_dir(d)
            .expect("parent")
            .flatten()
            // The host's own frozen, empty cgroup (the v1 freezer's fast path) lives
            // as long as the host.
            .filter(|e| {
                e.path().is_dir() && !e.file_name().to_string_lossy().starts_with("freezer-pin-")
            })
            .collect();
        assert!(left.is_empty(), "instance cgroup left behind: {left:?}");
    }
}
