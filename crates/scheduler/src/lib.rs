//! nimbus-scheduler: runs async invocations and cron triggers.
//!
//! Owns: the dispatcher ([`dispatch`]), which claims due invocations from the event
//! log's queue, runs them through `Arc<dyn Invoker>`, retries and records them and
//! publishes their destination records; and the cron loop ([`cron`]), which turns
//! the `[[cron]]` specs of every function's `live` version into fires.
//!
//! Must not touch: instances (it invokes through the `Invoker` trait), the network,
//! or configuration (it takes a [`SchedulerConfig`]).
//!
//! # Guarantees
//! - An accepted async invocation (its 202 is sent only after the row is durable) runs
//!   **at least once** unless it expires (older than its max event age, default and
//!   maximum 6 h) before an attempt. A crash during an attempt requeues it at
//!   start-up, so it may run twice; functions should be idempotent, as on Lambda.
//! - A function error, timeout, crash or OOM is retried up to `max_retries` times (0
//!   to 2, default 2) with exponential backoff and full jitter. Lambda waits 1 min then
//!   2 min; here the base delay is [`SchedulerConfig::retry_base`] (default 1 s, capped
//!   at [`SchedulerConfig::retry_max`], default 1 min) so that retries are usable in
//!   development and tests. A throttled attempt (429) is requeued with backoff and does
//!   not count as an attempt.
//! - A cron fire is enqueued **at most once** per scheduled time (the fire record's key
//!   is the scheduled time, written in the same commit as the invocation), and **at
//!   least once** unless `catch_up = false` (a fire missed while the server was down is
//!   then skipped) or `overlap = "skip"` skips it because the previous run is still
//!   queued or running. However many fires were missed during downtime, one catch-up
//!   fire (the latest) runs at start-up.
#![forbid(unsafe_code)]

pub mod cron;
pub mod dispatch;

use std::sync::Arc;
use std::time::Duration;

use nimbus_core::Invoker;
use nimbus_store::Store;
use nimbus_store::events::EventLog;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use nimbus_store::events::{DEFAULT_MAX_RETRIES, MAX_EVENT_AGE_MS};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Invocations running at once; the worker's own per-function limit (429) and
    /// the requeue take care of the rest.
    pub max_in_flight: usize,
    /// First retry delay after a failed attempt; doubles per attempt, with jitter.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Cap of the backoff after throttled attempts.
    pub throttle_max: Duration,
    /// Results larger than this are not kept in the invocation's status.
    pub max_result_bytes: usize,
    /// Finished invocations and old cron fires are forgotten after this long.
    pub keep_finished: Duration,
    pub region: String,
    pub account: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_in_flight: 64,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            throttle_max: Duration::from_secs(300),
            max_result_bytes: 64 * 1024,
            keep_finished: Duration::from_secs(7 * 86_400),
            region: "local".into(),
            account: "000000000000".into(),
        }
    }
}

/// Starts the dispatcher and the cron loop. Both stop when `stop` turns true; the
/// dispatcher's handle resolves once its in-flight invocations finished.
pub fn spawn(
    cfg: SchedulerConfig,
    store: Arc<Store>,
    log: Arc<EventLog>,
    invoker: Arc<dyn Invoker>,
    stop: watch::Receiver<bool>,
) -> (JoinHandle<()>, JoinHandle<()>) {
    let cfg = Arc::new(cfg);
    let d = tokio::spawn(dispatch::run(
        Arc::clone(&cfg),
        Arc::clone(&log),
        invoker,
        stop.clone(),
    ));
    let c = tokio::spawn(cron::run(cfg, store, log, stop));
    (d, c)
}
