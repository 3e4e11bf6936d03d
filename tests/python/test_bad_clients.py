"""Load from bad clients never stalls good ones.

While raw-socket clients misbehave -- a thousand connections held (some
never handshaken), a hundred half-sent frames, clients that pipeline
20,000 requests and never read a reply, floods of ``new_oids`` with absurd
counts, connect/disconnect churn -- a well-behaved stock client (a
separate process: ``ClientStorage`` + ``ZODB.DB``, ``zeotemp_badclients.py
good``) keeps loading and committing, and gets every commit's invalidation
at a second ``ClientStorage``.  Asserted here: no error, progress during
every attack, no operation taking longer than ``LIVENESS`` (a hang check,
not a performance bound: ``bench/bad_clients.py`` measures the stalls), and
the server's RSS under a bound computed from the limits it was started
with.  Also: a client that never reads is disconnected once its queue
overflows (with a log line) while the good client's invalidations keep
arriving; ``max-connections`` refuses further connections at once, with a
log line, and accepts new ones after some close.

The bad clients are in ``zeotemp_badclients.py`` (shared with the
benchmark).  The stock server has none of these limits: every test here is
``zeotemp_only``.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transaction
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

import zeotemp_badclients as bc
from zeotemp_util import stop_group, wait_until

HERE = Path(__file__).resolve().parent
KIB = 1024
MIB = 1024 * 1024

# No good-client operation may take longer than this: a hang check (the
# stock client waits forever for a reply), far above any real stall.
LIVENESS = 10.0
# Each attack is held this long while the good client runs.
HOLD = 2.0

# The main test's server limits, and what the RSS bound is computed from.
MAX_OUTBOX = 4 * MIB
MAX_FRAME = 1 * MIB
FRAME_TIMEOUT = 3
HELD, SILENT, HALF = 1000, 100, 100
PIPELINERS, PIPELINED = 2, 20_000
BIG = 16 * KIB          # the object the pipeliners load: 20,000 replies of
                        # it are 320 MiB per client if nothing bounds them
FLOOD_CLIENTS, FLOOD_REQUESTS = 2, 5_000

pytestmark = pytest.mark.zeotemp_only(
    reason="the stock server has no max-outbox-bytes, frame-timeout or "
           "max-connections: it buffers replies for a client that never "
           "reads, without bound")


class GoodClient:
    """The well-behaved client process; its operations are read back from
    the file it writes."""

    def __init__(self, srv, workdir, big_size=4096):
        host, port = srv.address
        workdir = Path(workdir)
        self.out = workdir / "good.ops"
        self.setup_path = workdir / "good.json"
        self.log = open(workdir / "good.stderr", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "zeotemp_badclients.py"), "good",
             "--address", f"{host}:{port}", "--out", str(self.out),
             "--setup", str(self.setup_path), "--big-size", str(big_size),
             "--inval-timeout", str(LIVENESS)],
            cwd=str(HERE), stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=self.log, start_new_session=True)
        self.setup = wait_until(self._setup, 60, 0.05, "the good client's setup")

    def _setup(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"good client exited with {self.proc.returncode}: "
                                 f"{self.stderr()}")
        if self.setup_path.exists():
            import json
            return json.loads(self.setup_path.read_text())
        return None

    def stderr(self):
        try:
            return Path(self.log.name).read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def ops(self):
        return bc.read_ops(self.out)

    def check(self, what, t0, t1, min_commits=2):
        """The good client made progress (``min_commits`` commits started
        after t0, an operation ending after t1) within ``LIVENESS`` of
        t1, with no error and no operation or gap between operations as
        long as ``LIVENESS``."""
        def progressed():
            if self.proc.poll() is not None:
                raise AssertionError(f"good client died: {self.stderr()}")
            ops = self.ops()
            commits = [o for o in ops
                       if o[0] == "commit" and not o[3] and o[1] >= t0]
            return (len(commits) >= min_commits
                    and any(o[2] > t1 for o in ops))
        wait_until(progressed, LIVENESS, 0.05,
                   f"the good client to commit {min_commits} times during "
                   f"and after {what}")
        ops = self.ops()
        w = bc.window_stats(ops, t0, time.monotonic())
        errors = [o for o in ops if o[3]]
        assert not errors, f"{what}: good client errors {errors[:5]}"
        assert w["max"] < LIVENESS, f"{what}: an operation took {w['max']:.1f} s"
        assert w["max_gap"] < LIVENESS, \
            f"{what}: no operation finished for {w['max_gap']:.1f} s"
        return w

    def stop(self):
        stop_group(self.proc, 15, 5)
        self.log.close()


@pytest.fixture
def good_client(tmp_path):
    clients = []

    def start(srv, **kw):
        d = tmp_path / f"good{len(clients) + 1}"
        d.mkdir()
        clients.append(GoodClient(srv, d, **kw))
        return clients[-1]

    yield start
    for c in clients:
        c.stop()


def log_count(srv, text):
    return srv.log_text().count(text)


def drained_to_close(sock, timeout=LIVENESS):
    """Reads (and drops) what the server sent until it closes; True if it
    closed within ``timeout``."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def run_attack(attack, hold=HOLD):
    t0 = time.monotonic()
    attack.start()
    time.sleep(hold)
    return t0


def test_good_client_unaffected_by_bad_clients(server_factory, good_client):
    # The connections' ends at debug level too: their warnings are
    # rate-limited (one per kind per 10 s), the others are debug lines, and
    # the log counts below want one line per connection.
    srv = server_factory(zeotemp_args=(
        "--max-outbox-bytes", MAX_OUTBOX, "--max-frame-size", MAX_FRAME,
        "--frame-timeout", FRAME_TIMEOUT,
        "--log-level", "info,zeotemp::server::connection=debug"))
    good = good_client(srv, big_size=BIG)
    big_oid = bytes.fromhex(good.setup["big_oid"])
    time.sleep(0.5)
    rss = bc.RssSampler(srv.proc.pid)
    try:
        baseline = rss.now()
        # Each connection (task, buffers, outbox) gets 64 KiB; each
        # pipeliner twice its outbox bound (queued frames and what the
        # writer took); the half frames what they sent, twice; plus 48 MiB
        # for allocator slack. Unbounded buffering of the pipelined replies
        # alone would be PIPELINERS x PIPELINED x BIG = 640 MiB.
        half_bytes = bc.HalfFrames(srv.address, HALF, MAX_FRAME).shapes
        half_bytes = sum(s for _, s in half_bytes) * HALF // len(half_bytes)
        bound_kib = baseline + (
            64 * KIB * (HELD + SILENT + HALF + PIPELINERS + FLOOD_CLIENTS)
            + 2 * MAX_OUTBOX * PIPELINERS + 2 * half_bytes + 48 * MIB) // KIB
        report = {}

        def check_rss(what, t0):
            peak = rss.peak(t0)
            report[what] = peak
            assert peak <= bound_kib, (
                f"{what}: server RSS {peak} KiB over the bound {bound_kib} KiB "
                f"(baseline {baseline} KiB)")

        # 1. A thousand connections handshaken and held, a hundred silent.
        held = bc.HeldConnections(srv.address, HELD, SILENT)
        t0 = run_attack(held)
        try:
            assert held.failed == 0, held.stats()
            assert sum(bc.peer_closed(c.sock) for c in held.clients) == 0, \
                "handshaken idle connections are never timed out"
            # The silent ones go after the frame timeout, with a log line.
            wait_until(lambda: all(bc.peer_closed(s) for s in held.silent),
                       FRAME_TIMEOUT + LIVENESS, 0.2,
                       "the server to close the silent connections")
            assert log_count(srv, "no handshake within frame-timeout") >= SILENT
            good.check("held connections", t0, time.monotonic())
            check_rss("held connections", t0)
        finally:
            held.stop()

        # 2. Half-sent frames: held until the frame timeout closes them.
        half = bc.HalfFrames(srv.address, HALF, max_frame_size=MAX_FRAME)
        t0 = run_attack(half, hold=0.5)
        try:
            assert not half.errors, half.stats()
            wait_until(lambda: half.closed_by_server() == HALF,
                       FRAME_TIMEOUT + LIVENESS, 0.2,
                       "the server to close the half-sent frames")
            assert log_count(srv, "is still incomplete") >= HALF * 24 // 25
            good.check("half-sent frames", t0, time.monotonic())
            check_rss("half-sent frames", t0)
        finally:
            half.stop()

        # 3. Clients pipelining 20,000 loads of a 16 KiB object each and
        # never reading.
        pipe = bc.Pipeliners(srv.address, PIPELINERS, PIPELINED, big_oid)
        t0 = run_attack(pipe)
        try:
            assert not pipe.errors, pipe.stats()
            good.check("never-reading pipeliners", t0, time.monotonic())
            check_rss("never-reading pipeliners", t0)
        finally:
            pipe.stop()

        # 4. new_oids floods with absurd counts among normal ones: every
        # request answered on a connection that stays up, no oid twice.
        flood = bc.NewOidsFlood(srv.address, FLOOD_CLIENTS, FLOOD_REQUESTS)
        t0 = run_attack(flood, hold=0)
        try:
            wait_until(lambda: all(flood.finished) or flood.errors, 60, 0.1,
                       "the new_oids flood to be answered")
            st = flood.stats()
            assert not flood.errors, st
            assert st["replies"] == st["requests"], st
            assert flood.duplicate_oids() == 0
            for count, outcomes in st["absurd"].items():
                for outcome in outcomes:
                    ok = outcome.startswith("error ") or (
                        int(outcome.split()[0]) in range(1, 101))
                    assert ok, f"new_oids({count}) -> {outcome}"
            # A count beyond 64 bits is an error reply; 2**31 gives at most
            # ZEO's 100.
            assert st["absurd"]["2147483648"] == ["100 oids"], st["absurd"]
            good.check("new_oids flood", t0, time.monotonic(), min_commits=1)
            check_rss("new_oids flood", t0)
        finally:
            flood.stop()

        # 5. Connect / disconnect churn.
        churn = bc.Churn(srv.address, threads=4)
        t0 = run_attack(churn)
        try:
            good.check("connection churn", t0, time.monotonic())
            check_rss("connection churn", t0)
        finally:
            churn.stop()
        st = churn.stats()
        assert st["failures"] == 0 and st["cycles"] > 50, st
        print(f"RSS baseline {baseline} KiB, bound {bound_kib} KiB, "
              f"peaks {report}")
        assert srv.running
    finally:
        rss.stop()


def test_never_reading_client_is_disconnected_and_invalidations_flow(
        server_factory, good_client, make_db):
    # Small queues: the never-reading client's outbox fills with
    # invalidations after a few thousand oids.
    srv = server_factory(zeotemp_args=(
        "--max-outbox-bytes", 64 * KIB, "--max-frame-size", 32 * KIB))
    good = good_client(srv)
    big_oid = bytes.fromhex(good.setup["big_oid"])
    t0 = time.monotonic()
    # Pipelines loads and never reads: the server stops reading it once its
    # queue is half full (the kernel's buffers took what they could).
    sleeper = bc.Pipeliners(srv.address, 1, PIPELINED, big_oid,
                            rcvbuf=16 * KIB).start()
    try:
        time.sleep(1.0)
        assert not sleeper.errors, sleeper.stats()
        # Other clients' commits are invalidated to it until its queue
        # overflows: then it is disconnected, with a log line.
        db = make_db(srv)
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        tm.begin()
        conn.root()["bulk"] = bulk = OOBTree()
        tm.commit()
        marker = "client is not reading: outbound queue over max-outbox-bytes"
        n = 0
        while log_count(srv, marker) == 0:
            n += 1
            assert n <= 60, "the never-reading client was not disconnected"
            tm.begin()
            for i in range(300):
                bulk[f"{n}-{i}"] = PersistentMapping({"i": i})
            tm.commit()
        assert drained_to_close(sleeper.clients[0].sock), \
            "the never-reading client's connection was closed"
        t1 = time.monotonic()
        # Meanwhile the good client committed and got every invalidation.
        w = good.check("the never-reading client", t0, t1)
        assert w["by_kind"]["inval"]["ops"] >= 2
        # And it still does, after the disconnect.
        t2 = time.monotonic()
        time.sleep(1.0)
        good.check("after the disconnect", t2, time.monotonic(), min_commits=1)
        assert srv.running
    finally:
        sleeper.stop()


def refused(address, timeout=5.0):
    """Connects; True if the server closes the connection without its
    greeting within ``timeout``, False if it greets."""
    s = socket.create_connection(address, timeout)
    try:
        s.settimeout(timeout)
        try:
            data = s.recv(6)
        except socket.timeout:
            raise AssertionError("neither greeted nor closed in time")
        except OSError:
            return True
        return data == b""
    finally:
        s.close()


def test_max_connections_refuses_then_accepts_again(server_factory, good_client):
    limit = 30
    srv = server_factory(zeotemp_args=("--max-connections", limit))
    good = good_client(srv)          # two connections: storage and watcher
    t0 = time.monotonic()
    held = bc.HeldConnections(srv.address, limit - 2).start()
    try:
        assert held.failed == 0, held.stats()
        # Full: further connections are closed at once, with a warning
        # that is rate-limited (one per 10 s; the rest at debug level): not
        # a log line per refused connection, which floods journald.
        for _ in range(10):
            assert refused(srv.address)
        wait_until(lambda: log_count(
            srv, "connection refused: max-connections reached") >= 1, 5, 0.05,
            "a warning for the refused connections")
        # (A second one only if the ten took more than 10 s.)
        assert log_count(
            srv, "connection refused: max-connections reached") <= 2, \
            srv.log_text()
        # The connected clients are not disturbed.
        good.check("max-connections reached", t0, time.monotonic(), min_commits=1)
        # Closing some makes room for as many new ones (the server counts
        # a connection until it has seen the close), and no more.
        for c in held.clients[:5]:
            c.close()
        more = []
        deadline = time.monotonic() + LIVENESS
        while len(more) < 5:
            assert time.monotonic() < deadline, \
                f"only {len(more)} of 5 new connections accepted"
            c = bc.RawClient(srv.address, 10)
            try:
                c.handshake()
                c.register("1")
                more.append(c)
            except (bc.Closed, OSError):
                c.close()
                time.sleep(0.1)
        try:
            assert refused(srv.address)
        finally:
            for c in more:
                c.close()
        good.check("after max-connections", t0, time.monotonic())
    finally:
        held.stop()


def test_max_connections_holds_for_a_burst(server_factory):
    limit = 40
    srv = server_factory(zeotemp_args=("--max-connections", limit))
    # Stop the server, queue 200 connections in its listen backlog (the
    # kernel completes them), and let it accept them all in one go.
    os.kill(srv.proc.pid, signal.SIGSTOP)
    socks = []
    try:
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(srv.address)
            except BlockingIOError:
                pass
            socks.append(s)
        time.sleep(0.3)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    try:
        def counts():
            greeted = closed = 0
            for s in socks:
                try:
                    data = s.recv(6, socket.MSG_PEEK)
                    if data == b"":
                        closed += 1
                    else:
                        greeted += 1
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            return (greeted, closed) if greeted + closed == len(socks) else None
        greeted, closed = wait_until(counts, 20, 0.1,
                                     "every queued connection answered")
        assert greeted <= limit, \
            f"{greeted} connections accepted with max-connections {limit}"
    finally:
        for s in socks:
            s.close()
