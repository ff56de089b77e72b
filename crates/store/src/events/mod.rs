//! The event log: topics, their events, subscriptions' delivery state, the async
//! invocation queue and cron fire records, in their own SQLite file (`events.db`).
//!
//! # What is durable, and when
//! A write through [`EventLog::write`] returns only after its transaction committed
//! under `journal_mode=WAL` + `synchronous=FULL`, i.e. after the WAL was fsynced: an
//! acknowledged publish survives SIGKILL and power loss (the same setting is read back
//! at open, and the log refuses to run without it). Writes are group-committed: one
//! thread owns the write connection and runs every job that queued while the previous
//! commit was being fsynced in one transaction, each job inside its own savepoint (a
//! failing job rolls back alone). So N concurrent producers cost one fsync, not N.
//!
//! The log lives apart from `state.db` so its fsync cadence and write lock do not
//! contend with deploys and metering, and so a second backend (PostgreSQL, NATS
//! JetStream) can replace this one file's worth of state behind the same calls.
//!
//! Readers use their own connections (WAL readers never block the writer).

mod cron;
mod invocations;
mod subscriptions;
mod topics;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{oneshot, watch};

use crate::{Error, Result};

pub use cron::{CronFire, FireKind, FireOutcome, cron_invocation};
pub use invocations::{
    DEFAULT_MAX_RETRIES, Finish, InvocationRow, InvocationState, MAX_EVENT_AGE_MS, NewInvocation,
};
pub use subscriptions::{
    DeliveryState, Settled, SubscriptionRow, SubscriptionSource, Update, settled_prefix,
};
pub use topics::{
    Appended, DEFAULT_DEDUP_WINDOW_MS, NewEvent, StoredEvent, TopicInfo, TopicSettings,
};

/// Jobs run in one transaction at most; more wait for the next commit.
const MAX_JOBS_PER_COMMIT: usize = 4096;
/// Reader connections kept open.
const READERS: usize = 4;

type JobFn = Box<dyn FnOnce(&Transaction<'_>) -> Result<Box<dyn Any + Send>> + Send>;

struct Job {
    run: JobFn,
    reply: oneshot::Sender<Result<Box<dyn Any + Send>>>,
}

/// Schema steps of `events.db` (append-only, as for `state.db`).
const MIGRATIONS: &[&str] = &[
    // 1: topics and their events; per-topic offsets are dense and never reused.
    r#"
    CREATE TABLE topics (
        name             TEXT PRIMARY KEY NOT NULL,
        retention_ms     INTEGER NOT NULL,
        max_bytes        INTEGER NOT NULL,
        dedup_window_ms  INTEGER NOT NULL,
        created_at_ms    INTEGER NOT NULL,
        next_offset      INTEGER NOT NULL DEFAULT 0,
        bytes            INTEGER NOT NULL DEFAULT 0,
        count            INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    -- A rowid table: rows arrive in rowid order (appends only touch the right edge
    -- of the tree) and 1 KB bodies stay out of the (topic, offset) index, which a
    -- WITHOUT ROWID table would make its leaves hold.
    CREATE TABLE events (
        seq              INTEGER PRIMARY KEY,
        topic            TEXT NOT NULL,
        offset           INTEGER NOT NULL,
        id               TEXT NOT NULL,
        key              TEXT,
        published_at_ms  INTEGER NOT NULL,
        size             INTEGER NOT NULL,
        body             BLOB NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX events_by_offset ON events (topic, offset);
    CREATE INDEX events_by_id ON events (topic, id, published_at_ms);
    "#,
    // 2: subscriptions and their delivery state. `cursor`: every offset below it is
    // settled. `epoch` moves on a reset, so outcomes of deliveries started before it
    // are recognised and ignored. `delivery_state` holds only offsets at or above
    // the cursor that are settled (`done`) or waiting for a retry (`retry`).
    r#"
    CREATE TABLE subscriptions (
        name             TEXT PRIMARY KEY NOT NULL,
        topic            TEXT NOT NULL,
        function         TEXT NOT NULL,
        alias            TEXT NOT NULL,
        filter           TEXT NOT NULL,
        batch            INTEGER NOT NULL,
        max_attempts     INTEGER NOT NULL,
        max_age_ms       INTEGER NOT NULL,
        dead_letter      TEXT,
        ordered          INTEGER NOT NULL,
        source           TEXT NOT NULL,
        cursor           INTEGER NOT NULL,
        epoch            INTEGER NOT NULL DEFAULT 0,
        created_at_ms    INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX subscriptions_by_topic ON subscriptions (topic);
    CREATE INDEX subscriptions_by_function ON subscriptions (function);
    CREATE TABLE delivery_state (
        subscription     TEXT NOT NULL,
        offset           INTEGER NOT NULL,
        state            TEXT NOT NULL,
        attempts         INTEGER NOT NULL,
        next_at_ms       INTEGER NOT NULL,
        last_error       TEXT,
        PRIMARY KEY (subscription, offset)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 3: the async invocation queue and cron fire records. A fire's primary key
    // (function, name, scheduled_ms) is what keeps one scheduled time from ever
    // enqueuing twice, across crashes included.
    r#"
    CREATE TABLE invocations (
        id             TEXT PRIMARY KEY NOT NULL,
        function       TEXT NOT NULL,
        target         TEXT NOT NULL,
        payload        BLOB NOT NULL,
        status         TEXT NOT NULL,
        attempts       INTEGER NOT NULL DEFAULT 0,
        throttles      INTEGER NOT NULL DEFAULT 0,
        max_attempts   INTEGER NOT NULL,
        max_age_ms     INTEGER NOT NULL,
        on_success     TEXT,
        on_failure     TEXT,
        source         TEXT NOT NULL,
        created_at_ms  INTEGER NOT NULL,
        next_at_ms     INTEGER NOT NULL,
        updated_at_ms  INTEGER NOT NULL,
        result         BLOB,
        error          TEXT
    ) STRICT;
    CREATE INDEX invocations_due ON invocations (status, next_at_ms);
    CREATE TABLE cron_state (
        function           TEXT NOT NULL,
        name               TEXT NOT NULL,
        last_scheduled_ms  INTEGER NOT NULL,
        PRIMARY KEY (function, name)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE cron_fires (
        function       TEXT NOT NULL,
        name           TEXT NOT NULL,
        scheduled_ms   INTEGER NOT NULL,
        kind           TEXT NOT NULL,
        invocation_id  TEXT,
        fired_at_ms    INTEGER NOT NULL,
        PRIMARY KEY (function, name, scheduled_ms)
    ) STRICT, WITHOUT ROWID;
    "#,
];

/// The event log; cheap to share (`Arc`).
pub struct EventLog {
    path: PathBuf,
    jobs: Mutex<Option<Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    changes: watch::Sender<u64>,
    /// Bumped only after a commit that changed the subscriptions table.
    subscription_changes: watch::Sender<u64>,
    stats: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    commits: std::sync::atomic::AtomicU64,
    jobs: std::sync::atomic::AtomicU64,
    failed_commits: std::sync::atomic::AtomicU64,
}

/// How group commit is doing: jobs per commit is the batching factor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub commits: u64,
    pub jobs: u64,
    pub failed_commits: u64,
}

impl EventLog {
    /// Opens (creating and migrating) `path` and starts the writer thread.
    pub fn open(path: &Path) -> Result<Arc<EventLog>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Unavailable(format!("create {}: {e}", dir.display())))?;
        }
        let mut conn = crate::open_configured(path)?;
        crate::migrations::migrate_steps(&mut conn, MIGRATIONS)?;
        // Checkpoints move to their own thread: run by the writer at commit (SQLite's
        // default), each one would copy megabytes into the database file and fsync it
        // while producers wait for their acks. Durability does not change: a commit is
        // durable once the WAL is fsynced. An 8 MiB page cache keeps the indexes'
        // upper levels in memory as the topic grows (64 MiB bought nothing more and
        // showed as 100 MiB of server RSS after a benchmark).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "cache_size", -8_192)?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        let checkpointer = crate::open_configured(path)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(crate::open_configured(path)?);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (changes, _) = watch::channel(0u64);
        let log = Arc::new(EventLog {
            path: path.to_path_buf(),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            readers: Mutex::new(readers),
            changes,
            subscription_changes: watch::channel(0u64).0,
            stats: Arc::default(),
        });
        let notify = log.changes.clone();
        let stats = Arc::clone(&log.stats);
        let handle = std::thread::Builder::new()
            .name("nimbus-eventlog".into())
            .spawn(move || writer_loop(conn, rx, notify, stats))
            .map_err(|e| Error::Unavailable(format!("start the writer: {e}")))?;
        *log.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("nimbus-eventlog-ckpt".into())
            .spawn(move || checkpoint_loop(checkpointer, weak))
            .map_err(|e| Error::Unavailable(format!("start the checkpointer: {e}")))?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `job` in the next group commit; returns once that commit is durable.
    pub async fn write<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let run: JobFn = Box::new(move |tx| job(tx).map(|v| Box::new(v) as Box<dyn Any + Send>));
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(sender) = jobs.as_ref() else {
                return Err(Error::Unavailable("closed".into()));
            };
            sender
                .send(Job { run, reply })
                .map_err(|_| Error::Unavailable("the writer stopped".into()))?;
        }
        let out = rx
            .await
            .map_err(|_| Error::Unavailable("the writer stopped".into()))??;
        out.downcast::<T>()
            .map(|b| *b)
            .map_err(|_| Error::Unavailable("a job returned another type".into()))
    }

    /// Runs a read on one of the reader connections (blocking: call from a blocking
    /// context or `spawn_blocking`).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = {
            let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            pool.pop()
        };
        let conn = match conn {
            Some(c) => c,
            None => crate::open_configured(&self.path)?,
        };
        let out = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < READERS {
            pool.push(conn);
        }
        out
    }

    pub fn stats(&self) -> LogStats {
        use std::sync::atomic::Ordering::Relaxed;
        LogStats {
            commits: self.stats.commits.load(Relaxed),
            jobs: self.stats.jobs.load(Relaxed),
            failed_commits: self.stats.failed_commits.load(Relaxed),
        }
    }

    /// A counter bumped after a commit that added, changed, reset or removed a
    /// subscription: what the broker reloads on (every commit would mean a table read
    /// per publish).
    pub fn subscription_changes(&self) -> watch::Receiver<u64> {
        self.subscription_changes.subscribe()
    }

    /// [`EventLog::write`] for jobs that change subscriptions.
    pub(crate) async fn write_subscriptions<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let out = self.write(job).await?;
        self.subscription_changes
            .send_modify(|n| *n = n.wrapping_add(1));
        Ok(out)
    }

    /// A counter bumped after every commit: wake-ups for deliverers and dispatchers.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Stops taking writes, lets queued ones commit, and joins the writer.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often the WAL is folded into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Passive checkpoints (they never block the writer or readers) until the log is gone;
/// a final truncating one at close keeps the WAL from outliving the process large.
fn checkpoint_loop(conn: Connection, log: std::sync::Weak<EventLog>) {
    let mut failing = false;
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        let Some(log) = log.upgrade() else { break };
        let closed = log.jobs.lock().unwrap_or_else(|e| e.into_inner()).is_none();
        drop(log);
        if closed {
            break;
        }
        // Logged when it starts and stops failing, not every 500 ms (a full disk
        // fails every attempt until space is freed).
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Err(e) if !failing => {
                tracing::warn!(error = %e, "event log checkpoint failing");
                failing = true;
            }
            Ok(()) if failing => {
                tracing::info!("event log checkpoint works again");
                failing = false;
            }
            _ => {}
        }
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

fn writer_loop(
    mut conn: Connection,
    rx: Receiver<Job>,
    changes: watch::Sender<u64>,
    stats: Arc<Counters>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut batch: Vec<Job> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let results = commit_batch(&mut conn, &mut batch);
        match results {
            Ok(outs) => {
                stats.commits.fetch_add(1, Relaxed);
                stats.jobs.fetch_add(n, Relaxed);
                changes.send_modify(|n| *n = n.wrapping_add(1));
                for (job_reply, out) in outs {
                    let _ = job_reply.send(out);
                }
            }
            Err(failed) => {
                stats.failed_commits.fetch_add(1, Relaxed);
                let (replies, e) = *failed;
                let text = e.to_string();
                let full = matches!(e, Error::StorageFull(_));
                if !full {
                    // A full disk is logged once per change by the server's probe.
                    tracing::error!(error = %e, jobs = replies.len(), "event log commit failed");
                }
                for r in replies {
                    let _ = r.send(Err(if full {
                        Error::StorageFull(text.clone())
                    } else {
                        Error::Unavailable(format!("commit failed: {text}"))
                    }));
                }
            }
        }
    }
}

type Replies = Vec<oneshot::Sender<Result<Box<dyn Any + Send>>>>;
type Outs = Vec<(
    oneshot::Sender<Result<Box<dyn Any + Send>>>,
    Result<Box<dyn Any + Send>>,
)>;

/// One transaction over every queued job, each in a savepoint so one failure does not
/// undo the others; the replies go out only after COMMIT (i.e. after the fsync).
fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Job>,
) -> std::result::Result<Outs, Box<(Replies, Error)>> {
    let jobs: Vec<Job> = std::mem::take(batch);
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            return Err(Box::new((
                jobs.into_iter().map(|j| j.reply).collect(),
                e.into(),
            )));
        }
    };
    let mut outs: Outs = Vec::with_capacity(jobs.len());
    for job in jobs {
        // Cached statements: parsing SAVEPOINT/RELEASE for every job showed in profiles.
        let exec = |sql: &str| -> Result<()> {
            tx.prepare_cached(sql)?.execute([])?;
            Ok(())
        };
        let out = match exec("SAVEPOINT job") {
            Err(e) => Err(e),
            Ok(()) => {
                let r = (job.run)(&tx);
                let ended = if r.is_ok() {
                    exec("RELEASE job")
                } else {
                    exec("ROLLBACK TO job").and_then(|()| exec("RELEASE job"))
                };
                match ended {
                    Ok(()) => r,
                    Err(e) => Err(e),
                }
            }
        };
        outs.push((job.reply, out));
    }
    match tx.commit() {
        Ok(()) => Ok(outs),
        Err(e) => Err(Box::new((
            outs.into_iter().map(|(r, _)| r).collect(),
            e.into(),
        ))),
    }
}
