//! The dispatcher: claims due invocations (durably `running`), runs each in its own
//! task, and records every outcome durably: done (with its destination record in the
//! same commit), retry with backoff, or requeue (throttled, shutting down).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nimbus_core::retry::{backoff_ms, jitter};
use nimbus_core::{InvokeError, InvokeRequest, InvokeStatus, Invoker, Trigger, now_ms};
use nimbus_store::events::{EventLog, Finish, InvocationRow, InvocationState, NewEvent};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::SchedulerConfig;

/// Longest sleep between looks at the queue when nothing wakes the dispatcher.
const POLL: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub(crate) async fn run(
    cfg: Arc<SchedulerConfig>,
    log: Arc<EventLog>,
    invoker: Arc<dyn Invoker>,
    mut stop: watch::Receiver<bool>,
) {
    match log.requeue_running(now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            invocations = n,
            "requeued async invocations interrupted by a crash"
        ),
        Err(e) => tracing::error!(error = %e, "requeue interrupted invocations"),
    }
    let mut changes = log.changes();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut pruned_at: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        if pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            pruned_at = Some(Instant::now());
            let keep = i64::try_from(cfg.keep_finished.as_millis()).unwrap_or(i64::MAX);
            if let Err(e) = log.prune_invocations(now_ms().saturating_sub(keep)).await {
                tracing::warn!(error = %e, "prune finished invocations");
            }
        }
        let free = cfg.max_in_flight.saturating_sub(tasks.len());
        let mut wait = POLL;
        if free > 0 {
            let now = now_ms();
            let l = Arc::clone(&log);
            let due = tokio::task::spawn_blocking(move || l.next_due_at())
                .await
                .unwrap_or_else(|e| Err(nimbus_store::Error::Unavailable(e.to_string())));
            match due {
                Ok(Some(t)) if t <= now => match log.claim_due(now, free).await {
                    Ok(rows) if !rows.is_empty() => {
                        for row in rows {
                            tasks.spawn(attempt(
                                Arc::clone(&cfg),
                                Arc::clone(&log),
                                Arc::clone(&invoker),
                                row,
                            ));
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "claim due invocations"),
                },
                Ok(Some(t)) => {
                    wait = wait.min(Duration::from_millis(u64::try_from(t - now).unwrap_or(0)))
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "read the invocation queue"),
            }
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    tokio::time::sleep(wait).await;
                }
            }
            _ = tokio::time::sleep(wait) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = stop.changed() => {}
        }
    }
    if !tasks.is_empty() {
        tracing::info!(
            in_flight = tasks.len(),
            "waiting for async invocations to finish"
        );
    }
    while tasks.join_next().await.is_some() {}
}

/// Lambda's destination conditions.
const SUCCESS: &str = "Success";
const RETRIES_EXHAUSTED: &str = "RetriesExhausted";
const EVENT_AGE_EXCEEDED: &str = "EventAgeExceeded";

async fn attempt(
    cfg: Arc<SchedulerConfig>,
    log: Arc<EventLog>,
    invoker: Arc<dyn Invoker>,
    row: InvocationRow,
) {
    let (finish, outcome) = decide(&cfg, invoker.as_ref(), &row).await;
    metrics::counter!(
        "nimbus_async_invocations_total",
        "function" => row.function.clone(),
        "outcome" => outcome,
    )
    .increment(1);
    // The row stays `running` if this never lands; the next start-up requeues it.
    for n in 0..3u32 {
        match log
            .finish_invocation(&row.id, finish.clone(), now_ms())
            .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(request_id = %row.id, error = %e, try_ = n, "record invocation outcome");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Runs one attempt (unless the invocation expired) and says how to record it, with
/// the metric outcome label.
async fn decide(
    cfg: &SchedulerConfig,
    invoker: &dyn Invoker,
    row: &InvocationRow,
) -> (Finish, &'static str) {
    let now = now_ms();
    if now.saturating_sub(row.created_at_ms) > row.max_age_ms {
        let error = format!(
            "expired: not run within its max event age of {}s",
            row.max_age_ms / 1000
        );
        let response = json!({"errorType": "Nimbus.EventAgeExceeded", "errorMessage": error});
        let dest = destination(cfg, row, EVENT_AGE_EXCEEDED, None, response, now);
        return (failed(error, dest), "expired");
    }
    let trigger = if row.source.starts_with("cron") {
        Trigger::Cron
    } else {
        Trigger::Event
    };
    let req = InvokeRequest {
        request_id: row.id.clone(),
        function: row.function.clone(),
        target: row.target.clone(),
        trigger,
        payload: Bytes::from(row.payload.clone()),
        trace: None,
    };
    match invoker.invoke(req).await {
        Ok(o) => match &o.status {
            InvokeStatus::Success(bytes) => {
                let result = serde_json::from_slice::<Value>(bytes).unwrap_or(Value::Null);
                let dest = row.on_success.as_ref().map(|topic| {
                    let rec = record(
                        cfg,
                        row,
                        SUCCESS,
                        Some(o.version),
                        None,
                        result.clone(),
                        now,
                    );
                    (topic.clone(), cloud_event(row, "success", rec, now))
                });
                let kept = (bytes.len() <= cfg.max_result_bytes).then(|| bytes.to_vec());
                let finish = Finish::Done {
                    state: InvocationState::Succeeded,
                    result: kept,
                    error: None,
                    destination: dest,
                };
                (finish, "succeeded")
            }
            status => {
                let error = status.message();
                let response = match status {
                    InvokeStatus::FunctionError(fe) => json!({
                        "errorType": fe.error_type,
                        "errorMessage": fe.error_message,
                        "stackTrace": fe.stack_trace,
                    }),
                    other => json!({"errorType": other.code(), "errorMessage": other.message()}),
                };
                failed_attempt(cfg, row, error, Some(o.version), response, now)
            }
        },
        Err(InvokeError::Throttled { .. }) => {
            let delay = backoff_ms(
                row.throttles + 1,
                millis(cfg.retry_base),
                millis(cfg.throttle_max),
                jitter(),
            );
            let finish = Finish::Requeue {
                next_at_ms: now + delay as i64,
                error: "throttled: the function is at its max_instances".into(),
            };
            (finish, "throttled")
        }
        Err(InvokeError::ShuttingDown) => {
            let finish = Finish::Requeue {
                next_at_ms: now,
                error: "interrupted by a shutdown; runs again on start-up".into(),
            };
            (finish, "requeued")
        }
        // The function or its version is gone, or the request cannot run: a retry
        // would fail the same way.
        Err(e @ (InvokeError::NotFound(_) | InvokeError::BadRequest(_))) => {
            let error = e.to_string();
            let response = json!({"errorType": "Nimbus.InvalidRequest", "errorMessage": error});
            let dest = destination(cfg, row, RETRIES_EXHAUSTED, None, response, now);
            (failed(error, dest), "failed")
        }
        Err(InvokeError::Internal(detail)) => {
            tracing::error!(request_id = %row.id, %detail, "async invocation failed inside the platform");
            let error = "internal error".to_string();
            let response = json!({"errorType": "Nimbus.Internal", "errorMessage": error});
            failed_attempt(cfg, row, error, None, response, now)
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A failed attempt: retried while attempts remain, else the invocation failed.
fn failed_attempt(
    cfg: &SchedulerConfig,
    row: &InvocationRow,
    error: String,
    version: Option<u32>,
    response: Value,
    now: i64,
) -> (Finish, &'static str) {
    if row.attempts < row.max_attempts {
        let delay = backoff_ms(
            row.attempts,
            millis(cfg.retry_base),
            millis(cfg.retry_max),
            jitter(),
        );
        let finish = Finish::Retry {
            next_at_ms: now + delay as i64,
            error,
        };
        return (finish, "retried");
    }
    let dest = destination(cfg, row, RETRIES_EXHAUSTED, version, response, now);
    (failed(error, dest), "failed")
}

fn failed(error: String, destination: Option<(String, NewEvent)>) -> Finish {
    Finish::Done {
        state: InvocationState::Failed,
        result: None,
        error: Some(error),
        destination,
    }
}

/// The on-failure destination, if the invocation has one.
fn destination(
    cfg: &SchedulerConfig,
    row: &InvocationRow,
    condition: &str,
    version: Option<u32>,
    response: Value,
    now: i64,
) -> Option<(String, NewEvent)> {
    let topic = row.on_failure.as_ref()?;
    let rec = record(
        cfg,
        row,
        condition,
        version,
        Some("Unhandled"),
        response,
        now,
    );
    Some((topic.clone(), cloud_event(row, "failure", rec, now)))
}

/// A destination record in Lambda's shape.
pub fn record(
    cfg: &SchedulerConfig,
    row: &InvocationRow,
    condition: &str,
    version: Option<u32>,
    function_error: Option<&str>,
    response: Value,
    now: i64,
) -> Value {
    let executed = version.map_or_else(|| "$LATEST".to_string(), |v| v.to_string());
    let mut response_context = json!({
        "statusCode": 200,
        "executedVersion": executed,
    });
    if let Some(fe) = function_error {
        response_context["functionError"] = json!(fe);
    }
    json!({
        "version": "1.0",
        "timestamp": nimbus_core::cron::rfc3339(now),
        "requestContext": {
            "requestId": row.id,
            "functionArn": format!(
                "arn:nimbus:lambda:{}:{}:function:{}:{}",
                cfg.region, cfg.account, row.function, executed
            ),
            "condition": condition,
            "approximateInvokeCount": row.attempts,
        },
        "requestPayload": serde_json::from_slice::<Value>(&row.payload).unwrap_or(Value::Null),
        "responseContext": response_context,
        "responsePayload": response,
    })
}

/// The record as a structured CloudEvent; its id is the request id, so the topic's
/// de-duplication drops a second copy if a crash makes the dispatcher publish again.
fn cloud_event(row: &InvocationRow, outcome: &str, data: Value, now: i64) -> NewEvent {
    let event = json!({
        "specversion": "1.0",
        "id": row.id,
        "source": format!("nimbus/functions/{}", row.function),
        "type": format!("nimbus.invocation.{outcome}"),
        "subject": row.id,
        "time": nimbus_core::cron::rfc3339(now),
        "datacontenttype": "application/json",
        "data": data,
    });
    let bytes = serde_json::to_vec(&event).unwrap_or_default();
    match nimbus_core::events::parse_structured(&bytes, now) {
        Ok(p) => NewEvent {
            id: p.id,
            key: p.key,
            body: p.body,
        },
        // Every field above is valid; keep the plain JSON should the SDK disagree.
        Err(_) => NewEvent {
            id: row.id.clone(),
            key: None,
            body: bytes,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::invoke::BoxFuture;
    use nimbus_core::{FunctionError, InstanceInfo, InvokeOutcome};
    use nimbus_store::events::{NewInvocation, TopicSettings};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Throttles the first call, then fails every call.
    struct Failing(AtomicU32);

    impl Invoker for Failing {
        fn invoke(&self, req: InvokeRequest) -> BoxFuture<'_, Result<InvokeOutcome, InvokeError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    return Err(InvokeError::Throttled {
                        function: req.function,
                        retry_after_s: 1,
                    });
                }
                Ok(InvokeOutcome {
                    request_id: req.request_id,
                    function: req.function,
                    version: 1,
                    status: InvokeStatus::FunctionError(FunctionError {
                        error_type: "ZeroDivisionError".into(),
                        error_message: "division by zero".into(),
                        stack_trace: vec![],
                    }),
                    cold_start: false,
                    init_duration_ms: None,
                    duration_ms: 1.0,
                    logs: String::new(),
                    memory_mb: 128,
                    peak_memory_bytes: None,
                    cpu_ms: None,
                })
            })
        }
        fn evict(&self, _: &str) -> BoxFuture<'_, usize> {
            Box::pin(async { 0 })
        }
        fn instances(&self, _: Option<String>) -> BoxFuture<'_, Vec<InstanceInfo>> {
            Box::pin(async { vec![] })
        }
    }

    #[tokio::test]
    async fn failures_retry_then_fail_with_a_destination_and_throttles_do_not_count() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = EventLog::open(&dir.path().join("events.db")).expect("open");
        log.create_topic("dlq", TopicSettings::default(), now_ms())
            .await
            .expect("topic");
        log.enqueue_invocation(
            NewInvocation {
                id: "r1".into(),
                function: "f".into(),
                target: Default::default(),
                payload: br#"{"n":1}"#.to_vec(),
                max_attempts: 3,
                max_age_ms: 60_000,
                on_success: None,
                on_failure: Some("dlq".into()),
                source: "api".into(),
            },
            now_ms(),
        )
        .await
        .expect("enqueue");
        let cfg = Arc::new(SchedulerConfig {
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(40),
            ..SchedulerConfig::default()
        });
        let invoker = Arc::new(Failing(AtomicU32::new(0)));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(cfg, Arc::clone(&log), invoker.clone(), stop));
        let deadline = Instant::now() + Duration::from_secs(10);
        let row = loop {
            let r = log.invocation("r1").expect("read").expect("row");
            if r.state == InvocationState::Failed || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = stop_tx.send(true);
        let _ = task.await;
        assert_eq!(row.state, InvocationState::Failed);
        assert_eq!(
            row.attempts, 3,
            "1 + 2 retries; the throttle was given back"
        );
        assert_eq!(row.throttles, 1);
        assert_eq!(invoker.0.load(Ordering::SeqCst), 4);
        let events = log.read_events("dlq", 0, 10).expect("events");
        assert_eq!(events.len(), 1);
        let ev: Value = serde_json::from_slice(&events[0].body).expect("json");
        let rec = &ev["data"];
        assert_eq!(rec["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(rec["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(rec["requestPayload"], json!({"n": 1}));
        assert_eq!(rec["responseContext"]["functionError"], "Unhandled");
        assert_eq!(rec["responsePayload"]["errorType"], "ZeroDivisionError");
    }
}
