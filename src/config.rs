//! Server settings, declared once: [`Settings`] is the command line's
//! options and the TOML config file's keys (with `--help` text), and
//! [`Settings::resolve`] turns them, with every default (the `DEFAULT_*`
//! constants here), into the [`Config`] the rest of the crate reads. A leaf:
//! it imports nothing from the crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod ceiling;
pub use ceiling::MemoryCeiling;

/// Default listen address: loopback, next to the main ZEO server's usual
/// 8100 and never on it.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8101";

/// Default storage name: what `ClientStorage` registers with unless told
/// otherwise (its `storage` option defaults to `'1'`).
pub const DEFAULT_STORAGE: &str = "1";

/// Default `transaction-timeout` in seconds: how long one transaction may
/// hold a storage's commit lock (from its vote, through client-side conflict
/// resolution, to `tpc_finish`). A client that exceeds it is disconnected and
/// its transaction aborted, so a hung Zope worker cannot block the others.
pub const DEFAULT_TRANSACTION_TIMEOUT_SECS: u64 = 30;

/// Default `frame-timeout` in seconds: how long a client may take to send
/// one message once its first byte arrived, and to send its handshake
/// after connecting. A connection over it is closed with a log line, so
/// half-sent frames (a crashed client, or one trickling bytes on purpose)
/// do not hold a connection and its buffer forever. Generous for the
/// largest frame (`max-frame-size`, 64 MiB) on a LAN; raise it for huge
/// objects over a slow link.
pub const DEFAULT_FRAME_TIMEOUT_SECS: u64 = 60;

/// Default `shutdown-grace` in seconds: at a stop, how long a commit in
/// progress may take to finish, and then how long each connection may take
/// to receive what is queued for it and to close its own side (what it
/// still sends meanwhile is read and dropped, so that it sees a clean close,
/// not a reset), before it is closed anyway. (A connection that ends by
/// itself, or that the server closes, gets the same time.)
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 5;

/// Default `log-repeat-interval`: after a warning of one kind (a refused
/// connection, a vote refused at the memory limit, a slow client, ...),
/// further ones of that kind within this many seconds are logged at debug
/// only and counted; the next warning after it says how many there were
/// (`logging::Repeated`). Long enough that a flood is a line every 10 s,
/// short enough that a new problem shows within seconds. 0 holds nothing
/// back.
pub const DEFAULT_LOG_REPEAT_INTERVAL_SECS: u64 = 10;

/// Default `invalidation-queue-size`: recent transactions remembered for
/// `getInvalidations` (ZEO's default).
pub const DEFAULT_INVALIDATION_QUEUE_SIZE: usize = 100;

/// Default `history-retention` in seconds: how long a non-current revision
/// is kept after it was replaced. Long enough for a Zope request that
/// opened a snapshot (requests that run longer are rare and retried on
/// ReadConflictError), and for client-side conflict resolution, which reads
/// the revision the client started from within its own transaction; the
/// same 60 s as Python tempstorage's conflict cache. It also bounds how
/// long an unlinked object is kept, so under a steady session churn memory
/// levels off about a minute after the churn starts (600 s, the default
/// before, took over ten: BENCHMARKS.md, "Memory under churn").
pub const DEFAULT_HISTORY_RETENTION_SECS: u64 = 60;

/// Default `gc-interval` in seconds: how often each storage drops expired
/// non-current revisions and, if anything was committed since the last
/// time, collects garbage. Sessions churn every few seconds; a cycle over
/// 100k objects takes milliseconds.
pub const DEFAULT_GC_INTERVAL_SECS: u64 = 10;

/// Default `gc-hold-budget` in milliseconds: how long the collector holds
/// a storage's lock at a time before it lets commits (and loads behind a
/// waiting commit) in. Every phase that goes through objects (marking,
/// finding and freeing garbage) stops once this is spent, releases the
/// lock and takes it again: a budget of time, not of objects, because what
/// an object costs varies (a container with a thousand references, a cold
/// cache line). At one million objects a cycle takes a few hundred holds,
/// the longest 1-4 ms (BENCHMARKS.md). Smaller budgets shorten the pauses
/// a commit can meet and make a cycle take longer.
pub const DEFAULT_GC_HOLD_BUDGET_MS: u64 = 1;

/// Largest `gc-hold-budget` accepted, in milliseconds: a hold of a second
/// would stall every commit that long.
pub const MAX_GC_HOLD_BUDGET_MS: u64 = 1000;

/// Default `memory-limit`: this fraction of the memory the process can
/// have, the machine's (`MemTotal`) or, when smaller, its cgroup's limit
/// (`memory.max` or `memory.high`, v1 `memory.limit_in_bytes`; see [`MemoryCeiling`]). One
/// limit for the whole process, all storages together; the other half is
/// for the rest of the machine or container.
pub const DEFAULT_MEMORY_LIMIT_FRACTION: f64 = 0.5;

/// Default `max-frame-size`: the largest frame a client may send. 64 MiB
/// holds any real session object (ZEO's own blob chunks are 59 000 bytes; a
/// 20 MB object record is the largest the tests send).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 64 * 1024 * 1024;

/// Default `max-outbox-bytes`: the bound on the bytes queued for one
/// client. A 20 MB object reply fits with room for the invalidations that
/// follow it.
pub const DEFAULT_MAX_OUTBOX_BYTES: usize = 256 * 1024 * 1024;

/// Default `read-pause-bytes`: queued bytes past which a connection's own
/// requests are no longer read (until the queue drains below it again),
/// when less than half of `max-outbox-bytes` ([`effective_read_pause`]).
/// Before, the pause came at half the bound: a client that pipelined 50,000
/// loads of a 4 KiB object and never read made the server queue 128 MiB for
/// it (by default) and keep it as long as the connection lasted; four such
/// clients, half a GiB. A client that reads never gets near this (the
/// kernel's socket buffers take megabytes first); one reply bigger than
/// this is still queued whole.
pub const DEFAULT_READ_PAUSE_BYTES: usize = 1024 * 1024;

/// Smallest `read-pause-bytes` accepted: a few replies must fit before a
/// connection's requests pause.
pub const MIN_READ_PAUSE_BYTES: usize = 64 * 1024;

/// Default bound on the bytes one transaction may buffer before its vote
/// (`max-transaction-bytes`). Over it, the vote fails with an error naming
/// the limit.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 512 * 1024 * 1024;

/// Smallest `max-transaction-bytes` accepted: 512 bytes, about the
/// smallest real transaction. A commit stores at least one object record
/// (its class reference and its pickled state: tens of bytes for an empty
/// object, hundreds for a typical session object), so below this a real
/// commit fails at its vote (`0` refused every store). Low on purpose:
/// `tests/python/test_transaction_size_limit.py` runs at 1000 bytes to
/// reach the limit with small records.
pub const MIN_MAX_TRANSACTION_BYTES: usize = 512;

/// Smallest `memory-limit` accepted (other than `0`, no limit): 1 MiB for
/// the process. The limit is in bytes, so a smaller value is a unit mistake
/// (`memory-limit = 1`, or kilobytes) that would make every vote fail with
/// a memory-limit error. Low on purpose: a small limit is how the limit is
/// tested (`tests/python/test_memory_limit.py` runs at 12 MiB).
pub const MIN_MEMORY_LIMIT: usize = 1024 * 1024;

/// Largest `threads` accepted: 1024. Each worker is an OS thread with its
/// own stack (2 MiB reserved), so `threads = 100000` fails to start or
/// takes the machine's memory; workers beyond the cores only contend. A
/// fixed ceiling, not one relative to the cores of the machine running
/// `--check-config`, so a file valid on one host is valid on another; it
/// is above the core count of any machine zeotemp is likely to run on.
pub const MAX_THREADS: usize = 1024;

/// Default number of simultaneous client connections (`max-connections`);
/// further ones are closed at once with a log line.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default `max-nesting-depth`: how deeply containers may nest in one
/// message. ZEO messages nest at most four levels (envelope tuple, args
/// tuple, e.g. a `tpc_begin` extension dict, a value inside it); 64 leaves
/// room for odd clients while keeping recursion over decoded values
/// shallow.
pub const DEFAULT_MAX_NESTING_DEPTH: usize = 64;

/// Smallest `max-nesting-depth` accepted: stock ZEO messages nest up to
/// four levels (envelope, arguments, a `tpc_begin` extension dict, a value
/// in it); below eight a client's odd but harmless message would close its
/// connection.
pub const MIN_NESTING_DEPTH: usize = 8;

/// Default `max-message-items`: how many values (scalars and containers)
/// one message may decode to. Each decoded value takes about a hundred
/// bytes while it is built (the value and its stack slot), so without a
/// bound a 64 MiB frame of one-byte items (`N N N ...`) took ~7 GB and
/// seconds of a worker thread (found by `tests/server_hostile.rs`). Stock clients
/// send a few dozen values per message; 100,000 bounds a message's decoding
/// to ~10 MB.
pub const DEFAULT_MAX_MESSAGE_ITEMS: usize = 100_000;

/// Smallest `max-message-items` accepted: far above any stock client's
/// message, so a setting cannot lock clients out by accident.
pub const MIN_MESSAGE_ITEMS: usize = 1_000;

/// Default `threads`: runtime worker threads serving connections. One is
/// enough for a session store and the cheapest per transaction: on the
/// 2-core benchmark machine, one thread used 13–21 % less server CPU per
/// real-client transaction than two, gave the same `load` throughput and a
/// 3× lower p99.9 (no second worker waking and parking), and only `echo`
/// went faster with two (BENCHMARKS.md). Garbage collection runs on its
/// own thread either way. Raise it for many busy clients on a big machine.
pub const DEFAULT_THREADS: usize = 1;

/// Default `metrics-address`: none, so the Prometheus endpoint is off. Set
/// to `HOST:PORT` (port 0 picks a free port and logs it) to serve
/// `GET /metrics` in the Prometheus text format there
/// (`src/monitor/prometheus.rs`). Plain HTTP without authentication: keep
/// it on loopback or a private network, as the ZEO port.
pub const DEFAULT_METRICS_ADDRESS: Option<&str> = None;

/// Default `unix-socket-group`: none, so a unix socket file keeps the
/// group it is created with (the process's primary group). Set to a group
/// name (looked up in `/etc/group` only, see [`group_id`]) or a numeric
/// gid, and every unix socket file is given that group and
/// [`UNIX_SOCKET_GROUP_MODE`] (unless `unix-socket-mode` says otherwise),
/// so that the group's members (the Zope processes' user) can connect and
/// others cannot. The server must be a member of the group (systemd:
/// `SupplementaryGroups=`); under `DynamicUser=` its primary group is one
/// of its own, of no use to Zope.
pub const DEFAULT_UNIX_SOCKET_GROUP: Option<&str> = None;

/// The mode a unix socket file gets with `unix-socket-group` when
/// `unix-socket-mode` is not set: read and write (which `connect` needs)
/// for the owner and the group, nothing for others.
pub const UNIX_SOCKET_GROUP_MODE: u32 = 0o660;

/// Default `class-table-size`: how many classes `server_status` and the
/// metrics list per storage, those holding the most bytes, the rest summed
/// in one `(other)` row. Ten name what fills a session storage (the
/// session data's own classes, the BTrees that index them, the mappings
/// they hold) and keep the metrics at 2 × 11 series per storage. 0 lists
/// none.
pub const DEFAULT_CLASS_TABLE_SIZE: usize = 10;

/// Largest `class-table-size` accepted: each class listed is two series
/// per storage in every scrape; more than this is no longer an overview
/// (and a time-series database's worry).
pub const MAX_CLASS_TABLE_SIZE: usize = 1000;

/// How often a summary line per storage is logged, in seconds (not a
/// setting).
pub const STATS_LOG_INTERVAL_SECS: u64 = 300;

/// The queued bytes over which a connection's requests are not read, for
/// an outbox bound of `max_outbox_bytes` and a `read-pause-bytes` of
/// `read_pause_bytes`: the smaller of that and half the bound.
pub fn effective_read_pause(max_outbox_bytes: usize, read_pause_bytes: usize) -> usize {
    read_pause_bytes.min(max_outbox_bytes / 2)
}

/// An on/off setting: `true` or `false` in the config file; on the command
/// line a flag that can only turn it on (absent, it is unset, so the file's
/// value or the default stands).
pub type Switch = Option<bool>;

/// Parses a [`Switch`] flag: clap gives `"true"` when the flag is present
/// and `"false"` when it is absent, which is unset.
fn switch(given: &str) -> Result<Switch, String> {
    match given {
        "true" => Ok(Some(true)),
        "false" => Ok(None),
        _ => Err(format!("{given:?} is not true or false")),
    }
}

/// Every setting, each optional: the command line's options (the doc
/// comments are their `--help` text and the manual page's) and the TOML
/// config file's keys (the same names, without `--`; see
/// `config/zeotemp.toml`). Unset ones take their default in
/// [`Settings::resolve`].
// The field docs are `--help` text, where `<ssl>` is ZEO's section name, not HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(clap::Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Where to listen: HOST:PORT for TCP (port 0 picks a free port), or a
    /// path for a unix-domain socket. Repeat for several listeners.
    /// [default: 127.0.0.1:8101]
    #[arg(short, long = "address", value_name = "ADDR")]
    pub address: Option<Vec<String>>,

    /// A storage name to serve (what clients give as `storage`). Repeat for
    /// several fully isolated storages. [default: 1]
    #[arg(short, long = "storage", value_name = "NAME")]
    pub storage: Option<Vec<String>>,

    /// Serve every storage read-only: writable registrations are refused
    /// with ReadOnlyError (clients with read-only-fallback connect
    /// read-only).
    #[arg(long, action = clap::ArgAction::SetTrue, value_parser = switch)]
    pub read_only: Switch,

    /// Announce ZEO protocol M5 (msgpack) instead of Z5 (pickle), as the
    /// stock server's `msgpack true`; stock clients then speak msgpack
    /// (they need the `msgpack` package). Whatever is announced, a client
    /// answering M5 gets msgpack and one answering Z5 pickle.
    /// [default: off]
    #[arg(long, action = clap::ArgAction::SetTrue, value_parser = switch)]
    pub msgpack: Switch,

    /// Seconds one transaction may hold a storage's commit lock (from vote,
    /// through client-side conflict resolution, to tpc_finish) before it is
    /// aborted and its connection closed. [default: 30]
    #[arg(long, value_name = "SECS")]
    pub transaction_timeout: Option<u64>,

    /// Seconds a client may take to send one message once its first byte
    /// arrived (and its handshake after connecting); over it the connection
    /// is closed with a log line. [default: 60]
    #[arg(long, value_name = "SECS")]
    pub frame_timeout: Option<u64>,

    /// Seconds a stop (SIGTERM, Ctrl-C) gives a commit in progress to
    /// finish, and then each connection to receive what is queued for it.
    /// [default: 5]
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace: Option<u64>,

    /// File mode of unix-domain sockets, in octal (e.g. 0660); default: the
    /// process umask's.
    #[arg(long, value_name = "MODE")]
    pub unix_socket_mode: Option<String>,

    /// Group of unix-domain sockets: a name (looked up in /etc/group) or a
    /// numeric gid. Each socket file is given this group, and mode 0660
    /// unless --unix-socket-mode is set, so that the group's members (e.g.
    /// the Zope user) can connect and others cannot. The server must be in
    /// the group (systemd: SupplementaryGroups=); otherwise it does not
    /// start (exit status 2). Default: unchanged (the process's group).
    #[arg(long, value_name = "GROUP")]
    pub unix_socket_group: Option<String>,

    /// Recent transactions remembered for reconnecting clients' quick cache
    /// verification (getInvalidations). [default: 100]
    #[arg(long, value_name = "N")]
    pub invalidation_queue_size: Option<usize>,

    /// Seconds a non-current object revision is kept after it was replaced,
    /// for open snapshots (MVCC) and client-side conflict resolution. A
    /// load of a revision older than that is answered with a retryable
    /// conflict. [default: 60]
    #[arg(long, value_name = "SECS")]
    pub history_retention: Option<u64>,

    /// Seconds between background passes that drop expired history and,
    /// if anything was committed, collect objects unreachable from the
    /// root. [default: 10]
    #[arg(long, value_name = "SECS")]
    pub gc_interval: Option<u64>,

    /// Milliseconds the garbage collector may hold a storage's lock at a
    /// time before it lets commits in again (and loads waiting behind
    /// them); smaller shortens their pauses and lengthens a collection.
    /// 1 to 1000. [default: 1]
    #[arg(long, value_name = "MS")]
    pub gc_hold_budget: Option<u64>,

    /// Resident memory, in bytes, the storages' data may take, all storages
    /// together. zeotemp sets 8 MiB (at most half) aside for the process
    /// itself and allows 3 bytes of RSS per byte it accounts for (records,
    /// references and bookkeeping): the accounted bytes may reach a third
    /// of the rest. A commit that would cross it first drops
    /// its storage's oldest history and collects garbage; if still over, its
    /// vote fails with an error naming this limit. Not counted: the
    /// buffers of many or greedy clients (see max-outbox-bytes,
    /// max-transaction-bytes). Under session churn RSS stayed under 80 %
    /// of limits of 16 MiB and more. At least 1048576 (1 MiB); 0 means no
    /// limit. [default: half of the machine's memory or, if smaller, of the
    /// cgroup's memory limit]
    #[arg(long, value_name = "BYTES")]
    pub memory_limit: Option<usize>,

    /// Largest frame (message) a client may send, in bytes; a larger one
    /// closes that connection with a log line. [default: 67108864 = 64 MiB]
    #[arg(long, value_name = "BYTES")]
    pub max_frame_size: Option<usize>,

    /// Bytes of replies and invalidations queued for one client; a client
    /// that does not read them is disconnected (it reconnects and verifies
    /// its cache), never sent a partial stream. [default: 268435456 = 256 MiB]
    #[arg(long, value_name = "BYTES")]
    pub max_outbox_bytes: Option<usize>,

    /// Bytes of object data one transaction may send before its vote; over
    /// it the vote fails with an error naming this limit. At least 512.
    /// [default: 536870912 = 512 MiB]
    #[arg(long, value_name = "BYTES")]
    pub max_transaction_bytes: Option<usize>,

    /// Simultaneous client connections; further ones are closed at once
    /// with a log line. At least 1. [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Bytes queued for a client past which its own requests are not read
    /// until it reads its replies (a client that pipelines and never reads
    /// holds about this much of the server's memory). [default: 1 MiB]
    #[arg(long, value_name = "BYTES")]
    pub read_pause_bytes: Option<usize>,

    /// How deeply containers may nest in one message; a deeper one closes
    /// its connection with a log line. [default: 64]
    #[arg(long, value_name = "N")]
    pub max_nesting_depth: Option<usize>,

    /// Values (scalars and containers) one message may decode to; more
    /// close its connection with a log line (bounds decoding to about 100
    /// bytes per value). [default: 100000]
    #[arg(long, value_name = "N")]
    pub max_message_items: Option<usize>,

    /// Worker threads serving connections. One is the leanest and steadiest
    /// for a session store; more help only many busy clients on a machine
    /// with cores to spare. 1 to 1024. [default: 1]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Accepted for familiarity with ZEO's option of the same name, and
    /// always on: zeotemp never unpickles application data, so conflicts
    /// are handed to the clients to resolve (BTrees, Length, Transience
    /// resolve theirs as with a stock server in this mode).
    #[arg(long, action = clap::ArgAction::SetTrue, value_parser = switch)]
    pub client_conflict_resolution: Switch,

    /// Serve every listener (unix sockets too) with TLS, using this PEM
    /// certificate chain (the server's certificate first, then any
    /// intermediates); needs --tls-key. Clients use ZEO's <ssl> section or
    /// ClientStorage(ssl=...). [default: no TLS]
    #[arg(long, value_name = "FILE")]
    pub tls_certificate: Option<PathBuf>,

    /// The PEM private key of --tls-certificate (unencrypted).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// PEM file of CA certificates: clients must present a certificate
    /// signed by one of them, or the TLS handshake fails (the stock
    /// server's <ssl> authenticate). Needs --tls-certificate.
    /// [default: no client certificate asked for]
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on HOST:PORT;
    /// port 0 picks a free port and logs it. [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_address: Option<String>,

    /// Classes listed per storage in server_status ("classes") and in the
    /// metrics (zeotemp_class_objects, zeotemp_class_bytes): the N holding
    /// the most bytes, the rest summed as "(other)"; 0 lists none; at most
    /// 1000. [default: 10]
    #[arg(long, value_name = "N")]
    pub class_table_size: Option<usize>,

    /// Log filter: error, warn, info, debug (commits are logged at debug),
    /// or a tracing filter like `zeotemp=debug`. Overrides RUST_LOG. One
    /// that is not valid (`loud`) is a configuration error. [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Seconds after a warning of one kind (refusals, slow clients,
    /// timeouts, TLS failures) during which further ones of that kind are
    /// logged at debug only, counted in the next warning; the metrics count
    /// every one. 0 holds nothing back. [default: 10]
    #[arg(long, value_name = "SECS")]
    pub log_repeat_interval: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `host:port` for TCP, or a filesystem path for a unix-domain socket.
    pub addresses: Vec<String>,
    /// Storage names served; each is a separate, isolated database.
    pub storages: Vec<String>,
    pub read_only: bool,
    /// `msgpack`: announce `M5` (msgpack) instead of `Z5` (pickle), at the
    /// handshake, as the stock server's `msgpack true`. Stock clients
    /// answer with the letter announced; whatever was announced, a client
    /// answering `M5` is spoken msgpack, one answering `Z5` pickle. Off by
    /// default: a stock client needs the `msgpack` package for `M5`, which
    /// Zope and Plone do not install.
    pub msgpack: bool,
    pub transaction_timeout: Duration,
    /// See [`DEFAULT_FRAME_TIMEOUT_SECS`].
    pub frame_timeout: Duration,
    /// `shutdown-grace` ([`DEFAULT_SHUTDOWN_GRACE_SECS`]).
    pub shutdown_grace: Duration,
    /// File mode of unix-domain sockets (e.g. `0o660`); `None` leaves the
    /// process umask's.
    pub unix_socket_mode: Option<u32>,
    /// `unix-socket-group` as given (a name or a gid;
    /// [`DEFAULT_UNIX_SOCKET_GROUP`]): the group of unix socket files,
    /// resolved by [`group_id`].
    pub unix_socket_group: Option<String>,
    pub invalidation_queue_size: usize,
    pub max_frame_size: usize,
    pub max_outbox_bytes: usize,
    /// `read-pause-bytes` ([`DEFAULT_READ_PAUSE_BYTES`]; at most half of
    /// `max_outbox_bytes` takes effect).
    pub read_pause_bytes: usize,
    pub max_transaction_bytes: usize,
    pub max_connections: usize,
    /// `max-nesting-depth`: how deeply containers may nest in one message
    /// ([`DEFAULT_MAX_NESTING_DEPTH`]; at least [`MIN_NESTING_DEPTH`]).
    pub max_nesting_depth: usize,
    /// `max-message-items`: values one message may decode to
    /// ([`DEFAULT_MAX_MESSAGE_ITEMS`]; at least [`MIN_MESSAGE_ITEMS`]).
    pub max_message_items: usize,
    /// Runtime worker threads (at least 1).
    pub threads: usize,
    pub history_retention: Duration,
    pub gc_interval: Duration,
    /// `gc-hold-budget` ([`DEFAULT_GC_HOLD_BUDGET_MS`]).
    pub gc_hold_budget: Duration,
    /// Resident memory all storages together may take (see
    /// `storage::budget`); `None` is no limit.
    pub memory_limit: Option<usize>,
    /// The memory the process can have, read at start-up: the default
    /// `memory-limit` is a fraction of it, and a larger one is refused.
    pub memory_ceiling: MemoryCeiling,
    /// `tls-certificate`: the server's certificate chain (PEM: its own
    /// certificate first, then any intermediates). With `tls-key`, every
    /// listener speaks TLS (the stock server's `<ssl> certificate`); see
    /// `src/server/tls.rs`.
    pub tls_certificate: Option<PathBuf>,
    /// `tls-key`: the private key of `tls-certificate` (PEM, unencrypted;
    /// the stock server's `<ssl> key`).
    pub tls_key: Option<PathBuf>,
    /// `tls-client-ca`: CA certificates (PEM); when set, a client must
    /// present a certificate signed by one of them or its handshake fails
    /// (the stock server's `<ssl> authenticate`). Needs `tls-certificate`.
    pub tls_client_ca: Option<PathBuf>,
    /// `metrics-address`: `HOST:PORT` of the Prometheus endpoint; `None`
    /// (the default, [`DEFAULT_METRICS_ADDRESS`]) serves none.
    pub metrics_address: Option<String>,
    /// `class-table-size`: classes listed per storage in `server_status`
    /// and the metrics ([`DEFAULT_CLASS_TABLE_SIZE`]; 0: none; at most
    /// [`MAX_CLASS_TABLE_SIZE`]).
    pub class_table_size: usize,
    /// `log-repeat-interval` ([`DEFAULT_LOG_REPEAT_INTERVAL_SECS`]; zero
    /// holds nothing back).
    pub log_repeat_interval: Duration,
}

/// Why there is no default memory limit when the memory the process can
/// have is unknown (no `/proc/meminfo`, e.g. under systemd's
/// `ProcSubset=pid`, and no cgroup limit): said in the start-up line and
/// logged as a warning.
pub const UNKNOWN_CEILING: &str = "neither the machine's memory (/proc/meminfo) nor a cgroup \
    memory limit could be read, so there is no default; set memory-limit";

/// The default memory limit under `ceiling`: half of it, if known.
pub fn default_memory_limit(ceiling: &MemoryCeiling) -> Option<usize> {
    ceiling
        .bytes()
        .map(|m| (m as f64 * DEFAULT_MEMORY_LIMIT_FRACTION) as usize)
}

/// Every setting at its default.
impl Default for Config {
    fn default() -> Config {
        Settings::default()
            .resolve()
            .expect("unset settings take their defaults")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A TOML error in one line: where (the line, and the setting on it
    /// if any) and what was expected.
    #[error("config file {path}, line {line}{setting}: {message}")]
    Parse {
        path: String,
        line: usize,
        /// `", SETTING"`, or empty when the line names none.
        setting: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// `e` in one line (toml's own text spans four, with the line quoted and
/// a caret under the place): the line number from its span, the setting
/// that line sets, and toml's message.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let start = e.span().map_or(0, |span| span.start.min(text.len()));
    let line = text[..start].matches('\n').count() + 1;
    let setting = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('#'))
        .map(|key| format!(", {key}"))
        .unwrap_or_default();
    ConfigError::Parse {
        path: path.display().to_string(),
        line,
        setting,
        message: e.message().trim().replace('\n', " "),
    }
}

/// A unix file mode from octal digits (`"660"`, `"0660"`, `"0o660"`).
fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let digits = s.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(ConfigError::Invalid(format!(
            "unix-socket-mode {s:?} is not a file mode in octal such as 0660"
        ))),
    }
}

impl Settings {
    /// The settings of a TOML config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))
    }

    /// Each setting from `self` where set there, else from `lower`: the
    /// command line's `.or(` the config file's `)`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            address: self.address.or(lower.address),
            storage: self.storage.or(lower.storage),
            read_only: self.read_only.or(lower.read_only),
            msgpack: self.msgpack.or(lower.msgpack),
            transaction_timeout: self.transaction_timeout.or(lower.transaction_timeout),
            frame_timeout: self.frame_timeout.or(lower.frame_timeout),
            shutdown_grace: self.shutdown_grace.or(lower.shutdown_grace),
            unix_socket_mode: self.unix_socket_mode.or(lower.unix_socket_mode),
            unix_socket_group: self.unix_socket_group.or(lower.unix_socket_group),
            invalidation_queue_size: self
                .invalidation_queue_size
                .or(lower.invalidation_queue_size),
            history_retention: self.history_retention.or(lower.history_retention),
            gc_interval: self.gc_interval.or(lower.gc_interval),
            gc_hold_budget: self.gc_hold_budget.or(lower.gc_hold_budget),
            memory_limit: self.memory_limit.or(lower.memory_limit),
            max_frame_size: self.max_frame_size.or(lower.max_frame_size),
            max_outbox_bytes: self.max_outbox_bytes.or(lower.max_outbox_bytes),
            max_transaction_bytes: self.max_transaction_bytes.or(lower.max_transaction_bytes),
            max_connections: self.max_connections.or(lower.max_connections),
            read_pause_bytes: self.read_pause_bytes.or(lower.read_pause_bytes),
            max_nesting_depth: self.max_nesting_depth.or(lower.max_nesting_depth),
            max_message_items: self.max_message_items.or(lower.max_message_items),
            threads: self.threads.or(lower.threads),
            client_conflict_resolution: self
                .client_conflict_resolution
                .or(lower.client_conflict_resolution),
            tls_certificate: self.tls_certificate.or(lower.tls_certificate),
            tls_key: self.tls_key.or(lower.tls_key),
            tls_client_ca: self.tls_client_ca.or(lower.tls_client_ca),
            metrics_address: self.metrics_address.or(lower.metrics_address),
            class_table_size: self.class_table_size.or(lower.class_table_size),
            log_level: self.log_level.or(lower.log_level),
            log_repeat_interval: self.log_repeat_interval.or(lower.log_repeat_interval),
        }
    }

    /// The [`Config`] these settings make, each unset one at its default
    /// (`log-level` is the binary's, not in it). Refuses what cannot be
    /// read (a `unix-socket-mode` that is no octal mode,
    /// `client-conflict-resolution = false`); [`Config::validate`] checks
    /// the values together.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        if self.client_conflict_resolution == Some(false) {
            return Err(ConfigError::Invalid(
                "client-conflict-resolution = false is not possible: zeotemp never unpickles \
                 application data, so clients always resolve conflicts"
                    .into(),
            ));
        }
        let secs = |v: Option<u64>, default| Duration::from_secs(v.unwrap_or(default));
        // The default limit is a fraction of it, and a limit above it is
        // refused (`validate`).
        let ceiling = MemoryCeiling::of_this_process();
        Ok(Config {
            addresses: self
                .address
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_ADDRESS.to_string()]),
            storages: self
                .storage
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_STORAGE.to_string()]),
            read_only: self.read_only.unwrap_or(false),
            msgpack: self.msgpack.unwrap_or(false),
            transaction_timeout: secs(self.transaction_timeout, DEFAULT_TRANSACTION_TIMEOUT_SECS),
            frame_timeout: secs(self.frame_timeout, DEFAULT_FRAME_TIMEOUT_SECS),
            shutdown_grace: secs(self.shutdown_grace, DEFAULT_SHUTDOWN_GRACE_SECS),
            unix_socket_mode: self
                .unix_socket_mode
                .as_deref()
                .map(parse_mode)
                .transpose()?,
            unix_socket_group: self
                .unix_socket_group
                .clone()
                .or(DEFAULT_UNIX_SOCKET_GROUP.map(String::from)),
            invalidation_queue_size: self
                .invalidation_queue_size
                .unwrap_or(DEFAULT_INVALIDATION_QUEUE_SIZE),
            max_frame_size: self.max_frame_size.unwrap_or(DEFAULT_MAX_FRAME_SIZE),
            max_outbox_bytes: self.max_outbox_bytes.unwrap_or(DEFAULT_MAX_OUTBOX_BYTES),
            read_pause_bytes: self.read_pause_bytes.unwrap_or(DEFAULT_READ_PAUSE_BYTES),
            max_transaction_bytes: self
                .max_transaction_bytes
                .unwrap_or(DEFAULT_MAX_TRANSACTION_BYTES),
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_nesting_depth: self.max_nesting_depth.unwrap_or(DEFAULT_MAX_NESTING_DEPTH),
            max_message_items: self.max_message_items.unwrap_or(DEFAULT_MAX_MESSAGE_ITEMS),
            threads: self.threads.unwrap_or(DEFAULT_THREADS),
            history_retention: secs(self.history_retention, DEFAULT_HISTORY_RETENTION_SECS),
            gc_interval: secs(self.gc_interval, DEFAULT_GC_INTERVAL_SECS),
            gc_hold_budget: Duration::from_millis(
                self.gc_hold_budget.unwrap_or(DEFAULT_GC_HOLD_BUDGET_MS),
            ),
            // 0 means no limit.
            memory_limit: match self.memory_limit {
                Some(bytes) => (bytes > 0).then_some(bytes),
                None => default_memory_limit(&ceiling),
            },
            memory_ceiling: ceiling,
            tls_certificate: self.tls_certificate.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            metrics_address: self
                .metrics_address
                .clone()
                .or(DEFAULT_METRICS_ADDRESS.map(String::from)),
            class_table_size: self.class_table_size.unwrap_or(DEFAULT_CLASS_TABLE_SIZE),
            log_repeat_interval: secs(self.log_repeat_interval, DEFAULT_LOG_REPEAT_INTERVAL_SECS),
        })
    }
}

/// `n` bytes for people: `512 B`, `64 MiB`, `11.8 GiB`.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Config {
    /// The settings in one line for people: what is served and every limit
    /// (the start-up line and `--check-config` print it).
    pub fn summary(&self) -> String {
        let secs = |d: Duration| format!("{} s", d.as_secs());
        let storages = self
            .storages
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let memory = match (self.memory_limit, self.memory_ceiling) {
            (Some(m), c) if Some(m) == default_memory_limit(&c) => format!(
                "{} for all storages (half of {})",
                human_bytes(m),
                c.describe()
            ),
            (Some(m), _) => format!("{} for all storages", human_bytes(m)),
            (None, c) if c.bytes().is_none() => format!("no memory limit: {UNKNOWN_CEILING}"),
            (None, _) => "no limit".into(),
        };
        let mut extras = String::new();
        if self.msgpack {
            extras.push_str(", announcing msgpack (M5)");
        }
        if let Some(a) = &self.metrics_address {
            extras.push_str(&format!(", metrics-address {a}"));
        }
        format!(
            "storage{} {storages}{}{}; memory {memory}, history {}, gc every {}; \
             limits: {} connections, frame {}, transaction {}, outbox {} (read pause {}), \
             nesting {}, {} values per message; timeouts: transaction {}, frame {}, shutdown {}; \
             {} thread{}",
            if self.storages.len() == 1 { "" } else { "s" },
            if self.read_only { " (read-only)" } else { "" },
            extras,
            secs(self.history_retention),
            secs(self.gc_interval),
            self.max_connections,
            human_bytes(self.max_frame_size),
            human_bytes(self.max_transaction_bytes),
            human_bytes(self.max_outbox_bytes),
            human_bytes(effective_read_pause(
                self.max_outbox_bytes,
                self.read_pause_bytes
            )),
            self.max_nesting_depth,
            self.max_message_items,
            secs(self.transaction_timeout),
            secs(self.frame_timeout),
            secs(self.shutdown_grace),
            self.threads,
            if self.threads == 1 { "" } else { "s" },
        )
    }
    /// Checks settings that would make the server useless or unsafe, or
    /// stop it from starting; the error lists every problem found, one
    /// line each (naming the setting, the value and why).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems: Vec<String> = [
            self.address_problems(),
            self.socket_problems(),
            self.storage_problems(),
            self.limit_problems(),
            self.tls_and_metrics_problems(),
        ]
        .concat();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
    }

    /// Addresses that are not addresses, given twice, or shared with the
    /// metrics endpoint.
    fn address_problems(&self) -> Vec<String> {
        let mut listed: Vec<&str> = Vec::new();
        let mut address_problems = Vec::new();
        for a in &self.addresses {
            if !a.contains('/') && host_port(a).is_none() {
                address_problems.push(format!(
                    "address {a:?} is not HOST:PORT with a port from 0 to 65535, nor a unix \
                     socket path (with a /)"
                ));
            } else if listed.iter().any(|b| same_address(a, b)) {
                address_problems.push(format!(
                    "address {a:?} is given twice (the second listener could not bind)"
                ));
            }
            listed.push(a);
        }
        if let Some(m) = &self.metrics_address
            && let Some(a) = self.addresses.iter().find(|a| same_address(m, a))
        {
            address_problems.push(format!(
                "metrics-address {m:?} is also the ZEO address {a:?} (they need a port each)"
            ));
        }
        address_problems
    }

    /// `unix-socket-group` and `unix-socket-mode` together.
    fn socket_problems(&self) -> Vec<String> {
        // Whether the server may give its sockets that group is known only
        // when it tries (`server::listener`; `--check-config` does).
        let mut socket_problems = Vec::new();
        if let Some(group) = &self.unix_socket_group {
            if let Err(why) = group_id(group) {
                socket_problems.push(format!("unix-socket-group {group:?}: {why}"));
            }
            if let Some(mode) = self.unix_socket_mode.filter(|m| m & 0o060 != 0o060) {
                socket_problems.push(format!(
                    "unix-socket-mode {mode:04o} gives the group of unix-socket-group {group:?} \
                     no read and write permission, which connecting needs (e.g. 0660)"
                ));
            }
        }
        socket_problems
    }

    /// Nothing to listen on or serve, storage names empty or twice.
    fn storage_problems(&self) -> Vec<String> {
        let mut names = self.storages.clone();
        names.sort();
        names.dedup();
        let twice: Vec<&String> = names
            .iter()
            .filter(|n| self.storages.iter().filter(|s| s == n).count() > 1)
            .collect();
        found([
            (self.addresses.is_empty(), "no address to listen on".into()),
            (self.storages.is_empty(), "no storage to serve".into()),
            (
                !twice.is_empty(),
                format!("a storage name is given twice: {twice:?}"),
            ),
            (
                self.storages.iter().any(|s| s.trim().is_empty()),
                format!(
                    "storage {:?} is an empty name (clients name the storage they use, '1' by \
                     default)",
                    self.storages
                        .iter()
                        .find(|s| s.trim().is_empty())
                        .map(String::as_str)
                        .unwrap_or_default()
                ),
            ),
        ])
    }

    /// Limits too small (or large) to serve anything.
    fn limit_problems(&self) -> Vec<String> {
        found([
            (
                matches!(
                    (self.memory_limit, self.memory_ceiling.bytes()),
                    (Some(m), Some(ceiling)) if m > ceiling
                ),
                format!(
                    "memory-limit = {} is more than the memory this process can have ({}): \
                     the kernel would kill it before a commit is refused at the limit",
                    self.memory_limit.unwrap_or_default(),
                    self.memory_ceiling.describe()
                ),
            ),
            (self.threads == 0, "threads must be at least 1".into()),
            (
                self.threads > MAX_THREADS,
                format!(
                    "threads = {} is more than {MAX_THREADS} (each is an OS thread with its own \
                     stack; more than the cores only contend)",
                    self.threads
                ),
            ),
            (
                self.max_connections == 0,
                "max-connections = 0 would refuse every client: it must be at least 1".into(),
            ),
            (
                self.max_transaction_bytes < MIN_MAX_TRANSACTION_BYTES,
                format!(
                    "max-transaction-bytes = {} is less than {MIN_MAX_TRANSACTION_BYTES}: one \
                     object's record would fail its vote",
                    self.max_transaction_bytes
                ),
            ),
            (
                self.memory_limit.is_some_and(|m| m < MIN_MEMORY_LIMIT),
                format!(
                    "memory-limit = {} is less than {MIN_MEMORY_LIMIT} (1 MiB; the limit is in \
                     bytes, 0 means none): every vote would fail with a memory-limit error",
                    self.memory_limit.unwrap_or_default()
                ),
            ),
            (
                self.max_frame_size < 1024,
                "max-frame-size must be at least 1024 bytes".into(),
            ),
            (
                self.max_outbox_bytes < self.max_frame_size,
                "max-outbox-bytes must be at least max-frame-size (a reply must fit)".into(),
            ),
            (
                self.max_nesting_depth < MIN_NESTING_DEPTH,
                format!(
                    "max-nesting-depth must be at least {MIN_NESTING_DEPTH} (stock clients' \
                     messages nest up to 4 levels)"
                ),
            ),
            (
                self.max_message_items < MIN_MESSAGE_ITEMS,
                format!(
                    "max-message-items must be at least {MIN_MESSAGE_ITEMS} (a stock client's \
                     message has a few dozen values; a tpc_begin extension or a \
                     getInvalidations list more)"
                ),
            ),
            (
                self.read_pause_bytes < MIN_READ_PAUSE_BYTES,
                format!(
                    "read-pause-bytes must be at least {MIN_READ_PAUSE_BYTES} (a few replies \
                     must fit)"
                ),
            ),
            (
                self.class_table_size > MAX_CLASS_TABLE_SIZE,
                format!(
                    "class-table-size = {} is more than {MAX_CLASS_TABLE_SIZE} (each class \
                     listed is two metric series per storage)",
                    self.class_table_size
                ),
            ),
            (
                self.gc_interval.is_zero(),
                "gc-interval must be at least 1 second".into(),
            ),
            (
                self.gc_hold_budget.is_zero()
                    || self.gc_hold_budget > Duration::from_millis(MAX_GC_HOLD_BUDGET_MS),
                format!(
                    "gc-hold-budget = {} is not between 1 and {MAX_GC_HOLD_BUDGET_MS} milliseconds",
                    self.gc_hold_budget.as_millis()
                ),
            ),
            (
                self.transaction_timeout.is_zero(),
                "transaction-timeout must be at least 1 second".into(),
            ),
            (
                self.frame_timeout.is_zero(),
                "frame-timeout must be at least 1 second".into(),
            ),
        ])
    }

    /// TLS files that do not go together, a metrics address that is not one.
    fn tls_and_metrics_problems(&self) -> Vec<String> {
        let metrics_address_ok = self
            .metrics_address
            .as_ref()
            .is_none_or(|a| host_port(a).is_some() && !a.contains('/'));
        // The TLS files themselves are read and checked at startup
        // (`server::tls::load`).
        let (cert, key) = (self.tls_certificate.is_some(), self.tls_key.is_some());
        found([
            (
                cert && !key,
                "tls-certificate needs tls-key (the certificate's private key)".into(),
            ),
            (
                key && !cert,
                "tls-key needs tls-certificate (the certificate it belongs to)".into(),
            ),
            (
                !metrics_address_ok,
                format!(
                    "metrics-address {:?} is not HOST:PORT (e.g. 127.0.0.1:9101; TCP only)",
                    self.metrics_address.as_deref().unwrap_or_default()
                ),
            ),
            (
                self.tls_client_ca.is_some() && !cert,
                "tls-client-ca needs tls-certificate and tls-key (client certificates are \
                 checked in the TLS handshake)"
                    .into(),
            ),
        ])
    }
}

/// The problems of `checks` whose condition holds.
fn found<const N: usize>(checks: [(bool, String); N]) -> Vec<String> {
    checks
        .into_iter()
        .filter(|(found, _)| *found)
        .map(|(_, problem)| problem)
        .collect()
}

/// The log filter when neither `log-level` nor `RUST_LOG` sets one.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The log filter the server runs with: `log-level` if set (command line
/// over config file), else the `RUST_LOG` environment variable (`rust_log`)
/// if set and not blank, else [`DEFAULT_LOG_LEVEL`]. A filter is
/// comma-separated directives, each a level (`off`, `error`, `warn`,
/// `info`, `debug`, `trace`) or `TARGET=LEVEL` (`zeotemp=debug`); anything
/// else is an error naming the setting, the value and the directive, not a
/// filter that silently logs nothing (tracing's own parser takes a bare
/// word such as `loud` for a target name).
pub fn log_filter(
    log_level: Option<&str>,
    rust_log: Option<&str>,
) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    let (setting, value) = match (log_level, rust_log) {
        (Some(level), _) => ("log-level", level),
        (None, Some(env)) if !env.trim().is_empty() => ("RUST_LOG", env),
        _ => return Ok(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_LEVEL)),
    };
    let invalid = |why: String| ConfigError::Invalid(format!("{setting} {value:?}: {why}"));
    if value.trim().is_empty() {
        return Err(invalid(
            "is empty: give a level (error, warn, info, debug) or a filter such as zeotemp=debug"
                .into(),
        ));
    }
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let is_level = directive
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_ok();
        if !is_level && !directive.contains('=') && !directive.contains('[') {
            return Err(invalid(format!(
                "{directive:?} is neither a level (off, error, warn, info, debug, trace) nor a \
                 TARGET=LEVEL directive such as zeotemp=debug"
            )));
        }
    }
    tracing_subscriber::EnvFilter::try_new(value).map_err(|e| invalid(format!("{e}")))
}

/// Where group names are looked up ([`group_id`]).
const ETC_GROUP: &str = "/etc/group";

/// The gid that `unix-socket-group` names. Digits are a gid, taken as it
/// is (the group need not be listed anywhere). A name is looked up in
/// `/etc/group`, and only there: zeotemp reads the file instead of asking
/// the C library (`getgrnam` would take `unsafe` code), so a group known
/// only to LDAP, SSSD or another NSS source needs its number. The error
/// says why, for a line naming the setting and the value.
pub fn group_id(value: &str) -> Result<u32, String> {
    if value.is_empty() {
        return Err("is empty: give a group name or a numeric gid".into());
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // u32::MAX is chown's "leave the group as it is".
        return match value.parse::<u32>() {
            Ok(gid) if gid != u32::MAX => Ok(gid),
            _ => Err(format!("is not a gid (0 to {})", u32::MAX - 1)),
        };
    }
    let text = std::fs::read_to_string(ETC_GROUP)
        .map_err(|e| format!("cannot read {ETC_GROUP} to look the name up: {e}"))?;
    group_in(&text, |name, _| name == value)
        .map(|(_, gid)| gid)
        .ok_or_else(|| {
            format!(
                "no such group in {ETC_GROUP} (names are looked up there only: give the gid of a \
             group from LDAP or another source)"
            )
        })
}

/// The name `/etc/group` gives `gid`, if any (for the log).
pub fn group_name(gid: u32) -> Option<String> {
    let text = std::fs::read_to_string(ETC_GROUP).ok()?;
    group_in(&text, |_, id| id == gid).map(|(name, _)| name.to_string())
}

/// The first entry (name, gid) of the `/etc/group` text `etc_group`
/// (`name:password:gid:members` lines) that `wanted` picks.
fn group_in(etc_group: &str, wanted: impl Fn(&str, u32) -> bool) -> Option<(&str, u32)> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let gid = fields.nth(1)?.trim().parse().ok()?;
        wanted(name, gid).then_some((name, gid))
    })
}

/// `HOST:PORT` (`[::1]:8101` too) split in its host and port, if the host
/// is not empty and the port is a number from 0 to 65535.
fn host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

/// Whether two listen addresses are the same: the same unix socket path
/// (`/run//x.sock` is `/run/x.sock`), or TCP addresses with the same port
/// (not 0, which picks a free one each time) and the same host, as an IP
/// address when it is one (`[::1]:8101` and `[0:0::1]:8101`), else as a
/// name ignoring case. Names are not resolved here: `--check-config`
/// binds every address, which finds the rest.
fn same_address(a: &str, b: &str) -> bool {
    match (a.contains('/'), b.contains('/')) {
        (true, true) => Path::new(a) == Path::new(b),
        (false, false) => match (host_port(a), host_port(b)) {
            (Some((ha, pa)), Some((hb, pb))) if pa == pb && pa != 0 => {
                let ip = |h: &str| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok();
                match (ip(ha), ip(hb)) {
                    (Some(x), Some(y)) => x == y,
                    _ => ha.eq_ignore_ascii_case(hb),
                }
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod log_filter_tests {
    use super::log_filter;

    #[test]
    fn valid_filters_are_taken() {
        for level in [
            "info",
            "DEBUG",
            "warn,zeotemp=debug",
            "zeotemp::server=trace",
            "off",
        ] {
            log_filter(Some(level), None).unwrap();
            log_filter(None, Some(level)).unwrap();
        }
        // Unset or blank: the default.
        log_filter(None, None).unwrap();
        log_filter(None, Some(" ")).unwrap();
        // log-level wins: a bad RUST_LOG is not looked at.
        log_filter(Some("info"), Some("garbage!!")).unwrap();
    }

    #[test]
    fn invalid_filters_are_errors_naming_the_setting() {
        for (level, env, complaint) in [
            (Some("loud"), None, "log-level \"loud\""),
            (Some(""), None, "log-level \"\": is empty"),
            (Some("zeotemp=loud"), None, "log-level \"zeotemp=loud\""),
            (Some("info,chatty"), None, "\"chatty\" is neither a level"),
            (None, Some("garbage!!"), "RUST_LOG \"garbage!!\""),
        ] {
            let err = log_filter(level, env).unwrap_err().to_string();
            assert!(err.contains(complaint), "{level:?} {env:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zeotemp.toml");
        let file = Settings::load(&path).unwrap();
        let cfg = file.resolve().unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.addresses, vec!["127.0.0.1:8101".to_string()]);
        assert_eq!(cfg.storages, vec!["1".to_string()]);
        assert_eq!(
            cfg.gc_interval,
            Duration::from_secs(DEFAULT_GC_INTERVAL_SECS)
        );
        assert_eq!(cfg.threads, DEFAULT_THREADS);
        // Its values are the defaults (memory-limit is commented out).
        assert_eq!(cfg, Config::default());
    }

    /// Every setting's name (`--NAME`, and `NAME =` in the config file),
    /// from its one declaration.
    fn setting_names() -> Vec<String> {
        let cmd = <Settings as clap::Args>::augment_args(clap::Command::new("zeotemp"));
        let names: Vec<String> = cmd
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .map(String::from)
            .collect();
        assert!(
            names.contains(&"history-retention".to_string()),
            "{names:?}"
        );
        names
    }

    /// The names `name_in` finds in the lines of `text`, sorted; none may be
    /// found twice.
    fn names_listed(text: &str, name_in: impl Fn(&str) -> Option<&str>) -> Vec<String> {
        let mut names: Vec<String> = text.lines().filter_map(name_in).map(String::from).collect();
        names.sort();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a setting is listed twice: {names:?}");
        names
    }

    /// `config/zeotemp.toml` explains every setting (as `name = value`, or
    /// `# name = value` when commented out) and the README's table of
    /// options lists every one, and no other: a new setting fails here
    /// until both document it.
    #[test]
    fn example_config_and_readme_list_every_setting() {
        let mut settings = setting_names();
        settings.sort();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));

        let example = std::fs::read_to_string(root.join("config/zeotemp.toml")).unwrap();
        let in_example = names_listed(&example, |line| {
            let (key, _) = line.trim_start_matches("# ").split_once(" = ")?;
            key.chars()
                .all(|c| c.is_ascii_lowercase() || c == '-')
                .then_some(key)
        });
        assert_eq!(in_example, settings, "config/zeotemp.toml vs Settings");

        // The table's rows start with the option: "| `--name VALUE` ...".
        // Besides the settings it lists the command line's own options.
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let table = readme
            .split_once("\n## Options\n")
            .and_then(|(_, rest)| rest.split("\n## ").next())
            .expect("README.md has an Options section");
        let command_line_only = ["check-config", "config", "version"];
        let in_readme = names_listed(table, |line| {
            let option = line.strip_prefix("| `--")?;
            let end = option.find([' ', '`'])?;
            Some(&option[..end]).filter(|name| !command_line_only.contains(name))
        });
        assert_eq!(in_readme, settings, "README.md's Options table vs Settings");
        for option in command_line_only {
            assert!(table.contains(&format!("| `--{option}")), "--{option}");
        }
    }

    /// The `[default: ...]` of each option's `--help` is the value the
    /// example config file gives it (which are the defaults, as
    /// `example_config_file_parses` checks), where both have one.
    #[test]
    fn help_defaults_are_the_example_configs_values() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zeotemp.toml");
        let example: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cmd = <Settings as clap::Args>::augment_args(clap::Command::new("zeotemp"));
        let mut compared = 0;
        for arg in cmd.get_arguments() {
            let name = arg.get_long().unwrap();
            let help = arg.get_long_help().or(arg.get_help()).unwrap().to_string();
            let Some((_, default)) = help.split_once("[default: ") else {
                continue;
            };
            let mut words = default.split([' ', ']']);
            let first = words.next().unwrap();
            let in_help = match (first.parse::<i64>(), words.next()) {
                (Ok(n), Some("MiB")) => (n << 20).to_string(),
                _ => first.to_string(),
            };
            let in_example = match example.get(name) {
                Some(toml::Value::Integer(n)) => n.to_string(),
                Some(toml::Value::String(s)) => s.clone(),
                Some(toml::Value::Array(values)) if values.len() == 1 => {
                    values[0].as_str().unwrap().to_string()
                }
                _ => continue,
            };
            assert_eq!(
                in_help, in_example,
                "--{name}: --help vs config/zeotemp.toml"
            );
            compared += 1;
        }
        assert!(compared >= 15, "{compared} compared");
    }

    #[test]
    fn decode_limits_have_floors() {
        let file: Settings =
            toml::from_str("max-nesting-depth = 16\nmax-message-items = 5000").unwrap();
        let cfg = file.resolve().unwrap();
        assert_eq!((cfg.max_nesting_depth, cfg.max_message_items), (16, 5000));
        cfg.validate().unwrap();
        for (depth, items, complaint) in [
            (
                MIN_NESTING_DEPTH - 1,
                DEFAULT_MAX_MESSAGE_ITEMS,
                "max-nesting-depth",
            ),
            (
                DEFAULT_MAX_NESTING_DEPTH,
                MIN_MESSAGE_ITEMS - 1,
                "max-message-items",
            ),
        ] {
            let cfg = Config {
                max_nesting_depth: depth,
                max_message_items: items,
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(complaint), "{err}");
        }
    }

    #[test]
    fn summary_names_what_is_served_and_every_limit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        let cfg = Config {
            storages: vec!["1".into(), "temp".into()],
            memory_limit: Some(1 << 30),
            ..Config::default()
        };
        let s = cfg.summary();
        for part in [
            "storages \"1\", \"temp\";",
            "memory 1 GiB for all storages,",
            "history 60 s",
            "10000 connections",
            "frame 64 MiB",
            "transaction 512 MiB",
            "outbox 256 MiB (read pause 1 MiB)",
            "nesting 64",
            "100000 values per message",
            "timeouts: transaction 30 s, frame 60 s, shutdown 5 s",
            "1 thread",
        ] {
            assert!(s.contains(part), "{part:?} not in {s:?}");
        }
        let ro = Config {
            read_only: true,
            memory_limit: None,
            ..Config::default()
        };
        assert!(
            ro.summary()
                .starts_with("storage \"1\" (read-only); memory no limit")
        );
    }

    #[test]
    fn msgpack_is_off_by_default() {
        assert!(!Config::default().msgpack);
        let file: Settings = toml::from_str("msgpack = true").unwrap();
        let cfg = file.resolve().unwrap();
        assert!(cfg.msgpack);
        cfg.validate().unwrap();
        let file: Settings = toml::from_str("msgpack = false").unwrap();
        let cfg = file.resolve().unwrap();
        assert!(!cfg.msgpack);
    }

    #[test]
    fn memory_limit_zero_means_none() {
        let file: Settings = toml::from_str("memory-limit = 0").unwrap();
        let cfg = file.resolve().unwrap();
        assert_eq!(cfg.memory_limit, None);
        let file: Settings = toml::from_str("memory-limit = 1000000").unwrap();
        let cfg = file.resolve().unwrap();
        assert_eq!(cfg.memory_limit, Some(1_000_000));
    }

    #[test]
    fn memory_limit_above_the_ceiling_is_refused() {
        let file: Settings = toml::from_str("memory-limit = 2147483648").unwrap();
        let mut cfg = file.resolve().unwrap();
        let gib = 1 << 30;
        for (ceiling, refused) in [
            (
                MemoryCeiling {
                    ram: Some(4 * gib),
                    cgroup: None,
                },
                false,
            ),
            (
                MemoryCeiling {
                    ram: Some(gib),
                    cgroup: None,
                },
                true,
            ),
            (
                MemoryCeiling {
                    ram: Some(4 * gib),
                    cgroup: Some(gib),
                },
                true,
            ),
            (
                MemoryCeiling {
                    ram: None,
                    cgroup: None,
                },
                false,
            ),
        ] {
            cfg.memory_ceiling = ceiling;
            let result = cfg.validate();
            assert_eq!(result.is_err(), refused, "{ceiling:?}: {result:?}");
            if let Err(e) = result {
                let line = e.to_string();
                assert!(
                    line.starts_with(
                        "memory-limit = 2147483648 is more than the memory this \
                         process can have ("
                    ) && line.contains("1 GiB"),
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn unknown_ceiling_means_no_default_limit_and_says_so() {
        let mut cfg = Settings::default().resolve().unwrap();
        cfg.memory_ceiling = MemoryCeiling {
            ram: None,
            cgroup: None,
        };
        cfg.memory_limit = default_memory_limit(&MemoryCeiling::default());
        assert_eq!(cfg.memory_limit, None);
        assert!(cfg.summary().contains(UNKNOWN_CEILING), "{}", cfg.summary());
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unknown_key_refused() {
        let err = toml::from_str::<Settings>("adress = ['x']").unwrap_err();
        assert!(err.to_string().contains("adress"), "{err}");
    }

    #[test]
    fn unix_socket_mode_is_octal() {
        for (text, want) in [("0660", 0o660), ("660", 0o660), ("0o600", 0o600)] {
            let file: Settings = toml::from_str(&format!("unix-socket-mode = {text:?}")).unwrap();
            let cfg = file.resolve().unwrap();
            assert_eq!(cfg.unix_socket_mode, Some(want));
        }
        for bad in ["rw-rw----", "0999", "1777777"] {
            let file: Settings = toml::from_str(&format!("unix-socket-mode = {bad:?}")).unwrap();
            assert!(file.resolve().is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_socket_group_is_a_name_from_etc_group_or_a_gid() {
        assert_eq!(Config::default().unix_socket_group, None);
        let file: Settings = toml::from_str("unix-socket-group = 'zope'").unwrap();
        assert_eq!(
            file.resolve().unwrap().unix_socket_group.as_deref(),
            Some("zope")
        );
        let etc_group = "root:x:0:\nzope:x:1234:alice,bob\nbroken:x:\nother:x:99:\n";
        let by_name = |n: &str| group_in(etc_group, |name, _| name == n).map(|(_, g)| g);
        assert_eq!(by_name("zope"), Some(1234));
        assert_eq!(by_name("root"), Some(0));
        assert_eq!(by_name("broken"), None);
        assert_eq!(by_name("zop"), None);
        assert_eq!(
            group_in(etc_group, |_, gid| gid == 99).map(|(n, _)| n),
            Some("other")
        );
        // Numbers are gids, listed or not.
        assert_eq!(group_id("0"), Ok(0));
        assert_eq!(group_id("4000000000"), Ok(4_000_000_000));
        for bad in ["", "4294967295", "99999999999"] {
            assert!(group_id(bad).is_err(), "{bad:?}");
        }
        // /etc/group has root (gid 0) on any Linux system.
        assert_eq!(group_id("root"), Ok(0));
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }

    /// An unknown group, and a mode that would lock the group out, are
    /// each a line naming the setting and the value.
    #[test]
    fn unix_socket_group_problems_name_the_setting() {
        let cfg = Config {
            unix_socket_group: Some("no-such-group-zeotemp".into()),
            unix_socket_mode: Some(0o640),
            ..Config::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            lines[0].starts_with(
                "unix-socket-group \"no-such-group-zeotemp\": no such group in /etc/group"
            ),
            "{err}"
        );
        assert!(
            lines[1].starts_with("unix-socket-mode 0640 gives the group"),
            "{err}"
        );
        for mode in [None, Some(0o660), Some(0o770)] {
            let cfg = Config {
                unix_socket_group: Some("0".into()),
                unix_socket_mode: mode,
                ..Config::default()
            };
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn metrics_address_is_off_by_default_and_host_port() {
        assert_eq!(Config::default().metrics_address, None);
        let file: Settings = toml::from_str("metrics-address = '127.0.0.1:9101'").unwrap();
        let cfg = file.resolve().unwrap();
        assert_eq!(cfg.metrics_address.as_deref(), Some("127.0.0.1:9101"));
        cfg.validate().unwrap();
        for good in ["[::1]:0", "localhost:9101"] {
            let cfg = Config {
                metrics_address: Some(good.into()),
                ..Config::default()
            };
            cfg.validate().unwrap();
        }
        for bad in [
            "9101",
            "127.0.0.1",
            ":9101",
            "127.0.0.1:99999",
            "/run/metrics.sock",
        ] {
            let cfg = Config {
                metrics_address: Some(bad.into()),
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("metrics-address"), "{bad}: {err}");
        }
    }

    #[test]
    fn class_table_size_default_off_and_bound() {
        assert_eq!(Config::default().class_table_size, DEFAULT_CLASS_TABLE_SIZE);
        for (text, n) in [("class-table-size = 0", 0), ("class-table-size = 25", 25)] {
            let file: Settings = toml::from_str(text).unwrap();
            let cfg = file.resolve().unwrap();
            assert_eq!(cfg.class_table_size, n);
            cfg.validate().unwrap();
        }
        let cfg = Config {
            class_table_size: MAX_CLASS_TABLE_SIZE + 1,
            ..Config::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("class-table-size = 1001"), "{err}");
    }

    #[test]
    fn ccr_false_refused() {
        let file: Settings = toml::from_str("client-conflict-resolution = false").unwrap();
        assert!(file.resolve().is_err());
    }

    #[test]
    fn validate_catches_nonsense() {
        let cfg = Config {
            storages: vec!["1".into(), "1".into()],
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = Config {
            max_frame_size: 10,
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = Config {
            threads: 0,
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        Config::default().validate().unwrap();
    }

    /// Values that would stop a start or make the server useless are each
    /// refused with a line naming the setting and the value, all of them
    /// at once; the floors and ceilings themselves are accepted.
    #[test]
    fn validate_refuses_useless_values_and_lists_them_all() {
        let bad = Config {
            addresses: vec![
                "127.0.0.1:99999".into(),
                "127.0.0.1:8101".into(),
                "127.0.0.1:8101".into(),
                "[::1]:8102".into(),
                "[0:0::1]:8102".into(),
                "/run//z.sock".into(),
                "/run/z.sock".into(),
            ],
            metrics_address: Some("127.0.0.1:8101".into()),
            storages: vec!["1".into(), " ".into(), "1".into()],
            max_connections: 0,
            max_transaction_bytes: 0,
            memory_limit: Some(1),
            threads: 100_000,
            ..Config::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        for expected in [
            "address \"127.0.0.1:99999\" is not HOST:PORT",
            "address \"127.0.0.1:8101\" is given twice",
            "address \"[0:0::1]:8102\" is given twice",
            "address \"/run/z.sock\" is given twice",
            "metrics-address \"127.0.0.1:8101\" is also the ZEO address",
            "a storage name is given twice: [\"1\"]",
            "storage \" \" is an empty name",
            "threads = 100000 is more than 1024",
            "max-connections = 0 would refuse every client",
            "max-transaction-bytes = 0 is less than 512",
            "memory-limit = 1 is less than 1048576",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(expected)),
                "{expected:?} not in:\n{err}"
            );
        }
        assert_eq!(lines.len(), 11, "{err}");

        let edge = Config {
            addresses: vec![
                "127.0.0.1:0".into(),
                "127.0.0.1:0".into(),
                "/run/z.sock".into(),
            ],
            metrics_address: Some("127.0.0.1:0".into()),
            max_connections: 1,
            max_transaction_bytes: MIN_MAX_TRANSACTION_BYTES,
            memory_limit: Some(MIN_MEMORY_LIMIT),
            threads: MAX_THREADS,
            ..Config::default()
        };
        edge.validate().unwrap();
        // 0 is still "no limit".
        let file: Settings = toml::from_str("memory-limit = 0").unwrap();
        file.resolve().unwrap().validate().unwrap();
        // Same port, different hosts: two listeners.
        let two = Config {
            addresses: vec!["127.0.0.1:8101".into(), "127.0.0.2:8101".into()],
            ..Config::default()
        };
        two.validate().unwrap();
    }

    /// A TOML error is one line: the file, the line, the setting on it
    /// and what was expected.
    #[test]
    fn parse_errors_are_one_line() {
        let path = Path::new("z.toml");
        for (text, want) in [
            (
                "threads = 2\nmax-connections = \"x\"\n",
                "config file z.toml, line 2, max-connections: invalid type: string \"x\", \
                 expected usize",
            ),
            ("threads = \n", "config file z.toml, line 1, threads: "),
            (
                "# comment\nadress = ['x']\n",
                "config file z.toml, line 2, adress: unknown field `adress`",
            ),
            ("[x\n", "config file z.toml, line 1: "),
        ] {
            let e = toml::from_str::<Settings>(text).unwrap_err();
            let got = parse_error(path, text, &e).to_string();
            assert!(got.starts_with(want), "{text:?}: {got}");
            assert_eq!(got.lines().count(), 1, "{got}");
        }
    }

    #[test]
    fn tls_certificate_and_key_go_together() {
        let file: Settings = toml::from_str(
            "tls-certificate = 'c.pem'\ntls-key = 'k.pem'\ntls-client-ca = 'ca.pem'",
        )
        .unwrap();
        let cfg = file.resolve().unwrap();
        assert_eq!(cfg.tls_certificate, Some(PathBuf::from("c.pem")));
        assert_eq!(cfg.tls_key, Some(PathBuf::from("k.pem")));
        assert_eq!(cfg.tls_client_ca, Some(PathBuf::from("ca.pem")));
        cfg.validate().unwrap();
        for (cert, key, ca, complaint) in [
            (true, false, false, "tls-certificate needs tls-key"),
            (false, true, false, "tls-key needs tls-certificate"),
            (false, false, true, "tls-client-ca needs tls-certificate"),
            (true, false, true, "tls-certificate needs tls-key"),
        ] {
            let cfg = Config {
                tls_certificate: cert.then(|| "c.pem".into()),
                tls_key: key.then(|| "k.pem".into()),
                tls_client_ca: ca.then(|| "ca.pem".into()),
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(complaint), "{err}");
        }
    }
}
