"""Small helpers shared by the tests (importable; no pytest fixtures here)."""

import os
import pickle
import signal
import subprocess
import time

BACKEND = os.environ.get("ZEOTEMP_TEST_SERVER", "zeotemp").strip().lower()
if BACKEND not in ("zeotemp", "python"):
    raise RuntimeError(
        f"ZEOTEMP_TEST_SERVER must be 'zeotemp' or 'python', not {BACKEND!r}")
IS_ZEOTEMP = BACKEND == "zeotemp"
IS_PYTHON = BACKEND == "python"


def open_conn(db):
    """Open a connection with its own transaction manager and begin a
    transaction (db.open() alone does not sync with the server; begin() does
    when the client has server-sync on). Returns ``(conn, tm)``."""
    import transaction
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    return conn, tm


def wait_until(predicate, timeout, interval=0.1, message="condition"):
    """Poll ``predicate`` until it returns a truthy value (returned), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def signal_group(proc, sig):
    """Send ``sig`` to the process group of ``proc`` (a Popen started with
    ``start_new_session=True``); a group that is already gone is fine."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc, timeout, kill_timeout=10):
    """SIGTERM the process group of ``proc``; if ``proc`` has not exited
    after ``timeout`` seconds, SIGKILL the group and wait up to
    ``kill_timeout`` more. Nothing to do if it has exited already."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(kill_timeout)


def make_record(cls, state):
    """A ZODB object record (class pickle + state pickle) as ZODB writes it
    for an object without persistent references."""
    return pickle.dumps(cls, 3) + pickle.dumps(state, 3)


def commit_with_retry(tm, work, attempts=20, transient=None, pause=0.05):
    """Run ``work()`` in a new transaction of ``tm`` and commit, retrying on
    transient errors (ConflictError, ReadConflictError, ClientDisconnected) a
    bounded number of times.  Returns the number of retries."""
    from ZODB.POSException import ConflictError
    from ZEO.Exceptions import ClientDisconnected
    if transient is None:
        transient = (ConflictError, ClientDisconnected)
    for attempt in range(attempts):
        try:
            tm.begin()
            work()
            tm.commit()
            return attempt
        except transient:
            tm.abort()
            if attempt == attempts - 1:
                raise
            time.sleep(pause * (attempt + 1))


# Zope's <zodb_db> section is ZODB's <zodb> plus the mount keys (Zope:
# src/Zope2/Startup/wsgischema.xml); this stand-in lets zope.conf stanzas be
# loaded with ZConfig without installing Zope.
ZOPE_SCHEMA = """\
<schema>
  <import package="ZODB"/>
  <sectiontype name="zodb_db" extends="zodb">
    <multikey name="mount-point" required="yes" attribute="mount_points"/>
    <key name="container-class"/>
  </sectiontype>
  <multisection type="zodb_db" name="+" attribute="databases"/>
</schema>
"""
