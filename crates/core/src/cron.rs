//! Cron schedules: 5-field (minute) or 6-field (seconds first) expressions, the
//! `@hourly`-style nicknames (via `croner`), and `@every 30s`, in an IANA time zone
//! (`chrono-tz`), so a daily 09:00 stays at 09:00 local time across DST changes.
//!
//! `@every` fires on multiples of its period since the Unix epoch, so fire times do
//! not depend on when the server started: a restart neither skips nor repeats one.
//! Schedules that never fire within five years, or fire faster than once a second,
//! are refused, as are over-long or non-ASCII expressions.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};

const MAX_LEN: usize = 256;
const MIN_EVERY_MS: u64 = 1_000;
const HORIZON_MS: i64 = 5 * 366 * 86_400_000;

#[derive(Debug, Clone)]
pub struct Schedule {
    kind: Kind,
    tz: Tz,
}

#[derive(Debug, Clone)]
enum Kind {
    Cron(Box<Cron>),
    Every(u64),
}

impl Schedule {
    /// Parses `expr` in `timezone` (an IANA name; UTC when None).
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Schedule, String> {
        let expr = expr.trim();
        if expr.len() > MAX_LEN {
            return Err(format!("is longer than {MAX_LEN} characters"));
        }
        if !expr.is_ascii() {
            return Err("may only hold ASCII characters".into());
        }
        if expr.is_empty() {
            return Err("is empty".into());
        }
        let tz = match timezone {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name)
                .map_err(|_| format!("timezone `{name}` is not an IANA time zone name"))?,
        };
        let kind = if let Some(every) = expr.strip_prefix("@every") {
            let d = crate::duration::parse_duration(every.trim())
                .map_err(|e| format!("`{expr}`: {e}"))?;
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if ms < MIN_EVERY_MS {
                return Err(format!("`{expr}` fires more often than once a second"));
            }
            if ms as i64 > HORIZON_MS {
                return Err(format!("`{expr}` does not fire within 5 years"));
            }
            Kind::Every(ms)
        } else {
            let fields = expr.split_whitespace().count();
            if !expr.starts_with('@') && fields != 5 && fields != 6 {
                return Err(format!(
                    "`{expr}` has {fields} fields; give 5 (minute hour day month weekday) or 6 (seconds first)"
                ));
            }
            let cron = CronParser::builder()
                .seconds(Seconds::Optional)
                .build()
                .parse(expr)
                .map_err(|e| format!("`{expr}`: {e}"))?;
            Kind::Cron(Box::new(cron))
        };
        let s = Schedule { kind, tz };
        let now = Utc::now().timestamp_millis();
        match s.next_after(now) {
            Some(t) if t - now <= HORIZON_MS => {}
            _ => return Err(format!("`{expr}` does not fire within 5 years")),
        }
        Ok(s)
    }

    /// The first fire time strictly after `t_ms` (Unix ms), if there is one.
    pub fn next_after(&self, t_ms: i64) -> Option<i64> {
        match &self.kind {
            Kind::Every(p) => {
                let p = *p as i64;
                Some((t_ms.div_euclid(p) + 1) * p)
            }
            Kind::Cron(c) => {
                let at: DateTime<Tz> = self.tz.timestamp_millis_opt(t_ms).single()?;
                let next = c.find_next_occurrence(&at, false).ok()?;
                let ms = next.timestamp_millis();
                // croner works in whole seconds; never hand back a time not after t.
                if ms > t_ms {
                    Some(ms)
                } else {
                    self.next_after(t_ms + 1000 - t_ms.rem_euclid(1000))
                }
            }
        }
    }

    /// The next `n` fire times after `t_ms`.
    pub fn upcoming(&self, t_ms: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut t = t_ms;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// The latest fire time in `(after_ms, up_to_ms]`, if any: what a catch-up runs.
    pub fn last_between(&self, after_ms: i64, up_to_ms: i64) -> Option<i64> {
        let mut t = after_ms;
        let mut last = None;
        // Bounded: a catch-up looks at most a year of one-second fires back.
        for _ in 0..400_000 {
            match self.next_after(t) {
                Some(next) if next <= up_to_ms => {
                    last = Some(next);
                    t = next;
                }
                _ => return last,
            }
        }
        last
    }

    pub fn timezone(&self) -> &str {
        self.tz.name()
    }
}

/// RFC 3339 in UTC with millisecond precision, for fire times in answers and events.
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Whether a fire may start while the cron's previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    #[default]
    Skip,
    Allow,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        }
    }
}

fn yes() -> bool {
    true
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// One validated `[[cron]]` table, as a version stores it (JSON in
/// `FunctionConfig.cron`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CronSpec {
    pub name: String,
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The Scheduled Event's `detail`.
    #[serde(default = "empty_object")]
    pub payload: serde_json::Value,
    /// Run one fire missed while the server was down, at start-up.
    #[serde(default = "yes")]
    pub catch_up: bool,
    #[serde(default)]
    pub overlap: Overlap,
}

/// Longest cron name; names appear in URLs and metric labels.
const MAX_NAME: usize = 64;

impl CronSpec {
    /// Validates the `index`th `[[cron]]` table; errors name the field
    /// (`cron[0].schedule`) and say what is allowed.
    pub fn from_toml(index: usize, v: &toml::Value) -> Result<CronSpec, (String, String)> {
        let field = |f: &str| format!("cron[{index}].{f}");
        let whole = format!("cron[{index}]");
        let Some(t) = v.as_table() else {
            return Err((whole, "must be a table".into()));
        };
        for k in t.keys() {
            if ![
                "name", "schedule", "timezone", "payload", "catch_up", "overlap",
            ]
            .contains(&k.as_str())
            {
                return Err((
                    field(k),
                    "unknown key; allowed: name, schedule, timezone, payload, catch_up, overlap"
                        .into(),
                ));
            }
        }
        let string = |k: &str| -> Result<Option<String>, (String, String)> {
            match t.get(k) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err((field(k), "must be a string".into())),
            }
        };
        let name = string("name")?.unwrap_or_else(|| format!("cron-{index}"));
        if name.is_empty()
            || name.len() > MAX_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err((
                field("name"),
                format!("`{name}` must be 1-{MAX_NAME} of a-z, A-Z, 0-9, - and _"),
            ));
        }
        let schedule = string("schedule")?.ok_or_else(|| {
            (
                field("schedule"),
                "is required, e.g. \"*/5 * * * *\"".into(),
            )
        })?;
        let timezone = string("timezone")?;
        Schedule::parse(&schedule, timezone.as_deref()).map_err(|m| {
            let f = if m.starts_with("timezone") {
                "timezone"
            } else {
                "schedule"
            };
            (field(f), m)
        })?;
        let payload = match t.get("payload") {
            None => empty_object(),
            Some(p @ toml::Value::Table(_)) => serde_json::to_value(p)
                .map_err(|e| (field("payload"), format!("cannot be JSON: {e}")))?,
            Some(_) => return Err((field("payload"), "must be a table".into())),
        };
        let catch_up = match t.get("catch_up") {
            None => true,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => return Err((field("catch_up"), "must be true or false".into())),
        };
        let overlap = match string("overlap")?.as_deref() {
            None | Some("skip") => Overlap::Skip,
            Some("allow") => Overlap::Allow,
            Some(o) => {
                return Err((
                    field("overlap"),
                    format!("unknown value `{o}`; allowed: skip, allow"),
                ));
            }
        };
        Ok(CronSpec {
            name,
            schedule,
            timezone,
            payload,
            catch_up,
            overlap,
        })
    }

    /// The parsed schedule. Stored specs were validated at deploy, but the clock
    /// moves on (a schedule can run out of fire times), so this can still fail.
    pub fn parsed(&self) -> Result<Schedule, String> {
        Schedule::parse(&self.schedule, self.timezone.as_deref())
    }
}

/// What to do at start-up about fires missed while the server was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    Nothing,
    /// Run the latest missed fire (one, however many were missed).
    Run(i64),
    /// `catch_up = false`: record the latest missed fire as skipped.
    Skip(i64),
}

/// The catch-up decision for one cron: `last_scheduled_ms` is the latest scheduled
/// time already handled (fired, skipped, or the moment the cron was first seen).
pub fn catch_up(
    schedule: &Schedule,
    last_scheduled_ms: i64,
    now_ms: i64,
    enabled: bool,
) -> CatchUp {
    match schedule.last_between(last_scheduled_ms, now_ms) {
        None => CatchUp::Nothing,
        Some(t) if enabled => CatchUp::Run(t),
        Some(t) => CatchUp::Skip(t),
    }
}

/// Where a Scheduled Event came from.
pub struct ScheduledEventSource<'a> {
    pub id: &'a str,
    pub function: &'a str,
    pub name: &'a str,
    pub scheduled_ms: i64,
    pub account: &'a str,
    pub region: &'a str,
}

/// An EventBridge-style Scheduled Event, the event a cron fire hands its function.
pub fn scheduled_event(
    src: &ScheduledEventSource<'_>,
    payload: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "version": "0",
        "id": src.id,
        "detail-type": "Scheduled Event",
        "source": "nimbus.scheduler",
        "account": src.account,
        "time": rfc3339(src.scheduled_ms),
        "region": src.region,
        "resources": [format!("{}/{}", src.function, src.name)],
        "detail": payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .timestamp_millis()
    }

    #[test]
    fn five_and_six_fields_nicknames_and_every() {
        let t = ms("2026-12-01T20:57:04Z");
        let every5m = Schedule::parse("*/5 * * * *", None).expect("5 fields");
        assert_eq!(every5m.next_after(t), Some(ms("2026-12-01T21:00:00Z")));
        let secs = Schedule::parse("*/10 * * * * *", None).expect("6 fields");
        assert_eq!(secs.next_after(t), Some(ms("2026-12-01T20:57:10Z")));
        let hourly = Schedule::parse("@hourly", None).expect("nickname");
        assert_eq!(hourly.next_after(t), Some(ms("2026-12-01T21:00:00Z")));
        let every = Schedule::parse("@every 30s", None).expect("every");
        assert_eq!(every.next_after(t), Some(ms("2026-12-01T20:57:30Z")));
        assert_eq!(
            every.upcoming(t, 3),
            vec![
                ms("2026-12-01T20:57:30Z"),
                ms("2026-12-01T20:58:00Z"),
                ms("2026-12-01T20:58:30Z")
            ]
        );
        // Strictly after: a fire time itself is not "next".
        let at = ms("2026-12-01T21:00:00Z");
        assert_eq!(every5m.next_after(at), Some(ms("2026-12-01T21:05:00Z")));
        assert_eq!(
            every5m.last_between(ms("2026-12-01T20:00:00Z"), ms("2026-12-01T20:57:04Z")),
            Some(ms("2026-12-01T20:55:00Z"))
        );
        assert_eq!(every5m.last_between(at, at + 1000), None);
    }

    #[test]
    fn daily_local_times_hold_across_dst() {
        // Europe/Berlin leaves summer time on 2026-10-25 (03:00 CEST -> 02:00 CET).
        let s = Schedule::parse("0 9 * * *", Some("Europe/Berlin")).expect("tz");
        let before = ms("2026-10-24T12:00:00Z");
        let fires = s.upcoming(before, 2);
        assert_eq!(fires[0], ms("2026-10-25T08:00:00Z"), "09:00 CET is 08:00Z");
        assert_eq!(fires[1], ms("2026-10-26T08:00:00Z"));
        // Summer: 09:00 CEST is 07:00Z.
        let summer = s.next_after(ms("2026-07-01T00:00:00Z"));
        assert_eq!(summer, Some(ms("2026-07-01T07:00:00Z")));
        // 02:30 does not exist on 2026-03-29 in Berlin; the fire is not lost twice over
        // nor doubled: exactly one fire that day.
        let gap = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).expect("gap");
        let day = gap
            .upcoming(ms("2026-03-28T12:00:00Z"), 3)
            .into_iter()
            .filter(|t| *t < ms("2026-03-29T22:00:00Z"))
            .count();
        assert_eq!(day, 1);
    }

    #[test]
    fn bad_schedules_say_why() {
        for (bad, why) in [
            ("* * *", "fields"),
            ("61 * * * *", ""),
            ("*/0 * * * *", ""),
            ("0 0 30 2 *", "5 years"),
            ("@every 0s", ""),
            ("@every 500ms", "once a second"),
            ("@every soon", ""),
            ("", "empty"),
            ("\u{0661} * * * *", "ASCII"),
        ] {
            let e = Schedule::parse(bad, None).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(Schedule::parse(&"1,".repeat(5000), None).is_err());
        let e = Schedule::parse("@hourly", Some("Mars/Phobos")).expect_err("tz");
        assert!(e.contains("Mars/Phobos"), "{e}");
    }

    #[test]
    fn catch_up_runs_or_skips_only_the_latest_missed_fire() {
        let s = Schedule::parse("*/3 * * * * *", None).expect("parses");
        let last = ms("2026-12-01T10:00:00Z");
        // Down for 10 s: fires at :03, :06, :09 were missed; only :09 runs.
        let now = ms("2026-12-01T10:00:10Z");
        assert_eq!(
            catch_up(&s, last, now, true),
            CatchUp::Run(ms("2026-12-01T10:00:09Z"))
        );
        assert_eq!(
            catch_up(&s, last, now, false),
            CatchUp::Skip(ms("2026-12-01T10:00:09Z"))
        );
        // Nothing was due: no catch-up, and the handled fire itself is never rerun.
        assert_eq!(catch_up(&s, last, last + 2_000, true), CatchUp::Nothing);
        let handled = ms("2026-12-01T10:00:09Z");
        assert_eq!(catch_up(&s, handled, handled, true), CatchUp::Nothing);
    }

    #[test]
    fn scheduled_events_have_eventbridge_shape() {
        let e = scheduled_event(
            &ScheduledEventSource {
                id: "r-1",
                function: "report",
                name: "nightly",
                scheduled_ms: ms("2026-12-01T03:00:00Z"),
                account: "000000000000",
                region: "local",
            },
            &serde_json::json!({"kind": "full"}),
        );
        assert_eq!(
            e,
            serde_json::json!({
                "version": "0", "id": "r-1", "detail-type": "Scheduled Event",
                "source": "nimbus.scheduler", "account": "000000000000",
                "time": "2026-12-01T03:00:00Z", "region": "local",
                "resources": ["report/nightly"], "detail": {"kind": "full"}
            })
        );
    }

    #[test]
    fn cron_tables_validate_with_field_names() {
        let t = |s: &str| -> toml::Value { toml::from_str(s).expect("toml") };
        let spec = CronSpec::from_toml(
            0,
            &t("schedule = \"@every 2s\"\npayload = { a = 1 }\noverlap = \"allow\""),
        )
        .expect("valid");
        assert_eq!(spec.name, "cron-0");
        assert_eq!(spec.payload, serde_json::json!({"a": 1}));
        assert!(spec.catch_up);
        assert_eq!(spec.overlap, Overlap::Allow);
        for (text, field) in [
            ("schedule = \"* * *\"", "cron[1].schedule"),
            ("schedule = \"61 * * * *\"", "cron[1].schedule"),
            ("schedule = \"0 0 30 2 *\"", "cron[1].schedule"),
            (
                "schedule = \"@hourly\"\ntimezone = \"Mars/Phobos\"",
                "cron[1].timezone",
            ),
            (
                "schedule = \"@hourly\"\novelap = \"skip\"",
                "cron[1].ovelap",
            ),
            (
                "schedule = \"@hourly\"\noverlap = \"queue\"",
                "cron[1].overlap",
            ),
            ("schedule = \"@hourly\"\nname = \"a b\"", "cron[1].name"),
            ("name = \"x\"", "cron[1].schedule"),
        ] {
            let (f, m) = CronSpec::from_toml(1, &t(text)).expect_err(text);
            assert_eq!(f, field, "{text}: {m}");
        }
        // Stored specs decode with defaults for what older versions did not write.
        let stored: CronSpec =
            serde_json::from_value(serde_json::json!({"name": "n", "schedule": "@hourly"}))
                .expect("decode");
        assert!(stored.catch_up);
        assert_eq!(stored.overlap, Overlap::Skip);
    }

    proptest::proptest! {
        // The fuzz oracle: next(t) > t, and next is monotonic.
        #[test]
        fn next_is_after_and_monotonic(
            minute in 0u32..60, hour in 0u32..24, step in 1u32..30,
            t in 1_600_000_000_000i64..1_900_000_000_000i64,
        ) {
            for expr in [format!("{minute} {hour} * * *"), format!("*/{step} * * * * *"),
                         format!("{minute} */{step} * * *"), format!("@every {step}s")] {
                let s = Schedule::parse(&expr, Some("America/New_York")).expect("parses");
                let a = s.next_after(t).expect("fires");
                proptest::prop_assert!(a > t, "{expr}: {a} <= {t}");
                let b = s.next_after(a).expect("fires again");
                proptest::prop_assert!(b > a);
            }
        }
    }
}
