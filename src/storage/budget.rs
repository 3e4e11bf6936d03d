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
//! revisions grow by doubling, and the process itself takes a few MiB. So
//! the accounted bytes may reach only what is left of the limit once
//! [`PROCESS_RESERVE`] is set aside, divided by
//! [`ALLOCATOR_OVERHEAD_PERCENT`] (the *accounted limit*,
//! [`accounted_limit`]).
//!
//! Invariant: `accounted()` is the sum of the accounted bytes of every
//! storage holding the budget (each storage adds and subtracts under its
//! own write lock, and gives back what it holds when it is dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How much resident memory an accounted byte may take, in percent (3×).
///
/// Measured with the churn soak (`bench/soak.py --memory-limit`: 4 stock
/// clients writing Transience-like sessions, history-retention 60 s) once
/// the limit is reached and votes drop history and collect under
/// pressure: peak RSS = about 8 MiB + 1.9 × peak accounted bytes (release
/// build: 47.6 MiB with 21.3 MiB accounted at a 64 MiB limit, 17.9 MiB
/// with 5.3 MiB at 16 MiB, where a limit without [`PROCESS_RESERVE`] was
/// crossed). The 1.9 is the allocator (freed memory is reused,
/// fragmented, not returned to the system) and the object map's free
/// slots (it grows by doubling). RSS crept up by a few MiB while at the
/// limit (in steps, when the clients ran faster than before), and with no
/// limit reached it was 8 MiB + 2.45× the accounted bytes (history kept
/// for its whole retention, freed in bulk), so the factor is 3, not 2:
/// the margin is a fifth of the limit or more
/// (bench/results/soak-2026-12-07-churn-limit64m.md, BENCHMARKS.md "RSS
/// against the memory limit").
pub const ALLOCATOR_OVERHEAD_PERCENT: usize = 300;

/// Resident memory set aside for the process itself (code, runtime, thread
/// stacks, the connections' buffers of a few clients): about 5 MiB at
/// start, 8 MiB under the churn soak's 4 clients. At most half of a
/// limit is set aside (a limit under 16 MiB, down to the 1 MiB floor, is
/// for tests: RSS cannot stay under it).
pub const PROCESS_RESERVE: usize = 8 * 1024 * 1024;

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
    /// fill a storage to the byte); its `limit` is only about right.
    pub fn with_accounted_limit(bytes: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit: Some(
                (bytes.saturating_mul(ALLOCATOR_OVERHEAD_PERCENT) / 100)
                    .saturating_add(PROCESS_RESERVE),
            ),
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

/// The accounted bytes `limit` bytes of resident memory hold: what is
/// left once [`PROCESS_RESERVE`] (at most half the limit) is set aside,
/// divided by [`ALLOCATOR_OVERHEAD_PERCENT`]. 64 MiB hold 18.7 MiB, 1 GiB
/// 338.7 MiB; 16 MiB hold 2.7 MiB, and so does anything smaller a sixth.
pub fn accounted_limit(limit: usize) -> usize {
    let rest = limit - PROCESS_RESERVE.min(limit / 2);
    // (In u128: `rest × 100` does not overflow; the result is smaller.)
    (rest as u128 * 100 / ALLOCATOR_OVERHEAD_PERCENT as u128) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accounted_limit_leaves_room_for_the_allocator() {
        // Small limits: half for the process, a third of the rest.
        assert_eq!(accounted_limit(600), 100);
        assert_eq!(accounted_limit(6 << 20), 1 << 20);
        assert_eq!(accounted_limit(16 << 20), (8 << 20) / 3);
        // From 16 MiB on: 8 MiB for the process, a third of the rest.
        assert_eq!(accounted_limit(68 << 20), 20 << 20);
        assert_eq!(accounted_limit(1 << 30), ((1 << 30) - PROCESS_RESERVE) / 3);
        // No overflow near usize::MAX.
        assert_eq!(
            accounted_limit(usize::MAX),
            (usize::MAX - PROCESS_RESERVE) / 3
        );
        let b = MemoryBudget::new(Some(2400));
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
        assert_eq!(exact.limit(), Some(3000 + PROCESS_RESERVE));
    }
}
