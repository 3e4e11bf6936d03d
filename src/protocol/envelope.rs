//! ZEO's message envelope: every frame after the handshake is one pickled
//! (`Z5`) or msgpack (`M5`) 4-tuple `(msgid, flags, name, args)` (protocol
//! doc §3.1, §3.3).
//!
//! * Requests: `flags` is `False` (call) or `True` (one-way); `name` is the
//!   method; `args` is a tuple.
//! * Replies: `(msgid, 0, ".reply", result)`; error replies
//!   `(msgid, 2, ".reply", (class_name, state))` (§4.2); server pushes
//!   `(0, True, method, args)` (§4.3).
//!
//! Every reply and push encoder returns a complete frame (4-byte big-endian
//! length, then the payload) whose payload is byte-identical to what the
//! stock Python server writes: `PROTO 3`, `MARK`, the four items, `TUPLE`,
//! `STOP`. The msgid is echoed as the request carried it (a py2 client's
//! `PyStr` stays `SHORT_BINSTRING`), and text follows the connection's
//! [`Dialect`] (§12). The client's side, for the load generator and the
//! tests: [`encode_request`] writes requests as stock clients do, and
//! [`Message::into_reply`] tells a reply from a push.
//!
//! Client generations, told apart by how a request is pickled
//! ([`Message::dialect`]; the session keeps the first request's):
//!
//! * a pickle that does not begin with `PROTO` was written with protocol 0
//!   or 1: ZEO 5.0/5.1 on Python 2 (Plone 5.1), whose `cPickle` cannot read
//!   protocol 3 ⇒ [`Dialect::Py2Protocol1`], everything sent back in
//!   protocol-1 opcodes;
//! * else (`PROTO 2` or higher), a method name that is a py2 `str`
//!   (`SHORT_BINSTRING`/`BINSTRING`): ZEO 5.2–5.4 on Python 2 (Plone 5.2)
//!   ⇒ [`Dialect::Py2`];
//! * else (`BINUNICODE`): Python 3 ⇒ [`Dialect::Py3`].
//!
//! With [`Encoding::Msgpack`] the same frames are a msgpack array of four
//! written as the stock server's `packb(..., use_bin_type=True)` writes them
//! ([`crate::protocol::msgpack`]).
//!
//! This module does no I/O and knows nothing of methods or storages.

use bytes::{BufMut, Bytes, BytesMut};
use std::borrow::Cow;

use crate::protocol::frame;
use crate::protocol::ids::{Oid, Tid};
use crate::protocol::msgpack::{self, MsgpackError};
use crate::protocol::pickle::opcodes as op;
use crate::protocol::pickle::{self, Dialect, PickleError};
use crate::protocol::value::{DecodeLimits, Value};

/// How a connection's frames are encoded, chosen by the client's handshake
/// answer (`Z5` or `M5`). A [`Dialect`] converts into the pickle encoding,
/// so the encoders take either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `Z5`: pickle protocol 3, in the peer's dialect.
    Pickle(Dialect),
    /// `M5`: msgpack.
    Msgpack,
}

impl From<Dialect> for Encoding {
    fn from(d: Dialect) -> Encoding {
        Encoding::Pickle(d)
    }
}

/// One decoded request (or, from the client's side, reply or push).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Echoed verbatim in the reply: an int, or a `(oid, tid)` tuple for
    /// `loadBefore`; `-1` marks a client heartbeat.
    pub msgid: Value,
    /// The flags were truthy: no reply is expected.
    pub oneway: bool,
    /// The method name (or `.reply`), as text: one of [`KNOWN_NAMES`]
    /// without an allocation, or a copy of what the client sent.
    pub method: Cow<'static, str>,
    /// The arguments as sent; normally a tuple (the session checks).
    pub args: Value,
    /// `Py2Protocol1` if the pickle has no `PROTO` (protocol 0/1, as ZEO
    /// 5.0/5.1 on Python 2 writes), else `Py2` if the method name was a
    /// py2 `str` (`SHORT_BINSTRING` / `BINSTRING`, as ZEO ≥ 5.2 on Python 2
    /// writes it), else `Py3` (see the module docs).
    pub dialect: Dialect,
}

/// A frame that is not a ZEO message. ZEO closes the connection for these
/// ("Can't deserialize message"), so they are connection-fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarshalError {
    #[error("can't deserialize message: {0}")]
    Pickle(#[from] PickleError),
    #[error("can't deserialize message: {0}")]
    Msgpack(#[from] MsgpackError),
    #[error("message is not a 4-tuple but a {0}")]
    NotAMessage(String),
    #[error("method name is a {0}, not text")]
    BadMethodName(&'static str),
}

/// Decodes one frame payload (without the length prefix).
pub fn decode_message(payload: &[u8], limits: &DecodeLimits) -> Result<Message, MarshalError> {
    let protocol1 = is_protocol1(payload);
    // Every stock client's message: its parts straight off the decoder's
    // stack, its name not copied ([`pickle::decode_envelope`]);
    // `into_message` for anything else, which also gives the errors.
    if let Some(e) = pickle::decode_envelope(payload, limits) {
        return Ok(Message {
            msgid: e.msgid,
            oneway: e.flags.is_truthy(),
            method: method_name(e.name),
            args: e.args,
            dialect: dialect_of(protocol1, e.name_is_pystr),
        });
    }
    into_message(pickle::decode(payload, limits)?, protocol1)
}

/// [`decode_message`] without any fast path (the full pickle decoder,
/// then the 4-tuple taken apart), for the tests that check both agree.
#[doc(hidden)]
pub fn decode_message_full(payload: &[u8], limits: &DecodeLimits) -> Result<Message, MarshalError> {
    let protocol1 = is_protocol1(payload);
    into_message(pickle::decode_full(payload, limits)?, protocol1)
}

/// A pickle without `PROTO` (its first opcode) was written with protocol 0
/// or 1; every pickler writing protocol 2 or more starts with `PROTO`.
fn is_protocol1(payload: &[u8]) -> bool {
    payload.first() != Some(&op::PROTO)
}

/// Like [`decode_message`], but bytes values (e.g. `storea` records) are
/// zero-copy slices of `payload`.
pub fn decode_message_bytes(
    payload: &Bytes,
    limits: &DecodeLimits,
) -> Result<Message, MarshalError> {
    let protocol1 = is_protocol1(payload);
    into_message(pickle::decode_bytes(payload, limits)?, protocol1)
}

/// The names of ZEO's methods and pushes, most used first: a message
/// naming one of them carries it as a `&'static str`
/// ([`Message::method`]).
pub const KNOWN_NAMES: &[&str] = &[
    "loadBefore",
    "lastTransaction",
    "storea",
    "tpc_begin",
    "vote",
    "tpc_finish",
    "tpc_abort",
    "ping",
    ".reply",
    "invalidateTransaction",
    "info",
    "new_oids",
    "getInvalidations",
    "loadSerial",
    "checkCurrentSerialInTransaction",
    "deleteObject",
    "register",
    "get_info",
    "getTid",
    "history",
    "pack",
    "server_status",
    "set_client_label",
    "undoLog",
    "undoInfo",
    "iterator_gc",
    "receiveBlobStart",
    "receiveBlobChunk",
    "receiveBlobStop",
    "serialnos",
];

/// `name` as a message's method: the static copy of a known name, else a
/// copy.
fn method_name(name: &str) -> Cow<'static, str> {
    match KNOWN_NAMES.iter().find(|k| **k == name) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(name.to_owned()),
    }
}

/// The dialect of a message: [`Dialect::Py2Protocol1`] without `PROTO`,
/// else by the name's type (see [`Message::dialect`]).
fn dialect_of(protocol1: bool, name_is_pystr: bool) -> Dialect {
    // Only Python 2 ZEO clients pickle with protocol 1; whatever the name's
    // opcode, such a peer reads protocol 1 at most.
    match (protocol1, name_is_pystr) {
        (true, _) => Dialect::Py2Protocol1,
        (false, true) => Dialect::Py2,
        (false, false) => Dialect::Py3,
    }
}

/// Decodes one msgpack (`M5`) frame payload. Arrays decode to tuples;
/// the method name must be a msgpack `str` (a Python-2 client over msgpack
/// sends it as `bin`, which the stock server refuses too).
pub fn decode_msgpack_message(
    payload: &[u8],
    limits: &DecodeLimits,
) -> Result<Message, MarshalError> {
    into_message(msgpack::decode(payload, limits)?, false)
}

fn into_message(value: Value, protocol1: bool) -> Result<Message, MarshalError> {
    let items = match value {
        Value::Tuple(items) if items.len() == 4 => items,
        Value::Tuple(items) => {
            return Err(MarshalError::NotAMessage(format!(
                "tuple of {} items",
                items.len()
            )));
        }
        other => return Err(MarshalError::NotAMessage(other.type_name().to_owned())),
    };
    let [msgid, flags, name, args]: [Value; 4] = items
        .try_into()
        .map_err(|_| MarshalError::NotAMessage("tuple".to_owned()))?;
    let (method, pystr) = match &name {
        Value::Str(s) => (method_name(s), false),
        Value::PyStr(b) => match std::str::from_utf8(b) {
            Ok(s) => (method_name(s), true),
            Err(_) => return Err(MarshalError::BadMethodName("non-UTF-8 bytes")),
        },
        other => return Err(MarshalError::BadMethodName(other.type_name())),
    };
    let dialect = dialect_of(protocol1, pystr);
    Ok(Message {
        msgid,
        oneway: flags.is_truthy(),
        method,
        args,
        dialect,
    })
}

/// A normal reply: `(msgid, 0, ".reply", result)`.
pub fn encode_reply(encoding: impl Into<Encoding>, msgid: &Value, result: &Value) -> Bytes {
    let hint = pickle::size_hint(result);
    match encoding.into() {
        Encoding::Pickle(dialect) => encode_reply_with(dialect, msgid, hint, |out| {
            pickle::encode_into(out, result, dialect)
        }),
        Encoding::Msgpack => {
            encode_msgpack_reply_with(msgid, hint, |out| msgpack::encode_into(out, result))
        }
    }
}

/// An exception reply: `(msgid, 2, ".reply", (class_name, state))`, where
/// `state` is the exception's `__dict__` if non-empty, else its args tuple.
pub fn encode_error(
    encoding: impl Into<Encoding>,
    msgid: &Value,
    class_name: &str,
    state: &Value,
) -> Bytes {
    // Built by hand rather than as a Value so `state` is not cloned.
    let hint = pickle::size_hint(msgid) + class_name.len() + pickle::size_hint(state);
    let dialect = match encoding.into() {
        Encoding::Pickle(dialect) => dialect,
        Encoding::Msgpack => {
            return encode_msgpack_with(hint, |out| {
                msgpack::encode_into(out, msgid);
                msgpack::put_int(out, 2);
                msgpack::put_str(out, ".reply");
                msgpack::put_array_header(out, 2);
                msgpack::put_str(out, class_name);
                msgpack::encode_into(out, state);
            });
        }
    };
    encode_with(dialect, hint, |out| {
        pickle::encode_into(out, msgid, dialect);
        pickle::encode_into(out, &Value::Int(2), dialect);
        pickle::encode_str_into(out, ".reply", dialect);
        pickle::open_tuple(out, 2, dialect);
        pickle::encode_str_into(out, class_name, dialect);
        pickle::encode_into(out, state, dialect);
        pickle::close_tuple(out, 2, dialect);
    })
}

/// A normal reply whose result is written by `result` straight into the
/// frame (e.g. a loaded record, without copying it into a [`Value`] first);
/// `hint` is about the bytes `result` writes.
pub fn encode_reply_with<'a>(
    dialect: Dialect,
    msgid: impl Into<MsgId<'a>>,
    hint: usize,
    result: impl FnOnce(&mut BytesMut),
) -> Bytes {
    encode_frame(
        dialect,
        msgid.into(),
        &Value::Int(0),
        ".reply",
        hint,
        result,
    )
}

/// A reply's message id: a value, or its pickle as the client sent it (the
/// hot lane echoes those bytes, [`crate::protocol::hot`]).
#[derive(Debug, Clone, Copy)]
pub enum MsgId<'a> {
    Value(&'a Value),
    Pickled(&'a [u8]),
}

impl<'a> From<&'a Value> for MsgId<'a> {
    fn from(v: &'a Value) -> MsgId<'a> {
        MsgId::Value(v)
    }
}

/// A one-way call from the server (`invalidateTransaction`, `info`, ...):
/// `(0, True, method, args)`.
pub fn encode_call(encoding: impl Into<Encoding>, method: &str, args: &Value) -> Bytes {
    let hint = pickle::size_hint(args);
    let dialect = match encoding.into() {
        Encoding::Pickle(dialect) => dialect,
        Encoding::Msgpack => {
            return encode_msgpack_with(hint + method.len(), |out| {
                msgpack::put_int(out, 0);
                out.put_u8(0xc3); // True
                msgpack::put_str(out, method);
                msgpack::encode_into(out, args);
            });
        }
    };
    encode_frame(
        dialect,
        MsgId::Value(&Value::Int(0)),
        &Value::Bool(true),
        method,
        hint,
        |out| pickle::encode_into(out, args, dialect),
    )
}

/// `(msgid, flags, name, last)`, with `last` written by `write_last`
/// (about `hint` bytes).
fn encode_frame(
    dialect: Dialect,
    msgid: MsgId<'_>,
    flags: &Value,
    name: &str,
    hint: usize,
    write_last: impl FnOnce(&mut BytesMut),
) -> Bytes {
    let id_size = match msgid {
        MsgId::Value(v) => pickle::size_hint(v),
        MsgId::Pickled(b) => b.len(),
    };
    let hint = id_size + name.len() + hint;
    encode_with(dialect, hint, |out| {
        match msgid {
            MsgId::Value(v) => pickle::encode_into(out, v, dialect),
            MsgId::Pickled(b) => out.put_slice(b),
        }
        pickle::encode_into(out, flags, dialect);
        pickle::encode_str_into(out, name, dialect);
        write_last(out);
    })
}

/// A frame of `PROTO 3 MARK` (no `PROTO` at protocol 1), the items written
/// by `items`, `TUPLE STOP`. `hint` is about what the items take, so the
/// buffer is allocated once.
fn encode_with(dialect: Dialect, hint: usize, items: impl FnOnce(&mut BytesMut)) -> Bytes {
    framed(32 + hint, |out| {
        frame::put(out, |out| {
            pickle::put_proto(out, dialect);
            out.put_u8(op::MARK);
            items(out);
            out.put_slice(&[op::TUPLE, op::STOP]);
        })
    })
}

/// Frames up to this size (by their hint) are written into the thread's
/// scratch buffer and copied out at their exact size; bigger ones (large
/// records) into a buffer of their own, without the copy.
const SCRATCH_MAX: usize = 16 * 1024;

thread_local! {
    /// [`framed`]'s scratch buffer, reused frame after frame.
    static SCRATCH: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// A frame written by `write` (about `hint` bytes). A small frame (every
/// reply but a large record's) costs one allocation of exactly its size:
/// it is written into the thread's scratch buffer and copied out. A buffer
/// of its own would be sized by the hint, so turning it into `Bytes` would
/// allocate a second time for the shared header (`Bytes` from a vector
/// with spare room), and each of the two is freed again once the frame is
/// written.
fn framed(hint: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut write = Some(write);
    if hint <= SCRATCH_MAX
        && let Some(frame) = SCRATCH.with(|s| {
            let mut out = s.try_borrow_mut().ok()?;
            out.clear();
            (write.take()?)(&mut out);
            let frame = Bytes::copy_from_slice(&out);
            // A frame far past its hint leaves no big buffer behind.
            if out.capacity() > 2 * SCRATCH_MAX {
                *out = BytesMut::new();
            }
            Some(frame)
        })
    {
        return frame;
    }
    let mut out = BytesMut::with_capacity(hint);
    if let Some(write) = write {
        write(&mut out);
    }
    out.freeze()
}

/// A normal msgpack reply whose result is written by `result` (msgpack)
/// straight into the frame; the msgpack twin of [`encode_reply_with`].
pub fn encode_msgpack_reply_with(
    msgid: &Value,
    hint: usize,
    result: impl FnOnce(&mut BytesMut),
) -> Bytes {
    encode_msgpack_with(pickle::size_hint(msgid) + hint, |out| {
        msgpack::encode_into(out, msgid);
        msgpack::put_int(out, 0);
        msgpack::put_str(out, ".reply");
        result(out);
    })
}

/// A frame of the msgpack array header for four items and the items
/// written by `items`.
fn encode_msgpack_with(hint: usize, items: impl FnOnce(&mut BytesMut)) -> Bytes {
    framed(16 + hint, |out| {
        frame::put(out, |out| {
            msgpack::put_array_header(out, 4);
            items(out);
        })
    })
}

/// An oid as ZEO sends it: an 8-byte string.
pub fn oid_value(oid: Oid) -> Value {
    Value::Bytes(Bytes::copy_from_slice(&oid.to_bytes()))
}

/// A tid as ZEO sends it: an 8-byte string.
pub fn tid_value(tid: Tid) -> Value {
    Value::Bytes(Bytes::copy_from_slice(&tid.to_bytes()))
}

// ---- the client's direction: requests ----------------------------------
//
// zeotemp's server never sends a request; the load generator
// (`zeotemp-bench`) and the integration tests do, as stock clients write
// them.

/// A request frame `(msgid, oneway, method, args)` as a stock client
/// writes it: [`Encoding::Pickle`] as ZEO's client pickles it in that
/// dialect (`PROTO 3` unless [`Dialect::Py2Protocol1`], `MARK`, the msgid,
/// the flag as a bool, the method name as text of the dialect, the args,
/// `TUPLE`, `STOP`), [`Encoding::Msgpack`] as `packb` writes the 4-tuple.
/// `args` is normally a tuple; any value is written as given.
pub fn encode_request(
    encoding: impl Into<Encoding>,
    msgid: &Value,
    oneway: bool,
    method: &str,
    args: &Value,
) -> Bytes {
    let hint = pickle::size_hint(msgid) + method.len() + pickle::size_hint(args);
    let mut out = BytesMut::with_capacity(32 + hint);
    put_request(&mut out, encoding, msgid, oneway, method, args);
    out.freeze()
}

/// Appends the request frame of [`encode_request`] to `out` (a reused
/// write buffer: no allocation once it has grown).
pub fn put_request(
    out: &mut BytesMut,
    encoding: impl Into<Encoding>,
    msgid: &Value,
    oneway: bool,
    method: &str,
    args: &Value,
) {
    use crate::protocol::pickle::opcodes as op;
    match encoding.into() {
        Encoding::Pickle(dialect) => frame::put(out, |out| {
            pickle::put_proto(out, dialect);
            out.put_u8(op::MARK);
            pickle::encode_into(out, msgid, dialect);
            pickle::encode_into(out, &Value::Bool(oneway), dialect);
            pickle::encode_str_into(out, method, dialect);
            pickle::encode_into(out, args, dialect);
            out.put_slice(&[op::TUPLE, op::STOP]);
        }),
        Encoding::Msgpack => frame::put(out, |out| {
            msgpack::put_array_header(out, 4);
            msgpack::encode_into(out, msgid);
            msgpack::encode_into(out, &Value::Bool(oneway));
            msgpack::put_str(out, method);
            msgpack::encode_into(out, args);
        }),
    }
}

/// From the client's side, a reply's outcome: the result, or an error
/// reply's `(class_name, state)`.
pub type Reply = Result<Value, (String, Value)>;

impl Message {
    /// From the client's side: `Some((msgid, outcome))` for a reply
    /// (`.reply`; truthy flags mark an error reply, §4.2), `None` for a
    /// server push (invalidations, `info`). An error reply that is not a
    /// `(class_name, state)` pair with a text class name gives the class
    /// name `""` and the whole value as its state.
    pub fn into_reply(self) -> Option<(Value, Reply)> {
        if self.method != ".reply" {
            return None;
        }
        let outcome = match (self.oneway, self.args) {
            (false, result) => Ok(result),
            (true, Value::Tuple(mut pair)) if pair.len() == 2 && pair[0].as_text().is_some() => {
                let state = pair.pop().unwrap_or(Value::None);
                let class = pair.pop().and_then(|c| c.as_text().map(|c| c.into_owned()));
                Err((class.unwrap_or_default(), state))
            }
            (true, other) => Err((String::new(), other)),
        };
        Some((self.msgid, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testhex::{hex, unhex};

    fn decode(h: &str) -> Result<Message, MarshalError> {
        decode_message(&unhex(h), &DecodeLimits::default())
    }

    /// The payload of a frame, after checking its length prefix.
    fn payload(frame: &Bytes) -> String {
        let (prefix, rest) = frame.split_at(4);
        assert_eq!(
            u32::from_be_bytes(prefix.try_into().unwrap()) as usize,
            rest.len()
        );
        hex(rest)
    }

    fn oid(n: u8) -> Value {
        Value::bytes(vec![0, 0, 0, 0, 0, 0, 0, n])
    }

    #[test]
    fn py3_request() {
        // 01 seq 7: register('1', 0)
        let m = decode("8003284b0189580800000072656769737465725801000000314b0086742e").unwrap();
        assert_eq!(
            m,
            Message {
                msgid: Value::Int(1),
                oneway: false,
                method: "register".into(),
                args: Value::Tuple(vec![Value::str("1"), Value::Int(0)]),
                dialect: Dialect::Py3,
            }
        );
    }

    #[test]
    fn py2_request() {
        // py2-01 seq 8: register('1', 0) from a Python-2 client
        let m = decode("8003284b0189550872656769737465725501314b0086742e").unwrap();
        assert_eq!(m.method, "register");
        assert_eq!(m.dialect, Dialect::Py2);
        assert_eq!(
            m.args,
            Value::Tuple(vec![Value::PyStr(Bytes::from_static(b"1")), Value::Int(0)])
        );
        // py2-01 seq 12: loadBefore with a (str, str) msgid tuple
        let m = decode(
            "80032855080000000000000000550800000000000000018689550a6c6f61644265666f72655508\
             0000000000000000550800000000000000018 6742e"
                .replace(' ', "")
                .as_str(),
        )
        .unwrap();
        assert_eq!(m.method, "loadBefore");
        assert_eq!(m.dialect, Dialect::Py2);
        let Value::Tuple(id) = &m.msgid else {
            panic!("{:?}", m.msgid)
        };
        assert!(matches!(id.as_slice(), [Value::PyStr(_), Value::PyStr(_)]));
        // The reply echoes the msgid verbatim as py2 str.
        let reply = encode_error(
            Dialect::Py2,
            &m.msgid,
            "ZODB.POSException.POSKeyError",
            &Value::Tuple(vec![Value::bytes(vec![0; 8])]),
        );
        // py2-01 seq 13, written by the Python-2 server
        assert_eq!(
            payload(&reply),
            "8003285508000000000000000055080000000000000001864b0255062e7265706c79551d5a4f44\
             422e504f53457863657074696f6e2e504f534b65794572726f72550800000000000000008586742e"
                .replace(' ', "")
        );
    }

    /// ZEO 5.1.2 on Python 2 pickles with protocol 1 (captured between a
    /// ZEO 5.1.2 client and a ZEO 5.1.2 server, both on Python 2.7).
    #[test]
    fn protocol1_requests_and_replies() {
        // register('1', False): no PROTO, flags as INT 00, MARK ... TUPLE
        let m = decode("284b014930300a55087265676973746572285501314b0074742e").unwrap();
        assert_eq!(m.method, "register");
        assert_eq!(m.dialect, Dialect::Py2Protocol1);
        assert!(!m.oneway);
        assert_eq!(
            m.args,
            Value::Tuple(vec![Value::PyStr(Bytes::from_static(b"1")), Value::Int(0)])
        );
        // Whatever the method name's opcode, no PROTO means protocol 1.
        let m = decode("284b014930300a580400000070696e6729742e").unwrap();
        assert_eq!(
            (m.method.as_ref(), m.dialect),
            ("ping", Dialect::Py2Protocol1)
        );
        // A PROTO 2 pickle (any PROTO) is not protocol 1: the name decides.
        let m = decode("8002284b01895504706e6f6729742e").unwrap();
        assert_eq!((m.method.as_ref(), m.dialect), ("pnog", Dialect::Py2));
        // one-way: INT 01
        let m = decode("284b004930310a5504696e666f29742e").unwrap();
        assert!(m.oneway);

        let p1 = Dialect::Py2Protocol1;
        // The replies the ZEO 5.1.2 server wrote, byte for byte: register's
        assert_eq!(
            payload(&encode_reply(p1, &Value::Int(1), &oid(0))),
            "284b014b0055062e7265706c7955080000000000000000742e"
        );
        // vote's empty list
        assert_eq!(
            payload(&encode_reply(p1, &Value::Int(3), &Value::List(vec![]))),
            "284b034b0055062e7265706c795d742e"
        );
        // POSKeyError for a loadBefore whose msgid is (oid, tid)
        let msgid = Value::Tuple(vec![
            Value::PyStr(Bytes::from(vec![0; 8])),
            Value::PyStr(Bytes::from(vec![0, 0, 0, 0, 0, 0, 0, 1])),
        ]);
        assert_eq!(
            payload(&encode_error(
                p1,
                &msgid,
                "ZODB.POSException.POSKeyError",
                &Value::Tuple(vec![oid(0)])
            )),
            "28285508000000000000000055080000000000000001744b0255062e7265706c7928551d5a4f44\
             422e504f53457863657074696f6e2e504f534b65794572726f7228550800000000000000007474742e"
                .replace(' ', "")
        );
        // the info push
        let info = Value::Tuple(vec![Value::Dict(vec![
            (Value::str("length"), Value::Int(1)),
            (Value::str("size"), Value::Int(211)),
        ])]);
        assert_eq!(
            payload(&encode_call(p1, "info", &info)),
            "284b004930310a5504696e666f287d2855066c656e6774684b01550473697a654bd37574742e"
        );
        // an invalidation (tid, [oid]): the list as EMPTY_LIST ... APPEND
        let args = Value::Tuple(vec![
            Value::bytes(unhex("040d45eb32fded33")),
            Value::List(vec![oid(1)]),
        ]);
        assert_eq!(
            payload(&encode_call(p1, "invalidateTransaction", &args)),
            "284b004930310a5515696e76616c69646174655472616e73616374696f6e285508040d45eb32fd\
             ed335d55080000000000000001617474 2e"
                .replace(' ', "")
        );
    }

    #[test]
    fn heartbeat() {
        // §3.1: (-1, 0, ".reply", None), flags as the integer 0
        let m = decode("8003284affffffff4b0058060000002e7265706c794e742e").unwrap();
        assert_eq!(m.msgid, Value::Int(-1));
        assert!(!m.oneway);
        assert_eq!(m.method, ".reply");
        assert_eq!(m.args, Value::None);
        // and we would write it identically
        assert_eq!(
            payload(&encode_reply(Dialect::Py3, &Value::Int(-1), &Value::None)),
            "8003284affffffff4b0058060000002e7265706c794e742e"
        );
    }

    #[test]
    fn oneway_flags() {
        let flags = |f: &str| decode(&format!("8003284b01{f}5801000000784e742e")).map(|m| m.oneway);
        assert_eq!(flags("88"), Ok(true));
        assert_eq!(flags("89"), Ok(false));
        assert_eq!(flags("4b00"), Ok(false));
        assert_eq!(flags("4b01"), Ok(true));
        assert_eq!(flags("4e"), Ok(false));
    }

    #[test]
    fn not_messages() {
        // 18 seq 39: a bare int
        assert!(matches!(decode("80034b012e"), Err(MarshalError::NotAMessage(t)) if t == "int"));
        // a 3-tuple
        assert!(matches!(
            decode("80034b014b024b03872e"),
            Err(MarshalError::NotAMessage(t)) if t.contains("3 items")
        ));
        // method name as bytes, as an int, as non-UTF-8 py2 str
        assert_eq!(
            decode("8003284b01894301784e742e"),
            Err(MarshalError::BadMethodName("bytes"))
        );
        assert_eq!(
            decode("8003284b01894b054e742e"),
            Err(MarshalError::BadMethodName("int"))
        );
        assert_eq!(
            decode("8003284b01895501ff4e742e"),
            Err(MarshalError::BadMethodName("non-UTF-8 bytes"))
        );
        // undecodable pickle
        assert!(matches!(
            decode("8003284b01"),
            Err(MarshalError::Pickle(PickleError::MissingStop))
        ));
        let e = decode("800328ff").unwrap_err();
        assert_eq!(
            e.to_string(),
            "can't deserialize message: unsupported opcode 0xff at offset 3"
        );
    }

    #[test]
    fn args_are_returned_as_sent() {
        // the session, not this layer, insists on a tuple
        let m = decode("8003284b0189580400000070696e674b05742e").unwrap();
        assert_eq!(m.method, "ping");
        assert_eq!(m.args, Value::Int(5));
        // globals pass through for the session to refuse
        let m = decode("8003284b0189580100000078636275696c74696e730a6576616c0a85742e").unwrap();
        assert_eq!(m.args.forbidden_global().as_deref(), Some("builtins.eval"));
    }

    /// The request fast path gives what the general path gives (the same
    /// message, or an error where it fails) on random requests: names of
    /// both kinds in and out of the name's place, nested tuples around
    /// them, the opcodes the fast path knows and some it does not.
    #[test]
    fn request_fast_path_agrees_with_the_general_path() {
        let mut rng = crate::rng::XorShift64::new(16);
        let limits = DecodeLimits {
            max_depth: 4,
            max_items: 12,
        };
        let own: &[&[u8]] = &[
            b"X\x04\x00\x00\x00ping",
            b"X\x0a\x00\x00\x00loadBefore",
            b"\x8c\x03odd",
            b"X\x01\x00\x00\x00\xff",
            b"U\x04vote",
            b"U\x01\xff",
            b"C\x08\x00\x00\x00\x00\x00\x00\x00\x01",
            b"C\x03abc",
            b"q\x00",
            b"e",
        ];
        let pieces: Vec<&[u8]> = crate::protocol::pickle::testing::FAST_PIECES
            .iter()
            .chain(own)
            .copied()
            .collect();
        let names: &[&[u8]] = &[
            b"X\x0a\x00\x00\x00loadBefore",
            b"X\x04\x00\x00\x00ping",
            b"\x8c\x03odd",
            b"U\x04vote",
            b"U\x01\xff",
            b"K\x05",
        ];
        let mut fast = 0;
        for i in 0..20_000 {
            let mut p = Vec::new();
            if rng.below(5) > 0 {
                p.extend_from_slice(b"\x80\x03");
            }
            if rng.below(6) > 0 {
                p.push(b'(');
            }
            let piece = |p: &mut Vec<u8>, rng: &mut crate::rng::XorShift64| {
                p.extend_from_slice(pieces[rng.below(pieces.len())])
            };
            if i % 2 == 0 {
                // Shaped like a request: two items, a name, arguments.
                piece(&mut p, &mut rng);
                piece(&mut p, &mut rng);
                p.extend_from_slice(names[rng.below(names.len())]);
                p.push(b'(');
                for _ in 0..rng.below(4) {
                    piece(&mut p, &mut rng);
                }
                p.push(b't');
            } else {
                for _ in 0..rng.below(8) {
                    piece(&mut p, &mut rng);
                }
            }
            if rng.below(6) > 0 {
                p.push(b't');
            }
            if rng.below(8) > 0 {
                p.push(b'.');
            }
            let p = Bytes::from(p);
            let general = decode_message_full(&p, &limits);
            assert_eq!(decode_message(&p, &limits), general, "{}", hex(&p));
            fast += usize::from(pickle::decode_envelope(&p, &limits).is_some());
        }
        assert!(fast > 300, "only {fast} requests on the fast path");
    }

    #[test]
    fn zero_copy_variant() {
        let p = Bytes::from(unhex(
            "8003284b0189580800000072656769737465725801000000314b0086742e",
        ));
        assert_eq!(
            decode_message_bytes(&p, &DecodeLimits::default()),
            decode_message(&p, &DecodeLimits::default())
        );
    }

    #[test]
    fn replies_and_errors() {
        // 01 seq 8: register's reply
        assert_eq!(
            payload(&encode_reply(Dialect::Py3, &Value::Int(1), &oid(0))),
            "8003284b014b0058060000002e7265706c7943080000000000000000742e"
        );
        // py2 dialect: ".reply" and bytes as py2 str
        assert_eq!(
            payload(&encode_reply(Dialect::Py2, &Value::Int(1), &oid(0))),
            "8003284b014b0055062e7265706c795508000000000000000074 2e".replace(' ', "")
        );
        // §4.2: ReadOnlyError (10-read-only seq 32)
        assert_eq!(
            payload(&encode_error(
                Dialect::Py3,
                &Value::Int(3),
                "ZODB.POSException.ReadOnlyError",
                &Value::Tuple(vec![])
            )),
            "8003284b034b0258060000002e7265706c79581f0000005a4f44422e504f53457863657074696f\
             6e2e526561644f6e6c794572726f722986742e"
                .replace(' ', "")
        );
        // a non-ASCII class name stays BINUNICODE even for py2
        let f = encode_error(Dialect::Py2, &Value::Int(1), "é", &Value::Tuple(vec![]));
        assert_eq!(
            payload(&f),
            "8003284b014b0255062e7265706c795802000000c3a92986742e"
        );
    }

    #[test]
    fn msgpack_requests() {
        let dec = |h: &str| decode_msgpack_message(&unhex(h), &DecodeLimits::default());
        // 15-msgpack seq 8: register('1', False)
        let m = dec("9401c2a8726567697374657292a13100").unwrap();
        assert_eq!(
            m,
            Message {
                msgid: Value::Int(1),
                oneway: false,
                method: "register".into(),
                args: Value::Tuple(vec![Value::str("1"), Value::Int(0)]),
                dialect: Dialect::Py3,
            }
        );
        // seq 12: loadBefore, msgid the tuple (oid, tid)
        let m = dec(
            "9492c4080000000000000000c4080000000000000001c2aa6c6f61644265666f726592c408\
             0000000000000000c4080000000000000001",
        )
        .unwrap();
        assert_eq!(m.method, "loadBefore");
        assert_eq!(m.msgid, Value::Tuple(vec![oid(0), oid(1)]));
        // seq 14: one-way tpc_begin; id(txn) as uint64, None, " "
        let m = dec(
            "9400c3a97470635f626567696e96cf00007fdecf213010c400c419696e697469616c20646174\
             6162617365206372656174696f6e80c0a120",
        )
        .unwrap();
        assert!(m.oneway);
        let Value::Tuple(args) = &m.args else {
            panic!("{:?}", m.args)
        };
        assert_eq!(args[0], Value::Int(0x7fde_cf21_3010));
        assert_eq!(args[3], Value::Dict(vec![]));
        assert_eq!(args[5], Value::str(" "));
        // A client heartbeat: (-1, 0, ".reply", None)
        let m = dec("94ff00a62e7265706c79c0").unwrap();
        assert_eq!((m.msgid, m.oneway), (Value::Int(-1), false));
        // py2-06 seq 8: a Python-2 client sends its method name as bin.
        assert_eq!(
            dec("9401c2c408726567697374657292c4013100"),
            Err(MarshalError::BadMethodName("bytes"))
        );
        assert_eq!(
            dec("93010203").unwrap_err().to_string(),
            "message is not a 4-tuple but a tuple of 3 items"
        );
        assert_eq!(
            dec("9401c2a170").unwrap_err().to_string(),
            "can't deserialize message: msgpack truncated at offset 5: 1 more byte(s) needed"
        );
    }

    #[test]
    fn msgpack_replies_errors_and_pushes() {
        let mp = Encoding::Msgpack;
        // 15-msgpack seq 9: register's reply
        assert_eq!(
            payload(&encode_reply(mp, &Value::Int(1), &oid(0))),
            "940100a62e7265706c79c4080000000000000000"
        );
        // seq 17: vote's empty list
        assert_eq!(
            payload(&encode_reply(mp, &Value::Int(3), &Value::List(vec![]))),
            "940300a62e7265706c7990"
        );
        // seq 13: POSKeyError for a loadBefore, the (oid, tid) msgid echoed
        let msgid = Value::Tuple(vec![oid(0), oid(1)]);
        assert_eq!(
            payload(&encode_error(
                mp,
                &msgid,
                "ZODB.POSException.POSKeyError",
                &Value::Tuple(vec![oid(0)])
            )),
            "9492c4080000000000000000c408000000000000000102a62e7265706c7992bd5a4f44422e504f\
             53457863657074696f6e2e504f534b65794572726f7291c4080000000000000000"
                .replace(' ', "")
        );
        // seq 65: ConflictError, its __dict__ as a map
        let tid = |h: &str| Value::bytes(unhex(h));
        let state = Value::Dict(vec![
            (Value::str("message"), Value::str("database conflict error")),
            (Value::str("oid"), oid(1)),
            (
                Value::str("class_name"),
                Value::str("persistent.mapping.PersistentMapping"),
            ),
            (
                Value::str("serials"),
                Value::Tuple(vec![tid("040d45ec021547ee"), tid("040d45ec01f8c7bb")]),
            ),
        ]);
        assert_eq!(
            payload(&encode_error(
                mp,
                &Value::Int(3),
                "ZODB.POSException.ConflictError",
                &state
            )),
            "940302a62e7265706c7992bf5a4f44422e504f53457863657074696f6e2e436f6e666c696374\
             4572726f7284a76d657373616765b7646174616261736520636f6e666c696374206572726f72a3\
             6f6964c4080000000000000001aa636c6173735f6e616d65d92470657273697374656e742e6d61\
             7070696e672e50657273697374656e744d617070696e67a773657269616c7392c408040d45ec02\
             1547eec408040d45ec01f8c7bb"
        );
        // seq 61: invalidateTransaction(tid, [oid 1]); seq 19: info
        let args = Value::Tuple(vec![tid("040d45ec021547ee"), Value::List(vec![oid(1)])]);
        assert_eq!(
            payload(&encode_call(mp, "invalidateTransaction", &args)),
            "9400c3b5696e76616c69646174655472616e73616374696f6e92c408040d45ec021547ee91c408\
             0000000000000001"
        );
        let info = Value::Tuple(vec![Value::Dict(vec![
            (Value::str("length"), Value::Int(1)),
            (Value::str("size"), Value::Int(214)),
        ])]);
        assert_eq!(
            payload(&encode_call(mp, "info", &info)),
            "9400c3a4696e666f9182a66c656e67746801a473697a65ccd6"
        );
        // A result written straight into the frame (loadBefore's path).
        let f = encode_msgpack_reply_with(&Value::Int(7), 3, |out| {
            msgpack::put_array_header(out, 1);
            msgpack::put_nil(out);
        });
        assert_eq!(payload(&f), "940700a62e7265706c7991c0");
        // The pickle encodings are unchanged by the Encoding wrapper.
        assert_eq!(
            encode_reply(Encoding::Pickle(Dialect::Py3), &Value::Int(1), &oid(0)),
            encode_reply(Dialect::Py3, &Value::Int(1), &oid(0))
        );
    }

    #[test]
    fn pushes() {
        // 02 seq 59: invalidateTransaction(tid, [oid 1])
        let args = Value::Tuple(vec![
            Value::bytes(unhex("040d45eb32fded33")),
            Value::List(vec![oid(1)]),
        ]);
        assert_eq!(
            payload(&encode_call(Dialect::Py3, "invalidateTransaction", &args)),
            "8003284b00885815000000696e76616c69646174655472616e73616374696f6e4308040d45eb32\
             fded335d430800000000000000016186742e"
                .replace(' ', "")
        );
        // The same for a Python-2 client: tid and oids as py2 str, as the
        // Python-2 server and the liberal server send them.
        assert_eq!(
            payload(&encode_call(Dialect::Py2, "invalidateTransaction", &args)),
            "8003284b00885515696e76616c69646174655472616e73616374696f6e5508040d45eb32fded33\
             5d550800000000000000016186742e"
                .replace(' ', "")
        );
    }

    /// A request encoded then decoded gives back what went in, in every
    /// encoding (values chosen to survive each dialect unchanged).
    #[test]
    fn requests_round_trip() {
        let dec = |enc: Encoding, frame: &Bytes| {
            let p = &frame[4..];
            assert_eq!(
                u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
                p.len()
            );
            let limits = DecodeLimits::default();
            match enc {
                Encoding::Pickle(_) => decode_message(p, &limits),
                Encoding::Msgpack => decode_msgpack_message(p, &limits),
            }
            .unwrap()
        };
        let py2 = |x: &[u8]| Value::PyStr(Bytes::copy_from_slice(x));
        let cases = [
            (
                Encoding::Pickle(Dialect::Py3),
                vec![oid(3), Value::str("é"), Value::Int(-1 << 40), Value::None],
            ),
            (
                Encoding::Pickle(Dialect::Py2),
                vec![py2(b"\0\0\0\0\0\0\0\x03"), py2(b"1"), Value::Int(1 << 40)],
            ),
            (
                Encoding::Pickle(Dialect::Py2Protocol1),
                vec![py2(b"1"), Value::Int(0), Value::Int(1 << 40), Value::None],
            ),
            (
                Encoding::Msgpack,
                vec![oid(3), Value::str("é"), Value::Bool(true), Value::None],
            ),
        ];
        for (enc, items) in cases {
            let one = Value::Int(1);
            let loads_msgid = Value::Tuple(vec![items[0].clone(), items[0].clone()]);
            for (msgid, oneway, method, args) in [
                (
                    Value::Int(7),
                    false,
                    "loadBefore",
                    Value::Tuple(items.clone()),
                ),
                (Value::Int(0), true, "storea", Value::Tuple(items.clone())),
                (loads_msgid, false, "loadBefore", Value::Tuple(vec![])),
                // Args that are not a tuple are written as given (a dict:
                // a list would come back from msgpack as a tuple).
                (
                    Value::Int(1 << 33),
                    false,
                    "ping",
                    Value::Dict(vec![(one, Value::Tuple(items))]),
                ),
            ] {
                let m = dec(enc, &encode_request(enc, &msgid, oneway, method, &args));
                assert_eq!(
                    (&m.msgid, m.oneway, m.method.as_ref(), &m.args),
                    (&msgid, oneway, method, &args),
                    "{enc:?}"
                );
                if let Encoding::Pickle(d) = enc {
                    assert_eq!(m.dialect, d);
                }
                // Appended to a buffer that already holds a frame.
                let mut out = BytesMut::from(&b"\0\0\0\x02Z5"[..]);
                put_request(&mut out, enc, &msgid, oneway, method, &args);
                assert_eq!(
                    out[6..],
                    encode_request(enc, &msgid, oneway, method, &args)[..]
                );
            }
        }
    }

    /// Requests are byte for byte what stock clients sent (the frames in
    /// the tests above, from `fixtures/`).
    #[test]
    fn requests_as_stock_clients_write_them() {
        let py2 = |x: &[u8]| Value::PyStr(Bytes::copy_from_slice(x));
        let register = |one: Value| Value::Tuple(vec![one, Value::Int(0)]);
        let p = |enc: Encoding, msgid: &Value, method: &str, args: &Value| {
            payload(&encode_request(enc, msgid, false, method, args))
        };
        let one = Value::Int(1);
        // 01 seq 7: register('1', 0) from a Python 3 client
        assert_eq!(
            p(
                Dialect::Py3.into(),
                &one,
                "register",
                &register(Value::str("1"))
            ),
            "8003284b0189580800000072656769737465725801000000314b0086742e"
        );
        // py2-01 seq 8: the same from a Python 2 client
        assert_eq!(
            p(Dialect::Py2.into(), &one, "register", &register(py2(b"1"))),
            "8003284b0189550872656769737465725501314b0086742e"
        );
        // py2-01 seq 12: loadBefore, its (oid, tid) msgid
        let (o, t) = (py2(&[0; 8]), py2(&[0, 0, 0, 0, 0, 0, 0, 1]));
        let load = Value::Tuple(vec![o, t]);
        assert_eq!(
            p(Dialect::Py2.into(), &load, "loadBefore", &load),
            "80032855080000000000000000550800000000000000018689550a6c6f61644265666f7265550800\
             000000000000005508000000000000000186742e"
        );
        // ZEO 5.1.2 on Python 2: register('1', False) with protocol 1
        assert_eq!(
            p(
                Dialect::Py2Protocol1.into(),
                &one,
                "register",
                &register(py2(b"1"))
            ),
            "284b014930300a55087265676973746572285501314b0074742e"
        );
        // 15-msgpack seq 8 and 12: register('1', 0) and loadBefore
        let mp = Encoding::Msgpack;
        assert_eq!(
            p(mp, &one, "register", &register(Value::str("1"))),
            "9401c2a8726567697374657292a13100"
        );
        let load = Value::Tuple(vec![oid(0), oid(1)]);
        assert_eq!(
            p(mp, &load, "loadBefore", &load),
            "9492c4080000000000000000c4080000000000000001c2aa6c6f61644265666f726592c408\
             0000000000000000c4080000000000000001"
        );
    }

    /// Replies, error replies and pushes as a client tells them apart.
    #[test]
    fn replies_from_the_clients_side() {
        let limits = DecodeLimits::default();
        let msg = |frame: Bytes, enc: Encoding| match enc {
            Encoding::Pickle(_) => decode_message(&frame[4..], &limits).unwrap(),
            Encoding::Msgpack => decode_msgpack_message(&frame[4..], &limits).unwrap(),
        };
        let state = Value::Tuple(vec![Value::Int(5)]);
        let load = Value::Tuple(vec![oid(0), oid(1)]);
        for enc in [Dialect::Py3.into(), Dialect::Py2.into(), Encoding::Msgpack] {
            let m = msg(encode_reply(enc, &Value::Int(3), &Value::None), enc);
            assert_eq!(m.into_reply(), Some((Value::Int(3), Ok(Value::None))));
            let m = msg(encode_error(enc, &load, "POSKeyError", &state), enc);
            let (msgid, outcome) = m.into_reply().unwrap();
            assert_eq!(outcome, Err(("POSKeyError".to_string(), state.clone())));
            // The msgid echoed (as py2 str to a Python 2 client).
            assert!(
                matches!(&msgid, Value::Tuple(t) if t.len() == 2),
                "{msgid:?}"
            );
            let m = msg(encode_call(enc, "info", &Value::Tuple(vec![])), enc);
            assert_eq!(m.into_reply(), None);
        }
        // Malformed error replies: the class name "", the value as state.
        let m = decode("8003284b014b0258060000002e7265706c794b05742e").unwrap();
        assert_eq!(
            m.into_reply(),
            Some((Value::Int(1), Err((String::new(), Value::Int(5)))))
        );
    }
}
