//! The pickle writer: [`Value`]s as the stock server's pickler writes
//! them (protocol 3, or protocol 1 for [`Dialect::Py2Protocol1`]), and the
//! `put_*`/`*_into` pieces the envelope writes a message from without
//! building a [`Value`] first.

use bytes::{BufMut, BytesMut};

use super::Dialect;
use super::opcodes as op;
use crate::protocol::value::{Value, minimal_twos};

/// Items per `APPENDS`/`SETITEMS` batch, as CPython's and zodbpickle's
/// `BATCHSIZE`.
const BATCH_SIZE: usize = 1000;

/// One step of [`encode_into`]'s work list: a value to write, or the
/// opcode that closes a container after its items.
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
        Value::Bool(b) if dialect.is_protocol1() => {
            out.put_u8(op::INT);
            out.put_slice(if *b { b"01\n" } else { b"00\n" });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pickle::encode;
    use crate::protocol::pickle::testing::*;
    use crate::protocol::value::int_from_le_twos;

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
