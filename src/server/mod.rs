//! Listeners, connection tasks and shutdown.
//!
//! Each connection runs one task ([`Conn`]): frames in, [`Session`]
//! handling, commit-lock waits, the transaction timeout, and the
//! connection's [`Outbox`] out, in order. The server knows nothing about
//! pickles beyond the handshake.
//!
//! With TLS configured ([`tls`]), each connection's task first does
//! the TLS handshake (within `frame-timeout`), then serves the decrypted
//! stream exactly as a plain one; the accept loop never waits on a client.

pub mod tls;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{Config, STATS_LOG_INTERVAL_SECS};
use crate::monitor::status::log_summary;
use crate::protocol::envelope;
use crate::protocol::frame;
use crate::protocol::pickle::DecodeLimits;
use crate::session::outbox::Outbox;
use crate::session::{Flow, Session};
use crate::state::Shared;
use crate::storage::{LockAttempt, SHUTDOWN_HOLDER};
use tls::{HandshakeFailure, Tls};

/// The protocol we announce: ZEO 5, pickle encoding.
pub const PROTOCOL: &[u8] = b"Z5";

/// The protocol we announce with `msgpack` on: ZEO 5, msgpack encoding.
/// Either way a client may answer `Z5` or `M5` and gets what it answered,
/// as with the stock server.
pub const PROTOCOL_MSGPACK: &[u8] = b"M5";

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// What to print for this listener (`tcp 127.0.0.1:8101`, `unix /path`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp ?".into(),
            },
            Listener::Unix(_, p) => {
                use std::os::unix::fs::PermissionsExt;
                match std::fs::metadata(p) {
                    Ok(m) => format!(
                        "unix {} (mode {:o})",
                        p.display(),
                        m.permissions().mode() & 0o777
                    ),
                    Err(_) => format!("unix {}", p.display()),
                }
            }
        }
    }
}

/// Binds every address: `host:port` is TCP (port 0 picks a free one), a
/// path (anything with a `/`) is a unix-domain socket, replacing a stale
/// socket file left by an earlier run.
pub async fn bind(addresses: &[String]) -> io::Result<Vec<Listener>> {
    bind_with_mode(addresses, None).await
}

/// [`bind`], and gives each unix-domain socket file the mode `unix_mode`
/// (`unix-socket-mode`) before returning, so the socket is never served
/// with the umask's mode.
pub async fn bind_with_mode(
    addresses: &[String],
    unix_mode: Option<u32>,
) -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for addr in addresses {
        if addr.contains('/') {
            let path = PathBuf::from(addr);
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    std::fs::remove_file(&path)?;
                }
            }
            let l = UnixListener::bind(&path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on unix socket {addr}: {e}"),
                )
            })?;
            if let Some(mode) = unix_mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(
                    |e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot set mode {mode:o} on {}: {e}", path.display()),
                        )
                    },
                )?;
            }
            out.push(Listener::Unix(l, path));
        } else {
            // tokio sets SO_REUSEADDR, so a restart can rebind at once.
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            out.push(Listener::Tcp(l));
        }
    }
    Ok(out)
}

/// Serves until `shutdown` completes, then closes every connection
/// (aborting open transactions) and returns.
pub async fn run(
    listeners: Vec<Listener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let shared = Arc::new(Shared::new(config));
    run_shared(listeners, shared, shutdown).await
}

pub async fn run_shared(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let tls = tls::load(&shared.config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .map(Arc::new);
    let tls_note = tls::describe(&shared.config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let next_id = Arc::new(AtomicU64::new(1));
    let mut tasks = tokio::task::JoinSet::new();
    let mut unix_paths = Vec::new();
    if let Some(addr) = &shared.config.metrics_address {
        let l = crate::monitor::http::bind(addr).await?;
        match l.local_addr() {
            Ok(a) => info!("metrics on http://{a}/metrics"),
            Err(_) => info!("metrics on http://{addr}/metrics"),
        }
        tasks.spawn(crate::monitor::http::serve(
            l,
            shared.clone(),
            stop_rx.clone(),
        ));
    }
    for l in listeners {
        if let Listener::Unix(_, p) = &l {
            unix_paths.push(p.clone());
        }
        info!("listening on {}{tls_note}", l.describe());
        if tls.is_some() && matches!(l, Listener::Unix(..)) {
            // Served as the stock server does, but of no use to its client:
            // ClientStorage gives asyncio no server_hostname for a unix
            // socket, and asyncio refuses TLS without one.
            warn!(
                "{} is served with TLS, which the stock ZEO client cannot use over a unix socket",
                l.describe()
            );
        }
        tasks.spawn(accept_loop(
            l,
            tls.clone(),
            shared.clone(),
            stop_rx.clone(),
            next_id.clone(),
        ));
    }
    tasks.spawn(gc_loop(shared.clone(), stop_rx.clone()));
    shutdown.await;
    info!("shutting down");
    // Kept to the end: a lock granted late still goes to the server.
    let _late_locks = stop_commits(&shared).await;
    let _ = stop_tx.send(true);
    let grace = shared.config.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!("some connections did not close in time");
    }
    for p in unix_paths {
        let _ = std::fs::remove_file(p);
    }
    for name in &shared.storage_names {
        if let Some(s) = shared.storages.get(name) {
            log_summary(s);
        }
    }
    let commits: u64 = shared
        .storages
        .values()
        .map(|s| s.stats.commits.load(Ordering::Relaxed))
        .sum();
    let up = shared.started.elapsed().unwrap_or_default().as_secs();
    let served = next_id.load(Ordering::Relaxed) - 1;
    info!(
        "zeotemp stopped after {}h{:02}m{:02}s: {served} connection{} served, {commits} commits on {} storage{}; \
         all data held in memory is gone",
        up / 3600,
        up / 60 % 60,
        up % 60,
        if served == 1 { "" } else { "s" },
        shared.storages.len(),
        if shared.storages.len() == 1 { "" } else { "s" },
    );
    Ok(())
}

/// Takes every storage's commit lock ahead of the waiting voters and keeps
/// it, so commits end before any connection closes: a transaction holding
/// the lock gets `shutdown-grace` to finish or abort; votes that
/// wait are never granted (their connections then close without a reply,
/// which clients retry as ClientDisconnected). Without this, a commit could
/// be acknowledged after another client's connection had already closed
/// without hearing of it. Returns the lock requests still waiting after the
/// grace (dropping one would pass the lock to the next voter).
async fn stop_commits(shared: &Shared) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
    let mut late = Vec::new();
    for name in &shared.storage_names {
        let Some(s) = shared.storages.get(name) else {
            continue;
        };
        if let LockAttempt::Wait(mut granted) = s.lock_ahead(SHUTDOWN_HOLDER)
            && tokio::time::timeout_at(deadline, &mut granted)
                .await
                .is_err()
        {
            warn!(
                storage = %name,
                "a transaction did not finish within the shutdown grace; closing its connection"
            );
            late.push(granted);
        }
    }
    late
}

/// The background collector: every `gc-interval`, for each storage, drops
/// expired history and, if anything was committed since, collects garbage;
/// every few minutes it logs a summary.
async fn gc_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.config.gc_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_summary = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let storages: Vec<_> = shared.storages.values().cloned().collect();
        let work = tokio::task::spawn_blocking(move || {
            for s in storages {
                let dropped = s.prune_expired();
                if dropped > 0 || s.changed_since_collection() {
                    s.collect_if_idle(s.retention_cutoff());
                }
            }
        });
        if let Err(e) = work.await {
            error!("garbage collection failed: {e}");
        }
        if last_summary.elapsed() >= Duration::from_secs(STATS_LOG_INTERVAL_SECS) {
            last_summary = tokio::time::Instant::now();
            for name in &shared.storage_names {
                if let Some(s) = shared.storages.get(name) {
                    log_summary(s);
                }
            }
        }
    }
}

async fn accept_loop(
    l: Listener,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    next_id: Arc<AtomicU64>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            // Reap finished connection tasks as we go.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&l) => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: log, breathe, go on.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let max = shared.config.max_connections;
        // Counted here, before the task is spawned: a burst of accepts runs
        // before any spawned task does, so counting in the task let a burst
        // go past the limit (up to ~128 in one go, tokio's budget).
        let Some(counted) = Counted::try_new(&shared, max) else {
            warn!(%peer, max, "connection refused: max-connections reached");
            drop(stream);
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        conns.spawn(serve(
            counted,
            stream,
            peer,
            id,
            tls.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    // Closed before the connections: a client that reconnects at once is
    // refused (and retries) instead of landing in the backlog of a
    // listener nobody accepts from any more.
    drop(l);
    let grace = shared.config.shutdown_grace;
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
}

type BoxStream = Box<dyn Stream>;
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

async fn accept(l: &Listener) -> io::Result<(BoxStream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Box::new(s), a.to_string()))
        }
        Listener::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((Box::new(s), format!("unix:{}", p.display())))
        }
    }
}

/// Runs one connection to its end.
/// Counts a live connection; the count drops when the connection ends,
/// even if its task panics.
struct Counted(Arc<Shared>);

impl Counted {
    /// Counts one more connection, unless `max` are open already.
    fn try_new(shared: &Arc<Shared>, max: usize) -> Option<Counted> {
        shared
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Counted(shared.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(
    _counted: Counted,
    stream: BoxStream,
    peer: String,
    id: u64,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // Counted since the accept (`accept_loop`), TLS handshake included.
    let stream = match tls {
        None => stream,
        Some(tls) => {
            // TCP peers by address (the retry delay); unix peers have none.
            let ip = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
            let timeout = shared.config.frame_timeout;
            // Boxed: the handshake's state (rustls's buffers) is allocated
            // for TLS connections only, not part of every connection task.
            let handshake = Box::pin(tls.handshake(stream, ip, timeout));
            tokio::select! {
                r = handshake => match r {
                    Ok(s) => Box::new(s),
                    Err(HandshakeFailure::Refused(reason)) => {
                        warn!(%peer, "TLS handshake failed: {}", printable(&reason));
                        return;
                    }
                    Err(HandshakeFailure::Closed(reason)) => {
                        debug!(%peer, "closed in the TLS handshake: {}", printable(&reason));
                        return;
                    }
                },
                _ = stop.changed() => {
                    debug!(%peer, "closed in the TLS handshake: server shutting down");
                    return;
                }
            }
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    let outbox = Arc::new(Outbox::with_read_pause(
        shared.config.max_outbox_bytes,
        shared.config.read_pause_bytes,
    ));
    outbox.push(frame::encode(if shared.config.msgpack {
        PROTOCOL_MSGPACK
    } else {
        PROTOCOL
    }));
    let mut conn = Conn {
        rd,
        wr: Writer {
            wr,
            pending: VecDeque::new(),
            offset: 0,
            outbox: outbox.clone(),
        },
        buf: BytesMut::with_capacity(64 * 1024),
        peer: &peer,
        shared: &shared,
        stop,
    };
    let reason = conn.run(id).await;
    match &reason {
        Ok(r) => debug!(%peer, "connection closed: {}", printable(r)),
        Err(r) => warn!(%peer, "closing connection: {}", printable(r)),
    }
    outbox.close("connection finished");
    // Let queued replies (e.g. a ruok answer, an error) reach the client.
    let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
    if tokio::time::timeout_at(deadline, conn.wr.finish())
        .await
        .is_err()
    {
        debug!(%peer, "queued frames not written in time");
    }
    // A lingering close: our FIN is out; read and discard until the client
    // closes its side (within the same grace). Closing with requests the
    // client sent before it saw the FIN still unread makes the kernel answer
    // them with RST, and the client's next send fails with EPIPE in the
    // middle of a burst of requests; on CPython 3.12 and 3.13 asyncio
    // (CPython gh-136234, `writelines` after a lost connection) that left
    // the stock ZEO client's reconnect stranded on a reused file descriptor,
    // never to retry (seen in 9 of 30 quick restarts under load; 0 of 55
    // with this). A client that closed first reads as EOF at once.
    let mut sink = [0u8; 8192];
    let _ = tokio::time::timeout_at(deadline, async {
        while let Ok(n) = conn.rd.read(&mut sink).await
            && n > 0
        {}
    })
    .await;
}

/// One connection, served by one task: frames in, [`Session`] handling,
/// replies and pushes out. Reading and writing are branches of one
/// `select!`, so the replies to a batch of pipelined requests leave in one
/// `writev` without waking a second task, and a client that is slow to read
/// still gets its requests read (until its outbox is backlogged).
struct Conn<'a> {
    rd: tokio::io::ReadHalf<BoxStream>,
    wr: Writer,
    buf: BytesMut,
    peer: &'a str,
    shared: &'a Arc<Shared>,
    stop: watch::Receiver<bool>,
}

/// The writing side: frames taken from the outbox, in order, and how much
/// of the first one is already written.
struct Writer {
    wr: tokio::io::WriteHalf<BoxStream>,
    pending: VecDeque<Bytes>,
    offset: usize,
    outbox: Arc<Outbox>,
}

/// Frames gathered into one `writev`.
const MAX_IOVECS: usize = 64;

impl Writer {
    fn has_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            self.outbox.take_frames(&mut self.pending);
        }
        !self.pending.is_empty()
    }

    /// Writes some of the pending frames (one `writev`).
    async fn write_some(&mut self) -> io::Result<()> {
        let mut slices = [io::IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (i, f) in self.pending.iter().take(MAX_IOVECS).enumerate() {
            slices[i] = io::IoSlice::new(if i == 0 { &f[self.offset..] } else { f });
            n += 1;
        }
        let written = self.wr.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.outbox.written(written);
        let mut left = written;
        while let Some(f) = self.pending.front() {
            let rest = f.len() - self.offset;
            if left < rest {
                self.offset += left;
                break;
            }
            left -= rest;
            self.offset = 0;
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Writes everything still queued, then shuts the socket down.
    async fn finish(&mut self) {
        while self.has_pending() {
            if let Err(e) = self.write_some().await {
                debug!("write failed: {e}");
                return;
            }
        }
        let _ = self.wr.shutdown().await;
    }
}

impl Conn<'_> {
    /// Reads and writes until the connection ends. `Ok` is a normal end
    /// (the client went away, shutdown), `Err` one worth a warning.
    async fn run(&mut self, id: u64) -> Result<String, String> {
        let max = self.shared.config.max_frame_size;
        let limits = DecodeLimits {
            max_depth: self.shared.config.max_nesting_depth,
            max_items: self.shared.config.max_message_items,
        };
        let outbox = self.wr.outbox.clone();
        let frame_timeout = self.shared.config.frame_timeout;
        let handshake_deadline = tokio::time::Instant::now() + frame_timeout;

        // The handshake: the client's first frame.
        let first = loop {
            match frame::parse(&mut self.buf, max) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => return Err(format!("bad handshake: {e}")),
            }
            tokio::select! {
                n = self.rd.read_buf(&mut self.buf) => match n {
                    Ok(0) => return Ok("closed before the handshake".into()),
                    Ok(_) => {}
                    Err(e) => return Ok(format!("read error before the handshake: {e}")),
                },
                r = self.wr.write_some(), if self.wr.has_pending() => {
                    if let Err(e) = r {
                        return Ok(format!("write error before the handshake: {e}"));
                    }
                }
                _ = self.stop.changed() => return Ok("server shutting down".into()),
                _ = tokio::time::sleep_until(handshake_deadline) => {
                    return Err(format!(
                        "no handshake within frame-timeout ({frame_timeout:?})"
                    ));
                }
            }
        };
        // The client's letter picks the encoding, whatever we announced
        // (as the stock server's `finish_connection`).
        let msgpack = match &first[..] {
            b"ruok" => {
                outbox.push(frame::encode(
                    crate::monitor::status::ruok(self.shared).as_bytes(),
                ));
                return Ok("answered ruok".into());
            }
            b"Z5" => false,
            b"M5" => true,
            other => {
                let shown = String::from_utf8_lossy(&other[..other.len().min(16)]).into_owned();
                return Err(format!(
                    "bad handshake {shown:?}: this server speaks ZEO protocol Z5 or M5"
                ));
            }
        };
        let protocol = if msgpack { "M5" } else { "Z5" };
        info!(peer = %self.peer, protocol = %protocol, "connected");

        let mut session = Session::new(
            id,
            self.peer.to_string(),
            self.shared.clone(),
            outbox.clone(),
        );
        if msgpack {
            session.use_msgpack();
        }
        let mut lock_wait: Option<crate::session::LockWait> = None;
        let timeout = self.shared.config.transaction_timeout;
        // Since when the buffer has held the start of a frame that is not
        // complete yet (reset whenever a whole frame arrives); the timer
        // closes the connection once that is frame-timeout ago.
        let mut partial_since: Option<tokio::time::Instant> = None;
        let frame_timer = tokio::time::sleep(frame_timeout);
        tokio::pin!(frame_timer);
        loop {
            // Handle every whole frame already buffered.
            let mut progressed = false;
            loop {
                if outbox.closed_reason().is_some() || outbox.is_backlogged() {
                    break;
                }
                let payload = match frame::parse(&mut self.buf, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => return Err(e.to_string()),
                };
                progressed = true;
                let decoded = if msgpack {
                    envelope::decode_msgpack_message(&payload, &limits)
                } else {
                    envelope::decode_message(&payload, &limits)
                };
                let msg = match decoded {
                    Ok(m) => m,
                    Err(e) => return Err(format!("cannot decode message: {e}")),
                };
                match session.handle(msg) {
                    Flow::Continue => {}
                    Flow::WaitLock(rx) => lock_wait = Some(rx),
                    Flow::Close(reason) => return Err(reason),
                }
                // A batch of pipelined requests is work the runtime cannot
                // see (no socket I/O per frame): count each against the
                // task's coop budget, so one client's batch cannot hold the
                // worker thread for long (a flood of 50,000 pipelined
                // new_oids stalled another client's commit for 0.3-2 s).
                tokio::task::consume_budget().await;
            }
            if let Some(reason) = outbox.closed_reason() {
                return Err(reason.to_string());
            }
            let deadline = session
                .lock_held_since()
                .map(|t| tokio::time::Instant::from_std(t + timeout));
            let backlogged = outbox.is_backlogged();
            let writing = self.wr.has_pending();
            // While backlogged we do not read, so a half-read frame is ours
            // to wait for, not the client's fault.
            if self.buf.is_empty() || progressed || backlogged {
                partial_since = None;
            }
            if partial_since.is_none() && !self.buf.is_empty() && !backlogged {
                let now = tokio::time::Instant::now();
                partial_since = Some(now);
                frame_timer.as_mut().reset(now + frame_timeout);
            }
            tokio::select! {
                // The commit lock's grant and deadline first: they are rare
                // and cheap, and a client that keeps the socket busy (reads
                // and writes always ready) must not starve them, or it
                // would hold the lock it was granted with no deadline, or
                // past it. The server's stop next, for the same reason (a
                // client that kept pipelining requests was served until
                // the shutdown grace ran out, then reset). Then replies:
                // they free the client to send more.
                biased;
                granted = async { (&mut lock_wait.as_mut().expect("guarded").granted).await }, if lock_wait.is_some() => {
                    let wait = lock_wait.take().map(|w| w.wait);
                    if let (Ok(()), Some(wait)) = (granted, wait) {
                        session.lock_granted(wait);
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    session.lock_timed_out();
                    return Err("transaction-timeout exceeded".into());
                }
                _ = self.stop.changed() => return Ok("server shutting down".into()),
                r = self.wr.write_some(), if writing => {
                    if let Err(e) = r {
                        outbox.close("write failed");
                        return Ok(format!("write error: {e}"));
                    }
                }
                n = self.rd.read_buf(&mut self.buf), if !backlogged => match n {
                    Ok(0) => return Ok("client closed the connection".into()),
                    Ok(_) => {}
                    Err(e) => return Ok(format!("read error: {e}")),
                },
                // Pushes from other connections (invalidations) while idle.
                _ = outbox.wait_frames(), if !writing => {}
                // An overflow (another connection's commit pushed past the
                // bound) while the socket takes nothing.
                reason = outbox.wait_closed(), if writing => return Err(reason.to_string()),
                _ = &mut frame_timer, if partial_since.is_some() => {
                    return Err(format!(
                        "a message started {frame_timeout:?} ago is still incomplete ({} of its bytes here; frame-timeout)",
                        self.buf.len()
                    ));
                }
            }
        }
    }
}

/// `s` with control characters (newlines, terminal escapes) escaped: a
/// close reason can carry text a client sent, which must not forge or
/// garble log lines.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Logs a panic payload from a connection task (kept for the binary).
pub fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    error!("panic: {info}");
}
