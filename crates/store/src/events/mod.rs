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
mod topics;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{oneshot, watch};

use crate::{Error, Result};

pub use cron::{CronFire, FireKind, FireOutcome};
pub use invocations::{Finish, InvocationRow, InvocationState, NewInvocation};
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
    CREATE TABLE events (
        topic            TEXT NOT NULL,
        offset           INTEGER NOT NULL,
        id               TEXT NOT NULL,
        key              TEXT,
        published_at_ms  INTEGER NOT NULL,
        size             INTEGER NOT NULL,
        body             BLOB NOT NULL,
        PRIMARY KEY (topic, offset)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX events_by_id ON events (topic, id);
    "#,
    // 2: the async invocation queue and cron fire records. A fire's primary key
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
        });
        let notify = log.changes.clone();
        let handle = std::thread::Builder::new()
            .name("nimbus-eventlog".into())
            .spawn(move || writer_loop(conn, rx, notify))
            .map_err(|e| Error::Unavailable(format!("start the writer: {e}")))?;
        *log.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
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

fn writer_loop(mut conn: Connection, rx: Receiver<Job>, changes: watch::Sender<u64>) {
    let mut batch: Vec<Job> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut conn, &mut batch);
        match results {
            Ok(outs) => {
                changes.send_modify(|n| *n = n.wrapping_add(1));
                for (job_reply, out) in outs {
                    let _ = job_reply.send(out);
                }
            }
            Err(failed) => {
                let (replies, e) = *failed;
                tracing::error!(error = %e, jobs = replies.len(), "event log commit failed");
                let text = e.to_string();
                for r in replies {
                    let _ = r.send(Err(Error::Unavailable(format!("commit failed: {text}"))));
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
        let out = match tx.execute_batch("SAVEPOINT job") {
            Err(e) => Err(Error::from(e)),
            Ok(()) => {
                let r = (job.run)(&tx);
                let end = if r.is_ok() {
                    "RELEASE job"
                } else {
                    "ROLLBACK TO job; RELEASE job"
                };
                match tx.execute_batch(end) {
                    Ok(()) => r,
                    Err(e) => Err(Error::from(e)),
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
