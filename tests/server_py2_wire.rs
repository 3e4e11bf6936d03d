//! A Python-2 client's connection (method names as py2 `str`, as ZEO 5 on
//! Python 2 writes them) next to a Python-3 one on the same storage. The
//! real clients are in `tests/python/test_py2_clients.py`; this pins the
//! bytes.

mod common;

use bytes::Bytes;
use common::client::{Client, Reply, Z64, b, s, t};
use common::{Server, cfg};
use zeotemp::protocol::envelope;
use zeotemp::protocol::pickle::{self, Dialect};
use zeotemp::protocol::value::Value;

fn py2(x: &[u8]) -> Value {
    Value::PyStr(Bytes::copy_from_slice(x))
}

/// Sends `(msgid, oneway, method, args)` with the method as a py2 `str`
/// (`SHORT_BINSTRING`), and waits for the reply of a sync call.
async fn py2_call(c: &mut Client, id: i64, oneway: bool, method: &str, args: Vec<Value>) -> Reply {
    let msg = t(vec![
        Value::Int(id),
        Value::Bool(oneway),
        py2(method.as_bytes()),
        t(args),
    ]);
    // PyStr is written as SHORT_BINSTRING whatever the dialect.
    c.send_frame(&pickle::encode(&msg, Dialect::Py3)).await;
    if oneway {
        return Ok(Value::None);
    }
    c.reply_to(&Value::Int(id)).await
}

/// The `extension` of the latest history entry of `oid`.
fn extension(reply: Reply) -> Vec<(Value, Value)> {
    let Ok(Value::List(entries)) = reply else {
        panic!("history: {reply:?}")
    };
    let Value::Dict(entry) = &entries[0] else {
        panic!("entry {:?}", entries[0])
    };
    let ext = entry
        .iter()
        .find(|(k, _)| k.as_text().as_deref() == Some("extension"))
        .map(|(_, v)| v.clone());
    let Some(Value::Dict(pairs)) = ext else {
        panic!("extension {ext:?}")
    };
    pairs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py2_extension_strs_reach_py3_history_as_text_or_bytes() {
    let srv = Server::start(cfg()).await;
    let mut p2 = Client::handshaken(srv.addr).await;
    // Replies to a Python-2 client: its tids as py2 str.
    let last = py2_call(
        &mut p2,
        1,
        false,
        "register",
        vec![py2(b"1"), Value::Bool(false)],
    )
    .await
    .unwrap();
    assert!(matches!(&last, Value::PyStr(t) if t.len() == 8), "{last:?}");
    let Ok(Value::List(oids)) = py2_call(&mut p2, 2, false, "new_oids", vec![]).await else {
        panic!("new_oids")
    };
    let oid = oids[0].clone();
    assert!(matches!(&oid, Value::PyStr(o) if o.len() == 8), "{oid:?}");

    // tpc_begin(txn, user, description, extension) as ZODB 5 on Python 2
    // sends it, with py2 str in the extension: ASCII and not.
    let ext = Value::Dict(vec![
        (py2(b"plain"), py2(b"ascii value")),
        (py2(b"high"), py2(b"\xff\xfe")),
        (s("uni"), s("\u{2603}")),
    ]);
    let txn = Value::Int(140412254566928); // id(txn), beyond i32
    let begin = vec![txn.clone(), py2(b"/ bob"), py2(b"caf\xc3\xa9"), ext];
    py2_call(&mut p2, 3, true, "tpc_begin", begin)
        .await
        .unwrap();
    let store = vec![oid.clone(), py2(&Z64), py2(b"record"), txn.clone()];
    py2_call(&mut p2, 4, true, "storea", store).await.unwrap();
    let voted = py2_call(&mut p2, 5, false, "vote", vec![txn.clone()]).await;
    assert_eq!(voted, Ok(Value::List(vec![])));
    let tid = py2_call(&mut p2, 6, false, "tpc_finish", vec![txn])
        .await
        .unwrap();
    assert!(matches!(&tid, Value::PyStr(t) if t.len() == 8), "{tid:?}");

    // A Python-3 client's history(): text if ASCII, else bytes (its
    // unpickler decodes SHORT_BINSTRING as ASCII: a non-ASCII one made the
    // reply undecodable and the call hung).
    let mut p3 = Client::registered(srv.addr).await;
    let oid3 = b(oid.as_bytes().unwrap());
    let ext3 = extension(p3.call("history", vec![oid3, Value::Int(1)]).await);
    assert_eq!(
        ext3,
        vec![
            (s("plain"), s("ascii value")),
            (s("high"), b(b"\xff\xfe")),
            (s("uni"), s("\u{2603}")),
        ]
    );
    // The Python-2 client gets all of it back as py2 str (the unicode
    // value that is not ASCII stays unicode).
    let ext2 = extension(py2_call(&mut p2, 7, false, "history", vec![oid, Value::Int(1)]).await);
    assert_eq!(
        ext2,
        vec![
            (py2(b"plain"), py2(b"ascii value")),
            (py2(b"high"), py2(b"\xff\xfe")),
            (py2(b"uni"), s("\u{2603}")),
        ]
    );
    srv.stop().await;
}

/// Sends `(msgid, False, method, args)` pickled with protocol 1 (no
/// `PROTO`), as ZEO 5.1 on Python 2 does, and returns the raw reply frame.
async fn p1_call(c: &mut Client, msgid: Value, method: &str, args: Vec<Value>) -> Bytes {
    let request = envelope::encode_request(Dialect::Py2Protocol1, &msgid, false, method, &t(args));
    c.write(&request).await;
    c.frame().await.expect("a reply")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The next frame that is not an `info` push (checking that those are
/// protocol 1 too: `(0, True as INT 01, 'info', ...)`).
async fn next_but_info(c: &mut Client) -> Bytes {
    loop {
        let f = c.frame().await.expect("a frame");
        if !hex(&f).contains(&hex(b"U\x04info(")) {
            return f;
        }
        assert!(
            hex(&f).starts_with(&hex(b"(K\x00I01\nU\x04info(")),
            "{}",
            hex(&f)
        );
    }
}

/// A ZEO 5.1 client (protocol 1) next to a Python 3 one: everything it gets
/// (replies, the invalidation push, a loadBefore result) is a protocol-1
/// pickle, with tids and oids as py2 `str`; its `zodbpickle.binary` oid
/// (copy_reg's reduction, as cPickle writes it) is read as bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol1_client_gets_protocol1_frames() {
    let srv = Server::start(cfg()).await;
    let mut p1 = Client::handshaken(srv.addr).await;
    let f = p1_call(
        &mut p1,
        Value::Int(1),
        "register",
        vec![py2(b"1"), Value::Bool(false)],
    )
    .await;
    // (1, 0, '.reply', <tid as str>) exactly as a ZEO 5.1 server writes it
    let h = hex(&f);
    assert!(h.starts_with("284b014b0055062e7265706c795508"), "{h}");
    assert!(h.ends_with("742e") && f.len() == 15 + 8 + 2, "{h}");

    // A Python 3 client commits; the protocol-1 client gets the push in
    // protocol 1: (0, True as INT 01, 'invalidateTransaction', (tid, [oid]))
    let mut p3 = Client::registered(srv.addr).await;
    let (oid3, tid3) = p3.commit_new(b"record", 7).await;
    let push = next_but_info(&mut p1).await;
    let mut want = hex(b"(K\x00I01\nU\x15invalidateTransaction(U\x08");
    want += &hex(tid3.as_bytes().unwrap());
    want += &hex(b"]U\x08");
    want += &hex(oid3.as_bytes().unwrap());
    want += &hex(b"att.");
    assert_eq!(hex(&push), want);

    // loadBefore with the oid as cPickle writes a zodbpickle.binary below
    // protocol 3; the (oid, tid) msgid is echoed as (str, str), and the
    // result is MARK data start None TUPLE.
    let o = oid3.as_bytes().unwrap();
    let mut binary =
        b"ccopy_reg\n_reconstructor\n(czodbpickle\nbinary\nc__builtin__\nstr\nU\x08".to_vec();
    binary.extend_from_slice(o);
    binary.extend_from_slice(b"tR");
    let maxtid = b"U\x08\x7f\xff\xff\xff\xff\xff\xff\xff";
    let mut req = b"((".to_vec();
    for part in [
        &binary[..],
        maxtid,
        b"tI00\nU\nloadBefore(",
        &binary[..],
        maxtid,
        b"tt.",
    ] {
        req.extend_from_slice(part);
    }
    p1.send_frame(&req).await;
    let f = next_but_info(&mut p1).await;
    let mut want = b"((U\x08".to_vec();
    want.extend_from_slice(o);
    want.extend_from_slice(maxtid);
    want.extend_from_slice(b"tK\x00U\x06.reply(U\x06record");
    want.extend_from_slice(b"U\x08");
    want.extend_from_slice(tid3.as_bytes().unwrap());
    want.extend_from_slice(b"Ntt.");
    assert_eq!(hex(&f), hex(&want));

    // The Python 3 client is unaffected: protocol 3 replies.
    let f = {
        p3.send(false, "lastTransaction", vec![]).await;
        p3.frame().await.unwrap()
    };
    assert_eq!(&f[..2], &[0x80, 3]);
    srv.stop().await;
}
