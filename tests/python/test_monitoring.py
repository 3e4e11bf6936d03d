"""Monitoring: the stock ``zeo-nagios`` check and ``ruok`` / ``server_status``
parity with the stock server, and the Prometheus endpoint
(``--metrics-address``).

The nagios tests run the stock check (ZEO's ``zeo-nagios`` console script,
``ZEO/nagios.py``) as a subprocess and compare its exit code and output with
what the stock server gives; run them with ``ZEOTEMP_TEST_SERVER=python`` to
see the stock server pass the same assertions. ``zeo-nagios`` has no
thresholds of its own: it says OK (0), WARNING (1) for a storage without a
transaction (``Empty storage``), CRITICAL (2) when it cannot connect, and
with ``-m`` appends the counters (``-s FILE`` keeps the previous reading and
adds rates).

The one difference: a fresh stock MappingStorage has no transaction until a
client creates the root, so the check warns ``Empty storage`` until then;
zeotemp creates the root at start, so its storages are never empty.

The Prometheus tests (zeotemp only) scrape ``/metrics`` with urllib while
real ClientStorage clients work, and check that the figures move with what
the clients did and agree with ``server_status()``; then the HTTP edges
(404, 405, malformed and oversized requests, idle connections, shutdown).
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import transaction
from persistent.mapping import PersistentMapping
from ZEO.Exceptions import ServerException
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from conftest import ZEOTEMP_BIN
from zeotemp_testobjects import Item
from zeotemp_util import IS_PYTHON, make_record, wait_until

# The keys of the stock server's server_status() (ZEO.StorageServer
# .server_status: ZEO.monitor.StorageStats plus four), and their types.
STOCK_KEYS = {
    "connections": int, "loads": int, "stores": int, "commits": int,
    "aborts": int, "active_txns": int, "lock_time": (type(None), float),
    "conflicts": int, "conflicts_resolved": int, "start": str,
    "waiting": int, "timeout-thread-is-alive": (bool, str),
    "last-transaction": str,
}

NAGIOS_METRICS = ("active_txns", "connections", "waiting")
NAGIOS_RATES = ("aborts", "commits", "conflicts", "conflicts_resolved",
                "loads", "stores")


# -- helpers -------------------------------------------------------------------

def addr_text(server):
    a = server.address
    return a if isinstance(a, str) else f"{a[0]}:{a[1]}"


def nagios(server_or_addr, *args):
    """Runs the stock check; returns (exit code, stdout)."""
    addr = (server_or_addr if isinstance(server_or_addr, str)
            else addr_text(server_or_addr))
    script = Path(sys.executable).with_name("zeo-nagios")
    if script.exists():
        cmd = [str(script)]
    else:  # `python -m ZEO.nagios` drops main()'s exit code
        cmd = [sys.executable, "-c",
               "import sys, ZEO.nagios; sys.exit(ZEO.nagios.main())"]
    r = subprocess.run(cmd + [*args, addr], capture_output=True, text=True,
                       timeout=60)
    assert not r.stderr, r.stderr
    return r.returncode, r.stdout


def nagios_metrics(out):
    """``label=value`` pairs of the check's performance data."""
    first, *rest = out.splitlines()
    pairs = first.split("|", 1)[1:] + [l.lstrip("| ") for l in rest]
    return {k: float(v) for k, v in (p.split("=", 1) for p in pairs)}


def ruok(server):
    """What zeo-nagios reads: the raw ruok answer (bytes)."""
    a = server.address
    if isinstance(a, str):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(a)
    else:
        s = socket.create_connection(a, 30)
    with s:
        s.sendall(b"\x00\x00\x00\x04ruok")
        f = s.makefile("rb")

        def frame():
            (n,) = struct.unpack(">I", f.read(4))
            return f.read(n)
        frame()  # the protocol frame
        return frame()


def commit_root(db, key, value, tm=None):
    tm = tm or transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    conn.root()[key] = value
    tm.commit()
    conn.close()


def check_stock_keys(status):
    for key, kind in STOCK_KEYS.items():
        assert key in status, key
        assert isinstance(status[key], kind), (key, status[key])
    assert re.fullmatch(r"[0-9a-f]{16}", status["last-transaction"])
    time.strptime(status["start"])  # time.ctime()'s format


def raw_vote(cs, oid, value):
    """tpc_begin, store and vote through ClientStorage; returns the
    transaction (the caller finishes it)."""
    txn = TransactionMetaData(description="monitoring test")
    cs.tpc_begin(txn)
    cs.store(oid, z64, make_record(PersistentMapping, {"data": {"v": value}}),
             "", txn)
    cs.tpc_vote(txn)
    return txn


# -- zeo-nagios and ruok, both backends ---------------------------------------

def test_nagios_ok(server_factory, make_db):
    srv = server_factory(storages=("1", "temp"))
    dbs = [make_db(srv, storage=name) for name in ("1", "temp")]
    for db in dbs:
        commit_root(db, "x", 1)
    assert nagios(srv) == (0, "OK\n")
    assert nagios(srv, "-m") == (
        0, "OK|active_txns=0\n| connections=1\n waiting=0\n"
           " temp:active_txns=0\n temp:connections=1\n temp:waiting=0\n")


def test_nagios_fresh_storage(server):
    """The stock server warns about a storage no client has written to yet
    (no root object, last transaction 0); zeotemp's has its root."""
    rc, out = nagios(server)
    if IS_PYTHON:
        assert (rc, out) == (1, "Empty storage '1'\n")
    else:
        assert (rc, out) == (0, "OK\n")


def test_nagios_critical_when_down(server_factory):
    srv = server_factory()
    addr = addr_text(srv)
    srv.stop()
    rc, out = nagios(addr)
    assert rc == 2
    assert out.startswith("Can't connect "), out


def test_nagios_unix_socket(server_factory, make_db, tmp_path):
    srv = server_factory(unix_socket=tmp_path / "zeo.sock")
    commit_root(make_db(srv), "x", 1)
    assert nagios(srv) == (0, "OK\n")


def test_nagios_metrics_rates_over_two_runs(server_factory, make_db,
                                            tmp_path):
    srv = server_factory(storages=("1", "temp"))
    db1, dbt = make_db(srv), make_db(srv, storage="temp")
    commit_root(db1, "x", 0)
    commit_root(dbt, "x", 0)
    status_file = tmp_path / "nagios-status.json"

    rc, out = nagios(srv, "-m", "-s", str(status_file))
    assert rc == 0 and out.startswith("OK|"), out
    first = nagios_metrics(out)
    assert set(first) == {f"{p}{n}" for p in ("", "temp:")
                          for n in NAGIOS_METRICS}
    saved = json.loads(status_file.read_text())
    assert set(saved) == {"1", "temp"}
    for st in saved.values():
        check_stock_keys(st)

    commits = 4
    tm = transaction.TransactionManager()
    for i in range(commits):
        commit_root(db1, "x", i + 1, tm)
    # As if the first run was a minute ago (the check divides by the age of
    # its status file); the rates' ratios do not depend on it.
    then = time.time() - 60
    os.utime(status_file, (then, then))

    rc, out = nagios(srv, "-m", "-s", str(status_file))
    assert rc == 0 and out.startswith("OK|"), out
    rates = nagios_metrics(out)
    assert set(rates) == {f"{p}{n}" for p in ("", "temp:")
                          for n in NAGIOS_METRICS + NAGIOS_RATES}
    assert rates["commits"] > 0
    # One store per commit (the root), over the same interval.
    assert rates["stores"] == rates["commits"]
    for name in ("aborts", "conflicts", "conflicts_resolved",
                 "temp:commits", "temp:stores", "temp:aborts"):
        assert rates[name] == 0.0, (name, out)
    assert (rates["connections"], rates["temp:connections"]) == (1, 1)


def test_nagios_and_ruok_show_commit_lock(server_factory, make_db,
                                          make_storage):
    """A transaction holding the commit lock and another waiting for it:
    active_txns 2, waiting 1, lock_time the time the lock was taken."""
    srv = server_factory(transaction_timeout=60)
    commit_root(make_db(srv), "x", 1)
    a, b = make_storage(srv), make_storage(srv)
    before = time.time()
    txn_a = raw_vote(a, a.new_oid(), 1)
    voted_b = []
    txn_b = TransactionMetaData(description="waits")
    b.tpc_begin(txn_b)
    b.store(b.new_oid(), z64,
            make_record(PersistentMapping, {"data": {}}), "", txn_b)
    waiter = threading.Thread(target=lambda: voted_b.append(b.tpc_vote(txn_b)),
                              daemon=True)
    waiter.start()
    try:
        status = wait_until(
            lambda: (lambda s: s if s["waiting"] == 1 else None)(
                json.loads(ruok(srv))["1"]),
            30, message="the second vote waiting for the commit lock")
        check_stock_keys(status)
        assert status["active_txns"] == 2
        assert before - 1 <= status["lock_time"] <= time.time() + 1
        # transaction-timeout set: the stock server runs its timeout thread.
        assert status["timeout-thread-is-alive"] is True
        assert status["connections"] == 3
        rc, out = nagios(srv, "-m")
        assert (rc, out) == (
            0, "OK|active_txns=2\n| connections=3\n waiting=1\n")
        assert not voted_b
    finally:
        a.tpc_finish(txn_a)
        waiter.join(30)
        b.tpc_finish(txn_b)
    after = json.loads(ruok(srv))["1"]
    assert (after["active_txns"], after["waiting"], after["lock_time"]) == (
        0, 0, None)


def test_server_status_has_the_stock_keys(server, make_db):
    db = make_db(server)
    commit_root(db, "x", 1)
    status = db.storage.server_status()
    check_stock_keys(status)
    assert status["connections"] == 1
    assert status["last-transaction"] == db.storage.lastTransaction().hex()
    assert status["commits"] >= 1 and status["stores"] >= 1


def test_ruok_is_ascii_json_with_a_non_ascii_storage_name(server_factory,
                                                          make_db):
    """zeo-nagios decodes the answer as ASCII (json.dumps escapes)."""
    name = "t\u00ebmp"
    srv = server_factory(storages=("1", name))
    for storage in ("1", name):
        commit_root(make_db(srv, storage=storage), "x", 1)
    raw = ruok(srv)
    raw.decode("ascii")
    assert set(json.loads(raw)) == {"1", name}
    rc, out = nagios(srv, "-m")
    assert rc == 0, out
    assert f" {name}:connections=1\n" in out


# -- the Prometheus endpoint (zeotemp) -----------------------------------------

METRICS = ("--metrics-address", "127.0.0.1:0")
_METRICS_URL = re.compile(r"metrics on (http://\S+)")


def metrics_url(srv):
    m = _METRICS_URL.search(srv.log_text())
    assert m, srv.log_text()
    return m.group(1)


def host_port(url):
    m = re.fullmatch(r"http://([^/]+):(\d+)/metrics", url)
    return m.group(1), int(m.group(2))


def _unescape(v):
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)),
                  v)


_SAMPLE = re.compile(r'([a-z_:][a-z0-9_:]*)(?:\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)",?')


def parse_metrics(text):
    """{name: {labels (tuple of pairs): value}}, checking that every family
    has HELP and TYPE lines before its samples."""
    families, kinds = {}, {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current, line
            kinds[name] = kind
            families[name] = {}
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, line
        name, labels, value = m.groups()
        # zeotemp's own, and the Prometheus clients' standard process_*.
        assert name == current and name.startswith(("zeotemp_", "process_")), line
        pairs = tuple((k, _unescape(v))
                      for k, v in _LABEL.findall(labels or ""))
        families[name][pairs] = float(value)
    for name, kind in kinds.items():
        assert name.endswith("_total") == (kind == "counter"), name
    return families


def scrape(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == (
            "text/plain; version=0.0.4; charset=utf-8")
        return parse_metrics(r.read().decode("utf-8"))


def per_storage(families, name, storage="1"):
    return families[name][(("storage", storage),)]


def raw_http(url, data, timeout=30):
    """Sends ``data`` on a new connection; returns everything the server
    sent until it closed."""
    with socket.create_connection(host_port(url), timeout) as s:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got


@pytest.mark.zeotemp_only(reason="the Prometheus endpoint")
def test_metrics_follow_client_traffic(server_factory, make_db, make_storage):
    srv = server_factory(storages=("1", "temp"), zeotemp_args=METRICS)
    url = metrics_url(srv)
    db = make_db(srv)
    monitor = make_storage(srv)
    commit_root(db, "items", PersistentMapping())
    before = scrape(url)
    status0 = monitor.server_status()
    assert per_storage(before, "zeotemp_commits_total") == status0["commits"]

    # Scrapes while a client commits: counters never go back.
    commits = 20
    stop, scrapes, errors = threading.Event(), [], []

    def scraper():
        try:
            while not stop.is_set():
                scrapes.append(
                    per_storage(scrape(url), "zeotemp_commits_total"))
        except Exception as e:  # reported below
            errors.append(e)
    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    for i in range(commits):
        tm.begin()
        conn.root()["items"][i] = Item(i)
        tm.commit()
    conn.close()
    stop.set()
    t.join(60)
    assert not errors, errors
    assert scrapes and scrapes == sorted(scrapes)

    after = scrape(url)
    status = monitor.server_status()
    c = lambda name, s="1": per_storage(after, name, s) - per_storage(  # noqa
        before, name, s)
    assert c("zeotemp_commits_total") == commits
    # Each commit: the mapping and one new Item.
    assert c("zeotemp_stores_total") == 2 * commits
    assert c("zeotemp_commits_total", "temp") == 0
    assert c("zeotemp_objects") == commits
    for metric, key in [
            ("zeotemp_objects", "objects"),
            ("zeotemp_current_bytes", "size"),
            ("zeotemp_retained_bytes", "retained-bytes"),
            ("zeotemp_accounted_bytes", "accounted-bytes"),
            ("zeotemp_revisions", "revisions"),
            ("zeotemp_commits_total", "commits"),
            ("zeotemp_stores_total", "stores"),
            ("zeotemp_loads_total", "loads"),
            ("zeotemp_aborts_total", "aborts"),
            ("zeotemp_storage_connections", "connections"),
            ("zeotemp_gc_collections_total", "collections")]:
        assert per_storage(after, metric) == status[key], metric
    # One memory limit for the process (no storage label), the same in
    # every storage's server_status.
    assert after["zeotemp_memory_limit_bytes"] == {(): status["memory-limit"]}
    assert after["zeotemp_accounted_limit_bytes"] == {
        (): status["accounted-limit"]}
    assert status["accounted-limit"] < status["memory-limit"]
    assert per_storage(after, "zeotemp_storage_connections") == 2
    assert after["zeotemp_connections"][()] == 2
    assert after["zeotemp_storages"][()] == 2
    version = subprocess.run([str(ZEOTEMP_BIN), "--version"],
                             capture_output=True, text=True).stdout.split()[1]
    assert after["zeotemp_build_info"] == {(("version", version),): 1.0}
    assert after["zeotemp_uptime_seconds"][()] >= 0
    assert after["zeotemp_resident_memory_bytes"][()] > 0

    # A cold client loads every item: the loads counter moves with it.
    fresh = make_db(srv)
    fconn = fresh.open(transaction_manager=transaction.TransactionManager())
    assert sorted(v.value for v in fconn.root()["items"].values()) == list(
        range(commits))
    fconn.close()
    loaded = scrape(url)
    assert (per_storage(loaded, "zeotemp_loads_total")
            - per_storage(after, "zeotemp_loads_total")) >= commits
    assert per_storage(loaded, "zeotemp_loads_total") == (
        monitor.server_status()["loads"])


@pytest.mark.zeotemp_only(reason="the Prometheus endpoint")
def test_metrics_conflicts_lock_waits_and_gc(server_factory, make_db,
                                             make_storage):
    srv = server_factory(zeotemp_args=METRICS + ("--gc-interval", "3600"))
    url = metrics_url(srv)
    db = make_db(srv)
    monitor = make_storage(srv)
    commit_root(db, "shared", Item(0))
    base = scrape(url)

    # A conflict that cannot be resolved: the second writer's vote fails.
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(transaction_manager=tm1), db.open(transaction_manager=tm2)
    tm1.begin()
    tm2.begin()
    c1.root()["shared"].value = 1
    c2.root()["shared"].value = 2
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.abort()
    c1.close()
    c2.close()
    m = scrape(url)
    d = lambda name: per_storage(m, name) - per_storage(base, name)  # noqa
    assert d("zeotemp_conflicts_total") >= 1
    assert d("zeotemp_aborts_total") >= 1
    status = monitor.server_status()
    assert per_storage(m, "zeotemp_conflicts_total") == status["conflicts"]
    assert per_storage(m, "zeotemp_aborts_total") == status["aborts"]

    # One transaction holds the commit lock, another waits for it.
    a, b = make_storage(srv), make_storage(srv)
    txn_a = raw_vote(a, a.new_oid(), 1)
    txn_b = TransactionMetaData(description="waits")
    b.tpc_begin(txn_b)
    b.store(b.new_oid(), z64,
            make_record(PersistentMapping, {"data": {}}), "", txn_b)
    waiter = threading.Thread(target=b.tpc_vote, args=(txn_b,), daemon=True)
    waiter.start()
    try:
        m = wait_until(
            lambda: (lambda f: f if per_storage(
                f, "zeotemp_commit_lock_waiters") == 1 else None)(scrape(url)),
            30, message="a vote waiting for the commit lock")
        assert per_storage(m, "zeotemp_active_transactions") == 2
        assert per_storage(m, "zeotemp_commit_lock_held_seconds") > 0
    finally:
        a.tpc_finish(txn_a)
        waiter.join(30)
        b.tpc_finish(txn_b)
    m = scrape(url)
    assert per_storage(m, "zeotemp_commit_lock_waiters") == 0
    assert per_storage(m, "zeotemp_active_transactions") == 0
    assert per_storage(m, "zeotemp_commit_lock_held_seconds") == 0

    # Garbage: linked, unlinked, packed (zeotemp collects at pack).
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    conn.root()["tmp"] = PersistentMapping({i: Item(i) for i in range(5)})
    tm.commit()
    tm.begin()
    del conn.root()["tmp"]
    tm.commit()
    conn.close()
    before_pack = scrape(url)
    db.pack()
    m = scrape(url)
    freed = (per_storage(m, "zeotemp_gc_freed_objects_total")
             - per_storage(before_pack, "zeotemp_gc_freed_objects_total"))
    assert freed >= 6  # the mapping and its five items
    assert (per_storage(m, "zeotemp_gc_collections_total")
            > per_storage(before_pack, "zeotemp_gc_collections_total"))
    # The pack's log line reads as a sentence (it was a Rust debug dump),
    # and its figures are this pack's.
    line = wait_until(
        lambda: next((ln for ln in srv.log_text().splitlines()
                      if "packed to" in ln), None),
        10, message="the pack's log line")
    said = re.search(
        r"packed to \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} UTC: "
        r"dropped (\d+) old revisions; collected: (\d+) of (\d+) objects "
        r"freed \(longest lock hold [\d.]+ ms\); (\d+) objects, (\d+) bytes "
        r"left; took [\d.]+ ms", line)
    assert said, line
    assert int(said.group(1)) >= 1  # the root's revision before the unlink
    assert int(said.group(2)) == freed
    assert int(said.group(4)) == per_storage(m, "zeotemp_objects")
    assert int(said.group(5)) == per_storage(m, "zeotemp_current_bytes")
    status = monitor.server_status()
    assert per_storage(m, "zeotemp_gc_freed_objects_total") == (
        status["freed-objects"])
    assert per_storage(m, "zeotemp_objects") == status["objects"]
    assert per_storage(m, "zeotemp_unscannable_records") == 0
    # Both come from one count of microseconds; compare in that unit
    # (seconds and milliseconds as floats do not divide exactly: 9 us is
    # 9e-06 s, but 0.009 ms / 1000 is 9.000000000000001e-06).
    assert round(per_storage(m, "zeotemp_gc_longest_pause_seconds") * 1e6) == (
        round(status["longest-pause-ms"] * 1000))
    # The last cycle's longest pause (the pack's): no more than the worst.
    assert round(per_storage(m, "zeotemp_gc_last_pause_seconds") * 1e6) == (
        round(status["last-pause-ms"] * 1000))
    assert (per_storage(m, "zeotemp_gc_last_pause_seconds")
            <= per_storage(m, "zeotemp_gc_longest_pause_seconds"))


@pytest.mark.zeotemp_only(reason="the Prometheus endpoint")
def test_metrics_http_edges(server_factory, make_db):
    srv = server_factory(zeotemp_args=METRICS)
    url = metrics_url(srv)
    base = url[:-len("/metrics")]
    for path, code in [("/", 404), ("/metricsx", 404), ("/favicon.ico", 404)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=30)
        assert e.value.code == code
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x"),
                               timeout=30)
    assert e.value.code == 405
    head = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                  timeout=30)
    assert head.status == 200 and head.read() == b""
    assert scrape(url + "?name[]=x")["zeotemp_storages"][()] == 1

    # Malformed: a ZEO client (zeo-nagios) pointed at the metrics port, and
    # text that is not an HTTP request: a 400, then the connection ends.
    for junk in (b"\x00\x00\x00\x04ruok", b"HELLO THERE\r\n\r\n"):
        got = raw_http(url, junk)
        assert got.startswith(b"HTTP/1.1 400 "), got
        assert b"Connection: close\r\n" in got
    # Too long a request head: 431, closed.
    got = raw_http(url, b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431 "), got[:100]
    # One request per connection: a second one on it is not answered.
    got = raw_http(url, b"GET /metrics HTTP/1.1\r\n\r\n" * 2)
    assert got.count(b"HTTP/1.1 200 OK") == 1

    # Scrapers that connect and send nothing (more than are served at
    # once) are closed by the server; meanwhile ZEO clients are served.
    idle = [socket.create_connection(host_port(url), 60) for _ in range(20)]
    try:
        db = make_db(srv)
        for i in range(5):
            commit_root(db, "n", i)
        for s in idle:
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in idle:
            s.close()
    assert per_storage(scrape(url), "zeotemp_commits_total") == 5

    # A stop with a scraper connected: a clean exit.
    hung = socket.create_connection(host_port(url), 60)
    hung.sendall(b"GET /metrics HTTP/1.1\r\n")
    try:
        os.killpg(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(60) == 0
    finally:
        hung.close()
    assert "stopped" in srv.log_text()


@pytest.mark.zeotemp_only(reason="the Prometheus endpoint")
def test_refusals_and_disconnects_of_stock_clients_are_counted(
        server_factory, make_db):
    """Every refusal and fault counter is there, at 0, before anything
    happens; a stock client's commit over the memory limit counts as a
    memory-limit vote refusal, and its closing as a `client` disconnect,
    logged at INFO in one line with what the connection did."""
    limit = 1024 * 1024
    srv = server_factory(zeotemp_args=METRICS + ("--memory-limit", limit))
    url = metrics_url(srv)
    before = scrape(url)
    for name, reasons in [
            ("zeotemp_connections_refused_total",
             ("max-connections", "accept-error")),
            ("zeotemp_tls_handshake_failures_total", ("error", "timeout")),
            ("zeotemp_disconnects_total",
             ("client", "slow-client", "transaction-timeout",
              "frame-timeout", "protocol-error", "tls-handshake", "ruok",
              "shutdown", "internal-error"))]:
        assert {dict(k)["reason"]: v for k, v in before[name].items()} == {
            r: 0 for r in reasons}, name
    refused = lambda f, reason: f["zeotemp_votes_refused_total"][  # noqa
        (("storage", "1"), ("reason", reason))]
    assert refused(before, "memory-limit") == 0

    db = make_db(srv)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["small"] = Item(b"s" * 100)
    tm.commit()
    conn.root()["big"] = Item(b"b" * (2 * limit))
    with pytest.raises(ServerException, match="memory-limit"):
        tm.commit()
    tm.abort()
    assert refused(scrape(url), "memory-limit") == 1
    assert refused(scrape(url), "transaction-size") == 0
    conn.close()
    db.close()

    def client_disconnect_counted():
        f = scrape(url)["zeotemp_disconnects_total"]
        return f[(("reason", "client"),)] >= 1
    wait_until(client_disconnect_counted, 10,
               message="the client's disconnect to be counted")
    lines = [line for line in srv.log_text().splitlines()
             if "disconnected: client closed the connection" in line]
    assert lines and all(" INFO " in line for line in lines), lines
    # The connection that committed: its commit and its aborted vote.
    mine = [line for line in lines if " commits=1 " in line]
    assert len(mine) == 1, lines
    assert " reason=client " in mine[0] and " aborts=1 " in mine[0], mine
    assert re.search(r" requests=\d+ loads=\d+ ", mine[0]), mine
    assert re.search(r" seconds=[0-9.]+ ", mine[0]), mine


@pytest.mark.zeotemp_only(reason="the Prometheus endpoint")
def test_metrics_off_by_default_and_set_in_the_config_file(server_factory,
                                                           tmp_path):
    plain = server_factory()
    assert "metrics on" not in plain.log_text()
    conf = tmp_path / "zeotemp.toml"
    conf.write_text('metrics-address = "127.0.0.1:0"\n')
    srv = server_factory(zeotemp_args=("--config", str(conf)))
    assert scrape(metrics_url(srv))["zeotemp_storages"][()] == 1


@pytest.mark.skipif(IS_PYTHON, reason="runs the zeotemp binary itself")
def test_bad_metrics_address_stops_the_start():
    r = subprocess.run([str(ZEOTEMP_BIN), "--address", "127.0.0.1:0",
                        "--metrics-address", "nonsense"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "metrics-address" in r.stderr, r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [str(ZEOTEMP_BIN), "--address", "127.0.0.1:0",
             "--metrics-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in r.stderr, (
        r.stderr)
