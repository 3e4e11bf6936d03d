"""Heavy contention on one OOBTree from many processes."""

import multiprocessing

import pytest
import transaction
from BTrees.OOBTree import OOBTree

import zeotemp_workers

NPROCS = 16
NKEYS = 200      # per process
BATCH = 10       # keys per transaction
MAX_ATTEMPTS = 60


@pytest.mark.zeotemp_only(
    reason="may starve clients in client-side conflict resolution (see "
           "test_concurrency.SHARED_BUCKET_STOCK_BUG); usually passes")
def test_heavy_btree_contention(server, make_db):
    db = make_db(server)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["tree"] = OOBTree()
    tm.commit()
    conn.close()

    ctx = multiprocessing.get_context("spawn")
    jobs = [(server.address, w, NKEYS, BATCH, MAX_ATTEMPTS) for w in range(NPROCS)]
    with ctx.Pool(NPROCS) as pool:
        try:
            results = pool.map_async(zeotemp_workers.contention_worker, jobs,
                                     chunksize=1).get(timeout=240)
        finally:
            pool.terminate()
    print("commits/retries per worker:", [(r[1], r[2]) for r in results])
    assert sorted(r[0] for r in results) == list(range(NPROCS))
    assert all(r[1] == NKEYS // BATCH for r in results), results

    check = make_db(server).open(transaction_manager=transaction.TransactionManager())
    tree = check.root()["tree"]
    expected = {f"w{w:02d}-k{i:04d}": (w, f"w{w:02d}-k{i:04d}")
                for w in range(NPROCS) for i in range(NKEYS)}
    items = dict(tree.items())
    missing = set(expected) - set(items)
    assert not missing, f"{len(missing)} keys missing, e.g. {sorted(missing)[:5]}"
    assert items == expected
    assert len(tree) == NPROCS * NKEYS
    check.close()
