//! Every instance runs as a uid of its own, leased from a range and returned when the
//! instance is gone: two instances (so two functions) never share files or signals,
//! and a stem cell can drop privileges before it knows its function.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::lock;

/// How many uids the worker hands out; a host runs far fewer instances at once.
const RANGE: u32 = 60_000;

pub(crate) struct UidPool {
    base: u32,
    state: Mutex<State>,
}

struct State {
    next: u32,
    in_use: BTreeSet<u32>,
}

impl UidPool {
    pub fn new(base: u32) -> Arc<UidPool> {
        Arc::new(UidPool {
            base,
            state: Mutex::new(State {
                next: 0,
                in_use: BTreeSet::new(),
            }),
        })
    }

    /// The next free uid, round-robin so a uid is not reused soon after release
    /// (a process of the old instance could in theory still be exiting).
    pub fn lease(self: &Arc<Self>) -> Option<UidLease> {
        let mut st = lock(&self.state);
        for _ in 0..RANGE {
            let candidate = st.next;
            st.next = (st.next + 1) % RANGE;
            if st.in_use.insert(candidate) {
                return Some(UidLease {
                    uid: self.base.saturating_add(1 + candidate),
                    offset: candidate,
                    pool: Arc::clone(self),
                });
            }
        }
        None
    }
}

pub(crate) struct UidLease {
    pub uid: u32,
    offset: u32,
    pool: Arc<UidPool>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        lock(&self.pool.state).in_use.remove(&self.offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_and_returned() {
        let pool = UidPool::new(100_000);
        let a = pool.lease().expect("a");
        let b = pool.lease().expect("b");
        assert_ne!(a.uid, b.uid);
        assert!(a.uid > 100_000 && b.uid > 100_000);
        let a_uid = a.uid;
        drop(a);
        // Round-robin: the freed uid is not the very next one handed out.
        let c = pool.lease().expect("c");
        assert_ne!(c.uid, a_uid);
        assert_eq!(lock(&pool.state).in_use.len(), 2);
    }
}
