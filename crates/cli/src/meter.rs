//! `serve`'s metering wiring: the invocation recorder, the Prometheus exporter behind
//! `GET /metrics` (the admin token or a `metrics`-scoped API key: it names every
//! function and route), and the periodic housekeeping (histogram upkeep, retention),
//! and the persistence of API key quota counters.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nimbus_store::{LogRetention, Recorder, RecorderConfig, Retention};

/// Latency buckets (seconds) for every `*_seconds` histogram: warm invocations take
/// milliseconds, cold starts hundreds of them, timeouts up to 15 minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0,
];

/// How often retention is enforced.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often histograms are compacted (the exporter needs it without its own listener).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Args, Clone)]
pub struct MeteringArgs {
    /// Keep invocation records and logs this long.
    #[arg(long, env = "NIMBUS_METERING_RETENTION", default_value = "7d")]
    pub metering_retention: String,
    /// Keep at most this many invocation records (the oldest go first).
    #[arg(long, env = "NIMBUS_METERING_MAX_ROWS", default_value_t = 1_000_000)]
    pub metering_max_rows: u64,
    /// Keep at most this many bytes of function logs over all functions (the oldest
    /// go first; their invocation records stay). Default: a tenth of the data dir's
    /// filesystem.
    #[arg(long, env = "NIMBUS_LOG_RETENTION_BYTES")]
    pub log_retention_bytes: Option<u64>,
    /// Keep at most this many bytes of one function's logs. Default: a quarter of
    /// --log-retention-bytes.
    #[arg(long, env = "NIMBUS_LOG_RETENTION_FUNCTION_BYTES")]
    pub log_retention_function_bytes: Option<u64>,
    /// Bytes of function logs waiting to be written; past it, new invocations are
    /// recorded without their logs (counted in
    /// `nimbus_metering_log_bodies_dropped_total`).
    #[arg(long, env = "NIMBUS_METERING_QUEUE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub metering_queue_bytes: u64,
    /// How often topic retention (age and size bounds) runs.
    #[arg(
        long,
        env = "NIMBUS_TOPIC_RETENTION_INTERVAL",
        default_value = "30s",
        hide = true
    )]
    pub topic_retention_interval: String,
}

/// Opens the recorder on the state database (its own connections and writer thread).
pub fn open_recorder(db: &std::path::Path, args: &MeteringArgs) -> anyhow::Result<Arc<Recorder>> {
    let max_age = nimbus_core::duration::parse_duration(&args.metering_retention)
        .map_err(|e| anyhow::anyhow!("--metering-retention: {e}"))?;
    let log_retention = log_retention(db, args)?;
    tracing::info!(
        total_bytes = log_retention.max_bytes,
        per_function_bytes = log_retention.max_bytes_per_function,
        "log retention"
    );
    let config = RecorderConfig {
        retention: Retention {
            max_age,
            max_rows: args.metering_max_rows,
        },
        queue_bytes: args.metering_queue_bytes,
        log_retention,
        ..RecorderConfig::default()
    };
    Ok(Arc::new(
        Recorder::open(db, config).context("open the metering recorder")?,
    ))
}

/// The share of the data dir's filesystem that logs may take by default.
const LOG_SHARE_OF_DISK: u64 = 10;
/// The share of the total one function's logs may take by default.
const LOG_SHARE_PER_FUNCTION: u64 = 4;

/// The byte bounds on kept logs: the flags, or shares of the filesystem holding `db`.
fn log_retention(db: &std::path::Path, args: &MeteringArgs) -> anyhow::Result<LogRetention> {
    let max_bytes = match args.log_retention_bytes {
        Some(b) => b,
        None => {
            let dir = db.parent().unwrap_or(db);
            let fs = nix::sys::statvfs::statvfs(dir)
                .with_context(|| format!("measure the filesystem of {}", dir.display()))?;
            let size = fs.blocks().saturating_mul(fs.fragment_size());
            size / LOG_SHARE_OF_DISK
        }
    };
    let max_bytes_per_function = args
        .log_retention_function_bytes
        .unwrap_or(max_bytes / LOG_SHARE_PER_FUNCTION)
        .min(max_bytes);
    Ok(LogRetention {
        max_bytes,
        max_bytes_per_function,
    })
}

/// Installs the process-wide metrics recorder; call once.
pub fn install_exporter() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("configure metric buckets")?
        .install_recorder()
        .context("install the metrics recorder")
}

#[derive(Clone)]
struct MetricsState {
    /// Whose credentials `/metrics` takes: the platform API's check.
    auth: nimbus_gateway::GatewayState,
    prometheus: PrometheusHandle,
    recorder: Arc<Recorder>,
    events: Arc<nimbus_store::events::EventLog>,
}

/// `GET /metrics`, to be merged outside the admin-token layer.
pub fn router(
    auth: nimbus_gateway::GatewayState,
    prometheus: PrometheusHandle,
    recorder: Arc<Recorder>,
    events: Arc<nimbus_store::events::EventLog>,
) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(render))
        .with_state(MetricsState {
            auth,
            prometheus,
            recorder,
            events,
        })
}

async fn render(State(st): State<MetricsState>, parts: http::request::Parts) -> Response {
    if let Err(refused) = nimbus_gateway::platform_auth(&st.auth, &parts, "metrics", "") {
        return *refused;
    }
    let s = st.recorder.stats();
    metrics::counter!("nimbus_metering_records_written_total").absolute(s.written);
    metrics::counter!("nimbus_metering_records_dropped_total").absolute(s.dropped);
    metrics::counter!("nimbus_metering_records_failed_total").absolute(s.failed);
    metrics::counter!("nimbus_metering_log_bodies_dropped_total").absolute(s.log_bodies_dropped);
    metrics::counter!("nimbus_metering_log_bytes_dropped_total").absolute(s.log_bytes_dropped);
    metrics::counter!("nimbus_metering_log_bytes_pruned_total").absolute(s.log_bytes_pruned);
    metrics::gauge!("nimbus_metering_queued_log_bytes").set(s.queued_log_bytes as f64);
    metrics::gauge!("nimbus_metering_log_bytes").set(s.log_bytes as f64);
    let e = st.events.stats();
    metrics::counter!("nimbus_eventlog_commits_total").absolute(e.commits);
    metrics::counter!("nimbus_eventlog_jobs_total").absolute(e.jobs);
    metrics::counter!("nimbus_eventlog_failed_commits_total").absolute(e.failed_commits);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        st.prometheus.render(),
    )
        .into_response()
}

/// Histogram upkeep and retention, until aborted.
pub fn spawn_housekeeping(
    prometheus: PrometheusHandle,
    recorder: Arc<Recorder>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = upkeep.tick() => prometheus.run_upkeep(),
                _ = prune.tick() => {
                    let r = Arc::clone(&recorder);
                    let now = chrono::Utc::now().timestamp_millis();
                    match tokio::task::spawn_blocking(move || r.prune(now)).await {
                        Ok(Ok(s)) if s.expired + s.over_cap > 0 => tracing::info!(
                            expired = s.expired,
                            over_cap = s.over_cap,
                            "pruned invocation records"
                        ),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "prune invocation records"),
                        Err(e) => tracing::error!(error = %e, "prune task panicked"),
                    }
                }
            }
        }
    })
}

/// How often the gateway's changed quota counters are written to the store: the most
/// counting a crash can lose.
const QUOTA_WRITE_EVERY: Duration = Duration::from_secs(1);

/// Seeds the gateway's quota counters from the store, then writes changed ones back
/// every second until aborted.
pub async fn spawn_quota_writer(
    store: Arc<nimbus_store::Store>,
    quotas: Arc<nimbus_gateway::Quotas>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let s = Arc::clone(&store);
    let counted = tokio::task::spawn_blocking(move || s.current_key_usage(nimbus_core::now_ms()))
        .await
        .context("join")??;
    quotas.seed(counted.into_iter().map(|u| {
        (
            u.key_id,
            nimbus_gateway::Counted {
                period_start_ms: u.period_start_ms,
                count: u.count,
            },
        )
    }));
    Ok(tokio::spawn(async move {
        let mut every = tokio::time::interval(QUOTA_WRITE_EVERY);
        loop {
            every.tick().await;
            write_quotas(Arc::clone(&store), &quotas).await;
        }
    }))
}

/// Writes the quota counters changed since the last write.
pub async fn write_quotas(store: Arc<nimbus_store::Store>, quotas: &nimbus_gateway::Quotas) {
    let changed: Vec<nimbus_store::KeyUsage> = quotas
        .drain_changed()
        .into_iter()
        .map(|(key_id, c)| nimbus_store::KeyUsage {
            key_id,
            period_start_ms: c.period_start_ms,
            count: c.count,
        })
        .collect();
    if changed.is_empty() {
        return;
    }
    let n = changed.len();
    match tokio::task::spawn_blocking(move || {
        store.record_key_usage(&changed, nimbus_core::now_ms())
    })
    .await
    {
        Ok(Ok(())) => {}
        // The counts stay in memory and the next change writes them (absolute values).
        // A full disk is logged once per change by the storage probe, not every second.
        Ok(Err(nimbus_store::Error::StorageFull(_))) => {}
        Ok(Err(e)) => tracing::error!(error = %e, keys = n, "write API key quota counters"),
        Err(e) => tracing::error!(error = %e, "quota writer task panicked"),
    }
}

/// Topic retention (age and size bounds), until aborted.
pub fn spawn_event_retention(
    events: Arc<nimbus_store::events::EventLog>,
    args: &MeteringArgs,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let period = nimbus_core::duration::parse_duration(&args.topic_retention_interval)
        .map_err(|e| anyhow::anyhow!("--topic-retention-interval: {e}"))?
        .max(Duration::from_millis(10));
    Ok(tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        loop {
            every.tick().await;
            match events.prune(nimbus_core::now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "topic retention"),
                Err(e) => tracing::error!(error = %e, "topic retention"),
            }
        }
    }))
}

/// Writes out the records still queued; call once the worker has stopped.
pub async fn flush(recorder: Arc<Recorder>) {
    let _ = tokio::task::spawn_blocking(move || recorder.close()).await;
}
