"""Bad ZEO clients on raw sockets, and a well-behaved real client to watch
while they run; shared by ``test_bad_clients.py`` and
``bench/bad_clients.py``.  Must stay importable without pytest.

The bad clients speak the ZEO 5 framing by hand: every message is a 4-byte
big-endian length and a payload; the server first sends the frame ``Z5``,
the client answers ``Z5``, and every later payload is
``pickle.dumps((msgid, oneway, method, args), protocol=3)``.  A reply is
``(msgid, flag, '.reply', value)``; ``flag`` 1 means an error, then
``value`` is ``(exception class name, args)``.

* :class:`HeldConnections` -- many connections opened, handshaken (some
  never) and held;
* :class:`HalfFrames` -- connections that send a frame header and part of
  the frame, then hold;
* :class:`Pipeliners` -- registered clients that pipeline many
  ``loadBefore`` / ``lastTransaction`` requests and never read a reply;
* :class:`NewOidsFlood` -- pipelined ``new_oids`` with absurd counts among
  many normal ones (the replies are read and checked: one per request, no
  oid handed out twice);
* :class:`Churn` -- connect / handshake / (register) / disconnect in loops.

Every attack has ``start()``, ``stop()`` (closes everything it opened) and
``stats()``.

The good client (``python zeotemp_badclients.py good ...``, see
:func:`good_client_main`) is a separate process with a stock
``ClientStorage`` + ``ZODB.DB``: it loops loads and commits into an
``OOBTree`` and waits after each commit until a second ``ClientStorage``
(no ``server_sync``) has received the commit's invalidation, and writes one
line per operation (kind, start, end on the machine-wide monotonic clock,
error) to a file; :func:`read_ops` and :func:`window_stats` summarise them.
"""

import argparse
import json
import os
import pickle
import random
import signal
import socket
import struct
import sys
import threading
import time

MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
Z64 = b"\0" * 8

# new_oids counts a hostile client may send: ZEO caps n at 100 and makes
# n <= 0 one oid; zeotemp does the same and answers integers beyond 64 bits
# with an error reply.
ABSURD_COUNTS = (2 ** 31, -1, 10 ** 9, 0, 2 ** 63 - 1, -(2 ** 63),
                 2 ** 64, 2 ** 200, -(2 ** 70), 10 ** 30)


# -- framing -------------------------------------------------------------------

def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def request(msgid, method, args=(), oneway=False):
    """One whole request frame."""
    return frame(pickle.dumps((msgid, oneway, method, tuple(args)), 3))


def parse_address(text):
    host, port = text.rsplit(":", 1)
    return (host, int(port))


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """A blocking raw-socket ZEO client (one connection)."""

    def __init__(self, address, timeout=10.0, connect=True):
        self.address = tuple(address)
        self.timeout = timeout
        self.buf = bytearray()
        self.msgid = 0
        self.sock = None
        if connect:
            self.sock = socket.create_connection(self.address, timeout)
            self.sock.settimeout(timeout)

    def close(self, reset=False):
        if self.sock is None:
            return
        try:
            if reset:
                # SO_LINGER 0: close sends RST instead of FIN.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            else:
                # Wakes a thread blocked reading this socket (close alone
                # does not).
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.sock = None

    def _fill(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise Closed("server closed the connection")
            self.buf += data

    def read_frame(self):
        self._fill(4)
        (n,) = struct.unpack(">I", self.buf[:4])
        self._fill(4 + n)
        payload = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return payload

    def handshake(self):
        hello = self.read_frame()
        if hello != b"Z5":
            raise AssertionError(f"server greeted with {hello!r}, not b'Z5'")
        self.sock.sendall(frame(b"Z5"))

    def next_id(self):
        self.msgid += 1
        return self.msgid

    def send(self, method, *args, oneway=False):
        msgid = self.next_id()
        self.sock.sendall(request(msgid, method, args, oneway))
        return msgid

    def message(self):
        return pickle.loads(self.read_frame())

    def call(self, method, *args):
        """Returns the reply value; an error reply raises ``ServerError``."""
        msgid = self.send(method, *args)
        while True:
            mid, flag, name, value = self.message()
            if name != ".reply":
                continue    # a push (invalidateTransaction, info)
            if mid != msgid:
                raise AssertionError(f"reply to {mid}, expected {msgid}")
            if flag:
                raise ServerError(*value)
            return value

    def register(self, storage="1", read_only=False):
        return self.call("register", storage, read_only)


class ServerError(Exception):
    def __init__(self, cls, args):
        super().__init__(cls, args)
        self.cls = cls


def peer_closed(sock):
    """True if the server has closed ``sock`` (EOF or reset), without
    blocking.  Reads and drops whatever the server sent before (the
    greeting, replies): for connections whose input nobody needs."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


# -- attacks -------------------------------------------------------------------

class Attack:
    name = "attack"

    def __init__(self):
        self._stop = threading.Event()
        self._threads = []
        self.errors = []

    def _thread(self, fn, *args):
        t = threading.Thread(target=self._guard, args=(fn,) + args, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported in stats
            if not self._stop.is_set():
                self.errors.append(f"{type(e).__name__}: {e}")

    def start(self):
        raise NotImplementedError

    def _wait_ready(self):
        try:
            self._ready.wait(60)
        except threading.BrokenBarrierError:
            pass

    def _registered_client(self, rcvbuf=None):
        """A new RawClient, handshaken and registered on ``self.storage``
        (kept in ``self.clients``); then waits at ``self._ready`` whether
        that worked or not, so the start of the attack is never held up."""
        c = RawClient(self.address, 30)
        if rcvbuf:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.clients.append(c)
        try:
            c.handshake()
            c.register(self.storage)
        finally:
            self._wait_ready()
        return c

    def _start_clients(self):
        """Runs ``self._run(i)`` for each of ``self.k`` clients in its own
        thread; returns once each has passed ``self._ready`` (a barrier of
        k + 1), or after 60 s."""
        for i in range(self.k):
            self._thread(self._run, i)
        self._wait_ready()
        return self

    def stop(self):
        self._stop.set()
        self.close_all()
        for t in self._threads:
            t.join(30)

    def close_all(self):
        pass

    def stats(self):
        return {"errors": list(self.errors[:5]), "n_errors": len(self.errors)}


class HeldConnections(Attack):
    """``n`` connections handshaken and held, plus ``unhandshaken`` that
    connect and never send (nor read) anything."""

    name = "held"

    def __init__(self, address, n, unhandshaken=0, timeout=30.0):
        super().__init__()
        self.address, self.n, self.unhandshaken = address, n, unhandshaken
        self.timeout = timeout
        self.clients = []
        self.silent = []
        self.failed = 0
        self.open_seconds = None

    def start(self):
        t0 = time.monotonic()
        for _ in range(self.n):
            try:
                c = RawClient(self.address, self.timeout)
                c.handshake()
                self.clients.append(c)
            except (OSError, Closed, AssertionError) as e:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{type(e).__name__}: {e}")
        for _ in range(self.unhandshaken):
            try:
                self.silent.append(socket.create_connection(self.address,
                                                            self.timeout))
            except OSError as e:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{type(e).__name__}: {e}")
        self.open_seconds = time.monotonic() - t0
        return self

    def closed_by_server(self):
        return (sum(peer_closed(c.sock) for c in self.clients)
                + sum(peer_closed(s) for s in self.silent))

    def close_all(self):
        for c in self.clients:
            c.close()
        for s in self.silent:
            try:
                s.close()
            except OSError:
                pass

    def stats(self):
        return dict(super().stats(), held=len(self.clients),
                    unhandshaken=len(self.silent), failed=self.failed,
                    open_seconds=round(self.open_seconds or 0, 2))


class HalfFrames(Attack):
    """``n`` connections, each handshaken, then a frame header announcing
    ``length`` bytes and only ``sent`` of them; a few stop half-way through
    the handshake frame instead.  Lengths cycle through ``shapes``."""

    name = "half-frames"

    def __init__(self, address, n, max_frame_size=64 * 1024 * 1024,
                 shapes=None, timeout=30.0):
        super().__init__()
        self.address, self.n = address, n
        self.timeout = timeout
        if shapes is None:
            shapes = [(1000, 500), (64 * 1024, 60 * 1024),
                      (1024 * 1024, 256 * 1024), (16 * 1024 * 1024, 4),
                      (max_frame_size, 1024)]
        self.shapes = [(min(l, max_frame_size), min(s, l - 1, max_frame_size))
                       for l, s in shapes]
        self.clients = []
        self.bytes_sent = 0

    def start(self):
        for i in range(self.n):
            try:
                c = RawClient(self.address, self.timeout)
                if i % 25 == 24:
                    # Half a handshake: 4 header bytes announcing 2, and 1.
                    c.read_frame()
                    c.sock.sendall(b"\0\0\0\x02Z")
                    self.bytes_sent += 5
                else:
                    c.handshake()
                    length, sent = self.shapes[i % len(self.shapes)]
                    body = pickle.dumps((1, False, "ping", ()), 3)
                    body = (body * (sent // len(body) + 1))[:sent]
                    c.sock.sendall(struct.pack(">I", length) + body)
                    self.bytes_sent += 4 + sent
                self.clients.append(c)
            except (OSError, Closed, AssertionError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
        return self

    def closed_by_server(self):
        return sum(peer_closed(c.sock) for c in self.clients)

    def close_all(self):
        for c in self.clients:
            c.close()

    def stats(self):
        return dict(super().stats(), held=len(self.clients),
                    bytes_sent=self.bytes_sent)


class Pipeliners(Attack):
    """``k`` registered clients, each sending ``n`` requests (``loadBefore``
    of ``oid`` at the newest tid; every 10th one ``lastTransaction``) as fast
    as the server takes them, and never reading a reply.  A client whose
    send fails (the server closed it) stops."""

    name = "pipeline"

    def start(self):
        return self._start_clients()

    def __init__(self, address, k, n, oid, storage="1", batch=500,
                 rcvbuf=None):
        super().__init__()
        self.address, self.k, self.n, self.oid = address, k, n, oid
        self.storage, self.batch, self.rcvbuf = storage, batch, rcvbuf
        self.sent = [0] * k          # whole requests sent, per client
        self.done = [False] * k      # all n sent
        self.cut = [None] * k        # the error that ended the sending
        self.clients = []
        self._ready = threading.Barrier(k + 1)


    def _run(self, i):
        c = self._registered_client(self.rcvbuf)
        c.sock.settimeout(0.2)
        msgid = c.msgid
        while self.sent[i] < self.n and not self._stop.is_set():
            frames = []
            for _ in range(min(self.batch, self.n - self.sent[i])):
                msgid += 1
                if msgid % 10 == 0:
                    frames.append(request(msgid, "lastTransaction"))
                else:
                    frames.append(request(msgid, "loadBefore",
                                          (self.oid, MAXTID)))
            data = memoryview(b"".join(frames))
            off = 0
            while off < len(data):
                if self._stop.is_set():
                    return
                try:
                    off += c.sock.send(data[off:])
                except socket.timeout:
                    continue
                except OSError as e:
                    self.cut[i] = f"{type(e).__name__}: {e}"
                    self.sent[i] += self._whole(frames, off)
                    return
            self.sent[i] += len(frames)
        self.done[i] = self.sent[i] >= self.n

    @staticmethod
    def _whole(frames, nbytes):
        n = 0
        for f in frames:
            if nbytes < len(f):
                break
            nbytes -= len(f)
            n += 1
        return n

    def closed_by_server(self):
        return sum(1 for c in self.clients if c.sock is None
                   or peer_closed(c.sock))

    def close_all(self):
        for c in self.clients:
            c.close()

    def stats(self):
        return dict(super().stats(), clients=self.k,
                    requests_sent=sum(self.sent), all_sent=sum(self.done),
                    cut=sum(1 for x in self.cut if x))


class NewOidsFlood(Attack):
    """``k`` registered clients, each pipelining ``n`` ``new_oids`` requests
    (every ``absurd_every``-th with a count from ``ABSURD_COUNTS``, the
    others ``new_oids()`` or ``new_oids(100)``) from one thread while a
    second reads the replies.  Checks: one reply per request, in order; no
    oid handed out twice (over all clients)."""

    name = "new_oids"

    def start(self):
        return self._start_clients()

    def __init__(self, address, k, n, storage="1", absurd_every=20,
                 batch=200, counts=ABSURD_COUNTS):
        super().__init__()
        self.address, self.k, self.n = address, k, n
        self.storage, self.absurd_every, self.batch = storage, absurd_every, batch
        self.counts = counts
        self.replies = [0] * k
        self.error_replies = {}      # exception class -> count
        self.absurd_outcomes = {}    # repr(count) -> set of outcomes
        self.oids = 0
        self.ranges = []             # (first, last) of contiguous replies
        self.loose = set()           # oids from non-contiguous replies
        self.duplicates = 0
        self.clients = []
        self.finished = [False] * k
        self._lock = threading.Lock()
        self._ready = threading.Barrier(k + 1)


    def _arg(self, j):
        if j % self.absurd_every == self.absurd_every - 1:
            return (self.counts[(j // self.absurd_every) % len(self.counts)],)
        return () if j % 2 else (100,)

    def _run(self, i):
        c = self._registered_client()
        base = c.msgid + 1
        sender = threading.Thread(target=self._guard,
                                  args=(self._send, c, base), daemon=True)
        sender.start()
        self._threads.append(sender)
        for j in range(self.n):
            while True:
                mid, flag, name, value = c.message()
                if name == ".reply":
                    break
            if mid != base + j:
                raise AssertionError(f"reply to {mid}, expected {base + j}")
            args = self._arg(j)
            absurd = j % self.absurd_every == self.absurd_every - 1
            if flag:
                outcome = f"error {value[0]}"
                with self._lock:
                    self.error_replies[value[0]] = \
                        self.error_replies.get(value[0], 0) + 1
            else:
                outcome = f"{len(value)} oids"
                self._record_oids(value)
            if absurd:
                with self._lock:
                    self.absurd_outcomes.setdefault(repr(args[0]),
                                                    set()).add(outcome)
            self.replies[i] += 1
            if self._stop.is_set():
                return
        self.finished[i] = True

    def _send(self, c, base):
        for start in range(0, self.n, self.batch):
            if self._stop.is_set():
                return
            c.sock.sendall(b"".join(
                request(base + j, "new_oids", self._arg(j))
                for j in range(start, min(start + self.batch, self.n))))

    def _record_oids(self, oids):
        ints = [struct.unpack(">Q", o)[0] for o in oids]
        with self._lock:
            self.oids += len(ints)
            if ints and ints == list(range(ints[0], ints[0] + len(ints))):
                self.ranges.append((ints[0], ints[-1]))
            else:
                for x in ints:
                    if x in self.loose:
                        self.duplicates += 1
                    self.loose.add(x)

    def duplicate_oids(self):
        """Oids handed out more than once (over all clients)."""
        spans = sorted(self.ranges)
        dups = self.duplicates
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            if b0 <= a1:
                dups += min(a1, b1) - b0 + 1
        for x in self.loose:
            for a0, a1 in spans:     # few loose oids in practice
                if a0 <= x <= a1:
                    dups += 1
        return dups

    def close_all(self):
        for c in self.clients:
            c.close()

    def stats(self):
        return dict(super().stats(), clients=self.k,
                    requests=self.k * self.n, replies=sum(self.replies),
                    finished=sum(self.finished), oids=self.oids,
                    error_replies=dict(self.error_replies),
                    absurd={k: sorted(v) for k, v in self.absurd_outcomes.items()})


class Churn(Attack):
    """``threads`` loops of connect, handshake and (every other time)
    register + ``lastTransaction``, then close (every third time with a
    reset instead of FIN), until stopped."""

    name = "churn"

    def __init__(self, address, threads=4, storage="1"):
        super().__init__()
        self.address, self.nthreads, self.storage = address, threads, storage
        self.cycles = [0] * threads
        self.failures = 0
        self.t0 = self.t1 = None

    def start(self):
        self.t0 = time.monotonic()
        for i in range(self.nthreads):
            self._thread(self._run, i)
        return self

    def _run(self, i):
        n = 0
        while not self._stop.is_set():
            n += 1
            c = None
            try:
                c = RawClient(self.address, 10)
                c.handshake()
                if n % 2:
                    c.register(self.storage)
                    c.call("lastTransaction")
                self.cycles[i] += 1
            except (OSError, Closed, ServerError, AssertionError) as e:
                self.failures += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.01)
            finally:
                if c is not None:
                    c.close(reset=n % 3 == 0)

    def stop(self):
        super().stop()
        self.t1 = time.monotonic()

    def stats(self):
        secs = (self.t1 or time.monotonic()) - self.t0
        return dict(super().stats(), cycles=sum(self.cycles),
                    failures=self.failures,
                    per_second=round(sum(self.cycles) / secs) if secs else 0)


# -- the good client -------------------------------------------------------------

def good_client_main(argv=None):
    """A stock ZODB client: ``ClientStorage`` (``server_sync``) + ``DB``,
    and a second ``ClientStorage`` that only watches invalidations.

    Sets up ``root['bc_tree']`` (OOBTree), ``root['bc_counter']`` and
    ``root['bc_big']`` (a PersistentMapping holding ``--big-size`` bytes, for
    the pipelining bad clients to load), writes ``--setup`` (JSON: the oids)
    and then loops until SIGTERM (or ``--ops`` iterations):

    * ``load``: a new transaction (with ``server_sync``, a round trip) and
      ``loadSerial`` of a random recent revision (always a server call);
    * ``commit``: a new key in the tree and the counter incremented;
    * ``inval``: from the end of the commit until the watcher storage's
      ``lastTransaction()`` reaches the new tid (the invalidation arrived).

    Every operation appends ``kind start end error`` to ``--out`` (times
    from ``time.monotonic()``, the machine-wide monotonic clock)."""
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--setup", required=True)
    p.add_argument("--storage", default="1")
    p.add_argument("--big-size", type=int, default=4096)
    p.add_argument("--pause", type=float, default=0.002)
    p.add_argument("--ops", type=int, default=0)
    p.add_argument("--inval-timeout", type=float, default=60.0)
    a = p.parse_args(argv)

    import transaction
    import ZEO.ClientStorage
    import ZODB
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping
    from ZODB.utils import u64

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    address = parse_address(a.address)
    storage = ZEO.ClientStorage.ClientStorage(
        address, storage=a.storage, wait_timeout=60, server_sync=True)
    watcher = ZEO.ClientStorage.ClientStorage(
        address, storage=a.storage, wait_timeout=60)
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    root = conn.root()
    root["bc_tree"] = OOBTree()
    root["bc_counter"] = PersistentMapping({"n": 0})
    root["bc_big"] = PersistentMapping({"data": b"x" * a.big_size})
    tm.commit()
    tree, counter, big = root["bc_tree"], root["bc_counter"], root["bc_big"]
    revisions = [(counter._p_oid, counter._p_serial)]
    tmp = a.setup + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"big_oid": big._p_oid.hex(), "tree_oid": tree._p_oid.hex(),
                   "pid": os.getpid()}, f)
    os.replace(tmp, a.setup)

    rnd = random.Random(os.getpid())
    out = open(a.out, "a", buffering=1)

    def record(kind, t0, t1, err=""):
        out.write(f"{kind}\t{t0:.6f}\t{t1:.6f}\t{err}\n")

    i = 0
    while not stop.is_set() and (not a.ops or i < a.ops):
        i += 1
        # load
        t0 = time.monotonic()
        try:
            tm.begin()
            tree.get(f"k{rnd.randrange(i)}")
            oid, serial = rnd.choice(revisions)
            storage.loadSerial(oid, serial)
            record("load", t0, time.monotonic())
        except Exception as e:  # noqa: BLE001 - recorded
            record("load", t0, time.monotonic(), type(e).__name__)
            tm.abort()
            time.sleep(0.05)
            continue
        # commit
        t0 = time.monotonic()
        try:
            tree[f"k{i}"] = ("value", i, "x" * 100)
            counter["n"] = counter["n"] + 1
            tm.commit()
            t1 = time.monotonic()
            tid = counter._p_serial
            record("commit", t0, t1)
        except Exception as e:  # noqa: BLE001 - recorded
            record("commit", t0, time.monotonic(), type(e).__name__)
            tm.abort()
            time.sleep(0.05)
            continue
        revisions.append((counter._p_oid, tid))
        del revisions[:-50]
        # the invalidation reaches the other ClientStorage
        deadline = t1 + a.inval_timeout
        while u64(watcher.lastTransaction()) < u64(tid):
            if time.monotonic() > deadline or stop.is_set():
                break
            time.sleep(0.0005)
        if u64(watcher.lastTransaction()) >= u64(tid):
            record("inval", t1, time.monotonic())
        elif not stop.is_set():
            record("inval", t1, time.monotonic(), "InvalidationMissing")
        if a.pause:
            time.sleep(a.pause)
    out.close()
    try:
        tm.abort()
        conn.close()
        db.close()
        watcher.close()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def read_ops(path):
    """The good client's operations: a list of (kind, start, end, error)."""
    ops = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4:
                    ops.append((parts[0], float(parts[1]), float(parts[2]),
                                parts[3]))
    except FileNotFoundError:
        pass
    return ops


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def window_stats(ops, t0, t1):
    """Operations that started in [t0, t1): counts, errors and latencies
    (seconds) over all kinds, and the longest gap between two operations'
    ends (a stall shows as a gap even while one operation hangs)."""
    sel = [o for o in ops if t0 <= o[1] < t1]
    lat = sorted(o[2] - o[1] for o in sel)
    ends = sorted([t0] + [o[2] for o in sel if o[2] <= t1] + [t1])
    by_kind = {}
    for kind, s, e, err in sel:
        d = by_kind.setdefault(kind, {"ops": 0, "errors": 0, "max": 0.0})
        d["ops"] += 1
        d["errors"] += bool(err)
        d["max"] = max(d["max"], e - s)
    return {
        "ops": len(sel),
        "errors": sum(1 for o in sel if o[3]),
        "error_kinds": sorted({o[3] for o in sel if o[3]}),
        "commits": sum(1 for o in sel if o[0] == "commit" and not o[3]),
        "max": lat[-1] if lat else None,
        "p99": percentile(lat, 0.99),
        "p50": percentile(lat, 0.5),
        "max_gap": max((b - a for a, b in zip(ends, ends[1:])), default=None),
        "by_kind": by_kind,
    }


# -- memory ----------------------------------------------------------------------

from zeotemp_churn import rss_kib  # noqa: E402  (shared with the soak)


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread;
    ``peak(t0, t1)`` is the highest sample taken in that time."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            v = rss_kib(self.pid)
            if v is not None:
                self.samples.append((time.monotonic(), v))
            self._stop.wait(self.interval)

    def now(self):
        return rss_kib(self.pid)

    def peak(self, t0, t1=None):
        t1 = t1 if t1 is not None else time.monotonic()
        vals = [v for t, v in list(self.samples) if t0 <= t <= t1]
        return max(vals) if vals else None

    def stop(self):
        self._stop.set()
        self._t.join(5)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "good":
        good_client_main(sys.argv[2:])
    else:
        sys.exit("usage: zeotemp_badclients.py good --address HOST:PORT "
                 "--out FILE --setup FILE [...]")
