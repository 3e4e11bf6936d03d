//! The envelope decoder on any payload: no panic, no stack overflow; the
//! fast paths (pickle values, whole messages) and the full pickle decoder
//! agree; a decoded message's arguments re-encode and decode to the same
//! value (what the server echoes back, e.g. a msgid, survives the trip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeotemp::protocol::pickle::{self, Dialect};
use zeotemp::protocol::value::{DecodeLimits, Value};

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    let fast = pickle::decode(data, &limits);
    let full = pickle::decode_full(data, &limits);
    // Compared as text: NaN is not equal to itself, but prints the same.
    assert_eq!(format!("{fast:?}"), format!("{full:?}"));
    let message = zeotemp::protocol::envelope::decode_message(data, &limits);
    let message_full = zeotemp::protocol::envelope::decode_message_full(data, &limits);
    assert_eq!(format!("{message:?}"), format!("{message_full:?}"));
    if let Ok(m) = message {
        let _ = m.args.forbidden_global();
        let _ = m.msgid.forbidden_global();
        if !unencodable(&m.args) {
            let again = pickle::decode(&pickle::encode(&m.args, Dialect::Py3), &limits);
            // Memo copies can make a value of more nodes than the message
            // had opcodes; written out flat it may then exceed the limit.
            if !matches!(again, Err(pickle::PickleError::TooManyItems { .. })) {
                assert_eq!(again.as_ref(), Ok(&m.args));
            }
        }
    }
});

/// Values that cannot come back equal: globals and opaque values (written
/// as `None`; the server never sends them) and NaN (not equal to itself).
fn unencodable(v: &Value) -> bool {
    use Value::*;
    match v {
        Opaque(_) | Global { .. } => true,
        Float(f) => f.is_nan(),
        Tuple(items) | List(items) => items.iter().any(unencodable),
        Dict(pairs) => pairs.iter().any(|(k, v)| unencodable(k) || unencodable(v)),
        _ => false,
    }
}
