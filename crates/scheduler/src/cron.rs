//! The cron loop: one task over every deployed cron. It sleeps until the earliest next
//! fire, fires what is due (one durable commit per fire, see
//! `nimbus_store::events::EventLog::cron_fire`), and reloads the specs whenever the
//! state store changes (a deploy, an alias move, a delete). At start-up each cron gets
//! its catch-up decision ([`nimbus_core::cron::catch_up`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nimbus_core::cron::{CatchUp, CronSpec, Overlap, Schedule};
use nimbus_core::now_ms;
use nimbus_store::Store;
use nimbus_store::events::{EventLog, FireKind, FireOutcome, cron_invocation};
use tokio::sync::watch;

use crate::SchedulerConfig;

/// Longest sleep without looking at the clock again (clock jumps, reload retries).
const MAX_SLEEP: Duration = Duration::from_secs(30);

struct Entry {
    spec: CronSpec,
    schedule: Schedule,
    next: Option<i64>,
}

type Key = (String, String);

pub(crate) async fn run(
    cfg: Arc<SchedulerConfig>,
    store: Arc<Store>,
    log: Arc<EventLog>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    let mut crons: HashMap<Key, Entry> = HashMap::new();
    let mut starting = true;
    let mut reload = true;
    loop {
        if *stop.borrow() {
            return;
        }
        if reload {
            changes.borrow_and_update();
            match load(&cfg, &store, &log, std::mem::take(&mut crons), starting).await {
                Ok(c) => {
                    crons = c;
                    starting = false;
                    reload = false;
                }
                // Keep what ran before; try again shortly.
                Err((kept, e)) => {
                    crons = kept;
                    tracing::error!(error = %e, "load cron triggers");
                }
            }
        }
        let now = now_ms();
        let wait = crons
            .values()
            .filter_map(|e| e.next)
            .min()
            .map_or(MAX_SLEEP, |t| {
                Duration::from_millis(u64::try_from(t - now).unwrap_or(0)).min(MAX_SLEEP)
            });
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    tokio::time::sleep(wait).await;
                } else {
                    reload = true;
                }
                continue;
            }
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let now = now_ms();
        for ((function, _), e) in crons.iter_mut() {
            let Some(t) = e.next.filter(|t| *t <= now) else {
                continue;
            };
            fire(&cfg, &log, function, &e.spec, FireKind::Scheduled, t).await;
            // Past fires the loop slept through (a suspended host) are not run one by
            // one: the next fire is the next one after now.
            e.next = e.schedule.next_after(now.max(t));
        }
    }
}

/// Builds the cron table from the live versions, keeping the entries of unchanged
/// specs, initialising new ones, and (at start-up) running catch-up decisions.
async fn load(
    cfg: &SchedulerConfig,
    store: &Arc<Store>,
    log: &Arc<EventLog>,
    mut old: HashMap<Key, Entry>,
    starting: bool,
) -> Result<HashMap<Key, Entry>, (HashMap<Key, Entry>, String)> {
    let s = Arc::clone(store);
    let specs = match tokio::task::spawn_blocking(move || s.live_cron_specs()).await {
        Ok(Ok(specs)) => specs,
        Ok(Err(e)) => return Err((old, e.to_string())),
        Err(e) => return Err((old, e.to_string())),
    };
    let mut out = HashMap::with_capacity(specs.len());
    for (function, spec) in specs {
        let key = (function.clone(), spec.name.clone());
        if let Some(e) = old.remove(&key).filter(|e| e.spec == spec) {
            out.insert(key, e);
            continue;
        }
        let schedule = match spec.parsed() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%function, cron = %spec.name, error = %e, "cron schedule no longer valid; not scheduled");
                continue;
            }
        };
        let now = now_ms();
        let last = match log.cron_init(&function, &spec.name, now).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%function, cron = %spec.name, error = %e, "read cron state");
                continue;
            }
        };
        if starting {
            match nimbus_core::cron::catch_up(&schedule, last, now, spec.catch_up) {
                CatchUp::Nothing => {}
                CatchUp::Run(t) => fire(cfg, log, &function, &spec, FireKind::CatchUp, t).await,
                CatchUp::Skip(t) => fire(cfg, log, &function, &spec, FireKind::Skipped, t).await,
            }
        }
        let next = schedule.next_after(now.max(last));
        tracing::info!(%function, cron = %spec.name, schedule = %spec.schedule, next = %next.map(nimbus_core::cron::rfc3339).unwrap_or_default(), "cron scheduled");
        out.insert(
            key,
            Entry {
                spec,
                schedule,
                next,
            },
        );
    }
    Ok(out)
}

async fn fire(
    cfg: &SchedulerConfig,
    log: &EventLog,
    function: &str,
    spec: &CronSpec,
    kind: FireKind,
    scheduled_ms: i64,
) {
    let inv = cron_invocation(function, spec, scheduled_ms, &cfg.region, &cfg.account);
    let id = inv.id.clone();
    let skip_if_running = spec.overlap == Overlap::Skip;
    match log
        .cron_fire(kind, scheduled_ms, skip_if_running, inv, now_ms())
        .await
    {
        Ok(outcome) => {
            let label = match outcome {
                FireOutcome::Enqueued => kind.as_str(),
                FireOutcome::Skipped => FireKind::Skipped.as_str(),
                FireOutcome::Duplicate => {
                    tracing::debug!(%function, cron = %spec.name, scheduled_ms, "already fired");
                    return;
                }
            };
            tracing::info!(%function, cron = %spec.name, at = %nimbus_core::cron::rfc3339(scheduled_ms), kind = label, request_id = %id, "cron fire");
            metrics::counter!(
                "nimbus_cron_fires_total",
                "function" => function.to_string(),
                "name" => spec.name.clone(),
                "kind" => label,
            )
            .increment(1);
        }
        Err(e) => {
            tracing::error!(%function, cron = %spec.name, scheduled_ms, error = %e, "cron fire not recorded")
        }
    }
}
