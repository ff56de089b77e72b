//! Per-instance cgroups: creation with limits, killing everything inside, usage figures,
//! removal. All paths come from a [`Layout`] built from a caller-given root, so the logic
//! runs against a temp dir in unit tests (plain files stand in for cgroupfs).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Error;
use crate::mountinfo::Layout;
use crate::spec::{CPU_PERIOD_US, Limits};

const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

fn write(path: &Path, value: &str) -> Result<(), Error> {
    fs::write(path, value).map_err(|source| Error::WriteCgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir(path).map_err(|source| Error::CreateCgroup {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates the parent cgroup(s) (idempotent) and returns their directories. `parent`
/// may be nested (`nimbus/<owner>`). On v2 it also delegates memory, pids and cpu down
/// every level to the parent's children.
pub(crate) fn create_parent(layout: &Layout, parent: &str) -> Result<Vec<PathBuf>, Error> {
    match layout {
        Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
            freezer,
        } => {
            let mut dirs: Vec<PathBuf> = Vec::new();
            for h in [
                Some(memory),
                Some(pids),
                Some(cpu),
                Some(cpuacct),
                freezer.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                let dir = h.base.join(parent);
                if !dirs.contains(&dir) {
                    mkdir_all(&dir)?;
                    dirs.push(dir);
                }
            }
            Ok(dirs)
        }
        Layout::V2 { root } => {
            let available =
                fs::read_to_string(root.join("cgroup.controllers")).map_err(|source| {
                    Error::ReadCgroup {
                        path: root.join("cgroup.controllers"),
                        source,
                    }
                })?;
            let available: Vec<&str> = available.split_whitespace().collect();
            for c in V2_CONTROLLERS {
                if !available.contains(&c) {
                    return Err(Error::Detect(format!(
                        "cgroup v2 controller {c} is not available at {}",
                        root.display()
                    )));
                }
            }
            let dir = root.join(parent);
            mkdir_all(&dir)?;
            // Every level down to the instances' parent must delegate the controllers
            // (a server's own parent sits below the shared one).
            let mut at = root.clone();
            let levels =
                std::iter::once(root.clone()).chain(Path::new(parent).components().map(|c| {
                    at.push(c);
                    at.clone()
                }));
            for level in levels {
                for c in V2_CONTROLLERS {
                    write(&level.join("cgroup.subtree_control"), &format!("+{c}"))?;
                }
            }
            Ok(vec![dir])
        }
    }
}

fn mkdir_all(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::CreateCgroup {
        path: dir.to_path_buf(),
        source,
    })
}

/// Kills and removes instance cgroups left under `parents` by an earlier server that
/// died without cleaning up (SIGKILL, power loss): their processes are orphans that no
/// worker will ever talk to again. `parents` must be this server's own (see
/// `HostConfig::owner`): a shared parent holds other live servers' instances. Returns
/// how many instance cgroups were removed.
pub(crate) fn reap_stale(parents: &[PathBuf]) -> usize {
    let mut dirs: Vec<PathBuf> = parents
        .iter()
        .filter_map(|p| fs::read_dir(p).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    let total = dirs.len();
    // A server killed halfway through killing an instance can leave it frozen, and
    // frozen tasks cannot die: thaw everything before killing anything.
    for dir in &dirs {
        let state = dir.join("freezer.state");
        if state.exists() {
            let _ = fs::write(&state, "THAWED");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !dirs.is_empty() && Instant::now() < deadline {
        dirs.retain(|dir| {
            read(&dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .for_each(sigkill);
            fs::remove_dir(dir).is_err()
        });
        if !dirs.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for dir in &dirs {
        tracing::warn!(dir = %dir.display(), "could not remove a stale instance cgroup");
    }
    total - dirs.len()
}

/// An empty v1 freezer cgroup kept frozen while the host lives. The v1 freezer turns a
/// kernel-wide static key on when the first cgroup on the machine starts freezing and
/// off when the last one thaws, and flipping it patches kernel text: about 80 us per
/// freeze and 90 us per thaw when an instance is the only frozen cgroup, against 6 and
/// 12 us while any other cgroup stays frozen. Idle instances are frozen and thawed on
/// every warm invocation, so one pinned cgroup keeps them on the cheap path. v2's
/// freezer has no such key.
#[derive(Debug)]
pub(crate) struct FreezerPin(PathBuf);

/// Not an instance id: those are `<function>-<version>-<suffix>` or `stem-<suffix>`.
/// The host's pid follows, so a pin left by a killed server (reaped at the next
/// start-up like its instances) is never mistaken for the new server's.
const FREEZER_PIN: &str = "freezer-pin";

impl FreezerPin {
    /// `None` on v2, without a v1 freezer, or when it cannot be made (then only the
    /// fast path is lost).
    pub(crate) fn create(layout: &Layout, parent: &str) -> Option<FreezerPin> {
        let Layout::V1 {
            freezer: Some(f), ..
        } = layout
        else {
            return None;
        };
        let dir = f
            .base
            .join(parent)
            .join(format!("{FREEZER_PIN}-{}", std::process::id()));
        if let Err(e) = fs::create_dir(&dir)
            && e.kind() != io::ErrorKind::AlreadyExists
        {
            return None;
        }
        let pin = FreezerPin(dir);
        fs::write(pin.0.join("freezer.state"), "FROZEN").ok()?;
        Some(pin)
    }
}

impl Drop for FreezerPin {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("freezer.state"), "THAWED");
        let _ = fs::remove_dir(&self.0);
    }
}

/// Removes the parent dirs if nothing is left in them; silently keeps them otherwise
/// (another host, or another server's own parent, may still be inside).
pub(crate) fn remove_parent(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = fs::remove_dir(d);
    }
}

/// Instance cgroups that would not go when their instance did (EBUSY: a task still
/// leaving, a kernel slow to let go). Kept and retried until they are gone, so a host
/// never accumulates them.
#[derive(Debug, Default)]
pub(crate) struct Leftovers(std::sync::Mutex<Vec<InstanceCgroup>>);

impl Leftovers {
    pub(crate) fn add(&self, cg: InstanceCgroup) {
        self.lock().push(cg);
    }

    /// Kills what is inside each and removes it again; returns how many are left.
    pub(crate) fn retry(&self, patience: Duration) -> usize {
        let mut left = std::mem::take(&mut *self.lock());
        left.retain(|cg| {
            cg.kill_all();
            !cg.remove(patience)
        });
        let mut kept = self.lock();
        kept.extend(left);
        kept.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<InstanceCgroup>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
enum Dirs {
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
        freezer: Option<PathBuf>,
    },
    V2 {
        dir: PathBuf,
    },
}

/// The cgroup directories of one instance (one per v1 hierarchy, or one on v2).
#[derive(Debug)]
pub(crate) struct InstanceCgroup {
    dirs: Dirs,
    /// Every distinct directory, in creation order.
    all: Vec<PathBuf>,
    /// The freezer's control file, kept open: [`InstanceCgroup::suspend`] and
    /// [`InstanceCgroup::resume`] run twice per warm invocation. `None` on a host
    /// without a freezer.
    freezer: Option<Freezer>,
}

/// An open freezer control file and what it takes.
#[derive(Debug)]
struct Freezer {
    file: fs::File,
    path: PathBuf,
    frozen: &'static str,
    thawed: &'static str,
}

impl InstanceCgroup {
    /// Creates the instance's directories under `parent` and writes every limit; any
    /// failure removes what was created and fails (limits are never silently missing).
    pub(crate) fn create(
        layout: &Layout,
        parent: &str,
        id: &str,
        limits: &Limits,
    ) -> Result<InstanceCgroup, Error> {
        let mut all: Vec<PathBuf> = Vec::new();
        let mut make = |base: &Path| -> Result<PathBuf, Error> {
            let dir = base.join(parent).join(id);
            if !all.contains(&dir) {
                mkdir(&dir)?;
                all.push(dir.clone());
            }
            Ok(dir)
        };
        let made = match layout {
            Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
                freezer,
            } => (|| {
                Ok(Dirs::V1 {
                    memory: make(&memory.base)?,
                    pids: make(&pids.base)?,
                    cpu: make(&cpu.base)?,
                    cpuacct: make(&cpuacct.base)?,
                    freezer: match freezer {
                        Some(f) => Some(make(&f.base)?),
                        None => None,
                    },
                })
            })(),
            Layout::V2 { root } => make(root).map(|dir| Dirs::V2 { dir }),
        };
        let cg = match made {
            Ok(dirs) => InstanceCgroup {
                freezer: Freezer::open(&dirs),
                dirs,
                all,
            },
            Err(e) => {
                for d in all.iter().rev() {
                    let _ = fs::remove_dir(d);
                }
                return Err(e);
            }
        };
        if let Err(e) = cg.write_limits(limits) {
            cg.remove(Duration::from_millis(200));
            return Err(e);
        }
        Ok(cg)
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), Error> {
        let mem = limits.memory_bytes().to_string();
        match &self.dirs {
            Dirs::V1 {
                memory, pids, cpu, ..
            } => {
                write(&memory.join("memory.limit_in_bytes"), &mem)?;
                // memsw must be >= limit_in_bytes, so it is written second; equal means
                // no swap on top of the memory limit.
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &mem)?;
                }
                write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us().to_string(),
                )?;
            }
            Dirs::V2 { dir } => {
                write(&dir.join("memory.max"), &mem)?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us()),
                )?;
            }
        }
        Ok(())
    }

    pub(crate) fn set_cpu_millis(&self, cpu_millis: u32) -> Result<(), Error> {
        let quota = u64::from(cpu_millis) * CPU_PERIOD_US / 1000;
        let (limit, burst) = match &self.dirs {
            Dirs::V1 { cpu, .. } => (cpu.join("cpu.cfs_quota_us"), cpu.join("cpu.cfs_burst_us")),
            Dirs::V2 { dir } => (dir.join("cpu.max"), dir.join("cpu.max.burst")),
        };
        // Burst lets a function spend quota it left unused in earlier periods (up to one
        // period's worth): the same average share, without a 100 ms stall when a burst
        // of requests lands in one period. Optional: kernels before 5.14 lack it.
        let has_burst = burst.exists();
        if has_burst {
            let _ = fs::write(&burst, "0");
        }
        match &self.dirs {
            Dirs::V1 { .. } => write(&limit, &quota.to_string())?,
            Dirs::V2 { .. } => write(&limit, &format!("{quota} {CPU_PERIOD_US}"))?,
        }
        if has_burst {
            let _ = fs::write(&burst, quota.to_string());
        }
        Ok(())
    }

    /// Changes the memory limit of a live instance; refused when it already uses more.
    pub(crate) fn set_memory_bytes(&self, bytes: u64) -> Result<(), Error> {
        if let Some(usage) = self.memory_current_bytes()
            && usage > bytes
        {
            return Err(Error::SetLimit(format!(
                "memory in use ({usage} bytes) exceeds the new limit ({bytes} bytes)"
            )));
        }
        let value = bytes.to_string();
        match &self.dirs {
            Dirs::V1 { memory, .. } => {
                let limit = memory.join("memory.limit_in_bytes");
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if !memsw.exists() {
                    return write(&limit, &value);
                }
                // memsw may never be below limit_in_bytes: raise memsw first, lower it
                // last.
                if read_u64(&limit).is_some_and(|current| bytes > current) {
                    write(&memsw, &value)?;
                    write(&limit, &value)
                } else {
                    write(&limit, &value)?;
                    write(&memsw, &value)
                }
            }
            Dirs::V2 { dir } => write(&dir.join("memory.max"), &value),
        }
    }

    /// Changes `pids.max` of a live instance; refused when more tasks already run.
    pub(crate) fn set_pids_max(&self, pids_max: u32) -> Result<(), Error> {
        let dir = match &self.dirs {
            Dirs::V1 { pids, .. } => pids,
            Dirs::V2 { dir } => dir,
        };
        if let Some(current) = read_u64(&dir.join("pids.current"))
            && current > u64::from(pids_max)
        {
            return Err(Error::SetLimit(format!(
                "{current} tasks already run, more than pids_max {pids_max}"
            )));
        }
        write(&dir.join("pids.max"), &pids_max.to_string())
    }

    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.all
    }

    /// The `cgroup.procs` files init must join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.all.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Every pid in any of the instance's cgroups (a process that failed half-way
    /// through joining may be in some only).
    pub(crate) fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = Vec::new();
        for f in self.procs_files() {
            if let Ok(text) = fs::read_to_string(&f) {
                for p in text
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    if p > 0 && !pids.contains(&p) {
                        pids.push(p);
                    }
                }
            }
        }
        pids
    }

    /// SIGKILLs every process in the cgroup except `spare`, under a freeze when the host
    /// has one, so nothing can fork or exit (and have its pid reused) in between.
    pub(crate) fn kill_all_except(&self, spare: Option<i32>) {
        let frozen = self.freeze(true);
        for _ in 0..if frozen { 1 } else { 20 } {
            let pids: Vec<i32> = self
                .pids()
                .into_iter()
                .filter(|p| Some(*p) != spare)
                .collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                sigkill(p);
            }
        }
        // Thaw even when the freeze did not settle: a half-frozen cgroup must not stay so.
        self.freeze(false);
    }

    /// Kills everything, `cgroup.kill` on v2 when the kernel has it.
    pub(crate) fn kill_all(&self) {
        if let Dirs::V2 { dir } = &self.dirs {
            let kill = dir.join("cgroup.kill");
            if kill.exists() && fs::write(&kill, "1").is_ok() {
                return;
            }
        }
        self.kill_all_except(None);
    }

    /// Stops everything in the instance between invocations: asks the freezer to
    /// freeze without waiting for it to settle (the kernel stops each task on its way
    /// back to user space, microseconds later). Returns false on a host without a
    /// freezer, where the caller must fall back to killing strays.
    pub(crate) fn suspend(&self) -> Result<bool, Error> {
        match &self.freezer {
            Some(f) => f.set(f.frozen).map(|()| true),
            None => Ok(false),
        }
    }

    /// Lets a suspended instance run again. A thaw takes effect when the write
    /// returns (both freezers wake every task in it), so the next frame can follow.
    pub(crate) fn resume(&self) -> Result<(), Error> {
        match &self.freezer {
            Some(f) => f.set(f.thawed),
            None => Ok(()),
        }
    }

    /// Freezes (or thaws) and waits briefly for the state to settle. Returns whether the
    /// cgroup is now frozen; false when the host has no freezer.
    fn freeze(&self, on: bool) -> bool {
        let (ctl, value, state, settled): (PathBuf, &str, PathBuf, Settled) = match &self.dirs {
            Dirs::V1 {
                freezer: Some(f), ..
            } => (
                f.join("freezer.state"),
                if on { "FROZEN" } else { "THAWED" },
                f.join("freezer.state"),
                |s, on| s.trim() == if on { "FROZEN" } else { "THAWED" },
            ),
            Dirs::V2 { dir } if dir.join("cgroup.freeze").exists() => (
                dir.join("cgroup.freeze"),
                if on { "1" } else { "0" },
                dir.join("cgroup.events"),
                |s, on| keyed_value(s, "frozen") == Some(u64::from(on)),
            ),
            _ => return false,
        };
        if fs::write(&ctl, value).is_err() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match fs::read_to_string(&state) {
                Ok(s) if settled(&s, on) => return on,
                Ok(_) if Instant::now() < deadline => sleep(Duration::from_micros(500)),
                // Unsettled: when freezing, report "not frozen" so callers retry kills.
                _ => return false,
            }
        }
    }

    /// rmdir every directory, retrying while tasks are still leaving. Returns true when
    /// all are gone.
    pub(crate) fn remove(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut all_gone = true;
        for d in self.all.iter().rev() {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        // Whatever is still inside is killed again: a late fork may have
                        // slipped past the first kill.
                        self.kill_all_except(None);
                        sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        tracing::warn!(path = %d.display(), error = %e, "cgroup left behind");
                        all_gone = false;
                        break;
                    }
                }
            }
        }
        all_gone
    }

    pub(crate) fn oom_killed(&self) -> bool {
        match &self.dirs {
            Dirs::V1 { memory, .. } => {
                match read(&memory.join("memory.oom_control"))
                    .and_then(|s| keyed_value(&s, "oom_kill"))
                {
                    Some(n) => n > 0,
                    // Kernels before 4.13 have no oom_kill counter: a hit limit is the
                    // best evidence left; the caller pairs it with a SIGKILL exit.
                    None => read_u64(&memory.join("memory.failcnt")).is_some_and(|n| n > 0),
                }
            }
            Dirs::V2 { dir } => read(&dir.join("memory.events"))
                .and_then(|s| keyed_value(&s, "oom_kill"))
                .is_some_and(|n| n > 0),
        }
    }

    /// Whether `oom_killed` had to fall back to `memory.failcnt` (v1, old kernels).
    pub(crate) fn oom_needs_sigkill_evidence(&self) -> bool {
        match &self.dirs {
            Dirs::V1 { memory, .. } => read(&memory.join("memory.oom_control"))
                .and_then(|s| keyed_value(&s, "oom_kill"))
                .is_none(),
            Dirs::V2 { .. } => false,
        }
    }

    pub(crate) fn memory_peak_bytes(&self) -> Option<u64> {
        match &self.dirs {
            Dirs::V1 { memory, .. } => read_u64(&memory.join("memory.max_usage_in_bytes")),
            Dirs::V2 { dir } => {
                read_u64(&dir.join("memory.peak")).or_else(|| read_u64(&dir.join("memory.current")))
            }
        }
    }

    pub(crate) fn memory_current_bytes(&self) -> Option<u64> {
        match &self.dirs {
            Dirs::V1 { memory, .. } => read_u64(&memory.join("memory.usage_in_bytes")),
            Dirs::V2 { dir } => read_u64(&dir.join("memory.current")),
        }
    }

    pub(crate) fn cpu_usage_ns(&self) -> Option<u64> {
        match &self.dirs {
            Dirs::V1 { cpuacct, .. } => read_u64(&cpuacct.join("cpuacct.usage")),
            Dirs::V2 { dir } => read(&dir.join("cpu.stat"))
                .and_then(|s| keyed_value(&s, "usage_usec"))
                .map(|us| us.saturating_mul(1000)),
        }
    }
}

/// Whether a freezer state file's text shows the requested state (frozen = true).
type Settled = fn(&str, bool) -> bool;

impl Freezer {
    fn open(dirs: &Dirs) -> Option<Freezer> {
        let (path, frozen, thawed) = match dirs {
            Dirs::V1 {
                freezer: Some(f), ..
            } => (f.join("freezer.state"), "FROZEN", "THAWED"),
            Dirs::V2 { dir } => (dir.join("cgroup.freeze"), "1", "0"),
            Dirs::V1 { freezer: None, .. } => return None,
        };
        // v2 kernels before 5.2 have no cgroup.freeze: no freezer.
        let file = fs::OpenOptions::new().write(true).open(&path).ok()?;
        Some(Freezer {
            file,
            path,
            frozen,
            thawed,
        })
    }

    fn set(&self, value: &str) -> Result<(), Error> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_at(value.as_bytes(), 0)
            .map(drop)
            .map_err(|source| Error::WriteCgroup {
                path: self.path.clone(),
                source,
            })
    }
}

/// The pid a process has in the innermost pid namespace it belongs to, from the
/// `NSpid:` line of its `/proc/<pid>/status`.
pub(crate) fn innermost_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// The value of `key` in flat-keyed cgroup files (`key value` per line).
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo::V1Hierarchy;

    fn v1_layout(root: &Path, freezer: bool) -> Layout {
        let h = |name: &str| {
            let base = root.join(name);
            fs::create_dir_all(&base).expect("mkdir");
            V1Hierarchy {
                controllers: vec![name.to_string()],
                base,
            }
        };
        Layout::V1 {
            memory: h("memory"),
            pids: h("pids"),
            cpu: h("cpu,cpuacct"),
            cpuacct: h("cpu,cpuacct"),
            freezer: freezer.then(|| h("freezer")),
        }
    }

    fn text(p: PathBuf) -> String {
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    #[test]
    fn v1_creates_dirs_and_writes_limits() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), true);
        let parents = create_parent(&layout, "nb").expect("parent");
        // cpu and cpuacct are co-mounted: one directory serves both.
        assert_eq!(parents.len(), 4);
        let limits = Limits::for_memory(256);
        let cg = InstanceCgroup::create(&layout, "nb", "i1", &limits).expect("create");
        let mem = tmp.path().join("memory/nb/i1");
        assert_eq!(
            text(mem.join("memory.limit_in_bytes")),
            (256u64 << 20).to_string()
        );
        assert!(!mem.join("memory.memsw.limit_in_bytes").exists());
        assert_eq!(text(tmp.path().join("pids/nb/i1/pids.max")), "64");
        let cpu = tmp.path().join("cpu,cpuacct/nb/i1");
        assert_eq!(text(cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(text(cpu.join("cpu.cfs_quota_us")), "14400");
        assert_eq!(cg.procs_files().len(), 4);
        assert!(
            cg.procs_files()
                .contains(&tmp.path().join("freezer/nb/i1/cgroup.procs"))
        );

        // Same id twice is refused: ids name live cgroups.
        assert!(matches!(
            InstanceCgroup::create(&layout, "nb", "i1", &limits),
            Err(Error::CreateCgroup { .. })
        ));

        fs::write(cpu.join("cpuacct.usage"), "12345\n").expect("write");
        assert_eq!(cg.cpu_usage_ns(), Some(12345));
        fs::write(mem.join("memory.max_usage_in_bytes"), "999\n").expect("write");
        assert_eq!(cg.memory_peak_bytes(), Some(999));
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .expect("write");
        assert!(!cg.oom_killed());
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .expect("write");
        assert!(cg.oom_killed());
        assert!(!cg.oom_needs_sigkill_evidence());
    }

    #[test]
    fn v1_limit_write_failure_fails_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), false);
        create_parent(&layout, "nb").expect("parent");
        // A directory where the limit file should be makes the write fail.
        fs::create_dir_all(tmp.path().join("pids/nb")).expect("mkdir");
        let blocker = tmp.path().join("pids/nb/i2/pids.max");
        // Pre-create the instance dir only for pids to force the create path to fail
        // on mkdir instead: both are "fail closed" and must leave nothing behind.
        fs::create_dir_all(&blocker).expect("mkdir");
        let r = InstanceCgroup::create(&layout, "nb", "i2", &Limits::default());
        assert!(matches!(r, Err(Error::CreateCgroup { .. })), "{r:?}");
        assert!(!tmp.path().join("memory/nb/i2").exists());
    }

    #[test]
    fn v1_write_failure_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), false);
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "i3", &Limits::default()).expect("create");
        // Turn the memsw file into a directory: "present but unwritable".
        let memsw = tmp.path().join("memory/nb/i3/memory.memsw.limit_in_bytes");
        fs::create_dir(&memsw).expect("mkdir");
        assert!(matches!(
            cg.write_limits(&Limits::default()),
            Err(Error::WriteCgroup { path, .. }) if path == memsw
        ));
    }

    #[test]
    fn v1_memory_change_orders_memsw_and_refuses_below_usage() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), false);
        create_parent(&layout, "nb").expect("parent");
        let mem = tmp.path().join("memory/nb/m");
        // Plain files do not exist until written; memsw must exist to be written.
        fs::create_dir_all(&mem).expect("mkdir");
        fs::write(mem.join("memory.memsw.limit_in_bytes"), "").expect("w");
        fs::remove_dir_all(&mem).expect("rm");
        let cg =
            InstanceCgroup::create(&layout, "nb", "m", &Limits::for_memory(256)).expect("create");
        fs::write(
            mem.join("memory.memsw.limit_in_bytes"),
            (256u64 << 20).to_string(),
        )
        .expect("w");
        fs::write(mem.join("memory.usage_in_bytes"), (10u64 << 20).to_string()).expect("w");
        cg.set_memory_bytes(64 << 20).expect("lower");
        assert_eq!(
            text(mem.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            text(mem.join("memory.memsw.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        // Order, observed through a failing limit file: lowering writes the limit first
        // (memsw untouched), raising writes memsw first.
        let limit = mem.join("memory.limit_in_bytes");
        fs::remove_file(&limit).expect("rm");
        fs::create_dir(&limit).expect("mkdir");
        assert!(cg.set_memory_bytes(32 << 20).is_err());
        assert_eq!(
            text(mem.join("memory.memsw.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        fs::remove_dir(&limit).expect("rmdir");
        fs::write(&limit, (64u64 << 20).to_string()).expect("w");
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        fs::remove_file(&memsw).expect("rm");
        fs::create_dir(&memsw).expect("mkdir");
        assert!(cg.set_memory_bytes(128 << 20).is_err());
        assert_eq!(text(limit.clone()), (64u64 << 20).to_string());
        fs::remove_dir(&memsw).expect("rmdir");
        // Usage above the new limit: refused, nothing written.
        assert!(matches!(
            cg.set_memory_bytes(8 << 20),
            Err(Error::SetLimit(m)) if m.contains("exceeds")
        ));
        assert_eq!(text(limit), (64u64 << 20).to_string());
    }

    #[test]
    fn pids_change_refuses_below_current() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").expect("w");
        let layout = Layout::V2 { root: root.clone() };
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "p", &Limits::default()).expect("create");
        let dir = root.join("nb/p");
        fs::write(dir.join("pids.current"), "12\n").expect("w");
        assert!(matches!(cg.set_pids_max(8), Err(Error::SetLimit(_))));
        assert_eq!(text(dir.join("pids.max")), "64");
        cg.set_pids_max(16).expect("set");
        assert_eq!(text(dir.join("pids.max")), "16");
        fs::write(dir.join("memory.current"), "100").expect("w");
        cg.set_memory_bytes(1 << 20).expect("v2 memory");
        assert_eq!(text(dir.join("memory.max")), (1u64 << 20).to_string());
    }

    #[test]
    fn v2_delegates_controllers_and_writes_limits() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("w");
        let layout = Layout::V2 { root: root.clone() };
        let parents = create_parent(&layout, "nb").expect("parent");
        assert_eq!(parents, vec![root.join("nb")]);
        // The last write wins in a plain file; cgroupfs accumulates them.
        assert_eq!(text(root.join("nb/cgroup.subtree_control")), "+cpu");
        let cg =
            InstanceCgroup::create(&layout, "nb", "x", &Limits::for_memory(1769)).expect("create");
        let dir = root.join("nb/x");
        assert_eq!(text(dir.join("memory.max")), (1769u64 << 20).to_string());
        assert_eq!(text(dir.join("pids.max")), "64");
        assert_eq!(text(dir.join("cpu.max")), "100000 100000");
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        fs::write(dir.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").expect("w");
        assert_eq!(cg.cpu_usage_ns(), Some(7000));
        fs::write(dir.join("memory.current"), "42").expect("w");
        assert_eq!(cg.memory_peak_bytes(), Some(42));
        fs::write(dir.join("memory.peak"), "43").expect("w");
        assert_eq!(cg.memory_peak_bytes(), Some(43));
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .expect("w");
        assert!(cg.oom_killed());
    }

    #[test]
    fn v2_nested_parent_delegates_at_every_level_and_reaps_only_its_own() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").expect("w");
        let layout = Layout::V2 { root: root.clone() };
        let mine = create_parent(&layout, "nb/dmine").expect("parent");
        assert_eq!(mine, vec![root.join("nb/dmine")]);
        for level in ["", "nb", "nb/dmine"] {
            let f = root.join(level).join("cgroup.subtree_control");
            assert!(f.exists(), "{} not delegated", f.display());
        }
        // Another server's instance beside ours under the shared parent.
        let theirs = root.join("nb/dtheirs/i2");
        fs::create_dir_all(&theirs).expect("mkdir");
        fs::create_dir_all(root.join("nb/dmine/i1")).expect("mkdir");
        assert_eq!(reap_stale(&mine), 1);
        assert!(!root.join("nb/dmine/i1").exists());
        assert!(theirs.exists(), "another server's instance was reaped");
    }

    #[test]
    fn v2_missing_controller_fails_detect() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("cgroup.controllers"), "cpu io\n").expect("w");
        let layout = Layout::V2 {
            root: tmp.path().to_path_buf(),
        };
        assert!(
            matches!(create_parent(&layout, "nb"), Err(Error::Detect(m)) if m.contains("memory"))
        );
    }

    #[test]
    fn removes_empty_dirs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), false);
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "r", &Limits::default()).expect("create");
        // rmdir on a plain dir with files fails like a populated cgroup does: the
        // remover must give up after its patience, not hang.
        assert!(!cg.remove(Duration::from_millis(20)));
        for d in cg.dirs() {
            for f in fs::read_dir(d).expect("ls") {
                fs::remove_file(f.expect("entry").path()).expect("rm");
            }
        }
        assert!(cg.remove(Duration::from_millis(20)));
        assert!(!tmp.path().join("memory/nb/r").exists());
    }

    #[test]
    fn suspend_writes_the_freezer_and_reports_its_absence() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // v1 with a freezer hierarchy. Plain dirs have no control files until written
        // (cgroupfs makes them with the directory): without one there is no freezer.
        let layout = v1_layout(tmp.path(), true);
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "f", &Limits::default()).expect("create");
        assert!(
            !cg.suspend().expect("suspend"),
            "no control file: no freezer"
        );
        let state = tmp.path().join("freezer/nb/f/freezer.state");
        fs::write(&state, "THAWED").expect("w");
        let cg = InstanceCgroup {
            freezer: Freezer::open(&cg.dirs),
            dirs: cg.dirs,
            all: cg.all,
        };
        assert!(cg.suspend().expect("suspend"));
        assert_eq!(text(state.clone()), "FROZEN");
        cg.resume().expect("resume");
        assert_eq!(text(state.clone()), "THAWED");

        // v1 without the freezer hierarchy: suspend says so, resume is a no-op.
        let layout = v1_layout(&tmp.path().join("nofreezer"), false);
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "n", &Limits::default()).expect("create");
        assert!(!cg.suspend().expect("suspend"));
        cg.resume().expect("resume");

        // v2: cgroup.freeze takes 1 and 0.
        let root = tmp.path().join("v2");
        fs::create_dir_all(&root).expect("mkdir");
        fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").expect("w");
        let layout = Layout::V2 { root: root.clone() };
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "v", &Limits::default()).expect("create");
        fs::write(root.join("nb/v/cgroup.freeze"), "0").expect("w");
        let cg = InstanceCgroup {
            freezer: Freezer::open(&cg.dirs),
            dirs: cg.dirs,
            all: cg.all,
        };
        assert!(cg.suspend().expect("suspend"));
        assert_eq!(text(root.join("nb/v/cgroup.freeze")), "1");
        cg.resume().expect("resume");
        assert_eq!(text(root.join("nb/v/cgroup.freeze")), "0");
    }

    #[test]
    fn freezer_pin_freezes_an_empty_v1_cgroup_and_thaws_it_at_drop() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), true);
        create_parent(&layout, "nb").expect("parent");
        let pin = FreezerPin::create(&layout, "nb").expect("pin");
        let state = tmp.path().join(format!(
            "freezer/nb/freezer-pin-{}/freezer.state",
            std::process::id()
        ));
        assert_eq!(text(state.clone()), "FROZEN");
        drop(pin);
        // cgroupfs would let the rmdir through; a plain dir keeps its file.
        assert_eq!(text(state), "THAWED");
        assert!(FreezerPin::create(&v1_layout(&tmp.path().join("x"), false), "nb").is_none());
        let v2 = Layout::V2 {
            root: tmp.path().to_path_buf(),
        };
        assert!(FreezerPin::create(&v2, "nb").is_none());
    }

    #[test]
    fn innermost_ns_pid_reads_the_last_nspid() {
        assert_eq!(innermost_ns_pid("Name:\tx\nNSpid:\t4242\t2\n"), Some(2));
        assert_eq!(innermost_ns_pid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(innermost_ns_pid("NSpid:\t9\t8\t1\n"), Some(1));
        assert_eq!(innermost_ns_pid("Name:\tx\n"), None);
        assert_eq!(innermost_ns_pid("NSpid:\tx\n"), None);
    }

    #[test]
    fn leftovers_are_retried_until_gone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = v1_layout(tmp.path(), false);
        create_parent(&layout, "nb").expect("parent");
        let cg = InstanceCgroup::create(&layout, "nb", "busy", &Limits::default()).expect("create");
        // Files inside make rmdir fail, as a cgroup with a task still leaving does.
        assert!(!cg.remove(Duration::from_millis(5)));
        let dirs = cg.dirs().to_vec();
        let left = Leftovers::default();
        left.add(cg);
        assert_eq!(left.retry(Duration::from_millis(5)), 1);
        for d in &dirs {
            for f in fs::read_dir(d).expect("ls") {
                fs::remove_file(f.expect("entry").path()).expect("rm");
            }
        }
        assert_eq!(left.retry(Duration::from_millis(5)), 0);
        assert!(dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn keyed_values() {
        assert_eq!(keyed_value("a 1\noom_kill 5\n", "oom_kill"), Some(5));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(keyed_value("oom_kill x\n", "oom_kill"), None);
    }
}
