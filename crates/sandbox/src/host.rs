//! The host side: detection at start-up ([`Host::detect`]) and one [`Instance`] per
//! sandboxed process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

use crate::cgroup::{self, InstanceCgroup};
use crate::init::{CONTROL_FD, INIT_ARG};
use crate::mountinfo::{self, Layout};
use crate::spec::{InitSpec, InstanceSpec, Isolation, Limits, SPEC_ENV};
use crate::{CgroupVersion, Error};

/// How the host sandboxes. Built by the CLI; nothing here reads env or flags.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where cgroupfs is mounted (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// Where procfs is mounted (`/proc`): mountinfo, own cgroup, capabilities.
    pub proc_root: PathBuf,
    /// The binary whose `__sandbox-init` subcommand calls [`crate::init_main`].
    pub init_exe: PathBuf,
    /// Run functions as plain processes: no namespaces, no cgroups. Only for hosts that
    /// cannot sandbox and only on explicit request.
    pub insecure_no_sandbox: bool,
    /// Name of the parent cgroup that holds every instance's cgroup.
    pub parent: String,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            init_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            insecure_no_sandbox: false,
            parent: "nimbus".to_string(),
        }
    }
}

/// State shared by a host and its instances; the parent cgroups go when the last holder
/// does (an instance may outlive the `Host` value).
#[derive(Debug)]
struct Shared {
    config: HostConfig,
    layout: Option<Layout>,
    parent_dirs: Vec<PathBuf>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        cgroup::remove_parent(&self.parent_dirs);
    }
}

/// A host able to start sandboxed instances.
#[derive(Debug, Clone)]
pub struct Host {
    shared: Arc<Shared>,
}

/// CAP_SYS_ADMIN's bit in the capability sets of `/proc/<pid>/status`.
const CAP_SYS_ADMIN: u32 = 21;

fn has_cap(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

impl Host {
    /// Checks the host can sandbox, finds the cgroup layout and creates the parent
    /// cgroup(s). With `insecure_no_sandbox` it checks nothing and warns loudly.
    pub fn detect(config: HostConfig) -> Result<Host, Error> {
        if !crate::spec::valid_id(&config.parent) {
            return Err(Error::Detect(format!(
                "cgroup parent name {:?} must be [A-Za-z0-9_-]",
                config.parent
            )));
        }
        if config.insecure_no_sandbox {
            tracing::warn!(
                "SANDBOX DISABLED (--insecure-no-sandbox): functions run as plain processes \
                 with this server's privileges, no namespaces and no cgroup limits; \
                 never run untrusted code like this"
            );
            return Ok(Host {
                shared: Arc::new(Shared {
                    config,
                    layout: None,
                    parent_dirs: Vec::new(),
                }),
            });
        }
        let read = |name: &str| {
            let path = config.proc_root.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::ReadProc { path, source })
        };
        if !has_cap(&read("self/status")?, CAP_SYS_ADMIN) {
            return Err(Error::Detect(
                "namespaces and cgroups need root or CAP_SYS_ADMIN; run as root or pass \
                 --insecure-no-sandbox"
                    .into(),
            ));
        }
        let mounts = mountinfo::parse_mountinfo(&read("self/mountinfo")?);
        let layout = mountinfo::choose_layout(&mounts, &config.cgroup_root, &read("self/cgroup")?)
            .map_err(Error::Detect)?;
        let parent_dirs = cgroup::create_parent(&layout, &config.parent)?;
        let stale = cgroup::reap_stale(&parent_dirs);
        if stale > 0 {
            tracing::warn!(
                count = stale,
                "removed instance cgroups left by an earlier run"
            );
        }
        let host = Host {
            shared: Arc::new(Shared {
                config,
                layout: Some(layout),
                parent_dirs,
            }),
        };
        host.probe()?;
        Ok(host)
    }

    /// Runs init through every namespace step without a program, proving that the
    /// kernel lets us (and that `init_exe` really dispatches `__sandbox-init`).
    fn probe(&self) -> Result<(), Error> {
        let spec = InstanceSpec {
            id: "probe".into(),
            program: PathBuf::from("/"),
            args: Vec::new(),
            env: Vec::new(),
            workdir: PathBuf::from("/"),
            limits: Limits::default(),
            isolation: Isolation::default(),
        };
        let mut init = InitSpec::new(&spec, Vec::new(), true);
        init.probe = true;
        let mut inst = self.start(&spec, init, None)?;
        let status = inst.wait()?;
        if status.success() {
            return Ok(());
        }
        let mut why = String::new();
        if let Some(out) = inst.take_output() {
            let mut buf = vec![0u8; 4096];
            // The probe has exited, so whatever it wrote is already in the pipe.
            if let Ok(n) = nix::unistd::read(out.as_raw_fd(), &mut buf) {
                why = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            }
        }
        Err(Error::Detect(format!(
            "sandbox probe via {} {INIT_ARG} failed ({status}): {why}",
            self.shared.config.init_exe.display()
        )))
    }

    /// `None` when running without a sandbox.
    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        self.shared.layout.as_ref().map(Layout::version)
    }

    /// The parent cgroup directories instances are created in (empty without sandbox).
    pub fn cgroup_parent_dirs(&self) -> &[PathBuf] {
        &self.shared.parent_dirs
    }

    /// Creates the instance's cgroups with its limits, then starts init in them.
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, Error> {
        spec.validate()?;
        let Some(layout) = &self.shared.layout else {
            let init = InitSpec::new(spec, Vec::new(), false);
            return self.start(spec, init, None);
        };
        let cg =
            InstanceCgroup::create(layout, &self.shared.config.parent, &spec.id, &spec.limits)?;
        let init = InitSpec::new(spec, cg.procs_files(), true);
        self.start(spec, init, Some(cg))
    }

    fn start(
        &self,
        spec: &InstanceSpec,
        init: InitSpec,
        cgroup: Option<InstanceCgroup>,
    ) -> Result<Instance, Error> {
        // Whatever fails below, the cgroup must not outlive this call.
        let mut guard = CgroupGuard(cgroup);
        let json = serde_json::to_string(&init).map_err(Error::EncodeSpec)?;
        let (host_end, child_end) = UnixStream::pair().map_err(Error::CreateSocketPair)?;
        let child_end = above_stdio(child_end.into())?;
        let (out_r, out_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::CreatePipe(e.into()))?;
        let out_w2 = out_w.try_clone().map_err(Error::CreatePipe)?;
        let child_fd: RawFd = child_end.as_raw_fd();

        let mut cmd = Command::new(&self.shared.config.init_exe);
        cmd.arg(INIT_ARG)
            .env_clear()
            .env(SPEC_ENV, json)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2));
        if init.namespaces {
            // Fine: init puts its child in its own pid namespace.
        } else {
            // Without namespaces the process group is the only handle on descendants.
            cmd.process_group(0);
        }
        // SAFETY: the closure runs between fork and exec and only calls dup2/fcntl,
        // which are async-signal-safe, on an fd number captured by value.
        unsafe {
            cmd.pre_exec(move || {
                if child_fd == CONTROL_FD {
                    // dup2 onto itself keeps CLOEXEC; clear it explicitly.
                    if libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(Error::Spawn)?;
        // Close our copies of the child's ends now, or the output pipe never reaches EOF.
        drop(cmd);
        drop(child_end);
        nix::fcntl::fcntl(
            out_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::CreatePipe(e.into()))?;
        Ok(Instance {
            id: spec.id.clone(),
            child,
            status: None,
            control: Some(host_end),
            output: Some(out_r),
            cgroup: guard.0.take(),
            namespaces: init.namespaces,
            _shared: self.shared.clone(),
        })
    }
}

struct CgroupGuard(Option<InstanceCgroup>);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = &self.0 {
            cg.kill_all();
            cg.remove(Duration::from_secs(1));
        }
    }
}

/// std's child setup dup2s stdio before our pre_exec; a control fd numbered 0..=2 would
/// be overwritten first, so move it out of the way.
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, Error> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(Error::CreateSocketPair(std::io::Error::last_os_error()));
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// One running (or finished, not yet dropped) sandboxed process.
///
/// Dropping it kills everything in it, reaps init and removes its cgroups; that blocks
/// for up to a few milliseconds (longer only if the kernel is slow to empty the cgroup),
/// so async callers drop it in `spawn_blocking`.
#[derive(Debug)]
pub struct Instance {
    id: String,
    child: Child,
    status: Option<ExitStatus>,
    control: Option<UnixStream>,
    output: Option<OwnedFd>,
    cgroup: Option<InstanceCgroup>,
    namespaces: bool,
    _shared: Arc<Shared>,
}

impl Instance {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host pid of init (of the program itself when running without sandbox).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The host's end of the control socket (the instance's fd 3). Blocking mode.
    pub fn take_control(&mut self) -> Option<UnixStream> {
        self.control.take()
    }

    /// The read end of the stdout+stderr pipe, already `O_NONBLOCK`.
    pub fn take_output(&mut self) -> Option<OwnedFd> {
        self.output.take()
    }

    /// Changes the instance's CPU quota while it runs. The worker starts instances with
    /// a boosted quota so interpreter start-up is not throttled (Lambda, too, lets init
    /// burst), then drops to the function's proportional share once its handler loaded.
    pub fn set_cpu_millis(&self, cpu_millis: u32) -> Result<(), Error> {
        match &self.cgroup {
            Some(cg) => cg.set_cpu_millis(cpu_millis.max(crate::spec::MIN_CPU_MILLIS)),
            None => Ok(()),
        }
    }

    /// The instance's cgroup directories (empty without sandbox).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup
            .as_ref()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    /// SIGKILLs everything in the instance. The program and its descendants go first
    /// (under a freeze, so nothing forks away); init is given a moment to reap them,
    /// so nothing is left as a zombie for the host's pid 1, then is killed too.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            if let Some(cg) = &self.cgroup {
                cg.kill_all();
            }
            return;
        }
        let init = self.child.id() as i32;
        match self.cgroup.take() {
            Some(cg) => {
                // Repeated because init may still be on its way to forking the program
                // (an instance killed right after spawn): killing init first would leave
                // that program orphaned to the host's pid 1.
                let deadline = Instant::now() + Duration::from_millis(100);
                loop {
                    cg.kill_all_except(Some(init));
                    match self.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_micros(200))
                        }
                        Ok(None) => break,
                    }
                }
                let _ = self.child.kill();
                cg.kill_all();
                self.cgroup = Some(cg);
            }
            None if !self.namespaces => {
                // The process group made at spawn holds the program's descendants.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(init),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = self.child.kill();
            }
            None => {
                let _ = self.child.kill();
            }
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let s = self.child.try_wait().map_err(Error::Wait)?;
        self.status = s;
        Ok(s)
    }

    pub fn wait(&mut self) -> Result<ExitStatus, Error> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self.child.wait().map_err(Error::Wait)?;
        self.status = Some(s);
        Ok(s)
    }

    /// Whether the memory cgroup's OOM killer killed something in this instance.
    pub fn oom_killed(&self) -> bool {
        let Some(cg) = &self.cgroup else {
            return false;
        };
        if !cg.oom_needs_sigkill_evidence() {
            return cg.oom_killed();
        }
        use std::os::unix::process::ExitStatusExt;
        cg.oom_killed()
            && self
                .status
                .is_some_and(|s| s.signal() == Some(9) || s.code() == Some(128 + 9))
    }

    pub fn memory_peak_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref()?.memory_peak_bytes()
    }

    pub fn memory_current_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref()?.memory_current_bytes()
    }

    pub fn cpu_usage_ns(&self) -> Option<u64> {
        self.cgroup.as_ref()?.cpu_usage_ns()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        if self.wait().is_err() {
            tracing::warn!(id = %self.id, "could not reap sandbox init");
        }
        if let Some(cg) = &self.cgroup {
            cg.remove(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn is<T: Send + Sync>() {}
        is::<Host>();
        is::<Instance>();
    }

    #[test]
    fn reads_cap_sys_admin() {
        assert!(has_cap(
            "Name:\tx\nCapEff:\t000001ffffffffff\n",
            CAP_SYS_ADMIN
        ));
        assert!(!has_cap("CapEff:\t0000000000000000\n", CAP_SYS_ADMIN));
        assert!(has_cap("CapEff:\t0000000000200000\n", CAP_SYS_ADMIN));
        assert!(!has_cap("CapPrm:\tffffffffffffffff\n", CAP_SYS_ADMIN));
        assert!(!has_cap("CapEff:\tzz\n", CAP_SYS_ADMIN));
    }

    #[test]
    fn detect_rejects_bad_parent_name() {
        let cfg = HostConfig {
            parent: "../etc".into(),
            insecure_no_sandbox: true,
            ..HostConfig::default()
        };
        assert!(matches!(Host::detect(cfg), Err(Error::Detect(_))));
    }

    #[test]
    fn detect_without_caps_fails_closed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("self")).expect("mkdir");
        std::fs::write(
            tmp.path().join("self/status"),
            "CapEff:\t0000000000000000\n",
        )
        .expect("write");
        let cfg = HostConfig {
            proc_root: tmp.path().to_path_buf(),
            ..HostConfig::default()
        };
        let err = Host::detect(cfg).expect_err("no caps");
        assert!(err.to_string().contains("CAP_SYS_ADMIN"), "{err}");
    }

    #[test]
    fn insecure_host_has_no_cgroups() {
        let cfg = HostConfig {
            insecure_no_sandbox: true,
            ..HostConfig::default()
        };
        let host = Host::detect(cfg).expect("insecure detect");
        assert_eq!(host.cgroup_version(), None);
        assert!(host.cgroup_parent_dirs().is_empty());
    }
}
