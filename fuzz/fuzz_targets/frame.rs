//! The frame reader: any byte stream, cut into reads at places the input
//! chooses, is split into frames or refused (oversized), never a panic,
//! and what it returns adds up to what came in.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    // A small maximum so the oversized path is reached too.
    let max = 1 + usize::from(cut) * 64;
    let mut buf = BytesMut::new();
    let mut taken = 0;
    for chunk in rest.chunks(usize::from(cut % 16) + 1) {
        buf.extend_from_slice(chunk);
        loop {
            match zeotemp::protocol::frame::parse(&mut buf, max) {
                Ok(Some(f)) => {
                    assert!(f.len() <= max);
                    taken += 4 + f.len();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert_eq!(taken + buf.len(), rest.len());
});
