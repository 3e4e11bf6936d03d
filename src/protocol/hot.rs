//! The hot lane: the two requests a stock Python 3 client sends most, found
//! by their exact bytes and handled without decoding them into values.
//!
//! A ZEO client with `server-sync on` asks `lastTransaction()` at the start
//! of every transaction and `loadBefore(oid, tid)` for every object it does
//! not have (after each invalidation); between them they are most of what a
//! Zope site sends. The stock client pickles each with protocol 3 and
//! `fast = 1`, so every one has the same bytes but for its ids:
//!
//! ```text
//! loadBefore:      80 03 28 | 43 08 OID 43 08 TID 86 | 89 | 58 0a 00 00 00 "loadBefore"      | 43 08 OID 43 08 TID 86 | 74 2e
//! lastTransaction: 80 03 28 | 4b ID  (or 4d, 4a)     | 89 | 58 0f 00 00 00 "lastTransaction" | 29                     | 74 2e
//! ```
//!
//! (`PROTO 3`, `MARK`, the message id, `False`, the name, the arguments,
//! `TUPLE`, `STOP`.) [`recognize`] matches exactly these and gives the ids;
//! the reply echoes the message id's bytes as the client pickled them. Only
//! the form Python's pickler writes is taken (an int id in its shortest
//! opcode, not negative), so those bytes are what re-encoding the decoded
//! id would give: the reply is byte for byte the general path's (the tests
//! check both on every id form). Anything else, a Python 2 or msgpack
//! client's request included, goes the general way.

use crate::protocol::ids::{Oid, Tid};
use crate::protocol::pickle::opcodes as op;

/// A request of the hot lane: its message id as the client pickled it, and
/// its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotRequest<'a> {
    LoadBefore { msgid: &'a [u8], oid: Oid, tid: Tid },
    LastTransaction { msgid: &'a [u8] },
}

/// `PROTO 3 MARK`: every message of a Python 3 client.
const HEAD: [u8; 3] = [op::PROTO, 3, op::MARK];
/// `False` (the call expects a reply), then `BINUNICODE` and the length.
const LOAD_BEFORE: &[u8] = b"\x89X\x0a\x00\x00\x00loadBefore";
const LAST_TRANSACTION: &[u8] = b"\x89X\x0f\x00\x00\x00lastTransaction)";
/// `TUPLE STOP`.
const TAIL: [u8; 2] = [op::TUPLE, op::STOP];

/// The request in `payload` (a frame's payload), if it is one of the hot
/// lane's in exactly the stock client's form.
pub fn recognize(payload: &[u8]) -> Option<HotRequest<'_>> {
    let body = payload.strip_prefix(&HEAD)?.strip_suffix(&TAIL)?;
    if let Some((msgid, rest)) = oid_tid(body)
        && let Some(args) = rest.strip_prefix(LOAD_BEFORE)
        && let Some((_, [])) = oid_tid(args)
    {
        let (oid, tid) = (eight(args, 2)?, eight(args, 12)?);
        return Some(HotRequest::LoadBefore {
            msgid,
            oid: Oid(oid),
            tid: Tid(tid),
        });
    }
    let n = int_id_len(body)?;
    let (msgid, rest) = body.split_at(n);
    (rest == LAST_TRANSACTION).then_some(HotRequest::LastTransaction { msgid })
}

/// `C 08 <8 bytes> C 08 <8 bytes> TUPLE2` at the start of `b` (an
/// `(oid, tid)` pair): it, and what follows.
fn oid_tid(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let pair = b.get(..21)?;
    let ok = pair[0] == op::SHORT_BINBYTES
        && pair[1] == 8
        && pair[10] == op::SHORT_BINBYTES
        && pair[11] == 8
        && pair[20] == op::TUPLE2;
    ok.then(|| b.split_at(21))
}

/// The big-endian u64 of the 8 bytes at `at`.
fn eight(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The length of the int at the start of `b` if Python's pickler would
/// have written it so (its shortest opcode) and it is not negative (-1 is
/// a heartbeat).
fn int_id_len(b: &[u8]) -> Option<usize> {
    match *b.first()? {
        op::BININT1 => (b.len() >= 2).then_some(2),
        op::BININT2 => {
            let v = u16::from_le_bytes(b.get(1..3)?.try_into().ok()?);
            (v > 0xff).then_some(3)
        }
        op::BININT => {
            let v = i32::from_le_bytes(b.get(1..5)?.try_into().ok()?);
            (v > 0xffff).then_some(5)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_before(msgid: (u64, u64), oid: u64, tid: u64) -> Vec<u8> {
        let mut p = HEAD.to_vec();
        for x in [msgid.0, msgid.1] {
            p.extend_from_slice(&[op::SHORT_BINBYTES, 8]);
            p.extend_from_slice(&x.to_be_bytes());
        }
        p.push(op::TUPLE2);
        p.extend_from_slice(LOAD_BEFORE);
        for x in [oid, tid] {
            p.extend_from_slice(&[op::SHORT_BINBYTES, 8]);
            p.extend_from_slice(&x.to_be_bytes());
        }
        p.push(op::TUPLE2);
        p.extend_from_slice(&TAIL);
        p
    }

    #[test]
    fn the_stock_clients_requests_are_recognized() {
        // Captured from ZEO 6.2 on Python 3 (fixtures/zeo5-py3).
        let lb = crate::protocol::testhex::unhex(
            "80032843080000000000000000430800000000000000018689580a0000006c6f61644265666f72654308\
             0000000000000000430800000000000000018674 2e",
        );
        assert_eq!(
            recognize(&lb),
            Some(HotRequest::LoadBefore {
                msgid: &lb[3..24],
                oid: Oid(0),
                tid: Tid(1)
            })
        );
        let lt = crate::protocol::testhex::unhex(
            "8003284b0889580f0000006c6173745472616e73616374696f6e29742e",
        );
        assert_eq!(
            recognize(&lt),
            Some(HotRequest::LastTransaction { msgid: &lt[3..5] })
        );
        let p = load_before((7, 8), 0x0102, 0x0304_0506_0708_090a);
        assert_eq!(
            recognize(&p),
            Some(HotRequest::LoadBefore {
                msgid: &p[3..24],
                oid: Oid(0x0102),
                tid: Tid(0x0304_0506_0708_090a)
            })
        );
    }

    #[test]
    fn anything_else_goes_the_general_way() {
        let p = load_before((7, 8), 1, 2);
        // Every single byte changed, dropped or added: never a different
        // request of the lane (an id byte changed is the same request with
        // another id).
        for i in 0..p.len() {
            let id_byte = (5..13)
                .chain(15..23)
                .chain(42..50)
                .chain(52..60)
                .any(|j| j == i);
            let mut q = p.clone();
            q[i] ^= 0x40;
            assert_eq!(recognize(&q).is_some(), id_byte, "byte {i} changed");
            let mut q = p.clone();
            q.remove(i);
            assert_eq!(recognize(&q), None, "byte {i} dropped");
            let mut q = p.clone();
            q.insert(i, 0);
            assert_eq!(recognize(&q), None, "byte {i} added");
        }
        // Message ids not in their shortest form, negative (a heartbeat is
        // -1), or not an int.
        for id in [
            &b"M\x05\x00"[..],
            b"J\x05\x00\x00\x00",
            b"J\xff\xff\xff\xff",
            b"J\x00\x00\x00\x80",
            b"\x8a\x01\x05",
            b"N",
            b"K",
        ] {
            let mut q = HEAD.to_vec();
            q.extend_from_slice(id);
            q.extend_from_slice(LAST_TRANSACTION);
            q.extend_from_slice(&TAIL);
            assert_eq!(recognize(&q), None, "{id:?}");
        }
        for id in [&b"K\x05"[..], b"M\x00\x01", b"J\x00\x00\x01\x00"] {
            let mut q = HEAD.to_vec();
            q.extend_from_slice(id);
            q.extend_from_slice(LAST_TRANSACTION);
            q.extend_from_slice(&TAIL);
            assert_eq!(
                recognize(&q),
                Some(HotRequest::LastTransaction { msgid: id }),
                "{id:?}"
            );
        }
        assert_eq!(recognize(b""), None);
        assert_eq!(recognize(&HEAD), None);
    }
}
