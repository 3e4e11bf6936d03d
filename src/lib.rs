//! zeotemp: a ZEO 5 server for temporary (in-memory) ZODB storages.
//!
//! The path of one request, one folder per step:
//!
//! ```text
//! socket ─> server ──────> protocol ─────────> session ─────────> storage
//!  (TCP,    connection     frame, envelope     dispatch, args,    MVCC, commit
//!   unix,   task: read,    (pickle or          two-phase commit   (lock guard,
//!   TLS)    wait, write    msgpack, no I/O)    (no I/O)           Vote), GC
//!     <── replies and invalidations: one FIFO per connection (session::outbox),
//!         written by the connection's own task ──<
//! ```
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | every setting declared once (command line, TOML, `--help`), its `DEFAULT_*`, validation; a leaf |
//! | [`protocol`] | the wire format, both directions, no I/O: `frame`, `value`, `pickle/` (decode, encode, opcodes), `msgpack`, `envelope` (requests, replies, errors, pushes), `ids` (`Oid`, `Tid`, the tid clock) |
//! | [`storage`] | one in-memory multi-version object store: `commit` (the commit lock as a guard, `Vote`), `revisions`, `gc` and its reference scanner `refs`, `classes` (objects and bytes by class), `stats`, `oidhash` |
//! | `state` | what all connections share: configuration, storages, each storage's cached invalidation frame, the connection count, the refusal and fault counters per reason |
//! | `monitor` | `server_status`/`ruok` and the summary line (`status`), one reading of the figures (`figures`), Prometheus text (`prometheus`) and its endpoint (`http`) |
//! | `session` | one client's ZEO semantics, no I/O: `dispatch`, `args`, `txn` (two-phase commit), `errors` (POSException wire form), `replies`, `push` (invalidations), `outbox` |
//! | [`server`] | listeners, one task per connection (handshake, frame loop, timers, `enum Close`), TLS, the collector's loop, shutdown |
//! | [`logging`] | log lines on stderr, with journald's syslog priority prefix when stderr is journald's stream; warnings that come in floods rate-limited (`Repeated`); depends only on `config` |
//! | [`rng`] | a tiny deterministic generator for randomized tests and the load generator (`bench/zeotemp-bench`, a crate of its own) |
//!
//! Imports go one way: `config`, `protocol` → `storage` → `state` →
//! `monitor` → `session` → `server`; the binary (`main.rs`) only turns the
//! command line into a [`config::Config`] and calls [`server::run`], as the
//! tests do on port 0. Only what the binary, the tests, the fuzz targets
//! and the load generator use is public. ARCHITECTURE.md walks a newcomer
//! through the same path.
//!
//! Invariants: commit order is delivery order (replies that expose storage
//! state are enqueued under the storage lock that produced them; commits
//! enqueue invalidations under the write lock); no invalidation is dropped
//! (a client that cannot keep up is disconnected); the commit lock is always
//! released (it is a guard the transaction owns: finish, abort, disconnect,
//! timeout and `Session`'s `Drop` all drop it); tids only grow and oids
//! never repeat, also across restarts; object records are opaque bytes,
//! never unpickled; garbage is collected without an operator, and never an
//! object that a retained revision of a reachable object refers to.
#![forbid(unsafe_code)]

pub mod config;
pub mod logging;
mod monitor;
pub mod protocol;
pub mod rng;
pub mod server;
mod session;
mod state;
pub mod storage;

/// The hook through which the binary built with `count-allocations` hands
/// its counting allocator's figures to the metrics.
pub use monitor::figures::{AllocationCounts, register_allocation_counter};
