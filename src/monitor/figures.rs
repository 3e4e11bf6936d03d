//! One reading of the server's figures: each storage's ([`StorageFigures`],
//! what `server_status`, `ruok` and the summary line report) and the whole
//! server's ([`Snapshot`], what a Prometheus scrape reports).

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use crate::protocol::ids::Tid;
use crate::state::Shared;
use crate::storage::{ClassRow, Storage, classes};

/// The figures of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub version: String,
    /// Unix time the server started, and seconds since.
    pub start_time: f64,
    pub uptime: f64,
    /// Open ZEO connections (all listeners), and the limit.
    pub connections: usize,
    pub max_connections: usize,
    /// The process's resident set size, if known (Linux).
    pub resident_bytes: Option<u64>,
    pub storages: Vec<StorageFigures>,
}

/// One storage's figures, read at one moment: what the metrics and the
/// storage's `server_status` (and so `ruok`) report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageFigures {
    pub name: String,
    pub connections: usize,
    pub objects: usize,
    pub current_bytes: usize,
    pub retained_bytes: usize,
    pub accounted_bytes: usize,
    pub memory_limit: Option<usize>,
    pub revisions: usize,
    pub last_tid: Tid,
    pub loads: u64,
    pub stores: u64,
    pub commits: u64,
    pub aborts: u64,
    pub conflicts: u64,
    pub conflicts_resolved: u64,
    pub active_transactions: u64,
    pub lock_waiters: usize,
    /// Seconds the commit lock's holder has held it (`None` when free).
    pub lock_held_seconds: Option<f64>,
    pub gc_collections: u64,
    pub gc_freed_objects: u64,
    pub gc_longest_pause_us: u64,
    pub gc_last_collection_us: u64,
    pub unscannable_records: usize,
    /// The classes whose current records hold the most bytes, the rest
    /// summed in a last `(other)` row (`classes::top`); as many as asked
    /// for (`class-table-size`), none if 0.
    pub classes: Vec<ClassRow>,
}

impl StorageFigures {
    /// Reads storage `s`'s figures now, with its `top_classes` biggest
    /// classes.
    pub fn of(s: &Storage, top_classes: usize) -> StorageFigures {
        // Not nested: the commit lock's state, then the storage's.
        let (lock_held_seconds, lock_waiters) = s.lock_status();
        let st = s.read();
        let class_rows = if top_classes > 0 {
            st.class_rows()
        } else {
            Vec::new()
        };
        let (revisions, retained_bytes) = st.retained();
        let (stats, gc) = (&s.stats, &s.gc_stats);
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let figures = StorageFigures {
            name: s.name().to_string(),
            connections: st.subscriber_count(),
            objects: st.len(),
            current_bytes: st.size(),
            retained_bytes,
            accounted_bytes: st.accounted(),
            memory_limit: st.memory_limit(),
            revisions,
            last_tid: st.last_tid(),
            loads: n(&stats.loads),
            stores: n(&stats.stores),
            commits: n(&stats.commits),
            aborts: n(&stats.aborts),
            conflicts: n(&stats.conflicts),
            conflicts_resolved: n(&stats.conflicts_resolved),
            active_transactions: n(&stats.active_txns),
            lock_waiters,
            lock_held_seconds,
            gc_collections: n(&gc.collections),
            gc_freed_objects: n(&gc.freed_objects),
            gc_longest_pause_us: n(&gc.longest_pause_us),
            gc_last_collection_us: n(&gc.last_cycle_us),
            unscannable_records: st.unscannable(),
            classes: Vec::new(),
        };
        // Ranked after the lock is released.
        drop(st);
        StorageFigures {
            classes: classes::top(class_rows, top_classes),
            ..figures
        }
    }
}

impl Snapshot {
    /// Reads the server's figures now.
    pub fn take(shared: &Shared) -> Snapshot {
        let storages = shared
            .storage_names
            .iter()
            .filter_map(|name| shared.storages.get(name))
            .map(|s| StorageFigures::of(s, shared.config.class_table_size))
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            start_time: shared
                .started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            uptime: shared
                .started
                .elapsed()
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            connections: shared.connections.load(Ordering::Relaxed),
            max_connections: shared.config.max_connections,
            resident_bytes: resident_bytes(),
            storages,
        }
    }
}

/// VmRSS of this process from /proc/self/status (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
