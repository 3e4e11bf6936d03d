"""Read-only clients and read-only servers."""

import io
import pickle

import pytest
import transaction
from persistent.mapping import PersistentMapping
from ZEO.Exceptions import ClientDisconnected
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.utils import z64

from zeotemp_util import IS_ZEOTEMP


def test_read_only_client_reads_but_cannot_commit(server, make_db):
    writer = make_db(server)
    tm_w = transaction.TransactionManager()
    conn_w = writer.open(transaction_manager=tm_w)
    conn_w.root()["x"] = "written"
    tm_w.commit()

    reader = make_db(server, read_only=True)
    assert reader.storage.is_read_only()
    tm_r = transaction.TransactionManager()
    conn_r = reader.open(transaction_manager=tm_r)
    tm_r.begin()
    assert conn_r.root()["x"] == "written"
    conn_r.root()["x"] = "not allowed"
    with pytest.raises(ReadOnlyError):
        tm_r.commit()
    tm_r.abort()
    with pytest.raises(ReadOnlyError):
        reader.storage.new_oid()

    # Nothing changed, and the writable client still works.
    tm_w.begin()
    conn_w.root()["y"] = "still writable"
    tm_w.commit()
    check = make_db(server).open(transaction_manager=transaction.TransactionManager())
    assert dict(check.root()) == {"x": "written", "y": "still writable"}
    check.close()
    conn_r.close()
    conn_w.close()


def test_read_only_server(server_factory, make_storage, make_db):
    srv = server_factory(read_only=True)

    # A normal (writable) registration is refused ...
    with pytest.raises(ClientDisconnected):
        make_storage(srv, wait_timeout=3)

    # ... but with read_only_fallback the client connects read-only.
    storage = make_storage(srv, read_only_fallback=True)
    assert storage.is_connected()
    assert storage.is_read_only()
    last = storage.lastTransaction()
    assert isinstance(last, bytes) and len(last) == 8
    with pytest.raises(ReadOnlyError):
        storage.new_oid()
    with pytest.raises(ReadOnlyError):
        storage.tpc_begin(TransactionMetaData())

    if IS_ZEOTEMP:
        # zeotemp creates the root at startup, so there is something to read.
        data, serial = storage.load(z64)
        unpickler = pickle.Unpickler(io.BytesIO(data))
        assert unpickler.load() is PersistentMapping
        db = make_db(srv, read_only_fallback=True)
        conn = db.open(transaction_manager=transaction.TransactionManager())
        assert dict(conn.root()) == {}
        conn.close()
    else:
        # An empty MappingStorage: reading works, the root just isn't there.
        with pytest.raises(POSKeyError):
            storage.load(z64)
