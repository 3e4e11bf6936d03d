//! `zeotemp-bench`: a load generator that speaks ZEO 5 itself, for
//! comparing zeotemp with the stock Python server (the binary,
//! `src/main.rs`, is a thin CLI over [`run`]). A crate of zeotemp's
//! workspace outside the server: it uses only the server library's wire
//! protocol (`zeotemp::protocol`: requests, replies, frames) and its
//! deterministic generator (`zeotemp::rng`).
//!
//! Each connection is one tokio task over the two halves of a
//! `TCP_NODELAY` socket: it keeps up to `in_flight` requests outstanding,
//! writes every request it can start in one batch, then reads whatever
//! replies have arrived and matches them to requests by msgid. With the
//! number of outstanding requests bounded, a write never waits on our own
//! reader, so one task per connection does what a writer task and a reader
//! task would, without a channel hop per request.
//!
//! Workloads (after a setup commit of `objects` records for `load` and
//! `session`, and a root record referring to them, so that zeotemp's
//! collector keeps them):
//!
//! * `load`: `loadBefore(oid, maxtid)` of random objects, pipelined;
//! * `commit`: transactions of 5 new objects, one at a time per connection;
//! * `session`: 90 % loads of a hot set (the first 1000 objects), 10 %
//!   transactions rewriting 1–2 hot objects on the serial last seen,
//!   resolving vote conflicts as ZEO 5's client does (re-store on the
//!   committed serial, vote again);
//! * `echo`: `ping` round trips;
//! * `zope`: the stock `ClientStorage`'s shape — one request in flight per
//!   connection (`in_flight` is ignored), Zope-like transactions in a loop:
//!   `lastTransaction()` (what `server-sync on` sends), then `loadBefore`
//!   of every object an `invalidateTransaction` named since the
//!   connection's last transaction, and in 1 of 4 transactions one random
//!   object (a cache miss); half of the transactions then commit
//!   (`tpc_begin`, `storea`, `vote`, `tpc_finish`): the connection's own
//!   session object and, in 1 of 10 commits, one of a few shared objects.
//!   Every commit's invalidations reach every other connection; a conflict
//!   is resolved as in `session` (a vote's conflict dicts: store again on
//!   the committed serial) or, on a `ConflictError`, by aborting, reloading
//!   the objects and committing again in the next transaction, as Zope
//!   retries a request.
//!
//! Every reply that arrives inside the measured window counts as an
//! operation and its latency (request written → reply parsed) is kept;
//! requests still outstanding at the deadline are dropped with the
//! connection (both servers abort an unfinished transaction on disconnect).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use zeotemp::protocol::envelope::{self, Reply};
use zeotemp::protocol::frame;
use zeotemp::protocol::pickle::Dialect;
use zeotemp::protocol::value::{DecodeLimits, Value};
use zeotemp::rng::XorShift64;

/// What each connection does in the measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Load,
    Commit,
    Session,
    Echo,
    Zope,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Load => "load",
            Workload::Commit => "commit",
            Workload::Session => "session",
            Workload::Echo => "echo",
            Workload::Zope => "zope",
        }
    }
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` of the server.
    pub address: String,
    /// The storage name given to `register`.
    pub storage: String,
    pub workload: Workload,
    pub connections: usize,
    /// Requests outstanding per connection (`commit`: always one
    /// transaction).
    pub in_flight: usize,
    pub duration: Duration,
    /// Objects committed in setup (`load`, `session`, `zope`).
    pub objects: usize,
    /// Bytes per object record.
    pub object_size: usize,
    /// The server's process, for its CPU time and peak RSS (Linux `/proc`).
    pub server_pid: Option<u32>,
    /// Created when the measured window starts (after setup), so that a
    /// script can attach tools to the server then (`bench/per_request.py`).
    pub start_file: Option<std::path::PathBuf>,
}

/// The figures of one run; serialized as the `--json` line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub connections: usize,
    pub in_flight: usize,
    pub duration_s: f64,
    /// Replies received in the measured window.
    pub ops: u64,
    pub ops_per_s: f64,
    /// Transactions finished (`commit`, `session`; `zope`: every Zope
    /// transaction, read-only or committing, not those a conflict aborted).
    pub txns: u64,
    pub txns_per_s: f64,
    /// Request latency (request written → reply parsed).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// `zope`: latency of a whole transaction (`lastTransaction` written →
    /// last reply parsed); 0 for the other workloads.
    pub txn_p50_us: f64,
    pub txn_p99_us: f64,
    /// Transactions that reached `tpc_finish` (every workload).
    pub commits: u64,
    /// `invalidateTransaction` messages received in the measured window.
    pub invalidations: u64,
    /// `zope`: loads of objects named by an invalidation (or stored by a
    /// transaction a `ConflictError` aborted), queued when the next
    /// transaction's `lastTransaction` is answered.
    pub invalidated_loads: u64,
    /// `zope`: loads of a random object (cache misses).
    pub random_loads: u64,
    pub errors: u64,
    /// Transactions aborted on a ConflictError / ReadConflictError reply
    /// (or after 9 votes that still returned conflicts, as ZEO's client).
    pub conflicts_retried: u64,
    /// Conflicts a vote handed back and the bench "resolved" by storing
    /// again on the committed serial.
    pub conflicts_resolved: u64,
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s` split into user and system (kernel) time.
    pub server_user_s: Option<f64>,
    pub server_sys_s: Option<f64>,
    /// Server CPU (user + system, user, system) per reply, in µs.
    pub server_cpu_us_per_op: Option<f64>,
    pub server_user_us_per_op: Option<f64>,
    pub server_sys_us_per_op: Option<f64>,
    /// Server CPU per transaction, in µs (when there were transactions).
    pub server_cpu_us_per_txn: Option<f64>,
    pub server_peak_rss_kib: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{method} failed: {class} {state:?}")]
    Call {
        method: String,
        class: String,
        state: Value,
    },
}

/// Objects rewritten by `session` transactions and read by its loads.
const HOT_SET: usize = 1000;
/// Stores per setup transaction.
const SETUP_BATCH: usize = 500;
/// New objects per `commit` transaction.
const COMMIT_STORES: usize = 5;
/// Votes before a transaction that keeps conflicting is given up (ZEO 5's
/// `ClientStorage.tpc_vote` stops after 9 attempts).
const MAX_VOTES: u32 = 9;
/// `zope`: objects every connection may rewrite (besides its own session
/// object), numbered after the session objects.
const ZOPE_SHARED: usize = 4;
/// `zope`: 1 in this many transactions loads one random object.
const ZOPE_RANDOM_LOAD_EVERY: usize = 4;
/// `zope`: 1 in this many transactions commits.
const ZOPE_COMMIT_EVERY: usize = 2;
/// `zope`: 1 in this many commits also rewrites a shared object.
const ZOPE_SHARED_EVERY: usize = 10;
/// Linux's `USER_HZ`: `/proc/PID/stat` counts CPU time in ticks of
/// `sysconf(_SC_CLK_TCK)`, which is 100 on every mainstream Linux ABI; it
/// is hard-coded to avoid a libc dependency.
const CLK_TCK: f64 = 100.0;
const MAXTID: [u8; 8] = [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
const Z64: [u8; 8] = [0; 8];
/// A record of `n` of these bytes cannot start a pickle, so zeotemp's
/// reference scanner finds no references in it (and nothing unpickles it).
const FILLER: u8 = b'x';

/// Runs the setup, then the workload for `opts.duration`.
pub async fn run(opts: &Options) -> Result<Report, BenchError> {
    opts.check()?;
    let data = Bytes::from(vec![FILLER; opts.object_size]);
    let objects = match opts.workload {
        Workload::Load | Workload::Session | Workload::Zope => setup(opts, &data).await?,
        Workload::Commit | Workload::Echo => Objects::default(),
    };
    let by_oid = objects
        .oids
        .iter()
        .enumerate()
        .map(|(n, o)| (oid_u64(o), n))
        .collect();
    let plan = Arc::new(Plan {
        workload: opts.workload,
        in_flight: opts.in_flight,
        connections: opts.connections,
        data,
        objects,
        by_oid,
    });
    let mut conns = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections {
        conns.push(ClientConn::open(&opts.address, &opts.storage).await?.0);
    }

    if let Some(path) = &opts.start_file {
        std::fs::write(path, b"")?;
    }
    let cpu_before = opts.server_pid.map(server_cpu_ticks).transpose()?;
    let start = Instant::now();
    let deadline = start + opts.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let w = Worker::new(conn, plan.clone(), i as u64);
            tokio::spawn(w.run(deadline))
        })
        .collect();
    let mut per_conn = Vec::with_capacity(tasks.len());
    for t in tasks {
        let s = t
            .await
            .map_err(|e| BenchError::Protocol(format!("worker panicked: {e}")))??;
        per_conn.push(s);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = match (opts.server_pid, cpu_before) {
        (Some(pid), Some((user0, sys0))) => {
            let (user1, sys1) = server_cpu_ticks(pid)?;
            Some((
                user1.saturating_sub(user0) as f64 / CLK_TCK,
                sys1.saturating_sub(sys0) as f64 / CLK_TCK,
            ))
        }
        _ => None,
    };
    let server_peak_rss_kib = opts.server_pid.and_then(server_peak_rss_kib);

    let all = Stats::merged(per_conn);
    let per = |s: f64, n: u64| (n > 0).then(|| s * 1e6 / n as f64);
    Ok(Report {
        workload: opts.workload,
        connections: opts.connections,
        in_flight: if opts.workload == Workload::Zope {
            1
        } else {
            opts.in_flight
        },
        duration_s: elapsed,
        ops: all.ops,
        ops_per_s: all.ops as f64 / elapsed,
        txns: all.txns,
        txns_per_s: all.txns as f64 / elapsed,
        p50_us: all.latency_us(0.50),
        p99_us: all.latency_us(0.99),
        p999_us: all.latency_us(0.999),
        txn_p50_us: quantile_us(&all.txn_lat, 0.50),
        txn_p99_us: quantile_us(&all.txn_lat, 0.99),
        commits: all.commits,
        invalidations: all.invalidations,
        invalidated_loads: all.invalidated_loads,
        random_loads: all.random_loads,
        errors: all.errors,
        conflicts_retried: all.conflicts_retried,
        conflicts_resolved: all.conflicts_resolved,
        server_cpu_s: cpu.map(|(u, s)| u + s),
        server_user_s: cpu.map(|(u, _)| u),
        server_sys_s: cpu.map(|(_, s)| s),
        server_cpu_us_per_op: cpu.and_then(|(u, s)| per(u + s, all.ops)),
        server_user_us_per_op: cpu.and_then(|(u, _)| per(u, all.ops)),
        server_sys_us_per_op: cpu.and_then(|(_, s)| per(s, all.ops)),
        server_cpu_us_per_txn: cpu.and_then(|(u, s)| per(u + s, all.txns)),
        server_peak_rss_kib,
    })
}

impl Options {
    /// Settings a run cannot start with.
    fn check(&self) -> Result<(), BenchError> {
        if self.connections == 0 || self.in_flight == 0 {
            return Err(BenchError::Protocol(
                "connections and in-flight must be at least 1".into(),
            ));
        }
        if matches!(self.workload, Workload::Load | Workload::Session) && self.objects == 0 {
            return Err(BenchError::Protocol(
                "load and session need at least one object".into(),
            ));
        }
        if self.workload == Workload::Zope && self.objects < self.connections + ZOPE_SHARED {
            return Err(BenchError::Protocol(format!(
                "zope needs at least connections + {ZOPE_SHARED} objects \
                 (a session object per connection and the shared ones)"
            )));
        }
        Ok(())
    }
}

impl Report {
    /// The human-readable block.
    pub fn render(&self) -> String {
        let mut s = format!(
            "workload {w}: {c} connections x {k} in flight, {d:.2} s\n\
             ops        {ops} ({ops_s:.0}/s)\n",
            w = self.workload.name(),
            c = self.connections,
            k = self.in_flight,
            d = self.duration_s,
            ops = self.ops,
            ops_s = self.ops_per_s,
        );
        if self.txns > 0 {
            s += &format!("txns       {} ({:.0}/s)\n", self.txns, self.txns_per_s);
        }
        if self.workload == Workload::Zope {
            s += &format!(
                "txn time   p50 {:.1} us, p99 {:.1} us\n\
                 commits    {}, invalidations received {}, loads after them {}, random loads {}\n",
                self.txn_p50_us,
                self.txn_p99_us,
                self.commits,
                self.invalidations,
                self.invalidated_loads,
                self.random_loads
            );
        }
        s += &format!(
            "latency    p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us\n\
             errors     {}, conflicts retried {}, resolved {}\n",
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.errors,
            self.conflicts_retried,
            self.conflicts_resolved
        );
        if let (Some(cpu), Some(user), Some(sys)) =
            (self.server_cpu_s, self.server_user_s, self.server_sys_s)
        {
            s += &format!(
                "server     {cpu:.2} CPU s ({:.0} % of one core): user {user:.2} s, system {sys:.2} s\n",
                100.0 * cpu / self.duration_s
            );
        }
        if let (Some(c), Some(u), Some(k)) = (
            self.server_cpu_us_per_op,
            self.server_user_us_per_op,
            self.server_sys_us_per_op,
        ) {
            s += &format!("per reply  {c:.2} CPU us (user {u:.2}, system {k:.2})\n");
        }
        if let Some(t) = self.server_cpu_us_per_txn {
            s += &format!("per txn    {t:.1} CPU us\n");
        }
        if let Some(rss) = self.server_peak_rss_kib {
            s += &format!("server     peak RSS {:.1} MiB\n", rss as f64 / 1024.0);
        }
        s
    }
}

/// `(utime, stime)` of `pid`, in clock ticks (fields 14 and 15 of
/// `/proc/PID/stat`, all threads together; the command name before them
/// may hold spaces, so fields are counted after its closing parenthesis).
fn server_cpu_ticks(pid: u32) -> io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/PID/stat");
    let rest = stat.rsplit_once(')').ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is at index n - 3.
    let num = |i: usize| -> io::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
    };
    Ok((num(14 - 3)?, num(15 - 3)?))
}

/// The peak resident set (`VmHWM`) of `pid`, in KiB.
fn server_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The setup's objects: oids and the serial each was committed with.
#[derive(Default)]
struct Objects {
    oids: Vec<Bytes>,
    serials: Vec<[u8; 8]>,
}

/// What every connection of a run does and works on.
struct Plan {
    workload: Workload,
    in_flight: usize,
    connections: usize,
    /// The record every store writes (`object_size` filler bytes).
    data: Bytes,
    objects: Objects,
    /// Object number of each setup oid (`zope`'s invalidations).
    by_oid: std::collections::HashMap<u64, usize>,
}

/// Commits `opts.objects` records through one connection, `SETUP_BATCH`
/// per transaction, then rewrites the root to refer to all of them (else
/// zeotemp's collector would free them as garbage during the run).
async fn setup(opts: &Options, data: &Bytes) -> Result<Objects, BenchError> {
    let (mut c, _) = ClientConn::open(&opts.address, &opts.storage).await?;
    let mut oids = Vec::with_capacity(opts.objects);
    while oids.len() < opts.objects {
        let Value::List(more) = c.call("new_oids", vec![]).await? else {
            return Err(BenchError::Protocol("new_oids: not a list".into()));
        };
        for o in more {
            oids.push(oid_bytes(&o)?);
        }
    }
    oids.truncate(opts.objects);
    let mut serials = Vec::with_capacity(oids.len());
    for batch in oids.chunks(SETUP_BATCH) {
        let stores: Vec<_> = batch
            .iter()
            .map(|o| (o.clone(), Z64, data.clone()))
            .collect();
        let tid = c.commit(&stores).await?;
        serials.extend(std::iter::repeat_n(tid, batch.len()));
    }
    if !oids.is_empty() {
        let root = Bytes::from_static(&Z64);
        let loaded = c
            .call(
                "loadBefore",
                vec![b(root.clone()), b(Bytes::from_static(&MAXTID))],
            )
            .await;
        // A fresh stock storage has no root yet (`ZODB.DB` creates it on
        // first open); zeotemp starts with an empty one.
        let serial = match loaded {
            Ok(Value::Tuple(t)) => t.get(1).map(tid_of).transpose()?.unwrap_or(Z64),
            Err(BenchError::Call { class, .. }) if class.ends_with("POSKeyError") => Z64,
            Ok(other) => {
                return Err(BenchError::Protocol(format!(
                    "loadBefore(root) gave {other:?}"
                )));
            }
            Err(e) => return Err(e),
        };
        c.commit(&[(root, serial, root_record(&oids))]).await?;
    }
    Ok(Objects { oids, serials })
}

/// A `PersistentMapping`-classed record whose state is a list of
/// persistent references `(oid, None)`, one per object: what zeotemp's
/// reference scanner (and ZODB's `referencesf`) follow.
fn root_record(oids: &[Bytes]) -> Bytes {
    let mut r = BytesMut::with_capacity(64 + oids.len() * 13);
    r.extend_from_slice(b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.");
    r.extend_from_slice(b"\x80\x03](");
    for o in oids {
        r.put_u8(b'C'); // SHORT_BINBYTES
        r.put_u8(8);
        r.extend_from_slice(o);
        r.extend_from_slice(b"N\x86Q"); // NONE, TUPLE2, BINPERSID
    }
    r.extend_from_slice(b"e."); // APPENDS, STOP
    r.freeze()
}

fn b(x: Bytes) -> Value {
    Value::Bytes(x)
}

fn oid_bytes(v: &Value) -> Result<Bytes, BenchError> {
    match v {
        Value::Bytes(x) | Value::PyStr(x) if x.len() == 8 => Ok(x.clone()),
        other => Err(BenchError::Protocol(format!("not an oid: {other:?}"))),
    }
}

fn oid_u64(oid: &[u8]) -> u64 {
    u64::from_be_bytes(oid.try_into().unwrap_or(Z64))
}

fn tid_of(v: &Value) -> Result<[u8; 8], BenchError> {
    v.as_bytes()
        .and_then(|x| x.try_into().ok())
        .ok_or_else(|| BenchError::Protocol(format!("not a tid: {v:?}")))
}

/// One registered client connection: its socket halves, buffers and
/// next msgid.
struct ClientConn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_id: i64,
}

impl ClientConn {
    /// Connects, answers the server's `Z5` handshake and registers
    /// (writable); returns the connection and the last tid.
    async fn open(address: &str, storage: &str) -> Result<(ClientConn, Value), BenchError> {
        let s = TcpStream::connect(address).await?;
        // As stock clients (asyncio) do; else Nagle and delayed ACKs add
        // 40 ms to round trips that follow one-way calls.
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        let mut c = ClientConn {
            rd,
            wr,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            next_id: 1,
        };
        let hello = c.frame().await?;
        if &hello[..] != b"Z5" {
            return Err(BenchError::Protocol(format!(
                "server announced {:?}, not Z5",
                String::from_utf8_lossy(&hello)
            )));
        }
        frame::put(&mut c.wbuf, |out| out.extend_from_slice(b"Z5"));
        let last = c
            .call(
                "register",
                vec![Value::Str(storage.into()), Value::Bool(false)],
            )
            .await?;
        Ok((c, last))
    }

    /// Appends one framed request `(msgid, oneway, method, args)` to the
    /// write buffer, as a Python 3 client pickles it.
    fn push(&mut self, msgid: &Value, oneway: bool, method: &str, args: Vec<Value>) {
        let args = Value::Tuple(args);
        envelope::put_request(&mut self.wbuf, Dialect::Py3, msgid, oneway, method, &args);
    }

    /// Pushes a call with the next integer msgid and returns the msgid.
    fn push_call(&mut self, method: &str, args: Vec<Value>) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.push(&Value::Int(id), false, method, args);
        id
    }

    fn push_oneway(&mut self, method: &str, args: Vec<Value>) {
        // One-way calls get no reply; their msgid is never matched.
        self.push(&Value::Int(0), true, method, args);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.wr.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// A frame already buffered, if any.
    fn buffered_frame(&mut self) -> Result<Option<Bytes>, BenchError> {
        zeotemp::protocol::frame::parse(&mut self.rbuf, usize::MAX)
            .map_err(|e| BenchError::Protocol(e.to_string()))
    }

    /// Reads more bytes; `Closed` at end of stream.
    async fn fill(&mut self) -> Result<(), BenchError> {
        if self.rd.read_buf(&mut self.rbuf).await? == 0 {
            return Err(BenchError::Closed);
        }
        Ok(())
    }

    async fn frame(&mut self) -> Result<Bytes, BenchError> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// A synchronous call (setup only): flushes, then waits for its reply,
    /// skipping server pushes.
    async fn call(&mut self, method: &str, args: Vec<Value>) -> Result<Value, BenchError> {
        let id = self.push_call(method, args);
        self.flush().await?;
        loop {
            let f = self.frame().await?;
            let Some((msgid, reply)) = decode_reply(&f)? else {
                continue;
            };
            if msgid != Value::Int(id) {
                return Err(BenchError::Protocol(format!(
                    "reply to {msgid:?}, expected {id}"
                )));
            }
            return reply.map_err(|(class, state)| BenchError::Call {
                method: method.into(),
                class,
                state,
            });
        }
    }

    /// One whole transaction of `(oid, serial, data)` stores without
    /// conflicts; returns its tid.
    async fn commit(&mut self, stores: &[(Bytes, [u8; 8], Bytes)]) -> Result<[u8; 8], BenchError> {
        let txn = Value::Int(1);
        self.push_oneway("tpc_begin", begin_args(&txn));
        for (oid, serial, data) in stores {
            self.push_oneway("storea", store_args(oid, serial, data, &txn));
        }
        let voted = self.call("vote", vec![txn.clone()]).await?;
        if let Value::List(items) = &voted
            && items.iter().any(|i| matches!(i, Value::Dict(_)))
        {
            return Err(BenchError::Protocol(format!(
                "setup vote conflicted: {voted:?}"
            )));
        }
        tid_of(&self.call("tpc_finish", vec![txn]).await?)
    }
}

fn begin_args(txn: &Value) -> Vec<Value> {
    vec![
        txn.clone(),
        b(Bytes::new()),
        b(Bytes::new()),
        Value::Dict(vec![]),
    ]
}

fn store_args(oid: &Bytes, serial: &[u8; 8], data: &Bytes, txn: &Value) -> Vec<Value> {
    vec![
        b(oid.clone()),
        b(Bytes::copy_from_slice(serial)),
        b(data.clone()),
        txn.clone(),
    ]
}

/// `Some((msgid, reply))` for a reply, `None` for a server push
/// (invalidations, `info`).
fn decode_reply(frame: &Bytes) -> Result<Option<(Value, Reply)>, BenchError> {
    Ok(decode(frame)?.into_reply())
}

fn decode(frame: &Bytes) -> Result<envelope::Message, BenchError> {
    envelope::decode_message_bytes(frame, &DecodeLimits::default())
        .map_err(|e| BenchError::Protocol(e.to_string()))
}

/// How a reply is matched to its request: integer msgids, and
/// `loadBefore`'s `(oid, tid)` msgid (as the stock client sends it) by oid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Int(i64),
    Load(u64),
}

fn key_of(msgid: &Value) -> Option<Key> {
    match msgid {
        Value::Int(i) => Some(Key::Int(*i)),
        Value::Tuple(t) => {
            let o: [u8; 8] = t.first()?.as_bytes()?.try_into().ok()?;
            Some(Key::Load(u64::from_be_bytes(o)))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    /// A load of object number n.
    Load(usize),
    /// `lastTransaction` (`zope`).
    Sync,
    Ping,
    NewOids,
    Vote,
    Finish,
    Abort,
}

struct Pending {
    key: Key,
    sent: Instant,
    what: What,
}

/// The connection's open transaction.
struct Txn {
    /// `(oid, object number for serial tracking)`.
    stores: Vec<(Bytes, Option<usize>)>,
    votes: u32,
}

/// A `zope` transaction under way.
struct ZopeTxn {
    started: Instant,
    /// `lastTransaction` has been answered.
    synced: bool,
    /// Object numbers still to load (popped from the end).
    loads: Vec<usize>,
    /// The transaction commits after its loads.
    commit: bool,
    /// Its commit has been started (and is finished when `txn` is `None`).
    committing: bool,
}

/// Per-connection counters, merged at the end.
#[derive(Default)]
struct Stats {
    /// Latencies in units of 100 ns (u32: up to 7 minutes).
    lat: Vec<u32>,
    /// `zope` transaction latencies, in units of 100 ns.
    txn_lat: Vec<u32>,
    ops: u64,
    txns: u64,
    commits: u64,
    invalidations: u64,
    invalidated_loads: u64,
    random_loads: u64,
    errors: u64,
    conflicts_retried: u64,
    conflicts_resolved: u64,
}

/// 100 ns ticks since `since`, saturated to `u32`.
fn ticks(since: Instant, now: Instant) -> u32 {
    u32::try_from((now - since).as_nanos() / 100).unwrap_or(u32::MAX)
}

/// The latency at quantile `q` of sorted 100 ns ticks, in µs (0 without
/// any).
fn quantile_us(lat: &[u32], q: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
    f64::from(lat[i]) / 10.0
}

impl Stats {
    /// Every connection's counters together, the latencies sorted.
    fn merged(per_conn: Vec<Stats>) -> Stats {
        let mut all = Stats {
            lat: Vec::with_capacity(per_conn.iter().map(|s| s.lat.len()).sum()),
            ..Stats::default()
        };
        for s in per_conn {
            all.lat.extend_from_slice(&s.lat);
            all.txn_lat.extend_from_slice(&s.txn_lat);
            all.ops += s.ops;
            all.txns += s.txns;
            all.commits += s.commits;
            all.invalidations += s.invalidations;
            all.invalidated_loads += s.invalidated_loads;
            all.random_loads += s.random_loads;
            all.errors += s.errors;
            all.conflicts_retried += s.conflicts_retried;
            all.conflicts_resolved += s.conflicts_resolved;
        }
        all.lat.sort_unstable();
        all.txn_lat.sort_unstable();
        all
    }

    /// The request latency at quantile `q`, in µs (0 without any).
    fn latency_us(&self, q: f64) -> f64 {
        quantile_us(&self.lat, q)
    }
}

struct Worker {
    conn: ClientConn,
    plan: Arc<Plan>,
    rng: XorShift64,
    pending: VecDeque<Pending>,
    txn: Option<Txn>,
    /// A txn id per connection, as each ZEO client has its own.
    txn_id: Value,
    oid_pool: Vec<Bytes>,
    /// Serials last seen of the hot objects (`session`), of every object
    /// (`zope`).
    serials: Vec<[u8; 8]>,
    stats: Stats,
    /// The connection's number (`zope`: its session object).
    n: usize,
    /// `zope`: the transaction under way.
    ztxn: Option<ZopeTxn>,
    /// `zope`: objects invalidated since the last transaction started, in
    /// arrival order, each once (`stale` marks them).
    invalidated: Vec<usize>,
    stale: Vec<bool>,
    /// `zope`: what a conflict aborted, committed again by the next
    /// transaction.
    retry: Option<Vec<(Bytes, Option<usize>)>>,
}

impl Worker {
    fn new(conn: ClientConn, plan: Arc<Plan>, n: u64) -> Worker {
        let hot = if plan.workload == Workload::Zope {
            plan.objects.oids.len()
        } else {
            plan.objects.oids.len().min(HOT_SET)
        };
        let serials = plan.objects.serials[..hot].to_vec();
        let stale = vec![false; hot];
        Worker {
            conn,
            plan,
            rng: XorShift64::new(
                0x9e37_79b9_7f4a_7c15 ^ (n + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            ),
            pending: VecDeque::new(),
            txn: None,
            txn_id: Value::Int(1000 + n as i64),
            oid_pool: Vec::new(),
            serials,
            stats: Stats::default(),
            n: n as usize,
            ztxn: None,
            invalidated: Vec::new(),
            stale,
            retry: None,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }

    async fn run(mut self, deadline: Instant) -> Result<Stats, BenchError> {
        loop {
            self.refill();
            let io = async {
                self.conn.flush().await?;
                self.conn.fill().await
            };
            match tokio::time::timeout_at(deadline, io).await {
                Err(_) => break,
                Ok(r) => r?,
            }
            let now = Instant::now();
            while let Some(f) = self.conn.buffered_frame()? {
                let m = decode(&f)?;
                if m.method == "invalidateTransaction" {
                    self.on_invalidation(&m.args);
                } else if let Some((msgid, reply)) = m.into_reply() {
                    self.on_reply(&msgid, reply, now)?;
                }
            }
            if now >= deadline {
                break;
            }
        }
        Ok(self.stats)
    }

    /// Requests outstanding in the sense of `in_flight`: loads and pings,
    /// plus an open transaction as one.
    fn busy(&self) -> usize {
        let single = self
            .pending
            .iter()
            .filter(|p| matches!(p.what, What::Load(_) | What::Ping))
            .count();
        single + usize::from(self.txn.is_some())
    }

    /// Starts requests until `in_flight` are outstanding.
    fn refill(&mut self) {
        let k = self.plan.in_flight;
        match self.plan.workload {
            Workload::Echo => {
                for _ in self.pending.len()..k {
                    let id = self.conn.push_call("ping", vec![]);
                    self.expect(Key::Int(id), What::Ping);
                }
            }
            Workload::Load => {
                for _ in self.pending.len()..k {
                    let n = self.below(self.plan.objects.oids.len());
                    self.load(n);
                }
            }
            Workload::Commit => {
                if self.txn.is_none() && self.pending.is_empty() {
                    self.start_commit();
                }
            }
            Workload::Session => {
                let hot = self.serials.len();
                for _ in self.busy()..k {
                    if self.txn.is_none() && self.below(10) == 0 {
                        self.start_session_txn();
                    } else {
                        let n = self.below(hot);
                        self.load(n);
                    }
                }
            }
            Workload::Zope => {
                if self.pending.is_empty() {
                    self.zope_step();
                }
            }
        }
    }

    /// `zope`: the next request of the transaction under way (the
    /// previous one has been answered), finishing it and starting the next
    /// one when it has nothing left to send.
    fn zope_step(&mut self) {
        let Some(z) = &mut self.ztxn else {
            self.ztxn = Some(ZopeTxn {
                started: Instant::now(),
                synced: false,
                loads: Vec::new(),
                commit: false,
                committing: false,
            });
            let id = self.conn.push_call("lastTransaction", vec![]);
            self.expect(Key::Int(id), What::Sync);
            return;
        };
        if !z.synced {
            // Unreachable: `lastTransaction` is outstanding until then.
            return;
        }
        if let Some(n) = z.loads.pop() {
            self.load(n);
            return;
        }
        if z.commit && !z.committing {
            z.committing = true;
            let stores = self.retry.take().unwrap_or_else(|| {
                let me = self.n;
                let mut stores = vec![(self.plan.objects.oids[me].clone(), Some(me))];
                if self.rng.below(ZOPE_SHARED_EVERY) == 0 {
                    let shared = self.plan.connections + self.rng.below(ZOPE_SHARED);
                    stores.push((self.plan.objects.oids[shared].clone(), Some(shared)));
                }
                stores
            });
            self.begin(stores);
            return;
        }
        // Loaded everything and committed (or the conflict's abort came
        // back): the transaction is over.
        if let Some(z) = self.ztxn.take() {
            if self.retry.is_none() {
                self.stats.txns += 1;
                self.stats.txn_lat.push(ticks(z.started, Instant::now()));
            }
            self.zope_step();
        }
    }

    /// `lastTransaction` answered: the loads (everything invalidated since
    /// the last one, and 1 in 4 transactions a random object) and whether
    /// this transaction commits (half of them, and always after a
    /// conflict).
    fn zope_synced(&mut self) {
        let mut loads: Vec<usize> = self.invalidated.drain(..).rev().collect();
        for &n in &loads {
            self.stale[n] = false;
        }
        self.stats.invalidated_loads += loads.len() as u64;
        if self.rng.below(ZOPE_RANDOM_LOAD_EVERY) == 0 {
            loads.push(self.rng.below(self.plan.objects.oids.len()));
            self.stats.random_loads += 1;
        }
        let commit = self.retry.is_some() || self.rng.below(ZOPE_COMMIT_EVERY) == 0;
        if let Some(z) = &mut self.ztxn {
            z.synced = true;
            z.loads = loads;
            z.commit = commit;
        }
    }

    /// An `invalidateTransaction(tid, oids)` push: counted, and (`zope`)
    /// its objects marked for loading in the next transaction.
    fn on_invalidation(&mut self, args: &Value) {
        self.stats.invalidations += 1;
        if self.plan.workload != Workload::Zope {
            return;
        }
        let Value::Tuple(t) = args else { return };
        let Some(Value::List(oids)) = t.get(1) else {
            return;
        };
        for o in oids {
            let Some(x) = o.as_bytes() else { continue };
            if let Some(&n) = self.plan.by_oid.get(&oid_u64(x))
                && let Some(s) = self.stale.get_mut(n)
                && !*s
            {
                *s = true;
                self.invalidated.push(n);
            }
        }
    }

    fn expect(&mut self, key: Key, what: What) {
        self.pending.push_back(Pending {
            key,
            sent: Instant::now(),
            what,
        });
    }

    /// `loadBefore(oid, maxtid)` with the `(oid, maxtid)` msgid of the
    /// stock client.
    fn load(&mut self, n: usize) {
        let oid = self.plan.objects.oids[n].clone();
        let key = Key::Load(u64::from_be_bytes(oid[..].try_into().unwrap_or(Z64)));
        let maxtid = b(Bytes::from_static(&MAXTID));
        let msgid = Value::Tuple(vec![b(oid.clone()), maxtid.clone()]);
        self.conn
            .push(&msgid, false, "loadBefore", vec![b(oid), maxtid]);
        self.expect(key, What::Load(n));
    }

    fn start_commit(&mut self) {
        if self.oid_pool.len() < COMMIT_STORES {
            let id = self.conn.push_call("new_oids", vec![]);
            self.expect(Key::Int(id), What::NewOids);
            return;
        }
        let stores = self
            .oid_pool
            .split_off(self.oid_pool.len() - COMMIT_STORES)
            .into_iter()
            .map(|o| (o, None))
            .collect();
        self.begin(stores);
    }

    fn start_session_txn(&mut self) {
        let hot = self.serials.len();
        let first = self.below(hot);
        let mut stores = vec![(self.plan.objects.oids[first].clone(), Some(first))];
        if hot > 1 && self.below(2) == 0 {
            let second = (first + 1 + self.below(hot - 1)) % hot;
            stores.push((self.plan.objects.oids[second].clone(), Some(second)));
        }
        self.begin(stores);
    }

    /// tpc_begin, a storea per object (on the serial last seen), vote.
    fn begin(&mut self, stores: Vec<(Bytes, Option<usize>)>) {
        let txn = self.txn_id.clone();
        self.conn.push_oneway("tpc_begin", begin_args(&txn));
        for (oid, n) in &stores {
            let serial = n.map_or(Z64, |n| self.serials[n]);
            let args = store_args(oid, &serial, &self.plan.data, &txn);
            self.conn.push_oneway("storea", args);
        }
        self.txn = Some(Txn { stores, votes: 0 });
        self.vote();
    }

    fn vote(&mut self) {
        if let Some(t) = &mut self.txn {
            t.votes += 1;
        }
        let id = self.conn.push_call("vote", vec![self.txn_id.clone()]);
        self.expect(Key::Int(id), What::Vote);
    }

    fn txn_call(&mut self, method: &str, what: What) {
        let id = self.conn.push_call(method, vec![self.txn_id.clone()]);
        self.expect(Key::Int(id), what);
    }

    fn on_reply(&mut self, msgid: &Value, reply: Reply, now: Instant) -> Result<(), BenchError> {
        let key = key_of(msgid)
            .ok_or_else(|| BenchError::Protocol(format!("odd reply msgid {msgid:?}")))?;
        // Replies come in request order (both servers answer a
        // connection's calls in turn), so the match is nearly always the
        // front; a search covers the rest.
        let at = self
            .pending
            .iter()
            .position(|p| p.key == key)
            .ok_or_else(|| BenchError::Protocol(format!("reply to unknown msgid {msgid:?}")))?;
        let Some(p) = self.pending.remove(at) else {
            return Ok(());
        };
        self.stats.lat.push(ticks(p.sent, now));
        self.stats.ops += 1;
        match (p.what, reply) {
            (What::Ping, Ok(_)) => {}
            (What::Sync, Ok(_)) => self.zope_synced(),
            (What::Load(n), Ok(Value::Tuple(t))) => {
                if n < self.serials.len()
                    && let Some(Ok(serial)) = t.get(1).map(tid_of)
                {
                    self.serials[n] = serial;
                }
            }
            (What::NewOids, Ok(Value::List(oids))) => {
                for o in &oids {
                    self.oid_pool.push(oid_bytes(o)?);
                }
            }
            (What::Vote, Ok(Value::List(items))) => self.on_vote(items),
            (What::Vote, Ok(_)) => self.txn_call("tpc_finish", What::Finish),
            (What::Finish, Ok(tid)) => {
                if let (Some(txn), Ok(tid)) = (self.txn.take(), tid_of(&tid)) {
                    for n in txn.stores.iter().filter_map(|s| s.1) {
                        self.serials[n] = tid;
                    }
                }
                self.stats.commits += 1;
                // `zope` counts its transactions when they end.
                if self.plan.workload != Workload::Zope {
                    self.stats.txns += 1;
                }
            }
            (What::Abort, _) => {
                if let Some(t) = self.txn.take()
                    && self.plan.workload == Workload::Zope
                {
                    // As Zope retries a request on ConflictError: the next
                    // transaction reloads what was stored and commits it
                    // again on the serials it loads.
                    for n in t.stores.iter().filter_map(|s| s.1) {
                        if !self.stale[n] {
                            self.stale[n] = true;
                            self.invalidated.push(n);
                        }
                    }
                    self.retry = Some(t.stores);
                }
            }
            (What::Vote | What::Finish, Err((class, _))) => {
                if class.ends_with("ConflictError") {
                    self.stats.conflicts_retried += 1;
                } else {
                    self.stats.errors += 1;
                }
                self.txn_call("tpc_abort", What::Abort);
            }
            (What::Load(_) | What::Sync | What::Ping | What::NewOids, _) => self.stats.errors += 1,
        }
        Ok(())
    }

    /// A vote's result: `[]` (or server-resolved oids) means voted; conflict
    /// dicts `{oid, serials: (committed, read), data}` are "resolved" as
    /// ZEO 5's client does: store again on the committed serial, vote again.
    fn on_vote(&mut self, items: Vec<Value>) {
        let conflicts: Vec<(Bytes, [u8; 8])> = items
            .iter()
            .filter_map(|i| match i {
                Value::Dict(d) => {
                    let get = |k: &str| {
                        d.iter()
                            .find(|(key, _)| key.as_text().as_deref() == Some(k))
                            .map(|(_, v)| v)
                    };
                    let oid = oid_bytes(get("oid")?).ok()?;
                    let Value::Tuple(serials) = get("serials")? else {
                        return None;
                    };
                    Some((oid, tid_of(serials.first()?).ok()?))
                }
                _ => None,
            })
            .collect();
        if conflicts.is_empty() {
            self.txn_call("tpc_finish", What::Finish);
            return;
        }
        if self.txn.as_ref().is_none_or(|t| t.votes >= MAX_VOTES) {
            self.stats.conflicts_retried += 1;
            self.txn_call("tpc_abort", What::Abort);
            return;
        }
        self.stats.conflicts_resolved += conflicts.len() as u64;
        let txn = self.txn_id.clone();
        for (oid, committed) in conflicts {
            let args = store_args(&oid, &committed, &self.plan.data, &txn);
            self.conn.push_oneway("storea", args);
        }
        self.vote();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_merge_and_percentiles() {
        let conn = |lat: Vec<u32>, ops| Stats {
            lat,
            ops,
            txns: 1,
            errors: 2,
            conflicts_retried: 3,
            conflicts_resolved: 4,
            ..Stats::default()
        };
        // Latencies 1..=1000 (in 100 ns) over two connections.
        let all = Stats::merged(vec![
            conn((501..=1000).rev().collect(), 500),
            conn((1..=500).collect(), 500),
        ]);
        assert_eq!((all.ops, all.txns, all.errors), (1000, 2, 4));
        assert_eq!((all.conflicts_retried, all.conflicts_resolved), (6, 8));
        assert_eq!(all.latency_us(0.50), 50.0);
        assert_eq!(all.latency_us(0.99), 99.0);
        assert_eq!(all.latency_us(0.999), 99.9);
        assert_eq!(all.latency_us(0.0), 0.1);
        assert_eq!(Stats::merged(vec![]).latency_us(0.5), 0.0);
    }
}
