//! Wire tests: the real server on 127.0.0.1:0, spoken to with raw frames.
//! Each hostile or out-of-order case also checks that another client,
//! connected at the same time, keeps loading and committing.

mod common;

use std::time::Duration;

use common::client::{
    Bystander, Client, MAXTID, READ_TIMEOUT, Z64, b, err_text, framed, oid, request, s, t,
};
use common::{Server, cfg};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use zeotemp::config::Config;
use zeotemp::protocol::envelope;
use zeotemp::protocol::value::{DecodeLimits, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_register_and_root() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::handshaken(srv.addr).await;
    let last = c
        .call("register", vec![s("1"), Value::Int(0)])
        .await
        .unwrap();
    let last = last.as_bytes().unwrap().to_vec();
    assert_ne!(last, Z64, "tids start from the wall clock");
    let Value::Tuple(root) = c
        .call("loadBefore", vec![oid(0), b(&MAXTID)])
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        root[0].as_bytes().unwrap(),
        zeotemp::storage::EMPTY_ROOT_RECORD
    );
    assert_eq!(root[1].as_bytes().unwrap(), &last[..]);
    assert_eq!(root[2], Value::None);
    assert_eq!(
        c.call("lastTransaction", vec![])
            .await
            .unwrap()
            .as_bytes()
            .unwrap(),
        &last[..]
    );
    assert_eq!(c.call("ping", vec![]).await.unwrap(), Value::None);
    let Value::Dict(info) = c.call("get_info", vec![]).await.unwrap() else {
        panic!()
    };
    let keys: Vec<_> = info
        .iter()
        .map(|(k, _)| k.as_text().unwrap().into_owned())
        .collect();
    for k in ["length", "size", "name", "supportsUndo", "interfaces"] {
        assert!(keys.contains(&k.to_string()), "{k} in get_info");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadbefore_msgid_tuple_echoed_and_poskeyerror() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::registered(srv.addr).await;
    let msgid = Value::Tuple(vec![oid(0xfff), b(&MAXTID)]);
    c.send_frame(&request(
        msgid.clone(),
        false,
        "loadBefore",
        &t(vec![oid(0xfff), b(&MAXTID)]),
    ))
    .await;
    let err = c.reply_to(&msgid).await.unwrap_err();
    assert_eq!(
        err,
        (
            "ZODB.POSException.POSKeyError".to_string(),
            Value::Tuple(vec![oid(0xfff)])
        )
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruok_answers_json_and_closes() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::connect(srv.addr).await;
    c.send_frame(b"ruok").await;
    let json = c.frame().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert!(
        v["1"]["last-transaction"].as_str().unwrap().len() == 16,
        "{v}"
    );
    assert!(v["1"].get("connections").is_some());
    assert!(c.frame().await.is_none(), "closed after ruok");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshake_and_probe_close_harmlessly() {
    let srv = Server::start(cfg()).await;
    // A readiness probe: connect, close without a byte.
    drop(TcpStream::connect(srv.addr).await.unwrap());
    for hs in [&b"Z4"[..], b"M4", b"Z309", b"\x80\x03N."] {
        let mut c = Client::connect(srv.addr).await;
        c.send_frame(hs).await;
        assert!(c.frame().await.is_none(), "closed after handshake {hs:?}");
    }
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

/// A msgpack (`M5`) request payload, as a stock client packs it.
fn mp_request(msgid: i64, oneway: bool, method: &str, args: Vec<Value>) -> Vec<u8> {
    let frame = envelope::encode_request(
        envelope::Encoding::Msgpack,
        &Value::Int(msgid),
        oneway,
        method,
        &t(args),
    );
    frame[zeotemp::protocol::frame::HEADER_LEN..].to_vec()
}

/// The next frame, decoded as msgpack: `[msgid, flags, name, value]`.
async fn mp_message(c: &mut Client) -> Vec<Value> {
    let f = c.frame().await.expect("a frame, not a close");
    match zeotemp::protocol::msgpack::decode(&f, &DecodeLimits::default()) {
        Ok(Value::Tuple(items)) if items.len() == 4 => items,
        other => panic!("not a msgpack message: {other:?} from {f:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_answer_to_z5_gets_msgpack_in_commit_order() {
    // The server announces Z5; this client answers M5 and is spoken
    // msgpack, beside a pickle client, on the same storage.
    let srv = Server::start(cfg()).await;
    let mut pickle_client = Client::registered(srv.addr).await;
    let mut m = Client::connect(srv.addr).await;
    m.send_frame(b"M5").await;
    m.send_frame(&mp_request(
        1,
        false,
        "register",
        vec![s("1"), Value::Bool(false)],
    ))
    .await;
    let reply = mp_message(&mut m).await;
    assert_eq!(reply[..3], [Value::Int(1), Value::Int(0), s(".reply")]);
    assert_eq!(reply[3].as_bytes().map(<[u8]>::len), Some(8));

    // A commit over msgpack: the committer gets `info` then its reply;
    // the pickle client gets the invalidation, in pickle.
    let txn = 0x7fde_cf21_3010_i64;
    m.send_frame(&mp_request(
        0,
        true,
        "tpc_begin",
        vec![
            Value::Int(txn),
            b(b""),
            b(b"msgpack"),
            Value::Dict(vec![]),
            Value::None,
            s(" "),
        ],
    ))
    .await;
    m.send_frame(&mp_request(2, false, "new_oids", vec![]))
        .await;
    let oids = mp_message(&mut m).await;
    let Value::Tuple(oids) = &oids[3] else {
        panic!("new_oids: {oids:?}")
    };
    let o = oids[0].clone();
    m.send_frame(&mp_request(
        0,
        true,
        "storea",
        vec![o.clone(), b(&Z64), b(b"record"), Value::Int(txn)],
    ))
    .await;
    m.send_frame(&mp_request(3, false, "vote", vec![Value::Int(txn)]))
        .await;
    assert_eq!(
        mp_message(&mut m).await,
        [Value::Int(3), Value::Int(0), s(".reply"), t(vec![])]
    );
    m.send_frame(&mp_request(4, false, "tpc_finish", vec![Value::Int(txn)]))
        .await;
    let info = mp_message(&mut m).await;
    assert_eq!(info[..3], [Value::Int(0), Value::Bool(true), s("info")]);
    let finished = mp_message(&mut m).await;
    assert_eq!(finished[..3], [Value::Int(4), Value::Int(0), s(".reply")]);
    let tid = finished[3].clone();
    let inv = pickle_client.message().await.expect("an invalidation");
    assert_eq!(inv.method, "invalidateTransaction");
    assert_eq!(inv.args, t(vec![tid.clone(), Value::List(vec![o.clone()])]));

    // The pickle client commits; the msgpack client's invalidation is
    // msgpack, and a load after it sees the new revision.
    let (o2, tid2) = pickle_client.commit_new(b"pickled", 9).await;
    let inv = mp_message(&mut m).await;
    assert_eq!(
        inv,
        [
            Value::Int(0),
            Value::Bool(true),
            s("invalidateTransaction"),
            t(vec![tid2.clone(), t(vec![o2.clone()])]),
        ]
    );
    m.send_frame(&zeotemp::protocol::msgpack::encode(&t(vec![
        t(vec![o2.clone(), b(&MAXTID)]),
        Value::Bool(false),
        s("loadBefore"),
        t(vec![o2.clone(), b(&MAXTID)]),
    ])))
    .await;
    let loaded = mp_message(&mut m).await;
    assert_eq!(loaded[0], t(vec![o2, b(&MAXTID)]), "msgid echoed");
    assert_eq!(loaded[3], t(vec![b(b"pickled"), tid2, Value::None]));
    // An error reply over msgpack: (class name, args).
    m.send_frame(&mp_request(
        5,
        false,
        "loadSerial",
        vec![o.clone(), b(&Z64)],
    ))
    .await;
    let err = mp_message(&mut m).await;
    assert_eq!(err[..3], [Value::Int(5), Value::Int(2), s(".reply")]);
    assert_eq!(
        err[3],
        t(vec![
            s("ZODB.POSException.POSKeyError"),
            t(vec![o, b(&Z64)])
        ])
    );
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_setting_announces_m5_and_z5_answers_get_pickle() {
    let srv = Server::start(Config {
        msgpack: true,
        ..cfg()
    })
    .await;
    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"\0\0\0\x02M5");
    drop(stream);
    // A garbled msgpack frame closes only its own connection.
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.read_exact(&mut greeting).await.unwrap();
    use tokio::io::AsyncWriteExt;
    c.write_all(b"\0\0\0\x02M5\0\0\0\x01\xc1").await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(READ_TIMEOUT, c.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(n.is_ok() && rest.is_empty(), "closed without a reply");
    // A client answering Z5 gets pickle, whatever was announced.
    let mut z = TcpStream::connect(srv.addr).await.unwrap();
    z.read_exact(&mut greeting).await.unwrap();
    let mut out = b"\0\0\0\x02Z5".to_vec();
    let req = request(
        Value::Int(1),
        false,
        "register",
        &t(vec![s("1"), Value::Bool(false)]),
    );
    out.extend(framed(&req));
    z.write_all(&out).await.unwrap();
    let mut len = [0u8; 4];
    z.read_exact(&mut len).await.unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    z.read_exact(&mut payload).await.unwrap();
    assert_eq!(payload[..2], [0x80, 3], "a pickle");
    let reply = envelope::decode_message(&payload, &DecodeLimits::default()).unwrap();
    assert_eq!(
        (reply.msgid, reply.method.as_ref()),
        (Value::Int(1), ".reply")
    );
    assert_eq!(reply.args.as_bytes().map(<[u8]>::len), Some(8));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_only_that_connection() {
    let srv = Server::start(Config {
        max_frame_size: 4096,
        ..cfg()
    })
    .await;
    let mut other = Client::registered(srv.addr).await;
    let mut c = Client::registered(srv.addr).await;
    // A 4 GiB length prefix: refused before anything is buffered.
    c.write(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
    c.expect_closed("4 GiB length prefix").await;
    let mut c = Client::registered(srv.addr).await;
    c.send_frame(&vec![0u8; 5000]).await;
    c.expect_closed("frame over max-frame-size").await;
    assert_eq!(other.call("ping", vec![]).await.unwrap(), Value::None);
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_global_gets_error_reply_and_nothing_runs() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::registered(srv.addr).await;
    // (7, False, 'ping', (builtins.eval('1'),)) — the stock server would
    // resolve builtins.eval and call it.
    let payload =
        b"\x80\x03(K\x07\x89X\x04\x00\x00\x00pingcbuiltins\neval\nX\x01\x00\x00\x001\x85R\x85t.";
    c.send_frame(payload).await;
    let err = c.reply_to(&Value::Int(7)).await.unwrap_err();
    assert_eq!(err.0, "builtins.ValueError");
    assert!(format!("{:?}", err.1).contains("builtins.eval"), "{err:?}");
    // The connection stays usable.
    assert_eq!(c.call("ping", vec![]).await.unwrap(), Value::None);
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unsupported_methods_get_error_replies() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::registered(srv.addr).await;
    let err = c.call("frobnicate", vec![]).await.unwrap_err();
    assert_eq!(err.0, "builtins.AttributeError");
    let err = c
        .call("iterator_start", vec![Value::None, Value::None])
        .await
        .unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.Unsupported");
    let err = c.call("loadBefore", vec![oid(0)]).await.unwrap_err();
    assert_eq!(err.0, "builtins.TypeError", "wrong argument count");
    let err = c
        .call("loadBefore", vec![Value::Int(3), b(&MAXTID)])
        .await
        .unwrap_err();
    assert_eq!(err.0, "builtins.TypeError", "wrong argument type");
    assert_eq!(
        c.call("undoLog", vec![Value::Int(0), Value::Int(20)])
            .await
            .unwrap(),
        Value::Tuple(vec![])
    );
    assert_eq!(c.call("ping", vec![]).await.unwrap(), Value::None);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_out_of_order() {
    let srv = Server::start(cfg()).await;
    // Before register: an error reply, the connection stays.
    let mut c = Client::handshaken(srv.addr).await;
    let err = c.call("get_info", vec![]).await.unwrap_err();
    assert_eq!(err.0, "builtins.ValueError");
    // Unknown storage: the error names what is served.
    let err = c
        .call(
            "register",
            vec![Value::Str("nope".into()), Value::Bool(false)],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{:?}", err.1).contains("unknown storage: nope"),
        "{err:?}"
    );
    assert!(format!("{:?}", err.1).contains("\\\"1\\\""), "{err:?}");
    c.call("register", vec![Value::Str("1".into()), Value::Bool(false)])
        .await
        .unwrap();
    // A second register.
    let err = c
        .call("register", vec![Value::Str("1".into()), Value::Bool(false)])
        .await
        .unwrap_err();
    assert_eq!(err.0, "builtins.ValueError");
    // vote / tpc_finish without a transaction.
    let err = c.call("vote", vec![Value::Int(1)]).await.unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.StorageTransactionError");
    let err = c.call("tpc_finish", vec![Value::Int(1)]).await.unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.StorageTransactionError");
    // tpc_abort of nothing is quietly fine (the client sends it after a failed vote).
    assert_eq!(
        c.call("tpc_abort", vec![Value::Int(1)]).await.unwrap(),
        Value::None
    );
    // tpc_finish before vote, vote twice, tpc_finish with a wrong txn id.
    c.begin(99).await;
    let txn = Value::Int(99);
    let err = c.call("tpc_finish", vec![txn.clone()]).await.unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.StorageTransactionError");
    assert_eq!(
        c.call("vote", vec![txn.clone()]).await.unwrap(),
        Value::List(vec![])
    );
    let err = c.call("vote", vec![txn.clone()]).await.unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.StorageTransactionError");
    let err = c
        .call("tpc_finish", vec![Value::Int(98)])
        .await
        .unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.StorageTransactionError");
    // The right one still finishes.
    let tid = c.call("tpc_finish", vec![txn]).await.unwrap();
    assert_eq!(tid.as_bytes().unwrap().len(), 8);
    // A one-way storea without a transaction cannot be answered: closed.
    c.send(
        true,
        "storea",
        vec![oid(1), b(&Z64), b(b"x"), Value::Int(5)],
    )
    .await;
    c.expect_closed("one-way storea without tpc_begin").await;
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frame_closes_only_that_connection() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::registered(srv.addr).await;
    c.send_frame(b"\x00\x01garbage that is no pickle").await;
    c.expect_closed("garbage frame").await;
    let mut c = Client::registered(srv.addr).await;
    c.send_frame(b"\x80\x03K\x01.").await; // a pickle, but not a 4-tuple
    c.expect_closed("a pickle, but not a message").await;
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_ignored() {
    let srv = Server::start(cfg()).await;
    let mut c = Client::registered(srv.addr).await;
    // The exact bytes of a stock client's heartbeat (protocol notes §3.1).
    c.send_frame(&[
        0x80, 0x03, 0x28, 0x4a, 0xff, 0xff, 0xff, 0xff, 0x4b, 0x00, 0x58, 0x06, 0, 0, 0, 0x2e,
        0x72, 0x65, 0x70, 0x6c, 0x79, 0x4e, 0x74, 0x2e,
    ])
    .await;
    assert_eq!(
        c.call("ping", vec![]).await.unwrap(),
        Value::None,
        "no reply to the heartbeat came first"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_in_commit_order_before_committer_reply() {
    let srv = Server::start(cfg()).await;
    let mut a = Client::registered(srv.addr).await;
    let mut other = Client::registered(srv.addr).await;
    let (_, t1) = a.commit_new(b"one", 1).await;
    let (_, t2) = a.commit_new(b"two", 2).await;
    // The other client receives both invalidations, in commit order.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = other.message().await.unwrap();
        assert_eq!(m.method, "invalidateTransaction");
        assert!(m.oneway);
        let Value::Tuple(args) = m.args else { panic!() };
        seen.push(args[0].clone());
    }
    assert_eq!(seen, vec![t1, t2]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_voter_waits_for_the_commit_lock_and_conflicts_go_to_the_client() {
    let srv = Server::start(cfg()).await;
    let mut a = Client::registered(srv.addr).await;
    let mut bb = Client::registered(srv.addr).await;
    let Value::List(oids) = a.call("new_oids", vec![Value::Int(1)]).await.unwrap() else {
        panic!()
    };
    let o = oids[0].clone();
    // Create the object.
    let (ta, tb) = (1, 2);
    a.begin(ta).await;
    a.store(&o, &b(&Z64), b"v0", ta).await;
    a.call("vote", vec![Value::Int(ta)]).await.unwrap();
    let t0 = a.call("tpc_finish", vec![Value::Int(ta)]).await.unwrap();
    // Both change it from t0; a votes first and holds the lock.
    a.begin(ta).await;
    a.store(&o, &t0, b"a", ta).await;
    bb.begin(tb).await;
    bb.store(&o, &t0, b"b", tb).await;
    assert_eq!(
        a.call("vote", vec![Value::Int(ta)]).await.unwrap(),
        Value::List(vec![])
    );
    let vote_b = bb.send(false, "vote", vec![Value::Int(tb)]).await;
    // b's connection keeps serving while its vote waits.
    assert!(
        bb.call("loadBefore", vec![o.clone(), b(&MAXTID)])
            .await
            .is_ok()
    );
    let t1 = a.call("tpc_finish", vec![Value::Int(ta)]).await.unwrap();
    // Now b's vote runs: the conflict is handed back for resolution.
    let Value::List(conflicts) = bb.reply_to(&vote_b).await.unwrap() else {
        panic!()
    };
    assert_eq!(conflicts.len(), 1);
    let Value::Dict(d) = &conflicts[0] else {
        panic!()
    };
    let get = |k: &str| {
        d.iter()
            .find(|(kk, _)| kk.as_text().as_deref() == Some(k))
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(get("oid"), o);
    assert_eq!(get("serials"), Value::Tuple(vec![t1.clone(), t0.clone()]));
    assert_eq!(get("data"), b(b"b"));
    // Both revisions are readable for resolution.
    assert_eq!(
        bb.call("loadSerial", vec![o.clone(), t0.clone()])
            .await
            .unwrap(),
        b(b"v0")
    );
    assert_eq!(
        bb.call("loadSerial", vec![o.clone(), t1.clone()])
            .await
            .unwrap(),
        b(b"a")
    );
    // A third client cannot commit meanwhile: b keeps the lock while resolving.
    let mut c = Client::registered(srv.addr).await;
    let tc = 3;
    c.begin(tc).await;
    c.store(&o, &t1, b"c", tc).await;
    let vote_c = c.send(false, "vote", vec![Value::Int(tc)]).await;
    // b re-stores the resolved data on top of t1 and votes again: success.
    bb.store(&o, &t1, b"a+b", tb).await;
    assert_eq!(
        bb.call("vote", vec![Value::Int(tb)]).await.unwrap(),
        Value::List(vec![])
    );
    let t2 = bb.call("tpc_finish", vec![Value::Int(tb)]).await.unwrap();
    // c's vote ran after b finished, and conflicts with b's commit.
    let Value::List(conflicts) = c.reply_to(&vote_c).await.unwrap() else {
        panic!()
    };
    assert_eq!(conflicts.len(), 1);
    assert_eq!(
        c.call("tpc_abort", vec![Value::Int(tc)]).await.unwrap(),
        Value::None
    );
    let Value::Tuple(cur) = a
        .call("loadBefore", vec![o.clone(), b(&MAXTID)])
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((cur[0].clone(), cur[1].clone()), (b(b"a+b"), t2));
    srv.stop().await;
}

/// Every way a transaction is refused after its first vote round (the
/// resolved store takes it over max-transaction-bytes; a one-way call
/// zeotemp does not support, inside the resolution round or while the vote
/// waits for the lock) makes its vote fail with that error and commits
/// nothing. (The resolving vote skipped the check: an empty transaction was
/// committed and reported as a success.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_transaction_never_commits_in_any_vote_state() {
    let srv = Server::start(Config {
        max_transaction_bytes: 1000,
        ..cfg()
    })
    .await;
    let mut a = Client::registered(srv.addr).await;
    let mut c = Client::registered(srv.addr).await;
    let o = a.new_oid().await;
    let mut serial = a.commit_new_at(&o, b"v0", 1).await;
    let small = vec![b'b'; 400];
    for (case, refusal) in [
        ("resolved store over the limit", "max-transaction-bytes"),
        ("restorea in the resolution round", "restorea"),
        ("storeBlobStart while waiting", "storeBlobStart"),
    ] {
        // c reads `serial` and stores on it; a commits on top first.
        c.begin(2).await;
        c.store(&o, &serial, &small, 2).await;
        a.begin(1).await;
        a.store(&o, &serial, b"a", 1).await;
        assert_eq!(
            a.call("vote", vec![Value::Int(1)]).await,
            Ok(Value::List(vec![]))
        );
        let vote = c.send(false, "vote", vec![Value::Int(2)]).await;
        let mut waiting_vote_error = None;
        if case.ends_with("while waiting") {
            // The waiting vote fails at once, while a still holds the lock.
            c.send(true, refusal, vec![Value::Int(2)]).await;
            waiting_vote_error = Some(c.reply_to(&vote).await.unwrap_err());
        }
        serial = a.call("tpc_finish", vec![Value::Int(1)]).await.unwrap();
        let last = a.call("lastTransaction", vec![]).await.unwrap();
        let vote_error = if let Some(e) = waiting_vote_error {
            e
        } else {
            // c's vote hands back the conflict; c resolves it...
            let Ok(Value::List(conflicts)) = c.reply_to(&vote).await else {
                panic!("{case}: conflicts")
            };
            assert_eq!(conflicts.len(), 1, "{case}");
            if refusal == "max-transaction-bytes" {
                // ...into a record that takes the transaction over the
                // limit (the first store alone was within it).
                c.store(&o, &serial, &[b'r'; 700], 2).await;
            } else {
                c.send(true, refusal, vec![Value::Int(2)]).await;
                c.store(&o, &serial, b"resolved", 2).await;
            }
            c.call("vote", vec![Value::Int(2)]).await.unwrap_err()
        };
        assert!(
            err_text(&vote_error.1).contains(refusal),
            "{case}: {vote_error:?}"
        );
        // Nothing was committed, the lock is free and the transaction over.
        assert_eq!(
            c.call("lastTransaction", vec![]).await.unwrap(),
            last,
            "{case}"
        );
        let Ok(Value::Tuple(cur)) = c.call("loadBefore", vec![o.clone(), b(&MAXTID)]).await else {
            panic!("{case}: loadBefore")
        };
        assert_eq!(
            (cur[0].clone(), cur[1].clone()),
            (b(b"a"), serial.clone()),
            "{case}"
        );
        assert_eq!(
            c.call("tpc_abort", vec![Value::Int(2)]).await,
            Ok(Value::None)
        );
        Bystander::start(srv.addr).await;
    }
    srv.stop().await;
}

/// One figure of `server_status()`.
async fn status_figure(c: &mut Client, key: &str) -> i64 {
    let Ok(Value::Dict(status)) = c.call("server_status", vec![]).await else {
        panic!("server_status")
    };
    status
        .iter()
        .find(|(k, _)| k.as_text().as_deref() == Some(key))
        .and_then(|(_, v)| v.as_i64())
        .unwrap_or_else(|| panic!("server_status has {key}"))
}

/// A vote that needs a whole collection to fit under the memory limit runs
/// it off the runtime worker: with one worker thread, as the server runs by
/// default, another client's ping is answered while the collection runs
/// (before the vote's reply), not after it. (It ran inline, and every
/// other connection waited for the whole mark-and-sweep.) A vote that still
/// does not fit runs no second collection while nothing was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn memory_pressure_collection_never_blocks_other_connections() {
    const OBJECTS: usize = 100_000;
    let srv = Server::start(Config {
        // 24 MiB of accounted bytes.
        memory_limit: Some(
            (24 << 20) * zeotemp::storage::budget::ALLOCATOR_OVERHEAD_PERCENT / 100
                + zeotemp::storage::budget::PROCESS_RESERVE,
        ),
        // No background cycle in between: the test counts collections.
        gc_interval: Duration::from_secs(3600),
        ..cfg()
    })
    .await;
    let mut a = Client::registered(srv.addr).await;
    let mut by = Client::registered(srv.addr).await;
    // 100,000 objects nothing links: garbage only memory pressure frees
    // (they are younger than the retention window).
    let record = [b'g'; 50];
    for txn in 0..(OBJECTS / 5000) as i64 {
        a.begin(txn).await;
        let mut batch = Vec::new();
        for _ in 0..50 {
            let Ok(Value::List(oids)) = a.call("new_oids", vec![Value::Int(100)]).await else {
                panic!("new_oids")
            };
            for o in oids {
                let args = t(vec![o, b(&Z64), b(&record), Value::Int(txn)]);
                batch.extend(framed(&request(Value::Int(0), true, "storea", &args)));
            }
        }
        a.write(&batch).await;
        assert_eq!(
            a.call("vote", vec![Value::Int(txn)]).await,
            Ok(Value::List(vec![]))
        );
        a.call("tpc_finish", vec![Value::Int(txn)]).await.unwrap();
    }
    assert!(status_figure(&mut by, "objects").await > OBJECTS as i64);
    let cycles = status_figure(&mut by, "collections").await;

    // 6 MiB more only fit once the garbage is freed.
    let big = vec![b'b'; 6 << 20];
    let o = a.new_oid().await;
    a.begin(100).await;
    a.store(&o, &b(&Z64), &big, 100).await;
    let vote = a.send(false, "vote", vec![Value::Int(100)]).await;
    // Give the vote a head start, then ping from the other connection.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let (ping_answered, vote_answered) = tokio::join!(
        async {
            assert_eq!(by.call("ping", vec![]).await, Ok(Value::None));
            std::time::Instant::now()
        },
        async {
            assert_eq!(a.reply_to(&vote).await, Ok(Value::List(vec![])));
            std::time::Instant::now()
        }
    );
    assert!(
        ping_answered < vote_answered,
        "the other client's ping waited for the collection"
    );
    a.call("tpc_finish", vec![Value::Int(100)]).await.unwrap();
    assert_eq!(status_figure(&mut by, "collections").await, cycles + 1);
    assert!(status_figure(&mut by, "objects").await < 10);

    // What can never fit (more than the limit) fails: the first such vote
    // collects (something was committed since), the next fails at once,
    // without another cycle.
    for txn in [101, 102] {
        let o = a.new_oid().await;
        a.begin(txn).await;
        a.store(&o, &b(&Z64), &[b'c'; 25 << 20], txn).await;
        let (_, err) = a.call("vote", vec![Value::Int(txn)]).await.unwrap_err();
        assert!(err_text(&err).contains("memory-limit"), "{err:?}");
    }
    assert_eq!(status_figure(&mut by, "collections").await, cycles + 2);
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_while_holding_lock_releases_it() {
    let srv = Server::start(cfg()).await;
    let mut a = Client::registered(srv.addr).await;
    a.begin(1).await;
    a.store(&oid(0x10), &b(&Z64), b"x", 1).await;
    assert_eq!(
        a.call("vote", vec![Value::Int(1)]).await.unwrap(),
        Value::List(vec![])
    );
    drop(a);
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

/// A client that pipelines aborts a vote that waits for the commit lock
/// and votes its next transaction, all in one burst, while the holder
/// finishes: the lock granted to the aborted vote must not touch the next
/// transaction. (It did: the old grant, seen only after the burst, replaced
/// the next transaction's voted state, its `tpc_finish` failed "without a
/// successful vote" and the lock stayed held until transaction-timeout.)
/// One worker thread, as the server runs by default: the pings exhaust the
/// connection's coop budget, so the holder's `tpc_finish` is handled in the
/// middle of the burst, before its `tpc_abort`.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn stale_lock_grant_never_touches_the_next_transaction() {
    let srv = Server::start(cfg()).await;
    for round in 0..5 {
        let mut holder = Client::registered(srv.addr).await;
        let mut piper = Client::registered(srv.addr).await;
        holder.hold_lock(1).await;
        let o7 = piper.new_oid().await;
        let o8 = piper.new_oid().await;
        piper.begin(7).await;
        piper.store(&o7, &b(&Z64), b"seven", 7).await;
        let vote7 = piper.send(false, "vote", vec![Value::Int(7)]).await;
        let mut burst = Vec::new();
        let mut next = 1000;
        let mut frame = |oneway: bool, method: &str, args: Vec<Value>| {
            next += 1;
            burst.extend(framed(&request(Value::Int(next), oneway, method, &t(args))));
            Value::Int(next)
        };
        let pings: Vec<Value> = (0..2000).map(|_| frame(false, "ping", vec![])).collect();
        let abort7 = frame(false, "tpc_abort", vec![Value::Int(7)]);
        let begin8 = vec![Value::Int(8), b(b""), b(b""), Value::Dict(vec![])];
        frame(true, "tpc_begin", begin8);
        frame(
            true,
            "storea",
            vec![o8.clone(), b(&Z64), b(b"eight"), Value::Int(8)],
        );
        let vote8 = frame(false, "vote", vec![Value::Int(8)]);
        // The burst, then at once the holder's finish: the server is still
        // answering the pings when the finish grants the lock to vote 7.
        piper.write(&burst).await;
        let finish = holder.send(false, "tpc_finish", vec![Value::Int(1)]).await;
        holder.reply_to(&finish).await.expect("the holder commits");

        // Every request is answered: vote 7 (voted if the grant was seen
        // before the burst, else aborted while waiting), the pings, the
        // abort and vote 8, which succeeds.
        let mut answered = Vec::new();
        let vote8_reply = loop {
            let (id, reply) = piper.next_reply().await.expect("replies to the burst");
            if id == vote8 {
                break reply;
            }
            if pings.contains(&id) || id == abort7 {
                assert_eq!(reply, Ok(Value::None), "{id:?}");
            }
            answered.push(id);
        };
        assert_eq!(answered.len(), pings.len() + 2, "round {round}");
        assert!(answered.contains(&vote7) && answered.contains(&abort7));
        assert_eq!(vote8_reply, Ok(Value::List(vec![])), "round {round}");
        let tid = piper
            .call("tpc_finish", vec![Value::Int(8)])
            .await
            .unwrap_or_else(|e| panic!("round {round}: tpc_finish(8) failed: {e:?}"));
        // Transaction 8 is committed, 7 is not, and the lock is free.
        let Ok(Value::Tuple(rec)) = piper.call("loadBefore", vec![o8.clone(), b(&MAXTID)]).await
        else {
            panic!("round {round}: object 8 is committed")
        };
        assert_eq!(rec[0].as_bytes(), Some(&b"eight"[..]));
        assert_eq!(rec[1], tid);
        assert!(
            piper
                .call("loadBefore", vec![o7.clone(), b(&MAXTID)])
                .await
                .is_err()
        );
        Bystander::start(srv.addr).await;
    }
    srv.stop().await;
}

/// A client holding the commit lock that keeps its socket busy (pings
/// written without pause while it reads every reply) is still timed out:
/// the connection's loop looks at the lock's deadline before its socket.
/// (It looked only when reading and writing were both idle, so such a
/// client kept the lock, and every other writer waiting, until the socket
/// happened to go idle: 18 s here with a 1 s timeout. The bound, 8 s, is
/// a hang check, not a measurement.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_lock_holder_is_still_timed_out() {
    let srv = Server::start(Config {
        transaction_timeout: Duration::from_secs(1),
        ..cfg()
    })
    .await;
    let mut a = Client::registered(srv.addr).await;
    a.hold_lock(1).await;
    let (mut rd, mut wr) = a.into_stream().into_split();
    let mut batch = Vec::new();
    for i in 0..200 {
        batch.extend(framed(&request(
            Value::Int(100 + i),
            false,
            "ping",
            &t(vec![]),
        )));
    }
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while wr.write_all(&batch).await.is_ok() {}
    });
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        let mut buf = vec![0; 1 << 16];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    writer.abort();
    assert!(closed.is_ok(), "the busy lock holder was never timed out");
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_timeout_releases_lock() {
    let srv = Server::start(Config {
        transaction_timeout: Duration::from_secs(1),
        ..cfg()
    })
    .await;
    let mut a = Client::registered(srv.addr).await;
    a.begin(1).await;
    assert_eq!(
        a.call("vote", vec![Value::Int(1)]).await.unwrap(),
        Value::List(vec![])
    );
    // a now holds the lock and does nothing; b's commit waits, then succeeds.
    Bystander::start(srv.addr).await;
    a.expect_closed("transaction timeout").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_registration() {
    let srv = Server::start(Config {
        read_only: true,
        ..cfg()
    })
    .await;
    let mut c = Client::handshaken(srv.addr).await;
    let err = c
        .call("register", vec![Value::Str("1".into()), Value::Int(0)])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        (
            "ZODB.POSException.ReadOnlyError".to_string(),
            Value::Tuple(vec![])
        )
    );
    // read_only_fallback: register again read-only on the same connection.
    c.call("register", vec![Value::Str("1".into()), Value::Bool(true)])
        .await
        .unwrap();
    let err = c.call("new_oids", vec![]).await.unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.ReadOnlyError");
    assert!(c.call("loadBefore", vec![oid(0), b(&MAXTID)]).await.is_ok());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_counts_live_connections_only() {
    let srv = Server::start(Config {
        max_connections: 4,
        ..cfg()
    })
    .await;
    // Many more connections than the limit over time, one after another
    // (health probes, reconnecting clients): each one ends, and frees its place.
    for _ in 0..10 {
        let mut c = Client::registered(srv.addr).await;
        assert_eq!(c.call("ping", vec![]).await.unwrap(), Value::None);
        drop(c);
        let mut probe = Client::connect(srv.addr).await;
        probe.send_frame(b"ruok").await;
        assert!(probe.frame().await.is_some());
        assert!(probe.frame().await.is_none());
    }
    // The limit itself: 4 live connections; a 5th is closed at once. (First
    // let the server finish closing the ones above.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Client::registered(srv.addr).await);
    }
    let mut extra = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(READ_TIMEOUT, extra.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "refused: closed without a protocol announcement");
    drop(held);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_invalidations_for_reconnecting_clients() {
    let srv = Server::start(cfg()).await;
    let mut a = Client::handshaken(srv.addr).await;
    let start = a.register().await;
    let (_, t1) = a.commit_new(b"one", 1).await;
    let (_, t2) = a.commit_new(b"two", 2).await;
    // A cache at t1: quick verification, the oids changed after t1.
    let Value::Tuple(inv) = a.call("getInvalidations", vec![t1.clone()]).await.unwrap() else {
        panic!()
    };
    assert_eq!(inv[0], t2);
    let Value::List(oids) = &inv[1] else { panic!() };
    assert_eq!(oids.len(), 1);
    // A cache at the last tid: nothing to do.
    let Value::Tuple(inv) = a.call("getInvalidations", vec![t2.clone()]).await.unwrap() else {
        panic!()
    };
    assert_eq!((inv[0].clone(), inv[1].clone()), (t2, Value::List(vec![])));
    // A cache from before this server started (a restart): None, so the
    // client drops its whole cache.
    let before = u64::from_be_bytes(start.as_bytes().unwrap().try_into().unwrap()) - 1;
    assert_eq!(
        a.call("getInvalidations", vec![b(&before.to_be_bytes())])
            .await
            .unwrap(),
        Value::None
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_object_invalidates_and_hides_it() {
    let srv = Server::start(cfg()).await;
    let mut a = Client::registered(srv.addr).await;
    let mut other = Client::registered(srv.addr).await;
    let Value::List(oids) = a.call("new_oids", vec![Value::Int(1)]).await.unwrap() else {
        panic!()
    };
    let o = oids[0].clone();
    a.begin(7).await;
    a.store(&o, &b(&Z64), b"doomed", 7).await;
    let txn = Value::Int(7);
    a.call("vote", vec![txn.clone()]).await.unwrap();
    let t1 = a.call("tpc_finish", vec![txn.clone()]).await.unwrap();
    a.begin(7).await;
    a.send(
        true,
        "deleteObject",
        vec![o.clone(), t1.clone(), txn.clone()],
    )
    .await;
    a.call("vote", vec![txn.clone()]).await.unwrap();
    let t2 = a.call("tpc_finish", vec![txn]).await.unwrap();
    let err = a
        .call("loadBefore", vec![o.clone(), b(&MAXTID)])
        .await
        .unwrap_err();
    assert_eq!(err.0, "ZODB.POSException.POSKeyError");
    // A snapshot from before the delete still reads it.
    let Value::Tuple(old) = a
        .call("loadBefore", vec![o.clone(), t2.clone()])
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(old[0], b(b"doomed"));
    // The other client was told about both transactions, the delete included.
    let mut invalidated = Vec::new();
    while invalidated.len() < 2 {
        let m = other.message().await.unwrap();
        let Value::Tuple(args) = m.args else { panic!() };
        invalidated.push((args[0].clone(), args[1].clone()));
    }
    assert_eq!(invalidated[1], (t2, Value::List(vec![o])));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_is_disconnected_and_others_are_not_slowed() {
    let srv = Server::start(Config {
        max_frame_size: 32 * 1024,
        max_outbox_bytes: 64 * 1024,
        ..cfg()
    })
    .await;
    let mut a = Client::registered(srv.addr).await;
    let (big_oid, _) = a.commit_new(&[7u8; 30 * 1024], 1).await;

    // A registered client that asks for far more than it reads: 400 loads
    // of 30 KiB fill the kernel's socket buffers, then half its outbox,
    // and the server stops reading its requests.
    let mut sleeper = Client::connect_small_buffer(srv.addr).await;
    sleeper.send_frame(b"Z5").await;
    sleeper
        .call("register", vec![Value::Str("1".into()), Value::Int(0)])
        .await
        .unwrap();
    for i in 0..400 {
        let req = request(
            Value::Int(1000 + i),
            false,
            "loadBefore",
            &t(vec![big_oid.clone(), b(&MAXTID)]),
        );
        sleeper.send_frame(&req).await;
    }
    // Meanwhile another client commits as usual; the invalidations for the
    // sleeper overflow its outbox, and it is disconnected.
    let started = std::time::Instant::now();
    for i in 0..600 {
        a.commit_new(format!("commit {i}").as_bytes(), 2).await;
    }
    eprintln!(
        "600 commits took {:?} while the sleeper stalled",
        started.elapsed()
    );
    // The sleeper got replies and invalidations in order up to the cut,
    // then EOF: nothing was skipped in the middle.
    let (mut loads, mut invalidations) = (0, 0);
    let mut last_tid: Option<Vec<u8>> = None;
    while let Some(f) = sleeper.frame().await {
        let m = envelope::decode_message(&f, &DecodeLimits::default()).unwrap();
        if m.method == ".reply" {
            // Replies come in request order, none skipped. (They may follow
            // some invalidations: the server resumes reading the sleeper's
            // requests whenever the kernel takes more of its queue.)
            assert_eq!(m.msgid, Value::Int(1000 + loads));
            loads += 1;
            continue;
        }
        assert_eq!(m.method, "invalidateTransaction");
        let Value::Tuple(args) = m.args else { panic!() };
        let tid = args[0].as_bytes().unwrap().to_vec();
        assert!(
            last_tid.as_ref().is_none_or(|l| *l < tid),
            "in commit order"
        );
        last_tid = Some(tid);
        invalidations += 1;
    }
    assert!(
        loads < 400,
        "the server stopped reading the sleeper's requests ({loads} answered)"
    );
    assert!(
        invalidations < 600,
        "disconnected before the end ({invalidations} invalidations)"
    );
    // The server ended the sleeper's session too (not just its socket):
    // only `a` is still registered.
    let mut registered = -1;
    for _ in 0..100 {
        let Value::Dict(status) = a.call("server_status", vec![]).await.unwrap() else {
            panic!()
        };
        let get = |k: &str| {
            status
                .iter()
                .find(|(kk, _)| kk.as_text().as_deref() == Some(k))
                .map(|(_, v)| v.clone())
        };
        registered = get("connections").and_then(|v| v.as_i64()).unwrap();
        if registered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(registered, 1, "the stalled client's session was dropped");
    Bystander::start(srv.addr).await;
    srv.stop().await;
}

/// `frame-timeout`: a connection that never sends its handshake, and one
/// that starts a message and never finishes it, are closed once the timeout
/// passes; a client that keeps sending whole messages is not, and another
/// client works meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_timeout_closes_half_sent_messages_only() {
    let server = Server::start(Config {
        frame_timeout: Duration::from_millis(400),
        ..cfg()
    })
    .await;
    let started = std::time::Instant::now();
    // Connected, server's Z5 read, no handshake sent.
    let mut silent = Client::connect(server.addr).await;
    // Registered, then 10 bytes of a 100-byte message.
    let mut half = Client::registered(server.addr).await;
    half.write(&100u32.to_be_bytes()).await;
    half.write(&[0x80; 10]).await;
    // A client busy with whole messages for longer than the timeout.
    let mut busy = Client::registered(server.addr).await;
    while started.elapsed() < Duration::from_millis(1200) {
        busy.call("ping", vec![]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Bystander::start(server.addr).await;
    assert!(silent.frame().await.is_none(), "no handshake: closed");
    assert!(half.frame().await.is_none(), "half-sent message: closed");
    assert!(started.elapsed() < Duration::from_secs(4));
    busy.call("ping", vec![]).await.unwrap();
    server.stop().await;
}

/// `unix-socket-mode` sets the socket file's permissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_gets_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("zeotemp-mode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zeo.sock");
    let listeners = zeotemp::server::bind_with_mode(&[path.display().to_string()], Some(0o640))
        .await
        .unwrap();
    // Set before bind returns: never served with the umask's mode.
    let early = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(early, 0o640, "mode {early:o}");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = cfg();
    let task = tokio::spawn(zeotemp::server::run(listeners, cfg, async {
        let _ = rx.await;
    }));
    // The mode is set before the server accepts; wait until it answers.
    let mut mode = 0;
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mode, 0o640, "mode {mode:o}");
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A panic while one connection's request is handled (a bug; injected with
/// the test-only `fault-injection` feature, which tests/run-all.sh turns
/// on) ends that connection only: its transaction is aborted and the commit
/// lock it held is freed, even when the storage's state lock was held at the
/// time (poisoned), and the other clients go on loading, committing and
/// receiving invalidations.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_connection_is_contained() {
    let srv = Server::start(cfg()).await;
    let mut watcher = Client::registered(srv.addr).await;
    for (i, method) in ["_zeotemp_fault_panic", "_zeotemp_fault_panic_in_storage"]
        .into_iter()
        .enumerate()
    {
        let mut a = Client::registered(srv.addr).await;
        // `a` holds the commit lock when it panics.
        let doomed = oid(0x100 + i as u64);
        a.begin(1).await;
        a.store(&doomed, &b(&Z64), b"never committed", 1).await;
        assert_eq!(
            a.call("vote", vec![Value::Int(1)]).await.unwrap(),
            Value::List(vec![])
        );
        a.send(false, method, vec![]).await;
        a.expect_closed(method).await;

        // Another client commits (so the lock is free) and loads.
        Bystander::start(srv.addr).await;
        // The watcher hears of that commit, and the panicking
        // transaction left nothing behind.
        let pushed = loop {
            let m = watcher.message().await.expect("watcher still connected");
            if m.method == "invalidateTransaction" {
                break m;
            }
        };
        assert_eq!(pushed.method, "invalidateTransaction");
        let err = watcher
            .call("loadBefore", vec![doomed.clone(), b(&MAXTID)])
            .await
            .unwrap_err();
        assert!(err.0.ends_with("POSKeyError"), "{err:?}");
        // The server forgot the connection: only the watcher is registered,
        // no transaction is active.
        let mut figures = (-1, -1);
        for _ in 0..100 {
            let Value::Dict(status) = watcher.call("server_status", vec![]).await.unwrap() else {
                panic!()
            };
            let get = |k: &str| {
                status
                    .iter()
                    .find(|(kk, _)| kk.as_text().as_deref() == Some(k))
                    .and_then(|(_, v)| v.as_i64())
                    .unwrap()
            };
            figures = (get("connections"), get("active_txns"));
            if figures == (1, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(figures, (1, 0), "(connections, active_txns) after {method}");
    }
    srv.stop().await;
}

/// A stop while one client holds the commit lock and never finishes, and
/// another's vote waits for it: the holder gets `shutdown-grace`, then both
/// connections close without a reply (no error the client would take as a
/// failed commit; it sees a disconnect and retries), and the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_gives_a_stuck_commit_the_grace_then_closes_without_replies() {
    let grace = Duration::from_secs(1);
    let srv = Server::start(Config {
        shutdown_grace: grace,
        ..cfg()
    })
    .await;
    let mut holder = Client::registered(srv.addr).await;
    holder.hold_lock(1).await;
    let mut waiter = Client::registered(srv.addr).await;
    let o = waiter.new_oid().await;
    waiter.begin(2).await;
    waiter.store(&o, &b(&Z64), b"waits", 2).await;
    waiter.send(false, "vote", vec![Value::Int(2)]).await;
    waiter
        .no_reply_within(Duration::from_millis(200), "vote waits for the lock")
        .await;

    let started = std::time::Instant::now();
    srv.stop().await;
    let took = started.elapsed();
    assert!(
        took >= grace,
        "the holder got the grace: stopped after {took:?}"
    );
    holder.expect_closed("the stuck holder at stop").await;
    waiter.expect_closed("the waiting voter at stop").await;
}

/// At a stop, a client that keeps sending requests sees a clean close (its
/// replies, then EOF), never a reset: the server reads and drops what still
/// comes until the client closes (a lingering close, within
/// `shutdown-grace`). Closing with requests unread made the kernel answer
/// with RST; the stock client then failed a send with EPIPE mid-burst, and
/// on CPython 3.12/3.13 its reconnect could strand for good (gh-136234).
/// A connection that waits for its client's next request notices the
/// server's stop at once and closes (EOF within the client's read timeout),
/// as a busy one does; the shutdown grace is long here, so a stop missed
/// by a waiting connection would show as a timeout, not pass after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_a_waiting_connection_at_once() {
    let srv = Server::start(Config {
        shutdown_grace: Duration::from_secs(60),
        ..cfg()
    })
    .await;
    let mut idle = Client::registered(srv.addr).await;
    assert_eq!(
        idle.call("lastTransaction", vec![])
            .await
            .unwrap()
            .as_bytes()
            .map(<[u8]>::len),
        Some(8)
    );
    let stopping = tokio::spawn(srv.stop());
    assert!(idle.frame().await.is_none(), "EOF after the stop");
    // Our side closes too, which ends the server's lingering close.
    drop(idle);
    stopping.await.expect("the server stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_cleanly_while_the_client_keeps_sending() {
    use tokio::io::AsyncWriteExt;
    let srv = Server::start(cfg()).await;
    let c = Client::registered(srv.addr).await;
    let (mut rd, mut wr) = tokio::io::split(c.into_stream());
    let ping = framed(&request(Value::Int(7), false, "ping", &t(vec![])));
    let burst = ping.repeat(200);
    // Requests in flight all the time, until the connection ends.
    let writer = tokio::spawn(async move {
        while wr.write_all(&burst).await.is_ok() {
            tokio::task::yield_now().await;
        }
        wr
    });
    let mut buf = vec![0u8; 64 * 1024];
    // Replies come while the server runs.
    let n = rd.read(&mut buf).await.expect("replies before the stop");
    assert!(n > 0, "the server answered the pings");
    let stopping = tokio::spawn(srv.stop());
    let t0 = std::time::Instant::now();
    let mut got = 0usize;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await {
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => break Err(e),
            Err(_) => panic!("neither replies nor a close within 10 s of the stop"),
        }
    };
    assert!(
        end.is_ok(),
        "the stop reset the connection instead of closing it: {:?} after {:?} and {got} bytes",
        end.err(),
        t0.elapsed()
    );
    // Requests the client still sends after the close are read and dropped,
    // not answered with a reset: its sends go on failing-free until it
    // closes its own side (the ZEO client does at once when it reads EOF).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "a send after the server's close failed (the server reset the connection)"
    );
    writer.abort();
    drop(rd);
    stopping.await.unwrap();
}
