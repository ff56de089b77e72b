//! Which unsettled events may be dispatched now. Pure (no clock, no I/O) so the
//! ordering rule is tested on its own.
//!
//! Ordered subscriptions: of the events sharing a partition key, only the oldest
//! unsettled one is ever a candidate, so one key's events run one at a time in
//! publish order, and a later one waits while an earlier one is in flight or
//! waiting for its retry. Events without a key, and every event of an unordered
//! subscription, are independent.

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub key: Option<String>,
    pub ready_at_ms: i64,
    pub attempts: u32,
    pub in_flight: bool,
    pub item: T,
}

#[derive(Debug)]
pub struct Scheduler<T> {
    ordered: bool,
    entries: BTreeMap<i64, Entry<T>>,
}

impl<T> Scheduler<T> {
    pub fn new(ordered: bool) -> Self {
        Scheduler {
            ordered,
            entries: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(
        &mut self,
        offset: i64,
        key: Option<String>,
        attempts: u32,
        ready_at_ms: i64,
        item: T,
    ) {
        self.entries.insert(
            offset,
            Entry {
                key: if self.ordered { key } else { None },
                ready_at_ms,
                attempts,
                in_flight: false,
                item,
            },
        );
    }

    pub fn get(&self, offset: i64) -> Option<&Entry<T>> {
        self.entries.get(&offset)
    }

    /// Settled: forget it (its key's next event becomes a candidate).
    pub fn remove(&mut self, offset: i64) -> Option<Entry<T>> {
        self.entries.remove(&offset)
    }

    /// Back to waiting, until `ready_at_ms`.
    pub fn reschedule(&mut self, offset: i64, ready_at_ms: i64, attempts: u32) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.in_flight = false;
            e.ready_at_ms = ready_at_ms;
            e.attempts = attempts;
        }
    }

    /// The candidates: events not in flight and, when ordered, first of their key.
    fn candidates(&self) -> impl Iterator<Item = (&i64, &Entry<T>)> {
        let mut seen: HashSet<&str> = HashSet::new();
        self.entries.iter().filter(move |(_, e)| {
            if let Some(k) = e.key.as_deref()
                && !seen.insert(k)
            {
                return false;
            }
            !e.in_flight
        })
    }

    /// Up to `max` events ready at `now_ms`, in offset order, marked in flight.
    pub fn next_batch(&mut self, now_ms: i64, max: usize) -> Vec<i64> {
        let picked: Vec<i64> = self
            .candidates()
            .filter(|(_, e)| e.ready_at_ms <= now_ms)
            .map(|(o, _)| *o)
            .take(max)
            .collect();
        for o in &picked {
            if let Some(e) = self.entries.get_mut(o) {
                e.in_flight = true;
            }
        }
        picked
    }

    /// When a candidate that is not ready now becomes ready (ready ones wait for a
    /// free slot, which a finishing delivery signals).
    pub fn next_wake(&self, now_ms: i64) -> Option<i64> {
        self.candidates()
            .map(|(_, e)| e.ready_at_ms)
            .filter(|t| *t > now_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn ordered_keys_run_one_at_a_time_in_publish_order() {
        let mut s = Scheduler::new(true);
        for (o, key) in [(0, "a"), (1, "b"), (2, "a"), (3, "b"), (4, "c")] {
            s.insert(o, k(key), 0, 0, ());
        }
        s.insert(5, None, 0, 0, ());
        // Heads of a, b, c and the keyless one.
        assert_eq!(s.next_batch(0, 10), vec![0, 1, 4, 5]);
        assert!(s.next_batch(0, 10).is_empty(), "2 and 3 wait for 0 and 1");
        // 0 fails and waits for a retry: 2 still waits behind it.
        s.reschedule(0, 100, 1);
        assert!(s.next_batch(50, 10).is_empty());
        assert_eq!(s.next_wake(50), Some(100));
        s.remove(1);
        assert_eq!(s.next_batch(50, 10), vec![3]);
        assert_eq!(s.next_batch(100, 10), vec![0]);
        s.remove(0);
        assert_eq!(s.next_batch(100, 10), vec![2]);
    }

    #[test]
    fn unordered_events_run_in_parallel_and_batches_are_capped() {
        let mut s = Scheduler::new(false);
        for o in 0..5 {
            s.insert(o, k("same"), 0, 0, ());
        }
        assert_eq!(s.next_batch(0, 2), vec![0, 1]);
        assert_eq!(s.next_batch(0, 10), vec![2, 3, 4]);
        s.reschedule(3, 500, 1);
        assert_eq!(s.next_wake(0), Some(500));
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn a_blocked_key_does_not_make_the_loop_spin() {
        let mut s = Scheduler::new(true);
        s.insert(0, k("a"), 0, 0, ());
        s.insert(1, k("a"), 0, 0, ());
        assert_eq!(s.next_batch(0, 10), vec![0]);
        // 1 is ready but blocked: no wake-up for it.
        assert_eq!(s.next_wake(0), None);
    }
}
