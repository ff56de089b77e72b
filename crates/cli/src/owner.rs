//! Which server owns a data dir, and so which instance cgroups.
//!
//! Several servers may share one `--cgroup-parent` (the default `nimbus`): a dev and a
//! test server, or scale-out nodes on one box. Each gets its own cgroup below the
//! parent, named after its data dir, and start-up reaps only there. A second server on
//! the same data dir would reap the first one's live instances (and share its
//! databases), so the data dir is locked for the server's life: an exclusive `flock`
//! the kernel drops when the process dies, however it dies, so a crashed server never
//! blocks its restart.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// Held by `serve` until it exits.
pub struct Claim {
    _lock: Flock<File>,
    /// This server's cgroup below the shared parent.
    pub cgroup: String,
}

/// Locks `data_dir` (canonical) for this process, or says which live server holds it.
pub fn claim(data_dir: &Path) -> anyhow::Result<Claim> {
    let path = data_dir.join("serve.lock");
    // std opens with O_CLOEXEC: instances never inherit the lock, so orphans left by a
    // SIGKILL cannot keep the next server out.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let pid = if holder.is_empty() { "?" } else { holder };
            bail!(
                "data dir {} is in use by another nimbus serve (pid {pid}); stop it or pass another --data-dir",
                data_dir.display()
            );
        }
        Err((_, errno)) => {
            return Err(errno).with_context(|| format!("lock {}", path.display()));
        }
    };
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(Claim {
        _lock: lock,
        cgroup: cgroup_name(data_dir),
    })
}

/// A stable cgroup name per data dir: `d` and 16 hex digits of its path's SHA-256.
fn cgroup_name(data_dir: &Path) -> String {
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("d{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_the_same_dir_is_refused_until_the_first_ends() {
        let tmp = tempfile::tempdir().expect("tmp");
        let first = claim(tmp.path()).expect("first claim");
        let err = claim(tmp.path()).err().expect("second claim refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("in use by another nimbus serve"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        let again = claim(tmp.path()).expect("claim after release");
        assert_eq!(again.cgroup, cgroup_name(tmp.path()));
    }

    #[test]
    fn cgroup_names_differ_per_dir_and_are_stable() {
        let a = cgroup_name(Path::new("/var/lib/nimbus"));
        assert_eq!(a, cgroup_name(Path::new("/var/lib/nimbus")));
        assert_ne!(a, cgroup_name(Path::new("/var/lib/nimbus-test")));
        assert_eq!(a.len(), 17);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
