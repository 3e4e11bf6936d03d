#!/usr/bin/env python3
"""One real ZEO client process running a Zope-session-like request mix, for
``bench/compare.py --real-client``.

    python bench/session_client.py --setup --address HOST:PORT
        [--sessions 2000] [--hot 10]
    python bench/session_client.py --address HOST:PORT --worker I --clients N
        --duration SECS --sync-dir DIR [--reads 5] [--write-fraction 0.5]
        [--hot-fraction 0.05] [--counter-fraction 0.2] [--max-attempts 10]
        [--server-sync]

Runs under a Python with the stock client (ZEO 6.2 / ZODB 6.4 / BTrees /
persistent / transaction; ``target/pyvenv``).  Only classes of those packages
are stored, so any such Python can load what another one wrote.

The data (``--setup``, once per server, before any worker starts):
``root['sessions']`` is an OOBTree of session id -> PersistentMapping (a few
hundred bytes: user, visits, last access, a small cart and page history):
``--sessions`` ordinary sessions ``s00000``... plus ``--hot`` shared ones
``hot-0``...; ``root['hits']`` is a ``BTrees.Length.Length`` counter.

The mix, one transaction per request (this process's own ClientStorage +
DB + connection, like one Zope instance with one worker thread):

* every request **reads** ``--reads`` random sessions (any worker's): a few
  items of each, loading them from the server when not cached or after
  another worker changed them;
* ``--write-fraction`` of the requests also **write**: they touch their
  visitor's session (a random one of the sessions owned by this worker:
  ``s{k}`` with k % clients == worker, so workers rarely collide on them):
  rewrite visits, last access, cart and history.  ``--hot-fraction`` of the
  writes touch one of the ``--hot`` shared sessions instead (PersistentMapping
  has no conflict resolution: concurrent writers get a ConflictError, abort
  and retry the whole request, as Zope does), and ``--counter-fraction`` of
  the writes also bump the shared ``Length`` counter (its write conflicts are
  resolved on the client: ``client-conflict-resolution``).

ConflictError / ReadConflictError are retried up to ``--max-attempts`` times
(each retry counted in ``conflicts``) with a short random back-off; a request
still failing then, or any other exception, is an **error** (the first few
are kept as text).  After ``--max-errors`` errors the worker stops early.

Start barrier: each worker connects, loads the tree's root, creates
``DIR/ready-I`` and waits (at most ``--start-timeout`` s) for ``DIR/start``,
which holds the wall-clock time (``time.time()``) at which all workers start.
It then runs requests until start + ``--duration`` (a request started before
then is finished and counted) and prints one JSON line:

    {"worker": I, "requests": ..., "commits": ..., "read_only": ...,
     "conflicts": ..., "errors": ..., "error_samples": [...],
     "elapsed_s": ..., "client_cpu_s": ..., "late_s": ...}

``requests`` counts all requests (transactions) completed, ``commits`` those
that wrote (and so reached the server's commit path), ``read_only`` those
that did not (with the default ``server_sync`` off they cost the server only
the loads of objects not in the client's caches).  Exit status 0 when the
worker ran (errors are in the JSON), 2 on bad usage, 3 when the start signal
never came.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path


def parse_address(s):
    host, port = s.rsplit(":", 1)
    return (host, int(port))


def session_data(rnd, sid, visits, now):
    """A few hundred bytes (pickled) of typical session contents."""
    return {
        "user": f"user-{sid}",
        "visits": visits,
        "last": round(now, 3),
        "cart": [(f"sku-{rnd.randrange(10000):05d}", rnd.randrange(1, 5))
                 for _ in range(rnd.randrange(1, 4))],
        "history": [f"/folder-{rnd.randrange(100)}/page-{rnd.randrange(1000)}"
                    for _ in range(rnd.randrange(2, 6))],
    }


def open_db(args):
    import ZEO.ClientStorage
    import ZODB
    storage = ZEO.ClientStorage.ClientStorage(
        parse_address(args.address), storage=args.storage, wait=True,
        wait_timeout=30, server_sync=args.server_sync)
    return ZODB.DB(storage)


def setup(args):
    """Create root['sessions'] and root['hits'] (replacing any old ones)."""
    import transaction
    from BTrees.Length import Length
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    t0 = time.monotonic()
    rnd = random.Random(0)
    now = time.time()
    db = open_db(args)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        tm.begin()
        root = conn.root()
        tree = root["sessions"] = OOBTree()
        root["hits"] = Length()
        tm.commit()
        sids = [f"s{k:05d}" for k in range(args.sessions)] + \
               [f"hot-{k}" for k in range(args.hot)]
        for i in range(0, len(sids), 500):      # batches of 500 sessions
            tm.begin()
            for sid in sids[i:i + 500]:
                tree[sid] = PersistentMapping(session_data(rnd, sid, 0, now))
            tm.commit()
        conn.close()
    finally:
        db.close()
    print(json.dumps({"setup": True, "sessions": args.sessions,
                      "hot": args.hot,
                      "setup_s": round(time.monotonic() - t0, 3)}), flush=True)
    return 0


def wait_for_start(args):
    """Announce readiness, then wait for DIR/start; returns the start time."""
    sync = Path(args.sync_dir)
    (sync / f"ready-{args.worker}").touch()
    deadline = time.monotonic() + args.start_timeout
    start = sync / "start"
    while time.monotonic() < deadline:
        try:
            text = start.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return float(text)
        time.sleep(0.01)
    return None


def work(args):
    import transaction
    from ZODB.POSException import ConflictError

    rnd = random.Random(args.seed if args.seed is not None
                        else hash((args.worker, os.getpid(), time.time())))
    counts = {"worker": args.worker, "requests": 0, "commits": 0,
              "read_only": 0, "conflicts": 0, "errors": 0,
              "error_samples": [], "elapsed_s": 0.0, "client_cpu_s": 0.0,
              "late_s": 0.0}
    all_sids = [f"s{k:05d}" for k in range(args.sessions)]
    own = all_sids[args.worker::args.clients] or all_sids
    hot = [f"hot-{k}" for k in range(args.hot)] or own

    def error(text):
        counts["errors"] += 1
        if len(counts["error_samples"]) < 5:
            counts["error_samples"].append(text)

    db = open_db(args)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        tm.begin()
        conn.root()["sessions"]._p_activate()   # connected, root loaded
        tm.abort()

        start_at = wait_for_start(args)
        if start_at is None:
            print(json.dumps({"worker": args.worker,
                              "fatal": "no start signal"}), flush=True)
            return 3
        delay = start_at - time.time()
        if delay > 0:
            time.sleep(delay)
        counts["late_s"] = round(max(0.0, -delay), 3)
        t0, cpu0 = time.monotonic(), time.process_time()
        deadline = t0 + args.duration - max(0.0, -delay)

        def request(reads, target, counter):
            """One request; returns True when it wrote something."""
            root = conn.root()
            tree = root["sessions"]
            for sid in reads:
                s = tree.get(sid)
                if s is not None:
                    s.get("user"), s.get("visits"), len(s.get("cart", ()))
            if target is None:
                return False
            s = tree[target]
            now = time.time()
            s.update(session_data(rnd, target, s.get("visits", 0) + 1, now))
            if counter:
                root["hits"].change(1)
            return True

        while time.monotonic() < deadline and counts["errors"] < args.max_errors:
            reads = [rnd.choice(all_sids) for _ in range(args.reads)]
            target = counter = None
            if rnd.random() < args.write_fraction:
                target = (rnd.choice(hot) if rnd.random() < args.hot_fraction
                          else rnd.choice(own))
                counter = rnd.random() < args.counter_fraction
            for attempt in range(args.max_attempts):
                try:
                    tm.begin()
                    wrote = request(reads, target, counter)
                    tm.commit()
                except ConflictError as e:     # also ReadConflictError
                    abort(tm)
                    if attempt == args.max_attempts - 1:
                        error(f"gave up after {attempt + 1} attempts: {e!r}")
                        break
                    counts["conflicts"] += 1
                    time.sleep(rnd.uniform(0, 0.005 * (attempt + 1)))
                except Exception as e:
                    abort(tm)
                    error(repr(e))
                    break
                else:
                    counts["requests"] += 1
                    counts["commits" if wrote else "read_only"] += 1
                    break
        counts["elapsed_s"] = round(time.monotonic() - t0, 3)
        counts["client_cpu_s"] = round(time.process_time() - cpu0, 3)
        # Report before closing: the parent reads the server's CPU time as
        # soon as every worker has reported.
        print(json.dumps(counts), flush=True)
        abort(tm)
        conn.close()
    finally:
        db.close()
    return 0


def abort(tm):
    try:
        tm.abort()
    except Exception:
        pass


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="HOST:PORT of the server")
    p.add_argument("--storage", default="1")
    p.add_argument("--setup", action="store_true",
                   help="create the session tree and counter, then exit")
    p.add_argument("--sessions", type=int, default=2000,
                   help="ordinary sessions (default 2000)")
    p.add_argument("--hot", type=int, default=10,
                   help="sessions shared by all workers (default 10)")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--clients", type=int, default=1,
                   help="number of workers (to split the sessions)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--sync-dir", help="directory for the start barrier")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--reads", type=int, default=5,
                   help="sessions read per request (default 5)")
    p.add_argument("--write-fraction", type=float, default=0.5,
                   help="share of requests that write (default 0.5)")
    p.add_argument("--hot-fraction", type=float, default=0.05,
                   help="share of writes to a hot shared session (default 0.05)")
    p.add_argument("--counter-fraction", type=float, default=0.2,
                   help="share of writes that also bump the shared Length "
                        "counter (default 0.2)")
    p.add_argument("--max-attempts", type=int, default=10)
    p.add_argument("--max-errors", type=int, default=50)
    p.add_argument("--server-sync", action="store_true",
                   help="ClientStorage(server_sync=True): every transaction "
                        "begin makes a server round trip")
    p.add_argument("--seed", type=int)
    a = p.parse_args(argv)
    if not a.setup:
        if a.sync_dir is None:
            p.error("--sync-dir is required for a worker")
        if not 0 <= a.worker < a.clients:
            p.error("--worker must be in 0 .. --clients - 1")
    if a.sessions < 1 or a.max_attempts < 1:
        p.error("--sessions and --max-attempts must be positive")
    return a


def main(argv=None):
    args = parse_args(argv)
    # WARNING and above (e.g. transaction's "A storage error occurred ...")
    # go to stderr, which the parent keeps in a file.
    import logging
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return setup(args) if args.setup else work(args)


if __name__ == "__main__":
    sys.exit(main())
