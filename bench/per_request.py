#!/usr/bin/env python3
"""Per-request costs of zeotemp and the stock Python ZEO server.

    target/pyvenv/bin/python bench/per_request.py [--duration 10]
        [--workloads zope,load,echo] [--connections 8] [--in-flight 8]
        [--out FILE.md] [--no-strace] [--no-perf]

For every workload and server (the stock server: runzeo over a
``<mappingstorage 1>`` with client-conflict-resolution, started as
bench/compare.py starts it; zeotemp: target/release/zeotemp) it runs
``zeotemp-bench`` three times, each against a fresh server:

1. **CPU**: nothing attached; the server's user and system CPU in the
   measured window (zeotemp-bench's ``--server-pid``: /proc/PID/stat), per
   request and (zope) per transaction, requests/s and transactions/s.
2. **syscalls**: ``strace -c -f -p PID`` attached when the measured window
   starts (``zeotemp-bench --start-file``) and stopped when the bench ends;
   calls per request by name.  strace slows the server a lot, so this run's
   counts are divided by this run's requests and its CPU is not used.
3. **allocations**: zeotemp: ``zeotemp-counted`` (bench/alloc-count: the
   same server with a counting allocator), its
   ``zeotemp_allocations_total`` (+ reallocations) and
   ``zeotemp_allocated_bytes_total`` scraped when the window starts and when
   the bench ends.  The stock server: run with ``PYTHONMALLOC=malloc`` (so
   every Python allocation is a libc call) and counted with
   ``perf stat -e probe_libc:malloc,probe_libc:calloc,probe_libc:realloc
   -p PID`` (uprobes on libc; the script creates the probes with ``perf
   probe`` if missing, which needs root, and removes the ones it created).
   When that is not possible the column says "not measured" and why.

Requests are replies received by zeotemp-bench in the window; a one-way
``tpc_begin``/``storea`` is not a request (it rides with its ``vote``).
Server setup, connection set-up and teardown fall outside (or, for the
syscall and allocation runs, within a few ms of) the window.

Prints Markdown tables (and writes them to --out).  Stdlib only; reuses
bench/compare.py's server helpers.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (bench/compare.py: Server, run_bench, ...)

REPO = compare.REPO
LIBC_EVENTS = ("malloc", "calloc", "realloc")
SERVERS = ("python", "zeotemp")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds measured per run (default 10)")
    p.add_argument("--workloads", default="zope,load,echo",
                   help="zeotemp-bench workloads (default zope,load,echo)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=8,
                   help="requests in flight per connection for the pipelined "
                        "workloads (zope always has one)")
    p.add_argument("--objects", type=int, default=10_000,
                   help="objects set up (zeotemp-bench --objects)")
    p.add_argument("--zeotemp-bin", default=str(REPO / "target/release/zeotemp"))
    p.add_argument("--counted-bin",
                   default=str(REPO / "target/release/zeotemp-counted"),
                   help="zeotemp with the counting allocator "
                        "(cargo build --release -p alloc-count)")
    p.add_argument("--bench-bin",
                   default=str(REPO / "target/release/zeotemp-bench"))
    p.add_argument("--python", default=str(REPO / "target/pyvenv/bin/python"),
                   help="the Python with ZEO that runs the stock server")
    p.add_argument("--servers", default="python,zeotemp")
    p.add_argument("--no-strace", action="store_true",
                   help="skip the syscall runs")
    p.add_argument("--no-perf", action="store_true",
                   help="skip the stock server's allocation run")
    p.add_argument("--top", type=int, default=12,
                   help="syscalls listed by name (the most frequent)")
    p.add_argument("--out", help="also write the Markdown here")
    a = p.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.servers = [s for s in a.servers.split(",") if s]
    bad = [s for s in a.servers if s not in SERVERS]
    if bad:
        p.error(f"--servers: unknown {bad}")
    compare.require_files(p, [a.bench_bin] + (
        [a.zeotemp_bin, a.counted_bin] if "zeotemp" in a.servers else []) + (
        [a.python] if "python" in a.servers else []))
    return a


# ------------------------------------------------------------------ runs

class Attached:
    """A tool attached to the server when the bench's --start-file appears,
    stopped with SIGINT when the bench has ended."""

    def __init__(self, start_file, cmd_for, on_start=None):
        self.start_file, self.cmd_for, self.on_start = start_file, cmd_for, on_start
        self.proc = None
        self.error = None
        self.stop_wanted = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.start_file.exists():
            if self.stop_wanted.wait(0.005):
                self.error = "the measured window never started"
                return
        try:
            if self.on_start:
                self.on_start()
            cmd = self.cmd_for()
            if cmd:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)
        except Exception as e:      # reported in the table, not fatal
            self.error = str(e)

    def stop(self):
        self.stop_wanted.set()
        self.thread.join(30)
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def bench(args, server, workload, extra=()):
    k = 1 if workload == "zope" else args.in_flight
    return compare.run_bench(args, server, workload, args.connections, k,
                             args.duration,
                             extra=["--objects", str(args.objects), *extra])


def with_server(args, kind, workdir, fn, extra=(), env=None):
    server = compare.Server(kind, args, workdir, extra)
    saved = {}
    for k, v in (env or {}).items():
        saved[k] = os.environ.get(k)
        os.environ[k] = v
    try:
        server.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        return fn(server)
    finally:
        server.stop()


def cpu_run(args, kind, workload, workdir):
    return with_server(args, kind, workdir,
                       lambda s: bench(args, s, workload))


def bench_attached(args, server, workload, start, name, cmd_for, on_start=None):
    """One bench run with a tool attached to the server for its measured
    window (`Attached`): the bench's result and the tool's stderr. `name`
    labels the tool's failure."""
    tool = Attached(start, cmd_for, on_start=on_start)
    try:
        res = bench(args, server, workload, ["--start-file", str(start)])
    finally:
        err = tool.stop()
    if tool.error:
        raise RuntimeError(f"{name}: {tool.error}")
    return res, err


def strace_run(args, kind, workload, workdir):
    """{syscall: calls} over the window, and the run's requests."""
    out = Path(tempfile.mkstemp(prefix="strace-", dir=workdir)[1])
    start = Path(workdir) / f"start-strace-{kind}-{workload}"

    def fn(server):
        res, err = bench_attached(
            args, server, workload, start, "strace",
            lambda: ["strace", "-c", "-f", "-o", str(out), "-p", str(server.pid)])
        calls = parse_strace(out.read_text(errors="replace"))
        if not calls:
            raise RuntimeError(f"strace counted nothing: {err.strip()[-300:]}")
        return calls, res

    return with_server(args, kind, workdir, fn)


def parse_strace(text):
    """``strace -c`` summary -> {syscall: calls}."""
    calls = {}
    for line in text.splitlines():
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(f) >= 5 and re.fullmatch(r"[\d.]+", f[0]) and f[3].isdigit() \
                and f[-1] != "total":
            calls[f[-1]] = calls.get(f[-1], 0) + int(f[3])
    return calls


def scrape(url, names):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    got = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            got[parts[0]] = float(parts[1])
    missing = [n for n in names if n not in got]
    if missing:
        raise RuntimeError(f"{url} has no {missing} (not zeotemp-counted?)")
    return got


ALLOC_METRICS = ("zeotemp_allocations_total", "zeotemp_reallocations_total",
                 "zeotemp_allocated_bytes_total")


def zeotemp_alloc_run(args, workload, workdir):
    """(allocations incl. reallocations, bytes) over the window, requests."""
    start = Path(workdir) / f"start-alloc-{workload}"
    counted = argparse.Namespace(**vars(args))
    counted.zeotemp_bin = args.counted_bin

    def fn(server):
        log = compare.strip_ansi(server.log_path.read_text(errors="replace"))
        m = re.search(r"metrics on (http://\S+/metrics)", log)
        if not m:
            raise RuntimeError(f"no metrics address in {server.log_path}")
        url = m.group(1)
        before = {}
        res, _ = bench_attached(
            args, server, workload, start, "metrics", lambda: None,
            on_start=lambda: before.update(scrape(url, ALLOC_METRICS)))
        if not before:
            raise RuntimeError("metrics: not scraped when the window started")
        after = scrape(url, ALLOC_METRICS)
        d = {k: after[k] - before[k] for k in ALLOC_METRICS}
        return (d["zeotemp_allocations_total"] + d["zeotemp_reallocations_total"],
                d["zeotemp_allocated_bytes_total"]), res

    return with_server(counted, "zeotemp", workdir, fn,
                       extra=["--metrics-address", "127.0.0.1:0"])


def libc_path():
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("libc.so.6 (") and "=>" in line:
            return line.rsplit("=>", 1)[1].strip()
    return "/lib/x86_64-linux-gnu/libc.so.6"


def ensure_probes():
    """Creates the libc uprobes that are missing; returns those created.
    Raises RuntimeError with the reason when perf cannot."""
    if not shutil.which("perf"):
        raise RuntimeError("perf not installed")
    listed = subprocess.run(["perf", "probe", "-l"], capture_output=True,
                            text=True).stdout
    created = []
    for ev in LIBC_EVENTS:
        if f"probe_libc:{ev} " in listed or f"probe_libc:{ev}\t" in listed:
            continue
        r = subprocess.run(["perf", "probe", "-x", libc_path(), ev],
                           capture_output=True, text=True)
        if r.returncode != 0:
            remove_probes(created)
            raise RuntimeError(f"perf probe {ev}: {r.stderr.strip()[-200:]}")
        created.append(ev)
    return created


def remove_probes(created):
    for ev in created:
        subprocess.run(["perf", "probe", "-d", f"probe_libc:{ev}"],
                       capture_output=True)


def python_alloc_run(args, workload, workdir):
    """libc malloc+calloc+realloc calls of the stock server (PYTHONMALLOC=
    malloc) over the window, and the run's requests."""
    start = Path(workdir) / f"start-perf-{workload}"
    events = ",".join(f"probe_libc:{e}" for e in LIBC_EVENTS)

    def fn(server):
        res, err = bench_attached(
            args, server, workload, start, "perf",
            lambda: ["perf", "stat", "-x,", "-e", events, "-p", str(server.pid)])
        total = 0
        seen = 0
        for line in err.splitlines():
            f = line.split(",")
            if len(f) > 2 and f[2].startswith("probe_libc:") and f[0].isdigit():
                total += int(f[0])
                seen += 1
        if seen != len(LIBC_EVENTS):
            raise RuntimeError(f"perf stat: {err.strip()[-300:]}")
        return total, res

    return with_server(args, "python", workdir, fn,
                       env={"PYTHONMALLOC": "malloc"})


# ---------------------------------------------------------------- report

def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def per(n, d):
    return n / d if d else None


def report(args, results, syscalls, allocs, notes):
    lines = [
        f"Per-request costs, {args.connections} connections, "
        f"{args.duration:g} s per run (zope: 1 request in flight per "
        f"connection; load/echo: {args.in_flight})",
        "",
        "| workload | server | req/s | txn/s | user µs/req | sys µs/req "
        "| CPU µs/txn | syscalls/req | allocs/req | alloc bytes/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in args.workloads:
        for kind in args.servers:
            r = results.get((kind, w))
            if r is None:
                continue
            if isinstance(r, str):
                lines.append(f"| {w} | {kind} | {r} | | | | | | | |")
                continue
            ops, txns = r["ops"], r["txns"]
            user = per(r.get("server_user_s") * 1e6, ops) \
                if r.get("server_user_s") is not None else None
            sys_ = per(r.get("server_sys_s") * 1e6, ops) \
                if r.get("server_sys_s") is not None else None
            cpu_txn = r.get("server_cpu_us_per_txn") if w == "zope" else None
            sc = syscalls.get((kind, w))
            sc_cell = (fmt(per(sum(sc[0].values()), sc[1]["ops"]), 2)
                       if isinstance(sc, tuple) else (sc or "–"))
            al = allocs.get((kind, w))
            if isinstance(al, tuple):
                (n, nbytes), ops_a = al[0], al[1]["ops"]
                a_cell = fmt(per(n, ops_a), 2)
                b_cell = fmt(per(nbytes, ops_a)) if nbytes is not None else "–"
            else:
                a_cell, b_cell = al or "–", "–"
            lines.append(
                f"| {w} | {kind} | {fmt(r['ops_per_s'])} | "
                f"{fmt(r['txns_per_s']) if txns else '–'} | {fmt(user, 2)} | "
                f"{fmt(sys_, 2)} | {fmt(cpu_txn)} | {sc_cell} | {a_cell} | {b_cell} |")
    if any(isinstance(v, tuple) for v in syscalls.values()):
        lines += ["", f"Syscalls per request by name (the {args.top} most "
                  "frequent per run; strace -c -f, a separate run):", ""]
        for w in args.workloads:
            for kind in args.servers:
                sc = syscalls.get((kind, w))
                if not isinstance(sc, tuple):
                    continue
                calls, res = sc
                top = sorted(calls.items(), key=lambda kv: -kv[1])[:args.top]
                cells = ", ".join(f"{name} {fmt(per(n, res['ops']), 2)}"
                                  for name, n in top)
                lines.append(f"* {w}, {kind} ({res['ops']} requests under "
                             f"strace): {cells}")
    runs = [(w, kind, allocs[(kind, w)]) for w in args.workloads
            for kind in args.servers if isinstance(allocs.get((kind, w)), tuple)]
    if runs:
        lines += ["", "Allocation runs (their own servers; the counting slows "
                  "the stock server a lot, so its rates differ):", ""]
        for w, kind, ((n, _), res) in runs:
            lines.append(f"* {w}, {kind}: {n:,.0f} allocations over "
                         f"{res['ops']} requests in {res['duration_s']:.2f} s")
    if notes:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    notes = [
        "allocs/req: zeotemp: heap allocations + reallocations of "
        "zeotemp-counted (its own run); stock server: libc malloc + calloc + "
        "realloc calls under PYTHONMALLOC=malloc (perf uprobes, its own run); "
        "alloc bytes/req for zeotemp only.",
        "The stock server sends an `info` (storage size) after every commit, "
        "and MappingStorage.getSize walks every revision of every object: "
        "its cost per transaction grows with --objects and the history "
        "(a cProfile of a zope run: most of its time).",
    ]
    results, syscalls, allocs = {}, {}, {}
    have_strace = shutil.which("strace") is not None
    if not args.no_strace and not have_strace:
        notes.append("syscalls not measured: strace is not installed")
    created = []
    perf_ok = None
    if "python" in args.servers and not args.no_perf:
        try:
            created = ensure_probes()
            perf_ok = True
        except RuntimeError as e:
            perf_ok = f"not measured ({e})"
            notes.append(f"stock server allocations not measured: {e}")
    elif "python" in args.servers:
        perf_ok = "not measured (--no-perf)"
    with tempfile.TemporaryDirectory(prefix="per-request-") as workdir:
        try:
            for w in args.workloads:
                for kind in args.servers:
                    print(f"{w} / {kind}: CPU run ...", file=sys.stderr, flush=True)
                    try:
                        results[(kind, w)] = cpu_run(args, kind, w, workdir)
                    except RuntimeError as e:
                        results[(kind, w)] = f"failed: {e}"[:120]
                        continue
                    if not args.no_strace and have_strace:
                        print(f"{w} / {kind}: strace run ...", file=sys.stderr,
                              flush=True)
                        try:
                            syscalls[(kind, w)] = strace_run(args, kind, w, workdir)
                        except RuntimeError as e:
                            syscalls[(kind, w)] = f"failed: {e}"[:80]
                    print(f"{w} / {kind}: allocation run ...", file=sys.stderr,
                          flush=True)
                    try:
                        if kind == "zeotemp":
                            allocs[(kind, w)] = zeotemp_alloc_run(args, w, workdir)
                        elif perf_ok is True:
                            n, res = python_alloc_run(args, w, workdir)
                            allocs[(kind, w)] = ((n, None), res)
                        else:
                            allocs[(kind, w)] = perf_ok
                    except RuntimeError as e:
                        allocs[(kind, w)] = f"failed: {e}"[:80]
        finally:
            remove_probes(created)
    md = report(args, results, syscalls, allocs, notes)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
