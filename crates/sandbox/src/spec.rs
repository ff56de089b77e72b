//! What the host asks for ([`InstanceSpec`], [`Limits`], [`Isolation`]) and what it hands
//! to the init process ([`InitSpec`], JSON in `NIMBUS_SANDBOX_SPEC`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Environment variable carrying the [`InitSpec`] JSON to `__sandbox-init`.
pub const SPEC_ENV: &str = "NIMBUS_SANDBOX_SPEC";

/// Lambda's rule: one full vCPU per 1769 MB of memory.
pub const MB_PER_VCPU: u32 = 1769;
/// The CFS period used for the CPU quota (the kernel default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU share we hand out: the kernel refuses quotas under 1 ms per period.
pub const MIN_CPU_MILLIS: u32 = 10;
/// Smallest memory limit accepted; below this not even an interpreter starts.
pub const MIN_MEMORY_MB: u32 = 16;
const MAX_ID_LEN: usize = 64;

/// Resource limits of one instance. Always on: [`Limits::for_memory`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// cgroup memory limit; swap is forbidden on top of it.
    pub memory_mb: u32,
    /// cgroup `pids.max` (processes and threads).
    pub pids_max: u32,
    /// CPU share in thousandths of a CPU, enforced as a CFS quota per 100 ms period.
    pub cpu_millis: u32,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// `RLIMIT_FSIZE`: largest file the function may write.
    pub fsize_bytes: u64,
}

impl Limits {
    /// Defaults for a function with `memory_mb` of memory: CPU proportional to memory
    /// (1 vCPU per 1769 MB, at least [`MIN_CPU_MILLIS`]), 64 pids, 1024 files, 512 MiB
    /// files (Lambda's default `/tmp` size).
    pub fn for_memory(memory_mb: u32) -> Limits {
        let cpu = (u64::from(memory_mb) * 1000 / u64::from(MB_PER_VCPU)) as u32;
        Limits {
            memory_mb,
            pids_max: 64,
            cpu_millis: cpu.max(MIN_CPU_MILLIS),
            nofile: 1024,
            fsize_bytes: 512 * 1024 * 1024,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mb) * 1024 * 1024
    }

    /// CFS quota in microseconds per [`CPU_PERIOD_US`].
    pub fn cpu_quota_us(&self) -> u64 {
        u64::from(self.cpu_millis) * CPU_PERIOD_US / 1000
    }

    fn validate(&self) -> Result<(), String> {
        if self.memory_mb < MIN_MEMORY_MB {
            return Err(format!("memory_mb {} < {MIN_MEMORY_MB}", self.memory_mb));
        }
        if self.pids_max == 0 {
            return Err("pids_max must be at least 1".into());
        }
        if self.cpu_millis < MIN_CPU_MILLIS {
            return Err(format!("cpu_millis {} < {MIN_CPU_MILLIS}", self.cpu_millis));
        }
        if self.nofile < 4 {
            // fds 0-3 are the protocol; fewer would break it before the program runs.
            return Err("nofile must be at least 4".into());
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::for_memory(128)
    }
}

/// How an instance is isolated beyond namespaces and cgroups. It is `#[non_exhaustive]`:
/// build it with [`Isolation::function`] (what untrusted code gets) or
/// `Isolation::default()` and set fields.
///
/// Always on whatever the fields say (when the host sandboxes at all): every capability
/// dropped (bounding, effective, permitted, inheritable, ambient), `PR_SET_NO_NEW_PRIVS`,
/// `setgroups([])`, rlimits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Isolation {
    /// Hostname inside the instance's UTS namespace.
    pub hostname: String,
    /// The filesystem the program sees. `None` keeps the host's filesystem (in a private
    /// mount namespace with a fresh `/proc`): only for trusted code and tests.
    pub rootfs: Option<Rootfs>,
    /// Real, effective and saved uid the program runs as. Never `u32::MAX` (that means
    /// "unchanged" to the kernel).
    pub uid: u32,
    /// Real, effective and saved gid; supplementary groups are always emptied.
    pub gid: u32,
    /// Install the syscall filter last before `execve`: mount/namespace/ptrace/bpf/
    /// kexec/module/keyring/clock/... calls, foreign-arch and x32 entry points fail
    /// with `EPERM`, `clone3` with `ENOSYS` (libc falls back to `clone`, whose
    /// `CLONE_NEW*` flags are refused).
    pub seccomp: bool,
    pub network: Network,
}

impl Default for Isolation {
    /// Host filesystem, uid/gid 0 without capabilities, seccomp on, loopback only.
    fn default() -> Isolation {
        Isolation {
            hostname: "nimbus".to_string(),
            rootfs: None,
            uid: 0,
            gid: 0,
            seccomp: true,
            network: Network::None,
        }
    }
}

impl Isolation {
    /// What a function gets: its own rootfs, an unprivileged uid/gid (distinct per
    /// function, chosen by the caller), seccomp on.
    pub fn function(uid: u32, gid: u32, rootfs: Rootfs, network: Network) -> Isolation {
        Isolation {
            rootfs: Some(rootfs),
            uid,
            gid,
            network,
            ..Isolation::default()
        }
    }

    /// The files written into the new root's `/etc`: the rootfs's own `etc_files`, plus
    /// defaults for `passwd`, `group`, `hosts`, `nsswitch.conf` and `resolv.conf` where
    /// it has none. With egress, `resolv.conf` always names slirp4netns's resolver.
    pub fn effective_etc_files(&self) -> Vec<(String, String)> {
        let mut files = self
            .rootfs
            .as_ref()
            .map(|r| r.etc_files.clone())
            .unwrap_or_default();
        let (uid, gid, host) = (self.uid, self.gid, &self.hostname);
        let defaults = [
            (
                "passwd",
                format!(
                    "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                     sbx_user:x:{uid}:{gid}:sandbox:/tmp:/usr/sbin/nologin\n\
                     nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                ),
            ),
            (
                "group",
                format!("root:x:0:\nsbx_user:x:{gid}:\nnogroup:x:65534:\n"),
            ),
            (
                "hosts",
                format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                     127.0.1.1\t{host}\n"
                ),
            ),
            (
                "nsswitch.conf",
                "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
                 networks: files\nprotocols: files\nservices: files\n"
                    .to_string(),
            ),
            ("resolv.conf", String::new()),
        ];
        for (name, text) in defaults {
            if !files.iter().any(|(n, _)| n == name) {
                files.push((name.to_string(), text));
            }
        }
        if let Network::Egress { .. } = self.network {
            files.retain(|(n, _)| n != "resolv.conf");
            files.push((
                "resolv.conf".to_string(),
                format!("nameserver {SLIRP_DNS}\n"),
            ));
        }
        files
    }

    fn validate(&self) -> Result<(), String> {
        if !valid_hostname(&self.hostname) {
            return Err(format!("invalid hostname {:?}", self.hostname));
        }
        if self.uid == u32::MAX || self.gid == u32::MAX {
            return Err("uid and gid must not be 4294967295 (\"unchanged\")".into());
        }
        match &self.rootfs {
            Some(r) => r.validate(),
            None => Ok(()),
        }
    }
}

/// The instance's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// Only `lo`, up.
    #[default]
    None,
    /// Outbound connections through slirp4netns (`tap0`, 10.0.2.100/24, gateway and DNS
    /// at 10.0.2.2/10.0.2.3). The host's loopback (10.0.2.2 -> 127.0.0.1, where the
    /// control API listens) stays unreachable unless `allow_host_loopback`.
    Egress { allow_host_loopback: bool },
}

/// slirp4netns's built-in DNS forwarder.
pub const SLIRP_DNS: &str = "10.0.2.3";

/// Mount points the sandbox owns in the new root; binds may not cover or nest in them.
pub const TASK_DIR: &str = "/var/task";
pub const RUNTIME_DIR: &str = "/var/runtime";
const RESERVED: [&str; 6] = ["/proc", "/dev", "/tmp", "/sys", TASK_DIR, RUNTIME_DIR];

/// A fresh root (a tmpfs, read-only once built) holding only what is listed here, plus
/// `/proc`, a minimal `/dev`, `/tmp` and a synthetic `/etc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    /// Read-only (nosuid, nodev) binds of host paths. A source that is a symlink is
    /// recreated as the same symlink (so merged-/usr `/bin -> usr/bin` works).
    pub ro_binds: Vec<Bind>,
    /// The function's code, bound read-only at [`TASK_DIR`]. `None` makes a stem cell:
    /// [`TASK_DIR`] is an empty mount point until [`crate::Instance::assign_code`]
    /// mounts the code there (see [`Rootfs::stem`]).
    pub code_dir: Option<PathBuf>,
    /// The runtime shims, bound read-only at [`RUNTIME_DIR`].
    pub runtime_dir: Option<PathBuf>,
    /// Size of the tmpfs at `/tmp` (mode 1777, nosuid, nodev).
    pub tmp_bytes: u64,
    /// `(file name, contents)` written into `/etc` (plain names, no `/`); see
    /// [`Isolation::effective_etc_files`] for the defaults added.
    pub etc_files: Vec<(String, String)>,
}

/// Lambda's default `/tmp`.
pub const DEFAULT_TMP_BYTES: u64 = 512 * 1024 * 1024;

/// `/tmp` of a stem cell until [`crate::Instance::set_tmp_bytes`] sets the function's.
pub const STEM_TMP_BYTES: u64 = 64 * 1024 * 1024;

impl Rootfs {
    /// `code_dir` at `/var/task` plus [`Rootfs::system_binds`], 512 MiB `/tmp`, default
    /// `/etc` files. Add the interpreter's prefix (e.g. `Bind::same(sys.prefix)`) and
    /// set `runtime_dir` as needed.
    pub fn new(code_dir: impl Into<PathBuf>) -> Rootfs {
        Rootfs {
            ro_binds: Rootfs::system_binds(),
            code_dir: Some(code_dir.into()),
            runtime_dir: None,
            tmp_bytes: DEFAULT_TMP_BYTES,
            etc_files: Vec::new(),
        }
    }

    /// A stem cell's filesystem: like [`Rootfs::new`] but with an empty [`TASK_DIR`]
    /// (the code comes later, from [`crate::Instance::assign_code`]) and a
    /// [`STEM_TMP_BYTES`] `/tmp`. Start its program with a working directory other than
    /// [`TASK_DIR`]: a cwd taken before the code is mounted stays on the empty directory.
    pub fn stem() -> Rootfs {
        Rootfs {
            code_dir: None,
            tmp_bytes: STEM_TMP_BYTES,
            ..Rootfs::new("/")
        }
    }

    /// Whether this is a stem cell's filesystem (no code yet).
    pub fn is_stem(&self) -> bool {
        self.code_dir.is_none()
    }

    /// `/usr` and the merged-/usr links (`/bin`, `/lib`, `/lib64`, `/sbin`, each only if
    /// present), plus the CA certificates (optional).
    pub fn system_binds() -> Vec<Bind> {
        let mut v = vec![Bind::same("/usr")];
        for p in [
            "/bin",
            "/sbin",
            "/lib",
            "/lib64",
            "/lib32",
            "/libx32",
            "/etc/ssl/certs",
            "/etc/ca-certificates",
        ] {
            v.push(Bind::optional(p));
        }
        v
    }

    fn validate(&self) -> Result<(), String> {
        for (what, p) in [
            ("code_dir", self.code_dir.as_ref()),
            ("runtime_dir", self.runtime_dir.as_ref()),
        ] {
            if let Some(p) = p
                && (!p.is_absolute() || p.to_str().is_none_or(has_nul))
            {
                return Err(format!(
                    "{what} {} must be an absolute UTF-8 path",
                    p.display()
                ));
            }
        }
        if self.tmp_bytes < 4096 {
            return Err(format!("tmp_bytes {} < 4096", self.tmp_bytes));
        }
        let mut targets: Vec<&Path> = Vec::new();
        for b in &self.ro_binds {
            let src = &b.source;
            if !src.is_absolute() || src.to_str().is_none_or(has_nul) {
                return Err(format!(
                    "bind source {} must be an absolute UTF-8 path",
                    src.display()
                ));
            }
            if !normal_absolute(&b.target) || b.target == Path::new("/") {
                return Err(format!(
                    "bind target {} must be absolute, normalized and not /",
                    b.target.display()
                ));
            }
            for r in RESERVED.iter().chain(["/etc"].iter()) {
                let r = Path::new(r);
                // /etc itself is the synthetic one; binds below it are fine.
                if b.target == r
                    || (r != Path::new("/etc") && b.target.starts_with(r))
                    || r.starts_with(&b.target)
                {
                    return Err(format!(
                        "bind target {} overlaps {}",
                        b.target.display(),
                        r.display()
                    ));
                }
            }
            for t in &targets {
                // Never create a mount point inside another bind: that would write into
                // the host's directory (or fail on the read-only one).
                if t.starts_with(&b.target) || b.target.starts_with(t) {
                    return Err(format!(
                        "bind targets {} and {} nest",
                        t.display(),
                        b.target.display()
                    ));
                }
            }
            targets.push(&b.target);
        }
        for (name, _) in &self.etc_files {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." || has_nul(name)
            {
                return Err(format!("etc file name {name:?} must be a plain file name"));
            }
        }
        Ok(())
    }
}

/// A read-only bind of a host path into the new root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the new root.
    pub target: PathBuf,
    /// A missing source is skipped instead of failing the spawn.
    pub optional: bool,
}

impl Bind {
    /// `path` at the same path inside; required.
    pub fn same(path: impl Into<PathBuf>) -> Bind {
        let p = path.into();
        Bind {
            source: p.clone(),
            target: p,
            optional: false,
        }
    }

    /// `path` at the same path inside; skipped if the host has no such path.
    pub fn optional(path: impl Into<PathBuf>) -> Bind {
        Bind {
            optional: true,
            ..Bind::same(path)
        }
    }
}

/// Absolute, and no `.`, `..` or empty components: what you see is where it mounts.
fn normal_absolute(p: &Path) -> bool {
    let Some(s) = p.to_str() else { return false };
    s.starts_with('/')
        && !has_nul(s)
        && (s == "/"
            || s[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."))
}

/// One instance to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Unique among live instances of a host; `[A-Za-z0-9_-]`, 1..=64 chars. Names the
    /// instance's cgroup.
    pub id: String,
    /// Executed as-is (no `PATH` search); relative paths resolve against `workdir`.
    pub program: PathBuf,
    /// Arguments after `argv[0]` (which is `program`), like `std::process::Command`.
    pub args: Vec<String>,
    /// The program's entire environment; nothing else is inherited.
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub limits: Limits,
    pub isolation: Isolation,
}

impl InstanceSpec {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::ValidateSpec(m));
        if !valid_id(&self.id) {
            return bad(format!(
                "instance id {:?} must be 1..={MAX_ID_LEN} chars of [A-Za-z0-9_-]",
                self.id
            ));
        }
        for (what, p) in [("program", &self.program), ("workdir", &self.workdir)] {
            if p.as_os_str().is_empty() {
                return bad(format!("{what} is empty"));
            }
            if p.to_str().is_none() || has_nul(path_str(p)) {
                return bad(format!(
                    "{what} {} is not valid UTF-8 without NUL",
                    p.display()
                ));
            }
        }
        if self.args.iter().any(|a| has_nul(a)) {
            return bad("an argument contains NUL".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || has_nul(k) || has_nul(v) {
                return bad(format!("invalid environment variable name or value {k:?}"));
            }
        }
        self.isolation.validate().or_else(bad)?;
        self.limits.validate().or_else(bad)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// What `__sandbox-init` receives. Field names are the wire format; keep them stable
/// within one binary (host and init are always the same build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InitSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub nofile: u64,
    pub fsize_bytes: u64,
    /// `cgroup.procs` files init writes its pid to before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// false only with `insecure_no_sandbox`: no namespaces, no fork, plain exec.
    pub namespaces: bool,
    pub isolation: Isolation,
    /// [`Isolation::effective_etc_files`], computed by the host.
    pub etc_files: Vec<(String, String)>,
    /// Do every setup step, then exit 0 instead of exec (used by `Host::detect`).
    #[serde(default)]
    pub probe: bool,
}

impl InitSpec {
    pub(crate) fn new(
        spec: &InstanceSpec,
        cgroup_procs: Vec<PathBuf>,
        namespaces: bool,
    ) -> InitSpec {
        InitSpec {
            program: path_str(&spec.program).to_string(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            workdir: path_str(&spec.workdir).to_string(),
            nofile: spec.limits.nofile,
            fsize_bytes: spec.limits.fsize_bytes,
            cgroup_procs,
            namespaces,
            isolation: spec.isolation.clone(),
            etc_files: spec.isolation.effective_etc_files(),
            probe: false,
        }
    }

    /// A stem cell: init keeps serving code assignments after the fork.
    pub(crate) fn stem(&self) -> bool {
        self.namespaces && self.isolation.rootfs.as_ref().is_some_and(Rootfs::is_stem)
    }

    /// Whether the host hands init [`crate::init::INIT_FD`]: for the egress handshake
    /// and for a stem cell's assignments.
    pub(crate) fn has_init_socket(&self) -> bool {
        self.namespaces && (self.stem() || matches!(self.isolation.network, Network::Egress { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: "fn-1_a".into(),
            program: "/bin/true".into(),
            args: vec![],
            env: vec![("A".into(), "b=c".into())],
            workdir: "/".into(),
            limits: Limits::default(),
            isolation: Isolation::default(),
        }
    }

    #[test]
    fn cpu_follows_lambdas_rule() {
        assert_eq!(Limits::for_memory(1769).cpu_millis, 1000);
        assert_eq!(Limits::for_memory(3538).cpu_millis, 2000);
        assert_eq!(Limits::for_memory(128).cpu_millis, 72);
        assert_eq!(Limits::for_memory(16).cpu_millis, MIN_CPU_MILLIS);
        assert_eq!(Limits::for_memory(1769).cpu_quota_us(), 100_000);
        assert_eq!(Limits::for_memory(128).cpu_quota_us(), 7_200);
        assert_eq!(Limits::for_memory(128).memory_bytes(), 128 << 20);
        assert_eq!(Limits::for_memory(128).pids_max, 64);
    }

    #[test]
    fn valid_spec_passes() {
        spec().validate().expect("valid");
    }

    #[test]
    fn rejects_bad_ids() {
        for id in ["", "a/b", "..", "a b", "é", &"x".repeat(65)] {
            let mut s = spec();
            s.id = id.to_string();
            assert!(
                matches!(s.validate(), Err(Error::ValidateSpec(_))),
                "{id:?}"
            );
        }
    }

    #[test]
    fn rejects_nul_and_bad_env() {
        let mut s = spec();
        s.args = vec!["a\0b".into()];
        assert!(s.validate().is_err());
        let mut s = spec();
        s.env = vec![("A=B".into(), "x".into())];
        assert!(s.validate().is_err());
        let mut s = spec();
        s.env = vec![("".into(), "x".into())];
        assert!(s.validate().is_err());
    }

    #[test]
    fn rejects_limits_off() {
        let mut s = spec();
        s.limits.pids_max = 0;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.limits.memory_mb = 1;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.limits.cpu_millis = 0;
        assert!(s.validate().is_err());
    }

    fn with_rootfs(f: impl FnOnce(&mut Rootfs)) -> InstanceSpec {
        let mut r = Rootfs::new("/srv/code");
        f(&mut r);
        let mut s = spec();
        s.isolation = Isolation::function(1001, 1001, r, Network::None);
        s
    }

    #[test]
    fn function_isolation_is_valid_and_seccomp_on() {
        let s = with_rootfs(|_| {});
        s.validate().expect("valid");
        assert!(s.isolation.seccomp);
        assert_eq!((s.isolation.uid, s.isolation.gid), (1001, 1001));
    }

    #[test]
    fn rejects_unchanged_ids() {
        let mut s = with_rootfs(|_| {});
        s.isolation.uid = u32::MAX;
        assert!(s.validate().is_err());
        let mut s = with_rootfs(|_| {});
        s.isolation.gid = u32::MAX;
        assert!(s.validate().is_err());
    }

    #[test]
    fn rejects_binds_over_the_sandboxes_own_mounts_or_nesting() {
        for target in [
            "/",
            "/var",
            "/var/task",
            "/var/task/x",
            "/proc",
            "/dev/null",
            "/tmp",
            "/etc",
            "relative",
            "/usr/../etc",
            "/usr/./lib",
            "/usr//lib",
        ] {
            let s = with_rootfs(|r| {
                r.ro_binds.push(Bind {
                    source: "/opt".into(),
                    target: target.into(),
                    optional: false,
                })
            });
            assert!(s.validate().is_err(), "{target}");
        }
        // /usr is a system bind already: /usr/local nests in it.
        let s = with_rootfs(|r| r.ro_binds.push(Bind::same("/usr/local")));
        assert!(s.validate().is_err());
        let s = with_rootfs(|r| r.ro_binds.push(Bind::same("/opt/python")));
        s.validate().expect("plain extra bind");
        let s = with_rootfs(|r| r.ro_binds.push(Bind::same("/etc/alternatives")));
        s.validate().expect("bind below the synthetic /etc");
    }

    #[test]
    fn rejects_bad_etc_names_and_tiny_tmp() {
        for name in ["", "a/b", "..", "."] {
            let s = with_rootfs(|r| r.etc_files.push((name.into(), "x".into())));
            assert!(s.validate().is_err(), "{name:?}");
        }
        let s = with_rootfs(|r| r.tmp_bytes = 0);
        assert!(s.validate().is_err());
        let s = with_rootfs(|r| r.code_dir = Some("code".into()));
        assert!(s.validate().is_err());
    }

    #[test]
    fn etc_defaults_fill_gaps_and_egress_sets_dns() {
        let s = with_rootfs(|r| r.etc_files.push(("hosts".into(), "mine\n".into())));
        let files = s.isolation.effective_etc_files();
        let get = |f: &[(String, String)], n: &str| {
            f.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        };
        assert_eq!(get(&files, "hosts").as_deref(), Some("mine\n"));
        assert!(
            get(&files, "passwd")
                .expect("passwd")
                .contains(":1001:1001:")
        );
        assert_eq!(get(&files, "resolv.conf").as_deref(), Some(""));
        let mut iso = s.isolation.clone();
        iso.network = Network::Egress {
            allow_host_loopback: false,
        };
        let files = iso.effective_etc_files();
        assert_eq!(
            get(&files, "resolv.conf").as_deref(),
            Some("nameserver 10.0.2.3\n")
        );
        assert_eq!(files.iter().filter(|(k, _)| k == "resolv.conf").count(), 1);
    }

    #[test]
    fn stem_rootfs_has_no_code_and_needs_the_init_socket() {
        let r = Rootfs::stem();
        assert!(r.is_stem());
        assert_eq!(r.tmp_bytes, STEM_TMP_BYTES);
        assert!(!Rootfs::new("/srv/code").is_stem());
        let mut s = spec();
        s.isolation = Isolation::function(1001, 1001, r, Network::None);
        s.validate().expect("a stem spec is valid");
        let init = InitSpec::new(&s, vec![], true);
        assert!(init.stem() && init.has_init_socket());
        // Without namespaces (insecure mode) nothing is a stem and init has no socket.
        let init = InitSpec::new(&s, vec![], false);
        assert!(!init.stem() && !init.has_init_socket());
        let plain = InitSpec::new(&with_rootfs(|_| {}), vec![], true);
        assert!(!plain.stem() && !plain.has_init_socket());
        let mut egress = with_rootfs(|_| {});
        egress.isolation.network = Network::Egress {
            allow_host_loopback: false,
        };
        let init = InitSpec::new(&egress, vec![], true);
        assert!(!init.stem() && init.has_init_socket());
    }

    #[test]
    fn init_spec_round_trips_as_json() {
        let init = InitSpec::new(&spec(), vec!["/cg/a/cgroup.procs".into()], true);
        let json = serde_json::to_string(&init).expect("encode");
        assert!(
            json.contains("\"cgroup_procs\":[\"/cg/a/cgroup.procs\"]"),
            "{json}"
        );
        assert!(json.contains("\"env\":[[\"A\",\"b=c\"]]"), "{json}");
        let back: InitSpec = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, init);
    }
}
