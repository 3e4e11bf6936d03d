"""Registration / connection, storage names and addresses."""

import io
import pickle
import time

import pytest
import transaction
from persistent.mapping import PersistentMapping
from persistent.TimeStamp import TimeStamp
from ZEO.Exceptions import ClientDisconnected
from ZODB.POSException import POSKeyError
from ZODB.utils import z64



def tid_time(tid):
    return TimeStamp(tid).timeTime()


def test_db_opens_with_empty_persistent_mapping_root(server, make_db):
    db = make_db(server)
    conn = db.open()
    root = conn.root()
    assert type(root) is PersistentMapping
    assert len(root) == 0
    assert list(root.keys()) == []
    assert root._p_oid == z64
    conn.close()


def test_commit_tids_increase(server, make_db):
    db = make_db(server)
    storage = db.storage
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    previous = storage.lastTransaction()
    tids = []
    for i in range(3):
        tm.begin()
        root["n"] = i
        tm.commit()
        tid = root._p_serial
        assert tid == storage.lastTransaction()
        assert tid > previous
        # ZODB tids are TimeStamps of the commit time.
        assert abs(tid_time(tid) - time.time()) < 3600
        previous = tid
        tids.append(tid)
    assert tids == sorted(set(tids))
    conn.close()


@pytest.mark.zeotemp_only(
    reason="MappingStorage starts empty: no root object and last tid z64 "
           "until the first commit")
def test_root_and_last_tid_exist_before_any_commit(server, make_storage):
    storage = make_storage(server)
    last = storage.lastTransaction()
    assert last != z64
    # zeotemp seeds its tids from the wall clock at startup.
    assert abs(tid_time(last) - time.time()) < 3600
    data, serial = storage.load(z64)
    assert serial <= last
    unpickler = pickle.Unpickler(io.BytesIO(data))
    assert unpickler.load() is PersistentMapping
    assert unpickler.load() == {"data": {}}


def test_unknown_storage_name_is_refused(server, make_storage, make_db):
    started = time.monotonic()
    with pytest.raises(Exception) as excinfo:
        make_storage(server, storage="nope", wait_timeout=3)
    assert time.monotonic() - started < 60
    exc = excinfo.value
    assert isinstance(exc, ClientDisconnected) or "nope" in str(exc), repr(exc)
    # The server still serves the real storage to other clients.
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["ok"] = True
    tm.commit()
    conn.close()
    db2 = make_db(server)
    conn2 = db2.open(transaction_manager=transaction.TransactionManager())
    assert conn2.root()["ok"] is True
    conn2.close()


def test_named_storages_are_isolated(server_factory, make_db):
    srv = server_factory(storages=("1", "temp"))
    db1 = make_db(srv, storage="1")
    dbt = make_db(srv, storage="temp")
    tm1 = transaction.TransactionManager()
    tmt = transaction.TransactionManager()
    c1 = db1.open(transaction_manager=tm1)
    ct = dbt.open(transaction_manager=tmt)
    c1.root()["only_in_1"] = "one"
    tm1.commit()
    ct.root()["only_in_temp"] = "temp"
    tmt.commit()

    # Fresh clients, so nothing comes from a client cache.
    f1 = make_db(srv, storage="1").open(
        transaction_manager=transaction.TransactionManager())
    ft = make_db(srv, storage="temp").open(
        transaction_manager=transaction.TransactionManager())
    assert dict(f1.root()) == {"only_in_1": "one"}
    assert dict(ft.root()) == {"only_in_temp": "temp"}
    for c in (c1, ct, f1, ft):
        c.close()


def test_unix_domain_socket(server_factory, make_db, tmp_path):
    path = str(tmp_path / "zeo.sock")
    srv = server_factory(unix_socket=path)
    assert srv.address == path
    db = make_db(srv)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["via"] = "unix"
    tm.commit()
    conn.close()
    other = make_db(srv).open(transaction_manager=transaction.TransactionManager())
    assert other.root()["via"] == "unix"
    other.close()


def test_load_of_unknown_oid_is_poskeyerror(server, make_storage):
    storage = make_storage(server)
    oid = storage.new_oid()
    assert oid != z64
    with pytest.raises(POSKeyError):
        storage.load(oid)
