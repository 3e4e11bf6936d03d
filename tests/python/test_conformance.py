"""Upstream conformance: ZODB's and ZEO's own storage test mixins, run
through the stock ``ZEO.ClientStorage`` against zeotemp (issue 5).

The test classes are composed the way ``ZEO/tests/testZEO.py`` and
``ZEO/tests/testConnection.py`` compose them (``StorageTestBase`` plus the
generic mixins from ``ZODB.tests`` and ``ZEO.tests``); only the server is
replaced: every test starts its own zeotemp (``127.0.0.1`` port 0, storage
``1``; the port is read from its ``listening on tcp HOST:PORT`` log line)
and stops it in ``tearDown``, as ZEO's tests do with their forked servers.
With ``ZEOTEMP_TEST_SERVER=python`` the same tests run against the stock
``runzeo`` with ``<mappingstorage>`` (the "stock temp storage" baseline).

zeotemp serves temporary storages only: no undo, no blobs, no transaction
iterators, no ``restore``, no data surviving a restart.  Every
upstream test of those features, and every one that reaches into the stock
server's Python objects or depends on FileStorage, is excluded with its
reason, never silently: per test (``conformance(skip=...)``), per class
(``unittest.skip``) or, for upstream tests that are not ported at all
(doctests, whole modules), in ``NOT_PORTED`` (each shows up as a skipped
``test_not_ported[...]``).  Differences zeotemp makes on purpose (README:
"the root object exists", "a restart looks to clients like a fresh, newer
database") are skipped with a reason starting ``zeotemp by design:``.  Tests
that fail because of a zeotemp bug stay in as strict xfails
(``conformance(xfail=...)``, reason ``BUG: ...``; a fix turns them into
XPASS failures, so drop the entry then), or are skipped with a ``BUG: ...``
reason where the failure would hang the run.  On the python backend the
design and bug entries run (the stock server passes them) and what the stock
server is known to fail is a non-strict xfail (``stock_fails``).
tests/python/README.md ("Upstream conformance") summarizes all this.

pytest collects ``test*`` methods only; ZEO's mixins name theirs ``check*``
(ZEO's own runner loads both prefixes), so ``conformance()`` adds a
``test_<checkname>`` alias for each.
"""

import doctest
import functools
import multiprocessing
import os
import re
import tempfile
import time
import unittest

import pytest
import transaction
import ZEO
from zope.testing import renormalizing

# Import modules, not classes: pytest would collect (and run against the
# stock forked server) any TestCase class bound in this module's namespace.
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZEO.tests import Cache
from ZEO.tests import ConnectionTests
from ZEO.tests import forker
from ZEO.tests import InvalidationTests
from ZEO.tests import IterationTests
from ZEO.tests import testConnection
from ZEO.tests import testZEO
from ZEO.tests import testssl
from ZODB.Connection import TransactionMetaData
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import PackableStorage
from ZODB.tests import PersistentStorage
from ZODB.tests import RecoveryStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import TransactionalUndoStorage
from ZODB.tests import testMVCCMappingStorage

from conftest import Server
from zeotemp_util import IS_PYTHON

# -- exclusion machinery -------------------------------------------------------

UNDO = "undo: zeotemp keeps no undo log (undo/undoLog/undoInfo are Unsupported)"
ITERATOR = ("transaction iterators: zeotemp has no storage.iterator / "
            "IStorageIteration (iterator_start etc. are Unsupported)")
RESTORE = "restore / IStorageRestoreable: zeotemp does not support restore"
BLOBS = "blobs: zeotemp serves no blobs (storeBlob/loadBlob are Unsupported)"
SURVIVE = ("data surviving a server restart: zeotemp is a temporary storage, "
           "a restart starts an empty database")
INTERNALS = "calls the stock server's Python internals (ZEO.StorageServer)"
DESIGN = "zeotemp by design: "
ROOT = (DESIGN + "the root object (oid 0) exists at startup (README 'Compared "
        "with ...'); ")
WALLCLOCK = (DESIGN + "the root is committed at startup with a wall-clock "
             "tid, so a fresh storage's lastTransaction() is not z64 ")
STOCK_FINISHED_WO_LOCK = (
    "with client-conflict-resolution (conftest's runzeo config) concurrent "
    "conflicting commits make the server fail a commit with "
    "ServerException AssertionError('finished called wo lock')")
STOCK_BEHIND = (
    "a restarted MappingStorage starts again at tid z64, so the client "
    "refuses it ('Server behind client') and never reconnects")
DANGLING = (ROOT + "and a record that references an object the storage does "
            "not hold is refused at vote with a ConflictError (src/storage/"
            "gc.rs, dangling_reference_refused_at_vote): the test stores the "
            "root (oid 0, serial z64) linking an object whose first revision "
            "it commits in a later transaction; the stock server accepts "
            "both.")


def _wrap(func):
    # A new function object, so decorating it never touches the mixin's
    # function shared with other classes.
    @functools.wraps(func)
    def wrapper(self, *args, **kw):
        return func(self, *args, **kw)
    return wrapper


def _zeotemp_only(reason):
    # zeotemp's own differences and bugs do not apply to the stock server.
    return reason.startswith((DESIGN, "BUG:"))


def conformance(skip=None, xfail=None, stock_fails=None):
    """Class decorator: alias ``check*`` tests as ``test_check*`` (pytest
    collects only ``test*``) and mark the excluded ones.  Keys are the
    upstream method names (``checkX`` or ``testX``); an unknown name is an
    error.

    ``skip``: skipped with the reason (on the python backend only the
    missing features; ``zeotemp by design:`` and ``BUG:`` entries run
    there).  ``xfail``: zeotemp bugs, a strict xfail on zeotemp (an
    unexpected pass fails the run, so a fix is noticed).  ``stock_fails``:
    what the stock server with a MappingStorage is known to fail, a
    non-strict xfail on the python backend only."""
    skip = dict(skip or {})
    xfail = dict(xfail or {})
    stock_fails = dict(stock_fails or {})

    def deco(cls):
        names = set(dir(cls))
        for name in sorted(names):
            if name.startswith("check") and callable(getattr(cls, name)):
                alias = "test_" + name
                if alias not in names:
                    setattr(cls, alias, getattr(cls, name))
        for table, kind in ((skip, "skip"), (xfail, "xfail"),
                            (stock_fails, "stock")):
            for name, reason in table.items():
                if name not in names:
                    raise AttributeError(f"{cls.__name__} has no test {name}")
                if kind == "skip":
                    if IS_PYTHON and _zeotemp_only(reason):
                        continue
                    mark = unittest.skip(reason)
                elif kind == "xfail":
                    assert reason.startswith("BUG:"), reason
                    if IS_PYTHON:
                        continue
                    mark = pytest.mark.xfail(strict=True, reason=reason)
                else:
                    if not IS_PYTHON:
                        continue
                    mark = pytest.mark.xfail(
                        strict=False, reason=f"stock ZEO server: {reason}")
                collected = "test_" + name if name.startswith("check") else name
                setattr(cls, collected, mark(_wrap(getattr(cls, collected))))
        return cls
    return deco


# -- servers -------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _conformance_servers(request, tmp_path):
    """Hands the test's workdir to the TestCase and registers its servers with
    conftest's watchdog and failure report (server logs on failure)."""
    servers = []
    request.node._zeotemp_servers = servers
    inst = request.instance
    if inst is not None:
        inst._zt_workdir = tmp_path
        inst._zt_registry = servers
    yield


class ZeotempServers:
    """Starts zeotemp (or, with ZEOTEMP_TEST_SERVER=python, stock runzeo with
    a MappingStorage) through conftest's Server."""

    _zt_workdir = None
    _zt_registry = None

    def _zt_extra_args(self):
        """More zeotemp arguments for every server of the class."""
        return []

    def _zt_start(self, port=0, read_only=False, transaction_timeout=None,
                  invq=None):
        if self._zt_registry is None:   # run outside pytest
            self._zt_registry = []
        if self._zt_workdir is None:
            self._zt_workdir = tempfile.mkdtemp(prefix="zeotemp-conformance-")
        args = self._zt_extra_args()
        if invq:
            args += ["--invalidation-queue-size", str(invq)]
        srv = Server(os.path.join(str(self._zt_workdir),
                                  f"server{len(self._zt_registry) + 1}"),
                     read_only=read_only,
                     transaction_timeout=transaction_timeout,
                     zeotemp_args=args)
        if port:
            srv.port = port
        self._zt_registry.append(srv)
        srv.start()
        return srv


# -- testZEO.py: GenericTests and friends --------------------------------------

class ZeotempGenericTestBase(ZeotempServers, testZEO.GenericTestBase):
    """testZEO.GenericTestBase with zeotemp instead of a forked runzeo and a
    ClientStorage without a blob cache."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        srv = self._zt_start()
        self._servers = [srv.stop]
        self._storage = self._wrap_client(
            ClientStorage(
                srv.address, '1', cache_size=20000000,
                min_disconnect_poll=0.5, wait=1, wait_timeout=60,
                **self._client_options()),
        )
        self._storage.registerDB(testZEO.DummyDB())

    def getConfig(self):  # the stock server's storage section: unused
        raise NotImplementedError


@conformance(
    skip={
        "testBasics": WALLCLOCK + "(asserts lastTransaction() == z64 first).",
        "checkVolatileCacheWithImmediateLastTransaction":
            WALLCLOCK + "(asserts it is z64 before the first store).",
        "testLen": ROOT + "len() of a fresh storage is 1, not 0.",
        "test_tid_ordering_w_commit":
            ROOT + "the test creates oid 0 with serial z64 via store() and "
            "gets a ConflictError.",
        "testPackJustOldRevisions": DANGLING,
        "testPackOnlyOneObject": DANGLING,
    },
)
class GenericTests(ZeotempGenericTestBase, testZEO.GenericTests):
    """testZEO.GenericTests: BasicStorage, PackableStorage,
    SynchronizedStorage, MTStorage, ReadOnlyStorage, CommitLockVoteTests,
    ThreadTests, MiscZEOTests."""


@conformance()
class ClientConflictResolutionTests(
        ZeotempGenericTestBase,
        ConflictResolution.ConflictResolvingStorage):
    """testZEO.ClientConflictResolutionTests (zeotemp: clients always
    resolve conflicts)."""


@conformance(
    skip={
        "testLoadBeforeUndo": UNDO,
        "testLoadBeforeConsecutiveTids":
            RESTORE + " (tpc_begin(txn, tid) with an explicit tid answers "
            "Unsupported; the test commits at tids 1, 2, 3).",
        "testPackAllRevisionsNoGC":
            "pack(gc=False): ClientStorage.pack and the ZEO protocol have no "
            "gc flag (PackableStorageWithOptionalGC is for local storages).",
    },
)
class StorageTests(
        ZeotempGenericTestBase,
        RevisionStorage.RevisionStorage,
        HistoryStorage.HistoryStorage,
        PersistentStorage.PersistentStorage,
        testMVCCMappingStorage.MVCCTests):
    """The rest of testZEO.FullGenericTests that does not need undo or
    iterators (RevisionStorage), plus the generic mixins ZODB runs for its
    in-memory storages (HistoryStorage; MVCCTests from
    testMVCCMappingStorage) and PersistentStorage (a reopened client sees
    the data)."""

    testPackAllRevisionsNoGC = (
        PackableStorage.PackableStorageWithOptionalGC.testPackAllRevisionsNoGC)

    def open(self, read_only=0):
        testZEO.GenericTests.open(self, read_only)


# Whole mixins zeotemp cannot serve: kept as classes so each test shows up as
# skipped with its reason.

@unittest.skip(UNDO)
@conformance()
class UndoTests(
        ZeotempGenericTestBase,
        Cache.TransUndoStorageWithCache,
        ConflictResolution.ConflictResolvingTransUndoStorage,
        PackableStorage.PackableUndoStorage,
        TransactionalUndoStorage.TransactionalUndoStorage):
    """The undo mixins of testZEO.FullGenericTests."""


@unittest.skip(ITERATOR)
@conformance()
class IteratorTests(
        ZeotempGenericTestBase,
        IteratorStorage.IteratorStorage,
        IteratorStorage.ExtendedIteratorStorage,
        IterationTests.IterationTests):
    """The iterator mixins of testZEO.FullGenericTests / testMappingStorage."""


@unittest.skip(RESTORE + "; " + ITERATOR)
@conformance()
class RecoveryTests(ZeotempGenericTestBase, RecoveryStorage.RecoveryStorage):
    """testZEO.FileStorageRecoveryTests."""


@unittest.skip(BLOBS)
@conformance()
class BlobTests(ZeotempGenericTestBase, testZEO.CommonBlobTests):
    """testZEO.BlobAdaptedFileStorageTests / BlobWritableCacheTests."""


# -- ConnectionTests.py / testConnection.py ------------------------------------

class ZeotempConnectionSetup(ZeotempServers):
    """ConnectionTests.CommonSetupTearDown with zeotemp servers.

    ``startServer`` keeps the upstream signature: ``index`` picks the address
    (``self.addr``; port 0 is resolved from the log), ``read_only`` (a
    read-only storage) and ``ro_svr`` (a read-only server) both mean
    ``--read-only``; ``create``/``keep``/``path`` are about FileStorage files
    and have no meaning for an in-memory server (a restart is empty).
    ``invq`` and ``timeout`` become ``--invalidation-queue-size`` and
    ``--transaction-timeout``."""

    def getConfig(self, path, create, read_only):
        raise NotImplementedError  # the stock server's storage section

    def startServer(self, create=1, index=0, read_only=0, ro_svr=0, keep=None,
                    path=None, **kw):
        addr = self.addr[index]
        srv = self._zt_start(port=addr[1], read_only=bool(read_only or ro_svr),
                             transaction_timeout=self.timeout, invq=self.invq)
        self._servers.append(srv.stop)
        if addr[1] == 0:
            self.addr[index] = srv.address


@conformance(
    skip={
        "checkCheckForOutOfDateServer":
            DESIGN + "a restarted zeotemp starts at a newer wall-clock tid, "
            "so a client that saw transactions before the restart "
            "reconnects (README: 'a restart looks to clients like a fresh, "
            "newer database'); the test expects the stock refusal of a "
            "server behind the client.",
        "checkBadMessage2":
            DESIGN + "a call whose argument pickle names a global is "
            "answered with an error reply (ValueError 'forbidden pickle "
            "global') and the connection stays up (README: 'a bad or hostile "
            "message gets an error reply or closes that one connection'); "
            "the test expects the stock server to drop the connection "
            "(_connection_generation must grow).",
    },
    stock_fails={name: STOCK_FINISHED_WO_LOCK for name in (
        "checkConcurrentUpdates2Storages", "checkConcurrentUpdates19Storages",
        "checkConcurrentUpdates2StoragesMT", "checkConcurrentLargeUpdates")},
)
class ConnectionTestsWithInvalidation(
        ZeotempConnectionSetup,
        ConnectionTests.ConnectionTests,
        InvalidationTests.InvalidationTests):
    """testConnection.FileStorageConnectionTests (= MappingStorageConnection
    Tests + InvalidationTests)."""

    # InvalidationTests lets its writer threads run at least MINTIME seconds
    # (upstream: 10); 3 s still gives each thread dozens of commits.
    MINTIME = 3


@conformance(
    skip={
        "checkNoVerificationOnServerRestart": SURVIVE + " (expects 'Cache up "
        "to date' after the restart; zeotemp's client rightly clears its "
        "cache).",
        "checkNoVerificationOnServerRestartWith2Clients": SURVIVE + " "
        "(expects 'Cache up to date' after the restart).",
    },
    stock_fails={name: STOCK_BEHIND for name in (
        "checkDisconnectedAbort", "checkMultipleServers",
        "checkReconnectFallback", "checkReconnectWritable",
        "checkReconnection")},
)
class ReconnectionTests(ZeotempConnectionSetup,
                        ConnectionTests.ReconnectionTests):
    """testConnection.FileStorageReconnectionTests.  Upstream runs them on
    FileStorage only ("can't work with MappingStorage because it's only an
    in-memory storage"); they pass on zeotemp because a restarted zeotemp
    starts at a newer tid, except the two that need the data back."""


@conformance(stock_fails={
    "checkVerificationWith2ClientsInvqOverflow":
        "harness: conftest's python backend does not set the invalidation "
        "queue size (invq = 3), so the stock server's 100 entries cover the "
        "5 transactions"})
class InvqTests(ZeotempConnectionSetup, ConnectionTests.InvqTests):
    """testConnection.FileStorageInvqTests."""


@conformance()
class TimeoutTests(ZeotempConnectionSetup, ConnectionTests.TimeoutTests):
    """testConnection.MappingStorageTimeoutTests.

    ``checkTimeout`` is upstream's, except that it looks for the server's
    timeout message in the server's own log (upstream reads the stock
    server's ``server.log`` for ``CRITICAL ZEO.StorageServer Transaction
    timeout after``; zeotemp logs ``disconnected:
    transaction-timeout exceeded``)."""

    def checkTimeout(self):
        self._storage = storage = self.openClientStorage()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.tpc_vote(txn)
        time.sleep(2)
        with ConnectionTests.short_timeout(self):
            self.assertRaises(ClientDisconnected, storage.tpc_finish, txn)
        marker = ("Transaction timeout after" if IS_PYTHON
                  else "transaction-timeout exceeded")
        srv = self._zt_registry[-1]
        deadline = time.monotonic() + 5
        while marker not in srv.log_text():
            if time.monotonic() > deadline:
                self.fail(f"no {marker!r} in the server log:\n"
                          f"{srv.log_text()}")
            time.sleep(0.05)
        storage.tpc_abort(txn)
        storage.close()


@conformance(skip={
    "checkExceptionLogsAtError":
        ROOT + "the test first creates oid 0 with serial z64 (ConflictError); "
        "also zeotemp answers history(None, None) with TypeError 'history(): "
        "oid must be bytes, not NoneType' where the stock storage raises "
        "POSKeyError(None) (the test expects POSKeyError, not logged).",
})
class ZRPCConnectionTests(ZeotempConnectionSetup,
                          testZEO.ZRPCConnectionTests):
    """testZEO.ZRPCConnectionTests."""


@unittest.skipIf(IS_PYTHON, "harness: conftest's python backend starts "
                 "runzeo without an <ssl> section (upstream runs these "
                 "against the stock server)")
@conformance(skip={
    name: DESIGN + "the same test as in ConnectionTestsWithInvalidation "
    "above, skipped there with its reason" for name in (
        "checkCheckForOutOfDateServer", "checkBadMessage2")})
class SSLConnectionTests(ZeotempConnectionSetup,
                         ConnectionTests.SSLConnectionTests):
    """testConnection.SSLConnectionTests: the ConnectionTests over TLS, the
    client with upstream's context (``testssl.client_ssl()``: trusts
    ``ZEO/tests/server.pem``, presents ``client.pem``), zeotemp with ZEO's
    test server certificate and key.  Upstream's server also requires the
    client's certificate (``authenticate client.pem``); that certificate is
    a self-signed CA (``CA:TRUE``) signed with SHA-1, which rustls refuses as
    a client certificate, so zeotemp runs without ``--tls-client-ca`` here
    (client certificates are tested in test_tls.py)."""

    def _zt_extra_args(self):
        here = os.path.dirname(testssl.__file__)
        return ["--tls-certificate", os.path.join(here, "server.pem"),
                "--tls-key", os.path.join(here, "server_key.pem")]


# -- testZEO.py / testConnection.py doctests -----------------------------------
#
# ZEO runs these with ``forker.setUp``, whose ``start_server`` forks a stock
# server; here ``start_server`` starts zeotemp instead (FileStorage
# arguments -- ``path``, ``keep``, ``storage_conf`` -- have no meaning for an
# in-memory server; a string ``port`` is a unix socket path, as upstream).

DOCTESTS = {
    "testZEO.tpc_finish_error": (testZEO, "tpc_finish_error"),
    "testZEO.test_prefetch": (testZEO, "test_prefetch"),
    "testZEO.history_over_zeo": (testZEO, "history_over_zeo"),
    "testZEO.dont_log_poskeyerrors_on_server":
        (testZEO, "dont_log_poskeyerrors_on_server"),
    "testZEO.open_convenience": (testZEO, "open_convenience"),
    "testZEO.client_asyncore_thread_has_name":
        (testZEO, "client_asyncore_thread_has_name"),
    "testZEO.close_client_storage_w_invalidations":
        (testZEO, "close_client_storage_w_invalidations"),
    "testZEO.convenient_to_pass_port_to_client_and_ZEO_dot_client":
        (testZEO, "convenient_to_pass_port_to_client_and_ZEO_dot_client"),
    "testZEO.invalidate_client_cache_entry_on_server_commit_error":
        (testZEO, "invalidate_client_cache_entry_on_server_commit_error"),
    "testZEO.unix_domain_sockets": (testZEO, "unix_domain_sockets"),
    "testZEO.ClientDisconnected_errors_are_TransientErrors":
        (testZEO, "ClientDisconnected_errors_are_TransientErrors"),
    "testZEO.can_use_empty_string_for_local_host_on_client":
        (testZEO, "can_use_empty_string_for_local_host_on_client"),
    "testConnection.invalidations_while_connecting":
        (testConnection, "invalidations_while_connecting"),
}

# testZEO.test_suite's output normalizations.
_DOCTEST_PATTERNS = [
    (re.compile(r"'start': '[^\n]+'"), 'start'),
    (re.compile(r"'last-transaction': '[0-9a-f]+'"), 'last-transaction'),
    (re.compile("ZODB.POSException.ConflictError"), "ConflictError"),
    (re.compile("ZODB.POSException.POSKeyError"), "POSKeyError"),
    (re.compile("ZEO.Exceptions.ClientStorageError"), "ClientStorageError"),
    (re.compile("ZEO.Exceptions.ClientDisconnected"), "ClientDisconnected"),
    (re.compile(r"\[Errno \d+\]"), '[Errno N]'),
    (re.compile(r"loads=\d+\.\d+"), 'loads=42.42'),
]


class _DoctestServers:
    """``start_server`` for upstream doctests (``stop_server(stop)`` calls
    the returned ``stop``)."""

    def __init__(self, workdir, registry):
        self._workdir = workdir
        self._registry = registry

    def start_server(self, storage_conf=None, zeo_conf=None, port=None,
                     keep=False, addr=None, path='Data.fs', protocol=None,
                     blob_dir=None, suicide=True, debug=False, log=None,
                     **kw):
        assert not blob_dir, "zeotemp serves no blobs"
        zeo_conf = dict(zeo_conf or {})
        if addr is not None:
            port = addr if isinstance(addr, str) else addr[1]
        unix = port if isinstance(port, str) else None
        srv = Server(os.path.join(str(self._workdir),
                                  f"server{len(self._registry) + 1}"),
                     read_only=bool(zeo_conf.get("read_only")),
                     transaction_timeout=zeo_conf.get("transaction_timeout"),
                     unix_socket=os.path.abspath(unix) if unix else None,
                     zeotemp_args=(
                         ["--invalidation-queue-size",
                          str(zeo_conf["invalidation_queue_size"])]
                         if zeo_conf.get("invalidation_queue_size") else []))
        if port and not unix:
            srv.port = port
        self._registry.append(srv)
        srv.start()

        def stop():
            srv.stop()
            if log:  # upstream's server writes its log there
                with open(log, "w") as f:
                    f.write(srv.log_text())
        return (unix if unix else srv.address), stop


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_upstream_doctest(name, request, tmp_path, monkeypatch):
    module, attr = DOCTESTS[name]
    registry = request.node._zeotemp_servers
    servers = _DoctestServers(tmp_path, registry)
    monkeypatch.chdir(tmp_path)
    globs = dict(module.__dict__)
    globs.update(
        start_server=servers.start_server,
        stop_server=lambda stop: stop(),
        wait_until=forker.wait_until,
        wait_connected=forker.wait_connected,
        wait_disconnected=forker.wait_disconnected,
    )
    tests = doctest.DocTestFinder().find(getattr(module, attr), name,
                                         globs=globs)
    assert tests, name
    out = []
    runner = doctest.DocTestRunner(
        checker=renormalizing.RENormalizing(_DOCTEST_PATTERNS))
    transaction.abort()
    try:
        for test in tests:
            runner.run(test, out=out.append)
    finally:
        transaction.abort()
        for srv in registry:
            srv.stop()
    assert runner.tries > 0, name
    assert runner.failures == 0, "".join(out)


def _multiprocessing_reader(name, addr, q):
    conn = ZEO.connection(addr)
    q.put((name, conn.root.x))
    conn.close()


@conformance()
class MultiprocessingTests(ZeotempServers, unittest.TestCase):
    """testZEO.MultiprocessingTests: a ClientStorage works in (forked)
    multiprocessing children."""

    def test_work_with_multiprocessing(self):
        srv = self._zt_start()
        try:
            conn = ZEO.connection(srv.address)
            conn.root.x = 1
            transaction.commit()
            q = multiprocessing.Queue()
            processes = [multiprocessing.Process(
                target=_multiprocessing_reader, args=(i, srv.address, q))
                for i in range(3)]
            for p in processes:
                p.start()
            self.assertEqual(sorted(q.get(timeout=60) for p in processes),
                             [(0, 1), (1, 1), (2, 1)])
            for p in processes:
                p.join(30)
            conn.close()
        finally:
            transaction.abort()
            srv.stop()


# -- not ported ----------------------------------------------------------------
#
# Upstream tests that are not classes above (doctests, whole modules): each
# shows up as a skipped ``test_not_ported[...]`` with its reason.

NOT_PORTED = {
    "testZEO.FileStorageTests / FileStorageHexTests / FileStorageClientHex"
    "Tests / DemoStorageTests / FileStorageLoadDelayedTests":
        "the same mixins as GenericTests/StorageTests over server-side "
        "FileStorage, hexstorage, DemoStorage or LoadDelayedStorage "
        "wrappers (zeotemp has its own storage only); their extras assert "
        "FileStorage's interface list or need undo/iterators",
    "testZEO.MappingStorageTests":
        "identical to GenericTests above (its two overrides disable iterator "
        "tests)",
    "testZEO.FileStorageSSLTests":
        "FileStorageTests (not ported, above) over SSL; the connection "
        "tests over TLS are SSLConnectionTests",
    "testZEO.BlobAdaptedFileStorageTests / BlobWritableCacheTests, "
    "testblob.storage_reusable_suite, gracefully_handle_abort_while_storing"
    "_many_blobs, zeo_blob_cache.test, client-config.test": BLOBS,
    "PackableStorage.IExternalGC_suite (IExternalGC.test)":
        "runs on a FileStorage+blob server with pack-gc false "
        "(deleteObject and blobs of a FileStorage)",
    "IterationTests doctest (iterator_sane_after_reconnect)": ITERATOR,
    "testZEO.test_server_status / test_ruok":
        "assert the stock server's exact server_status() key set; zeotemp "
        "reports more keys (objects, size, collections, ...); its status is "
        "tested in test_gc.py and test_memory_limit.py",
    "testZEO.client_labels":
        "greps the stock server's log format ('INFO ZEO.StorageServer "
        "(label')",
    "testZEO.runzeo_without_configfile / runzeo_logrotate_on_sigusr2 / "
    "test_runzeo_msgpack_support, zdoptions.test, nagios.rst, "
    "testZEOOptions, testZEOServer":
        "options, logging and tools of the stock runzeo/zdaemon (zeotemp's "
        "own --msgpack is tested in test_msgpack.py)",
    "testZEO.multiple_storages_invalidation_queue_is_not_insane / "
    "getInvalidationsAfterServerRestart, testZEO2, test_sync, "
    "test_client_side_conflict_resolution, zeo-fan-out.test, "
    "dynamic_server_ports.test, new_addr.test, protocols.test":
        INTERNALS + " or the in-process ZEO.server()/StorageServer",
    "testZEO.client_has_newer_data_than_server, "
    "drop_cache_rather_than_verify.txt, invalidation-age.txt":
        SURVIVE + " (they restart a server on the same FileStorage)",
    "testZEO.quick_close_doesnt_kill_server":
        "its start_server gets the stock server's <ssl> zeo.conf text; "
        "test_tls.py's test_quick_close_does_not_kill_server does the same "
        "(five connections reset at once, then a TLS client)",
    "ConnectionTests *V6 classes (IPv6 variants of every connection test)":
        "left out for time (they repeat the connection classes over ::1)",
    "testMVCCMappingStorage.MVCCMappingStorageTests.testTransactionIdIncreases"
    ", testmvcc.py":
        "reach into MVCCMappingStorage / MinimalMemoryStorage internals "
        "(local storages)",
    "ZEO client-only unit tests (test_cache, testTransactionBuffer, "
    "test_marshal, testConversionSupport, testConfig, "
    "test_client_credentials, Test_convenience_functions)":
        "need no server (or mock it): nothing of zeotemp to test",
}


@pytest.mark.parametrize("name", sorted(NOT_PORTED))
def test_not_ported(name):
    pytest.skip(f"not ported: {NOT_PORTED[name]}")
