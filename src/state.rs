//! The state every connection of one server shares: the configuration, the
//! storages by name, each storage's cached invalidation frame, the
//! connection count and the server's fault counters ([`Faults`]). A leaf
//! above `storage`: `monitor`, `session` and `server` read it; it depends
//! on none of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::Config;
use crate::protocol::envelope::{self, Encoding, oid_value, tid_value};
use crate::protocol::ids::{Oid, Tid};
use crate::protocol::pickle::Dialect;
use crate::protocol::value::Value;
use crate::storage::stats::{PerReason, reasons};
use crate::storage::{MemoryBudget, Storage, StorageLimits};

/// Everything the connections of one server share.
pub struct Shared {
    pub config: Config,
    /// Storages by name, and the names in configured order (for messages).
    pub storages: HashMap<String, Arc<Storage>>,
    pub storage_names: Vec<String>,
    /// Per storage, its latest commit's invalidation frame (shared by all
    /// the storage's subscribers).
    pub invalidation_frames: HashMap<String, Arc<InvalidationFrames>>,
    pub connections: AtomicUsize,
    pub started: SystemTime,
    /// Refusals and faults of the whole server, per reason.
    pub faults: Faults,
}

impl Shared {
    pub fn new(config: Config) -> Shared {
        let start = Tid::now();
        // One memory budget for the process, not one per storage.
        let memory = MemoryBudget::new(config.memory_limit);
        let storages = config
            .storages
            .iter()
            .map(|name| {
                let limits = StorageLimits {
                    retention: config.history_retention,
                    invalidation_queue_size: config.invalidation_queue_size,
                    memory: Arc::clone(&memory),
                    gc_hold_budget: config.gc_hold_budget,
                };
                let s = Storage::new(name, start, limits);
                (name.clone(), Arc::new(s))
            })
            .collect();
        Shared {
            storage_names: config.storages.clone(),
            invalidation_frames: config
                .storages
                .iter()
                .map(|name| (name.clone(), Arc::default()))
                .collect(),
            storages,
            config,
            connections: AtomicUsize::new(0),
            started: SystemTime::now(),
            faults: Faults::default(),
        }
    }
}

reasons! {
    /// Why an incoming connection was not served
    /// (`zeotemp_connections_refused_total{reason}`).
    pub enum Refusal {
        /// `max-connections` connections were open already.
        MaxConnections => "max-connections",
        /// `accept()` failed (out of file descriptors, ...): the connection
        /// stays in the listen backlog, retried 50 ms later.
        AcceptError => "accept-error",
    }
}

reasons! {
    /// Why a TLS handshake failed
    /// (`zeotemp_tls_handshake_failures_total{reason}`). A peer that closes
    /// in the handshake (a port probe) is no failure: its end counts as a
    /// disconnect of reason `client`.
    pub enum TlsFailure {
        /// A TLS error: plain text instead of TLS, a refused or missing
        /// client certificate, no common protocol version or cipher.
        Error => "error",
        /// Not completed within `frame-timeout`.
        Timeout => "timeout",
    }
}

reasons! {
    /// Why a connection ended (`zeotemp_disconnects_total{reason}`, and the
    /// `reason` of its `disconnected` log line). Every accepted connection
    /// ends with exactly one of these.
    pub enum Disconnect {
        /// The client closed the connection, or its socket failed (reset,
        /// broken pipe).
        Client => "client",
        /// The client did not read what the server sent: its outbound
        /// queue went over `max-outbox-bytes`.
        SlowClient => "slow-client",
        /// Its transaction held the commit lock past `transaction-timeout`.
        TransactionTimeout => "transaction-timeout",
        /// No handshake, or a message started and not completed, within
        /// `frame-timeout`.
        FrameTimeout => "frame-timeout",
        /// Bytes that are not ZEO: a bad handshake, a frame over
        /// `max-frame-size`, an undecodable message, a failed one-way call.
        ProtocolError => "protocol-error",
        /// The TLS handshake failed (see [`TlsFailure`]).
        TlsHandshake => "tls-handshake",
        /// A `ruok` probe, answered.
        Ruok => "ruok",
        /// The server is shutting down (also a connection cut off when
        /// `shutdown-grace` ran out).
        Shutdown => "shutdown",
        /// The connection's task failed (a panic: a bug, logged with it);
        /// the server goes on, and so do the other connections.
        InternalError => "internal-error",
    }
}

/// The refusals and faults of the whole server, per reason (the
/// per-storage ones are in each storage's `Stats`).
#[derive(Default)]
pub struct Faults {
    pub connections_refused: PerReason<Refusal>,
    pub tls_handshake_failures: PerReason<TlsFailure>,
    pub disconnects: PerReason<Disconnect>,
}

/// A storage's latest `invalidateTransaction` frame, encoded once per
/// encoding (pickle for Python 3, for Python 2, protocol 1 for older Python 2, msgpack) and shared (a cheap `Bytes` clone) by every subscriber. Before,
/// each subscriber encoded its own copy, under the storage's write lock: a
/// commit with 64 clients connected encoded the same frame 63 times, and
/// `commit` throughput at 64 connections was a third of that at 16.
#[derive(Default)]
pub struct InvalidationFrames {
    /// Indexed by encoding (pickle Python 3, pickle Python 2, pickle
    /// protocol 1 for older Python 2 clients, msgpack):
    /// `(tid, frame)`.
    last: std::sync::Mutex<[Option<(Tid, Bytes)>; 4]>,
}

impl InvalidationFrames {
    pub fn frame(&self, encoding: impl Into<Encoding>, tid: Tid, oids: &[Oid]) -> Bytes {
        let encoding = encoding.into();
        let slot = match encoding {
            Encoding::Pickle(Dialect::Py3) => 0,
            Encoding::Pickle(Dialect::Py2) => 1,
            Encoding::Pickle(Dialect::Py2Protocol1) => 2,
            Encoding::Msgpack => 3,
        };
        // Poisoning cannot leave a half-written slot (one assignment).
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, f)) = &last[slot]
            && *t == tid
        {
            return f.clone();
        }
        let args = Value::Tuple(vec![
            tid_value(tid),
            Value::List(oids.iter().map(|o| oid_value(*o)).collect()),
        ]);
        let f = envelope::encode_call(encoding, "invalidateTransaction", &args);
        last[slot] = Some((tid, f.clone()));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
