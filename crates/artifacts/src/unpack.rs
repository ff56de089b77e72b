//! Extraction of untrusted archives.
//!
//! The tar stream is read in raw mode so that GNU long names and PAX headers are parsed
//! here with size caps (the tar crate would buffer them whole). Every entry is checked
//! before it touches the disk; files are created with `O_EXCL`, parents are walked with
//! `lstat`, so nothing is ever written through a symlink, and sizes are counted from the
//! bytes actually written.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use tar::{EntryType, PaxExtensions};

use crate::links::{MAX_NAME_BYTES, check_link_target, safe_rel_path};
use crate::{Error, Limits};

/// PAX header records are small key=value lists; anything bigger is an attack.
const MAX_PAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files, hard links and symlinks created.
    pub files: u64,
    /// Bytes written to regular files.
    pub bytes: u64,
    /// All entries, directories included (what `Limits::max_files` counts).
    pub entries: u64,
}

/// Extracts a tar.gz from `archive` into `dest`, which must be missing or an empty
/// directory. On any error `dest` is left empty.
///
/// Rejected: absolute paths, `..`, links resolving outside `dest`, writes through a
/// symlink, devices, fifos and other special entries, duplicate paths, more entries
/// than `limits.max_files`, more bytes than `limits.max_unpacked_bytes`. Modes become
/// 0o755 (directories, and files with any exec bit) or 0o644; setuid, setgid and sticky
/// bits, owners and times from the archive are dropped.
pub fn unpack(archive: impl Read, dest: &Path, limits: &Limits) -> Result<UnpackStats, Error> {
    let extract = |source| Error::Extract {
        path: dest.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            let mut it = fs::read_dir(dest).map_err(extract)?;
            if it.next().is_some() {
                return Err(Error::DestinationNotEmpty {
                    path: dest.to_path_buf(),
                });
            }
        }
        Ok(_) => {
            return Err(Error::DestinationNotEmpty {
                path: dest.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .mode(0o755)
                .create(dest)
                .map_err(extract)?;
        }
        Err(e) => return Err(extract(e)),
    }
    let result = unpack_into(archive, dest, limits);
    if result.is_err() {
        // Best effort: the original error is what the caller needs to see.
        let _ = clear_dir(dest);
    }
    result
}

/// Removes everything inside `dir` without following symlinks.
pub(crate) fn clear_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
}

fn unsafe_entry(name: &[u8], reason: impl Into<String>) -> Error {
    Error::UnsafeEntry {
        entry: display_name(name),
        reason: reason.into(),
    }
}

/// Characters of an entry name shown in an error; the rest is elided.
const SHOWN_NAME_CHARS: usize = 100;

/// An entry name as an error message can carry it: invalid UTF-8 replaced, control and
/// invisible characters escaped (they would rewrite the operator's terminal or hide what
/// the name is), and cut after [`SHOWN_NAME_CHARS`] characters with the full length said.
fn display_name(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let shown: String = text.chars().take(SHOWN_NAME_CHARS).collect();
    let mut out = nimbus_core::text::escape(&shown, nimbus_core::text::Keep::Nothing).into_owned();
    if text.chars().nth(SHOWN_NAME_CHARS).is_some() {
        out.push_str(&format!("... ({} bytes)", name.len()));
    }
    out
}

fn unpack_into(archive: impl Read, dest: &Path, limits: &Limits) -> Result<UnpackStats, Error> {
    let mut ar = tar::Archive::new(GzDecoder::new(archive));
    let entries = ar.entries().map_err(Error::ReadArchive)?.raw(true);
    let mut stats = UnpackStats::default();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut pending = Pending::default();
    // Metadata records (long names, PAX) cost no entry of their own; bound them anyway.
    let mut records: u64 = 0;
    let max_records = limits.max_files.saturating_mul(4).saturating_add(64);

    for entry in entries {
        let mut entry = entry.map_err(Error::ReadArchive)?;
        records += 1;
        if records > max_records {
            return Err(Error::LimitExceeded {
                what: "number of archive records",
                limit: max_records,
            });
        }
        let kind = entry.header().entry_type();
        match kind {
            EntryType::GNULongName => {
                pending.name = Some(read_meta(&mut entry, MAX_NAME_BYTES as u64 + 1)?);
                continue;
            }
            EntryType::GNULongLink => {
                pending.link = Some(read_meta(&mut entry, MAX_NAME_BYTES as u64 + 1)?);
                continue;
            }
            EntryType::XHeader => {
                let data = read_meta(&mut entry, MAX_PAX_BYTES)?;
                apply_pax(&data, &mut pending)?;
                continue;
            }
            // Global PAX headers only carry defaults we ignore (times, owners).
            EntryType::XGlobalHeader => {
                read_meta(&mut entry, MAX_PAX_BYTES)?;
                continue;
            }
            _ => {}
        }

        let name: Vec<u8> = match pending.name.take() {
            // GNU tar counts the NUL terminator in the long name's size.
            Some(mut n) => {
                while n.last() == Some(&0) {
                    n.pop();
                }
                n
            }
            None => entry.path_bytes().into_owned(),
        };
        let link_name: Option<Vec<u8>> = match pending.link.take() {
            Some(mut n) => {
                while n.last() == Some(&0) {
                    n.pop();
                }
                Some(n)
            }
            None => entry.link_name_bytes().map(|b| b.into_owned()),
        };

        let rel = safe_rel_path(&name).map_err(|r| unsafe_entry(&name, r))?;
        stats.entries += 1;
        if stats.entries > limits.max_files {
            return Err(Error::LimitExceeded {
                what: "number of files and directories",
                limit: limits.max_files,
            });
        }
        if rel.as_os_str().is_empty() {
            if kind == EntryType::Directory {
                continue;
            }
            return Err(unsafe_entry(&name, "only a directory may name the root"));
        }
        if !seen.insert(rel.clone()) {
            return Err(unsafe_entry(&name, "duplicate path"));
        }
        ensure_parents(dest, &rel, &name)?;
        let path = dest.join(&rel);
        let extract = |source| Error::Extract {
            path: path.clone(),
            source,
        };

        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let mode = entry.header().mode().map_err(Error::ReadArchive)?;
                let remaining = limits.max_unpacked_bytes.saturating_sub(stats.bytes);
                // Fail fast on an honest header; the count below is what is enforced.
                if entry.header().entry_size().unwrap_or(0) > remaining {
                    return Err(bytes_limit(limits));
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| exists_or(e, &name, extract))?;
                let written =
                    copy_limited(&mut entry, &mut file, remaining).map_err(|e| match e {
                        CopyError::Limit => bytes_limit(limits),
                        CopyError::Read(e) => Error::ReadArchive(e),
                        CopyError::Write(e) => Error::Extract {
                            path: path.clone(),
                            source: e,
                        },
                    })?;
                stats.bytes += written;
                stats.files += 1;
                let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                file.set_permissions(fs::Permissions::from_mode(perm))
                    .map_err(extract)?;
            }
            EntryType::Directory => match fs::symlink_metadata(&path) {
                // Created earlier as the parent of a file listed before it.
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(unsafe_entry(&name, "duplicate path")),
                Err(_) => {
                    DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(extract)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map_err(extract)?;
                }
            },
            EntryType::Symlink => {
                let target =
                    link_name.ok_or_else(|| unsafe_entry(&name, "symlink without target"))?;
                check_link_target(&rel, &target).map_err(|r| unsafe_entry(&name, r))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| exists_or(e, &name, extract))?;
                stats.files += 1;
            }
            EntryType::Link => {
                let target =
                    link_name.ok_or_else(|| unsafe_entry(&name, "hard link without target"))?;
                let target_rel = safe_rel_path(&target)
                    .map_err(|r| unsafe_entry(&name, format!("hard link target: {r}")))?;
                if !is_plain_file_inside(dest, &target_rel) {
                    return Err(unsafe_entry(
                        &name,
                        "hard link target is not a file extracted earlier from this archive",
                    ));
                }
                fs::hard_link(dest.join(&target_rel), &path)
                    .map_err(|e| exists_or(e, &name, extract))?;
                stats.files += 1;
            }
            other => {
                return Err(unsafe_entry(
                    &name,
                    format!(
                        "entry type {:?} is not allowed (only files, directories and links)",
                        other
                    ),
                ));
            }
        }
    }
    if pending.name.is_some() || pending.link.is_some() {
        return Err(Error::ReadArchive(io::Error::new(
            io::ErrorKind::InvalidData,
            "archive ends with a long-name record and no entry",
        )));
    }
    Ok(stats)
}

fn bytes_limit(limits: &Limits) -> Error {
    Error::LimitExceeded {
        what: "total size of files in bytes",
        limit: limits.max_unpacked_bytes,
    }
}

fn exists_or(e: io::Error, name: &[u8], other: impl FnOnce(io::Error) -> Error) -> Error {
    if e.kind() == io::ErrorKind::AlreadyExists {
        unsafe_entry(name, "duplicate path")
    } else {
        other(e)
    }
}

/// Reads a metadata record whole, refusing records over `cap` bytes.
fn read_meta(entry: &mut impl Read, cap: u64) -> Result<Vec<u8>, Error> {
    let mut data = Vec::new();
    entry
        .take(cap + 1)
        .read_to_end(&mut data)
        .map_err(Error::ReadArchive)?;
    if data.len() as u64 > cap {
        return Err(Error::LimitExceeded {
            what: "size of an archive metadata record",
            limit: cap,
        });
    }
    Ok(data)
}

/// Takes `path` and `linkpath` from a PAX record. A PAX `size` is refused when it
/// disagrees with the header: raw parsing follows the header, and two readings of one
/// archive are how smuggling attacks work.
fn apply_pax(data: &[u8], pending: &mut Pending) -> Result<(), Error> {
    for ext in PaxExtensions::new(data) {
        let ext = ext.map_err(Error::ReadArchive)?;
        match ext.key_bytes() {
            b"path" => pending.name = Some(ext.value_bytes().to_vec()),
            b"linkpath" => pending.link = Some(ext.value_bytes().to_vec()),
            b"size" => {
                return Err(unsafe_entry(
                    b"(pax header)",
                    "PAX size overrides are not supported",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates the missing parents of `rel` below `dest`; every existing one must be a real
/// directory, never a symlink.
fn ensure_parents(dest: &Path, rel: &Path, name: &[u8]) -> Result<(), Error> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let mut cur = dest.to_path_buf();
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_entry(name, "path goes through a symlink"));
            }
            Ok(_) => return Err(unsafe_entry(name, "a parent is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .mode(0o755)
                    .create(&cur)
                    .map_err(|source| Error::Extract {
                        path: cur.clone(),
                        source,
                    })?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).map_err(|source| {
                    Error::Extract {
                        path: cur.clone(),
                        source,
                    }
                })?;
            }
            Err(source) => {
                return Err(Error::Extract {
                    path: cur.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// True when `rel` below `dest` is a regular file reached through real directories only.
fn is_plain_file_inside(dest: &Path, rel: &Path) -> bool {
    let mut cur = dest.to_path_buf();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        let Ok(m) = fs::symlink_metadata(&cur) else {
            return false;
        };
        let ok = if i + 1 == n { m.is_file() } else { m.is_dir() };
        if !ok {
            return false;
        }
    }
    n > 0
}

enum CopyError {
    Limit,
    Read(io::Error),
    Write(io::Error),
}

/// Copies at most `limit` bytes; one byte more is an error, whatever the header said.
fn copy_limited(from: &mut impl Read, to: &mut File, limit: u64) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total += n as u64;
        if total > limit {
            return Err(CopyError::Limit);
        }
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use tar::Header;

    /// A header written byte by byte, so tests can say what `tar::Builder` refuses to.
    fn raw(name: &[u8], kind: EntryType, size: u64, mode: u32, link: &[u8]) -> Header {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        h
    }

    fn file(name: &str, data: &[u8]) -> (Header, Vec<u8>) {
        (
            raw(
                name.as_bytes(),
                EntryType::Regular,
                data.len() as u64,
                0o644,
                b"",
            ),
            data.to_vec(),
        )
    }

    fn targz(entries: &[(Header, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for (h, data) in entries {
            b.append(h, &data[..]).expect("append");
        }
        b.into_inner().and_then(|gz| gz.finish()).expect("finish")
    }

    /// Unpacks, expects `want` to match the error, and checks nothing is left behind.
    fn rejects(entries: &[(Header, Vec<u8>)], limits: &Limits, want: fn(&Error) -> bool) {
        let archive = targz(entries);
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("dest");
        match unpack(&archive[..], &dest, limits) {
            Err(e) => assert!(want(&e), "unexpected error: {e}"),
            Ok(s) => panic!("hostile archive accepted: {s:?}"),
        }
        let left: Vec<_> = fs::read_dir(&dest).expect("dest").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn is_unsafe(e: &Error) -> bool {
        matches!(e, Error::UnsafeEntry { .. })
    }

    fn is_limit(e: &Error) -> bool {
        matches!(e, Error::LimitExceeded { .. })
    }

    #[test]
    fn path_escapes_are_rejected() {
        let d = Limits::default();
        rejects(
            &[file("ok.txt", b"1"), file("../evil", b"x")],
            &d,
            is_unsafe,
        );
        rejects(&[file("a/../../evil", b"x")], &d, is_unsafe);
        rejects(&[file("/etc/x", b"x")], &d, is_unsafe);
    }

    #[test]
    fn links_out_and_writes_through_links_are_rejected() {
        let d = Limits::default();
        let link = |name: &str, target: &str| {
            (
                raw(
                    name.as_bytes(),
                    EntryType::Symlink,
                    0,
                    0o777,
                    target.as_bytes(),
                ),
                Vec::new(),
            )
        };
        let hard = |name: &str, target: &str| {
            (
                raw(
                    name.as_bytes(),
                    EntryType::Link,
                    0,
                    0o644,
                    target.as_bytes(),
                ),
                Vec::new(),
            )
        };
        rejects(&[link("etc", "/etc"), file("etc/x", b"x")], &d, is_unsafe);
        rejects(&[link("up", "../../x")], &d, is_unsafe);
        rejects(&[link("a/b", "c/../../../x")], &d, is_unsafe);
        // An inside link is fine, but nothing may be written through it.
        rejects(
            &[
                (raw(b"sub", EntryType::Directory, 0, 0o755, b""), Vec::new()),
                link("l", "sub"),
                file("l/x", b"x"),
            ],
            &d,
            is_unsafe,
        );
        rejects(&[hard("h", "/etc/passwd")], &d, is_unsafe);
        rejects(&[hard("h", "../outside")], &d, is_unsafe);
        rejects(&[link("l", "."), hard("h", "l/whatever")], &d, is_unsafe);
        // A hard link to a file of the archive is allowed.
        let archive = targz(&[file("a", b"data"), hard("b", "a")]);
        let tmp = tempfile::tempdir().expect("tmp");
        unpack(&archive[..], &tmp.path().join("d"), &d).expect("inside hard link");
        assert_eq!(fs::read(tmp.path().join("d/b")).expect("read"), b"data");
    }

    #[test]
    fn special_files_and_duplicates_are_rejected() {
        let d = Limits::default();
        for kind in [
            EntryType::Char,
            EntryType::Block,
            EntryType::Fifo,
            EntryType::GNUSparse,
        ] {
            rejects(
                &[(raw(b"dev", kind, 0, 0o644, b""), Vec::new())],
                &d,
                is_unsafe,
            );
        }
        rejects(&[file("a", b"1"), file("./a", b"2")], &d, is_unsafe);
        rejects(
            &[
                file("a", b"1"),
                (raw(b"a/", EntryType::Directory, 0, 0o755, b""), Vec::new()),
            ],
            &d,
            is_unsafe,
        );
    }

    /// A file whose name is carried by a GNU long-name record, as GNU tar writes names
    /// over 100 bytes.
    fn long_named(name: &[u8]) -> Vec<(Header, Vec<u8>)> {
        let mut record = name.to_vec();
        record.push(0);
        vec![
            (
                raw(
                    b"././@LongLink",
                    EntryType::GNULongName,
                    record.len() as u64,
                    0o644,
                    b"",
                ),
                record,
            ),
            (raw(b"x", EntryType::Regular, 1, 0o644, b""), b"x".to_vec()),
        ]
    }

    fn unsafe_naming(e: &Error, what: &str) -> bool {
        matches!(e, Error::UnsafeEntry { entry, reason } if entry.contains(what) && !reason.is_empty())
    }

    #[test]
    fn long_and_deep_paths_are_refused_by_name() {
        let d = Limits::default();
        // One 4,000-byte component: ENAMETOOLONG at `open`, a disk error, before.
        let huge = vec![b'a'; 4000];
        let archive = targz(&long_named(&huge));
        let tmp = tempfile::tempdir().expect("tmp");
        let err = unpack(&archive[..], &tmp.path().join("d"), &d).expect_err("4000 bytes");
        let Error::UnsafeEntry { entry, reason } = &err else {
            panic!("want UnsafeEntry, got {err:?}");
        };
        assert!(
            entry.starts_with("aaaa") && entry.ends_with("(4000 bytes)"),
            "{entry}"
        );
        assert!(
            entry.len() < 200,
            "the name is cut for display: {}",
            entry.len()
        );
        assert!(reason.contains("1024"), "{reason}");
        assert!(err.is_invalid_input());

        let component = format!("{}/f", "c".repeat(256));
        rejects(&long_named(component.as_bytes()), &d, is_unsafe);
        let total = format!("{}/f", vec!["d".repeat(200); 6].join("/"));
        rejects(&long_named(total.as_bytes()), &d, is_unsafe);
        let deep = format!("{}f", "d/".repeat(64));
        rejects(&long_named(deep.as_bytes()), &d, is_unsafe);

        // At the limits: accepted.
        let fits = [
            format!("{}/f", "c".repeat(255)),
            format!("{}f", "d/".repeat(63)),
            format!(
                "{}/{}",
                vec!["e".repeat(200); 4].join("/"),
                "f".repeat(1024 - 804)
            ),
        ];
        for name in fits {
            assert!(name.len() <= 1024);
            let archive = targz(&long_named(name.as_bytes()));
            let tmp = tempfile::tempdir().expect("tmp");
            let dest = tmp.path().join("d");
            unpack(&archive[..], &dest, &d).expect("a name within the limits");
            assert!(dest.join(&name).is_file(), "{name}");
        }
    }

    #[test]
    fn names_other_tools_read_as_paths_are_refused() {
        let d = Limits::default();
        for name in [
            "..\\..\\x",
            "a\\b",
            "C:\\x",
            "C:x",
            "./c:/x",
            "\u{FF0E}\u{FF0E}\u{FF0F}x",
            "a\u{FF0F}b",
            "\u{2025}/x",
            "a\u{2215}b",
            "a\u{FF3C}b",
            "a\u{00A5}b",
            "a\u{FF1A}b",
            "a\u{3002}b",
            "evil\u{202E}yp.exe",
            "tab\tname",
            "new\nline",
            "del\u{7F}",
        ] {
            let entries = [file(name, b"x")];
            let archive = targz(&entries);
            let tmp = tempfile::tempdir().expect("tmp");
            let dest = tmp.path().join("d");
            match unpack(&archive[..], &dest, &d) {
                Err(e @ Error::UnsafeEntry { .. }) => {
                    let shown = e.to_string();
                    assert!(!shown.chars().any(char::is_control), "{shown:?}");
                }
                other => panic!("{name:?}: want UnsafeEntry, got {other:?}"),
            }
            assert_eq!(fs::read_dir(&dest).expect("dest").count(), 0, "{name:?}");
        }
        // Invalid UTF-8, e.g. an overlong `/` (0xC0 0xAF).
        rejects(
            &[(
                raw(b"a\xC0\xAFb", EntryType::Regular, 1, 0o644, b""),
                b"x".to_vec(),
            )],
            &d,
            is_unsafe,
        );
        // A symlink whose target another tool reads as `..\..`.
        rejects(
            &[(
                raw(b"l", EntryType::Symlink, 0, 0o777, b"..\\..\\x"),
                Vec::new(),
            )],
            &d,
            |e| unsafe_naming(e, "l"),
        );
        // Ordinary non-ASCII names and a colon past the first component are fine.
        let archive = targz(&[
            file("caf\u{e9}/\u{65e5}\u{672c}.py", b"1"),
            file("a/b:c", b"2"),
        ]);
        let tmp = tempfile::tempdir().expect("tmp");
        unpack(&archive[..], &tmp.path().join("d"), &d).expect("plain unicode names");
    }

    #[test]
    fn too_many_files_are_rejected() {
        let entries: Vec<_> = (0..10_001).map(|i| file(&format!("f{i}"), b"")).collect();
        rejects(&entries, &Limits::default(), is_limit);
    }

    #[test]
    fn bombs_are_rejected() {
        let limits = Limits {
            max_unpacked_bytes: 1024 * 1024,
            ..Limits::default()
        };
        // 2 MiB of zeros compresses to a few KiB.
        rejects(
            &[file("bomb", &vec![0u8; 2 * 1024 * 1024])],
            &limits,
            is_limit,
        );
        // Two files that each fit but not together.
        let half = vec![0u8; 600 * 1024];
        rejects(&[file("a", &half), file("b", &half)], &limits, is_limit);
        // A header claiming a small size while PAX claims another: refused outright.
        let mut pax = Vec::new();
        let record = "12 size=999\n";
        pax.extend_from_slice(record.as_bytes());
        rejects(
            &[
                (
                    raw(b"pax", EntryType::XHeader, pax.len() as u64, 0o644, b""),
                    pax,
                ),
                file("small", b"1"),
            ],
            &limits,
            is_unsafe,
        );
        // A huge long-name record must not be buffered.
        let long = vec![b'a'; 100_000];
        rejects(
            &[
                (
                    raw(
                        b"././@LongLink",
                        EntryType::GNULongName,
                        long.len() as u64,
                        0o644,
                        b"",
                    ),
                    long,
                ),
                file("x", b"1"),
            ],
            &limits,
            is_limit,
        );
    }

    #[test]
    fn counted_bytes_not_headers_are_enforced() {
        // copy_limited is what enforces the limit; it must fail one byte over whatever
        // the header claimed.
        let tmp = tempfile::tempdir().expect("tmp");
        let mut f = File::create(tmp.path().join("f")).expect("create");
        let data = [1u8; 101];
        assert!(matches!(
            copy_limited(&mut &data[..], &mut f, 100),
            Err(CopyError::Limit)
        ));
        assert!(matches!(copy_limited(&mut &data[..], &mut f, 101), Ok(101)));
    }

    #[test]
    fn special_mode_bits_are_stripped() {
        let archive = targz(&[
            (
                raw(b"suid", EntryType::Regular, 1, 0o4755, b""),
                b"x".to_vec(),
            ),
            (
                raw(b"sgid", EntryType::Regular, 1, 0o2644, b""),
                b"x".to_vec(),
            ),
            (
                raw(b"dir/", EntryType::Directory, 0, 0o1777, b""),
                Vec::new(),
            ),
            (raw(b"ro", EntryType::Regular, 1, 0o400, b""), b"x".to_vec()),
        ]);
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("d");
        unpack(&archive[..], &dest, &Limits::default()).expect("unpack");
        let mode = |p: &str| {
            fs::metadata(dest.join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("sgid"), 0o644);
        assert_eq!(mode("dir"), 0o755);
        assert_eq!(mode("ro"), 0o644);
    }

    #[test]
    fn destination_must_be_empty() {
        let tmp = tempfile::tempdir().expect("tmp");
        fs::write(tmp.path().join("existing"), "x").expect("write");
        let archive = targz(&[file("a", b"1")]);
        assert!(matches!(
            unpack(&archive[..], tmp.path(), &Limits::default()),
            Err(Error::DestinationNotEmpty { .. })
        ));
        assert!(tmp.path().join("existing").exists());
    }

    #[test]
    fn garbage_is_a_read_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = unpack(
            &b"not a gzip stream"[..],
            &tmp.path().join("d"),
            &Limits::default(),
        );
        assert!(matches!(err, Err(Error::ReadArchive(_))), "{err:?}");
    }
}
