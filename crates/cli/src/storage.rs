//! Whether the data dir has room to write: a probe of its filesystem every 500 ms,
//! behind `/health` (`degraded` while full), the `nimbus_storage_full` gauge and one
//! log line per change. The answers themselves (507 `insufficient_storage`) come from
//! the failed writes; this is what monitoring sees between them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use tokio::sync::watch;

const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Below this much free space SQLite cannot be counted on to commit (a transaction
/// writes its pages to the WAL first): reported as full.
const RESERVE_BYTES: u64 = 1 << 20;

/// Free bytes for this process on the filesystem holding `dir`: root may use the
/// blocks reserved for it, others may not.
// fsblkcnt_t and c_ulong are u64 here but narrower on 32-bit targets.
#[allow(clippy::useless_conversion)]
fn free_bytes(dir: &Path) -> nix::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir)?;
    let blocks = if nix::unistd::geteuid().is_root() {
        s.blocks_free()
    } else {
        s.blocks_available()
    };
    Ok(u64::from(blocks).saturating_mul(u64::from(s.fragment_size())))
}

fn is_full(free: u64) -> bool {
    free < RESERVE_BYTES
}

/// Starts the probe; the receiver says whether the data dir is full now.
pub fn spawn_probe(data_dir: PathBuf) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    metrics::gauge!("nimbus_storage_full").set(0.0);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let dir = data_dir.clone();
            let Ok(probed) = tokio::task::spawn_blocking(move || free_bytes(&dir)).await else {
                continue;
            };
            let free = match probed {
                Ok(free) => free,
                Err(e) => {
                    tracing::debug!(error = %e, "statvfs of the data dir");
                    continue;
                }
            };
            let full = is_full(free);
            metrics::gauge!("nimbus_storage_free_bytes").set(free as f64);
            if full == *tx.borrow() {
                continue;
            }
            metrics::gauge!("nimbus_storage_full").set(if full { 1.0 } else { 0.0 });
            if full {
                tracing::error!(data_dir = %data_dir.display(), free, "the data dir is full: writes answer 507 until space is freed");
            } else {
                tracing::info!(data_dir = %data_dir.display(), free, "the data dir has room again: writes accepted");
            }
            let _ = tx.send(full);
        }
    });
    rx
}

/// `GET /health`: 200 either way, so a load balancer keeps sending what still works
/// (sync invokes need no write); the body says `degraded` while the disk is full.
pub fn health_router(full: watch::Receiver<bool>) -> Router {
    Router::new().route(
        "/health",
        axum::routing::get(move || {
            let full = *full.borrow();
            async move { (StatusCode::OK, health_body(full)) }
        }),
    )
}

fn health_body(full: bool) -> &'static str {
    if full {
        "degraded: the data dir is full (writes answer 507 insufficient_storage)\n"
    } else {
        "ok\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_below_the_reserve() {
        assert!(is_full(0));
        assert!(is_full(RESERVE_BYTES - 1));
        assert!(!is_full(RESERVE_BYTES));
        assert_eq!(health_body(false), "ok\n");
        assert!(health_body(true).starts_with("degraded"));
    }

    #[test]
    fn free_bytes_of_a_real_dir() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(free_bytes(tmp.path()).expect("statvfs") > 0);
    }
}
