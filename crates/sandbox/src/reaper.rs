//! Pid 1 of an instance's pid namespace once the program runs: a reaper.
//!
//! Orphans in a pid namespace are re-parented to its pid 1. Interpreters never wait
//! for children they did not start, so with the program as pid 1 every background
//! child a function leaked stayed a zombie and held one of the instance's pids until
//! `fork` failed. Init therefore forks the program (pid 2) and stays as pid 1, for
//! every runtime at once (`exec` functions included), doing nothing but:
//!
//! - reaping every child that exits, orphans included;
//! - forwarding SIGTERM and SIGINT from the supervisor to the program;
//! - exiting with the program's status (128+signo when it was killed by a signal),
//!   which makes the kernel SIGKILL everything left in the namespace.
//!
//! It runs with the program's confinement: the same uid/gid, no capabilities,
//! `no_new_privs`, the same seccomp filter, not dumpable (so the function cannot read
//! or write its memory through `/proc/1/mem`), and no file descriptors at all. A
//! function can signal it (same uid) but, as a pid namespace's init, it only receives
//! the signals it blocks for `sigwait`: SIGKILL and SIGSTOP from inside the namespace
//! are dropped by the kernel, and a SIGTERM or SIGINT from inside is only forwarded to
//! the program, which the function could signal itself. A SIGKILL of the supervisor
//! (the host's kill) reaches it as its parent-death signal, and the namespace goes
//! with it.
//!
//! Memory: a fork of the supervisor that never allocates again; its pages are shared
//! copy-on-write with the supervisor.

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::init::{Failure, SETUP_FAILED_EXIT, drop_privileges, prctl, report_failure};
use crate::spec::InitSpec;

/// Confines pid 1 like the program, then reaps until the program exits. Returns the
/// status pid 1 must exit with.
pub(crate) fn run(program: Pid, spec: &InitSpec, seccomp: Option<&seccompiler::BpfProgram>) -> i32 {
    if let Err(Failure(msg)) = confine(spec, seccomp) {
        // A reaper that kept its privileges must not stay beside the function.
        let _ = kill(program, Signal::SIGKILL);
        report_failure(&format!("confine pid 1: {msg}"));
        return SETUP_FAILED_EXIT;
    }
    close_all_fds();
    reap_until_exit(program)
}

fn confine(spec: &InitSpec, seccomp: Option<&seccompiler::BpfProgram>) -> Result<(), Failure> {
    drop_privileges(spec.isolation.uid, spec.isolation.gid)?;
    prctl("clear dumpable", libc::PR_SET_DUMPABLE, 0)?;
    if let Some(prog) = seccomp {
        crate::seccomp::install(prog)
            .map_err(|e| Failure(format!("install seccomp filter: {e}")))?;
    }
    Ok(())
}

/// Holding the control socket or the output pipe would keep the host from seeing EOF
/// when the program closes them; pid 1 needs no descriptor at all.
fn close_all_fds() {
    // SAFETY: close_range only closes descriptors; nothing in this process uses any
    // after this point.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 0u32, libc::c_uint::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9: the supervisor hands over stdio, fd 3 and fd 4 only
        // (everything else is close-on-exec and was never duplicated without it).
        for fd in 0..=crate::init::CONTROL_FD + 1 {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The signals pid 1 waits for. They arrive blocked (the supervisor blocked them before
/// forking), so none is lost between the fork and the first wait.
fn waited() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

fn reap_until_exit(program: Pid) -> i32 {
    let set = waited();
    loop {
        if let Some(code) = reap(program) {
            return code;
        }
        // SIGCHLD needs nothing here: the loop's top reaps, however many coalesced.
        if let Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) = set.wait() {
            let _ = kill(program, sig);
        }
    }
}

/// Reaps every child that has exited. `Some(status)` once the program is among them.
fn reap(program: Pid) -> Option<i32> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => return Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                return Some(128 + sig as i32);
            }
            Ok(WaitStatus::StillAlive) => return None,
            // An orphan, reaped: look for more.
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD: the program is gone without our seeing its status (cannot
            // happen: only pid 1 waits for it).
            Err(_) => return Some(SETUP_FAILED_EXIT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{ForkResult, fork};
    use std::time::Duration;

    /// Forks a child that runs `f` and `_exit`s with its result. Only plain syscalls
    /// run in children (no allocation: the test harness is multi-threaded).
    fn spawn(f: impl FnOnce() -> i32) -> Option<Pid> {
        // SAFETY: the child runs `f` (sleeps, waits, signals: no allocation), then
        // _exits without unwinding into the harness.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => unsafe { libc::_exit(f()) },
            Ok(ForkResult::Parent { child }) => Some(child),
            Err(_) => None,
        }
    }

    fn reap_blocking(program: Pid) -> i32 {
        loop {
            if let Some(c) = reap(program) {
                return c;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What pid 1 does, in a child of its own so `waitpid(-1)` only sees the children
    /// this scenario made. 0 when every check held, else the number of the failed one.
    fn scenario() -> i32 {
        let Some(orphan) = spawn(|| 0) else { return 1 };
        let Some(program) = spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            7
        }) else {
            return 2;
        };
        if reap_blocking(program) != 7 {
            return 3;
        }
        // The other child was reaped on the way: waiting for it again finds nothing.
        if waitpid(orphan, Some(WaitPidFlag::WNOHANG)) != Err(Errno::ECHILD) {
            return 4;
        }
        let Some(killed) = spawn(|| {
            std::thread::sleep(Duration::from_secs(30));
            0
        }) else {
            return 5;
        };
        if kill(killed, Signal::SIGKILL).is_err() || reap_blocking(killed) != 128 + 9 {
            return 6;
        }
        0
    }

    #[test]
    fn reap_returns_the_programs_status_and_collects_orphans() {
        let pid = spawn(scenario).expect("fork");
        assert_eq!(waitpid(pid, None), Ok(WaitStatus::Exited(pid, 0)));
    }
}
