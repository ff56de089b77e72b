//! The path rules pack and unpack share, so that whatever `pack_dir` writes, `unpack`
//! accepts.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Cap on a GNU long-name record (Linux's PATH_MAX): read whole so that a name over
/// [`MAX_PATH_BYTES`] is refused by name, not as an oversized record.
pub(crate) const MAX_NAME_BYTES: usize = 4096;

/// Longest entry path accepted. Far above what real code needs, and low enough that the
/// extraction directory's own path plus this stays under PATH_MAX on every host.
pub(crate) const MAX_PATH_BYTES: usize = 1024;

/// Longest path component accepted: NAME_MAX of every Linux filesystem. A longer one
/// would fail at `open` as a disk error instead of being refused as input.
pub(crate) const MAX_COMPONENT_BYTES: usize = 255;

/// Most components in one entry path.
pub(crate) const MAX_DEPTH: usize = 64;

/// Turns an archive entry name into a path relative to the archive root. Rejects
/// absolute paths and `..` anywhere (zip slip); `.` components are dropped, so the root
/// itself comes back as an empty path. Names must also pass [`check_name`].
pub(crate) fn safe_rel_path(name: &[u8]) -> Result<PathBuf, String> {
    check_name(name)?;
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for c in Path::new(OsStr::from_bytes(name)).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed".into());
            }
            Component::ParentDir => return Err("`..` components are not allowed".into()),
            Component::CurDir => {}
            Component::Normal(n) => {
                if n.len() > MAX_COMPONENT_BYTES {
                    return Err(format!(
                        "a path component is longer than {MAX_COMPONENT_BYTES} bytes"
                    ));
                }
                if depth == 0 && is_drive_prefix(n.as_bytes()) {
                    return Err("a drive prefix (`C:`) is not allowed".into());
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("path is deeper than {MAX_DEPTH} components"));
                }
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// The name rules that do not depend on path structure. Archives are read by more than
/// this extractor (a developer's unzip, a Windows checkout, a web UI), and a name that is
/// harmless here can be a `..` or a separator there: such names are refused rather than
/// stored as literal file names.
pub(crate) fn check_name(name: &[u8]) -> Result<(), String> {
    if name.len() > MAX_PATH_BYTES {
        return Err(format!("path longer than {MAX_PATH_BYTES} bytes"));
    }
    if name.contains(&0) {
        return Err("name contains a NUL byte".into());
    }
    // Overlong and other invalid sequences are how `/` and `.` were smuggled past
    // decoders that accept them.
    let text = std::str::from_utf8(name).map_err(|_| "name is not valid UTF-8".to_string())?;
    if text.contains('\\') {
        return Err("backslashes are not allowed (a path separator on Windows)".into());
    }
    if let Some(c) = text.chars().find(|c| is_refused_char(*c)) {
        return Err(format!(
            "character U+{:04X} is not allowed (a control character, or one that tools \
             read as a dot, separator or text-direction change)",
            u32::from(c)
        ));
    }
    Ok(())
}

/// `C:...`: absolute or drive-relative to Windows tools.
fn is_drive_prefix(first: &[u8]) -> bool {
    first.len() >= 2 && first[0].is_ascii_alphabetic() && first[1] == b':'
}

/// Control characters, and characters that Unicode normalization (NFKC), IDNA or the
/// "best fit" code pages of Windows turn into `.`, `/`, `\` or `:`, or that reorder how
/// a name is displayed.
fn is_refused_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // dots: one/two dot leader, ellipsis, small, fullwidth and ideographic stops
            '\u{2024}' | '\u{2025}' | '\u{2026}' | '\u{FE52}' | '\u{FF0E}' | '\u{3002}' | '\u{FF61}'
            // slashes: fraction, division, big solidus, small and fullwidth forms
            | '\u{2044}' | '\u{2215}' | '\u{29F8}' | '\u{FF0F}'
            // backslashes: set minus, big reverse solidus, small and fullwidth forms, and
            // yen and won signs (0x5C in Japanese and Korean code pages)
            | '\u{2216}' | '\u{29F9}' | '\u{FE68}' | '\u{FF3C}' | '\u{00A5}' | '\u{20A9}'
            // colons: presentation, small and fullwidth forms
            | '\u{FE13}' | '\u{FE55}' | '\u{FF1A}'
            // bidi overrides and isolates, zero-width characters, BOM
            | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
        )
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
    check_name(target).map_err(|r| format!("symlink target: {r}"))?;
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
    fn names_are_bounded_and_plain() {
        assert!(safe_rel_path("a/b/c.py".as_bytes()).is_ok());
        assert!(safe_rel_path("x/C:y".as_bytes()).is_ok());
        assert!(safe_rel_path(&[b'a'; MAX_COMPONENT_BYTES]).is_ok());
        assert!(safe_rel_path(&[b'a'; MAX_COMPONENT_BYTES + 1]).is_err());
        assert!(safe_rel_path("a/".repeat(MAX_DEPTH).as_bytes()).is_ok());
        assert!(safe_rel_path("a/".repeat(MAX_DEPTH + 1).as_bytes()).is_err());
        // `./` does not count towards depth, but does towards length.
        assert!(safe_rel_path("./".repeat(MAX_PATH_BYTES / 2 + 1).as_bytes()).is_err());
        assert!(safe_rel_path(b"C:/x").is_err());
        assert!(safe_rel_path(b"./z:").is_err());
        for bad in ["a\\b", "a\u{FF0E}", "\u{FF0F}", "a\u{200B}b", "a\rb"] {
            assert!(check_name(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(check_name(b"\xff").is_err());
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
