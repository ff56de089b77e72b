//! The on-disk store: `blobs/<hex>.tar.gz` (the truth, fsynced) and `code/<hex>/` (an
//! extracted copy, recreated from the blob when missing). `tmp/` lives on the same
//! filesystem so every publish is a `rename`.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::links::safe_rel_path;
use crate::unpack::unpack;
use crate::{Error, Limits};

const DIGEST_PREFIX: &str = "sha256:";
const MANIFEST_FILE: &str = "nimbus.toml";
/// A manifest is a few hundred bytes; this only stops a hostile archive from making us
/// hold a huge string.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// What [`ArtifactStore::ingest`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingested {
    /// `sha256:<hex>` of the archive bytes.
    pub digest: String,
    /// Size of the archive in bytes.
    pub size: u64,
    /// The extracted code (`<root>/code/<hex>`).
    pub code_dir: PathBuf,
    /// Contents of `nimbus.toml` at the archive root, if there is one.
    pub manifest: Option<String>,
    pub files: u64,
    pub unpacked_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    blobs: PathBuf,
    code: PathBuf,
    tmp: PathBuf,
    reextract_limits: Limits,
}

impl ArtifactStore {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        let store = ArtifactStore {
            blobs: root.join("blobs"),
            code: root.join("code"),
            tmp: root.join("tmp"),
            root,
            reextract_limits: Limits::default(),
        };
        for dir in [&store.root, &store.blobs, &store.code, &store.tmp] {
            fs::create_dir_all(dir).map_err(Error::store("create", dir))?;
        }
        Ok(store)
    }

    /// Limits used when a code dir is re-extracted from its blob. Set them to the
    /// largest limits ever passed to [`ingest`](Self::ingest), or re-extraction of a
    /// big artifact will fail.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.reextract_limits = limits;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where callers should stream uploads: same filesystem, so ingest can `rename`.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Removes everything under `tmp/` (leftovers of a crash). Call at start-up,
    /// before any upload is in flight.
    pub fn clean_tmp(&self) -> Result<(), Error> {
        crate::unpack::clear_dir(&self.tmp).map_err(Error::store("clean", &self.tmp))
    }

    /// Validates, extracts and stores the archive at `upload`.
    ///
    /// On success the upload file has been moved into the store (it no longer exists at
    /// `upload`) and the blob is durable. On error the upload is left where it was and
    /// nothing was added to the store. Ingesting the same bytes twice is harmless: the
    /// digest is the same and the existing code dir is kept.
    pub fn ingest(&self, upload: &Path, limits: &Limits) -> Result<Ingested, Error> {
        let meta = fs::metadata(upload).map_err(Error::store("read upload", upload))?;
        if !meta.is_file() {
            return Err(Error::Store {
                op: "read upload",
                path: upload.to_path_buf(),
                source: io::Error::other("not a regular file"),
            });
        }
        if meta.len() > limits.max_archive_bytes {
            return Err(archive_limit(limits));
        }

        let file = File::open(upload).map_err(Error::store("read upload", upload))?;
        let staging = self.fresh_tmp_path("unpack");
        // Hash in the same pass as the unpack so the digest names exactly the bytes
        // extracted, even if someone rewrote the upload meanwhile.
        let mut reader = HashingReader::new(file.take(limits.max_archive_bytes + 1));
        let result = unpack(BufReader::new(&mut reader), &staging, limits).and_then(|stats| {
            io::copy(&mut reader, &mut io::sink()).map_err(Error::store("read upload", upload))?;
            Ok(stats)
        });
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let (hex, size) = reader.finish();
        if size > limits.max_archive_bytes {
            let _ = fs::remove_dir_all(&staging);
            return Err(archive_limit(limits));
        }

        let published = self.read_manifest(&staging).and_then(|manifest| {
            sync_filesystem(&staging)?;
            self.store_blob(upload, &hex)?;
            let code_dir = self.publish_code(&staging, &hex)?;
            Ok((manifest, code_dir))
        });
        let (manifest, code_dir) = match published {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        Ok(Ingested {
            digest: format!("{DIGEST_PREFIX}{hex}"),
            size,
            code_dir,
            manifest,
            files: stats.files,
            unpacked_bytes: stats.bytes,
        })
    }

    /// The extracted code of `digest`, re-extracted from the blob when missing.
    pub fn code_dir(&self, digest: &str) -> Result<PathBuf, Error> {
        let hex = parse_digest(digest)?;
        let dir = self.code.join(hex);
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Ok(dir);
        }
        let blob = self.blob_file(hex);
        let file = match File::open(&blob) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(digest.to_string()));
            }
            Err(e) => return Err(Error::store("read blob", &blob)(e)),
        };
        let staging = self.fresh_tmp_path("reextract");
        let mut reader = HashingReader::new(file);
        let result = unpack(
            BufReader::new(&mut reader),
            &staging,
            &self.reextract_limits,
        )
        .and_then(|_| {
            io::copy(&mut reader, &mut io::sink()).map_err(Error::store("read blob", &blob))
        })
        .and_then(|_| {
            let (got, _) = reader.finish();
            if got != hex {
                return Err(Error::Store {
                    op: "verify blob",
                    path: blob.clone(),
                    source: io::Error::other(format!("content hashes to sha256:{got}")),
                });
            }
            sync_filesystem(&staging)?;
            self.publish_code(&staging, hex)
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// True when the blob of `digest` is stored. False for malformed digests.
    pub fn has(&self, digest: &str) -> bool {
        parse_digest(digest).is_ok_and(|hex| self.blob_file(hex).is_file())
    }

    /// Path of the stored archive of `digest`, for serving it back.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let hex = parse_digest(digest)?;
        let blob = self.blob_file(hex);
        if blob.is_file() {
            Ok(blob)
        } else {
            Err(Error::NotFound(digest.to_string()))
        }
    }

    /// Deletes the blob and code dir of `digest`. Removing what is not there is not an
    /// error.
    pub fn remove(&self, digest: &str) -> Result<(), Error> {
        let hex = parse_digest(digest)?;
        let dir = self.code.join(hex);
        if fs::symlink_metadata(&dir).is_ok() {
            // Move aside first so nobody sees a half-deleted code dir.
            let doomed = self.fresh_tmp_path("remove");
            fs::rename(&dir, &doomed).map_err(Error::store("remove", &dir))?;
            fs::remove_dir_all(&doomed).map_err(Error::store("remove", &doomed))?;
        }
        let blob = self.blob_file(hex);
        match fs::remove_file(&blob) {
            Ok(()) => sync_dir(&self.blobs),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::store("remove", &blob)(e)),
        }
    }

    fn blob_file(&self, hex: &str) -> PathBuf {
        self.blobs.join(format!("{hex}.tar.gz"))
    }

    fn fresh_tmp_path(&self, what: &str) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        self.tmp
            .join(format!(".{what}-{}-{n}-{nanos}", std::process::id()))
    }

    fn read_manifest(&self, staging: &Path) -> Result<Option<String>, Error> {
        let path = staging.join(MANIFEST_FILE);
        // Links inside the tree were checked to stay inside, so following is safe.
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(Error::ReadManifest("it is not a regular file".into())),
            Err(_) => return Ok(None),
        }
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| Error::ReadManifest(e.to_string()))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::ReadManifest(format!(
                "larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::ReadManifest("it is not UTF-8 text".into()))
    }

    /// Moves the upload to `blobs/<hex>.tar.gz` durably (file, then directory entry).
    fn store_blob(&self, upload: &Path, hex: &str) -> Result<(), Error> {
        let blob = self.blob_file(hex);
        File::open(upload)
            .and_then(|f| f.sync_all())
            .map_err(Error::store("sync upload", upload))?;
        match fs::rename(upload, &blob) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                // The upload was not put in tmp_dir(): copy, then publish atomically.
                let part = self.fresh_tmp_path("blob");
                fs::copy(upload, &part)
                    .and_then(|_| File::open(&part)?.sync_all())
                    .and_then(|()| fs::rename(&part, &blob))
                    .map_err(|e| {
                        let _ = fs::remove_file(&part);
                        Error::store("store blob", &blob)(e)
                    })?;
                let _ = fs::remove_file(upload);
            }
            Err(e) => return Err(Error::store("store blob", &blob)(e)),
        }
        sync_dir(&self.blobs)
    }

    /// Renames a fully written staging dir to `code/<hex>`, keeping an existing one.
    fn publish_code(&self, staging: &Path, hex: &str) -> Result<PathBuf, Error> {
        let dir = self.code.join(hex);
        match fs::rename(staging, &dir) {
            Ok(()) => sync_dir(&self.code)?,
            Err(e) => {
                if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                    fs::remove_dir_all(staging).map_err(Error::store("remove", staging))?;
                } else {
                    return Err(Error::store("publish code", &dir)(e));
                }
            }
        }
        Ok(dir)
    }
}

fn archive_limit(limits: &Limits) -> Error {
    Error::LimitExceeded {
        what: "archive size in bytes",
        limit: limits.max_archive_bytes,
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(Error::store("sync", dir))
}

/// Flushes every extracted file at once (one syncfs instead of thousands of fsyncs),
/// so a code dir that survives a crash under its final name is complete.
fn sync_filesystem(dir: &Path) -> Result<(), Error> {
    let f = File::open(dir).map_err(Error::store("sync", dir))?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| Error::Store {
        op: "sync",
        path: dir.to_path_buf(),
        source: io::Error::from(e),
    })
}

/// Checks `digest` is `sha256:` + 64 lowercase hex digits and returns the hex part,
/// which is then safe to use as a file name.
pub fn parse_digest(digest: &str) -> Result<&str, Error> {
    let hex = digest
        .strip_prefix(DIGEST_PREFIX)
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| Error::InvalidDigest(digest.chars().take(80).collect()))?;
    Ok(hex)
}

/// `sha256:<hex>` of a file's bytes: the digest the store will give the archive.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let file = File::open(path).map_err(Error::store("read", path))?;
    let mut reader = HashingReader::new(file);
    io::copy(&mut reader, &mut io::sink()).map_err(Error::store("read", path))?;
    Ok(format!("{DIGEST_PREFIX}{}", reader.finish().0))
}

/// True when `rel_path` names a regular file inside `code_dir` (following symlinks only
/// as far as they stay inside). For checking that a handler file exists.
pub fn file_exists_in(code_dir: &Path, rel_path: &str) -> bool {
    let Ok(rel) = safe_rel_path(rel_path.as_bytes()) else {
        return false;
    };
    if rel.as_os_str().is_empty() {
        return false;
    }
    let (Ok(root), Ok(real)) = (
        fs::canonicalize(code_dir),
        fs::canonicalize(code_dir.join(rel)),
    ) else {
        return false;
    };
    real.starts_with(&root) && real.is_file()
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Lowercase hex digest and byte count.
    fn finish(self) -> (String, u64) {
        let sum = self.hasher.finalize();
        let mut hex = String::with_capacity(64);
        for b in sum {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        (hex, self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::pack_dir;

    fn upload_of(store: &ArtifactStore, files: &[(&str, &str)]) -> PathBuf {
        let src = tempfile::tempdir().expect("tmp");
        for (p, d) in files {
            let path = src.path().join(p);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(path, d).expect("write");
        }
        let upload = store.fresh_tmp_path("test-upload");
        let out = File::create(&upload).expect("create");
        pack_dir(src.path(), out).expect("pack");
        upload
    }

    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).expect("read_dir").count()
    }

    const FN: &[(&str, &str)] = &[
        ("nimbus.toml", "name = \"f\"\n"),
        ("main.py", "def handler(e, c): return 1\n"),
        ("pkg/__init__.py", ""),
    ];

    #[test]
    fn ingest_is_content_addressed_and_idempotent() {
        let root = tempfile::tempdir().expect("tmp");
        let store = ArtifactStore::open(root.path().join("artifacts")).expect("open");

        let upload = upload_of(&store, FN);
        let expected = sha256_file(&upload).expect("hash");
        let size = fs::metadata(&upload).expect("meta").len();
        let first = store.ingest(&upload, &Limits::default()).expect("ingest");
        assert_eq!(first.digest, expected);
        assert_eq!(first.size, size);
        assert_eq!(first.manifest.as_deref(), Some("name = \"f\"\n"));
        assert_eq!(first.files, 3);
        assert!(!upload.exists(), "upload is moved into the store");
        assert!(file_exists_in(&first.code_dir, "main.py"));
        assert!(file_exists_in(&first.code_dir, "pkg/__init__.py"));
        assert!(!file_exists_in(&first.code_dir, "missing.py"));
        assert!(!file_exists_in(&first.code_dir, "../main.py"));
        assert!(!file_exists_in(&first.code_dir, "pkg"));
        assert!(store.has(&first.digest));

        let again = upload_of(&store, FN);
        let second = store
            .ingest(&again, &Limits::default())
            .expect("ingest again");
        assert_eq!(second.digest, first.digest);
        assert_eq!(second.code_dir, first.code_dir);
        assert_eq!(count(&root.path().join("artifacts/code")), 1);
        assert_eq!(count(&root.path().join("artifacts/blobs")), 1);
        assert_eq!(count(store.tmp_dir()), 0, "no staging left behind");
    }

    #[test]
    fn code_dir_is_recreated_from_the_blob() {
        let root = tempfile::tempdir().expect("tmp");
        let store = ArtifactStore::open(root.path()).expect("open");
        let ing = store
            .ingest(&upload_of(&store, FN), &Limits::default())
            .expect("ingest");
        fs::remove_dir_all(&ing.code_dir).expect("delete code dir");
        let dir = store.code_dir(&ing.digest).expect("re-extract");
        assert_eq!(dir, ing.code_dir);
        assert!(file_exists_in(&dir, "main.py"));

        // A corrupted blob is noticed instead of served.
        fs::remove_dir_all(&dir).expect("delete code dir");
        let blob = store.blob_path(&ing.digest).expect("blob");
        let other = upload_of(&store, &[("x", "y")]);
        fs::rename(&other, &blob).expect("swap blob");
        assert!(store.code_dir(&ing.digest).is_err());

        store.remove(&ing.digest).expect("remove");
        assert!(!store.has(&ing.digest));
        assert!(matches!(
            store.code_dir(&ing.digest),
            Err(Error::NotFound(_))
        ));
        store.remove(&ing.digest).expect("removing twice is fine");
    }

    #[test]
    fn digests_are_validated_before_touching_paths() {
        let root = tempfile::tempdir().expect("tmp");
        let store = ArtifactStore::open(root.path()).expect("open");
        let hex = "a".repeat(64);
        assert_eq!(
            parse_digest(&format!("sha256:{hex}")).ok(),
            Some(hex.as_str())
        );
        for bad in [
            "sha256:../../../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{hex}"),
            hex.clone(),
            format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(
                matches!(parse_digest(&bad), Err(Error::InvalidDigest(_))),
                "{bad}"
            );
            assert!(matches!(store.code_dir(&bad), Err(Error::InvalidDigest(_))));
            assert!(matches!(store.remove(&bad), Err(Error::InvalidDigest(_))));
            assert!(!store.has(&bad));
        }
    }

    #[test]
    fn rejected_uploads_leave_nothing() {
        let root = tempfile::tempdir().expect("tmp");
        let store = ArtifactStore::open(root.path()).expect("open");

        let upload = upload_of(&store, FN);
        let small = Limits {
            max_archive_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            store.ingest(&upload, &small),
            Err(Error::LimitExceeded { .. })
        ));
        let few = Limits {
            max_files: 2,
            ..Limits::default()
        };
        let err = store.ingest(&upload, &few).expect_err("too many files");
        assert!(err.is_invalid_input(), "{err}");
        assert!(upload.exists(), "a rejected upload stays with the caller");

        let garbage = store.fresh_tmp_path("garbage");
        fs::write(&garbage, b"\x1f\x8bnot really").expect("write");
        let err = store
            .ingest(&garbage, &Limits::default())
            .expect_err("garbage");
        assert!(err.is_invalid_input(), "{err}");

        assert_eq!(count(&root.path().join("code")), 0);
        assert_eq!(count(&root.path().join("blobs")), 0);
        // Only the two uploads remain in tmp: no staging dirs.
        assert_eq!(count(store.tmp_dir()), 2);
        store.clean_tmp().expect("clean");
        assert_eq!(count(store.tmp_dir()), 0);
    }
}
