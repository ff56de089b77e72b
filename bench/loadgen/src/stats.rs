//! Summaries of recorded latencies.

use serde::Serialize;

/// Percentiles are nearest-rank over every sample (no histogram buckets, no
/// interpolation), so each one is a latency that was actually observed. With few
/// samples the high ones are the tail itself: p99 of 50 runs is the maximum.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// `None` (JSON null) when there is nothing to summarise.
    pub fn of(mut xs: Vec<f64>) -> Option<Stats> {
        xs.retain(|x| x.is_finite());
        if xs.is_empty() {
            return None;
        }
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        Some(Stats {
            n,
            min: xs[0],
            mean,
            p50: rank(&xs, 0.50),
            p90: rank(&xs, 0.90),
            p99: rank(&xs, 0.99),
            max: xs[n - 1],
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty `xs`.
fn rank(xs: &[f64], q: f64) -> f64 {
    let r = (q * xs.len() as f64).ceil() as usize;
    xs[r.clamp(1, xs.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of((1..=100).rev().map(f64::from).collect()).expect("stats");
        assert_eq!((s.n, s.min, s.max), (100, 1.0, 100.0));
        assert_eq!((s.p50, s.p90, s.p99), (50.0, 90.0, 99.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn small_and_degenerate_inputs() {
        assert_eq!(Stats::of(vec![]), None);
        assert_eq!(Stats::of(vec![f64::NAN]), None);
        let one = Stats::of(vec![3.0]).expect("one");
        assert_eq!((one.p50, one.p99, one.max), (3.0, 3.0, 3.0));
        // 50 samples: p50 is the 25th, p99 the 50th (the maximum).
        let s = Stats::of((1..=50).map(f64::from).collect()).expect("fifty");
        assert_eq!((s.p50, s.p99), (25.0, 50.0));
        let even = Stats::of(vec![1.0, 2.0, 3.0, 4.0]).expect("four");
        assert_eq!(even.p50, 2.0);
    }
}
