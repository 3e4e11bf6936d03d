"""Real Python 2.7 ZEO 5 clients of three generations (Plone 5.1 and 5.2
on Python 2) next to Python 3 clients on one zeotemp storage.

The Python 2 side is the stock ZEO 5 / ZODB 5 / BTrees 4 client, one venv
per generation (``GENERATIONS``), each pinned in its own requirements file
and installed by ``tests/run-all.sh``:

* ``zeo54``: ZEO 5.4.1 / ZODB 5.8.1, the last ZEO for Python 2
  (``requirements-py2.txt``, ``target/py2venv`` or ``$ZEOTEMP_PY2VENV``);
* ``zeo52``: ZEO 5.2.1 / ZODB 5.5.1, what Plone 5.2 pins
  (``requirements-py2-zeo52.txt``, ``target/py2venv-zeo52`` or
  ``$ZEOTEMP_PY2VENV_ZEO52``);
* ``zeo51``: ZEO 5.1.2 / ZODB 5.3.0, Plone 5.1, which pickles with protocol
  1 and reads nothing newer than protocol 2 (``requirements-py2-zeo51.txt``,
  ``target/py2venv-zeo51`` or ``$ZEOTEMP_PY2VENV_ZEO51``).

Each Python 2 client is a ``py2_client.py`` process driven over
stdin/stdout. The tests that take ``py2_client`` run once per generation;
``test_generations_share_one_storage`` puts all of them on one storage. The
Python 3 side is this process's own ZEO 6 client. Without Python 2.7, or
without a generation's venv, its tests are skipped with the reason (never a
silent pass).

What is checked (protocol notes §12):

* values committed by one Python are read back, with the types ZODB gives
  across Python versions, by the other (str, unicode, bytes, ints, longs,
  floats, containers, persistent references, an OOBTree);
* invalidations reach a connection of the other Python without a
  reconnect, both ways;
* a BTrees conflict between the two is resolved by the client that votes
  second, whichever Python it runs (the server hands the committed state
  over; the client's BTrees merges it);
* error replies (POSKeyError, ConflictError, ReadConflictError), history,
  undoLog, pack and the client label in the Python 2 dialect;
* transaction metadata (user, description, extension) written by one
  Python in the other's history();
* a py2 client's recovery after a server restart;
* Python 2 and Python 3 clients committing at the same time on one storage.

The stock Python 3 ZEO server cannot serve Python 2 clients at all, so on
the python backend these tests are skipped.
"""

import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.POSException import StateLoadError

from zeotemp_util import IS_PYTHON, wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HELPER = HERE / "py2_client.py"
CALL_TIMEOUT = 60.0


class Generation:
    """One Python 2 client stack: its venv (``tests/run-all.sh`` makes it
    from ``requirements``) and the ZEO version it must report."""

    def __init__(self, name, env, default, requirements, zeo):
        self.name = name
        self.venv = (REPO / os.environ.get(env, default)).absolute()
        self.python = self.venv / "bin" / "python"
        self.requirements = requirements
        self.zeo = zeo

    def missing(self):
        if os.environ.get("ZEOTEMP_PY2_SKIP"):  # set by tests/run-all.sh
            return os.environ["ZEOTEMP_PY2_SKIP"]
        if not self.python.exists():
            return (f"no Python 2 venv at {self.venv}: tests/run-all.sh "
                    f"creates it from tests/python/{self.requirements} when "
                    "a Python 2.7 interpreter is found (PYTHON2, python2.7 "
                    "on PATH, or ~/.pyenv/versions/2.7.18/bin/python)")
        return None


GENERATIONS = {g.name: g for g in [
    Generation("zeo54", "ZEOTEMP_PY2VENV", "target/py2venv",
               "requirements-py2.txt", "5.4.1"),
    Generation("zeo52", "ZEOTEMP_PY2VENV_ZEO52", "target/py2venv-zeo52",
               "requirements-py2-zeo52.txt", "5.2.1"),
    Generation("zeo51", "ZEOTEMP_PY2VENV_ZEO51", "target/py2venv-zeo51",
               "requirements-py2-zeo51.txt", "5.1.2"),
]}


pytestmark = [
    pytest.mark.skipif(
        IS_PYTHON,
        reason="the stock Python 3 ZEO server cannot serve Python 2 clients "
               "(protocol notes §12, fixtures/zeo5-py2/py2-02)"),
]


# Why Python 3 cannot load what ZODB 5.3 (zeo51) writes with references in
# it: not a matter of the wire, and the same with any server.
ZODB53_REFERENCES = (
    "ZODB 5.3 on Python 2 pickles persistent references with protocol 2, "
    "oids as py2 str; ZODB on Python 3 decodes those as ASCII and cannot "
    "load such a record once an oid has a byte >= 0x80, as zeotemp's oids "
    "do (a run starts above any earlier run's range). ZODB >= 5.4 writes "
    "oids as bytes (protocol 3); Plone 5.1 runs on Python 2 only.")


def zodb53_references_unreadable_by_py3(request, generation):
    """For zeo51: the test must fail with StateLoadError, where Python 3
    loads a record ZODB 5.3 wrote with references (strict: if it passes,
    this note is wrong and must go)."""
    if generation.name == "zeo51":
        request.applymarker(pytest.mark.xfail(
            raises=StateLoadError, strict=True, reason=ZODB53_REFERENCES))


class Py2Error(AssertionError):
    pass


class Py2Client:
    """One ``py2_client.py`` process: a stock ZEO 5 client on Python 2.7."""

    def __init__(self, server, storage, workdir, name, generation):
        self.name = name
        self.generation = generation
        self.stderr_path = Path(workdir) / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        host, port = server.address
        self.proc = subprocess.Popen(
            [str(generation.python), str(HELPER), f"{host}:{port}", storage,
             name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, cwd=str(workdir),
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                     PYTHONIOENCODING="utf-8"),
            start_new_session=True)
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self._receive(CALL_TIMEOUT)

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def _receive(self, timeout):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise Py2Error(f"{self.name}: no answer after {timeout}s\n"
                           f"stderr:\n{self.stderr()}") from None
        if line is None:
            self.proc.wait(10)
            raise Py2Error(f"{self.name} exited with status "
                           f"{self.proc.returncode}\nstderr:\n{self.stderr()}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise Py2Error(f"{self.name}: {reply['message']}\n"
                           f"{reply['traceback']}\nstderr:\n{self.stderr()}")
        return reply

    def send(self, op, **kw):
        """Sends a command without waiting for its answer (see result())."""
        self.proc.stdin.write((json.dumps(dict(kw, op=op)) + "\n").encode())
        self.proc.stdin.flush()

    def result(self, timeout=CALL_TIMEOUT):
        return self._receive(timeout)

    def call(self, op, timeout=CALL_TIMEOUT, **kw):
        self.send(op, **kw)
        return self.result(timeout)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call("close", timeout=20)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def py2_factory(server_factory, tmp_path):
    """``py2_factory(server, generation, storage='1')`` -> a connected
    Py2Client of that generation (a ``GENERATIONS`` key); every one is
    closed at teardown (before the servers stop)."""
    clients = []

    def make(srv, generation, storage="1"):
        gen = GENERATIONS[generation]
        reason = gen.missing()
        if reason:
            pytest.skip(f"{gen.name}: {reason}")
        c = Py2Client(srv, storage, tmp_path, f"py2-{len(clients) + 1}", gen)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture(params=list(GENERATIONS))
def generation(request):
    """Each test that takes it (through ``py2_client``) runs once per
    Python 2 client generation, skipped where its venv is missing."""
    gen = GENERATIONS[request.param]
    reason = gen.missing()
    if reason:
        pytest.skip(f"{gen.name}: {reason}")
    return gen


@pytest.fixture
def py2_client(py2_factory, generation):
    """``py2_client(server, storage='1')`` -> a connected Py2Client of this
    test's generation."""
    return lambda srv, storage="1": py2_factory(srv, generation.name, storage)


def registrations(server):
    """How many times a client registered a storage (one per connection)."""
    return len(re.findall(r"\bregistered\b", server.log_text()))


def py3_wait(tm, root, key, value, timeout=10, check=None):
    """Polls, with new transactions of ``tm``, until root[key] == value
    (or ``check()``): a commit of another client shows up once its
    invalidation (pushed by the server, not awaited by the committer) has
    arrived."""
    def seen():
        tm.begin()
        return check() if check else root.get(key) == value
    wait_until(seen, timeout, interval=0.05,
               message=f"root[{key!r}] == {value!r} (an invalidation)")


def bounded(fn, timeout, what):
    """fn() in a thread, failing after ``timeout`` s: a stock client waits
    forever for a reply it cannot decode."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive() or not out:
        raise AssertionError(f"{what}: no result after {timeout}s")
    return out[0]


def py3_open(db):
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    return tm, conn, conn.root()


# -- helpers to read py2_client.describe() output ------------------------------

def plain(d, loose=False):
    """A describe() pair as a Python 3 value: unicode -> text, binary ->
    bytes, and a py2 str -> ``("py2str", text)`` (to tell it from unicode),
    or text too if ``loose``."""
    kind, payload = d
    if kind == "unicode":
        return payload
    if kind == "str":
        return payload if loose else ("py2str", payload)
    if kind == "binary":
        return bytes.fromhex(payload)
    if kind in ("int", "long"):
        return int(payload)
    if kind in ("float", "NoneType", "bool"):
        return payload
    if kind == "list":
        return [plain(x, loose) for x in payload]
    if kind == "tuple":
        return tuple(plain(x, loose) for x in payload)
    if kind == "dict":
        return {plain(k, loose): plain(v, loose) for k, v in payload}
    if kind in ("pmapping", "oobtree"):
        return (kind, {plain(k, loose): plain(v, loose)
                       for k, v in payload["items"]})
    raise AssertionError(f"unknown kind {kind}")


# -- tests ---------------------------------------------------------------------

def test_py2_client_environment(server, py2_client, generation):
    c = py2_client(server)
    info = c.call("versions")
    assert info["python"].startswith("2.7."), info
    assert info["versions"]["ZEO"] == generation.zeo, info
    assert info["versions"]["ZODB"].startswith("5."), info
    assert info["btrees_c"], "BTrees C extensions missing in the py2 venv"
    # The py2 client sees the root zeotemp creates at startup.
    assert int(c.ready["last_tid"], 16) > 0


def test_py2_commits_py3_reads(server, py2_client, make_db, request,
                               generation):
    zodb53_references_unreadable_by_py3(request, generation)
    py2 = py2_client(server)
    written = py2.call("write_values", key="from_py2")
    db = make_db(server)
    if not IS_PYTHON:
        # The class table reads the classes of py2's records (protocol 1
        # from ZEO 5.1, zodbpickle's protocol 3 from later ones): none is
        # unknown.
        classes = {r["class"] for r in db.storage.server_status()["classes"]}
        assert {"persistent.mapping.PersistentMapping",
                "BTrees.OOBTree.OOBTree"} <= classes, classes
        assert "(unknown)" not in classes, classes
    tm, conn, root = py3_open(db)
    pm = root["from_py2"]
    pm._p_activate()
    assert pm._p_serial.hex() == written["tid"]
    assert pm._p_oid.hex() == written["oid"]
    # ZODB on Python 3 reads an ASCII py2 str as text (a non-ASCII one
    # fails to load: its unpickler decodes them as ASCII; not tested here).
    assert pm["str"] == "plain ascii str"
    assert pm["unicode"] == "caf\xe9 \u2603"
    assert pm["binary"] == b"\x00\x01\xfe\xff"
    assert pm["int"] == 42 and pm["negative"] == -7
    assert pm["maxint"] == 2 ** 63 - 1
    assert pm["long"] == 2 ** 70
    assert pm["float"] == 1.5
    assert pm["none"] is None and pm["bool"] is True
    assert pm["list"] == [1, "two", "three"]
    assert pm["tuple"] == (1, 2)
    assert pm["dict"] == {"a": 1, "b": 2}
    assert pm["child"] is pm["child_again"]
    assert pm["child"]["name"] == "child"
    tree = pm["tree"]
    assert isinstance(tree, OOBTree)
    assert len(tree) == 41
    assert tree["k039"] == 39 * 39
    assert tree["caf\xe9"] == "\u2603"
    assert list(tree.keys())[:2] == ["caf\xe9", "k000"]

    # A non-ASCII py2 str comes back byte for byte to a second py2 client
    # (an empty cache: loaded from the server).
    other = py2_client(server)
    raw = plain(other.call("read", key="from_py2_py2only")["value"])
    assert raw == ("pmapping", {("py2str", "str_high"): ("py2str", "\x00\xff\x80raw")})

    # And back: py3 changes py2's objects, py2 reads the change.
    tm.begin()
    pm["child"]["name"] = "renamed by py3"
    tree["k000"] = "py3"
    root["seq"] = 1
    tm.commit()
    py2.call("wait_for", key="seq", value=1, seconds=10)
    # (The states py3 wrote back have text keys, unicode on Python 2.)
    kind, items = plain(py2.call("read", key="from_py2")["value"], loose=True)
    assert kind == "pmapping"
    assert items["child"] == ("pmapping", {"name": "renamed by py3"})
    assert items["tree"][1]["k000"] == "py3"
    assert items["tree"][1]["k001"] == 1
    conn.close()


def test_py3_commits_py2_reads(server, py2_client, make_db):
    db = make_db(server)
    tm, conn, root = py3_open(db)
    tm.begin()
    child = PersistentMapping(name="child")
    tree = OOBTree()
    for i in range(40):
        tree[f"k{i:03d}"] = i
    tree["caf\xe9"] = b"\xff"
    pm = PersistentMapping()
    pm.update({
        "str": "text", "unicode": "caf\xe9 \u2603", "bytes": b"\x00\xff",
        "int": 42, "negative": -7, "big": 2 ** 70, "float": 2.25,
        "none": None, "bool": False, "list": [1, "two", b"3"],
        "tuple": (1, "x"), "dict": {"a": b"b"}, "child": child,
        "child_again": child, "tree": tree})
    root["from_py3"] = pm
    tm.commit()

    py2 = py2_client(server)
    got = py2.call("read", key="from_py3")
    assert got["same_child"] is True
    kind, items = plain(got["value"])
    assert kind == "pmapping"
    # ZODB 5 on Python 2: py3 str -> unicode, py3 bytes -> zodbpickle.binary.
    expected = {
        "str": "text", "unicode": "caf\xe9 \u2603", "bytes": b"\x00\xff",
        "int": 42, "negative": -7, "big": 2 ** 70, "float": 2.25,
        "none": None, "bool": False, "list": [1, "two", b"3"],
        "tuple": (1, "x"), "dict": {"a": b"b"},
        "child": ("pmapping", {"name": "child"}),
        "child_again": ("pmapping", {"name": "child"}),
    }
    for k, v in expected.items():
        assert items[k] == v, (k, items[k])
    tkind, titems = items["tree"]
    assert tkind == "oobtree" and len(titems) == 41
    assert titems["k039"] == 39 and titems["caf\xe9"] == b"\xff"

    # And back: py2 changes the py3 tree, py3 sees it after a new
    # transaction.
    py2.call("set", key="py2_note", value="written by py2")
    py3_wait(tm, root, "py2_note", "written by py2")
    conn.close()


def test_invalidations_both_ways_without_reconnect(server, py2_client,
                                                   make_db):
    db = make_db(server)
    tm, conn, root = py3_open(db)
    tm.begin()
    root["n"] = 0
    tm.commit()
    py2 = py2_client(server)
    assert plain(py2.call("get", key="n")["value"]) == 0
    before = registrations(server)
    assert before == 2

    for round_ in range(5):
        # py2 -> py3: the py3 connection's cached root must be invalidated.
        py2.call("set", key="n", value=2 * round_ + 1)

        py3_wait(tm, root, "n", 2 * round_ + 1)
        # py3 -> py2: the py2 client polls with new transactions only.
        tm.begin()
        root["n"] = 2 * round_ + 2
        tm.commit()
        py2.call("wait_for", key="n", value=2 * round_ + 2, seconds=10)

    # Same two connections throughout (no reconnect, no cache verification).
    assert registrations(server) == before
    conn.close()


@pytest.mark.parametrize("size", [10, 40], ids=["inline-bucket", "buckets"])
def test_btrees_conflict_resolved_across_pythons(server, py2_client, make_db,
                                                 size, request, generation):
    if size > 30:  # more than one bucket: buckets reference each other
        zodb53_references_unreadable_by_py3(request, generation)
    db = make_db(server)
    tm, conn, root = py3_open(db)
    tm.begin()
    tree = root["tree"] = OOBTree()
    for i in range(size):
        tree[f"k{i:03d}"] = i
    tm.commit()
    py2 = py2_client(server)
    status0 = db.storage.server_status()

    # 1. py2 reads and inserts, py3 commits first: py2's vote conflicts and
    #    py2's BTrees merges py3's state (pickled by Python 3).
    py2.call("tree_insert", tree="tree", key="k0055", value=-1)
    tm.begin()
    root["tree"]["k0057"] = -2
    tm.commit()
    py2.call("commit")
    # py3 sees that commit before step 2 (its invalidation is pushed, not
    # awaited by the committer), so each step conflicts with one commit.
    py3_wait(tm, root, None, None, check=lambda: "k0055" in root["tree"])

    # 2. py3 reads and inserts, py2 commits first: py3's vote conflicts and
    #    py3's BTrees merges py2's state (pickled by Python 2).
    tm.begin()
    root["tree"]["k0015"] = -3
    py2.call("tree_insert", tree="tree", key="k0017", value=-4)
    py2.call("commit")
    tm.commit()

    new = {"k0055": -1, "k0057": -2, "k0015": -3, "k0017": -4}
    want = {f"k{i:03d}": i for i in range(size)} | new
    tm.begin()
    assert dict(root["tree"].items()) == want
    items = py2.call("tree_items", tree="tree", min_len=len(want))["items"]
    seen = {plain(k, loose=True): plain(v) for k, v in items}
    assert seen == want
    status = db.storage.server_status()
    # Both commits that voted second had a conflict handed back and resolved.
    assert status["conflicts"] - status0["conflicts"] >= 2, status
    assert status["conflicts_resolved"] - status0["conflicts_resolved"] >= 2
    conn.close()


def test_error_replies_to_py2(server, py2_client):
    py2 = py2_client(server)
    out = py2.call("errors")
    # The oid comes back as a py2 str (the repr of a unicode has a u).
    assert out["poskeyerror"] == r"POSKeyError('\x00\x00\x7f\xff\xff\xff\xff\xff',)"
    conflict = out["conflict"]
    assert conflict["type"] == "ConflictError"
    assert conflict["class_name"] == "persistent.mapping.PersistentMapping"
    assert out["read_conflict"] == {"type": "ReadConflictError",
                                    "oid": conflict["oid"]}
    assert out["history"], out
    for h in out["history"]:
        assert {"tid", "time", "user_name", "description"} <= set(h["keys"])
        # tids are py2 str (ZODB 5 on Python 2 compares them with str).
        assert h["tid_type"] == "str", h
    assert out["undo_log"] == []
    # The client label (a py2 str, sent one-way) names the connection in
    # the server's log, e.g. the pack line.
    assert re.search(r"\bpack to [^\n]* UTC requested peer=py2-1 127\.0\.0\.1:",
                     server.log_text())
    # The py2 client still works after all those errors.
    py2.call("set", key="after_errors", value=1)
    assert plain(py2.call("get", key="after_errors")["value"]) == 1


def test_transaction_metadata_across_pythons(server, py2_client, make_db):
    py2 = py2_client(server)
    # py2 str values in a py2 transaction's extension come back to the
    # py2 client as str, and to a py3 client as text if ASCII, else bytes
    # (as ZODB on Python 3 reads such a str; before, zeotemp sent them as
    # py2 str and the py3 client could not decode the history() reply: the
    # call never returned).
    h2 = py2.call("commit_meta", key="meta")["history"]
    assert plain(h2["extension"]) == {
        ("py2str", "plain"): ("py2str", "ascii value"),
        ("py2str", "high"): ("py2str", "\xff\xfe"),
        # (ASCII text reaches py2 as str, like any text in this dialect)
        ("py2str", "uni"): "\u2603"}
    assert h2["tid"][0] == "str" and h2["user_name"][0] == "str"
    db = make_db(server)
    tm, conn, root = py3_open(db)
    h3 = bounded(lambda: db.storage.history(root._p_oid, 1)[0], 20,
                 "py3 history() of a py2 transaction")
    assert h3["tid"].hex() == h2["tid"][1].encode("latin-1").hex()
    assert h3["extension"] == {"plain": "ascii value", "high": b"\xff\xfe",
                               "uni": "\u2603"}
    assert h3["description"] == "caf\xe9".encode()
    assert h3["user_name"].endswith(b"bob")
    # And a py3 transaction's metadata as the py2 client sees it.
    tm.begin()
    tm.get().setUser("alice")
    tm.get().note("na\xefve")
    tm.get().setExtendedInfo("text", "\u2603")
    tm.get().setExtendedInfo("raw", b"\x00\xff")
    root["meta"] = 2
    tm.commit()
    py2.call("wait_for", key="meta", value=2, seconds=10)
    h2 = py2.call("history")["history"]
    assert plain(h2["extension"]) == {("py2str", "text"): "\u2603",
                                      ("py2str", "raw"): ("py2str", "\x00\xff")}
    assert plain(h2["description"]) == ("py2str", "na\xefve".encode().decode("latin-1"))
    assert h2["tid"][0] == "str"
    conn.close()


def test_py2_client_recovers_after_a_server_restart(server, py2_client):
    # A restart loses the temporary data; the py2 client reconnects (its
    # cache is older than the new server's tids), and carries on.
    py2 = py2_client(server)
    py2.call("set", key="x", value=1)
    assert plain(py2.call("get", key="x")["value"]) == 1
    server.stop()
    server.start()
    out = py2.call("commit_retry", key="y", value=2, seconds=30)
    assert out["keys"] == ["y"], out


def test_py2_and_py3_commit_concurrently(server, py2_client, make_db):
    db = make_db(server)
    tm, conn, root = py3_open(db)
    tm.begin()
    root["shared"] = 0
    tm.commit()
    a, b = py2_client(server), py2_client(server)
    n = 25
    a.send("counter_loop", key="shared", n=n)
    b.send("counter_loop", key="shared", n=n)
    py3_commits = 0
    deadline = time.monotonic() + 120
    while py3_commits < n:
        assert time.monotonic() < deadline, "py3 commits did not progress"
        try:
            tm.begin()
            root["shared"] += 1
            tm.commit()
            py3_commits += 1
        except Exception as e:  # ConflictError: retry
            from ZODB.POSException import ConflictError
            if not isinstance(e, ConflictError):
                raise
            tm.abort()
            time.sleep(0.01)
    ra, rb = a.result(120), b.result(120)
    assert ra["value"] <= 3 * n and rb["value"] <= 3 * n
    # Every increment counted once, as every client sees it.
    py3_wait(tm, root, "shared", 3 * n)
    a.call("wait_for", key="shared", value=3 * n, seconds=10)
    b.call("wait_for", key="shared", value=3 * n, seconds=10)
    # Python 3 clients are not disturbed by the py2 ones: a fresh one
    # connects, reads and commits.
    db2 = make_db(server)
    tm2, conn2, root2 = py3_open(db2)
    assert root2["shared"] == 3 * n
    tm2.begin()
    root2["py3_after"] = 1
    tm2.commit()
    # (An invalidation is pushed, not awaited by the committer: poll.)
    a.call("wait_for", key="py3_after", value=1, seconds=10)
    conn2.close()
    conn.close()


def test_generations_share_one_storage(server, py2_factory, make_db):
    """Python 2 clients of every generation (ZEO 5.1.2 speaking protocol 1,
    5.2.1 and 5.4.1 speaking protocol 3) and a Python 3 client on one
    storage: values and invalidations every way, and BTrees and
    BTrees.Length conflicts resolved by whichever client votes second.
    (ZODB 5.3 only writes objects without references here, see
    ZODB53_REFERENCES.)"""
    db = make_db(server)
    tm, conn, root = py3_open(db)
    tm.begin()
    root["box"] = PersistentMapping()
    root["length"] = Length()
    tree = root["tree"] = OOBTree()  # 10 items: one inline bucket
    for i in range(10):
        tree[f"k{i:03d}"] = i
    tm.commit()
    status0 = db.storage.server_status()
    clients = {g: py2_factory(server, g) for g in GENERATIONS}
    for g, c in clients.items():
        assert c.call("versions")["versions"]["ZEO"] == GENERATIONS[g].zeo

    # Values and invalidations: each py2 client writes, the others and
    # Python 3 see it in their next transaction (no reconnect).
    for g, c in clients.items():
        c.call("set", container="box", key=f"from_{g}", value=f"{g} {len(g)}")
        py3_wait(tm, root["box"], f"from_{g}", f"{g} {len(g)}")
        for other in clients.values():
            other.call("wait_for", container="box", key=f"from_{g}",
                       value=f"{g} {len(g)}", seconds=10)
    tm.begin()
    root["box"]["from_py3"] = "py3 \u2603"
    tm.commit()
    for c in clients.values():
        c.call("wait_for", container="box", key="from_py3",
               value="py3 \u2603", seconds=10)
        got = plain(c.call("get", container="box", key="from_py3")["value"])
        assert got == "py3 \u2603"

    # BTrees.Length: everybody changes it in an open transaction; Python 3
    # commits first, then each py2 client, each vote conflicting with the
    # state the previous one (another generation) wrote.
    for n, c in enumerate(clients.values()):
        c.call("length_add", name="length", n=10 ** n)
    tm.begin()
    root["length"].change(1000)
    tm.commit()
    for c in clients.values():
        c.call("commit")
    for c in clients.values():
        got = c.call("wait_length", name="length", value=1111, seconds=10)
        assert got["value"] == 1111
    py3_wait(tm, root, "length", None, check=lambda: root["length"]() == 1111)

    # OOBTree: the same with inserts into one bucket, the Python 3 client
    # now voting last.
    for g, c in clients.items():
        c.call("tree_insert", tree="tree", key=f"k_{g}", value=len(g))
    tm.begin()
    root["tree"]["k_py3"] = 3
    for c in clients.values():
        c.call("commit")
    tm.commit()
    want = {f"k{i:03d}": i for i in range(10)} | {"k_py3": 3}
    want |= {f"k_{g}": len(g) for g in clients}
    tm.begin()
    assert dict(root["tree"].items()) == want
    for c in clients.values():
        items = c.call("tree_items", tree="tree", min_len=len(want))["items"]
        assert {plain(k, loose=True): plain(v) for k, v in items} == want
    status = db.storage.server_status()
    # 3 py2 commits after py3's for Length, py3 and 2 py2 after the first
    # for the tree: every one conflicted and was resolved by its client.
    assert status["conflicts_resolved"] - status0["conflicts_resolved"] >= 6
    conn.close()
