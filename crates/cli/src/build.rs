//! The client-side build before upload, Lambda-zip style: validate the folder, copy it
//! to a staging dir, install its dependencies there (pip `--target` / npm), pack it.
//!
//! The server never runs a package manager: what is uploaded is what runs. Installed
//! dependency trees are cached under `<cache_dir>/deps/<key>/`, keyed by the runtime
//! and the dependency files, so redeploying unchanged dependencies installs nothing and
//! packs to the same archive (hence the same digest).

use crate::client::human_bytes;
use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use nimbus_artifacts::SKIPPED_NAMES;
use nimbus_core::manifest::{MANIFEST_FILE, parse_manifest};
use nimbus_core::{FunctionConfig, Runtime};
use sha2::{Digest, Sha256};
use walkdir::WalkDir;

const REQUIREMENTS: &str = "requirements.txt";
const PACKAGE_JSON: &str = "package.json";
const PACKAGE_LOCK: &str = "package-lock.json";
const NODE_MODULES: &str = "node_modules";
/// Lines of a failed tool's stderr shown in the error.
const STDERR_TAIL_LINES: usize = 25;

pub struct BuildOptions {
    /// Upload the folder as it is: no pip, no npm.
    pub no_build: bool,
    /// Where installed dependency trees are kept between deploys.
    pub cache_dir: PathBuf,
}

/// What happened to the function's dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DepsOutcome {
    /// No dependency file, or `--no-build`.
    None,
    /// The package manager ran for this file.
    Installed { file: &'static str },
    /// The file was unchanged since a previous install; the cached tree was used.
    Cached { file: &'static str },
}

impl fmt::Display for DepsOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DepsOutcome::None => f.write_str("no dependencies installed"),
            DepsOutcome::Installed { file } => write!(f, "dependencies installed from {file}"),
            DepsOutcome::Cached { file } => write!(f, "dependencies from {file} (cached)"),
        }
    }
}

/// A folder ready to upload.
pub struct Prepared {
    pub config: FunctionConfig,
    /// The packed code, positioned at its start.
    pub archive: tempfile::NamedTempFile,
    pub archive_bytes: u64,
    pub files: u64,
    pub unpacked_bytes: u64,
    pub deps: DepsOutcome,
}

impl Prepared {
    /// One line for the user: `py-deps: 7 files, 1.2 KiB (packed 1.0 KiB); dependencies ...`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} files, {} (packed {}); {}",
            self.config.name,
            self.files,
            human_bytes(self.unpacked_bytes),
            human_bytes(self.archive_bytes),
            self.deps
        )
    }
}

/// Validates `dir`, installs its dependencies (unless `no_build`) and packs it.
pub fn prepare(dir: &Path, opts: &BuildOptions) -> anyhow::Result<Prepared> {
    let config = read_config(dir)?;
    check_handler(dir, &config)?;

    let plan = if opts.no_build {
        None
    } else {
        DepsPlan::detect(dir, config.runtime)
    };
    let staging = tempfile::Builder::new()
        .prefix("nimbus-build-")
        .tempdir()
        .context("create a build staging dir")?;
    // A stale node_modules from the user's machine would be shipped instead of the
    // clean install; skip it when we install.
    let skip_node_modules = matches!(plan, Some(DepsPlan::Npm));
    copy_tree(dir, staging.path(), skip_node_modules, &opts.cache_dir)
        .with_context(|| format!("copy {} to a staging dir", dir.display()))?;

    let deps = match plan {
        None => DepsOutcome::None,
        Some(plan) => install_deps(plan, dir, staging.path(), &opts.cache_dir)?,
    };

    let mut archive = tempfile::Builder::new()
        .prefix("nimbus-archive-")
        .suffix(".tar.gz")
        .tempfile()
        .context("create a temp file for the archive")?;
    let stats = {
        let mut out = BufWriter::new(archive.as_file_mut());
        let stats = nimbus_artifacts::pack_dir(staging.path(), &mut out)
            .with_context(|| format!("pack {}", dir.display()))?;
        out.flush().context("write the archive")?;
        stats
    };
    let file = archive.as_file_mut();
    let archive_bytes = file.metadata().context("size the archive")?.len();
    file.rewind().context("rewind the archive")?;

    Ok(Prepared {
        config,
        archive,
        archive_bytes,
        files: stats.files,
        unpacked_bytes: stats.bytes,
        deps,
    })
}

fn read_config(dir: &Path) -> anyhow::Result<FunctionConfig> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "{} not found: a function folder needs a {MANIFEST_FILE} (see `nimbus init`)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    Ok(parse_manifest(&path.display().to_string(), &text)?)
}

fn check_handler(dir: &Path, config: &FunctionConfig) -> anyhow::Result<()> {
    let candidates = config.handler_candidates();
    if candidates.iter().any(|c| dir.join(c).is_file()) {
        return Ok(());
    }
    bail!(
        "handler `{}` not found: expected {} in {}",
        config.handler,
        candidates.first().map_or("", String::as_str),
        dir.display()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DepsPlan {
    Pip,
    Npm,
}

impl DepsPlan {
    fn detect(dir: &Path, runtime: Runtime) -> Option<DepsPlan> {
        match runtime {
            Runtime::Python3 if dir.join(REQUIREMENTS).is_file() => Some(DepsPlan::Pip),
            Runtime::Node if dir.join(PACKAGE_JSON).is_file() => Some(DepsPlan::Npm),
            _ => None,
        }
    }

    fn file(self) -> &'static str {
        match self {
            DepsPlan::Pip => REQUIREMENTS,
            DepsPlan::Npm => PACKAGE_JSON,
        }
    }
}

fn install_deps(
    plan: DepsPlan,
    dir: &Path,
    staging: &Path,
    cache_dir: &Path,
) -> anyhow::Result<DepsOutcome> {
    let file = plan.file();
    let (runtime_tag, inputs) = match plan {
        DepsPlan::Pip => {
            let py = python()?;
            (format!("python3:{}", py.version), pip_inputs(dir)?)
        }
        DepsPlan::Npm => (format!("node:{}", node_version()), npm_inputs(dir)?),
    };
    let key = cache_key(&runtime_tag, &inputs);
    let deps_root = cache_dir.join("deps");
    let cached = deps_root.join(&key);

    if cached.is_dir() {
        merge_tree(&cached, staging)
            .with_context(|| format!("copy cached dependencies from {}", cached.display()))?;
        return Ok(DepsOutcome::Cached { file });
    }

    fs::create_dir_all(&deps_root)
        .with_context(|| format!("create the cache dir {}", deps_root.display()))?;
    // Installed under a temp name, then renamed: a present key is a complete tree even
    // if a previous build was interrupted.
    let fresh = tempfile::Builder::new()
        .prefix(".install-")
        .tempdir_in(&deps_root)
        .with_context(|| format!("create a temp dir in {}", deps_root.display()))?;
    match plan {
        DepsPlan::Pip => {
            pip_install(dir, fresh.path())?;
            merge_tree(fresh.path(), staging).context("copy installed dependencies")?;
        }
        DepsPlan::Npm => {
            npm_install(dir, staging)?;
            let modules = staging.join(NODE_MODULES);
            if modules.is_dir() {
                copy_tree(&modules, &fresh.path().join(NODE_MODULES), false, cache_dir)
                    .context("copy node_modules into the cache")?;
            }
        }
    }
    let fresh = fresh.keep();
    if fs::rename(&fresh, &cached).is_err() {
        // Another build filled the key first; its tree is as good as ours.
        let _ = fs::remove_dir_all(&fresh);
    }
    Ok(DepsOutcome::Installed { file })
}

/// Cache key of an installed dependency tree: the runtime (with its version, since
/// native wheels and addons depend on it) and the exact bytes of every input file.
fn cache_key(runtime_tag: &str, inputs: &[(String, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    h.update(b"nimbus-deps-v1\0");
    h.update(runtime_tag.as_bytes());
    h.update(b"\0");
    let mut sorted: Vec<&(String, Vec<u8>)> = inputs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, data) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_input(dir: &Path, name: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let path = dir.join(name);
    let data = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    Ok((name.to_string(), data))
}

/// requirements.txt plus the local files it names (a wheel by relative path changes
/// without the requirements file changing).
fn pip_inputs(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let req = read_input(dir, REQUIREMENTS)?;
    let text = String::from_utf8_lossy(&req.1).into_owned();
    let mut inputs = vec![req];
    for line in text.lines() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('-') {
            continue;
        }
        let token = line.split_whitespace().next().unwrap_or("");
        let token = token.strip_prefix("file:").unwrap_or(token);
        if dir.join(token).is_file() {
            inputs.push(read_input(dir, token)?);
        }
    }
    Ok(inputs)
}

/// package.json, the lock file if any, and the local tarballs `file:` dependencies name.
fn npm_inputs(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let pkg = read_input(dir, PACKAGE_JSON)?;
    let json: serde_json::Value = serde_json::from_slice(&pkg.1)
        .with_context(|| format!("parse {}", dir.join(PACKAGE_JSON).display()))?;
    let mut inputs = vec![pkg];
    if dir.join(PACKAGE_LOCK).is_file() {
        inputs.push(read_input(dir, PACKAGE_LOCK)?);
    }
    for section in ["dependencies", "optionalDependencies"] {
        let Some(deps) = json.get(section).and_then(|d| d.as_object()) else {
            continue;
        };
        for spec in deps.values().filter_map(|v| v.as_str()) {
            if let Some(local) = spec.strip_prefix("file:")
                && dir.join(local).is_file()
            {
                inputs.push(read_input(dir, local)?);
            }
        }
    }
    Ok(inputs)
}

struct Python {
    exe: PathBuf,
    version: String,
}

/// The real interpreter (not a pyenv or asdf shim), resolved once per process:
/// `NIMBUS_PYTHON` if set, else whatever `python3` on PATH says it is.
fn python() -> anyhow::Result<&'static Python> {
    static PYTHON: OnceLock<Result<Python, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let cmd = std::env::var_os("NIMBUS_PYTHON").unwrap_or_else(|| "python3".into());
            let out = Command::new(&cmd)
                .args([
                    "-c",
                    "import sys; print(sys.executable); print('%d.%d' % sys.version_info[:2])",
                ])
                .output()
                .map_err(|e| {
                    format!(
                        "run {}: {e}; install Python 3 or set NIMBUS_PYTHON (or deploy with --no-build)",
                        cmd.to_string_lossy()
                    )
                })?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            match (out.status.success(), lines.next(), lines.next()) {
                (true, Some(exe), Some(version)) if !exe.trim().is_empty() => Ok(Python {
                    exe: PathBuf::from(exe.trim()),
                    version: version.trim().to_string(),
                }),
                _ => Err(format!(
                    "{} did not report its interpreter: {}",
                    cmd.to_string_lossy(),
                    tail(&out.stderr)
                )),
            }
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `node --version`, or "unknown": it only refines the cache key.
fn node_version() -> String {
    Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn pip_install(dir: &Path, target: &Path) -> anyhow::Result<()> {
    let py = python()?;
    let mut cmd = Command::new(&py.exe);
    cmd.args(["-m", "pip", "install", "--target"])
        .arg(target)
        .args([
            "-r",
            REQUIREMENTS,
            "--disable-pip-version-check",
            "--no-input",
            // __pycache__ is never packed; compiling it is wasted time.
            "--no-compile",
        ])
        // Relative paths in requirements.txt (local wheels) are relative to the folder.
        .current_dir(dir)
        // --user and --target cannot be combined.
        .env_remove("PIP_USER")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_tool(cmd, "pip install", REQUIREMENTS, dir)
}

fn npm_install(dir: &Path, staging: &Path) -> anyhow::Result<()> {
    let had_lock = staging.join(PACKAGE_LOCK).is_file();
    let mut cmd = Command::new("npm");
    if had_lock {
        cmd.arg("ci");
    } else {
        cmd.arg("install");
    }
    cmd.args(["--omit=dev", "--no-audit", "--no-fund"])
        .current_dir(staging);
    let verb = if had_lock { "npm ci" } else { "npm install" };
    run_tool(cmd, verb, PACKAGE_JSON, dir)?;
    if !had_lock {
        // npm writes a lock the user does not have; leaving it in would make a cached
        // build (which runs no npm) pack to a different digest.
        let _ = fs::remove_file(staging.join(PACKAGE_LOCK));
    }
    Ok(())
}

fn run_tool(mut cmd: Command, what: &str, file: &str, dir: &Path) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "{what} for {}: `{program}` not found; install it, or deploy with --no-build \
             and ship the dependencies in the folder",
            dir.join(file).display()
        ),
        Err(e) => return Err(e).with_context(|| format!("run {what}")),
    };
    if !out.status.success() {
        let stderr = if out.stderr.is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        bail!(
            "{what} failed for {} ({}):\n{}",
            dir.join(file).display(),
            out.status,
            tail(stderr)
        );
    }
    Ok(())
}

fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// Copies `src` to `dst` (created) without following symlinks, skipping what packing
/// skips, the cache dir if it lives inside `src`, and a top-level node_modules if asked.
fn copy_tree(src: &Path, dst: &Path, skip_node_modules: bool, cache_dir: &Path) -> io::Result<()> {
    let cache = fs::canonicalize(cache_dir).ok();
    let walk = WalkDir::new(src)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().as_encoded_bytes();
            let skipped = e.depth() > 0 && SKIPPED_NAMES.iter().any(|s| name == s.as_bytes());
            let modules = skip_node_modules && e.depth() == 1 && name == NODE_MODULES.as_bytes();
            let is_cache = cache.as_ref().is_some_and(|c| {
                e.file_type().is_dir() && fs::canonicalize(e.path()).ok().as_ref() == Some(c)
            });
            !(skipped || modules || is_cache)
        });
    for entry in walk {
        let entry = entry.map_err(io::Error::from)?;
        let rel = entry
            .path()
            .strip_prefix(src)
            .map_err(|_| io::Error::other("walked outside the folder"))?;
        let to = dst.join(rel);
        let ft = entry.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to)?;
        } else if ft.is_file() {
            fs::copy(entry.path(), &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &to)?;
        } else {
            return Err(io::Error::other(format!(
                "{}: only files, directories and symlinks can be deployed",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

/// Copies the installed tree `src` into `dst`; the user's own files win, as they do
/// with `pip install --target` into a folder that already has them.
fn merge_tree(src: &Path, dst: &Path) -> io::Result<()> {
    for entry in WalkDir::new(src).follow_links(false).min_depth(1) {
        let entry = entry.map_err(io::Error::from)?;
        let rel = entry
            .path()
            .strip_prefix(src)
            .map_err(|_| io::Error::other("walked outside the cache entry"))?;
        let to = dst.join(rel);
        let ft = entry.file_type();
        if ft.is_dir() {
            match fs::symlink_metadata(&to) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {}
                Err(_) => fs::create_dir(&to)?,
            }
        } else if fs::symlink_metadata(&to).is_ok() || !is_real_dir(to.parent()) {
            // The user's own file, or their file or symlink where the installed tree has
            // a directory: theirs wins, and nothing is written through a symlink.
            continue;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &to)?;
        } else {
            fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

fn is_real_dir(path: Option<&Path>) -> bool {
    path.and_then(|p| fs::symlink_metadata(p).ok())
        .is_some_and(|m| m.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn opts(cache: &Path) -> BuildOptions {
        BuildOptions {
            no_build: false,
            cache_dir: cache.to_path_buf(),
        }
    }

    fn err_of(dir: &Path) -> String {
        let cache = tempfile::tempdir().expect("tmp");
        match prepare(dir, &opts(cache.path())) {
            Ok(_) => panic!("{} was accepted", dir.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Unpacks an archive to check what it holds.
    fn unpacked(p: &Prepared) -> tempfile::TempDir {
        let out = tempfile::tempdir().expect("tmp");
        let file = p.archive.reopen().expect("reopen");
        nimbus_artifacts::unpack(file, &out.path().join("c"), &Default::default()).expect("unpack");
        out
    }

    #[test]
    fn missing_manifest_names_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join("main.py"), "").expect("write");
        let e = err_of(dir.path());
        let want = dir.path().join("nimbus.toml").display().to_string();
        assert!(e.contains(&want), "{e}");
        assert!(e.contains("not found"), "{e}");
    }

    #[test]
    fn missing_handler_says_which_file() {
        let dir = fixtures().join("bad/missing-handler");
        let e = err_of(&dir);
        assert_eq!(
            e,
            format!(
                "handler `main.handler` not found: expected main.py in {}",
                dir.display()
            )
        );
    }

    #[test]
    fn bad_manifests_name_file_and_field() {
        for (case, field) in [
            ("bad-runtime", "runtime"),
            ("bad-memory", "memory_mb"),
            ("bad-timeout", "timeout"),
            ("bad-route", "http[0].path"),
            ("dup-route", "http[1].path"),
        ] {
            let dir = fixtures().join("bad").join(case);
            let e = err_of(&dir);
            let file = dir.join("nimbus.toml").display().to_string();
            assert!(e.starts_with(&file), "{case}: {e}");
            assert!(e.contains(&format!("field `{field}`")), "{case}: {e}");
        }
    }

    #[test]
    fn cache_key_is_stable_and_sensitive() {
        let req = |s: &str| vec![("requirements.txt".to_string(), s.as_bytes().to_vec())];
        let k = cache_key("python3:3.11", &req("requests==2.31\n"));
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        // Pinned: a change of the key scheme silently invalidates every user's cache,
        // so it should be a deliberate one.
        assert_eq!(
            k,
            "8fa1d1b92c626b67efe4ce150b5408e9a3242236be8f824131e662a9b7383f3f"
        );
        assert_eq!(k, cache_key("python3:3.11", &req("requests==2.31\n")));
        assert_ne!(k, cache_key("python3:3.12", &req("requests==2.31\n")));
        assert_ne!(k, cache_key("python3:3.11", &req("requests==2.32\n")));
        let two = |a: (&str, &str), b: (&str, &str)| {
            vec![
                (a.0.to_string(), a.1.as_bytes().to_vec()),
                (b.0.to_string(), b.1.as_bytes().to_vec()),
            ]
        };
        assert_eq!(
            cache_key(
                "node:v20",
                &two(("package.json", "{}"), ("package-lock.json", "x"))
            ),
            cache_key(
                "node:v20",
                &two(("package-lock.json", "x"), ("package.json", "{}"))
            ),
            "input order must not matter"
        );
        // Bytes may not slide between name and content.
        assert_ne!(
            cache_key("node:v20", &two(("a", "bc"), ("d", ""))),
            cache_key("node:v20", &two(("a", "b"), ("cd", ""))),
        );
    }

    #[test]
    fn pip_inputs_include_local_wheels() {
        let inputs = pip_inputs(&fixtures().join("py-deps")).expect("inputs");
        let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "requirements.txt",
                "./wheels/nimbusdemo-1.0.0-py3-none-any.whl"
            ]
        );
    }

    #[test]
    fn no_build_ships_the_folder_as_is() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(
            dir.path().join("nimbus.toml"),
            "name = \"n\"\nruntime = \"node\"\nhandler = \"index.handler\"\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("index.js"),
            "exports.handler = async () => 1;\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("package.json"),
            "{\"dependencies\": {\"x\": \"1\"}}",
        )
        .expect("write");
        fs::create_dir_all(dir.path().join("node_modules/x")).expect("mkdir");
        fs::write(dir.path().join("node_modules/x/index.js"), "").expect("write");
        fs::create_dir_all(dir.path().join(".git")).expect("mkdir");
        fs::write(dir.path().join(".git/HEAD"), "").expect("write");

        let cache = tempfile::tempdir().expect("tmp");
        let p = prepare(
            dir.path(),
            &BuildOptions {
                no_build: true,
                cache_dir: cache.path().to_path_buf(),
            },
        )
        .expect("prepare");
        assert_eq!(p.deps, DepsOutcome::None);
        assert_eq!(p.config.name, "n");
        assert_eq!(p.files, 4);
        assert!(p.archive_bytes > 0);
        let out = unpacked(&p);
        assert!(out.path().join("c/node_modules/x/index.js").is_file());
        assert!(!out.path().join("c/.git").exists());
    }

    fn have(tool: &str, arg: &str) -> bool {
        Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn python_fixture_installs_then_hits_the_cache() {
        if !have("python3", "--version") {
            eprintln!("skipped: no python3");
            return;
        }
        let dir = fixtures().join("py-deps");
        let cache = tempfile::tempdir().expect("tmp");
        let first = prepare(&dir, &opts(cache.path())).expect("prepare");
        assert_eq!(
            first.deps,
            DepsOutcome::Installed {
                file: "requirements.txt"
            }
        );
        assert_eq!(first.config.name, "py-deps");
        let out = unpacked(&first);
        let init = fs::read_to_string(out.path().join("c/nimbusdemo/__init__.py"))
            .expect("the wheel was installed into the archive");
        assert!(init.contains("def shout"));
        assert!(out.path().join("c/main.py").is_file());
        assert!(!out.path().join("c/nimbusdemo/__pycache__").exists());

        let second = prepare(&dir, &opts(cache.path())).expect("prepare again");
        assert_eq!(
            second.deps,
            DepsOutcome::Cached {
                file: "requirements.txt"
            }
        );
        let digest = |p: &Prepared| nimbus_artifacts::sha256_file(p.archive.path()).expect("hash");
        assert_eq!(
            digest(&first),
            digest(&second),
            "a cached build packs the same bytes"
        );
    }

    #[test]
    fn node_fixture_installs_then_hits_the_cache() {
        if !have("npm", "--version") {
            eprintln!("skipped: no npm");
            return;
        }
        let dir = fixtures().join("node-deps");
        let cache = tempfile::tempdir().expect("tmp");
        let first = prepare(&dir, &opts(cache.path())).expect("prepare");
        assert_eq!(
            first.deps,
            DepsOutcome::Installed {
                file: "package.json"
            }
        );
        let out = unpacked(&first);
        assert!(
            out.path()
                .join("c/node_modules/nimbus-shout/index.js")
                .is_file()
        );
        assert!(!out.path().join("c/package-lock.json").exists());

        let second = prepare(&dir, &opts(cache.path())).expect("prepare again");
        assert_eq!(
            second.deps,
            DepsOutcome::Cached {
                file: "package.json"
            }
        );
        let digest = |p: &Prepared| nimbus_artifacts::sha256_file(p.archive.path()).expect("hash");
        assert_eq!(
            digest(&first),
            digest(&second),
            "a cached build packs the same bytes"
        );
    }

    #[test]
    fn a_lock_file_means_npm_ci_and_is_shipped() {
        if !have("npm", "--version") {
            eprintln!("skipped: no npm");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        copy_tree(&fixtures().join("node-deps"), dir.path(), true, dir.path()).expect("copy");
        let lock = serde_json::json!({
            "name": "node-deps",
            "version": "1.0.0",
            "lockfileVersion": 3,
            "requires": true,
            "packages": {
                "": {
                    "name": "node-deps",
                    "version": "1.0.0",
                    "dependencies": {"nimbus-shout": "file:vendor/nimbus-shout-1.0.0.tgz"}
                },
                "node_modules/nimbus-shout": {
                    "version": "1.0.0",
                    "resolved": "file:vendor/nimbus-shout-1.0.0.tgz",
                    "license": "Apache-2.0"
                }
            }
        });
        fs::write(dir.path().join(PACKAGE_LOCK), lock.to_string()).expect("write lock");
        let cache = tempfile::tempdir().expect("tmp");
        let p = prepare(dir.path(), &opts(cache.path())).expect("prepare");
        assert_eq!(
            p.deps,
            DepsOutcome::Installed {
                file: "package.json"
            }
        );
        let out = unpacked(&p);
        assert!(
            out.path()
                .join("c/node_modules/nimbus-shout/index.js")
                .is_file()
        );
        assert!(out.path().join("c/package-lock.json").is_file());
        assert!(p.summary().starts_with("node-deps: "), "{}", p.summary());
    }

    #[test]
    fn failing_installs_show_the_tool_output() {
        if !have("python3", "--version") {
            eprintln!("skipped: no python3");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(
            dir.path().join("nimbus.toml"),
            "name = \"p\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n",
        )
        .expect("write");
        fs::write(dir.path().join("main.py"), "def handler(e, c): pass\n").expect("write");
        fs::write(
            dir.path().join("requirements.txt"),
            "./missing-1.0-py3-none-any.whl\n",
        )
        .expect("write");
        let e = err_of(dir.path());
        assert!(e.contains("pip install failed"), "{e}");
        assert!(e.contains("missing-1.0-py3-none-any.whl"), "{e}");
    }
}
