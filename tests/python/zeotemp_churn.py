"""A Transience-like session churn model, shared by ``test_gc.py`` and
``bench/soak.py``.  Must stay importable without pytest (multiprocessing
'spawn' children import it).

The model follows Products.Transience's TransientObjectContainer:
``root['sessions']`` is a :class:`SessionContainer` whose ``_data`` is an
OOBTree mapping a timeslice (int) to a bucket (an OOBTree of session id ->
:class:`Session`), plus a ``BTrees.Length.Length`` counter.  ``touch``
creates or updates a session in the current timeslice's bucket, moving it
there from an older bucket if found; ``gc_old_buckets`` deletes whole
buckets older than the ``keep`` newest, which makes whole subtrees (bucket
tree nodes and the sessions only they reference) unreachable: the garbage
zeotemp's collector has to free.

Also here: :func:`reachable_oids` (walks the references of the current
records from the root, through a storage), :class:`ServerProcess` (starts
zeotemp or the stock runzeo for ``bench/soak.py``) and :func:`rss_kib`.
"""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import persistent
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree

from zeotemp_util import signal_group, stop_group

# -- the model -----------------------------------------------------------------


class Session(persistent.Persistent):
    """One session: a few hundred bytes of nested dicts/lists of str/int.
    No conflict resolution: two clients updating the same session at the
    same time conflict, and one of them retries (as Zope does)."""

    def __init__(self, sid, now):
        self.id = sid
        self.created = now
        self.accessed = now
        self.data = {}

    def __repr__(self):
        return f"<Session {self.id!r}>"


def session_payload(rnd, sid, visits, now):
    """A few hundred bytes (pickled) of typical session contents."""
    return {
        "user": f"user-{sid}",
        "visits": visits,
        "last": int(now),
        "prefs": {"lang": rnd.choice(("en", "de", "fr", "nl")),
                  "theme": rnd.choice(("light", "dark"))},
        "cart": [{"sku": f"sku-{rnd.randrange(10000):05d}",
                  "qty": rnd.randrange(1, 5),
                  "price": rnd.randrange(100, 100000)}
                 for _ in range(rnd.randrange(1, 5))],
        "history": [f"/folder-{rnd.randrange(100)}/page-{rnd.randrange(1000)}"
                    for _ in range(rnd.randrange(2, 6))],
    }


class SessionContainer(persistent.Persistent):
    """Like Transience's TransientObjectContainer: timeslice -> bucket."""

    def __init__(self, slice_seconds):
        self.slice_seconds = float(slice_seconds)
        self._data = OOBTree()
        self._length = Length()

    def timeslice(self, now=None):
        now = time.time() if now is None else now
        return int(now // self.slice_seconds)

    def __len__(self):
        return self._length()

    def touch(self, sid, rnd=None, now=None):
        """Create or update session ``sid`` in the current timeslice bucket,
        moving it from an older bucket if it is found there (newest older
        bucket first, as Transience does).  Returns 'created', 'moved' or
        'updated'."""
        rnd = rnd or random
        now = time.time() if now is None else now
        ts = self.timeslice(now)
        data = self._data
        current = data.get(ts)
        if current is None:
            current = data[ts] = OOBTree()
        what = "updated"
        session = current.get(sid)
        if session is None:
            for key in reversed(list(data.keys(None, ts, excludemax=True))):
                bucket = data[key]
                session = bucket.get(sid)
                if session is not None:
                    del bucket[sid]
                    current[sid] = session
                    what = "moved"
                    break
        if session is None:
            session = current[sid] = Session(sid, now)
            self._length.change(1)
            what = "created"
        visits = session.data.get("visits", 0) + 1
        session.accessed = now
        session.data = session_payload(rnd, sid, visits, now)
        return what

    def get(self, sid):
        """The session ``sid`` from any bucket, or None."""
        for key in reversed(list(self._data.keys())):
            session = self._data[key].get(sid)
            if session is not None:
                return session
        return None

    def gc_old_buckets(self, keep):
        """Delete the timeslice buckets older than the ``keep`` newest.
        Returns the number of buckets deleted."""
        keys = list(self._data.keys())
        old = keys[:-keep] if keep > 0 else keys
        for key in old:
            n = len(self._data[key])
            del self._data[key]
            if n:
                self._length.change(-n)
        return len(old)

    def bucket_keys(self):
        return list(self._data.keys())


def setup_container(conn, tm, slice_seconds, name="sessions"):
    """Create ``root[name]`` (a new SessionContainer) and commit."""
    tm.begin()
    root = conn.root()
    root[name] = SessionContainer(slice_seconds)
    tm.commit()
    return root[name]


# -- references ----------------------------------------------------------------


def reachable_oids(storage, root_oid=b"\0" * 8):
    """The set of oids reachable from the root through the references of the
    *current* records, loaded through ``storage`` (use a fresh ClientStorage
    so the loads reach the server).  A POSKeyError here means a reachable
    object is missing."""
    from ZODB.serialize import referencesf
    seen = {root_oid}
    todo = [root_oid]
    while todo:
        oid = todo.pop()
        data, _serial = storage.load(oid)
        for ref in referencesf(data):
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return seen


# -- the churn worker (run in child processes) ---------------------------------


def _address(addr):
    return tuple(addr) if isinstance(addr, list) else addr


DEFAULTS = dict(
    storage="1",
    name="sessions",      # root key of the container
    duration=8.0,         # seconds of churn
    keep=3,               # buckets kept by gc_old_buckets
    touches_per_txn=1,    # sessions touched per transaction (Zope: 1 per request)
    known=500,            # session ids a worker keeps revisiting
    new_fraction=0.3,     # chance a touch is a brand-new visitor
    shared_fraction=0.02,  # chance a touch hits a session shared by all workers
    shared_sessions=20,
    max_attempts=20,      # per transaction, then counted as an error
    pause=0.0,            # seconds between transactions
    seed=None,
    max_errors=50,        # stop early after this many errors
    wait_timeout=30,
)


def churn_worker(cfg):
    """Run the session churn against ``cfg['addr']`` for ``cfg['duration']``
    seconds with its own ClientStorage + DB.  Every transaction touches
    ``touches_per_txn`` sessions; once per new timeslice the worker also runs
    ``gc_old_buckets(keep)`` in its own transaction.  Conflicts
    (ConflictError, ReadConflictError) and ClientDisconnected are retried up
    to ``max_attempts`` times; a transaction still failing then, or any other
    exception (POSKeyError!), counts as an error (first few kept as text).

    Returns a dict: worker, commits (transactions that wrote something and
    committed), conflicts (retried), errors, error_samples, created, moved,
    updated, buckets_deleted, transactions (units of work attempted),
    seconds."""
    import transaction
    import ZEO.ClientStorage
    import ZODB
    from ZEO.Exceptions import ClientDisconnected
    from ZODB.POSException import ConflictError

    cfg = dict(DEFAULTS, **cfg)
    worker = cfg["worker"]
    rnd = random.Random(cfg["seed"] if cfg["seed"] is not None else
                        (worker, os.getpid(), time.time()).__hash__())
    counts = dict(worker=worker, commits=0, conflicts=0, errors=0,
                  error_samples=[], created=0, moved=0, updated=0,
                  buckets_deleted=0, transactions=0, seconds=0.0)
    transient = (ConflictError, ClientDisconnected)

    storage = ZEO.ClientStorage.ClientStorage(
        _address(cfg["addr"]), storage=cfg["storage"],
        wait_timeout=cfg["wait_timeout"])
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)

    next_sid = session_id_picker(rnd, cfg, f"w{worker}-",
                                 deque(maxlen=max(1, cfg["known"])), 0)

    def run(work):
        """One unit of work in its own transaction, retried on conflicts.
        ``work()`` returns (result, wrote); a transaction that wrote nothing
        is not counted as a commit (ZODB does not send it to the server)."""
        counts["transactions"] += 1
        for attempt in range(cfg["max_attempts"]):
            try:
                tm.begin()
                result, wrote = work()
                tm.commit()
                if wrote:
                    counts["commits"] += 1
                return result
            except transient as e:
                _abort(tm)
                if attempt == cfg["max_attempts"] - 1:
                    _error(counts, f"gave up after {attempt + 1} attempts: {e!r}")
                    return None
                counts["conflicts"] += 1
                time.sleep(rnd.uniform(0, 0.01 * min(attempt + 1, 10)))
            except Exception as e:
                _abort(tm)
                _error(counts, repr(e))
                return None

    start = time.monotonic()
    deadline = start + float(cfg["duration"])
    last_slice = None
    try:
        while time.monotonic() < deadline and counts["errors"] < cfg["max_errors"]:
            sids = [next_sid() for _ in range(cfg["touches_per_txn"])]

            def touch_all():
                container = conn.root()[cfg["name"]]
                return [container.touch(sid, rnd) for sid in sids], True

            done = run(touch_all)
            for what in done or ():
                counts[what] += 1
            ts = int(time.time() // cfg["slice_seconds"])
            if ts != last_slice:
                last_slice = ts

                def gc_buckets():
                    n = conn.root()[cfg["name"]].gc_old_buckets(cfg["keep"])
                    return n, n > 0
                deleted = run(gc_buckets)
                counts["buckets_deleted"] += deleted or 0
            if cfg["pause"]:
                time.sleep(cfg["pause"])
    except KeyboardInterrupt:
        pass
    finally:
        counts["seconds"] = round(time.monotonic() - start, 3)
        _close(tm, conn, db)
    return counts


def _abort(tm):
    try:
        tm.abort()
    except Exception:
        pass


def _close(tm, conn, db):
    """A worker's end: abort its transaction, close its connection and its
    DB, ignoring errors (the server may be gone)."""
    _abort(tm)
    try:
        conn.close()
        db.close()
    except Exception:
        pass


def _error(counts, text):
    counts["errors"] += 1
    if len(counts["error_samples"]) < 5:
        counts["error_samples"].append(text)


def sum_counts(results):
    """Totals of the integer counts of several workers' results."""
    total = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, int) and k != "worker":
                total[k] = total.get(k, 0) + v
    return total


# -- server processes (for bench/soak.py) ---------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TCP_READY = re.compile(r"listening on tcp (\S+):(\d+)")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """zeotemp (``--address 127.0.0.1:0``; the port is read from its
    ``listening on tcp HOST:PORT`` log line) or the stock ``ZEO.runzeo`` with
    a MappingStorage (one per storage name: ``storage`` and
    ``extra_storages``) and client-conflict-resolution.  Runs in its own
    process group; ``stop()`` sends SIGTERM, then SIGKILL after
    ``stop_timeout`` seconds."""

    def __init__(self, backend, workdir, zeotemp_bin=None, zeotemp_args=(),
                 storage="1", python=sys.executable, extra_storages=()):
        self.backend = backend
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zeotemp_bin = zeotemp_bin
        self.zeotemp_args = [str(a) for a in zeotemp_args]
        self.storage = storage
        self.extra_storages = [str(s) for s in extra_storages]
        self.python = python
        self.log_path = self.workdir / "server.log"
        self.proc = None
        self.address = None
        self.cmd = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=30.0):
        if self.backend == "zeotemp":
            self.cmd = [str(self.zeotemp_bin), "--address", "127.0.0.1:0",
                        "--storage", self.storage]
            for name in self.extra_storages:
                self.cmd += ["--storage", name]
            self.cmd += self.zeotemp_args
        else:
            port = free_port()
            self.address = ("127.0.0.1", port)
            conf = self.workdir / "zeo.conf"
            conf.write_text(
                "<zeo>\n"
                f"  address 127.0.0.1:{port}\n"
                "  client-conflict-resolution true\n"
                "</zeo>\n"
                + "".join(f"<mappingstorage {name}>\n</mappingstorage>\n"
                          for name in [self.storage] + self.extra_storages))
            self.cmd = [self.python, "-m", "ZEO.runzeo", "-C", str(conf)]
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=str(self.workdir), env=env,
            start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {self.proc.returncode}:\n"
                    + self.log_tail())
            if self.backend == "zeotemp":
                m = _TCP_READY.search(
                    _ANSI.sub("", self.log_path.read_text(errors="replace")))
                if m:
                    self.address = (m.group(1), int(m.group(2)))
                    return
            else:
                try:
                    socket.create_connection(self.address, 1).close()
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout}s:\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def log_tail(self, lines=30):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [l for l in _ANSI.sub("", text).splitlines()
                if l.strip() and l.strip("-")]   # runzeo's '------' lines
        return "\n".join(kept[-lines:])

    def stop(self, stop_timeout=10.0):
        if self.proc is None:
            return
        stop_group(self.proc, stop_timeout, stop_timeout)
        signal_group(self.proc, signal.SIGKILL)  # leftovers of its process group
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

def session_id_picker(rnd, cfg, prefix, known, last_serial):
    """The churn's next session id, as a visitor mix: a shared session, a
    new one (``prefix`` + a counter after ``last_serial``, remembered in
    ``known``), or one of ``known`` again."""
    serial = [last_serial]

    def next_sid():
        r = rnd.random()
        if r < cfg["shared_fraction"]:
            return f"shared-{rnd.randrange(cfg['shared_sessions'])}"
        if r < cfg["shared_fraction"] + cfg["new_fraction"] or not known:
            serial[0] += 1
            sid = f"{prefix}{serial[0]}"
            known.append(sid)
            return sid
        return rnd.choice(known)

    return next_sid


def rss_kib(pid):
    """VmRSS of ``pid`` in KiB (from /proc/PID/status), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
