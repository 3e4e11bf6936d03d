//! Golden tests for the msgpack (`M5`) codec: every msgpack frame captured
//! between stock Python ZEO clients and servers (`fixtures/zeo5-py3/
//! 15-msgpack`, the `M5` answer to a `Z5` server in `18-...`, and the
//! Python-2 client over msgpack in `fixtures/zeo5-py2`) decodes, re-encodes
//! byte for byte, and every server frame is what our envelope encoders
//! write for it.

mod common;

use common::{fixtures_dir, hex_decode};

use zeotemp::protocol::envelope::{self, Encoding, MarshalError};
use zeotemp::protocol::msgpack;
use zeotemp::protocol::value::{DecodeLimits, Value};

struct Frame {
    file: String,
    seq: u64,
    dir: String,
    payload: Vec<u8>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The msgpack frames of the captures: after each connection's handshake
/// (`M5` answered by the client), every frame is a 4-item array.
fn msgpack_frames() -> Vec<Frame> {
    let mut out = Vec::new();
    for (folder, file) in [
        ("zeo5-py3", "15-msgpack.jsonl"),
        ("zeo5-py3", "18-heartbeat-and-protocol-errors.jsonl"),
        ("zeo5-py2", "py2-06-py2client-py3server-msgpack.jsonl"),
        ("zeo5-py2", "py2-07-py2client-py2server-msgpack.jsonl"),
    ] {
        let path = fixtures_dir(folder).join(file);
        let text = std::fs::read_to_string(&path).expect("read fixture");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let rec: serde_json::Value = serde_json::from_str(line).expect("jsonl line");
            let Some(h) = rec.get("hex").and_then(|h| h.as_str()) else {
                continue;
            };
            let payload = hex_decode(h);
            if payload.first() != Some(&0x94) {
                continue; // handshakes, pickle frames
            }
            out.push(Frame {
                file: file.to_owned(),
                seq: rec["seq"].as_u64().expect("seq"),
                dir: rec["dir"].as_str().expect("dir").to_owned(),
                payload,
            });
        }
    }
    out
}

fn payload_of(frame: &[u8]) -> &[u8] {
    let (prefix, payload) = frame.split_at(4);
    assert_eq!(
        u32::from_be_bytes(prefix.try_into().unwrap()) as usize,
        payload.len()
    );
    payload
}

#[test]
fn every_captured_msgpack_frame_round_trips() {
    let frames = msgpack_frames();
    assert!(frames.len() > 60, "only {} msgpack frames", frames.len());
    for f in &frames {
        let v = msgpack::decode(&f.payload, &DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{} seq {}: {e}", f.file, f.seq));
        assert_eq!(
            hex(&msgpack::encode(&v)),
            hex(&f.payload),
            "{} seq {} re-encoded",
            f.file,
            f.seq
        );
    }
}

#[test]
fn captured_requests_decode_to_messages() {
    let mut n = 0;
    for f in msgpack_frames().iter().filter(|f| f.dir == "c2s") {
        let m = envelope::decode_msgpack_message(&f.payload, &DecodeLimits::default());
        if f.file.starts_with("py2-") {
            // A Python-2 client sends its method names as bin; the stock
            // Python-3 server refuses them ("Invalid method"), as we do.
            if f.file.starts_with("py2-06") {
                assert_eq!(
                    m,
                    Err(MarshalError::BadMethodName("bytes")),
                    "seq {}",
                    f.seq
                );
            }
            continue;
        }
        let m = m.unwrap_or_else(|e| panic!("{} seq {}: {e}", f.file, f.seq));
        assert!(
            !m.method.is_empty() && m.method != ".reply",
            "seq {}",
            f.seq
        );
        assert!(
            matches!(m.args, Value::Tuple(_)),
            "{} seq {}: args {:?}",
            f.file,
            f.seq,
            m.args
        );
        n += 1;
    }
    assert!(n > 30, "only {n} requests");
}

/// Every reply, error reply and push the stock Python-3 server wrote is
/// what `encode_reply` / `encode_error` / `encode_call` write for the same
/// values.
#[test]
fn captured_server_frames_are_what_we_write() {
    let mut kinds = [0; 3];
    for f in msgpack_frames()
        .iter()
        .filter(|f| f.dir == "s2c" && !f.file.starts_with("py2-07"))
    {
        let Value::Tuple(items) = msgpack::decode(&f.payload, &DecodeLimits::default()).unwrap()
        else {
            panic!("seq {}: not an array", f.seq)
        };
        let [msgid, flags, name, last]: [Value; 4] = items.try_into().unwrap();
        let name = name.as_text().expect("name").into_owned();
        let ours = match (&flags, name.as_str()) {
            (Value::Int(2), ".reply") => {
                kinds[1] += 1;
                let Value::Tuple(parts) = &last else {
                    panic!("seq {}: error without (class, state)", f.seq)
                };
                let class = parts[0].as_text().expect("class name");
                envelope::encode_error(Encoding::Msgpack, &msgid, &class, &parts[1])
            }
            (Value::Int(0), ".reply") => {
                kinds[0] += 1;
                envelope::encode_reply(Encoding::Msgpack, &msgid, &last)
            }
            (Value::Bool(true), method) => {
                kinds[2] += 1;
                assert_eq!(msgid, Value::Int(0));
                envelope::encode_call(Encoding::Msgpack, method, &last)
            }
            other => panic!("seq {}: unexpected {other:?}", f.seq),
        };
        assert_eq!(
            hex(payload_of(&ours)),
            hex(&f.payload),
            "{} seq {}",
            f.file,
            f.seq
        );
    }
    // Replies, error replies (POSKeyError, ConflictError), pushes
    // (info, invalidateTransaction) all occur.
    assert!(kinds.iter().all(|&k| k >= 2), "{kinds:?}");
}
