//! The process's memory budget: one `memory-limit` shared by every storage.
//!
//! Each storage counts what it holds (records, references, per-revision and
//! per-object bookkeeping: its *accounted* bytes) and adds every change to
//! the one [`MemoryBudget`] all storages of the server hold. A vote checks
//! the sum of all storages against the budget, so three storages cannot
//! take three times the limit.
//!
//! The limit is meant as a bound on the process's resident memory, which is
//! more than the accounted bytes: the allocator rounds every allocation up
//! and keeps freed memory for later, and the maps and queues holding the
//! revisions grow by doubling. So the accounted bytes may reach the limit
//! divided by [`ALLOCATOR_OVERHEAD_PERCENT`] only (the *accounted limit*).
//!
//! Invariant: `accounted()` is the sum of the accounted bytes of every
//! storage holding the budget (each storage adds and subtracts under its
//! own write lock, and gives back what it holds when it is dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How much resident memory an accounted byte may take, in percent: the
/// accounted limit is `memory-limit × 100 / 300`, a third of it.
///
/// Measured with the churn soak (`bench/soak.py --memory-limit`: 4 stock
/// clients writing Transience-like sessions, history-retention 60 s), peak
/// VmRSS over peak accounted bytes once the limit is reached and votes
/// drop history and collect under pressure: 2.05 (release build, 64 MiB,
/// 4 minutes) to 2.28 (debug build, 32 MiB, where the process's own few
/// MiB weigh more). The rest is the allocator (freed memory is reused,
/// fragmented, not returned to the system), the object map's free slots
/// (it grows by doubling) and the process itself (code, thread stacks,
/// connection buffers). RSS crept up by a few MiB while the live set grew
/// at the limit, so the factor is 3, not 2.3: the margin is about a
/// quarter of the limit (RSS at 0.68–0.76 of it with the measured
/// ratios; bench/results/soak-2026-12-07-churn-limit64m.md).
pub const ALLOCATOR_OVERHEAD_PERCENT: usize = 300;

/// When a vote must make room, the share of the accounted limit (in
/// percent) it frees beyond what it needs, by dropping old history: the
/// votes after it fit without trimming again.
pub const PRESSURE_HEADROOM_PERCENT: usize = 10;

/// The memory limit of the whole process and the accounted bytes of all
/// its storages. Shared (`Arc`) by every storage's
/// [`StorageLimits`](super::StorageLimits).
#[derive(Debug, Default)]
pub struct MemoryBudget {
    /// `memory-limit`: `None` is no limit.
    limit: Option<usize>,
    /// What the accounted bytes of all storages may reach under `limit`.
    accounted_limit: Option<usize>,
    accounted: AtomicUsize,
}

impl MemoryBudget {
    /// A budget for `memory-limit` bytes of resident memory (`None`: no
    /// limit), to share between storages.
    pub fn new(limit: Option<usize>) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            accounted_limit: limit.map(accounted_limit),
            accounted: AtomicUsize::new(0),
        })
    }

    /// A budget whose accounted limit is exactly `bytes` (for tests that
    /// fill a storage to the byte).
    pub fn with_accounted_limit(bytes: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit: Some(bytes.saturating_mul(ALLOCATOR_OVERHEAD_PERCENT) / 100),
            accounted_limit: Some(bytes),
            accounted: AtomicUsize::new(0),
        })
    }

    /// The `memory-limit` (bytes of resident memory); `None`: no limit.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// What all storages together may be accounted for.
    pub fn accounted_limit(&self) -> Option<usize> {
        self.accounted_limit
    }

    /// Accounted bytes of all storages sharing this budget.
    pub fn accounted(&self) -> usize {
        self.accounted.load(Ordering::Relaxed)
    }

    /// Accounted bytes a vote under pressure frees beyond its need
    /// ([`PRESSURE_HEADROOM_PERCENT`] of the accounted limit).
    pub fn pressure_headroom(&self) -> usize {
        self.accounted_limit
            .map_or(0, |l| l / 100 * PRESSURE_HEADROOM_PERCENT)
    }

    /// Bytes by which `incoming` more accounted bytes would exceed the
    /// accounted limit (0: they fit, or there is no limit).
    pub fn over_by(&self, incoming: usize) -> usize {
        self.accounted_limit.map_or(0, |limit| {
            (self.accounted() + incoming).saturating_sub(limit)
        })
    }

    pub(super) fn add(&self, bytes: usize) {
        self.accounted.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn sub(&self, bytes: usize) {
        self.accounted.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Two budgets are equal if they are the same one.
impl PartialEq for MemoryBudget {
    fn eq(&self, other: &MemoryBudget) -> bool {
        std::ptr::eq(self, other)
    }
}

/// The accounted bytes `limit` bytes of resident memory hold (see
/// [`ALLOCATOR_OVERHEAD_PERCENT`]).
pub fn accounted_limit(limit: usize) -> usize {
    // (In u128: `limit × 100` does not overflow; the result is smaller.)
    (limit as u128 * 100 / ALLOCATOR_OVERHEAD_PERCENT as u128) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accounted_limit_leaves_room_for_the_allocator() {
        assert_eq!(accounted_limit(300), 100);
        assert_eq!(accounted_limit(64 << 20), (64 << 20) / 3);
        // No overflow near usize::MAX.
        assert_eq!(accounted_limit(usize::MAX), usize::MAX / 3);
        let b = MemoryBudget::new(Some(1200));
        assert_eq!(b.accounted_limit(), Some(400));
        assert_eq!(b.over_by(400), 0);
        b.add(300);
        assert_eq!(b.over_by(100), 0);
        assert_eq!(b.over_by(150), 50);
        b.sub(300);
        assert_eq!(b.accounted(), 0);
        assert_eq!(MemoryBudget::new(None).over_by(usize::MAX), 0);
        let exact = MemoryBudget::with_accounted_limit(1000);
        assert_eq!(exact.accounted_limit(), Some(1000));
        assert_eq!(exact.limit(), Some(3000));
    }
}
