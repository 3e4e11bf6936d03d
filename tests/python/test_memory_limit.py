"""The memory limit (--memory-limit), seen from stock ZEO/ZODB clients: a
commit that does not fit fails with an error naming the limit; what was
committed before is all there, loads and other clients keep working, and
room made by unlinking data is used again."""

import pytest
import transaction
from ZEO.Exceptions import ServerException

from zeotemp_testobjects import Item
from zeotemp_util import wait_until

LIMIT = 3 * 1024 * 1024
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
    for i in range(40):  # 40 x 200 KiB is well over 3 MiB
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
    assert status["accounted-bytes"] <= LIMIT
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
