//! nimbus-artifacts: content-addressed code archives.
//!
//! Owns: the archive format of a function's code (a deterministic gzip'd tar, see
//! [`pack_dir`]), its hostile-input-safe extraction ([`unpack`]), and the on-disk
//! [`ArtifactStore`] that keeps each archive as a blob named by its sha256 next to an
//! extracted copy the worker mounts read-only.
//!
//! Must not touch: the database, the network or anything about functions beyond the
//! optional `nimbus.toml` it hands back. Archives come from users and are hostile: every
//! path, link and size in them is checked before anything is written, and nothing is
//! ever written through a symlink.
//!
//! Durability: [`ArtifactStore::ingest`] returns only after the blob and its directory
//! entry are fsynced; extracted code dirs are a cache of the blobs and are recreated
//! from them when missing.
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

mod links;
mod pack;
mod store;
mod unpack;

pub use pack::{PackStats, SKIPPED_NAMES, pack_dir, pack_dir_with_limits};
pub use store::{ArtifactStore, Ingested, file_exists_in, parse_digest, sha256_file};
pub use unpack::{UnpackStats, unpack};

/// Size limits applied when packing, ingesting and unpacking. Always on: the defaults
/// are Lambda's order of magnitude, never unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of the sizes of all regular files once extracted.
    pub max_unpacked_bytes: u64,
    /// Number of entries (files, directories and links) in the archive.
    pub max_files: u64,
    /// Size of the compressed archive itself.
    pub max_archive_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 250 * 1024 * 1024,
            max_files: 10_000,
            max_archive_bytes: 100 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the folder being packed failed.
    #[error("read {}: {source}", path.display())]
    ReadTree { path: PathBuf, source: io::Error },
    /// A symlink in the folder being packed leaves the folder.
    #[error("symlink {} points outside the folder (to {})", path.display(), target.display())]
    SymlinkOutside { path: PathBuf, target: PathBuf },
    /// The folder holds something that is not a file, directory or symlink.
    #[error("{}: only files, directories and symlinks can be packed", path.display())]
    PackUnsupported { path: PathBuf },
    /// A name in the folder being packed is one the server refuses (see [`unpack`]).
    #[error("{}: {reason}", path.display())]
    PackName { path: PathBuf, reason: String },
    /// Writing the archive failed.
    #[error("write archive: {0}")]
    WriteArchive(io::Error),
    /// The archive is corrupt or truncated.
    #[error("read archive: {0}")]
    ReadArchive(io::Error),
    /// An archive entry is hostile or malformed (path escape, special file, duplicate...).
    #[error("unsafe archive entry `{entry}`: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    /// A size or count limit was exceeded.
    #[error("{what} exceeds the limit of {limit}")]
    LimitExceeded { what: &'static str, limit: u64 },
    /// Writing extracted files failed.
    #[error("extract {}: {source}", path.display())]
    Extract { path: PathBuf, source: io::Error },
    /// The destination of an unpack is not an empty directory.
    #[error("unpack into {}: destination is not an empty directory", path.display())]
    DestinationNotEmpty { path: PathBuf },
    /// A digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest `{0}`: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    /// No blob is stored under this digest.
    #[error("artifact {0} not found")]
    NotFound(String),
    /// `nimbus.toml` at the archive root could not be read as UTF-8 text.
    #[error("read nimbus.toml from the archive: {0}")]
    ReadManifest(String),
    /// A filesystem operation of the store failed.
    #[error("{op} {}: {source}", path.display())]
    Store {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl Error {
    /// True when a write failed because the disk (or a quota) is full: ENOSPC, EDQUOT.
    /// Checked before [`Error::is_invalid_input`]: a full disk can surface while an
    /// archive is being read and extracted.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::ReadTree { source, .. }
            | Error::Extract { source, .. }
            | Error::Store { source, .. }
            | Error::WriteArchive(source)
            | Error::ReadArchive(source) => matches!(
                source.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }

    /// True when the caller's input is at fault (a 4xx for the control API); false for
    /// failures of this machine (a 5xx).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::ReadArchive(_)
                | Error::UnsafeEntry { .. }
                | Error::LimitExceeded { .. }
                | Error::InvalidDigest(_)
                | Error::ReadManifest(_)
                | Error::SymlinkOutside { .. }
                | Error::PackUnsupported { .. }
                | Error::PackName { .. }
        )
    }

    pub(crate) fn store(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Store { op, path, source }
    }
}

#[cfg(test)]
mod storage_full_tests {
    use super::*;

    #[test]
    fn a_full_disk_is_not_the_callers_fault() {
        let full = Error::Extract {
            path: PathBuf::from("x"),
            source: io::Error::from_raw_os_error(28),
        };
        assert!(full.is_storage_full());
        let read = Error::ReadArchive(io::Error::from_raw_os_error(122));
        assert!(read.is_storage_full(), "EDQUOT while extracting");
        let bad = Error::ReadArchive(io::Error::new(io::ErrorKind::InvalidData, "truncated"));
        assert!(!bad.is_storage_full() && bad.is_invalid_input());
    }
}
