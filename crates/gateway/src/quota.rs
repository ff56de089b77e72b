//! Request quotas of API keys per calendar day or month (UTC).
//!
//! Counting happens here, in memory, on the request path; the counts reach the store
//! through `cli::serve`, which drains the changed counters about once a second and
//! seeds them back at start-up. So a restart keeps what was spent, and a crash loses
//! at most the last second of counting (bounded further by the key's rate limit, if
//! it has one): a quota is a budget, not a security boundary, and one fsync per
//! request would cost more than the requests it counts.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::response::Response;
use http::{HeaderValue, StatusCode};
use nimbus_core::keys::Quota;

use crate::error_response;
use crate::limits::RateHeaders;

/// A key's count in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub period_start_ms: i64,
    pub count: u64,
}

#[derive(Default)]
struct Counter {
    period_start_ms: i64,
    count: u64,
    dirty: bool,
}

/// Quota counters by key id.
#[derive(Default)]
pub struct Quotas {
    map: Mutex<HashMap<String, Counter>>,
}

/// Seconds until `end_ms`, rounded up, at least one.
fn secs_until(end_ms: i64, now_ms: i64) -> u64 {
    let ms = (end_ms - now_ms).max(0) as u64;
    ms.div_ceil(1000).max(1)
}

impl Quotas {
    /// Counters as persisted, e.g. after a restart; a count already in memory for the
    /// same period is kept when it is higher.
    pub fn seed(&self, counted: impl IntoIterator<Item = (String, Counted)>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for (key, c) in counted {
            let e = map.entry(key).or_default();
            if e.period_start_ms < c.period_start_ms
                || (e.period_start_ms == c.period_start_ms && e.count < c.count)
            {
                e.period_start_ms = c.period_start_ms;
                e.count = c.count;
            }
        }
    }

    /// Counters changed since the last drain, to be persisted.
    pub fn drain_changed(&self) -> Vec<(String, Counted)> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.iter_mut()
            .filter(|(_, c)| c.dirty)
            .map(|(k, c)| {
                c.dirty = false;
                (
                    k.clone(),
                    Counted {
                        period_start_ms: c.period_start_ms,
                        count: c.count,
                    },
                )
            })
            .collect()
    }

    /// Counts one request of `key_id`, or answers 429 once the period's budget is
    /// spent, with `Retry-After` at the period's end.
    pub fn take(
        &self,
        key_id: &str,
        quota: Quota,
        now_ms: i64,
    ) -> Result<RateHeaders, Box<Response>> {
        let (start, end) = quota.period(now_ms);
        let reset = secs_until(end, now_ms);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let c = map.entry(key_id.to_string()).or_default();
        if c.period_start_ms != start {
            // A new period, or a counter from before the clock went back: start over
            // only when the period moved forward.
            if c.period_start_ms < start {
                c.period_start_ms = start;
                c.count = 0;
            }
        }
        let limit = HeaderValue::from(quota.requests);
        if c.count >= quota.requests {
            drop(map);
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                &format!("this API key's quota of {quota} is spent"),
            );
            let h = r.headers_mut();
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(reset));
            h.insert("ratelimit-limit", limit);
            h.insert("ratelimit-remaining", HeaderValue::from(0u32));
            h.insert("ratelimit-reset", HeaderValue::from(reset));
            return Err(Box::new(r));
        }
        c.count += 1;
        c.dirty = true;
        Ok(vec![
            ("ratelimit-limit", limit),
            (
                "ratelimit-remaining",
                HeaderValue::from(quota.requests - c.count),
            ),
            ("ratelimit-reset", HeaderValue::from(reset)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::keys::parse_quota;

    const NOW: i64 = 1_796_158_624_000; // 2026-12-01T20:57:04Z

    #[test]
    fn a_quota_admits_its_budget_then_429_until_the_period_ends() {
        let q = Quotas::default();
        let quota = parse_quota("2/day").expect("quota");
        let remaining = |h: &RateHeaders| h[1].1.clone();
        assert_eq!(
            remaining(&q.take("k", quota, NOW).expect("1")),
            HeaderValue::from(1u32)
        );
        assert!(q.take("k", quota, NOW).is_ok());
        let r = q.take("k", quota, NOW).expect_err("spent");
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("s")
            .parse()
            .expect("n");
        // 20:57:04 -> midnight is 3 h 2 min 56 s.
        assert_eq!(retry, 3 * 3600 + 2 * 60 + 56);
        assert!(q.take("other", quota, NOW).is_ok(), "per key");
        let tomorrow = NOW + retry as i64 * 1000;
        assert!(q.take("k", quota, tomorrow).is_ok(), "a new day");
    }

    #[test]
    fn changed_counters_drain_once_and_seeds_never_lower_a_count() {
        let q = Quotas::default();
        let quota = parse_quota("100/month").expect("quota");
        let start = quota.period(NOW).0;
        q.seed([(
            "k".to_string(),
            Counted {
                period_start_ms: start,
                count: 98,
            },
        )]);
        assert!(q.drain_changed().is_empty(), "seeding is not a change");
        q.take("k", quota, NOW).expect("99");
        let drained = q.drain_changed();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].1.count, 99);
        assert!(q.drain_changed().is_empty());
        q.seed([(
            "k".to_string(),
            Counted {
                period_start_ms: start,
                count: 10,
            },
        )]);
        q.take("k", quota, NOW).expect("100");
        assert!(q.take("k", quota, NOW).is_err(), "101 is over");
    }
}
