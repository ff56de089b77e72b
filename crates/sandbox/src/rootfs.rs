//! Building the instance's root filesystem, inside init's private mount namespace.
//!
//! ```text
//! open O_PATH fds of every bind source (host view)      <- before anything is covered
//! tmpfs on /tmp (the staging root; pivot_root moves it, so nothing of the host stays hidden)
//!   binds from /proc/self/fd/N, remounted ro,nosuid,nodev; symlink sources recreated
//!   /var/task (or, for a stem cell, an empty directory), /var/runtime (ro), /tmp (size-limited tmpfs, 1777), /dev (tmpfs: null zero
//!   full random urandom binds, fd/stdin/stdout/stderr links, shm), /proc (fresh, masked),
//!   /etc (synthetic files); no /sys
//! remount the staging root ro; pivot_root(".", "."); detach the old root
//! ```
//!
//! Binds never nest and never cover the sandbox's own mount points (checked by
//! `Rootfs::validate`), so every directory created here is in our tmpfs, never in a
//! host directory. Symlinks inside binds resolve against the new root at use time.

use std::fs::DirBuilder;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

use crate::spec::{RUNTIME_DIR, Rootfs, TASK_DIR};

/// Where the new root is assembled (in init's own mount namespace only).
const STAGE: &str = "/tmp";

const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// What container runtimes mask: kernel memory, keys, timing side channels, hardware.
const MASKED_FILES: [&str; 7] = [
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "kallsyms",
];
const MASKED_DIRS: [&str; 4] = ["acpi", "asound", "scsi", "firmware"];
const READONLY_PROC: [&str; 6] = ["sys", "sysrq-trigger", "irq", "bus", "fs", "driver"];

const SHM_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// One inode per 16 KiB of scratch space, ext4's default ratio (Lambda's `/tmp` is
/// ext4). Each tmpfs inode and its dentry cost about 1 KiB of kernel memory charged to
/// the instance's memory cgroup, and tmpfs's own default (half the host's RAM in
/// pages) would let empty files exhaust `memory_mb` long before `size=` is reached:
/// the cap turns that into `ENOSPC`.
const BYTES_PER_INODE: u64 = 16 * 1024;

/// Enough inodes for a tiny scratch space to hold a few hundred small files.
const MIN_INODES: u64 = 256;

/// `/dev/shm` takes half of `/tmp`'s size (at most [`SHM_MAX_BYTES`]), so the two
/// scratch mounts together stay within three quarters of the memory `/tmp` was sized
/// from (half of `memory_mb`), leaving the rest for the program itself.
pub(crate) fn shm_bytes(tmp_bytes: u64) -> u64 {
    (tmp_bytes / 2).min(SHM_MAX_BYTES)
}

/// `size=` and `nr_inodes=` of a scratch tmpfs of `bytes`.
pub(crate) fn scratch_options(bytes: u64) -> String {
    let inodes = (bytes / BYTES_PER_INODE).max(MIN_INODES);
    format!("size={bytes},nr_inodes={inodes}")
}

type R<T> = Result<T, String>;

fn ctx<T, E: std::fmt::Display>(what: impl FnOnce() -> String, r: Result<T, E>) -> R<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

enum Source {
    /// Mount the fd's file at `target`.
    Bind {
        fd: OwnedFd,
        target: PathBuf,
        is_dir: bool,
        device: bool,
    },
    /// Recreate a symlink at `target` pointing at `points_to`.
    Symlink { target: PathBuf, points_to: PathBuf },
}

/// Opens (or reads the links of) every source while the host filesystem is still
/// fully visible.
fn open_sources(rootfs: &Rootfs) -> R<Vec<Source>> {
    let mut out = Vec::new();
    for b in &rootfs.ro_binds {
        let meta = match std::fs::symlink_metadata(&b.source) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && b.optional => continue,
            r => ctx(|| format!("stat bind source {}", b.source.display()), r)?,
        };
        if meta.file_type().is_symlink() {
            let points_to = ctx(
                || format!("read link {}", b.source.display()),
                std::fs::read_link(&b.source),
            )?;
            out.push(Source::Symlink {
                target: b.target.clone(),
                points_to,
            });
            continue;
        }
        out.push(open_bind(&b.source, &b.target, false)?);
    }
    if let Some(code) = &rootfs.code_dir {
        out.push(open_bind(code, Path::new(TASK_DIR), false)?);
    }
    if let Some(rt) = &rootfs.runtime_dir {
        out.push(open_bind(rt, Path::new(RUNTIME_DIR), false)?);
    }
    for d in DEVICES {
        let p = PathBuf::from(format!("/dev/{d}"));
        out.push(open_bind(&p, &p, true)?);
    }
    Ok(out)
}

fn open_bind(source: &Path, target: &Path, device: bool) -> R<Source> {
    let fd = ctx(
        || format!("open bind source {}", source.display()),
        nix::fcntl::open(source, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()),
    )?;
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let st = ctx(
        || format!("stat bind source {}", source.display()),
        nix::sys::stat::fstat(fd.as_raw_fd()),
    )?;
    Ok(Source::Bind {
        fd,
        target: target.to_path_buf(),
        is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        device,
    })
}

/// `stage` + absolute `target`.
fn inside(stage: &Path, target: &Path) -> PathBuf {
    let rel: PathBuf = target
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    stage.join(rel)
}

/// mkdir -p below `stage` that refuses to walk through anything but real directories.
fn mkdir_p(stage: &Path, target: &Path) -> R<()> {
    let mut p = stage.to_path_buf();
    for c in target.components() {
        let Component::Normal(c) = c else { continue };
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "create {}: exists and is not a directory",
                    p.display()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ctx(
                || format!("create {}", p.display()),
                DirBuilder::new().mode(0o755).create(&p),
            )?,
            Err(e) => return Err(format!("stat {}: {e}", p.display())),
        }
    }
    Ok(())
}

fn mount_tmpfs(target: &Path, flags: MsFlags, data: &str) -> R<()> {
    ctx(
        || format!("mount tmpfs on {}", target.display()),
        mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(data)),
    )
}

fn bind(source: &Path, target: &Path) -> R<()> {
    ctx(
        || format!("bind {} on {}", source.display(), target.display()),
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )
}

/// A bind's flags only change on a second, remounting call.
fn remount(target: &Path, flags: MsFlags) -> R<()> {
    ctx(
        || format!("remount {} read-only", target.display()),
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
            None::<&str>,
        ),
    )
}

fn ro() -> MsFlags {
    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

/// Assembles the new root and pivots into it. Only called in init's own mount
/// namespace, with `/` already private.
pub(crate) fn enter(rootfs: &Rootfs, etc_files: &[(String, String)]) -> R<()> {
    let sources = open_sources(rootfs)?;
    let stage = Path::new(STAGE);
    let etc_bytes: usize = etc_files
        .iter()
        .map(|(n, t)| n.len() + t.len() + 4096)
        .sum();
    let root_size = (1 << 20) + etc_bytes;
    mount_tmpfs(
        stage,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=0755,size={root_size}"),
    )?;

    // /dev first: the device binds below land in it.
    let dev = stage.join("dev");
    mkdir_p(stage, Path::new("/dev"))?;
    mount_tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=65536",
    )?;

    for s in &sources {
        match s {
            Source::Symlink { target, points_to } => {
                let at = inside(stage, target);
                if let Some(parent) = target.parent() {
                    mkdir_p(stage, parent)?;
                }
                ctx(
                    || format!("create symlink {}", at.display()),
                    std::os::unix::fs::symlink(points_to, &at),
                )?;
            }
            Source::Bind {
                fd,
                target,
                is_dir,
                device,
            } => {
                let at = inside(stage, target);
                if *is_dir {
                    mkdir_p(stage, target)?;
                } else {
                    if let Some(parent) = target.parent() {
                        mkdir_p(stage, parent)?;
                    }
                    ctx(
                        || format!("create mount point {}", at.display()),
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&at),
                    )?;
                }
                let src = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                bind(&src, &at)?;
                if *device {
                    remount(&at, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
                } else {
                    remount(&at, ro())?;
                }
            }
        }
    }
    drop(sources);
    if rootfs.is_stem() {
        // Only the mount point: init mounts the code here from outside the pid
        // namespace once the host assigns it (`Instance::assign_code`).
        mkdir_p(stage, Path::new(TASK_DIR))?;
    }

    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(
            || format!("create /dev/{name}"),
            std::os::unix::fs::symlink(to, dev.join(name)),
        )?;
    }
    let shm = dev.join("shm");
    mkdir_p(stage, Path::new("/dev/shm"))?;
    mount_tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        &format!("mode=1777,{}", scratch_options(shm_bytes(rootfs.tmp_bytes))),
    )?;
    ctx(
        || "remount /dev read-only".to_string(),
        mount(
            None::<&str>,
            &dev,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;

    let tmp = stage.join("tmp");
    mkdir_p(stage, Path::new("/tmp"))?;
    mount_tmpfs(
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,{}", scratch_options(rootfs.tmp_bytes)),
    )?;

    mount_proc(stage)?;

    mkdir_p(stage, Path::new("/etc"))?;
    for (name, text) in etc_files {
        let p = stage.join("etc").join(name);
        ctx(|| format!("write /etc/{name}"), std::fs::write(&p, text))?;
        ctx(
            || format!("chmod /etc/{name}"),
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)),
        )?;
    }
    ctx(
        || "remount the new root read-only".to_string(),
        mount(
            None::<&str>,
            stage,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        ),
    )?;
    pivot(stage)
}

fn mount_proc(stage: &Path) -> R<()> {
    let proc_dir = stage.join("proc");
    mkdir_p(stage, Path::new("/proc"))?;
    ctx(
        || "mount /proc".to_string(),
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    let null = stage.join("dev/null");
    for f in MASKED_FILES {
        let p = proc_dir.join(f);
        if p.exists() {
            bind(&null, &p)?;
        }
    }
    for d in MASKED_DIRS {
        let p = proc_dir.join(d);
        if p.is_dir() {
            mount_tmpfs(&p, ro(), "size=0,mode=0555")?;
        }
    }
    for f in READONLY_PROC {
        let p = proc_dir.join(f);
        if p.exists() {
            bind(&p, &p)?;
            remount(&p, ro() | MsFlags::MS_NOEXEC)?;
        }
    }
    Ok(())
}

/// `pivot_root(".", ".")` stacks the old root on the new one; detaching it leaves only
/// the new root (runc's way: no directory for the old root is needed).
fn pivot(stage: &Path) -> R<()> {
    ctx(
        || "chdir to the new root".to_string(),
        nix::unistd::chdir(stage),
    )?;
    ctx(
        || "pivot_root".to_string(),
        nix::unistd::pivot_root(".", "."),
    )?;
    ctx(
        || "make the old root a slave".to_string(),
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    ctx(
        || "detach the old root".to_string(),
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    ctx(|| "chdir /".to_string(), nix::unistd::chdir("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_mounts_cap_inodes_with_their_size() {
        // 128 MB function: /tmp 64 MiB -> 4096 inodes, /dev/shm 32 MiB -> 2048.
        assert_eq!(
            scratch_options(64 << 20),
            format!("size={},nr_inodes=4096", 64u64 << 20)
        );
        assert_eq!(shm_bytes(64 << 20), 32 << 20);
        assert_eq!(
            scratch_options(shm_bytes(64 << 20)),
            format!("size={},nr_inodes=2048", 32u64 << 20)
        );
        // The largest /tmp: 32768 inodes, and /dev/shm stays at its own cap.
        assert!(scratch_options(512 << 20).ends_with(",nr_inodes=32768"));
        assert_eq!(shm_bytes(512 << 20), SHM_MAX_BYTES);
        // A tiny one still holds a few hundred files.
        assert!(scratch_options(4096).ends_with(",nr_inodes=256"));
    }

    #[test]
    fn inside_strips_the_root() {
        assert_eq!(
            inside(Path::new("/tmp"), Path::new("/usr/lib")),
            PathBuf::from("/tmp/usr/lib")
        );
        assert_eq!(
            inside(Path::new("/tmp"), Path::new("/")),
            PathBuf::from("/tmp")
        );
    }

    #[test]
    fn mkdir_p_refuses_symlinks() {
        let d = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc", d.path().join("evil")).expect("symlink");
        let err = mkdir_p(d.path(), Path::new("/evil/x")).expect_err("followed a symlink");
        assert!(err.contains("not a directory"), "{err}");
        mkdir_p(d.path(), Path::new("/a/b/c")).expect("mkdir");
        assert!(d.path().join("a/b/c").is_dir());
        // Idempotent.
        mkdir_p(d.path(), Path::new("/a/b")).expect("mkdir again");
    }

    #[test]
    fn missing_optional_sources_are_skipped_required_fail() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut r = Rootfs::new(d.path());
        r.ro_binds = vec![crate::spec::Bind::optional("/does/not/exist")];
        let s = open_sources(&r).expect("optional skipped");
        // code dir + devices.
        assert_eq!(s.len(), 1 + DEVICES.len());
        r.ro_binds = vec![crate::spec::Bind::same("/does/not/exist")];
        let err = open_sources(&r).err().expect("required missing");
        assert!(err.starts_with("stat bind source /does/not/exist"), "{err}");
        // A stem cell opens no code dir.
        let mut r = Rootfs::stem();
        r.ro_binds.clear();
        let s = open_sources(&r).expect("stem");
        assert_eq!(s.len(), DEVICES.len());
    }

    #[test]
    fn symlink_sources_are_recorded_as_links() {
        let d = tempfile::tempdir().expect("tempdir");
        let link = d.path().join("bin");
        std::os::unix::fs::symlink("usr/bin", &link).expect("symlink");
        let mut r = Rootfs::new(d.path());
        r.ro_binds = vec![crate::spec::Bind {
            source: link,
            target: "/bin".into(),
            optional: false,
        }];
        let s = open_sources(&r).expect("open");
        assert!(matches!(
            &s[0],
            Source::Symlink { target, points_to }
                if target == Path::new("/bin") && points_to == Path::new("usr/bin")
        ));
    }
}
