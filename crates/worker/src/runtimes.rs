//! The runtime shims, compiled into the binary and written out at start-up, so a single
//! binary is the whole install.

use std::path::{Path, PathBuf};

const PYTHON_BOOTSTRAP: &str = include_str!("../../../runtimes/python/bootstrap.py");
const NODE_BOOTSTRAP: &str = include_str!("../../../runtimes/node/bootstrap.mjs");

#[derive(Debug, Clone)]
pub struct RuntimeFiles {
    pub dir: PathBuf,
    pub python: PathBuf,
    pub node: PathBuf,
}

impl RuntimeFiles {
    pub fn install(dir: &Path) -> std::io::Result<RuntimeFiles> {
        std::fs::create_dir_all(dir)?;
        let python = dir.join("bootstrap.py");
        let node = dir.join("bootstrap.mjs");
        write_if_changed(&python, PYTHON_BOOTSTRAP)?;
        write_if_changed(&node, NODE_BOOTSTRAP)?;
        Ok(RuntimeFiles {
            dir: dir.to_path_buf(),
            python,
            node,
        })
    }
}

fn write_if_changed(path: &Path, content: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    // Write then rename: a running instance never sees a half-written shim.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}
