//! One reading of the server's figures: each storage's ([`StorageFigures`],
//! what `server_status`, `ruok` and the summary line report), the whole
//! server's ([`Snapshot`], what a Prometheus scrape reports) and the
//! process's ([`ProcessFigures`], read from `/proc/self` as the Prometheus
//! clients' process collectors do).

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
    /// The process's figures, if known (Linux).
    pub process: Option<ProcessFigures>,
    /// Connections refused at accept, per reason (label, count).
    pub connections_refused: Vec<(&'static str, u64)>,
    /// TLS handshakes failed, per reason.
    pub tls_handshake_failures: Vec<(&'static str, u64)>,
    /// Connections ended, per reason.
    pub disconnects: Vec<(&'static str, u64)>,
    /// `memory-limit` (the process's, all storages together), and the
    /// accounted bytes it holds; `None`: no limit.
    pub memory_limit: Option<usize>,
    pub accounted_limit: Option<usize>,
    pub storages: Vec<StorageFigures>,
    /// The heap allocations counted so far, in a binary built with the
    /// `count-allocations` feature (`None` otherwise).
    pub allocations: Option<AllocationCounts>,
}

/// A counting allocator's figures since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocationCounts {
    pub allocations: u64,
    pub reallocations: u64,
    /// Bytes asked for by allocations and by growing reallocations.
    pub bytes: u64,
}

/// Where [`Snapshot::take`] reads [`AllocationCounts`]: registered by the
/// binary built with `count-allocations` (the library has no allocator of
/// its own and no `unsafe`).
static ALLOCATION_COUNTER: std::sync::OnceLock<fn() -> AllocationCounts> =
    std::sync::OnceLock::new();

/// Registers the function that reads the process's allocation counts (the
/// first registration wins).
pub fn register_allocation_counter(read: fn() -> AllocationCounts) {
    let _ = ALLOCATION_COUNTER.set(read);
}

/// The process's figures, named after the `process_*` metrics of the
/// Prometheus clients (Go's `collectors.NewProcessCollector`, Python's
/// `ProcessCollector`), read from the same files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    /// User and system CPU time, in seconds (`/proc/self/stat` utime +
    /// stime).
    pub cpu_seconds: f64,
    /// Resident set size (`/proc/self/status` VmRSS).
    pub resident_bytes: u64,
    /// Virtual memory size (`/proc/self/stat` vsize).
    pub virtual_bytes: u64,
    /// Open file descriptors (entries of `/proc/self/fd`).
    pub open_fds: u64,
    /// The soft limit on open file descriptors (`/proc/self/limits`, "Max
    /// open files": `LimitNOFILE=` of a systemd unit); `None` if unlimited.
    pub max_fds: Option<u64>,
    /// Unix time the process started (`/proc/self/stat` starttime after
    /// `/proc/stat` btime).
    pub start_time_seconds: f64,
    /// OS threads (`/proc/self/stat` num_threads).
    pub threads: u64,
}

/// What [`ProcessFigures::parse`] needs besides the two texts.
struct Readings {
    /// Unix time of the boot (`/proc/stat` btime), if readable.
    boot_time: Option<f64>,
    /// The server's own start time, when the boot time is not known.
    started: f64,
    resident_bytes: u64,
    open_fds: u64,
}

/// Clock ticks per second of the times in `/proc/self/stat`: the kernel's
/// `USER_HZ`, 100 on every Linux architecture (what `sysconf(_SC_CLK_TCK)`
/// answers; zeotemp reads no libc), as the Go client assumes too.
const USER_HZ: f64 = 100.0;

impl ProcessFigures {
    /// Reads this process's figures now; `None` without `/proc` (not
    /// Linux) or if a file of the process's own cannot be parsed. The boot
    /// time is in `/proc/stat`, which a sandbox may hide (systemd's
    /// `ProcSubset=pid`): then the start time is `started`, the server's
    /// own record of its start (milliseconds after the process's).
    pub fn read(started: f64) -> Option<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time: Option<f64> = std::fs::read_to_string("/proc/stat").ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("btime "))?
                .trim()
                .parse()
                .ok()
        });
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let readings = Readings {
            boot_time,
            started,
            resident_bytes: resident_bytes()?,
            open_fds,
        };
        Self::parse(&stat, &limits, &readings)
    }

    /// The figures from the text of `/proc/self/stat` and
    /// `/proc/self/limits` and the other readings.
    fn parse(stat: &str, limits: &str, r: &Readings) -> Option<ProcessFigures> {
        // After the command's name in parentheses (which may hold spaces
        // and parentheses itself), field 3 (state) on.
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))?
            .split_whitespace()
            .next()
            .and_then(|soft| soft.parse().ok());
        Some(ProcessFigures {
            cpu_seconds: (field(14)? + field(15)?) as f64 / USER_HZ,
            resident_bytes: r.resident_bytes,
            virtual_bytes: field(23)?,
            open_fds: r.open_fds,
            max_fds,
            start_time_seconds: match r.boot_time {
                Some(boot) => boot + field(22)? as f64 / USER_HZ,
                None => r.started,
            },
            threads: field(20)?,
        })
    }
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
    /// `memory-limit`: the process's, shared by all storages.
    pub memory_limit: Option<usize>,
    /// What all storages together may be accounted for under it.
    pub accounted_limit: Option<usize>,
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
    /// The last cycle's longest hold of the storage lock.
    pub gc_last_longest_pause_us: u64,
    pub unscannable_records: usize,
    /// Votes refused, per reason (label, count).
    pub votes_refused: Vec<(&'static str, u64)>,
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
            memory_limit: st.memory().limit(),
            accounted_limit: st.memory().accounted_limit(),
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
            gc_last_longest_pause_us: n(&gc.last_longest_pause_us),
            unscannable_records: st.unscannable(),
            votes_refused: stats.votes_refused.read(),
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
        let start_time = shared
            .started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        // One reading of /proc/self/status for both RSS figures.
        let process = ProcessFigures::read(start_time);
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            start_time,
            uptime: shared
                .started
                .elapsed()
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            connections: shared.connections.load(Ordering::Relaxed),
            max_connections: shared.config.max_connections,
            resident_bytes: process
                .as_ref()
                .map(|p| p.resident_bytes)
                .or_else(resident_bytes),
            process,
            connections_refused: shared.faults.connections_refused.read(),
            tls_handshake_failures: shared.faults.tls_handshake_failures.read(),
            disconnects: shared.faults.disconnects.read(),
            memory_limit: shared.config.memory_limit,
            accounted_limit: shared
                .config
                .memory_limit
                .map(crate::storage::budget::accounted_limit),
            storages,
            allocations: ALLOCATION_COUNTER.get().map(|read| read()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_from_proc_text() {
        // A real line's shape, with a command name holding ") (" and spaces.
        let stat = "4242 (zeo ) (temp) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
                    250 75 0 0 20 0 3 0 123456 987654321 5000 18446744073709551615";
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        let readings = |boot_time| Readings {
            boot_time,
            started: 1_796_001_300.0,
            resident_bytes: 8192,
            open_fds: 12,
        };
        let p = ProcessFigures::parse(stat, limits, &readings(Some(1_796_000_000.0))).unwrap();
        assert_eq!(
            p,
            ProcessFigures {
                cpu_seconds: 3.25,
                resident_bytes: 8192,
                virtual_bytes: 987_654_321,
                open_fds: 12,
                max_fds: Some(1024),
                start_time_seconds: 1_796_000_000.0 + 1234.56,
                threads: 3,
            }
        );
        let unlimited = limits.replace("1024                ", "unlimited           ");
        let p = ProcessFigures::parse(stat, &unlimited, &readings(None)).unwrap();
        assert_eq!(p.max_fds, None);
        // No boot time (/proc/stat hidden by ProcSubset=pid): the server's
        // own start time.
        assert_eq!(p.start_time_seconds, 1_796_001_300.0);
        // Cut short or garbled: no figures rather than wrong ones.
        assert_eq!(
            ProcessFigures::parse("4242 (x) S 1 2", limits, &readings(None)),
            None
        );
        assert_eq!(
            ProcessFigures::parse("no parenthesis", limits, &readings(None)),
            None
        );
    }

    #[test]
    fn this_process_figures_are_sane() {
        let p = ProcessFigures::read(0.0).expect("Linux /proc");
        assert!(p.open_fds > 0);
        assert!(p.max_fds.is_none_or(|m| p.open_fds <= m), "{p:?}");
        assert!(p.threads >= 1);
        assert!(
            p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes,
            "{p:?}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started before now, and this test process is not a day old.
        assert!(
            p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0,
            "{p:?}"
        );
    }
}
