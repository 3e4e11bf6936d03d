"""The memory limit as an operator relies on it (issue 15): its default
follows the real ceiling (a container's or systemd unit's cgroup limit
when smaller than the machine's memory), it is one budget for all storages
of the process, and under session churn from stock clients the process's
RSS stays below it while the clients get the clear commit error.

The cgroup limit is simulated with the server's test hook
``ZEOTEMP_CGROUP_ROOT`` (a directory read instead of /sys/fs/cgroup)."""

import multiprocessing
import re
import time

import pytest
import transaction
from ZEO.Exceptions import ServerException

import zeotemp_churn
from zeotemp_churn import rss_kib, setup_container
from zeotemp_testobjects import Item
from zeotemp_util import open_conn

MIB = 1024 * 1024


def mem_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def fake_cgroup_root(tmp_path, limit):
    """A cgroup tree whose root has ``limit`` (bytes, or "max") as both
    the v2 ``memory.max`` and the v1 ``memory.limit_in_bytes``: whatever
    /proc/self/cgroup says (this machine has a v1 memory controller and a
    v2 "0::/" line), the walk up from the server's own cgroup reaches it."""
    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "memory.max").write_text(f"{limit}\n")
    v1 = "9223372036854771712" if limit == "max" else str(limit)
    (root / "memory" / "memory.limit_in_bytes").write_text(v1 + "\n")
    return root


@pytest.mark.zeotemp_only("zeotemp's default memory limit")
def test_default_limit_follows_a_smaller_cgroup_limit(
        server_factory, make_storage, monkeypatch, tmp_path):
    monkeypatch.setenv("ZEOTEMP_CGROUP_ROOT",
                       str(fake_cgroup_root(tmp_path, 1024 * MIB)))
    server = server_factory(storages=("1", "temp"))
    log = server.log_text()
    assert "memory 512 MiB for all storages (half of the cgroup limit 1 GiB)" \
        in log, log
    for name in ("1", "temp"):
        status = make_storage(server, name).server_status()
        assert status["memory-limit"] == 512 * MIB, status


@pytest.mark.zeotemp_only("zeotemp's default memory limit")
def test_without_a_cgroup_limit_the_default_is_half_the_machine(
        server_factory, make_storage, monkeypatch, tmp_path):
    monkeypatch.setenv("ZEOTEMP_CGROUP_ROOT", str(fake_cgroup_root(tmp_path, "max")))
    server = server_factory()
    status = make_storage(server).server_status()
    assert status["memory-limit"] == mem_total() // 2, status
    assert re.search(r"for all storages \(half of the machine's memory [\d.]+ GiB\)",
                     server.log_text()), server.log_text()


LIMIT = 12 * MIB    # 2 MiB of accounted bytes, for both storages together
BLOB = 200 * 1024


@pytest.mark.zeotemp_only("zeotemp's memory limit")
def test_one_budget_for_all_storages(server_factory, make_db):
    """Storage "1" takes most of the budget; then a commit to the other,
    empty storage fails at the limit: the limit is not per storage."""
    server = server_factory(storages=("1", "temp"),
                            zeotemp_args=("--memory-limit", LIMIT))
    db1 = make_db(server, "1")
    conn1, tm1 = open_conn(db1)
    status = db1.storage.server_status()
    room = status["accounted-limit"] - status["accounted-bytes"]
    # Two thirds of the room in storage "1", reachable (kept).
    for i in range(room * 2 // 3 // BLOB):
        conn1.root()[f"a{i}"] = Item(b"a" * BLOB)
        tm1.commit()

    db2 = make_db(server, "temp")
    conn2, tm2 = open_conn(db2)
    temp = db2.storage.server_status()
    assert temp["accounted-bytes"] < 4096, "storage temp holds only its root"
    # Half the room: would fit in a budget per storage, not in the shared one.
    conn2.root()["b"] = Item(b"b" * (room // 2))
    with pytest.raises(ServerException) as e:
        tm2.commit()
    tm2.abort()
    assert "memory-limit" in str(e.value) and "for all storages" in str(e.value)
    # A small one still fits, and storage "1" keeps everything it had.
    conn2.root()["c"] = Item(b"c" * 1000)
    tm2.commit()
    after = db1.storage.server_status()
    assert after["objects"] == status["objects"] + room * 2 // 3 // BLOB
    both = after["accounted-bytes"] + db2.storage.server_status()["accounted-bytes"]
    assert both <= after["accounted-limit"]


CHURN_LIMIT = 32 * MIB
NWORKERS = 4


@pytest.mark.zeotemp_only("zeotemp's memory limit")
def test_rss_stays_below_the_limit_under_churn(server_factory, make_db, make_storage):
    """Stock clients churn sessions (tests/python/zeotemp_churn.py, as in
    bench/soak.py) into a server with a 32 MiB limit until the storage has
    been at its accounted limit for 15 s: the process's RSS, sampled
    throughout, stays below the limit (the margin storage/budget.rs
    leaves), and the
    server still serves. (The clients' view of a refused vote, the clear
    commit error, is tested in test_memory_limit.py and above.)"""
    server = server_factory(zeotemp_args=("--memory-limit", CHURN_LIMIT))
    pid = server.proc.pid
    db = make_db(server)
    conn, tm = open_conn(db)
    setup_container(conn, tm, 0.5)
    monitor = make_storage(server)
    acc_limit = monitor.server_status()["accounted-limit"]

    ctx = multiprocessing.get_context("spawn")
    cfgs = [dict(addr=server.address, worker=w, duration=600, slice_seconds=0.5,
                 keep=20, known=5000, new_fraction=0.5, max_errors=10 ** 9, seed=w)
            for w in range(NWORKERS)]
    peak_rss = 0
    peak_accounted = 0
    full_since = None
    with ctx.Pool(NWORKERS) as pool:
        try:
            pending = pool.map_async(zeotemp_churn.churn_worker, cfgs, chunksize=1)
            deadline = time.monotonic() + 300
            # Until the storage has been at its limit for 15 s (or the
            # deadline: then the assertion below says the limit was never
            # reached).
            while time.monotonic() < deadline and not pending.ready():
                kib = rss_kib(pid)
                assert kib is not None, "the server died"
                peak_rss = max(peak_rss, kib * 1024)
                accounted = monitor.server_status()["accounted-bytes"]
                peak_accounted = max(peak_accounted, accounted)
                if full_since is None and accounted >= 0.9 * acc_limit:
                    full_since = time.monotonic()
                if full_since is not None and time.monotonic() - full_since > 15:
                    break
                time.sleep(0.2)
        finally:
            pool.terminate()
    print(f"peak RSS {peak_rss / MIB:.1f} MiB, limit {CHURN_LIMIT / MIB:.0f} MiB "
          f"(ratio {peak_rss / CHURN_LIMIT:.2f}); peak accounted "
          f"{peak_accounted / MIB:.1f} MiB of {acc_limit / MIB:.1f} MiB")
    assert full_since is not None, \
        f"the churn never reached the limit (peak accounted {peak_accounted})"
    assert server.running
    assert peak_rss < CHURN_LIMIT, \
        f"RSS {peak_rss} reached the memory limit {CHURN_LIMIT}"
    # The server still serves, and what it holds is under the limit.
    status = monitor.server_status()
    assert status["accounted-bytes"] <= status["accounted-limit"]
    assert (rss_kib(pid) or 0) * 1024 < CHURN_LIMIT
