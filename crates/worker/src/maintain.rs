//! The pool maintainer: scale to zero, provisioned concurrency, draining.
//!
//! Runs twice a second and on every store change. Everything it does is also safe to
//! skip: an invocation never waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nimbus_core::Target;

use crate::pool::{Pool, State};
use crate::{Inner, lock};

const TICK: Duration = Duration::from_millis(500);

pub(crate) async fn run(inner: Arc<Inner>) {
    let mut changes = inner.catalog.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            _ = tick.tick() => false,
            _ = inner.stems.used.notified() => {
                crate::spawn::refill(&inner);
                continue;
            }
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                true
            }
        };
        if inner.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        let Some(live) = live_versions(&inner).await else {
            continue;
        };
        if changed {
            drain_stale(&inner, &live).await;
        }
        let pools: Vec<Arc<Pool>> = lock(&inner.pools).values().cloned().collect();
        for pool in &pools {
            if pool.config.runtime == nimbus_core::Runtime::Wasm {
                if min_for(pool, &live) == 0 {
                    let idle = Duration::from_millis(pool.config.concurrency.idle_timeout_ms);
                    if pool.wasm.unload_idle(idle) {
                        tracing::debug!(function = %pool.function, version = pool.version, "wasm component unloaded");
                    }
                }
                continue;
            }
            pool.prune_dead();
            scale_down(pool, min_for(pool, &live));
        }
        let infos: Vec<_> = pools.iter().flat_map(|p| p.infos()).collect();
        crate::metering::report_instances(&infos);
        crate::spawn::refill(&inner);
        provision(&inner, &live).await;
        retire_leftovers(&inner).await;
    }
}

/// Each function's live version and its aliased versions.
struct Aliased {
    live: Option<u32>,
    all: BTreeSet<u32>,
}

async fn live_versions(inner: &Arc<Inner>) -> Option<BTreeMap<String, Aliased>> {
    match inner.catalog.aliased_versions().await {
        Ok(functions) => Some(
            functions
                .into_iter()
                .map(|f| {
                    let aliased = Aliased {
                        live: f.live,
                        all: f.aliased.into_iter().collect(),
                    };
                    (f.function, aliased)
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "pool maintainer: read functions");
            None
        }
    }
}

/// Provisioned concurrency applies to the version `live` points at.
fn min_for(pool: &Pool, live: &BTreeMap<String, Aliased>) -> usize {
    match live.get(&pool.function) {
        Some(a) if a.live == Some(pool.version) && !pool.is_draining() => {
            pool.config.concurrency.min_instances as usize
        }
        _ => 0,
    }
}

/// Drains pools whose function is gone, whose version no alias points at any more
/// (a deploy or an alias move), or whose config changed (`nimbus scale`).
async fn drain_stale(inner: &Arc<Inner>, live: &BTreeMap<String, Aliased>) {
    let pools: Vec<((String, u32), Arc<Pool>)> = lock(&inner.pools)
        .iter()
        .map(|(k, p)| (k.clone(), Arc::clone(p)))
        .collect();
    for ((function, version), pool) in pools {
        let stale = match live.get(&function) {
            None => true,
            Some(a) => !a.all.contains(&version) || config_changed(inner, &pool).await,
        };
        if stale {
            let mut map = lock(&inner.pools);
            if map
                .get(&(function.clone(), version))
                .is_some_and(|p| Arc::ptr_eq(p, &pool))
            {
                map.remove(&(function.clone(), version));
            }
            drop(map);
            pool.drain();
            tracing::debug!(%function, version, "draining pool");
        }
    }
}

async fn config_changed(inner: &Arc<Inner>, pool: &Arc<Pool>) -> bool {
    match inner.catalog.version(&pool.function, pool.version).await {
        Ok(Some(row)) => row.config != pool.config,
        Ok(None) => true,
        // Unknown is not stale: a pool is only drained on evidence.
        Err(_) => false,
    }
}

/// Retires idle instances past the idle timeout, oldest first, keeping `min`.
fn scale_down(pool: &Pool, min: usize) {
    let idle_for = Duration::from_millis(pool.config.concurrency.idle_timeout_ms);
    let mut total = pool.total();
    let n = pool.retire_idle(|l| {
        if total > min && l.last_used.elapsed() >= idle_for {
            total -= 1;
            true
        } else {
            false
        }
    });
    if n > 0 {
        tracing::debug!(function = %pool.function, version = pool.version, n, "scaled down");
    }
}

/// Instance cgroups that would not go when their instance did (a function removed
/// while a task was still leaving) are retried every tick until they are gone.
async fn retire_leftovers(inner: &Arc<Inner>) {
    let host = Arc::clone(&inner.host);
    if let Ok(left) = tokio::task::spawn_blocking(move || host.retire_leftovers()).await
        && left > 0
    {
        tracing::debug!(left, "instance cgroups still to remove");
    }
}

/// Starts instances until each live version has its `min_instances`.
async fn provision(inner: &Arc<Inner>, live: &BTreeMap<String, Aliased>) {
    for (function, a) in live {
        if a.live.is_none() {
            continue;
        }
        // Resolving through the cache is cheap, and creates the pool if needed.
        let pool = match inner
            .pool_for(function, &Target::Alias("live".into()))
            .await
        {
            Ok(p) => p,
            Err(_) => continue,
        };
        let min = pool.config.concurrency.min_instances as usize;
        if pool.config.runtime == nimbus_core::Runtime::Wasm {
            // Nothing to start: keeping the component loaded is a wasm function's
            // provisioned concurrency.
            if min > 0
                && !pool.wasm.is_loaded()
                && let Err(e) = inner.wasm_app(&pool).await
            {
                tracing::warn!(function = %pool.function, error = %e, "loading a wasm component failed");
            }
            continue;
        }
        let missing = min.saturating_sub(pool.total());
        for _ in 0..missing {
            // Deploys keep floors within the budget; cold instances of other functions
            // may hold it for now, and the next tick tries again.
            let Some(share) = inner.cfg.capacity.try_reserve(pool.config.memory_mb) else {
                tracing::debug!(function = %pool.function, "provisioning waits for the host's budget");
                break;
            };
            let inner = Arc::clone(inner);
            let pool = Arc::clone(&pool);
            pool.starting.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let started = inner.start_instance(&pool, share).await;
                match started {
                    Ok(live) => {
                        pool.register(&live, State::Idle);
                        pool.starting.fetch_sub(1, Ordering::SeqCst);
                        pool.checkin(live, false);
                    }
                    Err((status, _)) => {
                        pool.starting.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(
                            function = %pool.function,
                            status = status.code(),
                            "provisioning an instance failed"
                        );
                    }
                }
            });
        }
    }
}
