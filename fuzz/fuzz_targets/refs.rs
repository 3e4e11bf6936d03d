//! The reference scanner on any record: a list of oids or an error, never
//! a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(oids) = zeotemp::storage::refs::references(data) {
        // Each reference is 8 bytes of the record at least.
        assert!(oids.len() * 8 <= data.len());
    }
});
