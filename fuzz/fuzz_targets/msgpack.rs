//! The msgpack (`M5`) decoder on any payload: no panic, no stack overflow;
//! what decodes (with the server's default limits) re-encodes to bytes
//! that decode to the same value, and those bytes are the packer's own
//! form (encoding the value again gives them back). The envelope decoder
//! takes the same payload without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeotemp::protocol::msgpack;
use zeotemp::protocol::value::DecodeLimits;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    let _ = zeotemp::protocol::envelope::decode_msgpack_message(data, &limits);
    let Ok(v) = msgpack::decode(data, &limits) else {
        return;
    };
    let _ = v.forbidden_global();
    // Every value the decoder makes can be written: arrays, maps, ints
    // (a uint64 above i64::MAX as a BigInt), floats, bin, str, nil, bools.
    let bytes = msgpack::encode(&v);
    let again = msgpack::decode(&bytes, &limits).expect("a re-encoded value decodes");
    // Compared as text: NaN is not equal to itself, but prints the same.
    assert_eq!(format!("{again:?}"), format!("{v:?}"));
    assert_eq!(msgpack::encode(&again), bytes);
});
