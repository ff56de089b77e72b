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

/// How an instance is isolated beyond namespaces and cgroups. Later steps (rootfs,
/// uid drop, seccomp, capabilities, egress networking) add fields here; it is
/// `#[non_exhaustive]` so construct it with `Isolation::default()` and set fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Isolation {
    /// Hostname inside the instance's UTS namespace.
    pub hostname: String,
}

impl Default for Isolation {
    fn default() -> Isolation {
        Isolation {
            hostname: "nimbus".to_string(),
        }
    }
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
        if !valid_hostname(&self.isolation.hostname) {
            return bad(format!("invalid hostname {:?}", self.isolation.hostname));
        }
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
    pub hostname: String,
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
            hostname: spec.isolation.hostname.clone(),
            probe: false,
        }
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
