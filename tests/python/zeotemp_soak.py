"""The ledgered session churn of ``bench/soak.py`` (and its CI smoke test
``test_soak_smoke.py``): worker, ledger and verifier.  Must stay importable
without pytest (multiprocessing 'spawn' children import it).

Each worker process owns a *slot* ``w`` (0 .. clients-1) and runs the
Transience-like churn of :mod:`zeotemp_churn` through its own stock
``ClientStorage`` + ``DB``, plus writes to objects only it writes:
``root['owned'][str(w)]``, an OOBTree of ``k<n>`` -> :class:`LedgerItem`
(created, rewritten, deleted).  A worker killed with SIGKILL is replaced by
a new process on the same slot, which reads the slot's ledger to resume
(its session ids, its sequence numbers) and goes on.

The **ledger** (one JSON-lines file per slot, appended and flushed record by
record, so it survives a SIGKILL) says what must be in the database:

* ``{"t": "i", "q": SEQ, "ops": [...]}`` -- *intent*, written just before
  ``transaction.commit()``: the values this transaction writes.  An op is
  ``{"k": KEY, "v": DIGEST}`` (an owned key set to a value whose digest is
  DIGEST) or ``{"k": KEY, "v": null}`` (the key deleted), or
  ``{"s": SID, "ts": SLICE, "v": DIGEST}`` (one of this worker's own
  sessions written into timeslice bucket SLICE);
* ``{"t": "c", "q": SEQ}`` -- written after ``commit()`` returned: the
  intent is committed and must stay true until a later commit of the same
  key replaces it;
* ``{"t": "a", "q": SEQ|null}`` -- a conflict (ConflictError,
  ReadConflictError: never committed), retried;
* ``{"t": "vk", "q": SEQ}`` -- this worker killed itself (SIGKILL) between
  its storage's vote and ``tpc_finish``: the transaction must *not* be
  committed;
* ``{"t": "f", "q": SEQ|null}`` -- the vote failed at the server's
  ``memory-limit`` (the clear error it promises: never committed), not
  retried;
* ``{"t": "d", "q": SEQ}`` -- commit failed with something other than a
  conflict (may or may not have committed: *in doubt*);
* ``{"t": "e", "m": TEXT}`` -- an error; ``{"t": "g", "n": N}`` -- a
  bucket-expiry transaction committed; ``{"t": "start", ...}`` /
  ``{"t": "end", ...}`` -- a worker process began / finished normally;
  ``{"t": "rc", ...}`` -- a replacement worker checked the ledger so far
  against the database before resuming (:func:`resume_check`; the counts
  of :func:`verify`).

An intent followed by neither a commit nor an abort (the worker was killed
during ``commit()``, or right after it before writing the commit record)
is *in doubt*: the database may hold either the intended values or the
previous committed ones.  The verifier accepts exactly those, nothing else.

Sessions expire legitimately: any worker's bucket expiry deletes whole
timeslice buckets.  A session whose last written bucket no longer exists at
the end is counted as *expired*, not checked; one whose bucket still exists
must be in it with the recorded value.
"""

import hashlib
import json
import os
import random
import signal
import time
from collections import deque
from pathlib import Path

import persistent

import zeotemp_churn
from zeotemp_churn import _abort, _close

OWNED = "owned"          # root key of the per-slot trees
ABSENT = None


class LedgerItem(persistent.Persistent):
    """A value only one worker writes (``value`` is a small dict)."""

    def __init__(self, value):
        self.value = value


def digest(value):
    """A short digest of a JSON-able value (dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# -- ledger file -----------------------------------------------------------------


def ledger_path(directory, slot):
    return Path(directory) / f"ledger-{slot}.jsonl"


class LedgerWriter:
    """Append-only JSON lines, flushed after every record (the OS keeps
    the bytes when the process is SIGKILLed; no fsync: the machine does
    not crash in this test)."""

    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8")
        # A predecessor killed in the middle of a write left a torn last
        # line: end it, so our first record is not glued to it.
        if self.f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self.f.write("\n")

    def write(self, **rec):
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.f.flush()

    def close(self):
        try:
            self.f.close()
        except Exception:
            pass


def read_records(path):
    """The ledger's records.  A line that is not JSON (a worker killed in
    the middle of writing it: a torn intent means the commit never started,
    a torn commit record leaves its intent in doubt, both safe) becomes a
    record of type ``"torn"``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"t": "torn", "line": i + 1})
    return out


class KeyState:
    """What a ledger says about one key."""
    __slots__ = ("has_committed", "committed", "doubt")

    def __init__(self):
        self.has_committed = False
        self.committed = None     # DIGEST, None (deleted), or [ts, DIGEST]
        self.doubt = []           # values of in-doubt intents after it


class LedgerReplay:
    """Replays one slot's ledger: the expected final state of every key it
    wrote, and counts (commits, conflicts, kills, errors...)."""

    def __init__(self, slot):
        self.slot = slot
        self.keys = {}            # ("k", KEY) or ("s", SID) -> KeyState
        self.pending = {}         # seq -> ops (intent not yet resolved)
        self.max_seq = -1
        self.max_serial = 0       # highest n of an own session id w<slot>-<n>
        self.recent_sids = deque(maxlen=5000)
        self.c = dict(records=0, intents=0, commits=0, gc_commits=0,
                      conflicts=0, memory_refusals=0, vote_kills=0,
                      in_doubt=0, starts=0,
                      ends=0, errors=0, torn_lines=0, resume_checks=0,
                      resume_checked=0, resume_problems=0,
                      resume_in_doubt_committed=0,
                      resume_in_doubt_not_committed=0)
        self.error_samples = []

    def _key(self, op):
        if "s" in op:
            return ("s", op["s"]), [op["ts"], op["v"]]
        return ("k", op["k"]), op["v"]

    def _doubt(self, seq):
        ops = self.pending.pop(seq, None)
        if ops is None:
            return
        self.c["in_doubt"] += 1
        for op in ops:
            key, value = self._key(op)
            self.keys.setdefault(key, KeyState()).doubt.append(value)

    def _end_generation(self):
        for seq in list(self.pending):
            self._doubt(seq)

    def apply(self, rec):
        t = rec.get("t")
        self.c["records"] += 1
        q = rec.get("q")
        if isinstance(q, int):
            self.max_seq = max(self.max_seq, q)
        if t == "i":
            self.c["intents"] += 1
            self.pending[q] = rec["ops"]
            for op in rec["ops"]:
                sid = op.get("s")
                if sid is not None:
                    self.recent_sids.append(sid)
                    prefix = f"w{self.slot}-"
                    if sid.startswith(prefix) and sid[len(prefix):].isdigit():
                        self.max_serial = max(self.max_serial,
                                              int(sid[len(prefix):]))
        elif t == "c":
            self.c["commits"] += 1
            for op in self.pending.pop(q, ()):
                key, value = self._key(op)
                st = self.keys.setdefault(key, KeyState())
                st.has_committed, st.committed, st.doubt = True, value, []
        elif t == "a":
            self.c["conflicts"] += 1
            self.pending.pop(q, None)
        elif t == "f":
            self.c["memory_refusals"] += 1
            self.pending.pop(q, None)     # a failed vote commits nothing
        elif t == "vk":
            self.c["vote_kills"] += 1
            self.pending.pop(q, None)     # must not have committed
        elif t == "d":
            self._doubt(q)
        elif t == "g":
            self.c["gc_commits"] += 1
        elif t == "e":
            self.c["errors"] += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(rec.get("m", "?"))
        elif t == "rc":
            self.c["resume_checks"] += 1
            self.c["resume_checked"] += rec.get("checked", 0)
            self.c["resume_in_doubt_committed"] += rec.get("ok_in_doubt", 0)
            self.c["resume_in_doubt_not_committed"] += rec.get(
                "not_committed_in_doubt", 0)
            self.c["resume_problems"] += (rec.get("missing", 0)
                                          + rec.get("wrong", 0)
                                          + rec.get("unreadable", 0))
        elif t == "start":
            self._end_generation()        # the previous worker was killed
            self.c["starts"] += 1
        elif t == "end":
            self._end_generation()
            self.c["ends"] += 1
        elif t == "torn":
            self.c["torn_lines"] += 1

    def finish(self):
        self._end_generation()
        return self


def replay(path, slot):
    r = LedgerReplay(slot)
    for rec in read_records(path):
        r.apply(rec)
    return r.finish()


# -- verifier --------------------------------------------------------------------


def _find_session(buckets, sid):
    """(ts, digest of data) of ``sid`` in the final buckets, or None."""
    for ts in sorted(buckets, reverse=True):
        s = buckets[ts].get(sid)
        if s is not None:
            return [ts, digest(s.data)]
    return None


def verify(root, replays, samples=10):
    """Checks every key of every ``LedgerReplay`` against ``root`` (a ZODB
    root loaded *after* all writers stopped).  Returns a dict of counts:
    checked (entries compared with the database), ok (equal to the last
    committed value), ok_in_doubt (equal to the value of an in-doubt
    intent: committed although the worker died before recording it),
    not_committed_in_doubt (the previous value, an in-doubt intent did not
    commit), expired (sessions whose bucket was legitimately deleted; not
    checked), missing (absent although recorded), wrong (another value),
    unreadable (an exception loading it, e.g. POSKeyError), and
    ``problems``: the first few mismatches as text."""
    res = dict(checked=0, ok=0, ok_in_doubt=0, not_committed_in_doubt=0,
               expired=0, missing=0, wrong=0, unreadable=0, problems=[])

    def problem(kind, text):
        res[kind] += 1
        if len(res["problems"]) < samples:
            res["problems"].append(f"{kind}: {text}")

    owned = root.get(OWNED)
    container = root.get("sessions")
    try:
        buckets = ({ts: container._data[ts] for ts in container._data.keys()}
                   if container is not None else {})
    except Exception as e:
        buckets = {}
        problem("unreadable", f"session container: {e!r}")
    for rep in replays:
        tree = None
        if owned is not None:
            tree = owned.get(str(rep.slot))
        for key, st in sorted(rep.keys.items()):
            kind, name = key
            cands = ([st.committed] if st.has_committed else []) + st.doubt
            try:
                if kind == "k":
                    item = tree.get(name) if tree is not None else None
                    actual = ABSENT if item is None else digest(item.value)
                    absent_ok = not st.has_committed
                else:
                    actual = _find_session(buckets, name)
                    expired = any(c[0] not in buckets for c in cands)
                    if actual is None and expired:
                        res["expired"] += 1
                        continue
                    absent_ok = not st.has_committed
            except Exception as e:
                res["checked"] += 1
                problem("unreadable", f"slot {rep.slot} {kind}:{name}: {e!r}")
                continue
            res["checked"] += 1
            if st.has_committed and actual == st.committed:
                res["ok"] += 1 if not st.doubt else 0
                res["not_committed_in_doubt"] += 1 if st.doubt else 0
            elif actual in st.doubt:
                res["ok_in_doubt"] += 1
            elif actual is ABSENT and absent_ok:
                res["not_committed_in_doubt"] += 1
            elif actual is ABSENT:
                problem("missing", f"slot {rep.slot} {kind}:{name}: "
                        f"expected {st.committed}, absent")
            else:
                problem("wrong", f"slot {rep.slot} {kind}:{name}: expected "
                        f"{cands or 'absent'}, found {actual}")
    return res


# -- worker (run in child processes) ----------------------------------------------


def setup(conn, tm, slots, slice_seconds):
    """Creates ``root['sessions']`` and ``root['owned']`` (one empty OOBTree
    per slot) and commits."""
    from BTrees.OOBTree import OOBTree
    tm.begin()
    root = conn.root()
    root["sessions"] = zeotemp_churn.SessionContainer(slice_seconds)
    owned = root[OWNED] = OOBTree()
    for w in range(slots):
        owned[str(w)] = OOBTree()
    tm.commit()


class VoteKill:
    """A data manager joined to a ledgered transaction.  Its ``sortKey``
    sorts after the ZODB connection's, so its ``tpc_vote`` runs after the
    storage voted (the server holds the commit lock) and before any
    ``tpc_finish``: if ``event`` is set it records ``vk`` in the ledger and
    SIGKILLs its own process right there."""

    def __init__(self, event, ledger, seq):
        self.event, self.ledger, self.seq = event, ledger, seq
        self.transaction_manager = None

    def sortKey(self):
        return "~~~soak-vote-kill"

    def tpc_vote(self, txn):
        if self.event is not None and self.event.is_set():
            self.ledger.write(t="vk", q=self.seq)
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)            # not reached

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass


DEFAULTS = dict(
    storage="1",
    keep=10,
    slice_seconds=2.0,
    known=500,             # own session ids revisited
    new_fraction=0.3,
    shared_fraction=0.02,
    shared_sessions=20,
    owned_keys=200,        # keys k0..k<n-1> in the slot's own tree
    owned_fraction=0.5,    # share of transactions that also write an owned key
    delete_fraction=0.1,   # share of owned-key writes that delete it
    max_attempts=20,
    pause=0.0,
    wait_timeout=30,
)


def is_memory_refusal(e):
    """True for the error zeotemp's vote fails with at its memory limit
    (a StorageError naming ``memory-limit``): a clear refusal, nothing
    committed, the error the limit promises instead of the OOM killer."""
    return "memory-limit" in str(e) and "is full" in str(e)


def worker(cfg, kill_event=None):
    """Runs until ``cfg['end_at']`` (epoch seconds) in slot ``cfg['slot']``
    against ``cfg['addr']``, appending to ``cfg['ledger']``.  Resumes from
    what the ledger says (sequence numbers, own session ids)."""
    import transaction
    import ZEO.ClientStorage
    import ZODB
    from ZEO.Exceptions import ClientDisconnected
    from ZODB.POSException import ConflictError

    cfg = dict(DEFAULTS, **cfg)
    slot = cfg["slot"]
    prior = replay(cfg["ledger"], slot)
    ledger = LedgerWriter(cfg["ledger"])
    gen = prior.c["starts"]
    ledger.write(t="start", gen=gen, pid=os.getpid(), time=time.time())
    rnd = random.Random(hash((slot, os.getpid(), time.time())))
    seq = [prior.max_seq + 1]
    own_prefix = f"w{slot}-"
    known = deque((s for s in prior.recent_sids if s.startswith(own_prefix)),
                  maxlen=max(1, cfg["known"]))
    disconnected = [0]

    storage = ZEO.ClientStorage.ClientStorage(
        zeotemp_churn._address(cfg["addr"]), storage=cfg["storage"],
        wait_timeout=cfg["wait_timeout"])
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    if gen > 0:
        resume_check(conn, tm, prior, ledger)

    next_sid = zeotemp_churn.session_id_picker(rnd, cfg, own_prefix, known,
                                               prior.max_serial)

    def work(sid, okey, q):
        root = conn.root()
        container = root["sessions"]
        now = time.time()
        ops = []
        container.touch(sid, rnd, now)
        if sid.startswith(own_prefix):
            ts = container.timeslice(now)
            ops.append({"s": sid, "ts": ts,
                        "v": digest(container._data[ts][sid].data)})
        if okey is not None:
            tree = root[OWNED][str(slot)]
            item = tree.get(okey)
            if item is not None and rnd.random() < cfg["delete_fraction"]:
                del tree[okey]
                ops.append({"k": okey, "v": None})
            else:
                value = {"slot": slot, "gen": gen, "seq": q,
                         "r": rnd.getrandbits(32)}
                if item is None:
                    tree[okey] = LedgerItem(value)
                else:
                    item.value = value
                ops.append({"k": okey, "v": digest(value)})
        return ops

    def run_ledgered(sid, okey):
        for attempt in range(cfg["max_attempts"]):
            q = seq[0]
            seq[0] += 1
            ops = None
            try:
                tm.begin()
                ops = work(sid, okey, q)
                if ops:
                    ledger.write(t="i", q=q, ops=ops)
                    tm.get().join(VoteKill(kill_event, ledger, q))
                tm.commit()
                if ops:
                    ledger.write(t="c", q=q)
                return
            except ConflictError as e:
                _abort(tm)
                ledger.write(t="a", q=q if ops else None)
                last = e
            except ClientDisconnected as e:
                # The server is up the whole soak: a dropped connection is
                # an error (retried; the commit may or may not have happened).
                _abort(tm)
                if ops:
                    ledger.write(t="d", q=q)
                ledger.write(t="e", m=f"disconnected: {e!r}")
                disconnected[0] += 1
                last = e
            except Exception as e:
                _abort(tm)
                if is_memory_refusal(e):
                    ledger.write(t="f", q=q if ops else None)
                    return
                if ops:
                    ledger.write(t="d", q=q)
                ledger.write(t="e", m=repr(e)[:500])
                return
            time.sleep(rnd.uniform(0, 0.01 * min(attempt + 1, 10)))
        ledger.write(t="e", m=f"gave up after {cfg['max_attempts']} attempts: "
                     f"{last!r}"[:500])

    def run_gc():
        for attempt in range(cfg["max_attempts"]):
            try:
                tm.begin()
                n = conn.root()["sessions"].gc_old_buckets(cfg["keep"])
                tm.commit()
                if n:
                    ledger.write(t="g", n=n)
                return
            except ConflictError:
                _abort(tm)
                ledger.write(t="a", q=None)
            except ClientDisconnected as e:
                _abort(tm)
                ledger.write(t="e", m=f"disconnected: {e!r}")
            except Exception as e:
                _abort(tm)
                if is_memory_refusal(e):
                    ledger.write(t="f", q=None)
                    return
                ledger.write(t="e", m=repr(e)[:500])
                return
            time.sleep(rnd.uniform(0, 0.01 * min(attempt + 1, 10)))
        ledger.write(t="e", m="bucket expiry gave up after "
                     f"{cfg['max_attempts']} attempts")

    last_slice = None
    try:
        while time.time() < cfg["end_at"]:
            sid = next_sid()
            okey = (f"k{rnd.randrange(cfg['owned_keys'])}"
                    if rnd.random() < cfg["owned_fraction"] else None)
            run_ledgered(sid, okey)
            ts = int(time.time() // cfg["slice_seconds"])
            if ts != last_slice:
                last_slice = ts
                run_gc()
            if cfg["pause"]:
                time.sleep(cfg["pause"])
    finally:
        _close(tm, conn, db)
    ledger.write(t="end", gen=gen, time=time.time())
    ledger.close()


def resume_check(conn, tm, prior, ledger):
    """A replacement worker first checks its predecessors' ledger against
    the database (one snapshot), before writing anything: a transaction its
    predecessor was killed in (between vote and finish, or anywhere) is
    checked here, before later writes of the same keys could hide it.
    Records ``{"t": "rc", ...counts}`` and an error per problem."""
    tm.begin()
    try:
        res = verify(conn.root(), [prior])
    except Exception as e:
        res = None
        ledger.write(t="e", m=f"resume check failed: {e!r}"[:500])
    finally:
        _abort(tm)
    if res is not None:
        problems = res.pop("problems")
        ledger.write(t="rc", **res)
        for text in problems:
            ledger.write(t="e", m=f"resume check: {text}"[:500])


def worker_main(cfg, kill_event=None):
    """Process entry point (spawned child).  SIGINT is ignored (the parent
    stops its children); an exception escaping the worker is recorded in
    the ledger and makes the exit status 1."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import logging
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        worker(cfg, kill_event)
    except BaseException as e:
        try:
            w = LedgerWriter(cfg["ledger"])
            w.write(t="e", m=f"worker crashed: {e!r}"[:500])
            w.close()
        finally:
            os._exit(1)
