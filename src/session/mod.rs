//! The per-connection ZEO session: `register`, the method whitelist, the
//! two-phase-commit state machine, and the mapping of storage errors onto
//! the ZEO 5 error replies stock clients rebuild (`ZEO/asyncio/client.py
//! exc_factories`).
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

pub mod outbox;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::monitor::status;
use crate::protocol::envelope::{self, Encoding, Message, oid_value, tid_value};
use crate::protocol::ids::{Oid, Tid};
use crate::protocol::msgpack;
use crate::protocol::pickle::{self, Dialect, Value};
use crate::session::outbox::Outbox;
use crate::state::{InvalidationFrames, Shared};
use crate::storage::{
    Conflict, ConnId, LockAttempt, Storage, StorageError, Subscriber, Transaction, TxnMeta, TxnOp,
    Vote, VotedTxn,
};

/// JSON (from `server_status`) to a pickle value for the reply.
fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::None,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(a) => Value::List(a.iter().map(json_to_value).collect()),
        serde_json::Value::Object(m) => Value::Dict(
            m.iter()
                .map(|(k, v)| (Value::Str(k.clone()), json_to_value(v)))
                .collect(),
        ),
    }
}

/// Errors a client gets back as a ZEO 5 error reply `(class_name, state)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ZeoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("ReadOnlyError")]
    ReadOnly,
    #[error("StorageTransactionError: {0}")]
    Transaction(String),
    #[error("Unsupported: {0}")]
    Unsupported(String),
    #[error("ValueError: {0}")]
    Value(String),
    #[error("TypeError: {0}")]
    Type(String),
    #[error("AttributeError: {0}")]
    Attribute(String),
    /// A key that cannot name an object (`history(None)`): the stock
    /// storage looks it up and raises `POSKeyError(key)`.
    #[error("POSKeyError {0:?}")]
    NoSuchKey(Value),
}

impl ZeoError {
    /// The class name and state the stock client turns back into an
    /// exception (protocol notes §4.2): POSException subclasses with
    /// attributes send their `__dict__`, the others their `args`.
    pub fn to_wire(&self) -> (&'static str, Value) {
        let args1 = |s: &str| Value::Tuple(vec![Value::Str(s.to_string())]);
        match self {
            ZeoError::Storage(StorageError::PosKey { oid, serial }) => {
                let mut args = vec![oid_value(*oid)];
                if let Some(serial) = serial {
                    args.push(tid_value(*serial));
                }
                ("ZODB.POSException.POSKeyError", Value::Tuple(args))
            }
            ZeoError::Storage(StorageError::Conflict {
                oid,
                committed,
                read,
                class_name,
                reason,
            }) => (
                "ZODB.POSException.ConflictError",
                conflict_state(
                    reason.as_deref().unwrap_or("database conflict error"),
                    *oid,
                    class_name.as_deref(),
                    // Two equal serials tell nothing when a reason does.
                    Some((*committed, *read)).filter(|(c, r)| reason.is_none() || c != r),
                ),
            ),
            ZeoError::Storage(StorageError::ReadConflict {
                oid,
                committed,
                read,
            }) => (
                "ZODB.POSException.ReadConflictError",
                conflict_state(
                    "database read conflict error",
                    *oid,
                    None,
                    Some((*committed, *read)),
                ),
            ),
            ZeoError::Storage(StorageError::Storage(msg)) => {
                ("ZODB.POSException.StorageError", args1(msg))
            }
            ZeoError::ReadOnly => ("ZODB.POSException.ReadOnlyError", Value::Tuple(vec![])),
            ZeoError::Transaction(msg) => ("ZODB.POSException.StorageTransactionError", args1(msg)),
            ZeoError::Unsupported(msg) => ("ZODB.POSException.Unsupported", args1(msg)),
            ZeoError::Value(msg) => ("builtins.ValueError", args1(msg)),
            ZeoError::Type(msg) => ("builtins.TypeError", args1(msg)),
            ZeoError::Attribute(msg) => ("builtins.AttributeError", args1(msg)),
            ZeoError::NoSuchKey(key) => (
                "ZODB.POSException.POSKeyError",
                Value::Tuple(vec![key.clone()]),
            ),
        }
    }
}

fn conflict_state(
    message: &str,
    oid: Oid,
    class_name: Option<&str>,
    serials: Option<(Tid, Tid)>,
) -> Value {
    Value::Dict(vec![
        (Value::Str("message".into()), Value::Str(message.into())),
        (Value::Str("oid".into()), oid_value(oid)),
        (
            Value::Str("class_name".into()),
            class_name.map_or(Value::None, |c| Value::Str(c.into())),
        ),
        (
            Value::Str("serials".into()),
            serials.map_or(Value::None, |(committed, read)| {
                Value::Tuple(vec![tid_value(committed), tid_value(read)])
            }),
        ),
    ])
}

type Res<T> = Result<T, ZeoError>;

// ---- argument helpers ----------------------------------------------------

struct Args<'a> {
    method: &'a str,
    items: &'a [Value],
}

impl<'a> Args<'a> {
    fn new(method: &'a str, args: &'a Value) -> Res<Args<'a>> {
        match args {
            Value::Tuple(items) | Value::List(items) => Ok(Args { method, items }),
            other => Err(ZeoError::Type(format!(
                "{method}() arguments must be a tuple, not {}",
                other.type_name()
            ))),
        }
    }

    /// Checks the argument count: `min..=max`.
    fn count(&self, min: usize, max: usize) -> Res<()> {
        let n = self.items.len();
        if n < min || n > max {
            let want = if min == max {
                format!("{min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(ZeoError::Type(format!(
                "{}() takes {want} arguments ({n} given)",
                self.method
            )));
        }
        Ok(())
    }

    fn get(&self, i: usize) -> Option<&'a Value> {
        self.items.get(i)
    }

    fn bytes(&self, i: usize, what: &str) -> Res<Bytes> {
        self.slice(i, what).cloned()
    }

    /// Like [`Args::bytes`], borrowed: no reference count is touched (a
    /// clone of a freshly decoded `Bytes` allocates its shared header).
    fn slice(&self, i: usize, what: &str) -> Res<&'a Bytes> {
        match self.get(i) {
            Some(Value::Bytes(b)) | Some(Value::PyStr(b)) => Ok(b),
            Some(v) => Err(ZeoError::Type(format!(
                "{}(): {what} must be bytes, not {}",
                self.method,
                v.type_name()
            ))),
            None => Err(ZeoError::Type(format!("{}(): missing {what}", self.method))),
        }
    }

    fn eight(&self, i: usize, what: &str) -> Res<u64> {
        let b = self.slice(i, what)?;

        let arr: [u8; 8] = b[..].try_into().map_err(|_| {
            ZeoError::Type(format!(
                "{}(): {what} must be 8 bytes, not {}",
                self.method,
                b.len()
            ))
        })?;
        Ok(u64::from_be_bytes(arr))
    }

    fn oid(&self, i: usize) -> Res<Oid> {
        self.eight(i, "oid").map(Oid)
    }

    fn tid(&self, i: usize, what: &str) -> Res<Tid> {
        self.eight(i, what).map(Tid)
    }

    /// The serial a `storea` names: 8 bytes, or (as the stock server and
    /// `IStorage.store` take it) `None` or a text string for a new object,
    /// read as z64: accepted if the object does not exist, a conflict if it
    /// does (the stock storages compare it with the current tid, which
    /// never equals `None` or a str). ZEO's own tests pass `'\0' * 8` as a
    /// str.
    fn store_serial(&self, i: usize) -> Res<Tid> {
        match self.get(i) {
            Some(Value::None | Value::Str(_)) => Ok(Tid::ZERO),
            _ => self.tid(i, "serial"),
        }
    }

    /// An integer argument beyond 64 bits (a Python `int` of any size).
    fn out_of_range(&self, what: &str) -> ZeoError {
        ZeoError::Value(format!(
            "{}(): {what} is out of range (integers here must fit in 64 bits)",
            self.method
        ))
    }

    fn int(&self, i: usize, what: &str, default: i64) -> Res<i64> {
        match self.get(i) {
            None => Ok(default),
            Some(Value::BigInt(_)) => Err(self.out_of_range(what)),
            Some(v) => v.as_i64().ok_or_else(|| {
                ZeoError::Type(format!(
                    "{}(): {what} must be an integer, not {}",
                    self.method,
                    v.type_name()
                ))
            }),
        }
    }

    fn float(&self, i: usize, what: &str) -> Res<f64> {
        match self.get(i) {
            Some(Value::Float(f)) => Ok(*f),
            Some(Value::BigInt(_)) => Err(self.out_of_range(what)),
            Some(v) => v.as_i64().map(|i| i as f64).ok_or_else(|| {
                ZeoError::Type(format!(
                    "{}(): {what} must be a number, not {}",
                    self.method,
                    v.type_name()
                ))
            }),
            None => Err(ZeoError::Type(format!("{}(): missing {what}", self.method))),
        }
    }

    fn text(&self, i: usize, what: &str) -> Res<String> {
        match self.get(i) {
            Some(v) => v.as_text().map(|t| t.into_owned()).ok_or_else(|| {
                ZeoError::Type(format!(
                    "{}(): {what} must be text, not {}",
                    self.method,
                    v.type_name()
                ))
            }),
            None => Err(ZeoError::Type(format!("{}(): missing {what}", self.method))),
        }
    }
}

// ---- the session -----------------------------------------------------------

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

#[derive(Debug)]
enum TxnState {
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

struct Txn {
    id: Value,
    meta: TxnMeta,
    /// The storage's side: the buffered operations and the claim on the
    /// commit lock (dropping it aborts and releases the lock).
    commit: Transaction,
    /// Bytes of data stored so far (for `max-transaction-bytes`).
    bytes: usize,
    /// Set by a one-way call we cannot honour; the vote fails with it.
    refused: Option<ZeoError>,
    state: TxnState,
    locked_at: Option<Instant>,
}

struct Registered {
    storage: Arc<Storage>,
    read_only: bool,
}

/// Pushes a storage's commits to one client.
struct ConnSubscriber {
    outbox: Arc<Outbox>,
    encoding: Encoding,
    peer: String,
    frames: Arc<InvalidationFrames>,
}

impl Subscriber for ConnSubscriber {
    fn invalidate(&self, tid: Tid, oids: &[Oid]) {
        if self.outbox.closed_reason().is_some() {
            // Already going away (and already logged): it reconnects and
            // verifies its cache.
            return;
        }
        if !self
            .outbox
            .push(self.frames.frame(self.encoding, tid, oids))
        {
            // Never drop an invalidation silently: the connection is closing
            // (its outbox overflowed); the client reconnects and verifies.
            warn!(peer = %self.peer, "invalidation not delivered: disconnecting a client that does not keep up");
            self.outbox.close("client does not read its invalidations");
        }
    }

    fn info(&self, length: usize, size: usize) {
        self.outbox.push(envelope::encode_call(
            self.encoding,
            "info",
            &info_value(length, size),
        ));
    }
}

fn info_value(length: usize, size: usize) -> Value {
    Value::Tuple(vec![Value::Dict(vec![
        (Value::Str("length".into()), Value::Int(length as i64)),
        (Value::Str("size".into()), Value::Int(size as i64)),
    ])])
}

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
}

/// Methods that exist in ZEO but that zeotemp does not provide.
const UNSUPPORTED_SYNC: &[&str] = &[
    "sendBlob",
    "iterator_start",
    "iterator_next",
    "iterator_record_start",
    "iterator_record_next",
    "record_iternext",
    "undo",
    "new_oid",
    "loadBlob",
    "getAuthProtocol",
];

/// One-way methods of transactions that zeotemp cannot honour: accepted,
/// and the transaction's vote fails with a clear error (closing would
/// leave client and server disagreeing about the transaction).
const UNSUPPORTED_ONEWAY: &[&str] = &[
    "restorea",
    "undoa",
    "storeBlobStart",
    "storeBlobChunk",
    "storeBlobEnd",
    "storeBlobShared",
];

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
        }
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
        let method = msg.method.as_str();
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
            warn!(peer = %self.label(), method = ?method, global = ?global, "refused a message carrying a pickle global");
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

    fn dispatch(&mut self, msg: &Message) -> Res<Outcome> {
        let method = msg.method.as_str();
        let a = Args::new(method, &msg.args)?;
        let reply = |v: Value| Ok(Outcome::Reply(v));
        match method {
            "register" => self.register(msg, &a),
            "get_info" => {
                a.count(0, 0)?;
                reply(self.get_info())
            }
            "lastTransaction" => {
                a.count(0, 0)?;
                let st = self.storage()?.storage.read();
                self.reply(&msg.msgid, &tid_value(st.last_tid()));
                Ok(Outcome::Sent)
            }
            "ping" => {
                a.count(0, 0)?;
                reply(Value::None)
            }
            // Test-only (cargo feature `fault-injection`, never in a
            // release): a bug in the handling of one connection, to show it
            // stays in that connection (tests/wire.rs).
            #[cfg(feature = "fault-injection")]
            "_zeotemp_fault_panic" => panic!("fault injection: _zeotemp_fault_panic"),
            #[cfg(feature = "fault-injection")]
            "_zeotemp_fault_panic_in_storage" => {
                // With the storage's state write-locked: the lock is
                // poisoned for everyone else.
                let _state = self.storage()?.storage.write();
                panic!("fault injection: _zeotemp_fault_panic_in_storage")
            }
            "getInvalidations" => {
                a.count(1, 1)?;
                let tid = a.tid(0, "tid")?;
                let st = self.storage()?.storage.read();
                let v = match st.invalidations_since(tid) {
                    Some((latest, oids)) => Value::Tuple(vec![
                        tid_value(latest),
                        Value::List(oids.into_iter().map(oid_value).collect()),
                    ]),
                    None => Value::None,
                };
                self.reply(&msg.msgid, &v);
                Ok(Outcome::Sent)
            }
            "loadBefore" => {
                a.count(2, 2)?;
                let (oid, tid) = (a.oid(0)?, a.tid(1, "tid")?);
                // Reply inside the read lock: a commit cannot slip its
                // invalidation in ahead of this (older) data.
                self.storage()?.storage.load_before(oid, tid, |loaded| {
                    let loaded = loaded?;
                    let hint = loaded.as_ref().map_or(1, |l| l.data.len() + 32);
                    if self.msgpack {
                        // The same, as msgpack: [data, start, end] or nil.
                        let frame = envelope::encode_msgpack_reply_with(&msg.msgid, hint, |out| {
                            let Some(l) = loaded else {
                                return msgpack::put_nil(out);
                            };
                            msgpack::put_array_header(out, 3);
                            msgpack::put_bin(out, l.data);
                            msgpack::put_bin(out, &l.start.to_bytes());
                            match l.end {
                                Some(end) => msgpack::put_bin(out, &end.to_bytes()),
                                None => msgpack::put_nil(out),
                            }
                        });
                        self.outbox.push(frame);
                        return Ok(Outcome::Sent);
                    }
                    let dialect = self.dialect;
                    // (data, start, end) or None, written straight from the
                    // stored record.
                    let frame = envelope::encode_reply_with(dialect, &msg.msgid, hint, |out| {
                        let Some(l) = loaded else {
                            return pickle::encode_into(out, &Value::None, dialect);
                        };
                        pickle::open_tuple(out, 3, dialect);
                        pickle::encode_bytes_into(out, l.data, dialect);
                        pickle::encode_bytes_into(out, &l.start.to_bytes(), dialect);
                        match l.end {
                            Some(end) => pickle::encode_bytes_into(out, &end.to_bytes(), dialect),
                            None => pickle::encode_into(out, &Value::None, dialect),
                        }
                        pickle::close_tuple(out, 3, dialect);
                    });
                    self.outbox.push(frame);
                    Ok(Outcome::Sent)
                })
            }
            "loadSerial" => {
                a.count(2, 2)?;
                let (oid, serial) = (a.oid(0)?, a.tid(1, "serial")?);
                let data = self.storage()?.storage.load_serial(oid, serial)?;
                reply(Value::Bytes(data))
            }
            "getTid" => {
                a.count(1, 1)?;
                let tid = self.storage()?.storage.read().get_tid(a.oid(0)?)?;
                reply(tid_value(tid))
            }
            "history" => {
                a.count(1, 2)?;
                let oid = match a.get(0) {
                    // None, or bytes that are not 8 long, name no object:
                    // not found, as in the stock storage's lookup.
                    Some(key @ Value::None) => return Err(ZeoError::NoSuchKey(key.clone())),
                    Some(key @ Value::Bytes(k)) if k.len() != 8 => {
                        return Err(ZeoError::NoSuchKey(key.clone()));
                    }
                    _ => a.oid(0)?,
                };
                let size = a.int(1, "size", 1)?.clamp(1, 1_000_000) as usize;
                let entries = self.storage()?.storage.read().history(oid, size)?;
                reply(Value::List(
                    entries.into_iter().map(history_entry).collect(),
                ))
            }
            "new_oids" => {
                a.count(0, 1)?;
                let reg = self.storage()?;
                if reg.read_only {
                    return Err(ZeoError::ReadOnly);
                }
                let n = a.int(0, "n", 100)?;
                let oids = reg.storage.new_oids(n)?;
                reply(Value::List(oids.into_iter().map(oid_value).collect()))
            }
            "pack" => {
                a.count(1, 2)?;
                let t = a.float(0, "t")?;
                let storage = self.storage()?.storage.clone();
                info!(peer = %self.label(), storage = storage.name(), t, "pack");
                // Drop history before t, then collect garbage at once; the
                // reply goes out when both are done, as with ZEO's pack.
                let outcome = blocking(|| storage.pack(Tid::from_unix_time(t)));
                info!(peer = %self.label(), storage = storage.name(), ?outcome, "packed");
                reply(Value::None)
            }
            "server_status" => {
                a.count(0, 0)?;
                let status = status::server_status(&self.shared, &self.storage()?.storage);
                reply(json_to_value(&status))
            }
            "set_client_label" => {
                a.count(1, 1)?;
                // Escaped once here: the label goes into every later log
                // line of this connection, and a client chose it.
                let label = a.text(0, "label")?;
                let label = label.escape_debug().to_string();
                self.label = Some(format!("{label} {}", self.peer));
                reply(Value::None)
            }
            "undoLog" | "undoInfo" => {
                // Not an undoing storage: ZEO answers () then, too.
                reply(Value::Tuple(vec![]))
            }
            "iterator_gc" => reply(Value::None),
            "tpc_begin" => self.tpc_begin(&a),
            "storea" | "checkCurrentSerialInTransaction" | "deleteObject" => {
                self.buffer_op(method, &a)
            }
            "vote" => self.vote(msg, &a),
            "tpc_finish" => self.tpc_finish(msg, &a),
            "tpc_abort" => self.tpc_abort(&a),
            m if UNSUPPORTED_ONEWAY.contains(&m) => {
                let err = ZeoError::Unsupported(format!(
                    "zeotemp does not support {m}() (no undo, blobs or restore)"
                ));
                match self.txn.as_mut() {
                    Some(txn) if msg.oneway => {
                        match &txn.state {
                            // After a successful vote: like a store then
                            // (the connection closes, which aborts the
                            // transaction). Before it, the vote fails.
                            TxnState::Voted(_) => {
                                Err(ZeoError::Transaction(format!("{m}() after vote")))
                            }
                            // The vote waiting for the lock fails now,
                            // with this error, and leaves the line.
                            TxnState::Waiting { msgid, .. } => {
                                let msgid = msgid.clone();
                                self.abort_txn(false);
                                self.reply_error(&msgid, &err);
                                reply(Value::None)
                            }
                            TxnState::Open | TxnState::Resolving => {
                                txn.refused.get_or_insert(err);
                                txn.commit.discard_ops();
                                reply(Value::None)
                            }
                        }
                    }
                    _ => Err(err),
                }
            }
            m if UNSUPPORTED_SYNC.contains(&m) => Err(ZeoError::Unsupported(format!(
                "zeotemp does not support {m}() (no blobs, iterators, undo or record iteration)"
            ))),
            m => Err(ZeoError::Attribute(format!("zeotemp has no method {m:?}"))),
        }
    }

    fn register(&mut self, msg: &Message, a: &Args) -> Res<Outcome> {
        a.count(2, 2)?;
        if self.registered.is_some() {
            return Err(ZeoError::Value("duplicate register() call".into()));
        }
        let name = a.text(0, "storage name")?;
        let wants_read_only = a.get(1).is_some_and(|v| v.is_truthy());
        let Some(storage) = self.shared.storages.get(&name).cloned() else {
            let served: Vec<String> = self
                .shared
                .storage_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect();
            warn!(peer = %self.label(), storage = ?name, "register: unknown storage");
            return Err(ZeoError::Value(format!(
                "unknown storage: {name} (this server serves: {})",
                served.join(", ")
            )));
        };
        if !wants_read_only && self.shared.config.read_only {
            return Err(ZeoError::ReadOnly);
        }
        let sub = Arc::new(ConnSubscriber {
            outbox: self.outbox.clone(),
            encoding: self.encoding(),
            peer: self.peer.clone(),
            frames: self
                .shared
                .invalidation_frames
                .get(name.as_str())
                .cloned()
                .unwrap_or_default(),
        });
        // Joining the broadcast list and reading the last tid is one step
        // with respect to commits; the reply goes out inside it too.
        storage.subscribe(self.id, sub, |last| {
            self.reply(&msg.msgid, &tid_value(last))
        });
        info!(peer = %self.label(), storage = ?name, read_only = wants_read_only, "registered");
        self.registered = Some(Registered {
            storage,
            read_only: wants_read_only || self.shared.config.read_only,
        });
        Ok(Outcome::Sent)
    }

    fn get_info(&self) -> Value {
        let Some(reg) = &self.registered else {
            return Value::None;
        };
        let st = reg.storage.read();
        let s = |x: &str| Value::Str(x.to_string());
        Value::Dict(vec![
            (s("length"), Value::Int(st.len() as i64)),
            (s("size"), Value::Int(st.size() as i64)),
            (
                s("name"),
                s(&format!(
                    "zeotemp temporary storage {:?}",
                    reg.storage.name()
                )),
            ),
            (s("supportsUndo"), Value::Bool(false)),
            (s("supports_record_iternext"), Value::Bool(false)),
            (
                s("interfaces"),
                Value::Tuple(vec![
                    Value::Tuple(vec![s("ZODB.interfaces"), s("IStorage")]),
                    Value::Tuple(vec![s("zope.interface"), s("Interface")]),
                ]),
            ),
        ])
    }

    // ---- two-phase commit ----------------------------------------------

    fn tpc_begin(&mut self, a: &Args) -> Res<Outcome> {
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
            ZeoError::Unsupported(
                "tpc_begin with an explicit tid or status (copy/restore tools) is not supported"
                    .into(),
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

    fn buffer_op(&mut self, method: &str, a: &Args) -> Res<Outcome> {
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
            txn.refused = Some(ZeoError::Storage(StorageError::Storage(format!(
                "transaction too large: more than {max} bytes of data (max-transaction-bytes)"
            ))));
        }
        Ok(Outcome::Reply(Value::None))
    }

    fn vote(&mut self, msg: &Message, a: &Args) -> Res<Outcome> {
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
        if let Some(err) = txn.refused.clone() {
            debug!(peer = %self.label(), err = %err.to_string().escape_debug(), "vote of a refused transaction");
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

    fn tpc_finish(&mut self, msg: &Message, a: &Args) -> Res<Outcome> {
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
        debug!(peer = %self.label(), storage = storage.name(), %tid, objects = n, "committed");
        Ok(Outcome::Sent)
    }

    fn tpc_abort(&mut self, a: &Args) -> Res<Outcome> {
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
    fn abort_txn(&mut self, reply_to_waiter: bool) {
        let Some(Txn { state, commit, .. }) = self.txn.take() else {
            return;
        };
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
    /// transaction timeout: abort it (the connection is then closed).
    pub fn lock_timed_out(&mut self) {
        warn!(
            peer = %self.label(),
            timeout = ?self.shared.config.transaction_timeout,
            "transaction held the commit lock past transaction-timeout: aborting it and closing the connection"
        );
        self.abort_txn(true);
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

enum Outcome {
    Reply(Value),
    /// The reply was already enqueued (under a storage lock).
    Sent,
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

fn conflict_value(c: Conflict) -> Value {
    Value::Dict(vec![
        (Value::Str("oid".into()), oid_value(c.oid)),
        (
            Value::Str("serials".into()),
            Value::Tuple(vec![tid_value(c.committed), tid_value(c.read)]),
        ),
        (Value::Str("data".into()), Value::Bytes(c.data)),
    ])
}

fn history_entry(e: crate::storage::HistoryEntry) -> Value {
    let s = |x: &str| Value::Str(x.to_string());
    Value::Dict(vec![
        (s("time"), Value::Float(e.tid.to_unix_time())),
        (s("user_name"), Value::Bytes(e.meta.user.clone())),
        (s("description"), Value::Bytes(e.meta.description.clone())),
        (
            s("extension"),
            match &e.meta.extension {
                Value::Dict(_) => e.meta.extension.clone(),
                _ => Value::Dict(vec![]),
            },
        ),
        (s("tid"), tid_value(e.tid)),
        (s("serial"), tid_value(e.tid)),
        (s("size"), Value::Int(e.size as i64)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::protocol::pickle::DecodeLimits;

    #[test]
    fn one_invalidation_frame_per_commit_and_dialect() {
        let frames = InvalidationFrames::default();
        let oids = [Oid(1), Oid(2)];
        let a = frames.frame(Dialect::Py3, Tid(10), &oids);
        let b = frames.frame(Dialect::Py3, Tid(10), &oids);
        // The same allocation, not an equal copy.
        assert_eq!(a.as_ptr(), b.as_ptr());
        let want = envelope::encode_call(
            Dialect::Py3,
            "invalidateTransaction",
            &Value::Tuple(vec![
                tid_value(Tid(10)),
                Value::List(vec![oid_value(Oid(1)), oid_value(Oid(2))]),
            ]),
        );
        assert_eq!(a, want);
        // A Python-2 subscriber of the same commit gets its own dialect...
        let py2 = frames.frame(Dialect::Py2, Tid(10), &oids);
        assert_ne!(py2, a);
        // ...without evicting the Python-3 frame.
        assert_eq!(
            frames.frame(Dialect::Py3, Tid(10), &oids).as_ptr(),
            a.as_ptr()
        );
        // The next commit gets a new frame.
        let c = frames.frame(Dialect::Py3, Tid(11), &[Oid(3)]);
        assert_ne!(c, a);
    }

    #[test]
    fn msgpack_invalidation_frame_has_its_own_slot() {
        let frames = InvalidationFrames::default();
        let oids = [Oid(1)];
        let py3 = frames.frame(Dialect::Py3, Tid(10), &oids);
        let a = frames.frame(Encoding::Msgpack, Tid(10), &oids);
        let b = frames.frame(Encoding::Msgpack, Tid(10), &oids);
        // Shared by every msgpack subscriber of the commit...
        assert_eq!(a.as_ptr(), b.as_ptr());
        // ...msgpack, as the stock server writes it...
        assert_eq!(
            &a[4..],
            b"\x94\x00\xc3\xb5invalidateTransaction\x92\xc4\x08\x00\x00\x00\x00\x00\x00\x00\x0a\
              \x91\xc4\x08\x00\x00\x00\x00\x00\x00\x00\x01"
        );
        // ...and neither evicts nor replaces the pickle frame.
        assert_eq!(
            frames.frame(Dialect::Py3, Tid(10), &oids).as_ptr(),
            py3.as_ptr()
        );
        assert_ne!(py3, a);
        assert_ne!(frames.frame(Encoding::Msgpack, Tid(11), &oids), a);
    }

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
            method: method.into(),
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
