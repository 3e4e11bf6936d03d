//! zeotemp: a ZEO 5 server for temporary (in-memory) ZODB storages.
//!
//! The path of one request:
//!
//! ```text
//! socket ──> frame ──> marshal ──> rpc ──> storage
//!  (TCP or    4-byte     pickle      Session   MVCC object store,
//!   unix)     BE size    envelope    dispatch  commit lock
//!                  <── replies and server pushes go back through one
//!                      per-connection FIFO (outbox), written by the
//!                      connection's own task ──<
//! ```
//!
//! | module | job |
//! | --- | --- |
//! | [`types`] | `Oid`, `Tid` and ZODB TimeStamps |
//! | [`frame`] | split a byte stream into sized messages; refuse an oversized one |
//! | [`pickle`] | a restricted pickle codec: plain data only, no global is ever resolved |
//! | [`refs`] | the persistent references of an object record (for GC), by an opcode walk that evaluates nothing |
//! | [`rng`] | a tiny deterministic pseudo-random generator (randomized tests, and the `zeotemp-bench` load generator in `bench/zeotemp-bench`) |
//! | [`marshal`] | ZEO's `(msgid, flags, name, args)` envelope, replies, errors, pushes |
//! | [`msgpack`] | the msgpack codec of the `M5` protocol: the same plain data as [`pickle`], hardened alike |
//! | [`rpc`] | the per-connection session: register, method whitelist, two-phase commit, error replies |
//! | [`oidhash`] | a fast keyed hasher for the maps keyed by oid |
//! | [`storage`] | objects and revisions, tids and oids, conflicts, retention, the commit lock, the memory limit; [`storage::gc`] frees unreachable objects |
//! | [`outbox`] | the per-connection outbound FIFO, bounded in bytes |
//! | [`server`] | listeners, connection tasks, shutdown |
//! | [`metrics`] | the Prometheus endpoint (`metrics-address`): a minimal HTTP server for `GET /metrics` |
//! | [`tls`] | the TLS setup (rustls) from `tls-certificate`, `tls-key` and `tls-client-ca`; the handshake and its retry delay |
//! | [`config`] | settings and their defaults (every limit is a named constant there) |
//!
//! `frame`, `pickle` and `marshal` are pure functions over byte buffers;
//! `storage` is synchronous Rust behind locks. The binary only parses the
//! command line and calls [`server::run`], as the tests do on port 0.
//!
//! Invariants: commit order is delivery order (replies that expose storage
//! state are enqueued under the storage lock that produced them; commits
//! enqueue invalidations under the write lock); no invalidation is dropped
//! (a client that cannot keep up is disconnected); the commit lock is always
//! released (finish, abort, disconnect, timeout, and `Session`'s `Drop`);
//! tids only grow and oids never repeat, also across restarts; object
//! records are opaque bytes, never unpickled; garbage is collected without
//! an operator, and never an object that a retained revision of a reachable
//! object refers to.
#![forbid(unsafe_code)]

pub mod config;
pub mod monitor;
pub mod protocol;
pub mod rng;
pub mod server;
pub mod session;
pub mod state;
pub mod storage;
