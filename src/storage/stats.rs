//! A storage's counters, reported by `server_status`, `ruok`, the summary
//! log line and the Prometheus endpoint. Each is bumped by the storage
//! operation it counts (loads by the loads, the rest by a
//! [`Transaction`](crate::storage::Transaction)'s steps), never by a caller.

use std::sync::atomic::AtomicU64;

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
}
