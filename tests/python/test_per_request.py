"""bench/per_request.py's parsing and table (the runs themselves need
release binaries, strace and perf: see bench/README.md)."""

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def load_script():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(
        "per_request", REPO / "bench" / "per_request.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 55.10    0.120000           6     20000           writev
 40.00    0.090000           4     19000       512 recvfrom
  4.90    0.010000           9      1100           epoll_wait
  0.00    0.000000           0         3           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.220000           5     40103       512 total
"""


def test_strace_summary_is_parsed_by_name():
    pr = load_script()
    assert pr.parse_strace(STRACE_C) == {
        "writev": 20000, "recvfrom": 19000, "epoll_wait": 1100, "close": 3}
    assert pr.parse_strace("strace: Process 1 attached\n") == {}


def test_table_has_per_request_figures():
    pr = load_script()
    args = argparse.Namespace(
        connections=8, duration=2.0, in_flight=8, workloads=["zope"],
        servers=["zeotemp"], top=2)
    cpu = {"ops": 10000, "txns": 2000, "ops_per_s": 5000.0,
           "txns_per_s": 1000.0, "server_user_s": 0.05, "server_sys_s": 0.03,
           "server_cpu_us_per_txn": 40.0, "duration_s": 2.0}
    under = dict(cpu, ops=5000)
    md = pr.report(args, {("zeotemp", "zope"): cpu},
                   {("zeotemp", "zope"): (pr.parse_strace(STRACE_C), under)},
                   {("zeotemp", "zope"): ((25000, 2_000_000), under)}, [])
    row = next(l for l in md.splitlines() if l.startswith("| zope | zeotemp"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # req/s, txn/s, user and sys µs per request (0.05 s / 10000, 0.03 s /
    # 10000), CPU per txn, syscalls (40103 / 5000), allocations (25000 /
    # 5000) and bytes (2 MB / 5000) per request.
    assert cells[2:] == ["5,000", "1,000", "5.00", "3.00", "40.0", "8.02",
                         "5.00", "400"]
    # --top 2: the two most frequent, per request.
    assert ("* zope, zeotemp (5000 requests under strace): "
            "writev 4.00, recvfrom 3.80") in md.splitlines()
