//! One in-memory, multi-version object store (a ZODB "storage").
//!
//! Every object keeps its current revision and the non-current revisions
//! that open snapshots and client-side conflict resolution may still read:
//! a non-current revision is kept for the retention window, counted from the
//! moment it stopped being current (the tid of the revision that replaced
//! it, tids being timestamps).
//!
//! Invariants (each tested below):
//! * tids only grow: the storage starts at the wall clock and each commit's
//!   tid is later than the last, also across restarts;
//! * oids never repeat, and a new run starts above any range an earlier run
//!   could have handed out (see [`Storage::new_oids`]);
//! * the root object (oid 0) exists from the start;
//! * the current revision of an object is never dropped by retention;
//! * a revision that retention dropped is reported as a conflict (ZODB
//!   retries), never as POSKeyError;
//! * commit order is delivery order: a commit becomes visible and its
//!   invalidations are handed to every subscriber inside one write-locked
//!   section, and loads compute and enqueue their reply inside a read-locked
//!   one (see [`Storage::load_before`] and `crate::session`);
//! * garbage is collected without an operator ([`gc`]): an object is freed
//!   only when no retained revision of any reachable object refers to it;
//! * the commit lock is always released: a [`Transaction`] holds it, and
//!   dropping the transaction releases it ([`commit`]).
//!
//! Here: the objects and their revisions, loads, oids, subscribers,
//! retention and memory accounting; [`commit`] has the two-phase commit and
//! the commit lock, [`gc`] the collector with its reference scanner
//! [`refs`], [`classes`] the objects and bytes by class, `revisions` an
//! object's revisions, [`stats`] the counters, [`oidhash`] the maps'
//! hasher. Depends only on `protocol` (ids, and plain
//! values for transaction metadata) and the defaults in `config`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::ids::{Clock, Oid, Tid};
use crate::protocol::value::Value;
use crate::storage::oidhash::ShardedOidMap;

pub mod budget;
pub mod classes;
pub mod commit;
pub mod gc;
pub mod oidhash;
pub mod refs;
mod revisions;
pub mod stats;
pub use budget::MemoryBudget;
pub use classes::{ClassId, ClassRow, ClassTable};
pub use commit::{Conflict, LockAttempt, SHUTDOWN_HOLDER, Transaction, TxnOp, Vote, VotedTxn};
pub use gc::{GcOutcome, HOLD_BUCKETS, HoldFigures, HoldKind, Holds};
pub use stats::Stats;

/// Bytes accounted for each retained revision beyond its record: the
/// revision entry itself, the record's allocation and its reference list.
pub const REVISION_OVERHEAD: usize = 80;

/// Bytes accounted for each object beyond its revisions (its hash-map
/// slot, which holds a single revision inline). Together with
/// [`REVISION_OVERHEAD`] about what RSS shows per stored object with no
/// history (~150–210 bytes, BENCHMARKS.md).
pub const OBJECT_OVERHEAD: usize = 64;

/// Most oids one `new_oids` call hands out (ZEO's own cap).
pub const MAX_NEW_OIDS: i64 = 100;

/// How far (in TimeStamp units, about 14 ms of clock) the oid counter may
/// run ahead of the storage's clock before a warning says so.
const OIDS_AHEAD_WARNING: u64 = 1 << 20;

/// The record ZODB writes for an empty root: an empty `PersistentMapping`
/// (`persistent.mapping PersistentMapping`, state `{'data': {}}`), as
/// captured from ZODB 6 on Python 3 (protocol notes §8.2).
pub const EMPTY_ROOT_RECORD: &[u8] = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.\x80\x03}q\x01X\x04\x00\x00\x00dataq\x02}q\x03s.";

/// Connection id, used as the commit lock's owner and subscriber key.
pub type ConnId = u64;

/// What a transaction's metadata says (`tpc_begin` arguments).
#[derive(Debug, Clone)]
pub struct TxnMeta {
    pub user: Bytes,
    pub description: Bytes,
    /// The extension dict as the client sent it, returned by `history`
    /// (py2 `str`s in it as Python 3 reads them: `Value::py2_strs_as_py3`).
    pub extension: Value,
}

/// The persistent references of a record, found by [`crate::storage::refs`];
/// `None` when the record looks like a pickle but could not be scanned
/// (the collector then keeps everything).
pub type Refs = Option<Box<[Oid]>>;

/// The class of a record (`module.name`) as the scanner read it; `None`
/// when it could not ([`classes::UNKNOWN_CLASS`]).
pub type ClassName = Option<String>;

/// The references of `record`, for a revision.
pub fn scan_refs(record: &[u8]) -> Refs {
    crate::storage::refs::references(record)
        .ok()
        .map(Vec::into_boxed_slice)
}

/// The references and the class of `record`, in one pass: what a store
/// runs on its record.
pub fn scan_record(record: &[u8]) -> (Refs, ClassName) {
    let scan = crate::storage::refs::scan(record);
    (scan.refs.ok().map(Vec::into_boxed_slice), scan.class)
}

/// Bytes a revision is accounted for: its record, its references and
/// [`REVISION_OVERHEAD`] (the same for a stored revision and a pending store).
fn accounted_size(data: Option<&[u8]>, refs: &Refs) -> usize {
    data.map_or(0, <[u8]>::len) + refs.as_ref().map_or(0, |r| r.len() * 8) + REVISION_OVERHEAD
}

/// One revision of an object.
#[derive(Debug, Clone)]
pub struct Revision {
    pub tid: Tid,
    /// `None` is a deletion (`deleteObject`). A boxed slice, not `Bytes`:
    /// 16 bytes instead of 32 in every revision and no shared header
    /// beside the record; loads encode straight from it under the lock.
    pub data: Option<Box<[u8]>>,
    pub refs: Refs,
    pub meta: Arc<TxnMeta>,
}

impl Revision {
    /// Bytes this revision is accounted for (see [`REVISION_OVERHEAD`]).
    fn accounted(&self) -> usize {
        accounted_size(self.data.as_deref(), &self.refs)
    }
}

#[derive(Debug, Default)]
struct Object {
    /// Oldest first; the last one is current. Never empty.
    revisions: revisions::Revisions,
    /// True once retention dropped an older revision of this object: a
    /// load before the oldest kept one is then a conflict, not "did not
    /// exist yet".
    pruned: bool,
    /// The collector's mark: equal to the cycle's epoch once reached.
    /// Atomic so that marking runs under the read lock, beside loads.
    mark: AtomicU32,
    /// The class of the current revision (when it holds a record), in the
    /// storage's class table. Two bytes that fit in the padding after
    /// `mark` and `pruned`.
    class: ClassId,
}

/// The reason of a ConflictError for an object this storage no longer has.
const GONE: &str = "the object is gone from this storage (freed as garbage, or from before a \
                    server restart): the transaction read an outdated view; retry";

/// The errors ZODB clients rebuild (ZODB.POSException and friends).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StorageError {
    #[error("POSKeyError {oid}")]
    PosKey { oid: Oid, serial: Option<Tid> },
    #[error("conflict on {oid}: committed {committed}, read {read}")]
    Conflict {
        oid: Oid,
        committed: Tid,
        read: Tid,
        class_name: Option<String>,
        /// Why, when it is not a plain write conflict (the client shows it
        /// as the ConflictError's message, without serials if both are
        /// the same).
        reason: Option<String>,
    },
    #[error("read conflict on {oid}: committed {committed}, read {read}")]
    ReadConflict { oid: Oid, committed: Tid, read: Tid },
    #[error("{0}")]
    Storage(String),
}

/// Answer of `loadBefore`.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<'a> {
    /// Borrowed from the storage: the caller encodes it while it holds the
    /// read lock, without copying it or touching a shared reference count.
    pub data: &'a [u8],
    pub start: Tid,
    pub end: Option<Tid>,
}

/// An entry of `history`.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub tid: Tid,
    pub size: usize,
    pub meta: Arc<TxnMeta>,
}

/// Receives what a commit changed. Called inside the storage's write lock,
/// so implementations must only enqueue (never block).
pub trait Subscriber: Send + Sync {
    fn invalidate(&self, tid: Tid, oids: &[Oid]);
    fn info(&self, length: usize, size: usize);
}

/// The state behind the storage's read/write lock.
pub struct StorageState {
    objects: ShardedOidMap<Object>,
    /// The tid of the start-up transaction (the root's first revision):
    /// no other object of this run has a revision at or before it.
    first_tid: Tid,
    last_tid: Tid,
    /// Newest first: `(tid, oids)`; `None` oids is the start-up sentinel.
    invalidations: VecDeque<(Tid, Option<Vec<Oid>>)>,
    subscribers: Vec<(ConnId, Arc<dyn Subscriber>)>,
    /// Bytes of all retained records (current and non-current).
    bytes: usize,
    /// Bytes of current records only (what `getSize` reports).
    current_bytes: usize,
    revisions: usize,
    /// Everything the storage is accounted for: records, references and
    /// the per-revision and per-object overheads. The memory limit applies
    /// to this figure.
    accounted: usize,
    /// Retained revisions whose record could not be scanned; while there
    /// are any, the collector frees nothing.
    unscannable: usize,
    /// Non-current revisions in the order they stopped being current:
    /// `(tid of the revision that replaced it, oid)`. Commits append in tid
    /// order, so pruning pops from the front and never scans all objects.
    replaced: VecDeque<(Tid, Oid)>,
    /// Every non-current revision replaced at or before this tid may have
    /// been dropped by memory pressure, which drops history inside the
    /// retention window: a snapshot at or before it may miss an object that
    /// existed then, which is answered as a retryable conflict, never
    /// POSKeyError (`missing_may_be_gone`). (`pack(t)` drops history on an
    /// operator's request: an object it freed is POSKeyError at a snapshot
    /// before `t`, as with the stock storages after a pack and as ZODB's
    /// own pack tests expect.)
    history_dropped_until: Tid,
    /// Counts what can turn objects into garbage: commits and dropped
    /// history.
    changes: u64,
    /// `changes` when the last collection under memory pressure started:
    /// while it is unchanged, another one cannot free anything more, and a
    /// vote that still does not fit fails at once instead of running a
    /// whole cycle again.
    pressure_collected_at: Option<u64>,
    /// The storage's clock (a copy of `Storage::clock`), for retention.
    clock: Clock,
    limits: StorageLimits,
    gc: gc::GcState,
    /// Objects and bytes of the current revisions, by class.
    classes: ClassTable,
}

/// The settings of one storage.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageLimits {
    /// How long a replaced revision stays readable.
    pub retention: Duration,
    /// Recent transactions remembered for `getInvalidations`.
    pub invalidation_queue_size: usize,
    /// The process's memory budget, shared by all its storages (a
    /// storage of its own, unlimited, by default).
    pub memory: Arc<MemoryBudget>,
    /// How long the collector holds the storage lock at a time
    /// (`gc-hold-budget`).
    pub gc_hold_budget: Duration,
}

impl Default for StorageLimits {
    fn default() -> StorageLimits {
        StorageLimits {
            retention: Duration::from_secs(crate::config::DEFAULT_HISTORY_RETENTION_SECS),
            invalidation_queue_size: crate::config::DEFAULT_INVALIDATION_QUEUE_SIZE,
            memory: MemoryBudget::new(None),
            gc_hold_budget: Duration::from_millis(crate::config::DEFAULT_GC_HOLD_BUDGET_MS),
        }
    }
}

pub struct Storage {
    name: String,
    state: RwLock<StorageState>,
    lock: Mutex<commit::CommitLock>,
    next_oid: AtomicU64,
    /// One collection at a time (background cycle, pack, memory pressure).
    collecting: Mutex<()>,
    /// Commits since the last collection; the background collector skips
    /// a storage that did not change.
    dirty: AtomicU64,
    /// Tids, the oid line and retention go by this, never by the system
    /// clock, which may step during a run.
    clock: Clock,
    oids_ahead_logged: std::sync::atomic::AtomicBool,
    pub stats: Stats,
    pub gc_stats: gc::GcStats,
    /// Called by a collection cycle between two of its lock holds: tests
    /// commit there to interleave with the collector deterministically.
    #[cfg(test)]
    gc_hook: Mutex<Option<gc::GcHook>>,
}

impl Storage {
    /// A new storage whose clock starts at `start` (normally `Tid::now()`),
    /// holding only the empty root object.
    pub fn new(name: &str, start: Tid, limits: StorageLimits) -> Storage {
        let clock = Clock::starting_at(start);
        let meta = Arc::new(TxnMeta {
            user: Bytes::new(),
            description: Bytes::from_static(b"initial database creation (zeotemp start-up)"),
            extension: Value::Dict(Vec::new()),
        });
        let root = Revision {
            tid: start,
            data: Some(Box::from(EMPTY_ROOT_RECORD)),
            refs: Some(Box::new([])),
            meta,
        };
        let accounted = root.accounted() + OBJECT_OVERHEAD;
        limits.memory.add(accounted);
        let mut classes = ClassTable::default();
        let root_class = classes.intern(refs::class_name(EMPTY_ROOT_RECORD).as_deref());
        classes.add(root_class, EMPTY_ROOT_RECORD.len());
        let mut objects = ShardedOidMap::default();
        objects.insert(
            Oid::ROOT,
            Object {
                revisions: revisions::Revisions::One(root),
                class: root_class,
                ..Object::default()
            },
        );
        let mut invalidations = VecDeque::new();
        invalidations.push_front((start, None));
        Storage {
            name: name.to_string(),
            state: RwLock::new(StorageState {
                objects,
                first_tid: start,
                last_tid: start,
                invalidations,
                subscribers: Vec::new(),
                bytes: EMPTY_ROOT_RECORD.len(),
                current_bytes: EMPTY_ROOT_RECORD.len(),
                revisions: 1,
                accounted,
                unscannable: 0,
                replaced: VecDeque::new(),
                history_dropped_until: Tid::ZERO,
                changes: 0,
                pressure_collected_at: None,
                clock,
                limits: StorageLimits {
                    invalidation_queue_size: limits.invalidation_queue_size.max(1),
                    ..limits
                },
                gc: gc::GcState::default(),
                classes,
            }),
            lock: Mutex::new(commit::CommitLock::default()),
            // Oids are drawn from the TimeStamp line (see `new_oids`).
            next_oid: AtomicU64::new(start.0.max(1)),
            collecting: Mutex::new(()),
            dirty: AtomicU64::new(0),
            clock,
            oids_ahead_logged: Default::default(),
            stats: Stats::default(),
            gc_stats: gc::GcStats::default(),
            #[cfg(test)]
            gc_hook: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shared access for loads. Keep the guard while enqueueing the reply.
    pub fn read(&self) -> RwLockReadGuard<'_, StorageState> {
        // The state is only mutated in short sections that do not panic
        // half-way on any input (the session validates first), so a
        // poisoned lock still guards consistent data.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, StorageState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `loadBefore(oid, tid)` (see [`StorageState::load_before`]), counted.
    /// `then` gets the answer while the read lock is held: a reply enqueued
    /// there reaches the client before the invalidation of any later commit.
    pub fn load_before<R>(
        &self,
        oid: Oid,
        tid: Tid,
        then: impl FnOnce(Result<Option<Loaded<'_>>, StorageError>) -> R,
    ) -> R {
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        then(self.read().load_before(oid, tid))
    }

    /// `loadSerial(oid, serial)` (see [`StorageState::load_serial`]),
    /// counted.
    pub fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes, StorageError> {
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        self.read().load_serial(oid, serial)
    }

    /// Hands out `n` (1..=100) new oids.
    ///
    /// Oids come from a counter that starts at the storage's start-up tid
    /// and stays below its clock's TimeStamp (about 71 million oids per
    /// second of uptime, far beyond what connections can ask for). A later
    /// run starts at a later TimeStamp, hence above every oid an earlier run
    /// handed out, as long as the system clock was not stepped back across
    /// the restart (README, "Restarts and the clock").
    pub fn new_oids(&self, n: i64) -> Result<Vec<Oid>, StorageError> {
        let n = n.clamp(1, MAX_NEW_OIDS) as u64;
        let first = self.next_oid.fetch_add(n, Ordering::Relaxed);
        // The storage's clock (not the system clock, which may step back)
        // gains about 71.6 TimeStamp units per microsecond: outrunning it
        // takes over 700,000 calls a second, far beyond what connections
        // can send. Nothing waits for it, and no oid is refused; should the
        // counter ever be well ahead (by more than OIDS_AHEAD_WARNING, so
        // that rounding at start-up is not taken for it), it is said once.
        if first + n > self.clock.now().0 + OIDS_AHEAD_WARNING
            && !self.oids_ahead_logged.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(storage = %self.name, "oid allocation ran ahead of the clock: a restart within the next seconds might hand out oids again");
        }
        Ok((first..first + n).map(Oid).collect())
    }

    /// Adds a subscriber and returns the last tid, atomically with respect
    /// to commits: every commit after the returned tid reaches `sub`.
    /// `then` runs inside the same locked section (to enqueue the reply).
    pub fn subscribe<R>(
        &self,
        id: ConnId,
        sub: Arc<dyn Subscriber>,
        then: impl FnOnce(Tid) -> R,
    ) -> R {
        let mut st = self.write();
        st.subscribers.push((id, sub));
        let last = st.last_tid;
        then(last)
    }

    pub fn unsubscribe(&self, id: ConnId) {
        self.write().subscribers.retain(|(sid, _)| *sid != id);
    }

    /// `pack(t)`: drops every non-current revision older than `t`
    /// (keeping, for each object, the newest revision at or before `t`),
    /// then frees what is unreachable and was last written before `t`.
    /// Tells every subscriber the new size, like ZEO does after a pack.
    pub fn pack(&self, t: Tid) -> PackReport {
        let started = std::time::Instant::now();
        let mut st = self.write();
        let held = std::time::Instant::now();
        let pruned_revisions = st.prune_until(t);
        drop(st);
        let prune_hold = held.elapsed();
        let gc = self.collect(t);
        let st = self.read();
        let (objects, bytes) = (st.objects.len(), st.current_bytes);
        for (_, sub) in &st.subscribers {
            sub.info(objects, bytes);
        }
        PackReport {
            pruned_revisions,
            prune_hold,
            gc,
            objects,
            bytes,
            took: started.elapsed(),
        }
    }

    /// The oldest tid still inside the retention window: revisions replaced
    /// before it, and unreachable objects last written before it, may go.
    pub fn retention_cutoff(&self) -> Tid {
        self.read().retention_cutoff()
    }

    /// Drops non-current revisions replaced more than the retention window
    /// ago. Run periodically by the server.
    pub fn prune_expired(&self) -> usize {
        let cutoff = self.retention_cutoff();
        self.write().prune_until(Tid(cutoff.0.saturating_sub(1)))
    }
}

impl StorageState {
    /// See [`Storage::retention_cutoff`].
    pub fn retention_cutoff(&self) -> Tid {
        let secs = self.clock.unix_secs() - self.limits.retention.as_secs_f64();
        if secs > 0.0 {
            Tid::from_unix_time(secs)
        } else {
            Tid::ZERO
        }
    }

    pub fn last_tid(&self) -> Tid {
        self.last_tid
    }

    /// Number of objects (`len(storage)`), including deleted ones that still
    /// have retained history.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Bytes of the current records (`getSize`).
    pub fn size(&self) -> usize {
        self.current_bytes
    }

    /// Connections registered on this storage.
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// (revisions, bytes) of everything retained.
    pub fn retained(&self) -> (usize, usize) {
        (self.revisions, self.bytes)
    }

    fn current_tid(&self, oid: Oid) -> Option<Tid> {
        let rev = self.objects.get(&oid)?.revisions.last()?;
        rev.data.as_ref().map(|_| rev.tid)
    }

    /// `loadBefore(oid, tid)`: the revision current just before `tid`.
    ///
    /// * `Ok(Some(..))`: data, its tid, and the tid that replaced it (or None
    ///   if it is current);
    /// * `Ok(None)`: the object has no revision before `tid` (created later,
    ///   or that revision is past retention); ZODB raises ReadConflictError;
    /// * `Err(PosKey)`: no such object, or it was deleted as of `tid`
    ///   (except where a missing object may have existed and be gone: then
    ///   `Ok(None)`, see `missing_may_be_gone`).
    pub fn load_before(&self, oid: Oid, tid: Tid) -> Result<Option<Loaded<'_>>, StorageError> {
        let Some(obj) = self.objects.get(&oid) else {
            if self.missing_may_be_gone(oid, tid) {
                return Ok(None);
            }
            return Err(StorageError::PosKey { oid, serial: None });
        };
        let revs = &obj.revisions;
        // Index of the first revision with rev.tid >= tid.
        let i = revs.partition_point(|r| r.tid < tid);
        if i == 0 {
            return Ok(None);
        }
        let rev = &revs[i - 1];
        match &rev.data {
            Some(data) => Ok(Some(Loaded {
                data,

                start: rev.tid,
                end: revs.get(i).map(|r| r.tid),
            })),
            None => Err(StorageError::PosKey { oid, serial: None }),
        }
    }

    /// Whether a read at snapshot `tid` of an object this storage does not
    /// have may be of one that existed and is gone (answered with a
    /// retryable conflict, never POSKeyError), rather than of one that never
    /// existed (POSKeyError, as the stock server answers):
    /// * a snapshot older than the retention window, or than history that
    ///   memory pressure dropped early, may reach an object the collector
    ///   has freed since; a later one cannot (the collector keeps what any
    ///   retained revision of a reachable object references);
    /// * a snapshot from before this run's first transaction (a request in
    ///   flight across a restart) may reach an object of the earlier run,
    ///   but not one with an oid of this run's range: that one was never
    ///   stored (e.g. `loadBefore(new_oid(), z64)`).
    fn missing_may_be_gone(&self, oid: Oid, tid: Tid) -> bool {
        if tid <= self.first_tid {
            oid.0 < self.first_tid.0
        } else {
            tid <= self.retention_cutoff().max(self.history_dropped_until)
        }
    }

    /// `loadSerial(oid, serial)`: exactly that revision. A revision that
    /// retention already dropped is a ConflictError (ZODB retries the
    /// transaction), one that never existed a POSKeyError.
    pub fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes, StorageError> {
        let missing = StorageError::PosKey {
            oid,
            serial: Some(serial),
        };
        let Some(obj) = self.objects.get(&oid) else {
            if serial < Tid::MAX && self.missing_may_be_gone(oid, Tid(serial.0 + 1)) {
                return Err(StorageError::Conflict {
                    oid,
                    committed: Tid::ZERO,
                    read: serial,
                    class_name: None,
                    reason: Some(GONE.into()),
                });
            }
            return Err(missing);
        };
        let revs = &obj.revisions;
        match revs.binary_search_by(|r| r.tid.cmp(&serial)) {
            Ok(i) => revs[i]
                .data
                .as_deref()
                .map(Bytes::copy_from_slice)
                .ok_or(missing),
            Err(0) if obj.pruned => Err(StorageError::Conflict {
                oid,
                committed: revs.last().map(|r| r.tid).unwrap_or(Tid::ZERO),
                read: serial,
                class_name: None,
                reason: Some(
                    "that revision is no longer kept (older than history-retention, or \
                     dropped to stay under memory-limit)"
                        .into(),
                ),
            }),
            Err(_) => Err(missing),
        }
    }

    /// The current tid of an object (`getTid`).
    pub fn get_tid(&self, oid: Oid) -> Result<Tid, StorageError> {
        self.current_tid(oid)
            .ok_or(StorageError::PosKey { oid, serial: None })
    }

    /// `history(oid, size)`: up to `size` revisions, newest first.
    pub fn history(&self, oid: Oid, size: usize) -> Result<Vec<HistoryEntry>, StorageError> {
        let obj = self
            .objects
            .get(&oid)
            .ok_or(StorageError::PosKey { oid, serial: None })?;
        if obj.revisions.last().is_some_and(|r| r.data.is_none()) {
            return Err(StorageError::PosKey { oid, serial: None });
        }
        Ok(obj
            .revisions
            .iter()
            .rev()
            .filter_map(|r| {
                r.data.as_ref().map(|d| HistoryEntry {
                    tid: r.tid,
                    size: d.len(),
                    meta: r.meta.clone(),
                })
            })
            .take(size.max(1))
            .collect())
    }

    /// `getInvalidations(tid)`: `(newest tid, oids changed after tid)` if
    /// the queue reaches back to `tid`, else None (the client then drops its
    /// whole cache, as it must after a restart of this server).
    pub fn invalidations_since(&self, tid: Tid) -> Option<(Tid, Vec<Oid>)> {
        let oldest = self.invalidations.back()?;
        if oldest.0 > tid {
            return None;
        }
        let mut oids: Vec<Oid> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (t, list) in &self.invalidations {
            if *t <= tid {
                break;
            }
            for oid in list.iter().flatten() {
                if seen.insert(*oid) {
                    oids.push(*oid);
                }
            }
        }
        Some((self.invalidations.front()?.0, oids))
    }

    /// Adds `rev` as `oid`'s current revision; `class` is its record's
    /// class (unused for a deletion).
    fn put_revision(&mut self, oid: Oid, rev: Revision, class: ClassId) {
        self.count_in(&rev);
        let new_record = rev.data.as_ref().map(|d| d.len());
        let new_len = new_record.unwrap_or(0);
        let (obj, created) = self.objects.get_or_insert_with(oid, Object::default);
        let old_record = obj
            .revisions
            .last()
            .and_then(|r| r.data.as_ref())
            .map(|d| d.len());
        if let Some(len) = old_record {
            self.classes.remove(obj.class, len);
        }
        if let Some(len) = new_record {
            self.classes.add(class, len);
        }
        obj.class = class;
        if !obj.revisions.is_empty() {
            self.replaced.push_back((rev.tid, oid));
        }
        obj.revisions.push(rev);
        self.current_bytes = self.current_bytes + new_len - old_record.unwrap_or(0);
        if created {
            self.account_in(OBJECT_OVERHEAD);
        }
    }

    /// `bytes` more accounted, here and in the process's budget.
    fn account_in(&mut self, bytes: usize) {
        self.accounted += bytes;
        self.limits.memory.add(bytes);
    }

    /// `bytes` fewer accounted, here and in the process's budget.
    fn account_out(&mut self, bytes: usize) {
        self.accounted -= bytes;
        self.limits.memory.sub(bytes);
    }

    /// Accounts for a revision that is now retained.
    fn count_in(&mut self, rev: &Revision) {
        self.revisions += 1;
        self.bytes += rev.data.as_ref().map_or(0, |d| d.len());
        self.account_in(rev.accounted());
        if rev.refs.is_none() {
            self.unscannable += 1;
        }
    }

    /// Accounts for a revision that is no longer retained.
    fn count_out(&mut self, rev: &Revision) {
        self.revisions -= 1;
        self.bytes -= rev.data.as_ref().map_or(0, |d| d.len());
        self.account_out(rev.accounted());
        if rev.refs.is_none() {
            self.unscannable -= 1;
        }
    }

    /// Removes a whole object (the collector found it unreachable, or its
    /// only remaining revision is a deletion) and returns it, so that the
    /// caller can free its memory after releasing the lock.
    fn take_object(&mut self, oid: Oid) -> Option<Object> {
        let obj = self.objects.remove(&oid)?;
        if let Some(record) = obj.revisions.last().and_then(|r| r.data.as_ref()) {
            self.current_bytes -= record.len();
            self.classes.remove(obj.class, record.len());
        }
        for rev in &obj.revisions {
            self.count_out(rev);
        }
        self.account_out(OBJECT_OVERHEAD);
        Some(obj)
    }

    /// Drops every non-current revision that was replaced at or before
    /// `t`. Never drops a current revision. An object whose only remaining
    /// revision is a deletion is removed. Returns the revisions dropped.
    /// Costs O(revisions dropped), not O(objects).
    fn prune_until(&mut self, t: Tid) -> usize {
        let mut dropped_revs = Vec::new();
        let mut gone = Vec::new();
        while let Some(&(replaced_at, oid)) = self.replaced.front() {
            if replaced_at > t {
                break;
            }
            self.replaced.pop_front();
            // Gone already (collected), or pruned with an earlier entry.
            let Some(obj) = self.objects.get_mut(&oid) else {
                continue;
            };
            let revs = &mut obj.revisions;
            let k = revs.partition_point(|r| r.tid <= t).saturating_sub(1);
            if k > 0 {
                dropped_revs.extend(revs.drain_oldest(k));
                obj.pruned = true;
            }
            if revs.len() == 1 && revs[0].data.is_none() && oid != Oid::ROOT {
                gone.push(oid);
            }
        }
        let mut dropped = dropped_revs.len();
        if dropped > 0 {
            self.changes += 1;
        }
        for rev in &dropped_revs {
            self.count_out(rev);
        }
        for oid in gone {
            if self.take_object(oid).is_some() {
                dropped += 1;
            }
        }
        dropped
    }

    /// Under memory pressure: drops the oldest non-current revisions until
    /// at least `need` accounted bytes are freed (or no history is left).
    fn drop_oldest_history(&mut self, need: usize) -> usize {
        let mut freed = 0;
        let mut cutoff = None;
        for &(replaced_at, oid) in &self.replaced {
            cutoff = Some(replaced_at);
            let Some(obj) = self.objects.get(&oid) else {
                continue;
            };
            // The revision that `replaced_at` replaced.
            let i = obj.revisions.partition_point(|r| r.tid < replaced_at);
            if i > 0 && obj.revisions.get(i).is_some_and(|r| r.tid == replaced_at) {
                freed += obj.revisions[i - 1].accounted();
            }
            if freed >= need {
                break;
            }
        }
        let Some(t) = cutoff else { return 0 };
        self.history_dropped_until = self.history_dropped_until.max(t);
        self.prune_until(t)
    }

    /// Accounted bytes (records, references and overheads).
    pub fn accounted(&self) -> usize {
        self.accounted
    }

    /// Retained revisions whose record could not be scanned.
    pub fn unscannable(&self) -> usize {
        self.unscannable
    }

    /// The process's memory budget (shared by all storages).
    pub fn memory(&self) -> &MemoryBudget {
        &self.limits.memory
    }

    /// Every class that counts an object now (current revisions), unsorted:
    /// take it under the lock, rank it with [`classes::top`] after.
    pub fn class_rows(&self) -> Vec<ClassRow> {
        self.classes.rows()
    }
}

/// A storage that goes gives its accounted bytes back to the budget it
/// shares with the others.
impl Drop for StorageState {
    fn drop(&mut self) {
        self.limits.memory.sub(self.accounted);
    }
}

/// What a `pack` did, for its log line (`Display` is that line's tail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackReport {
    /// Old revisions dropped (and objects whose last revision was a delete).
    pub pruned_revisions: usize,
    /// How long dropping them held the storage's write lock.
    pub prune_hold: Duration,
    /// The collection that followed.
    pub gc: GcOutcome,
    /// Objects and current bytes left.
    pub objects: usize,
    pub bytes: usize,
    pub took: Duration,
}

impl std::fmt::Display for PackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dropped {} old revisions; {}; {} objects, {} bytes left; took {:.1} ms",
            self.pruned_revisions,
            self.gc,
            self.objects,
            self.bytes,
            self.took.as_secs_f64() * 1e3
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn storage() -> Storage {
        Storage::new("1", Tid::now(), StorageLimits::default())
    }

    fn limits(retention_secs: u64, invalidation_queue_size: usize) -> StorageLimits {
        StorageLimits {
            retention: Duration::from_secs(retention_secs),
            invalidation_queue_size,
            memory: MemoryBudget::new(None),
            gc_hold_budget: Duration::from_millis(crate::config::DEFAULT_GC_HOLD_BUDGET_MS),
        }
    }

    pub(super) fn commit(s: &Storage, ops: Vec<TxnOp>) -> Tid {
        assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
        let voted = s.vote(&ops).unwrap().into_result().unwrap();
        let meta = TxnMeta {
            user: Bytes::new(),
            description: Bytes::new(),
            extension: Value::None,
        };
        let tid = s.finish(1, voted, meta, |tid, _, _| tid);
        s.unlock(1);
        tid
    }

    pub(super) fn store(oid: u64, serial: Tid, data: &'static [u8]) -> TxnOp {
        TxnOp::store(Oid(oid), serial, Bytes::from_static(data))
    }

    #[test]
    fn root_exists_at_start() {
        let s = storage();
        let st = s.read();
        let root = st.load_before(Oid::ROOT, Tid::MAX).unwrap().unwrap();
        assert_eq!(root.data, EMPTY_ROOT_RECORD);
        assert_eq!(root.start, st.last_tid());
        assert_eq!(root.end, None);
        assert_eq!(
            refs::class_name(root.data).as_deref(),
            Some("persistent.mapping.PersistentMapping")
        );
    }

    #[test]
    fn tids_grow_and_start_from_clock() {
        let before = Tid::now();
        let s = storage();
        let start = s.read().last_tid();
        assert!(start >= before);
        let t1 = commit(&s, vec![store(10, Tid::ZERO, b"a")]);
        let t2 = commit(&s, vec![store(10, t1, b"b")]);
        assert!(start < t1 && t1 < t2);
        // A restart a moment later starts later than any tid this run
        // reached (its clock ran with the wall clock).
        std::thread::sleep(Duration::from_millis(2));
        let s2 = Storage::new("1", Tid::now(), limits(1, 1));
        assert!(s2.read().last_tid() > t2);
    }

    #[test]
    fn oids_unique_and_above_earlier_runs() {
        let s = storage();
        let a = s.new_oids(100).unwrap();
        let b = s.new_oids(0).unwrap();
        assert_eq!(a.len(), 100);
        assert_eq!(b.len(), 1);
        let mut all: Vec<_> = a.iter().chain(b.iter()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 101);
        assert!(!all.contains(&&Oid::ROOT));
        assert_eq!(s.new_oids(1_000_000).unwrap().len(), 100);
        // A later run starts above everything this one handed out.
        let last = *s.new_oids(1).unwrap().last().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let s2 = Storage::new("1", Tid::now(), limits(1, 1));
        assert!(s2.new_oids(1).unwrap()[0] > last);
    }

    #[test]
    fn mvcc_load_before() {
        let s = storage();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        let t2 = commit(&s, vec![store(5, t1, b"two")]);
        let st = s.read();
        let cur = st.load_before(Oid(5), Tid::MAX).unwrap().unwrap();
        assert_eq!((cur.data, cur.start, cur.end), (&b"two"[..], t2, None));
        let old = st.load_before(Oid(5), t2).unwrap().unwrap();
        assert_eq!((old.data, old.start, old.end), (&b"one"[..], t1, Some(t2)));
        // Before the object existed: None (ZODB: ReadConflictError).
        assert_eq!(st.load_before(Oid(5), t1).unwrap(), None);
        assert_eq!(
            st.load_before(Oid(6), Tid::MAX).unwrap_err(),
            StorageError::PosKey {
                oid: Oid(6),
                serial: None
            }
        );
        assert_eq!(&st.load_serial(Oid(5), t1).unwrap()[..], b"one");
        assert!(matches!(
            st.load_serial(Oid(5), Tid(t1.0 + 1)),
            Err(StorageError::PosKey { .. })
        ));
    }

    #[test]
    fn delete_object() {
        let s = storage();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        let t2 = commit(
            &s,
            vec![TxnOp::Delete {
                oid: Oid(5),
                serial: t1,
            }],
        );
        let st = s.read();
        assert!(matches!(
            st.load_before(Oid(5), Tid::MAX),
            Err(StorageError::PosKey { .. })
        ));
        // An older snapshot still reads it.
        assert_eq!(st.load_before(Oid(5), t2).unwrap().unwrap().data, b"one");
    }

    #[test]
    fn invalidations_reach_other_subscribers_in_order() {
        #[derive(Default)]
        struct Rec(Mutex<Vec<(Tid, Vec<Oid>)>>);
        impl Subscriber for Rec {
            fn invalidate(&self, tid: Tid, oids: &[Oid]) {
                self.0.lock().unwrap().push((tid, oids.to_vec()));
            }
            fn info(&self, _: usize, _: usize) {}
        }
        let s = storage();
        let me = Arc::new(Rec::default());
        let other = Arc::new(Rec::default());
        let start = s.subscribe(1, me.clone(), |t| t);
        s.subscribe(2, other.clone(), |_| ());
        let t1 = commit(
            &s,
            vec![store(5, Tid::ZERO, b"one"), store(6, Tid::ZERO, b"x")],
        );
        let t2 = commit(&s, vec![store(5, t1, b"two")]);
        assert!(
            me.0.lock().unwrap().is_empty(),
            "the committer learns from its reply"
        );
        assert_eq!(
            *other.0.lock().unwrap(),
            vec![(t1, vec![Oid(5), Oid(6)]), (t2, vec![Oid(5)])]
        );
        let st = s.read();
        assert_eq!(st.invalidations_since(t1), Some((t2, vec![Oid(5)])));
        assert_eq!(st.invalidations_since(t2), Some((t2, vec![])));
        assert_eq!(st.invalidations_since(start).unwrap().1.len(), 2);
        // Older than the start-up sentinel (a cache from before a restart).
        assert_eq!(st.invalidations_since(Tid(start.0 - 1)), None);
        drop(st);
        s.unsubscribe(2);
        commit(&s, vec![store(5, t2, b"three")]);
        assert_eq!(other.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn invalidation_queue_is_bounded() {
        let s = Storage::new("1", Tid::now(), limits(600, 2));
        let start = s.read().last_tid();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"a")]);
        let t2 = commit(&s, vec![store(5, t1, b"b")]);
        let st = s.read();
        assert_eq!(st.invalidations_since(start), None, "sentinel fell off");
        assert_eq!(st.invalidations_since(t1), Some((t2, vec![Oid(5)])));
    }

    #[test]
    fn retention_keeps_current_and_turns_lost_revisions_into_conflicts() {
        let s = storage();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        let t2 = commit(&s, vec![store(5, t1, b"two")]);
        let t3 = commit(&s, vec![store(7, Tid::ZERO, b"other")]);
        // pack's history step (pack itself would also free these unlinked
        // objects; see gc.rs for that).
        s.write().prune_until(Tid(t3.0 + 1));
        let st = s.read();
        // Current revisions are all there.
        assert_eq!(
            st.load_before(Oid(5), Tid::MAX).unwrap().unwrap().data,
            b"two"
        );
        assert_eq!(
            st.load_before(Oid(7), Tid::MAX).unwrap().unwrap().data,
            b"other"
        );
        // The dropped one: loadBefore gives None (ReadConflictError),
        // loadSerial a ConflictError, never POSKeyError.
        assert_eq!(st.load_before(Oid(5), t2).unwrap(), None);
        assert!(matches!(
            st.load_serial(Oid(5), t1),
            Err(StorageError::Conflict { .. })
        ));
        assert_eq!(st.retained().0, 3, "root + current of 5 + 7");
        // A snapshot older than the retention window asking for an object
        // that is gone (freed) gets None too; a recent one POSKeyError.
        drop(st);
        let s = Storage::new("1", Tid::now(), limits(0, 100));
        std::thread::sleep(Duration::from_millis(2));
        let old = Tid(s.read().last_tid().0 + 1);
        let st = s.read();
        assert_eq!(st.load_before(Oid(99), old).unwrap(), None);
        assert!(matches!(
            st.load_serial(Oid(99), Tid(old.0 - 1)),
            Err(StorageError::Conflict { .. })
        ));
        assert!(matches!(
            st.load_before(Oid(99), Tid::MAX),
            Err(StorageError::PosKey { .. })
        ));
    }

    #[test]
    fn missing_objects_at_snapshots_before_this_run() {
        // Retention long enough that only the start-up rule applies.
        let s = Storage::new("1", Tid::now(), limits(3600, 100));
        let st = s.read();
        let first = st.last_tid();
        let new_oid = s.new_oids(1).unwrap()[0];
        // An oid of this run, never stored: POSKeyError at z64 and at the
        // first tid, as the stock server answers (testLoadBeforeEdges).
        for tid in [Tid::ZERO, first] {
            assert!(matches!(
                st.load_before(new_oid, tid),
                Err(StorageError::PosKey { .. })
            ));
        }
        assert!(matches!(
            st.load_serial(new_oid, Tid(first.0 - 1)),
            Err(StorageError::PosKey { .. })
        ));
        // An oid below this run's range, read at a snapshot from before the
        // run (a request in flight across a restart): it may have existed,
        // so ReadConflictError / ConflictError, and the request is retried.
        let old_oid = Oid(first.0 - 1000);
        assert_eq!(st.load_before(old_oid, Tid(first.0 - 5)).unwrap(), None);
        assert!(matches!(
            st.load_serial(old_oid, Tid(first.0 - 5)),
            Err(StorageError::Conflict { .. })
        ));
        // The same oid read at a snapshot of this run inside the retention
        // window: it cannot have been freed, so it never existed.
        assert!(matches!(
            st.load_before(old_oid, Tid::MAX),
            Err(StorageError::PosKey { .. })
        ));
    }

    #[test]
    fn expired_revisions_pruned_by_age() {
        let s = Storage::new("1", Tid::now(), limits(0, 100));
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        commit(&s, vec![store(5, t1, b"two")]);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.prune_expired(), 1);
        let s = storage();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        commit(&s, vec![store(5, t1, b"two")]);
        assert_eq!(s.prune_expired(), 0, "inside the window");
    }

    /// A record of class `module.name` (protocol 3), `size` bytes long.
    pub(super) fn record_of(class: &str, size: usize) -> Bytes {
        let (module, name) = class.rsplit_once('.').unwrap();
        let mut r = b"\x80\x03c".to_vec();
        r.extend_from_slice(format!("{module}\n{name}\nq\x00.").as_bytes());
        r.extend_from_slice(b"\x80\x03C");
        let state = size.checked_sub(r.len() + 4).expect("size too small");
        assert!(state < 256);
        r.push(state as u8);
        r.extend(std::iter::repeat_n(b's', state));
        r.extend_from_slice(b"q\x01.");
        assert_eq!(r.len(), size);
        Bytes::from(r)
    }

    /// The class table as `(class, objects, bytes)`, by name.
    pub(super) fn classes(s: &Storage) -> Vec<(String, u64, u64)> {
        let st = s.read();
        let mut rows: Vec<_> = st
            .class_rows()
            .into_iter()
            .map(|r| (r.class.to_string(), r.objects, r.bytes))
            .collect();
        rows.sort();
        // Sums: every object with a current record, at its length.
        let live = st
            .objects
            .values()
            .filter(|o| o.revisions.last().is_some_and(|r| r.data.is_some()))
            .count() as u64;
        assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), live);
        assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), st.size() as u64);
        rows
    }

    #[test]
    fn class_table_follows_stores_replacements_and_deletions() {
        const PM: &str = "persistent.mapping.PersistentMapping";
        const TREE: &str = "BTrees.OOBTree.OOBTree";
        let s = storage();
        let root = EMPTY_ROOT_RECORD.len() as u64;
        assert_eq!(classes(&s), [(PM.into(), 1, root)]);
        let put = |oid, serial, class, size| TxnOp::store(Oid(oid), serial, record_of(class, size));
        let t1 = commit(
            &s,
            vec![
                put(5, Tid::ZERO, PM, 100),
                put(6, Tid::ZERO, PM, 120),
                put(7, Tid::ZERO, TREE, 60),
                store(8, Tid::ZERO, b"not a pickle"),
            ],
        );
        assert_eq!(
            classes(&s),
            [
                ("(unknown)".into(), 1, 12),
                (TREE.into(), 1, 60),
                (PM.into(), 3, root + 220),
            ]
        );
        // Replaced by a bigger record of the same class, and by one of
        // another class: counted once, at the current record.
        let t2 = commit(
            &s,
            vec![put(5, t1, PM, 150), put(6, t1, "my.app.Session", 90)],
        );
        assert_eq!(
            classes(&s),
            [
                ("(unknown)".into(), 1, 12),
                (TREE.into(), 1, 60),
                ("my.app.Session".into(), 1, 90),
                (PM.into(), 2, root + 150),
            ]
        );
        // A deletion takes the object out; history does not count.
        commit(
            &s,
            vec![
                TxnOp::Delete {
                    oid: Oid(6),
                    serial: t2,
                },
                TxnOp::Delete {
                    oid: Oid(8),
                    serial: t1,
                },
            ],
        );
        assert_eq!(
            classes(&s),
            [(TREE.into(), 1, 60), (PM.into(), 2, root + 150)]
        );
        // Pruning the history changes nothing.
        s.write().prune_until(Tid::MAX);
        assert_eq!(
            classes(&s),
            [(TREE.into(), 1, 60), (PM.into(), 2, root + 150)]
        );
    }

    #[test]
    fn sizes_tracked() {
        let s = storage();
        let base = s.read().size();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"12345")]);
        assert_eq!(s.read().size(), base + 5);
        commit(&s, vec![store(5, t1, b"12")]);
        let st = s.read();
        assert_eq!(st.size(), base + 2);
        assert_eq!(st.retained().1, base + 7);
        assert_eq!(st.len(), 2);
    }
}
