//! The reference scanner on any record: a list of oids or an error, and a
//! class name or none, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeotemp::storage::refs;

fuzz_target!(|data: &[u8]| {
    let scanned = refs::scan(data);
    // One pass gives what the reference walk alone gives.
    assert_eq!(scanned.refs, refs::references(data));
    if let Ok(oids) = &scanned.refs {
        // Each reference is 8 bytes of the record at least.
        assert!(oids.len() * 8 <= data.len());
    }
    if let Some(class) = &scanned.class {
        assert!(class.len() <= refs::MAX_CLASS_NAME_BYTES);
        assert_eq!(refs::class_name(data).as_ref(), Some(class));
    }
});
