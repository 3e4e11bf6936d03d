//! A storage's counters, reported by `server_status`, `ruok`, the summary
//! log line and the Prometheus endpoint. Each is bumped by the storage
//! operation it counts (loads by the loads, the rest by a
//! [`Transaction`](crate::storage::Transaction)'s steps), never by a caller.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one storage (relaxed atomics: figures, not synchronization).
#[derive(Debug, Default)]
pub struct Stats {
    /// `loadBefore` and `loadSerial` calls.
    pub loads: AtomicU64,
    /// Stores buffered in transactions (committed or not).
    pub stores: AtomicU64,
    pub commits: AtomicU64,
    /// Transactions that ended without committing (`tpc_abort`, a failed
    /// vote, a disconnect, a timeout).
    pub aborts: AtomicU64,
    /// Conflicts votes found: each one handed back for resolution, and
    /// each conflict error.
    pub conflicts: AtomicU64,
    /// Conflicts handed back that a later vote of the same transaction
    /// resolved.
    pub conflicts_resolved: AtomicU64,
    /// Transactions begun and not yet ended.
    pub active_txns: AtomicU64,
    /// Votes refused, per reason (the memory limit counted by the vote
    /// that hit it, the others by the transaction's refused vote).
    pub votes_refused: PerReason<VoteRefusal>,
}

reasons! {
    /// Why a vote was refused with an error
    /// (`zeotemp_votes_refused_total{storage,reason}`); conflicts are
    /// counted apart (`conflicts`).
    pub enum VoteRefusal {
        /// The transaction did not fit under `memory-limit`, even after
        /// dropping old revisions and collecting garbage.
        MemoryLimit => "memory-limit",
        /// Its stores carried more than `max-transaction-bytes` of data
        /// (found at the store that went over; the vote fails).
        TransactionSize => "transaction-size",
        /// It used what zeotemp does not do (undo, blobs, restore, an
        /// explicit tid).
        Unsupported => "unsupported",
    }
}

/// A fixed set of reasons, each a label value of a counter: the set is
/// small and known in advance (bounded cardinality), and every reason is
/// exported from the start, at 0, so that alerts and `rate()` work before
/// the first event.
pub trait Reason: Copy + 'static {
    /// Every reason, in the order they are exported.
    const ALL: &'static [Self];
    /// The label value (also the word the log lines use).
    fn label(self) -> &'static str;
    /// The reason's place in [`Reason::ALL`].
    fn index(self) -> usize;
}

/// One counter per reason of `R` (relaxed atomics: figures, not
/// synchronization).
pub struct PerReason<R> {
    counts: Box<[AtomicU64]>,
    reason: PhantomData<R>,
}

impl<R: Reason + std::fmt::Debug> std::fmt::Debug for PerReason<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.read()).finish()
    }
}

impl<R: Reason> Default for PerReason<R> {
    fn default() -> Self {
        PerReason {
            counts: R::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            reason: PhantomData,
        }
    }
}

impl<R: Reason> PerReason<R> {
    /// Counts one event of `reason`.
    pub fn bump(&self, reason: R) {
        if let Some(c) = self.counts.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The count of `reason`.
    pub fn get(&self, reason: R) -> u64 {
        self.counts
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every reason's label and count, in [`Reason::ALL`]'s order.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        R::ALL.iter().map(|&r| (r.label(), self.get(r))).collect()
    }
}

/// Defines a [`Reason`] enum: each variant with its label value.
macro_rules! reasons {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl $crate::storage::stats::Reason for $name {
            const ALL: &'static [Self] = &[$($name::$variant,)+];
            fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)+ }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}
pub(crate) use reasons;
