//! Token buckets (governor) by name: per API key, per route, per route and client IP.
//!
//! Buckets live apart from the snapshots that name their rates (a snapshot is rebuilt
//! on every store change; a bucket must not refill because someone deployed) and are
//! replaced only when their rate changes. A bucket idle for longer than it takes to
//! refill completely is indistinguishable from a new one, so those are dropped once
//! the map grows large: a flood of client addresses cannot grow it without bound.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderValue, StatusCode};
use nimbus_core::keys::Rate;

use crate::error_response;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Past this many buckets, fully refilled ones are dropped.
const PRUNE_ABOVE: usize = 10_000;

struct Bucket {
    rate: Rate,
    limiter: Arc<Limiter>,
    last_used: Instant,
}

/// `RateLimit-*` headers for an admitted request.
pub type RateHeaders = Vec<(&'static str, HeaderValue)>;

#[derive(Default)]
pub struct Buckets {
    map: Mutex<HashMap<String, Bucket>>,
}

fn per_cell(rate: Rate) -> Duration {
    rate.per.duration() / rate.requests.max(1)
}

fn quota(rate: Rate) -> Quota {
    let one = NonZeroU32::MIN;
    Quota::with_period(per_cell(rate))
        .unwrap_or_else(|| Quota::per_second(one))
        .allow_burst(NonZeroU32::new(rate.burst).unwrap_or(one))
}

impl Buckets {
    fn limiter(&self, name: &str, rate: Rate) -> Arc<Limiter> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(b) = map.get_mut(name)
            && b.rate == rate
        {
            b.last_used = now;
            return Arc::clone(&b.limiter);
        }
        if map.len() >= PRUNE_ABOVE {
            map.retain(|_, b| now.duration_since(b.last_used) < per_cell(b.rate) * b.rate.burst);
        }
        let limiter = Arc::new(RateLimiter::direct(quota(rate)).with_middleware());
        map.insert(
            name.to_string(),
            Bucket {
                rate,
                limiter: Arc::clone(&limiter),
                last_used: now,
            },
        );
        limiter
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Takes one token from `name`'s bucket, or answers 429 with `Retry-After` and
    /// `RateLimit-*`; `what` names the limit in the error message.
    pub fn take(&self, name: &str, rate: Rate, what: &str) -> Result<RateHeaders, Box<Response>> {
        let limit = HeaderValue::from(rate.burst);
        match self.limiter(name, rate).check() {
            Ok(snapshot) => Ok(vec![
                ("ratelimit-limit", limit),
                (
                    "ratelimit-remaining",
                    HeaderValue::from(snapshot.remaining_burst_capacity()),
                ),
            ]),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
                let mut r = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!("rate limit exceeded for this {what}"),
                );
                let h = r.headers_mut();
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                h.insert("ratelimit-limit", limit);
                h.insert("ratelimit-remaining", HeaderValue::from(0u32));
                h.insert("ratelimit-reset", HeaderValue::from(secs));
                Err(Box::new(r))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::keys::parse_rate;

    #[test]
    fn buckets_are_per_name_and_replaced_when_the_rate_changes() {
        let b = Buckets::default();
        let r = parse_rate("1/m:2").expect("rate");
        assert!(b.take("a", r, "key").is_ok());
        assert!(b.take("a", r, "key").is_ok());
        assert_eq!(
            b.take("a", r, "key").err().map(|r| r.status()),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert!(
            b.take("b", r, "key").is_ok(),
            "another name has its own bucket"
        );
        let r2 = parse_rate("1/m:5").expect("rate");
        assert!(
            b.take("a", r2, "key").is_ok(),
            "a new rate starts a new bucket"
        );
    }

    #[test]
    fn full_buckets_are_pruned_when_the_map_is_large() {
        let b = Buckets::default();
        let fast = parse_rate("1000/s:1").expect("rate");
        for i in 0..PRUNE_ABOVE {
            let _ = b.take(&format!("ip-{i}"), fast, "client");
        }
        std::thread::sleep(Duration::from_millis(5));
        let _ = b.take("one-more", fast, "client");
        assert!(b.len() < 10, "{} buckets left", b.len());
    }
}
