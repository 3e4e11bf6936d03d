//! A small msgpack codec for ZEO's `M5` protocol: plain data only, the
//! envelope and the values ZEO puts in it (protocol doc §3.3).
//!
//! A stock ZEO peer in msgpack mode writes `packb(msg, use_bin_type=True)`
//! and reads `unpackb(data, raw=False, use_list=False)`
//! (`ZEO/asyncio/marshal.py`). So on the wire: `bytes` are `bin`, text is
//! `str`, tuples and lists are arrays, dicts maps, ints the smallest msgpack
//! int, floats `float64`; no extension types. Exceptions in error replies
//! are already plain data here (`(class_name, state)`, see
//! [`crate::protocol::envelope::encode_error`]), as the stock server's `server_default`
//! makes them.
//!
//! Decoding maps into the same [`Value`]s as the pickle decoder: arrays
//! become [`Value::Tuple`] (as `use_list=False` makes them tuples), `bin`
//! [`Value::Bytes`], `str` [`Value::Str`], maps [`Value::Dict`] (keys of any
//! type, in wire order, not deduplicated), an unsigned 64-bit int above
//! `i64::MAX` a [`Value::BigInt`]. Encoding writes every [`Value`] byte for
//! byte as the Python `msgpack` packer does (`msgpack/fallback.py
//! Packer._pack`, identical to its C extension).
//!
//! Hardening, as in [`crate::protocol::pickle`]: bad input is an error, never a panic
//! or an unbounded cost. The decoder is iterative; every length is checked
//! against the bytes left before anything is read or allocated; containers
//! nest at most [`DecodeLimits::max_depth`] levels (the envelope array is
//! level 1); a message decodes to at most [`DecodeLimits::max_items`]
//! values, and a container's declared item count is charged against that
//! budget when its header is read, so the capacity reserved for items
//! announced but not yet read never exceeds the budget either. Extension
//! types, the never-used byte `0xc1`, invalid UTF-8 in a `str`, and bytes
//! after the message are errors. The encoder is iterative too, so any
//! nesting depth is fine.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::value::{DecodeLimits, Value};

/// Why a msgpack message could not be decoded. Offsets are byte offsets
/// into the payload (of the value at fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("msgpack truncated at offset {offset}: {needed} more byte(s) needed")]
    Truncated { offset: usize, needed: usize },
    #[error("{count} byte(s) of trailing data after the message at offset {offset}")]
    TrailingData { offset: usize, count: usize },
    #[error("msgpack extension type at offset {offset}: ZEO messages carry none")]
    Extension { offset: usize },
    #[error("invalid msgpack byte 0x{byte:02x} at offset {offset}")]
    InvalidByte { byte: u8, offset: usize },
    #[error("msgpack str at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("containers nested deeper than {max_depth} at offset {offset}")]
    TooDeep { offset: usize, max_depth: usize },
    #[error(
        "more than {limit} values at offset {offset} (a message may decode to at most that many)"
    )]
    TooManyItems { offset: usize, limit: usize },
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

/// Decodes one complete msgpack value (nothing may follow it). `bin`
/// values are copied out of `data`.
pub fn decode(data: &[u8], limits: &DecodeLimits) -> Result<Value, MsgpackError> {
    Decoder {
        data,
        pos: 0,
        items_left: limits.max_items,
        max_items: limits.max_items,
        max_depth: limits.max_depth,
    }
    .run()
}

/// A container being filled.
enum Open {
    Array {
        items: Vec<Value>,
        left: usize,
    },
    Map {
        pairs: Vec<(Value, Value)>,
        key: Option<Value>,
        /// Pairs still to come, counting the one whose key is held.
        left: usize,
    },
}

/// What one read step produced.
enum Token {
    Value(Value),
    Array(usize),
    Map(usize),
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    /// Values still allowed: the top-level value and every container's
    /// declared items are charged when they are announced.
    items_left: usize,
    max_items: usize,
    max_depth: usize,
}

impl Decoder<'_> {
    fn run(mut self) -> Result<Value, MsgpackError> {
        self.charge(1, 0)?;
        let mut stack: Vec<Open> = Vec::new();
        loop {
            let offset = self.pos;
            let token = self.token()?;
            if !matches!(token, Token::Value(_)) && stack.len() >= self.max_depth {
                return Err(MsgpackError::TooDeep {
                    offset,
                    max_depth: self.max_depth,
                });
            }
            let mut value = match token {
                Token::Value(v) => v,
                Token::Array(0) => Value::Tuple(Vec::new()),
                Token::Map(0) => Value::Dict(Vec::new()),
                Token::Array(n) => {
                    self.announce(n, offset)?;
                    stack.push(Open::Array {
                        items: Vec::with_capacity(n),
                        left: n,
                    });
                    continue;
                }
                Token::Map(n) => {
                    // Two values per pair.
                    self.announce(n.saturating_mul(2), offset)?;
                    stack.push(Open::Map {
                        pairs: Vec::with_capacity(n),
                        key: None,
                        left: n,
                    });
                    continue;
                }
            };
            // Hand the finished value to its container, closing every
            // container it completes.
            loop {
                match stack.last_mut() {
                    None => {
                        if self.pos < self.data.len() {
                            return Err(MsgpackError::TrailingData {
                                offset: self.pos,
                                count: self.data.len() - self.pos,
                            });
                        }
                        return Ok(value);
                    }
                    Some(Open::Array { items, left }) => {
                        items.push(value);
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                    }
                    Some(Open::Map { pairs, key, left }) => match key.take() {
                        None => {
                            *key = Some(value);
                            break;
                        }
                        Some(k) => {
                            pairs.push((k, value));
                            *left -= 1;
                            if *left > 0 {
                                break;
                            }
                        }
                    },
                }
                value = match stack.pop() {
                    Some(Open::Array { items, .. }) => Value::Tuple(items),
                    Some(Open::Map { pairs, .. }) => Value::Dict(pairs),
                    None => unreachable!("checked by last_mut above"),
                };
            }
        }
    }

    /// A container announced `n` values at `offset`: each takes at least a
    /// byte, and all count against the item budget now.
    fn announce(&mut self, n: usize, offset: usize) -> Result<(), MsgpackError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(MsgpackError::Truncated {
                offset,
                needed: n - left,
            });
        }
        self.charge(n, offset)
    }

    fn charge(&mut self, n: usize, offset: usize) -> Result<(), MsgpackError> {
        match self.items_left.checked_sub(n) {
            Some(rest) => {
                self.items_left = rest;
                Ok(())
            }
            None => Err(MsgpackError::TooManyItems {
                offset,
                limit: self.max_items,
            }),
        }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&[u8], MsgpackError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(MsgpackError::Truncated {
                offset: self.pos,
                needed: n - left,
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MsgpackError> {
        let s = self.take(N)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, MsgpackError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<usize, MsgpackError> {
        Ok(u16::from_be_bytes(self.array()?) as usize)
    }

    fn u32(&mut self) -> Result<usize, MsgpackError> {
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    fn bin(&mut self, n: usize) -> Result<Value, MsgpackError> {
        Ok(Value::Bytes(Bytes::copy_from_slice(self.take(n)?)))
    }

    fn str(&mut self, n: usize, offset: usize) -> Result<Value, MsgpackError> {
        let s = self.take(n)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(Value::Str(s.to_owned())),
            Err(_) => Err(MsgpackError::InvalidUtf8 { offset }),
        }
    }

    /// Reads one value's header, and a scalar's body.
    fn token(&mut self) -> Result<Token, MsgpackError> {
        let offset = self.pos;
        let b = self.u8()?;
        let v = match b {
            0x00..=0x7f => Value::Int(i64::from(b)),
            0x80..=0x8f => return Ok(Token::Map(usize::from(b & 0x0f))),
            0x90..=0x9f => return Ok(Token::Array(usize::from(b & 0x0f))),
            0xa0..=0xbf => self.str(usize::from(b & 0x1f), offset)?,
            0xc0 => Value::None,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => {
                let n = usize::from(self.u8()?);
                self.bin(n)?
            }
            0xc5 => {
                let n = self.u16()?;
                self.bin(n)?
            }
            0xc6 => {
                let n = self.u32()?;
                self.bin(n)?
            }
            0xc7..=0xc9 | 0xd4..=0xd8 => return Err(MsgpackError::Extension { offset }),
            0xca => Value::Float(f64::from(f32::from_be_bytes(self.array()?))),
            0xcb => Value::Float(f64::from_be_bytes(self.array()?)),
            0xcc => Value::Int(i64::from(self.u8()?)),
            0xcd => Value::Int(i64::from(u16::from_be_bytes(self.array()?))),
            0xce => Value::Int(i64::from(u32::from_be_bytes(self.array()?))),
            0xcf => uint64(u64::from_be_bytes(self.array()?)),
            0xd0 => Value::Int(i64::from(i8::from_be_bytes(self.array()?))),
            0xd1 => Value::Int(i64::from(i16::from_be_bytes(self.array()?))),
            0xd2 => Value::Int(i64::from(i32::from_be_bytes(self.array()?))),
            0xd3 => Value::Int(i64::from_be_bytes(self.array()?)),
            0xd9 => {
                let n = usize::from(self.u8()?);
                self.str(n, offset)?
            }
            0xda => {
                let n = self.u16()?;
                self.str(n, offset)?
            }
            0xdb => {
                let n = self.u32()?;
                self.str(n, offset)?
            }
            0xdc => return Ok(Token::Array(self.u16()?)),
            0xdd => return Ok(Token::Array(self.u32()?)),
            0xde => return Ok(Token::Map(self.u16()?)),
            0xdf => return Ok(Token::Map(self.u32()?)),
            0xe0..=0xff => Value::Int(i64::from(b as i8)),
            0xc1 => return Err(MsgpackError::InvalidByte { byte: b, offset }),
        };
        Ok(Token::Value(v))
    }
}

/// A `uint64`: an `Int` when it fits `i64`, else a `BigInt` (minimal two's
/// complement, little-endian: the 8 bytes and a zero sign byte).
fn uint64(u: u64) -> Value {
    match i64::try_from(u) {
        Ok(i) => Value::Int(i),
        Err(_) => {
            let mut b = u.to_le_bytes().to_vec();
            b.push(0);
            Value::BigInt(b)
        }
    }
}

/// A `BigInt` that fits `u64` (non-negative, at most 8 significant bytes).
fn bigint_as_u64(b: &[u8]) -> Option<u64> {
    if b.last().is_some_and(|&x| x & 0x80 != 0) {
        return None; // negative
    }
    let significant = b.len() - b.iter().rev().take_while(|&&x| x == 0).count();
    if significant > 8 {
        return None;
    }
    let mut buf = [0; 8];
    buf[..significant].copy_from_slice(&b[..significant]);
    Some(u64::from_le_bytes(buf))
}

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

/// Appends `v` as the Python packer writes it with `use_bin_type=True`.
///
/// [`Value::Global`] and [`Value::Opaque`] (never in a msgpack message or a
/// reply) are written as nil, as the pickle encoder writes them as `None`;
/// so is an integer outside both `i64` and `u64`, which Python's packer
/// refuses (only a pickle client could have stored one, e.g. in a
/// transaction's extension that `history` returns).
///
/// Scalars and flat tuples (most replies) are written without a work list,
/// so without an allocation.
pub fn encode_into(out: &mut BytesMut, v: &Value) {
    if encode_scalar(out, v) {
        return;
    }
    if let Value::Tuple(items) | Value::List(items) = v
        && items.iter().all(Value::is_scalar)
    {
        put_array_header(out, items.len());
        for item in items {
            encode_scalar(out, item);
        }
        return;
    }
    // Headers come before their items, so a stack of what is left to
    // write is all the state needed.
    let mut todo: Vec<&Value> = vec![v];
    while let Some(v) = todo.pop() {
        if encode_scalar(out, v) {
            continue;
        }
        match v {
            Value::Tuple(items) | Value::List(items) => {
                put_array_header(out, items.len());
                todo.extend(items.iter().rev());
            }
            Value::Dict(pairs) => {
                put_map_header(out, pairs.len());
                for (k, v) in pairs.iter().rev() {
                    todo.push(v);
                    todo.push(k);
                }
            }
            _ => unreachable!("scalars are written by encode_scalar"),
        }
    }
}

/// Writes `v` if it is a scalar and says whether it did.
fn encode_scalar(out: &mut BytesMut, v: &Value) -> bool {
    match v {
        Value::None | Value::Global { .. } | Value::Opaque(_) => put_nil(out),
        Value::Bool(b) => out.put_u8(if *b { 0xc3 } else { 0xc2 }),
        Value::Int(i) => put_int(out, *i),
        Value::BigInt(b) => match bigint_as_u64(b) {
            Some(u) => match i64::try_from(u) {
                Ok(i) => put_int(out, i),
                Err(_) => {
                    out.put_u8(0xcf);
                    out.put_u64(u);
                }
            },
            None => put_nil(out),
        },
        Value::Float(f) => {
            out.put_u8(0xcb);
            out.put_f64(*f);
        }
        Value::Bytes(b) => put_bin(out, b),
        // A py2 `str` (from a Python-2 pickle client, e.g. in a transaction
        // extension that `history` returns) reaches a Python-3 pickle
        // client as text if ASCII, else as bytes; the same here.
        Value::PyStr(b) => match std::str::from_utf8(b) {
            Ok(s) if s.is_ascii() => put_str(out, s),
            _ => put_bin(out, b),
        },
        Value::Str(s) => put_str(out, s),
        Value::Tuple(_) | Value::List(_) | Value::Dict(_) => return false,
    }
    true
}

/// `nil` (Python's `None`).
pub fn put_nil(out: &mut BytesMut) {
    out.put_u8(0xc0);
}

/// An integer in the smallest form, in Python's packer's order of checks.
pub fn put_int(out: &mut BytesMut, i: i64) {
    if (0..0x80).contains(&i) {
        out.put_u8(i as u8);
    } else if (-0x20..0).contains(&i) {
        out.put_i8(i as i8);
    } else if (0x80..=0xff).contains(&i) {
        out.put_slice(&[0xcc, i as u8]);
    } else if (-0x80..0).contains(&i) {
        out.put_u8(0xd0);
        out.put_i8(i as i8);
    } else if (0x100..=0xffff).contains(&i) {
        out.put_u8(0xcd);
        out.put_u16(i as u16);
    } else if (-0x8000..0).contains(&i) {
        out.put_u8(0xd1);
        out.put_i16(i as i16);
    } else if (0x1_0000..=0xffff_ffff).contains(&i) {
        out.put_u8(0xce);
        out.put_u32(i as u32);
    } else if (-0x8000_0000..0).contains(&i) {
        out.put_u8(0xd2);
        out.put_i32(i as i32);
    } else if i > 0 {
        out.put_u8(0xcf);
        out.put_u64(i as u64);
    } else {
        out.put_u8(0xd3);
        out.put_i64(i);
    }
}

/// A length as the 32-bit field it must fit: frames are limited to 4 GiB
/// long before, so saturating only keeps this panic-free.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `bin 8/16/32` and the bytes.
pub fn put_bin(out: &mut BytesMut, b: &[u8]) {
    match b.len() {
        n @ 0..=0xff => out.put_slice(&[0xc4, n as u8]),
        n @ 0x100..=0xffff => {
            out.put_u8(0xc5);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0xc6);
            out.put_u32(len32(n));
        }
    }
    out.put_slice(b);
}

/// `fixstr` / `str 8/16/32` and the UTF-8 bytes.
pub fn put_str(out: &mut BytesMut, s: &str) {
    match s.len() {
        n @ 0..=0x1f => out.put_u8(0xa0 | n as u8),
        n @ 0x20..=0xff => out.put_slice(&[0xd9, n as u8]),
        n @ 0x100..=0xffff => {
            out.put_u8(0xda);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0xdb);
            out.put_u32(len32(n));
        }
    }
    out.put_slice(s.as_bytes());
}

/// `fixarray` / `array 16/32` for `n` items (which follow).
pub fn put_array_header(out: &mut BytesMut, n: usize) {
    put_container_header(out, n, [0x90, 0xdc, 0xdd]);
}

/// `fixmap` / `map 16/32` for `n` pairs (which follow).
pub fn put_map_header(out: &mut BytesMut, n: usize) {
    put_container_header(out, n, [0x80, 0xde, 0xdf]);
}

/// The shortest of a container's three header forms: `fix` (count in the
/// low four bits), 16-bit and 32-bit count.
fn put_container_header(out: &mut BytesMut, n: usize, [fix, op16, op32]: [u8; 3]) {
    match n {
        0..=0x0f => out.put_u8(fix | n as u8),
        0x10..=0xffff => {
            out.put_u8(op16);
            out.put_u16(n as u16);
        }
        _ => {
            out.put_u8(op32);
            out.put_u32(len32(n));
        }
    }
}

/// `v` alone, encoded (for tests and tools).
pub fn encode(v: &Value) -> Bytes {
    let mut out = BytesMut::new();
    encode_into(&mut out, v);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testhex::{hex, unhex};
    use crate::rng::XorShift64;

    fn dec(h: &str) -> Result<Value, MsgpackError> {
        decode(&unhex(h), &DecodeLimits::default())
    }

    fn enc(v: &Value) -> String {
        hex(&encode(v))
    }

    fn s(x: &str) -> Value {
        Value::str(x)
    }

    #[test]
    fn ints_as_python_packs_them() {
        // Each boundary of msgpack/fallback.py Packer._pack.
        for (i, h) in [
            (0, "00"),
            (127, "7f"),
            (128, "cc80"),
            (255, "ccff"),
            (256, "cd0100"),
            (65535, "cdffff"),
            (65536, "ce00010000"),
            (0xffff_ffff, "ceffffffff"),
            (0x1_0000_0000, "cf0000000100000000"),
            (i64::MAX, "cf7fffffffffffffff"),
            (-1, "ff"),
            (-32, "e0"),
            (-33, "d0df"),
            (-128, "d080"),
            (-129, "d1ff7f"),
            (-32768, "d18000"),
            (-32769, "d2ffff7fff"),
            (-0x8000_0000, "d280000000"),
            (-0x8000_0001, "d3ffffffff7fffffff"),
            (i64::MIN, "d38000000000000000"),
        ] {
            assert_eq!(enc(&Value::Int(i)), h, "{i}");
            assert_eq!(dec(h), Ok(Value::Int(i)), "{h}");
        }
        // The other int forms decode too (Python's packer never writes a
        // non-negative number in a signed form, another writer may).
        assert_eq!(dec("d001"), Ok(Value::Int(1)));
        assert_eq!(dec("d30000000000000005"), Ok(Value::Int(5)));
        assert_eq!(dec("cf0000000000000005"), Ok(Value::Int(5)));
        // uint64 beyond i64: a BigInt, written back as uint64.
        let big = dec("cf8000000000000000").unwrap();
        assert_eq!(big, Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]));
        assert_eq!(enc(&big), "cf8000000000000000");
        assert_eq!(
            enc(&dec("cfffffffffffffffff").unwrap()),
            "cfffffffffffffffff"
        );
        // A BigInt that fits i64 (not minimal) is written as an Int would be.
        assert_eq!(enc(&Value::BigInt(vec![5, 0, 0])), "05");
        // Beyond u64 (or below i64): nothing msgpack can carry.
        assert_eq!(enc(&Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1])), "c0");
        assert_eq!(
            enc(&Value::BigInt(vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff
            ])),
            "c0"
        );
    }

    #[test]
    fn scalars() {
        assert_eq!(enc(&Value::None), "c0");
        assert_eq!(enc(&Value::Bool(false)), "c2");
        assert_eq!(enc(&Value::Bool(true)), "c3");
        assert_eq!(enc(&Value::Float(1.5)), "cb3ff8000000000000");
        assert_eq!(dec("cb3ff8000000000000"), Ok(Value::Float(1.5)));
        assert_eq!(dec("ca3fc00000"), Ok(Value::Float(1.5)));
        assert_eq!(enc(&Value::bytes(vec![1, 2])), "c4020102");
        assert_eq!(enc(&Value::PyStr(Bytes::from_static(b"a"))), "a161");
        assert_eq!(enc(&Value::PyStr(Bytes::from_static(b"\xff"))), "c401ff");
        assert_eq!(enc(&s("")), "a0");
        assert_eq!(enc(&s(".reply")), "a62e7265706c79");
        assert_eq!(dec("a62e7265706c79"), Ok(s(".reply")));
        // Never-sent values are nil, as the pickle encoder writes None.
        assert_eq!(
            enc(&Value::Global {
                module: "os".into(),
                name: "system".into()
            }),
            "c0"
        );
        assert_eq!(enc(&Value::Opaque(Box::new(Value::None))), "c0");
    }

    #[test]
    fn length_forms() {
        for (n, head) in [
            (0usize, "c400"),
            (255, "c4ff"),
            (256, "c50100"),
            (65535, "c5ffff"),
            (65536, "c600010000"),
        ] {
            let v = Value::bytes(vec![7u8; n]);
            let h = enc(&v);
            assert!(h.starts_with(head), "bin {n}: {}", &h[..12.min(h.len())]);
            assert_eq!(dec(&h), Ok(v));
        }
        for (n, head) in [
            (31usize, "bf"),
            (32, "d920"),
            (255, "d9ff"),
            (256, "da0100"),
            (65536, "db00010000"),
        ] {
            let v = s(&"x".repeat(n));
            let h = enc(&v);
            assert!(h.starts_with(head), "str {n}");
            assert_eq!(dec(&h), Ok(v));
        }
        for (n, head) in [(15usize, "9f"), (16, "dc0010"), (65536, "dd00010000")] {
            let v = Value::Tuple(vec![Value::None; n]);
            let h = enc(&v);
            assert!(h.starts_with(head), "array {n}");
            let limits = DecodeLimits {
                max_items: 100_000,
                max_depth: 8,
            };
            assert_eq!(decode(&encode(&v), &limits), Ok(v));
        }
        for (n, head) in [(15usize, "8f"), (16, "de0010")] {
            let v = Value::Dict(
                (0..n as i64)
                    .map(|i| (Value::Int(i), Value::None))
                    .collect(),
            );
            let h = enc(&v);
            assert!(h.starts_with(head), "map {n}");
            assert_eq!(dec(&h), Ok(v));
        }
    }

    #[test]
    fn containers() {
        // Arrays decode to tuples (use_list=False); lists encode as arrays.
        let v = Value::List(vec![Value::Int(1), Value::Tuple(vec![s("a")])]);
        assert_eq!(enc(&v), "920191a161");
        assert_eq!(
            dec("920191a161"),
            Ok(Value::Tuple(vec![
                Value::Int(1),
                Value::Tuple(vec![s("a")])
            ]))
        );
        assert_eq!(dec("90"), Ok(Value::Tuple(vec![])));
        assert_eq!(dec("80"), Ok(Value::Dict(vec![])));
        // Maps keep wire order and any key type.
        let m = Value::Dict(vec![
            (s("length"), Value::Int(0)),
            (Value::Tuple(vec![Value::Int(1)]), Value::Dict(vec![])),
        ]);
        assert_eq!(enc(&m), "82a66c656e677468009101 80".replace(' ', ""));
        assert_eq!(dec(&enc(&m)), Ok(m));
    }

    #[test]
    fn bad_input_is_an_error() {
        let err = |h: &str| dec(h).unwrap_err();
        assert_eq!(
            err(""),
            MsgpackError::Truncated {
                offset: 0,
                needed: 1
            }
        );
        assert_eq!(
            err("cd01"),
            MsgpackError::Truncated {
                offset: 1,
                needed: 1
            }
        );
        assert_eq!(
            err("c405aa"),
            MsgpackError::Truncated {
                offset: 2,
                needed: 4
            }
        );
        // An array announcing more items than bytes left fails at once.
        assert_eq!(
            err("ddffffffff00"),
            MsgpackError::Truncated {
                offset: 0,
                needed: 0xffff_ffff - 1
            }
        );
        assert_eq!(
            err("df0000000200"),
            MsgpackError::Truncated {
                offset: 0,
                needed: 3
            }
        );
        // An array of 4 with 3 bytes left; a uint16 cut after one byte.
        assert_eq!(
            err("94000102"),
            MsgpackError::Truncated {
                offset: 0,
                needed: 1
            }
        );
        assert_eq!(
            err("9200cd01"),
            MsgpackError::Truncated {
                offset: 3,
                needed: 1
            }
        );
        assert_eq!(
            err("c0c0"),
            MsgpackError::TrailingData {
                offset: 1,
                count: 1
            }
        );
        assert_eq!(
            err("c1"),
            MsgpackError::InvalidByte {
                byte: 0xc1,
                offset: 0
            }
        );
        assert_eq!(err("91d40100"), MsgpackError::Extension { offset: 1 });
        assert_eq!(err("c70101aa"), MsgpackError::Extension { offset: 0 });
        assert_eq!(err("a2c328"), MsgpackError::InvalidUtf8 { offset: 0 });
        assert_eq!(
            err("a2c328").to_string(),
            "msgpack str at offset 0 is not valid UTF-8"
        );
    }

    #[test]
    fn depth_is_bounded() {
        let limits = DecodeLimits {
            max_depth: 8,
            max_items: 1000,
        };
        let nested = |levels: usize| {
            let mut b = vec![0x91; levels - 1];
            b.push(0x90);
            b
        };
        assert!(decode(&nested(8), &limits).is_ok());
        assert_eq!(
            decode(&nested(9), &limits),
            Err(MsgpackError::TooDeep {
                offset: 8,
                max_depth: 8
            })
        );
        // Maps count as levels too; an empty one as deep as an empty array.
        let mut b = vec![0x81, 0xc0];
        b.extend(nested(8));
        assert!(matches!(
            decode(&b, &limits),
            Err(MsgpackError::TooDeep { .. })
        ));
        // The default (64) against 100,000 levels: an error, no recursion.
        let deep = nested(100_000);
        assert!(matches!(
            decode(&deep, &DecodeLimits::default()),
            Err(MsgpackError::TooDeep { max_depth: 64, .. })
        ));
    }

    #[test]
    fn items_are_bounded_when_announced() {
        let limits = DecodeLimits {
            max_depth: 8,
            max_items: 1000,
        };
        // 999 items + the array: 1000 values, fine; one more is not.
        let ok = encode(&Value::Tuple(vec![Value::None; 999]));
        assert!(decode(&ok, &limits).is_ok());
        let over = encode(&Value::Tuple(vec![Value::None; 1000]));
        assert_eq!(
            decode(&over, &limits),
            Err(MsgpackError::TooManyItems {
                offset: 0,
                limit: 1000
            })
        );
        // A map's pairs are two values each.
        let map = encode(&Value::Dict(vec![(Value::None, Value::None); 500]));
        assert!(matches!(
            decode(&map, &limits),
            Err(MsgpackError::TooManyItems { .. })
        ));
        // Nested arrays announcing big counts are charged before their
        // items arrive: no capacity is reserved past the budget.
        let mut b = vec![0xdc, 0x02, 0x00]; // 512 items...
        b.extend([0xdc, 0x02, 0x00]); // ...the first of which announces 512
        b.extend(vec![0xc0; 1100]);
        assert_eq!(
            decode(&b, &limits),
            Err(MsgpackError::TooManyItems {
                offset: 3,
                limit: 1000
            })
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift64::new(0x5eed);
        let limits = DecodeLimits {
            max_depth: 16,
            max_items: 5000,
        };
        // Bytes weighted towards headers and lengths, so many inputs get
        // deep into containers before failing.
        const INTERESTING: &[u8] = &[
            0x91, 0x92, 0x94, 0x9f, 0x81, 0x8f, 0xdc, 0xdd, 0xde, 0xdf, 0xc4, 0xc5, 0xc6, 0xd9,
            0xda, 0xdb, 0xcf, 0xd3, 0xca, 0xcb, 0xa3, 0xc0, 0xc1, 0xd4, 0xc7, 0xff, 0x00, 0x01,
        ];
        let mut decoded = 0;
        for round in 0..20_000 {
            let len = rng.below(64);
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.below(2) == 0 {
                        INTERESTING[rng.below(INTERESTING.len())]
                    } else {
                        rng.next_u64() as u8
                    }
                })
                .collect();
            if let Ok(v) = decode(&data, &limits) {
                decoded += 1;
                // Whatever decodes re-encodes to something that decodes to
                // the same value.
                let back = decode(&encode(&v), &limits).unwrap();
                assert!(same(&back, &v), "round {round}: {v:?} / {back:?}");
            }
        }
        assert!(decoded > 100, "only {decoded} inputs decoded");
    }

    /// A random value of at most `depth` levels.
    fn random_value(rng: &mut XorShift64, depth: usize) -> Value {
        let pick = if depth == 0 {
            rng.below(8)
        } else {
            rng.below(11)
        };
        match pick {
            0 => Value::None,
            1 => Value::Bool(rng.below(2) == 1),
            2 => Value::Int(rng.next_u64() as i64 >> rng.below(64)),
            3 => Value::Int(rng.below(300) as i64 - 150),
            4 => Value::Float(f64::from_bits(rng.next_u64()) / 3.0),
            5 => Value::bytes(
                (0..rng.below(300))
                    .map(|_| rng.next_u64() as u8)
                    .collect::<Vec<u8>>(),
            ),
            6 => Value::Str("é✓x".repeat(rng.below(40))),
            7 => uint64(rng.next_u64()),
            8 => Value::Tuple(
                (0..rng.below(20))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
            9 => Value::Dict(
                (0..rng.below(20))
                    .map(|_| (random_value(rng, 0), random_value(rng, depth - 1)))
                    .collect(),
            ),
            _ => Value::Tuple(vec![]),
        }
    }

    /// Floats compare by bits here (a NaN must round-trip too).
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
            (Value::Tuple(x), Value::Tuple(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            (Value::Dict(x), Value::Dict(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((k1, v1), (k2, v2))| same(k1, k2) && same(v1, v2))
            }
            _ => a == b,
        }
    }

    #[test]
    fn random_values_round_trip() {
        let mut rng = XorShift64::new(42);
        for round in 0..3000 {
            let v = random_value(&mut rng, 4);
            let bytes = encode(&v);
            let back = decode(&bytes, &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("round {round}: {e} for {v:?}"));
            assert!(
                same(&back, &v),
                "round {round}: {v:?} came back as {back:?}"
            );
            // And the encoding is canonical: the same bytes again.
            assert_eq!(encode(&back), bytes, "round {round}");
            // Every strict prefix is an error, never a panic.
            let cut = rng.below(bytes.len());
            assert!(decode(&bytes[..cut], &DecodeLimits::default()).is_err());
        }
    }
}
