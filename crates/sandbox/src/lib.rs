//! nimbus-sandbox: Linux isolation of one function instance process.
//!
//! Owns: start-up detection of what the host can do (privileges, cgroup v1/v2 layout,
//! slirp4netns), per-instance cgroups (memory without swap, pids, CPU quota) and their
//! accounting, the `__sandbox-init` child side (namespaces: mount, pid, net, ipc, uts;
//! a pivot_root into a fresh tmpfs root of read-only binds with the code at `/var/task`,
//! a size-limited `/tmp`, minimal `/dev`, masked fresh `/proc`, synthetic `/etc`, no
//! `/sys`; an unprivileged uid/gid with every capability dropped and no_new_privs; a
//! seccomp filter; rlimits; exec), egress networking through slirp4netns (host loopback
//! refused unless allowed), killing and reaping instances, and the `X` frame that
//! reports a failed setup on the control fd. Fail closed: any failed step means the
//! program never runs.
//!
//! Must not touch: tokio or any async runtime (init runs before one exists, and forks),
//! the instance protocol beyond the `X` frame (the worker owns it), config files, env
//! or flags (the CLI builds [`HostConfig`]).
//!
//! Process model: the host spawns `<init_exe> __sandbox-init` with stdin `/dev/null`,
//! stdout and stderr on one pipe, fd 3 a Unix stream socket, and the spec as JSON in
//! `NIMBUS_SANDBOX_SPEC` (see `spec::InitSpec`). Init joins the instance's cgroups,
//! unshares namespaces and forks pid 1 of the new pid namespace, which sets up the
//! instance, forks the program (pid 2) and stays as its reaper (`reaper.rs`); init waits
//! for pid 1 and exits with the program's status (128+signo when it was killed by a
//! signal). Egress
//! instances and stem cells also get fd 4, a socket to init (never to the program) on
//! which init says `U` once it is in its network namespace and waits for the host's `G`
//! (slirp4netns up) before forking.
//!
//! Stem cells ([`Rootfs::stem`]): instances started before their function is known,
//! with an empty `/var/task`. Init stays privileged in the instance's mount namespace,
//! outside its pid namespace, and serves the host's requests on fd 4: mount the code
//! ([`Instance::assign_code`], a detached read-only clone the host made) or resize
//! `/tmp` ([`Instance::set_tmp_bytes`]). [`Instance::set_memory_mb`] and
//! [`Instance::set_pids_max`] then fit the cgroup to the function.

mod cgroup;
mod host;
mod init;
mod mountinfo;
mod reaper;
mod rootfs;
mod seccomp;
mod spec;
mod stem;

use std::path::PathBuf;

pub use host::{Host, HostConfig, Instance};
pub use init::{CONTROL_FD, INIT_ARG, SETUP_FAILED_EXIT, init_main};
pub use spec::{
    Bind, DEFAULT_TMP_BYTES, InstanceSpec, Isolation, Limits, MIN_MEMORY_MB, Network, RUNTIME_DIR,
    Rootfs, SLIRP_DNS, SPEC_ENV, STEM_TMP_BYTES, TASK_DIR,
};

/// Which cgroup hierarchy the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Per-controller hierarchies (including hybrid hosts, whose controllers are on v1).
    V1,
    /// The unified hierarchy mounted at the configured cgroup root.
    V2,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("detect sandbox support: {0}")]
    Detect(String),
    #[error("read {path}: {source}")]
    ReadProc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read cgroup file {path}: {source}")]
    ReadCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("create cgroup {path}: {source}")]
    CreateCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write cgroup file {path}: {source}")]
    WriteCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid instance spec: {0}")]
    ValidateSpec(String),
    #[error("encode init spec: {0}")]
    EncodeSpec(serde_json::Error),
    #[error("create control socket pair: {0}")]
    CreateSocketPair(std::io::Error),
    #[error("create output pipe: {0}")]
    CreatePipe(std::io::Error),
    #[error("spawn sandbox init: {0}")]
    Spawn(std::io::Error),
    #[error("wait for sandbox init: {0}")]
    Wait(std::io::Error),
    #[error("network egress unavailable: {0}")]
    EgressUnavailable(String),
    #[error("start instance network: {0}")]
    StartNetwork(String),
    #[error("stem cells unavailable: {0}")]
    StemUnavailable(String),
    #[error("assign code to stem cell: {0}")]
    AssignCode(String),
    #[error("resize /tmp of stem cell: {0}")]
    ResizeTmp(String),
    #[error("change instance limit: {0}")]
    SetLimit(String),
}
