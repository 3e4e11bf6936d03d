"""Fixtures for the real-client (stock ZEO/ZODB) test suite of zeotemp.

The server under test is chosen by the environment variable
``ZEOTEMP_TEST_SERVER``:

* ``zeotemp`` (default): the Rust binary at ``$ZEOTEMP_BIN`` (default
  ``<repo>/target/debug/zeotemp``).
* ``python``: the stock ``ZEO.runzeo`` server with ``<mappingstorage>``
  storages, used to develop/validate the tests themselves.

Tests marked ``@pytest.mark.zeotemp_only(reason)`` describe behaviour that only
zeotemp provides (e.g. recovery after a restart); they run everywhere but are
``xfail(strict=False)`` on the python backend.
"""

import faulthandler
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zeotemp_util import BACKEND, IS_PYTHON, IS_ZEOTEMP, signal_group, stop_group

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

ZEOTEMP_BIN = Path(os.environ.get("ZEOTEMP_BIN",
                                  REPO / "target" / "debug" / "zeotemp"))

START_TIMEOUT = 30.0   # seconds to wait for a server to become ready
STOP_TIMEOUT = 10.0    # seconds between SIGTERM and SIGKILL
# Watchdog: a test still running after this many seconds gets its servers
# killed, which makes every pending ZEO client call fail (the stock client
# waits for replies forever), so a hung server cannot hang the suite.
TEST_TIMEOUT = float(os.environ.get("ZEOTEMP_TEST_TIMEOUT", "400"))

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TCP_READY = re.compile(r"listening on tcp (\S+):(\d+)")
_UNIX_READY = re.compile(r"listening on unix (\S+)")


def free_port():
    """A currently free TCP port on 127.0.0.1 (for runzeo, which needs one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class Server:
    """One server process (zeotemp or stock runzeo) with its log file.

    ``address`` is ``(host, port)`` for TCP or the socket path for unix.
    ``start()`` after ``stop()``/``kill()`` restarts on the same address.
    """

    def __init__(self, workdir, storages=("1",), read_only=False,
                 transaction_timeout=None, unix_socket=None, backend=BACKEND,
                 zeotemp_args=(), msgpack=False):
        self.backend = backend
        # Announce M5 (zeotemp --msgpack, runzeo's `msgpack true`).
        self.msgpack = msgpack
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storages = tuple(storages)
        self.read_only = read_only
        self.transaction_timeout = transaction_timeout
        self.unix_socket = str(unix_socket) if unix_socket else None
        # Extra command-line arguments for zeotemp (e.g. --gc-interval 1);
        # ignored by the python backend, which has no such options.
        self.zeotemp_args = tuple(str(a) for a in zeotemp_args)
        self.host = "127.0.0.1"
        self.port = None  # known after the first start
        self.proc = None
        self.starts = 0
        self.log_paths = []

    # -- public API ----------------------------------------------------
    @property
    def address(self):
        if self.unix_socket:
            return self.unix_socket
        if self.port is None:
            raise ServerError("server was never started")
        return (self.host, self.port)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        if self.running:
            raise ServerError("server already running")
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        self.log_paths.append(log_path)
        if self.backend == "zeotemp":
            cmd = self._zeotemp_cmd()
        else:
            cmd = self._python_cmd()
        self._log = open(log_path, "wb")
        env = dict(os.environ, NO_COLOR="1")
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=str(self.workdir), env=env,
            start_new_session=True)
        try:
            if self.backend == "zeotemp":
                self._wait_ready_zeotemp(log_path)
            else:
                self._wait_ready_python()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self):
        """SIGTERM the process group, wait up to 10 s, then SIGKILL."""
        if self.proc is None:
            return
        stop_group(self.proc, STOP_TIMEOUT, STOP_TIMEOUT)
        self._reap()

    def kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        self._reap()

    def log_text(self):
        parts = []
        for i, p in enumerate(self.log_paths, 1):
            try:
                text = p.read_text(errors="replace")
            except OSError as e:
                text = f"<cannot read {p}: {e}>"
            parts.append(f"--- {self.backend} server run {i} ({p}) ---\n{text}")
        return "\n".join(parts)

    # -- internals -----------------------------------------------------
    def _reap(self):
        # Kill any leftover members of the process group, then close the log.
        signal_group(self.proc, signal.SIGKILL)
        self.proc = None
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def _zeotemp_cmd(self):
        if not ZEOTEMP_BIN.exists():
            raise ServerError(
                f"zeotemp binary not found at {ZEOTEMP_BIN} (build it with "
                "`cargo build`, set ZEOTEMP_BIN, or run with "
                "ZEOTEMP_TEST_SERVER=python)")
        if self.unix_socket:
            address = self.unix_socket
        else:
            address = f"{self.host}:{self.port if self.port else 0}"
        cmd = [str(ZEOTEMP_BIN), "--address", address]
        for name in self.storages:
            cmd += ["--storage", name]
        if self.read_only:
            cmd.append("--read-only")
        if self.msgpack:
            cmd.append("--msgpack")
        if self.transaction_timeout is not None:
            cmd += ["--transaction-timeout", str(self.transaction_timeout)]
        cmd += list(self.zeotemp_args)
        return cmd

    def _python_cmd(self):
        if self.unix_socket:
            address = self.unix_socket
        else:
            if self.port is None:
                self.port = free_port()
            address = f"{self.host}:{self.port}"
        lines = ["<zeo>", f"  address {address}",
                 "  client-conflict-resolution true"]
        if self.read_only:
            lines.append("  read-only true")
        if self.msgpack:
            lines.append("  msgpack true")
        if self.transaction_timeout is not None:
            lines.append(f"  transaction-timeout {self.transaction_timeout}")
        lines.append("</zeo>")
        for name in self.storages:
            lines += [f"<mappingstorage {name}>", "</mappingstorage>"]
        conf = self.workdir / "zeo.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)]

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise ServerError(
                f"server exited with status {self.proc.returncode} before "
                f"becoming ready:\n{self.log_text()}")

    def _wait_ready_zeotemp(self, log_path):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = _ANSI.sub("", log_path.read_text(errors="replace"))
            if self.unix_socket:
                m = _UNIX_READY.search(text)
                if m:
                    return
            else:
                m = _TCP_READY.search(text)
                if m:
                    port = int(m.group(2))
                    if self.port is not None and port != self.port:
                        raise ServerError(
                            f"restarted server listens on {port}, "
                            f"expected {self.port}")
                    self.host, self.port = m.group(1), port
                    return
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerError(
                    f"zeotemp not ready after {START_TIMEOUT}s:\n{self.log_text()}")
            time.sleep(0.05)

    def _wait_ready_python(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_alive()
            try:
                if self.unix_socket:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(1)
                    s.connect(self.unix_socket)
                else:
                    s = socket.create_connection((self.host, self.port), 1)
                s.close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"runzeo not ready after {START_TIMEOUT}s:\n{self.log_text()}")
            time.sleep(0.05)


# -- pytest hooks --------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "zeotemp_only(reason): behaviour only zeotemp provides; "
        "xfail(strict=False) on the python backend, normal test on zeotemp")
    config.addinivalue_line(
        "markers",
        "slow(reason): a test that must wait out a server-side timer (the "
        "reason says which); it runs like any other, the marker documents "
        "its length and lets `-m 'not slow'` leave it out")


def pytest_report_header(config):
    where = ZEOTEMP_BIN if IS_ZEOTEMP else sys.executable + " -m ZEO.runzeo"
    return f"zeotemp test backend: {BACKEND} ({where})"


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("zeotemp_only")
        if marker is None or not IS_PYTHON:
            continue
        reason = marker.kwargs.get("reason") or (
            marker.args[0] if marker.args else "zeotemp-only behaviour")
        item.add_marker(pytest.mark.xfail(
            strict=False, reason=f"stock ZEO server: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    def on_timeout():
        item._zeotemp_timed_out = True
        sys.stderr.write(f"\n*** {item.nodeid} still running after "
                         f"{TEST_TIMEOUT}s: killing its servers ***\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for srv in getattr(item, "_zeotemp_servers", ()):
            try:
                srv.kill()
            except Exception:
                pass

    timer = threading.Timer(TEST_TIMEOUT, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if getattr(item, "_zeotemp_timed_out", False) and call.when == "call":
        report.outcome = "failed"
        report.sections.append(
            ("watchdog", f"test exceeded {TEST_TIMEOUT}s; its servers were "
                         "killed (ZEOTEMP_TEST_TIMEOUT)"))
    if report.failed:
        for i, srv in enumerate(getattr(item, "_zeotemp_servers", ()), 1):
            report.sections.append(
                (f"server {i} log ({srv.backend})", srv.log_text()))


# -- fixtures ------------------------------------------------------------------

@pytest.fixture
def server_factory(request, tmp_path):
    """Create and start servers; every server is stopped at teardown.

    ``server_factory(storages=("1", "temp"), read_only=False,
    transaction_timeout=None, unix_socket=None, start=True,
    zeotemp_args=(), msgpack=False)`` -- ``zeotemp_args`` are appended to
    zeotemp's command line (ignored by the python backend); ``msgpack``
    makes either server announce ``M5``.
    """
    servers = []
    request.node._zeotemp_servers = servers

    def factory(storages=("1",), read_only=False, transaction_timeout=None,
                unix_socket=None, start=True, zeotemp_args=(), msgpack=False):
        srv = Server(tmp_path / f"server{len(servers) + 1}",
                     storages=storages, read_only=read_only,
                     transaction_timeout=transaction_timeout,
                     unix_socket=unix_socket, zeotemp_args=zeotemp_args,
                     msgpack=msgpack)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    errors = []
    for srv in servers:
        try:
            srv.stop()
        except Exception as e:  # make sure every server gets stopped
            errors.append(e)
            srv.kill()
    if errors:
        raise errors[0]


@pytest.fixture
def server(server_factory):
    """A server with the single storage '1'."""
    return server_factory()


@pytest.fixture
def make_storage(server_factory):
    """``make_storage(server, storage='1', **kw)`` -> ClientStorage, closed at
    teardown (before the servers are stopped)."""
    import ZEO.ClientStorage
    storages = []

    def make(srv, storage="1", **kw):
        kw.setdefault("wait_timeout", 30)
        cs = ZEO.ClientStorage.ClientStorage(srv.address, storage=storage, **kw)
        storages.append(cs)
        return cs

    yield make
    for cs in reversed(storages):
        try:
            cs.close()
        except Exception:
            pass


@pytest.fixture
def make_db(make_storage):
    """``make_db(server, storage='1', **kw)`` -> ZODB.DB over a new
    ClientStorage; closed at teardown."""
    import ZODB
    dbs = []

    def make(srv, storage="1", **kw):
        db = ZODB.DB(make_storage(srv, storage=storage, **kw))
        dbs.append(db)
        return db

    yield make
    for db in reversed(dbs):
        try:
            db.close()
        except Exception:
            pass
