//! What the worker tells metering: the record of each finished invocation (handed to
//! a [`RecordSink`]) and the Prometheus metrics, through the `metrics` facade. Without
//! an installed recorder (unit tests, embedders) the metric calls are no-ops.
//!
//! Metric names and labels are a public interface (dashboards, alerts): change them
//! only on purpose.
//! - `nimbus_invocations_total{function,version,status}` counter
//! - `nimbus_invocation_duration_seconds{function}` histogram (handler time, no init)
//! - `nimbus_init_duration_seconds{function,runtime}` histogram (cold starts only)
//! - `nimbus_cold_starts_total{function}` counter
//! - `nimbus_billed_gb_seconds_total{function}` monotonic, exported with a gauge TYPE
//!   because `metrics` counters cannot hold fractions
//! - `nimbus_throttles_total{function}` counter (429: no slot within the queue timeout)
//! - `nimbus_instances{function,state}` gauge, state `idle` | `busy` | `starting`
//!   (| `draining`, as [`InstanceInfo::state`] names them)
//! - `nimbus_stem_cells{runtime}` gauge (pre-started blank sandboxes belong to no
//!   function, so they are not a state of `nimbus_instances`)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use nimbus_core::{
    InstanceInfo, InvocationRecord, InvokeOutcome, InvokeRequest, InvokeStatus, RecordSink,
};

/// State label of `nimbus_instances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // Until the pool reports its instance counts.
pub(crate) enum InstanceState {
    Idle,
    Busy,
    Starting,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::Idle => "idle",
            InstanceState::Busy => "busy",
            InstanceState::Starting => "starting",
        }
    }
}

/// Unix time in milliseconds, for [`record`]'s `started_at_ms`.
pub(crate) fn now_ms() -> i64 {
    nimbus_core::now_ms()
}

/// The metering record of a finished invocation. Billing is Lambda's: handler time
/// plus init time on a cold start, rounded up to the millisecond, times memory.
pub(crate) fn record(
    req: &InvokeRequest,
    outcome: &InvokeOutcome,
    started_at_ms: i64,
) -> InvocationRecord {
    let billed_ms = InvocationRecord::billed(outcome.duration_ms, outcome.init_duration_ms);
    let error_type = match &outcome.status {
        InvokeStatus::Success(_) => None,
        InvokeStatus::FunctionError(e) => Some(e.error_type.clone()),
        other => Some(other.code().to_string()),
    };
    InvocationRecord {
        request_id: outcome.request_id.clone(),
        function: outcome.function.clone(),
        version: outcome.version,
        trigger: req.trigger,
        started_at_ms,
        duration_ms: outcome.duration_ms,
        billed_ms,
        memory_mb: outcome.memory_mb,
        gb_seconds: InvocationRecord::gb_seconds(outcome.memory_mb, billed_ms),
        peak_memory_bytes: outcome.peak_memory_bytes,
        cpu_ms: outcome.cpu_ms,
        cold_start: outcome.cold_start,
        init_duration_ms: outcome.init_duration_ms,
        status: outcome.status.code().to_string(),
        error_type,
        logs: outcome.logs.clone(),
    }
}

/// The metric series of one pool (function version) that every invocation touches,
/// registered once. A labelled `counter!` call allocates its label strings and looks
/// the series up in the registry: four of those per invocation cost more than the
/// rest of the metering path. Rarer series (errors, init durations) stay on the macros.
pub(crate) struct PoolMetrics {
    function: String,
    version: String,
    successes: metrics::Counter,
    duration: metrics::Histogram,
    cold_starts: metrics::Counter,
    billed: metrics::Gauge,
}

impl PoolMetrics {
    /// Registers with the recorder installed now (the global one in `serve`).
    pub fn new(function: &str, version: u32) -> PoolMetrics {
        let f = function.to_string();
        PoolMetrics {
            successes: metrics::counter!(
                "nimbus_invocations_total",
                "function" => f.clone(),
                "version" => version.to_string(),
                "status" => "success",
            ),
            duration: metrics::histogram!(
                "nimbus_invocation_duration_seconds", "function" => f.clone()
            ),
            cold_starts: metrics::counter!("nimbus_cold_starts_total", "function" => f.clone()),
            // `metrics` counters are integers; a gauge that only ever grows carries the
            // fractional GB-s (PromQL's rate() and increase() treat it like a counter).
            billed: metrics::gauge!("nimbus_billed_gb_seconds_total", "function" => f.clone()),
            function: f,
            version: version.to_string(),
        }
    }
}

/// Updates the per-invocation metrics from a record.
pub(crate) fn invocation(record: &InvocationRecord, runtime: &str, m: &PoolMetrics) {
    if record.status == "success" {
        m.successes.increment(1);
    } else {
        metrics::counter!(
            "nimbus_invocations_total",
            "function" => m.function.clone(),
            "version" => m.version.clone(),
            "status" => record.status.clone(),
        )
        .increment(1);
    }
    m.duration.record(record.duration_ms / 1000.0);
    if record.cold_start {
        m.cold_starts.increment(1);
        if let Some(init) = record.init_duration_ms {
            metrics::histogram!(
                "nimbus_init_duration_seconds",
                "function" => m.function.clone(),
                "runtime" => runtime.to_string(),
            )
            .record(init / 1000.0);
        }
    }
    m.billed.increment(record.gb_seconds);
}

/// Everything after an invocation finished, in one call: builds the record, updates
/// the metrics and hands the record to the sink (which never blocks).
pub(crate) fn finished(
    sink: &dyn RecordSink,
    req: &InvokeRequest,
    outcome: &InvokeOutcome,
    started_at_ms: i64,
    runtime: &str,
    metrics: &PoolMetrics,
) {
    let rec = record(req, outcome, started_at_ms);
    invocation(&rec, runtime, metrics);
    sink.record(rec);
}

/// An invocation refused for want of a free instance slot.
pub(crate) fn throttled(function: &str) {
    metrics::counter!("nimbus_throttles_total", "function" => function.to_string()).increment(1);
}

/// How many instances of `function` are in `state` now.
#[allow(dead_code)] // Until the pool reports its instance counts.
pub(crate) fn instances(function: &str, state: InstanceState, n: usize) {
    metrics::gauge!(
        "nimbus_instances",
        "function" => function.to_string(),
        "state" => state.as_str(),
    )
    .set(n as f64);
}

/// Sets `nimbus_instances` from a snapshot of every live instance (all pools): counts
/// per function and state, and zero for a (function, state) reported before and absent
/// now, so retired functions do not linger at their last count.
pub(crate) fn report_instances<'a>(infos: impl IntoIterator<Item = &'a InstanceInfo>) {
    static REPORTED: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for i in infos {
        *counts
            .entry((i.function.clone(), i.state.clone()))
            .or_default() += 1;
    }
    let mut reported = REPORTED.lock().unwrap_or_else(|p| p.into_inner());
    for key in reported.iter().filter(|k| !counts.contains_key(*k)) {
        metrics::gauge!("nimbus_instances", "function" => key.0.clone(), "state" => key.1.clone())
            .set(0.0);
    }
    for ((function, state), n) in &counts {
        metrics::gauge!("nimbus_instances", "function" => function.clone(), "state" => state.clone())
            .set(*n as f64);
    }
    reported.extend(counts.into_keys());
}

/// How many blank pre-started sandboxes of `runtime` wait for code.
#[allow(dead_code)] // Until stem cells exist.
pub(crate) fn stem_cells(runtime: &str, n: usize) {
    metrics::gauge!("nimbus_stem_cells", "runtime" => runtime.to_string()).set(n as f64);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use nimbus_core::{FunctionError, Target, Trigger};

    use super::*;

    fn req() -> InvokeRequest {
        InvokeRequest {
            request_id: "req-1".into(),
            function: "hello".into(),
            target: Target::default(),
            trigger: Trigger::Http,
            payload: Bytes::from_static(b"{}"),
            trace: None,
        }
    }

    fn outcome(status: InvokeStatus, cold: bool) -> InvokeOutcome {
        InvokeOutcome {
            request_id: "req-1".into(),
            function: "hello".into(),
            version: 3,
            status,
            cold_start: cold,
            init_duration_ms: cold.then_some(99.2),
            duration_ms: 10.5,
            logs: "hi\n".into(),
            memory_mb: 256,
            peak_memory_bytes: Some(12_345_678),
            cpu_ms: Some(4.0),
        }
    }

    #[test]
    fn a_cold_record_bills_init_and_handler_time() {
        let o = outcome(InvokeStatus::Success(Bytes::new()), true);
        let r = record(&req(), &o, 1_700_000_000_000);
        // 10.5 + 99.2 = 109.7 -> 110 ms; 256 MB = 0.25 GB.
        assert_eq!(r.billed_ms, 110);
        assert!((r.gb_seconds - 0.25 * 0.110).abs() < 1e-12);
        assert_eq!(r.trigger, Trigger::Http);
        assert_eq!(
            (r.status.as_str(), r.error_type.as_deref()),
            ("success", None)
        );
        assert_eq!((r.version, r.memory_mb, r.cold_start), (3, 256, true));
        assert_eq!(r.peak_memory_bytes, Some(12_345_678));
        assert_eq!(r.logs, "hi\n");
        assert_eq!(r.started_at_ms, 1_700_000_000_000);
    }

    #[test]
    fn failures_carry_their_error_type() {
        let fe = FunctionError {
            error_type: "ZeroDivisionError".into(),
            error_message: "division by zero".into(),
            stack_trace: vec![],
        };
        let r = record(&req(), &outcome(InvokeStatus::FunctionError(fe), false), 0);
        assert_eq!(r.status, "function_error");
        assert_eq!(r.error_type.as_deref(), Some("ZeroDivisionError"));
        assert_eq!(r.billed_ms, 11, "warm: handler time only");
        let r = record(&req(), &outcome(InvokeStatus::Timeout, false), 0);
        assert_eq!(
            (r.status.as_str(), r.error_type.as_deref()),
            ("timeout", Some("timeout"))
        );
    }

    fn info(function: &str, state: &str) -> InstanceInfo {
        InstanceInfo {
            id: "i".into(),
            function: function.into(),
            version: 1,
            state: state.into(),
            age_ms: 0,
            idle_ms: None,
            invocations: 0,
            memory_bytes: None,
            memory_mb: 128,
        }
    }

    #[test]
    fn instance_gauges_count_per_function_and_zero_what_went_away() {
        let prom = PrometheusBuilder::new().build_recorder();
        let handle = prom.handle();
        metrics::with_local_recorder(&prom, || {
            let first = [info("gone", "idle"), info("a", "idle"), info("a", "idle")];
            report_instances(&first);
            report_instances(&[info("a", "busy")]);
        });
        let text = handle.render();
        for want in [
            r#"nimbus_instances{function="a",state="busy"} 1"#,
            r#"nimbus_instances{function="a",state="idle"} 0"#,
            r#"nimbus_instances{function="gone",state="idle"} 0"#,
        ] {
            assert!(text.contains(want), "missing `{want}` in:\n{text}");
        }
    }

    #[derive(Default)]
    struct Sink(Mutex<Vec<InvocationRecord>>);

    impl RecordSink for Sink {
        fn record(&self, record: InvocationRecord) {
            self.0.lock().expect("sink lock").push(record);
        }
    }

    #[test]
    fn finished_records_and_exports_metrics() {
        let prom = PrometheusBuilder::new().build_recorder();
        let handle = prom.handle();
        let sink = Sink::default();
        metrics::with_local_recorder(&prom, || {
            let m = PoolMetrics::new("hello", 3);
            let cold = outcome(InvokeStatus::Success(Bytes::new()), true);
            finished(&sink, &req(), &cold, 1, "python3", &m);
            let warm = outcome(InvokeStatus::Timeout, false);
            finished(&sink, &req(), &warm, 2, "python3", &m);
            throttled("hello");
            instances("hello", InstanceState::Idle, 2);
            stem_cells("python3", 1);
        });
        let text = handle.render();
        for want in [
            r#"nimbus_invocations_total{function="hello",version="3",status="success"} 1"#,
            r#"nimbus_invocations_total{function="hello",version="3",status="timeout"} 1"#,
            r#"nimbus_cold_starts_total{function="hello"} 1"#,
            r#"nimbus_throttles_total{function="hello"} 1"#,
            r#"nimbus_instances{function="hello",state="idle"} 2"#,
            r#"nimbus_stem_cells{runtime="python3"} 1"#,
            r#"nimbus_invocation_duration_seconds"#,
            r#"nimbus_init_duration_seconds"#,
            r#"runtime="python3""#,
        ] {
            assert!(text.contains(want), "missing `{want}` in:\n{text}");
        }
        // 0.25 GB * (0.110 s + 0.011 s).
        let billed = text
            .lines()
            .find(|l| l.starts_with("nimbus_billed_gb_seconds_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            billed.is_some_and(|v| (v - 0.25 * 0.121).abs() < 1e-9),
            "{text}"
        );
        let got = sink.0.lock().expect("sink lock");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].started_at_ms, 2);
    }
}
