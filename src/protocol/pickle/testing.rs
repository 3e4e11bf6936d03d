//! Helpers shared by the pickle codec's unit tests (and the value
//! tests, which check values through their pickles).

use bytes::Bytes;

use super::{Dialect, PickleError, decode, encode};
use crate::protocol::testhex::{hex, unhex};
use crate::protocol::value::{DecodeLimits, Value};

pub(crate) fn dec(b: &[u8]) -> Result<Value, PickleError> {
    decode(b, &DecodeLimits::default())
}

pub(crate) fn dec_hex(s: &str) -> Result<Value, PickleError> {
    dec(&unhex(s))
}

pub(crate) fn enc(v: &Value) -> String {
    hex(&encode(v, Dialect::Py3))
}

pub(crate) fn enc2(v: &Value) -> String {
    hex(&encode(v, Dialect::Py2))
}

pub(crate) fn enc1(v: &Value) -> String {
    hex(&encode(v, Dialect::Py2Protocol1))
}

pub(crate) fn s(x: &str) -> Value {
    Value::str(x)
}

pub(crate) fn int(i: i64) -> Value {
    Value::Int(i)
}

pub(crate) fn pystr(b: &'static [u8]) -> Value {
    Value::PyStr(Bytes::from_static(b))
}

pub(crate) fn tuple(v: Vec<Value>) -> Value {
    Value::Tuple(v)
}

pub(crate) fn list(v: Vec<Value>) -> Value {
    Value::List(v)
}

pub(crate) fn is_invalid(r: Result<Value, PickleError>, needle: &str) -> bool {
    matches!(r, Err(PickleError::Invalid { ref reason, .. }) if reason.contains(needle))
}

/// `{'a': [1, 2.5, None, True, False, 'é\\u', 2**70, -5, (1, 2, 3, 4),
/// (), (7,)], 'b': {}, 'c': 'x\n\'"'}` as CPython 3.11 pickles it with
/// protocols 0 to 4 (memo included).
pub(crate) const SAMPLE: [&str; 5] = [
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

pub(crate) fn sample_value() -> Value {
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

/// Pieces of pickles the decoders' fast paths know, for the tests that
/// compare a fast path with the general one on random strings of them
/// (each test adds pieces of its own): marks, tuples, an empty dict, the
/// constants, ints (`LONG1` of a Python 3 client's transaction id, one past
/// `i64`, empty, truncated).
pub(crate) const FAST_PIECES: &[&[u8]] = &[
    b"(",
    b"t",
    b"\x85",
    b"\x86",
    b"\x87",
    b")",
    b"}",
    b"N",
    b"\x88",
    b"\x89",
    b"K\x05",
    b"\x8a\x06\xd0\xa7\xf5\xd0\xde\x7f",
    b"\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x80",
    b"\x8a\x00",
    b"\x8a\x05ab",
];
