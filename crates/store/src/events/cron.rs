//! Cron fire records. A fire is one write job: the fire row (primary key: function,
//! name, scheduled time), the cron's `last_scheduled_ms`, and the queued invocation
//! commit together, so after any crash a scheduled time has either fired exactly once
//! or not at all, and the catch-up at start-up starts after the last one that did.

use rusqlite::{OptionalExtension, params};

use super::EventLog;
use super::invocations::{
    DEFAULT_MAX_RETRIES, MAX_EVENT_AGE_MS, NewInvocation, cron_running_tx, enqueue_tx,
};
use crate::Result;

/// The invocation a cron fire queues (scheduled, caught up or by hand): a Scheduled
/// Event with the spec's payload, for the `live` alias, with the async defaults.
pub fn cron_invocation(
    function: &str,
    spec: &nimbus_core::cron::CronSpec,
    scheduled_ms: i64,
    region: &str,
    account: &str,
) -> NewInvocation {
    let id = nimbus_core::new_request_id();
    let event = nimbus_core::cron::scheduled_event(
        &nimbus_core::cron::ScheduledEventSource {
            id: &id,
            function,
            name: &spec.name,
            scheduled_ms,
            account,
            region,
        },
        &spec.payload,
    );
    NewInvocation {
        id,
        function: function.to_string(),
        target: nimbus_core::Target::default(),
        // A JSON value always serializes.
        payload: serde_json::to_vec(&event).unwrap_or_default(),
        max_attempts: 1 + DEFAULT_MAX_RETRIES,
        max_age_ms: MAX_EVENT_AGE_MS,
        on_success: None,
        on_failure: None,
        source: format!("cron:{function}/{}", spec.name),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireKind {
    Scheduled,
    CatchUp,
    Manual,
    /// Not run: the previous run was still going (`overlap = "skip"`), or a missed
    /// fire with `catch_up = false`.
    Skipped,
}

impl FireKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FireKind::Scheduled => "scheduled",
            FireKind::CatchUp => "catch_up",
            FireKind::Manual => "manual",
            FireKind::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronFire {
    pub function: String,
    pub name: String,
    pub scheduled_ms: i64,
    pub kind: String,
    pub invocation_id: Option<String>,
    pub fired_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireOutcome {
    /// The invocation was queued.
    Enqueued,
    /// This scheduled time had already fired (or been skipped): nothing done.
    Duplicate,
    /// Recorded as skipped, nothing queued (overlap, or `catch_up = false`).
    Skipped,
}

impl EventLog {
    /// Makes sure a cron has a state row; a new cron starts at `now_ms`, so what
    /// happened before it was deployed is never "missed". Returns its
    /// `last_scheduled_ms`.
    pub async fn cron_init(&self, function: &str, name: &str, now_ms: i64) -> Result<i64> {
        let (function, name) = (function.to_string(), name.to_string());
        self.write(move |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO cron_state (function, name, last_scheduled_ms)
                 VALUES (?1, ?2, ?3)",
                params![function, name, now_ms],
            )?;
            Ok(tx.query_row(
                "SELECT last_scheduled_ms FROM cron_state WHERE function = ?1 AND name = ?2",
                params![function, name],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Fires a cron for `scheduled_ms` in one commit. `kind` `Skipped` only records
    /// the time as handled; with `skip_if_running`, a fire while an earlier run of
    /// this cron is queued or running is recorded as skipped instead. Manual fires do
    /// not move `last_scheduled_ms` (they are not a scheduled time).
    pub async fn cron_fire(
        &self,
        kind: FireKind,
        scheduled_ms: i64,
        skip_if_running: bool,
        inv: NewInvocation,
        now_ms: i64,
    ) -> Result<FireOutcome> {
        self.write(move |tx| {
            let (function, name) = cron_key(&inv);
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM cron_fires WHERE function = ?1 AND name = ?2
                     AND scheduled_ms = ?3",
                    params![function, name, scheduled_ms],
                    |r| r.get(0),
                )
                .optional()?;
            if exists.is_some() {
                return Ok(FireOutcome::Duplicate);
            }
            let skip = kind == FireKind::Skipped
                || (skip_if_running && cron_running_tx(tx, &function, &name)?);
            let recorded = if skip { FireKind::Skipped } else { kind };
            tx.execute(
                "INSERT INTO cron_fires (function, name, scheduled_ms, kind, invocation_id,
                     fired_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    function,
                    name,
                    scheduled_ms,
                    recorded.as_str(),
                    (!skip).then_some(&inv.id),
                    now_ms
                ],
            )?;
            if kind != FireKind::Manual {
                tx.execute(
                    "INSERT INTO cron_state (function, name, last_scheduled_ms)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (function, name) DO UPDATE SET
                         last_scheduled_ms = max(last_scheduled_ms, excluded.last_scheduled_ms)",
                    params![function, name, scheduled_ms],
                )?;
            }
            if skip {
                return Ok(FireOutcome::Skipped);
            }
            enqueue_tx(tx, &inv, now_ms)?;
            Ok(FireOutcome::Enqueued)
        })
        .await
    }

    /// The latest fires of one cron, newest first.
    pub fn cron_fires(&self, function: &str, name: &str, limit: usize) -> Result<Vec<CronFire>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT function, name, scheduled_ms, kind, invocation_id, fired_at_ms
                 FROM cron_fires WHERE function = ?1 AND name = ?2
                 ORDER BY scheduled_ms DESC LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![function, name, limit as i64], |r| {
                    Ok(CronFire {
                        function: r.get(0)?,
                        name: r.get(1)?,
                        scheduled_ms: r.get(2)?,
                        kind: r.get(3)?,
                        invocation_id: r.get(4)?,
                        fired_at_ms: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

/// A cron invocation's source is `cron:<function>/<name>`: the fire row needs the
/// pair, and the invocation keeps it for `invocation get`.
fn cron_key(inv: &NewInvocation) -> (String, String) {
    let rest = inv.source.strip_prefix("cron:").unwrap_or(&inv.source);
    match rest.split_once('/') {
        Some((f, n)) => (f.to_string(), n.to_string()),
        None => (inv.function.clone(), rest.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::InvocationState;

    fn inv(id: &str) -> NewInvocation {
        NewInvocation {
            id: id.into(),
            function: "f".into(),
            target: nimbus_core::Target::default(),
            payload: b"{}".to_vec(),
            max_attempts: 3,
            max_age_ms: 3_600_000,
            on_success: None,
            on_failure: None,
            source: "cron:f/c".into(),
        }
    }

    #[tokio::test]
    async fn a_scheduled_time_fires_once_and_overlap_skips() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EventLog::open(&dir.path().join("events.db")).expect("open");
        assert_eq!(log.cron_init("f", "c", 1_000).await.expect("init"), 1_000);
        // Initialising again keeps the stored time.
        assert_eq!(log.cron_init("f", "c", 9_000).await.expect("init"), 1_000);
        let fire = |id: &'static str, at: i64, skip: bool| {
            let log = &log;
            async move {
                log.cron_fire(FireKind::Scheduled, at, skip, inv(id), at)
                    .await
                    .expect("fire")
            }
        };
        assert_eq!(fire("a", 2_000, true).await, FireOutcome::Enqueued);
        assert_eq!(fire("b", 2_000, true).await, FireOutcome::Duplicate);
        // "a" is still queued: the next fire is skipped, but still moves the state.
        assert_eq!(fire("c", 3_000, true).await, FireOutcome::Skipped);
        assert_eq!(log.cron_init("f", "c", 0).await.expect("state"), 3_000);
        assert_eq!(fire("d", 4_000, false).await, FireOutcome::Enqueued);
        let fires = log.cron_fires("f", "c", 10).expect("fires");
        let kinds: Vec<_> = fires.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(kinds, ["scheduled", "skipped", "scheduled"]);
        assert!(log.invocation("b").expect("read").is_none());
        // Claim, crash (running left behind), requeue at start-up.
        let claimed = log.claim_due(5_000, 10).await.expect("claim");
        assert_eq!(claimed.len(), 2);
        assert!(claimed.iter().all(|r| r.attempts == 1));
        assert_eq!(log.requeue_running(6_000).await.expect("requeue"), 2);
        let a = log.invocation("a").expect("read").expect("a");
        assert_eq!(a.state, InvocationState::Queued);
        assert_eq!(a.attempts, 1);
    }
}
