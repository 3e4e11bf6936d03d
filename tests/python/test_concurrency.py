"""Several clients: invalidations, MVCC, conflicts, conflict resolution,
concurrent clients and a client dying while it holds the commit lock."""

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from BTrees.OOBTree import OOBTree
from ZODB.POSException import ConflictError, POSKeyError
from ZODB.utils import p64

from zeotemp_testobjects import Item
from zeotemp_util import IS_ZEOTEMP, commit_with_retry, open_conn, wait_until

HERE = Path(__file__).resolve().parent



def test_invalidation_seen_by_second_client(server, make_db):
    db_a, db_b = make_db(server), make_db(server)
    conn_a, tm_a = open_conn(db_a)
    conn_a.root()["x"] = 0
    conn_a.root()["item"] = Item("v0")
    tm_a.commit()

    conn_b, tm_b = open_conn(db_b)

    def b_sees(x, v):
        tm_b.begin()
        root = conn_b.root()
        return root.get("x") == x and root["item"].value == v

    wait_until(lambda: b_sees(0, "v0"), 10, message="B to see the initial state")
    item_b = conn_b.root()["item"]
    assert item_b._p_changed is False  # loaded and cached in B

    root_a = conn_a.root()
    root_a["x"] = 1
    root_a["item"].value = "v1"
    tm_a.commit()
    # Without server-sync the invalidation arrives asynchronously.
    wait_until(lambda: b_sees(1, "v1"), 10, interval=0.02,
               message="B to see A's commit")
    assert conn_b.root()["item"] is item_b  # same object, invalidated in place
    assert item_b._p_serial == root_a["item"]._p_serial
    conn_a.close()
    conn_b.close()


def test_invalidation_with_server_sync_is_immediate(server, make_db):
    db_a = make_db(server)
    db_b = make_db(server, server_sync=True)
    conn_a, tm_a = open_conn(db_a)
    conn_b, tm_b = open_conn(db_b)
    root_a = conn_a.root()
    root_a["x"] = 0
    tm_a.commit()
    tm_b.begin()
    assert conn_b.root()["x"] == 0
    for i in range(1, 21):
        root_a["x"] = i
        tm_a.commit()
        # server-sync: beginning a transaction pings the server, so every
        # invalidation sent before A's commit returned has been applied.
        tm_b.begin()
        assert conn_b.root()["x"] == i
    conn_a.close()
    conn_b.close()


def test_mvcc_snapshot_reads_old_revision(server, make_db):
    db_w = make_db(server)
    conn_w, tm_w = open_conn(db_w)
    root_w = conn_w.root()
    root_w["loaded"] = Item("old-loaded")
    root_w["ghost"] = Item("old-ghost")
    tm_w.commit()

    db_r = make_db(server, server_sync=True)
    conn_old, tm_old = open_conn(db_r)
    root_old = conn_old.root()
    loaded = root_old["loaded"]
    assert loaded.value == "old-loaded"
    ghost = root_old["ghost"]
    assert ghost._p_changed is None  # never loaded: a ghost

    root_w["loaded"].value = "new-loaded"
    root_w["ghost"].value = "new-ghost"
    tm_w.commit()

    # Make sure the reader's client has received the invalidations: a new
    # connection (server-sync) sees the new values ...
    conn_new, tm_new = open_conn(db_r)
    assert conn_new.root()["loaded"].value == "new-loaded"
    assert conn_new.root()["ghost"].value == "new-ghost"
    # ... while the connection whose snapshot predates the commit still reads
    # the old values; the ghost needs a loadBefore of the old revision.
    assert loaded.value == "old-loaded"
    assert ghost.value == "old-ghost"
    assert ghost._p_serial < conn_new.root()["ghost"]._p_serial
    # After a transaction boundary the old connection moves forward too.
    tm_old.begin()
    assert loaded.value == "new-loaded"
    assert ghost.value == "new-ghost"
    conn_new.close()
    conn_old.close()
    conn_w.close()


def test_conflicting_writes_raise_conflict_error(server, make_db):
    db_1, db_2 = make_db(server), make_db(server, server_sync=True)
    conn_1, tm_1 = open_conn(db_1)
    conn_1.root()["obj"] = Item("initial")
    tm_1.commit()

    conn_2, tm_2 = open_conn(db_2)
    obj_2 = conn_2.root()["obj"]
    assert obj_2.value == "initial"
    obj_1 = conn_1.root()["obj"]
    tm_1.begin()

    obj_1.value = "first"
    obj_2.value = "second"
    tm_1.commit()
    with pytest.raises(ConflictError) as excinfo:
        tm_2.commit()
    assert excinfo.value.oid == obj_1._p_oid
    tm_2.abort()

    # The first value persists, for everybody.
    tm_2.begin()
    assert obj_2.value == "first"
    fresh, _ = open_conn(make_db(server))
    assert fresh.root()["obj"].value == "first"
    # ... and the loser can retry successfully on the new state.
    obj_2.value = "second, retried"
    tm_2.commit()
    tm_1.begin()
    wait_until(lambda: (tm_1.begin(), obj_1.value)[1] == "second, retried", 10,
               message="client 1 to see the retried value")
    fresh.close()
    conn_1.close()
    conn_2.close()


def test_btree_conflict_resolved_by_clients(server, make_db):
    db_1, db_2 = make_db(server), make_db(server, server_sync=True)
    conn_1, tm_1 = open_conn(db_1)
    conn_1.root()["tree"] = OOBTree({"k0": 0, "k9": 9})  # one small bucket
    tm_1.commit()

    conn_2, tm_2 = open_conn(db_2)
    tree_2 = conn_2.root()["tree"]
    tree_1 = conn_1.root()["tree"]
    tm_1.begin()
    # Interleave: both read, both insert, both commit.
    assert len(tree_1) == 2 and len(tree_2) == 2
    tree_1["a"] = "from 1"
    tree_2["b"] = "from 2"
    tm_1.commit()
    tm_2.commit()  # conflicts on the server, resolved by client 2

    expected = {"k0": 0, "k9": 9, "a": "from 1", "b": "from 2"}
    fresh, _ = open_conn(make_db(server))
    assert dict(fresh.root()["tree"].items()) == expected
    tm_2.begin()
    assert dict(tree_2.items()) == expected  # resolved state reloaded
    wait_until(lambda: (tm_1.begin(), dict(tree_1.items()))[1] == expected, 10,
               message="client 1 to see the merged tree")
    fresh.close()
    conn_1.close()
    conn_2.close()


# With 20 writers on one bucket the stock server starves clients: it releases
# the commit lock after replying conflicts to `vote`, so while a client
# resolves, the other waiters commit and its next `vote` conflicts again.
# ZEO 6.2's ClientStorage.tpc_vote gives up after 9 rounds *without raising*
# and calls tpc_finish, which the stock server answers with
# AssertionError('finished called wo lock').  Measured on the stock server:
# ~20 of ~60 transactions hit the 9-round limit.  zeotemp must not starve
# clients like that (e.g. keep the commit lock while the client resolves).
SHARED_BUCKET_STOCK_BUG = (
    "clients starve in client-side conflict resolution (lock released "
    "between vote rounds; ZEO 6.2 client gives up after 9 rounds and "
    "tpc_finish fails with 'finished called wo lock')")


@pytest.mark.parametrize("layout", [
    "own-objects",
    pytest.param("shared-bucket", marks=pytest.mark.zeotemp_only(
        reason=SHARED_BUCKET_STOCK_BUG)),
])
def test_twenty_concurrent_clients(server, make_db, layout):
    """20 clients (threads, each with its own ClientStorage/DB) each do 20
    small commits to their own key of a shared OOBTree and load the others'.

    own-objects:   shared[key] is a per-client Item, the client sets
                   shared[key].value: no write conflicts by design.
    shared-bucket: the client sets shared[key] = value directly; all clients
                   write the same BTree bucket, so commits conflict and are
                   resolved by the clients (retried when unresolvable).
    """
    nclients, ncommits = 20, 20
    setup, tm = open_conn(make_db(server))
    setup.root()["shared"] = shared = OOBTree()
    for i in range(nclients):
        initial = (i, -1)
        shared[f"client{i:02d}"] = Item(initial) if layout == "own-objects" \
            else initial
    tm.commit()
    setup.close()

    def get(shared, key):
        value = shared[key]
        return value.value if layout == "own-objects" else value

    dbs = [make_db(server) for _ in range(nclients)]
    errors = []
    retries = [0] * nclients
    start = threading.Barrier(nclients, timeout=60)

    def client(idx):
        try:
            conn, tm = open_conn(dbs[idx])
            rnd = random.Random(idx)
            start.wait()
            key = f"client{idx:02d}"
            for n in range(ncommits):
                def work():
                    shared = conn.root()["shared"]
                    if layout == "own-objects":
                        shared[key].value = (idx, n)
                    else:
                        shared[key] = (idx, n)
                    # loads: another client's entry (whatever its revision)
                    other = rnd.randrange(nclients)
                    value = get(shared, f"client{other:02d}")
                    assert value[0] == other and -1 <= value[1] < ncommits
                retries[idx] += commit_with_retry(tm, work, attempts=40,
                                                  pause=0.01)
            conn.close()
        except Exception as e:
            errors.append((idx, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(nclients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    assert not errors, errors

    fresh, _ = open_conn(make_db(server))
    shared = fresh.root()["shared"]
    assert {k: get(shared, k) for k in shared.keys()} == {
        f"client{i:02d}": (i, ncommits - 1) for i in range(nclients)}
    fresh.close()


def _start_lock_holder(server):
    addr = server.address
    addr_arg = addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "zeotemp_workers.py"), "hold-lock", addr_arg],
        cwd=str(HERE), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, env=dict(os.environ, PYTHONPATH=str(HERE)))
    lines = []
    reader = threading.Thread(
        target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(30)
    if not lines or not lines[0].startswith(b"VOTED "):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(
            f"lock holder did not vote: {lines!r} {proc.stderr.read()!r}")
    return proc, p64(int(lines[0].split()[1]))


def _commit_in_thread(db, key, value):
    """Start committing root[key] = value in a thread; returns (thread, box)."""
    box = {}

    def run():
        conn, tm = open_conn(db)
        try:
            commit_with_retry(tm, lambda: conn.root().__setitem__(key, value))
            box["tid"] = conn.root()._p_serial
        except Exception as e:
            box["error"] = e
        finally:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_killed_client_does_not_block_commits(server, make_db, make_storage):
    db = make_db(server)
    conn, tm = open_conn(db)
    conn.root()["before"] = 1
    tm.commit()
    conn.close()

    holder, held_oid = _start_lock_holder(server)
    try:
        # While the holder is alive and voted, it owns the commit lock:
        # our commit waits.
        t, box = _commit_in_thread(db, "after", 2)
        t.join(1.0)
        assert t.is_alive(), f"commit did not wait for the commit lock: {box}"
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        # Once the server notices the dead client, the lock is released.
        t.join(15)
        assert not t.is_alive(), "commit still blocked 15 s after the kill"
        assert "error" not in box, box
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
        holder.stdout.close()
        holder.stderr.close()

    fresh = make_storage(server)
    with pytest.raises(POSKeyError):
        fresh.load(held_oid)  # the dead client's transaction was aborted
    conn2, _ = open_conn(make_db(server))
    assert dict(conn2.root()) == {"before": 1, "after": 2}
    conn2.close()


@pytest.mark.zeotemp_only(
    reason="ZEO 6.2 closes the timed-out connection itself and never calls "
           "notify_disconnected, so the commit lock stays held forever")
def test_transaction_timeout_releases_lock_of_stuck_client(server_factory,
                                                           make_db):
    srv = server_factory(transaction_timeout=2)
    # Generous bound on zeotemp; the stock server is known to hang here, so
    # don't waste time on it.
    bound = 30 if IS_ZEOTEMP else 6
    db = make_db(srv)
    holder, held_oid = _start_lock_holder(srv)
    try:
        # The holder stays alive but never finishes; the server must drop it
        # after the transaction timeout.
        t, box = _commit_in_thread(db, "k", "v")
        t.join(bound)
        assert not t.is_alive(), \
            f"commit still blocked {bound} s after the lock was taken"
        assert "error" not in box, box
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        holder.stdout.close()
        holder.stderr.close()
    conn2, _ = open_conn(make_db(srv))
    assert conn2.root()["k"] == "v"
    with pytest.raises(POSKeyError):
        db.storage.load(held_oid)
    conn2.close()
