"""The system clock steps back under a running server (a machine that booted
with a fast clock, corrected by NTP; an operator's ``date -s``): stock
clients go on committing new objects, tids keep growing, and other clients
are not held up.

The step is real for the server process: ``clock_shim.c``, LD_PRELOADed,
shifts every CLOCK_REALTIME reading by the seconds in a file the test
rewrites. Before zeotemp ran on its own clock (the wall clock read at
start-up plus the monotonic time since), a step back by more than the
uptime made every ``new_oids`` busy-wait a second on the runtime thread and
then fail ("oid allocation is ahead of the clock"), stalling every other
connection meanwhile.
"""

import re
import shutil
import subprocess

import pytest
import transaction

from zeotemp_testobjects import Item

SHIM_SOURCE = __file__.rsplit("/", 1)[0] + "/clock_shim.c"
STEP = -2 * 3600  # two hours back: far more than the server's uptime
LOG_TIME = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d)", re.M)


@pytest.fixture
def stepped_clock(tmp_path, monkeypatch):
    """The offset file of a server started with the shim: write seconds to it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the clock shim")
    shim = tmp_path / "clock_shim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(shim), SHIM_SOURCE, "-ldl"],
                   check=True)
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("ZEOTEMP_CLOCK_OFFSET_FILE", str(offset))
    return offset


def _commit_new_objects(db, n, tag):
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    try:
        # Retried on a conflict, as Zope does: another DB's commit to the
        # root may not have reached this one's cache yet.
        for attempt in tm.attempts(5):
            with attempt:
                root = conn.root()
                for i in range(n):
                    # New objects: the client asks the server for oids
                    # (new_oids).
                    root[f"{tag}-{i}"] = Item(f"{tag} {i}".encode())
        return root[f"{tag}-0"]._p_oid
    finally:
        conn.close()


def _hours_in_log(server):
    """(year, month, day, hour, minute) of every log line, in order."""
    return [tuple(int(x) for x in m) for m in LOG_TIME.findall(server.log_text())]


@pytest.mark.zeotemp_only("zeotemp's clock (the stock server has the same "
                          "busy-wait-free newTid, but no oid line from the clock)")
def test_clock_stepped_back_never_stalls_or_refuses(server_factory, make_db, stepped_clock):
    server = server_factory()
    db = make_db(server)
    bystander = make_db(server)
    # 150 new objects: two new_oids calls of 100 (the client's batch).
    _commit_new_objects(db, 150, "before")
    tid_before = db.storage.lastTransaction()
    logged_before = _hours_in_log(server)

    stepped_clock.write_text(str(STEP))
    # Another connection logs its "connected" line with the stepped clock:
    # the shim is in effect.
    late = make_db(server)
    logged_after = _hours_in_log(server)
    assert logged_after[-1] < logged_before[-1], (
        "the clock shim did not step the server's clock back", logged_after[-3:])

    # Oids keep coming (no error, no waiting for the wall clock to catch up),
    # tids keep growing, and the oids are new.
    oids = set()
    for round_ in range(5):
        oids.add(_commit_new_objects(db, 150, f"after{round_}"))
    oids.add(_commit_new_objects(late, 150, "late"))
    assert len(oids) == 6
    tid_after = db.storage.lastTransaction()
    assert tid_after > tid_before

    # A bystander sees every commit and commits too.
    tm = transaction.TransactionManager()
    conn = bystander.open(transaction_manager=tm)
    for attempt in tm.attempts(5):
        with attempt:
            root = conn.root()
            assert root["after4-149"].value == b"after4 149"
            assert root["before-0"].value == b"before 0"
            root["bystander"] = Item(b"b")
    assert bystander.storage.lastTransaction() > tid_after
    conn.close()

    # The clock comes back (stepped forward again): tids still only grow.
    stepped_clock.write_text("0")
    last = bystander.storage.lastTransaction()
    _commit_new_objects(db, 10, "back")
    assert db.storage.lastTransaction() > last
    assert "ahead of the clock" not in server.log_text()
