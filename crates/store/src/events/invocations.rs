//! The async invocation queue: an accepted invocation is a row here before its 202 is
//! sent; the scheduler's dispatcher claims due rows (durably marking them `running`),
//! and records each outcome, retry or requeue in one commit with the destination
//! record it publishes.

use nimbus_core::Target;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::EventLog;
use super::topics::{NewEvent, append_tx};
use crate::{Error, Result};

/// Where an invocation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvocationState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl InvocationState {
    pub fn as_str(self) -> &'static str {
        match self {
            InvocationState::Queued => "queued",
            InvocationState::Running => "running",
            InvocationState::Succeeded => "succeeded",
            InvocationState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> InvocationState {
        match s {
            "running" => InvocationState::Running,
            "succeeded" => InvocationState::Succeeded,
            "failed" => InvocationState::Failed,
            _ => InvocationState::Queued,
        }
    }
}

/// Lambda's defaults for async invocations: 2 retries, 6 h max event age (also the
/// maximum). One place, for the API that queues them and the scheduler's cron fires.
pub const DEFAULT_MAX_RETRIES: u32 = 2;
pub const MAX_EVENT_AGE_MS: i64 = 6 * 3_600_000;

/// An invocation to queue.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: String,
    pub function: String,
    pub target: Target,
    pub payload: Vec<u8>,
    /// 1 + retries.
    pub max_attempts: u32,
    pub max_age_ms: i64,
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    /// `api` or `cron`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InvocationRow {
    pub id: String,
    pub function: String,
    pub target: Target,
    pub payload: Vec<u8>,
    pub state: InvocationState,
    /// Attempts started (a throttled one is given back).
    pub attempts: u32,
    pub throttles: u32,
    pub max_attempts: u32,
    pub max_age_ms: i64,
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    pub source: String,
    pub created_at_ms: i64,
    pub next_at_ms: i64,
    pub updated_at_ms: i64,
    pub result: Option<Vec<u8>>,
    pub error: Option<String>,
}

/// How an attempt ended, as the dispatcher records it.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Done: `Succeeded` or `Failed`, with what to keep, and a destination record to
    /// publish in the same commit (topic, event).
    Done {
        state: InvocationState,
        result: Option<Vec<u8>>,
        error: Option<String>,
        destination: Option<(String, NewEvent)>,
    },
    /// Back to the queue for another attempt at `next_at_ms`.
    Retry { next_at_ms: i64, error: String },
    /// Throttled or interrupted by shutdown: back to the queue without counting the
    /// attempt.
    Requeue { next_at_ms: i64, error: String },
}

const COLUMNS: &str = "id, function, target, payload, status, attempts, throttles, max_attempts, \
     max_age_ms, on_success, on_failure, source, created_at_ms, next_at_ms, updated_at_ms, \
     result, error";

fn row(r: &Row<'_>) -> rusqlite::Result<InvocationRow> {
    let target: String = r.get(2)?;
    let status: String = r.get(4)?;
    Ok(InvocationRow {
        id: r.get(0)?,
        function: r.get(1)?,
        // Written by us as JSON; an unreadable one falls back to `live` rather than
        // wedging the queue.
        target: serde_json::from_str(&target).unwrap_or_default(),
        payload: r.get(3)?,
        state: InvocationState::parse(&status),
        attempts: r.get(5)?,
        throttles: r.get(6)?,
        max_attempts: r.get(7)?,
        max_age_ms: r.get(8)?,
        on_success: r.get(9)?,
        on_failure: r.get(10)?,
        source: r.get(11)?,
        created_at_ms: r.get(12)?,
        next_at_ms: r.get(13)?,
        updated_at_ms: r.get(14)?,
        result: r.get(15)?,
        error: r.get(16)?,
    })
}

/// Inserts a queued invocation inside a write job (an API enqueue or a cron fire).
pub(crate) fn enqueue_tx(tx: &Transaction<'_>, inv: &NewInvocation, now_ms: i64) -> Result<()> {
    let target =
        serde_json::to_string(&inv.target).map_err(|e| Error::Invalid(format!("target: {e}")))?;
    let n = tx.execute(
        "INSERT OR IGNORE INTO invocations (id, function, target, payload, status, max_attempts,
             max_age_ms, on_success, on_failure, source, created_at_ms, next_at_ms, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10)",
        params![
            inv.id,
            inv.function,
            target,
            inv.payload,
            inv.max_attempts,
            inv.max_age_ms,
            inv.on_success,
            inv.on_failure,
            inv.source,
            now_ms
        ],
    )?;
    if n == 0 {
        return Err(Error::Conflict(format!(
            "invocation `{}` already exists",
            inv.id
        )));
    }
    Ok(())
}

/// Running invocations of one cron (its fires joined with their invocations).
pub(crate) fn cron_running_tx(tx: &Connection, function: &str, name: &str) -> Result<bool> {
    let n: i64 = tx.query_row(
        "SELECT count(*) FROM cron_fires f JOIN invocations i ON i.id = f.invocation_id
         WHERE f.function = ?1 AND f.name = ?2 AND i.status IN ('queued', 'running')",
        params![function, name],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

impl EventLog {
    /// Queues an invocation; returns once it is durable (the 202 may be sent).
    pub async fn enqueue_invocation(&self, inv: NewInvocation, now_ms: i64) -> Result<()> {
        self.write(move |tx| enqueue_tx(tx, &inv, now_ms)).await
    }

    pub fn invocation(&self, id: &str) -> Result<Option<InvocationRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {COLUMNS} FROM invocations WHERE id = ?1"),
                    [id],
                    row,
                )
                .optional()?)
        })
    }

    /// When the earliest queued invocation is due (a cheap read, so waking up on
    /// every commit does not cost a write).
    pub fn next_due_at(&self) -> Result<Option<i64>> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT min(next_at_ms) FROM invocations WHERE status = 'queued'",
                [],
                |r| r.get(0),
            )?)
        })
    }

    /// Claims up to `limit` due invocations: each is `running` with one more attempt
    /// once this returns, so a crash from here on requeues it at start-up.
    pub async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<InvocationRow>> {
        self.write(move |tx| {
            let ids: Vec<String> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id FROM invocations WHERE status = 'queued' AND next_at_ms <= ?1
                     ORDER BY next_at_ms LIMIT ?2",
                )?;
                stmt.query_map(params![now_ms, limit as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                tx.execute(
                    "UPDATE invocations SET status = 'running', attempts = attempts + 1,
                         updated_at_ms = ?2 WHERE id = ?1",
                    params![id, now_ms],
                )?;
                out.push(tx.query_row(
                    &format!("SELECT {COLUMNS} FROM invocations WHERE id = ?1"),
                    [&id],
                    row,
                )?);
            }
            Ok(out)
        })
        .await
    }

    /// Records how an attempt ended (and publishes its destination record with it).
    pub async fn finish_invocation(&self, id: &str, finish: Finish, now_ms: i64) -> Result<()> {
        let id = id.to_string();
        self.write(move |tx| {
            match finish {
                Finish::Done {
                    state,
                    result,
                    error,
                    destination,
                } => {
                    let mut error = error;
                    if let Some((topic, event)) = destination {
                        // A destination topic deleted since the invoke must not keep
                        // the invocation from finishing: say so in its error instead.
                        match append_tx(tx, &topic, &[event], now_ms) {
                            Ok(_) => {}
                            Err(Error::NotFound(m)) => {
                                let note = format!("destination not published: {m}");
                                error = Some(match error {
                                    Some(e) => format!("{e}; {note}"),
                                    None => note,
                                });
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    tx.execute(
                        "UPDATE invocations SET status = ?2, result = ?3, error = ?4,
                             updated_at_ms = ?5 WHERE id = ?1",
                        params![id, state.as_str(), result, error, now_ms],
                    )?;
                }
                Finish::Retry { next_at_ms, error } => {
                    tx.execute(
                        "UPDATE invocations SET status = 'queued', next_at_ms = ?2, error = ?3,
                             updated_at_ms = ?4 WHERE id = ?1",
                        params![id, next_at_ms, error, now_ms],
                    )?;
                }
                Finish::Requeue { next_at_ms, error } => {
                    tx.execute(
                        "UPDATE invocations SET status = 'queued', next_at_ms = ?2, error = ?3,
                             attempts = max(attempts - 1, 0), throttles = throttles + 1,
                             updated_at_ms = ?4 WHERE id = ?1",
                        params![id, next_at_ms, error, now_ms],
                    )?;
                }
            }
            Ok(())
        })
        .await
    }

    /// At start-up: invocations left `running` were cut off by a crash; queue them
    /// again (at-least-once: one may have run to the end just before the crash).
    pub async fn requeue_running(&self, now_ms: i64) -> Result<usize> {
        self.write(move |tx| {
            Ok(tx.execute(
                "UPDATE invocations SET status = 'queued', next_at_ms = ?1, updated_at_ms = ?1
                 WHERE status = 'running'",
                [now_ms],
            )?)
        })
        .await
    }

    /// Forgets finished invocations last touched before `before_ms`, and cron fires
    /// older than that (the latest fire of each cron is kept for `cron ls`).
    pub async fn prune_invocations(&self, before_ms: i64) -> Result<usize> {
        self.write(move |tx| {
            let a = tx.execute(
                "DELETE FROM invocations WHERE status IN ('succeeded', 'failed')
                 AND updated_at_ms < ?1",
                [before_ms],
            )?;
            let b = tx.execute(
                "DELETE FROM cron_fires WHERE fired_at_ms < ?1 AND scheduled_ms < (
                     SELECT max(scheduled_ms) FROM cron_fires l
                     WHERE l.function = cron_fires.function AND l.name = cron_fires.name)",
                [before_ms],
            )?;
            Ok(a + b)
        })
        .await
    }
}
