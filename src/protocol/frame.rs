//! ZEO framing: every message is a 4-byte big-endian payload length followed
//! by the payload (`ZEO/asyncio/smp.py`).
//!
//! This layer splits a byte stream into payloads ([`parse`]), refusing a
//! length over the configured maximum, and writes frames ([`put`] is the
//! one writer); it knows nothing about pickles. ZEO itself has no maximum;
//! we do, so one client cannot make the server buffer 4 GiB.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The length prefix of a frame.
pub const HEADER_LEN: usize = 4;

/// Most bytes reserved ahead for a frame still arriving. A length prefix is
/// only a promise: reserving all it announces (up to `max-frame-size`) let
/// a client that sends 4 bytes and stops hold 64 MiB of address space per
/// connection. Bigger frames grow the buffer as their bytes come in.
pub const MAX_RESERVE_AHEAD: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes (max-frame-size)")]
    TooLarge { len: usize, max: usize },
}

/// Takes one whole frame's payload off the front of `buf`.
///
/// `Ok(None)` means "not enough bytes yet"; the caller reads more. An
/// oversized length is refused as soon as its 4 bytes are in, before any of
/// its payload is buffered.
pub fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < HEADER_LEN + len {
        // Make room for (a bounded part of) the rest rather than growing
        // step by step.
        buf.reserve((HEADER_LEN + len - buf.len()).min(MAX_RESERVE_AHEAD));
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends one frame to `out`: the length prefix, then the payload written
/// by `payload`, straight into `out`; the length is patched in place
/// afterwards (no copy). Every frame zeotemp writes goes through here.
pub fn put(out: &mut BytesMut, payload: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.put_u32(0);
    payload(out);
    // A payload over 4 GiB cannot be framed; frame limits stop replies long
    // before that, so saturating here only keeps this function panic-free.
    let len = u32::try_from(out.len() - at - HEADER_LEN).unwrap_or(u32::MAX);
    out[at..at + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// A whole frame (length prefix and payload) for `payload`.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    put(&mut out, |out| out.extend_from_slice(payload));
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frames_split_off() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode(b"Z5"));
        buf.extend_from_slice(&encode(b"hello"));
        buf.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            parse(&mut buf, 100).unwrap().unwrap(),
            Bytes::from_static(b"Z5")
        );
        assert_eq!(
            parse(&mut buf, 100).unwrap().unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(parse(&mut buf, 100).unwrap(), None);
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let frame = encode(b"abcdef");
        let mut buf = BytesMut::new();
        for (i, byte) in frame.iter().enumerate() {
            assert_eq!(parse(&mut buf, 100).unwrap(), None, "after {i} bytes");
            buf.extend_from_slice(&[*byte]);
        }
        assert_eq!(
            parse(&mut buf, 100).unwrap().unwrap(),
            Bytes::from_static(b"abcdef")
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn put_appends_a_frame_after_what_is_there() {
        let mut out = BytesMut::from(&b"xy"[..]);
        put(&mut out, |out| out.extend_from_slice(b"abc"));
        put(&mut out, |_| {});
        assert_eq!(&out[..], b"xy\0\0\0\x03abc\0\0\0\0");
    }

    #[test]
    fn empty_frame_is_legal() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(parse(&mut buf, 100).unwrap().unwrap().len(), 0);
    }

    #[test]
    fn oversized_length_refused_before_payload() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            parse(&mut buf, 64).unwrap_err(),
            FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 64
            }
        );
        // Exactly at the limit is fine.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode(&[7u8; 64]));
        assert_eq!(parse(&mut buf, 64).unwrap().unwrap().len(), 64);
    }
}
