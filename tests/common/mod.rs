//! Helpers shared by the fixture-driven integration tests.

use std::path::PathBuf;

/// `fixtures/<folder>` of this repository.
pub fn fixtures_dir(folder: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(folder)
}

/// Bytes from the hex digits the fixture files carry.
pub fn hex_decode(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
