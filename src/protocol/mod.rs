//! The ZEO wire protocol, both directions, with no I/O: byte buffers in,
//! values out and back. A frame ([`frame`]) holds one message; a message is
//! a pickle ([`pickle`]) or, in the `M5` dialect, msgpack ([`msgpack`]) of
//! ZEO's `(msgid, flags, name, args)` envelope ([`envelope`]); both codecs
//! read and write the same plain data ([`value`]); oids and tids are
//! [`ids`].
//!
//! Depends on nothing else in the crate but the defaults of its limits in
//! [`crate::config`] (a leaf; its tests also use `crate::rng`), so every
//! layer above may use it and it can be fuzzed on its own.

pub mod envelope;
pub mod frame;
pub mod hot;
pub mod ids;
pub mod msgpack;
pub mod pickle;
pub mod value;

/// Hex helpers shared by the codecs' unit tests.
#[cfg(test)]
pub(crate) mod testhex {
    /// Bytes from hex digits; white space is ignored.
    pub fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
