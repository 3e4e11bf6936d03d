"""Faults seen from stock ZEO clients: the server stopped (SIGTERM) in the
middle of heavy commit traffic.

What must hold (issue "hostile input, faults and load"): the server shuts
down cleanly (exit status 0, a summary line), every commit a client got an
acknowledgement for (``tpc_finish`` returned its tid) was applied, and no
half-applied transaction was ever visible.  A temporary storage's data is
gone once the process exits, so "applied" is checked through what another
client connected all along saw: the invalidations it received (in commit
order, each transaction whole) and the records it loaded at those tids.

The other faults of the issue have their tests elsewhere: a client killed
between ``vote`` and ``tpc_finish`` (test_concurrency.py,
``test_killed_client_does_not_block_commits``; tests/server_wire.rs for the raw
protocol), a client that stops reading (tests/server_wire.rs, test_bad_clients.py),
a panic inside one connection (tests/server_wire.rs,
``a_panic_in_one_connection_is_contained``).
"""

import re
import signal
import threading
import time

from ZEO.Exceptions import ClientDisconnected
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, u64

import pytest

from zeotemp_testobjects import Item
from zeotemp_util import make_record, signal_group

WRITERS = 6
TRAFFIC_SECONDS = 2.5
EXIT_BOUND = 20.0   # seconds for the server to exit after SIGTERM (a hang check)


class InvalidationRecorder:
    """Stands in for a ZODB.DB behind a ClientStorage: records every
    invalidation the server pushes, in arrival order."""

    def __init__(self):
        self.seen = []          # [(tid as int, frozenset of oids)]
        self.cache_dropped = 0
        self.lock = threading.Lock()

    def invalidate(self, tid, oids):
        with self.lock:
            self.seen.append((u64(tid), frozenset(oids)))

    def invalidateCache(self):
        self.cache_dropped += 1

    def transform_record_data(self, data):
        return data

    def untransform_record_data(self, data):
        return data


def writer(cs, wid, acked, errors, stop):
    """Commits a pair of objects with the same generation, over and over,
    through a raw ClientStorage; records (tid, oids, generation) for each
    acknowledged commit."""
    a, b = cs.new_oid(), cs.new_oid()
    serials = {a: p64(0), b: p64(0)}
    gen = 0
    while not stop.is_set():
        gen += 1
        data = make_record(Item, {"value": (wid, gen)})
        txn = TransactionMetaData(description=f"writer {wid} gen {gen}")
        try:
            cs.tpc_begin(txn)
            for oid in (a, b):
                cs.store(oid, serials[oid], data, "", txn)
            cs.tpc_vote(txn)
            tid = cs.tpc_finish(txn)
        except (ClientDisconnected, ConnectionError, OSError):
            # The server is going away: this one is not acknowledged.
            try:
                cs.tpc_abort(txn)
            except Exception:
                pass
            return
        except Exception as e:  # anything else is a failure of the test
            errors.append(f"writer {wid} gen {gen}: {e!r}")
            try:
                cs.tpc_abort(txn)
            except Exception:
                pass
            return
        serials[a] = serials[b] = tid
        acked.append((u64(tid), frozenset((a, b)), data))


@pytest.mark.zeotemp_only(
    reason="checks zeotemp's shutdown summary line; the stock runzeo exits "
    "on SIGTERM without one")
def test_sigterm_during_heavy_commits_keeps_every_acknowledged_commit(
        server_factory, make_storage):
    srv = server_factory()
    observer = make_storage(srv)
    rec = InvalidationRecorder()
    observer.registerDB(rec)
    # A reader that loads both objects of a writer at the tids it was told
    # about: the two records of one transaction are always the same
    # generation (no half-applied transaction is visible).
    half_applied = []

    # A short wait_timeout: once the server is gone, a writer's next call
    # gives up after it (ClientDisconnected) instead of the fixture's 30 s.
    writers = [make_storage(srv, wait_timeout=2) for _ in range(WRITERS)]
    acked = [[] for _ in range(WRITERS)]
    errors = []
    stop = threading.Event()
    threads = [threading.Thread(target=writer,
                                args=(cs, i, acked[i], errors, stop),
                                daemon=True)
               for i, cs in enumerate(writers)]
    for t in threads:
        t.start()

    checked = 0
    deadline = time.monotonic() + TRAFFIC_SECONDS
    while time.monotonic() < deadline:
        with rec.lock:
            recent = rec.seen[-20:]
        for tid, oids in recent:
            first, second = sorted(oids)
            try:
                one = observer.loadBefore(first, p64(tid + 1))
                two = observer.loadBefore(second, p64(tid + 1))
            except ClientDisconnected:
                break
            if one is None or two is None or one[0] != two[0] \
                    or one[1] != two[1]:
                half_applied.append((tid, one, two))
            checked += 1
        time.sleep(0.01)

    signal_group(srv.proc, signal.SIGTERM)
    t0 = time.monotonic()
    exit_status = srv.proc.wait(EXIT_BOUND)
    exit_seconds = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    log = srv.log_text()

    all_acked = sorted(x for per in acked for x in per)
    seen = list(rec.seen)
    print(f"acknowledged commits: {len(all_acked)}, invalidations seen by "
          f"the observer: {len(seen)}, pairs checked: {checked}, exit "
          f"{exit_status} after {exit_seconds:.2f} s")

    assert exit_status == 0, log[-3000:]
    assert "shutting down" in log and re.search(
        r"zeotemp stopped after \d+h\d\dm\d\ds: \d+ connections? served, "
        r"(\d+) commits on 1 storage; all data held in memory is gone",
        log), log[-3000:]
    assert not errors, errors
    assert not half_applied, half_applied[:5]
    assert checked > 0, "the reader checked nothing"
    assert len(all_acked) >= 100, \
        f"not heavy traffic: only {len(all_acked)} commits acknowledged"

    # Invalidations arrive in commit order, each transaction whole.
    tids = [tid for tid, _ in seen]
    assert tids == sorted(set(tids)), "invalidations out of order or repeated"
    seen_by_tid = dict(seen)
    # Every acknowledged commit was applied: the observer, connected until
    # the server closed its connection, was told about it with exactly the
    # objects that commit wrote ...
    unseen = [(tid, oids) for tid, oids, _ in all_acked
              if seen_by_tid.get(tid) != oids]
    assert not unseen, (
        f"{len(unseen)} of {len(all_acked)} acknowledged commits were never "
        f"announced to the observer, e.g. {unseen[:3]}; last tid it saw "
        f"{max(tids) if tids else None}")
    # ... and the shutdown summary counts at least as many commits.
    commits = [int(part.split("=", 1)[1])
               for line in log.splitlines() if "commits=" in line
               for part in line.split() if part.startswith("commits=")]
    assert commits and commits[-1] >= len(all_acked), (commits, log[-2000:])
