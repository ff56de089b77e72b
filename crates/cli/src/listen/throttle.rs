//! Failed authentications counted per client address; past the limit every credential
//! check answers 429 without looking (see [`nimbus_core::body::AuthThrottled`]).
//!
//! One generic cell rate (GCRA, what governor implements) per address, kept here
//! rather than in governor because the listener must ask "would one more failure be
//! allowed?" on every request without spending one, which governor cannot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nimbus_core::body::AuthThrottled;
use nimbus_core::keys::Rate;

/// Past this many addresses, those whose count has drained are forgotten.
const PRUNE_ABOVE: usize = 10_000;

pub struct AuthThrottle {
    /// Time one failure is remembered (the rate's period over its count).
    interval: Duration,
    /// Failures allowed back to back.
    burst: u32,
    /// Per address: when its count will have drained (its theoretical arrival time).
    tat: Mutex<HashMap<IpAddr, Instant>>,
}

impl AuthThrottle {
    pub fn new(rate: Rate) -> Self {
        AuthThrottle {
            interval: rate.per.duration() / rate.requests.max(1),
            burst: rate.burst.max(1),
            tat: Mutex::new(HashMap::new()),
        }
    }

    /// The refusal for `ip`'s requests now, if it has used up its failures.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Option<AuthThrottled> {
        let map = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let tat = *map.get(&ip)?;
        // One more failure would push the count past the burst.
        let tolerance = self.interval * (self.burst - 1);
        let wait = tat.checked_duration_since(now)?.checked_sub(tolerance)?;
        (!wait.is_zero()).then_some(AuthThrottled { retry_after: wait })
    }

    /// Counts one failed authentication of `ip`.
    pub fn fail(&self, ip: IpAddr, now: Instant) {
        let mut map = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= PRUNE_ABOVE {
            map.retain(|_, tat| *tat > now);
        }
        let tat = map.entry(ip).or_insert(now);
        *tat = (*tat).max(now) + self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::keys::parse_rate;

    #[test]
    fn an_address_gets_its_burst_then_waits_for_the_rate() {
        let t = AuthThrottle::new(parse_rate("10/m:3").expect("rate"));
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 1].into();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.check(a, now), None);
            t.fail(a, now);
        }
        let refused = t.check(a, now).expect("throttled after the burst");
        // One failure is remembered for 6 s: the next is allowed once one drains.
        assert_eq!(refused.retry_after, Duration::from_secs(6));
        assert_eq!(t.check(b, now), None, "another address is not slowed");
        let later = now + Duration::from_secs(6);
        assert_eq!(t.check(a, later), None);
        t.fail(a, later);
        assert!(t.check(a, later).is_some());
        assert_eq!(t.check(a, now + Duration::from_secs(24)), None);
    }

    #[test]
    fn drained_addresses_are_forgotten_once_the_map_is_large() {
        let t = AuthThrottle::new(parse_rate("60/m:1").expect("rate"));
        let now = Instant::now();
        for i in 0..PRUNE_ABOVE as u32 {
            t.fail(IpAddr::from(i.to_be_bytes()), now);
        }
        t.fail([10, 0, 0, 1].into(), now + Duration::from_secs(2));
        assert_eq!(t.tat.lock().map(|m| m.len()).unwrap_or(0), 1);
    }
}
