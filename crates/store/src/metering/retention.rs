//! Log retention by bytes: the writer's tally of kept log bodies, and the pruning that
//! holds it under the total and per-function bounds, oldest first.
//!
//! Only log bodies go: an invocation's record (its metering row) stays, and its logs
//! read as empty once pruned.

use std::collections::HashMap;

use rusqlite::{Transaction, params};

use crate::Result;

/// How many bytes of log bodies to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    /// Over every function.
    pub max_bytes: u64,
    /// Of any one function, so one chatty function cannot evict everyone else's logs.
    pub max_bytes_per_function: u64,
}

impl Default for LogRetention {
    fn default() -> Self {
        LogRetention {
            max_bytes: 1024 * 1024 * 1024,
            max_bytes_per_function: 256 * 1024 * 1024,
        }
    }
}

/// Bytes of kept log bodies, in total and per function. The writer keeps it current
/// as it inserts and deletes, so checking the bounds after a batch needs no scan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct LogUsage {
    total: u64,
    by_function: HashMap<String, u64>,
}

impl LogUsage {
    /// Counts what the table holds. `octet_length` reads a value's size from its
    /// record header, not the text itself.
    pub(super) fn load(tx: &Transaction<'_>) -> Result<LogUsage> {
        let mut usage = LogUsage::default();
        let mut stmt = tx.prepare(
            "SELECT function, sum(octet_length(logs)) FROM invocation_logs GROUP BY function",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let bytes: i64 = r.get(1)?;
            usage.add(&r.get::<_, String>(0)?, u64::try_from(bytes).unwrap_or(0));
        }
        Ok(usage)
    }

    pub(super) fn total(&self) -> u64 {
        self.total
    }

    pub(super) fn add(&mut self, function: &str, bytes: u64) {
        self.total = self.total.saturating_add(bytes);
        match self.by_function.get_mut(function) {
            Some(b) => *b = b.saturating_add(bytes),
            None => {
                self.by_function.insert(function.to_string(), bytes);
            }
        }
    }

    fn sub(&mut self, function: &str, bytes: u64) {
        self.total = self.total.saturating_sub(bytes);
        if let Some(b) = self.by_function.get_mut(function) {
            *b = b.saturating_sub(bytes);
            if *b == 0 {
                self.by_function.remove(function);
            }
        }
    }

    /// Deletes the oldest log bodies, first of each function over its share, then of
    /// everyone, until both bounds hold. Returns the bytes deleted.
    pub(super) fn enforce(&mut self, tx: &Transaction<'_>, limits: LogRetention) -> Result<u64> {
        let mut freed = 0;
        let over: Vec<(String, u64)> = self
            .by_function
            .iter()
            .filter(|(_, b)| **b > limits.max_bytes_per_function)
            .map(|(f, b)| (f.clone(), b - limits.max_bytes_per_function))
            .collect();
        for (function, excess) in over {
            let victims = oldest(
                tx,
                "SELECT seq, function, octet_length(logs) FROM invocation_logs
                 WHERE function = ?1 ORDER BY started_at_ms, seq",
                Some(&function),
                excess,
            )?;
            freed += self.delete(tx, &victims)?;
        }
        if self.total > limits.max_bytes {
            let excess = self.total - limits.max_bytes;
            let victims = oldest(
                tx,
                "SELECT seq, function, octet_length(logs) FROM invocation_logs ORDER BY seq",
                None,
                excess,
            )?;
            freed += self.delete(tx, &victims)?;
        }
        Ok(freed)
    }

    fn delete(&mut self, tx: &Transaction<'_>, victims: &[Victim]) -> Result<u64> {
        let mut stmt = tx.prepare_cached("DELETE FROM invocation_logs WHERE seq = ?1")?;
        let mut freed = 0;
        for v in victims {
            stmt.execute([v.seq])?;
            self.sub(&v.function, v.bytes);
            freed += v.bytes;
        }
        Ok(freed)
    }
}

struct Victim {
    seq: i64,
    function: String,
    bytes: u64,
}

/// The first rows of `sql` (oldest first) whose bodies add up to at least `excess`.
fn oldest(
    tx: &Transaction<'_>,
    sql: &str,
    function: Option<&str>,
    excess: u64,
) -> Result<Vec<Victim>> {
    let mut stmt = tx.prepare_cached(sql)?;
    let mut rows = match function {
        Some(f) => stmt.query(params![f])?,
        None => stmt.query([])?,
    };
    let (mut out, mut sum) = (Vec::new(), 0u64);
    while sum < excess {
        let Some(r) = rows.next()? else { break };
        let bytes = u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0);
        sum = sum.saturating_add(bytes);
        out.push(Victim {
            seq: r.get(0)?,
            function: r.get(1)?,
            bytes,
        });
    }
    Ok(out)
}
