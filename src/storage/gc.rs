//! The garbage collector: frees objects unreachable from the root, cycles
//! included, without stopping loads and with only short pauses for commits.
//!
//! Reachability is over *retained* revisions: marking starts at the root
//! and follows the references of every retained revision (current, and
//! non-current inside the retention window) of every reached object. So an
//! object is freed only when no retained revision of any reachable object
//! refers to it, and a client working on an older snapshot can still load
//! everything it could reach from that snapshot.
//!
//! A cycle:
//! 1. *start* (write lock, brief): a new mark epoch; the root is marked;
//!    the commit barrier is switched on;
//! 2. *mark* (read lock, released in between so commits go on): mark the
//!    objects written since the cutoff, going through the object map a few
//!    shards at a time; then pop a reached object, mark what its revisions
//!    reference. Marks are atomics, so loads run beside this;
//! 3. *find candidates* (read lock, a few shards at a time): objects not
//!    marked (those created since the start are marked by the barrier);
//! 4. *condemn* (write lock, brief): finish marking what commits shaded
//!    since and what the voted transaction pinned; every object still
//!    unmarked is now condemned;
//! 5. *free* (write lock, released in between so commits go on): free the
//!    condemned candidates.
//!
//! Phases 2, 3 and 5 hold the lock for about the hold budget at a time
//! (`gc-hold-budget`, [`crate::config::DEFAULT_GC_HOLD_BUDGET_MS`]), then
//! release it and take it again.
//!
//! The commit barrier (`finish` during a cycle) marks every written object
//! and shades every object its new revisions reference, so an edge added
//! while marking is never missed; objects created during the cycle are
//! never candidates. Removing an edge only ever keeps more than needed.
//!
//! Condemnation is final. A condemned object that is not freed yet may
//! reference one that an earlier chunk freed (a garbage cycle is freed a
//! chunk at a time): linking it again would bring back a dangling
//! reference, and every later snapshot would get POSKeyError for what it
//! references. So until the cycle ends a vote treats a condemned object as
//! gone (a ConflictError, as if the chunk that frees it had run already),
//! and what a transaction voted before condemnation writes or references
//! is pinned, hence marked at condemnation. After it a commit can only link
//! marked or new objects: marking is complete, and no commit needs to be
//! traversed any more.
//!
//! A record that looks like a pickle but cannot be scanned has unknown
//! references: when marking reaches an object with such a retained
//! revision, or the voted transaction writes one, a cycle frees nothing
//! (and logs the oids). An unreachable one is garbage like any other (what
//! it refers to cannot matter), so one client storing a few odd bytes
//! nowhere reachable cannot switch collection off for everyone. While
//! condemned objects are being freed, a vote with such a record is refused
//! (a ConflictError the client retries), since it might link one of them.
//! Freeing too little is safe; freeing too much is not, and neither is
//! stopping half-way through a sweep.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::oidhash::{OID_MAP_SHARDS, OidMap};
use super::{Object, Storage, StorageState};
use crate::protocol::ids::{Oid, Tid};

/// Objects handled between two looks at the clock within a hold (reading
/// it costs about as much as handling a few objects).
pub const GC_CLOCK_EVERY: usize = 128;

/// The kinds of storage-lock hold a cycle takes, in cycle order (each is
/// timed: see [`Holds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    /// Write lock: a new epoch, the barrier on.
    Start,
    /// Read lock: objects written since the cutoff marked as roots (a few
    /// shards of the object map per hold).
    MarkYoung,
    /// Read lock: traversal from the root.
    Mark,
    /// Read lock: the unmarked objects (a few shards per hold).
    Candidates,
    /// Write lock: marking finished, the unmarked condemned.
    Condemn,
    /// Write lock: condemned objects removed.
    Free,
    /// Write lock: the barrier off.
    End,
}

impl HoldKind {
    pub const ALL: [HoldKind; 7] = [
        HoldKind::Start,
        HoldKind::MarkYoung,
        HoldKind::Mark,
        HoldKind::Candidates,
        HoldKind::Condemn,
        HoldKind::Free,
        HoldKind::End,
    ];

    /// "r" or "w": which side of the storage lock it takes.
    pub fn lock(self) -> &'static str {
        match self {
            HoldKind::Start | HoldKind::Condemn | HoldKind::Free | HoldKind::End => "w",
            _ => "r",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HoldKind::Start => "start",
            HoldKind::MarkYoung => "mark-young",
            HoldKind::Mark => "mark",
            HoldKind::Candidates => "candidates",
            HoldKind::Condemn => "condemn",
            HoldKind::Free => "free",
            HoldKind::End => "end",
        }
    }
}

/// The storage-lock holds of one kind in one cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldFigures {
    pub count: usize,
    pub total: Duration,
    pub longest: Duration,
    /// How many holds were shorter than each of [`HOLD_BUCKETS`] (and not
    /// shorter than the one before), then how many were longer than all.
    pub buckets: [usize; HOLD_BUCKETS.len() + 1],
}

/// The upper bounds of the buckets of [`HoldFigures::buckets`].
pub const HOLD_BUCKETS: [Duration; 4] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
];

/// The storage-lock holds of one cycle, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holds([HoldFigures; HoldKind::ALL.len()]);

impl Holds {
    pub fn get(&self, kind: HoldKind) -> HoldFigures {
        self.0[kind as usize]
    }

    /// The longest hold of all, and its kind.
    pub fn longest(&self) -> (HoldKind, Duration) {
        HoldKind::ALL
            .iter()
            .map(|&k| (k, self.get(k).longest))
            .fold((HoldKind::Start, Duration::ZERO), |a, b| {
                if b.1 > a.1 { b } else { a }
            })
    }
}

/// Where a cycle is when it calls the test hook (between lock holds).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GcStep {
    /// One hold going through shards of the object map (marking what was
    /// written since the cutoff, or finding candidates) is over.
    Scanned,
    /// The candidates are known; nothing is condemned or freed yet.
    Candidates,
    /// The unmarked candidates are condemned; nothing is freed yet.
    Condemned,
    /// One chunk of candidates was freed.
    Freed,
}

/// See `Storage::gc_hook`.
#[cfg(test)]
pub(crate) type GcHook = Box<dyn FnMut(&Storage, GcStep) + Send>;

/// The collector's state inside the storage (under its lock).
#[derive(Debug, Default)]
pub struct GcState {
    /// The current (or last) cycle's epoch; marks equal to it are "reached".
    epoch: u32,
    /// A cycle is between start and its end: commits must mark what they
    /// write (and, before condemnation, shade what it references).
    active: bool,
    /// The cycle has condemned what it did not mark and is freeing it: a
    /// vote must not link, write or delete a condemned object (see
    /// [`StorageState::condemned`]).
    sweeping: bool,
    /// Objects shaded by commits during the cycle, still to be traversed.
    /// A mutex so the collector can drain it under the read lock.
    shaded: Mutex<Vec<Oid>>,
    /// What the voted transaction (holding the commit lock) depends on,
    /// until its `tpc_finish` or abort.
    pinned: Mutex<Pinned>,
    /// Reachable objects found by this cycle's marking with a retained
    /// record that cannot be scanned: their references are unknown, so the
    /// cycle frees nothing. (An unreachable one does not matter: it is
    /// garbage itself, whatever it refers to, and is freed with the rest.)
    reached_unscannable: Mutex<Vec<Oid>>,
    /// Objects per lock hold; 0 means holds of about `gc-hold-budget`.
    /// Tests set 1 to make commits interleave with the cycle as much as
    /// possible.
    chunk: usize,
}

/// What the voted transaction depends on: its vote checked the current
/// state, so no cycle may condemn what it relies on before it ends.
#[derive(Debug, Default)]
struct Pinned {
    /// The objects it writes and references. Its vote checked that they
    /// exist (and the serials of those it writes), so they must neither be
    /// freed nor condemned: a condemned object that it links again might
    /// reference objects already freed, and one it writes would be freed
    /// and then recreated from the new revision alone.
    oids: Vec<Oid>,
    /// Objects it writes with records that cannot be scanned: their
    /// references are unknown, so no cycle may condemn anything before
    /// it ends.
    unscannable: Vec<Oid>,
}

/// Collector figures, reported by `server_status` and the log.
#[derive(Debug, Default)]
pub struct GcStats {
    pub collections: AtomicU64,
    pub freed_objects: AtomicU64,
    /// Longest single hold of the storage lock by the collector (µs).
    pub longest_pause_us: AtomicU64,
    /// Duration of the last whole cycle (µs).
    pub last_cycle_us: AtomicU64,
    /// Longest single hold of the storage lock in the last cycle (µs): what
    /// the collector costs now, where `longest_pause_us` is the worst ever.
    pub last_longest_pause_us: AtomicU64,
}

/// What one collection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcOutcome {
    Collected {
        /// Objects looked at for candidates (those that existed at the start
        /// of the cycle, and some that commits added since).
        examined: usize,
        freed: usize,
        /// Longest lock hold in this cycle.
        longest_pause: Duration,
        /// The holds of each kind (how many, how long).
        holds: Box<Holds>,
    },
    /// Some retained record, or one the voted transaction writes, could
    /// not be scanned: nothing was freed.
    KeptEverything { unscannable: Vec<Oid> },
    /// Another collection was running.
    Busy,
}

/// One readable phrase, for log lines (`pack`'s among them).
impl std::fmt::Display for GcOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GcOutcome::Collected {
                examined,
                freed,
                longest_pause,
                ..
            } => write!(
                f,
                "collected: {freed} of {examined} objects freed (longest lock hold {:.1} ms)",
                longest_pause.as_secs_f64() * 1e3
            ),
            GcOutcome::KeptEverything { unscannable } => {
                let shown: Vec<String> =
                    unscannable.iter().take(5).map(|o| o.to_string()).collect();
                let more = if unscannable.len() > 5 { ", ..." } else { "" };
                write!(
                    f,
                    "nothing freed: {} records could not be scanned for references (oids {}{more})",
                    unscannable.len(),
                    shown.join(", ")
                )
            }
            GcOutcome::Busy => write!(
                f,
                "no collection: another one was running (unreachable objects go in a later cycle)"
            ),
        }
    }
}

impl StorageState {
    /// Called by a successful vote: keep what it writes and references
    /// (`oids`) until it ends, and condemn nothing meanwhile if it writes
    /// records that cannot be scanned (`unscannable`).
    pub(super) fn pin(&self, oids: Vec<Oid>, unscannable: Vec<Oid>) {
        *lock(&self.gc.pinned) = Pinned { oids, unscannable };
    }

    /// The voted transaction finished or aborted.
    pub(super) fn unpin(&self) {
        *lock(&self.gc.pinned) = Pinned::default();
    }

    /// True while a cycle frees what it condemned: a vote then refuses a
    /// record whose references are unknown (it might link a condemned
    /// object).
    pub(super) fn gc_sweeping(&self) -> bool {
        self.gc.sweeping
    }

    /// True if the running cycle condemned `oid`: it still exists, but it
    /// is about to be freed and what it references may be freed already,
    /// so a vote treats it as gone. (During the sweep every object that is
    /// not marked is condemned: objects written since the cycle started are
    /// marked by the barrier.)
    pub(super) fn condemned(&self, oid: Oid) -> bool {
        self.gc.sweeping
            && self
                .objects
                .get(&oid)
                .is_some_and(|o| o.mark.load(Ordering::Relaxed) != self.gc.epoch)
    }

    /// The commit barrier, called by `finish` with the oids it wrote.
    pub(super) fn gc_barrier(&mut self, written: &[Oid]) {
        if !self.gc.active {
            return;
        }
        let epoch = self.gc.epoch;
        if self.gc.sweeping {
            // Marking is complete: the vote refused condemned objects, so
            // what the new revisions reference is marked already, or new.
            // New objects are marked only so they are not taken for
            // condemned ones.
            for oid in written {
                if let Some(obj) = self.objects.get(oid) {
                    obj.mark.store(epoch, Ordering::Relaxed);
                }
            }
            return;
        }
        let mut shaded = Vec::new();
        for oid in written {
            let Some(obj) = self.objects.get(oid) else {
                continue;
            };
            if obj.mark.swap(epoch, Ordering::Relaxed) != epoch {
                shaded.push(*oid);
            }
            // Its newest revision may reference objects the marker has not
            // reached yet (an edge added during the cycle).
            if let Some(refs) = obj.revisions.last().and_then(|r| r.refs.as_ref()) {
                for r in refs.iter() {
                    if let Some(child) = self.objects.get(r)
                        && child.mark.swap(epoch, Ordering::Relaxed) != epoch
                    {
                        shaded.push(*r);
                    }
                }
            }
        }
        lock(&self.gc.shaded).extend(shaded);
    }

    /// Marks what `grey` objects reference until `budget` is spent.
    fn mark_some(&self, grey: &mut Vec<Oid>, budget: &mut Budget) {
        let epoch = self.gc.epoch;
        grey.append(&mut lock(&self.gc.shaded));
        while let Some(oid) = grey.pop() {
            if budget.spent() {
                grey.push(oid);
                return;
            }
            let Some(obj) = self.objects.get(&oid) else {
                continue;
            };
            for rev in &obj.revisions {
                let Some(refs) = &rev.refs else {
                    lock(&self.gc.reached_unscannable).push(oid);
                    continue;
                };
                budget.followed(refs.len());
                for r in refs.iter() {
                    if let Some(child) = self.objects.get(r)
                        && child.mark.swap(epoch, Ordering::Relaxed) != epoch
                    {
                        grey.push(*r);
                    }
                }
            }
        }
    }

    /// Traverses everything commits shaded and what the voted transaction
    /// pinned (under the write lock, before freeing anything).
    fn finish_marking(&mut self) {
        let epoch = self.gc.epoch;
        let mut grey: Vec<Oid> = lock(&self.gc.pinned)
            .oids
            .iter()
            .copied()
            .filter(|oid| {
                self.objects
                    .get(oid)
                    .is_some_and(|o| o.mark.swap(epoch, Ordering::Relaxed) != epoch)
            })
            .collect();
        loop {
            self.mark_some(&mut grey, &mut Budget::unlimited());
            if grey.is_empty() && lock(&self.gc.shaded).is_empty() {
                break;
            }
        }
    }

    /// Oids of retained revisions that could not be scanned.
    #[cfg(test)]
    fn unscannable_oids(&self, max: usize) -> Vec<Oid> {
        self.objects
            .iter()
            .filter(|(_, o)| o.revisions.iter().any(|r| r.refs.is_none()))
            .map(|(oid, _)| *oid)
            .take(max)
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only ever holds a Vec that is appended to or drained whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Times each lock hold of one cycle.
#[derive(Default)]
struct Pauses {
    longest: Duration,
    holds: Holds,
}

impl Pauses {
    /// Runs `f` under the read lock; records how long it was held.
    fn read<R>(
        &mut self,
        storage: &Storage,
        kind: HoldKind,
        f: impl FnOnce(&StorageState) -> R,
    ) -> R {
        let st = storage.read();
        let t = Instant::now();
        let r = f(&st);
        drop(st);
        self.record(kind, t.elapsed());
        r
    }

    /// Runs `f` under the write lock; records how long it was held.
    fn write<R>(
        &mut self,
        storage: &Storage,
        kind: HoldKind,
        f: impl FnOnce(&mut StorageState) -> R,
    ) -> R {
        let mut st = storage.write();
        let t = Instant::now();
        let r = f(&mut st);
        drop(st);
        self.record(kind, t.elapsed());
        r
    }

    /// One hold of the lock, from when it was taken until it was released
    /// (waiting for it is not counted: that is others holding it).
    fn record(&mut self, kind: HoldKind, took: Duration) {
        self.longest = self.longest.max(took);
        let figures = &mut self.holds.0[kind as usize];
        figures.count += 1;
        figures.total += took;
        figures.longest = figures.longest.max(took);
        figures.buckets[HOLD_BUCKETS.partition_point(|b| *b <= took)] += 1;
    }
}

/// What bounds each of a cycle's lock holds: the storage's hold budget,
/// or (tests) a number of objects.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// As [`GcState::chunk`]: objects per hold, 0 for the time budget.
    chunk: usize,
    /// The hold budget (`gc-hold-budget`).
    time: Duration,
}

/// Ends a lock hold once the hold budget (`gc-hold-budget`) is spent (or, with a chunk
/// set for tests, after that many objects).
struct Budget {
    started: Instant,
    /// Objects handled in this hold.
    steps: usize,
    /// Objects per hold; 0: bounded by time; `usize::MAX`: no bound.
    max_steps: usize,
    /// The hold's time budget (with `max_steps` 0).
    time: Duration,
    /// Objects and references handled in this hold.
    work: usize,
    /// `work` at which to look at the clock next.
    next_look: usize,
}

impl Budget {
    /// A hold that starts now, bounded by `pace`.
    fn new(pace: Pace) -> Budget {
        Budget {
            started: Instant::now(),
            steps: 0,
            max_steps: pace.chunk,
            time: pace.time,
            work: 0,
            next_look: GC_CLOCK_EVERY,
        }
    }

    fn unlimited() -> Budget {
        Budget::new(Pace {
            chunk: usize::MAX,
            time: Duration::MAX,
        })
    }

    /// Called before handling each object: true if the hold should end
    /// instead (never for the first object of a hold).
    fn spent(&mut self) -> bool {
        let started = self.started;
        self.step(|| started.elapsed())
    }

    /// `spent` with the hold's duration so far given by `elapsed`, which is
    /// called once every [`GC_CLOCK_EVERY`] objects or references.
    fn step(&mut self, elapsed: impl FnOnce() -> Duration) -> bool {
        self.steps += 1;
        self.work += 1;
        if self.max_steps != 0 {
            return self.steps > self.max_steps;
        }
        if self.work < self.next_look {
            return false;
        }
        self.next_look = self.work + GC_CLOCK_EVERY;
        elapsed() >= self.time
    }

    /// Counts `n` references followed (work on top of the object's).
    fn followed(&mut self, n: usize) {
        self.work += n;
    }
}

impl Storage {
    /// Runs one whole collection cycle now, after any cycle in progress
    /// (for `pack` and memory pressure).
    ///
    /// Objects written at or after `keep_written_since` are roots too: they
    /// and what they reference are kept even if the root does not reach
    /// them, because a client may still link them (ZODB's own tests store
    /// objects without linking them; a Zope request may commit an object
    /// before the one that links it). The background collector passes the
    /// retention cutoff, `pack(t)` passes `t`, memory pressure `Tid::MAX`.
    pub fn collect(&self, keep_written_since: Tid) -> GcOutcome {
        let _one_at_a_time = lock(&self.collecting);
        self.cycle(keep_written_since)
    }

    /// Runs a cycle unless one is already running (background collector).
    pub fn collect_if_idle(&self, keep_written_since: Tid) -> GcOutcome {
        match self.collecting.try_lock() {
            Ok(_one_at_a_time) => self.cycle(keep_written_since),
            Err(_) => GcOutcome::Busy,
        }
    }

    fn cycle(&self, keep_written_since: Tid) -> GcOutcome {
        let cycle_start = Instant::now();
        self.dirty.store(0, Ordering::Relaxed);
        let mut pauses = Pauses::default();

        // 1. start
        let pace = self.start_cycle(&mut pauses);

        // 2. mark, from the root and from recently written objects
        self.mark(&mut pauses, keep_written_since, pace);

        // 3. candidates
        let (candidates, examined) = self.find_candidates(&mut pauses, pace);

        #[cfg(test)]
        self.between_holds(GcStep::Candidates);

        // 4. condemn
        let condemned = self.condemn(&mut pauses);

        // 5. free
        let freed = if condemned.is_ok() {
            #[cfg(test)]
            self.between_holds(GcStep::Condemned);
            self.free(&mut pauses, &candidates, pace)
        } else {
            0
        };
        self.end_cycle(&mut pauses);
        if let Err(unscannable) = condemned {
            tracing::warn!(storage = %self.name, oids = ?unscannable, "garbage collection cycle freed nothing: a reachable (or voted) record cannot be scanned for references");
            return GcOutcome::KeptEverything { unscannable };
        }

        self.record_collection(cycle_start, examined, freed, &pauses)
    }

    /// Phase 1 (write lock, brief): a new mark epoch; the root is marked;
    /// the commit barrier is switched on. Returns the configured chunk (0:
    /// holds bounded by time).
    fn start_cycle(&self, pauses: &mut Pauses) -> Pace {
        pauses.write(self, HoldKind::Start, |st| {
            lock(&st.gc.reached_unscannable).clear();
            st.gc.epoch = st.gc.epoch.wrapping_add(1).max(1);
            st.gc.active = true;
            lock(&st.gc.shaded).clear();
            if let Some(root) = st.objects.get(&Oid::ROOT) {
                root.mark.store(st.gc.epoch, Ordering::Relaxed);
            }
            Pace {
                chunk: st.gc.chunk,
                time: st.limits.gc_hold_budget,
            }
        })
    }

    /// Goes through the object map a few shards per read hold of `kind`,
    /// each hold bounded by `pace`, calling `visit` with each shard's
    /// objects (phases 2 and 3).
    fn scan_shards(
        &self,
        pauses: &mut Pauses,
        kind: HoldKind,
        pace: Pace,
        mut visit: impl FnMut(&StorageState, &OidMap<Oid, Object>),
    ) {
        let mut shard = 0;
        while shard < OID_MAP_SHARDS {
            pauses.read(self, kind, |st| {
                let mut budget = Budget::new(pace);
                while shard < OID_MAP_SHARDS {
                    let objects = &st.objects.shards()[shard];
                    // An empty shard is no work (with a chunk of 1, a
                    // small storage takes a hold per object, not per shard).
                    if !objects.is_empty() && budget.spent() {
                        return;
                    }
                    budget.followed(objects.len());
                    visit(st, objects);
                    shard += 1;
                }
            });
            #[cfg(test)]
            self.between_holds(GcStep::Scanned);
        }
    }

    /// Phase 2 (read lock, in holds of about `gc-hold-budget`): marks
    /// from the root and from the objects written at or after
    /// `keep_written_since`, until nothing is left to traverse (including
    /// what commits shaded meanwhile).
    ///
    /// The objects are gone through a few shards of the object map per
    /// hold (a hold ends after the shard in which its budget ran out).
    /// What commits write between two holds is marked, and what it
    /// references shaded, by the barrier: a shard taken after a commit
    /// needs nothing more for it.
    fn mark(&self, pauses: &mut Pauses, keep_written_since: Tid, pace: Pace) {
        let mut grey = vec![Oid::ROOT];
        self.scan_shards(pauses, HoldKind::MarkYoung, pace, |st, objects| {
            for (oid, obj) in objects {
                let young = obj
                    .revisions
                    .last()
                    .is_some_and(|r| r.tid >= keep_written_since);
                if young && obj.mark.swap(st.gc.epoch, Ordering::Relaxed) != st.gc.epoch {
                    grey.push(*oid);
                }
            }
        });
        loop {
            let more = pauses.read(self, HoldKind::Mark, |st| {
                st.mark_some(&mut grey, &mut Budget::new(pace));
                !grey.is_empty() || !lock(&st.gc.shaded).is_empty()
            });
            if !more {
                break;
            }
        }
    }

    /// Phase 3 (read lock, in holds of about `gc-hold-budget`, a few
    /// shards of the object map per hold): the unmarked objects, and how
    /// many objects were looked at. An object that a commit adds meanwhile
    /// is marked by the barrier, so every candidate existed when the cycle
    /// started.
    fn find_candidates(&self, pauses: &mut Pauses, pace: Pace) -> (Vec<Oid>, usize) {
        let mut candidates = Vec::new();
        let mut examined = 0;
        self.scan_shards(pauses, HoldKind::Candidates, pace, |st, objects| {
            examined += objects.len();
            candidates.extend(
                objects
                    .iter()
                    .filter(|(_, o)| o.mark.load(Ordering::Relaxed) != st.gc.epoch)
                    .map(|(oid, _)| *oid),
            );
        });
        (candidates, examined)
    }

    /// Phase 4 (write lock, brief): finish marking (what commits shaded
    /// since, what the voted transaction pinned); every candidate still
    /// unmarked is then garbage, and no vote may bring it back (see the
    /// module docs). `Err` with the oids of records that cannot be scanned
    /// if nothing may be freed.
    fn condemn(&self, pauses: &mut Pauses) -> Result<(), Vec<Oid>> {
        pauses.write(self, HoldKind::Condemn, |st| {
            let pinned_unscannable = lock(&st.gc.pinned).unscannable.clone();
            if !pinned_unscannable.is_empty() {
                // A record that cannot be scanned is voted: its references
                // are unknown.
                return Err(pinned_unscannable);
            }
            st.finish_marking();
            let reached: Vec<Oid> = lock(&st.gc.reached_unscannable).clone();
            if !reached.is_empty() {
                // A reachable object's record cannot be scanned: what it
                // refers to is unknown, so nothing may be freed.
                let mut oids = reached;
                oids.sort();
                oids.dedup();
                oids.truncate(10);
                return Err(oids);
            }
            st.gc.sweeping = true;
            Ok(())
        })
    }

    /// Phase 5 (write lock, in holds of about `gc-hold-budget`): frees
    /// the condemned candidates; returns how many objects were freed.
    ///
    /// Commits go on in between; they cannot link a condemned object nor
    /// commit a record that cannot be scanned, so marking stays complete
    /// and nothing condemned is kept (nor is the sweep stopped half-way).
    /// Freed objects are dropped outside the lock.
    fn free(&self, pauses: &mut Pauses, candidates: &[Oid], pace: Pace) -> usize {
        let mut freed = 0;
        let mut next = 0;
        while next < candidates.len() {
            let mut garbage = Vec::new();
            pauses.write(self, HoldKind::Free, |st| {
                let epoch = st.gc.epoch;
                let mut budget = Budget::new(pace);
                for &oid in &candidates[next..] {
                    if budget.spent() {
                        return;
                    }
                    next += 1;
                    let unmarked = st
                        .objects
                        .get(&oid)
                        .is_some_and(|o| o.mark.load(Ordering::Relaxed) != epoch);
                    if unmarked && oid != Oid::ROOT {
                        garbage.extend(st.take_object(oid));
                    }
                }
            });
            freed += garbage.len();
            drop(garbage);
            #[cfg(test)]
            self.between_holds(GcStep::Freed);
        }
        freed
    }

    /// The cycle is over (write lock, brief): the commit barrier is
    /// switched off and votes no longer check for condemned objects.
    fn end_cycle(&self, pauses: &mut Pauses) {
        pauses.write(self, HoldKind::End, |st| {
            st.gc.active = false;
            st.gc.sweeping = false;
        });
    }

    /// Adds a completed cycle to the figures and the log.
    fn record_collection(
        &self,
        cycle_start: Instant,
        examined: usize,
        freed: usize,
        pauses: &Pauses,
    ) -> GcOutcome {
        let s = &self.gc_stats;
        s.collections.fetch_add(1, Ordering::Relaxed);
        s.freed_objects.fetch_add(freed as u64, Ordering::Relaxed);
        s.longest_pause_us
            .fetch_max(pauses.longest.as_micros() as u64, Ordering::Relaxed);
        s.last_cycle_us
            .store(cycle_start.elapsed().as_micros() as u64, Ordering::Relaxed);
        s.last_longest_pause_us
            .store(pauses.longest.as_micros() as u64, Ordering::Relaxed);
        tracing::debug!(
            storage = %self.name, examined, freed,
            longest_pause = ?pauses.longest, took = ?cycle_start.elapsed(), "garbage collected"
        );
        GcOutcome::Collected {
            examined,
            freed,
            longest_pause: pauses.longest,
            holds: Box::new(pauses.holds),
        }
    }

    /// Sets how many objects (shards of the object map, when going through
    /// it) the collector handles per lock hold (0, the default: as many as
    /// fit in `gc-hold-budget`). For tests that make commits race the
    /// collector.
    pub fn set_gc_chunk(&self, n: usize) {
        self.write().gc.chunk = n;
    }

    /// Runs the test hook, if any (no lock is held).
    #[cfg(test)]
    fn between_holds(&self, step: GcStep) {
        if let Some(hook) = lock(&self.gc_hook).as_mut() {
            hook(self, step);
        }
    }

    /// True if something was committed since the last collection.
    pub fn changed_since_collection(&self) -> bool {
        self.dirty.load(Ordering::Relaxed) > 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use bytes::Bytes;

    use super::*;
    use crate::protocol::ids::Tid;
    use crate::protocol::value::Value;
    use crate::storage::{LockAttempt, StorageError, StorageLimits, TxnMeta, TxnOp, Vote};

    fn storage() -> Storage {
        Storage::new("1", Tid::now(), StorageLimits::default())
    }

    /// A store whose references are given (no pickle needed).
    fn store(oid: u64, serial: Tid, refs: &[u64]) -> TxnOp {
        TxnOp::Store {
            oid: Oid(oid),
            serial,
            data: Bytes::from(format!("obj {oid} -> {refs:?}")),
            refs: Some(refs.iter().map(|r| Oid(*r)).collect()),
            class: None,
        }
    }

    fn commit(s: &Storage, ops: Vec<TxnOp>) -> Tid {
        try_commit(s, ops).unwrap()
    }

    /// A commit, or the error its vote gave.
    fn try_commit(s: &Storage, ops: Vec<TxnOp>) -> Result<Tid, crate::storage::StorageError> {
        assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
        let voted = s.vote(&ops).map(|v| v.into_result().unwrap());
        let meta = TxnMeta {
            user: Bytes::new(),
            description: Bytes::new(),
            extension: Value::None,
        };
        let tid = voted.map(|voted| s.finish(1, voted, meta, |tid, _, _| tid));
        s.unlock(1);
        tid
    }

    fn exists(s: &Storage, oid: u64) -> bool {
        s.read().load_before(Oid(oid), Tid::MAX).is_ok()
    }

    #[test]
    fn unreachable_objects_and_cycles_are_freed() {
        let s = storage();
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        // root -> 1 -> 2 -> 3 -> 1 (a cycle), and 4 <-> 5 hanging off 2.
        let t = commit(
            &s,
            vec![
                store(0, root, &[1]),
                store(1, Tid::ZERO, &[2]),
                store(2, Tid::ZERO, &[3, 4]),
                store(3, Tid::ZERO, &[1]),
                store(4, Tid::ZERO, &[5]),
                store(5, Tid::ZERO, &[4]),
            ],
        );
        assert!(matches!(
            s.collect(Tid::MAX),
            GcOutcome::Collected { freed: 0, .. }
        ));
        // Unlink 4 <-> 5 from 2; they stay while the old revision of 2 is retained.
        let t2 = commit(&s, vec![store(2, t, &[3])]);
        assert!(matches!(
            s.collect(Tid::MAX),
            GcOutcome::Collected { freed: 0, .. }
        ));
        assert!(
            exists(&s, 4) && exists(&s, 5),
            "an older snapshot can still reach them"
        );
        // Once that revision is gone, the pair is garbage.
        assert!(matches!(
            s.pack(Tid(t2.0 + 1)).gc,
            GcOutcome::Collected { freed: 2, .. }
        ));
        assert!(!exists(&s, 4) && !exists(&s, 5));
        // Unlink the whole 1 -> 2 -> 3 -> 1 cycle from the root.
        let t3 = commit(&s, vec![store(0, t, &[])]);
        assert!(matches!(
            s.pack(Tid(t3.0 + 1)).gc,
            GcOutcome::Collected { freed: 3, .. }
        ));
        assert_eq!(s.read().len(), 1, "only the root is left");
        assert!(exists(&s, 0));
        assert_eq!(s.gc_stats.freed_objects.load(Ordering::Relaxed), 5);
        assert_eq!(s.gc_stats.collections.load(Ordering::Relaxed), 4);
        // The accounting is back to one object with one revision.
        let st = s.read();
        assert_eq!(st.retained(), (1, st.size()));
        assert_eq!(
            st.accounted(),
            st.size() + crate::storage::REVISION_OVERHEAD + crate::storage::OBJECT_OVERHEAD
        );
    }

    /// A store of class `class` whose references are given.
    fn classed(oid: u64, serial: Tid, refs: &[u64], class: &str) -> TxnOp {
        let mut op = store(oid, serial, refs);
        if let TxnOp::Store { class: c, .. } = &mut op {
            *c = Some(class.to_string());
        }
        op
    }

    /// `(objects, bytes)` of `class` in the storage's class table.
    fn class_count(s: &Storage, class: &str) -> (u64, u64) {
        s.read()
            .class_rows()
            .iter()
            .find(|r| &*r.class == class)
            .map_or((0, 0), |r| (r.objects, r.bytes))
    }

    #[test]
    fn freed_objects_leave_the_class_table() {
        let s = storage();
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let t = commit(
            &s,
            vec![
                classed(0, root, &[1, 3], "persistent.mapping.PersistentMapping"),
                classed(1, Tid::ZERO, &[2], "app.Session"),
                classed(2, Tid::ZERO, &[1], "app.Session"),
                classed(3, Tid::ZERO, &[], "BTrees.Length.Length"),
            ],
        );
        let session_bytes = ["obj 1 -> [2]", "obj 2 -> [1]"]
            .map(str::len)
            .iter()
            .sum::<usize>();
        assert_eq!(class_count(&s, "app.Session"), (2, session_bytes as u64));
        // Unlink the 1 <-> 2 cycle; once the old root revision is gone the
        // collector frees it, and its class counts nothing any more.
        let t2 = commit(
            &s,
            vec![classed(0, t, &[3], "persistent.mapping.PersistentMapping")],
        );
        assert!(matches!(
            s.pack(Tid(t2.0 + 1)).gc,
            GcOutcome::Collected { freed: 2, .. }
        ));
        assert_eq!(class_count(&s, "app.Session"), (0, 0));
        assert_eq!(class_count(&s, "BTrees.Length.Length"), (1, 11));
        let rows = s.read().class_rows();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            rows.iter().map(|r| r.bytes).sum::<u64>(),
            s.read().size() as u64
        );
    }

    #[test]
    fn unscannable_record_keeps_everything() {
        let s = storage();
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let mut bad = store(1, Tid::ZERO, &[]);
        if let TxnOp::Store { refs, .. } = &mut bad {
            *refs = None;
        }
        let t = commit(
            &s,
            vec![store(0, root, &[1, 2]), bad, store(2, Tid::ZERO, &[])],
        );
        commit(&s, vec![store(0, t, &[1])]);
        assert_eq!(
            s.pack(Tid::MAX).gc,
            GcOutcome::KeptEverything {
                unscannable: vec![Oid(1)]
            }
        );
        assert!(
            exists(&s, 2),
            "2 is unreachable, but 1's references are unknown"
        );
    }

    #[test]
    fn dangling_reference_refused_at_vote() {
        let s = storage();
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let err = s.vote(&[store(0, root, &[77])]).unwrap_err();
        assert!(
            matches!(
                err,
                crate::storage::StorageError::Conflict { oid: Oid(0), .. }
            ),
            "{err:?}"
        );
        // Referencing an object created in the same transaction is fine.
        assert!(
            s.vote(&[store(0, root, &[77]), store(77, Tid::ZERO, &[])])
                .unwrap()
                .into_result()
                .is_ok()
        );
    }

    #[test]
    fn collection_between_vote_and_finish_keeps_what_the_vote_links() {
        let s = storage();
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        // 5 is garbage (nothing references it) but still exists.
        let t = commit(&s, vec![store(0, root, &[5]), store(5, Tid::ZERO, &[])]);
        let t2 = commit(&s, vec![store(0, t, &[])]);
        // Drop the history that still links it (a pack would also free it).
        s.write().prune_until(Tid(t2.0 + 1));
        // A client links it again; its vote sees that 5 exists...
        assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
        let voted = s
            .vote(&[store(0, t2, &[5])])
            .unwrap()
            .into_result()
            .unwrap();
        // ...and a whole collection runs before its tpc_finish.
        assert!(matches!(
            s.collect(Tid::MAX),
            GcOutcome::Collected { freed: 0, .. }
        ));
        let meta = TxnMeta {
            user: Bytes::new(),
            description: Bytes::new(),
            extension: Value::None,
        };
        s.finish(1, voted, meta, |_, _, _| ());
        s.unlock(1);
        assert!(exists(&s, 5), "no dangling reference");
        // Once nothing links it, it goes (the pin ended with the transaction).
        let t3 = s.read().get_tid(Oid::ROOT).unwrap(); // (the guard must not live into commit)
        let t4 = commit(&s, vec![store(0, t3, &[])]);
        assert!(matches!(
            s.pack(Tid(t4.0 + 1)).gc,
            GcOutcome::Collected { freed: 1, .. }
        ));
    }

    /// A storage whose root once linked the cycle 1 <-> 2, with that
    /// history dropped: 1 and 2 are garbage that still exists. The collector
    /// handles one object per lock hold.
    fn garbage_pair() -> Storage {
        let s = storage();
        s.set_gc_chunk(1);
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let t = commit(
            &s,
            vec![
                store(0, root, &[1]),
                store(1, Tid::ZERO, &[2]),
                store(2, Tid::ZERO, &[1]),
            ],
        );
        let t2 = commit(&s, vec![store(0, t, &[])]);
        s.write().prune_until(Tid(t2.0 + 1));
        s
    }

    /// Runs `hook` between the lock holds of every later collection cycle.
    fn on_gc_step(s: &Storage, hook: impl FnMut(&Storage, GcStep) + Send + 'static) {
        *lock(&s.gc_hook) = Some(Box::new(hook));
    }

    /// The sweep frees garbage a chunk at a time, and commits run between
    /// chunks. Once one object of a garbage cycle is freed, the other one
    /// must not be linked again: its record references the freed one, so
    /// every later snapshot would reach a missing object (POSKeyError).
    #[test]
    fn half_freed_garbage_is_not_linked_again() {
        let s = garbage_pair();
        let linked = Arc::new(Mutex::new(None));
        let result = linked.clone();
        on_gc_step(&s, move |s, step| {
            let mut result = lock(&result);
            if step != GcStep::Freed || result.is_some() {
                return;
            }
            // One of the pair is gone; a client links the other one.
            let survivor = [1, 2].into_iter().find(|o| exists(s, *o)).unwrap();
            let root = s.read().get_tid(Oid::ROOT).unwrap();
            *result = Some((survivor, try_commit(s, vec![store(0, root, &[survivor])])));
        });
        s.collect(Tid::MAX);
        let (survivor, linked) = lock(&linked).take().expect("the sweep freed something");
        match linked {
            Ok(_) => assert!(
                exists(&s, 1) && exists(&s, 2),
                "{survivor} was linked again, but what it references was freed"
            ),
            Err(e) => {
                assert!(
                    matches!(e, crate::storage::StorageError::Conflict { .. }),
                    "{e:?}"
                );
                assert!(!exists(&s, 1) && !exists(&s, 2), "the garbage went");
            }
        }
    }

    /// The collector goes through the object map a shard per hold (with a
    /// chunk of 1) to mark what was written recently and to find
    /// candidates, and commits add objects between holds, the first one
    /// linking a garbage object: every other garbage object is still found
    /// (none is missed), and nothing a commit added or linked meanwhile is
    /// freed.
    #[test]
    fn scanning_in_holds_misses_no_garbage() {
        let s = storage();
        s.set_gc_chunk(1);
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let mut ops: Vec<TxnOp> = (1..=300).map(|o| store(o, Tid::ZERO, &[])).collect();
        ops.push(store(0, root, &(1..=100).collect::<Vec<u64>>()));
        let t = commit(&s, ops);
        let added = Arc::new(Mutex::new(Vec::new()));
        let log = added.clone();
        on_gc_step(&s, move |s, step| {
            if step != GcStep::Scanned {
                return;
            }
            let mut added = lock(&log);
            let oid = 1_000 + added.len() as u64;
            // The first one links garbage object 150.
            let refs: &[u64] = if added.is_empty() { &[150] } else { &[] };
            commit(s, vec![store(oid, Tid::ZERO, refs)]);
            added.push(oid);
        });
        let GcOutcome::Collected { freed, holds, .. } = s.pack(Tid(t.0 + 1)).gc else {
            panic!("collected")
        };
        // One hold per shard that holds objects: a commit ran after each.
        let scans = holds.get(HoldKind::MarkYoung).count + holds.get(HoldKind::Candidates).count;
        let added = lock(&added).clone();
        assert_eq!(added.len(), scans);
        assert!(scans > OID_MAP_SHARDS, "{scans} holds");
        assert_eq!(freed, 199, "every unlinked object but 150");
        assert!((1..=100).all(|o| exists(&s, o)));
        assert!(exists(&s, 150));
        assert!((101..=300).filter(|o| *o != 150).all(|o| !exists(&s, o)));
        assert!(added.iter().all(|o| exists(&s, *o)));
    }

    /// Objects written since the cutoff are roots, found a shard per hold
    /// while commits run in between: what they reference is kept however
    /// old and unlinked; the rest of the old garbage goes.
    #[test]
    fn recently_written_objects_are_roots_when_scanned_in_holds() {
        let s = storage();
        s.set_gc_chunk(1);
        // Old and unlinked: 1..=100.
        commit(&s, (1..=100).map(|o| store(o, Tid::ZERO, &[])).collect());
        // Recent and unlinked, each referencing an old one: 201..=250.
        let recent: Vec<TxnOp> = (201..=250)
            .map(|o| store(o, Tid::ZERO, &[o - 200]))
            .collect();
        let t = commit(&s, recent);
        let next = Arc::new(Mutex::new(1_000u64));
        on_gc_step(&s, move |s, step| {
            if step == GcStep::Scanned {
                let mut oid = lock(&next);
                commit(s, vec![store(*oid, Tid::ZERO, &[])]);
                *oid += 1;
            }
        });
        let GcOutcome::Collected { freed, .. } = s.collect(t) else {
            panic!("collected")
        };
        assert_eq!(freed, 50, "the old objects no recent one references");
        assert!((1..=50).chain(201..=250).all(|o| exists(&s, o)));
        assert!((51..=100).all(|o| !exists(&s, o)));
    }

    /// A hold ends once its time budget is spent, looked at every
    /// GC_CLOCK_EVERY objects or references; or, with a chunk set, after
    /// that many objects. (A made-up clock: no timing is measured.)
    #[test]
    fn a_hold_ends_when_its_budget_is_spent() {
        let budget = Duration::from_millis(crate::config::DEFAULT_GC_HOLD_BUDGET_MS);
        let timed = Pace {
            chunk: 0,
            time: budget,
        };
        let tick = budget / 4;
        // The clock advances a quarter of the budget per look.
        let mut b = Budget::new(timed);
        let mut looks = 0u32;
        let mut objects = 0;
        while !b.step(|| {
            looks += 1;
            tick * looks
        }) {
            objects += 1;
        }
        assert_eq!(looks, 4);
        assert_eq!(objects, 4 * GC_CLOCK_EVERY - 1);
        // References followed count towards the next look.
        let mut b = Budget::new(timed);
        let mut looks = 0;
        b.followed(10 * GC_CLOCK_EVERY);
        assert!(b.step(|| {
            looks += 1;
            budget
        }));
        assert_eq!(looks, 1);
        // A set chunk: that many objects, whatever the clock says.
        let mut b = Budget::new(Pace {
            chunk: 3,
            time: budget,
        });
        let ends: Vec<bool> = (0..4).map(|_| b.step(|| Duration::MAX)).collect();
        assert_eq!(ends, [false, false, false, true]);
        // Unlimited (finishing the marking under the write lock).
        let mut b = Budget::unlimited();
        assert!((0..10 * GC_CLOCK_EVERY).all(|_| !b.step(|| Duration::MAX)));
    }

    /// A transaction voted before the sweep stores on a garbage object (its
    /// serial was checked against that object's current revision) and
    /// finishes during the sweep: the object is kept, with its history, not
    /// freed and then recreated from the new revision alone.
    #[test]
    fn garbage_a_voted_transaction_writes_is_kept() {
        let s = storage();
        s.set_gc_chunk(1);
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let t = commit(&s, vec![store(0, root, &[1]), store(1, Tid::ZERO, &[])]);
        let t2 = commit(&s, vec![store(0, t, &[])]);
        s.write().prune_until(Tid(t2.0 + 1));
        let mut voted = None;
        on_gc_step(&s, move |s, step| {
            if step == GcStep::Candidates {
                assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
                voted = Some(s.vote(&[store(1, t, &[])]).unwrap().into_result().unwrap());
            } else if let Some(voted) = voted.take() {
                let meta = TxnMeta {
                    user: Bytes::new(),
                    description: Bytes::new(),
                    extension: Value::None,
                };
                s.finish(1, voted, meta, |_, _, _| ());
                s.unlock(1);
            }
        });
        s.collect(Tid::MAX);
        let st = s.read();
        assert!(st.load_serial(Oid(1), t).is_ok(), "1 kept its history");
        assert_eq!(st.history(Oid(1), 10).unwrap().len(), 2);
    }

    /// A record that cannot be scanned may reference anything: one voted
    /// before the sweep keeps the whole cycle from freeing anything, and
    /// one voted during the sweep is refused (a ConflictError the client
    /// retries), so a sweep never stops half-way through a garbage cycle.
    #[test]
    fn unscannable_record_never_stops_a_sweep_half_way() {
        fn unscannable(oid: u64) -> TxnOp {
            let mut op = store(oid, Tid::ZERO, &[]);
            if let TxnOp::Store { refs, .. } = &mut op {
                *refs = None;
            }
            op
        }
        // Voted before the sweep, finished during it.
        let s = garbage_pair();
        let mut voted = None;
        on_gc_step(&s, move |s, step| {
            if step == GcStep::Candidates {
                assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
                voted = Some(s.vote(&[unscannable(9)]).unwrap().into_result().unwrap());
            } else if let Some(voted) = voted.take() {
                let meta = TxnMeta {
                    user: Bytes::new(),
                    description: Bytes::new(),
                    extension: Value::None,
                };
                s.finish(1, voted, meta, |_, _, _| ());
                s.unlock(1);
            }
        });
        let outcome = s.collect(Tid::MAX);
        assert!(exists(&s, 1) && exists(&s, 2), "nothing freed: {outcome:?}");
        // Voted during the sweep.
        let s = garbage_pair();
        let mut tried = false;
        on_gc_step(&s, move |s, step| {
            if step == GcStep::Freed && !tried {
                tried = true;
                let refused = try_commit(s, vec![unscannable(9)]);
                assert!(
                    matches!(refused, Err(crate::storage::StorageError::Conflict { .. })),
                    "{refused:?}"
                );
            }
        });
        s.collect(Tid::MAX);
        assert!(!exists(&s, 1) && !exists(&s, 2), "the garbage went");
        assert!(s.read().unscannable_oids(10).is_empty());
    }

    /// A store of `size` bytes whose references are given.
    fn big(oid: u64, serial: Tid, refs: &[u64], size: usize) -> TxnOp {
        TxnOp::Store {
            oid: Oid(oid),
            serial,
            data: Bytes::from(vec![b'd'; size]),
            refs: Some(refs.iter().map(|r| Oid(*r)).collect()),
            class: None,
        }
    }

    /// A storage whose memory budget holds `extra` accounted bytes more
    /// than an empty storage (the budget's accounted limit).
    fn limited(extra: usize) -> (Storage, usize) {
        let limit = storage().read().accounted() + extra;
        let s = Storage::new(
            "1",
            Tid::now(),
            StorageLimits {
                memory: crate::storage::MemoryBudget::with_accounted_limit(limit),
                ..StorageLimits::default()
            },
        );
        (s, limit)
    }

    #[test]
    fn memory_limit_trims_history_then_collects_then_refuses() {
        let (s, limit) = limited(20 * 1024);
        let mut root = s.read().get_tid(Oid::ROOT).unwrap();
        // 1. One object rewritten again and again: only its history grows,
        //    and the oldest history makes room.
        root = commit(&s, vec![store(0, root, &[5]), big(5, Tid::ZERO, &[], 1000)]);
        let mut serial = s.read().get_tid(Oid(5)).unwrap();
        for _ in 0..100 {
            serial = commit(&s, vec![big(5, serial, &[], 1000)]);
            // (Over by at most the revision the last commit replaced: the
            // next vote under pressure drops it.)
            assert!(s.read().accounted() <= limit + 1200);
        }
        assert!(s.read().retained().0 < 100, "old revisions were dropped");
        // 2. Unreachable objects, even recent ones, are collected under pressure.
        for i in 0..30u64 {
            commit(&s, vec![big(1000 + i, Tid::ZERO, &[], 1000)]);
        }
        assert!(s.gc_stats.freed_objects.load(Ordering::Relaxed) > 0);
        // 3. Reachable data that does not fit: the vote fails, naming the limit.
        let mut linked = vec![5];
        let err = loop {
            let next = 2000 + linked.len() as u64;
            let mut refs = linked.clone();
            refs.push(next);
            assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
            let result = s.vote(&[store(0, root, &refs), big(next, Tid::ZERO, &[], 1000)]);
            match result {
                Ok(Vote::Voted(voted)) => {
                    let meta = TxnMeta {
                        user: Bytes::new(),
                        description: Bytes::new(),
                        extension: Value::None,
                    };
                    root = s.finish(1, voted, meta, |tid, _, _| tid);
                    s.unlock(1);
                    linked.push(next);
                }
                Ok(Vote::Conflicts(c)) => panic!("unexpected conflicts {c:?}"),
                Err(e) => {
                    s.unlock(1);
                    break e;
                }
            }
            assert!(linked.len() < 100, "the limit was never reached");
        };
        assert!(err.to_string().contains("memory-limit"), "{err}");
        // Nothing committed was lost, and loads still work.
        {
            let st = s.read();
            for oid in &linked {
                assert!(st.load_before(Oid(*oid), Tid::MAX).unwrap().is_some());
            }
            assert!(st.accounted() <= limit);
        }
        // 4. Full, yet rewriting what is there still commits (what it
        //    replaces is history, dropped under pressure), again and again,
        //    and so does unlinking: the storage is never stuck.
        let mut serial = s.read().get_tid(Oid(5)).unwrap();
        for _ in 0..20 {
            serial = commit(&s, vec![big(5, serial, &[], 1000)]);
            // Over by at most the one revision the last commit replaced.
            assert!(s.read().accounted() <= limit + 1200);
        }
        let new_object = big(9999, Tid::ZERO, &[], 1000);
        let root_refs = [linked.clone(), vec![9999]].concat();
        let grows = try_commit(&s, vec![store(0, root, &root_refs), new_object]);
        assert!(grows.is_err(), "what grows the storage still fails");
        root = commit(&s, vec![store(0, root, &[5])]);
        let freed = s.gc_stats.freed_objects.load(Ordering::Relaxed);
        commit(
            &s,
            vec![store(0, root, &[5, 9999]), big(9999, Tid::ZERO, &[], 1000)],
        );
        assert!(
            s.gc_stats.freed_objects.load(Ordering::Relaxed) > freed,
            "the unlinked objects were collected to make room"
        );
        assert!(s.read().accounted() <= limit + 1200);
    }

    /// Memory pressure drops history inside the retention window and then
    /// collects: a snapshot that could read an object before that gets a
    /// retryable answer for it afterwards (`None`: ReadConflictError; a
    /// ConflictError for `loadSerial`), never POSKeyError.
    #[test]
    fn history_dropped_under_pressure_answers_retryably_never_poskey() {
        let (s, _) = limited(20 * 1024);
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let t1 = commit(
            &s,
            vec![store(0, root, &[7]), big(7, Tid::ZERO, &[], 10 * 1024)],
        );
        let t2 = commit(&s, vec![store(0, t1, &[])]);
        // A snapshot between the two reads X.
        assert!(s.read().load_before(Oid(7), t2).unwrap().is_some());
        // Something that fits only once X is freed.
        commit(
            &s,
            vec![store(0, t2, &[8]), big(8, Tid::ZERO, &[], 15 * 1024)],
        );
        assert!(!exists(&s, 7), "freed to make room");
        let st = s.read();
        assert_eq!(st.load_before(Oid(7), t2), Ok(None));
        assert!(
            matches!(
                st.load_serial(Oid(7), t1),
                Err(StorageError::Conflict { .. })
            ),
            "{:?}",
            st.load_serial(Oid(7), t1)
        );
        // An oid never stored is still POSKeyError at a recent snapshot.
        let never = s.new_oids(1).unwrap()[0];
        assert!(matches!(
            st.load_before(never, Tid::MAX),
            Err(StorageError::PosKey { .. })
        ));
    }

    /// A vote that does not fit runs a whole collection only if something
    /// was committed or dropped since the last one under pressure: it
    /// could free nothing more.
    #[test]
    fn no_collection_rerun_for_votes_while_nothing_can_be_freed() {
        let (s, _) = limited(20 * 1024);
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let root = commit(
            &s,
            vec![store(0, root, &[5]), big(5, Tid::ZERO, &[], 15 * 1024)],
        );
        let cycles = || s.gc_stats.collections.load(Ordering::Relaxed);
        let too_big = || vec![big(6, Tid::ZERO, &[], 10 * 1024)];
        assert!(s.short_of_room(&too_big()));
        assert!(try_commit(&s, too_big()).is_err());
        let after_first = cycles();
        assert!(after_first >= 1, "the first vote collected");
        for _ in 0..5 {
            let err = try_commit(&s, too_big()).unwrap_err();
            assert!(err.to_string().contains("memory-limit"), "{err}");
        }
        assert_eq!(cycles(), after_first, "nothing changed: no new cycle");
        // A commit may have made garbage: the next vote collects again.
        commit(&s, vec![store(0, root, &[5]), store(9, Tid::ZERO, &[])]);
        assert!(try_commit(&s, too_big()).is_err());
        assert_eq!(cycles(), after_first + 1);
    }

    /// A record may not link an object whose current revision is a
    /// deletion (pruning removes it: the reference would dangle), nor one
    /// its own transaction deletes: a retryable ConflictError.
    #[test]
    fn linking_a_deleted_object_is_a_conflict() {
        let s = storage();
        let root = s.read().get_tid(Oid::ROOT).unwrap();
        let root = commit(
            &s,
            vec![
                store(0, root, &[3, 4]),
                store(3, Tid::ZERO, &[]),
                store(4, Tid::ZERO, &[]),
            ],
        );
        let t3 = s.read().get_tid(Oid(3)).unwrap();
        let root = commit(
            &s,
            vec![
                store(0, root, &[4]),
                TxnOp::Delete {
                    oid: Oid(3),
                    serial: t3,
                },
            ],
        );
        let err = try_commit(&s, vec![store(0, root, &[3, 4])]).unwrap_err();
        assert!(
            matches!(&err, StorageError::Conflict { reason: Some(r), .. } if r.contains("deleted")),
            "{err:?}"
        );
        let t4 = s.read().get_tid(Oid(4)).unwrap();
        let err = try_commit(
            &s,
            vec![
                store(0, root, &[4]),
                TxnOp::Delete {
                    oid: Oid(4),
                    serial: t4,
                },
            ],
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::Conflict { .. }), "{err:?}");
        // Nothing of either was committed.
        assert_eq!(s.read().get_tid(Oid::ROOT).unwrap(), root);
        assert!(exists(&s, 4));
    }

    #[test]
    fn non_pickle_records_have_no_references() {
        assert_eq!(crate::storage::scan_refs(b"x").as_deref(), Some(&[][..]));
    }

    /// The objects reachable from the root in the snapshot at `at`
    /// (revisions with tid <= at), per the test's own model.
    fn reachable(model: &HashMap<u64, Vec<(Tid, Vec<u64>)>>, at: Tid) -> HashSet<u64> {
        let mut seen = HashSet::from([0]);
        let mut todo = vec![0];
        while let Some(o) = todo.pop() {
            let Some(revs) = model.get(&o) else { continue };
            let Some((_, refs)) = revs.iter().rev().find(|(t, _)| *t <= at) else {
                continue;
            };
            for r in refs {
                if seen.insert(*r) {
                    todo.push(*r);
                }
            }
        }
        seen
    }

    /// Random object graphs, commits racing a collector thread, random
    /// packs; then every snapshot since the last pack must still load every
    /// object it can reach, and after a final pack exactly the garbage is
    /// gone.
    #[test]
    fn gc_never_frees_what_a_retained_snapshot_reaches() {
        for seed in 1..=32u64 {
            let s = Arc::new(storage());
            // One object per lock hold: commits interleave with every step.
            s.set_gc_chunk(1);
            let root_tid = s.read().get_tid(Oid::ROOT).unwrap();
            let mut model: HashMap<u64, Vec<(Tid, Vec<u64>)>> =
                HashMap::from([(0, vec![(root_tid, vec![])])]);
            let mut rng = crate::rng::XorShift64::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut next_oid = 1u64;
            let mut tids = vec![root_tid];
            let mut packed_to = Tid::ZERO;
            let stop = Arc::new(AtomicBool::new(false));
            let collector = {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        s.collect(Tid::MAX);
                    }
                })
            };
            for round in 0..300 {
                // Objects that exist now, reachable or not: linking to garbage
                // that is not freed yet brings it back (the commit barrier
                // must notice); if the collector frees it first, the vote
                // fails with a ConflictError, as a client would see and retry.
                let mut alive: Vec<u64> = {
                    let st = s.read();
                    model
                        .keys()
                        .copied()
                        .filter(|o| st.load_before(Oid(*o), Tid::MAX).is_ok())
                        .collect()
                };
                alive.sort_unstable();
                let mut ops = Vec::new();
                let mut written = HashSet::new();
                for _ in 0..1 + rng.below(4) {
                    // Rewrite an existing object, or create a new one linked
                    // from a rewritten one.
                    let target = if rng.below(3) == 0 {
                        0
                    } else {
                        alive[rng.below(alive.len())]
                    };
                    if !written.insert(target) {
                        continue;
                    }
                    let mut refs: Vec<u64> = (0..rng.below(4))
                        .map(|_| alive[rng.below(alive.len())])
                        .collect();
                    if rng.below(2) == 0 {
                        let new = next_oid;
                        next_oid += 1;
                        written.insert(new);
                        refs.push(new);
                        ops.push((new, vec![]));
                    }
                    ops.push((target, refs));
                }
                let txn: Vec<TxnOp> = ops
                    .iter()
                    .map(|(o, refs)| {
                        let serial = model
                            .get(o)
                            .and_then(|r| r.last())
                            .map_or(Tid::ZERO, |(t, _)| *t);
                        store(*o, serial, refs)
                    })
                    .collect();
                let tid = match try_commit(&s, txn) {
                    Ok(tid) => tid,
                    Err(crate::storage::StorageError::Conflict { .. }) => continue,
                    Err(e) => panic!("seed {seed}: {e:?}"),
                };
                for (o, refs) in ops {
                    model.entry(o).or_default().push((tid, refs));
                }
                tids.push(tid);
                if round % 50 == 49 {
                    // Drop history older than a random past commit.
                    let t = tids[rng.below(tids.len())];
                    if t > packed_to {
                        s.pack(t);
                        packed_to = t;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            collector.join().unwrap();
            s.collect(Tid::MAX);
            // Every snapshot not older than the last pack reads everything
            // it can reach.
            let st = s.read();
            for at in tids.iter().filter(|t| **t >= packed_to) {
                for o in reachable(&model, *at) {
                    let loaded = st.load_before(Oid(o), Tid(at.0 + 1));
                    assert!(
                        matches!(loaded, Ok(Some(_))),
                        "seed {seed}: oid {o} reachable at {at} but load gave {loaded:?}"
                    );
                }
            }
            drop(st);
            // With all history dropped, exactly the current garbage goes.
            let last = *tids.last().unwrap();
            s.pack(Tid(last.0 + 1));
            s.collect(Tid::MAX);
            let live = reachable(&model, last);
            let st = s.read();
            assert_eq!(
                st.len(),
                live.len(),
                "seed {seed}: only the reachable objects are left"
            );
            for o in live {
                assert!(st.load_before(Oid(o), Tid::MAX).is_ok());
            }
        }
    }
}
