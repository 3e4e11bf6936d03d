//! The plain data of ZEO messages, as both codecs ([`crate::protocol::pickle`]
//! and [`crate::protocol::msgpack`]) decode and write it: [`Value`], and the
//! [`DecodeLimits`] both decoders apply. Depends on no codec.

use std::borrow::Cow;

use bytes::Bytes;

/// A decoded message value (plain data; nothing is evaluated). The
/// variants are named after the pickle opcodes they come from; msgpack
/// decodes to the same ones.
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
    /// `GLOBAL` / `STACK_GLOBAL`: recorded, never resolved, so the session
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

/// Limits applied while decoding one message (pickle or msgpack).
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

    /// Anything but a tuple, list or dict.
    pub fn is_scalar(&self) -> bool {
        !matches!(self, Value::Tuple(_) | Value::List(_) | Value::Dict(_))
    }

    /// Python truthiness.
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

/// Drops redundant sign bytes from a little-endian two's-complement integer
/// (the form of [`Value::BigInt`]).
pub(crate) fn minimal_twos(b: &[u8]) -> &[u8] {
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

/// A little-endian two's-complement integer (a `LONG1`/`LONG4` payload) as
/// a value: `Int` when it fits in `i64`, else a minimal `BigInt`.
pub(crate) fn int_from_le_twos(b: &[u8]) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pickle::testing::*;

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
}
