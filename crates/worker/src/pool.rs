//! One pool per function version: its idle instances, its concurrency slots, and a
//! registry of every instance it owns (for `nimbus instances` and for `min_instances`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nimbus_core::{FunctionConfig, InstanceInfo};
use tokio::sync::Semaphore;

use crate::instance::Live;
use crate::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Idle,
    Busy,
}

struct Meta {
    state: State,
    created: Instant,
    last_used: Instant,
    invocations: u64,
    memory_file: Option<PathBuf>,
}

pub(crate) struct Pool {
    pub function: String,
    pub version: u32,
    pub config: FunctionConfig,
    pub code_dir: PathBuf,
    /// Most recently used last: `pop` takes the warmest.
    idle: Mutex<Vec<Live>>,
    pub slots: Arc<Semaphore>,
    /// Set when the pool's version lost its alias or its config changed: instances
    /// finish what they run and are retired instead of going back to idle.
    draining: AtomicBool,
    registry: Mutex<BTreeMap<String, Meta>>,
    /// Instances being started (cold starts and provisioning) and not yet registered.
    pub starting: AtomicUsize,
    pub metrics: crate::metering::PoolMetrics,
    /// The loaded component, for a `wasm` function.
    pub wasm: crate::wasm::WasmSlot,
    pub outbound: Arc<Vec<nimbus_core::outbound::OutboundRule>>,
}

impl Pool {
    pub fn new(function: String, version: u32, config: FunctionConfig, code_dir: PathBuf) -> Pool {
        Pool {
            outbound: Arc::new(config.wasm.allowed_outbound_hosts.clone()),
            metrics: crate::metering::PoolMetrics::new(&function, version),
            function,
            version,
            slots: Arc::new(Semaphore::new(config.concurrency.max_instances as usize)),
            config,
            code_dir,
            idle: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            registry: Mutex::new(BTreeMap::new()),
            starting: AtomicUsize::new(0),
            wasm: Default::default(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops handing out this pool's instances and retires the idle ones now.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.retire_idle(|_| true);
    }

    /// Instances that exist or are being started.
    pub fn total(&self) -> usize {
        lock(&self.registry).len() + self.starting.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Records a new instance as busy (it is about to serve the call that started it)
    /// or idle (provisioned).
    pub fn register(&self, live: &Live, state: State) {
        let now = Instant::now();
        lock(&self.registry).insert(
            live.id().to_string(),
            Meta {
                state,
                created: now,
                last_used: now,
                invocations: 0,
                memory_file: live.memory_file(),
            },
        );
    }

    /// The warmest idle instance that is still alive and silent, resumed (idle
    /// instances are suspended: see `checkin`); the others are retired on the way, and
    /// the caller never hears of them.
    pub fn checkout(&self) -> Option<Live> {
        loop {
            let mut candidate = lock(&self.idle).pop()?;
            if usable(&mut candidate) {
                match candidate.sandbox().resume() {
                    Ok(()) => {
                        self.set_state(candidate.id(), State::Busy, false);
                        return Some(candidate);
                    }
                    Err(e) => {
                        tracing::warn!(id = candidate.id(), error = %e, "cannot resume an idle instance; retiring it");
                    }
                }
            }
            self.retire(candidate);
        }
    }

    /// Returns an instance after a successful invocation (or its start-up), suspended:
    /// nothing in it runs, or is billed, until the next `checkout`.
    pub fn checkin(&self, mut live: Live, served: bool) {
        live.last_used = Instant::now();
        if served {
            live.invocations += 1;
        }
        if self.is_draining() {
            self.retire(live);
            return;
        }
        if let Err(e) = live.sandbox().suspend() {
            // An instance that could keep running between invocations is not reused.
            tracing::warn!(id = live.id(), error = %e, "cannot suspend an idle instance; retiring it");
            self.retire(live);
            return;
        }
        self.set_state(live.id(), State::Idle, served);
        lock(&self.idle).push(live);
    }

    fn set_state(&self, id: &str, state: State, served: bool) {
        if let Some(m) = lock(&self.registry).get_mut(id) {
            m.state = state;
            m.last_used = Instant::now();
            if served {
                m.invocations += 1;
            }
        }
    }

    /// Forgets an instance and disposes of it off the async threads.
    pub fn retire(&self, live: Live) {
        lock(&self.registry).remove(live.id());
        dispose(vec![live]);
    }

    /// Retires the idle instances `pick` selects (it sees them oldest-used first).
    pub fn retire_idle(&self, mut pick: impl FnMut(&Live) -> bool) -> usize {
        let gone: Vec<Live> = {
            let mut idle = lock(&self.idle);
            let (gone, keep): (Vec<Live>, Vec<Live>) = idle.drain(..).partition(|l| pick(l));
            *idle = keep;
            gone
        };
        let n = gone.len();
        {
            let mut reg = lock(&self.registry);
            for l in &gone {
                reg.remove(l.id());
            }
        }
        dispose(gone);
        n
    }

    /// Idle instances that died on their own (crashed between invocations) or wrote to
    /// their channel while idle are retired.
    pub fn prune_dead(&self) {
        let mut dead = Vec::new();
        {
            let mut idle = lock(&self.idle);
            let mut keep = Vec::with_capacity(idle.len());
            for mut l in idle.drain(..) {
                if usable(&mut l) {
                    keep.push(l);
                } else {
                    dead.push(l);
                }
            }
            *idle = keep;
        }
        for l in dead {
            self.retire(l);
        }
    }

    pub fn infos(&self) -> Vec<InstanceInfo> {
        let draining = self.is_draining();
        lock(&self.registry)
            .iter()
            .map(|(id, m)| InstanceInfo {
                id: id.clone(),
                function: self.function.clone(),
                version: self.version,
                state: match (m.state, draining) {
                    (_, true) => "draining",
                    (State::Idle, _) => "idle",
                    (State::Busy, _) => "busy",
                }
                .to_string(),
                age_ms: m.created.elapsed().as_millis() as u64,
                idle_ms: (m.state == State::Idle).then(|| m.last_used.elapsed().as_millis() as u64),
                invocations: m.invocations,
                memory_bytes: m
                    .memory_file
                    .as_ref()
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .and_then(|t| t.trim().parse().ok()),
                memory_mb: self.config.memory_mb,
            })
            .collect()
    }

    /// Takes every idle instance out (shutdown, eviction).
    pub fn take_idle(&self) -> Vec<Live> {
        let gone: Vec<Live> = lock(&self.idle).drain(..).collect();
        let mut reg = lock(&self.registry);
        for l in &gone {
            reg.remove(l.id());
        }
        gone
    }
}

/// An idle instance may serve again: it lives, and nothing it wrote waits to be read
/// (a frame written between invocations would answer the next caller).
fn usable(live: &mut Live) -> bool {
    if !live.is_alive() {
        return false;
    }
    if live.has_stray_frame() {
        tracing::warn!(
            instance = live.id(),
            "an idle instance wrote to its channel; retired"
        );
        return false;
    }
    true
}

/// Kills and reaps instances off the async threads: that can block briefly.
pub(crate) fn dispose(lives: Vec<Live>) {
    if lives.is_empty() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn_blocking(move || drop(lives));
    } else {
        drop(lives);
    }
}
