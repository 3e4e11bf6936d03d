//! One client's ZEO session: the [`Session`] and [`Session::handle`] here;
//! the method table in `dispatch`, argument checks in `args`, two-phase
//! commit in `txn`, error replies in [`errors`], pushes in `push`, reply
//! values in `replies`, the outbound FIFO in [`outbox`]. Depends on
//! `protocol`, `storage`, `state` and `monitor`; knows no sockets.
//!
//! Mirrors `ZEO.StorageServer.ZEOStorage`, with these deliberate
//! differences:
//! * a bad synchronous call gets an error reply instead of a closed
//!   connection (a closed connection makes stock clients reconnect in a tight
//!   loop); only a failing one-way call closes, as there is no reply to carry
//!   the error and client and server would disagree about the transaction;
//! * no pickle global is ever resolved: a message carrying one is refused;
//! * with client-side conflict resolution, the commit lock stays with the
//!   transaction through its resolution round (ZEO releases it, so under
//!   contention the re-vote conflicts again and stock clients give up).
//!
//! Ordering: every reply that exposes storage state is enqueued on the
//! connection's [`Outbox`] while the storage lock that produced it is held,
//! and commits enqueue invalidations under the write lock, so each client
//! sees replies and invalidations in commit order.

mod args;
mod dispatch;
pub mod errors;
pub mod outbox;
mod push;
mod replies;
mod txn;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::protocol::envelope::{self, Encoding, Message, MsgId};
use crate::protocol::hot::HotRequest;
use crate::protocol::pickle::{self, Dialect};
use crate::protocol::value::{DecodeLimits, Value};
use crate::session::errors::{Res, ZeoError};
use crate::session::outbox::Outbox;
use crate::session::replies::load_before_pickle;
use crate::session::txn::Txn;
use crate::state::Shared;
use crate::storage::{ConnId, Storage};

/// What the connection task should do after a message.
pub enum Flow {
    Continue,
    /// A `vote` waits for the commit lock: poll it, then call
    /// [`Session::lock_granted`].
    WaitLock(LockWait),
    /// Close the connection; the reason is logged.
    Close(String),
}

/// A vote waiting for the commit lock. `granted` fires when the lock is
/// ours; `wait` ties the grant to the vote that asked for it: a client that
/// pipelines can abort that transaction and vote the next one before the
/// connection task sees the old grant, which must then change nothing.
pub struct LockWait {
    pub wait: u64,
    pub granted: oneshot::Receiver<()>,
}

/// What one connection's session did, for the line that logs its end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounts {
    /// Requests handled (heartbeats not counted).
    pub requests: u64,
    /// `loadBefore` and `loadSerial` requests.
    pub loads: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Transactions ended without a commit (`tpc_abort`, a failed vote,
    /// the transaction timeout, the connection's end).
    pub aborts: u64,
    /// The connection ended during a transaction (aborted, and counted in
    /// `aborts`).
    pub ended_in_transaction: bool,
}

/// The storage a session registered on.
struct Registered {
    storage: Arc<Storage>,
    read_only: bool,
}

/// One connection's session: its dialect and encoding, the storage it
/// registered on, and its transaction.
pub struct Session {
    id: ConnId,
    peer: String,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    dialect: Dialect,
    dialect_known: bool,
    /// The client answered `M5`: every frame to it is msgpack.
    msgpack: bool,
    registered: Option<Registered>,
    txn: Option<Txn>,
    /// Numbers the votes that waited for the commit lock (see [`LockWait`]).
    waits: u64,
    label: Option<String>,
    counts: SessionCounts,
}

impl Session {
    pub fn new(id: ConnId, peer: String, shared: Arc<Shared>, outbox: Arc<Outbox>) -> Session {
        Session {
            id,
            peer,
            shared,
            outbox,
            dialect: Dialect::Py3,
            dialect_known: false,
            msgpack: false,
            registered: None,
            txn: None,
            waits: 0,
            label: None,
            counts: SessionCounts::default(),
        }
    }

    /// Ends the session as its connection ends: aborts its transaction,
    /// if any (the commit lock released; a vote waiting for it gets no
    /// reply); returns what the session did. (`Drop` does the same if this
    /// was never called, e.g. after a panic.)
    pub fn end(&mut self) -> SessionCounts {
        if self.txn.is_some() {
            self.counts.ended_in_transaction = true;
            self.abort_txn(false);
        }
        self.counts
    }

    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.peer)
    }

    /// The client answered the handshake with `M5`: its requests are
    /// msgpack, and so is everything sent to it from now on.
    pub fn use_msgpack(&mut self) {
        self.msgpack = true;
    }

    /// How frames to this client are encoded.
    fn encoding(&self) -> Encoding {
        if self.msgpack {
            Encoding::Msgpack
        } else {
            Encoding::Pickle(self.dialect)
        }
    }

    fn reply(&self, msgid: &Value, result: &Value) {
        self.outbox
            .push(envelope::encode_reply(self.encoding(), msgid, result));
    }

    fn reply_error(&self, msgid: &Value, err: &ZeoError) {
        let (class, state) = err.to_wire();
        self.outbox.push(envelope::encode_error(
            self.encoding(),
            msgid,
            class,
            &state,
        ));
    }

    /// When the transaction's hold on the commit lock began, if it holds it.
    pub fn lock_held_since(&self) -> Option<Instant> {
        self.txn.as_ref().and_then(|t| t.locked_at)
    }

    /// Handles a request of the hot lane ([`crate::protocol::hot`]) as
    /// [`Session::handle`] would handle it decoded, with the same reply, or
    /// `None` (nothing done) if this session takes it the general way: not
    /// registered yet, or its client is not a Python 3 one speaking
    /// pickles. `payload` is the request's frame, decoded only for an
    /// error reply.
    pub fn handle_hot(
        &mut self,
        req: HotRequest<'_>,
        payload: &[u8],
        limits: &DecodeLimits,
    ) -> Option<Flow> {
        if self.msgpack || !self.dialect_known || self.dialect != Dialect::Py3 {
            return None;
        }
        let registered = self.registered.as_ref()?;
        self.counts.requests += 1;
        let done = match req {
            HotRequest::LastTransaction { msgid } => {
                // Replied inside the read lock, as `lastTransaction`.
                let st = registered.storage.read();
                let tid = st.last_tid().to_bytes();
                self.outbox.push(envelope::encode_reply_with(
                    Dialect::Py3,
                    MsgId::Pickled(msgid),
                    tid.len(),
                    |out| pickle::encode_bytes_into(out, &tid, Dialect::Py3),
                ));
                Ok(())
            }
            HotRequest::LoadBefore { msgid, oid, tid } => {
                self.counts.loads += 1;
                registered.storage.load_before(oid, tid, |loaded| {
                    let frame = load_before_pickle(Dialect::Py3, MsgId::Pickled(msgid), loaded?);
                    self.outbox.push(frame);
                    Ok(())
                })
            }
        };
        Some(match done {
            Ok(()) => Flow::Continue,
            // The error reply, from the request decoded (rare: a load of
            // what is gone).
            Err(err) => match envelope::decode_message(payload, limits) {
                Ok(msg) => self.fail(&msg, err),
                Err(e) => Flow::Close(format!("undecodable request: {e}")),
            },
        })
    }

    /// Handles one decoded message.
    pub fn handle(&mut self, msg: Message) -> Flow {
        if msg.msgid == Value::Int(-1) {
            return Flow::Continue; // heartbeat
        }
        if !self.dialect_known {
            // The first request tells a Python 2 client from a Python 3 one
            // (protocol notes §12); replies follow its dialect.
            self.dialect = msg.dialect;
            self.dialect_known = true;
        }
        let method = msg.method.as_ref();
        self.counts.requests += 1;
        if matches!(method, "loadBefore" | "loadSerial") {
            self.counts.loads += 1;
        }
        // Nothing is ever resolved; a message that names a global is refused.
        // (undoInfo's specification may carry ZopeUndo.Prefix; we ignore it.)
        let checked: &[Value] = match (&msg.args, method) {
            (Value::Tuple(items), "undoInfo") if items.len() == 3 => &items[..2],
            (Value::Tuple(items), _) => items,
            _ => &[],
        };
        let forbidden = msg
            .msgid
            .forbidden_global()
            .or_else(|| checked.iter().find_map(|v| v.forbidden_global()));
        if let Some(global) = forbidden {
            let err = ZeoError::Value(format!(
                "forbidden pickle global {global}: zeotemp accepts plain data only and never resolves globals"
            ));
            crate::warn_repeated!(
                [peer = %self.label(), method = ?method, global = ?global,]
                "refused a message carrying a pickle global"
            );
            return self.fail(&msg, err);
        }
        let result = if self.registered.is_none() && method != "register" {
            Err(ZeoError::Value(format!(
                "{method}() before register(): register a storage first"
            )))
        } else {
            self.dispatch(&msg)
        };
        match result {
            Ok(Outcome::Reply(v)) => {
                if !msg.oneway {
                    self.reply(&msg.msgid, &v);
                }
                Flow::Continue
            }
            Ok(Outcome::Sent) => Flow::Continue,
            Ok(Outcome::Wait(rx)) => Flow::WaitLock(rx),
            Err(err) => self.fail(&msg, err),
        }
    }

    fn fail(&mut self, msg: &Message, err: ZeoError) -> Flow {
        if msg.oneway {
            // No reply can carry this; ZEO closes too ("No way to recover").
            // `{:?}`: the name is the client's text; escaped, it cannot
            // forge log lines.
            return Flow::Close(format!("one-way call {:?} failed: {err}", msg.method));
        }
        debug!(peer = %self.label(), method = ?msg.method, err = %err.to_string().escape_debug(), "error reply");
        self.reply_error(&msg.msgid, &err);
        Flow::Continue
    }

    fn storage(&self) -> Res<&Registered> {
        self.registered
            .as_ref()
            .ok_or_else(|| ZeoError::Value("register a storage first".into()))
    }
}

impl Drop for Session {
    /// Whatever way the connection ends (close, error, timeout, even a
    /// panic in its task), its transaction is aborted, the commit lock
    /// released and its subscription removed.
    fn drop(&mut self) {
        if self.txn.is_some() {
            info!(peer = %self.label(), "disconnected during a transaction: aborted");
        }
        // A vote waiting for the lock gets no error reply: the connection
        // closes (on shutdown too), which the client takes as
        // ClientDisconnected, a transient error it retries; an error reply
        // would fail the transaction for good (StorageTransactionError).
        self.abort_txn(false);
        if let Some(reg) = &self.registered {
            reg.storage.unsubscribe(self.id);
        }
    }
}

/// What a handler did with its call.
enum Outcome {
    /// Send this value as the reply (unless the call was one-way).
    Reply(Value),
    /// The reply was already enqueued (under a storage lock).
    Sent,
    /// A vote waits for the commit lock; it replies once granted.
    Wait(LockWait),
}

/// Runs a long synchronous job (a whole collection: `pack`, a vote under
/// memory pressure) from a connection task without stalling the other tasks
/// of its runtime worker: `block_in_place` hands the worker's other tasks
/// to a new thread while this one blocks (the server's runtime is always
/// multi-threaded, one worker by default). The connection itself waits
/// anyway: its reply needs the job's result.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
