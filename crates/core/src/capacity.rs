//! The host's budget for sandboxed instances: how many may run at once and how much
//! memory (their `memory_mb` limits, summed) they may be given. The worker reserves from
//! it before every instance start and gives back when the instance is gone; control
//! checks deploys and scale changes against it, so the floors that `min_instances` asks
//! for can always be met and the host is never overcommitted.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The limits, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub max_instances: u64,
    pub max_memory_mb: u64,
}

/// What is reserved now (instances running or starting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub instances: u64,
    pub memory_mb: u64,
}

/// The budget and its live use, shared by the worker (reserves) and control (reads).
#[derive(Debug)]
pub struct Capacity {
    budget: Budget,
    used: Mutex<Usage>,
    /// Held from a floor check to the write it allows, so two changes cannot both fit
    /// alone and overflow together.
    floor_changes: Mutex<()>,
}

/// One instance's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    capacity: Arc<Capacity>,
    memory_mb: u64,
}

impl Capacity {
    pub fn new(budget: Budget) -> Arc<Capacity> {
        Arc::new(Capacity {
            budget,
            used: Mutex::new(Usage::default()),
            floor_changes: Mutex::new(()),
        })
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn usage(&self) -> Usage {
        *self.lock()
    }

    /// Reserves one instance of `memory_mb`, or `None` when that would pass the budget.
    pub fn try_reserve(self: &Arc<Self>, memory_mb: u32) -> Option<Reservation> {
        let memory_mb = u64::from(memory_mb);
        let mut used = self.lock();
        let fits = used.instances < self.budget.max_instances
            && used.memory_mb.saturating_add(memory_mb) <= self.budget.max_memory_mb;
        if !fits {
            return None;
        }
        used.instances += 1;
        used.memory_mb += memory_mb;
        Some(Reservation {
            capacity: Arc::clone(self),
            memory_mb,
        })
    }

    /// Whether floors summing to `floor` fit the budget; the error names the budget.
    pub fn check_floor(&self, floor: Usage) -> Result<(), String> {
        let b = self.budget;
        if floor.instances <= b.max_instances && floor.memory_mb <= b.max_memory_mb {
            return Ok(());
        }
        Err(format!(
            "the floor of all functions' min_instances ({} instances, {} MB) does not fit this server's budget ({} instances, {} MB; serve --max-instances, --max-instance-memory)",
            floor.instances, floor.memory_mb, b.max_instances, b.max_memory_mb
        ))
    }

    /// Serializes changes to floors: hold it across the check and the write.
    pub fn lock_floors(&self) -> std::sync::MutexGuard<'_, ()> {
        self.floor_changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.capacity.lock();
        used.instances = used.instances.saturating_sub(1);
        used.memory_mb = used.memory_mb.saturating_sub(self.memory_mb);
    }
}

/// The floor one function version asks for: `min_instances` x `memory_mb`.
pub fn floor_of(min_instances: u32, memory_mb: u32) -> Usage {
    Usage {
        instances: u64::from(min_instances),
        memory_mb: u64::from(min_instances) * u64::from(memory_mb),
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            instances: self.instances.saturating_add(o.instances),
            memory_mb: self.memory_mb.saturating_add(o.memory_mb),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(instances: u64, mb: u64) -> Arc<Capacity> {
        Capacity::new(Budget {
            max_instances: instances,
            max_memory_mb: mb,
        })
    }

    #[test]
    fn reservations_stop_at_either_limit_and_come_back_on_drop() {
        let c = cap(2, 1000);
        let a = c.try_reserve(128).expect("first");
        let b = c.try_reserve(128).expect("second");
        assert!(
            c.try_reserve(128).is_none(),
            "third instance passes the count"
        );
        assert_eq!(
            c.usage(),
            Usage {
                instances: 2,
                memory_mb: 256
            }
        );
        drop(a);
        assert!(c.try_reserve(900).is_none(), "memory would pass 1000 MB");
        let d = c.try_reserve(872).expect("exactly fits");
        drop((b, d));
        assert_eq!(c.usage(), Usage::default());
    }

    #[test]
    fn floors_are_checked_against_both_limits() {
        let c = cap(64, 8192);
        assert!(c.check_floor(floor_of(64, 128)).is_ok());
        let e = c
            .check_floor(floor_of(1000, 128))
            .expect_err("1000 instances");
        assert!(e.contains("64 instances, 8192 MB"), "{e}");
        assert!(c.check_floor(floor_of(2, 8192) + floor_of(0, 128)).is_err());
    }
}
