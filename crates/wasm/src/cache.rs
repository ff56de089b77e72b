//! Compiled components on disk, named by what they were compiled from.
//!
//! A file is `<sha256 of the component>-<engine tag>.cwasm`: the same bytes deployed
//! twice (or by two functions) compile once, and a wasmtime upgrade or a changed engine
//! setting (a different tag) compiles afresh instead of loading code it cannot run.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::{Error, file_name};

pub(crate) struct Cache {
    dir: PathBuf,
    engine_tag: String,
}

impl Cache {
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Cache, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Cache {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut h = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let tag = h.0.finalize();
        Ok(Cache {
            dir: dir.to_path_buf(),
            engine_tag: hex(&tag[..8]),
        })
    }

    /// The compiled form of `wasm`, compiled now if the cache lacks it.
    pub(crate) fn compile(
        &self,
        engine: &Engine,
        wasm: &Path,
        compiler: Option<&Path>,
    ) -> Result<(PathBuf, Component), Error> {
        let name = file_name(wasm);
        let bytes = std::fs::read(wasm)
            .map_err(|e| Error::Invalid(format!("cannot read `{name}`: {e}")))?;
        let path = self.dir.join(format!(
            "{}-{}.cwasm",
            hex(&Sha256::digest(&bytes)),
            self.engine_tag
        ));
        if let Ok(c) = self.load(engine, &path) {
            return Ok((path, c));
        }
        check_header(&name, &bytes)?;
        // Written aside and renamed, so a crash or a concurrent deploy never leaves a
        // half-written file under the final name.
        let tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(|source| Error::Cache {
            path: self.dir.clone(),
            source,
        })?;
        match compiler {
            Some(program) => compile_in_child(program, wasm, tmp.path(), &name)?,
            None => {
                let compiled = precompile(engine, &name, &bytes)?;
                std::fs::write(tmp.path(), &compiled).map_err(|source| Error::Cache {
                    path: tmp.path().to_path_buf(),
                    source,
                })?;
            }
        }
        // On disk before it gets its final name: after a crash the cache holds whole
        // files or none, which is what loading machine code from it relies on.
        std::fs::File::open(tmp.path())
            .and_then(|f| f.sync_all())
            .map_err(|source| Error::Cache {
                path: tmp.path().to_path_buf(),
                source,
            })?;
        tmp.persist(&path)
            .map(drop)
            .map_err(|e| e.error)
            .map_err(|source| Error::Cache {
                path: path.clone(),
                source,
            })?;
        // Loading checks the file against this engine: a child built with other settings
        // would be refused here.
        let component = self.load(engine, &path).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            Error::Engine(format!(
                "load the component just compiled: {}",
                crate::root_cause(&e)
            ))
        })?;
        Ok((path, component))
    }

    pub(crate) fn load(&self, engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
        // SAFETY: `deserialize_file` runs the machine code in the file, so the file must
        // come from `Engine::precompile_component` of a compatible engine. Every file in
        // this directory is written only by `compile` above (under a temporary name,
        // fsynced, then renamed), from this engine's own output or its child's, and the engine tag in the name keeps a
        // different wasmtime or configuration from picking it up; wasmtime checks the
        // header and the engine settings again on load. The directory lives under the
        // operator's data dir: whoever can write there already controls the platform.
        unsafe { Component::deserialize_file(engine, path) }
    }
}

/// Compiles a component file: what the child process of [`crate::compile_main`] runs.
pub(crate) fn compile_bytes(engine: &Engine, wasm: &Path) -> Result<Vec<u8>, Error> {
    let name = file_name(wasm);
    let bytes =
        std::fs::read(wasm).map_err(|e| Error::Invalid(format!("cannot read `{name}`: {e}")))?;
    check_header(&name, &bytes)?;
    precompile(engine, &name, &bytes)
}

fn precompile(engine: &Engine, name: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    engine.precompile_component(bytes).map_err(|e| {
        Error::Invalid(format!(
            "`{name}` is not a valid WebAssembly component: {}",
            crate::root_cause(&e)
        ))
    })
}

fn compile_in_child(program: &Path, wasm: &Path, out: &Path, name: &str) -> Result<(), Error> {
    let mut child = std::process::Command::new(program)
        .arg(crate::COMPILE_ARG)
        .arg(wasm)
        .arg(out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Engine(format!("start the compiler {}: {e}", program.display())))?;
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > crate::COMPILE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Invalid(format!(
                    "`{name}` took longer than {} s to compile",
                    crate::COMPILE_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(e) => return Err(Error::Engine(format!("wait for the compiler: {e}"))),
        }
    };
    let mut stderr = String::new();
    if let Some(mut s) = child.stderr.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut stderr);
    }
    let reason = stderr.lines().next().unwrap_or("").trim().to_string();
    match status.code() {
        Some(0) => Ok(()),
        Some(2) => Err(Error::Invalid(reason)),
        _ => Err(Error::Invalid(format!(
            "`{name}` could not be compiled ({status}{})",
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        ))),
    }
}

/// Errors users hit most (a text file, a core module) get a message that says what to do.
fn check_header(name: &str, bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(Error::Invalid(format!(
            "`{name}` is not WebAssembly (it does not start with the `\\0asm` header)"
        )));
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(Error::Invalid(format!(
            "`{name}` is a core WebAssembly module, not a component: build it for \
             wasm32-wasip2 (or wrap it with `wasm-tools component new`) so it exports \
             wasi:http/incoming-handler"
        )));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Feeds `Hash` output into SHA-256, so the engine tag is stable across processes
/// (std's `DefaultHasher` is seeded per build and not promised stable).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_the_mistake() {
        let e = check_header("a.wasm", b"this is text").expect_err("text");
        assert!(e.to_string().contains("not WebAssembly"), "{e}");
        let e = check_header("a.wasm", b"\0asm\x01\0\0\0").expect_err("module");
        assert!(e.to_string().contains("core WebAssembly module"), "{e}");
        assert!(check_header("a.wasm", b"\0asm\x0d\0\x01\0").is_ok());
    }
}
