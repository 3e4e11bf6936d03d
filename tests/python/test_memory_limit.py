"""The memory limit (--memory-limit), seen from stock ZEO/ZODB clients: a
commit that does not fit fails with an error naming the limit; what was
committed before is all there, loads and other clients keep working, and
room made by unlinking data is used again.

To make room the server drops old history and collects garbage before the
retention window is over. What it frees that way may still be read by a
snapshot inside the window: that read must be a retryable conflict
(``loadBefore`` -> None, so ZODB raises ReadConflictError; ``loadSerial`` ->
ConflictError), as for any dropped revision, never POSKeyError, which ZODB
and Zope treat as a broken database and do not retry."""

import pytest
import transaction
from ZEO.Exceptions import ServerException
from ZODB.POSException import ConflictError, POSKeyError, ReadConflictError

from zeotemp_testobjects import Item
from zeotemp_util import wait_until

LIMIT = 12 * 1024 * 1024   # 2 MiB of accounted bytes (storage/budget.rs)
BLOB = 200 * 1024


@pytest.mark.zeotemp_only("zeotemp's own memory limit")
def test_commit_over_the_memory_limit_fails_clearly(server_factory, make_db):
    server = server_factory(zeotemp_args=("--memory-limit", LIMIT, "--gc-interval", "1"))
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    committed = []
    error = None
    for i in range(40):  # 40 x 200 KiB is well over 2 MiB
        root[f"item{i}"] = Item(bytes([i % 256]) * BLOB)
        try:
            tm.commit()
        except ServerException as e:
            error = e
            tm.abort()
            break
        committed.append(i)
    assert error is not None, "the limit was never reached"
    assert "memory-limit" in str(error) and str(LIMIT) in str(error), str(error)
    assert len(committed) >= 5, "what fits is committed"

    # Everything committed before is there, for this client and a fresh one.
    other = make_db(server).open(transaction_manager=transaction.TransactionManager())
    other.transaction_manager.begin()
    for i in committed:
        assert other.root()[f"item{i}"].value == bytes([i % 256]) * BLOB
    # The failed commit left nothing behind.
    assert f"item{len(committed)}" not in other.root()
    status = db.storage.server_status()
    # What the storages hold stays under the share of the limit left once
    # the allocator's overhead is allowed for.
    assert status["accounted-bytes"] <= status["accounted-limit"] < LIMIT
    assert status["memory-limit"] == LIMIT

    # Unlinking data makes room again (the next commit collects it).
    tm.begin()
    for i in committed[: len(committed) // 2]:
        del root[f"item{i}"]
    tm.commit()
    root["after"] = Item(b"a" * BLOB)
    tm.commit()
    # (the other client sees it once the invalidation has arrived)
    def sees_after():
        other.transaction_manager.begin()
        return "after" in other.root()
    wait_until(sees_after, 10, message="the other client to see the new commit")
    assert other.root()["after"].value == b"a" * BLOB
    with pytest.raises(KeyError):
        other.root()[f"item{committed[0]}"]
    other.close()
    conn.close()


@pytest.mark.zeotemp_only("zeotemp's own memory limit and history retention")
def test_history_dropped_under_memory_pressure_is_a_conflict_not_poskeyerror(
        server_factory, make_db, make_storage):
    """X is committed (T1), then unlinked (T2); inside the (default)
    retention window a snapshot between T1 and T2 reads X. A commit that
    fits only once the server dropped old history and collected garbage
    frees X early. Reading X at that same snapshot is then a retryable
    conflict, never POSKeyError."""
    x_size = 1024 * 1024
    server = server_factory(zeotemp_args=("--memory-limit", LIMIT))
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root["x"] = Item(b"x" * x_size)
    tm.commit()
    x_oid = root["x"]._p_oid
    t1 = root["x"]._p_serial

    # S: a snapshot between T1 and T2 that holds X as a ghost (never loaded
    # by its client, so activating X asks the server).
    tm_s = transaction.TransactionManager()
    conn_s = make_db(server).open(transaction_manager=tm_s)
    tm_s.begin()
    x_s = conn_s.root()["x"]
    assert x_s._p_changed is None and x_s._p_oid == x_oid

    del root["x"]
    tm.commit()
    t2 = root._p_serial

    # Inside the retention window X loads at a snapshot before T2 (a cold
    # client cache: the server answers).
    data, start, end = make_storage(server).loadBefore(x_oid, t2)
    assert start == t1 and end is None      # X itself was never rewritten
    assert make_storage(server).loadSerial(x_oid, t1) == data

    # A commit that needs more room than the limit leaves, but fits once X
    # (unreachable, only kept for snapshots) is gone.
    monitor = make_storage(server)
    before = monitor.server_status()
    y_size = before["accounted-limit"] - before["accounted-bytes"] + x_size // 2
    root["y"] = Item(b"y" * y_size)
    tm.commit()
    after = monitor.server_status()
    print("before:", before, "after:", after)
    assert after["freed-objects"] > before["freed-objects"], \
        "X was not freed: the test did not make the server collect early"
    assert after["accounted-bytes"] <= after["accounted-limit"]

    # The same reads at the same snapshot, from cold caches: retryable.
    cold = make_storage(server)
    try:
        result = cold.loadBefore(x_oid, t2)
    except POSKeyError as e:
        pytest.fail(f"loadBefore(X, T2) inside the retention window raised "
                    f"{e!r} after X was freed under memory pressure; "
                    "expected None (ReadConflictError in ZODB)")
    assert result is None, result
    try:
        make_storage(server).loadSerial(x_oid, t1)
    except ConflictError as e:
        print("loadSerial(X, T1):", repr(e))
    except POSKeyError as e:
        pytest.fail(f"loadSerial(X, T1) raised {e!r} after X was freed under "
                    "memory pressure; expected a ConflictError")
    else:
        pytest.fail("loadSerial(X, T1) still returned X's data")

    # In ZODB: S's ghost of X cannot be loaded, and ZODB retries that.
    with pytest.raises(ReadConflictError):
        try:
            x_s._p_activate()
        except POSKeyError as e:
            pytest.fail(f"activating X in a snapshot between T1 and T2 "
                        f"raised {e!r}; expected ReadConflictError")
    tm_s.abort()
    tm_s.begin()            # a new snapshot: consistent again
    assert "x" not in conn_s.root()
    assert conn_s.root()["y"].value == b"y" * y_size
    conn_s.close()
    conn.close()
