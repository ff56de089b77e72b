//! Subscriptions and their delivery state.
//!
//! A subscription's position is a `cursor` (every offset below it is settled) plus,
//! for offsets at or above it, rows in `delivery_state`: `done` (settled out of order,
//! e.g. by a parallel delivery that finished first) or `retry` (failed, waiting until
//! `next_at_ms`). Whatever has no row is undelivered, including what was in flight
//! when the process died: the broker delivers it again after a restart. Every
//! outcome is written through the group commit before the broker acts on it, and a
//! dead letter is appended in the same transaction that settles its event, so an
//! event is never both lost from the subscription and missing from its dead-letter
//! topic.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::EventLog;
use super::topics::{NewEvent, append_tx, topic_tx};
use crate::{Error, Result};
use nimbus_core::subscription::SubscriptionSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionSource {
    /// From `[[events]]`: replaced on each deploy of the function.
    Manifest,
    Api,
}

impl SubscriptionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionSource::Manifest => "manifest",
            SubscriptionSource::Api => "api",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionRow {
    pub spec: SubscriptionSpec,
    pub source: SubscriptionSource,
    pub cursor: i64,
    pub epoch: i64,
    pub created_at_ms: i64,
}

/// One row of `delivery_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryState {
    pub offset: i64,
    pub done: bool,
    pub attempts: u32,
    pub next_at_ms: i64,
    pub last_error: Option<String>,
}

/// An outcome to record.
#[derive(Debug, Clone)]
pub enum Update {
    /// Delivered, or filtered out.
    Done { offset: i64 },
    Retry {
        offset: i64,
        attempts: u32,
        next_at_ms: i64,
        error: String,
    },
    /// Out of attempts or age: append `event` to `topic` and settle `offset`. A
    /// missing topic settles it anyway (dropped; reported in [`Settled::dropped`]).
    DeadLetter {
        offset: i64,
        topic: String,
        event: NewEvent,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// The subscription was reset or deleted since the caller loaded it: nothing was
    /// written.
    pub stale: bool,
    pub cursor: i64,
    /// Dead letters whose topic is gone: settled without a copy.
    pub dropped: Vec<i64>,
}

/// Where the cursor moves given the offsets at or above it that are settled, in
/// increasing order: past the run of consecutive settled offsets starting at it.
pub fn settled_prefix(cursor: i64, done_ascending: impl IntoIterator<Item = i64>) -> i64 {
    let mut c = cursor;
    for o in done_ascending {
        if o < c {
            continue;
        }
        if o != c {
            break;
        }
        c += 1;
    }
    c
}

const COLUMNS: &str = "name, topic, function, alias, filter, batch, max_attempts, max_age_ms, \
     dead_letter, ordered, source, cursor, epoch, created_at_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SubscriptionRow> {
    let filter: String = r.get(4)?;
    let source: String = r.get(10)?;
    Ok(SubscriptionRow {
        spec: SubscriptionSpec {
            name: r.get(0)?,
            topic: r.get(1)?,
            function: r.get(2)?,
            alias: r.get(3)?,
            // Written by us from a compiled pattern; unreadable means match nothing
            // rather than everything.
            filter: serde_json::from_str(&filter)
                .unwrap_or_else(|_| serde_json::json!({"nimbus-unreadable": [{"exists": true}]})),
            batch: r.get(5)?,
            max_attempts: r.get(6)?,
            max_age_ms: r.get(7)?,
            dead_letter: r.get(8)?,
            ordered: r.get::<_, i64>(9)? != 0,
        },
        source: if source == "manifest" {
            SubscriptionSource::Manifest
        } else {
            SubscriptionSource::Api
        },
        cursor: r.get(11)?,
        epoch: r.get(12)?,
        created_at_ms: r.get(13)?,
    })
}

fn get_tx(conn: &Connection, name: &str) -> Result<Option<SubscriptionRow>> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM subscriptions WHERE name = ?1"),
            [name],
            row,
        )
        .optional()?)
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("subscription `{name}` not found"))
}

/// The subscribed topic and the dead-letter topic must exist.
fn check_topics(tx: &Transaction<'_>, spec: &SubscriptionSpec) -> Result<i64> {
    let t = topic_tx(tx, &spec.topic).map_err(|_| {
        Error::NotFound(format!(
            "subscription `{}`: topic `{}` not found; create it first (nimbus topic create {})",
            spec.name, spec.topic, spec.topic
        ))
    })?;
    if let Some(d) = &spec.dead_letter {
        topic_tx(tx, d).map_err(|_| {
            Error::NotFound(format!(
                "subscription `{}`: dead-letter topic `{d}` not found; create it first",
                spec.name
            ))
        })?;
    }
    Ok(t.next_offset)
}

fn insert_tx(
    tx: &Transaction<'_>,
    spec: &SubscriptionSpec,
    source: SubscriptionSource,
    cursor: i64,
    epoch: i64,
    now_ms: i64,
) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO subscriptions ({COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        ),
        params![
            spec.name,
            spec.topic,
            spec.function,
            spec.alias,
            spec.filter.to_string(),
            spec.batch,
            spec.max_attempts,
            spec.max_age_ms,
            spec.dead_letter,
            i64::from(spec.ordered),
            source.as_str(),
            cursor,
            epoch,
            now_ms
        ],
    )?;
    Ok(())
}

fn delete_tx(tx: &Transaction<'_>, name: &str) -> Result<()> {
    tx.execute("DELETE FROM delivery_state WHERE subscription = ?1", [name])?;
    tx.execute("DELETE FROM subscriptions WHERE name = ?1", [name])?;
    Ok(())
}

pub(super) fn delete_topic_subscriptions(tx: &Transaction<'_>, topic: &str) -> Result<()> {
    tx.execute(
        "DELETE FROM delivery_state WHERE subscription IN
           (SELECT name FROM subscriptions WHERE topic = ?1)",
        [topic],
    )?;
    tx.execute("DELETE FROM subscriptions WHERE topic = ?1", [topic])?;
    Ok(())
}

impl EventLog {
    /// A new subscription starts at the topic's end: it sees events published from
    /// now on (reset it to replay older ones).
    pub async fn create_subscription(
        &self,
        spec: SubscriptionSpec,
        source: SubscriptionSource,
        now_ms: i64,
    ) -> Result<SubscriptionRow> {
        self.write_subscriptions(move |tx| {
            if get_tx(tx, &spec.name)?.is_some() {
                return Err(Error::Conflict(format!(
                    "subscription `{}` already exists",
                    spec.name
                )));
            }
            let cursor = check_topics(tx, &spec)?;
            insert_tx(tx, &spec, source, cursor, 0, now_ms)?;
            get_tx(tx, &spec.name)?.ok_or_else(|| not_found(&spec.name))
        })
        .await
    }

    /// Makes `function`'s manifest subscriptions exactly `specs`, all or nothing: one
    /// that keeps its name and topic keeps its position, one whose topic changed
    /// starts at the new topic's end, the others are removed.
    pub async fn replace_manifest_subscriptions(
        &self,
        function: &str,
        specs: Vec<SubscriptionSpec>,
        now_ms: i64,
    ) -> Result<Vec<SubscriptionRow>> {
        let function = function.to_string();
        self.write_subscriptions(move |tx| {
            let existing: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT name FROM subscriptions WHERE function = ?1 AND source = 'manifest'",
                )?;
                stmt.query_map([&function], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for name in existing.iter().filter(|n| !specs.iter().any(|s| &s.name == *n)) {
                delete_tx(tx, name)?;
            }
            let mut out = Vec::with_capacity(specs.len());
            for spec in &specs {
                let end = check_topics(tx, spec)?;
                match get_tx(tx, &spec.name)? {
                    Some(old)
                        if old.source != SubscriptionSource::Manifest
                            || old.spec.function != function =>
                    {
                        return Err(Error::Conflict(format!(
                            "subscription `{}` already exists (for function `{}`); give this one another `name`",
                            spec.name, old.spec.function
                        )));
                    }
                    Some(old) if old.spec.topic == spec.topic => {
                        insert_tx(tx, spec, old.source, old.cursor, old.epoch, old.created_at_ms)?;
                    }
                    Some(old) => {
                        tx.execute(
                            "DELETE FROM delivery_state WHERE subscription = ?1",
                            [&spec.name],
                        )?;
                        insert_tx(
                            tx,
                            spec,
                            SubscriptionSource::Manifest,
                            end,
                            old.epoch + 1,
                            now_ms,
                        )?;
                    }
                    None => insert_tx(tx, spec, SubscriptionSource::Manifest, end, 0, now_ms)?,
                }
                out.push(get_tx(tx, &spec.name)?.ok_or_else(|| not_found(&spec.name))?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn delete_subscription(&self, name: &str) -> Result<SubscriptionRow> {
        let name = name.to_string();
        self.write_subscriptions(move |tx| {
            let row = get_tx(tx, &name)?.ok_or_else(|| not_found(&name))?;
            delete_tx(tx, &name)?;
            Ok(row)
        })
        .await
    }

    /// Every subscription delivering to `function` (its function is gone).
    pub async fn delete_function_subscriptions(&self, function: &str) -> Result<usize> {
        let function = function.to_string();
        self.write_subscriptions(move |tx| {
            tx.execute(
                "DELETE FROM delivery_state WHERE subscription IN
                   (SELECT name FROM subscriptions WHERE function = ?1)",
                [&function],
            )?;
            Ok(tx.execute("DELETE FROM subscriptions WHERE function = ?1", [&function])?)
        })
        .await
    }

    /// Moves the cursor to `offset` (clamped to the topic's offsets) and forgets
    /// every outcome: from there on, everything is delivered again.
    pub async fn reset_subscription(&self, name: &str, offset: i64) -> Result<SubscriptionRow> {
        let name = name.to_string();
        self.write_subscriptions(move |tx| {
            let row = get_tx(tx, &name)?.ok_or_else(|| not_found(&name))?;
            let t = topic_tx(tx, &row.spec.topic)?;
            let to = offset.clamp(0, t.next_offset);
            tx.execute(
                "DELETE FROM delivery_state WHERE subscription = ?1",
                [&name],
            )?;
            tx.execute(
                "UPDATE subscriptions SET cursor = ?2, epoch = epoch + 1 WHERE name = ?1",
                params![name, to],
            )?;
            get_tx(tx, &name)?.ok_or_else(|| not_found(&name))
        })
        .await
    }

    pub fn subscriptions(&self) -> Result<Vec<SubscriptionRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM subscriptions ORDER BY name"
            ))?;
            let rows = stmt
                .query_map([], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    pub fn subscription(&self, name: &str) -> Result<SubscriptionRow> {
        self.read(|conn| get_tx(conn, name)?.ok_or_else(|| not_found(name)))
    }

    /// `(lag, retrying)`: events of the topic not yet settled, and those waiting
    /// for a retry.
    pub fn subscription_lag(&self, name: &str) -> Result<(i64, i64)> {
        self.read(|conn| {
            let r = get_tx(conn, name)?.ok_or_else(|| not_found(name))?;
            let next: i64 = conn
                .query_row(
                    "SELECT next_offset FROM topics WHERE name = ?1",
                    [&r.spec.topic],
                    |x| x.get(0),
                )
                .optional()?
                .unwrap_or(r.cursor);
            // Pruned events below the oldest one still held are not waiting for anyone.
            let oldest: Option<i64> = conn
                .query_row(
                    "SELECT offset FROM events WHERE topic = ?1 ORDER BY offset LIMIT 1",
                    [&r.spec.topic],
                    |x| x.get(0),
                )
                .optional()?;
            let from = r.cursor.max(oldest.unwrap_or(next));
            let (done, retrying): (i64, i64) = conn.query_row(
                "SELECT coalesce(sum(state = 'done'), 0), coalesce(sum(state = 'retry'), 0)
                 FROM delivery_state WHERE subscription = ?1 AND offset >= ?2",
                params![name, from],
                |x| Ok((x.get(0)?, x.get(1)?)),
            )?;
            Ok(((next - from - done).max(0), retrying))
        })
    }

    /// The rows at or above the cursor, in offset order.
    pub fn delivery_state(&self, name: &str) -> Result<Vec<DeliveryState>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT offset, state, attempts, next_at_ms, last_error FROM delivery_state
                 WHERE subscription = ?1 ORDER BY offset",
            )?;
            let rows = stmt
                .query_map([name], |r| {
                    Ok(DeliveryState {
                        offset: r.get(0)?,
                        done: r.get::<_, String>(1)? == "done",
                        attempts: r.get(2)?,
                        next_at_ms: r.get(3)?,
                        last_error: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// Records outcomes durably and advances the cursor over the settled prefix.
    /// `floor`: offsets below it no longer exist (retention), so they count as
    /// settled. Nothing is written when the subscription's epoch is no longer `epoch`.
    pub async fn settle(
        &self,
        name: &str,
        epoch: i64,
        updates: Vec<Update>,
        floor: Option<i64>,
        now_ms: i64,
    ) -> Result<Settled> {
        let name = name.to_string();
        self.write(move |tx| settle_tx(tx, &name, epoch, updates, floor, now_ms))
            .await
    }
}

fn settle_tx(
    tx: &Transaction<'_>,
    name: &str,
    epoch: i64,
    updates: Vec<Update>,
    floor: Option<i64>,
    now_ms: i64,
) -> Result<Settled> {
    let Some(r) = get_tx(tx, name)? else {
        return Ok(Settled {
            stale: true,
            ..Settled::default()
        });
    };
    if r.epoch != epoch {
        return Ok(Settled {
            stale: true,
            cursor: r.cursor,
            dropped: Vec::new(),
        });
    }
    let mut dropped = Vec::new();
    {
        let mut put = tx.prepare_cached(
            "INSERT OR REPLACE INTO delivery_state
               (subscription, offset, state, attempts, next_at_ms, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for u in updates {
            match u {
                Update::Done { offset } => {
                    put.execute(params![name, offset, "done", 0, 0, None::<String>])?;
                }
                Update::Retry {
                    offset,
                    attempts,
                    next_at_ms,
                    error,
                } => {
                    put.execute(params![name, offset, "retry", attempts, next_at_ms, error])?;
                }
                Update::DeadLetter {
                    offset,
                    topic,
                    event,
                } => {
                    match append_tx(tx, &topic, std::slice::from_ref(&event), now_ms) {
                        Ok(_) => {}
                        Err(Error::NotFound(_)) => dropped.push(offset),
                        Err(e) => return Err(e),
                    }
                    put.execute(params![name, offset, "done", 0, 0, None::<String>])?;
                }
            }
        }
    }
    let start = r.cursor.max(floor.unwrap_or(i64::MIN));
    let cursor = {
        let mut stmt = tx.prepare_cached(
            "SELECT offset FROM delivery_state
             WHERE subscription = ?1 AND state = 'done' AND offset >= ?2 ORDER BY offset",
        )?;
        let mut rows = stmt.query(params![name, start])?;
        let mut c = start;
        while let Some(row) = rows.next()? {
            let o: i64 = row.get(0)?;
            let next = settled_prefix(c, [o]);
            if next == c {
                break;
            }
            c = next;
        }
        c
    };
    if cursor != r.cursor {
        tx.execute(
            "DELETE FROM delivery_state WHERE subscription = ?1 AND offset < ?2",
            params![name, cursor],
        )?;
        tx.execute(
            "UPDATE subscriptions SET cursor = ?2 WHERE name = ?1",
            params![name, cursor],
        )?;
    }
    Ok(Settled {
        stale: false,
        cursor,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TopicSettings;

    fn spec(name: &str, topic: &str) -> SubscriptionSpec {
        nimbus_core::subscription::RawSubscription {
            topic: topic.into(),
            ..Default::default()
        }
        .validate("billing", name)
        .expect("spec")
    }

    fn ev(id: &str) -> NewEvent {
        NewEvent {
            id: id.into(),
            key: None,
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn the_cursor_moves_over_the_settled_prefix_only() {
        assert_eq!(settled_prefix(5, []), 5);
        assert_eq!(settled_prefix(5, [5, 6, 7]), 8);
        assert_eq!(settled_prefix(5, [6, 7]), 5);
        assert_eq!(settled_prefix(5, [5, 7, 8]), 6);
        assert_eq!(settled_prefix(5, [3, 4, 5, 6]), 7);
    }

    #[test]
    fn outcomes_settle_out_of_order_dead_letter_atomically_and_resets_go_stale() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EventLog::open(&dir.path().join("events.db")).expect("open");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let missing = log
                .create_subscription(spec("s", "orders"), SubscriptionSource::Api, 0)
                .await;
            assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
            for t in ["orders", "dlq"] {
                log.create_topic(t, TopicSettings::default(), 0)
                    .await
                    .expect("topic");
            }
            log.append("orders", vec![ev("a"), ev("b")], 0)
                .await
                .expect("append");
            let s = log
                .create_subscription(spec("s", "orders"), SubscriptionSource::Api, 0)
                .await
                .expect("create");
            assert_eq!(s.cursor, 2, "a new subscription starts at the end");
            let s = log.reset_subscription("s", 0).await.expect("reset");
            assert_eq!((s.cursor, s.epoch), (0, 1));
            // 1 settles first: the cursor waits for 0.
            let r = log
                .settle("s", 1, vec![Update::Done { offset: 1 }], None, 0)
                .await
                .expect("settle");
            assert_eq!(r.cursor, 0);
            assert_eq!(log.subscription_lag("s").expect("lag"), (1, 0));
            let r = log
                .settle(
                    "s",
                    1,
                    vec![Update::DeadLetter {
                        offset: 0,
                        topic: "dlq".into(),
                        event: ev("dead-0"),
                    }],
                    None,
                    0,
                )
                .await
                .expect("dead letter");
            assert_eq!((r.cursor, r.dropped.len()), (2, 0));
            assert_eq!(log.topic("dlq").expect("dlq").count, 1);
            assert!(log.delivery_state("s").expect("state").is_empty());
            // An outcome from before a reset is ignored.
            log.reset_subscription("s", 0).await.expect("reset");
            let r = log
                .settle("s", 1, vec![Update::Done { offset: 0 }], None, 0)
                .await
                .expect("stale");
            assert!(r.stale);
            assert_eq!(log.subscription("s").expect("get").cursor, 0);
            // Deleting the topic deletes its subscriptions.
            log.delete_topic("orders").await.expect("delete");
            assert!(matches!(log.subscription("s"), Err(Error::NotFound(_))));
        });
    }
}
