//! Retry timing shared by event deliveries and async invocations: exponential backoff
//! with full jitter (AWS's "exponential backoff and jitter"), capped, so that a
//! failing consumer is retried less and less often and a crowd of retries spreads out
//! instead of arriving together.

/// How long to wait before attempt `attempt + 1`, given that `attempt` (1-based)
/// attempts failed: uniformly in `[base/2, min(max, base * 2^(attempt-1))]`, with
/// `unit` in `[0, 1)` the random draw (passed in so the rule is testable).
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64, unit: f64) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(40));
    let cap = exp.min(max_ms).max(base_ms / 2);
    let floor = (base_ms / 2).min(cap);
    floor + ((cap - floor) as f64 * unit.clamp(0.0, 1.0)) as u64
}

/// A draw for [`backoff_ms`].
pub fn jitter() -> f64 {
    // No I/O here and no rand dependency: the low bits of a fresh v4 UUID are random
    // enough for spreading retries.
    let b = uuid::Uuid::new_v4().as_u128() as u64;
    (b >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_jitters_within_bounds() {
        assert_eq!(backoff_ms(1, 1000, 60_000, 1.0), 1000);
        assert_eq!(backoff_ms(2, 1000, 60_000, 1.0), 2000);
        assert_eq!(backoff_ms(5, 1000, 60_000, 1.0), 16_000);
        assert_eq!(backoff_ms(30, 1000, 60_000, 1.0), 60_000);
        assert_eq!(backoff_ms(200, 1000, 60_000, 0.0), 500);
        for _ in 0..1000 {
            let d = backoff_ms(4, 1000, 60_000, jitter());
            assert!((500..=8000).contains(&d), "{d}");
        }
    }
}
