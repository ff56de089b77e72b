//! Helpers shared by the sandbox's integration tests (each test file is its own crate,
//! and each uses a different subset).
#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nimbus_sandbox::{Host, HostConfig, Instance};

pub const INIT: &str = env!("CARGO_BIN_EXE_nimbus-sandbox-test-init");

/// A host whose cgroup parent is unique to this test process and `name`.
pub fn host(kind: &str, name: &str) -> Host {
    let cfg = HostConfig {
        init_exe: PathBuf::from(INIT),
        parent: format!("nimbus-{kind}-{}-{name}", std::process::id()),
        ..HostConfig::default()
    };
    Host::detect(cfg).unwrap_or_else(|e| panic!("detect: {e}"))
}

/// (interpreter, its prefix): the real interpreter, not a pyenv shim (the sandbox's
/// env has no pyenv variables).
pub fn python() -> &'static (String, String) {
    static PY: OnceLock<(String, String)> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys;print(sys.executable);print(sys.prefix)"])
            .output()
            .expect("python3 is needed by these tests");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut l = text.lines();
        (
            l.next().expect("executable").to_string(),
            l.next().expect("prefix").to_string(),
        )
    })
}

/// A directory the instance uid can read (tempdirs are 0700).
pub fn readable_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).expect("write");
    }
    d
}

/// Reads the output pipe until EOF (every writer gone) or the deadline.
pub fn read_output(fd: &OwnedFd, until: Duration) -> String {
    let deadline = Instant::now() + until;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the output until `needle` appears (or EOF, or the limit).
pub fn read_until(fd: &OwnedFd, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !String::from_utf8_lossy(&out).contains(needle) {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits for the instance to exit; kills it and fails the test past `limit`.
pub fn wait_timeout(inst: &mut Instance, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = inst.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            inst.kill();
            panic!("instance {} did not exit within {limit:?}", inst.id());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every pid in the given cgroup directories, once each.
pub fn pids_in(dirs: &[PathBuf]) -> Vec<i32> {
    let mut v = Vec::new();
    for d in dirs {
        if let Ok(t) = std::fs::read_to_string(d.join("cgroup.procs")) {
            v.extend(t.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    v.sort();
    v.dedup();
    v
}
