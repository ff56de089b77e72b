//! nimbus-broker: delivers the events of topics to the functions subscribed to them.
//!
//! Owns: one task per subscription (reading the topic from the subscription's
//! durable cursor, filtering, scheduling, invoking, recording outcomes), retries with
//! backoff and jitter, dead letters, and the broker's metrics. Meets the worker only
//! through `Arc<dyn Invoker>` and the store's event log through its methods.
//!
//! # The delivery guarantee: at-least-once
//! - An event is *delivered* when an invocation that carried it returned success
//!   (for a batch: success, minus the items the handler listed in
//!   `batchItemFailures`). A function error, a timeout, a crash, an out-of-memory
//!   kill or a missing function is a failed attempt; a throttled invocation (429) is
//!   not an attempt and is retried later without counting.
//! - An event is *settled* when it was delivered, did not match the filter, or ran
//!   out of attempts or age and was appended to the dead-letter topic (or, without
//!   one, dropped with a log line and the `dropped` metric). Every outcome is
//!   committed to `events.db` (fsynced) before the broker acts on it; a dead letter
//!   is appended in the same transaction that settles its event.
//! - Nothing is settled any other way, so every acknowledged publish that matches a
//!   subscription is eventually delivered or dead-lettered, across crashes (until
//!   the topic's retention removes it first).
//! - Duplicates: a crash (or a drain timeout) between an invocation's success and
//!   the commit of its outcome leaves the event unsettled, and after a restart it is
//!   delivered again; so are the other items of a batch whose invocation was cut
//!   short. A reset delivers everything from its offset again on purpose. Handlers
//!   must be idempotent; the CloudEvent `id` is the key to de-duplicate on.
//! - Ordering: with `ordered`, events sharing a partition key (`partitionkey`) are
//!   delivered one at a time, in publish order: the next one starts only once the
//!   previous one is settled (including its retries). A redelivery after a crash
//!   repeats the unsettled event, never reorders. Otherwise (and for events without
//!   a key) deliveries run in parallel up to the function's `max_instances`, and
//!   complete in any order.
#![forbid(unsafe_code)]

mod schedule;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use nimbus_core::filter::Filter;
use nimbus_core::subscription::SubscriptionSpec;
use nimbus_core::{InvokeError, InvokeRequest, InvokeStatus, Invoker, Target, Trigger};
use nimbus_store::Store;
use nimbus_store::events::{EventLog, NewEvent, SubscriptionRow, Update};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use schedule::Scheduler;

/// Unsettled events one subscription holds in memory at most.
const MAX_OUTSTANDING: usize = 1_000;
/// Events read from the log at a time.
const READ_CHUNK: usize = 500;
/// How often a subscription re-reads its function's concurrency.
const CONCURRENCY_REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// First retry delay (before jitter); doubles per attempt.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            retry_base_ms: 1_000,
            retry_max_ms: 5 * 60_000,
        }
    }
}

struct Ctx {
    log: Arc<EventLog>,
    store: Arc<Store>,
    invoker: Arc<dyn Invoker>,
    config: BrokerConfig,
}

/// The running broker: [`Broker::stop`] stops new deliveries, [`Broker::join`] waits
/// for the in-flight ones to finish and record their outcomes.
pub struct Broker {
    stop: watch::Sender<bool>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Broker {
    pub fn spawn(
        log: Arc<EventLog>,
        store: Arc<Store>,
        invoker: Arc<dyn Invoker>,
        config: BrokerConfig,
    ) -> Broker {
        let (stop, stop_rx) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            log,
            store,
            invoker,
            config,
        });
        let supervisor = tokio::spawn(supervise(ctx, stop_rx));
        Broker { stop, supervisor }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub async fn join(self) {
        self.stop();
        let _ = self.supervisor.await;
    }
}

fn now_ms() -> i64 {
    nimbus_core::now_ms()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> nimbus_store::Result<T> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "broker: event log read failed");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "broker: blocking task failed");
            None
        }
    }
}

struct Running {
    row: SubscriptionRow,
    stop: watch::Sender<bool>,
}

/// Keeps one task per subscription in step with the table: reloaded whenever a
/// commit changed it (subscribe, deploy, reset, delete), not on every publish.
async fn supervise(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut changes = ctx.log.subscription_changes();
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut last_gauges = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        if *stop.borrow() {
            break;
        }
        changes.borrow_and_update();
        let log = Arc::clone(&ctx.log);
        if let Some(rows) = blocking(move || log.subscriptions()).await {
            running.retain(|name, r| {
                let keep = rows.iter().any(|row| {
                    row.spec == r.row.spec && row.epoch == r.row.epoch && &row.spec.name == name
                });
                if !keep {
                    let _ = r.stop.send(true);
                }
                keep
            });
            for row in rows {
                if running.contains_key(&row.spec.name) {
                    continue;
                }
                let (tx, rx) = watch::channel(false);
                tasks.spawn(run_subscription(Arc::clone(&ctx), row.clone(), rx));
                running.insert(row.spec.name.clone(), Running { row, stop: tx });
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                last_gauges = std::time::Instant::now();
                let log = Arc::clone(&ctx.log);
                let names: Vec<String> = running.keys().cloned().collect();
                if let Some(lags) = blocking(move || {
                    Ok(names
                        .into_iter()
                        .filter_map(|n| log.subscription_lag(&n).ok().map(|l| (n, l.0)))
                        .collect::<Vec<_>>())
                })
                .await
                {
                    for (name, lag) in lags {
                        metrics::gauge!("nimbus_broker_lag", "subscription" => name)
                            .set(lag as f64);
                    }
                }
            }
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {}
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    while tasks.join_next().await.is_some() {}
}

/// One event held by a subscription task.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    published_at_ms: i64,
    event: Value,
}

/// What a finished delivery reports back, already durable.
enum Outcome {
    Settled,
    /// Failed; waits until the time given, attempts counted so far.
    Retry(i64, u32),
}

struct Delivered {
    outcomes: Vec<(i64, Outcome)>,
    stale: bool,
}

async fn concurrency(ctx: &Ctx, spec: &SubscriptionSpec) -> usize {
    let store = Arc::clone(&ctx.store);
    let (function, alias) = (spec.function.clone(), spec.alias.clone());
    let got = blocking(move || {
        let Some(f) = store.get_function(&function)? else {
            return Ok(None);
        };
        let Some(v) = store.resolve(&function, &Target::Alias(alias))? else {
            return Ok(None);
        };
        let mut c = v.config.concurrency.clone();
        f.scale.apply(&mut c);
        Ok(Some(c.max_instances))
    })
    .await
    .flatten();
    got.unwrap_or(1).max(1) as usize
}

async fn run_subscription(ctx: Arc<Ctx>, row: SubscriptionRow, mut stop: watch::Receiver<bool>) {
    let spec = Arc::new(row.spec.clone());
    let name = spec.name.clone();
    let epoch = row.epoch;
    let filter = match Filter::compile(&spec.filter) {
        Ok(f) => f,
        Err(e) => {
            // Validated at subscribe; a stored pattern that no longer compiles is a bug
            // or a corrupt row, and delivering everything would be the worse failure.
            tracing::error!(subscription = %name, error = %e, "stored filter does not compile");
            return;
        }
    };
    let log = Arc::clone(&ctx.log);
    let n = name.clone();
    let Some(states) = blocking(move || log.delivery_state(&n)).await else {
        return;
    };
    let mut done: BTreeSet<i64> = BTreeSet::new();
    let mut retries: HashMap<i64, (u32, i64)> = HashMap::new();
    for s in states {
        if s.done {
            done.insert(s.offset);
        } else {
            retries.insert(s.offset, (s.attempts, s.next_at_ms));
        }
    }
    let mut sched: Scheduler<Item> = Scheduler::new(spec.ordered);
    let mut read_pos = row.cursor;
    let mut changes = ctx.log.changes();
    let mut flights: JoinSet<Delivered> = JoinSet::new();
    let mut limit = concurrency(&ctx, &spec).await;
    let mut limit_at = std::time::Instant::now();
    let mut stopping = false;
    tracing::debug!(subscription = %name, cursor = row.cursor, "subscription started");
    loop {
        if *stop.borrow() {
            stopping = true;
        }
        if stopping && flights.is_empty() {
            break;
        }
        if !stopping {
            changes.borrow_and_update();
            // Read on.
            if sched.len() < MAX_OUTSTANDING {
                let want = (MAX_OUTSTANDING - sched.len()).min(READ_CHUNK);
                let log = Arc::clone(&ctx.log);
                let topic = spec.topic.clone();
                let from = read_pos;
                if let Some(events) = blocking(move || log.read_events(&topic, from, want)).await {
                    // Offsets are dense: a gap at the start means retention removed them.
                    let floor = events.first().map(|e| e.offset).filter(|o| *o > read_pos);
                    let mut filtered = Vec::new();
                    for e in events {
                        read_pos = e.offset + 1;
                        if done.remove(&e.offset) {
                            continue;
                        }
                        let event = nimbus_core::events::as_json(&e.body);
                        if !filter.matches(&event) {
                            filtered.push(Update::Done { offset: e.offset });
                            continue;
                        }
                        let (attempts, ready) = retries.remove(&e.offset).unwrap_or((0, 0));
                        sched.insert(
                            e.offset,
                            e.key.clone(),
                            attempts,
                            ready,
                            Item {
                                id: e.id,
                                published_at_ms: e.published_at_ms,
                                event,
                            },
                        );
                    }
                    if !filtered.is_empty() || floor.is_some() {
                        let n = filtered.len() as u64;
                        match ctx
                            .log
                            .settle(&name, epoch, filtered, floor, now_ms())
                            .await
                        {
                            Ok(s) if s.stale => break,
                            Ok(_) => {
                                metrics::counter!("nimbus_broker_deliveries_total",
                                    "subscription" => name.clone(), "outcome" => "filtered")
                                .increment(n);
                            }
                            Err(e) => {
                                // Not recorded: read them again later.
                                tracing::error!(subscription = %name, error = %e, "could not record filtered events");
                                read_pos = from;
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        }
                    }
                }
            }
            if limit_at.elapsed() >= CONCURRENCY_REFRESH {
                limit = concurrency(&ctx, &spec).await;
                limit_at = std::time::Instant::now();
            }
            while flights.len() < limit {
                let now = now_ms();
                let picked = sched.next_batch(now, spec.batch as usize);
                if picked.is_empty() {
                    break;
                }
                let items: Vec<(i64, u32, Item)> = picked
                    .iter()
                    .filter_map(|o| sched.get(*o).map(|e| (*o, e.attempts, e.item.clone())))
                    .collect();
                flights.spawn(deliver(Arc::clone(&ctx), Arc::clone(&spec), epoch, items));
            }
        }
        let wake = sched.next_wake(now_ms());
        let sleep = match wake {
            Some(t) => Duration::from_millis((t - now_ms()).max(1) as u64),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            Some(r) = flights.join_next(), if !flights.is_empty() => {
                match r {
                    Ok(d) => {
                        if d.stale {
                            stopping = true;
                        }
                        for (offset, o) in d.outcomes {
                            match o {
                                Outcome::Settled => { sched.remove(offset); }
                                Outcome::Retry(at, attempts) => sched.reschedule(offset, at, attempts),
                            }
                        }
                    }
                    Err(e) => {
                        // Its events stay in flight in memory and are delivered again on
                        // the next start; stop this task so the supervisor restarts it.
                        tracing::error!(subscription = %name, error = %e, "delivery task failed");
                        stopping = true;
                    }
                }
            }
            r = changes.changed(), if !stopping => if r.is_err() { stopping = true },
            _ = tokio::time::sleep(sleep), if !stopping => {}
            _ = stop.changed(), if !stopping => {}
        }
    }
    tracing::debug!(subscription = %name, "subscription stopped");
}

/// `{"batchItemFailures": [{"itemIdentifier": id}]}` from a batch handler: the ids
/// that failed. `Err` when an id is not in the batch (Lambda then fails the batch).
fn batch_failures(result: &[u8], ids: &[&str]) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_slice(result).unwrap_or(Value::Null);
    let Some(list) = v.get("batchItemFailures").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for f in list {
        let id = f
            .get("itemIdentifier")
            .and_then(Value::as_str)
            .ok_or("batchItemFailures: each item needs a string itemIdentifier")?;
        if !ids.contains(&id) {
            return Err(format!(
                "batchItemFailures names `{id}`, which is not in the batch"
            ));
        }
        out.push(id.to_string());
    }
    Ok(out)
}

/// The CloudEvent a dead letter is: the original event and the last error in its
/// data, the subscription and attempts as extensions.
fn dead_letter_event(
    spec: &SubscriptionSpec,
    item: &Item,
    attempts: u32,
    error: &str,
) -> Option<NewEvent> {
    let mut ev = json!({
        "specversion": "1.0",
        "id": uuid::Uuid::now_v7().to_string(),
        "source": format!("nimbus/subscriptions/{}", spec.name),
        "type": "nimbus.deadletter",
        "subject": item.id,
        "datacontenttype": "application/json",
        "subscription": spec.name,
        "attempts": attempts,
        "data": {
            "event": item.event,
            "error": error,
            "attempts": attempts,
            "subscription": spec.name,
            "topic": spec.topic,
        },
    });
    if let Some(k) = item.event.get(nimbus_core::events::PARTITION_KEY) {
        ev[nimbus_core::events::PARTITION_KEY] = k.clone();
    }
    match nimbus_core::events::parse_structured(ev.to_string().as_bytes(), now_ms()) {
        Ok(p) => Some(NewEvent {
            id: p.id,
            key: p.key,
            body: p.body,
        }),
        Err(e) => {
            // E.g. the original is near the size limit: the wrapper no longer fits.
            tracing::warn!(subscription = %spec.name, error = %e, "dead letter not representable");
            None
        }
    }
}

async fn deliver(
    ctx: Arc<Ctx>,
    spec: Arc<SubscriptionSpec>,
    epoch: i64,
    items: Vec<(i64, u32, Item)>,
) -> Delivered {
    let payload = if spec.batch > 1 {
        json!({"Records": items.iter().map(|(_, _, i)| &i.event).collect::<Vec<_>>()})
    } else {
        items
            .first()
            .map(|(_, _, i)| i.event.clone())
            .unwrap_or(Value::Null)
    };
    let req = InvokeRequest {
        request_id: nimbus_core::new_request_id(),
        function: spec.function.clone(),
        target: Target::Alias(spec.alias.clone()),
        trigger: Trigger::Event,
        payload: bytes::Bytes::from(payload.to_string()),
        trace: None,
    };
    let ids: Vec<&str> = items.iter().map(|(_, _, i)| i.id.as_str()).collect();
    // None: every item failed with this error; Some(list): those ids failed.
    let result: Result<Vec<String>, String> = match ctx.invoker.invoke(req).await {
        Ok(o) => match &o.status {
            InvokeStatus::Success(body) if spec.batch > 1 => batch_failures(body, &ids),
            InvokeStatus::Success(_) => Ok(Vec::new()),
            other => Err(other.message()),
        },
        Err(InvokeError::Throttled { retry_after_s, .. }) => {
            // Not an attempt: the function was never reached.
            let wait = (retry_after_s.max(1) * 1000) as f64 * (0.5 + nimbus_core::retry::jitter());
            let at = now_ms() + wait as i64;
            return Delivered {
                outcomes: items
                    .iter()
                    .map(|(o, a, _)| (*o, Outcome::Retry(at, *a)))
                    .collect(),
                stale: false,
            };
        }
        Err(InvokeError::ShuttingDown) => {
            return Delivered {
                outcomes: items
                    .iter()
                    .map(|(o, a, _)| (*o, Outcome::Retry(now_ms() + 1000, *a)))
                    .collect(),
                stale: false,
            };
        }
        Err(e) => Err(e.to_string()),
    };
    let now = now_ms();
    let mut updates = Vec::with_capacity(items.len());
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let mut outcomes = Vec::with_capacity(items.len());
    for (offset, attempts, item) in &items {
        let error = match &result {
            Ok(failed) if !failed.contains(&item.id) => None,
            Ok(_) => Some("reported in batchItemFailures".to_string()),
            Err(e) => Some(e.clone()),
        };
        let Some(error) = error else {
            updates.push(Update::Done { offset: *offset });
            outcomes.push((*offset, Outcome::Settled));
            *counts.entry("ok").or_default() += 1;
            continue;
        };
        let attempts = attempts + 1;
        let next_at = now
            + nimbus_core::retry::backoff_ms(
                attempts,
                ctx.config.retry_base_ms,
                ctx.config.retry_max_ms,
                nimbus_core::retry::jitter(),
            ) as i64;
        let expires = item.published_at_ms.saturating_add(spec.max_age_ms);
        if attempts < spec.max_attempts && next_at < expires {
            updates.push(Update::Retry {
                offset: *offset,
                attempts,
                next_at_ms: next_at,
                error,
            });
            outcomes.push((*offset, Outcome::Retry(next_at, attempts)));
            *counts.entry("retry").or_default() += 1;
            continue;
        }
        outcomes.push((*offset, Outcome::Settled));
        let dl = spec
            .dead_letter
            .as_ref()
            .and_then(|t| dead_letter_event(&spec, item, attempts, &error).map(|e| (t, e)));
        match dl {
            Some((topic, event)) => {
                updates.push(Update::DeadLetter {
                    offset: *offset,
                    topic: topic.clone(),
                    event,
                });
                *counts.entry("dead_letter").or_default() += 1;
            }
            None => {
                // The error text is the function's and may hold anything: not logged.
                tracing::warn!(subscription = %spec.name, event = %item.id, attempts,
                    "event dropped after its last attempt (no dead-letter topic)");
                updates.push(Update::Done { offset: *offset });
                *counts.entry("dropped").or_default() += 1;
            }
        }
    }
    match ctx.log.settle(&spec.name, epoch, updates, None, now).await {
        Ok(s) => {
            for offset in s.dropped {
                tracing::warn!(subscription = %spec.name, offset, "dead-letter topic is gone: event dropped");
                *counts.entry("dropped").or_default() += 1;
                if let Some(c) = counts.get_mut("dead_letter") {
                    *c = c.saturating_sub(1);
                }
            }
            if !s.stale {
                for (outcome, n) in counts {
                    metrics::counter!("nimbus_broker_deliveries_total",
                        "subscription" => spec.name.clone(), "outcome" => outcome)
                    .increment(n);
                }
            }
            Delivered {
                outcomes,
                stale: s.stale,
            }
        }
        Err(e) => {
            // Not durable, so not settled: deliver again shortly (a duplicate at worst).
            tracing::error!(subscription = %spec.name, error = %e, "could not record delivery outcomes");
            Delivered {
                outcomes: items
                    .iter()
                    .map(|(o, a, _)| (*o, Outcome::Retry(now + 1000, *a)))
                    .collect(),
                stale: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_item_failures_are_read_as_lambda_does() {
        let ids = ["a", "b"];
        assert_eq!(batch_failures(b"null", &ids), Ok(vec![]));
        assert_eq!(batch_failures(br#"{"ok":1}"#, &ids), Ok(vec![]));
        assert_eq!(
            batch_failures(br#"{"batchItemFailures":[{"itemIdentifier":"b"}]}"#, &ids),
            Ok(vec!["b".to_string()])
        );
        assert!(
            batch_failures(br#"{"batchItemFailures":[{"itemIdentifier":"z"}]}"#, &ids).is_err()
        );
        assert!(batch_failures(br#"{"batchItemFailures":[{}]}"#, &ids).is_err());
    }
}
