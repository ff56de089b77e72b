//! Cron end to end: seconds schedules fire on second boundaries, `@every`, Scheduled
//! Event shape, `nimbus cron trigger`, `overlap = "skip"`, catch-up after a SIGKILL
//! across a scheduled fire (exactly one, never a double fire), `catch_up = false`, and
//! schedules refused at deploy with the field named. The DST rule is a unit test in
//! `core::cron`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A copy of the cron fixture named `name` with `extra` appended to its manifest.
fn cron_fn(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let d = dir.join(name);
    copy_dir(&fixture("cron-py"), &d);
    let manifest = format!(
        "name = \"{name}\"\nruntime = \"python3\"\nhandler = \"main.handler\"\ntimeout = \"10s\"\n{extra}"
    );
    std::fs::write(d.join("nimbus.toml"), manifest).expect("manifest");
    d
}

fn cron(s: &Server, function: &str, name: &str) -> Value {
    let all = s.json(&["cron", "ls"]);
    all.as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c["function"] == function && c["name"] == name)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no cron {function}/{name}: {all}"))
}

fn fires(s: &Server, function: &str, name: &str) -> Vec<Value> {
    cron(s, function, name)["fires"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn times(fires: &[Value], kind: Option<&str>) -> Vec<i64> {
    let mut t: Vec<i64> = fires
        .iter()
        .filter(|f| kind.is_none_or(|k| f["kind"] == k))
        .filter_map(|f| f["scheduled_ms"].as_i64())
        .collect();
    t.sort();
    t
}

fn wait_succeeded(s: &Server, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = s.json(&["invocation", "get", id]);
        if v["status"] == "succeeded" || start.elapsed() > Duration::from_secs(30) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn schedules_fire_on_time_and_by_hand() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start();
    let f = cron_fn(
        tmp.path(),
        "ticker",
        "[[cron]]\nname = \"sec\"\nschedule = \"*/1 * * * * *\"\noverlap = \"allow\"\n\
         [[cron]]\nname = \"two\"\nschedule = \"@every 2s\"\npayload = { kind = \"two\" }\n\
         [[cron]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\n",
    );
    s.ok(&["deploy", f.to_str().expect("path")]);
    std::thread::sleep(Duration::from_millis(5500));

    let sec = times(&fires(&s, "ticker", "sec"), Some("scheduled"));
    assert!(sec.len() >= 3, "about one a second: {sec:?}");
    assert!(
        sec.iter().all(|t| t % 1000 == 0),
        "second boundaries: {sec:?}"
    );
    assert!(sec.windows(2).all(|w| w[1] > w[0]), "{sec:?}");
    let two = times(&fires(&s, "ticker", "two"), Some("scheduled"));
    assert!(!two.is_empty(), "{two:?}");
    assert!(two.iter().all(|t| t % 2000 == 0), "@every 2s: {two:?}");

    // The function got an EventBridge-style Scheduled Event for that time.
    let last = cron(&s, "ticker", "sec")["last_fire"].clone();
    let id = last["invocation_id"].as_str().expect("id").to_string();
    let v = wait_succeeded(&s, &id);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["source"], "cron:ticker/sec");
    assert_eq!(v["result"]["time"], last["scheduled_at"]);
    assert_eq!(v["result"]["detail-type"], "Scheduled Event");
    assert_eq!(v["result"]["source"], "nimbus.scheduler");
    assert_eq!(v["result"]["resources"][0], "ticker/sec");

    // Next three fire times, in the cron's time zone.
    let daily = cron(&s, "ticker", "daily");
    assert_eq!(daily["next"].as_array().map(Vec::len), Some(3), "{daily}");
    assert_eq!(daily["timezone"], "Europe/Berlin");
    let table = s.ok(&["cron", "ls"]);
    assert!(
        table.contains("ticker") && table.contains("@every 2s"),
        "{table}"
    );

    // By hand.
    let t = s.json(&["cron", "trigger", "ticker", "daily"]);
    let id = t["request_id"].as_str().expect("id").to_string();
    assert_eq!(wait_succeeded(&s, &id)["status"], "succeeded");
    assert!(
        fires(&s, "ticker", "daily")
            .iter()
            .any(|f| f["kind"] == "manual" && f["invocation_id"] == id.as_str())
    );
    let o = s.cli(&["cron", "trigger", "ticker", "nope"]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("no cron"), "{}", stderr_of(&o));
}

#[test]
fn overlap_skip_skips_fires_while_a_run_is_going() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start();
    let f = cron_fn(
        tmp.path(),
        "slowcron",
        "[[cron]]\nname = \"slow\"\nschedule = \"@every 1s\"\npayload = { sleep = 2.5 }\n",
    );
    s.ok(&["deploy", f.to_str().expect("path")]);
    std::thread::sleep(Duration::from_millis(6500));
    let all = fires(&s, "slowcron", "slow");
    let ran = times(&all, Some("scheduled"));
    let skipped = times(&all, Some("skipped"));
    assert!(!ran.is_empty(), "{all:?}");
    assert!(
        !skipped.is_empty(),
        "fires while one runs are skipped: {all:?}"
    );
    // Each run takes 2.5 s, so runs start at least 2 s apart.
    assert!(ran.windows(2).all(|w| w[1] - w[0] >= 2000), "{ran:?}");
}

#[test]
fn a_missed_fire_is_caught_up_once_after_sigkill() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let mut s = Server::start_with(&data, &[]);
    let f = cron_fn(
        tmp.path(),
        "catcher",
        "[[cron]]\nname = \"c3\"\nschedule = \"*/3 * * * * *\"\noverlap = \"allow\"\n\
         [[cron]]\nname = \"nocatch\"\nschedule = \"*/3 * * * * *\"\noverlap = \"allow\"\ncatch_up = false\n",
    );
    s.ok(&["deploy", f.to_str().expect("path")]);
    // Wait for a first scheduled fire, then be down across at least one more.
    let start = Instant::now();
    while times(&fires(&s, "catcher", "c3"), None).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "never fired");
        std::thread::sleep(Duration::from_millis(200));
    }
    s.kill9();
    let killed = nimbus_now();
    std::thread::sleep(Duration::from_millis(4500));
    let restarted = nimbus_now();
    s = Server::start_with(&data, &[]);
    std::thread::sleep(Duration::from_millis(1500));

    let c3 = fires(&s, "catcher", "c3");
    let all = times(&c3, None);
    let mut dedup = all.clone();
    dedup.dedup();
    assert_eq!(all, dedup, "no scheduled time fired twice: {c3:?}");
    let catch = times(&c3, Some("catch_up"));
    assert_eq!(catch.len(), 1, "exactly one catch-up fire: {c3:?}");
    // It is the latest scheduled time of the downtime.
    let missed_last = (restarted / 3000) * 3000;
    assert!(
        catch[0] > killed - 3000 && catch[0] <= restarted,
        "{catch:?}"
    );
    assert!(catch[0] >= missed_last - 3000, "{catch:?} vs {missed_last}");
    let ids: Vec<&str> = c3
        .iter()
        .filter_map(|f| f["invocation_id"].as_str())
        .collect();
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(ids.len(), uniq.len());

    // catch_up = false: the missed fire is recorded as skipped, never run.
    let nc = fires(&s, "catcher", "nocatch");
    assert!(times(&nc, Some("catch_up")).is_empty(), "{nc:?}");
    assert_eq!(times(&nc, Some("skipped")).len(), 1, "{nc:?}");
}

fn nimbus_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[test]
fn bad_schedules_are_refused_at_deploy_naming_the_field() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = Server::start();
    for (i, (cron, field)) in [
        ("schedule = \"* * *\"", "cron[0].schedule"),
        ("schedule = \"61 * * * *\"", "cron[0].schedule"),
        ("schedule = \"0 0 30 2 *\"", "cron[0].schedule"),
        (
            "schedule = \"@hourly\"\ntimezone = \"Mars/Phobos\"",
            "cron[0].timezone",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let f = cron_fn(
            tmp.path(),
            &format!("bad{i}"),
            &format!("[[cron]]\n{cron}\n"),
        );
        let o = s.cli(&["deploy", f.to_str().expect("path")]);
        assert!(!o.status.success(), "{cron}");
        let err = stderr_of(&o);
        assert!(err.contains(field), "{cron}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
