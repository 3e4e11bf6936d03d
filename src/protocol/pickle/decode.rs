//! The pickle decoder: an iterative stack machine over the opcodes (the
//! full decoder, with memo sharing and copy limits), and a fast path for
//! the memo-free flat pickles stock clients send. Nothing is evaluated;
//! see the limits and invariants in [`crate::protocol::pickle`].

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;

use super::opcodes as op;
use super::{MAX_COPY_WEIGHT, PickleError};
use crate::protocol::value::{DecodeLimits, Value, int_from_le_twos};

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

/// What the fast path made of a pickle: a value, or a request's parts.
enum Flat<'a> {
    Value(Value),
    Envelope(FlatEnvelope<'a>),
}

/// A request `(msgid, flags, name, args)` from [`Decoder::run_envelope`]:
/// the outer tuple's items, the name as text borrowed from the pickle.
pub struct FlatEnvelope<'a> {
    pub msgid: Value,
    pub flags: Value,
    pub name: &'a str,
    /// The name was a Python 2 `str` (`SHORT_BINSTRING` / `BINSTRING`), not
    /// text.
    pub name_is_pystr: bool,
    pub args: Value,
}

/// The depth recorded for the name's placeholder on the fast path's stack
/// ([`Decoder::run_envelope`]): no real depth comes near it, and a tuple
/// that takes the placeholder in (anything but the outer one) sends the
/// message to the full decoder.
const NAME_HERE: usize = usize::MAX;

/// The next value pushed will be the third item of the outer tuple (the
/// `MARK` at the bottom of the stack, two items above it).
fn is_name_slot(stack: &[(Value, usize)], marks: &[usize]) -> bool {
    marks == [0] && stack.len() == 2
}

/// The fast path's value and mark stacks, kept per thread between
/// messages ([`Decoder::run_flat`]). `Cell` and not `RefCell`: they are
/// taken out for the length of one decode and put back.
type FlatStacks = (Vec<(Value, usize)>, Vec<usize>);

thread_local! {
    static FLAT_STACKS: std::cell::Cell<FlatStacks> = const {
        std::cell::Cell::new((Vec::new(), Vec::new()))
    };
}

/// Stacks that grew past this many entries (a deep or wide message) are
/// dropped after use instead of being kept for the next message: a
/// thread keeps at most a few KiB.
const MAX_KEPT_STACK: usize = 64;

pub(super) struct Decoder<'a> {
    data: &'a [u8],
    /// The request's name, found by [`Self::run_envelope`] (and whether it
    /// was a Python 2 `str`).
    name: Option<(&'a str, bool)>,
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
    pub(super) fn new(data: &'a [u8], source: Option<&'a Bytes>, limits: &DecodeLimits) -> Self {
        Decoder {
            data,
            source,
            name: None,
            pos: 0,
            op_offset: 0,
            // Empty until the full decoder runs ([`Self::run_full`]): the
            // fast path has stacks of its own.
            stack: Vec::new(),
            marks: Vec::new(),
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

    fn unsupported(&self, opcode: u8) -> PickleError {
        PickleError::UnsupportedOpcode {
            opcode,
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

    pub(super) fn run(mut self) -> Result<Value, PickleError> {
        if let Some(v) = self.run_flat() {
            return Ok(v);
        }
        self.pos = 0;
        self.items_left = self.max_items;
        self.run_full()
    }

    /// The full decoder (memo, copy limits, every opcode), from `pos`.
    pub(super) fn run_full(mut self) -> Result<Value, PickleError> {
        // Room for a whole ZEO request envelope without regrowing.
        self.stack.reserve(8);
        self.marks.reserve(2);
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
        match self.with_flat_stacks(false)? {
            Flat::Value(v) => Some(v),
            Flat::Envelope(_) => None,
        }
    }

    /// The fast path for a whole request, `(msgid, flags, name, args)`:
    /// [`Self::run_flat`], but the outer tuple's items are returned as they
    /// are (no vector for them) and the name is left in the pickle (no
    /// string for it). `None` for anything else, as [`Self::run_flat`].
    pub(super) fn run_envelope(mut self) -> Option<FlatEnvelope<'a>> {
        match self.with_flat_stacks(true)? {
            Flat::Envelope(e) => Some(e),
            Flat::Value(_) => None,
        }
    }

    /// Runs the fast path on the thread's stacks from the last message
    /// (emptied), so a request costs no allocation for them.
    fn with_flat_stacks(&mut self, envelope: bool) -> Option<Flat<'a>> {
        let (mut stack, mut marks) = FLAT_STACKS.take();
        let flat = self.run_flat_on(&mut stack, &mut marks, envelope);
        stack.clear();
        marks.clear();
        if stack.capacity() <= MAX_KEPT_STACK && marks.capacity() <= MAX_KEPT_STACK {
            FLAT_STACKS.set((stack, marks));
        }
        flat
    }

    /// [`Self::run_flat`] on the given (empty) stacks; with `envelope`, as
    /// [`Self::run_envelope`].
    fn run_flat_on(
        &mut self,
        stack: &mut Vec<(Value, usize)>,
        marks: &mut Vec<usize>,
        envelope: bool,
    ) -> Option<Flat<'a>> {
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
                        (1, true, true) if !envelope => stack.pop().map(|(v, _)| Flat::Value(v)),
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
                    let (mut inner, mut holds_name) = (0, false);
                    for (_, d) in stack.get(from..)? {
                        match *d {
                            NAME_HERE => holds_name = true,
                            d => inner = inner.max(d),
                        }
                    }
                    let outer = envelope && from == 0 && marks.is_empty();
                    // The name's placeholder anywhere but in the outer
                    // tuple: not a request.
                    if holds_name && !outer {
                        return None;
                    }
                    let depth = 1 + inner;
                    if depth > self.max_depth {
                        return None;
                    }
                    self.items_left = self.items_left.checked_sub(1)?;
                    if outer {
                        return self.envelope_of(stack);
                    }
                    let values: Vec<Value> = stack.drain(from..).map(|(v, _)| v).collect();
                    stack.push((Value::Tuple(values), depth));
                    continue;
                }
                // `tpc_begin`'s empty extension.
                op::EMPTY_DICT => {
                    if self.max_depth == 0 {
                        return None;
                    }
                    self.items_left = self.items_left.checked_sub(1)?;
                    stack.push((Value::Dict(Vec::new()), 1));
                    continue;
                }
                // A Python 3 client's transaction id (`id(txn)`).
                op::LONG1 => {
                    let n = usize::from(self.u8().ok()?);
                    int_from_le_twos(self.take(n).ok()?)
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
                    let text = std::str::from_utf8(b).ok()?;
                    if envelope && is_name_slot(stack, marks) {
                        self.name = Some((text, false));
                        self.items_left = self.items_left.checked_sub(1)?;
                        stack.push((Value::None, NAME_HERE));
                        continue;
                    }
                    Value::Str(text.to_owned())
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
                    if envelope && is_name_slot(stack, marks) {
                        // A Python 2 client's `str` name: it must be text.
                        self.name = Some((std::str::from_utf8(b).ok()?, true));
                        self.items_left = self.items_left.checked_sub(1)?;
                        stack.push((Value::None, NAME_HERE));
                        continue;
                    }
                    Value::PyStr(self.bytes_of(b))
                }
                _ => return None,
            };
            self.items_left = self.items_left.checked_sub(1)?;
            stack.push((scalar, 0));
        }
    }

    /// The outer tuple of a request just closed (its `TUPLE`, the `MARK`
    /// at the bottom): its four items, if the name is the third and
    /// `STOP` ends the pickle.
    fn envelope_of(&mut self, stack: &mut Vec<(Value, usize)>) -> Option<Flat<'a>> {
        let ends = self.data.get(self.pos..) == Some(&[op::STOP][..]);
        let name = self.name.take();
        if !ends || stack.len() != 4 || stack[2].1 != NAME_HERE {
            return None;
        }
        let (name, name_is_pystr) = name?;
        let mut items = stack.drain(..).map(|(v, _)| v);
        let (msgid, flags, _, args) = (items.next()?, items.next()?, items.next()?, items.next()?);
        Some(Flat::Envelope(FlatEnvelope {
            msgid,
            flags,
            name,
            name_is_pystr,
            args,
        }))
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

    /// Executes one opcode (read by [`Self::run_full`]), in the method of
    /// its family.
    fn step(&mut self, opcode: u8) -> Result<(), PickleError> {
        match op::family(opcode) {
            Some(op::Family::Stack) => self.step_stack(opcode),
            Some(op::Family::Scalar) => self.step_scalar(opcode),
            Some(op::Family::String) => self.step_string(opcode),
            Some(op::Family::Container) => self.step_container(opcode),
            Some(op::Family::Memo) => self.step_memo(opcode),
            Some(op::Family::Object) => self.step_object(opcode),
            None => Err(self.unsupported(opcode)),
        }
    }

    /// `PROTO`, `FRAME`, `MARK`, `POP`, `POP_MARK`, `DUP`: the stack and the
    /// pickle's framing.
    fn step_stack(&mut self, opcode: u8) -> Result<(), PickleError> {
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
            _ => return Err(self.unsupported(opcode)),
        }
        Ok(())
    }

    /// `None`, booleans, integers and floats.
    fn step_scalar(&mut self, opcode: u8) -> Result<(), PickleError> {
        match opcode {
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
            _ => return Err(self.unsupported(opcode)),
        }
        Ok(())
    }

    /// Bytes, py2 `str` and text; `BYTEARRAY8` and the out-of-band buffers
    /// are refused.
    fn step_string(&mut self, opcode: u8) -> Result<(), PickleError> {
        match opcode {
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
            _ => return Err(self.unsupported(opcode)),
        }
        Ok(())
    }

    /// Tuples, lists, dicts and sets: built empty or from the stack,
    /// then filled.
    fn step_container(&mut self, opcode: u8) -> Result<(), PickleError> {
        match opcode {
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
            _ => return Err(self.unsupported(opcode)),
        }
        Ok(())
    }

    /// Memo `PUT`s and `GET`s.
    fn step_memo(&mut self, opcode: u8) -> Result<(), PickleError> {
        match opcode {
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
            _ => return Err(self.unsupported(opcode)),
        }
        Ok(())
    }

    /// Globals and everything that would call or build an object:
    /// recorded, never evaluated; persistent ids and the extension registry
    /// (`EXT1`, `EXT2`, `EXT4`) are refused.
    fn step_object(&mut self, opcode: u8) -> Result<(), PickleError> {
        match opcode {
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
            _ => return Err(self.unsupported(opcode)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAX_NESTING_DEPTH as MAX_NESTING_DEPTH;
    use crate::protocol::pickle::testing::*;
    use crate::protocol::pickle::{Dialect, decode, decode_bytes, decode_full, encode};
    use crate::protocol::testhex::{hex, unhex};

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
        let own: &[&[u8]] = &[
            b"(",
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
            b"e",
            b"0",
            b"2",
            b"\x80\x03",
            b"\x80\x09",
            b"C\x09short",
            b"l",
            b"c",
        ];
        let pieces: Vec<&[u8]> = super::super::testing::FAST_PIECES
            .iter()
            .chain(own)
            .copied()
            .collect();
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
        assert!(dec(&nested(MAX_NESTING_DEPTH)).is_ok());
        assert!(matches!(
            dec(&nested(MAX_NESTING_DEPTH + 1)),
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
}
