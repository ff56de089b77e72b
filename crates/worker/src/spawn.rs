//! Starting instances: a fresh sandbox per cold start, or a stem cell (a blank sandbox
//! with the interpreter and shim already loaded) handed its function.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nimbus_core::capacity::Reservation;
use nimbus_core::{InvokeStatus, Runtime};
use nimbus_sandbox::{Bind, InstanceSpec, Isolation, Limits, RUNTIME_DIR, Rootfs, TASK_DIR};

use crate::instance::{Live, ReadyError};
use crate::pool::{self, Pool};
use crate::{INIT_CPU_MILLIS, Inner, lock, today};

/// Memory a stem cell starts with; lowered (or raised) to the function's at assignment.
const STEM_MEMORY_MB: u32 = 512;

/// Stem cells are interchangeable when they run the same interpreter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct StemKey {
    pub runtime_name: String,
    pub program: PathBuf,
}

#[derive(Default)]
pub(crate) struct Stems {
    ready: std::sync::Mutex<HashMap<StemKey, Vec<Live>>>,
    starting: std::sync::Mutex<HashMap<StemKey, usize>>,
    /// Interpreters worth keeping stems for: the defaults, and any a cold start used.
    wanted: std::sync::Mutex<BTreeSet<StemKey>>,
    /// Woken when a stem was used, so the maintainer replaces it now rather than at its
    /// next tick (and after the cold start it served, not competing with it for CPU).
    pub used: tokio::sync::Notify,
}

impl Stems {
    fn take(&self, key: &StemKey) -> Option<Live> {
        let mut ready = lock(&self.ready);
        let list = ready.get_mut(key)?;
        while let Some(mut live) = list.pop() {
            if live.is_alive() {
                return Some(live);
            }
            pool::dispose(vec![live]);
        }
        None
    }

    pub fn take_all(&self) -> Vec<Live> {
        lock(&self.ready).drain().flat_map(|(_, v)| v).collect()
    }

    pub fn want(&self, key: StemKey) {
        lock(&self.wanted).insert(key);
    }
}

/// What a function needs from its runtime: the interpreter and its arguments.
fn command(
    inner: &Inner,
    runtime: Runtime,
    runtime_name: &str,
    handler: &str,
    task_root: &Path,
    runtime_root: &Path,
) -> Result<(PathBuf, Vec<String>), String> {
    let interp = |fallback: &str| -> Result<PathBuf, String> {
        inner
            .cfg
            .interpreters
            .get(runtime_name)
            .or_else(|| inner.cfg.interpreters.get(fallback))
            .cloned()
            .ok_or_else(|| format!("no interpreter configured for runtime `{runtime_name}`"))
    };
    Ok(match runtime {
        Runtime::Python3 => {
            let script = runtime_root.join("bootstrap.py").display().to_string();
            (interp("python3")?, vec!["-I".into(), "-S".into(), script])
        }
        Runtime::Node => {
            let script = runtime_root.join("bootstrap.mjs").display().to_string();
            (interp("node")?, vec![script])
        }
        Runtime::Exec => (task_root.join(handler), vec![]),
        Runtime::Wasm => return Err("wasm functions are not supported by this worker".into()),
    })
}

/// The environment every instance gets, whatever its function.
fn base_env(
    inner: &Inner,
    runtime_name: &str,
    task_root: &Path,
    runtime_root: &Path,
) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TZ".into(), "UTC".into()),
        ("HOME".into(), "/tmp".into()),
        ("NIMBUS_CONTROL_FD".into(), "3".into()),
        ("LAMBDA_TASK_ROOT".into(), task_root.display().to_string()),
        (
            "LAMBDA_RUNTIME_DIR".into(),
            runtime_root.display().to_string(),
        ),
        ("AWS_LAMBDA_INITIALIZATION_TYPE".into(), "on-demand".into()),
        ("AWS_REGION".into(), inner.cfg.region.clone()),
        ("AWS_DEFAULT_REGION".into(), inner.cfg.region.clone()),
        ("AWS_EXECUTION_ENV".into(), format!("nimbus_{runtime_name}")),
    ]
}

/// The function's own variables: Lambda's reserved ones and the manifest's `[env]`.
pub(crate) fn function_env(pool: &Pool, instance_id: &str) -> Vec<(String, String)> {
    let c = &pool.config;
    let mut env: Vec<(String, String)> = vec![
        ("_HANDLER".into(), c.handler.clone()),
        ("AWS_LAMBDA_FUNCTION_NAME".into(), pool.function.clone()),
        (
            "AWS_LAMBDA_FUNCTION_VERSION".into(),
            pool.version.to_string(),
        ),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(),
            c.memory_mb.to_string(),
        ),
        ("AWS_LAMBDA_LOG_GROUP_NAME".into(), log_group(pool)),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME".into(),
            log_stream(pool, instance_id),
        ),
    ];
    env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

fn log_group(pool: &Pool) -> String {
    format!("/aws/lambda/{}", pool.function)
}

fn log_stream(pool: &Pool, instance_id: &str) -> String {
    format!("{}/[{}]{}", today(), pool.version, instance_id)
}

/// /tmp is a tmpfs charged to the instance's memory cgroup: capped at half the
/// function's memory, filling it ends in ENOSPC rather than an OOM kill.
fn tmp_bytes(memory_mb: u32) -> u64 {
    nimbus_sandbox::DEFAULT_TMP_BYTES.min(u64::from(memory_mb) * 1024 * 1024 / 2)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", nimbus_core::short_random_id())
}

impl Inner {
    /// Starts an instance of `pool`'s function and waits until its handler is loaded:
    /// from a stem cell when one is ready, else from scratch. On failure, the status
    /// and what the instance printed (an import error's traceback, say).
    /// Starts an instance that holds `share` of the host's budget until it is gone.
    pub(crate) async fn start_instance(
        &self,
        pool: &Pool,
        share: Reservation,
    ) -> Result<Live, (InvokeStatus, String)> {
        let mut live = self.start_unbudgeted(pool).await?;
        live.reservation = Some(share);
        Ok(live)
    }

    async fn start_unbudgeted(&self, pool: &Pool) -> Result<Live, (InvokeStatus, String)> {
        if let Some(key) = self.stem_key(pool) {
            self.stems.want(key.clone());
            if let Some(stem) = self.stems.take(&key) {
                let assigned = self.assign(stem, pool).await;
                self.stems.used.notify_one();
                match assigned {
                    Ok(live) => return Ok(live),
                    // The function's own failure to load is the answer; a stem that
                    // broke is not: fall back to a fresh instance.
                    Err((status @ InvokeStatus::FunctionError(_), logs)) => {
                        return Err((status, logs));
                    }
                    Err((status, _)) => {
                        tracing::warn!(function = %pool.function, status = status.code(), "stem cell failed; starting afresh");
                    }
                }
            }
        }
        self.start_fresh(pool).await
    }

    fn stem_key(&self, pool: &Pool) -> Option<StemKey> {
        let c = &pool.config;
        if self.cfg.stem_cells == 0
            || !self.host.stem_cells_available()
            || c.network != nimbus_core::Network::None
            || !matches!(c.runtime, Runtime::Python3 | Runtime::Node)
        {
            return None;
        }
        let (program, _) = command(
            self,
            c.runtime,
            &c.runtime_name,
            &c.handler,
            Path::new(TASK_DIR),
            Path::new(RUNTIME_DIR),
        )
        .ok()?;
        Some(StemKey {
            runtime_name: c.runtime_name.clone(),
            program,
        })
    }

    async fn start_fresh(&self, pool: &Pool) -> Result<Live, (InvokeStatus, String)> {
        let failed = |msg: String| (InvokeStatus::SandboxFailed(msg), String::new());
        let (spec, lease) = self.instance_spec(pool).map_err(failed)?;
        let mut live = self.spawn(spec, &pool.function).await.map_err(failed)?;
        live.uid = lease;
        let ready = live
            .wait_ready(self.cfg.init_timeout, self.cfg.log_limit)
            .await;
        self.finish_start(pool, live, ready).await
    }

    /// Spawns a sandbox and wraps it; blocking work happens off the async threads.
    async fn spawn(&self, spec: InstanceSpec, what: &str) -> Result<Live, String> {
        let host = Arc::clone(&self.host);
        let spawned = tokio::task::spawn_blocking(move || host.spawn(&spec))
            .await
            .map_err(|e| e.to_string())?;
        let sandboxed = spawned.map_err(|e| {
            tracing::error!(what, error = %e, "sandbox spawn failed");
            e.to_string()
        })?;
        Live::new(sandboxed).map_err(|e| {
            tracing::error!(what, error = %e, "wrap instance failed");
            e.to_string()
        })
    }

    /// After the handler loaded (or did not): drop to the function's CPU share, or
    /// dispose of the instance and say why.
    async fn finish_start(
        &self,
        pool: &Pool,
        mut live: Live,
        ready: Result<(), ReadyError>,
    ) -> Result<Live, (InvokeStatus, String)> {
        let status = match ready {
            Ok(()) => {
                // Init ran boosted; from now on the function gets its proportional share.
                let share = Limits::for_memory(pool.config.memory_mb).cpu_millis;
                match live.set_cpu_millis(share) {
                    Ok(()) => return Ok(live),
                    Err(e) => {
                        tracing::error!(function = %pool.function, error = %e, "set CPU share");
                        InvokeStatus::SandboxFailed(e)
                    }
                }
            }
            Err(ReadyError::InitFailed(fe)) => InvokeStatus::FunctionError(fe),
            Err(ReadyError::Sandbox(msg)) => {
                tracing::error!(function = %pool.function, error = %msg, "sandbox setup failed");
                InvokeStatus::SandboxFailed(msg)
            }
            Err(ReadyError::Run(err)) => {
                let logs = live.take_logs();
                return Err((self.classify_failure(pool, live, err).await, logs));
            }
        };
        let logs = live.take_logs();
        pool::dispose(vec![live]);
        Err((status, logs))
    }

    /// Fits a stem cell to the function: code, limits, then the `A` frame.
    async fn assign(&self, mut live: Live, pool: &Pool) -> Result<Live, (InvokeStatus, String)> {
        let c = &pool.config;
        let fitted = {
            let sb = live.sandbox();
            sb.assign_code(&pool.code_dir)
                .and_then(|()| sb.set_memory_mb(c.memory_mb))
                .and_then(|()| sb.set_pids_max(Limits::for_memory(c.memory_mb).pids_max))
                .and_then(|()| sb.set_tmp_bytes(tmp_bytes(c.memory_mb)))
        };
        if let Err(e) = fitted {
            pool::dispose(vec![live]);
            return Err((InvokeStatus::SandboxFailed(e.to_string()), String::new()));
        }
        let env: BTreeMap<String, String> = function_env(pool, live.id()).into_iter().collect();
        let payload = serde_json::json!({
            "handler": c.handler,
            "env": env,
            "functionName": pool.function,
            "functionVersion": pool.version.to_string(),
            "memoryLimitMB": c.memory_mb.to_string(),
            "logGroupName": log_group(pool),
            "logStreamName": log_stream(pool, live.id()),
        });
        let payload = serde_json::to_vec(&payload).unwrap_or_default();
        let ready = live
            .assign(&payload, self.cfg.init_timeout, self.cfg.log_limit)
            .await;
        self.finish_start(pool, live, ready).await
    }

    fn instance_spec(
        &self,
        pool: &Pool,
    ) -> Result<(InstanceSpec, Option<crate::uids::UidLease>), String> {
        let c = &pool.config;
        let isolated = self.host.isolates();
        // Inside a sandbox the code and shims sit at Lambda's paths; without one (insecure
        // mode) they stay where they are on the host.
        let (task_root, runtime_root) = if isolated {
            (PathBuf::from(TASK_DIR), PathBuf::from(RUNTIME_DIR))
        } else {
            (pool.code_dir.clone(), self.runtimes.dir.clone())
        };
        let (program, args) = command(
            self,
            c.runtime,
            &c.runtime_name,
            &c.handler,
            &task_root,
            &runtime_root,
        )?;
        let id = new_id(&format!("{}-{}", pool.function, pool.version));
        let mut env = base_env(self, &c.runtime_name, &task_root, &runtime_root);
        env.extend(function_env(pool, &id));

        let mut isolation = Isolation::default();
        let mut lease = None;
        if isolated {
            let mut rootfs = Rootfs::new(pool.code_dir.clone());
            rootfs.runtime_dir = Some(self.runtimes.dir.clone());
            rootfs.tmp_bytes = tmp_bytes(c.memory_mb);
            if let Some(prefix) = crate::install_prefix(&program) {
                rootfs.ro_binds.push(Bind::same(prefix));
            }
            let network = match c.network {
                nimbus_core::Network::None => nimbus_sandbox::Network::None,
                nimbus_core::Network::Egress => nimbus_sandbox::Network::Egress {
                    allow_host_loopback: self.cfg.egress_allow_host_loopback,
                },
            };
            let l = self.uids.lease().ok_or("no free sandbox uid")?;
            isolation = Isolation::function(l.uid, l.uid, rootfs, network);
            lease = Some(l);
        }
        Ok((
            InstanceSpec {
                id,
                program,
                args,
                env,
                workdir: task_root,
                limits: Limits {
                    cpu_millis: INIT_CPU_MILLIS,
                    ..Limits::for_memory(c.memory_mb)
                },
                isolation,
            },
            lease,
        ))
    }

    /// Starts one stem cell for `key` and parks it, ready.
    async fn start_stem(&self, key: &StemKey) -> Result<(), String> {
        let task_root = PathBuf::from(TASK_DIR);
        let runtime_root = PathBuf::from(RUNTIME_DIR);
        let runtime = if key.runtime_name.starts_with("node") {
            Runtime::Node
        } else {
            Runtime::Python3
        };
        let (_, args) = command(
            self,
            runtime,
            &key.runtime_name,
            "",
            &task_root,
            &runtime_root,
        )?;
        let mut env = base_env(self, &key.runtime_name, &task_root, &runtime_root);
        env.push(("NIMBUS_STEM".into(), "1".into()));
        let mut rootfs = Rootfs::stem();
        rootfs.runtime_dir = Some(self.runtimes.dir.clone());
        if let Some(prefix) = crate::install_prefix(&key.program) {
            rootfs.ro_binds.push(Bind::same(prefix));
        }
        let lease = self.uids.lease().ok_or("no free sandbox uid")?;
        let spec = InstanceSpec {
            id: new_id("stem"),
            program: key.program.clone(),
            args,
            env,
            workdir: PathBuf::from("/"),
            limits: Limits {
                cpu_millis: INIT_CPU_MILLIS,
                ..Limits::for_memory(STEM_MEMORY_MB)
            },
            isolation: Isolation::function(
                lease.uid,
                lease.uid,
                rootfs,
                nimbus_sandbox::Network::None,
            ),
        };
        let mut live = self.spawn(spec, "stem cell").await?;
        live.uid = Some(lease);
        match live
            .wait_ready(self.cfg.init_timeout, self.cfg.log_limit)
            .await
        {
            Ok(()) => {
                lock(&self.stems.ready)
                    .entry(key.clone())
                    .or_default()
                    .push(live);
                Ok(())
            }
            Err(e) => {
                let logs = live.take_logs();
                pool::dispose(vec![live]);
                Err(match e {
                    ReadyError::InitFailed(fe) => {
                        format!("{}: {}", fe.error_type, fe.error_message)
                    }
                    ReadyError::Sandbox(m) => m,
                    ReadyError::Run(_) => format!("stem cell died while starting: {}", logs.trim()),
                })
            }
        }
    }
}

/// Tops up every wanted interpreter's stem cells to the configured count, in the
/// background; called by the maintainer.
pub(crate) fn refill(inner: &Arc<Inner>) {
    if inner.cfg.stem_cells == 0
        || !inner.host.stem_cells_available()
        || inner.shutting_down.load(Ordering::Relaxed)
    {
        return;
    }
    let wanted: Vec<StemKey> = lock(&inner.stems.wanted).iter().cloned().collect();
    for key in wanted {
        let have = lock(&inner.stems.ready).get(&key).map_or(0, Vec::len);
        let starting = lock(&inner.stems.starting).get(&key).copied().unwrap_or(0);
        crate::metering::stem_cells(&key.runtime_name, have);
        for _ in (have + starting)..inner.cfg.stem_cells {
            *lock(&inner.stems.starting).entry(key.clone()).or_default() += 1;
            let inner = Arc::clone(inner);
            let key = key.clone();
            tokio::spawn(async move {
                let result = inner.start_stem(&key).await;
                if let Some(n) = lock(&inner.stems.starting).get_mut(&key) {
                    *n = n.saturating_sub(1);
                }
                if let Err(e) = result {
                    // Stop asking for stems of an interpreter that cannot make them.
                    tracing::warn!(runtime = %key.runtime_name, error = %e, "stem cell failed to start");
                    lock(&inner.stems.wanted).remove(&key);
                }
            });
        }
    }
}

/// The stems to keep from start-up: one kind per configured default interpreter.
pub(crate) fn default_keys(interpreters: &BTreeMap<String, PathBuf>) -> Vec<StemKey> {
    ["python3", "node"]
        .iter()
        .filter_map(|name| {
            interpreters.get(*name).map(|p| StemKey {
                runtime_name: (*name).to_string(),
                program: p.clone(),
            })
        })
        .collect()
}
