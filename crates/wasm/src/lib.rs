//! nimbus-wasm: the narrow wasmtime host behind `runtime = "wasm"`.
//!
//! Owns: one [`Host`] per server (a wasmtime engine with the pooling instance allocator
//! and copy-on-write memory images, the epoch ticker that enforces deadlines, the
//! linker holding WASI 0.2 and `wasi:http`), ahead-of-time compilation into a
//! content-addressed cache, the checks a component must pass at deploy, and one
//! [`App::handle`] per request: a fresh store and instance with the invocation's limits
//! (memory, wall-clock deadline, optional fuel) and capabilities (env, captured
//! stdout/stderr, the read-only code folder if asked, outbound HTTP only to allowed
//! hosts).
//!
//! Must not touch: routes, auth, pools, metering records or the state store. It takes an
//! HTTP request in and gives an HTTP response (or a [`Failure`]) back; turning events into
//! requests and failures into invocation statuses is the worker's job.
//!
//! `unsafe` appears once, in [`cache`], to load a module this host compiled itself.

mod cache;
mod logs;
mod outbound;
mod run;
mod ticker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use outbound::OutboundPolicy;
pub use run::{CODE_DIR, Failure, Finished, Invocation};

/// How often the epoch advances while requests run. A guest that computes without
/// calling the host yields to the async executor at each tick (so a busy loop cannot hold
/// a runtime thread) and is stopped at the first tick past its deadline.
pub const TICK: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not something this host can run; the message is for the user.
    #[error("{0}")]
    Invalid(String),
    #[error("wasm cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// Operator settings, from `nimbus serve`.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where compiled components are kept (`<data>/wasm-cache`).
    pub cache_dir: PathBuf,
    /// Instances that may exist at once across all functions (the pool's size).
    pub max_instances: u32,
    /// Whether outgoing requests may reach loopback and private addresses (off by
    /// default: the control API listens on loopback).
    pub allow_private_outbound: bool,
    /// Compile in a child process (this program, run with [`COMPILE_ARG`]) instead of
    /// in-process. The server sets it: a compile holds tens of MiB that the allocator
    /// keeps afterwards, and hostile input that trips the compiler takes down a child,
    /// not the platform.
    pub compiler: Option<PathBuf>,
}

/// The hidden first argument that makes a program run [`compile_main`].
pub const COMPILE_ARG: &str = "__wasm-compile";

/// How long a compile may take before it is given up (a hostile component can be made
/// expensive to compile).
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(120);

/// The child side of [`HostConfig::compiler`]: `<program> __wasm-compile IN OUT`
/// compiles IN with the server's engine settings into OUT. Exit 0: done; 2: IN is not a
/// component (the reason on stderr, one line); 1: anything else.
pub fn compile_main(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let (Some(input), Some(output)) = (args.first(), args.get(1)) else {
        eprintln!("usage: {COMPILE_ARG} IN OUT");
        return std::process::ExitCode::from(1);
    };
    let engine = match Engine::new(&engine_config(&HostConfig {
        max_instances: 1,
        ..HostConfig::default()
    })) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wasm engine: {e:#}");
            return std::process::ExitCode::from(1);
        }
    };
    match cache::compile_bytes(&engine, Path::new(input)) {
        Ok(bytes) => match std::fs::write(output, bytes) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("write {}: {e}", Path::new(output).display());
                std::process::ExitCode::from(1)
            }
        },
        Err(Error::Invalid(m)) => {
            eprintln!("{m}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: std::env::temp_dir().join("nimbus-wasm-cache"),
            max_instances: 256,
            allow_private_outbound: false,
            compiler: None,
        }
    }
}

/// The server's wasmtime: shared by the control API (compiling at deploy) and the worker
/// (running requests).
pub struct Host {
    engine: Engine,
    linker: Linker<run::State>,
    cache: cache::Cache,
    ticker: ticker::Ticker,
    cfg: HostConfig,
    /// Component file -> its compiled file, for files already hashed in this process
    /// (code folders are content-addressed, so a path never changes its bytes).
    compiled: Mutex<std::collections::HashMap<PathBuf, PathBuf>>,
}

impl Host {
    pub fn new(cfg: HostConfig) -> Result<Arc<Host>, Error> {
        let engine =
            Engine::new(&engine_config(&cfg)).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
            .map_err(|e| Error::Engine(format!("link WASI: {e:#}")))?;
        let cache = cache::Cache::open(&cfg.cache_dir, &engine)?;
        let ticker = ticker::Ticker::start(engine.clone());
        Ok(Arc::new(Host {
            engine,
            linker,
            cache,
            ticker,
            cfg,
            compiled: Mutex::new(Default::default()),
        }))
    }

    /// Compiles a component ahead of time (at deploy) and checks that it can serve HTTP:
    /// that it exports `wasi:http/incoming-handler` and imports nothing this host lacks.
    /// A second call for the same bytes finds the compiled file in the cache.
    pub fn prepare(self: &Arc<Self>, wasm: &Path) -> Result<(), Error> {
        self.load(wasm).map(drop)
    }

    /// Loads a component for serving: from the cache when it was compiled before, else
    /// compiled now. The result is pre-instantiated (imports resolved once).
    pub fn load(self: &Arc<Self>, wasm: &Path) -> Result<App, Error> {
        let known = lock(&self.compiled).get(wasm).cloned();
        let component = match known.and_then(|p| self.cache.load(&self.engine, &p).ok()) {
            Some(c) => c,
            None => {
                let (path, component) =
                    self.cache
                        .compile(&self.engine, wasm, self.cfg.compiler.as_deref())?;
                lock(&self.compiled).insert(wasm.to_path_buf(), path);
                component
            }
        };
        let pre = self.pre(&component, wasm)?;
        Ok(App {
            pre,
            host: Arc::clone(self),
        })
    }

    /// Whether `wasm` was compiled (or found in the cache) by this process already, so
    /// that [`Host::load`] only maps the compiled file.
    pub fn is_compiled(&self, wasm: &Path) -> bool {
        lock(&self.compiled).contains_key(wasm)
    }

    fn pre(&self, component: &Component, wasm: &Path) -> Result<ProxyPre<run::State>, Error> {
        let name = file_name(wasm);
        let instance_pre = self.linker.instantiate_pre(component).map_err(|e| {
            Error::Invalid(format!(
                "`{name}` imports something this host does not provide (nimbus offers WASI \
                 0.2 and wasi:http): {}",
                root_cause(&e)
            ))
        })?;
        ProxyPre::new(instance_pre).map_err(|e| {
            Error::Invalid(format!(
                "`{name}` does not export wasi:http/incoming-handler (build it as an HTTP \
                 component, e.g. with the wasi crate's `http::proxy::export!`): {}",
                root_cause(&e)
            ))
        })
    }

    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }
}

/// A component ready to serve: an `InstancePre` per version, a new instance per request.
#[derive(Clone)]
pub struct App {
    pre: ProxyPre<run::State>,
    host: Arc<Host>,
}

/// Bytes of a linear memory reset in place on reuse (see `pagemap_scan` below).
const KEEP_RESIDENT: usize = 8 << 20;

fn engine_config(cfg: &HostConfig) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    // Always compiled in, so `[wasm] fuel` works for any function; a store without a
    // budget gets an unlimited one.
    c.consume_fuel(true);
    c.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let n = cfg.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    // A Rust wasip2 component holds a handful of core instances (the program, the WASI
    // adapter, shims) and two or three memories and tables; room for more than that.
    pool.total_component_instances(n)
        .total_core_instances(n * 8)
        .total_memories(n * 2)
        .total_tables(n * 4)
        .total_stacks(n)
        .max_core_instances_per_component(32)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .max_memory_size(4 << 30)
        // Reset a reused slot by rewriting only the pages the last request dirtied
        // (found with PAGEMAP_SCAN, Linux 6.7+) instead of `madvise`: no page faults on
        // reuse and, above all, no TLB shoot-down interrupting every runtime thread per
        // request. Without the ioctl, the keep-resident size bounds a plain memset.
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(64 << 10)
        // What still needs `madvise` is decommitted in batches.
        .decommit_batch_size(16);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The innermost message of a wasmtime error chain: the part that names the problem.
fn root_cause(e: &wasmtime::Error) -> String {
    e.chain()
        .last()
        .map(|c| c.to_string())
        .unwrap_or_else(|| e.to_string())
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
