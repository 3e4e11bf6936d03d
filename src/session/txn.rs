//! The two-phase-commit state machine of one session: `tpc_begin`, the
//! buffered operations (`storea`, `checkCurrentSerialInTransaction`,
//! `deleteObject`), `vote` (waiting in line for the commit lock, and the
//! conflict-resolution rounds), `tpc_finish` and `tpc_abort`.
//!
//! The storage's side of each transaction is a [`Transaction`]: it holds
//! the claim on the commit lock, and dropping it (finish, abort, a failed
//! vote, a timeout, the session's `Drop`) releases the lock. A `tpc_finish`
//! reply and the `info` push before it are enqueued inside the commit's
//! write-locked section, so the client hears of its commit in commit order.

use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use crate::protocol::envelope::{self, Message, tid_value};
use crate::protocol::value::Value;
use crate::session::args::Args;
use crate::session::errors::{Res, ZeoError};
use crate::session::replies::{conflict_value, info_value};
use crate::session::{LockWait, Outcome, Session, blocking};
use crate::storage::stats::VoteRefusal;
use crate::storage::{LockAttempt, StorageError, Transaction, TxnMeta, TxnOp, Vote, VotedTxn};

#[derive(Debug)]
pub(super) enum TxnState {
    /// Collecting operations.
    Open,
    /// `vote` is waiting for the commit lock (the wait numbered `wait`);
    /// its msgid is kept here.
    Waiting { msgid: Value, wait: u64 },
    /// Holding the lock; the vote returned conflicts for the client to
    /// resolve; the next `vote` replays with its resolved stores.
    Resolving,
    /// Holding the lock after a successful vote; `tpc_finish` applies this.
    Voted(VotedTxn),
}

pub(super) struct Txn {
    pub(super) id: Value,
    pub(super) meta: TxnMeta,
    /// The storage's side: the buffered operations and the claim on the
    /// commit lock (dropping it aborts and releases the lock).
    pub(super) commit: Transaction,
    /// Bytes of data stored so far (for `max-transaction-bytes`).
    pub(super) bytes: usize,
    /// Set by a one-way call we cannot honour; the vote fails with it
    /// (and is counted as refused for the reason).
    pub(super) refused: Option<(VoteRefusal, ZeoError)>,
    pub(super) state: TxnState,
    pub(super) locked_at: Option<Instant>,
}

impl Session {
    pub(super) fn tpc_begin(&mut self, a: &Args) -> Res<Outcome> {
        a.count(4, 6)?;
        let reg = self.storage()?;
        if reg.read_only {
            return Err(ZeoError::ReadOnly);
        }
        let id = a.get(0).cloned().unwrap_or(Value::None);
        if let Some(txn) = &self.txn {
            if txn.id == id {
                return Ok(Outcome::Reply(Value::None)); // duplicate tpc_begin: ignored, as in ZEO
            }
            return Err(ZeoError::Transaction(
                "Multiple simultaneous tpc_begin requests from one client.".into(),
            ));
        }
        let meta = TxnMeta {
            user: a
                .bytes(1, "user")
                .or_else(|_| a.text(1, "user").map(Bytes::from))?,
            description: a
                .bytes(2, "description")
                .or_else(|_| a.text(2, "description").map(Bytes::from))?,
            extension: a.get(3).cloned().map_or(Value::None, |mut e| {
                // A py2 client's str, as every reader of history() can take it.
                e.py2_strs_as_py3();
                e
            }),
        };
        let given_tid = a.get(4).is_some_and(|v| *v != Value::None);
        let status = a
            .get(5)
            .and_then(|v| v.as_text().map(|t| t.into_owned()))
            .unwrap_or_else(|| " ".into());
        let refused = (given_tid || status != " ").then(|| {
            (
                VoteRefusal::Unsupported,
                ZeoError::Unsupported(
                    "tpc_begin with an explicit tid or status (copy/restore tools) is not supported"
                        .into(),
                ),
            )
        });
        self.txn = Some(Txn {
            id,
            meta,
            commit: reg.storage.begin(self.id),
            bytes: 0,
            refused,
            state: TxnState::Open,
            locked_at: None,
        });
        Ok(Outcome::Reply(Value::None))
    }

    /// The current transaction if `id` names it.
    fn txn_for(&mut self, method: &str, id: Option<&Value>) -> Res<&mut Txn> {
        match (&mut self.txn, id) {
            (Some(txn), Some(id)) if txn.id == *id => Ok(txn),
            (Some(_), _) => Err(ZeoError::Transaction(format!(
                "{method}(): not the current transaction"
            ))),
            (None, _) => Err(ZeoError::Transaction(format!(
                "{method}(): no transaction in progress (tpc_begin first)"
            ))),
        }
    }

    pub(super) fn buffer_op(&mut self, method: &str, a: &Args) -> Res<Outcome> {
        let (n, op) = match method {
            "storea" => {
                a.count(4, 4)?;
                let data = a.bytes(2, "data")?;
                // The record's references are scanned here, outside every lock.
                (3, TxnOp::store(a.oid(0)?, a.store_serial(1)?, data))
            }
            "checkCurrentSerialInTransaction" => {
                a.count(3, 3)?;
                (
                    2,
                    TxnOp::CheckCurrent {
                        oid: a.oid(0)?,
                        serial: a.tid(1, "serial")?,
                    },
                )
            }
            _ => {
                a.count(3, 3)?;
                (
                    2,
                    TxnOp::Delete {
                        oid: a.oid(0)?,
                        serial: a.tid(1, "serial")?,
                    },
                )
            }
        };
        let max = self.shared.config.max_transaction_bytes;
        let txn = self.txn_for(method, a.get(n))?;
        if !matches!(txn.state, TxnState::Open | TxnState::Resolving) {
            return Err(ZeoError::Transaction(format!("{method}() after vote")));
        }
        if txn.refused.is_some() {
            return Ok(Outcome::Reply(Value::None));
        }
        if let TxnOp::Store { data, .. } = &op {
            txn.bytes += data.len();
        }
        // (Counted as a store even when it takes the transaction too far.)
        txn.commit.buffer(op);
        if txn.bytes > max {
            txn.commit.discard_ops();
            txn.refused = Some((
                VoteRefusal::TransactionSize,
                ZeoError::Storage(StorageError::Storage(format!(
                    "transaction too large: more than {max} bytes of data (max-transaction-bytes)"
                ))),
            ));
        }
        Ok(Outcome::Reply(Value::None))
    }

    pub(super) fn vote(&mut self, msg: &Message, a: &Args) -> Res<Outcome> {
        a.count(1, 1)?;
        let storage = self.storage()?.storage.clone();
        // The number this vote waits as, if it must wait for the lock.
        let wait = {
            self.waits += 1;
            self.waits
        };
        let txn = self.txn_for("vote", a.get(0))?;
        match txn.state {
            TxnState::Open => {}
            // The lock is still ours from the first round.
            TxnState::Resolving => return Ok(self.run_vote(&msg.msgid)),
            TxnState::Waiting { .. } => {
                return Err(ZeoError::Transaction("Already voting (waiting)".into()));
            }
            TxnState::Voted(_) => {
                return Err(ZeoError::Transaction("Already voting (locked)".into()));
            }
        }
        if txn.refused.is_some() {
            // `run_vote` fails it, without waiting for the lock first.
            return Ok(self.run_vote(&msg.msgid));
        }
        match txn.commit.lock() {
            LockAttempt::Acquired => {
                txn.locked_at = Some(Instant::now());
                Ok(self.run_vote(&msg.msgid))
            }
            LockAttempt::Wait(granted) => {
                txn.state = TxnState::Waiting {
                    msgid: msg.msgid.clone(),
                    wait,
                };
                debug!(peer = %self.label(), storage = storage.name(), "vote waits for the commit lock");
                Ok(Outcome::Wait(LockWait { wait, granted }))
            }
        }
    }

    /// The commit lock came free for the vote that waited as `wait`. A
    /// grant for any other wait is stale and changes nothing: its
    /// transaction was aborted since, which released the lock (or took the
    /// vote out of the line) already.
    pub fn lock_granted(&mut self, wait: u64) {
        let Some(txn) = self.txn.as_mut() else { return };
        if !matches!(txn.state, TxnState::Waiting { wait: w, .. } if w == wait) {
            return;
        }
        let TxnState::Waiting { msgid, .. } = std::mem::replace(&mut txn.state, TxnState::Open)
        else {
            return;
        };
        txn.locked_at = Some(Instant::now());
        let _ = self.run_vote(&msgid);
    }

    /// Votes with the commit lock held and sends the reply.
    ///
    /// Every way to a vote (first round, resolution round, lock granted)
    /// ends here, so this is where a refused transaction fails (also
    /// without the lock, when `vote` finds it refused already): whatever
    /// refused it (max-transaction-bytes, a call zeotemp does not support,
    /// an explicit tid) also dropped its buffered operations, and voting
    /// what is left would commit an incomplete transaction and report
    /// success.
    fn run_vote(&mut self, msgid: &Value) -> Outcome {
        let Some(txn) = self.txn.as_mut() else {
            return Outcome::Sent;
        };
        if let Some((reason, err)) = txn.refused.clone() {
            txn.commit.refused_vote(reason);
            // A warning (README: `journalctl -p warning` shows refusals),
            // rate-limited: a client looping on a too-large transaction
            // would be one per vote.
            let err_text = err.to_string();
            let err_text = err_text.escape_debug();
            crate::warn_repeated!(
                [peer = %self.label(), err = %err_text,] "vote of a refused transaction"
            );
            self.abort_txn(true);
            self.reply_error(msgid, &err);
            return Outcome::Sent;
        }
        let commit = &mut txn.commit;
        let voted = if commit.short_of_room() {
            // Making room may run a whole collection (tens of ms at 200k
            // objects): off this runtime worker, so that the connections
            // it serves (all of them with the default `threads = 1`) go on.
            blocking(|| commit.vote())
        } else {
            commit.vote()
        };
        match voted {
            Ok(Vote::Voted(voted)) => {
                txn.state = TxnState::Voted(voted);
                self.reply(msgid, &Value::List(vec![]));
            }
            Ok(Vote::Conflicts(conflicts)) => {
                txn.state = TxnState::Resolving;
                debug!(peer = %self.label(), n = conflicts.len(), "vote: conflicts handed to the client");
                let list = conflicts.into_iter().map(conflict_value).collect();
                self.reply(msgid, &Value::List(list));
            }
            Err(err) => {
                debug!(peer = %self.label(), err = %err.to_string().escape_debug(), "vote failed");
                self.abort_txn(true);
                self.reply_error(msgid, &ZeoError::Storage(err));
            }
        }
        Outcome::Sent
    }

    pub(super) fn tpc_finish(&mut self, msg: &Message, a: &Args) -> Res<Outcome> {
        a.count(1, 1)?;
        let storage = self.storage()?.storage.clone();
        let txn = self.txn_for("tpc_finish", a.get(0))?;
        if !matches!(txn.state, TxnState::Voted(_)) {
            return Err(ZeoError::Transaction(
                "tpc_finish() without a successful vote()".into(),
            ));
        }
        // Checked just above; the transaction ends here.
        let Some(Txn {
            state: TxnState::Voted(voted),
            meta,
            commit,
            ..
        }) = self.txn.take()
        else {
            return Err(ZeoError::Transaction(
                "tpc_finish() without a successful vote()".into(),
            ));
        };
        let n = voted.oids().count();
        let (outbox, encoding, msgid) = (&self.outbox, self.encoding(), &msg.msgid);
        // Commits, then releases the commit lock.
        let tid = commit.finish(voted, meta, |tid, length, size| {
            outbox.push(envelope::encode_call(
                encoding,
                "info",
                &info_value(length, size),
            ));
            outbox.push(envelope::encode_reply(encoding, msgid, &tid_value(tid)));
            tid
        });
        self.counts.commits += 1;
        debug!(peer = %self.label(), storage = storage.name(), %tid, objects = n, "committed");
        Ok(Outcome::Sent)
    }

    /// A one-way call of a transaction that zeotemp cannot honour (see
    /// `UNSUPPORTED_ONEWAY`): accepted, and the transaction's vote fails
    /// with `err` (closing would leave client and server disagreeing about
    /// the transaction). Outside a transaction, or called synchronously,
    /// it is simply `err`.
    pub(super) fn refuse_txn(&mut self, msg: &Message, err: ZeoError) -> Res<Outcome> {
        let Some(txn) = self.txn.as_mut().filter(|_| msg.oneway) else {
            return Err(err);
        };
        match &txn.state {
            // After a successful vote: like a store then (the connection
            // closes, which aborts the transaction). Before it, the vote
            // fails.
            TxnState::Voted(_) => Err(ZeoError::Transaction(format!(
                "{}() after vote",
                msg.method
            ))),
            // The vote waiting for the lock fails now, with this error, and
            // leaves the line.
            TxnState::Waiting { msgid, .. } => {
                let msgid = msgid.clone();
                txn.commit.refused_vote(VoteRefusal::Unsupported);
                self.abort_txn(false);
                self.reply_error(&msgid, &err);
                Ok(Outcome::Reply(Value::None))
            }
            TxnState::Open | TxnState::Resolving => {
                txn.refused.get_or_insert((VoteRefusal::Unsupported, err));
                txn.commit.discard_ops();
                Ok(Outcome::Reply(Value::None))
            }
        }
    }

    pub(super) fn tpc_abort(&mut self, a: &Args) -> Res<Outcome> {
        a.count(1, 1)?;
        // Quietly nothing if there is no such transaction: the client calls
        // tpc_abort after a failed vote, which already ended it.
        if self.txn.as_ref().is_some_and(|t| Some(&t.id) == a.get(0)) {
            self.abort_txn(true);
        }
        Ok(Outcome::Reply(Value::None))
    }

    /// Aborts the transaction, releasing the commit lock if held. A vote
    /// still waiting for the lock gets an error reply if `reply_to_waiter`
    /// (not when the connection is going away: see `Drop`).
    pub(super) fn abort_txn(&mut self, reply_to_waiter: bool) {
        let Some(Txn { state, commit, .. }) = self.txn.take() else {
            return;
        };
        self.counts.aborts += 1;
        // The storage's transaction ends: out of the lock's line, or the
        // lock released.
        drop(commit);
        if let TxnState::Waiting { msgid, .. } = state
            && reply_to_waiter
        {
            self.reply_error(
                &msgid,
                &ZeoError::Transaction("transaction aborted while waiting to vote".into()),
            );
        }
    }

    /// The transaction held the commit lock longer than the
    /// transaction timeout: abort it (the connection is then closed, and
    /// its end logged as a warning, reason `transaction-timeout`).
    pub fn lock_timed_out(&mut self) {
        debug!(
            peer = %self.label(),
            timeout = ?self.shared.config.transaction_timeout,
            "transaction held the commit lock past transaction-timeout: aborting it and closing the connection"
        );
        self.abort_txn(true);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::protocol::envelope::oid_value;
    use crate::protocol::ids::{Oid, Tid};
    use crate::protocol::pickle::Dialect;
    use crate::protocol::value::DecodeLimits;
    use crate::session::Flow;
    use crate::session::outbox::Outbox;
    use crate::state::Shared;
    use crate::storage::ConnId;

    /// A session on `shared`'s storage "1", registered, and its outbox.
    fn registered_session(id: ConnId, shared: &Arc<Shared>) -> (Session, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let mut s = Session::new(id, format!("test {id}"), shared.clone(), outbox.clone());
        let flow = s.handle(request(
            1,
            "register",
            vec![Value::Str("1".into()), Value::Bool(false)],
        ));
        assert!(matches!(flow, Flow::Continue));
        (s, outbox)
    }

    fn request(msgid: i64, method: &str, args: Vec<Value>) -> Message {
        Message {
            msgid: Value::Int(msgid),
            oneway: matches!(method, "tpc_begin" | "storea"),
            method: method.to_owned().into(),
            args: Value::Tuple(args),
            dialect: Dialect::Py3,
        }
    }

    /// The replies queued so far: (msgid, is it an error reply).
    fn replies(outbox: &Outbox) -> Vec<(Value, bool)> {
        let mut frames = std::collections::VecDeque::new();
        outbox.take_frames(&mut frames);
        outbox.written(frames.iter().map(|f| f.len()).sum());
        let limits = DecodeLimits::default();
        frames
            .iter()
            .map(|f| envelope::decode_message(&f[4..], &limits).expect("a message"))
            .filter(|m| m.method == ".reply")
            .map(|m| (m.msgid, m.oneway))
            .collect()
    }

    fn txn_ops(s: &mut Session, txn: i64, oid: u64, data: &[u8]) {
        let begin = vec![
            Value::Int(txn),
            Value::Bytes(Bytes::new()),
            Value::Bytes(Bytes::new()),
            Value::Dict(vec![]),
        ];
        assert!(matches!(
            s.handle(request(0, "tpc_begin", begin)),
            Flow::Continue
        ));
        let store = vec![
            oid_value(Oid(oid)),
            tid_value(Tid::ZERO),
            Value::Bytes(Bytes::copy_from_slice(data)),
            Value::Int(txn),
        ];
        assert!(matches!(
            s.handle(request(0, "storea", store)),
            Flow::Continue
        ));
    }

    /// Every frame queued so far, raw.
    fn frames(outbox: &Outbox) -> Vec<Bytes> {
        let mut frames = std::collections::VecDeque::new();
        outbox.take_frames(&mut frames);
        outbox.written(frames.iter().map(|f| f.len()).sum());
        frames.into()
    }

    /// A request as the stock Python 3 client pickles it: `PROTO 3 MARK`,
    /// the message id's pickle, `False`, the name (`BINUNICODE`), the
    /// arguments' pickle, `TUPLE STOP`.
    fn stock_request(msgid: &[u8], name: &str, args: &[u8]) -> Bytes {
        let mut p = vec![0x80, 3, b'('];
        p.extend_from_slice(msgid);
        p.push(0x89);
        p.push(b'X');
        p.extend_from_slice(&(name.len() as u32).to_le_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(args);
        p.extend_from_slice(b"t.");
        Bytes::from(p)
    }

    /// `(a, b)` of two 8-byte ids, pickled.
    fn id_pair(a: u64, b: u64) -> Vec<u8> {
        let mut p = vec![b'C', 8];
        p.extend_from_slice(&a.to_be_bytes());
        p.extend_from_slice(&[b'C', 8]);
        p.extend_from_slice(&b.to_be_bytes());
        p.push(0x86);
        p
    }

    /// The hot lane answers exactly as the general path: every reply frame
    /// (current and older revisions, an object that did not exist yet, a
    /// missing object's error, `lastTransaction` with message ids of each
    /// size) is byte for byte the same; and a session that is not
    /// registered, or speaks for a Python 2 client, leaves the request to
    /// the general path.
    #[test]
    fn hot_lane_replies_are_the_general_paths() {
        let shared = Arc::new(Shared::new(Config::default()));
        let (mut writer, _) = registered_session(1, &shared);
        let mut tids = vec![];
        for (txn, data) in [(1, &b"first"[..]), (2, b"second")] {
            txn_ops(&mut writer, txn, 0x100, data);
            assert!(matches!(
                writer.handle(request(2, "vote", vec![Value::Int(txn)])),
                Flow::Continue
            ));
            assert!(matches!(
                writer.handle(request(3, "tpc_finish", vec![Value::Int(txn)])),
                Flow::Continue
            ));
            tids.push(shared.storages["1"].read().last_tid());
        }
        let (mut hot, hot_out) = registered_session(2, &shared);
        let (mut general, general_out) = registered_session(3, &shared);
        frames(&hot_out);
        frames(&general_out);
        let limits = DecodeLimits::default();
        let mut requests = vec![];
        for id in [&b"K\x05"[..], b"M\x2c\x01", b"J\x70\x11\x01\x00"] {
            requests.push(stock_request(id, "lastTransaction", b")"));
        }
        let (first, second) = (tids[0].0, tids[1].0);
        for (oid, tid) in [
            (0x100, u64::MAX), // current
            (0x100, second),   // the first revision, ended by the second
            (0x100, first),    // before the object existed
            (0x999, u64::MAX), // no such object: an error reply
            (0, u64::MAX),     // the root
        ] {
            requests.push(stock_request(
                &id_pair(oid, tid),
                "loadBefore",
                &id_pair(oid, tid),
            ));
        }
        for (i, req) in requests.iter().enumerate() {
            let recognized = crate::protocol::hot::recognize(req).expect("a hot request");
            assert!(matches!(
                hot.handle_hot(recognized, req, &limits),
                Some(Flow::Continue)
            ));
            let msg = envelope::decode_message(req, &limits).expect("decodes");
            assert!(matches!(general.handle(msg), Flow::Continue));
            let (h, g) = (frames(&hot_out), frames(&general_out));
            assert_eq!(h.len(), 1, "request {i}");
            assert_eq!(h, g, "request {i}");
        }
        assert_eq!(hot.counts.requests, general.counts.requests);
        assert_eq!(hot.counts.loads, general.counts.loads);
        // Not registered, or a Python 2 client: the general path's.
        let req = &requests[0];
        let recognized = crate::protocol::hot::recognize(req).expect("a hot request");
        let outbox = Arc::new(Outbox::new(1 << 20));
        let mut fresh = Session::new(4, "test 4".into(), shared.clone(), outbox);
        assert!(fresh.handle_hot(recognized, req, &limits).is_none());
        let (mut py2, _) = registered_session(5, &shared);
        py2.dialect = Dialect::Py2;
        assert!(py2.handle_hot(recognized, req, &limits).is_none());
    }

    /// The grant of a vote that was aborted since (the client pipelined
    /// `tpc_abort` and its next transaction's vote before the connection
    /// saw the grant) changes nothing: the next transaction stays voted
    /// and commits, and the lock is released after it.
    #[test]
    fn stale_lock_grant_never_touches_the_next_transaction() {
        let shared = Arc::new(Shared::new(Config::default()));
        let storage = shared.storages["1"].clone();
        let (mut holder, _) = registered_session(1, &shared);
        let (mut piper, out) = registered_session(2, &shared);
        replies(&out);
        txn_ops(&mut holder, 1, 0x100, b"holder");
        assert!(matches!(
            holder.handle(request(2, "vote", vec![Value::Int(1)])),
            Flow::Continue
        ));
        // Vote 7 waits for the lock.
        txn_ops(&mut piper, 7, 0x107, b"seven");
        let Flow::WaitLock(wait7) = piper.handle(request(10, "vote", vec![Value::Int(7)])) else {
            panic!("vote 7 waits")
        };
        // The holder finishes: the lock goes to vote 7, whose connection
        // has not seen the grant yet.
        assert!(matches!(
            holder.handle(request(3, "tpc_finish", vec![Value::Int(1)])),
            Flow::Continue
        ));
        let LockWait { wait, mut granted } = wait7;
        assert_eq!(granted.try_recv(), Ok(()));
        // The pipelined burst: abort 7, begin 8, store, vote 8 (the lock is
        // free again: vote 8 gets it at once).
        assert!(matches!(
            piper.handle(request(11, "tpc_abort", vec![Value::Int(7)])),
            Flow::Continue
        ));
        txn_ops(&mut piper, 8, 0x108, b"eight");
        assert!(matches!(
            piper.handle(request(12, "vote", vec![Value::Int(8)])),
            Flow::Continue
        ));
        // Now the old grant arrives.
        piper.lock_granted(wait);
        assert!(matches!(
            piper.handle(request(13, "tpc_finish", vec![Value::Int(8)])),
            Flow::Continue
        ));
        assert_eq!(
            replies(&out),
            vec![
                (Value::Int(10), true), // vote 7: aborted while waiting
                (Value::Int(11), false),
                (Value::Int(12), false),
                (Value::Int(13), false), // tpc_finish(8) commits
            ]
        );
        assert!(
            storage
                .read()
                .load_before(Oid(0x108), Tid::MAX)
                .unwrap()
                .is_some()
        );
        assert!(storage.read().load_before(Oid(0x107), Tid::MAX).is_err());
        assert_eq!(storage.lock_status(), (None, 0), "the lock is free");
    }
}
