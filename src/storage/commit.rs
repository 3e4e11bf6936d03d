//! Two-phase commit: a [`Transaction`] buffers a client's operations,
//! takes its place at the storage's commit lock ([`Transaction::lock`]),
//! votes ([`Transaction::vote`]: the operations checked against the current
//! state while the lock is held, so nothing changes until `finish`) and
//! commits ([`Transaction::finish`]). Conflicts on stores are returned to
//! the client for resolution (ZEO 5's client-conflict-resolution); the
//! commit lock stays with the transaction through its resolution round.
//!
//! The commit lock is always released: a [`Transaction`] holds its claim on
//! it (waiting in line, or holding it), and dropping the transaction, after
//! `finish` or without it (`tpc_abort`, a failed vote, a disconnect, a
//! timeout, the session's `Drop`), leaves the line or hands the lock to the
//! next live waiter. The transaction also bumps the storage's counters
//! ([`Stats`](crate::storage::Stats)) for each of its steps.
//!
//! Only the server's shutdown takes the lock without a transaction
//! ([`Storage::lock_ahead`] as [`SHUTDOWN_HOLDER`]), and keeps it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::protocol::ids::{Oid, Tid};
use crate::storage::stats::VoteRefusal;
use crate::storage::{
    ClassName, ConnId, GONE, Refs, Revision, Storage, StorageError, StorageState, TxnMeta,
    accounted_size, refs, scan_record,
};

/// The commit-lock holder id of the server itself at shutdown (connection
/// ids count up from 1).
pub const SHUTDOWN_HOLDER: ConnId = u64::MAX;

/// The commit lock of one storage: at most one transaction between its
/// `vote` and its `tpc_finish`/`tpc_abort`; other voters wait in line.
#[derive(Debug, Default)]
pub struct CommitLock {
    holder: Option<ConnId>,
    since: Option<Instant>,
    waiters: VecDeque<(ConnId, oneshot::Sender<()>)>,
}

/// What asking for the commit lock gives back.
pub enum LockAttempt {
    Acquired,
    /// Wait for this to fire; the lock is then already ours.
    Wait(oneshot::Receiver<()>),
}

/// An operation buffered in a transaction, checked at vote.
#[derive(Debug, Clone)]
pub enum TxnOp {
    Store {
        oid: Oid,
        serial: Tid,
        data: Bytes,
        refs: Refs,
        /// The record's class, for the class table.
        class: ClassName,
    },
    CheckCurrent {
        oid: Oid,
        serial: Tid,
    },
    Delete {
        oid: Oid,
        serial: Tid,
    },
}

impl TxnOp {
    /// A store; its record is scanned for references and its class here,
    /// on the connection's own task, outside every lock.
    pub fn store(oid: Oid, serial: Tid, data: Bytes) -> TxnOp {
        let (refs, class) = scan_record(&data);
        TxnOp::Store {
            oid,
            serial,
            data,
            refs,
            class,
        }
    }

    /// Bytes this operation will add to the storage if committed.
    fn accounted(&self) -> usize {
        match self {
            TxnOp::Store { data, refs, .. } => accounted_size(Some(data), refs),
            TxnOp::Delete { .. } => accounted_size(None, &Some(Box::new([]))),
            TxnOp::CheckCurrent { .. } => 0,
        }
    }
}

/// A write conflict handed back to the client from `vote`, for it to
/// resolve (`{'oid', 'serials': (committed, read), 'data'}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub oid: Oid,
    pub committed: Tid,
    pub read: Tid,
    pub data: Bytes,
}

/// The write set a successful vote produced, applied by `finish`.
#[derive(Debug, Default)]
pub struct VotedTxn {
    writes: WriteSet,
}

impl VotedTxn {
    pub fn oids(&self) -> impl Iterator<Item = Oid> + '_ {
        self.writes.iter().map(|(oid, ..)| *oid)
    }
}

/// What a vote found: the transaction can commit, or some of its stores
/// conflict and go back to the client for resolution. (A conflict the
/// client cannot resolve is an `Err` of the vote instead.)
#[derive(Debug)]
pub enum Vote {
    Voted(VotedTxn),
    Conflicts(Vec<Conflict>),
}

#[cfg(test)]
impl Vote {
    /// For tests: the write set, or the conflicts.
    pub(crate) fn into_result(self) -> Result<VotedTxn, Vec<Conflict>> {
        match self {
            Vote::Voted(v) => Ok(v),
            Vote::Conflicts(c) => Err(c),
        }
    }
}

/// One transaction of connection `conn` on a storage, from `tpc_begin` to
/// its end. Dropping it ends it: it leaves the commit lock's line or
/// releases the lock, and counts as an abort unless it was finished.
pub struct Transaction {
    storage: Arc<Storage>,
    conn: ConnId,
    /// The buffered operations, checked at vote.
    ops: Vec<TxnOp>,
    /// Conflicts handed back by the last vote: resolved if a later vote
    /// succeeds.
    resolving: usize,
    finished: bool,
}

impl Storage {
    /// Begins a transaction of connection `conn` (`tpc_begin`).
    pub fn begin(self: &Arc<Self>, conn: ConnId) -> Transaction {
        self.stats.active_txns.fetch_add(1, Ordering::Relaxed);
        Transaction {
            storage: self.clone(),
            conn,
            ops: Vec::new(),
            resolving: 0,
            finished: false,
        }
    }
}

impl Transaction {
    /// Buffers one operation for the vote.
    pub fn buffer(&mut self, op: TxnOp) {
        if matches!(op, TxnOp::Store { .. }) {
            self.storage.stats.stores.fetch_add(1, Ordering::Relaxed);
        }
        self.ops.push(op);
    }

    /// Drops the buffered operations (the transaction was refused: its
    /// vote will fail).
    pub fn discard_ops(&mut self) {
        self.ops = Vec::new();
    }

    /// Counts the vote of a transaction refused before it reached the
    /// storage (its vote fails without voting), for `reason`.
    pub fn refused_vote(&self, reason: VoteRefusal) {
        self.storage.stats.votes_refused.bump(reason);
    }

    /// Asks for the commit lock; a repeated call while holding it (the
    /// resolution round) gets it at once.
    pub fn lock(&mut self) -> LockAttempt {
        self.storage.try_lock(self.conn)
    }

    /// True if the buffered operations do not fit under the memory limit
    /// as things are: the vote will drop history and may run a whole
    /// collection, a job for a thread that serves no other connection.
    pub fn short_of_room(&self) -> bool {
        self.storage.short_of_room(&self.ops)
    }

    /// Votes the buffered operations (see `Storage::vote`). Call with the
    /// commit lock held. After a successful vote the write set holds the
    /// records, and the buffer is dropped (so `finish` copies nothing).
    pub fn vote(&mut self) -> Result<Vote, StorageError> {
        let vote = self.storage.vote(&self.ops);
        let stats = &self.storage.stats;
        match &vote {
            Ok(Vote::Voted(_)) => {
                if self.resolving > 0 {
                    stats
                        .conflicts_resolved
                        .fetch_add(self.resolving as u64, Ordering::Relaxed);
                }
                self.ops = Vec::new();
            }
            Ok(Vote::Conflicts(conflicts)) => {
                self.resolving = conflicts.len();
                stats
                    .conflicts
                    .fetch_add(conflicts.len() as u64, Ordering::Relaxed);
            }
            Err(StorageError::Conflict { .. } | StorageError::ReadConflict { .. }) => {
                stats.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        vote
    }

    /// Commits what the vote produced (see `Storage::finish`: `then`
    /// runs inside the commit's write-locked section), then releases the
    /// commit lock.
    pub fn finish<R>(
        mut self,
        voted: VotedTxn,
        meta: TxnMeta,
        then: impl FnOnce(Tid, usize, usize) -> R,
    ) -> R {
        let r = self.storage.finish(self.conn, voted, meta, then);
        self.finished = true;
        r
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.storage.unlock(self.conn);
        let stats = &self.storage.stats;
        stats.active_txns.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            stats.aborts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Storage {
    fn commit_lock(&self) -> std::sync::MutexGuard<'_, CommitLock> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for the commit lock for connection `id` (a [`Transaction`]
    /// does, in [`Transaction::lock`]).
    pub(super) fn try_lock(&self, id: ConnId) -> LockAttempt {
        self.ask_lock(id, false)
    }

    /// Like [`Transaction::lock`], but ahead of every waiter. At shutdown the
    /// server takes each commit lock this way (as [`SHUTDOWN_HOLDER`]) and
    /// keeps it: the transaction holding it finishes or aborts, no other
    /// one votes, and every commit acknowledged before the connections
    /// close was announced to every client still connected.
    pub fn lock_ahead(&self, id: ConnId) -> LockAttempt {
        self.ask_lock(id, true)
    }

    fn ask_lock(&self, id: ConnId, ahead: bool) -> LockAttempt {
        let mut lk = self.commit_lock();
        if lk.holder.is_none() || lk.holder == Some(id) {
            lk.holder = Some(id);
            lk.since = Some(Instant::now());
            return LockAttempt::Acquired;
        }
        let (tx, rx) = oneshot::channel();
        if ahead {
            lk.waiters.push_front((id, tx));
        } else {
            lk.waiters.push_back((id, tx));
        }
        LockAttempt::Wait(rx)
    }

    /// Releases the lock if `id` holds it, and drops `id` from the waiters;
    /// the next live waiter gets the lock. Safe to call more than once.
    pub(super) fn unlock(&self, id: ConnId) {
        // The holder's transaction ends: release what its vote pinned. (Not
        // under the commit-lock mutex: server_status takes the two locks in
        // the other order.)
        if self.commit_lock().holder == Some(id) {
            self.read().unpin();
        }
        let mut lk = self.commit_lock();
        lk.waiters.retain(|(wid, _)| *wid != id);
        if lk.holder != Some(id) {
            return;
        }
        lk.holder = None;
        lk.since = None;
        while let Some((wid, tx)) = lk.waiters.pop_front() {
            // A waiter whose connection is gone has dropped its receiver.
            if tx.send(()).is_ok() {
                lk.holder = Some(wid);
                lk.since = Some(Instant::now());
                break;
            }
        }
    }

    /// (holder's lock age in seconds, number of waiters), for server_status.
    pub fn lock_status(&self) -> (Option<f64>, usize) {
        let lk = self.commit_lock();
        (
            lk.since.map(|s| s.elapsed().as_secs_f64()),
            lk.waiters.len(),
        )
    }

    /// Checks a transaction's operations against the current state. Call
    /// with the commit lock held, so nothing changes until `finish`.
    ///
    /// Returns the write set, or the conflicts for the client to resolve
    /// (a store whose serial is not the current tid; a later store of the
    /// same oid in the same transaction supersedes an earlier conflicting
    /// one, which is how resolved data comes back). A failed
    /// `checkCurrentSerialInTransaction` is a ReadConflictError, a
    /// conflicting delete a ConflictError: neither can be resolved.
    ///
    /// A record that references an object this storage does not have (and
    /// that the transaction does not create) is refused with a
    /// ConflictError: it comes from a view older than the retention window,
    /// and committing it would leave a dangling reference. The client
    /// retries from a fresh snapshot. An object the collector has condemned
    /// counts as gone already (referencing, storing on or deleting it is a
    /// ConflictError): what it references may be freed, see [`gc`]. While
    /// the collector frees, a record that cannot be scanned is refused the
    /// same way, as it might reference a condemned object.
    ///
    /// If the transaction would take the process over its memory budget
    /// (all storages together, see [`super::budget`]), this storage's old
    /// history is dropped and its garbage collected first; if that is not
    /// enough the vote fails with an error naming the limit.
    pub(super) fn vote(&self, ops: &[TxnOp]) -> Result<Vote, StorageError> {
        let incoming = self.read().net_incoming(ops);
        self.ensure_room(incoming)?;
        let st = self.read();
        let CheckedOps {
            writes,
            index,
            conflicts,
        } = st.check_ops(ops)?;
        // A conflicting store that was never superseded must not also commit
        // an older store of the same oid from earlier in the transaction.
        if !conflicts.is_empty() {
            return Ok(Vote::Conflicts(conflicts));
        }
        let (pinned, unscannable) = st.check_references(&writes, &index)?;
        // Until this transaction ends, no cycle condemns what it writes or
        // links to (nor anything, if a record's references are unknown).
        st.pin(pinned, unscannable);
        Ok(Vote::Voted(VotedTxn { writes }))
    }

    /// True if `ops` do not fit under the memory budget as things are:
    /// their vote will drop history and may run a whole collection, a job
    /// for a thread that serves no other connection (the caller's
    /// `blocking`).
    pub(super) fn short_of_room(&self, ops: &[TxnOp]) -> bool {
        let st = self.read();
        st.limits.memory.over_by(st.net_incoming(ops)) > 0
    }

    /// Makes room for `incoming` accounted bytes under the process's
    /// budget: drops this storage's oldest non-current revisions first,
    /// then collects its garbage, unless nothing was committed or dropped
    /// here since the last collection under pressure (it could free nothing
    /// more). What the other storages hold counts, but only this one is
    /// trimmed: its commit lock is held, theirs are not.
    fn ensure_room(&self, incoming: usize) -> Result<(), StorageError> {
        let budget = Arc::clone(&self.read().limits.memory);
        let need = budget.over_by(incoming);
        if need == 0 {
            return Ok(());
        }
        // Beyond what this vote needs, some headroom: the next votes fit
        // without trimming again (one vote at a time, each dropping a few
        // revisions and running a whole collection, fragmented the heap:
        // RSS crept up while the accounted bytes stayed at the limit).
        let dropped = self
            .write()
            .drop_oldest_history(need + budget.pressure_headroom());
        // Still over, and something changed since the last collection
        // under pressure: collect, and remember where this one started.
        let collect_at = {
            let st = self.read();
            (budget.over_by(incoming) > 0 && st.pressure_collected_at != Some(st.changes))
                .then_some(st.changes)
        };
        if let Some(changes) = collect_at {
            // Under memory pressure, even recently written unreachable
            // objects go.
            self.collect(Tid::MAX);
            self.write().pressure_collected_at = Some(changes);
        }
        if budget.over_by(incoming) == 0 {
            // Debug: under steady pressure this is every vote.
            tracing::debug!(storage = %self.name, dropped, "memory limit: made room by dropping old revisions and collecting");
            return Ok(());
        }
        let here = self.read().accounted;
        let msg = format!(
            "zeotemp storage {:?} is full: this transaction needs {incoming} bytes; the memory limit of {limit} bytes \
             (memory-limit, for all storages) holds {accounted_limit} bytes of objects (the rest is the allocator's \
             overhead), and {used} are in use by reachable objects and their current revisions ({here} in this storage)",
            self.name,
            limit = budget.limit().unwrap_or_default(),
            accounted_limit = budget.accounted_limit().unwrap_or_default(),
            used = budget.accounted(),
        );
        // At a small limit this is every vote: rate-limited.
        crate::warn_repeated!([] "{msg}");
        self.stats.votes_refused.bump(VoteRefusal::MemoryLimit);
        Err(StorageError::Storage(msg))
    }

    /// Makes a voted transaction visible under a new tid. Inside the same
    /// write-locked section it hands the invalidation to every subscriber
    /// but `committer`, then calls `then(tid, length, size)` (which enqueues
    /// the committer's `info` and reply). Call with the commit lock held.
    pub(super) fn finish<R>(
        &self,
        committer: ConnId,
        txn: VotedTxn,
        meta: TxnMeta,
        then: impl FnOnce(Tid, usize, usize) -> R,
    ) -> R {
        let mut st = self.write();
        let tid = self.clock.next_tid_after(st.last_tid);
        let meta = Arc::new(meta);
        let mut oids = Vec::with_capacity(txn.writes.len());
        for (oid, data, refs, class) in txn.writes {
            let class = st.classes.intern(class.as_deref());
            st.put_revision(
                oid,
                Revision {
                    tid,
                    data: data.map(into_record),
                    refs,
                    meta: meta.clone(),
                },
                class,
            );
            oids.push(oid);
        }
        st.gc_barrier(&oids);
        st.unpin();
        self.dirty.fetch_add(1, Ordering::Relaxed);
        st.changes += 1;
        st.last_tid = tid;
        st.invalidations.push_front((tid, Some(oids.clone())));
        while st.invalidations.len() > st.limits.invalidation_queue_size {
            st.invalidations.pop_back();
        }
        for (sid, sub) in &st.subscribers {
            if *sid != committer {
                sub.invalidate(tid, &oids);
            }
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let (length, size) = (st.objects.len(), st.current_bytes);
        then(tid, length, size)
    }
}

/// A stored record from the bytes a client sent. Without a copy when the
/// transaction holds the only reference (the session drops its buffered
/// operations once the vote succeeded), so `finish` costs no memcpy under
/// the lock even for a large object.
fn into_record(data: Bytes) -> Box<[u8]> {
    Vec::from(data).into_boxed_slice()
}

fn set_write(
    writes: &mut WriteSet,
    index: &mut HashMap<Oid, usize>,
    oid: Oid,
    data: Option<Bytes>,
    refs: Refs,
    class: ClassName,
) {
    match index.get(&oid) {
        Some(&i) => writes[i] = (oid, data, refs, class),
        None => {
            index.insert(oid, writes.len());
            writes.push((oid, data, refs, class));
        }
    }
}

/// A vote's write set: `(oid, record or None for a deletion, references,
/// class)`.
type WriteSet = Vec<(Oid, Option<Bytes>, Refs, ClassName)>;

/// What the first step of a vote found.
struct CheckedOps {
    writes: WriteSet,
    /// Each written oid's index in `writes`.
    index: HashMap<Oid, usize>,
    /// Stores to hand back for resolution.
    conflicts: Vec<Conflict>,
}

impl StorageState {
    /// Accounted bytes `ops` add that memory pressure cannot take back:
    /// each new revision, less the current revisions they replace (once
    /// replaced, those are history, which the next vote under pressure
    /// drops). So when the storages are full, a commit that rewrites or
    /// unlinks objects without growing them still goes through (a session
    /// touched again, an expiry that only unlinks old sessions: they are
    /// garbage once it commits); one that grows what is reachable fails.
    /// (Every commit was counted whole: once full, rewriting an object of
    /// the same size failed too.)
    pub(super) fn net_incoming(&self, ops: &[TxnOp]) -> usize {
        let mut replaced = std::collections::HashSet::new();
        let mut adds = 0usize;
        let mut frees = 0usize;
        for op in ops {
            let oid = match op {
                TxnOp::Store { oid, .. } | TxnOp::Delete { oid, .. } => *oid,
                TxnOp::CheckCurrent { .. } => continue,
            };
            adds += op.accounted();
            if replaced.insert(oid) {
                frees += self
                    .objects
                    .get(&oid)
                    .and_then(|o| o.revisions.last())
                    .map_or(0, Revision::accounted);
            }
        }
        adds.saturating_sub(frees)
    }

    /// The first step of a vote: each operation checked against the
    /// current state. Returns the write set (a later store of an oid
    /// replaces an earlier one) and the conflicts to hand back.
    fn check_ops(&self, ops: &[TxnOp]) -> Result<CheckedOps, StorageError> {
        let st = self;
        let mut conflicts: Vec<Conflict> = Vec::new();
        let mut writes: WriteSet = Vec::new();
        let mut index: HashMap<Oid, usize> = HashMap::new();
        for op in ops {
            match op {
                TxnOp::Store {
                    oid,
                    serial,
                    data,
                    refs,
                    class,
                } => {
                    // A store the client cannot resolve: the object is gone.
                    let gone = || StorageError::Conflict {
                        oid: *oid,
                        committed: Tid::ZERO,
                        read: *serial,
                        class_name: refs::class_name(data),
                        reason: Some(GONE.into()),
                    };
                    if st.condemned(*oid) {
                        // Garbage the collector is freeing: the client's
                        // view is older than anything retained.
                        return Err(gone());
                    }
                    let current = st.current_tid(*oid);
                    if current.unwrap_or(Tid::ZERO) != *serial {
                        if current.is_none() {
                            // Storing on top of a revision this storage never
                            // had (an object from before a restart, or one
                            // that was deleted): nothing to resolve against.
                            return Err(gone());
                        }
                        conflicts.retain(|c| c.oid != *oid);
                        conflicts.push(Conflict {
                            oid: *oid,
                            committed: current.unwrap_or(Tid::ZERO),
                            read: *serial,
                            data: data.clone(),
                        });
                        continue;
                    }
                    conflicts.retain(|c| c.oid != *oid);
                    set_write(
                        &mut writes,
                        &mut index,
                        *oid,
                        Some(data.clone()),
                        refs.clone(),
                        class.clone(),
                    );
                }
                TxnOp::CheckCurrent { oid, serial } => {
                    let current = st.current_tid(*oid).unwrap_or(Tid::ZERO);
                    if current != *serial {
                        return Err(StorageError::ReadConflict {
                            oid: *oid,
                            committed: current,
                            read: *serial,
                        });
                    }
                }
                TxnOp::Delete { oid, serial } => {
                    let current = st.current_tid(*oid).unwrap_or(Tid::ZERO);
                    if current != *serial || st.condemned(*oid) {
                        return Err(StorageError::Conflict {
                            oid: *oid,
                            committed: current,
                            read: *serial,
                            class_name: None,
                            reason: None,
                        });
                    }
                    set_write(
                        &mut writes,
                        &mut index,
                        *oid,
                        None,
                        Some(Box::new([])),
                        None,
                    );
                }
            }
        }
        Ok(CheckedOps {
            writes,
            index,
            conflicts,
        })
    }

    /// The second step of a vote: every record's references name objects
    /// that exist after the transaction. Returns what the vote pins
    /// against the collector: the oids written and referenced, and those
    /// whose records could not be scanned.
    fn check_references(
        &self,
        writes: &WriteSet,
        index: &HashMap<Oid, usize>,
    ) -> Result<(Vec<Oid>, Vec<Oid>), StorageError> {
        let st = self;
        let mut pinned = Vec::new();
        let mut unscannable = Vec::new();
        for (oid, data, refs, _) in writes {
            pinned.push(*oid);
            let Some(refs) = refs else {
                if st.gc_sweeping() {
                    tracing::info!(%oid, "refused a record that cannot be scanned while garbage is being freed");
                    return Err(StorageError::Conflict {
                        oid: *oid,
                        committed: st.current_tid(*oid).unwrap_or(Tid::ZERO),
                        read: st.current_tid(*oid).unwrap_or(Tid::ZERO),
                        class_name: data.as_deref().and_then(refs::class_name),
                        reason: Some(
                            "zeotemp cannot scan this record for references while it frees \
                             garbage (it might link a freed object): retry"
                                .into(),
                        ),
                    });
                }
                unscannable.push(*oid);
                continue;
            };
            pinned.extend(refs.iter().copied().filter(|r| !index.contains_key(r)));
            // A reference must name an object that exists after this
            // transaction: one it writes, or one whose current revision is
            // not a deletion (pruning removes a deleted object, which would
            // leave the reference dangling) and that is not being freed.
            if let Some(missing) = refs.iter().find(|r| match index.get(r) {
                Some(&i) => writes[i].1.is_none(),
                None => st.current_tid(**r).is_none() || st.condemned(**r),
            }) {
                tracing::info!(%oid, %missing, "refused a record that references an object this storage does not hold (deleted, or being freed)");
                return Err(StorageError::Conflict {
                    oid: *oid,
                    committed: st.current_tid(*oid).unwrap_or(Tid::ZERO),
                    read: st.current_tid(*oid).unwrap_or(Tid::ZERO),
                    class_name: data.as_deref().and_then(refs::class_name),
                    reason: Some(format!(
                        "the record references {missing}, which this storage no longer holds \
                         (deleted, freed as garbage, or from before a server restart): the \
                         transaction read an outdated view; retry"
                    )),
                });
            }
        }
        Ok((pinned, unscannable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::{commit, storage, store};

    #[test]
    fn write_conflict_returned_for_resolution() {
        let s = storage();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        let t2 = commit(&s, vec![store(5, t1, b"two")]);
        // A client that read t1 stores again: conflict, handed back.
        let ops = vec![store(5, t1, b"mine")];
        let conflicts = s.vote(&ops).unwrap().into_result().unwrap_err();
        assert_eq!(
            conflicts,
            vec![Conflict {
                oid: Oid(5),
                committed: t2,
                read: t1,
                data: Bytes::from_static(b"mine")
            }]
        );
        // The client resolves and stores on top of t2: the re-vote succeeds.
        let mut ops = ops;
        ops.push(store(5, t2, b"resolved"));
        let voted = s.vote(&ops).unwrap().into_result().unwrap();
        assert_eq!(voted.oids().collect::<Vec<_>>(), vec![Oid(5)]);
    }

    #[test]
    fn new_object_on_existing_oid_conflicts() {
        let s = storage();
        commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        let r = s
            .vote(&[store(5, Tid::ZERO, b"again")])
            .unwrap()
            .into_result();
        assert!(r.is_err());
    }

    #[test]
    fn store_on_unknown_revision_is_conflict_error() {
        let s = storage();
        let err = s.vote(&[store(77, Tid(12345), b"x")]).unwrap_err();
        assert!(matches!(err, StorageError::Conflict { oid: Oid(77), .. }));
    }

    #[test]
    fn check_current_serial() {
        let s = storage();
        let t1 = commit(&s, vec![store(5, Tid::ZERO, b"one")]);
        let ok = s.vote(&[
            TxnOp::CheckCurrent {
                oid: Oid(5),
                serial: t1,
            },
            store(6, Tid::ZERO, b"n"),
        ]);
        assert!(ok.unwrap().into_result().is_ok());
        let t2 = commit(&s, vec![store(5, t1, b"two")]);
        let err = s
            .vote(&[TxnOp::CheckCurrent {
                oid: Oid(5),
                serial: t1,
            }])
            .unwrap_err();
        assert_eq!(
            err,
            StorageError::ReadConflict {
                oid: Oid(5),
                committed: t2,
                read: t1
            }
        );
    }

    #[test]
    fn commit_lock_queue() {
        let s = storage();
        assert!(matches!(s.try_lock(1), LockAttempt::Acquired));
        let LockAttempt::Wait(mut w2) = s.try_lock(2) else {
            panic!("2 must wait")
        };
        let LockAttempt::Wait(w3) = s.try_lock(3) else {
            panic!("3 must wait")
        };
        assert_eq!(s.lock_status().1, 2);
        // 2 goes away while waiting: 3 is next.
        drop(w3);
        s.unlock(1);
        assert!(w2.try_recv().is_ok());
        s.unlock(2);
        assert_eq!(s.lock_status(), (None, 0));
        assert!(matches!(s.try_lock(4), LockAttempt::Acquired));
        // unlock by a non-holder changes nothing.
        s.unlock(9);
        assert!(matches!(s.try_lock(5), LockAttempt::Wait(_)));
    }
}
