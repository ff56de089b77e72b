//! Recorder tests: batching, retention, usage maths and recommendations.

use super::*;

const MB: u64 = 1024 * 1024;
const NOW: i64 = 1_700_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    rec: Recorder,
}

fn fixture_with(config: RecorderConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nimbus.db");
    // The store and the recorder share the file, as in `serve`.
    let _store = crate::Store::open(&path).expect("open store");
    let rec = Recorder::open(&path, config).expect("open recorder");
    Fixture { _dir: dir, rec }
}

fn fixture() -> Fixture {
    fixture_with(RecorderConfig::default())
}

fn record(id: &str, function: &str, started_at_ms: i64, duration_ms: f64) -> InvocationRecord {
    let billed_ms = InvocationRecord::billed(duration_ms, None);
    InvocationRecord {
        request_id: id.into(),
        function: function.into(),
        version: 1,
        trigger: Trigger::Http,
        started_at_ms,
        duration_ms,
        billed_ms,
        memory_mb: 128,
        gb_seconds: InvocationRecord::gb_seconds(128, billed_ms),
        peak_memory_bytes: Some(20 * MB),
        cpu_ms: Some(1.5),
        cold_start: false,
        init_duration_ms: None,
        status: "success".into(),
        error_type: None,
        logs: format!("line of {id}\n"),
    }
}

fn count(rec: &Recorder, table: &str) -> i64 {
    rec.read(|tx| Ok(tx.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?))
        .expect("count")
}

#[test]
fn a_record_round_trips_with_its_logs() {
    let f = fixture();
    let mut r = record("r1", "hello", NOW, 12.3);
    r.trigger = Trigger::Cron;
    r.cold_start = true;
    r.init_duration_ms = Some(80.5);
    r.status = "function_error".into();
    r.error_type = Some("ZeroDivisionError".into());
    f.rec.record(r.clone());
    f.rec.flush();
    assert_eq!(f.rec.invocation("r1").expect("query"), Some(r));
    assert_eq!(f.rec.invocation("nope").expect("query"), None);
    assert!(f.rec.has_records("hello").expect("query"));
    assert!(!f.rec.has_records("other").expect("query"));
    assert_eq!(f.rec.stats().written, 1);
}

#[test]
fn a_repeated_request_id_keeps_the_first_record() {
    let f = fixture();
    f.rec.record(record("same", "hello", NOW, 1.0));
    let mut again = record("same", "hello", NOW, 99.0);
    again.logs = "second\n".into();
    f.rec.record(again);
    f.rec.flush();
    let got = f.rec.invocation("same").expect("query").expect("record");
    assert_eq!(got.duration_ms, 1.0);
    assert_eq!(got.logs, "line of same\n");
    assert_eq!(
        f.rec.stats().failed,
        0,
        "a duplicate must not fail its batch"
    );
}

#[test]
fn queued_records_are_written_together() {
    let f = fixture();
    // Hold the writer's connection: records pile up in the queue meanwhile.
    let guard = lock(&f.rec.writer);
    for i in 0..50 {
        f.rec
            .record(record(&format!("r{i}"), "hello", NOW + i, 1.0));
    }
    drop(guard);
    f.rec.flush();
    let s = f.rec.stats();
    assert_eq!(s.written, 50);
    // At most the batch the thread had taken before blocking, then all the rest.
    assert!(s.batches <= 2, "{s:?}");
    assert_eq!(count(&f.rec, "invocations"), 50);
    assert_eq!(count(&f.rec, "invocation_logs"), 50);
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let f = fixture_with(RecorderConfig {
        queue_capacity: 4,
        max_batch: 1,
        ..RecorderConfig::default()
    });
    let guard = lock(&f.rec.writer);
    let started = std::time::Instant::now();
    for i in 0..20 {
        f.rec.record(record(&format!("r{i}"), "hello", NOW, 1.0));
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "record() blocked"
    );
    drop(guard);
    f.rec.flush();
    let s = f.rec.stats();
    assert_eq!(s.written + s.dropped, 20, "{s:?}");
    // The queue holds 4 and the blocked writer at most 1 more.
    assert!(s.dropped >= 15, "{s:?}");
}

#[test]
fn records_after_close_are_counted_as_dropped() {
    let f = fixture();
    f.rec.record(record("before", "hello", NOW, 1.0));
    f.rec.close();
    f.rec.record(record("after", "hello", NOW, 1.0));
    let s = f.rec.stats();
    assert_eq!((s.written, s.dropped), (1, 1));
    // Flush after close returns instead of waiting forever.
    f.rec.flush();
}

#[test]
fn prune_removes_expired_records_and_their_logs() {
    let f = fixture();
    let day = DAY_MS;
    f.rec.record(record("old", "hello", NOW - 8 * day, 1.0));
    f.rec.record(record("edge", "hello", NOW - 7 * day, 1.0));
    f.rec.record(record("new", "hello", NOW - HOUR_MS, 1.0));
    f.rec.flush();
    let stats = f.rec.prune(NOW).expect("prune");
    assert_eq!(
        stats,
        PruneStats {
            expired: 1,
            over_cap: 0
        }
    );
    assert_eq!(f.rec.invocation("old").expect("query"), None);
    assert!(f.rec.invocation("edge").expect("query").is_some());
    assert_eq!(
        count(&f.rec, "invocation_logs"),
        2,
        "logs go with their record"
    );
}

#[test]
fn prune_keeps_only_the_newest_max_rows() {
    let f = fixture_with(RecorderConfig {
        retention: Retention {
            max_age: Duration::from_secs(365 * 24 * 3600),
            max_rows: 3,
        },
        ..RecorderConfig::default()
    });
    for i in 0..5 {
        // Written out of time order: pruning must go by start time, not insertion.
        f.rec
            .record(record(&format!("r{}", 4 - i), "hello", NOW - i, 1.0));
    }
    f.rec.flush();
    let stats = f.rec.prune(NOW).expect("prune");
    assert_eq!(stats.over_cap, 2);
    let mut kept: Vec<String> = f
        .rec
        .read(|tx| {
            let mut st = tx.prepare("SELECT request_id FROM invocations")?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .expect("list");
    kept.sort();
    assert_eq!(kept, ["r2", "r3", "r4"]);
    assert_eq!(
        f.rec.prune(NOW).expect("prune again"),
        PruneStats::default()
    );
}

#[test]
fn usage_sums_counts_and_percentiles() {
    let f = fixture();
    // 100 invocations of `a` lasting 1..=100 ms (shuffled), 3 of them failed, 2 cold.
    for i in 0..100i64 {
        let d = ((i * 37) % 100 + 1) as f64;
        let mut r = record(&format!("a{i}"), "a", NOW + i, d);
        r.peak_memory_bytes = Some(if i == 0 { 40 * MB } else { 20 * MB });
        if i < 3 {
            r.status = "timeout".into();
        }
        if i < 2 {
            r.cold_start = true;
            r.init_duration_ms = Some(100.0);
            r.billed_ms = InvocationRecord::billed(d, r.init_duration_ms);
            r.gb_seconds = InvocationRecord::gb_seconds(128, r.billed_ms);
        }
        f.rec.record(r);
    }
    let mut b = record("b0", "b", NOW, 7.0);
    b.peak_memory_bytes = None;
    b.cpu_ms = None;
    f.rec.record(b);
    f.rec.record(record("too-old", "a", NOW - 1, 5000.0));
    f.rec.flush();

    let rows = f
        .rec
        .usage(&UsageQuery {
            function: None,
            since_ms: NOW,
            bucket: None,
        })
        .expect("usage");
    assert_eq!(rows.len(), 2);
    let a = &rows[0];
    assert_eq!(a.function, "a");
    assert_eq!((a.invocations, a.errors, a.cold_starts), (100, 3, 2));
    assert_eq!((a.duration_p50_ms, a.duration_p99_ms), (50.0, 99.0));
    let expected_gb: f64 = (0..100i64)
        .map(|i| {
            let d = ((i * 37) % 100 + 1) as f64;
            let init = (i < 2).then_some(100.0);
            InvocationRecord::gb_seconds(128, InvocationRecord::billed(d, init))
        })
        .sum();
    assert!((a.gb_seconds - expected_gb).abs() < 1e-9, "{a:?}");
    assert_eq!(a.billed_ms, 5050 + 200);
    assert_eq!(a.peak_memory_max_bytes, Some(40 * MB));
    assert_eq!(
        a.peak_memory_avg_bytes,
        Some((40 * MB + 99 * 20 * MB) / 100)
    );
    assert!((a.cpu_ms - 150.0).abs() < 1e-9);
    let b = &rows[1];
    assert_eq!((b.function.as_str(), b.invocations), ("b", 1));
    assert_eq!((b.duration_p50_ms, b.duration_p99_ms), (7.0, 7.0));
    assert_eq!(b.peak_memory_avg_bytes, None);
    assert_eq!(b.cpu_ms, 0.0);

    let only_b = f
        .rec
        .usage(&UsageQuery {
            function: Some("b".into()),
            since_ms: 0,
            bucket: None,
        })
        .expect("usage of b");
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0].function, "b");
}

#[test]
fn usage_buckets_by_hour_and_day() {
    let f = fixture();
    let day_start = (NOW / DAY_MS) * DAY_MS;
    let times = [
        day_start + 10,
        day_start + HOUR_MS - 1,
        day_start + HOUR_MS,
        day_start + DAY_MS + 5,
    ];
    for (i, t) in times.iter().enumerate() {
        f.rec
            .record(record(&format!("r{i}"), "hello", *t, (i + 1) as f64));
    }
    f.rec.flush();
    let by = |bucket| {
        f.rec
            .usage(&UsageQuery {
                function: Some("hello".into()),
                since_ms: day_start,
                bucket: Some(bucket),
            })
            .expect("usage")
            .iter()
            .map(|r| (r.bucket_start_ms, r.invocations, r.duration_p99_ms))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by(Bucket::Hour),
        [
            (Some(day_start), 2, 2.0),
            (Some(day_start + HOUR_MS), 1, 3.0),
            (Some(day_start + DAY_MS), 1, 4.0)
        ]
    );
    assert_eq!(
        by(Bucket::Day),
        [
            (Some(day_start), 3, 3.0),
            (Some(day_start + DAY_MS), 1, 4.0)
        ]
    );
}

#[test]
fn logs_page_forward_with_a_cursor() {
    let f = fixture();
    for i in 0..5 {
        f.rec
            .record(record(&format!("h{i}"), "hello", NOW + i, 1.0));
    }
    let mut quiet = record("quiet", "hello", NOW, 1.0);
    quiet.logs.clear();
    f.rec.record(quiet);
    f.rec.record(record("o0", "other", NOW, 1.0));
    f.rec.flush();

    let q = |after, since_ms, limit| LogQuery {
        function: Some("hello".into()),
        request_id: None,
        since_ms,
        after,
        limit,
    };
    // The newest two, oldest first, and a cursor past everything in the table.
    let tail = f.rec.logs(&q(None, Some(NOW), 2)).expect("tail");
    let ids: Vec<&str> = tail.entries.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(ids, ["h3", "h4"]);
    assert_eq!(tail.entries[1].logs, "line of h4\n");
    let max_seq = tail.cursor;
    assert!(max_seq > tail.entries[1].cursor, "o0 was recorded after h4");

    // Following from there sees only what comes next.
    let none = f.rec.logs(&q(Some(max_seq), None, 100)).expect("follow");
    assert!(none.entries.is_empty());
    assert_eq!(none.cursor, max_seq);
    f.rec.record(record("h5", "hello", NOW - DAY_MS, 1.0));
    f.rec.flush();
    let next = f.rec.logs(&q(Some(max_seq), None, 100)).expect("follow");
    assert_eq!(next.entries.len(), 1);
    assert_eq!(next.entries[0].request_id, "h5");
    assert_eq!(next.cursor, next.entries[0].cursor);

    // `since` filters by start time; a request id finds one invocation.
    let recent = f.rec.logs(&q(None, Some(NOW + 3), 100)).expect("since");
    assert_eq!(recent.entries.len(), 2);
    let one = f
        .rec
        .logs(&LogQuery {
            request_id: Some("h2".into()),
            limit: 10,
            ..LogQuery::default()
        })
        .expect("by id");
    assert_eq!(one.entries.len(), 1);
    assert_eq!(one.entries[0].logs, "line of h2\n");
}

fn rec_input(current_mb: u32, peaks: &mut [u64], oom: u64) -> RecommendInput<'_> {
    let billed_ms = 10_000;
    RecommendInput {
        function: "f".into(),
        current_mb,
        invocations: 10,
        billed_ms,
        gb_seconds: InvocationRecord::gb_seconds(current_mb, billed_ms),
        oom_kills: oom,
        peaks,
    }
}

#[test]
fn recommends_the_smallest_step_covering_p99_plus_headroom() {
    let mut peaks = [20 * MB, 18 * MB, 25 * MB];
    let r = recommend(rec_input(256, &mut peaks, 0));
    // 25 MB + 32 MB headroom = 57 MB -> 64 MB.
    assert_eq!(r.action, Action::Lower);
    assert_eq!(r.recommended_memory_mb, Some(64));
    assert_eq!(r.peak_max_bytes, Some(25 * MB));
    let expected =
        InvocationRecord::gb_seconds(256, 10_000) - InvocationRecord::gb_seconds(64, 10_000);
    assert!((r.gb_seconds_saved - expected).abs() < 1e-12, "{r:?}");

    // 100 MB: 30% headroom (130 MB) beats +32 MB -> 192 MB.
    let mut peaks = [100 * MB];
    let r = recommend(rec_input(512, &mut peaks, 0));
    assert_eq!(r.recommended_memory_mb, Some(192));
}

#[test]
fn never_recommends_more_unless_the_limit_was_hit() {
    // Needs 192 MB by the headroom rule but never came near 128: keep.
    let mut peaks = [100 * MB; 10];
    let r = recommend(rec_input(128, &mut peaks, 0));
    assert_eq!(r.action, Action::Keep);
    assert_eq!(r.recommended_memory_mb, Some(128));
    assert_eq!(r.gb_seconds_saved, 0.0);

    // Peaks at the limit: raise, and say what it would cost.
    let mut peaks = [60 * MB, 126 * MB];
    let r = recommend(rec_input(128, &mut peaks, 0));
    assert_eq!(r.action, Action::Raise);
    assert_eq!(r.recommended_memory_mb, Some(256));
    assert!(r.gb_seconds_saved < 0.0);
    assert!(r.reason.contains("limit"), "{}", r.reason);

    // OOM kills raise even with low measured peaks.
    let mut peaks = [10 * MB];
    let r = recommend(rec_input(128, &mut peaks, 2));
    assert_eq!(r.action, Action::Raise);
}

#[test]
fn without_measurements_there_is_no_recommendation() {
    let r = recommend(rec_input(128, &mut [], 0));
    assert_eq!(r.action, Action::Unknown);
    assert_eq!(r.recommended_memory_mb, None);
    assert_eq!(r.gb_seconds_saved, 0.0);
}

#[test]
fn the_outlier_peak_is_always_covered() {
    // p99 of 100 values is the 99th; the single 300 MB outlier must still fit.
    let mut peaks = vec![10 * MB; 99];
    peaks.push(300 * MB);
    let r = recommend(rec_input(1024, &mut peaks, 0));
    assert_eq!(r.recommended_memory_mb, Some(320));
}

#[test]
fn recommendations_use_the_latest_size_and_all_records() {
    let f = fixture();
    let mut old = record("old", "hello", NOW, 10.0);
    old.memory_mb = 512;
    old.gb_seconds = InvocationRecord::gb_seconds(512, old.billed_ms);
    f.rec.record(old);
    f.rec.record(record("new", "hello", NOW + 1, 10.0));
    f.rec.record(record("gone", "hello", NOW - 1, 10.0));
    f.rec.flush();
    let recs = f.rec.recommendations(NOW, None).expect("recommend");
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(
        (r.current_memory_mb, r.invocations, r.measured),
        (128, 2, 2)
    );
    assert_eq!(r.recommended_memory_mb, Some(64));
    let expected = InvocationRecord::gb_seconds(512, 10) + InvocationRecord::gb_seconds(128, 10)
        - InvocationRecord::gb_seconds(64, 20);
    assert!((r.gb_seconds_saved - expected).abs() < 1e-12, "{r:?}");
    assert!(
        f.rec
            .recommendations(NOW, Some("other"))
            .expect("none")
            .is_empty()
    );
}

#[test]
fn nearest_rank_is_one_based_and_clamped() {
    assert_eq!(nearest_rank(50.0, 10), 5);
    assert_eq!(nearest_rank(99.0, 10), 10);
    assert_eq!(nearest_rank(99.0, 100), 99);
    assert_eq!(nearest_rank(50.0, 1), 1);
    assert_eq!(nearest_rank(1.0, 3), 1);
    assert_eq!(nearest_rank(50.0, 0), 0);
}

fn chatty(id: &str, function: &str, started_at_ms: i64, bytes: usize) -> InvocationRecord {
    let mut r = record(id, function, started_at_ms, 1.0);
    r.logs = "x".repeat(bytes);
    r
}

fn kept_log_bytes(rec: &Recorder, function: Option<&str>) -> u64 {
    rec.read(|tx| {
        Ok(tx.query_row(
            "SELECT coalesce(sum(octet_length(logs)), 0) FROM invocation_logs
             WHERE ?1 IS NULL OR function = ?1",
            [function],
            |r| r.get::<_, i64>(0),
        )?)
    })
    .expect("sum") as u64
}

#[test]
fn a_queue_full_of_bytes_keeps_records_but_drops_their_log_bodies() {
    let f = fixture_with(RecorderConfig {
        queue_bytes: 3 * MB,
        ..RecorderConfig::default()
    });
    // Hold the writer: everything stays queued, so only the byte bound decides.
    let guard = lock(&f.rec.writer);
    for i in 0..10 {
        f.rec
            .record(chatty(&format!("r{i}"), "chatty", NOW + i, MB as usize));
    }
    let s = f.rec.stats();
    assert!(s.queued_log_bytes <= 3 * MB + 1024, "{s:?}");
    drop(guard);
    f.rec.flush();
    let s = f.rec.stats();
    assert_eq!(
        (s.written, s.dropped),
        (10, 0),
        "every record is kept: {s:?}"
    );
    // At most 3 bodies fit, the writer may have taken one before blocking.
    assert!((6..=7).contains(&s.log_bodies_dropped), "{s:?}");
    assert_eq!(s.log_bytes_dropped, s.log_bodies_dropped * MB, "{s:?}");
    assert_eq!(s.queued_log_bytes, 0, "{s:?}");
    let last = f.rec.invocation("r9").expect("query").expect("record");
    assert!(
        last.logs.contains("1048576 bytes of output dropped"),
        "{}",
        last.logs
    );
    assert_eq!(count(&f.rec, "invocations"), 10);
}

#[test]
fn log_bodies_are_kept_within_the_total_bound_oldest_first() {
    let f = fixture_with(RecorderConfig {
        log_retention: LogRetention {
            max_bytes: 10 * MB,
            max_bytes_per_function: 100 * MB,
        },
        ..RecorderConfig::default()
    });
    for i in 0..30 {
        let function = if i % 2 == 0 { "a" } else { "b" };
        f.rec
            .record(chatty(&format!("r{i}"), function, NOW + i, MB as usize));
        f.rec.flush();
    }
    assert_eq!(kept_log_bytes(&f.rec, None), 10 * MB);
    let s = f.rec.stats();
    assert_eq!(
        (s.log_bytes, s.log_bytes_pruned),
        (10 * MB, 20 * MB),
        "{s:?}"
    );
    // The newest ten bodies are kept, every record too.
    let kept = f
        .rec
        .logs(&LogQuery {
            limit: 100,
            ..LogQuery::default()
        })
        .expect("logs");
    let ids: Vec<_> = kept.entries.iter().map(|e| e.request_id.as_str()).collect();
    let want: Vec<String> = (20..30).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, want);
    assert_eq!(count(&f.rec, "invocations"), 30);
    let old = f.rec.invocation("r0").expect("query").expect("record");
    assert_eq!(old.logs, "");
}

#[test]
fn one_function_cannot_take_more_than_its_share() {
    let f = fixture_with(RecorderConfig {
        log_retention: LogRetention {
            max_bytes: 100 * MB,
            max_bytes_per_function: 4 * MB,
        },
        ..RecorderConfig::default()
    });
    f.rec.record(chatty("quiet", "quiet", NOW, 1000));
    for i in 0..12 {
        f.rec
            .record(chatty(&format!("c{i}"), "chatty", NOW + 1 + i, MB as usize));
        f.rec.flush();
    }
    assert_eq!(kept_log_bytes(&f.rec, Some("chatty")), 4 * MB);
    assert_eq!(kept_log_bytes(&f.rec, Some("quiet")), 1000);
    let newest = f.rec.invocation("c11").expect("query").expect("record");
    assert_eq!(newest.logs.len(), MB as usize);
}

#[test]
fn the_byte_tally_survives_a_reopen_and_a_prune() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nimbus.db");
    let _store = crate::Store::open(&path).expect("open store");
    let config = RecorderConfig {
        log_retention: LogRetention {
            max_bytes: 5 * MB,
            max_bytes_per_function: 5 * MB,
        },
        retention: Retention {
            max_age: Duration::from_secs(3600),
            max_rows: 1_000,
        },
        ..RecorderConfig::default()
    };
    {
        let rec = Recorder::open(&path, config).expect("open");
        for i in 0..4 {
            rec.record(chatty(&format!("old{i}"), "f", NOW + i, MB as usize));
        }
        rec.flush();
    }
    let rec = Recorder::open(&path, config).expect("reopen");
    // Counted from the file: 4 MiB kept, so two more push one old body out.
    for i in 0..2 {
        rec.record(chatty(&format!("new{i}"), "f", NOW + 10 + i, MB as usize));
    }
    rec.flush();
    assert_eq!(kept_log_bytes(&rec, None), 5 * MB);
    // Expire the old records: their bodies go, and the tally follows.
    rec.prune(NOW + 3_600_000 + 5).expect("prune");
    assert_eq!(rec.stats().log_bytes, 2 * MB);
    assert_eq!(kept_log_bytes(&rec, None), 2 * MB);
}
