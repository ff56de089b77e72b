//! Topics and their events: create, list, delete, append (with de-duplication by
//! event id within a window), read by offset or time, and retention.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::EventLog;
use crate::{Error, Result};

/// An event id seen again on a topic within this window is acknowledged, not stored.
pub const DEFAULT_DEDUP_WINDOW_MS: i64 = 10 * 60 * 1000;
/// Rows deleted per retention job, so one job never holds the writer long.
const PRUNE_CHUNK: i64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSettings {
    pub retention_ms: i64,
    pub max_bytes: i64,
    pub dedup_window_ms: i64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            retention_ms: 7 * 86_400_000,
            max_bytes: 1 << 30,
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    #[serde(flatten)]
    pub settings: TopicSettings,
    pub created_at_ms: i64,
    /// Events held now (after retention) and their bytes.
    pub count: i64,
    pub bytes: i64,
    /// The offset the next event gets; offsets are never reused.
    pub next_offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_at_ms: Option<i64>,
}

/// An event to append: its CloudEvents id, partition key, and structured JSON body.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub key: Option<String>,
    pub body: Vec<u8>,
}

/// Where an appended event is: a new offset, or the one its id already had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub offset: i64,
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub offset: i64,
    pub id: String,
    pub key: Option<String>,
    pub published_at_ms: i64,
    pub body: Vec<u8>,
}

fn not_found(topic: &str) -> Error {
    Error::NotFound(format!("topic `{topic}` not found"))
}

const TOPIC_COLUMNS: &str = "name, retention_ms, max_bytes, dedup_window_ms, created_at_ms, \
     next_offset, bytes, count";

fn topic_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TopicInfo> {
    Ok(TopicInfo {
        name: r.get(0)?,
        settings: TopicSettings {
            retention_ms: r.get(1)?,
            max_bytes: r.get(2)?,
            dedup_window_ms: r.get(3)?,
        },
        created_at_ms: r.get(4)?,
        next_offset: r.get(5)?,
        bytes: r.get(6)?,
        count: r.get(7)?,
        oldest_offset: None,
        oldest_at_ms: None,
        newest_at_ms: None,
    })
}

fn with_bounds(conn: &Connection, mut t: TopicInfo) -> Result<TopicInfo> {
    let oldest: Option<(i64, i64)> = conn
        .query_row(
            "SELECT offset, published_at_ms FROM events WHERE topic = ?1 ORDER BY offset LIMIT 1",
            [&t.name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let newest: Option<i64> = conn
        .query_row(
            "SELECT published_at_ms FROM events WHERE topic = ?1 ORDER BY offset DESC LIMIT 1",
            [&t.name],
            |r| r.get(0),
        )
        .optional()?;
    t.oldest_offset = oldest.map(|o| o.0);
    t.oldest_at_ms = oldest.map(|o| o.1);
    t.newest_at_ms = newest;
    Ok(t)
}

/// The topic row inside a write, or not found.
pub(super) fn topic_tx(tx: &Transaction<'_>, name: &str) -> Result<TopicInfo> {
    tx.prepare_cached(&format!(
        "SELECT {TOPIC_COLUMNS} FROM topics WHERE name = ?1"
    ))?
    .query_row([name], topic_row)
    .optional()?
    .ok_or_else(|| not_found(name))
}

/// The first offset at or after `offset` whose event was published at or after
/// `at_ms`. Publish times are kept non-decreasing along offsets (see `append`), so a
/// binary search over the primary key finds it without an index on time.
fn first_offset_at(conn: &Connection, topic: &str, at_ms: i64, next: i64) -> Result<i64> {
    let mut stmt = conn.prepare_cached(
        "SELECT offset, published_at_ms FROM events WHERE topic = ?1 AND offset >= ?2
         ORDER BY offset LIMIT 1",
    )?;
    let mut probe = |o: i64| -> Result<Option<(i64, i64)>> {
        Ok(stmt
            .query_row(params![topic, o], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    };
    let Some((mut lo, first_at)) = probe(0)? else {
        return Ok(next);
    };
    if first_at >= at_ms {
        return Ok(lo);
    }
    // Invariant: the event at lo is older than at_ms; the answer is in (lo, hi].
    let mut hi = next;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match probe(mid)? {
            Some((o, t)) if t < at_ms => lo = o,
            Some(_) => hi = mid,
            None => hi = mid,
        }
    }
    Ok(hi)
}

impl EventLog {
    pub async fn create_topic(
        &self,
        name: &str,
        settings: TopicSettings,
        now_ms: i64,
    ) -> Result<TopicInfo> {
        let name = name.to_string();
        self.write(move |tx| {
            let exists: Option<i64> = tx
                .query_row("SELECT 1 FROM topics WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_some() {
                return Err(Error::Conflict(format!("topic `{name}` already exists")));
            }
            tx.execute(
                "INSERT INTO topics (name, retention_ms, max_bytes, dedup_window_ms, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    name,
                    settings.retention_ms,
                    settings.max_bytes,
                    settings.dedup_window_ms,
                    now_ms
                ],
            )?;
            topic_tx(tx, &name)
        })
        .await
    }

    /// Removes a topic and its events.
    pub async fn delete_topic(&self, name: &str) -> Result<TopicInfo> {
        let name = name.to_string();
        self.write_subscriptions(move |tx| {
            let t = topic_tx(tx, &name)?;
            tx.execute("DELETE FROM events WHERE topic = ?1", [&name])?;
            super::subscriptions::delete_topic_subscriptions(tx, &name)?;
            tx.execute("DELETE FROM topics WHERE name = ?1", [&name])?;
            Ok(t)
        })
        .await
    }

    pub fn topics(&self) -> Result<Vec<TopicInfo>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare(&format!("SELECT {TOPIC_COLUMNS} FROM topics ORDER BY name"))?;
            let rows = stmt
                .query_map([], topic_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(|t| with_bounds(conn, t)).collect()
        })
    }

    pub fn topic(&self, name: &str) -> Result<TopicInfo> {
        self.read(|conn| {
            let t = conn
                .query_row(
                    &format!("SELECT {TOPIC_COLUMNS} FROM topics WHERE name = ?1"),
                    [name],
                    topic_row,
                )
                .optional()?
                .ok_or_else(|| not_found(name))?;
            with_bounds(conn, t)
        })
    }

    /// Appends events to a topic in one durable commit (shared with whatever else is
    /// queued). An event whose id the topic saw within its dedup window is answered
    /// with the offset it already has and not stored again.
    pub async fn append(
        &self,
        topic: &str,
        events: Vec<NewEvent>,
        now_ms: i64,
    ) -> Result<Vec<Appended>> {
        let topic = topic.to_string();
        self.write(move |tx| append_tx(tx, &topic, &events, now_ms))
            .await
    }

    /// Up to `limit` events from `from_offset` on, in offset order.
    pub fn read_events(
        &self,
        topic: &str,
        from_offset: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT offset, id, key, published_at_ms, body FROM events
                 WHERE topic = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![topic, from_offset, limit as i64], |r| {
                    Ok(StoredEvent {
                        offset: r.get(0)?,
                        id: r.get(1)?,
                        key: r.get(2)?,
                        published_at_ms: r.get(3)?,
                        body: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// The offset of the first event published at or after `at_ms` (the topic's next
    /// offset when there is none): where a subscription reset `--to` a time starts.
    pub fn offset_at(&self, topic: &str, at_ms: i64) -> Result<i64> {
        let t = self.topic(topic)?;
        self.read(|conn| first_offset_at(conn, topic, at_ms, t.next_offset))
    }

    /// Enforces every topic's retention (age, then size); returns events removed. Runs
    /// as small jobs so publishes are never held up behind a large delete.
    pub async fn prune(&self, now_ms: i64) -> Result<u64> {
        let mut removed = 0u64;
        for t in self.topics()? {
            loop {
                let name = t.name.clone();
                let n = self.write(move |tx| prune_chunk(tx, &name, now_ms)).await?;
                removed += n as u64;
                if n < PRUNE_CHUNK {
                    break;
                }
            }
        }
        Ok(removed)
    }
}

/// Appends inside a write job, so another table's change and the events it produces
/// commit together (a finished invocation and its destination record).
pub(crate) fn append_tx(
    tx: &Transaction<'_>,
    topic: &str,
    events: &[NewEvent],
    now_ms: i64,
) -> Result<Vec<Appended>> {
    let t = topic_tx(tx, topic)?;
    // Publish times never go backwards along offsets (the clock may): reset --to and
    // retention rely on it.
    let last_at: Option<i64> = tx
        .prepare_cached(
            "SELECT published_at_ms FROM events WHERE topic = ?1 ORDER BY offset DESC LIMIT 1",
        )?
        .query_row([topic], |r| r.get(0))
        .optional()?;
    let at = last_at.map_or(now_ms, |l| l.max(now_ms));
    let mut next = t.next_offset;
    let mut seen: HashMap<&str, i64> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    let mut bytes = 0i64;
    let mut added = 0i64;
    let mut find = tx.prepare_cached(
        // INDEXED BY: ordered by offset, the planner would rather walk the whole
        // topic along its primary key than look the id up.
        "SELECT offset FROM events INDEXED BY events_by_id
         WHERE topic = ?1 AND id = ?2 AND published_at_ms >= ?3 LIMIT 1",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (topic, offset, id, key, published_at_ms, size, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for e in events {
        if let Some(&offset) = seen.get(e.id.as_str()) {
            out.push(Appended {
                offset,
                duplicate: true,
            });
            continue;
        }
        let earlier: Option<i64> = find
            .query_row(params![topic, e.id, at - t.settings.dedup_window_ms], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(offset) = earlier {
            out.push(Appended {
                offset,
                duplicate: true,
            });
            continue;
        }
        let size = e.body.len() as i64;
        insert.execute(params![topic, next, e.id, e.key, at, size, e.body])?;
        seen.insert(e.id.as_str(), next);
        out.push(Appended {
            offset: next,
            duplicate: false,
        });
        next += 1;
        bytes += size;
        added += 1;
    }
    if added > 0 {
        tx.prepare_cached(
            "UPDATE topics SET next_offset = ?2, bytes = bytes + ?3, count = count + ?4
             WHERE name = ?1",
        )?
        .execute(params![topic, next, bytes, added])?;
    }
    Ok(out)
}

/// Deletes up to `PRUNE_CHUNK` of the oldest events that are past the topic's age or
/// over its size bound.
fn prune_chunk(tx: &Transaction<'_>, topic: &str, now_ms: i64) -> Result<i64> {
    let t = match topic_tx(tx, topic) {
        Ok(t) => t,
        Err(Error::NotFound(_)) => return Ok(0),
        Err(e) => return Err(e),
    };
    let cutoff = now_ms - t.settings.retention_ms;
    let by_age = first_offset_at(tx, topic, cutoff, t.next_offset)?;
    let oldest: Option<i64> = tx
        .query_row(
            "SELECT offset FROM events WHERE topic = ?1 ORDER BY offset LIMIT 1",
            [topic],
            |r| r.get(0),
        )
        .optional()?;
    let Some(oldest) = oldest else { return Ok(0) };
    let mut upto = by_age.min(oldest + PRUNE_CHUNK);
    // Over the size bound: also drop the oldest until under it.
    if t.bytes > t.settings.max_bytes {
        let mut excess = t.bytes - t.settings.max_bytes;
        let mut stmt = tx.prepare_cached(
            "SELECT offset, size FROM events WHERE topic = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![topic, oldest, PRUNE_CHUNK], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (offset, size) in rows {
            if excess <= 0 {
                break;
            }
            excess -= size;
            upto = upto.max(offset + 1);
        }
    }
    if upto <= oldest {
        return Ok(0);
    }
    let (n, bytes): (i64, i64) = tx.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM events WHERE topic = ?1 AND offset < ?2",
        params![topic, upto],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tx.execute(
        "DELETE FROM events WHERE topic = ?1 AND offset < ?2",
        params![topic, upto],
    )?;
    tx.execute(
        "UPDATE topics SET bytes = bytes - ?2, count = count - ?3 WHERE name = ?1",
        params![topic, bytes, n],
    )?;
    Ok(n)
}

impl nimbus_core::events::Publisher for EventLog {
    fn publish(
        &self,
        topic: &str,
        events: Vec<nimbus_core::events::ParsedEvent>,
    ) -> nimbus_core::invoke::BoxFuture<
        '_,
        std::result::Result<Vec<nimbus_core::events::Published>, nimbus_core::events::PublishError>,
    > {
        use nimbus_core::events::{PublishError, Published};
        let topic = topic.to_string();
        Box::pin(async move {
            let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
            let new = events
                .into_iter()
                .map(|e| NewEvent {
                    id: e.id,
                    key: e.key,
                    body: e.body,
                })
                .collect();
            match self.append(&topic, new, nimbus_core::now_ms()).await {
                Ok(appended) => Ok(ids
                    .into_iter()
                    .zip(appended)
                    .map(|(id, a)| Published {
                        id,
                        offset: a.offset,
                        duplicate: a.duplicate,
                    })
                    .collect()),
                Err(Error::NotFound(m)) => Err(PublishError::NotFound(m)),
                Err(Error::StorageFull(_)) => Err(PublishError::StorageFull),
                Err(e) => {
                    tracing::error!(error = %e, topic, "publish failed");
                    Err(PublishError::Unavailable(
                        "the event log could not commit".into(),
                    ))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, n: usize) -> NewEvent {
        NewEvent {
            id: id.into(),
            key: None,
            body: vec![b'x'; n],
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn append_dedups_within_the_window_and_offsets_are_dense() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EventLog::open(&dir.path().join("events.db")).expect("open");
        rt().block_on(async {
            log.create_topic("orders", TopicSettings::default(), 0)
                .await
                .expect("create");
            assert!(matches!(
                log.create_topic("orders", TopicSettings::default(), 0)
                    .await,
                Err(Error::Conflict(_))
            ));
            let a = log
                .append("orders", vec![ev("a", 10), ev("b", 10), ev("a", 10)], 1_000)
                .await
                .expect("append");
            assert_eq!(
                a.iter()
                    .map(|x| (x.offset, x.duplicate))
                    .collect::<Vec<_>>(),
                vec![(0, false), (1, false), (0, true)]
            );
            // Within the window: acknowledged, not stored.
            let again = log
                .append("orders", vec![ev("b", 10)], 2_000)
                .await
                .expect("dup");
            assert_eq!(
                again[0],
                Appended {
                    offset: 1,
                    duplicate: true
                }
            );
            // Past it: a new event.
            let later = log
                .append(
                    "orders",
                    vec![ev("b", 10)],
                    1_000 + DEFAULT_DEDUP_WINDOW_MS + 1,
                )
                .await
                .expect("later");
            assert_eq!(
                later[0],
                Appended {
                    offset: 2,
                    duplicate: false
                }
            );
            assert!(matches!(
                log.append("nope", vec![ev("x", 1)], 0).await,
                Err(Error::NotFound(_))
            ));
        });
        let t = log.topic("orders").expect("topic");
        assert_eq!((t.count, t.bytes, t.next_offset), (3, 30, 3));
        let read = log.read_events("orders", 1, 10).expect("read");
        assert_eq!(
            read.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn retention_by_age_and_size_and_reset_by_time() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EventLog::open(&dir.path().join("events.db")).expect("open");
        let settings = TopicSettings {
            retention_ms: 10_000,
            max_bytes: 250,
            dedup_window_ms: 0,
        };
        rt().block_on(async {
            log.create_topic("t", settings, 0).await.expect("create");
            for i in 0..5 {
                log.append("t", vec![ev(&format!("e{i}"), 100)], i * 1_000)
                    .await
                    .expect("append");
            }
            // A clock that went back does not make times go back along offsets.
            log.append("t", vec![ev("late", 10)], 500)
                .await
                .expect("append");
            assert_eq!(log.offset_at("t", 2_500).expect("at"), 3);
            assert_eq!(log.offset_at("t", 0).expect("at"), 0);
            assert_eq!(log.offset_at("t", 99_999).expect("at"), 6);
            // Size: 510 bytes over a 250 bound -> the three oldest go.
            let n = log.prune(5_000).await.expect("prune");
            assert_eq!(n, 3);
            let t = log.topic("t").expect("topic");
            assert_eq!((t.count, t.bytes, t.oldest_offset), (3, 210, Some(3)));
            // Age: everything published before 20_000 - 10_000.
            let n = log.prune(20_000).await.expect("prune");
            assert_eq!(n, 3);
            assert_eq!(log.topic("t").expect("topic").count, 0);
            log.delete_topic("t").await.expect("delete");
            assert!(matches!(log.topic("t"), Err(Error::NotFound(_))));
        });
    }

    /// A fresh log with topic `t`, and a two-thread runtime for concurrent writers.
    fn topic_t() -> (
        tempfile::TempDir,
        std::sync::Arc<EventLog>,
        tokio::runtime::Runtime,
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EventLog::open(&dir.path().join("events.db")).expect("open");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(log.create_topic("t", TopicSettings::default(), 0))
            .expect("create");
        (dir, log, runtime)
    }

    #[test]
    fn concurrent_appends_share_commits_and_all_land() {
        let (_dir, log, runtime) = topic_t();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for p in 0..8 {
                let log = std::sync::Arc::clone(&log);
                tasks.push(tokio::spawn(async move {
                    for i in 0..50 {
                        log.append("t", vec![ev(&format!("{p}-{i}"), 16)], 1)
                            .await
                            .expect("append");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("join");
            }
        });
        let t = log.topic("t").expect("topic");
        assert_eq!((t.count, t.next_offset), (400, 400));
    }

    #[test]
    fn a_failing_job_rolls_back_alone() {
        let (_dir, log, runtime) = topic_t();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..40 {
                let log = std::sync::Arc::clone(&log);
                tasks.push(tokio::spawn(async move {
                    log.write(move |tx| {
                        append_tx(tx, "t", &[ev(&format!("e{i}"), 1)], 1)?;
                        if i % 2 == 1 {
                            return Err(Error::Invalid("refused after writing".into()));
                        }
                        Ok(())
                    })
                    .await
                    .is_ok()
                }));
            }
            for (i, t) in tasks.into_iter().enumerate() {
                assert_eq!(t.await.expect("join"), i % 2 == 0);
            }
        });
        let ids: Vec<String> = log
            .read_events("t", 0, 100)
            .expect("read")
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids.len(), 20, "{ids:?}");
        assert!(
            ids.iter()
                .all(|id| id[1..].parse::<u32>().expect("n") % 2 == 0)
        );
    }
}
