"""Code run in child processes by the tests (multiprocessing 'spawn' workers
and ``python zeotemp_workers.py ...`` subprocesses).  Must stay importable
without pytest."""

import random
import sys
import time


def _address(addr):
    # multiprocessing pickles tuples fine; lists come from JSON-ish callers.
    return tuple(addr) if isinstance(addr, list) else addr


def contention_worker(args):
    """Insert ``nkeys`` distinct keys into root['tree'] (one shared OOBTree),
    ``batch`` keys per transaction, retrying transient errors a bounded number
    of times.  Returns (worker, commits, retries)."""
    addr, worker, nkeys, batch, max_attempts = args
    import transaction
    import ZEO.ClientStorage
    import ZODB
    from ZODB.POSException import ConflictError
    from ZEO.Exceptions import ClientDisconnected

    rnd = random.Random(worker)
    storage = ZEO.ClientStorage.ClientStorage(_address(addr), wait_timeout=30)
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    commits = retries = 0
    try:
        keys = [f"w{worker:02d}-k{i:04d}" for i in range(nkeys)]
        for start in range(0, nkeys, batch):
            chunk = keys[start:start + batch]
            for attempt in range(max_attempts):
                try:
                    tm.begin()
                    tree = conn.root()["tree"]
                    for k in chunk:
                        tree[k] = (worker, k)
                    tm.commit()
                    commits += 1
                    break
                except (ConflictError, ClientDisconnected):
                    tm.abort()
                    retries += 1
                    if attempt == max_attempts - 1:
                        raise
                    time.sleep(rnd.uniform(0, 0.02 * min(attempt + 1, 10)))
    finally:
        try:
            tm.abort()
        except Exception:
            pass
        conn.close()
        db.close()
    return worker, commits, retries


def hold_commit_lock(addr):
    """tpc_begin/store/tpc_vote on a new object, then announce it on stdout
    and sleep (holding the server's commit lock) until killed."""
    import pickle

    import ZEO.ClientStorage
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import z64, u64

    from zeotemp_testobjects import Item

    storage = ZEO.ClientStorage.ClientStorage(addr, wait_timeout=30)
    oid = storage.new_oid()
    record = pickle.dumps(Item, 3) + pickle.dumps({"value": "from-killed"}, 3)
    txn = TransactionMetaData(description="killed mid-transaction")
    storage.tpc_begin(txn)
    storage.store(oid, z64, record, "", txn)
    storage.tpc_vote(txn)
    sys.stdout.write(f"VOTED {u64(oid)}\n")
    sys.stdout.flush()
    time.sleep(120)  # the test kills us long before this
    sys.exit(3)


def main(argv):
    cmd = argv[1]
    if cmd == "hold-lock":
        addr = argv[2]
        if ":" in addr and not addr.startswith("/"):
            host, port = addr.rsplit(":", 1)
            addr = (host, int(port))
        hold_commit_lock(addr)
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv)
