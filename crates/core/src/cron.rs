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
