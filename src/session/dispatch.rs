//! The method table: ZEO's whitelist of storage methods, each name mapped
//! to its handler (mirroring `ZEO.StorageServer.ZEOStorage`'s methods, not
//! its reflection-based dispatch). The two-phase-commit methods are in
//! [`txn`](super::txn); the reply values in [`replies`](super::replies).
//!
//! A handler that exposes storage state (`lastTransaction`,
//! `getInvalidations`, `loadBefore`, `register`) enqueues its reply while
//! the storage lock that produced it is held and returns
//! [`Outcome::Sent`]; the others return their value for
//! [`Session::handle`] to send.

use std::sync::Arc;

use tracing::info;

use crate::monitor::status;
use crate::protocol::envelope::{Message, oid_value, tid_value};
use crate::protocol::ids::{Tid, ctime};
use crate::protocol::value::Value;
use crate::session::args::Args;
use crate::session::errors::{Res, ZeoError};
use crate::session::push::ConnSubscriber;
use crate::session::replies::{
    history_entry, invalidations_value, json_to_value, load_before_frame, storage_info,
};
use crate::session::{Outcome, Registered, Session, blocking};

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
    /// Runs the method `msg` names (the session is registered, or this is
    /// `register`).
    pub(super) fn dispatch(&mut self, msg: &Message) -> Res<Outcome> {
        let method = msg.method.as_ref();
        let a = Args::new(method, &msg.args)?;
        let reply = |v: Value| Ok(Outcome::Reply(v));
        match method {
            "register" => self.register(msg, &a),
            "get_info" => {
                a.count(0, 0)?;
                reply(self.get_info())
            }
            "lastTransaction" => self.last_transaction(msg, &a),
            "ping" => {
                a.count(0, 0)?;
                reply(Value::None)
            }
            // Test-only (cargo feature `fault-injection`, never in a
            // release): a bug in the handling of one connection, to show it
            // stays in that connection (tests/server_wire.rs).
            #[cfg(feature = "fault-injection")]
            "_zeotemp_fault_panic" => panic!("fault injection: _zeotemp_fault_panic"),
            #[cfg(feature = "fault-injection")]
            "_zeotemp_fault_panic_in_storage" => {
                // With the storage's state write-locked: the lock is
                // poisoned for everyone else.
                let _state = self.storage()?.storage.write();
                panic!("fault injection: _zeotemp_fault_panic_in_storage")
            }
            "getInvalidations" => self.get_invalidations(msg, &a),
            "loadBefore" => self.load_before(msg, &a),
            "loadSerial" => self.load_serial(&a),
            "getTid" => {
                a.count(1, 1)?;
                let tid = self.storage()?.storage.read().get_tid(a.oid(0)?)?;
                reply(tid_value(tid))
            }
            "history" => self.history(&a),
            "new_oids" => self.new_oids(&a),
            "pack" => self.pack(&a),
            "server_status" => {
                a.count(0, 0)?;
                let status = status::server_status(&self.shared, &self.storage()?.storage);
                reply(json_to_value(&status))
            }
            "set_client_label" => self.set_client_label(&a),
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
                self.refuse_txn(msg, err)
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
            // A misconfigured client retries this at once, forever.
            crate::warn_repeated!(
                [peer = %self.label(), storage = ?name,] "register: unknown storage"
            );
            return Err(ZeoError::Value(format!(
                "unknown storage: {name} (this server serves: {})",
                served.join(", ")
            )));
        };
        if !wants_read_only && self.shared.config.read_only {
            return Err(ZeoError::ReadOnly);
        }
        let sub = Arc::new(ConnSubscriber::new(
            self.outbox.clone(),
            self.encoding(),
            self.peer.clone(),
            self.shared
                .invalidation_frames
                .get(name.as_str())
                .cloned()
                .unwrap_or_default(),
        ));
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
        storage_info(reg.storage.name(), st.len(), st.size())
    }

    fn last_transaction(&self, msg: &Message, a: &Args) -> Res<Outcome> {
        a.count(0, 0)?;
        let st = self.storage()?.storage.read();
        self.reply(&msg.msgid, &tid_value(st.last_tid()));
        Ok(Outcome::Sent)
    }

    fn get_invalidations(&self, msg: &Message, a: &Args) -> Res<Outcome> {
        a.count(1, 1)?;
        let tid = a.tid(0, "tid")?;
        let st = self.storage()?.storage.read();
        let v = invalidations_value(st.invalidations_since(tid));
        self.reply(&msg.msgid, &v);
        Ok(Outcome::Sent)
    }

    fn load_before(&self, msg: &Message, a: &Args) -> Res<Outcome> {
        a.count(2, 2)?;
        let (oid, tid) = (a.oid(0)?, a.tid(1, "tid")?);
        // Reply inside the read lock: a commit cannot slip its
        // invalidation in ahead of this (older) data.
        self.storage()?.storage.load_before(oid, tid, |loaded| {
            let frame = load_before_frame(self.encoding(), &msg.msgid, loaded?);
            self.outbox.push(frame);
            Ok(Outcome::Sent)
        })
    }

    fn load_serial(&self, a: &Args) -> Res<Outcome> {
        a.count(2, 2)?;
        let (oid, serial) = (a.oid(0)?, a.tid(1, "serial")?);
        let data = self.storage()?.storage.load_serial(oid, serial)?;
        Ok(Outcome::Reply(Value::Bytes(data)))
    }

    fn history(&self, a: &Args) -> Res<Outcome> {
        a.count(1, 2)?;
        let oid = match a.get(0) {
            // None, or bytes that are not 8 long, name no object: not
            // found, as in the stock storage's lookup.
            Some(key @ Value::None) => return Err(ZeoError::NoSuchKey(key.clone())),
            Some(key @ Value::Bytes(k)) if k.len() != 8 => {
                return Err(ZeoError::NoSuchKey(key.clone()));
            }
            _ => a.oid(0)?,
        };
        let size = a.int(1, "size", 1)?.clamp(1, 1_000_000) as usize;
        let entries = self.storage()?.storage.read().history(oid, size)?;
        Ok(Outcome::Reply(Value::List(
            entries.into_iter().map(history_entry).collect(),
        )))
    }

    fn new_oids(&self, a: &Args) -> Res<Outcome> {
        a.count(0, 1)?;
        let reg = self.storage()?;
        if reg.read_only {
            return Err(ZeoError::ReadOnly);
        }
        let n = a.int(0, "n", 100)?;
        let oids = reg.storage.new_oids(n)?;
        Ok(Outcome::Reply(Value::List(
            oids.into_iter().map(oid_value).collect(),
        )))
    }

    fn pack(&self, a: &Args) -> Res<Outcome> {
        a.count(1, 2)?;
        let t = a.float(0, "t")?;
        let storage = self.storage()?.storage.clone();
        let to = ctime(t as i64);
        info!(peer = %self.label(), storage = storage.name(), "pack to {to} UTC requested");
        // Drop history before t, then collect garbage at once; the reply
        // goes out when both are done, as with ZEO's pack.
        let report = blocking(|| storage.pack(Tid::from_unix_time(t)));
        info!(peer = %self.label(), storage = storage.name(), "packed to {to} UTC: {report}");
        Ok(Outcome::Reply(Value::None))
    }

    fn set_client_label(&mut self, a: &Args) -> Res<Outcome> {
        a.count(1, 1)?;
        // Escaped once here: the label goes into every later log line of
        // this connection, and a client chose it.
        let label = a.text(0, "label")?;
        let label = label.escape_debug().to_string();
        self.label = Some(format!("{label} {}", self.peer));
        Ok(Outcome::Reply(Value::None))
    }
}
