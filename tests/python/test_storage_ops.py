"""Single-client storage operations: bulk data, oids, abort, big objects,
history and pack."""

import hashlib
import os
import threading
import time

import pytest
import transaction
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64, z64

from zeotemp_testobjects import Item
from zeotemp_util import IS_ZEOTEMP, make_record


def fresh_conn(make_db, server):
    """A connection of a brand-new client (empty client cache)."""
    return make_db(server).open(transaction_manager=transaction.TransactionManager())


def test_many_objects_roundtrip(server, make_db):
    n, per_txn = 10_000, 2_500
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root["tree"] = tree = OOBTree()
    tm.commit()
    for start in range(0, n, per_txn):
        for i in range(start, start + per_txn):
            tree[f"obj{i:05d}"] = PersistentMapping({"i": i, "sq": i * i})
        tm.commit()
    conn.close()

    # A second, fresh client reads everything back from the server.
    db2 = make_db(server)
    conn2 = db2.open(transaction_manager=transaction.TransactionManager())
    tree2 = conn2.root()["tree"]
    values = list(tree2.values())
    assert len(values) == n
    conn2.prefetch(values)  # pipelined loads, keeps the test fast
    oids = set()
    for i, (key, value) in enumerate(tree2.items()):
        assert key == f"obj{i:05d}"
        assert type(value) is PersistentMapping
        assert value["i"] == i and value["sq"] == i * i
        oids.add(value._p_oid)
    assert len(oids) == n
    assert len(db2.storage) >= n  # object count reported by the server
    conn2.close()


def test_new_oids_unique_across_clients(server, make_storage):
    clients, per_client = 3, 1000
    storages = [make_storage(server) for _ in range(clients)]
    results = [[] for _ in range(clients)]
    errors = []

    def allocate(idx):
        try:
            for _ in range(per_client):
                results[idx].append(storages[idx].new_oid())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=allocate, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    all_oids = [oid for r in results for oid in r]
    assert len(all_oids) == clients * per_client
    assert all(isinstance(o, bytes) and len(o) == 8 for o in all_oids)
    assert z64 not in all_oids
    assert len(set(all_oids)) == len(all_oids)


def test_abort_leaves_no_trace(server, make_db, make_storage):
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root["item"] = Item("original")
    tm.commit()
    item = root["item"]
    item_oid, item_serial = item._p_oid, item._p_serial

    # 1. ZODB-level: modify, then abort.
    item.value = "aborted"
    root["new"] = Item("never committed")
    tm.abort()
    tm.begin()
    assert item.value == "original"
    assert "new" not in root

    # 2. Raw ClientStorage: store a new oid and a new revision of an existing
    # object, vote (takes the commit lock), then tpc_abort.
    raw = make_storage(server)
    new_oid = raw.new_oid()
    txn = TransactionMetaData(description="to be aborted")
    raw.tpc_begin(txn)
    raw.store(new_oid, z64, make_record(Item, {"value": "ghost"}), "", txn)
    raw.store(item_oid, item_serial, make_record(Item, {"value": "changed"}), "", txn)
    raw.tpc_vote(txn)
    raw.tpc_abort(txn)

    with pytest.raises(POSKeyError):
        raw.load(new_oid)
    data, serial = raw.load(item_oid)
    assert serial == item_serial

    # Another, fresh client sees the old state and no new object.
    other = make_storage(server)
    with pytest.raises(POSKeyError):
        other.load(new_oid)
    conn2 = fresh_conn(make_db, server)
    item2 = conn2.root()["item"]
    assert item2.value == "original"
    assert item2._p_serial == item_serial
    assert set(conn2.root().keys()) == {"item"}

    # The lock was released by tpc_abort: a normal commit goes through.
    tm.begin()
    item.value = "after abort"
    tm.commit()
    assert item._p_serial > item_serial
    conn2.close()
    conn.close()


@pytest.mark.filterwarnings("ignore:The <class:UserWarning")
def test_20mb_object(server, make_db):
    payload = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["big"] = Item(payload)
    tm.commit()
    del payload
    conn.close()

    conn2 = fresh_conn(make_db, server)
    value = conn2.root()["big"].value
    assert len(value) == 20 * 1024 * 1024
    assert hashlib.sha256(value).hexdigest() == digest
    conn2.close()


def test_history(server, make_db):
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    serials = []
    item = None
    before = time.time()
    for rev in range(3):
        txn = tm.begin()
        txn.note(f"revision {rev}")
        txn.setUser(f"user{rev}")
        if item is None:
            root["item"] = item = Item(rev)
        else:
            item.value = rev
        tm.commit()
        serials.append(item._p_serial)
    after = time.time()
    oid = item._p_oid

    # From a fresh client, so the answer comes from the server.
    db2 = make_db(server)
    for source in (db2.storage.history(oid, size=5), db2.history(oid, size=5),
                   db.storage.history(oid, size=5)):
        assert isinstance(source, (list, tuple))
        assert len(source) == 3
        for entry in source:
            assert {"tid", "time", "user_name", "description", "size",
                    "serial"} <= set(entry)
        assert [e["tid"] for e in source] == serials[::-1]
        assert [e["serial"] for e in source] == serials[::-1]
        descriptions = [e["description"] for e in source]
        descriptions = [d.decode() if isinstance(d, bytes) else d
                        for d in descriptions]
        assert descriptions == ["revision 2", "revision 1", "revision 0"]
        users = [u.decode() if isinstance(u, bytes) else u
                 for u in (e["user_name"] for e in source)]
        assert users == ["/ user2", "/ user1", "/ user0"]
        for e in source:
            assert before - 5 <= e["time"] <= after + 5
            assert isinstance(e["size"], int) and e["size"] > 0

    # size limits the number of entries returned.
    assert [e["tid"] for e in db2.storage.history(oid, size=2)] == serials[:0:-1]
    with pytest.raises(POSKeyError):
        db2.storage.history(p64(u64(oid) + 10_000_000), size=5)
    conn.close()


def test_history_of_none_is_poskeyerror(server, make_storage):
    """``history(None)`` names no object: the stock server's storages answer
    POSKeyError (MappingStorage looks ``None`` up and finds nothing), and so
    must zeotemp, rather than TypeError, so that callers handling "no such
    object" see the error they expect."""
    cs = make_storage(server)
    for args in ((None,), (None, 5)):
        with pytest.raises(POSKeyError):
            cs.history(*args)
    # The connection still answers.
    assert "last-transaction" in cs.server_status()


def test_pack_drops_old_revisions_and_keeps_current_data(server, make_db, make_storage):
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root["keep"] = keep = Item(0)
    tm.commit()
    serials = [keep._p_serial]
    for rev in range(1, 5):
        keep.value = rev
        tm.commit()
        serials.append(keep._p_serial)
    keep_oid = keep._p_oid
    fresh = make_storage(server)
    # Before pack every revision is there.
    for s in serials:
        assert fresh.loadSerial(keep_oid, s)
    time.sleep(0.05)  # pack time strictly after the last commit

    db.pack()

    # Current data is intact, for this client and a fresh one.
    tm.begin()
    assert keep.value == 4
    data, serial = fresh.load(keep_oid)
    assert serial == serials[-1]
    conn2 = fresh_conn(make_db, server)
    assert conn2.root()["keep"].value == 4
    # The old revisions are gone. zeotemp answers a retryable ConflictError
    # (the revision existed, retention dropped it), MappingStorage POSKeyError.
    from ZODB.POSException import ConflictError
    expected = ConflictError if IS_ZEOTEMP else POSKeyError
    for s in serials[:-1]:
        with pytest.raises(expected):
            fresh.loadSerial(keep_oid, s)
    # The database still works after pack.
    keep.value = 5
    tm.commit()
    tm2 = conn2.transaction_manager
    deadline = time.monotonic() + 10
    tm2.begin()
    while conn2.root()["keep"].value != 5 and time.monotonic() < deadline:
        time.sleep(0.05)
        tm2.begin()
    assert conn2.root()["keep"].value == 5
    conn2.close()
    conn.close()


def test_pack_removes_unreachable_objects(server, make_db, make_storage):
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root["orphan"] = orphan = Item("unreachable soon")
    orphan.child = Item("child of orphan")
    tm.commit()
    orphan_oid, child_oid = orphan._p_oid, orphan.child._p_oid
    del root["orphan"]
    tm.commit()
    del orphan
    time.sleep(0.05)

    db.pack()

    fresh = make_storage(server)  # empty client cache
    with pytest.raises(POSKeyError):
        fresh.load(orphan_oid)
    with pytest.raises(POSKeyError):
        fresh.load(child_oid)
    conn.close()
