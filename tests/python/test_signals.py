"""Signals with a real client at work: SIGHUP never stops zeotemp.

A stock ZODB/ClientStorage client commits in a loop on a thread of its own
while the test sends SIGHUP several times, each time waiting for the
server's log line; every commit succeeds, the server is still running and the last
commit is there for a new connection.
"""

import os
import signal
import threading
import time

import pytest
import transaction

# A watchdog, not a timing assertion: how long the test waits for a log
# line or for the committer before failing.
WATCHDOG = 60.0
HUPS = 5
HUP_LINE = "SIGHUP received: ignored"


def wait_until(predicate, what, server):
    deadline = time.monotonic() + WATCHDOG
    while not predicate():
        assert server.running, f"server died {what}:\n{server.log_text()}"
        assert time.monotonic() < deadline, f"{what}:\n{server.log_text()}"
        time.sleep(0.02)


@pytest.mark.zeotemp_only(
    reason="the log line is zeotemp's (runzeo reopens its log on SIGHUP)")
def test_sighup_under_load_kills_nothing(server, make_db):
    db = make_db(server)
    commits, errors = [], []
    stop = threading.Event()

    def committer():
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        try:
            while not stop.is_set():
                tm.begin()
                conn.root()["n"] = len(commits)
                try:
                    tm.commit()
                except Exception as e:  # every commit must succeed
                    errors.append(repr(e))
                    return
                commits.append(1)
        finally:
            conn.close()

    thread = threading.Thread(target=committer, daemon=True)
    thread.start()
    wait_until(lambda: len(commits) >= 10, "first commits", server)
    for i in range(1, HUPS + 1):
        before = len(commits)
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_until(lambda: server.log_text().count(HUP_LINE) >= i,
                   f"log line for SIGHUP {i}", server)
        # Commits go on after each one.
        wait_until(lambda: len(commits) >= before + 10 or errors,
                   f"commits after SIGHUP {i}", server)
    stop.set()
    thread.join(WATCHDOG)
    assert not thread.is_alive()
    assert errors == []
    assert server.running
    # What the client committed last is there for a new connection.
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    assert conn.root()["n"] == len(commits) - 1
    conn.close()
