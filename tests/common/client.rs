//! A raw ZEO client for the wire and hostile-input tests, and a
//! well-behaved [`Bystander`] that shows the server still serves others.
//!
//! Well-formed requests are the ones stock clients write
//! ([`envelope::encode_request`]); the client also writes raw frames (a
//! 4-byte big-endian length, then the payload) and request pickles with raw
//! opcodes in them, so a test can send anything, well-formed or not. Every read is bounded ([`READ_TIMEOUT`] unless a test gives its own
//! limit), so a hang fails a test instead of blocking CI.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeotemp::protocol::envelope::{self, Message};
use zeotemp::protocol::frame::HEADER_LEN;
use zeotemp::protocol::pickle::{self, Dialect};
use zeotemp::protocol::value::{DecodeLimits, Value};

/// Longest wait for any one frame from the server (or its close).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a bystander's load-and-commit round (or its vote that waited
/// for the commit lock) may take. The default transaction timeout is 30 s,
/// so a round that waited for a stuck commit lock fails.
pub const PROMPT: Duration = Duration::from_secs(3);

/// The zero tid: the serial a new object is stored with.
pub const Z64: [u8; 8] = [0; 8];
/// The largest tid: `loadBefore(oid, MAXTID)` loads the current revision.
pub const MAXTID: [u8; 8] = [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

// ---- values and raw pickles ----------------------------------------------

/// A `bytes` value.
pub fn b(x: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(x))
}

/// A `str` value.
pub fn s(x: &str) -> Value {
    Value::Str(x.into())
}

/// A tuple value.
pub fn t(items: Vec<Value>) -> Value {
    Value::Tuple(items)
}

/// The 8-byte oid `n`.
pub fn oid(n: u64) -> Value {
    b(&n.to_be_bytes())
}

/// The pickle opcodes that push `v` (no PROTO, no STOP).
pub fn pk(v: &Value) -> Vec<u8> {
    let mut out = BytesMut::new();
    pickle::encode_into(&mut out, v, Dialect::Py3);
    out.to_vec()
}

/// A request payload `(msgid, oneway, method, args)` whose `args` are raw
/// opcodes pushing exactly one value (usually, but not necessarily, a
/// tuple); the rest as [`request`] writes it.
pub fn raw_request(msgid: Value, oneway: bool, method: &str, args: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80, 3, b'('];
    out.extend(pk(&msgid));
    out.push(if oneway { 0x88 } else { 0x89 });
    out.extend(pk(&s(method)));
    out.extend_from_slice(args);
    out.extend_from_slice(b"t.");
    out
}

/// `payload` with its 4-byte big-endian length prefix: one whole frame, to
/// write alone or batched with others.
pub fn framed(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// A request frame `(msgid, oneway, method, args)` as a Python 3 client
/// writes it; `args` may be any value.
pub fn request_frame(msgid: &Value, oneway: bool, method: &str, args: &Value) -> Bytes {
    envelope::encode_request(Dialect::Py3, msgid, oneway, method, args)
}

/// The payload of [`request_frame`] (without the length prefix).
pub fn request(msgid: Value, oneway: bool, method: &str, args: &Value) -> Vec<u8> {
    request_frame(&msgid, oneway, method, args)[HEADER_LEN..].to_vec()
}

/// A sync call's outcome: `Ok(result)`, or `Err((exception class, state))`
/// for an error reply.
pub use zeotemp::protocol::envelope::Reply;

/// The message text of an error reply's state (`(message,)`).
pub fn err_text(state: &Value) -> String {
    match state {
        Value::Tuple(items) if items.len() == 1 => match items[0].as_text() {
            Some(text) => text.into_owned(),
            None => format!("{state:?}"),
        },
        _ => format!("{state:?}"),
    }
}

// ---- the raw client ---------------------------------------------------------

/// One connection to the server, spoken to with raw frames.
///
/// Methods named `try_…` tolerate a server that already closed the
/// connection (they say so in their result); the others panic then.
pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
    /// The msgid of the next request [`Client::send`] writes.
    next: i64,
}

impl Client {
    /// Connects and reads the server's `Z5` announcement (the server
    /// speaks first).
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::on(TcpStream::connect(addr).await.unwrap()).await
    }

    /// Like [`Client::connect`], with a small receive buffer: a client that
    /// stops reading then fills the server's queue for it instead of the
    /// kernel's buffers.
    pub async fn connect_small_buffer(addr: SocketAddr) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        Client::on(sock.connect(addr).await.unwrap()).await
    }

    async fn on(stream: TcpStream) -> Client {
        // As stock clients (asyncio) do; else Nagle and delayed ACKs add
        // 40 ms to each round trip that follows one-way calls.
        stream.set_nodelay(true).unwrap();
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
            next: 1,
        };
        assert_eq!(
            c.frame().await.as_deref(),
            Some(&b"Z5"[..]),
            "the server speaks first"
        );
        c
    }

    /// The socket itself (anything read but not yet parsed is dropped).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Connected, and the `Z5` handshake sent.
    pub async fn handshaken(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        c.send_frame(b"Z5").await;
        c
    }

    /// Handshaken and registered on storage `1` (read-write).
    pub async fn registered(addr: SocketAddr) -> Client {
        let mut c = Client::handshaken(addr).await;
        c.register().await;
        c
    }

    /// `register("1", False)` on a handshaken connection; returns the last
    /// tid the server reports.
    pub async fn register(&mut self) -> Value {
        let last = self
            .call("register", vec![s("1"), Value::Bool(false)])
            .await
            .expect("register");
        assert_eq!(last.as_bytes().map(<[u8]>::len), Some(8));
        last
    }

    // ---- writing ----

    /// Writes raw bytes; panics if the server already closed.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("the server is still reading");
    }

    /// Writes raw bytes; `false` if the server already closed.
    pub async fn try_write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Writes one frame; panics if the server already closed.
    pub async fn send_frame(&mut self, payload: &[u8]) {
        self.write(&framed(payload)).await;
    }

    /// Writes one frame; `false` if the server already closed.
    pub async fn try_send_frame(&mut self, payload: &[u8]) -> bool {
        self.try_write(&framed(payload)).await
    }

    // ---- reading ----

    /// The next frame within `limit`: `Ok(None)` once the server closed,
    /// `Err` if nothing came in time.
    pub async fn frame_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Bytes>, tokio::time::error::Elapsed> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(f) = zeotemp::protocol::frame::parse(&mut self.buf, usize::MAX).unwrap()
                {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// The next frame (within [`READ_TIMEOUT`]), or None once the server
    /// closed the connection.
    pub async fn frame(&mut self) -> Option<Bytes> {
        self.frame_within(READ_TIMEOUT)
            .await
            .expect("the server answered or closed in time")
    }

    /// The next message (reply or push), or None once the server closed.
    pub async fn message(&mut self) -> Option<Message> {
        let f = self.frame().await?;
        Some(envelope::decode_message(&f, &DecodeLimits::default()).unwrap())
    }

    // ---- requests and replies ----

    /// Sends a request with tuple arguments and the next msgid; returns
    /// the msgid (to wait for a sync call's reply with
    /// [`Client::reply_to`]).
    pub async fn send(&mut self, oneway: bool, method: &str, args: Vec<Value>) -> Value {
        self.send_with(oneway, method, &t(args)).await
    }

    /// Like [`Client::send`], with `args` any value, not only a tuple.
    pub async fn send_with(&mut self, oneway: bool, method: &str, args: &Value) -> Value {
        let id = Value::Int(self.next);
        self.next += 1;
        self.write(&request_frame(&id, oneway, method, args)).await;
        id
    }

    /// A sync call with tuple arguments; waits for its reply.
    pub async fn call(&mut self, method: &str, args: Vec<Value>) -> Reply {
        self.call_with(method, &t(args)).await
    }

    /// A sync call whose `args` may be anything, not only a tuple.
    pub async fn call_with(&mut self, method: &str, args: &Value) -> Reply {
        let id = self.send_with(false, method, args).await;
        self.reply_to(&id).await
    }

    /// The next reply and its msgid (pushes skipped), or None once the
    /// server closed.
    pub async fn next_reply(&mut self) -> Option<(Value, Reply)> {
        loop {
            let Some((msgid, reply)) = self.message().await?.into_reply() else {
                continue; // a push
            };
            if let Err((class, state)) = &reply {
                assert!(!class.is_empty(), "malformed error reply {state:?}");
            }
            return Some((msgid, reply));
        }
    }

    /// Waits for the reply to `id`, which must be the next reply (pushes,
    /// such as invalidations, are skipped).
    pub async fn reply_to(&mut self, id: &Value) -> Reply {
        let (got, reply) = self
            .next_reply()
            .await
            .expect("connection closed while waiting for a reply");
        assert_eq!(&got, id, "replies come in request order");
        reply
    }

    /// A sync call that must fail with `class`; returns the error message.
    pub async fn expect_err(&mut self, method: &str, args: Vec<Value>, class: &str) -> String {
        match self.call(method, args).await {
            Err((c, state)) => {
                assert_eq!(c, class, "{method}: {state:?}");
                err_text(&state)
            }
            Ok(v) => panic!("{method}: expected {class}, got the reply {v:?}"),
        }
    }

    /// `ping()` answers None.
    pub async fn ping_ok(&mut self) {
        assert_eq!(self.call("ping", vec![]).await, Ok(Value::None));
    }

    // ---- the connection's fate ----

    /// The server closes this connection (each frame within
    /// `READ_TIMEOUT`) and sends no reply first; pushes (invalidations of
    /// others' commits) may come.
    pub async fn expect_closed(&mut self, what: &str) {
        while let Some(m) = self.message().await {
            assert_ne!(
                m.method, ".reply",
                "{what}: expected a close, got a reply {:?}",
                m.args
            );
        }
    }

    /// After hostile input: `true` if the connection still answers a `ping`
    /// (replies to the hostile input before it are allowed), `false` if the
    /// server closed it.
    pub async fn still_open(&mut self) -> bool {
        const PROBE: i64 = 999_999;
        let ping = request_frame(&Value::Int(PROBE), false, "ping", &t(vec![]));
        self.try_write(&ping).await;
        loop {
            match self.next_reply().await {
                None => return false,
                Some((id, reply)) if id == Value::Int(PROBE) => {
                    assert_eq!(reply, Ok(Value::None));
                    return true;
                }
                Some(_) => {}
            }
        }
    }

    /// No reply arrives within `d` (pushes are fine).
    pub async fn no_reply_within(&mut self, d: Duration, what: &str) {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.frame_within(left).await {
                Err(_) => return,
                Ok(None) => panic!("{what}: connection closed"),
                Ok(Some(f)) => {
                    let m = envelope::decode_message(&f, &DecodeLimits::default()).unwrap();
                    assert_ne!(m.method, ".reply", "{what}: unexpected reply {:?}", m.args);
                }
            }
        }
    }

    // ---- commits ----

    /// A new oid, from `new_oids()` with the server's default count (as
    /// the stock client asks).
    pub async fn new_oid(&mut self) -> Value {
        let Ok(Value::List(oids)) = self.call("new_oids", vec![]).await else {
            panic!("new_oids gives a list")
        };
        oids[0].clone()
    }

    /// One-way `tpc_begin(txn, user, description, extension)`.
    pub async fn begin(&mut self, txn: i64) {
        let args = vec![Value::Int(txn), b(b""), b(b""), Value::Dict(vec![])];
        self.send(true, "tpc_begin", args).await;
    }

    /// One-way `storea(oid, serial, data, txn)`; `serial` is `b(&Z64)` for
    /// a new object.
    pub async fn store(&mut self, oid: &Value, serial: &Value, data: &[u8], txn: i64) {
        let args = vec![oid.clone(), serial.clone(), b(data), Value::Int(txn)];
        self.send(true, "storea", args).await;
    }

    /// Begins, stores a new object and votes: holds the commit lock now.
    pub async fn hold_lock(&mut self, txn: i64) {
        let o = self.new_oid().await;
        self.begin(txn).await;
        self.store(&o, &b(&Z64), b"hostile", txn).await;
        assert_eq!(
            self.call("vote", vec![Value::Int(txn)]).await,
            Ok(Value::List(vec![]))
        );
    }

    /// A whole commit of `data` as a new object: (oid, tid).
    pub async fn commit_new(&mut self, data: &[u8], txn: i64) -> (Value, Value) {
        let o = self.new_oid().await;
        let tid = self.commit_new_at(&o, data, txn).await;
        (o, tid)
    }

    /// A whole commit of `data` as the new object `o`: its tid.
    pub async fn commit_new_at(&mut self, o: &Value, data: &[u8], txn: i64) -> Value {
        self.begin(txn).await;
        self.store(o, &b(&Z64), data, txn).await;
        assert_eq!(
            self.call("vote", vec![Value::Int(txn)]).await,
            Ok(Value::List(vec![]))
        );
        let tid = self
            .call("tpc_finish", vec![Value::Int(txn)])
            .await
            .expect("tpc_finish");
        assert_eq!(tid.as_bytes().map(<[u8]>::len), Some(8));
        tid
    }
}

// ---- the bystander -----------------------------------------------------

/// A well-behaved client on its own connection, registered on storage `1`.
pub struct Bystander {
    pub c: Client,
    /// The id of the bystander's last transaction (each round takes the
    /// next one).
    pub txn: i64,
}

impl Bystander {
    /// Connects, registers, and does one round ([`Bystander::works`]).
    pub async fn start(addr: SocketAddr) -> Bystander {
        let mut by = Bystander {
            c: Client::registered(addr).await,
            txn: 1000,
        };
        by.works().await;
        by
    }

    /// Loads the root, commits a new object and reads it back, all within
    /// [`PROMPT`].
    pub async fn works(&mut self) {
        self.txn += 1;
        let txn = self.txn;
        let c = &mut self.c;
        tokio::time::timeout(PROMPT, async move {
            let root = c.call("loadBefore", vec![oid(0), b(&MAXTID)]).await;
            assert!(
                matches!(root, Ok(Value::Tuple(ref r)) if r.len() == 3),
                "the root loads: {root:?}"
            );
            let data = format!("bystander {txn}").into_bytes();
            let (o, tid) = c.commit_new(&data, txn).await;
            let Ok(Value::Tuple(rec)) = c.call("loadBefore", vec![o, b(&MAXTID)]).await else {
                panic!("the new object loads")
            };
            assert_eq!((&rec[0], &rec[1]), (&b(&data), &tid));
        })
        .await
        .expect("the bystander loads and commits promptly");
    }

    /// Starts a commit and sends its vote; the reply is left unread.
    /// Returns the vote's msgid and the transaction.
    pub async fn start_vote(&mut self) -> (Value, i64) {
        self.txn += 1;
        let txn = self.txn;
        let o = self.c.new_oid().await;
        self.c.begin(txn).await;
        self.c.store(&o, &b(&Z64), b"bystander waits", txn).await;
        (self.c.send(false, "vote", vec![Value::Int(txn)]).await, txn)
    }

    /// The vote sent by [`Bystander::start_vote`] succeeds within
    /// [`PROMPT`]; finishes the transaction.
    pub async fn finish_vote(&mut self, vote: &Value, txn: i64) {
        let c = &mut self.c;
        tokio::time::timeout(PROMPT, async move {
            assert_eq!(c.reply_to(vote).await, Ok(Value::List(vec![])));
            let tid = c.call("tpc_finish", vec![Value::Int(txn)]).await.unwrap();
            assert_eq!(tid.as_bytes().map(<[u8]>::len), Some(8));
        })
        .await
        .expect("the bystander's vote got the commit lock promptly");
    }
}
