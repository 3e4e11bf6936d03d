//! The ZEO wire protocol, both directions, with no I/O: byte buffers in,
//! values out and back. A frame ([`frame`]) holds one message; a message is
//! a pickle ([`pickle`]) or, in the `M5` dialect, msgpack ([`msgpack`]) of
//! ZEO's `(msgid, flags, name, args)` envelope ([`envelope`]). Depends on
//! nothing else in the crate.

pub mod envelope;
pub mod frame;
pub mod ids;
pub mod msgpack;
pub mod pickle;
