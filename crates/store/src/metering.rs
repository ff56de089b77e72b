//! Metering: the record of every invocation, its logs, and the queries over them.
//!
//! The worker hands each finished invocation to [`Recorder`] through
//! [`nimbus_core::RecordSink`]. `record` only pushes onto a bounded queue and never
//! waits, because metering must never slow or fail an invocation. The queue is bounded
//! twice: by records (past it a record is dropped and counted,
//! [`RecorderStats::dropped`]) and by the bytes of the log bodies it holds (past it a
//! record is still queued, but its log body is replaced by a one-line notice and
//! counted, [`RecorderStats::log_bodies_dropped`]), so a chatty function costs the
//! server a bounded amount of memory and never its records. One dedicated thread
//! drains the queue and writes whatever has accumulated in one transaction (group
//! commit), so under load many records share one commit.
//!
//! # What is durable
//! Less than the rest of the store, on purpose. The recorder's connection runs with
//! `synchronous=NORMAL` (WAL): a written batch survives a crash of the process, but the
//! last batches before a power loss may be lost. Records still in the queue when the
//! process dies are lost too; [`Recorder::flush`] at shutdown writes them out.
//!
//! Retention ([`Retention`]) is enforced by [`Recorder::prune`], which the server calls
//! periodically; between calls the table may exceed its limits. Log bodies are also
//! bounded by bytes ([`LogRetention`]), in total and per function; the writer enforces
//! that in every batch's own transaction, oldest first, so the bodies kept never exceed
//! it by more than one batch.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nimbus_core::{InvocationRecord, RecordSink, Trigger};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod retention;

pub use retention::LogRetention;
use retention::LogUsage;

const MIB: f64 = 1024.0 * 1024.0;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// Bytes the WAL is truncated to after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 4 * 1024 * 1024;
/// Rows deleted per statement while pruning, so the write lock is released often.
const PRUNE_CHUNK: i64 = 10_000;
/// Memory sizes are recommended in steps of this many MB, the smallest allowed size
/// being one step.
pub const MEMORY_STEP_MB: u32 = 64;
/// Headroom over the observed p99 peak: 30%, and at least this many MB.
pub const HEADROOM_FACTOR: f64 = 1.3;
pub const HEADROOM_MIN_MB: f64 = 32.0;
/// A peak at or above this share of the limit counts as hitting it.
const LIMIT_HIT_SHARE: f64 = 0.95;

/// How much history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_rows: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderConfig {
    /// Records waiting to be written; past it, new ones are dropped.
    pub queue_capacity: usize,
    /// Bytes of log bodies queued or being written; past it, new records are queued
    /// without their log body.
    pub queue_bytes: u64,
    /// Most records written in one transaction.
    pub max_batch: usize,
    pub retention: Retention,
    pub log_retention: LogRetention,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            queue_capacity: 10_000,
            queue_bytes: 32 * 1024 * 1024,
            max_batch: 1_000,
            retention: Retention::default(),
            log_retention: LogRetention::default(),
        }
    }
}

/// Counters since the recorder started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecorderStats {
    /// Records stored.
    pub written: u64,
    /// Records dropped because the queue was full.
    pub dropped: u64,
    /// Records lost because their batch failed to commit.
    pub failed: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Records queued without their log body because the queue held too many bytes.
    pub log_bodies_dropped: u64,
    /// The bytes of those bodies.
    pub log_bytes_dropped: u64,
    /// Bytes of log bodies queued or being written now.
    pub queued_log_bytes: u64,
    /// Bytes of log bodies deleted to stay within [`LogRetention`].
    pub log_bytes_pruned: u64,
    /// Bytes of log bodies kept now (as of the last batch).
    pub log_bytes: u64,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    log_bodies_dropped: AtomicU64,
    log_bytes_dropped: AtomicU64,
    queued_log_bytes: AtomicU64,
    log_bytes_pruned: AtomicU64,
    log_bytes: AtomicU64,
}

/// The writer's connection and what it knows about the rows it wrote.
struct Writer {
    conn: Connection,
    usage: LogUsage,
    limits: LogRetention,
}

enum Msg {
    Record(Box<InvocationRecord>),
    /// Answered once everything queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// What [`Recorder::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub expired: u64,
    pub over_cap: u64,
}

/// Usage granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            _ => None,
        }
    }

    fn width_ms(self) -> i64 {
        match self {
            Bucket::Hour => HOUR_MS,
            Bucket::Day => DAY_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub function: Option<String>,
    /// Unix ms; records that started at or after it count.
    pub since_ms: i64,
    pub bucket: Option<Bucket>,
}

/// Usage of one function (in one bucket, when bucketed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub function: String,
    /// Start of the hour or day (UTC, unix ms) when bucketed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_start_ms: Option<i64>,
    pub invocations: u64,
    /// Invocations whose status was not `success`.
    pub errors: u64,
    pub cold_starts: u64,
    pub billed_ms: u64,
    pub gb_seconds: f64,
    /// Nearest-rank percentiles of `duration_ms`.
    pub duration_p50_ms: f64,
    pub duration_p99_ms: f64,
    /// Over the invocations whose peak was measured.
    pub peak_memory_avg_bytes: Option<u64>,
    pub peak_memory_max_bytes: Option<u64>,
    pub cpu_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogQuery {
    pub function: Option<String>,
    pub request_id: Option<String>,
    /// Unix ms; ignored when `after` is set.
    pub since_ms: Option<i64>,
    /// A cursor from an earlier [`LogPage`]: only newer entries.
    pub after: Option<i64>,
    pub limit: usize,
}

/// The captured output of one invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub cursor: i64,
    pub request_id: String,
    pub function: String,
    pub started_at_ms: i64,
    pub logs: String,
}

/// Entries in the order they were recorded, and the cursor to ask for what comes next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage {
    pub entries: Vec<LogEntry>,
    pub cursor: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A smaller size covers the observed peaks.
    Lower,
    /// The current size is already the smallest that covers them.
    Keep,
    /// Peaks reached the limit (or the cgroup killed instances): the true need is
    /// unknown, and more memory is suggested.
    Raise,
    /// No invocation had its peak memory measured.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub function: String,
    /// The size of the most recent invocation in the window.
    pub current_memory_mb: u32,
    pub recommended_memory_mb: Option<u32>,
    pub action: Action,
    pub invocations: u64,
    /// Invocations whose peak memory was measured.
    pub measured: u64,
    pub peak_p99_bytes: Option<u64>,
    pub peak_max_bytes: Option<u64>,
    pub gb_seconds: f64,
    /// GB-s the window would have cost less at the recommended size (negative for a
    /// raise: what it would have cost more).
    pub gb_seconds_saved: f64,
    pub reason: String,
}

/// The metering recorder: a [`RecordSink`] with a batching writer thread, and the
/// queries over what it wrote. Share it behind an `Arc`.
pub struct Recorder {
    tx: Mutex<Option<SyncSender<Msg>>>,
    counters: Arc<Counters>,
    writer: Arc<Mutex<Writer>>,
    reader: Mutex<Connection>,
    thread: Mutex<Option<JoinHandle<()>>>,
    retention: Retention,
    queue_bytes: u64,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("stats", &self.stats())
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Opens the database at `path` (applying pending migrations, like
    /// [`crate::Store::open`]) and starts the writer thread.
    pub fn open(path: &Path, config: RecorderConfig) -> Result<Recorder> {
        let mut conn = open_conn(path)?;
        crate::migrations::migrate(&mut conn)?;
        let usage = {
            let tx = conn.transaction()?;
            let usage = LogUsage::load(&tx)?;
            tx.commit()?;
            usage
        };
        let reader = open_conn(path)?;
        let writer = Arc::new(Mutex::new(Writer {
            conn,
            usage,
            limits: config.log_retention,
        }));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity.max(1));
        let thread = {
            let (conn, counters) = (Arc::clone(&writer), Arc::clone(&counters));
            let max_batch = config.max_batch.max(1);
            std::thread::Builder::new()
                .name("nimbus-metering".into())
                .spawn(move || write_loop(&rx, &conn, &counters, max_batch))
                .map_err(Error::SpawnRecorder)?
        };
        Ok(Recorder {
            tx: Mutex::new(Some(tx)),
            counters,
            writer,
            reader: Mutex::new(reader),
            thread: Mutex::new(Some(thread)),
            retention: config.retention,
            queue_bytes: config.queue_bytes,
        })
    }

    pub fn stats(&self) -> RecorderStats {
        let c = &self.counters;
        RecorderStats {
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            log_bodies_dropped: c.log_bodies_dropped.load(Ordering::Relaxed),
            log_bytes_dropped: c.log_bytes_dropped.load(Ordering::Relaxed),
            queued_log_bytes: c.queued_log_bytes.load(Ordering::Relaxed),
            log_bytes_pruned: c.log_bytes_pruned.load(Ordering::Relaxed),
            log_bytes: c.log_bytes.load(Ordering::Relaxed),
        }
    }

    /// Waits until every record queued before this call is written (or failed).
    /// Blocks: call it from a blocking context.
    pub fn flush(&self) {
        let Some(tx) = lock(&self.tx).clone() else {
            return;
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    /// Writes what is queued, stops the writer thread and refuses later records.
    pub fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(t) = lock(&self.thread).take() {
            // The thread only ends by draining the queue; a panic there has already
            // been counted as lost records.
            let _ = t.join();
        }
    }

    /// Deletes records older than `now_ms - max_age`, then the oldest ones beyond
    /// `max_rows`. Deletes in chunks, so the recorder's writes interleave.
    pub fn prune(&self, now_ms: i64) -> Result<PruneStats> {
        let max_age_ms = i64::try_from(self.retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut stats = PruneStats::default();
        loop {
            let n = self.write_tx(|tx| {
                Ok(tx.execute(
                    "DELETE FROM invocations WHERE rowid IN (
                         SELECT rowid FROM invocations WHERE started_at_ms < ?1 LIMIT ?2)",
                    params![cutoff, PRUNE_CHUNK],
                )?)
            })?;
            stats.expired += n as u64;
            if (n as i64) < PRUNE_CHUNK {
                break;
            }
        }
        let max_rows = i64::try_from(self.retention.max_rows).unwrap_or(i64::MAX);
        loop {
            let n = self.write_tx(|tx| {
                let count: i64 =
                    tx.query_row("SELECT count(*) FROM invocations", [], |r| r.get(0))?;
                let excess = (count - max_rows).clamp(0, PRUNE_CHUNK);
                if excess == 0 {
                    return Ok(0);
                }
                Ok(tx.execute(
                    "DELETE FROM invocations WHERE rowid IN (
                         SELECT rowid FROM invocations ORDER BY started_at_ms, rowid LIMIT ?1)",
                    [excess],
                )?)
            })?;
            stats.over_cap += n as u64;
            if (n as i64) < PRUNE_CHUNK {
                break;
            }
        }
        if stats.expired + stats.over_cap > 0 {
            // Their logs went with them (a trigger): count again what is kept.
            let mut w = lock(&self.writer);
            let tx = w.conn.transaction()?;
            let usage = LogUsage::load(&tx)?;
            tx.commit()?;
            self.counters
                .log_bytes
                .store(usage.total(), Ordering::Relaxed);
            w.usage = usage;
        }
        Ok(stats)
    }

    /// One invocation's record, with its logs.
    pub fn invocation(&self, request_id: &str) -> Result<Option<InvocationRecord>> {
        self.read(|tx| {
            let raw = tx
                .query_row(
                    "SELECT i.request_id, i.function, i.version, i.trigger, i.started_at_ms,
                            i.duration_ms, i.billed_ms, i.memory_mb, i.gb_seconds,
                            i.peak_memory_bytes, i.cpu_ms, i.cold_start, i.init_duration_ms,
                            i.status, i.error_type, COALESCE(l.logs, '')
                     FROM invocations i LEFT JOIN invocation_logs l ON l.request_id = i.request_id
                     WHERE i.request_id = ?1",
                    [request_id],
                    |r| {
                        Ok((
                            r.get::<_, String>(3)?,
                            InvocationRecord {
                                request_id: r.get(0)?,
                                function: r.get(1)?,
                                version: r.get(2)?,
                                trigger: Trigger::Api,
                                started_at_ms: r.get(4)?,
                                duration_ms: r.get(5)?,
                                billed_ms: r.get(6)?,
                                memory_mb: r.get(7)?,
                                gb_seconds: r.get(8)?,
                                peak_memory_bytes: r.get(9)?,
                                cpu_ms: r.get(10)?,
                                cold_start: r.get(11)?,
                                init_duration_ms: r.get(12)?,
                                status: r.get(13)?,
                                error_type: r.get(14)?,
                                logs: r.get(15)?,
                            },
                        ))
                    },
                )
                .optional()?;
            raw.map(|(trigger, mut rec)| {
                rec.trigger = serde_json::from_value(serde_json::Value::String(trigger)).map_err(
                    |source| Error::Corrupt {
                        what: format!("trigger of invocation `{}`", rec.request_id),
                        source,
                    },
                )?;
                Ok(rec)
            })
            .transpose()
        })
    }

    /// Whether any record of `function` is kept (a deleted function's usage still is).
    pub fn has_records(&self, function: &str) -> Result<bool> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM invocations WHERE function = ?1)",
                [function],
                |r| r.get(0),
            )?)
        })
    }

    /// Usage per function (and bucket), ordered by function then bucket.
    pub fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        let bucket = match q.bucket {
            None => "NULL".to_string(),
            Some(b) => format!("(started_at_ms / {w}) * {w}", w = b.width_ms()),
        };
        let filter = if q.function.is_some() {
            "WHERE function = ?2 AND started_at_ms >= ?1"
        } else {
            "WHERE started_at_ms >= ?1 AND ?2 IS NULL"
        };
        self.read(|tx| {
            let mut rows: Vec<UsageRow> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT function, {bucket} AS b, count(*), total(status <> 'success'),
                            total(cold_start), total(billed_ms), total(gb_seconds),
                            avg(peak_memory_bytes), max(peak_memory_bytes), total(cpu_ms)
                     FROM invocations {filter} GROUP BY function, b ORDER BY function, b"
                ))?;
                stmt.query_map(params![q.since_ms, q.function], |r| {
                    Ok(UsageRow {
                        function: r.get(0)?,
                        bucket_start_ms: r.get(1)?,
                        invocations: r.get::<_, i64>(2)? as u64,
                        errors: r.get::<_, f64>(3)? as u64,
                        cold_starts: r.get::<_, f64>(4)? as u64,
                        billed_ms: r.get::<_, f64>(5)? as u64,
                        gb_seconds: r.get(6)?,
                        duration_p50_ms: 0.0,
                        duration_p99_ms: 0.0,
                        peak_memory_avg_bytes: r
                            .get::<_, Option<f64>>(7)?
                            .map(|v| v.round() as u64),
                        peak_memory_max_bytes: r.get(8)?,
                        cpu_ms: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?
            };
            // Percentiles: walk each group's durations in order and pick the ranks,
            // without holding every duration in memory.
            let mut stmt = tx.prepare(&format!(
                "SELECT function, {bucket} AS b, duration_ms FROM invocations {filter}
                 ORDER BY function, b, duration_ms"
            ))?;
            let mut it = stmt.query(params![q.since_ms, q.function])?;
            let (mut gi, mut seen) = (0usize, 0u64);
            while let Some(r) = it.next()? {
                let function: String = r.get(0)?;
                let b: Option<i64> = r.get(1)?;
                let d: f64 = r.get(2)?;
                while gi < rows.len()
                    && (rows[gi].function != function || rows[gi].bucket_start_ms != b)
                {
                    gi += 1;
                    seen = 0;
                }
                let Some(row) = rows.get_mut(gi) else { break };
                seen += 1;
                if seen == nearest_rank(50.0, row.invocations) {
                    row.duration_p50_ms = d;
                }
                if seen == nearest_rank(99.0, row.invocations) {
                    row.duration_p99_ms = d;
                }
            }
            Ok(rows)
        })
    }

    /// Log entries, oldest first. Without `after`, the newest `limit` entries since
    /// `since_ms`; with it, the first `limit` entries recorded after that cursor.
    pub fn logs(&self, q: &LogQuery) -> Result<LogPage> {
        let limit = i64::try_from(q.limit.max(1)).unwrap_or(i64::MAX);
        let mut cond = vec![
            "(?1 IS NULL OR function = ?1)",
            "(?2 IS NULL OR request_id = ?2)",
        ];
        let (order, from) = match q.after {
            Some(after) => {
                cond.push("seq > ?3");
                ("ASC", Some(after))
            }
            None => {
                cond.push("(?4 IS NULL OR started_at_ms >= ?4)");
                ("DESC", None)
            }
        };
        let sql = format!(
            "SELECT seq, request_id, function, started_at_ms, logs FROM invocation_logs
             WHERE {} ORDER BY seq {order} LIMIT ?5",
            cond.join(" AND ")
        );
        self.read(|tx| {
            let mut entries: Vec<LogEntry> = {
                let mut stmt = tx.prepare(&sql)?;
                stmt.query_map(
                    params![q.function, q.request_id, from, q.since_ms, limit],
                    |r| {
                        Ok(LogEntry {
                            cursor: r.get(0)?,
                            request_id: r.get(1)?,
                            function: r.get(2)?,
                            started_at_ms: r.get(3)?,
                            logs: r.get(4)?,
                        })
                    },
                )?
                .collect::<rusqlite::Result<_>>()?
            };
            let cursor = match q.after {
                Some(after) => entries.last().map_or(after, |e| e.cursor),
                None => {
                    entries.reverse();
                    // Follow from "now": later entries of this query are all newer
                    // than the newest row of the table.
                    let max: Option<i64> =
                        tx.query_row("SELECT max(seq) FROM invocation_logs", [], |r| r.get(0))?;
                    max.unwrap_or(0).max(entries.last().map_or(0, |e| e.cursor))
                }
            };
            Ok(LogPage { entries, cursor })
        })
    }

    /// A memory size per function that invoked since `since_ms`, from the measured
    /// peaks (see [`recommend`]).
    pub fn recommendations(
        &self,
        since_ms: i64,
        function: Option<&str>,
    ) -> Result<Vec<Recommendation>> {
        struct Acc {
            current_mb: u32,
            latest_ms: i64,
            invocations: u64,
            billed_ms: u64,
            gb_seconds: f64,
            oom: u64,
            peaks: Vec<u64>,
        }
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT function, memory_mb, started_at_ms, billed_ms, gb_seconds,
                        peak_memory_bytes, status
                 FROM invocations WHERE started_at_ms >= ?1 AND (?2 IS NULL OR function = ?2)",
            )?;
            let mut it = stmt.query(params![since_ms, function])?;
            let mut by_fn: BTreeMap<String, Acc> = BTreeMap::new();
            while let Some(r) = it.next()? {
                let name: String = r.get(0)?;
                let memory_mb: u32 = r.get(1)?;
                let started: i64 = r.get(2)?;
                let acc = by_fn.entry(name).or_insert(Acc {
                    current_mb: memory_mb,
                    latest_ms: started,
                    invocations: 0,
                    billed_ms: 0,
                    gb_seconds: 0.0,
                    oom: 0,
                    peaks: Vec::new(),
                });
                if started >= acc.latest_ms {
                    acc.latest_ms = started;
                    acc.current_mb = memory_mb;
                }
                acc.invocations += 1;
                acc.billed_ms += r.get::<_, u64>(3)?;
                acc.gb_seconds += r.get::<_, f64>(4)?;
                if let Some(p) = r.get::<_, Option<u64>>(5)? {
                    acc.peaks.push(p);
                }
                if r.get_ref(6)?.as_str().is_ok_and(|s| s == "out_of_memory") {
                    acc.oom += 1;
                }
            }
            Ok(by_fn
                .into_iter()
                .map(|(name, mut a)| {
                    recommend(RecommendInput {
                        function: name,
                        current_mb: a.current_mb,
                        invocations: a.invocations,
                        billed_ms: a.billed_ms,
                        gb_seconds: a.gb_seconds,
                        oom_kills: a.oom,
                        peaks: &mut a.peaks,
                    })
                })
                .collect())
        })
    }

    fn write_tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut w = lock(&self.writer);
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = lock(&self.reader);
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

impl RecordSink for Recorder {
    fn record(&self, mut record: InvocationRecord) {
        let c = &self.counters;
        let mut bytes = record.logs.len() as u64;
        let queued = c.queued_log_bytes.fetch_add(bytes, Ordering::Relaxed);
        if bytes > 0 && queued.saturating_add(bytes) > self.queue_bytes {
            c.queued_log_bytes.fetch_sub(bytes, Ordering::Relaxed);
            c.log_bodies_dropped.fetch_add(1, Ordering::Relaxed);
            c.log_bytes_dropped.fetch_add(bytes, Ordering::Relaxed);
            record.logs = dropped_notice(bytes);
            bytes = record.logs.len() as u64;
            c.queued_log_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        let sent = match lock(&self.tx).as_ref() {
            Some(tx) => tx.try_send(Msg::Record(Box::new(record))),
            None => Err(TrySendError::Disconnected(Msg::Flush(
                std::sync::mpsc::channel().0,
            ))),
        };
        if sent.is_err() {
            c.queued_log_bytes.fetch_sub(bytes, Ordering::Relaxed);
            c.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a record keeps of a log body the queue had no room for: a reader of the logs
/// learns that output is missing, and how much.
fn dropped_notice(bytes: u64) -> String {
    format!("[nimbus: {bytes} bytes of output dropped: the log recorder was behind]\n")
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under these locks leaves nothing half-done: transactions roll back on drop.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn open_conn(path: &Path) -> Result<Connection> {
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    crate::enable_wal(&conn, path)?;
    // Metering is not an acknowledged write: surviving a process crash is enough.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_err)?;
    // A batch of large log bodies grows the WAL; without a limit the file keeps that
    // size after every checkpoint, outside any retention bound.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .map_err(open_err)?;
    Ok(conn)
}

/// Log bytes past which the writer stops adding records to a batch: a transaction's
/// size is what the WAL and the database file grow by before pruning frees pages.
const MAX_BATCH_LOG_BYTES: usize = 4 * 1024 * 1024;
/// How long the writer waits to fill a batch after the first record arrives.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(20);

fn write_loop(rx: &Receiver<Msg>, writer: &Mutex<Writer>, counters: &Counters, max_batch: usize) {
    // Ends when every sender is gone and the queue is drained.
    while let Ok(first) = rx.recv() {
        // Let a batch build up before taking it: waking per record would cost a
        // context switch per invocation (competing with functions for a core on a small
        // host), and committing per handful of records more CPU than the invocations.
        // A flush request is served at once.
        if matches!(first, Msg::Record(_)) {
            std::thread::sleep(COALESCE);
        }
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut log_bytes = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => {
                    log_bytes += r.logs.len();
                    batch.push(r);
                }
                // Everything before a flush marker is in `batch`: answer after writing.
                Msg::Flush(done) => flushes.push(done),
            }
            if batch.len() < max_batch && log_bytes < MAX_BATCH_LOG_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let bytes = log_bytes as u64;
            match write_batch(&mut lock(writer), &batch) {
                Ok(pruned) => {
                    counters.written.fetch_add(n, Ordering::Relaxed);
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                    counters
                        .log_bytes_pruned
                        .fetch_add(pruned, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.failed.fetch_add(n, Ordering::Relaxed);
                    // A full disk is logged once per change by the server's probe.
                    if !matches!(e, crate::Error::StorageFull(_)) {
                        tracing::error!(error = %e, records = n, "write invocation records");
                    }
                }
            }
            counters
                .log_bytes
                .store(lock(writer).usage.total(), Ordering::Relaxed);
            // Only now: memory held by a batch being written counts against the bound.
            drop(batch);
            counters
                .queued_log_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Writes a batch and prunes log bodies back within their bounds, in one transaction.
/// Returns the bytes pruned.
fn write_batch(w: &mut Writer, batch: &[Box<InvocationRecord>]) -> Result<u64> {
    let mut usage = w.usage.clone();
    let tx = w
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut inv = tx.prepare_cached(
            "INSERT OR IGNORE INTO invocations
               (request_id, function, version, trigger, started_at_ms, duration_ms, billed_ms,
                memory_mb, gb_seconds, peak_memory_bytes, cpu_ms, cold_start, init_duration_ms,
                status, error_type)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        let mut logs = tx.prepare_cached(
            "INSERT OR IGNORE INTO invocation_logs (request_id, function, started_at_ms, logs)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for r in batch {
            let inserted = inv.execute(params![
                r.request_id,
                r.function,
                r.version,
                trigger_name(r.trigger),
                r.started_at_ms,
                finite(r.duration_ms),
                i64::try_from(r.billed_ms).unwrap_or(i64::MAX),
                r.memory_mb,
                finite(r.gb_seconds),
                r.peak_memory_bytes
                    .map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
                r.cpu_ms.map(finite),
                r.cold_start,
                r.init_duration_ms.map(finite),
                r.status,
                r.error_type,
            ])?;
            // A repeated request id keeps its first record and its first logs.
            if inserted > 0 && !r.logs.is_empty() {
                logs.execute(params![r.request_id, r.function, r.started_at_ms, r.logs])?;
                usage.add(&r.function, r.logs.len() as u64);
            }
        }
    }
    let pruned = usage.enforce(&tx, w.limits)?;
    tx.commit()?;
    // Only a committed batch changes what is kept.
    w.usage = usage;
    Ok(pruned)
}

/// SQLite stores NaN as NULL, which the NOT NULL columns would refuse.
fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::Api => "api",
        Trigger::Http => "http",
        Trigger::Event => "event",
        Trigger::Cron => "cron",
        Trigger::Hook => "hook",
    }
}

/// 1-based nearest-rank index of percentile `p` among `n` sorted values.
pub fn nearest_rank(p: f64, n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    ((p / 100.0 * n as f64).ceil() as u64).clamp(1, n)
}

/// What [`recommend`] works from: one function's records in the window.
pub struct RecommendInput<'a> {
    pub function: String,
    pub current_mb: u32,
    pub invocations: u64,
    pub billed_ms: u64,
    pub gb_seconds: f64,
    pub oom_kills: u64,
    /// Measured peaks in bytes, any order (sorted in place).
    pub peaks: &'a mut [u64],
}

/// The smallest step (a multiple of [`MEMORY_STEP_MB`], at least one step) that holds
/// the p99 peak plus headroom (30%, at least 32 MB) and the largest peak seen. Never
/// above the current size, unless peaks reached the limit: then `raise` to at least
/// twice the current size.
pub fn recommend(input: RecommendInput<'_>) -> Recommendation {
    let RecommendInput {
        function,
        current_mb,
        invocations,
        billed_ms,
        gb_seconds,
        oom_kills,
        peaks,
    } = input;
    let mut rec = Recommendation {
        function,
        current_memory_mb: current_mb,
        recommended_memory_mb: None,
        action: Action::Unknown,
        invocations,
        measured: peaks.len() as u64,
        peak_p99_bytes: None,
        peak_max_bytes: None,
        gb_seconds,
        gb_seconds_saved: 0.0,
        reason: String::new(),
    };
    peaks.sort_unstable();
    let Some(&max) = peaks.last() else {
        rec.reason = if oom_kills > 0 {
            rec.action = Action::Raise;
            rec.recommended_memory_mb = Some(step_up(f64::from(current_mb) * 2.0));
            format!("{oom_kills} invocation(s) ran out of memory; no peak was measured")
        } else {
            "no invocation had its peak memory measured".into()
        };
        rec.gb_seconds_saved = saved(gb_seconds, billed_ms, rec.recommended_memory_mb);
        return rec;
    };
    let p99 = peaks[(nearest_rank(99.0, peaks.len() as u64) - 1) as usize];
    rec.peak_p99_bytes = Some(p99);
    rec.peak_max_bytes = Some(max);
    let p99_mb = p99 as f64 / MIB;
    let need_mb = (p99_mb * HEADROOM_FACTOR)
        .max(p99_mb + HEADROOM_MIN_MB)
        .max(max as f64 / MIB);
    let fit = step_up(need_mb);
    let hit_limit = max as f64 >= f64::from(current_mb) * MIB * LIMIT_HIT_SHARE;
    if oom_kills > 0 || hit_limit {
        let to = fit.max(step_up(f64::from(current_mb) * 2.0));
        rec.action = Action::Raise;
        rec.recommended_memory_mb = Some(to);
        rec.reason = if oom_kills > 0 {
            format!("{oom_kills} invocation(s) ran out of memory at {current_mb} MB")
        } else {
            format!(
                "peak memory {:.0} MB reached the {current_mb} MB limit",
                max as f64 / MIB
            )
        };
    } else if fit < current_mb {
        rec.action = Action::Lower;
        rec.recommended_memory_mb = Some(fit);
        rec.reason = format!(
            "p99 peak {p99_mb:.0} MB fits in {fit} MB with headroom ({} MB max seen)",
            (max as f64 / MIB).ceil()
        );
    } else {
        rec.action = Action::Keep;
        rec.recommended_memory_mb = Some(current_mb);
        rec.reason = format!("p99 peak {p99_mb:.0} MB needs the current {current_mb} MB");
    }
    rec.gb_seconds_saved = saved(gb_seconds, billed_ms, rec.recommended_memory_mb);
    rec
}

fn step_up(mb: f64) -> u32 {
    let step = f64::from(MEMORY_STEP_MB);
    let max = f64::from(nimbus_core::manifest::MEMORY_MAX_MB);
    let steps = (mb / step).ceil().max(1.0);
    (steps * step).min(max) as u32
}

fn saved(gb_seconds: f64, billed_ms: u64, at_mb: Option<u32>) -> f64 {
    match at_mb {
        Some(mb) => gb_seconds - InvocationRecord::gb_seconds(mb, billed_ms),
        None => 0.0,
    }
}

#[cfg(test)]
mod tests;
