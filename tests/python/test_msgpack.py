"""ZEO protocol M5 (msgpack), as the stock server speaks it.

``--msgpack`` (the stock server's ``msgpack true``) makes the server
announce ``M5``; a stock client copies the announced letter, so it then
speaks msgpack (``ZEO/asyncio/client.py Protocol.finish_connection``).
Whatever was announced, the server speaks what the client answered
(``ZEO/asyncio/server.py ServerProtocol.finish_connection``): the raw tests
answer both ways, and ``answering`` makes a stock client answer the letter
the test wants, so a pickle and a msgpack ClientStorage share one storage.

Runs against the stock server too (``ZEOTEMP_TEST_SERVER=python``: runzeo
with ``msgpack true``), except where noted.
"""

import contextlib
import pickle
import socket
import struct
import threading

import msgpack
import pytest
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from ZODB.POSException import ConflictError, POSKeyError
from ZODB.utils import p64, u64, z64

from zeotemp_testobjects import Item
from zeotemp_util import IS_ZEOTEMP, open_conn, wait_until

MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"


# -- a raw client that answers either letter ------------------------------------

def frame(payload):
    return struct.pack(">I", len(payload)) + payload


class Raw:
    """One raw connection: reads the greeting, answers ``answer``, then
    speaks pickle (``Z5``) or msgpack (``M5``) as a stock client does."""

    def __init__(self, address, answer):
        self.sock = socket.create_connection(address, 10)
        self.sock.settimeout(10)
        self.buf = b""
        self.greeting = self.read_frame()
        self.answer = answer
        self.sock.sendall(frame(answer))
        self.msgid = 0

    def close(self):
        self.sock.close()

    def read_frame(self):
        def fill(n):
            while len(self.buf) < n:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("server closed the connection")
                self.buf += data
        fill(4)
        (n,) = struct.unpack(">I", self.buf[:4])
        fill(4 + n)
        payload, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return payload

    def encode(self, message):
        if self.answer == b"M5":
            return msgpack.packb(message, use_bin_type=True)
        return pickle.dumps(message, 3)

    def decode(self, payload):
        if self.answer == b"M5":
            return msgpack.unpackb(payload, raw=False, use_list=False)
        return pickle.loads(payload)

    def send_payload(self, payload):
        self.sock.sendall(frame(payload))

    def call(self, method, *args, msgid=None):
        """The reply ``(msgid, flags, name, value)`` and its raw payload."""
        if msgid is None:
            self.msgid += 1
            msgid = self.msgid
        self.send_payload(self.encode((msgid, False, method, args)))
        while True:
            payload = self.read_frame()
            message = self.decode(payload)
            if message[2] == ".reply":
                assert message[0] == msgid, message
                return message, payload

    def closed(self, timeout=10):
        """True once the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


@pytest.mark.parametrize("announce", [False, True], ids=["default", "msgpack"])
def test_greeting_follows_the_msgpack_option(server_factory, announce):
    srv = server_factory(msgpack=announce)
    raw = Raw(srv.address, b"Z5")
    assert raw.greeting == (b"M5" if announce else b"Z5")
    raw.close()


@pytest.mark.parametrize("answer", [b"Z5", b"M5"], ids=["answer-Z5", "answer-M5"])
@pytest.mark.parametrize("announce", [False, True], ids=["announce-Z5", "announce-M5"])
def test_the_clients_answer_picks_the_encoding(server_factory, announce,
                                                answer):
    srv = server_factory(msgpack=announce)
    raw = Raw(srv.address, answer)
    assert raw.greeting == (b"M5" if announce else b"Z5")
    (msgid, flags, name, tid), payload = raw.call("register", "1", False)
    # The reply really is in the encoding answered, not just decodable.
    assert payload[:1] == (b"\x94" if answer == b"M5" else b"\x80"), payload
    assert (msgid, flags, name) == (1, 0, ".reply")
    assert type(tid) is bytes and len(tid) == 8
    (_, _, _, last), _ = raw.call("lastTransaction")
    assert last == tid
    # An error reply: the (oid, tid) msgid is echoed as a tuple, the
    # exception travels as (class name, args).
    oid = p64(0xfff)
    (msgid, flags, name, err), payload = raw.call(
        "loadBefore", oid, MAXTID, msgid=(oid, MAXTID))
    assert (msgid, flags, name) == ((oid, MAXTID), 2, ".reply")
    assert err == ("ZODB.POSException.POSKeyError", (oid,))
    if answer == b"M5":
        # Byte for byte what the stock server sends (fixtures 15-msgpack).
        assert payload == msgpack.packb(
            ((oid, MAXTID), 2, ".reply",
             ("ZODB.POSException.POSKeyError", (oid,))), use_bin_type=True)
    raw.close()


# -- stock clients ----------------------------------------------------------------

def protocol_of(storage):
    """The protocol a ClientStorage's connection speaks (b'Z5' / b'M5')."""
    return storage._server.client.protocol.protocol_version


@pytest.fixture
def answering(monkeypatch):
    """``with answering(b"Z"):`` -- ClientStorages created inside answer the
    handshake with that letter, whatever the server announced, on every
    (re)connection; those created outside copy the server's letter."""
    from ZEO.asyncio import client as zclient
    original = zclient.Protocol.finish_connection
    now = {"letter": None}

    def finish_connection(self, protocol_version):
        io = self.client
        letter = getattr(io, "_zeotemp_answer", None)
        if letter is None and now["letter"] is not None:
            letter = io._zeotemp_answer = now["letter"]
        if letter is not None:
            protocol_version = letter + protocol_version[1:]
        return original(self, protocol_version)

    monkeypatch.setattr(zclient.Protocol, "finish_connection",
                        finish_connection)

    @contextlib.contextmanager
    def answer(letter):
        now["letter"] = letter
        try:
            yield
        finally:
            now["letter"] = None
    return answer



def test_stock_client_commits_and_reads_over_msgpack(server_factory, make_db):
    srv = server_factory(msgpack=True)
    db = make_db(srv)
    assert protocol_of(db.storage) == b"M5"
    conn, tm = open_conn(db)
    before = len(db.storage)
    root = conn.root()
    values = {
        "bytes": b"\x00\xff" * 300,     # bin 16
        "text": "temp ✓ " * 50,          # str 16
        "big": 2 ** 62 + 1,
        "negative": -(2 ** 40),
        "float": 2.5,
        "nested": {"a": [1, (2, 3)], "b": None, "c": True},
    }
    root["values"] = values
    root["items"] = [Item("one"), Item("two"), Item("three")]
    txn = tm.get()
    txn.note("msgpack ✓")
    txn.setUser("tester")
    txn.setExtendedInfo("tags", ["a", "b"])
    tm.commit()
    tid = root._p_serial
    assert db.storage.lastTransaction() == tid
    # `info` pushed inside tpc_finish: root + 3 new items' count.
    assert len(db.storage) == before + 3

    # A second msgpack client reads it all back from the server.
    db2 = make_db(srv)
    assert protocol_of(db2.storage) == b"M5"
    conn2, _ = open_conn(db2)
    root2 = conn2.root()
    assert root2["values"] == values
    assert [i.value for i in root2["items"]] == ["one", "two", "three"]
    # history: dicts with floats, bytes and the transaction's metadata.
    (entry,) = db2.storage.history(z64, size=1)
    assert entry["tid"] == tid
    assert isinstance(entry["time"], float)
    assert entry["description"] == "msgpack ✓".encode()
    assert entry["user_name"].endswith(b"tester")
    # loadSerial and new_oids.
    data, serial = db2.storage.load(z64)
    assert serial == tid
    assert db2.storage.loadSerial(z64, tid) == data
    oids = {db2.storage.new_oid() for _ in range(150)}
    assert len(oids) == 150
    conn.close()
    conn2.close()


def test_btrees_conflicts_resolve_between_msgpack_clients(server_factory,
                                                           make_db):
    srv = server_factory(msgpack=True)
    db_1, db_2 = make_db(srv), make_db(srv, server_sync=True)
    assert protocol_of(db_1.storage) == protocol_of(db_2.storage) == b"M5"
    conn_1, tm_1 = open_conn(db_1)
    conn_1.root()["tree"] = OOBTree({"k0": 0, "k9": 9})  # one small bucket
    conn_1.root()["count"] = Length(0)
    tm_1.commit()

    conn_2, tm_2 = open_conn(db_2)
    tree_1, tree_2 = conn_1.root()["tree"], conn_2.root()["tree"]
    count_1, count_2 = conn_1.root()["count"], conn_2.root()["count"]
    tm_1.begin()
    assert len(tree_1) == 2 and len(tree_2) == 2 and count_2() == 0
    tree_1["a"] = "from 1"
    count_1.change(1)
    tree_2["b"] = "from 2"
    count_2.change(10)
    tm_1.commit()
    # Conflicts on both objects; vote hands them to client 2 (a msgpack
    # list of maps with the committed data), which resolves and re-votes.
    tm_2.commit()

    expected = {"k0": 0, "k9": 9, "a": "from 1", "b": "from 2"}
    fresh, _ = open_conn(make_db(srv))
    assert dict(fresh.root()["tree"].items()) == expected
    assert fresh.root()["count"]() == 11
    wait_until(lambda: (tm_1.begin(), dict(tree_1.items()))[1] == expected,
               10, message="client 1 to see the merged tree")
    fresh.close()
    conn_1.close()
    conn_2.close()


def test_error_replies_arrive_as_their_exception_classes(server_factory,
                                                          make_db):
    srv = server_factory(msgpack=True)
    db_1, db_2 = make_db(srv), make_db(srv, server_sync=True)
    assert protocol_of(db_1.storage) == protocol_of(db_2.storage) == b"M5"
    # POSKeyError: args tuple.
    oid = db_1.storage.new_oid()
    with pytest.raises(POSKeyError) as excinfo:
        db_1.storage.load(oid)
    assert excinfo.value.args[0] == oid

    # ConflictError: its __dict__ as a map (message, oid, class_name,
    # serials), rebuilt by the client's create_ConflictError.
    conn_1, tm_1 = open_conn(db_1)
    conn_1.root()["obj"] = Item("initial")
    tm_1.commit()
    conn_2, tm_2 = open_conn(db_2)
    obj_1, obj_2 = conn_1.root()["obj"], conn_2.root()["obj"]
    assert obj_2.value == "initial"
    read_serial = obj_2._p_serial
    tm_1.begin()
    obj_1.value = "first"
    obj_2.value = "second"
    tm_1.commit()
    with pytest.raises(ConflictError) as excinfo:
        tm_2.commit()
    err = excinfo.value
    assert type(err) is ConflictError
    assert err.oid == obj_1._p_oid
    assert err.serials == (obj_1._p_serial, read_serial)
    tm_2.abort()
    # The connection is fine after both errors.
    tm_2.begin()
    assert obj_2.value == "first"
    conn_1.close()
    conn_2.close()


def test_invalidations_reach_msgpack_clients(server_factory, make_db):
    srv = server_factory(msgpack=True)
    db_a, db_b = make_db(srv), make_db(srv)
    assert protocol_of(db_a.storage) == protocol_of(db_b.storage) == b"M5"
    conn_a, tm_a = open_conn(db_a)
    conn_a.root()["item"] = Item("v0")
    tm_a.commit()
    conn_b, tm_b = open_conn(db_b)
    wait_until(lambda: (tm_b.begin(), "item" in conn_b.root())[1], 10,
               message="B to see the item")
    item_b = conn_b.root()["item"]
    assert item_b.value == "v0"
    for i in range(1, 6):
        conn_a.root()["item"].value = f"v{i}"
        tm_a.commit()
        tid = conn_a.root()["item"]._p_serial
        # No server-sync: only the invalidateTransaction push moves B's
        # last tid and invalidates its cached copy.
        wait_until(lambda: db_b.storage.lastTransaction() == tid, 10,
                   interval=0.02, message=f"B to get invalidation {i}")
        tm_b.begin()
        assert item_b.value == f"v{i}"
        assert item_b._p_serial == tid
    conn_a.close()
    conn_b.close()


@pytest.mark.parametrize("announce", [False, True],
                         ids=["announce-Z5", "announce-M5"])
def test_pickle_and_msgpack_clients_share_a_storage(server_factory, make_db,
                                                    answering, announce):
    srv = server_factory(msgpack=announce)
    with answering(b"Z"):
        db_z = make_db(srv)
    with answering(b"M"):
        db_m = make_db(srv)
    assert protocol_of(db_z.storage) == b"Z5"
    assert protocol_of(db_m.storage) == b"M5"
    conn_z, tm_z = open_conn(db_z)
    conn_m, tm_m = open_conn(db_m)

    def sees(conn, tm, key, value):
        tm.begin()
        return conn.root().get(key) == value

    # Each sees the other's commits through its own encoding's
    # invalidations (no server-sync).
    for i in range(3):
        conn_z.root()["from_z"] = i
        tm_z.commit()
        wait_until(lambda: sees(conn_m, tm_m, "from_z", i), 10,
                   interval=0.02, message=f"the msgpack client to see Z {i}")
        conn_m.root()["from_m"] = i
        tm_m.commit()
        wait_until(lambda: sees(conn_z, tm_z, "from_m", i), 10,
                   interval=0.02, message=f"the pickle client to see M {i}")
    assert db_z.storage.lastTransaction() == db_m.storage.lastTransaction()

    # A BTree conflict between the two, resolved by the msgpack client
    # from data the pickle client committed.
    conn_z.root()["tree"] = OOBTree({"k0": 0})
    tm_z.commit()
    wait_until(lambda: (tm_m.begin(), "tree" in conn_m.root())[1], 10,
               message="the tree to reach the msgpack client")
    tree_m, tree_z = conn_m.root()["tree"], conn_z.root()["tree"]
    assert len(tree_m) == 1
    tree_z["z"] = 1
    tree_m["m"] = 2
    tm_z.commit()
    tm_m.commit()
    expected = {"k0": 0, "z": 1, "m": 2}
    wait_until(lambda: (tm_z.begin(), dict(tree_z.items()))[1] == expected,
               10, message="the pickle client to see the merged tree")
    tm_m.begin()
    assert dict(tree_m.items()) == expected
    conn_z.close()
    conn_m.close()


def test_many_clients_of_both_encodings_see_every_commit_in_order(
        server_factory, make_storage, answering):
    """Invalidation frames are encoded once per encoding and shared: every
    client, of either encoding, gets every commit's invalidation once, in
    commit order, and after the reply of any request it sent later."""
    srv = server_factory(msgpack=True)
    seen = {}
    storages = []
    for n in range(6):
        letter = b"ZM"[n % 2:n % 2 + 1]
        with answering(letter):
            storage = make_storage(srv)
        assert protocol_of(storage)[:1] == letter
        got = seen[n] = []
        lock = threading.Lock()
        original = storage.invalidateTransaction

        def record(tid, oids, got=got, lock=lock, original=original):
            with lock:
                got.append(tid)
            return original(tid, oids)
        # ClientIO calls the storage's method, looked up at each call.
        storage.invalidateTransaction = record
        storages.append(storage)

    writer = storages[0]
    tids = []
    oid = writer.new_oid()
    serial = z64
    from ZODB.Connection import TransactionMetaData
    for i in range(20):
        t = TransactionMetaData()
        writer.tpc_begin(t)
        writer.store(oid, serial, pickle.dumps(Item, 3) +
                     pickle.dumps({"value": i}, 3), "", t)
        writer.tpc_vote(t)
        serial = writer.tpc_finish(t)
        tids.append(serial)
    for n, storage in enumerate(storages[1:], 1):
        wait_until(lambda: storage.lastTransaction() == tids[-1], 10,
                   message=f"client {n} to get the last invalidation")
        # A load after that returns the last revision, never an older one.
        assert storage.load(oid)[1] == tids[-1]
        assert seen[n] == tids, (n, [u64(t) for t in seen[n]])


@pytest.mark.parametrize("payload,what", [
    (b"\xc1", "the never-used byte 0xc1"),
    pytest.param(
        b"\x94\x01\xc2\xa4ping\xd4\x01\x00", "an extension type",
        marks=pytest.mark.zeotemp_only(
            reason="the stock server decodes an ExtType (a 2-tuple) and "
                   "replies TypeError to ping(code, data)")),
    (b"\x94\x01\xc2\xa4ping\x90\xc0", "trailing bytes"),
    (b"\x93\x01\xc2\xa4ping", "a 3-item envelope"),
], ids=["c1", "ext", "trailing", "3-tuple"])
def test_bad_msgpack_closes_only_that_connection(server_factory, make_db,
                                                  payload, what):
    srv = server_factory(msgpack=True)
    db = make_db(srv)
    raw = Raw(srv.address, b"M5")
    raw.call("register", "1", False)
    raw.send_payload(payload)
    assert raw.closed(), f"{what}: connection still open"
    raw.close()
    # The other client carries on.
    conn, tm = open_conn(db)
    conn.root()["after"] = what
    tm.commit()
    conn.close()
    if IS_ZEOTEMP:
        assert "cannot decode message" in srv.log_text() or \
            "not a 4-tuple" in srv.log_text(), srv.log_text()[-2000:]


@pytest.mark.zeotemp_only(
    reason="the stock server has no nesting limit: it calls ping(*args) and "
           "replies with a TypeError")
def test_msgpack_nesting_limit_closes_the_connection(server_factory):
    srv = server_factory(msgpack=True, zeotemp_args=["--max-nesting-depth", "8"])
    raw = Raw(srv.address, b"M5")
    raw.call("register", "1", False)
    # Envelope, args, then 7 more levels: 9 > 8.
    raw.send_payload(b"\x94\x02\xc2\xa4ping\x91" + b"\x91" * 6 + b"\x90")
    assert raw.closed()
    raw.close()
    assert "nested deeper than 8" in srv.log_text(), srv.log_text()[-2000:]
    # 8 levels are fine: an error reply (ping takes no argument), open.
    raw = Raw(srv.address, b"M5")
    raw.call("register", "1", False)
    nested = ()
    for _ in range(5):
        nested = (nested,)  # 6 levels, in args and envelope: 8
    (_, flags, _, err), _ = raw.call("ping", nested)
    assert flags == 2 and err[0] == "builtins.TypeError", err
    raw.close()
