//! The persistent references of a ZODB object record, for garbage
//! collection, and the record's class, for the class table (what fills a
//! storage, `storage::classes`), read in the same pass.
//!
//! A record is two pickles back to back (ZODB `ObjectWriter.serialize`): the
//! class description, then the state. A reference to another persistent
//! object is a pickle *persistent id*: `BINPERSID` (or `PERSID` and a text
//! line in protocol 0) applied to the pid object on top of the stack. What
//! counts as a reference mirrors `ZODB.serialize.referencesf` (protocol doc
//! §11.3):
//!
//! | pid object | written by | result |
//! | --- | --- | --- |
//! | `(oid, klass)` (any tuple) | `persistent_id`, the usual case | `oid` (the first item) |
//! | `oid` (bytes or str) | classes with `__getnewargs__`, `PERSID` | `oid` |
//! | a list: `['w', (oid,)]`, `['w', (oid, db)]`, `['m', (db, oid, klass)]`, `['n', (db, oid)]`, legacy `[oid]` | weak and cross-database references | not followed |
//! | anything else (an empty tuple, a tuple whose first item is not a string, None, ...) | nobody | error |
//!
//! A text oid counts if it is ASCII (`referencesf` encodes it to ASCII
//! bytes), and every oid must be exactly 8 bytes long.
//!
//! The walker evaluates nothing: it follows the opcodes of protocols 0–5
//! with a stack and a memo of compact `Item` descriptors that only say as
//! much as a persistent id needs (bytes or text as a range of the record, a
//! tuple by its first item, a list, or "something else"). `REDUCE`, `BUILD`,
//! `NEWOBJ` and the like pop their operands and push "something else".
//!
//! The class is what the first pickle (the class description) names, in
//! the forms `ObjectReader.getClassName` reads (ZODB's `serialize.py`):
//!
//! | class pickle | written by | class |
//! | --- | --- | --- |
//! | `klass`: `GLOBAL 'module\nname'` (protocols 0–3), `STACK_GLOBAL` of two text strings (protocol 4+), memo opcodes between | ZODB for every ordinary class | `module.name` |
//! | `(klass, args)` | classes with `__getnewargs__` | `module.name` of `klass` |
//! | `((module, name), args)`, the strings bytes or text | ZODB 3 for instances of persistent classes, old records | `module.name` |
//! | anything else (a persistent class referenced by oid, an extension code, no pickle at all, a first pickle that cannot be read) | | unknown (`None`) |
//!
//! Class names are client data: [`Scan::class`] is lossy UTF-8 and at most
//! [`MAX_CLASS_NAME_BYTES`] long.
//!
//! Invariants:
//!
//! * **Never `Ok` with a missing reference.** Every `PERSID`/`BINPERSID`
//!   the walk reaches is either a reference, a list (not followed, exactly
//!   as `referencesf`) or an error. A record that starts like a pickle but
//!   cannot be walked to its end is an error; the collector then keeps
//!   everything, which is always safe. The walk is stricter than Python
//!   where that is cheaper (text memo keys must be canonical decimals,
//!   escaped protocol-0 strings are not decoded), never laxer in a way that
//!   could hide an opcode.
//! * **Data that no unpickler could read has no references** (see
//!   [`can_start_pickle`]): ZODB's own tests store records such as `b"x"`.
//! * **Bounded work.** One pass, O(record length), no recursion; the stack
//!   and the memo grow by at most one entry per opcode byte read, and a memo
//!   index beyond the record length goes to a sparse map instead of a vector.
//!
//! Deliberate differences from `referencesf`, all on the safe side: one
//! pickle alone is accepted (`referencesf` needs two); anything after the
//! last pickle must itself be a complete pickle (`referencesf` ignores what
//! follows the second one); protocols 4 and 5 are walked (zodbpickle's
//! `noload` refuses them); duplicates are dropped, keeping first occurrences.

use std::collections::{HashMap, HashSet};

use crate::protocol::ids::Oid;

/// Why a record that looks like a pickle could not be scanned. Offsets are
/// the position in the record of the opcode that failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("pickle truncated: the opcode at byte {offset} runs past the end of the record")]
    Truncated { offset: usize },
    #[error("unknown pickle opcode {opcode:#04x} at byte {offset}")]
    UnknownOpcode { offset: usize, opcode: u8 },
    #[error("pickle stack underflow at byte {offset}")]
    StackUnderflow { offset: usize },
    #[error("malformed pickle at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
    #[error("persistent id at byte {offset} is not a ZODB reference: {reason}")]
    BadReference { offset: usize, reason: &'static str },
}

impl RefError {
    /// The byte offset in the record where scanning stopped.
    pub fn offset(&self) -> usize {
        match *self {
            RefError::Truncated { offset }
            | RefError::UnknownOpcode { offset, .. }
            | RefError::StackUnderflow { offset }
            | RefError::Malformed { offset, .. }
            | RefError::BadReference { offset, .. } => offset,
        }
    }
}

/// Longest class name [`Scan::class`] returns, in bytes: a longer one (no
/// real module path comes near) is cut on a character boundary and ends in
/// `...`, so that a client cannot make the class table, `server_status` or
/// a metric label hold kilobytes per class.
pub const MAX_CLASS_NAME_BYTES: usize = 200;

/// What one pass over a record finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// `module.name` of the record's class, from its class pickle; `None`
    /// when there is no class pickle in one of ZODB's forms (see the module
    /// docs). Independent of `refs`: a record whose class pickle is whole
    /// has its class even when its state cannot be walked.
    pub class: Option<String>,
    /// What [`references`] returns.
    pub refs: Result<Vec<Oid>, RefError>,
}

/// The references and the class of one record, in one pass: what a store
/// runs on each record it receives.
pub fn scan(record: &[u8]) -> Scan {
    let (class, refs) = walk(record, false);
    Scan {
        class: class.map(|name| name.format(record)),
        refs,
    }
}

/// Persistent references of one record, in order of first appearance
/// (duplicates dropped).
///
/// An empty record, or one that [`can_start_pickle`] says is not a pickle,
/// has none. A record that starts like a pickle must be one or more complete
/// pickles back to back, otherwise this is an error.
pub fn references(record: &[u8]) -> Result<Vec<Oid>, RefError> {
    walk(record, false).1
}

/// The record's class (see [`Scan::class`]), reading only its first
/// pickle: for the `class_name` of a ConflictError.
pub fn class_name(record: &[u8]) -> Option<String> {
    walk(record, true).0.map(|name| name.format(record))
}

/// Walks `record` (only its first pickle if `class_only`): its class,
/// known even when the rest cannot be walked, and its references. The one
/// caller of the walker, so that all of it is inlined here.
fn walk(record: &[u8], class_only: bool) -> (Option<Name>, Result<Vec<Oid>, RefError>) {
    let Some(&first) = record.first() else {
        return (None, Ok(Vec::new()));
    };
    if !can_start_pickle(first) {
        return (None, Ok(Vec::new()));
    }
    if u32::try_from(record.len()).is_err() {
        // Items hold u32 ranges; frames are far smaller than this anyway.
        let error = RefError::Malformed {
            offset: 0,
            reason: "record longer than 4 GiB",
        };
        return (None, Err(error));
    }
    let mut walker = Walker::new(record);
    let walked = walker.run(class_only);
    let refs = walked.map(|()| {
        let mut refs = std::mem::take(&mut walker.refs);
        dedup_in_order(&mut refs);
        refs
    });
    (walker.class, refs)
}

/// Is `byte` an opcode that can begin a well-formed pickle?
///
/// These are `PROTO`, `FRAME`, `MARK` and the opcodes that push a value
/// without popping anything or reading the memo (which is empty at the start
/// of a record): constants, numbers, strings, `GLOBAL`, empty containers,
/// extension codes, `PERSID`, protocol-5 buffers. Every other byte (not an
/// opcode at all, like `x`; or one that needs a stack, a mark or a memo
/// entry, like `d`, `a`, `h`, `.`) makes any unpickler fail on the first
/// opcode, so ZODB can never load such a record and it cannot hold a
/// reference that matters. Writers of ZODB records start with `PROTO`
/// (protocol ≥ 2), `GLOBAL` or `MARK` (protocols 0 and 1).
pub fn can_start_pickle(byte: u8) -> bool {
    matches!(
        byte,
        op::PROTO
            | op::FRAME
            | op::MARK
            | op::NONE
            | op::NEWTRUE
            | op::NEWFALSE
            | op::INT
            | op::BININT
            | op::BININT1
            | op::BININT2
            | op::LONG
            | op::LONG1
            | op::LONG4
            | op::FLOAT
            | op::BINFLOAT
            | op::STRING
            | op::BINSTRING
            | op::SHORT_BINSTRING
            | op::UNICODE
            | op::BINUNICODE
            | op::SHORT_BINUNICODE
            | op::BINUNICODE8
            | op::BINBYTES
            | op::SHORT_BINBYTES
            | op::BINBYTES8
            | op::BYTEARRAY8
            | op::NEXT_BUFFER
            | op::GLOBAL
            | op::EMPTY_LIST
            | op::EMPTY_DICT
            | op::EMPTY_TUPLE
            | op::EMPTY_SET
            | op::EXT1
            | op::EXT2
            | op::EXT4
            | op::PERSID
    )
}

/// Drops repeated oids, keeping the first occurrence of each.
fn dedup_in_order(refs: &mut Vec<Oid>) {
    // Most records reference a handful of objects: a quadratic scan is
    // cheaper than hashing there. BTree nodes and big containers hash.
    if refs.len() <= 16 {
        let mut kept = 0;
        for i in 0..refs.len() {
            let oid = refs[i];
            if !refs[..kept].contains(&oid) {
                refs[kept] = oid;
                kept += 1;
            }
        }
        refs.truncate(kept);
    } else {
        let mut seen = HashSet::with_capacity(refs.len());
        refs.retain(|oid| seen.insert(*oid));
    }
}

use crate::protocol::pickle::opcodes as op;

/// Highest pickle protocol the walker knows the opcodes of.
const HIGHEST_PROTOCOL: u8 = 5;

/// What the walker knows about one stack or memo value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Nothing a persistent id can be: numbers, None, dicts, sets, results
    /// of `REDUCE`/`GLOBAL`/`BINPERSID`, ...
    Other,
    /// `bytes`, or a Python 2 `str`: `start..start+len` of the record.
    Bytes,
    /// Text (UTF-8, or raw protocol-0 text without escapes): the range.
    Text,
    /// A string whose value is written with escapes (`STRING`, or `UNICODE`
    /// containing a backslash); not decoded, so not usable as an oid.
    Escaped,
    /// A list, whatever it holds (`referencesf` skips every list pid).
    List,
    /// `()`.
    EmptyTuple,
    /// A tuple whose first item is bytes (the range is that item's).
    TupleBytes,
    /// A tuple whose first item is text (the range is that item's).
    TupleText,
    /// A tuple whose first item is an escaped string.
    TupleEscaped,
    /// A tuple whose first item is anything else.
    TupleOther,
    /// A class named in the class pickle by `GLOBAL` or `STACK_GLOBAL`:
    /// `start` indexes [`Walker::names`]. Elsewhere like `Other`.
    Class,
    /// A tuple of exactly two strings in the class pickle, ZODB 3's
    /// `(module, name)`: `start` indexes [`Walker::names`], which also keeps
    /// the tuple as a persistent id sees it.
    NamePair,
    /// A tuple whose first item is a `Class` or a `NamePair`, the class
    /// pickle's `(klass, args)`: `start` indexes [`Walker::names`].
    /// Elsewhere like `TupleOther`.
    TupleClass,
    /// An unused memo slot (never on the stack).
    Vacant,
}

/// A compact descriptor of a pickle value: a kind and, for strings and
/// tuples of strings, a range of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    kind: Kind,
    start: u32,
    len: u32,
}

impl Item {
    const OTHER: Item = Item::of(Kind::Other);
    const LIST: Item = Item::of(Kind::List);
    const VACANT: Item = Item::of(Kind::Vacant);

    const fn of(kind: Kind) -> Item {
        Item {
            kind,
            start: 0,
            len: 0,
        }
    }

    /// A tuple whose first item is `first` (`None` for the empty tuple).
    fn tuple(first: Option<Item>) -> Item {
        let Some(first) = first else {
            return Item::of(Kind::EmptyTuple);
        };
        let kind = match first.kind {
            Kind::Bytes => Kind::TupleBytes,
            Kind::Text => Kind::TupleText,
            Kind::Escaped => Kind::TupleEscaped,
            Kind::Class | Kind::NamePair => Kind::TupleClass,
            _ => return Item::of(Kind::TupleOther),
        };
        Item { kind, ..first }
    }

    /// A string whose range is its value (bytes or text, not escaped).
    fn is_plain_string(self) -> bool {
        matches!(self.kind, Kind::Bytes | Kind::Text)
    }
}

/// Most class names the walker keeps from one class pickle. ZODB's writers
/// put one there (the class, written first); more are rare (a class among
/// `__getnewargs__`'s arguments) and do not name the record's class, so
/// further ones just stay anonymous.
const MAX_NAMES: usize = 4;

/// A class name as two ranges of the record, and for a `NamePair` the
/// tuple as a persistent id sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Name {
    module: (u32, u32),
    name: (u32, u32),
    pair: Item,
}

impl Name {
    const EMPTY: Name = Name {
        module: (0, 0),
        name: (0, 0),
        pair: Item::OTHER,
    };

    fn new(module: Item, name: Item) -> Name {
        Name {
            module: (module.start, module.len),
            name: (name.start, name.len),
            pair: Item::OTHER,
        }
    }

    /// `module.name`, lossy UTF-8, cut to [`MAX_CLASS_NAME_BYTES`]. One
    /// allocation and one UTF-8 check: this runs on every stored record.
    fn format(&self, record: &[u8]) -> String {
        let part = |(start, len): (u32, u32)| {
            let (start, len) = (start as usize, len as usize);
            // Ranges come from the record itself.
            record.get(start..start + len).unwrap_or_default()
        };
        let (module, name) = (part(self.module), part(self.name));
        let mut bytes = Vec::with_capacity(module.len() + 1 + name.len());
        bytes.extend_from_slice(module);
        bytes.push(b'.');
        bytes.extend_from_slice(name);
        let mut s = String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        if s.len() > MAX_CLASS_NAME_BYTES {
            let mut cut = MAX_CLASS_NAME_BYTES - 3;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        s
    }
}

/// The memo: indices below the record length live in a vector (every
/// writer numbers its memo densely from 0 or 1), others in a map that only
/// hostile input needs.
struct Memo {
    dense: Vec<Item>,
    sparse: Option<HashMap<u32, Item>>,
    dense_limit: usize,
    /// Distinct keys stored, the index `MEMOIZE` uses (`len(memo)`).
    count: usize,
}

impl Memo {
    fn new(record_len: usize) -> Memo {
        Memo {
            // Writers memoize about one value per 8 bytes of record.
            dense: Vec::with_capacity((record_len / 8).min(4096)),
            sparse: None,
            dense_limit: record_len,
            count: 0,
        }
    }

    fn put(&mut self, index: u32, item: Item) {
        let i = index as usize;
        let fresh = if i < self.dense_limit {
            if i >= self.dense.len() {
                self.dense.resize(i + 1, Item::VACANT);
            }
            let was = std::mem::replace(&mut self.dense[i], item);
            was.kind == Kind::Vacant
        } else {
            self.sparse
                .get_or_insert_with(HashMap::new)
                .insert(index, item)
                .is_none()
        };
        if fresh {
            self.count += 1;
        }
    }

    fn get(&self, index: u32) -> Option<Item> {
        let i = index as usize;
        if i < self.dense_limit {
            self.dense
                .get(i)
                .copied()
                .filter(|it| it.kind != Kind::Vacant)
        } else {
            self.sparse.as_ref()?.get(&index).copied()
        }
    }
}

/// The opcode walker over one record.
struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for errors.
    at: usize,
    stack: Vec<Item>,
    /// Stack lengths at each open `MARK`; items below the last one are out
    /// of reach until it is popped (as CPython's `metastack`).
    marks: Vec<usize>,
    memo: Memo,
    refs: Vec<Oid>,
    /// True until the first pickle (the class pickle) ends.
    in_class_pickle: bool,
    /// Class names met in the class pickle (`names_len` of them), indexed
    /// by the `start` of `Class`, `NamePair` and `TupleClass` items.
    names: [Name; MAX_NAMES],
    names_len: usize,
    /// The record's class, once the class pickle has ended on one.
    class: Option<Name>,
}

impl<'a> Walker<'a> {
    fn new(data: &'a [u8]) -> Walker<'a> {
        Walker {
            data,
            pos: 0,
            at: 0,
            stack: Vec::with_capacity(16),
            marks: Vec::with_capacity(8),
            memo: Memo::new(data.len()),
            refs: Vec::with_capacity(8),
            in_class_pickle: true,
            names: [Name::EMPTY; MAX_NAMES],
            names_len: 0,
            class: None,
        }
    }

    /// An item of `kind` standing for `name`, if there is room to keep it.
    fn named(&mut self, kind: Kind, name: Name) -> Option<Item> {
        let i = self.names_len;
        *self.names.get_mut(i)? = name;
        self.names_len += 1;
        Some(Item {
            kind,
            start: i as u32,
            len: 0,
        })
    }

    /// The class the class pickle's value `meta` names: `klass`,
    /// `(klass, args)` or `((module, name), args)`.
    fn class_of(&self, meta: Item) -> Option<Name> {
        match meta.kind {
            Kind::Class | Kind::TupleClass => self.names.get(meta.start as usize).copied(),
            _ => None,
        }
    }

    /// Walks pickles back to back until the record ends. The memo carries
    /// over from one pickle to the next (ZODB pickles both with one pickler
    /// and reads both with one unpickler, so the state pickle `BINGET`s the
    /// class of the first); the stack and marks start empty each time.
    /// With `class_only`, stops after the first pickle.
    fn run(&mut self, class_only: bool) -> Result<(), RefError> {
        loop {
            self.stack.clear();
            self.marks.clear();
            self.pickle()?;
            if class_only || self.pos == self.data.len() {
                return Ok(());
            }
        }
    }

    fn truncated(&self) -> RefError {
        RefError::Truncated { offset: self.at }
    }

    fn malformed(&self, reason: &'static str) -> RefError {
        RefError::Malformed {
            offset: self.at,
            reason,
        }
    }

    fn bad_ref(&self, reason: &'static str) -> RefError {
        RefError::BadReference {
            offset: self.at,
            reason,
        }
    }

    fn underflow(&self) -> RefError {
        RefError::StackUnderflow { offset: self.at }
    }

    /// The next `n` bytes of argument.
    fn take(&mut self, n: usize) -> Result<&'a [u8], RefError> {
        let data: &'a [u8] = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| self.truncated())?;
        let s = &data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn take_u8(&mut self) -> Result<u8, RefError> {
        Ok(self.take(1)?[0])
    }

    fn take_u32(&mut self) -> Result<u32, RefError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 4-byte length that CPython reads as signed (`BINSTRING`, `LONG4`).
    fn take_i32_len(&mut self) -> Result<usize, RefError> {
        let n = self.take_u32()? as i32;
        usize::try_from(n).map_err(|_| self.malformed("negative length"))
    }

    fn take_u64_len(&mut self) -> Result<usize, RefError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        // A length beyond the address space cannot fit in the record.
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| self.truncated())
    }

    /// A text argument up to (not including) its `\n`.
    fn line(&mut self) -> Result<&'a [u8], RefError> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.truncated())?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    /// Skips `n` bytes of payload and returns its range as an item of `kind`.
    fn payload(&mut self, n: usize, kind: Kind) -> Result<Item, RefError> {
        let start = self.pos;
        self.take(n)?;
        Ok(Item {
            kind,
            // The record is under 4 GiB (checked in `references`).
            start: start as u32,
            len: n as u32,
        })
    }

    /// First stack index the current mark lets us reach.
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    /// Ensures `n` items are reachable above the current mark.
    fn need(&self, n: usize) -> Result<(), RefError> {
        if self.stack.len() - self.base() < n {
            Err(self.underflow())
        } else {
            Ok(())
        }
    }

    fn pop(&mut self) -> Result<Item, RefError> {
        self.need(1)?;
        self.stack.pop().ok_or_else(|| self.underflow())
    }

    fn pop_n(&mut self, n: usize) -> Result<(), RefError> {
        self.need(n)?;
        let len = self.stack.len() - n;
        self.stack.truncate(len);
        Ok(())
    }

    fn top(&self) -> Result<Item, RefError> {
        self.need(1)?;
        self.stack.last().copied().ok_or_else(|| self.underflow())
    }

    /// Closes the innermost mark; returns the stack index where its items
    /// begin (they are still on the stack).
    fn pop_mark(&mut self) -> Result<usize, RefError> {
        self.marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop"))
    }

    /// Closes the innermost mark and drops its items.
    fn drop_marked(&mut self) -> Result<(), RefError> {
        let start = self.pop_mark()?;
        self.stack.truncate(start);
        Ok(())
    }

    /// A text memo index (`PUT`/`GET`): a canonical decimal, as Python's
    /// picklers write it (`p%d\n`).
    fn text_index(&mut self) -> Result<u32, RefError> {
        let line = self.line()?;
        let canonical = !line.is_empty()
            && line.iter().all(u8::is_ascii_digit)
            && (line.len() == 1 || line[0] != b'0');
        if !canonical {
            return Err(self.malformed("memo index is not a decimal number"));
        }
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| self.malformed("memo index out of range"))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), RefError> {
        let item = self.top()?;
        self.memo.put(index, item);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), RefError> {
        let item = self
            .memo
            .get(index)
            .ok_or_else(|| self.malformed("memo key not found"))?;
        self.stack.push(item);
        Ok(())
    }

    /// Records the reference a persistent id stands for, if any.
    fn persistent_id(&mut self, pid: Item) -> Result<(), RefError> {
        // A (module, name) pair of the class pickle is a tuple of strings.
        let pid = match pid.kind {
            Kind::NamePair => self
                .names
                .get(pid.start as usize)
                .map_or(Item::OTHER, |n| n.pair),
            _ => pid,
        };
        let oid_kind = match pid.kind {
            Kind::List => return Ok(()), // weak or cross-database: not followed
            Kind::Bytes | Kind::TupleBytes => Kind::Bytes,
            Kind::Text | Kind::TupleText => Kind::Text,
            Kind::Escaped | Kind::TupleEscaped => {
                return Err(self.bad_ref("oid written as an escaped string"));
            }
            Kind::EmptyTuple => return Err(self.bad_ref("empty tuple")),
            Kind::TupleOther | Kind::TupleClass => {
                return Err(self.bad_ref("tuple whose first item is not a string"));
            }
            Kind::Other | Kind::Class | Kind::NamePair | Kind::Vacant => {
                return Err(self.bad_ref("neither a tuple, a string nor a list"));
            }
        };
        let data: &'a [u8] = self.data;
        let start = pid.start as usize;
        // Ranges are made from the record itself, so this always succeeds.
        let bytes = data
            .get(start..start + pid.len as usize)
            .ok_or_else(|| self.malformed("string range outside the record"))?;
        self.push_oid(bytes, oid_kind == Kind::Text)
    }

    fn push_oid(&mut self, bytes: &[u8], text: bool) -> Result<(), RefError> {
        if text && !bytes.is_ascii() {
            // referencesf: `oid.encode('ascii')` fails.
            return Err(self.bad_ref("text oid is not ASCII"));
        }
        let oid = Oid::from_slice(bytes).ok_or_else(|| self.bad_ref("oid is not 8 bytes"))?;
        self.refs.push(oid);
        Ok(())
    }

    /// Executes opcodes up to and including one `STOP`.
    fn pickle(&mut self) -> Result<(), RefError> {
        loop {
            self.at = self.pos;
            let opcode = *self.data.get(self.pos).ok_or_else(|| self.truncated())?;
            self.pos += 1;
            if opcode == op::STOP {
                let value = self.pop()?;
                if self.in_class_pickle {
                    self.in_class_pickle = false;
                    self.class = self.class_of(value);
                }
                return Ok(());
            }
            self.step(opcode)?;
        }
    }

    /// The error for an opcode no protocol up to 5 defines.
    fn unknown(&self, opcode: u8) -> RefError {
        RefError::UnknownOpcode {
            offset: self.at,
            opcode,
        }
    }

    /// Executes one opcode other than `STOP` (read by [`Self::pickle`]), in
    /// the method of its family.
    #[inline]
    fn step(&mut self, opcode: u8) -> Result<(), RefError> {
        match op::family(opcode) {
            Some(op::Family::Stack) => self.step_stack(opcode),
            Some(op::Family::Scalar) => self.step_scalar(opcode),
            Some(op::Family::String) => self.step_string(opcode),
            Some(op::Family::Container) => self.step_container(opcode),
            Some(op::Family::Memo) => self.step_memo(opcode),
            Some(op::Family::Object) => self.step_object(opcode),
            None => Err(self.unknown(opcode)),
        }
    }

    /// `PROTO`, `FRAME`, `MARK`, `POP`, `POP_MARK`, `DUP`: the stack and the
    /// pickle's framing.
    #[inline]
    fn step_stack(&mut self, opcode: u8) -> Result<(), RefError> {
        match opcode {
            op::PROTO => {
                if self.take_u8()? > HIGHEST_PROTOCOL {
                    return Err(self.malformed("unsupported pickle protocol"));
                }
            }
            op::FRAME => {
                // The frame's content is ordinary opcodes; only check
                // that it is all there, as CPython does.
                let n = self.take_u64_len()?;
                if n > self.data.len() - self.pos {
                    return Err(self.truncated());
                }
            }
            op::MARK => self.marks.push(self.stack.len()),
            op::POP => {
                // CPython: pop an item, or else the innermost mark.
                if self.stack.len() > self.base() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            op::POP_MARK => self.drop_marked()?,
            op::DUP => {
                let item = self.top()?;
                self.stack.push(item);
            }
            _ => return Err(self.unknown(opcode)),
        }
        Ok(())
    }

    /// `None`, booleans, integers and floats: values a pid can never be,
    /// their arguments skipped.
    #[inline]
    fn step_scalar(&mut self, opcode: u8) -> Result<(), RefError> {
        match opcode {
            op::NONE | op::NEWTRUE | op::NEWFALSE => self.stack.push(Item::OTHER),
            op::BININT1 => self.push_skipped(1)?,
            op::BININT2 => self.push_skipped(2)?,
            op::BININT => self.push_skipped(4)?,
            op::BINFLOAT => self.push_skipped(8)?,
            op::LONG1 => {
                let n = self.take_u8()? as usize;
                self.push_skipped(n)?;
            }
            op::LONG4 => {
                let n = self.take_i32_len()?;
                self.push_skipped(n)?;
            }
            op::INT | op::LONG | op::FLOAT => {
                self.line()?;
                self.stack.push(Item::OTHER);
            }
            _ => return Err(self.unknown(opcode)),
        }
        Ok(())
    }

    /// Bytes, Python 2 strings and text: kept as ranges of the record, they
    /// may be oids. Also `BYTEARRAY8` and the out-of-band buffer opcodes,
    /// which never are.
    #[inline]
    fn step_string(&mut self, opcode: u8) -> Result<(), RefError> {
        match opcode {
            op::SHORT_BINSTRING | op::SHORT_BINBYTES => {
                let n = self.take_u8()? as usize;
                self.push_payload(n, Kind::Bytes)?;
            }
            op::BINSTRING => {
                let n = self.take_i32_len()?;
                self.push_payload(n, Kind::Bytes)?;
            }
            op::BINBYTES => {
                let n = self.take_u32()? as usize;
                self.push_payload(n, Kind::Bytes)?;
            }
            op::BINBYTES8 => {
                let n = self.take_u64_len()?;
                self.push_payload(n, Kind::Bytes)?;
            }
            op::SHORT_BINUNICODE => {
                let n = self.take_u8()? as usize;
                self.push_payload(n, Kind::Text)?;
            }
            op::BINUNICODE => {
                let n = self.take_u32()? as usize;
                self.push_payload(n, Kind::Text)?;
            }
            op::BINUNICODE8 => {
                let n = self.take_u64_len()?;
                self.push_payload(n, Kind::Text)?;
            }
            op::STRING => self.string()?,
            op::UNICODE => self.unicode()?,
            op::BYTEARRAY8 => {
                let n = self.take_u64_len()?;
                self.push_skipped(n)?;
            }
            op::NEXT_BUFFER => {
                return Err(self.malformed("out-of-band buffer (ZODB has none)"));
            }
            op::READONLY_BUFFER => {
                self.need(1)?;
            }
            _ => return Err(self.unknown(opcode)),
        }
        Ok(())
    }

    /// Lists, tuples, dicts and sets: built, extended, and for tuples
    /// described by their first item.
    #[inline]
    fn step_container(&mut self, opcode: u8) -> Result<(), RefError> {
        match opcode {
            op::EMPTY_LIST => self.stack.push(Item::LIST),
            op::EMPTY_TUPLE => self.stack.push(Item::of(Kind::EmptyTuple)),
            op::EMPTY_DICT | op::EMPTY_SET => self.stack.push(Item::OTHER),
            op::LIST => {
                self.drop_marked()?;
                self.stack.push(Item::LIST);
            }
            op::TUPLE => {
                let start = self.pop_mark()?;
                self.close_tuple(start);
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (opcode - op::TUPLE1 + 1) as usize;
                self.need(n)?;
                self.close_tuple(self.stack.len() - n);
            }
            op::DICT | op::FROZENSET => {
                self.drop_marked()?;
                self.stack.push(Item::OTHER);
            }
            op::APPEND => {
                self.pop()?;
                self.need(1)?;
            }
            op::SETITEM => {
                self.pop_n(2)?;
                self.need(1)?;
            }
            op::APPENDS | op::SETITEMS | op::ADDITEMS => {
                self.drop_marked()?;
                self.need(1)?;
            }
            _ => return Err(self.unknown(opcode)),
        }
        Ok(())
    }

    /// `PUT`, `GET` and their binary forms, and `MEMOIZE`.
    #[inline]
    fn step_memo(&mut self, opcode: u8) -> Result<(), RefError> {
        match opcode {
            op::PUT => {
                let i = self.text_index()?;
                self.memo_put(i)
            }
            op::BINPUT => {
                let i = self.take_u8()?;
                self.memo_put(i.into())
            }
            op::LONG_BINPUT => {
                let i = self.take_u32()?;
                self.memo_put(i)
            }
            op::MEMOIZE => {
                let i = u32::try_from(self.memo.count)
                    .map_err(|_| self.malformed("memo index out of range"))?;
                self.memo_put(i)
            }
            op::GET => {
                let i = self.text_index()?;
                self.memo_get(i)
            }
            op::BINGET => {
                let i = self.take_u8()?;
                self.memo_get(i.into())
            }
            op::LONG_BINGET => {
                let i = self.take_u32()?;
                self.memo_get(i)
            }
            _ => Err(self.unknown(opcode)),
        }
    }

    /// Globals, extension codes, calls and object building (operands out,
    /// an opaque item in), and persistent ids: the point of the walk.
    #[inline]
    fn step_object(&mut self, opcode: u8) -> Result<(), RefError> {
        match opcode {
            op::GLOBAL => {
                let module = (self.pos, self.line()?.len());
                let name = (self.pos, self.line()?.len());
                let item = if self.in_class_pickle {
                    self.class_pickle_global(module, name)
                } else {
                    Item::OTHER
                };
                self.stack.push(item);
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let item = if self.in_class_pickle {
                    self.class_pickle_stack_global(module, name)
                } else {
                    Item::OTHER
                };
                self.stack.push(item);
            }
            op::EXT1 => self.push_skipped(1)?,
            op::EXT2 => self.push_skipped(2)?,
            op::EXT4 => self.push_skipped(4)?,
            op::BUILD => {
                self.pop()?;
                self.need(1)?;
            }
            op::REDUCE | op::NEWOBJ => {
                self.pop_n(2)?;
                self.stack.push(Item::OTHER);
            }
            op::NEWOBJ_EX => {
                self.pop_n(3)?;
                self.stack.push(Item::OTHER);
            }
            op::OBJ => {
                // The class is the first marked item.
                let start = self.pop_mark()?;
                if self.stack.len() == start {
                    return Err(self.underflow());
                }
                self.stack.truncate(start);
                self.stack.push(Item::OTHER);
            }
            op::INST => {
                self.line()?;
                self.line()?;
                self.drop_marked()?;
                self.stack.push(Item::OTHER);
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                self.persistent_id(pid)?;
                // persistent_load's result (None under noload).
                self.stack.push(Item::OTHER);
            }
            op::PERSID => {
                // Python 3 decodes the line as ASCII, referencesf encodes
                // it back: the line's bytes are the oid.
                let line = self.line()?;
                self.push_oid(line, true)?;
                self.stack.push(Item::OTHER);
            }
            _ => return Err(self.unknown(opcode)),
        }
        Ok(())
    }

    /// Replaces the items from stack index `start` up with their tuple.
    /// In the class pickle, a tuple of two plain strings is a `NamePair`.
    #[inline]
    fn close_tuple(&mut self, start: usize) {
        let item = if self.in_class_pickle {
            self.class_pickle_tuple(start)
        } else {
            Item::tuple(self.stack.get(start).copied())
        };
        self.stack.truncate(start);
        self.stack.push(item);
    }

    /// [`Self::close_tuple`]'s item in the class pickle. Out of line, as
    /// the other class-pickle steps: they run once or twice per record,
    /// and inlined they would slow down the hot loop.
    #[inline(never)]
    fn class_pickle_tuple(&mut self, start: usize) -> Item {
        let item = Item::tuple(self.stack.get(start).copied());
        if let [module, name] = self.stack[start.min(self.stack.len())..]
            && module.is_plain_string()
            && name.is_plain_string()
        {
            let name = Name {
                pair: item,
                ..Name::new(module, name)
            };
            return self.named(Kind::NamePair, name).unwrap_or(item);
        }
        item
    }

    /// A `GLOBAL` of the class pickle: its lines at `module` and `name`.
    #[inline(never)]
    fn class_pickle_global(&mut self, module: (usize, usize), name: (usize, usize)) -> Item {
        // The record is under 4 GiB (checked in `walk`).
        let range = |(start, len): (usize, usize)| Item {
            kind: Kind::Bytes,
            start: start as u32,
            len: len as u32,
        };
        let name = Name::new(range(module), range(name));
        self.named(Kind::Class, name).unwrap_or(Item::OTHER)
    }

    /// A `STACK_GLOBAL` of the class pickle, of `module` and `name`
    /// (Python's takes text only).
    #[inline(never)]
    fn class_pickle_stack_global(&mut self, module: Item, name: Item) -> Item {
        if module.kind == Kind::Text && name.kind == Kind::Text {
            self.named(Kind::Class, Name::new(module, name))
                .unwrap_or(Item::OTHER)
        } else {
            Item::OTHER
        }
    }

    fn push_skipped(&mut self, n: usize) -> Result<(), RefError> {
        self.take(n)?;
        self.stack.push(Item::OTHER);
        Ok(())
    }

    fn push_payload(&mut self, n: usize, kind: Kind) -> Result<(), RefError> {
        let item = self.payload(n, kind)?;
        self.stack.push(item);
        Ok(())
    }

    /// Protocol 0 `STRING`: a quoted Python literal. Without a backslash the
    /// bytes between the quotes are the value; otherwise it stays undecoded.
    fn string(&mut self) -> Result<(), RefError> {
        let start = self.pos;
        let line = self.line()?;
        let quoted = line.len() >= 2
            && (line[0] == b'\'' || line[0] == b'"')
            && line[line.len() - 1] == line[0];
        if !quoted {
            return Err(self.malformed("STRING argument is not quoted"));
        }
        let inner = &line[1..line.len() - 1];
        let kind = if inner.contains(&b'\\') {
            Kind::Escaped
        } else {
            Kind::Bytes
        };
        self.stack.push(Item {
            kind,
            start: (start + 1) as u32,
            len: inner.len() as u32,
        });
        Ok(())
    }

    /// Protocol 0 `UNICODE`: raw-unicode-escape. Without a backslash the
    /// line is the text itself; otherwise it stays undecoded.
    fn unicode(&mut self) -> Result<(), RefError> {
        let start = self.pos;
        let line = self.line()?;
        let kind = if line.contains(&b'\\') {
            Kind::Escaped
        } else {
            Kind::Text
        };
        self.stack.push(Item {
            kind,
            start: start as u32,
            len: line.len() as u32,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OID1: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 1];
    const OID2: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 2];

    /// The class pickle of a PersistentMapping, protocol 3, memo 0.
    const CLASS: &[u8] = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.";

    fn record(state: &[u8]) -> Vec<u8> {
        let mut r = CLASS.to_vec();
        r.extend_from_slice(b"\x80\x03");
        r.extend_from_slice(state);
        r
    }

    /// `SHORT_BINBYTES oid`.
    fn oid_bytes(oid: [u8; 8]) -> Vec<u8> {
        let mut v = vec![op::SHORT_BINBYTES, 8];
        v.extend_from_slice(&oid);
        v
    }

    fn refs(r: &[u8]) -> Vec<u64> {
        references(r)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|o| o.0)
            .collect()
    }

    #[test]
    fn normal_reference_tuple_with_memoized_class() {
        // {'a': Ref(oid1, <class memo 0>)}
        let mut s = b"}q\x01X\x01\x00\x00\x00aq\x02".to_vec();
        s.extend(oid_bytes(OID1));
        s.extend_from_slice(b"h\x00\x86QsN.");
        assert_eq!(refs(&record(&s)), [1]);
    }

    #[test]
    fn bare_oid_and_text_oid() {
        let mut s = b"(".to_vec();
        s.extend(oid_bytes(OID2));
        s.extend_from_slice(b"Q");
        // A text oid of 8 ASCII characters (Python 3 reads py2 str so).
        s.extend_from_slice(b"X\x08\x00\x00\x00ABCDEFGHQ");
        // The long forms of bytes, py2 str and text.
        s.extend_from_slice(b"B\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03Q");
        s.extend_from_slice(b"T\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x04NN\x87Q");
        s.extend_from_slice(
            b"\x8e\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05Q",
        );
        s.extend_from_slice(b"\x8d\x08\x00\x00\x00\x00\x00\x00\x00ABCDEFGIN\x86Q");
        s.extend_from_slice(b"l.");
        let abc = u64::from_be_bytes(*b"ABCDEFGH");
        let abi = u64::from_be_bytes(*b"ABCDEFGI");
        assert_eq!(refs(&record(&s)), [2, abc, 3, 4, 5, abi]);
    }

    #[test]
    fn weak_and_cross_database_references_are_not_followed() {
        let mut s = b"(".to_vec();
        // ['w', (oid1,)]
        s.extend_from_slice(b"]q\x05(X\x01\x00\x00\x00w");
        s.extend(oid_bytes(OID1));
        s.extend_from_slice(b"\x85eQ");
        // ['m', ('other', oid1, klass)]
        s.extend_from_slice(b"(X\x01\x00\x00\x00mX\x05\x00\x00\x00other");
        s.extend(oid_bytes(OID1));
        s.extend_from_slice(b"h\x00\x87lQ");
        // ['n', ('other', oid1)]
        s.extend_from_slice(b"(X\x01\x00\x00\x00nX\x05\x00\x00\x00other");
        s.extend(oid_bytes(OID1));
        s.extend_from_slice(b"\x86lQ");
        // legacy weak reference [oid1]
        s.extend_from_slice(b"(");
        s.extend(oid_bytes(OID1));
        s.extend_from_slice(b"lQ");
        // and one strong reference to oid2
        s.extend(oid_bytes(OID2));
        s.extend_from_slice(b"h\x00\x86Q");
        s.extend_from_slice(b"t.");
        assert_eq!(refs(&record(&s)), [2]);
    }

    #[test]
    fn memo_get_of_a_pid_tuple_and_dup() {
        let mut s = b"(".to_vec();
        s.extend(oid_bytes(OID1));
        s.extend_from_slice(b"h\x00\x86r\x07\x00\x00\x00Q");
        s.extend_from_slice(b"j\x07\x00\x00\x00Q");
        s.extend(oid_bytes(OID2));
        s.extend_from_slice(b"\x85\x942Q0Q");
        s.extend_from_slice(b"t.");
        // Duplicates are dropped, the order of first appearance is kept.
        assert_eq!(refs(&record(&s)), [1, 2]);
        // The memo outlives the first pickle (the class is memo 0 there).
        let mut s = oid_bytes(OID2);
        s.extend_from_slice(b"h\x00\x86Q.");
        assert_eq!(refs(&record(&s)), [2]);
    }

    #[test]
    fn protocol_0_persid_and_text_memo() {
        let r = b"(cpersistent.mapping\nPersistentMapping\np0\nNtp1\n.\
                  (dp2\nS'a'\np3\nP\x01\x02\x03\x04\x05\x06\x07\x08\nsS'b'\ng3\nsS'x'\nPABCDEFGH\ns.";
        assert_eq!(
            refs(r),
            [0x0102_0304_0506_0708, u64::from_be_bytes(*b"ABCDEFGH")]
        );
        // A PERSID line must be an ASCII oid of 8 characters.
        let r = b"(Pabc\nt.";
        assert!(matches!(
            references(r),
            Err(RefError::BadReference { offset: 1, .. })
        ));
        let r = b"(P\x80\x01\x02\x03\x04\x05\x06\x07\nt.";
        assert!(matches!(references(r), Err(RefError::BadReference { .. })));
        // Protocol 0 strings without escapes are their bytes; escaped ones
        // are refused when they are used as an oid, and harmless elsewhere.
        assert_eq!(
            refs(b"(S'ABCDEFGH'\nNtQ."),
            [u64::from_be_bytes(*b"ABCDEFGH")]
        );
        assert!(references(b"(S'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01'\nNtQ.").is_err());
        assert_eq!(refs(b"S'\\n'\nVa\\u0041\n0."), Vec::<u64>::new());
        // A text memo index is a canonical decimal.
        assert!(references(b"Np01\n.").is_err());
        assert!(references(b"Np-1\n.").is_err());
        assert!(references(b"Np99999999999\n.").is_err());
    }

    #[test]
    fn python_2_short_binstring_oids() {
        // ZODB 3 on Python 2, protocol 1: oids as SHORT_BINSTRING.
        let r = b"cpersistent.mapping\nPersistentMapping\nq\x01.\
                  }q\x02U\x04dataq\x03}q\x04U\x01a(U\x08\x00\x00\x00\x00\x00\x00\x00\x07q\x05h\x01tQss.";
        assert_eq!(refs(r), [7]);
    }

    #[test]
    fn non_pickle_data_and_empty_records_have_no_references() {
        for r in [
            &b""[..],
            b"x",
            b"foo",
            b"data",
            b"hello",
            b"\x00\x01",
            b"abc",
            b".",
            b"q\x00",
        ] {
            assert_eq!(references(r), Ok(vec![]), "{r:?}");
        }
        // A real pickle without any persistent id.
        assert_eq!(references(b"\x80\x03K\x01."), Ok(vec![]));
        assert_eq!(references(b"N."), Ok(vec![]));
        // Starts like a pickle, so it must be one.
        assert!(references(b"Bar").is_err());
        assert!(references(b"(x").is_err());
    }

    #[test]
    fn pickle_start_rule() {
        for b in [
            0x80, b'(', b'c', b']', b'}', b')', b'N', b'K', b'X', b'U', b'C', b'P', 0x95,
        ] {
            assert!(can_start_pickle(b), "{b:#x}");
        }
        for b in [
            b'x', b'.', b'd', b'l', b't', b'a', b'h', b'g', b'q', b'Q', b'R', 0x00, 0xff,
        ] {
            assert!(!can_start_pickle(b), "{b:#x}");
        }
    }

    #[test]
    fn truncated_and_trailing_garbage() {
        let mut s = oid_bytes(OID1);
        s.extend_from_slice(b"h\x00\x86Q.");
        let r = record(&s);
        assert_eq!(refs(&r), [1]);
        for cut in (1..r.len()).filter(|&c| c != CLASS.len()) {
            assert!(references(&r[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            references(&r[..CLASS.len() + 4]),
            Err(RefError::Truncated {
                offset: CLASS.len() + 2
            })
        );
        // One pickle alone is fine (it ends exactly on STOP).
        assert_eq!(references(CLASS), Ok(vec![]));
        let mut g = r.clone();
        g.push(b'x');
        assert_eq!(
            references(&g),
            Err(RefError::UnknownOpcode {
                offset: r.len(),
                opcode: b'x'
            })
        );
        let mut g = r.clone();
        g.extend_from_slice(b"\x00\x00");
        assert!(references(&g).is_err());
        // A third complete pickle is accepted.
        let mut g = r.clone();
        g.extend_from_slice(b"N.");
        assert_eq!(refs(&g), [1]);
    }

    #[test]
    fn malformed_persistent_ids_are_errors() {
        let bad: [(&[u8], &str); 7] = [
            (b"C\x07\x00\x00\x00\x00\x00\x00\x01Q", "7-byte oid"),
            (
                b"C\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01N\x86Q",
                "9-byte oid",
            ),
            (b"NQ", "None pid"),
            (b"}Q", "dict pid"),
            (b")Q", "empty tuple"),
            (b"K\x01N\x86Q", "tuple of int"),
            (b"X\x08\x00\x00\x00\xc3\xa9ABCDEFQ", "non-ASCII text"),
        ];
        for (s, why) in bad {
            let mut r = record(b"(");
            r.extend_from_slice(s);
            r.extend_from_slice(b"t.");
            assert!(
                matches!(references(&r), Err(RefError::BadReference { .. })),
                "{why}: {:?}",
                references(&r)
            );
        }
        // A 7-byte oid inside a tuple.
        let r = record(b"C\x07\x00\x00\x00\x00\x00\x00\x01N\x86Q.");
        assert!(references(&r).is_err());
    }

    #[test]
    fn structural_errors() {
        let cases: [&[u8]; 10] = [
            b"\x80\x03\x86.",                                  // TUPLE2 on an empty stack
            b"\x80\x03K\x01(\x86.",                            // TUPLE2 across a mark
            b"\x80\x03K\x01h\x05.",                            // missing memo entry
            b"\x80\x06N.",                                     // protocol 6
            b"\x80\x03K\x01\xff.",                             // unknown opcode
            b"\x80\x03(.",                                     // STOP with nothing above the mark
            b"\x80\x03Nt0u.",                                  // SETITEMS without a mark
            b"\x80\x03T\xff\xff\xff\xffN.",                    // negative length
            b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.", // frame past end
            b"\x80\x05\x97.",                                  // out-of-band buffer
        ];
        for r in cases {
            assert!(references(r).is_err(), "{r:?}");
        }
        assert_eq!(
            references(b"\x80\x03\x86."),
            Err(RefError::StackUnderflow { offset: 2 })
        );
    }

    #[test]
    fn protocol_4_opcodes() {
        // FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE, EMPTY_SET,
        // ADDITEMS, FROZENSET, NEWOBJ_EX, BINPERSID of a memoized tuple.
        let mut r = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00\
                      \x8c\x01m\x94\x8c\x01C\x94\x93\x94.\x80\x04"
            .to_vec();
        r.extend_from_slice(b"(\x8f(K\x01K\x02\x90(K\x03\x91h\x02)}\x92");
        r.extend(oid_bytes(OID1));
        r.extend_from_slice(b"\x94h\x02\x86\x94Q\x8c\x01w\x94]\x94(h\x05h\x03\x85eQh\x04Qt.");
        assert_eq!(refs(&r), [1]);
    }

    #[test]
    fn sparse_memo_and_pop_semantics() {
        let mut r = CLASS.to_vec();
        r.extend_from_slice(b"\x80\x03(");
        r.extend(oid_bytes(OID1));
        r.extend_from_slice(b"r\xff\xff\xff\xff0j\xff\xff\xff\xffN\x86Q(0t.");
        assert_eq!(refs(&r), [1]);
        // POP with an empty stack drops the mark; with none it is an error.
        assert!(references(b"\x80\x030N.").is_err());
    }

    #[test]
    fn many_distinct_references_keep_order() {
        let mut s = b"(".to_vec();
        for i in (0..300u64).chain(0..300) {
            s.push(op::SHORT_BINBYTES);
            s.push(8);
            s.extend_from_slice(&(i * 7 % 1009).to_be_bytes());
            s.extend_from_slice(b"N\x86Q");
        }
        s.extend_from_slice(b"l.");
        let want: Vec<u64> = (0..300u64).map(|i| i * 7 % 1009).collect();
        assert_eq!(refs(&record(&s)), want);
    }

    /// The class `scan` reads, checking that its references are those of
    /// `references`.
    fn class(r: &[u8]) -> Option<String> {
        let scanned = scan(r);
        assert_eq!(scanned.refs, references(r), "{r:?}");
        assert_eq!(class_name(r), scanned.class, "{r:?}");
        scanned.class
    }

    fn with_state(class_pickle: &[u8]) -> Vec<u8> {
        let mut r = class_pickle.to_vec();
        r.extend_from_slice(b"\x80\x03}q\x05.");
        r
    }

    #[test]
    fn class_of_a_global() {
        let pm = Some("persistent.mapping.PersistentMapping".to_string());
        // Protocol 3 (ZODB 5 and 6), with BINPUT.
        assert_eq!(class(&record(b"N.")), pm);
        // Protocol 2 without memo, protocol 1 (`q`), protocol 0 (`p0\n`).
        assert_eq!(
            class(b"\x80\x02cpersistent.mapping\nPersistentMapping\n.N."),
            pm
        );
        assert_eq!(
            class(b"cpersistent.mapping\nPersistentMapping\nq\x01.}q\x02."),
            pm
        );
        assert_eq!(
            class(b"cpersistent.mapping\nPersistentMapping\np0\n.(dp1\n."),
            pm
        );
        // Protocol 4: FRAME, SHORT_BINUNICODE with MEMOIZE, STACK_GLOBAL;
        // BINUNICODE too.
        let r = b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\
                  \x8c\x0eBTrees.OOBTree\x94\x8c\x07OOBTree\x94\x93\x94.\x80\x04N.";
        assert_eq!(class(r).as_deref(), Some("BTrees.OOBTree.OOBTree"));
        let r = b"\x80\x04X\x01\x00\x00\x00mX\x01\x00\x00\x00C\x93.";
        assert_eq!(class(r).as_deref(), Some("m.C"));
        // The state's references are found as before.
        let mut s = oid_bytes(OID1);
        s.extend_from_slice(b"h\x00\x86Q.");
        let scanned = scan(&record(&s));
        assert_eq!((scanned.class, scanned.refs), (pm, Ok(vec![Oid(1)])));
    }

    #[test]
    fn class_of_newargs_and_zodb3_tuples() {
        // (klass, args): `__getnewargs__`, protocols 3, 2, 1 and 4.
        let r = with_state(b"\x80\x03cmy.mod\nKlass\nq\x00K\x01\x85q\x01\x86q\x02.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        let r = with_state(b"\x80\x02cmy.mod\nKlass\n)\x86.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        let r = with_state(b"(cmy.mod\nKlass\nq\x01(K\x01tq\x02tq\x03.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        let r = with_state(b"\x80\x04\x8c\x06my.mod\x94\x8c\x05Klass\x94\x93\x94N\x86\x94.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        // ((module, name), args): ZODB 3, strings as py2 str (protocol 1
        // MARK ... TUPLE, protocol 2 TUPLE2), bytes or text.
        let r = with_state(b"((U\x06my.modq\x01U\x05Klassq\x02tq\x03Ntq\x04.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        let r = with_state(b"\x80\x02U\x06my.modU\x05Klass\x86N\x86.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        let r = with_state(b"\x80\x03X\x06\x00\x00\x00my.modC\x05Klass\x86)\x86.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
        // Protocol 0 strings without escapes.
        let r = with_state(b"((S'my.mod'\np1\nS'Klass'\np2\ntp3\nNtp4\n.");
        assert_eq!(class(&r).as_deref(), Some("my.mod.Klass"));
    }

    #[test]
    fn unknown_classes() {
        let cases: [&[u8]; 14] = [
            b"",
            b"x",
            b"data",
            // A bare (module, name) pair is not a form ZODB writes.
            b"\x80\x02U\x06my.modU\x05Klass\x86.N.",
            // Not a class at all, or a tuple of something else.
            b"\x80\x03N.N.",
            b"\x80\x03K\x01N\x86.N.",
            // A persistent class referenced by oid: (pid, None).
            b"\x80\x03C\x08\x00\x00\x00\x00\x00\x00\x00\x01cm\nMeta\n\x86QN\x86.N.",
            // STACK_GLOBAL of bytes (Python refuses it), an extension code.
            b"\x80\x04C\x01mC\x01C\x93.N.",
            b"\x80\x02\x82\x01.N.",
            // Escaped protocol-0 strings are not decoded.
            b"((S'my\\x2emod'\nS'Klass'\ntNt.N.",
            // A class pickle cut short: no class, and an error.
            b"\x80\x03cpersistent.mapping\nPersistentMapping",
            b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00",
            // Three strings, or a pair of a string and a number.
            b"\x80\x02U\x01aU\x01bU\x01c\x87N\x86.N.",
            b"\x80\x02U\x01aK\x01\x86N\x86.N.",
        ];
        for r in cases {
            assert_eq!(class(r), None, "{r:?}");
        }
        assert!(
            scan(b"\x80\x03cpersistent.mapping\nPersistentMapping")
                .refs
                .is_err()
        );
        // The class pickle is whole, the state is not: the class is known,
        // the references are an error (the collector keeps everything).
        let mut r = record(b"(");
        r.extend_from_slice(b"garbage");
        let scanned = scan(&r);
        assert_eq!(
            scanned.class.as_deref(),
            Some("persistent.mapping.PersistentMapping")
        );
        assert!(scanned.refs.is_err());
    }

    #[test]
    fn class_names_are_bounded_and_lossy() {
        let mut r = b"\x80\x03c".to_vec();
        r.extend(std::iter::repeat_n(b'm', 150));
        r.extend_from_slice("\né".as_bytes());
        r.extend(std::iter::repeat_n(b'n', 100));
        r.extend_from_slice(b"\n.N.");
        let name = class(&r).unwrap();
        assert!(name.len() <= MAX_CLASS_NAME_BYTES, "{}", name.len());
        assert!(name.ends_with("..."), "{name}");
        assert!(name.starts_with(&"m".repeat(150)));
        // A name just under the bound is whole.
        let mut r = b"\x80\x03c".to_vec();
        r.extend(std::iter::repeat_n(b'm', MAX_CLASS_NAME_BYTES - 2));
        r.extend_from_slice(b"\nK\n.N.");
        assert_eq!(class(&r).unwrap().len(), MAX_CLASS_NAME_BYTES);
        // Not UTF-8: replaced, never an error.
        let r = b"\x80\x03cm\xff\nC\n.N.";
        assert_eq!(class(r).as_deref(), Some("m\u{fffd}.C"));
    }

    #[test]
    fn class_pickle_pairs_keep_their_meaning_as_persistent_ids() {
        // A (oid, name) pair in the class pickle used as a persistent id,
        // there and, from the memo, in the state: still a reference.
        let mut r = b"\x80\x03(".to_vec();
        r.extend(oid_bytes(OID1));
        r.extend_from_slice(b"U\x01ntq\x00QN\x86.\x80\x03h\x00Q.");
        assert_eq!(refs(&r), [1]);
        let mut r = b"\x80\x02".to_vec();
        r.extend(oid_bytes(OID2));
        r.extend_from_slice(b"U\x01n\x86q\x00Q.\x80\x02h\x00Q.");
        assert_eq!(refs(&r), [2]);
        // A class used as a persistent id is refused as before.
        assert!(matches!(
            references(b"\x80\x03cm\nC\nq\x00Q."),
            Err(RefError::BadReference { .. })
        ));
        assert!(matches!(
            references(b"\x80\x03cm\nC\nq\x00N\x86Q."),
            Err(RefError::BadReference { .. })
        ));
        // More names than the walker keeps: the first is the class.
        let mut r = b"\x80\x02(".to_vec();
        for i in 0..=MAX_NAMES {
            r.extend_from_slice(format!("cm{i}\nC\n").as_bytes());
        }
        r.extend_from_slice(b"t.N.");
        assert_eq!(class(&r).as_deref(), Some("m0.C"));
        let mut r = b"\x80\x02".to_vec();
        for i in 0..MAX_NAMES {
            r.extend_from_slice(format!("cm{i}\nC\n0").as_bytes());
        }
        r.extend_from_slice(b"cm\nC\n.N.");
        assert_eq!(class(&r), None, "no room left for the class");
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let mut r = b"\x80\x03".to_vec();
        r.extend(std::iter::repeat_n(b'(', 200_000));
        r.extend(oid_bytes(OID1));
        r.extend_from_slice(b"N\x86Q");
        r.extend(std::iter::repeat_n(b't', 200_000));
        r.push(b'.');
        assert_eq!(refs(&r), [1]);
        let mut r = b"\x80\x03".to_vec();
        r.extend(std::iter::repeat_n(b']', 200_000));
        r.push(b'.');
        assert_eq!(refs(&r), Vec::<u64>::new());
    }
}
