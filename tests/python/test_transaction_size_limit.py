"""The per-transaction data limit (--max-transaction-bytes), seen from stock
ZEO/ZODB clients, where it is easy to get wrong: the conflict-resolution
round.

A transaction's stores are counted as they arrive; once they pass the limit
the transaction is refused and its vote fails with an error naming
``max-transaction-bytes``. When the first vote hands conflicts back, the
stock client resolves them and sends each resolved record with ``storea``
before voting again; those records count too. If the resolved store is the
one that crosses the limit, the second vote must fail the same way and
commit nothing. It must not commit an empty transaction and report success:
the client would then put its resolved record into its cache as committed,
while the server (and every other client) keeps the previous value, a lost
update that nobody is told about.
"""

import pytest
from ZEO.Exceptions import ServerException
from ZODB.POSException import StorageError

from zeotemp_testobjects import MergingCounter
from zeotemp_util import open_conn, wait_until

LIMIT = 1000
# The counter's record is a little over PAD bytes: one fits in LIMIT, two
# (the first store and the resolved one) do not.
PAD = 520



def last_transaction(storage):
    """The server's last committed tid (asked, not the client cache's)."""
    return storage.server_status()["last-transaction"]


@pytest.mark.zeotemp_only("zeotemp's --max-transaction-bytes")
def test_resolved_store_over_the_limit_fails_the_vote_and_commits_nothing(
        server_factory, make_db, make_storage):
    server = server_factory(
        zeotemp_args=("--max-transaction-bytes", LIMIT))
    db1 = make_db(server)
    conn1, tm1 = open_conn(db1)
    conn1.root()["counter"] = MergingCounter(0, "p" * PAD)
    tm1.commit()

    # Client 2 loads the counter in a transaction that is still open when
    # client 1 commits: its store will be on the older serial.
    db2 = make_db(server)
    conn2, tm2 = open_conn(db2)
    counter2 = conn2.root()["counter"]
    assert counter2.value == 0

    tm1.begin()
    counter1 = conn1.root()["counter"]
    counter1.value += 1
    tm1.commit()
    oid = counter1._p_oid

    # One record of the counter fits in the limit, two do not: client 2's
    # first round (one store) is within the limit, and only the resolved
    # store of the resolution round crosses it.
    monitor = make_storage(server)
    record, serial1 = monitor.load(oid)
    assert len(record) <= LIMIT < 2 * len(record), len(record)
    assert serial1 == counter1._p_serial
    before = last_transaction(monitor)

    counter2.value += 2
    try:
        tm2.commit()
    except Exception as e:
        error = e
    else:
        error = None
    after = last_transaction(monitor)
    if error is None:
        tm2.begin()
        fresh, _ = open_conn(make_db(server))
        pytest.fail(
            "client 2's commit returned normally although its resolved store "
            f"({len(record)} bytes, after a first store of {len(record)}) took "
            f"the transaction over max-transaction-bytes {LIMIT}: the server's "
            f"last transaction went from {before} to {after}; client 2 now "
            f"sees value {conn2.root()['counter'].value}, a fresh client "
            f"{fresh.root()['counter'].value}")
    tm2.abort()
    print("client 2's commit raised:", type(error), error)

    # The vote failed with the limit's error (a StorageError on the server,
    # which the stock client raises as ServerException), not a conflict.
    assert isinstance(error, (ServerException, StorageError)), repr(error)
    assert "max-transaction-bytes" in str(error), str(error)
    assert str(LIMIT) in str(error), str(error)

    # Nothing was committed by client 2's attempt.
    assert after == before
    fresh_conn, _ = open_conn(make_db(server))
    assert fresh_conn.root()["counter"].value == 1
    assert monitor.load(oid) == (record, serial1)

    # Client 2 sees client 1's value after its abort, and can retry: from
    # the fresh snapshot there is no conflict and one store fits.
    tm2.begin()
    counter2 = conn2.root()["counter"]
    assert counter2.value == 1
    assert counter2._p_serial == serial1
    counter2.value += 2
    tm2.commit()

    # Client 1 (no server-sync) sees it once the invalidation has arrived,
    # which may be a moment after client 2's commit returned.
    def client1_value():
        tm1.begin()
        return conn1.root()["counter"].value

    wait_until(lambda: client1_value() == 3, 10,
               message="client 1 sees client 2's retried commit")
