//! The host side: detection at start-up ([`Host::detect`]) and one [`Instance`] per
//! sandboxed process.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

use crate::cgroup::{self, InstanceCgroup};
use crate::init::{CONTROL_FD, INIT_ARG, INIT_FD};
use crate::mountinfo::{self, Layout};
use crate::spec::{InitSpec, InstanceSpec, Isolation, Limits, Network, Rootfs, SPEC_ENV};
use crate::stem::{self, RequestError};
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
    /// This server's own cgroup below `parent` (one per data dir): its instances live
    /// there, and only there does start-up reap what an earlier run left. Other servers
    /// sharing `parent` keep their instances. `None`: the caller owns all of `parent`.
    pub owner: Option<String>,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            init_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            insecure_no_sandbox: false,
            parent: "nimbus".to_string(),
            owner: None,
        }
    }
}

/// State shared by a host and its instances; the parent cgroups go when the last holder
/// does (an instance may outlive the `Host` value).
#[derive(Debug)]
struct Shared {
    config: HostConfig,
    layout: Option<Layout>,
    /// `parent` or `parent/owner`: where instance cgroups are made.
    instance_parent: String,
    parent_dirs: Vec<PathBuf>,
    /// Keeps the v1 freezer's fast path on while this host lives (see `FreezerPin`).
    freezer_pin: Option<cgroup::FreezerPin>,
    /// Instance cgroups that outlived their instance, for [`Host::retire_leftovers`].
    leftovers: cgroup::Leftovers,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The pin is a child of the parent: it must go first.
        drop(self.freezer_pin.take());
        self.leftovers.retry(Duration::from_millis(100));
        cgroup::remove_parent(&self.parent_dirs);
        if self.config.owner.is_some() {
            let shared: Vec<PathBuf> = self
                .parent_dirs
                .iter()
                .filter_map(|d| d.parent().map(Path::to_path_buf))
                .collect();
            cgroup::remove_parent(&shared);
        }
    }
}

/// A host able to start sandboxed instances.
#[derive(Debug, Clone)]
pub struct Host {
    shared: Arc<Shared>,
    /// slirp4netns, for [`Network::Egress`]; `None` makes egress spawns fail.
    slirp4netns: Option<PathBuf>,
    /// The kernel has the mount API stem cells need.
    stems: bool,
}

/// Where Debian (and most distributions) install slirp4netns. A fixed list, not a
/// `PATH` search: only the CLI reads the environment.
const SLIRP4NETNS_PATHS: [&str; 2] = ["/usr/bin/slirp4netns", "/usr/local/bin/slirp4netns"];

/// How long the egress handshake (init in its netns, slirp4netns ready) may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);

/// Capacity asked for the instance's stdout+stderr pipe: Linux's default
/// `pipe-max-size`, and the worker's per-invocation log cap.
pub const OUTPUT_PIPE_BYTES: i32 = 1024 * 1024;

fn find_slirp4netns() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    SLIRP4NETNS_PATHS.iter().map(PathBuf::from).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
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
        for name in std::iter::once(&config.parent).chain(config.owner.as_ref()) {
            if !crate::spec::valid_id(name) {
                return Err(Error::Detect(format!(
                    "cgroup parent name {name:?} must be [A-Za-z0-9_-]"
                )));
            }
        }
        let instance_parent = match &config.owner {
            Some(owner) => format!("{}/{owner}", config.parent),
            None => config.parent.clone(),
        };
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
                    instance_parent,
                    parent_dirs: Vec::new(),
                    freezer_pin: None,
                    leftovers: Default::default(),
                }),
                slirp4netns: None,
                stems: false,
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
        let parent_dirs = cgroup::create_parent(&layout, &instance_parent)?;
        let stale = cgroup::reap_stale(&parent_dirs);
        if stale > 0 {
            tracing::warn!(
                count = stale,
                "removed instance cgroups left by an earlier run"
            );
        }
        let freezer_pin = cgroup::FreezerPin::create(&layout, &instance_parent);
        let host = Host {
            shared: Arc::new(Shared {
                config,
                layout: Some(layout),
                instance_parent,
                parent_dirs,
                freezer_pin,
                leftovers: Default::default(),
            }),
            slirp4netns: find_slirp4netns(),
            stems: stem::supported(),
        };
        host.probe()?;
        if !host.stems {
            tracing::warn!(
                "this kernel lacks open_tree/mount_setattr (Linux 5.12): no stem cells, \
                 every cold start starts an interpreter"
            );
        }
        if host.slirp4netns.is_none() {
            tracing::warn!(
                "slirp4netns not found ({}); functions with network egress cannot start",
                SLIRP4NETNS_PATHS.join(", ")
            );
        }
        Ok(host)
    }

    /// Runs init through every isolation step without a program (a rootfs with nothing
    /// but `/` at `/var/task`, uid/gid 65534, seccomp), proving that the kernel lets us
    /// (pivot_root, say, fails on an initramfs root) and that `init_exe` really
    /// dispatches `__sandbox-init`.
    fn probe(&self) -> Result<(), Error> {
        let mut rootfs = Rootfs::new("/");
        rootfs.ro_binds.clear();
        let spec = InstanceSpec {
            id: "probe".into(),
            program: PathBuf::from("/"),
            args: Vec::new(),
            env: Vec::new(),
            workdir: PathBuf::from("/"),
            limits: Limits::default(),
            isolation: Isolation::function(65534, 65534, rootfs, Network::None),
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

    /// Whether [`Network::Egress`] instances can start (slirp4netns was found).
    /// False when started with `insecure_no_sandbox`: instances then run as plain
    /// processes on the host's filesystem, and callers must not ask for a rootfs.
    pub fn isolates(&self) -> bool {
        self.cgroup_version().is_some()
    }

    pub fn egress_available(&self) -> bool {
        self.slirp4netns.is_some()
    }

    /// Whether stem cells ([`Rootfs::stem`], [`Instance::assign_code`]) can start: the
    /// host sandboxes and its kernel has open_tree and mount_setattr (Linux 5.12).
    pub fn stem_cells_available(&self) -> bool {
        self.stems
    }

    /// Overrides the slirp4netns binary found at start-up (`None`: egress unavailable).
    pub fn set_slirp4netns(&mut self, path: Option<PathBuf>) {
        self.slirp4netns = path;
    }

    /// `None` when running without a sandbox.
    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        self.shared.layout.as_ref().map(Layout::version)
    }

    /// Kills and removes, again, instance cgroups that would not go when their instance
    /// was dropped; returns how many are still left. Blocks for up to a few ms each.
    pub fn retire_leftovers(&self) -> usize {
        self.shared.leftovers.retry(Duration::from_millis(20))
    }

    /// The parent cgroup directories instances are created in (empty without sandbox).
    pub fn cgroup_parent_dirs(&self) -> &[PathBuf] {
        &self.shared.parent_dirs
    }

    /// Creates the instance's cgroups with its limits, then starts init in them. For
    /// [`Network::Egress`] it also brings up slirp4netns before returning (blocking for
    /// a few milliseconds), and fails with [`Error::EgressUnavailable`] without it.
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, Error> {
        spec.validate()?;
        if let Network::Egress { .. } = spec.isolation.network {
            if self.shared.layout.is_none() {
                return Err(Error::EgressUnavailable(
                    "network egress needs the sandbox (not --insecure-no-sandbox)".into(),
                ));
            }
            if self.slirp4netns.is_none() {
                return Err(Error::EgressUnavailable(format!(
                    "slirp4netns is not installed (looked in {})",
                    SLIRP4NETNS_PATHS.join(", ")
                )));
            }
        }
        let stem = spec.isolation.rootfs.as_ref().is_some_and(Rootfs::is_stem);
        if stem && !self.stems {
            return Err(Error::StemUnavailable(if self.shared.layout.is_none() {
                "stem cells need the sandbox (not --insecure-no-sandbox)".into()
            } else {
                "this kernel lacks open_tree/mount_setattr (Linux 5.12)".into()
            }));
        }
        let Some(layout) = &self.shared.layout else {
            let init = InitSpec::new(spec, Vec::new(), false);
            return self.start(spec, init, None);
        };
        let cg =
            InstanceCgroup::create(layout, &self.shared.instance_parent, &spec.id, &spec.limits)?;
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
        let child_end = above_fixed_fds(child_end.into())?;
        let egress = match init.isolation.network {
            Network::Egress {
                allow_host_loopback,
            } if init.namespaces => Some(allow_host_loopback),
            _ => None,
        };
        let (init_host, init_child) = if init.has_init_socket() {
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
            let (h, c) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| Error::CreateSocketPair(e.into()))?;
            (Some(h), Some(above_fixed_fds(c)?))
        } else {
            (None, None)
        };
        let init_fd: Option<RawFd> = init_child.as_ref().map(|f| f.as_raw_fd());
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
        // SAFETY: the closure runs between fork and exec and only calls dup2, which is
        // async-signal-safe, on fd numbers captured by value. Both sources are above
        // the fixed fds (above_fixed_fds), so neither dup2 clobbers the other's source,
        // and dup2 to a different number leaves the copy without CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = init_fd
                    && libc::dup2(fd, INIT_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(Error::Spawn)?;
        // Close our copies of the child's ends now, or the output pipe never reaches EOF.
        drop(cmd);
        drop(child_end);
        drop(init_child);
        nix::fcntl::fcntl(
            out_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::CreatePipe(e.into()))?;
        // The worker drains output on a timer rather than on every write (a wake-up of
        // the host per log line would cost more than the invocation); a roomy pipe
        // keeps a chatty function from blocking between drains. The buffer is charged
        // to the writer's memory cgroup. Best effort: a smaller pipe only drains sooner.
        let _ = nix::fcntl::fcntl(
            out_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_BYTES),
        );
        let mut inst = Instance {
            id: spec.id.clone(),
            child,
            status: None,
            control: Some(host_end),
            output: Some(out_r),
            cgroup: guard.0.take(),
            namespaces: init.namespaces,
            slirp: None,
            init: None,
            shared: self.shared.clone(),
        };
        if let (Some(allow_host_loopback), Some(sock)) = (egress, &init_host) {
            // On failure `inst` drops: init and its cgroup go, and init (which only
            // ever sees EOF instead of `G`) never runs the program.
            let slirp = self
                .slirp4netns
                .as_deref()
                .ok_or_else(|| Error::EgressUnavailable("slirp4netns is not installed".into()))?;
            inst.slirp = Some(start_network(slirp, &mut inst, sock, allow_host_loopback)?);
        }
        if init.stem() {
            inst.init = init_host.map(|s| Mutex::new(Some(s)));
        }
        Ok(inst)
    }
}

/// slirp4netns for one instance: killed and reaped with it, and gone by itself if the
/// host dies (its exit fd is a pipe whose write end only the host holds).
#[derive(Debug)]
struct Slirp {
    child: Child,
    _exit_w: OwnedFd,
}

impl Slirp {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn net_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::StartNetwork(format!("{what}: {e}"))
}

/// Reads one byte from `fd` within `NETWORK_TIMEOUT` (`None` on EOF).
fn read_byte(fd: RawFd, what: &str) -> Result<Option<u8>, Error> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + NETWORK_TIMEOUT;
    // SAFETY: the caller keeps `fd` open for the duration of this call.
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(net_err(what, "timed out"));
        }
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(bfd, PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(net_err(what, e)),
        }
        let mut b = [0u8; 1];
        match nix::unistd::read(fd, &mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(net_err(what, e)),
        }
    }
}

/// Waits for init to be in its network namespace, starts slirp4netns on it, waits
/// until `tap0` is configured, then releases init.
fn start_network(
    slirp: &std::path::Path,
    inst: &mut Instance,
    sync: &OwnedFd,
    allow_host_loopback: bool,
) -> Result<Slirp, Error> {
    match read_byte(
        sync.as_raw_fd(),
        "wait for init to enter its network namespace",
    )? {
        Some(b'U') => {}
        _ => {
            return Err(net_err(
                "wait for init to enter its network namespace",
                "init exited",
            ));
        }
    }
    let (ready_r, ready_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| net_err("create ready pipe", e))?;
    let (exit_r, exit_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| net_err("create exit pipe", e))?;
    let ready_w = above_fixed_fds(ready_w)?;
    let exit_r = above_fixed_fds(exit_r)?;
    let (ready_raw, exit_raw) = (ready_w.as_raw_fd(), exit_r.as_raw_fd());
    // slirp's diagnostics, read only if it fails to start. A memfd rather than a pipe:
    // nobody drains it later, and a full or closed pipe would stall or kill slirp.
    let log = std::fs::File::from(
        nix::sys::memfd::memfd_create(
            c"slirp4netns-log",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| net_err("create slirp4netns log", e))?,
    );
    let mut cmd = Command::new(slirp);
    cmd.args(["--configure", "--mtu=65520"]);
    if !allow_host_loopback {
        cmd.arg("--disable-host-loopback");
    }
    // slirp parses packets from hostile code as root on the host: let it confine
    // itself (own mount namespace, capabilities dropped, syscall filter).
    cmd.args(["--enable-sandbox", "--enable-seccomp"]);
    cmd.arg(format!("--ready-fd={SLIRP_READY_FD}"))
        .arg(format!("--exit-fd={SLIRP_EXIT_FD}"))
        .arg(inst.pid().to_string())
        .arg("tap0")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            log.try_clone()
                .map_err(|e| net_err("dup slirp4netns log", e))?,
        ));
    // SAFETY: only dup2 (async-signal-safe) on fd numbers captured by value; both
    // sources are above the fixed fds.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(ready_raw, SLIRP_READY_FD) < 0 || libc::dup2(exit_raw, SLIRP_EXIT_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| net_err("spawn slirp4netns", e))?;
    drop(cmd);
    drop(ready_w);
    drop(exit_r);
    let mut slirp = Slirp {
        child,
        _exit_w: exit_w,
    };
    match read_byte(ready_r.as_raw_fd(), "wait for slirp4netns") {
        Ok(Some(_)) => {}
        other => {
            slirp.stop();
            let mut why = String::new();
            {
                use std::io::{Read, Seek};
                let mut log = &log;
                if log.seek(std::io::SeekFrom::Start(0)).is_ok() {
                    let _ = log.take(4096).read_to_string(&mut why);
                }
            }
            let what = match other {
                Err(e) => e.to_string(),
                _ => "slirp4netns exited".into(),
            };
            return Err(net_err(&what, why.trim()));
        }
    }
    if let Err(e) = stem::send(sync.as_fd(), b"G", None) {
        slirp.stop();
        return Err(net_err("release init", e));
    }
    Ok(slirp)
}

/// Where slirp4netns finds its ready and exit fds.
const SLIRP_READY_FD: RawFd = 3;
const SLIRP_EXIT_FD: RawFd = 4;

struct CgroupGuard(Option<InstanceCgroup>);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = &self.0 {
            cg.kill_all();
            cg.remove(Duration::from_secs(1));
        }
    }
}

/// std's child setup dup2s stdio before our pre_exec, and pre_exec dup2s onto fds 3
/// and 4; a source numbered 0..=4 could be overwritten first, so move it out of the way.
fn above_fixed_fds(fd: OwnedFd) -> Result<OwnedFd, Error> {
    if fd.as_raw_fd() > INIT_FD.max(SLIRP_EXIT_FD) {
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
    slirp: Option<Slirp>,
    /// A stem cell's channel to its init; `None` inside once it broke (fail closed).
    init: Option<Mutex<Option<OwnedFd>>>,
    shared: Arc<Shared>,
}

/// How long init may take to answer a request (it answers in well under a millisecond;
/// only a machine in distress is slower).
const INIT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// The read end of the stdout+stderr pipe, already `O_NONBLOCK`, sized
    /// [`OUTPUT_PIPE_BYTES`] where the kernel allows.
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

    /// Whether this is a stem cell waiting for (or given) its code.
    pub fn is_stem(&self) -> bool {
        self.init.is_some()
    }

    /// Mounts `code_dir` read-only (nosuid, nodev) at `/var/task` of a stem cell. The
    /// host clones the directory's mount (open_tree) and hands the clone to the
    /// instance's init, which attaches it (move_mount); the program sees it appear.
    /// Takes well under a millisecond. Once per instance; any error means the
    /// instance cannot be trusted with a function: discard it.
    pub fn assign_code(&self, code_dir: &Path) -> Result<(), Error> {
        if !self.is_stem() {
            return Err(Error::AssignCode("not a stem cell".into()));
        }
        let tree = stem::detached_code_tree(code_dir).map_err(Error::AssignCode)?;
        self.init_request(&[stem::REQ_CODE], Some(tree.as_fd()))
            .map_err(Error::AssignCode)
    }

    /// Changes the size of a stem cell's `/tmp` (a tmpfs charged to its memory cgroup).
    /// Fails when more than that is already in use.
    pub fn set_tmp_bytes(&self, bytes: u64) -> Result<(), Error> {
        let mut msg = vec![stem::REQ_TMP];
        msg.extend_from_slice(&bytes.to_be_bytes());
        self.init_request(&msg, None).map_err(Error::ResizeTmp)
    }

    fn init_request(&self, msg: &[u8], fd: Option<std::os::fd::BorrowedFd>) -> Result<(), String> {
        let Some(chan) = &self.init else {
            return Err("not a stem cell".into());
        };
        let mut guard = chan
            .lock()
            .map_err(|_| "the channel to init is poisoned".to_string())?;
        let Some(sock) = guard.as_ref() else {
            return Err("the channel to init broke earlier".into());
        };
        match stem::request(sock.as_fd(), msg, fd, INIT_REQUEST_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(RequestError::Refused(why)) => Err(why),
            Err(e @ RequestError::Transport(_)) => {
                *guard = None;
                Err(e.to_string())
            }
        }
    }

    /// Changes the memory limit (swap stays forbidden) of a running instance: a stem
    /// cell starts with a generous one and gets its function's at assignment. Refused
    /// when the instance already uses more, or below the minimum (16 MB).
    pub fn set_memory_mb(&self, memory_mb: u32) -> Result<(), Error> {
        if memory_mb < crate::spec::MIN_MEMORY_MB {
            return Err(Error::SetLimit(format!(
                "memory_mb {memory_mb} < {}",
                crate::spec::MIN_MEMORY_MB
            )));
        }
        match &self.cgroup {
            Some(cg) => cg.set_memory_bytes(u64::from(memory_mb) * 1024 * 1024),
            None => Ok(()),
        }
    }

    /// Changes `pids.max` of a running instance (init and every thread count); refused
    /// when more tasks than that already run.
    pub fn set_pids_max(&self, pids_max: u32) -> Result<(), Error> {
        if pids_max == 0 {
            return Err(Error::SetLimit("pids_max must be at least 1".into()));
        }
        match &self.cgroup {
            Some(cg) => cg.set_pids_max(pids_max),
            None => Ok(()),
        }
    }

    /// Stops everything in the instance between invocations, so nothing a function
    /// left behind (a detached child, a thread, a timer) runs unbilled. With a cgroup
    /// freezer (v1 `freezer`, v2 `cgroup.freeze`) the whole instance is frozen until
    /// [`Instance::resume`]; the call only asks for the freeze, it does not wait for
    /// it to settle. Without one, every process but init, pid 1 and the program is
    /// SIGKILLed instead (the program's own threads are not stopped then). A no-op
    /// without a sandbox.
    pub fn suspend(&self) -> Result<(), Error> {
        let Some(cg) = &self.cgroup else {
            return Ok(());
        };
        if !cg.suspend()? {
            self.kill_strays(cg);
        }
        Ok(())
    }

    /// Undoes [`Instance::suspend`]: when it returns, the instance runs again and may
    /// be sent its next invocation.
    pub fn resume(&self) -> Result<(), Error> {
        match &self.cgroup {
            Some(cg) => cg.resume(),
            None => Ok(()),
        }
    }

    /// The no-freezer fallback of [`Instance::suspend`]: processes that are not init,
    /// its pid 1 (the reaper) or pid 2 (the program) are a function's leftovers. Only
    /// a process whose status names it as nested deeper is killed, so a pid freed and
    /// reused outside the instance meanwhile is never hit.
    fn kill_strays(&self, cg: &InstanceCgroup) {
        let init = self.child.id() as i32;
        let proc_root = &self.shared.config.proc_root;
        for pid in cg.pids().into_iter().filter(|p| *p != init) {
            let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"));
            let ns_pid = status.ok().as_deref().and_then(cgroup::innermost_ns_pid);
            if ns_pid.is_some_and(|n| n > 2) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
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
        if let Some(s) = &mut self.slirp {
            s.stop();
        }
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
        // The namespace slirp serves is gone with init's tree; so goes slirp.
        if let Some(sl) = &mut self.slirp {
            sl.stop();
        }
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
        if let Some(cg) = self.cgroup.take()
            && !cg.remove(Duration::from_secs(2))
        {
            self.shared.leftovers.add(cg);
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
