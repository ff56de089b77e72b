//! Deterministic packing: the same tree always gives byte-identical archives, so the
//! digest names the code and not the moment it was packed.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use flate2::Compression;
use flate2::GzBuilder;
use tar::{EntryType, Header};
use walkdir::WalkDir;

use crate::links::{check_link_target, relative_target, resolve_lexically, safe_rel_path};
use crate::{Error, Limits};

/// Names never packed, at any depth: VCS data, bytecode caches, nimbus' own state and
/// Finder litter. They change without the code changing and would break determinism.
pub const SKIPPED_NAMES: &[&str] = &[".git", "__pycache__", ".nimbus", ".DS_Store"];

/// Fixed so the same tree gives the same bytes whatever flate2's default becomes.
const GZIP_LEVEL: u32 = 6;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Regular files and symlinks packed.
    pub files: u64,
    /// Sum of the sizes of the regular files.
    pub bytes: u64,
    /// All entries, directories included (what `Limits::max_files` counts).
    pub entries: u64,
}

/// Packs `dir` into `out` as a deterministic tar.gz within [`Limits::default`].
pub fn pack_dir(dir: &Path, out: impl Write) -> Result<PackStats, Error> {
    pack_dir_with_limits(dir, out, &Limits::default())
}

/// [`pack_dir`] with explicit limits.
pub fn pack_dir_with_limits(
    dir: &Path,
    out: impl Write,
    limits: &Limits,
) -> Result<PackStats, Error> {
    let root = fs::canonicalize(dir).map_err(|source| Error::ReadTree {
        path: dir.to_path_buf(),
        source,
    })?;
    let counting = CountingWriter {
        inner: out,
        written: 0,
        limit: limits.max_archive_bytes,
        over: false,
    };
    let gz = GzBuilder::new().write(counting, Compression::new(GZIP_LEVEL));
    let mut builder = tar::Builder::new(gz);
    builder.follow_symlinks(false);

    let mut stats = PackStats::default();
    let result = append_tree(&mut builder, dir, &root, limits, &mut stats);
    // The archive is over its limit when the writer says so, whatever io error the
    // encoder turned that into.
    let finish = result.and_then(|()| {
        let gz = builder.into_inner().map_err(Error::WriteArchive)?;
        let mut counting = gz.finish().map_err(Error::WriteArchive)?;
        counting.inner.flush().map_err(Error::WriteArchive)?;
        Ok(())
    });
    match finish {
        Err(Error::WriteArchive(e)) if e.kind() == io::ErrorKind::FileTooLarge => {
            Err(Error::LimitExceeded {
                what: "archive size in bytes",
                limit: limits.max_archive_bytes,
            })
        }
        Err(e) => Err(e),
        Ok(()) => Ok(stats),
    }
}

/// A `target/` folder beside a `Cargo.toml`: a Rust guest's build output (gigabytes of
/// intermediate files), never part of what runs; the built `.wasm` is copied out of it.
fn is_cargo_target(e: &walkdir::DirEntry) -> bool {
    e.file_type().is_dir()
        && e.file_name() == "target"
        && e.path()
            .parent()
            .is_some_and(|p| p.join("Cargo.toml").is_file())
}

fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    root: &Path,
    limits: &Limits,
    stats: &mut PackStats,
) -> Result<(), Error> {
    let walk = WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| {
            !SKIPPED_NAMES
                .iter()
                .any(|s| e.file_name().as_bytes() == s.as_bytes())
                && !is_cargo_target(e)
        });
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e
                .path()
                .map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
            Error::ReadTree {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("walk failed")),
            }
        })?;
        let path = entry.path();
        let rel = path.strip_prefix(root).map_err(|_| Error::ReadTree {
            path: path.to_path_buf(),
            source: io::Error::other("entry outside the walked folder"),
        })?;
        // Report paths as the user named the folder, not canonicalized.
        let shown = dir.join(rel);
        // Refused here with the local path, rather than by the server after the upload.
        safe_rel_path(rel.as_os_str().as_bytes()).map_err(|reason| Error::PackName {
            path: shown.clone(),
            reason,
        })?;

        stats.entries += 1;
        if stats.entries > limits.max_files {
            return Err(Error::LimitExceeded {
                what: "number of files and directories",
                limit: limits.max_files,
            });
        }

        let ft = entry.file_type();
        let mut header = Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header
            .set_username("")
            .and_then(|()| header.set_groupname(""))
            .map_err(Error::WriteArchive)?;

        if ft.is_dir() {
            header.set_entry_type(EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(Error::WriteArchive)?;
        } else if ft.is_file() {
            let file = File::open(path).map_err(|source| Error::ReadTree {
                path: shown.clone(),
                source,
            })?;
            let meta = file.metadata().map_err(|source| Error::ReadTree {
                path: shown.clone(),
                source,
            })?;
            let len = meta.len();
            stats.files += 1;
            stats.bytes = stats.bytes.saturating_add(len);
            if stats.bytes > limits.max_unpacked_bytes {
                return Err(Error::LimitExceeded {
                    what: "total size of files in bytes",
                    limit: limits.max_unpacked_bytes,
                });
            }
            let exec = meta.permissions().mode() & 0o111 != 0;
            header.set_entry_type(EntryType::Regular);
            header.set_mode(if exec { 0o755 } else { 0o644 });
            header.set_size(len);
            let reader = ExactReader {
                inner: file,
                left: len,
                path: &shown,
            };
            builder
                .append_data(&mut header, rel, reader)
                .map_err(Error::WriteArchive)?;
        } else if ft.is_symlink() {
            let target = link_target(path, rel, root, &shown)?;
            stats.files += 1;
            header.set_entry_type(EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder
                .append_link(&mut header, rel, &target)
                .map_err(Error::WriteArchive)?;
        } else {
            return Err(Error::PackUnsupported { path: shown });
        }
    }
    Ok(())
}

/// The target to store for the symlink at `path`: what it really resolves to when it
/// resolves, else its lexical reading; either must stay inside `root`, and is stored in
/// the shape `unpack` accepts.
fn link_target(path: &Path, rel: &Path, root: &Path, shown: &Path) -> Result<PathBuf, Error> {
    let raw = fs::read_link(path).map_err(|source| Error::ReadTree {
        path: shown.to_path_buf(),
        source,
    })?;
    let outside = || Error::SymlinkOutside {
        path: shown.to_path_buf(),
        target: raw.clone(),
    };
    let parent: Vec<OsString> = rel
        .parent()
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_os_string())
                .collect()
        })
        .unwrap_or_default();
    let resolved = match fs::canonicalize(path) {
        Ok(real) => {
            let inside = real.strip_prefix(root).map_err(|_| outside())?;
            inside
                .components()
                .map(|c| match c {
                    Component::Normal(n) => Ok(n.to_os_string()),
                    _ => Err(outside()),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        // Dangling: judge by what it says; an absolute target never stays inside once
        // the folder is unpacked elsewhere.
        Err(_) => resolve_lexically(&parent, &raw).ok_or_else(outside)?,
    };
    let target = relative_target(&parent, &resolved);
    check_link_target(rel, target.as_os_str().as_bytes()).map_err(|_| outside())?;
    Ok(target)
}

/// Yields exactly the size written in the header, so a file that shrinks while being
/// packed fails the pack instead of corrupting the archive.
struct ExactReader<'a> {
    inner: File,
    left: u64,
    path: &'a Path,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being packed", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

struct CountingWriter<W> {
    inner: W,
    written: u64,
    limit: u64,
    over: bool,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.over || self.written.saturating_add(buf.len() as u64) > self.limit {
            self.over = true;
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "archive over its size limit",
            ));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpack::unpack;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, data: &str) {
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).expect("mkdir");
        }
        fs::write(path, data).expect("write");
    }

    fn sample_tree(root: &Path, reverse: bool) {
        let mut files = vec![
            ("main.py", "def handler(e, c): return 1\n"),
            ("lib/util.py", "X = 1\n"),
            ("lib/deep/data.json", "{}"),
            ("z.txt", "zzz"),
        ];
        if reverse {
            files.reverse();
        }
        for (p, d) in files {
            write(&root.join(p), d);
        }
        fs::create_dir_all(root.join("empty")).expect("mkdir");
        write(&root.join("run.sh"), "#!/bin/sh\n");
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o700)).expect("chmod");
        symlink("lib/util.py", root.join("util_link.py")).expect("symlink");
        symlink("../main.py", root.join("lib/up.py")).expect("symlink");
        write(&root.join(".git/HEAD"), "ref");
        write(&root.join("lib/__pycache__/util.pyc"), "bytecode");
        write(&root.join(".DS_Store"), "x");
        write(&root.join(".nimbus/state"), "x");
        write(&root.join("guest/Cargo.toml"), "[package]");
        write(
            &root.join("guest/target/wasm32-wasip2/release/app.wasm"),
            "build output",
        );
        // A `target` folder without a Cargo.toml beside it is ordinary code.
        write(&root.join("lib/target/keep.txt"), "kept");
    }

    fn pack_to_vec(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        pack_dir(dir, &mut out).expect("pack");
        out
    }

    #[test]
    fn round_trip_keeps_content_modes_and_links() {
        let src = tempfile::tempdir().expect("tmp");
        sample_tree(src.path(), false);
        let mut archive = Vec::new();
        let stats = pack_dir(src.path(), &mut archive).expect("pack");
        // main.py, z.txt, run.sh, lib/util.py, lib/deep/data.json, guest/Cargo.toml,
        // lib/target/keep.txt + 2 symlinks
        assert_eq!(stats.files, 9);

        let dst = tempfile::tempdir().expect("tmp");
        let out = dst.path().join("x");
        let u = unpack(&archive[..], &out, &Limits::default()).expect("unpack");
        assert_eq!(u.files, stats.files);
        assert_eq!(u.bytes, stats.bytes);
        assert_eq!(u.entries, stats.entries);
        assert_eq!(
            fs::read_to_string(out.join("lib/deep/data.json")).expect("read"),
            "{}"
        );
        assert!(out.join("empty").is_dir());
        let mode = |p: &str| {
            fs::metadata(out.join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(mode("main.py"), 0o644);
        assert_eq!(mode("lib"), 0o755);
        assert_eq!(
            fs::read_link(out.join("util_link.py")).expect("link"),
            PathBuf::from("lib/util.py")
        );
        assert_eq!(
            fs::read_to_string(out.join("lib/up.py")).expect("read through link"),
            "def handler(e, c): return 1\n"
        );
        for skipped in [
            ".git",
            "lib/__pycache__",
            ".DS_Store",
            ".nimbus",
            "guest/target",
        ] {
            assert!(
                fs::symlink_metadata(out.join(skipped)).is_err(),
                "{skipped} was packed"
            );
        }
    }

    #[test]
    fn packing_is_deterministic() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        sample_tree(a.path(), false);
        sample_tree(b.path(), true);
        let first = pack_to_vec(a.path());
        assert_eq!(first, pack_to_vec(a.path()), "same tree, same bytes");
        assert_eq!(
            first,
            pack_to_vec(b.path()),
            "creation order must not matter"
        );

        let f = File::options()
            .write(true)
            .open(a.path().join("main.py"))
            .expect("open");
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .expect("touch");
        assert_eq!(first, pack_to_vec(a.path()), "mtime must not matter");

        write(&a.path().join("main.py"), "changed");
        assert_ne!(first, pack_to_vec(a.path()), "content must matter");
    }

    #[test]
    fn symlinks_leaving_the_folder_are_refused() {
        for target in ["/etc", "../outside", "sub/../../x"] {
            let src = tempfile::tempdir().expect("tmp");
            write(&src.path().join("main.py"), "");
            fs::create_dir(src.path().join("sub")).expect("mkdir");
            symlink(target, src.path().join("escape")).expect("symlink");
            match pack_dir(src.path(), io::sink()) {
                Err(Error::SymlinkOutside { path, .. }) => {
                    assert!(path.ends_with("escape"), "{path:?}");
                }
                other => panic!("{target}: expected SymlinkOutside, got {other:?}"),
            }
        }
    }

    #[test]
    fn packing_is_limited() {
        let src = tempfile::tempdir().expect("tmp");
        for i in 0..5 {
            write(&src.path().join(format!("f{i}")), "0123456789");
        }
        let few = Limits {
            max_files: 4,
            ..Limits::default()
        };
        assert!(matches!(
            pack_dir_with_limits(src.path(), io::sink(), &few),
            Err(Error::LimitExceeded { .. })
        ));
        let small = Limits {
            max_unpacked_bytes: 49,
            ..Limits::default()
        };
        assert!(matches!(
            pack_dir_with_limits(src.path(), io::sink(), &small),
            Err(Error::LimitExceeded { .. })
        ));
        let tiny_archive = Limits {
            max_archive_bytes: 20,
            ..Limits::default()
        };
        assert!(matches!(
            pack_dir_with_limits(src.path(), io::sink(), &tiny_archive),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(pack_dir(src.path(), io::sink()).is_ok());
    }

    #[test]
    fn names_the_server_refuses_are_refused_when_packing() {
        for name in ["..\\..\\x", "\u{FF0E}\u{FF0E}\u{FF0F}x", &"n".repeat(256)] {
            let src = tempfile::tempdir().expect("tmp");
            write(&src.path().join("main.py"), "ok");
            if fs::write(src.path().join(name), "x").is_err() {
                continue; // a filesystem with a shorter NAME_MAX
            }
            match pack_dir(src.path(), io::sink()) {
                Err(e @ Error::PackName { .. }) => assert!(e.is_invalid_input()),
                other => panic!("{name:?}: want PackName, got {other:?}"),
            }
        }
    }

    #[test]
    fn long_paths_round_trip() {
        let src = tempfile::tempdir().expect("tmp");
        let long = format!("{}/{}.py", "d".repeat(120), "f".repeat(120));
        write(&src.path().join(&long), "long");
        let archive = pack_to_vec(src.path());
        let dst = tempfile::tempdir().expect("tmp");
        unpack(&archive[..], &dst.path().join("x"), &Limits::default()).expect("unpack");
        assert_eq!(
            fs::read_to_string(dst.path().join("x").join(&long)).expect("read"),
            "long"
        );
    }
}
