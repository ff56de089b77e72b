//! The path rules pack and unpack share, so that whatever `pack_dir` writes, `unpack`
//! accepts.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Longest entry name or link target accepted (Linux's PATH_MAX).
pub(crate) const MAX_NAME_BYTES: usize = 4096;

/// Turns an archive entry name into a path relative to the archive root. Rejects
/// absolute paths and `..` anywhere (zip slip); `.` components are dropped, so the root
/// itself comes back as an empty path.
pub(crate) fn safe_rel_path(name: &[u8]) -> Result<PathBuf, String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("name longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.contains(&0) {
        return Err("name contains a NUL byte".into());
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(name)).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed".into());
            }
            Component::ParentDir => return Err("`..` components are not allowed".into()),
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// Checks the target of a symlink stored at `link` (relative to the archive root).
///
/// Accepted targets are relative, made of some leading `..` followed only by names, and
/// never climb above the root. Refusing `..` after a name matters: in `a/../x` the `a`
/// may itself be a symlink, so the lexical reading could differ from what the kernel
/// resolves. With this shape, and with no entry ever written through a symlink, every
/// link resolves inside the tree by induction over the links it passes through.
pub(crate) fn check_link_target(link: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty symlink target".into());
    }
    if target.len() > MAX_NAME_BYTES {
        return Err(format!("symlink target longer than {MAX_NAME_BYTES} bytes"));
    }
    if target.contains(&0) {
        return Err("symlink target contains a NUL byte".into());
    }
    let depth = link.parent().map_or(0, |p| p.components().count());
    let mut ups = 0usize;
    let mut seen_name = false;
    for c in Path::new(OsStr::from_bytes(target)).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err("symlink target is absolute".into());
            }
            Component::CurDir => {}
            Component::ParentDir if seen_name => {
                return Err("symlink target has `..` after a name".into());
            }
            Component::ParentDir => {
                ups += 1;
                if ups > depth {
                    return Err("symlink target points outside the archive".into());
                }
            }
            Component::Normal(_) => seen_name = true,
        }
    }
    Ok(())
}

/// The target to store for a link at `link_parent` (components below the root) that
/// resolves to `dest` (components below the root): `..` up to the common ancestor, then
/// down. The result always passes [`check_link_target`].
pub(crate) fn relative_target(link_parent: &[OsString], dest: &[OsString]) -> PathBuf {
    let common = link_parent
        .iter()
        .zip(dest)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..link_parent.len() {
        out.push("..");
    }
    for d in &dest[common..] {
        out.push(d);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Lexically resolves `target` seen from the directory `base` (components below the
/// root). `None` when it climbs above the root or is absolute.
pub(crate) fn resolve_lexically(base: &[OsString], target: &Path) -> Option<Vec<OsString>> {
    let mut out: Vec<OsString> = base.to_vec();
    for c in target.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return None,
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::Normal(n) => out.push(n.to_os_string()),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_paths_reject_escapes() {
        assert_eq!(safe_rel_path(b"./a/b").ok(), Some(PathBuf::from("a/b")));
        assert_eq!(safe_rel_path(b"./").ok(), Some(PathBuf::new()));
        assert!(safe_rel_path(b"../evil").is_err());
        assert!(safe_rel_path(b"a/../../evil").is_err());
        assert!(safe_rel_path(b"/etc/passwd").is_err());
        assert!(safe_rel_path(b"a\0b").is_err());
    }

    #[test]
    fn link_targets_stay_inside() {
        let l = Path::new("a/b/link");
        assert!(check_link_target(l, b"x").is_ok());
        assert!(check_link_target(l, b"../../x/y").is_ok());
        assert!(check_link_target(l, b"../../../x").is_err());
        assert!(check_link_target(l, b"/etc").is_err());
        assert!(check_link_target(l, b"c/../x").is_err());
        assert!(check_link_target(Path::new("top"), b"..").is_err());
        assert!(check_link_target(Path::new("top"), b".").is_ok());
    }

    #[test]
    fn relative_targets_round_trip() {
        let p = |s: &str| -> Vec<OsString> {
            Path::new(s)
                .components()
                .map(|c| c.as_os_str().to_os_string())
                .collect()
        };
        let t = relative_target(&p("a/b"), &p("a/c/d"));
        assert_eq!(t, PathBuf::from("../c/d"));
        assert!(check_link_target(Path::new("a/b/link"), t.as_os_str().as_bytes()).is_ok());
        assert_eq!(relative_target(&p("a"), &p("a")), PathBuf::from("."));
        assert_eq!(
            resolve_lexically(&p("a/b"), Path::new("../c")),
            Some(p("a/c"))
        );
        assert_eq!(resolve_lexically(&p("a"), Path::new("../../x")), None);
    }
}
