//! A restricted pickle codec for ZEO messages: plain data only.
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
//!   so [`Value::forbidden_global`] can find them and the rpc layer can refuse
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

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use bytes::{BufMut, Bytes, BytesMut};

/// Budget for copies made while decoding one pickle by memo `GET`s, `DUP`
/// and memo snapshots, in "weight" units: one per value node, plus the byte
/// length of each copied text (`Str`), big integer and global name. `Bytes`
/// copies are reference counts and weigh one unit.
///
/// Without such a bound a few hundred bytes of `GET`s can describe an
/// exponentially large tree. Stock ZEO messages use no memo and spend none.
pub const MAX_COPY_WEIGHT: usize = 1 << 20;

/// Longest decimal integer accepted by the text opcodes `INT` and `LONG`.
/// Converting one costs time quadratic in its length, so this is well below
/// Python's own limit (4300 digits); the only text ints ZEO sees are
/// Python-2 transaction ids of about 15 digits.
const MAX_INT_DIGITS: usize = 1000;

/// Longest `LONG4` payload accepted, in bytes: about as large as
/// [`MAX_INT_DIGITS`] decimal digits (2^3328 > 10^1000). A connection in the
/// protocol-1 dialect gets its msgid back as decimal text (`LONG`), which
/// costs time quadratic in the length: without this bound a 64 MiB `LONG4`
/// msgid held a runtime worker for hours. (`LONG1` holds 255 bytes at most.)
const MAX_LONG_BYTES: usize = 416;

/// Highest pickle protocol number accepted in `PROTO` (as CPython 3.8+).
const HIGHEST_PROTOCOL: u8 = 5;

/// Items per `APPENDS`/`SETITEMS` batch, as CPython's and zodbpickle's
/// `BATCHSIZE`.
const BATCH_SIZE: usize = 1000;

pub mod opcodes;
use opcodes as op;

/// A decoded pickle value (plain data; nothing is evaluated).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside `i64`: minimal two's-complement little-endian
    /// bytes, as `LONG1`/`LONG4` carry it.
    BigInt(Vec<u8>),
    Float(f64),
    /// Python 3 `bytes` (`SHORT_BINBYTES` / `BINBYTES` / `BINBYTES8`).
    Bytes(Bytes),
    /// Python 2 `str` (`SHORT_BINSTRING` / `BINSTRING` / `STRING`): raw bytes
    /// that may stand for text.
    PyStr(Bytes),
    /// Text (`BINUNICODE`, `SHORT_BINUNICODE`, `BINUNICODE8`, `UNICODE`).
    Str(String),
    Tuple(Vec<Value>),
    /// A list; also what sets and frozensets decode to.
    List(Vec<Value>),
    /// A dict in insertion order. Keys are not deduplicated (a pickle that
    /// sets one key twice keeps both pairs; Python would keep the last value).
    Dict(Vec<(Value, Value)>),
    /// `GLOBAL` / `STACK_GLOBAL`: recorded, never resolved, so the rpc layer
    /// can refuse the message with an error reply.
    Global {
        module: String,
        name: String,
    },
    /// The result of `REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `BUILD`, `INST` or `OBJ`.
    /// Nothing is evaluated: the box holds a tuple of the callable (or the
    /// object being built) and its arguments (or state), so
    /// [`Value::forbidden_global`] still finds the callable.
    Opaque(Box<Value>),
}

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

/// Limits applied while decoding one pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Maximum container nesting; a scalar has depth 0, a container one more
    /// than its deepest item (an empty container has depth 1).
    pub max_depth: usize,
    /// Maximum values decoded (every push onto the unpickler's stack).
    pub max_items: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_depth: crate::config::DEFAULT_MAX_NESTING_DEPTH,
            max_items: crate::config::DEFAULT_MAX_MESSAGE_ITEMS,
        }
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

impl Value {
    /// A bytes value (`SHORT_BINBYTES`/`BINBYTES` for a Python 3 peer).
    pub fn bytes(b: impl Into<Bytes>) -> Value {
        Value::Bytes(b.into())
    }

    /// A text value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// The raw bytes of a `Bytes` or a py2 `PyStr`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) | Value::PyStr(b) => Some(b),
            _ => None,
        }
    }

    /// Text: a `Str`, or a py2 `PyStr` that is valid UTF-8.
    pub fn as_text(&self) -> Option<Cow<'_, str>> {
        match self {
            Value::Str(s) => Some(Cow::Borrowed(s)),
            Value::PyStr(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            _ => None,
        }
    }

    /// An `Int`, or a `Bool` as 0/1 (Python's `bool` is an `int`).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// Python truthiness.
    /// Anything but a tuple, list or dict.
    pub fn is_scalar(&self) -> bool {
        !matches!(self, Value::Tuple(_) | Value::List(_) | Value::Dict(_))
    }

    pub fn is_truthy(&self) -> bool {
        match self {
            Value::None => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::BigInt(b) => b.iter().any(|&x| x != 0),
            // NaN is truthy in Python, and NaN != 0.0.
            Value::Float(f) => *f != 0.0,
            Value::Bytes(b) | Value::PyStr(b) => !b.is_empty(),
            Value::Str(s) => !s.is_empty(),
            Value::Tuple(v) | Value::List(v) => !v.is_empty(),
            Value::Dict(d) => !d.is_empty(),
            Value::Global { .. } | Value::Opaque(_) => true,
        }
    }

    /// The first [`Value::Global`] anywhere inside (depth first, in pickle
    /// order), as `"module.name"`.
    pub fn forbidden_global(&self) -> Option<String> {
        // Most messages are flat tuples of plain values: no work list.
        let global = |v: &Value| match v {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        };
        match self {
            Value::Tuple(items) | Value::List(items) if items.iter().all(Value::is_scalar) => {
                return items.iter().find_map(global);
            }
            v if v.is_scalar() && !matches!(v, Value::Opaque(_)) => return global(v),
            _ => {}
        }
        let mut todo: Vec<&Value> = vec![self];
        while let Some(v) = todo.pop() {
            match v {
                Value::Global { module, name } => return Some(format!("{module}.{name}")),
                Value::Tuple(items) | Value::List(items) => todo.extend(items.iter().rev()),
                Value::Dict(pairs) => {
                    for (k, v) in pairs.iter().rev() {
                        todo.push(v);
                        todo.push(k);
                    }
                }
                Value::Opaque(inner) => todo.push(inner),
                _ => {}
            }
        }
        None
    }

    /// Turns every py2 `str` inside into what ZODB on Python 3 reads one as
    /// (`encoding='ASCII', errors='bytes'`): text if ASCII, else bytes.
    /// For values one client leaves for all to read, such as a Python-2
    /// client's transaction `extension`, which `history` returns to every
    /// client: a Python-3 client decodes a `SHORT_BINSTRING` as ASCII text,
    /// so a non-ASCII one made the whole reply undecodable and its call
    /// never returned. To a Python-2 client both come back as py2 `str`, as
    /// sent (ASCII text and bytes are written as py2 `str` in its dialect).
    /// Iterative, so any nesting depth is fine.
    pub fn py2_strs_as_py3(&mut self) {
        let mut todo: Vec<&mut Value> = vec![self];
        while let Some(v) = todo.pop() {
            match v {
                Value::PyStr(b) => {
                    let b = std::mem::take(b);
                    *v = if b.is_ascii() {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    };
                }
                Value::Tuple(items) | Value::List(items) => todo.extend(items.iter_mut()),
                Value::Dict(pairs) => {
                    for (k, x) in pairs.iter_mut() {
                        todo.push(k);
                        todo.push(x);
                    }
                }
                Value::Opaque(inner) => todo.push(inner),
                _ => {}
            }
        }
    }

    /// A Python-ish type name for error messages. A py2 `str` is `"bytes"`:
    /// that is what this server treats it as.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Bytes(_) | Value::PyStr(_) => "bytes",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global { .. } => "global",
            Value::Opaque(_) => "object",
        }
    }
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

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

/// One entry of the unpickler stack.
struct Slot {
    value: Value,
    /// Nesting depth of `value` (0 for scalars).
    depth: usize,
    /// Copy weight of `value` (see [`MAX_COPY_WEIGHT`]).
    weight: usize,
    /// Unique and increasing from the bottom of the stack to the top, so a
    /// memo entry can find its object by binary search.
    id: u64,
    /// Memo keys that were `PUT` while this object was on the stack.
    memo_keys: Vec<u64>,
    /// A copy of this object exists elsewhere (memo `GET` or `DUP`), so
    /// mutating it would make the copies diverge.
    shared: bool,
}

/// A memoized object after it left the stack.
struct Frozen {
    value: Value,
    depth: usize,
    weight: usize,
}

enum MemoEntry {
    /// The object is still on the stack (it may still be filled).
    Live(u64),
    /// The object was consumed; this is its final state.
    Frozen(Rc<Frozen>),
}

type Pairs = Vec<(Value, Value)>;

/// What APPEND(S)/ADDITEMS and SETITEM(S) add to a container.
enum Extension {
    Items(Vec<Value>),
    Pairs(Pairs),
}

/// A value taken off the stack, with its depth and weight.
struct Item {
    value: Value,
    depth: usize,
    weight: usize,
}

struct Decoder<'a> {
    data: &'a [u8],
    /// Set by [`decode_bytes`]: bytes values are slices of this buffer.
    source: Option<&'a Bytes>,
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_offset: usize,
    stack: Vec<Slot>,
    /// Stack lengths at each open MARK (CPython's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, MemoEntry>,
    next_id: u64,
    copy_budget: usize,
    max_depth: usize,
    /// Values still allowed ([`DecodeLimits::max_items`]).
    items_left: usize,
    max_items: usize,
}

fn scalar_weight(v: &Value) -> usize {
    match v {
        Value::Str(s) => 1 + s.len(),
        Value::BigInt(b) => 1 + b.len(),
        Value::Global { module, name } => 1 + module.len() + name.len(),
        _ => 1,
    }
}

impl<'a> Decoder<'a> {
    fn new(data: &'a [u8], source: Option<&'a Bytes>, limits: &DecodeLimits) -> Self {
        Decoder {
            data,
            source,
            pos: 0,
            op_offset: 0,
            // Room for a whole ZEO request envelope without regrowing.
            stack: Vec::with_capacity(8),
            marks: Vec::with_capacity(2),
            memo: HashMap::new(),

            next_id: 0,
            copy_budget: MAX_COPY_WEIGHT,
            max_depth: limits.max_depth,
            items_left: limits.max_items,
            max_items: limits.max_items,
        }
    }

    // -- errors -------------------------------------------------------------

    fn invalid(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Invalid {
            offset: self.op_offset,
            reason: reason.into(),
        }
    }

    fn too_deep(&self) -> PickleError {
        PickleError::TooDeep {
            offset: self.op_offset,
            max_depth: self.max_depth,
        }
    }

    fn underflow(&self) -> PickleError {
        PickleError::StackUnderflow {
            offset: self.op_offset,
        }
    }

    // -- input --------------------------------------------------------------

    /// The next `n` bytes; checks `n` against the remaining input first, so a
    /// huge declared length fails before anything is allocated.
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let rest = self.data.len().saturating_sub(self.pos);
        if n > rest {
            return Err(PickleError::Truncated {
                offset: self.pos,
                needed: n - rest,
            });
        }
        let s = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or(PickleError::Truncated {
                offset: self.pos,
                needed: n,
            })?;
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32_len(&mut self) -> Result<usize, PickleError> {
        let n = u32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.invalid("length does not fit in memory"))
    }

    fn i32_len(&mut self) -> Result<usize, PickleError> {
        let n = i32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.invalid("negative byte count"))
    }

    fn u64_len(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.invalid("length does not fit in memory"))
    }

    /// A `\n`-terminated argument of the text opcodes, without the newline.
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(PickleError::Truncated {
                offset: self.pos,
                needed: 1,
            });
        };
        let line = self.take(n + 1)?;
        Ok(line.get(..n).unwrap_or_default())
    }

    fn line_utf8(&mut self) -> Result<&'a str, PickleError> {
        let line = self.line()?;
        std::str::from_utf8(line).map_err(|_| self.invalid("name is not UTF-8"))
    }

    fn bytes_of(&self, s: &'a [u8]) -> Bytes {
        match self.source {
            // `s` was taken from `data`, which is `source`'s own buffer.
            Some(src) => src.slice_ref(s),
            None => Bytes::copy_from_slice(s),
        }
    }

    fn utf8(&self, s: &[u8]) -> Result<String, PickleError> {
        String::from_utf8(s.to_vec()).map_err(|_| self.invalid("text is not valid UTF-8"))
    }

    // -- stack --------------------------------------------------------------

    fn push(&mut self, value: Value, depth: usize, weight: usize) -> Result<(), PickleError> {
        if depth > self.max_depth {
            return Err(self.too_deep());
        }
        if self.items_left == 0 {
            return Err(PickleError::TooManyItems {
                offset: self.op_offset,
                limit: self.max_items,
            });
        }
        self.items_left -= 1;
        let id = self.next_id;
        self.next_id += 1;
        self.stack.push(Slot {
            value,
            depth,
            weight,
            id,
            memo_keys: Vec::new(),
            shared: false,
        });
        Ok(())
    }

    fn push_scalar(&mut self, value: Value) -> Result<(), PickleError> {
        let w = scalar_weight(&value);
        self.push(value, 0, w)
    }

    /// Stack length at the innermost open MARK; opcodes other than the
    /// MARK-consuming ones only see the items above it (as in CPython).
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop_slot(&mut self) -> Result<Slot, PickleError> {
        if self.stack.len() <= self.base() {
            return Err(self.underflow());
        }
        self.stack.pop().ok_or_else(|| self.underflow())
    }

    fn top_mut(&mut self) -> Result<&mut Slot, PickleError> {
        if self.stack.len() <= self.base() {
            return Err(self.underflow());
        }
        let offset = self.op_offset;
        self.stack
            .last_mut()
            .ok_or(PickleError::StackUnderflow { offset })
    }

    fn pop_mark(&mut self) -> Result<Vec<Slot>, PickleError> {
        let m = self.marks.pop().ok_or(PickleError::MissingMark {
            offset: self.op_offset,
        })?;
        if m > self.stack.len() {
            return Err(self.underflow());
        }
        Ok(self.stack.split_off(m))
    }

    fn charge(&mut self, weight: usize) -> Result<(), PickleError> {
        if weight > self.copy_budget {
            return Err(PickleError::CopyLimit {
                offset: self.op_offset,
                limit: MAX_COPY_WEIGHT,
            });
        }
        self.copy_budget -= weight;
        Ok(())
    }

    /// Takes a slot's value off the stack for good; memo entries that still
    /// refer to it get a snapshot of its final state first.
    fn release(&mut self, slot: Slot) -> Result<Item, PickleError> {
        let mut frozen: Option<Rc<Frozen>> = None;
        for key in &slot.memo_keys {
            let live = matches!(self.memo.get(key), Some(MemoEntry::Live(id)) if *id == slot.id);
            if !live {
                continue;
            }
            let f = match &frozen {
                Some(f) => f.clone(),
                None => {
                    self.charge(slot.weight)?;
                    let f = Rc::new(Frozen {
                        value: slot.value.clone(),
                        depth: slot.depth,
                        weight: slot.weight,
                    });
                    frozen = Some(f.clone());
                    f
                }
            };
            self.memo.insert(*key, MemoEntry::Frozen(f));
        }
        Ok(Item {
            value: slot.value,
            depth: slot.depth,
            weight: slot.weight,
        })
    }

    fn pop_item(&mut self) -> Result<Item, PickleError> {
        let slot = self.pop_slot()?;
        self.release(slot)
    }

    /// Pops the items above the innermost MARK, and the MARK.
    fn pop_mark_items(&mut self) -> Result<Vec<Item>, PickleError> {
        let slots = self.pop_mark()?;
        slots.into_iter().map(|s| self.release(s)).collect()
    }

    /// Takes the slots from `from` to the top of the stack as the values of
    /// a new container, with its depth and weight: one allocation (the
    /// values), where popping into a `Vec<Item>` first took two or three.
    /// This is the path of every request envelope and argument tuple.
    fn take_values(&mut self, from: usize) -> Result<(Vec<Value>, usize, usize), PickleError> {
        let mut stack = std::mem::take(&mut self.stack);
        let mut depth = 1;
        let mut weight = 1usize;
        let mut values = Vec::with_capacity(stack.len().saturating_sub(from));
        let mut result = Ok(());
        for slot in stack.drain(from.min(stack.len())..) {
            match self.release(slot) {
                Ok(it) => {
                    depth = depth.max(it.depth + 1);
                    weight = weight.saturating_add(it.weight);
                    values.push(it.value);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Put the (emptied) stack back, keeping its capacity.
        self.stack = stack;
        result.map(|()| (values, depth, weight))
    }

    /// Pops the MARK and everything above it as container values.
    fn pop_mark_values(&mut self) -> Result<(Vec<Value>, usize, usize), PickleError> {
        let m = self.marks.pop().ok_or(PickleError::MissingMark {
            offset: self.op_offset,
        })?;
        if m > self.stack.len() {
            return Err(self.underflow());
        }
        self.take_values(m)
    }

    fn push_dict(&mut self, items: Vec<Item>) -> Result<(), PickleError> {
        let (pairs, depth, weight) = self.pairs(items)?;
        self.push(Value::Dict(pairs), depth, weight)
    }

    /// Pushes an [`Value::Opaque`] wrapping a tuple of `parts`.
    fn push_opaque(&mut self, parts: Vec<Item>) -> Result<(), PickleError> {
        let (values, depth, weight) = collect(parts);
        self.push(
            Value::Opaque(Box::new(Value::Tuple(values))),
            depth + 1,
            weight + 1,
        )
    }

    /// Groups a MARK region of `key value key value ...` into pairs.
    fn pairs(&self, items: Vec<Item>) -> Result<(Pairs, usize, usize), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.invalid("odd number of items for a dict"));
        }
        let mut depth = 1;
        let mut weight = 1usize;
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            depth = depth.max(k.depth + 1).max(v.depth + 1);
            weight = weight.saturating_add(k.weight).saturating_add(v.weight);
            pairs.push((k.value, v.value));
        }
        Ok((pairs, depth, weight))
    }

    /// APPEND(S)/ADDITEMS onto the list (or set) on top of the stack.
    fn extend_list(&mut self, items: Vec<Item>, opname: &str) -> Result<(), PickleError> {
        let (values, depth, weight) = collect(items);
        self.extend_top(Extension::Items(values), depth, weight, opname)
    }

    /// SETITEM(S) onto the dict on top of the stack.
    fn extend_dict(&mut self, items: Vec<Item>, opname: &str) -> Result<(), PickleError> {
        let (pairs, depth, weight) = self.pairs(items)?;
        self.extend_top(Extension::Pairs(pairs), depth, weight, opname)
    }

    /// Adds items to the container on top of the stack; `depth` and
    /// `weight` are those of a container holding just the new items.
    fn extend_top(
        &mut self,
        ext: Extension,
        depth: usize,
        weight: usize,
        opname: &str,
    ) -> Result<(), PickleError> {
        let max_depth = self.max_depth;
        let offset = self.op_offset;
        let slot = self.top_mut()?;
        let shared = slot.shared;
        let (new_depth, new_weight) = match (&mut slot.value, ext) {
            (Value::List(list), Extension::Items(values)) if !shared => {
                let d = slot.depth.max(depth);
                if d > max_depth {
                    return Err(PickleError::TooDeep { offset, max_depth });
                }
                list.extend(values);
                (d, slot.weight.saturating_add(weight - 1))
            }
            (Value::Dict(dict), Extension::Pairs(pairs)) if !shared => {
                let d = slot.depth.max(depth);
                if d > max_depth {
                    return Err(PickleError::TooDeep { offset, max_depth });
                }
                dict.extend(pairs);
                (d, slot.weight.saturating_add(weight - 1))
            }
            (Value::List(_) | Value::Dict(_), _) if shared => {
                return Err(PickleError::Invalid {
                    offset,
                    reason: format!(
                        "{opname} onto a container that is also referenced elsewhere \
                         (recursive or shared structure)"
                    ),
                });
            }
            // Python would call the object's append/__setitem__ (a dict or
            // list subclass). Nothing is evaluated: the items are kept inside
            // the opaque value, where forbidden_global still sees them.
            (Value::Opaque(inner), ext) => {
                let Value::Tuple(parts) = inner.as_mut() else {
                    return Err(PickleError::Invalid {
                        offset,
                        reason: "malformed opaque value".to_owned(),
                    });
                };
                let d = slot.depth.max(depth + 2);
                if d > max_depth {
                    return Err(PickleError::TooDeep { offset, max_depth });
                }
                parts.push(match ext {
                    Extension::Items(values) => Value::List(values),
                    Extension::Pairs(pairs) => Value::Dict(pairs),
                });
                (d, slot.weight.saturating_add(weight))
            }
            (other, _) => {
                return Err(PickleError::Invalid {
                    offset,
                    reason: format!("{opname} onto a {}", other.type_name()),
                });
            }
        };
        slot.depth = new_depth;
        slot.weight = new_weight;
        Ok(())
    }

    // -- memo ---------------------------------------------------------------

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let slot = self.top_mut()?;
        let id = slot.id;
        slot.memo_keys.push(key);
        self.memo.insert(key, MemoEntry::Live(id));
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let (value, depth, weight) = match self.memo.get(&key) {
            None => {
                return Err(PickleError::MemoMissing {
                    key,
                    offset: self.op_offset,
                });
            }
            Some(MemoEntry::Frozen(f)) => {
                let f = f.clone();
                self.charge(f.weight)?;
                (f.value.clone(), f.depth, f.weight)
            }
            Some(MemoEntry::Live(id)) => {
                let id = *id;
                let Ok(i) = self.stack.binary_search_by_key(&id, |s| s.id) else {
                    return Err(self.invalid("memo entry refers to a vanished object"));
                };
                let weight = self.stack.get(i).map_or(0, |s| s.weight);
                self.charge(weight)?;
                let Some(slot) = self.stack.get_mut(i) else {
                    return Err(self.invalid("memo entry refers to a vanished object"));
                };
                slot.shared = true;
                (slot.value.clone(), slot.depth, slot.weight)
            }
        };
        self.push(value, depth, weight)?;
        if let Some(top) = self.stack.last_mut() {
            top.shared = true;
        }
        Ok(())
    }

    fn memo_key_text(&mut self) -> Result<u64, PickleError> {
        let line = self.line()?;
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| self.invalid("memo key is not a non-negative integer"))
    }

    // -- main loop ----------------------------------------------------------

    fn run(mut self) -> Result<Value, PickleError> {
        if let Some(v) = self.run_flat() {
            return Ok(v);
        }
        self.pos = 0;
        self.items_left = self.max_items;
        self.run_full()
    }

    /// The full decoder (memo, copy limits, every opcode), from `pos`.
    fn run_full(mut self) -> Result<Value, PickleError> {
        loop {
            self.op_offset = self.pos;
            let Some(&opcode) = self.data.get(self.pos) else {
                return Err(PickleError::MissingStop);
            };
            self.pos += 1;
            if opcode == op::STOP {
                return self.stop();
            }
            self.step(opcode)?;
        }
    }

    /// The fast path for what ZEO clients send: a memo-free pickle of
    /// tuples, plain scalars, text and bytes (the stock client pickles with
    /// `fast = 1`, so its messages never use the memo). It builds values
    /// directly on a stack of `Value`s, without the slot bookkeeping that
    /// memo sharing and copy limits need (that bookkeeping was a fifth of
    /// the server's time under `load`). `None` means "not that simple" —
    /// any other opcode, a problem of any kind, or more nesting than
    /// `max_depth` — and the caller decodes from the start with the full
    /// decoder, which gives the same value or the proper error.
    fn run_flat(&mut self) -> Option<Value> {
        let mut stack: Vec<(Value, usize)> = Vec::with_capacity(8);
        let mut marks: Vec<usize> = Vec::with_capacity(2);
        loop {
            let opcode = self.u8().ok()?;
            let scalar = match opcode {
                op::PROTO => {
                    if self.u8().ok()? > HIGHEST_PROTOCOL {
                        return None;
                    }
                    continue;
                }
                op::STOP => {
                    return match (stack.len(), marks.is_empty(), self.pos == self.data.len()) {
                        (1, true, true) => stack.pop().map(|(v, _)| v),
                        _ => None,
                    };
                }
                op::MARK => {
                    marks.push(stack.len());
                    continue;
                }
                op::EMPTY_TUPLE | op::TUPLE | op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let from = match opcode {
                        op::EMPTY_TUPLE => stack.len(),
                        op::TUPLE => marks.pop()?,
                        _ => {
                            let n = usize::from(opcode - op::TUPLE1) + 1;
                            let base = marks.last().copied().unwrap_or(0);
                            stack.len().checked_sub(n).filter(|f| *f >= base)?
                        }
                    };
                    let depth = 1 + stack
                        .get(from..)?
                        .iter()
                        .map(|(_, d)| *d)
                        .max()
                        .unwrap_or(0);
                    if depth > self.max_depth {
                        return None;
                    }
                    let values: Vec<Value> = stack.drain(from..).map(|(v, _)| v).collect();
                    self.items_left = self.items_left.checked_sub(1)?;
                    stack.push((Value::Tuple(values), depth));
                    continue;
                }
                op::NONE => Value::None,
                op::NEWTRUE => Value::Bool(true),
                op::NEWFALSE => Value::Bool(false),
                op::BININT => Value::Int(i64::from(i32::from_le_bytes(self.array().ok()?))),
                op::BININT1 => Value::Int(i64::from(self.u8().ok()?)),
                op::BININT2 => Value::Int(i64::from(u16::from_le_bytes(self.array().ok()?))),
                op::SHORT_BINUNICODE | op::BINUNICODE => {
                    let n = if opcode == op::BINUNICODE {
                        self.u32_len().ok()?
                    } else {
                        usize::from(self.u8().ok()?)
                    };
                    let b = self.take(n).ok()?;
                    Value::Str(std::str::from_utf8(b).ok()?.to_owned())
                }
                op::SHORT_BINBYTES | op::BINBYTES => {
                    let n = if opcode == op::BINBYTES {
                        self.u32_len().ok()?
                    } else {
                        usize::from(self.u8().ok()?)
                    };
                    let b = self.take(n).ok()?;
                    Value::Bytes(self.bytes_of(b))
                }
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let n = if opcode == op::BINSTRING {
                        self.i32_len().ok()?
                    } else {
                        usize::from(self.u8().ok()?)
                    };
                    let b = self.take(n).ok()?;
                    Value::PyStr(self.bytes_of(b))
                }
                _ => return None,
            };
            self.items_left = self.items_left.checked_sub(1)?;
            stack.push((scalar, 0));
        }
    }

    fn stop(mut self) -> Result<Value, PickleError> {
        let slot = self.pop_slot()?;
        if !self.stack.is_empty() || !self.marks.is_empty() {
            return Err(self.invalid("stack not empty at STOP"));
        }
        if self.pos != self.data.len() {
            return Err(PickleError::TrailingData {
                offset: self.pos,
                count: self.data.len() - self.pos,
            });
        }
        Ok(slot.value)
    }

    fn step(&mut self, opcode: u8) -> Result<(), PickleError> {
        match opcode {
            op::PROTO => {
                let proto = self.u8()?;
                if proto > HIGHEST_PROTOCOL {
                    return Err(PickleError::UnsupportedProtocol {
                        proto,
                        offset: self.op_offset,
                    });
                }
            }
            op::FRAME => {
                // Framing is only a buffering hint; the frame must be there.
                let n = self.u64_len()?;
                if n > self.data.len() - self.pos {
                    return Err(PickleError::Truncated {
                        offset: self.pos,
                        needed: n - (self.data.len() - self.pos),
                    });
                }
            }
            op::MARK => self.marks.push(self.stack.len()),
            op::POP => {
                if self.stack.len() > self.base() {
                    self.pop_item()?;
                } else {
                    // CPython pops the MARK when nothing is above it.
                    self.pop_mark_items()?;
                }
            }
            op::POP_MARK => {
                self.pop_mark_items()?;
            }
            op::DUP => {
                let slot = self.top_mut()?;
                slot.shared = true;
                let (value, depth, weight) = (slot.value.clone(), slot.depth, slot.weight);
                self.charge(weight)?;
                self.push(value, depth, weight)?;
                if let Some(top) = self.stack.last_mut() {
                    top.shared = true;
                }
            }

            // -- scalars ----------------------------------------------------
            op::NONE => self.push_scalar(Value::None)?,
            op::NEWTRUE => self.push_scalar(Value::Bool(true))?,
            op::NEWFALSE => self.push_scalar(Value::Bool(false))?,
            op::INT => {
                let line = self.line()?;
                let v = match line {
                    // Protocol 0/1 booleans.
                    b"01" => Value::Bool(true),
                    b"00" => Value::Bool(false),
                    _ => parse_decimal(line).ok_or_else(|| self.invalid("bad INT literal"))?,
                };
                self.push_scalar(v)?;
            }
            op::LONG => {
                let line = self.line()?;
                let digits = line.strip_suffix(b"L").unwrap_or(line);
                let v = parse_decimal(digits).ok_or_else(|| self.invalid("bad LONG literal"))?;
                self.push_scalar(v)?;
            }
            op::BININT => {
                let v = i32::from_le_bytes(self.array()?);
                self.push_scalar(Value::Int(i64::from(v)))?;
            }
            op::BININT1 => {
                let v = self.u8()?;
                self.push_scalar(Value::Int(i64::from(v)))?;
            }
            op::BININT2 => {
                let v = u16::from_le_bytes(self.array()?);
                self.push_scalar(Value::Int(i64::from(v)))?;
            }
            op::LONG1 => {
                let n = usize::from(self.u8()?);
                let b = self.take(n)?;
                self.push_scalar(int_from_le_twos(b))?;
            }
            op::LONG4 => {
                let n = self.i32_len()?;
                if n > MAX_LONG_BYTES {
                    return Err(self.invalid("LONG4 integer too long"));
                }
                let b = self.take(n)?;
                self.push_scalar(int_from_le_twos(b))?;
            }
            op::FLOAT => {
                let line = self.line()?;
                let v = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .ok_or_else(|| self.invalid("bad FLOAT literal"))?;
                self.push_scalar(Value::Float(v))?;
            }
            op::BINFLOAT => {
                let v = f64::from_be_bytes(self.array()?);
                self.push_scalar(Value::Float(v))?;
            }

            // -- bytes and strings ------------------------------------------
            op::SHORT_BINBYTES => {
                let n = usize::from(self.u8()?);
                let b = self.take(n)?;
                self.push_scalar(Value::Bytes(self.bytes_of(b)))?;
            }
            op::BINBYTES => {
                let n = self.u32_len()?;
                let b = self.take(n)?;
                self.push_scalar(Value::Bytes(self.bytes_of(b)))?;
            }
            op::BINBYTES8 => {
                let n = self.u64_len()?;
                let b = self.take(n)?;
                self.push_scalar(Value::Bytes(self.bytes_of(b)))?;
            }
            op::SHORT_BINSTRING => {
                let n = usize::from(self.u8()?);
                let b = self.take(n)?;
                self.push_scalar(Value::PyStr(self.bytes_of(b)))?;
            }
            op::BINSTRING => {
                let n = self.i32_len()?;
                let b = self.take(n)?;
                self.push_scalar(Value::PyStr(self.bytes_of(b)))?;
            }
            op::STRING => {
                let line = self.line()?;
                let v = unquote_string(line).map_err(|e| self.invalid(e))?;
                self.push_scalar(Value::PyStr(Bytes::from(v)))?;
            }
            op::SHORT_BINUNICODE => {
                let n = usize::from(self.u8()?);
                let b = self.take(n)?;
                let s = self.utf8(b)?;
                self.push_scalar(Value::Str(s))?;
            }
            op::BINUNICODE => {
                let n = self.u32_len()?;
                let b = self.take(n)?;
                let s = self.utf8(b)?;
                self.push_scalar(Value::Str(s))?;
            }
            op::BINUNICODE8 => {
                let n = self.u64_len()?;
                let b = self.take(n)?;
                let s = self.utf8(b)?;
                self.push_scalar(Value::Str(s))?;
            }
            op::UNICODE => {
                let line = self.line()?;
                let s = raw_unicode_escape(line).map_err(|e| self.invalid(e))?;
                self.push_scalar(Value::Str(s))?;
            }

            // -- containers -------------------------------------------------
            op::EMPTY_TUPLE => self.push(Value::Tuple(Vec::new()), 1, 1)?,
            op::EMPTY_LIST => self.push(Value::List(Vec::new()), 1, 1)?,
            op::EMPTY_DICT => self.push(Value::Dict(Vec::new()), 1, 1)?,
            op::EMPTY_SET => self.push(Value::List(Vec::new()), 1, 1)?,
            op::TUPLE | op::LIST | op::FROZENSET => {
                let (values, depth, weight) = self.pop_mark_values()?;
                let v = if opcode == op::TUPLE {
                    Value::Tuple(values)
                } else {
                    Value::List(values)
                };
                self.push(v, depth, weight)?;
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = usize::from(opcode - op::TUPLE1) + 1;
                if self.stack.len() < self.base() + n {
                    return Err(self.underflow());
                }
                let (values, depth, weight) = self.take_values(self.stack.len() - n)?;
                self.push(Value::Tuple(values), depth, weight)?;
            }
            op::DICT => {
                let items = self.pop_mark_items()?;
                self.push_dict(items)?;
            }
            op::APPEND => {
                let item = self.pop_item()?;
                self.extend_list(vec![item], "APPEND")?;
            }
            op::APPENDS => {
                let items = self.pop_mark_items()?;
                self.extend_list(items, "APPENDS")?;
            }
            op::ADDITEMS => {
                let items = self.pop_mark_items()?;
                self.extend_list(items, "ADDITEMS")?;
            }
            op::SETITEM => {
                let value = self.pop_item()?;
                let key = self.pop_item()?;
                self.extend_dict(vec![key, value], "SETITEM")?;
            }
            op::SETITEMS => {
                let items = self.pop_mark_items()?;
                self.extend_dict(items, "SETITEMS")?;
            }

            // -- memo -------------------------------------------------------
            op::PUT => {
                let key = self.memo_key_text()?;
                self.memo_put(key)?;
            }
            op::BINPUT => {
                let key = self.u8()?;
                self.memo_put(u64::from(key))?;
            }
            op::LONG_BINPUT => {
                let key = u32::from_le_bytes(self.array()?);
                self.memo_put(u64::from(key))?;
            }
            op::MEMOIZE => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?;
            }
            op::GET => {
                let key = self.memo_key_text()?;
                self.memo_get(key)?;
            }
            op::BINGET => {
                let key = self.u8()?;
                self.memo_get(u64::from(key))?;
            }
            op::LONG_BINGET => {
                let key = u32::from_le_bytes(self.array()?);
                self.memo_get(u64::from(key))?;
            }

            // -- objects: recorded, never evaluated -------------------------
            op::GLOBAL => {
                let module = self.line_utf8()?.to_owned();
                let name = self.line_utf8()?.to_owned();
                self.push_scalar(Value::Global { module, name })?;
            }
            op::STACK_GLOBAL => {
                let name = self.pop_item()?;
                let module = self.pop_item()?;
                let (Some(module), Some(name)) = (module.value.as_text(), name.value.as_text())
                else {
                    return Err(self.invalid("STACK_GLOBAL needs text module and name"));
                };
                let global = Value::Global {
                    module: module.into_owned(),
                    name: name.into_owned(),
                };
                self.push_scalar(global)?;
            }
            op::REDUCE | op::NEWOBJ => {
                let args = self.pop_item()?;
                let callable = self.pop_item()?;
                if opcode == op::REDUCE
                    && let Some(b) = zodbpickle_binary(&callable.value, &args.value)
                {
                    self.push_scalar(Value::Bytes(b))?;
                } else {
                    self.push_opaque(vec![callable, args])?;
                }
            }
            op::NEWOBJ_EX => {
                let kwargs = self.pop_item()?;
                let args = self.pop_item()?;
                let cls = self.pop_item()?;
                self.push_opaque(vec![cls, args, kwargs])?;
            }
            op::BUILD => {
                // The object stays where it is (memo entries keep pointing at
                // it); it becomes Opaque((object, state)).
                let state = self.pop_item()?;
                let max_depth = self.max_depth;
                let offset = self.op_offset;
                let slot = self.top_mut()?;
                let depth = slot.depth.max(state.depth) + 2;
                if depth > max_depth {
                    return Err(PickleError::TooDeep { offset, max_depth });
                }
                let obj = std::mem::replace(&mut slot.value, Value::None);
                slot.value = Value::Opaque(Box::new(Value::Tuple(vec![obj, state.value])));
                slot.depth = depth;
                slot.weight = slot.weight.saturating_add(state.weight).saturating_add(2);
            }
            op::INST => {
                let module = self.line_utf8()?.to_owned();
                let name = self.line_utf8()?.to_owned();
                let items = self.pop_mark_items()?;
                let global = Value::Global { module, name };
                let gw = scalar_weight(&global);
                let (args, depth, weight) = collect(items);
                let parts = vec![
                    Item {
                        value: global,
                        depth: 0,
                        weight: gw,
                    },
                    Item {
                        value: Value::Tuple(args),
                        depth,
                        weight,
                    },
                ];
                self.push_opaque(parts)?;
            }
            op::OBJ => {
                let mut items = self.pop_mark_items()?.into_iter();
                let Some(cls) = items.next() else {
                    return Err(self.invalid("OBJ without a class"));
                };
                let (args, depth, weight) = collect(items.collect());
                let args = Item {
                    value: Value::Tuple(args),
                    depth,
                    weight,
                };
                self.push_opaque(vec![cls, args])?;
            }
            op::PERSID | op::BINPERSID => {
                return Err(PickleError::PersistentId {
                    offset: self.op_offset,
                });
            }
            _ => {
                return Err(PickleError::UnsupportedOpcode {
                    opcode,
                    offset: self.op_offset,
                });
            }
        }
        Ok(())
    }
}

/// The bytes of a `zodbpickle.binary` written below protocol 3, where
/// that `str` subclass (what ZODB 5 on Python 2 has for oids read from
/// references in protocol-3 records) cannot be `SHORT_BINBYTES`: a ZEO 5.1
/// client on Python 2 pickles it as `GLOBAL zodbpickle binary` applied to
/// a py2 `str` (`REDUCE`), or as copy_reg's default reduction
/// `copy_reg._reconstructor(zodbpickle.binary, __builtin__.str, data)`.
/// Both only ever build plain bytes, so they decode to [`Value::Bytes`]
/// (the stock server's `server_find_global` allows exactly these modules);
/// any other callable stays [`Value::Opaque`], nothing is resolved.
fn zodbpickle_binary(callable: &Value, args: &Value) -> Option<Bytes> {
    let is = |v: &Value, m: &str, n: &str| matches!(v, Value::Global { module, name } if module == m && name == n);
    let Value::Tuple(args) = args else {
        return None;
    };
    let data = match args.as_slice() {
        [data] if is(callable, "zodbpickle", "binary") => data,
        [class, base, data]
            if is(callable, "copy_reg", "_reconstructor")
                && is(class, "zodbpickle", "binary")
                && is(base, "__builtin__", "str") =>
        {
            data
        }
        _ => return None,
    };
    match data {
        Value::PyStr(b) | Value::Bytes(b) => Some(b.clone()),
        _ => None,
    }
}

/// The values of `items`, the depth of a container holding them and its
/// weight.
fn collect(items: Vec<Item>) -> (Vec<Value>, usize, usize) {
    let mut depth = 1;
    let mut weight = 1usize;
    let mut values = Vec::with_capacity(items.len());
    for it in items {
        depth = depth.max(it.depth + 1);
        weight = weight.saturating_add(it.weight);
        values.push(it.value);
    }
    (values, depth, weight)
}

/// Drops redundant sign bytes from a little-endian two's-complement integer.
fn minimal_twos(b: &[u8]) -> &[u8] {
    let mut n = b.len();
    while n > 1 {
        let (top, next) = (b[n - 1], b[n - 2]);
        let redundant = (top == 0x00 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0);
        if !redundant {
            break;
        }
        n -= 1;
    }
    if n == 1 && b[0] == 0 {
        n = 0;
    }
    &b[..n]
}

/// `LONG1`/`LONG4` payload to a value: `Int` when it fits in `i64`.
fn int_from_le_twos(b: &[u8]) -> Value {
    let b = minimal_twos(b);
    if b.len() <= 8 {
        let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut buf = if negative { [0xff; 8] } else { [0; 8] };
        buf[..b.len()].copy_from_slice(b);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(b.to_vec())
    }
}

/// A decimal integer literal (`INT`, `LONG`), optionally signed, surrounded
/// by optional whitespace; `None` if malformed or longer than
/// [`MAX_INT_DIGITS`].
fn parse_decimal(text: &[u8]) -> Option<Value> {
    let t = text.trim_ascii();
    let (negative, digits) = match t.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, t),
    };
    if digits.is_empty() || digits.len() > MAX_INT_DIGITS || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    if let Some(i) = std::str::from_utf8(t)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        return Some(Value::Int(i));
    }
    // Arbitrary precision: magnitude in 32-bit little-endian limbs.
    let mut limbs: Vec<u32> = Vec::new();
    for &d in digits {
        let mut carry = u64::from(d - b'0');
        for limb in limbs.iter_mut() {
            let x = u64::from(*limb) * 10 + carry;
            *limb = x as u32;
            carry = x >> 32;
        }
        if carry != 0 {
            limbs.push(carry as u32);
        }
    }
    let mut bytes: Vec<u8> = limbs.iter().flat_map(|l| l.to_le_bytes()).collect();
    bytes.push(0); // room for the sign bit
    if negative {
        let mut carry = true;
        for b in bytes.iter_mut() {
            let (v, c) = (!*b).overflowing_add(u8::from(carry));
            *b = v;
            carry = c;
        }
    }
    Some(int_from_le_twos(&bytes))
}

/// The argument of `STRING`: a quoted Python `repr`, decoded like
/// `codecs.escape_decode`.
fn unquote_string(line: &[u8]) -> Result<Vec<u8>, &'static str> {
    let inner = match line {
        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
        _ => return Err("the STRING opcode argument must be quoted"),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while let Some(&c) = inner.get(i) {
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = inner.get(i) else {
            return Err("trailing \\ in STRING");
        };
        i += 1;
        match e {
            b'\n' => {}
            b'\\' | b'\'' | b'"' => out.push(e),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8); // Python also keeps only the low byte
            }
            b'x' => {
                let hex = inner.get(i..i + 2).ok_or("invalid \\x escape in STRING")?;
                let s = std::str::from_utf8(hex).map_err(|_| "invalid \\x escape in STRING")?;
                let v = u8::from_str_radix(s, 16).map_err(|_| "invalid \\x escape in STRING")?;
                out.push(v);
                i += 2;
            }
            // Unknown escapes are kept verbatim, as escape_decode does.
            _ => {
                out.push(b'\\');
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// The argument of `UNICODE`: Python's `raw-unicode-escape` (bytes are
/// Latin-1 characters; `\uXXXX`/`\UXXXXXXXX` after an odd number of
/// backslashes are escapes).
fn raw_unicode_escape(line: &[u8]) -> Result<String, &'static str> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while let Some(&c) = line.get(i) {
        if c != b'\\' {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let run = line[i..].iter().take_while(|&&b| b == b'\\').count();
        for _ in 0..run {
            out.push('\\');
        }
        i += run;
        let width = match line.get(i) {
            Some(b'u') if run % 2 == 1 => 4,
            Some(b'U') if run % 2 == 1 => 8,
            _ => continue,
        };
        out.pop(); // that last backslash starts the escape
        let hex = line
            .get(i + 1..i + 1 + width)
            .ok_or("truncated \\u escape in UNICODE")?;
        let s = std::str::from_utf8(hex).map_err(|_| "bad \\u escape in UNICODE")?;
        let code = u32::from_str_radix(s, 16).map_err(|_| "bad \\u escape in UNICODE")?;
        out.push(char::from_u32(code).ok_or("\\u escape is not a Unicode scalar value")?);
        i += 1 + width;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

/// A whole pickle of `v`: `PROTO 3` (none for [`Dialect::Py2Protocol1`]),
/// the value, `STOP`.
pub fn encode(v: &Value, dialect: Dialect) -> Bytes {
    let mut out = BytesMut::new();
    put_proto(&mut out, dialect);
    encode_into(&mut out, v, dialect);
    out.put_u8(op::STOP);
    out.freeze()
}

enum Task<'a> {
    Save(&'a Value),
    Op(u8),
}

/// Appends the opcodes for `v` (no `PROTO`, no `STOP`) exactly as the stock
/// server's pickler writes them: zodbpickle's C `Pickler(f, 3)` with
/// `fast = 1` (no memo), including the C pickler's batching of lists and
/// dicts (`batch_list_exact`, `batch_dict_exact`); in
/// [`Dialect::Py2Protocol1`], as cPickle 2.7's `Pickler(1)` does (the same
/// batching, protocol-1 scalars and tuples).
///
/// [`Value::Global`] and [`Value::Opaque`] are written as `None`: the
/// server never sends them, and writing them would mean emitting `GLOBAL`.
///
/// Iterative, so any nesting depth is fine. Scalars and small tuples of
/// scalars (most replies) are written without the work list, so without
/// an allocation.
pub fn encode_into(out: &mut BytesMut, v: &Value, dialect: Dialect) {
    if encode_scalar(out, v, dialect) {
        return;
    }
    if let Value::Tuple(items) = v
        && (1..=3).contains(&items.len())
        && items.iter().all(Value::is_scalar)
    {
        open_tuple(out, items.len(), dialect);
        for item in items {
            encode_scalar(out, item, dialect);
        }
        close_tuple(out, items.len(), dialect);
        return;
    }
    let mut tasks: Vec<Task<'_>> = vec![Task::Save(v)];
    while let Some(task) = tasks.pop() {
        let v = match task {
            Task::Op(o) => {
                out.put_u8(o);
                continue;
            }
            Task::Save(v) => v,
        };
        if encode_scalar(out, v, dialect) {
            continue;
        }
        match v {
            Value::Tuple(items) => match items.len() {
                0 => out.put_u8(op::EMPTY_TUPLE),
                n @ 1..=3 if !dialect.is_protocol1() => {
                    tasks.push(Task::Op(op::TUPLE1 + (n as u8 - 1)));
                    tasks.extend(items.iter().rev().map(Task::Save));
                }
                _ => {
                    // Protocol 1 has only MARK ... TUPLE (cPickle's
                    // save_tuple below protocol 2).
                    out.put_u8(op::MARK);
                    tasks.push(Task::Op(op::TUPLE));
                    tasks.extend(items.iter().rev().map(Task::Save));
                }
            },
            Value::List(items) => {
                out.put_u8(op::EMPTY_LIST);
                if let [item] = items.as_slice() {
                    tasks.push(Task::Op(op::APPEND));
                    tasks.push(Task::Save(item));
                } else if !items.is_empty() {
                    // batch_list_exact: MARK up to 1000 items APPENDS, also
                    // for a last batch of one.
                    let chunks: Vec<&[Value]> = items.chunks(BATCH_SIZE).collect();
                    for chunk in chunks.into_iter().rev() {
                        tasks.push(Task::Op(op::APPENDS));
                        tasks.extend(chunk.iter().rev().map(Task::Save));
                        tasks.push(Task::Op(op::MARK));
                    }
                }
            }
            Value::Dict(pairs) => {
                out.put_u8(op::EMPTY_DICT);
                if let [(k, v)] = pairs.as_slice() {
                    tasks.push(Task::Op(op::SETITEM));
                    tasks.push(Task::Save(v));
                    tasks.push(Task::Save(k));
                } else if !pairs.is_empty() {
                    // batch_dict_exact loops while the last batch was full,
                    // so a multiple of 1000 pairs ends with an empty
                    // MARK SETITEMS.
                    if pairs.len().is_multiple_of(BATCH_SIZE) {
                        tasks.push(Task::Op(op::SETITEMS));
                        tasks.push(Task::Op(op::MARK));
                    }
                    let chunks: Vec<&[(Value, Value)]> = pairs.chunks(BATCH_SIZE).collect();
                    for chunk in chunks.into_iter().rev() {
                        tasks.push(Task::Op(op::SETITEMS));
                        for (k, v) in chunk.iter().rev() {
                            tasks.push(Task::Save(v));
                            tasks.push(Task::Save(k));
                        }
                        tasks.push(Task::Op(op::MARK));
                    }
                }
            }
            _ => unreachable!("scalars are written by encode_scalar"),
        }
    }
}

/// Writes `v` if it is a scalar (anything but a tuple, list or dict) and
/// says whether it did.
fn encode_scalar(out: &mut BytesMut, v: &Value, dialect: Dialect) -> bool {
    match v {
        Value::None | Value::Global { .. } | Value::Opaque(_) => out.put_u8(op::NONE),
        // cPickle's save_bool below protocol 2.
        Value::Bool(true) if dialect.is_protocol1() => out.put_slice(b"I01\n"),
        Value::Bool(false) if dialect.is_protocol1() => out.put_slice(b"I00\n"),
        Value::Bool(true) => out.put_u8(op::NEWTRUE),
        Value::Bool(false) => out.put_u8(op::NEWFALSE),
        Value::Int(i) if dialect.is_protocol1() => put_int_protocol1(out, *i),
        Value::Int(i) => put_int(out, *i),
        Value::BigInt(b) if dialect.is_protocol1() => put_long_text(out, b),
        Value::BigInt(b) => put_long(out, b),
        Value::Float(f) => {
            out.put_u8(op::BINFLOAT);
            out.put_f64(*f); // big-endian, as struct.pack('>d')
        }
        Value::Bytes(b) => encode_bytes_into(out, b, dialect),
        Value::PyStr(b) => put_binstring(out, b),
        Value::Str(s) => encode_str_into(out, s, dialect),
        Value::Tuple(_) | Value::List(_) | Value::Dict(_) => return false,
    }
    true
}

/// Appends bytes as [`Value::Bytes`] is written (without building a
/// `Value`, so without a copy or a reference count).
pub fn encode_bytes_into(out: &mut BytesMut, b: &[u8], dialect: Dialect) {
    match dialect {
        Dialect::Py3 => put_binbytes(out, b),
        Dialect::Py2 | Dialect::Py2Protocol1 => put_binstring(out, b),
    }
}

/// Appends `PROTO 3`, unless `dialect` is [`Dialect::Py2Protocol1`]
/// (protocol 0/1 pickles have no `PROTO`).
pub fn put_proto(out: &mut BytesMut, dialect: Dialect) {
    if !dialect.is_protocol1() {
        out.put_slice(&[op::PROTO, 3]);
    }
}

/// Begins a tuple of `n` items that are written next, ended by
/// [`close_tuple`]: a `MARK`, unless `TUPLE1`..`TUPLE3` or `EMPTY_TUPLE`
/// will do (protocol 3, as the C pickler's `save_tuple`).
pub fn open_tuple(out: &mut BytesMut, n: usize, dialect: Dialect) {
    if n > 3 || (n > 0 && dialect.is_protocol1()) {
        out.put_u8(op::MARK);
    }
}

/// Ends a tuple begun by [`open_tuple`] after its `n` items.
pub fn close_tuple(out: &mut BytesMut, n: usize, dialect: Dialect) {
    match n {
        0 => out.put_u8(op::EMPTY_TUPLE),
        1..=3 if !dialect.is_protocol1() => out.put_u8(op::TUPLE1 + (n as u8 - 1)),
        _ => out.put_u8(op::TUPLE),
    }
}

/// Roughly how many bytes `v` encodes to, to size an output buffer once:
/// exact enough for flat values, a guess for nested ones (never walks
/// deeper than one level, so it costs nothing on hostile input).
pub fn size_hint(v: &Value) -> usize {
    fn flat(v: &Value) -> usize {
        match v {
            Value::Bytes(b) | Value::PyStr(b) => 5 + b.len(),
            Value::Str(s) => 5 + s.len(),
            Value::BigInt(b) => 5 + b.len(),
            Value::Tuple(_) | Value::List(_) | Value::Dict(_) => 32,
            _ => 9,
        }
    }
    match v {
        Value::Tuple(items) | Value::List(items) => 2 + items.iter().map(flat).sum::<usize>(),
        Value::Dict(pairs) => 3 + pairs.iter().map(|(k, v)| flat(k) + flat(v)).sum::<usize>(),
        other => flat(other),
    }
}

/// Appends text as [`Value::Str`] is written (without building a `Value`).
pub fn encode_str_into(out: &mut BytesMut, s: &str, dialect: Dialect) {
    match dialect {
        Dialect::Py2 | Dialect::Py2Protocol1 if s.is_ascii() => put_binstring(out, s.as_bytes()),
        _ => put_binunicode(out, s),
    }
}

fn put_int(out: &mut BytesMut, i: i64) {
    if let Ok(b) = u8::try_from(i) {
        out.put_slice(&[op::BININT1, b]);
    } else if let Ok(h) = u16::try_from(i) {
        out.put_u8(op::BININT2);
        out.put_u16_le(h);
    } else if let Ok(w) = i32::try_from(i) {
        out.put_u8(op::BININT);
        out.put_i32_le(w);
    } else {
        // Python's encode_long: minimal two's complement, little-endian.
        put_long(out, minimal_twos(&i.to_le_bytes()));
    }
}

/// An int as cPickle 2.7 writes a Python 2 `int` (64-bit) below protocol
/// 2: `BININT1`/`BININT2`/`BININT` within 32 bits, else an `INT` decimal
/// line.
fn put_int_protocol1(out: &mut BytesMut, i: i64) {
    if i32::try_from(i).is_ok() {
        put_int(out, i);
    } else {
        out.put_u8(op::INT);
        out.put_slice(i.to_string().as_bytes());
        out.put_u8(b'\n');
    }
}

/// An integer beyond 64 bits (minimal two's-complement little-endian) as
/// cPickle writes a `long` below protocol 2: `LONG` decimal digits, `L`,
/// newline.
fn put_long_text(out: &mut BytesMut, b: &[u8]) {
    out.put_u8(op::LONG);
    out.put_slice(twos_to_decimal(b).as_bytes());
    out.put_slice(b"L\n");
}

/// Decimal text of a little-endian two's-complement integer of any size.
fn twos_to_decimal(b: &[u8]) -> String {
    let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
    // Magnitude, little-endian.
    let mut mag: Vec<u8> = b.to_vec();
    if negative {
        let mut carry = true;
        for x in mag.iter_mut() {
            let (v, c) = (!*x).overflowing_add(u8::from(carry));
            *x = v;
            carry = c;
        }
    }
    // Repeated division by 10^9 over big-endian 32-bit limbs.
    let mut limbs: Vec<u32> = mag
        .chunks(4)
        .rev()
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect();
    let mut parts: Vec<u32> = Vec::new();
    while limbs.iter().any(|&l| l != 0) {
        let mut rem = 0u64;
        for l in limbs.iter_mut() {
            let cur = (rem << 32) | u64::from(*l);
            *l = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        parts.push(rem as u32);
    }
    let mut text = String::new();
    if negative {
        text.push('-');
    }
    match parts.split_last() {
        None => text.push('0'),
        Some((top, rest)) => {
            text.push_str(&top.to_string());
            for p in rest.iter().rev() {
                text.push_str(&format!("{p:09}"));
            }
        }
    }
    text
}

fn put_long(out: &mut BytesMut, b: &[u8]) {
    if let Ok(n) = u8::try_from(b.len()) {
        out.put_slice(&[op::LONG1, n]);
    } else {
        out.put_u8(op::LONG4);
        out.put_u32_le(b.len() as u32);
    }
    out.put_slice(b);
}

fn put_binbytes(out: &mut BytesMut, b: &[u8]) {
    if let Ok(n) = u8::try_from(b.len()) {
        out.put_slice(&[op::SHORT_BINBYTES, n]);
    } else {
        out.put_u8(op::BINBYTES);
        out.put_u32_le(b.len() as u32);
    }
    out.put_slice(b);
}

fn put_binstring(out: &mut BytesMut, b: &[u8]) {
    if let Ok(n) = u8::try_from(b.len()) {
        out.put_slice(&[op::SHORT_BINSTRING, n]);
    } else {
        out.put_u8(op::BINSTRING);
        out.put_u32_le(b.len() as u32);
    }
    out.put_slice(b);
}

fn put_binunicode(out: &mut BytesMut, s: &str) {
    // Protocol 3 has no SHORT_BINUNICODE: always BINUNICODE with a u32 length.
    out.put_u8(op::BINUNICODE);
    out.put_u32_le(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// Hex helpers shared by the codec's unit tests.
#[cfg(test)]
pub(crate) mod testhex {
    /// Bytes from hex digits; white space is ignored.
    pub fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testhex::{hex, unhex};
    use super::*;

    fn dec(b: &[u8]) -> Result<Value, PickleError> {
        decode(b, &DecodeLimits::default())
    }

    fn dec_hex(s: &str) -> Result<Value, PickleError> {
        dec(&unhex(s))
    }

    /// Found by the `envelope` fuzzer (its first run): a NaN float made the
    /// two decoders' results look different, because NaN != NaN; they agree
    /// (the fuzzer now compares them as text). The full decoder takes the
    /// float (the fast path does not handle `BINFLOAT`).
    #[test]
    fn fuzz_regression_nan_in_a_message() {
        let p = unhex("80 03 28 4b 20 89 58 04 00 00 00 7061636b 47 7ff8000000000000 29 74 2e");
        let limits = DecodeLimits::default();
        let fast = decode(&p, &limits);
        assert_eq!(
            format!("{fast:?}"),
            format!("{:?}", decode_full(&p, &limits))
        );
        assert!(
            matches!(fast, Ok(Value::Tuple(ref t)) if matches!(t[3], Value::Float(f) if f.is_nan()))
        );
    }

    /// The fast path and the full decoder agree on random opcode soup made
    /// mostly of what the fast path handles, plus memo and other opcodes
    /// that send it back to the full decoder, truncations and nesting past
    /// the depth limit.
    #[test]
    fn fast_path_agrees_with_the_full_decoder() {
        let mut rng = crate::rng::XorShift64::new(7);
        // Small limits, so the random strings reach them on both paths.
        let limits = DecodeLimits {
            max_depth: 6,
            max_items: 12,
        };
        let pieces: &[&[u8]] = &[
            b"(",
            b"(",
            b"t",
            b"\x85",
            b"\x86",
            b"\x87",
            b")",
            b"N",
            b"\x88",
            b"\x89",
            b"K\x05",
            b"M\x01\x02",
            b"J\xff\xff\xff\xff",
            b"X\x02\x00\x00\x00hi",
            b"\x8c\x01a",
            b"X\x01\x00\x00\x00\xff",
            b"C\x03abc",
            b"B\x01\x00\x00\x00z",
            b"U\x02py",
            b"T\x01\x00\x00\x00q",
            b"q\x00",
            b"h\x00",
            b"\x94",
            b"]",
            b"}",
            b"e",
            b"0",
            b"2",
            b"\x80\x03",
            b"\x80\x09",
            b"C\x09short",
            b"l",
            b"c",
        ];
        let mut fast_hits = 0;
        for _ in 0..20_000 {
            let mut p = Vec::new();
            if rng.below(4) > 0 {
                p.extend_from_slice(b"\x80\x03");
            }
            for _ in 0..rng.below(14) {
                p.extend_from_slice(pieces[rng.below(pieces.len())]);
            }
            if rng.below(8) > 0 {
                p.push(b'.');
            }
            let fast = decode(&p, &limits);
            assert_eq!(fast, decode_full(&p, &limits), "{}", hex(&p));
            fast_hits += usize::from(fast.is_ok());
        }
        assert!(fast_hits > 500, "only {fast_hits} pickles decoded");
    }

    fn enc(v: &Value) -> String {
        hex(&encode(v, Dialect::Py3))
    }

    fn enc2(v: &Value) -> String {
        hex(&encode(v, Dialect::Py2))
    }

    fn s(x: &str) -> Value {
        Value::str(x)
    }

    fn int(i: i64) -> Value {
        Value::Int(i)
    }

    fn pystr(b: &'static [u8]) -> Value {
        Value::PyStr(Bytes::from_static(b))
    }

    fn tuple(v: Vec<Value>) -> Value {
        Value::Tuple(v)
    }

    fn list(v: Vec<Value>) -> Value {
        Value::List(v)
    }

    fn is_invalid(r: Result<Value, PickleError>, needle: &str) -> bool {
        matches!(r, Err(PickleError::Invalid { ref reason, .. }) if reason.contains(needle))
    }

    // -- decoding: every protocol ------------------------------------------

    /// `{'a': [1, 2.5, None, True, False, 'é\\u', 2**70, -5, (1, 2, 3, 4),
    /// (), (7,)], 'b': {}, 'c': 'x\n\'"'}` as CPython 3.11 pickles it with
    /// protocols 0 to 4 (memo included).
    const SAMPLE: [&str; 5] = [
        "286470300a56610a70310a286c70320a49310a6146322e350a614e614930310a614930300a6156e95c7530\
         303563750a70330a614c313138303539313632303731373431313330333432344c0a61492d350a612849310a\
         49320a49330a49340a7470340a612874612849370a7470350a617356620a70360a286470370a7356630a7038\
         0a56785c753030306127220a70390a732e",
        "7d71002858010000006171015d7102284b014740040000000000004e4930310a4930300a5804000000c3a95c\
         7571034c313138303539313632303731373431313330333432344c0a4afbffffff284b014b024b034b047471\
         0429284b077471056558010000006271067d710758010000006371085804000000780a27227109752e",
        "80027d71002858010000006171015d7102284b014740040000000000004e88895804000000c3a95c7571038a\
         090000000000000000404afbffffff284b014b024b034b04747104294b078571056558010000006271067d71\
         0758010000006371085804000000780a27227109752e",
        "80037d71002858010000006171015d7102284b014740040000000000004e88895804000000c3a95c7571038a\
         090000000000000000404afbffffff284b014b024b034b04747104294b078571056558010000006271067d71\
         0758010000006371085804000000780a27227109752e",
        "80049553000000000000007d94288c0161945d94284b014740040000000000004e88898c04c3a95c75948a09\
         0000000000000000404afbffffff284b014b024b034b047494294b078594658c0162947d948c0163948c0478\
         0a272294752e",
    ];

    fn sample_value() -> Value {
        Value::Dict(vec![
            (
                s("a"),
                list(vec![
                    int(1),
                    Value::Float(2.5),
                    Value::None,
                    Value::Bool(true),
                    Value::Bool(false),
                    s("é\\u"),
                    Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40]),
                    int(-5),
                    tuple(vec![int(1), int(2), int(3), int(4)]),
                    tuple(vec![]),
                    tuple(vec![int(7)]),
                ]),
            ),
            (s("b"), Value::Dict(vec![])),
            (s("c"), s("x\n'\"")),
        ])
    }

    #[test]
    fn decodes_cpython_pickles_of_every_protocol() {
        for (proto, h) in SAMPLE.iter().enumerate() {
            assert_eq!(dec_hex(h), Ok(sample_value()), "protocol {proto}");
        }
    }

    #[test]
    fn zero_copy_decode_agrees_and_shares_the_buffer() {
        let data = Bytes::from(unhex("80035d28430461626364550265664b01652e"));
        let v = decode_bytes(&data, &DecodeLimits::default()).unwrap();
        assert_eq!(v, dec(&data).unwrap());
        let Value::List(items) = &v else { panic!() };
        let b = items[0].as_bytes().unwrap();
        let range = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        assert!(range.contains(&(b.as_ptr() as usize)));
    }

    #[test]
    fn scalars() {
        let cases: &[(&str, Value)] = &[
            ("4e2e", Value::None),
            ("882e", Value::Bool(true)),
            ("892e", Value::Bool(false)),
            ("4b052e", int(5)),
            ("4d34122e", int(0x1234)),
            ("4afeffffff2e", int(-2)),
            ("8a002e", int(0)),
            ("8a0205002e", int(5)), // non-minimal LONG1
            ("8a01ff2e", int(-1)),
            ("8a0800000000000000802e", int(i64::MIN)),
            (
                "8a09000000000000008000", /* 2**63 */
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
            ),
            ("8b0100000007" /* LONG4 */, int(7)),
            ("473ff80000000000002e", Value::Float(1.5)),
            ("46322e350a2e", Value::Float(2.5)),
            ("46696e660a2e", Value::Float(f64::INFINITY)),
            ("4303616263", Value::bytes(&b"abc"[..])),
            ("4203000000616263", Value::bytes(&b"abc"[..])),
            ("8e03000000000000006162632e", Value::bytes(&b"abc"[..])),
            ("5503616263", pystr(b"abc")),
            ("5403000000616263", pystr(b"abc")),
            ("5803000000616263", s("abc")),
            ("8c03616263", s("abc")),
            ("8d0300000000000000616263", s("abc")),
        ];
        for (h, want) in cases {
            // Some literals above leave the STOP out for brevity.
            let mut b = unhex(h);
            if b.last() != Some(&b'.') {
                b.push(b'.');
            }
            assert_eq!(dec(&b).as_ref(), Ok(want), "{h}");
        }
    }

    #[test]
    fn text_integers() {
        let cases: &[(&[u8], Value)] = &[
            (b"I01\n.", Value::Bool(true)),
            (b"I00\n.", Value::Bool(false)),
            (b"I0\n.", int(0)),
            (b"I1\n.", int(1)),
            (b"I-5\n.", int(-5)),
            (b"I140412254566928\n.", int(140412254566928)),
            (b"I9223372036854775807\n.", int(i64::MAX)),
            (b"I-9223372036854775808\n.", int(i64::MIN)),
            (
                b"I9223372036854775808\n.",
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
            ),
            (
                b"I-9223372036854775809\n.",
                Value::BigInt(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff]),
            ),
            (b"L5L\n.", int(5)),
            (b"L-5\n.", int(-5)),
            (
                b"L-18446744073709551616L\n.",
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            ),
            (
                b"L1180591620717411303424L\n.",
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40]),
            ),
        ];
        for (b, want) in cases {
            assert_eq!(dec(b).as_ref(), Ok(want), "{}", String::from_utf8_lossy(b));
        }
        assert!(is_invalid(dec(b"Iabc\n."), "INT"));
        assert!(is_invalid(dec(b"I\n."), "INT"));
        assert!(is_invalid(dec(b"L--1L\n."), "LONG"));
        let mut long = b"I".to_vec();
        long.extend(std::iter::repeat_n(b'9', MAX_INT_DIGITS + 1));
        long.extend(b"\n.");
        assert!(is_invalid(dec(&long), "INT"));
        // LONG4 has a bound of the same size: 416 bytes pass, 417 do not (a
        // protocol-1 reply writes the msgid back in decimal, which is
        // quadratic in its length).
        for (n, ok) in [
            (MAX_LONG_BYTES, true),
            (MAX_LONG_BYTES + 1, false),
            (1 << 20, false),
        ] {
            let mut p = vec![op::LONG4];
            p.extend((n as i32).to_le_bytes());
            p.extend(std::iter::repeat_n(0x11, n));
            p.push(op::STOP);
            assert_eq!(dec(&p).is_ok(), ok, "LONG4 of {n} bytes");
            if !ok {
                assert!(is_invalid(dec(&p), "LONG4"));
            }
        }
        // A big one survives a round trip through LONG1.
        let mut big = b"I".to_vec();
        big.extend(std::iter::repeat_n(b'7', 300));
        big.extend(b"\n.");
        let v = dec(&big).unwrap();
        assert!(matches!(v, Value::BigInt(ref b) if b.len() == 125));
        assert_eq!(dec(&encode(&v, Dialect::Py3)), Ok(v));
    }

    #[test]
    fn text_strings() {
        assert_eq!(dec(b"S'abc'\n."), Ok(pystr(b"abc")));
        assert_eq!(dec(b"S\"a'b\"\n."), Ok(pystr(b"a'b")));
        assert_eq!(
            dec(br"S'\\\'\n\t\x41\101\0\q\xff'"
                .iter()
                .chain(b"\n.")
                .copied()
                .collect::<Vec<_>>()
                .as_slice()),
            Ok(Value::PyStr(Bytes::from_static(b"\\'\n\tAA\0\\q\xff")))
        );
        assert!(is_invalid(dec(b"Sabc\n."), "quoted"));
        assert!(is_invalid(dec(b"S'abc\"\n."), "quoted"));
        assert!(is_invalid(dec(b"S'\\x4'\n."), "\\x"));
        assert!(is_invalid(dec(b"S'ab\\'\n."), "trailing"));
        // raw-unicode-escape: Latin-1 bytes, \u escapes after an odd number
        // of backslashes only.
        assert_eq!(dec(b"V\xe9\\u005cu\n."), Ok(s("é\\u")));
        assert_eq!(dec(b"Vx\\u000a'\"\n."), Ok(s("x\n'\"")));
        assert_eq!(dec(b"V\\U0001F600\n."), Ok(s("😀")));
        assert_eq!(dec(b"V\\\\u0041\n."), Ok(s("\\\\u0041")));
        assert!(is_invalid(dec(b"V\\u12\n."), "\\u"));
        assert!(is_invalid(dec(b"V\\ud800\n."), "scalar"));
        assert!(is_invalid(dec(b"X\x02\0\0\0\xc3\x28."), "UTF-8"));
    }

    #[test]
    fn containers() {
        // MARK-based (protocol 0/1) and protocol-2 forms.
        assert_eq!(dec(b"(K\x01K\x02t."), Ok(tuple(vec![int(1), int(2)])));
        assert_eq!(dec(b"(K\x01K\x02l."), Ok(list(vec![int(1), int(2)])));
        assert_eq!(
            dec(b"(K\x01K\x02d."),
            Ok(Value::Dict(vec![(int(1), int(2))]))
        );
        assert!(is_invalid(dec(b"(K\x01d."), "odd"));
        assert_eq!(dec(b"K\x01\x85."), Ok(tuple(vec![int(1)])));
        assert_eq!(
            dec(b"K\x01K\x02K\x03\x87."),
            Ok(tuple(vec![int(1), int(2), int(3)]))
        );
        assert_eq!(
            dec(b"}K\x01K\x02s(K\x03K\x04K\x05K\x06u."),
            Ok(Value::Dict(vec![
                (int(1), int(2)),
                (int(3), int(4)),
                (int(5), int(6))
            ]))
        );
        assert!(is_invalid(dec(b"}(K\x03u."), "odd"));
        // sets and frozensets become lists
        assert_eq!(
            dec_hex("80049509000000000000008f94284b014b02902e"),
            Ok(list(vec![int(1), int(2)]))
        );
        assert_eq!(
            dec_hex("8004950600000000000000284b0391942e"),
            Ok(list(vec![int(3)]))
        );
        // APPEND onto something that is not a list
        assert!(is_invalid(dec(b"}K\x01a."), "APPEND onto a dict"));
        assert!(is_invalid(dec(b"]K\x01K\x02s."), "SETITEM onto a list"));
        assert!(is_invalid(dec(b"K\x01K\x02a."), "APPEND onto a int"));
    }

    #[test]
    fn stack_manipulation() {
        assert_eq!(dec(b"K\x01K\x020."), Ok(int(1)));
        assert_eq!(dec(b"K\x01(K\x02K\x031."), Ok(int(1)));
        // POP with nothing above the MARK pops the MARK (CPython)
        assert_eq!(dec(b"K\x01(0."), Ok(int(1)));
        assert_eq!(dec(b"K\x052\x86."), Ok(tuple(vec![int(5), int(5)])));
        // A duplicated list may not be mutated: the copies would diverge.
        assert!(is_invalid(dec(b"]2K\x01a\x86."), "referenced elsewhere"));
        assert_eq!(dec(b"]2\x86."), Ok(tuple(vec![list(vec![]), list(vec![])])));
    }

    #[test]
    fn memo() {
        // `a = [1]; [a, a]`, protocol 2 with memo: the GET sees the list as
        // it is when fetched, not as it was when memoized.
        let one = list(vec![int(1)]);
        assert_eq!(
            dec_hex("80025d7100285d71014b01616801652e"),
            Ok(list(vec![one.clone(), one.clone()]))
        );
        // protocol 4 MEMOIZE, and a GET after the object was consumed
        assert_eq!(
            dec_hex("80049515000000000000005d94285d944b016168017d948c016b94680173652e"),
            Ok(list(vec![
                one.clone(),
                one.clone(),
                Value::Dict(vec![(s("k"), one.clone())])
            ]))
        );
        // shared str, text PUT/GET
        assert_eq!(
            dec_hex("8003580500000068656c6c6f710068005d71016800618771022e"),
            Ok(tuple(vec![s("hello"), s("hello"), list(vec![s("hello")])]))
        );
        assert_eq!(dec(b"K\x07p3\n0g3\n."), Ok(int(7)));
        assert_eq!(
            dec(b"K\x07r\x00\x00\x01\x000j\x00\x00\x01\x00."),
            Ok(int(7))
        );
        // Recursive structures are refused rather than cut.
        for h in [
            "80025d71006800612e",                       // l = [l]
            "80027d7100580400000073656c6671016800732e", // d = {'self': d}
            "80025d71006800857101613068012e",           // t = ([t],)
        ] {
            assert!(is_invalid(dec_hex(h), "referenced elsewhere"), "{h}");
        }
        // Missing memo entries.
        assert_eq!(
            dec(b"h\x05."),
            Err(PickleError::MemoMissing { key: 5, offset: 0 })
        );
        assert_eq!(
            dec(b"N0j\x09\x00\x00\x00."),
            Err(PickleError::MemoMissing { key: 9, offset: 2 })
        );
        assert!(is_invalid(dec(b"Np-1\n."), "memo key"));
    }

    #[test]
    fn memo_and_dup_bombs_hit_the_copy_limit() {
        // x = None; 40 times: x = (x, x) via GET; 2**40 nodes if expanded.
        let mut p = b"Nq\x00".to_vec();
        for _ in 0..40 {
            p.extend(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        assert!(matches!(dec(&p), Err(PickleError::CopyLimit { .. })));
        // The same with DUP.
        let mut p = b"N".to_vec();
        for _ in 0..40 {
            p.extend(b"2\x86");
        }
        p.push(b'.');
        assert!(matches!(dec(&p), Err(PickleError::CopyLimit { .. })));
        // ... while 10 doublings are fine.
        let mut p = b"N".to_vec();
        for _ in 0..10 {
            p.extend(b"2\x86");
        }
        p.push(b'.');
        assert!(dec(&p).is_ok());
    }

    #[test]
    fn globals_are_recorded_never_resolved() {
        // builtins.eval('1+1') via GLOBAL + REDUCE
        let p = b"\x80\x03cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.";
        let v = dec(p).unwrap();
        assert_eq!(
            v,
            Value::Opaque(Box::new(tuple(vec![
                Value::Global {
                    module: "builtins".into(),
                    name: "eval".into()
                },
                tuple(vec![s("1+1")]),
            ])))
        );
        assert_eq!(v.forbidden_global().as_deref(), Some("builtins.eval"));
        assert!(v.is_truthy());
        assert_eq!(v.type_name(), "object");
        // Deep inside a message, and encoded as None if ever written.
        let msg = tuple(vec![
            int(1),
            Value::Bool(false),
            s("m"),
            tuple(vec![v.clone()]),
        ]);
        assert_eq!(msg.forbidden_global().as_deref(), Some("builtins.eval"));
        assert_eq!(enc(&v), "80034e2e");
        // STACK_GLOBAL, NEWOBJ, NEWOBJ_EX, BUILD, INST, OBJ
        let cases: &[(&[u8], &str)] = &[
            (b"\x80\x04\x8c\x02os\x8c\x06system\x93.", "os.system"),
            (b"\x80\x02cos\nsystem\n)\x81.", "os.system"),
            (b"\x80\x04cm\nC\n)}\x92.", "m.C"),
            (b"\x80\x02cm\nC\n)\x81}b.", "m.C"),
            (b"(K\x01im\nC\n.", "m.C"),
            (b"(cm\nC\nK\x01o.", "m.C"),
            // a dict subclass: SETITEM onto the opaque object is absorbed
            (
                b"\x80\x02ccollections\nOrderedDict\n)RX\x01\x00\x00\x00aK\x01s.",
                "collections.OrderedDict",
            ),
            // BUILD keeps the state, so globals there are found too
            (b"\x80\x02}cx\ny\nb.", "x.y"),
            (b"]cx\ny\na.", "x.y"),
        ];
        for (p, g) in cases {
            let v = dec(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert_eq!(v.forbidden_global().as_deref(), Some(*g), "{p:?}");
        }
        assert!(is_invalid(dec(b"(o."), "OBJ"));
        assert!(is_invalid(dec(b"K\x01K\x02\x93."), "STACK_GLOBAL"));
        // persistent ids are refused outright
        assert_eq!(
            dec(b"Pabc\n."),
            Err(PickleError::PersistentId { offset: 0 })
        );
        assert_eq!(
            dec(b"\x80\x03K\x01Q."),
            Err(PickleError::PersistentId { offset: 4 })
        );
    }

    #[test]
    fn unsupported_opcodes() {
        let e = dec(b"\x80\x02\x82\x01.").unwrap_err();
        assert_eq!(e.to_string(), "unsupported opcode 0x82 at offset 2");
        for op in [0x83u8, 0x84, 0x96, 0x97, 0x98, b'z', 0x00, 0xff] {
            assert!(
                matches!(dec(&[op, b'.']), Err(PickleError::UnsupportedOpcode { opcode, offset: 0 }) if opcode == op),
                "{op:#x}"
            );
        }
        assert_eq!(
            dec(b"\x80\x06N."),
            Err(PickleError::UnsupportedProtocol {
                proto: 6,
                offset: 0
            })
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(dec(b""), Err(PickleError::MissingStop));
        assert_eq!(dec(b"\x80\x03N"), Err(PickleError::MissingStop));
        assert_eq!(dec(b"."), Err(PickleError::StackUnderflow { offset: 0 }));
        assert_eq!(
            dec(b"N.x"),
            Err(PickleError::TrailingData {
                offset: 2,
                count: 1
            })
        );
        assert!(is_invalid(dec(b"NN."), "not empty"));
        assert!(is_invalid(dec(b"(N."), "not empty"));
        assert_eq!(dec(b"a."), Err(PickleError::StackUnderflow { offset: 0 }));
        assert_eq!(dec(b"t."), Err(PickleError::MissingMark { offset: 0 }));
        // Items below the innermost MARK are out of reach (CPython).
        assert_eq!(
            dec(b"](K\x01a."),
            Err(PickleError::StackUnderflow { offset: 4 })
        );
        assert_eq!(
            dec(b"N(\x85."),
            Err(PickleError::StackUnderflow { offset: 2 })
        );
    }

    #[test]
    fn huge_declared_lengths_fail_before_allocating() {
        let cases: &[&[u8]] = &[
            b"B\xff\xff\xff\xff",
            b"X\xff\xff\xff\xffab",
            b"\x8e\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x8d\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x95\xff\xff\xff\xff\xff\xff\xff\x7fN.",
            b"T\xff\xff\xff\x7f",
            b"\x8b\xff\xff\xff\x7f",
            b"C\xffabc",
        ];
        for p in cases {
            assert!(
                matches!(
                    dec(p),
                    Err(PickleError::Truncated { .. } | PickleError::Invalid { .. })
                ),
                "{p:?}: {:?}",
                dec(p)
            );
        }
        assert!(is_invalid(dec(b"T\xff\xff\xff\xff."), "negative"));
        assert!(is_invalid(dec(b"\x8b\xfe\xff\xff\xff."), "negative"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for h in SAMPLE {
            let full = unhex(h);
            for n in 0..full.len() {
                assert!(dec(&full[..n]).is_err(), "prefix {n} of {h}");
            }
        }
    }

    #[test]
    fn nesting_limit() {
        fn nested(n: usize) -> Vec<u8> {
            let mut p = vec![b']'; n];
            p.extend(std::iter::repeat_n(b'a', n - 1));
            p.push(b'.');
            p
        }
        assert!(dec(&nested(crate::config::DEFAULT_MAX_NESTING_DEPTH)).is_ok());
        assert!(matches!(
            dec(&nested(crate::config::DEFAULT_MAX_NESTING_DEPTH + 1)),
            Err(PickleError::TooDeep { max_depth: 64, .. })
        ));
        // The limit also applies to MARK-built containers and tuples.
        let mut p = vec![b'('; 70];
        p.extend(std::iter::repeat_n(b't', 70));
        p.push(b'.');
        assert!(matches!(dec(&p), Err(PickleError::TooDeep { .. })));
        let mut p = b")".to_vec();
        p.extend(std::iter::repeat_n(0x85, 100));
        p.push(b'.');
        assert!(matches!(dec(&p), Err(PickleError::TooDeep { .. })));
        let strict = DecodeLimits {
            max_depth: 2,
            ..DecodeLimits::default()
        };
        assert!(decode(b")\x85.", &strict).is_ok());
        assert!(decode(b")\x85\x85.", &strict).is_err());
        assert!(decode(b"]]a.", &strict).is_ok());
        assert!(decode(b"]]]aa.", &strict).is_err());
        assert!(decode(b"}N]]as.", &strict).is_err());
    }

    // -- helpers -----------------------------------------------------------

    #[test]
    fn value_helpers() {
        assert_eq!(Value::bytes(&b"ab"[..]).as_bytes(), Some(&b"ab"[..]));
        assert_eq!(pystr(b"ab").as_bytes(), Some(&b"ab"[..]));
        assert_eq!(s("ab").as_bytes(), None);
        assert_eq!(s("ab").as_text().as_deref(), Some("ab"));
        assert_eq!(pystr(b"ab").as_text().as_deref(), Some("ab"));
        assert_eq!(pystr(b"\xff").as_text(), None);
        assert_eq!(Value::bytes(&b"ab"[..]).as_text(), None);
        assert_eq!(int(-3).as_i64(), Some(-3));
        assert_eq!(Value::Bool(true).as_i64(), Some(1));
        assert_eq!(Value::Float(1.0).as_i64(), None);
        for falsy in [
            Value::None,
            Value::Bool(false),
            int(0),
            Value::BigInt(vec![]),
            Value::Float(0.0),
            s(""),
            pystr(b""),
            tuple(vec![]),
            list(vec![]),
            Value::Dict(vec![]),
        ] {
            assert!(!falsy.is_truthy(), "{falsy:?}");
        }
        for truthy in [
            Value::Bool(true),
            int(-1),
            Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
            Value::Float(f64::NAN),
            s("x"),
            Value::bytes(&b"\0"[..]),
            tuple(vec![Value::None]),
        ] {
            assert!(truthy.is_truthy(), "{truthy:?}");
        }
        let names: Vec<&str> = [
            Value::None,
            Value::Bool(true),
            int(1),
            Value::Float(1.0),
            Value::bytes(&b""[..]),
            s(""),
            tuple(vec![]),
            list(vec![]),
            Value::Dict(vec![]),
        ]
        .iter()
        .map(Value::type_name)
        .collect();
        assert_eq!(
            names,
            [
                "NoneType", "bool", "int", "float", "bytes", "str", "tuple", "list", "dict"
            ]
        );
        // forbidden_global finds the first global in pickle order
        let g = |m: &str| Value::Global {
            module: m.into(),
            name: "f".into(),
        };
        let v = Value::Dict(vec![
            (s("k"), list(vec![int(1), g("first")])),
            (g("second"), Value::None),
        ]);
        assert_eq!(v.forbidden_global().as_deref(), Some("first.f"));
        assert_eq!(sample_value().forbidden_global(), None);
    }

    // -- encoding ----------------------------------------------------------

    #[test]
    fn encodes_ints_like_cpython() {
        // CPython 3.11 `Pickler(f, 3)`, fast=1, of this list.
        let ints = [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -128,
            -129,
            -256,
            -257,
            (1 << 31) - 1,
            -(1 << 31),
            1 << 31,
            -(1 << 31) - 1,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ];
        let mut v: Vec<Value> = ints.into_iter().map(Value::Int).collect();
        v.extend([
            Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]), // 2**63
            Value::BigInt(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff]), // -2**63-1
            Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1]),    // 2**64
            int(-(1 << 39)),
            int(-(1 << 39) - 1),
            int(140412254566928),
        ]);
        let want = "80035d284b004b014bff4d00014dffff4a000001004affffffff4a80ffffff4a7fffffff4a00ffff\
                    ff4afffeffff4affffff7f4a000000808a0500000080008a05ffffff7fff8a06000000000001\
                    8a060000000000ff8a08ffffffffffffff7f8a0800000000000000808a09000000000000008000\
                    8a09ffffffffffffff7fff8a090000000000000000018a0500000000808a06ffffffff7fff8a06\
                    103a8e46b47f652e";
        let want: String = want.split_whitespace().collect();
        let v = list(v);
        assert_eq!(enc(&v), want);
        assert_eq!(enc2(&v), want);
        assert_eq!(dec_hex(&want), Ok(v));
        // 2**2100 needs LONG4
        let mut b = vec![0u8; 262];
        b.push(0x10);
        let out = enc(&Value::BigInt(b.clone()));
        assert!(out.starts_with("80038b07010000000000"));
        assert_eq!(dec_hex(&out), Ok(Value::BigInt(b)));
    }

    #[test]
    fn encodes_floats_strings_and_bytes_like_cpython() {
        let floats = list(vec![
            Value::Float(0.0),
            Value::Float(-0.0),
            Value::Float(1.5),
            Value::Float(-1e300),
            Value::Float(f64::INFINITY),
            Value::Float(f64::NEG_INFINITY),
            Value::Float(f64::NAN),
        ]);
        assert_eq!(
            enc(&floats),
            "80035d28470000000000000000478000000000000000473ff800000000000047fe37e43c8800759c\
             477ff000000000000047fff0000000000000477ff8000000000000652e"
                .split_whitespace()
                .collect::<String>()
        );
        let texts = list(vec![
            s(""),
            s("é☃"),
            Value::bytes(&b""[..]),
            Value::bytes(&b"ab"[..]),
        ]);
        assert_eq!(
            enc(&texts),
            "80035d2858000000005805000000c3a9e29883430043026162652e"
        );
        // 256 bytes: the long forms
        assert!(enc(&s(&"x".repeat(256))).starts_with("80035800010000787878"));
        assert!(enc(&Value::bytes(vec![b'y'; 256])).starts_with("80034200010000797979"));
        assert!(enc(&Value::bytes(vec![b'y'; 255])).starts_with("800343ff7979"));
        assert!(enc(&Value::PyStr(vec![b'y'; 256].into())).starts_with("80035400010000797979"));
    }

    #[test]
    fn py2_strs_as_py3_reads_them() {
        // A py2 client's transaction extension: {'plain': 'ascii',
        // 'high': '\xff\xfe', u'uni': u'\u2603', 'nested': [('x', '\x80')]}
        let mut v = Value::Dict(vec![
            (pystr(b"plain"), pystr(b"ascii")),
            (pystr(b"high"), pystr(b"\xff\xfe")),
            (s("uni"), s("\u{2603}")),
            (
                pystr(b"nested"),
                list(vec![tuple(vec![pystr(b"x"), pystr(b"\x80"), int(1)])]),
            ),
        ]);
        v.py2_strs_as_py3();
        let want = Value::Dict(vec![
            (s("plain"), s("ascii")),
            (s("high"), Value::bytes(&b"\xff\xfe"[..])),
            (s("uni"), s("\u{2603}")),
            (
                s("nested"),
                list(vec![tuple(vec![
                    s("x"),
                    Value::bytes(&b"\x80"[..]),
                    int(1),
                ])]),
            ),
        ]);
        assert_eq!(v, want);
        // Python 3 reads the result (no SHORT_BINSTRING of a non-ASCII
        // str left); a Python-2 peer still gets py2 str for all of it.
        assert!(!enc(&v).contains("5502fffe"));
        assert!(enc(&v).contains("4302fffe"));
        assert!(enc2(&v).contains("5502fffe") && enc2(&v).contains("55056173636969"));
        // Deep nesting is fine (no recursion).
        let mut deep = pystr(b"\xff");
        for _ in 0..5000 {
            deep = list(vec![deep]);
        }
        deep.py2_strs_as_py3();
        // Torn down iteratively so the test thread's stack is not at stake.
        while let Value::List(mut items) = deep {
            deep = items.pop().unwrap_or(Value::None);
        }
        assert_eq!(deep, Value::bytes(&b"\xff"[..]));
    }

    #[test]
    fn py2_dialect() {
        // bytes and ASCII text as py2 str; other text as BINUNICODE; PyStr
        // always as py2 str.
        assert_eq!(enc2(&Value::bytes(&b"ab"[..])), "8003550261622e");
        assert_eq!(enc2(&s("ab")), "8003550261622e");
        assert_eq!(enc2(&s("é")), "80035802000000c3a92e");
        assert_eq!(enc2(&pystr(b"ab")), "8003550261622e");
        assert_eq!(enc(&pystr(b"ab")), "8003550261622e");
        assert!(enc2(&s(&"x".repeat(256))).starts_with("80035400010000787878"));
        assert!(enc2(&Value::bytes(vec![0; 300])).starts_with("8003542c010000"));
        // everything else as in Py3
        let v = tuple(vec![
            int(1),
            Value::Bool(true),
            Value::None,
            Value::Float(0.5),
        ]);
        assert_eq!(enc2(&v), enc(&v));
    }

    fn enc1(v: &Value) -> String {
        hex(&encode(v, Dialect::Py2Protocol1))
    }

    /// The protocol-1 writer against CPython 2.7's `cPickle.Pickler(1)`
    /// with `fast = 1` (what a ZEO 5.1 server and client write): each
    /// expected pickle is what cPickle 2.7.18 wrote for the Python 2 value
    /// in the comment. Only protocol-0/1 opcodes: no PROTO, NEWTRUE,
    /// TUPLE1-3, LONG1, SHORT_BINBYTES.
    #[test]
    fn protocol1_writes_what_cpickle_2_7_writes() {
        let cases: &[(Value, &str)] = &[
            (Value::Bool(true), "4930310a2e"),  // True
            (Value::Bool(false), "4930300a2e"), // False
            (int(5), "4b052e"),
            (int(300), "4d2c012e"),
            (int(70000), "4a701101002e"),
            (int(-1), "4affffffff2e"),
            (int(1 << 40), "49313039393531313632373737360a2e"), // 2**40 (int)
            (int(-(1 << 40)), "492d313039393531313632373737360a2e"),
            // 2**70, -2**70, 2**63 (long)
            (
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40]),
                "4c313138303539313632303731373431313330333432344c0a2e",
            ),
            (
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xc0]),
                "4c2d313138303539313632303731373431313330333432344c0a2e",
            ),
            (
                Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
                "4c393232333337323033363835343737353830384c0a2e",
            ),
            // -2**63 - 1
            (
                Value::BigInt(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff]),
                "4c2d393232333337323033363835343737353830394c0a2e",
            ),
            (Value::Float(1.5), "473ff80000000000002e"),
            (Value::None, "4e2e"),
            (Value::bytes(&b"\x00\x01"[..]), "550200012e"), // '\x00\x01'
            (pystr(b"\x00\x01"), "550200012e"),
            (s("ab"), "550261622e"),      // 'ab'
            (s("é"), "5802000000c3a92e"), // u'\xe9'
            (tuple(vec![]), "292e"),
            (tuple(vec![int(1)]), "284b01742e"),
            (tuple(vec![int(1), int(2)]), "284b014b02742e"),
            (tuple(vec![int(1), int(2), int(3)]), "284b014b024b03742e"),
            (
                tuple(vec![int(1), int(2), int(3), int(4)]),
                "284b014b024b034b04742e",
            ),
            (list(vec![]), "5d2e"),
            (list(vec![Value::None]), "5d4e612e"),
            (list(vec![Value::None, Value::None]), "5d284e4e652e"),
            (Value::Dict(vec![]), "7d2e"),
            (Value::Dict(vec![(s("k"), int(1))]), "7d55016b4b01732e"),
            (
                Value::Dict(vec![(s("a"), int(1)), (s("b"), int(2))]),
                "7d285501614b015501624b02752e",
            ),
            // ((1,), [(2, 'x')]): tuples inside containers too
            (
                tuple(vec![
                    tuple(vec![int(1)]),
                    list(vec![tuple(vec![int(2), s("x")])]),
                ]),
                "28284b01745d284b025501787461742e",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(enc1(v), *want, "{v:?}");
        }
        // 'x' * 300: BINSTRING
        assert!(enc1(&s(&"x".repeat(300))).starts_with("542c0100007878"));
        // i64::MAX is a py2 int on 64-bit Pythons: INT, not LONG.
        assert_eq!(
            enc1(&int(i64::MAX)),
            "49393232333337323033363835343737353830370a2e"
        );
        assert_eq!(
            enc1(&int(i64::MIN)),
            "492d393232333337323033363835343737353830380a2e"
        );
        assert_eq!(enc1(&Value::BigInt(vec![0])), "4c304c0a2e");
    }

    #[test]
    fn protocol1_round_trips() {
        // Text comes back as py2 str (as a Python 2 peer reads it).
        let v = tuple(vec![
            Value::Bool(true),
            Value::Bool(false),
            int(i64::MIN),
            int(i64::MAX),
            Value::BigInt(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0x80]),
            Value::Float(-0.25),
            list(vec![int(1); 1001]),
            Value::Dict(vec![(pystr(b"k"), tuple(vec![pystr(b"x")])); 3]),
            pystr(&[7; 300]),
            s("\u{2603}"),
        ]);
        let p = encode(&v, Dialect::Py2Protocol1);
        assert_ne!(p[0], op::PROTO);
        assert_eq!(dec(&p), Ok(v));
        assert_eq!(
            dec(&encode(&s("ascii"), Dialect::Py2Protocol1)),
            Ok(pystr(b"ascii"))
        );
        for n in [1usize, 8, 9, 17, 40] {
            for sign in [0u8, 0xff] {
                let mut b = vec![0x5a; n];
                b.push(sign ^ 0x01);
                let big = int_from_le_twos(&b);
                assert_eq!(dec(&encode(&big, Dialect::Py2Protocol1)), Ok(big.clone()));
                assert_eq!(dec(&encode(&big, Dialect::Py3)), Ok(big));
            }
        }
    }

    /// `zodbpickle.binary` below protocol 3, as a ZEO 5.1 client on Python 2
    /// pickles an oid it read from a protocol-3 record: plain bytes, never a
    /// global to refuse. Other reductions stay opaque.
    #[test]
    fn zodbpickle_binary_below_protocol_3() {
        let oid = Value::bytes(vec![0, 0, 0, 0, 0, 0, 0, 1]);
        // cPickle 2.7 with zodbpickle 1.0: copy_reg's default reduction.
        let p = b"(ccopy_reg\n_reconstructor\n(czodbpickle\nbinary\nc__builtin__\nstr\n\
                  U\x08\x00\x00\x00\x00\x00\x00\x00\x01tRt.";
        let p: Vec<u8> = p.iter().copied().filter(|&c| c != b' ').collect();
        assert_eq!(dec(&p), Ok(tuple(vec![oid.clone()])));
        // GLOBAL zodbpickle binary applied to a str
        let p = b"czodbpickle\nbinary\n(U\x08\x00\x00\x00\x00\x00\x00\x00\x01tR.";
        assert_eq!(dec(p), Ok(oid.clone()));
        // not binary, or not a str argument: opaque, and refused upstream
        for p in [
            &b"czodbpickle\nbinary\n(K\x01tR."[..],
            b"czodbpickle\nbinary\n(U\x01aU\x01btR.",
            b"ccopy_reg\n_reconstructor\n(cos\nsystem\nc__builtin__\nstr\nU\x01atR.",
            b"ccopy_reg\n_reconstructor\n(czodbpickle\nbinary\nc__builtin__\nlist\nU\x01atR.",
            b"cbuiltins\nbytes\n(U\x01atR.",
        ] {
            let v = dec(p).unwrap();
            assert!(matches!(v, Value::Opaque(_)), "{v:?}");
            assert!(v.forbidden_global().is_some());
        }
        // NEWOBJ is not REDUCE
        let v = dec(b"\x80\x02czodbpickle\nbinary\nU\x01a\x85\x81.").unwrap();
        assert!(matches!(v, Value::Opaque(_)), "{v:?}");
    }

    /// CPython's C pickler (zodbpickle `_pickle_33.c`, what the stock server
    /// runs) batches lists and dicts in `batch_list_exact` /
    /// `batch_dict_exact`: one item → `APPEND`/`SETITEM`; otherwise MARK ...
    /// APPENDS/SETITEMS per 1000 items, a last batch of one included; and a
    /// dict whose size is a multiple of 1000 ends with an empty
    /// `MARK SETITEMS`. (The pure-Python pickler differs in both corner
    /// cases.) Layouts checked against CPython 3.11 with `fast = 1`.
    #[test]
    fn list_and_dict_batching_like_the_c_pickler() {
        let nones = |n: usize| "4e".repeat(n);
        let l = |n: usize| enc(&list(vec![Value::None; n]));
        let d = |n: usize| enc(&Value::Dict(vec![(Value::None, Value::None); n]));
        assert_eq!(l(0), "80035d2e");
        assert_eq!(l(1), "80035d4e612e");
        assert_eq!(l(2), "80035d284e4e652e");
        assert_eq!(l(1000), format!("80035d28{}652e", nones(1000)));
        assert_eq!(l(1001), format!("80035d28{}65284e652e", nones(1000)));
        assert_eq!(
            l(2000),
            format!("80035d28{}6528{}652e", nones(1000), nones(1000))
        );
        assert_eq!(
            l(2001),
            format!("80035d28{}6528{}65284e652e", nones(1000), nones(1000))
        );
        assert_eq!(d(0), "80037d2e");
        assert_eq!(d(1), "80037d4e4e732e");
        assert_eq!(d(2), "80037d284e4e4e4e752e");
        assert_eq!(d(999), format!("80037d28{}752e", nones(1998)));
        assert_eq!(d(1000), format!("80037d28{}7528752e", nones(2000)));
        assert_eq!(d(1001), format!("80037d28{}75284e4e752e", nones(2000)));
        assert_eq!(
            d(2000),
            format!("80037d28{}7528{}7528752e", nones(2000), nones(2000))
        );
        // and they decode back
        for n in [0, 1, 2, 1000, 1001, 2001] {
            let v = list(vec![Value::None; n]);
            assert_eq!(dec(&encode(&v, Dialect::Py3)), Ok(v));
            let v = Value::Dict(vec![(int(1), Value::None); n]);
            assert_eq!(dec(&encode(&v, Dialect::Py3)), Ok(v));
        }
    }

    #[test]
    fn tuples() {
        let t = |n: i64| enc(&tuple((0..n).map(Value::Int).collect()));
        assert_eq!(t(0), "8003292e");
        assert_eq!(t(1), "80034b00852e");
        assert_eq!(t(2), "80034b004b01862e");
        assert_eq!(t(3), "80034b004b014b02872e");
        assert_eq!(t(4), "8003284b004b014b024b03742e");
    }

    #[test]
    fn round_trips() {
        let v = sample_value();
        assert_eq!(dec(&encode(&v, Dialect::Py3)), Ok(v.clone()));
        let nested = tuple(vec![
            list(vec![Value::Dict(vec![(s("k"), tuple(vec![pystr(b"x")]))])]),
            Value::BigInt(vec![1, 2, 3, 4, 5, 6, 7, 8, 9]),
            Value::bytes(vec![7; 1000]),
        ]);
        assert_eq!(dec(&encode(&nested, Dialect::Py3)), Ok(nested));
    }

    #[test]
    fn encoding_deep_values_does_not_recurse() {
        let mut v = Value::None;
        for _ in 0..5000 {
            v = tuple(vec![v]);
        }
        let out = encode(&v, Dialect::Py3);
        assert_eq!(out.len(), 2 + 1 + 5000 + 1);
        assert_eq!(v.forbidden_global(), None);
        // Tear down iteratively so the test thread's stack is not at stake.
        while let Value::Tuple(mut items) = v {
            v = items.pop().unwrap_or(Value::None);
        }
    }
}
