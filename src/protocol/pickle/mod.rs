//! A restricted pickle codec for ZEO messages: plain data only. Here: the
//! entry points, [`Dialect`] and [`PickleError`]; the decoder in
//! `decode.rs`, the writer in `encode.rs`, the opcode bytes in [`opcodes`].
//! Depends only on [`crate::protocol::value`] (the values, shared with
//! msgpack).
//!
//! ZEO 5 frames are pickles (protocol 3 from every ZEO ≥ 5.2 writer, Python 2
//! and 3 alike) of plain data: ints, bytes, text, tuples, lists, dicts. This
//! module decodes those into [`Value`] and writes [`Value`]s back exactly as
//! the stock server's pickler does (`zodbpickle.pickle.Pickler(f, 3)` with
//! `fast = 1`: the C pickler, no memo), so replies are byte-identical to a
//! Python ZEO server's. For Python 2 clients that pickle with protocol 1
//! (ZEO 5.0/5.1, whose `cPickle` cannot read protocol 3) the same values are
//! written as `cPickle.Pickler(1)` with `fast = 1` writes them
//! ([`Dialect::Py2Protocol1`]): protocol-0/1 opcodes only.
//!
//! Invariants:
//!
//! * **Nothing is ever resolved or called.** `GLOBAL`/`STACK_GLOBAL` become
//!   [`Value::Global`]; `REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `BUILD`, `INST` and
//!   `OBJ` become [`Value::Opaque`] holding the callable and its arguments,
//!   so [`Value::forbidden_global`] can find them and the session can refuse
//!   the message with an error reply. Persistent ids are an error (ZEO
//!   messages never carry them).
//! * **Bad input is an error, never a panic, never an unbounded cost.** The
//!   decoder is an iterative stack machine; every length field is checked
//!   against the remaining input before anything is allocated; containers
//!   nest at most [`DecodeLimits::max_depth`] levels, which also bounds the
//!   recursion of `Drop`, `Clone` and `PartialEq` on decoded values; copies
//!   made by memo `GET`s and `DUP` (the "billion laughs" of pickle) are
//!   limited to [`MAX_COPY_WEIGHT`] in total.
//! * **Shared objects are exact or refused.** A [`Value`] is a tree, so an
//!   object referenced twice through the memo is copied. A memo entry sees
//!   the object as it is when fetched (not as it was when memoized), and an
//!   object that is mutated after having been fetched or duplicated (a
//!   recursive structure, or one whose copies would diverge) is an error
//!   instead of a silently different value. Stock ZEO writers use no memo at
//!   all (`fast = 1`); only the object records inside `storea`/`loadBefore`
//!   data do, and those are opaque bytes to this codec.
//!
//! Python 2 `str` (`SHORT_BINSTRING`/`BINSTRING`/`STRING`) stays raw bytes
//! ([`Value::PyStr`]); callers convert to text where ZEO expects text
//! (protocol doc §3.2 "Decoder requirements", §12).

use bytes::{BufMut, Bytes, BytesMut};

mod decode;
mod encode;
pub mod opcodes;
#[cfg(test)]
pub(crate) mod testing;

use crate::protocol::value::{DecodeLimits, Value};
use decode::Decoder;
pub use decode::FlatEnvelope;
pub use encode::{
    close_tuple, encode_bytes_into, encode_into, encode_str_into, open_tuple, put_proto, size_hint,
};
use opcodes as op;

/// Budget for copies made while decoding one pickle by memo `GET`s, `DUP`
/// and memo snapshots, in "weight" units: one per value node, plus the byte
/// length of each copied text (`Str`), big integer and global name. `Bytes`
/// copies are reference counts and weigh one unit.
///
/// Without such a bound a few hundred bytes of `GET`s can describe an
/// exponentially large tree. Stock ZEO messages use no memo and spend none.
pub const MAX_COPY_WEIGHT: usize = 1 << 20;

/// Which Python a peer runs and which pickle protocol it reads, for the
/// encoding of bytes, text and everything else (protocol notes §3.2, §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Python 3 peers: bytes as `SHORT_BINBYTES`/`BINBYTES`, text as
    /// `BINUNICODE`.
    Py3,
    /// Python 2 peers (ZEO ≥ 5.2): bytes and ASCII text as py2 `str`
    /// (`SHORT_BINSTRING`/`BINSTRING`), other text as `BINUNICODE`.
    Py2,
    /// Python 2 peers that pickle with protocol 1 (ZEO 5.0/5.1, Plone 5.1):
    /// their `cPickle` reads no protocol above 2 ("unsupported pickle
    /// protocol: 3"), so everything is written as a ZEO 5.1 Python-2 server
    /// writes it: no `PROTO`; text and bytes as [`Dialect::Py2`];
    /// booleans as `INT 01`/`INT 00`; ints beyond 32 bits as `INT`
    /// decimal lines, beyond 64 bits as `LONG` (`L` suffix); every
    /// non-empty tuple as `MARK ... TUPLE`. Only protocol-0/1 opcodes.
    Py2Protocol1,
}

impl Dialect {
    /// Writes only protocol-0/1 opcodes.
    pub fn is_protocol1(self) -> bool {
        self == Dialect::Py2Protocol1
    }
}

/// Why a pickle could not be decoded. Offsets are byte offsets into the
/// pickle (usually of the opcode at fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("pickle truncated at offset {offset}: {needed} more byte(s) needed")]
    Truncated { offset: usize, needed: usize },
    #[error("pickle ends without STOP")]
    MissingStop,
    #[error("{count} byte(s) of trailing data after STOP at offset {offset}")]
    TrailingData { offset: usize, count: usize },
    #[error("unsupported opcode 0x{opcode:02x} at offset {offset}")]
    UnsupportedOpcode { opcode: u8, offset: usize },
    #[error("persistent id at offset {offset}: ZEO messages carry no persistent references")]
    PersistentId { offset: usize },
    #[error("unsupported pickle protocol {proto} at offset {offset}")]
    UnsupportedProtocol { proto: u8, offset: usize },
    #[error("stack underflow at offset {offset}")]
    StackUnderflow { offset: usize },
    #[error("no MARK for the opcode at offset {offset}")]
    MissingMark { offset: usize },
    #[error("containers nested deeper than {max_depth} at offset {offset}")]
    TooDeep { offset: usize, max_depth: usize },
    #[error("memo key {key} not found at offset {offset}")]
    MemoMissing { key: u64, offset: usize },
    #[error(
        "more than {limit} values at offset {offset} (a message may decode to at most that many)"
    )]
    TooManyItems { offset: usize, limit: usize },
    #[error("memo/DUP copies exceed the limit of {limit} units at offset {offset}")]
    CopyLimit { offset: usize, limit: usize },
    #[error("invalid pickle at offset {offset}: {reason}")]
    Invalid { offset: usize, reason: String },
}

/// Decodes one complete pickle (it must end with `STOP` and nothing after).
pub fn decode(data: &[u8], limits: &DecodeLimits) -> Result<Value, PickleError> {
    Decoder::new(data, None, limits).run()
}

/// [`decode`] without its fast path, for the tests that check both give
/// the same result.
#[doc(hidden)]
pub fn decode_full(data: &[u8], limits: &DecodeLimits) -> Result<Value, PickleError> {
    Decoder::new(data, None, limits).run_full()
}

/// Like [`decode`], but bytes values are zero-copy slices of `data` (for
/// large `storea` records). They keep the whole buffer alive.
pub fn decode_bytes(data: &Bytes, limits: &DecodeLimits) -> Result<Value, PickleError> {
    Decoder::new(data, Some(data), limits).run()
}

/// The fast path for a request, `(msgid, flags, name, args)` with the name
/// borrowed from `data` (its bytes values are copied: a request's values
/// can outlive it, e.g. a transaction's user and description, kept with
/// every revision it writes, and a slice would keep the connection's whole
/// read buffer alive with them). `None` when the frame is not the plain,
/// memo-free pickle stock clients write, or not valid: decode it with
/// [`decode`], which gives the same parts or the error.
pub fn decode_envelope<'a>(data: &'a [u8], limits: &DecodeLimits) -> Option<FlatEnvelope<'a>> {
    Decoder::new(data, None, limits).run_envelope()
}

/// A whole pickle of `v`: `PROTO 3` (none for [`Dialect::Py2Protocol1`]),
/// the value, `STOP`.
pub fn encode(v: &Value, dialect: Dialect) -> Bytes {
    let mut out = BytesMut::new();
    put_proto(&mut out, dialect);
    encode_into(&mut out, v, dialect);
    out.put_u8(op::STOP);
    out.freeze()
}
