//! zeotemp: a ZEO 5 server for temporary (in-memory) ZODB storages.
//!
//! Crate layout (see also `README.md`):
//!
//! ```text
//! socket ──> frame ──> marshal ──> rpc ──> storage
//! ```
//!
//! * [`types`]: `Oid`, `Tid` and ZODB TimeStamps.
//! * [`pickle`]: a restricted pickle codec for ZEO messages (plain data only).
//! * [`marshal`]: ZEO's `(msgid, flags, name, args)` envelope.
pub mod marshal;
pub mod pickle;
pub mod types;
