//! One connection, served by one task: the TLS handshake if configured,
//! the ZEO handshake, then frames in, [`Session`] handling, commit-lock
//! waits and timers, and the connection's [`Outbox`] out, until a [`Close`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use super::listener::Counted;
use super::tls::{HandshakeFailure, Tls};
use crate::logging::Repeated;
use crate::protocol::envelope;
use crate::protocol::frame::{self, FrameError};
use crate::protocol::hot;
use crate::protocol::value::DecodeLimits;
use crate::session::outbox::Outbox;
use crate::session::{Flow, LockWait, Session, SessionCounts};
use crate::state::{Disconnect, Shared, TlsFailure};
use crate::storage::stats::Reason;

/// The protocol we announce: ZEO 5, pickle encoding.
pub const PROTOCOL: &[u8] = b"Z5";

/// The protocol we announce with `msgpack` on: ZEO 5, msgpack encoding.
/// Either way a client may answer `Z5` or `M5` and gets what it answered,
/// as with the stock server.
pub const PROTOCOL_MSGPACK: &[u8] = b"M5";

/// Frames gathered into one `writev`.
const MAX_IOVECS: usize = 64;

/// An accepted connection's stream, plain or TLS.
pub(super) type BoxStream = Box<dyn Stream>;
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Why a connection ended: one `disconnected: ...` line (the text is
/// [`Close`]'s `Display`), with the metric's reason ([`Close::reason`]), the
/// connection's lifetime and counts. The first five are a normal end, logged
/// at info level (debug for a connection that never completed its ZEO
/// handshake: a probe); the others are worth a warning (rate-limited per
/// kind: see [`Close::fault_limit`]).
#[derive(Debug)]
pub(super) enum Close {
    /// The client closed its side (`in_handshake`: before its first frame).
    PeerClosed { in_handshake: bool },
    /// Reading from the socket failed (a reset, ...).
    ReadError {
        in_handshake: bool,
        error: io::Error,
    },
    /// Writing to the socket failed.
    WriteError {
        in_handshake: bool,
        error: io::Error,
    },
    /// The server is shutting down.
    Shutdown,
    /// A `ruok` probe got its answer.
    AnsweredRuok,
    /// A frame over `max-frame-size`.
    BadFrame {
        in_handshake: bool,
        error: FrameError,
    },
    /// The client's first frame is neither `Z5` nor `M5` (its first 16
    /// bytes, as text).
    UnknownProtocol(String),
    /// No handshake within `frame-timeout`.
    HandshakeTimeout(Duration),
    /// A message that cannot be decoded.
    Undecodable(String),
    /// A message started `frame-timeout` ago is still incomplete; `buffered`
    /// of its bytes are here.
    IncompleteFrame { timeout: Duration, buffered: usize },
    /// The commit lock was held past `transaction-timeout`.
    TransactionTimeout,
    /// The session ended the connection (a one-way call failed).
    Session(String),
    /// The outbox was closed, e.g. because the client does not read its
    /// invalidations (another connection's commit pushed it past its bound).
    OutboxClosed(&'static str),
}

impl Close {
    /// The rate limit of its warning if it is one worth a warning (not a
    /// normal end): one per kind, so that a flood of one (clients that do
    /// not read, a scanner's garbage) does not hold back the first of
    /// another.
    fn fault_limit(&self) -> Option<&'static Repeated> {
        static BAD_FRAME: Repeated = Repeated::new();
        static UNKNOWN_PROTOCOL: Repeated = Repeated::new();
        static HANDSHAKE_TIMEOUT: Repeated = Repeated::new();
        static UNDECODABLE: Repeated = Repeated::new();
        static INCOMPLETE_FRAME: Repeated = Repeated::new();
        static TRANSACTION_TIMEOUT: Repeated = Repeated::new();
        static SESSION: Repeated = Repeated::new();
        static OUTBOX_CLOSED: Repeated = Repeated::new();
        match self {
            Close::PeerClosed { .. }
            | Close::ReadError { .. }
            | Close::WriteError { .. }
            | Close::Shutdown
            | Close::AnsweredRuok => None,
            Close::BadFrame { .. } => Some(&BAD_FRAME),
            Close::UnknownProtocol(_) => Some(&UNKNOWN_PROTOCOL),
            Close::HandshakeTimeout(_) => Some(&HANDSHAKE_TIMEOUT),
            Close::Undecodable(_) => Some(&UNDECODABLE),
            Close::IncompleteFrame { .. } => Some(&INCOMPLETE_FRAME),
            Close::TransactionTimeout => Some(&TRANSACTION_TIMEOUT),
            Close::Session(_) => Some(&SESSION),
            Close::OutboxClosed(_) => Some(&OUTBOX_CLOSED),
        }
    }

    /// The reason `zeotemp_disconnects_total` counts this end under.
    fn reason(&self) -> Disconnect {
        match self {
            Close::PeerClosed { .. } | Close::ReadError { .. } | Close::WriteError { .. } => {
                Disconnect::Client
            }
            Close::Shutdown => Disconnect::Shutdown,
            Close::AnsweredRuok => Disconnect::Ruok,
            Close::BadFrame { .. }
            | Close::UnknownProtocol(_)
            | Close::Undecodable(_)
            | Close::Session(_) => Disconnect::ProtocolError,
            Close::HandshakeTimeout(_) | Close::IncompleteFrame { .. } => Disconnect::FrameTimeout,
            Close::TransactionTimeout => Disconnect::TransactionTimeout,
            Close::OutboxClosed(_) => Disconnect::SlowClient,
        }
    }
}

/// What a connection did in its lifetime, for the line that logs its end.
#[derive(Debug, Default)]
struct Lifetime {
    /// What its session did (`None`: it never completed the ZEO handshake).
    session: Option<SessionCounts>,
    /// Bytes read from the client, and written to it (TLS: decrypted).
    bytes_in: u64,
    bytes_out: u64,
}

/// The end of one connection, counted and logged exactly once: by
/// [`End::log`] where [`serve`] ends it, or, when `serve` never gets there
/// (a panic in the connection's task unwinds it, or the task is cut off
/// when `shutdown-grace` runs out and its future is dropped), by `Drop`.
struct End<'a> {
    shared: &'a Shared,
    peer: &'a str,
    /// When the connection was accepted.
    since: Instant,
    logged: bool,
}

impl End<'_> {
    /// Counts the end for `reason` and logs it in one line: `text` says
    /// why, with the counts of what the connection did. A fault (`fault`:
    /// its kind's rate limit) is a warning, rate-limited (the others of its
    /// kind within the interval at debug); a normal end of a ZEO session is
    /// info (never limited), the end of a probe (no ZEO handshake) debug.
    fn log(&mut self, reason: Disconnect, fault: Option<&Repeated>, text: &str, life: &Lifetime) {
        self.logged = true;
        self.shared.faults.disconnects.bump(reason);
        let reason = reason.label();
        let seconds = (self.since.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        let s = life.session.unwrap_or_default();
        let (bytes_in, bytes_out) = (life.bytes_in, life.bytes_out);
        let during = if s.ended_in_transaction {
            " (during a transaction: aborted)"
        } else {
            ""
        };
        let text = printable(text);
        macro_rules! end {
            ($level:ident, $more:expr) => {
                $level!(
                    peer = %self.peer, reason = %reason, seconds, requests = s.requests, loads = s.loads,
                    commits = s.commits, aborts = s.aborts, bytes_in, bytes_out,
                    "disconnected: {text}{during}{}", $more
                )
            };
            ($level:ident) => {
                end!($level, "")
            };
        }
        if let Some(limit) = fault {
            match limit.warn() {
                Some(more) => end!(warn, more),
                None => end!(debug),
            }
        } else if life.session.is_some() {
            end!(info);
        } else {
            end!(debug);
        }
    }
}

impl Drop for End<'_> {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        static FAILED: Repeated = Repeated::new();
        let life = Lifetime::default();
        if std::thread::panicking() {
            let text = "its task failed (a bug; the panic is logged above)";
            self.log(Disconnect::InternalError, Some(&FAILED), text, &life);
        } else {
            let text = "cut off: the server stopped before the connection ended";
            self.log(Disconnect::Shutdown, None, text, &life);
        }
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let before = |in_handshake: bool| {
            if in_handshake {
                " before the handshake"
            } else {
                ""
            }
        };
        match self {
            Close::PeerClosed { in_handshake: true } => f.write_str("closed before the handshake"),
            Close::PeerClosed {
                in_handshake: false,
            } => f.write_str("client closed the connection"),
            Close::ReadError {
                in_handshake,
                error,
            } => write!(f, "read error{}: {error}", before(*in_handshake)),
            Close::WriteError {
                in_handshake,
                error,
            } => write!(f, "write error{}: {error}", before(*in_handshake)),
            Close::Shutdown => f.write_str("server shutting down"),
            Close::AnsweredRuok => f.write_str("answered ruok"),
            Close::BadFrame {
                in_handshake: true,
                error,
            } => write!(f, "bad handshake: {error}"),
            Close::BadFrame {
                in_handshake: false,
                error,
            } => write!(f, "{error}"),
            Close::UnknownProtocol(shown) => write!(
                f,
                "bad handshake {shown:?}: this server speaks ZEO protocol Z5 or M5"
            ),
            Close::HandshakeTimeout(timeout) => {
                write!(f, "no handshake within frame-timeout ({timeout:?})")
            }
            Close::Undecodable(error) => write!(f, "cannot decode message: {error}"),
            Close::IncompleteFrame { timeout, buffered } => write!(
                f,
                "a message started {timeout:?} ago is still incomplete ({buffered} of its bytes here; frame-timeout)"
            ),
            Close::TransactionTimeout => f.write_str(
                "transaction-timeout exceeded: the transaction held the commit lock past it and was aborted",
            ),
            Close::Session(reason) => f.write_str(reason),
            Close::OutboxClosed(reason) => f.write_str(reason),
        }
    }
}

/// The protocol a client chose in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// ZEO 5, pickle encoding.
    Z5,
    /// ZEO 5, msgpack encoding.
    M5,
}

impl Protocol {
    /// The protocol's name, as the client sent it.
    fn name(self) -> &'static str {
        match self {
            Protocol::Z5 => "Z5",
            Protocol::M5 => "M5",
        }
    }
}

/// Serves one accepted connection to its end; `_counted` keeps it in the
/// connection count (since the accept, TLS handshake included).
pub(super) async fn serve(
    _counted: Counted,
    stream: BoxStream,
    peer: String,
    id: u64,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut end = End {
        shared: &shared,
        peer: &peer,
        since: Instant::now(),
        logged: false,
    };
    let stream = match tls {
        None => stream,
        Some(tls) => match tls_handshake(&tls, stream, &peer, &shared, &mut stop).await {
            Ok(s) => s,
            Err((reason, fault, text)) => {
                end.log(reason, fault, &text, &Lifetime::default());
                return;
            }
        },
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
            bytes_out: 0,
        },
        outbox: outbox.clone(),
        buf: BytesMut::with_capacity(64 * 1024),
        peer: &peer,
        shared: &shared,
        stop,
        bytes_in: 0,
        session: None,
    };
    let close = conn.run(id).await;
    let life = Lifetime {
        session: conn.session,
        bytes_in: conn.bytes_in,
        bytes_out: conn.wr.bytes_out,
    };
    end.log(
        close.reason(),
        close.fault_limit(),
        &close.to_string(),
        &life,
    );
    outbox.close("connection finished");
    // Let queued replies (e.g. a ruok answer, an error) reach the client.
    let deadline = Instant::now() + shared.config.shutdown_grace;
    if tokio::time::timeout_at(deadline, conn.wr.finish())
        .await
        .is_err()
    {
        debug!(%peer, "queued frames not written in time");
    }
    conn.linger(deadline).await;
}

/// The TLS handshake of a new connection, within `frame-timeout`. When it
/// failed (counted) or the server is shutting down: the end's reason,
/// the rate limit of its warning if it is a fault (one for TLS errors, one
/// for timeouts), and the text for its log line.
async fn tls_handshake(
    tls: &Tls,
    stream: BoxStream,
    peer: &str,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Result<BoxStream, (Disconnect, Option<&'static Repeated>, String)> {
    static TLS_ERROR: Repeated = Repeated::new();
    static TLS_TIMEOUT: Repeated = Repeated::new();
    // TCP peers by address (the retry delay); unix peers have none.
    let ip = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
    let timeout = shared.config.frame_timeout;
    // Boxed: the handshake's state (rustls's buffers) is allocated for TLS
    // connections only, not part of every connection task.
    let handshake = Box::pin(tls.handshake(stream, ip, timeout));
    tokio::select! {
        r = handshake => match r {
            Ok(s) => Ok(Box::new(s)),
            Err(HandshakeFailure::Refused(reason)) => {
                shared.faults.tls_handshake_failures.bump(TlsFailure::Error);
                Err((Disconnect::TlsHandshake, Some(&TLS_ERROR), format!("TLS handshake failed: {reason}")))
            }
            Err(HandshakeFailure::TimedOut(timeout)) => {
                shared.faults.tls_handshake_failures.bump(TlsFailure::Timeout);
                Err((
                    Disconnect::TlsHandshake,
                    Some(&TLS_TIMEOUT),
                    format!("TLS handshake failed: not completed within frame-timeout ({timeout:?})"),
                ))
            }
            Err(HandshakeFailure::Closed(reason)) => {
                Err((Disconnect::Client, None, format!("closed in the TLS handshake: {reason}")))
            }
        },
        _ = stop.changed() => {
            Err((Disconnect::Shutdown, None, "closed in the TLS handshake: server shutting down".into()))
        }
    }
}

/// One connection, served by one task: frames in, [`Session`] handling,
/// replies and pushes out. Reading and writing are branches of one
/// `select!`, so the replies to a batch of pipelined requests leave in one
/// `writev` without waking a second task, and a client that is slow to read
/// still gets its requests read (until its outbox is backlogged).
struct Conn<'a> {
    rd: tokio::io::ReadHalf<BoxStream>,
    wr: Writer,
    /// The connection's outbox (the writer's, shared with the session).
    outbox: Arc<Outbox>,
    buf: BytesMut,
    peer: &'a str,
    shared: &'a Arc<Shared>,
    stop: watch::Receiver<bool>,
    /// Bytes read from the client so far.
    bytes_in: u64,
    /// What the session did, once it ended (`None`: no ZEO handshake).
    session: Option<SessionCounts>,
}

impl Conn<'_> {
    /// Reads and writes until the connection ends, and says why it did.
    async fn run(&mut self, id: u64) -> Close {
        let protocol = match self.handshake().await {
            Ok(p) => p,
            Err(close) => return close,
        };
        info!(peer = %self.peer, protocol = %protocol.name(), "connected");
        let mut session = Session::new(
            id,
            self.peer.to_string(),
            self.shared.clone(),
            self.outbox.clone(),
        );
        if protocol == Protocol::M5 {
            session.use_msgpack();
        }
        let close = self.serve_session(&mut session, protocol).await;
        self.session = Some(session.end());
        close
    }

    /// The handshake: the client's first frame, within `frame-timeout`,
    /// picks the protocol (or is a `ruok` probe, answered here).
    async fn handshake(&mut self) -> Result<Protocol, Close> {
        let max = self.shared.config.max_frame_size;
        let frame_timeout = self.shared.config.frame_timeout;
        let deadline = Instant::now() + frame_timeout;
        let first = loop {
            match frame::parse(&mut self.buf, max) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(error) => {
                    return Err(Close::BadFrame {
                        in_handshake: true,
                        error,
                    });
                }
            }
            tokio::select! {
                n = self.rd.read_buf(&mut self.buf) => match n {
                    Ok(0) => return Err(Close::PeerClosed { in_handshake: true }),
                    Ok(n) => self.bytes_in += n as u64,
                    Err(error) => return Err(Close::ReadError { in_handshake: true, error }),
                },
                r = self.wr.write_some(), if self.wr.has_pending() => {
                    if let Err(error) = r {
                        return Err(Close::WriteError { in_handshake: true, error });
                    }
                }
                _ = self.stop.changed() => return Err(Close::Shutdown),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Close::HandshakeTimeout(frame_timeout));
                }
            }
        };
        // The client's letter picks the encoding, whatever we announced
        // (as the stock server's `finish_connection`).
        match &first[..] {
            b"ruok" => {
                self.outbox.push(frame::encode(
                    crate::monitor::status::ruok(self.shared).as_bytes(),
                ));
                Err(Close::AnsweredRuok)
            }
            b"Z5" => Ok(Protocol::Z5),
            b"M5" => Ok(Protocol::M5),
            other => Err(Close::UnknownProtocol(
                String::from_utf8_lossy(&other[..other.len().min(16)]).into_owned(),
            )),
        }
    }

    /// The frame loop after the handshake: handles the buffered frames,
    /// then waits for whatever comes next (a frame's bytes, the socket
    /// taking replies, the commit lock, a timer, the server's stop).
    async fn serve_session(&mut self, session: &mut Session, protocol: Protocol) -> Close {
        let mut lock_wait: Option<LockWait> = None;
        let mut incomplete = IncompleteFrameTimer::new(self.shared.config.frame_timeout);
        // The server's stop: one future, polled once here to register this
        // task with the watch (the registration stays, as long as the
        // future lives, until the stop wakes the task); each wait then only
        // looks at the watch's version. A new `changed()` per wait
        // registered with the watch's `Notify`, and left it again, under
        // its lock, once per request of a client that sends one at a time.
        // Unconstrained: a poll refused for the task's coop budget would
        // not register it.
        let mut stop = self.stop.clone();
        let mut stopped = std::pin::pin!(tokio::task::unconstrained(async move {
            // An error (the sender gone) is a stop too.
            let _ = stop.changed().await;
        }));
        if poll_once(stopped.as_mut()).await.is_ready() {
            return Close::Shutdown;
        }
        // Whole frames were handled since the last wait (the incomplete
        // frame timer starts again from each one).
        let mut handled = false;
        loop {
            let progressed = match self
                .handle_buffered(session, &mut lock_wait, protocol)
                .await
            {
                Ok(progressed) => progressed,
                Err(close) => return close,
            };
            handled |= progressed;
            if let Some(reason) = self.outbox.closed_reason() {
                return Close::OutboxClosed(reason);
            }
            // The replies to what was just handled leave at once if the
            // socket takes them (it nearly always does), without a trip
            // through `wait`'s select; `wait` writes whatever is left.
            if progressed && self.wr.has_pending() {
                let write = std::pin::pin!(self.wr.write_some());
                match poll_once(write).await {
                    Poll::Ready(Err(error)) => {
                        self.outbox.close("write failed");
                        return Close::WriteError {
                            in_handshake: false,
                            error,
                        };
                    }
                    // Written: the outbox may no longer be backlogged, so
                    // the frames that handling left buffered for that are
                    // handled before the task waits (with nothing to read
                    // it would wait for ever).
                    Poll::Ready(Ok(())) => continue,
                    Poll::Pending => {}
                }
            }
            if let Err(close) = self
                .wait(
                    session,
                    &mut lock_wait,
                    &mut incomplete,
                    std::mem::take(&mut handled),
                )
                .await
            {
                return close;
            }
        }
    }

    /// Handles every whole frame already buffered (until the outbox is
    /// closed or backlogged); `true` if there was any.
    async fn handle_buffered(
        &mut self,
        session: &mut Session,
        lock_wait: &mut Option<LockWait>,
        protocol: Protocol,
    ) -> Result<bool, Close> {
        let max = self.shared.config.max_frame_size;
        let limits = DecodeLimits {
            max_depth: self.shared.config.max_nesting_depth,
            max_items: self.shared.config.max_message_items,
        };
        let outbox = &self.outbox;
        let mut progressed = false;
        while outbox.takes_requests() {
            let payload = match frame::parse(&mut self.buf, max) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(error) => {
                    return Err(Close::BadFrame {
                        in_handshake: false,
                        error,
                    });
                }
            };
            progressed = true;
            // A stock Python 3 client's loadBefore or lastTransaction is
            // handled from its bytes (`protocol::hot`); anything else, or
            // a session that does not take it so, is decoded.
            let hot = match protocol {
                Protocol::Z5 => hot::recognize(&payload)
                    .and_then(|req| session.handle_hot(req, &payload, &limits)),
                Protocol::M5 => None,
            };
            let flow = match hot {
                Some(flow) => flow,
                None => {
                    let decoded = match protocol {
                        Protocol::M5 => envelope::decode_msgpack_message(&payload, &limits),
                        Protocol::Z5 => envelope::decode_message(&payload, &limits),
                    };
                    session.handle(decoded.map_err(|e| Close::Undecodable(e.to_string()))?)
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::WaitLock(rx) => *lock_wait = Some(rx),
                Flow::Close(reason) => return Err(Close::Session(reason)),
            }
            // A batch of pipelined requests is work the runtime cannot see
            // (no socket I/O per frame): count each against the task's coop
            // budget, so one client's batch cannot hold the worker thread
            // for long (a flood of 50,000 pipelined new_oids stalled
            // another client's commit for 0.3-2 s).
            tokio::task::consume_budget().await;
        }
        Ok(progressed)
    }

    /// Waits for the next thing to do and does it: a commit-lock grant, a
    /// write, a read (not while the outbox is backlogged), pushes from other
    /// connections; or ends the connection (timers, the server's stop, the
    /// client going away, an outbox overflow).
    async fn wait(
        &mut self,
        session: &mut Session,
        lock_wait: &mut Option<LockWait>,
        incomplete: &mut IncompleteFrameTimer,
        progressed: bool,
    ) -> Result<(), Close> {
        let outbox = &self.outbox;
        let deadline = session
            .lock_held_since()
            .map(|t| Instant::from_std(t + self.shared.config.transaction_timeout));
        let backlogged = outbox.is_backlogged();
        let writing = self.wr.has_pending();
        incomplete.update(!self.buf.is_empty(), progressed, backlogged);
        tokio::select! {
            // The commit lock's grant and deadline first: they are rare and
            // cheap, and a client that keeps the socket busy (reads and
            // writes always ready) must not starve them, or it would hold
            // the lock it was granted with no deadline, or past it. The
            // server's stop next, for the same reason (a client that kept
            // pipelining requests was served until the shutdown grace ran
            // out, then reset). Then replies: they free the client to send
            // more.
            biased;
            granted = async { (&mut lock_wait.as_mut().expect("guarded").granted).await }, if lock_wait.is_some() => {
                let wait = lock_wait.take().map(|w| w.wait);
                if let (Ok(()), Some(wait)) = (granted, wait) {
                    session.lock_granted(wait);
                }
            }
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                session.lock_timed_out();
                return Err(Close::TransactionTimeout);
            }
            // A look at the watch's version, no lock; the future polled in
            // `serve_session` wakes a waiting task for it.
            _ = std::future::poll_fn(|_| {
                if self.stop.has_changed().unwrap_or(true) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }) => return Err(Close::Shutdown),
            r = self.wr.write_some(), if writing => {
                if let Err(error) = r {
                    outbox.close("write failed");
                    return Err(Close::WriteError { in_handshake: false, error });
                }
            }
            n = self.rd.read_buf(&mut self.buf), if !backlogged => match n {
                Ok(0) => return Err(Close::PeerClosed { in_handshake: false }),
                Ok(n) => self.bytes_in += n as u64,
                Err(error) => return Err(Close::ReadError { in_handshake: false, error }),
            },
            // Pushes from other connections (invalidations) while idle.
            _ = std::future::poll_fn(|cx| outbox.poll_frames(cx)), if !writing => {}
            // An overflow (another connection's commit pushed past the
            // bound) while the socket takes nothing.
            reason = outbox.wait_closed(), if writing => return Err(Close::OutboxClosed(reason)),
            _ = &mut incomplete.sleep, if incomplete.is_armed() => {
                return Err(Close::IncompleteFrame {
                    timeout: incomplete.timeout,
                    buffered: self.buf.len(),
                });
            }
        }
        // Running again: what the session pushes for itself from here on
        // is written before the task waits again, without a wake-up.
        outbox.unpark();
        Ok(())
    }

    /// A lingering close: our FIN is out; read and discard until the client
    /// closes its side (until `deadline`). Closing with requests the client
    /// sent before it saw the FIN still unread makes the kernel answer them
    /// with RST, and the client's next send fails with EPIPE in the middle
    /// of a burst of requests; on CPython 3.12 and 3.13 asyncio (CPython
    /// gh-136234, `writelines` after a lost connection) that left the stock
    /// ZEO client's reconnect stranded on a reused file descriptor, never to
    /// retry (seen in 9 of 30 quick restarts under load; 0 of 55 with
    /// this). A client that closed first reads as EOF at once.
    async fn linger(&mut self, deadline: Instant) {
        let mut sink = [0u8; 8192];
        let _ = tokio::time::timeout_at(deadline, async {
            while let Ok(n) = self.rd.read(&mut sink).await
                && n > 0
            {}
        })
        .await;
    }
}

/// Polls `fut` once: its result if it is ready now, else `Pending` (and
/// `fut` is dropped; [`Writer::write_some`] writes nothing unless it
/// completes).
async fn poll_once<F: Future>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

/// The `frame-timeout` of a message that has started to arrive: armed
/// while the buffer holds the start of a frame that is not complete yet
/// (and re-armed whenever a whole frame arrives), it closes the connection
/// once that is `frame-timeout` ago.
struct IncompleteFrameTimer {
    timeout: Duration,
    /// Since when the incomplete frame has been waited for.
    since: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
}

impl IncompleteFrameTimer {
    fn new(timeout: Duration) -> IncompleteFrameTimer {
        IncompleteFrameTimer {
            timeout,
            since: None,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Arms or disarms the timer for the buffer's state: `buffered`, some
    /// bytes of a frame are here; `progressed`, whole frames were just
    /// handled; `backlogged`, the connection does not read (so a half-read
    /// frame is ours to wait for, not the client's fault).
    fn update(&mut self, buffered: bool, progressed: bool, backlogged: bool) {
        if !buffered || progressed || backlogged {
            self.since = None;
        }
        if self.since.is_none() && buffered && !backlogged {
            let now = Instant::now();
            self.since = Some(now);
            self.sleep.as_mut().reset(now + self.timeout);
        }
    }

    fn is_armed(&self) -> bool {
        self.since.is_some()
    }
}

/// The writing side: frames taken from the outbox, in order, and how much
/// of the first one is already written.
struct Writer {
    wr: tokio::io::WriteHalf<BoxStream>,
    pending: VecDeque<Bytes>,
    offset: usize,
    outbox: Arc<Outbox>,
    /// Bytes written to the client so far.
    bytes_out: u64,
}

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
        self.bytes_out += written as u64;
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
