//! nimbus-worker: runs invocations on pools of sandboxed function instances.
//!
//! Owns: one pool per function version, cold starts (spawning an instance through the
//! `sandbox` crate and waiting for its shim to load the handler), warm reuse
//! (most-recently-used first), the concurrency cap, per-invocation deadlines (the instance
//! is killed when one passes), log capture and the embedded runtime shims.
//! Implements [`nimbus_core::Invoker`]; nothing above it knows instances exist.
//!
//! Must not touch: HTTP, routing or auth (gateway, control), or Linux isolation details
//! (sandbox). It reads storage only through [`nimbus_store::Catalog`] (resolving a
//! function's alias to a version, and the aliased versions the maintainer keeps), so
//! it does not know which backend answers.
#![forbid(unsafe_code)]

mod control;
mod instance;
mod maintain;
mod metering;
mod pool;
pub mod protocol;
mod runtimes;
mod spawn;
mod uids;
mod wasm;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_artifacts::ArtifactStore;
use nimbus_core::invoke::BoxFuture;
use nimbus_core::{
    InstanceInfo, InvokeError, InvokeOutcome, InvokeRequest, InvokeStatus, Invoker, Target,
};
use nimbus_sandbox::Host;
use nimbus_store::Catalog;

use crate::instance::{Live, RunError};
use crate::pool::{Pool, State};

pub use runtimes::RuntimeFiles;

/// CPU quota while an instance starts (one full vCPU): interpreter start-up is pure CPU,
/// and a 128 MB function's share (7% of a vCPU) would stretch it tenfold.
pub const INIT_CPU_MILLIS: u32 = 1000;

/// Per-invocation log cap: past it, output is dropped and a marker says so.
pub const DEFAULT_LOG_LIMIT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("install runtime shims into {path}: {source}")]
    InstallRuntimes {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the worker needs from the operator; built by `cli::serve`.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where the embedded shims are written (`<data>/runtimes`).
    pub runtime_dir: PathBuf,
    /// Runtime name (`python3`, `node`, `python3.12`, ...) to interpreter path.
    pub interpreters: BTreeMap<String, PathBuf>,
    pub region: String,
    pub log_limit: usize,
    /// How long an invocation waits for a free slot under `max_instances` before 429.
    pub queue_timeout: Duration,
    /// Limit on starting an instance and loading its handler.
    pub init_timeout: Duration,
    /// Instances run as uids leased from `uid_base + 1 ..= uid_base + 60000`, one each.
    pub uid_base: u32,
    /// Stem cells kept ready per interpreter (0 disables them).
    pub stem_cells: usize,
    /// Lets `network = "egress"` functions reach the host's loopback (off by default:
    /// the control API listens there).
    pub egress_allow_host_loopback: bool,
    /// The host's budget: every sandboxed instance reserves its share before it starts.
    pub capacity: Arc<nimbus_core::capacity::Capacity>,
}

pub struct Worker {
    inner: Arc<Inner>,
}

type ResolveCache = HashMap<(String, Target), Arc<Pool>>;

struct Inner {
    cfg: WorkerConfig,
    runtimes: RuntimeFiles,
    catalog: Arc<dyn Catalog>,
    artifacts: Arc<ArtifactStore>,
    host: Arc<Host>,
    pools: Mutex<HashMap<(String, u32), Arc<Pool>>>,
    /// (function, target) -> pool, valid for one generation of the store's change feed:
    /// the hot path skips the database until something changes.
    resolved: Mutex<(u64, ResolveCache)>,
    changes: tokio::sync::watch::Receiver<u64>,
    records: Arc<dyn nimbus_core::RecordSink>,
    stems: spawn::Stems,
    uids: Arc<uids::UidPool>,
    shutting_down: AtomicBool,
    /// The WebAssembly host, for `runtime = "wasm"` functions.
    wasm: Arc<nimbus_wasm::Host>,
}

impl Worker {
    pub fn new(
        cfg: WorkerConfig,
        catalog: Arc<dyn Catalog>,
        artifacts: Arc<ArtifactStore>,
        host: Arc<Host>,
        records: Arc<dyn nimbus_core::RecordSink>,
        wasm: Arc<nimbus_wasm::Host>,
    ) -> Result<Worker, Error> {
        let runtimes =
            RuntimeFiles::install(&cfg.runtime_dir).map_err(|source| Error::InstallRuntimes {
                path: cfg.runtime_dir.clone(),
                source,
            })?;
        let changes = catalog.subscribe();
        let cfg_interpreters = cfg.interpreters.clone();
        let uid_base = cfg.uid_base;
        Ok(Worker {
            inner: Arc::new(Inner {
                cfg,
                runtimes,
                catalog,
                artifacts,
                host,
                pools: Mutex::new(HashMap::new()),
                resolved: Mutex::new((0, HashMap::new())),
                changes,
                records,
                stems: {
                    let stems = spawn::Stems::default();
                    for key in spawn::default_keys(&cfg_interpreters) {
                        stems.want(key);
                    }
                    stems
                },
                uids: uids::UidPool::new(uid_base),
                shutting_down: AtomicBool::new(false),
                wasm,
            }),
        })
    }

    /// Keeps the pools in shape until shutdown: retires idle instances past their
    /// `idle_timeout` (scale to zero) but never below `min_instances`, starts instances
    /// up to `min_instances` (provisioned concurrency), and drains pools whose version
    /// lost its alias or whose scaling changed.
    pub fn spawn_maintainer(&self) -> tokio::task::JoinHandle<()> {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move { maintain::run(inner).await })
    }

    /// Kills every instance; later invocations fail with `ShuttingDown`.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let pools: Vec<Arc<Pool>> = lock(&self.inner.pools).drain().map(|(_, p)| p).collect();
        let mut all = Vec::new();
        for pool in pools {
            pool.drain();
            all.extend(pool.take_idle());
        }
        all.extend(self.inner.stems.take_all());
        let _ = tokio::task::spawn_blocking(move || drop(all)).await;
    }
}

impl Invoker for Worker {
    fn invoke(&self, req: InvokeRequest) -> BoxFuture<'_, Result<InvokeOutcome, InvokeError>> {
        // Its own task: a caller that goes away (a client hanging up, a route timeout)
        // must not cancel an invocation halfway, which would drop a busy instance
        // without retiring it and lose the record. Lambda, too, runs it to the end.
        let run = tokio::spawn(self.inner.clone().invoke(req));
        Box::pin(async move {
            run.await
                .unwrap_or_else(|e| Err(InvokeError::Internal(format!("invocation task: {e}"))))
        })
    }

    fn evict(&self, function: &str) -> BoxFuture<'_, usize> {
        let inner = Arc::clone(&self.inner);
        let function = function.to_string();
        Box::pin(async move {
            let mut unloaded = 0;
            let pools: Vec<Arc<Pool>> = {
                let mut map = lock(&inner.pools);
                let keys: Vec<_> = map
                    .keys()
                    .filter(|(f, _)| *f == function)
                    .cloned()
                    .collect();
                // A wasm pool holds no instances, only its loaded component: dropping
                // that is the eviction, and the pool (and the alias resolution cached for
                // it) stays, so the next request's cold start is the load alone.
                let keys: Vec<_> = keys
                    .into_iter()
                    .filter(|k| match map.get(k) {
                        Some(p) if p.config.runtime == nimbus_core::Runtime::Wasm => {
                            unloaded += usize::from(p.wasm.unload());
                            false
                        }
                        _ => true,
                    })
                    .collect();
                if keys.is_empty() {
                    return unloaded;
                }
                keys.iter().filter_map(|k| map.remove(k)).collect()
            };
            lock(&inner.resolved).1.retain(|(f, _), _| *f != function);
            let mut n = unloaded;
            for pool in pools {
                n += pool.idle_count();
                pool.drain();
            }
            n
        })
    }

    fn instances(&self, function: Option<String>) -> BoxFuture<'_, Vec<InstanceInfo>> {
        let pools: Vec<Arc<Pool>> = lock(&self.inner.pools).values().cloned().collect();
        Box::pin(async move {
            let mut out: Vec<InstanceInfo> = pools
                .iter()
                .filter(|p| function.as_ref().is_none_or(|f| *f == p.function))
                .flat_map(|p| p.infos())
                .collect();
            out.sort_by(|a, b| {
                (&a.function, a.version, &a.id).cmp(&(&b.function, b.version, &b.id))
            });
            out
        })
    }
}

impl Inner {
    async fn invoke(self: Arc<Self>, req: InvokeRequest) -> Result<InvokeOutcome, InvokeError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(InvokeError::ShuttingDown);
        }
        let started_at_ms = metering::now_ms();
        let pool = self.pool_for(&req.function, &req.target).await?;
        let wait = tokio::time::timeout(
            self.cfg.queue_timeout,
            Arc::clone(&pool.slots).acquire_owned(),
        )
        .await;
        let _permit = match wait {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(InvokeError::ShuttingDown),
            Err(_) => {
                metering::throttled(&pool.function);
                return Err(InvokeError::Throttled {
                    function: pool.function.clone(),
                    retry_after_s: 1,
                });
            }
        };

        let mut outcome = InvokeOutcome {
            request_id: req.request_id.clone(),
            function: pool.function.clone(),
            version: pool.version,
            status: InvokeStatus::Success(bytes::Bytes::new()),
            cold_start: false,
            init_duration_ms: None,
            duration_ms: 0.0,
            logs: String::new(),
            memory_mb: pool.config.memory_mb,
            peak_memory_bytes: None,
            cpu_ms: None,
        };

        if pool.config.runtime == nimbus_core::Runtime::Wasm {
            self.invoke_wasm(&pool, &req, &mut outcome).await?;
            self.finished(&req, &outcome, started_at_ms, &pool);
            return Ok(outcome);
        }

        let mut live = match self.warm_or_share(&pool).await {
            Some(Slot::Warm(l)) => *l,
            // Past the host's budget a cold start is throttled like a full pool: the
            // host is never overcommitted.
            None => {
                metering::throttled(&pool.function);
                return Err(InvokeError::Throttled {
                    function: pool.function.clone(),
                    retry_after_s: 1,
                });
            }
            Some(Slot::Cold(share)) => {
                outcome.cold_start = true;
                let started = Instant::now();
                match self.start_registered(&pool, State::Busy, share).await {
                    Ok(l) => {
                        outcome.init_duration_ms = Some(ms(started.elapsed()));
                        l
                    }
                    Err((status, logs)) => {
                        outcome.init_duration_ms = Some(ms(started.elapsed()));
                        outcome.status = status;
                        outcome.logs = logs;
                        self.finished(&req, &outcome, started_at_ms, &pool);
                        return Ok(outcome);
                    }
                }
            }
        };

        let deadline = Duration::from_millis(pool.config.timeout_ms);
        let arn = self.arn(&pool.function, &req.target);
        let started = Instant::now();
        let run = live
            .run(
                &req.request_id,
                &arn,
                req.trace.as_deref(),
                &req.payload,
                deadline,
                self.cfg.log_limit,
            )
            .await;
        outcome.duration_ms = ms(started.elapsed());
        outcome.logs = live.take_logs();
        outcome.peak_memory_bytes = live.last_peak_bytes;
        outcome.cpu_ms = live.last_cpu_ms;
        match run {
            Ok(status) => {
                outcome.status = status;
                if self.shutting_down.load(Ordering::Relaxed) {
                    pool.retire(live);
                } else {
                    pool.checkin(live, true);
                }
            }
            Err(err) => {
                outcome.status = self.classify_failure(&pool, live, err).await;
            }
        }
        self.finished(&req, &outcome, started_at_ms, &pool);
        Ok(outcome)
    }

    fn finished(
        &self,
        req: &InvokeRequest,
        outcome: &InvokeOutcome,
        started_at_ms: i64,
        pool: &Pool,
    ) {
        metering::finished(
            &*self.records,
            req,
            outcome,
            started_at_ms,
            &pool.config.runtime_name,
            &pool.metrics,
        );
    }

    /// Turns a broken instance into the status the caller sees, and disposes of it.
    async fn classify_failure(&self, pool: &Pool, mut live: Live, err: RunError) -> InvokeStatus {
        live.kill();
        let exit = live.reap().await;
        let status = match err {
            RunError::Timeout => InvokeStatus::Timeout,
            RunError::ResultTooLarge => InvokeStatus::ResultTooLarge,
            RunError::Broken(detail) => {
                if live.oom_killed() {
                    InvokeStatus::OutOfMemory
                } else {
                    let how = exit.map(|e| format!(", {e}")).unwrap_or_default();
                    InvokeStatus::Crashed(format!("{detail}{how}"))
                }
            }
        };
        pool.retire(live);
        status
    }

    async fn pool_for(&self, function: &str, target: &Target) -> Result<Arc<Pool>, InvokeError> {
        let generation = *self.changes.borrow();
        let key = (function.to_string(), target.clone());
        {
            let cache = lock(&self.resolved);
            if cache.0 == generation
                && let Some(p) = cache.1.get(&key)
                && !p.is_draining()
            {
                return Ok(Arc::clone(p));
            }
        }
        let row = self.catalog.resolve(function, target).await.map_err(|e| {
            if e.is_not_found() {
                InvokeError::NotFound(e.to_string())
            } else {
                InvokeError::Internal(e.to_string())
            }
        })?;
        let pool = self.pool_of(row).await?;
        let mut cache = lock(&self.resolved);
        if cache.0 != generation {
            *cache = (generation, HashMap::new());
        }
        cache.1.insert(key, Arc::clone(&pool));
        Ok(pool)
    }

    /// The pool of a resolved version, made on first use. A pool whose config no longer
    /// matches (the operator rescaled the function) is drained and replaced.
    async fn pool_of(&self, row: nimbus_store::VersionRow) -> Result<Arc<Pool>, InvokeError> {
        let key = (row.function.clone(), row.version);
        if let Some(p) = lock(&self.pools).get(&key)
            && p.config == row.config
            && !p.is_draining()
        {
            return Ok(Arc::clone(p));
        }
        let artifacts = Arc::clone(&self.artifacts);
        let digest = row.digest.clone();
        let code_dir = tokio::task::spawn_blocking(move || artifacts.code_dir(&digest))
            .await
            .map_err(|e| InvokeError::Internal(e.to_string()))?
            .map_err(|e| InvokeError::Internal(format!("load code {}: {e}", row.digest)))?;
        let fresh = Arc::new(Pool::new(
            row.function.clone(),
            row.version,
            row.config,
            code_dir,
        ));
        let mut pools = lock(&self.pools);
        match pools.get(&key) {
            Some(p) if p.config == fresh.config && !p.is_draining() => Ok(Arc::clone(p)),
            _ => {
                if let Some(old) = pools.insert(key, Arc::clone(&fresh)) {
                    old.drain();
                }
                Ok(fresh)
            }
        }
    }

    /// Starts an instance and registers it with its pool in `state`.
    async fn start_registered(
        &self,
        pool: &Pool,
        state: State,
        share: nimbus_core::capacity::Reservation,
    ) -> Result<Live, (InvokeStatus, String)> {
        pool.starting.fetch_add(1, Ordering::SeqCst);
        let started = self.start_instance(pool, share).await;
        if let Ok(live) = &started {
            pool.register(live, state);
        }
        pool.starting.fetch_sub(1, Ordering::SeqCst);
        started
    }

    /// A warm instance of `pool`, or a share of the host's budget to start one. When
    /// the budget is spent, one idle instance another pool can spare (above its
    /// `min_instances`) is retired to make room, and whichever comes first (a share, or
    /// one of `pool`'s instances going idle) is awaited up to the queue timeout.
    async fn warm_or_share(&self, pool: &Pool) -> Option<Slot> {
        let capacity = &self.cfg.capacity;
        let memory_mb = pool.config.memory_mb;
        let ready = || match pool.checkout() {
            Some(l) => Some(Slot::Warm(Box::new(l))),
            None => capacity.try_reserve(memory_mb).map(Slot::Cold),
        };
        if let Some(slot) = ready() {
            return Some(slot);
        }
        let pools: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        let spare = pools.iter().find(|p| {
            p.idle_count() > 0
                && (p.is_draining() || p.total() > p.config.concurrency.min_instances as usize)
        });
        if let Some(p) = spare {
            let mut once = true;
            p.retire_idle(|_| std::mem::take(&mut once));
        }
        let deadline = Instant::now() + self.cfg.queue_timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(slot) = ready() {
                return Some(slot);
            }
        }
        None
    }

    fn arn(&self, function: &str, target: &nimbus_core::Target) -> String {
        let qualifier = match target {
            nimbus_core::Target::Alias(a) => a.clone(),
            nimbus_core::Target::Version(v) => v.to_string(),
        };
        format!(
            "arn:aws:lambda:{}:000000000000:function:{function}:{qualifier}",
            self.cfg.region
        )
    }
}

/// Where an invocation runs: an idle instance, or a new one started on its share.
enum Slot {
    Warm(Box<Live>),
    Cold(nimbus_core::capacity::Reservation),
}

/// The directory an interpreter outside `/usr` is installed in (`/opt/py/bin/python3` ->
/// `/opt/py`), which must be visible inside the sandbox for its stdlib and libraries.
pub(crate) fn install_prefix(program: &std::path::Path) -> Option<PathBuf> {
    let real = program.canonicalize().ok()?;
    if real.starts_with("/usr") {
        return None;
    }
    let dir = real.parent()?;
    let prefix = if dir.file_name().is_some_and(|n| n == "bin") {
        dir.parent()?
    } else {
        dir
    };
    (prefix != std::path::Path::new("/")).then(|| prefix.to_path_buf())
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

pub(crate) fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Civil-from-days (Howard Hinnant): avoids a date crate for one log-stream name.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}/{m:02}/{d:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn interpreters_outside_usr_bring_their_prefix() {
        let tmp = std::env::temp_dir().join(format!("nimbus-prefix-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("bin")).expect("mkdir");
        std::fs::write(tmp.join("bin/python3"), "").expect("touch");
        let prefix = super::install_prefix(&tmp.join("bin/python3"));
        assert_eq!(prefix, tmp.canonicalize().ok());
        assert_eq!(
            super::install_prefix(std::path::Path::new("/usr/bin/env")),
            None
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn today_is_a_plausible_date() {
        let t = super::today();
        assert_eq!(t.len(), 10);
        assert!(t.starts_with("20"), "{t}");
    }
}
