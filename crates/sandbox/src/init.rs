//! The child side: `<binary> __sandbox-init`, started by [`crate::Host::spawn`].
//!
//! Runs before any async runtime exists and stays single-threaded, which is what makes
//! `fork` here sound. Every step fails closed: on error it sends one `X` frame on fd 3
//! and exits 125 without running the program.
//!
//! ```text
//! outer init (host pid ns)         inner (pid 1 of the new pid ns)
//!   compile seccomp filter           close fd 4 and the signalfd;
//!   join cgroups                     make / private; rootfs + pivot_root (or fresh /proc)
//!   unshare(NS|PID|NET|IPC|UTS)      hostname, lo up
//!   chdir / (the pivot moves it)     fork ──────────────> program (pid 2): restore
//!   egress: 'U' on fd 4, wait 'G'    drop to the uid,      oom_score_adj and signals,
//!   block TERM/INT/CHLD, signalfd    no caps, seccomp,     rlimits, drop caps, setgroups,
//!   fork ───────────────────────>    close every fd;       setresgid/uid, verify,
//!                                    reap every child,     PDEATHSIG, NO_NEW_PRIVS,
//!                                    forward TERM/INT,     chdir, seccomp (last),
//!                                    exit with the         execve(program)
//!                                    program's status (reaper.rs)
//!   poll: signalfd (forward TERM/INT, reap) and, for a stem cell, fd 4 (assignments);
//!   exit with pid 1's status (128+signo when signalled)
//! ```
//!
//! Fd 4 ([`INIT_FD`]) is a `SOCK_SEQPACKET` socket to the host, present for egress
//! instances and stem cells. Egress: the host must not start slirp4netns before init is
//! in its own network namespace (slirp joins `/proc/<pid>/ns/net` and would otherwise
//! configure the host's), and the program must not start before the network is up; the
//! `U`/`G` messages order the two. Stem cells: init stays privileged in the instance's
//! mount namespace and, on the host's request, mounts the code at `/var/task` or
//! resizes `/tmp` (see `stem.rs`). Pivot_root moves init's root (and its cwd, once it is
//! `/`) to the instance's root along with the program's, so its paths resolve there.

use std::ffi::CString;
use std::fmt::Display;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigAction, SigHandler, SigSet, SigmaskHow, Signal, sigaction};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, chdir, execve, fork, sethostname};

use crate::spec::{InitSpec, Network, SPEC_ENV};

/// The hidden subcommand that must dispatch to [`init_main`] before any runtime starts.
pub const INIT_ARG: &str = "__sandbox-init";

/// The control channel's fd in the instance (docs/runtime-protocol.md).
pub const CONTROL_FD: i32 = 3;

/// The host<->init socket (egress handshake, stem assignments); the program never
/// holds it.
pub(crate) const INIT_FD: i32 = 4;

/// Exit status of init when the sandbox could not be set up (the `X` frame says why).
pub const SETUP_FAILED_EXIT: i32 = 125;

/// A failed step: `"<step>: <error>"` is what the host sees.
pub(crate) struct Failure(pub(crate) String);

pub(crate) fn step<T, E: Display>(name: &str, r: Result<T, E>) -> Result<T, Failure> {
    r.map_err(|e| Failure(format!("{name}: {e}")))
}

/// Entry point of `__sandbox-init`. Never returns: it becomes the program (exec) or exits.
pub fn init_main() -> ! {
    let code = match run() {
        Ok(code) => code,
        Err(Failure(msg)) => {
            report_failure(&msg);
            SETUP_FAILED_EXIT
        }
    };
    std::process::exit(code)
}

fn run() -> Result<i32, Failure> {
    // SAFETY: fcntl(F_GETFD) on an fd number only queries the descriptor table.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_GETFD) } < 0 {
        return Err(Failure("check control fd: fd 3 is not open".into()));
    }
    let raw = step("read spec", std::env::var(SPEC_ENV))?;
    let spec: InitSpec = step("parse spec", serde_json::from_str(&raw))?;
    let exec = step("prepare exec", Exec::new(&spec))?;
    step("close inherited fds", cloexec_from(CONTROL_FD + 1))?;
    let init_sock = if spec.has_init_socket() {
        // SAFETY: fcntl(F_GETFD) on an fd number only queries the descriptor table.
        if unsafe { libc::fcntl(INIT_FD, libc::F_GETFD) } < 0 {
            return Err(Failure("check init fd: fd 4 is not open".into()));
        }
        // SAFETY: the host placed the init socket at fd 4 for us; nothing else in this
        // process owns it.
        Some(unsafe { OwnedFd::from_raw_fd(INIT_FD) })
    } else {
        None
    };

    if !spec.namespaces {
        // insecure_no_sandbox: a plain process with rlimits, no isolation at all.
        if spec.probe {
            return Ok(0);
        }
        return Err(exec.run(&spec));
    }

    for procs in &spec.cgroup_procs {
        let pid = std::process::id().to_string();
        step(
            &format!("join cgroup {}", procs.display()),
            std::fs::write(procs, pid),
        )?;
    }

    // The memory cgroup's OOM killer must pick the function, never this supervisor (whose
    // death would hide the exit status); the child restores the original value.
    let oom_adj = std::fs::read_to_string("/proc/self/oom_score_adj").ok();
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");

    step(
        "unshare",
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS,
        ),
    )?;

    // The host's cwd would keep a copy of its whole mount tree alive in this namespace
    // after the program detaches the old root; `/` is moved to the new root instead.
    step("chdir /", chdir("/"))?;

    if let Network::Egress { .. } = spec.isolation.network {
        let sock = init_sock
            .as_ref()
            .ok_or_else(|| Failure("wait for the network: no init socket".into()))?;
        step("wait for the network", network_handshake(sock.as_fd()))?;
    }

    // Signals init handles arrive on a signalfd, read in the same poll loop as the
    // host's requests; blocked from before fork so none is lost in between.
    let mut handled = SigSet::empty();
    handled.add(Signal::SIGTERM);
    handled.add(Signal::SIGINT);
    handled.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    step(
        "block signals",
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled), Some(&mut old_mask)),
    )?;
    let sfd = step(
        "create signalfd",
        SignalFd::with_flags(&handled, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK),
    )?;

    // SAFETY: init is single-threaded (no runtime, no helper threads), so the child may
    // allocate and run arbitrary code after fork.
    match step("fork", unsafe { fork() })? {
        ForkResult::Child => {
            // The program must never hold the host's channel to init; close-on-exec
            // would do, but pid 1 runs setup code before exec.
            drop(init_sock);
            drop(sfd);
            let Failure(msg) = inner(&spec, &exec, &old_mask, oom_adj.as_deref());
            report_failure(&msg);
            // SAFETY: _exit skips atexit handlers and stdio flushing that belong to the
            // parent's copy of this process.
            unsafe { libc::_exit(SETUP_FAILED_EXIT) }
        }
        ForkResult::Parent { child } => {
            // The supervisor has nothing more to say on the control channel; holding it
            // would keep the host from seeing EOF when the program closes it.
            let _ = nix::unistd::close(CONTROL_FD);
            let serve = if spec.stem() {
                init_sock
            } else {
                drop(init_sock);
                None
            };
            Ok(supervise(child, &sfd, serve))
        }
    }
}

/// What a stem cell's init remembers between requests.
#[derive(Default)]
struct StemState {
    code_assigned: bool,
}

/// Waits for the child while forwarding TERM/INT to it and, for a stem cell, serving
/// the host's requests on `sock`. Returns init's exit status.
fn supervise(child: Pid, sfd: &SignalFd, mut sock: Option<OwnedFd>) -> i32 {
    let mut stem = StemState::default();
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD cannot happen for our own child; treat anything else as a crash.
            Err(_) => return SETUP_FAILED_EXIT,
        }
        let (signals, requests) = {
            let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            if let Some(s) = &sock {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => {
                    // Cannot wait for both any more: stop serving (the host's next
                    // request fails, closed) and fall back to a plain wait.
                    drop(sock);
                    return wait_blocking(child);
                }
            }
            let ready =
                |f: Option<&PollFd>| f.and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
            (ready(fds.first()), ready(fds.get(1)))
        };
        if signals {
            while let Ok(Some(info)) = sfd.read_signal() {
                let sig = info.ssi_signo as i32;
                if sig == libc::SIGTERM || sig == libc::SIGINT {
                    // SAFETY: kill(2) takes plain integers.
                    unsafe {
                        libc::kill(child.as_raw(), sig);
                    }
                }
            }
        }
        if requests
            && let Some(s) = &sock
            && !serve_request(s.as_fd(), &mut stem)
        {
            sock = None;
        }
    }
}

fn wait_blocking(child: Pid) -> i32 {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return SETUP_FAILED_EXIT,
        }
    }
}

/// Handles one request from the host. Returns false once the channel is closed.
fn serve_request(sock: BorrowedFd, stem: &mut StemState) -> bool {
    use crate::stem::{self, Request};
    let (msg, fds) = match stem::recv(sock) {
        Ok(Some(m)) => m,
        Ok(None) => return false,
        Err(Errno::EAGAIN) => return true,
        Err(_) => return false,
    };
    let result = match stem::parse_request(&msg, fds) {
        Request::Code(_) if stem.code_assigned => Err("code is already assigned".to_string()),
        Request::Code(tree) => {
            let r = stem::attach_code(tree.as_fd());
            stem.code_assigned = r.is_ok();
            r
        }
        Request::Tmp(bytes) if bytes < 4096 => Err(format!("tmp size {bytes} < 4096")),
        Request::Tmp(bytes) => stem::resize_tmp(bytes),
        Request::Invalid(why) => Err(why),
    };
    stem::send(sock, &stem::reply(&result), None).is_ok()
}

/// Pid 1 of the new namespaces: sets up the instance, then forks the program and stays
/// as its reaper ([`crate::reaper`]). Only returns on failure (in pid 1 before the fork,
/// or in the program's process before its execve).
fn inner(spec: &InitSpec, exec: &Exec, old_mask: &SigSet, oom_adj: Option<&str>) -> Failure {
    if let Err(f) = set_up_instance(spec) {
        return f;
    }
    // SAFETY: pid 1 is single-threaded (a fork of the single-threaded supervisor), so
    // the child may allocate and run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => Failure(format!("fork the program: {e}")),
        Ok(ForkResult::Child) => program(spec, exec, old_mask, oom_adj),
        Ok(ForkResult::Parent { child }) => {
            let code = crate::reaper::run(child, spec, exec.seccomp.as_ref());
            // SAFETY: _exit skips atexit handlers and stdio flushing that belong to the
            // supervisor's copy of this process.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Everything pid 1 does while still privileged: mounts, root, hostname, loopback.
fn set_up_instance(spec: &InitSpec) -> Result<(), Failure> {
    // The supervisor is single-threaded, so "parent died" is exactly "supervisor died".
    prctl(
        "set parent death signal",
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
    )?;
    step(
        "make mounts private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    match &spec.isolation.rootfs {
        Some(rootfs) => step(
            "enter rootfs",
            crate::rootfs::enter(rootfs, &spec.etc_files),
        )?,
        None => step(
            "mount /proc",
            mount(
                Some("proc"),
                "/proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            ),
        )?,
    }
    step("set hostname", sethostname(&spec.isolation.hostname))?;
    step("bring up lo", loopback_up())
}

/// The program's process (pid 2): the signal state and OOM score every program starts
/// with, then privileges, seccomp and execve. Only returns on failure.
fn program(spec: &InitSpec, exec: &Exec, old_mask: &SigSet, oom_adj: Option<&str>) -> Failure {
    let r = (|| -> Result<(), Failure> {
        // Pid 1 keeps the supervisor's -1000 (the OOM killer must pick the program,
        // never its reaper); raising it back needs no privilege, but /proc/self stops
        // being ours to write once the uid changes, so it happens here.
        if let Some(adj) = oom_adj {
            step(
                "restore oom_score_adj",
                std::fs::write("/proc/self/oom_score_adj", adj.trim()),
            )?;
        }
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
            // SAFETY: restoring the default disposition installs no handler.
            step("reset signals", unsafe {
                sigaction(
                    sig,
                    &SigAction::new(
                        SigHandler::SigDfl,
                        nix::sys::signal::SaFlags::empty(),
                        SigSet::empty(),
                    ),
                )
            })?;
        }
        step(
            "restore signal mask",
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(old_mask), None),
        )?;
        Ok(())
    })();
    match r {
        Ok(()) => exec.run(spec),
        Err(f) => f,
    }
}

/// Tells the host we are in the new network namespace, then waits until it says the
/// network is up. Anything but `G` (EOF: the host gave up) fails closed.
fn network_handshake(sock: BorrowedFd) -> Result<(), String> {
    crate::stem::send(sock, b"U", None).map_err(|e| e.to_string())?;
    match crate::stem::recv(sock) {
        Ok(Some((m, _))) if m == b"G" => Ok(()),
        Ok(_) => Err("the host did not bring the network up".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn prctl(what: &str, op: libc::c_int, arg: libc::c_ulong) -> Result<(), Failure> {
    // SAFETY: the prctl operations used here take integer arguments only.
    if unsafe { libc::prctl(op, arg, 0, 0, 0) } != 0 {
        return Err(Failure(format!(
            "{what}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Drops every capability and becomes `uid`/`gid`, keeping the parent-death signal and
/// setting no_new_privs. The bounding set goes first: dropping it needs CAP_SETPCAP.
pub(crate) fn drop_privileges(uid: u32, gid: u32) -> Result<(), Failure> {
    use caps::CapSet;
    // Walk every bit, not just the caps this build knows: newer kernels add more.
    for cap in 0..64 {
        // SAFETY: integer-only prctl.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            break;
        }
        prctl("drop bounding capability", libc::PR_CAPBSET_DROP, cap)?;
    }
    step(
        "clear ambient capabilities",
        caps::clear(None, CapSet::Ambient),
    )?;
    step(
        "clear inheritable capabilities",
        caps::clear(None, CapSet::Inheritable),
    )?;
    step("setgroups", nix::unistd::setgroups(&[]))?;
    let (g, u) = (
        nix::unistd::Gid::from_raw(gid),
        nix::unistd::Uid::from_raw(uid),
    );
    step(&format!("setresgid {gid}"), nix::unistd::setresgid(g, g, g))?;
    step(&format!("setresuid {uid}"), nix::unistd::setresuid(u, u, u))?;
    // A uid change to non-zero clears these already; uid 0 keeps them, so always clear.
    step(
        "clear effective capabilities",
        caps::clear(None, CapSet::Effective),
    )?;
    step(
        "clear permitted capabilities",
        caps::clear(None, CapSet::Permitted),
    )?;
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        let left = step("read capabilities", caps::read(None, set))?;
        if !left.is_empty() {
            return Err(Failure(format!(
                "verify capabilities: {set:?} still holds {left:?}"
            )));
        }
    }
    for cap in 0..64 {
        // SAFETY: integer-only prctl.
        match unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } {
            0 => {}
            1 => {
                return Err(Failure(format!(
                    "verify capabilities: bounding set still holds {cap}"
                )));
            }
            _ => break,
        }
    }
    // The uid change cleared the parent-death signal.
    prctl(
        "set parent death signal",
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
    )?;
    prctl("set no_new_privs", libc::PR_SET_NO_NEW_PRIVS, 1)
}

/// argv/envp (and the seccomp program) prepared before fork so the child does no
/// fallible conversions.
struct Exec {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    seccomp: Option<seccompiler::BpfProgram>,
}

impl Exec {
    fn new(spec: &InitSpec) -> Result<Exec, String> {
        let seccomp = if spec.namespaces && spec.isolation.seccomp {
            Some(crate::seccomp::program().map_err(|e| format!("compile seccomp filter: {e}"))?)
        } else {
            None
        };
        let mut e = Exec::strings(spec).map_err(|e| e.to_string())?;
        e.seccomp = seccomp;
        Ok(e)
    }

    fn strings(spec: &InitSpec) -> Result<Exec, std::ffi::NulError> {
        let program = CString::new(spec.program.as_str())?;
        let mut argv = vec![program.clone()];
        for a in &spec.args {
            argv.push(CString::new(a.as_str())?);
        }
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")))
            .collect::<Result<_, _>>()?;
        Ok(Exec {
            program,
            argv,
            envp,
            seccomp: None,
        })
    }

    /// rlimits, identity, chdir, default SIGPIPE, seccomp, execve. Only returns on
    /// failure (or, for the probe, exits 0 right before execve).
    fn run(&self, spec: &InitSpec) -> Failure {
        let r = (|| -> Result<std::convert::Infallible, Failure> {
            step("set RLIMIT_CORE", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
            step(
                "set RLIMIT_NOFILE",
                setrlimit(Resource::RLIMIT_NOFILE, spec.nofile, spec.nofile),
            )?;
            step(
                "set RLIMIT_FSIZE",
                setrlimit(Resource::RLIMIT_FSIZE, spec.fsize_bytes, spec.fsize_bytes),
            )?;
            if spec.namespaces {
                drop_privileges(spec.isolation.uid, spec.isolation.gid)?;
            }
            step(
                &format!("chdir {}", spec.workdir),
                chdir(spec.workdir.as_str()),
            )?;
            // Rust's runtime ignores SIGPIPE and an ignored disposition survives execve;
            // the program must get the default every other process starts with.
            // SAFETY: restoring the default disposition installs no handler.
            step("reset SIGPIPE", unsafe {
                nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl)
            })?;
            if let Some(prog) = &self.seccomp {
                step("install seccomp filter", crate::seccomp::install(prog))?;
            }
            if spec.probe {
                // SAFETY: _exit skips atexit handlers and stdio flushing that belong
                // to the parent's copy of this process; the probe ends here.
                unsafe { libc::_exit(0) }
            }
            step(
                &format!("execve {}", spec.program),
                execve(&self.program, &self.argv, &self.envp),
            )
        })();
        match r {
            Err(f) => f,
            Ok(never) => match never {},
        }
    }
}

/// Marks every fd >= `first` close-on-exec so only stdio and the control fd reach the
/// program, whatever the host process leaked.
fn cloexec_from(first: i32) -> std::io::Result<()> {
    // SAFETY: close_range with CLOEXEC only sets flags on descriptors; no memory involved.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // Kernels before 5.11: walk /proc/self/fd instead.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first)
        .collect();
    for fd in fds {
        // SAFETY: setting FD_CLOEXEC on a (possibly already closed) descriptor number
        // touches no memory; EBADF for the read_dir fd that is gone is fine.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// `ip link set lo up`: the new net namespace has only `lo`, and it starts down.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor we own exclusively.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we pass, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `X` frame of docs/runtime-protocol.md.
pub(crate) fn setup_failed_frame(message: &str) -> Vec<u8> {
    let payload = serde_json::json!({
        "errorType": "Sandbox.SetupFailed",
        "errorMessage": message,
    })
    .to_string();
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(b'X');
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload.as_bytes());
    frame
}

pub(crate) fn report_failure(message: &str) {
    eprintln!("nimbus sandbox: {message}");
    let frame = setup_failed_frame(message);
    // SAFETY: fd 3 is the control socket handed to us by the host (or not open, in which
    // case write fails with EBADF and the exit status alone tells the story); it is
    // only borrowed for the duration of the writes.
    let fd = unsafe { BorrowedFd::borrow_raw(CONTROL_FD) };
    let mut rest = &frame[..];
    while !rest.is_empty() {
        match nix::unistd::write(fd, rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_frame_layout() {
        let f = setup_failed_frame("chdir /nope: ENOENT: No such file or directory");
        assert_eq!(f[0], b'X');
        let len = u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize;
        assert_eq!(len, f.len() - 5);
        let v: serde_json::Value = serde_json::from_slice(&f[5..]).expect("json");
        assert_eq!(v["errorType"], "Sandbox.SetupFailed");
        assert_eq!(
            v["errorMessage"],
            "chdir /nope: ENOENT: No such file or directory"
        );
    }

    #[test]
    fn exec_rejects_nul() {
        let spec = InitSpec {
            program: "/bin/true".into(),
            args: vec!["a\0".into()],
            env: vec![],
            workdir: "/".into(),
            nofile: 8,
            fsize_bytes: 1,
            cgroup_procs: vec![],
            namespaces: true,
            isolation: crate::spec::Isolation::default(),
            etc_files: vec![],
            probe: false,
        };
        assert!(Exec::new(&spec).is_err());
        let ok = InitSpec {
            args: vec!["x".into()],
            env: vec![("K".into(), "V".into())],
            ..spec
        };
        let e = Exec::new(&ok).expect("exec");
        assert_eq!(e.argv.len(), 2);
        assert_eq!(e.argv[0].to_str(), Ok("/bin/true"));
        assert_eq!(e.envp[0].to_str(), Ok("K=V"));
        assert!(e.seccomp.is_some_and(|p| !p.is_empty()));
    }
}
