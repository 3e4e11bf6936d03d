#!/usr/bin/env python3
"""Throughput, latency, CPU and memory: zeotemp vs the stock Python ZEO server.

    python bench/compare.py [--connections 1,4,16,64]
        [--workloads load,commit,session,echo] [--duration 5] [--in-flight 8]
        [--out FILE.md] [--svg FILE.svg]
        [--zeotemp-bin target/release/zeotemp]
        [--bench-bin target/release/zeotemp-bench]
    python bench/compare.py --memory [--memory-objects 100000,1000000]
        [--memory-sizes 200,2048] [--out FILE.md]
    python bench/compare.py --real-client [--clients 4] [--duration 20]
        [--client-arg=--write-fraction=0.5 ...] [--out FILE.md]

For every workload x connection count it starts a fresh server of each kind
(the stock server first, then zeotemp), drives it with ``zeotemp-bench
--json --server-pid PID`` and stops it again.  ``--memory`` instead stores N
objects of S bytes in a fresh server of each kind and reads its VmRSS.
``--real-client`` instead runs N processes of the real Python client (ZODB +
ClientStorage, ``bench/session_client.py``: a Zope-session-like request
mix) against a fresh server of each kind and reports requests/s, commits/s
and the server's CPU seconds per 1000 requests and per 1000 commits.

Stdlib only; the stock server runs under --python (default
target/pyvenv/bin/python, which has ZEO 6.2).  See bench/README.md.
"""

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SESSION_CLIENT = REPO / "bench" / "session_client.py"
TXN_WORKLOADS = ("commit", "session")
ALL_WORKLOADS = ("load", "commit", "session", "echo")
SERVERS = ("python", "zeotemp")
PY_SKIP_SECONDS = 300  # default --max-setup-seconds for the stock server


class Interrupted(Exception):
    """A run stopped by SIGTERM (see raise_on_sigterm)."""


def raise_on_sigterm():
    """SIGTERM raises Interrupted and SIGINT KeyboardInterrupt in the main
    thread, so a stopped run still stops its servers and says so. Used by
    every bench script (compare.py, bad_clients.py, soak.py)."""
    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def require_files(parser, paths):
    """Stop with a usage error naming the first of `paths` that is missing."""
    for path in paths:
        if not Path(path).exists():
            parser.error(f"{path} not found (cargo build --release; "
                         "tests/run-all.sh builds target/pyvenv)")


# ---------------------------------------------------------------- servers

class Server:
    """One fresh server process (zeotemp or stock runzeo), always stoppable."""

    def __init__(self, kind, args, workdir, extra=()):
        self.kind, self.args, self.workdir = kind, args, Path(workdir)
        # More zeotemp arguments (e.g. --memory-limit); not for runzeo.
        self.extra = list(extra)
        self.proc = None
        self.address = None
        self.log_path = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=30):
        n = len(list(self.workdir.glob("*.log")))
        self.log_path = self.workdir / f"{self.kind}-{n}.log"
        log = open(self.log_path, "wb")
        try:
            if self.kind == "zeotemp":
                cmd = [self.args.zeotemp_bin, "--address", "127.0.0.1:0", *self.extra]
            else:
                port = free_port()
                conf = self.workdir / f"zeo-{n}.conf"
                conf.write_text(
                    "<zeo>\n"
                    f"  address 127.0.0.1:{port}\n"
                    "  client-conflict-resolution true\n"
                    "</zeo>\n"
                    "<mappingstorage 1>\n"
                    "</mappingstorage>\n")
                cmd = [self.args.python, "-m", "ZEO.runzeo", "-C", str(conf)]
                self.address = f"127.0.0.1:{port}"
            # Own session: a Ctrl-C in the terminal reaches only us, and we
            # stop the server ourselves (in order, bounded).
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with "
                                   f"{self.proc.returncode}; log {self.log_path}")
            if self.kind == "zeotemp":
                m = re.search(r"listening on tcp (\S+:\d+)",
                              strip_ansi(self.log_path.read_text(errors="replace")))
                if m:
                    self.address = m.group(1)
                    return
            elif port_open(self.address):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server not ready after {timeout} s; "
                           f"log {self.log_path}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_count(self, pattern):
        """Lines of the server's log matching ``pattern`` (None: no log)."""
        try:
            text = strip_ansi(self.log_path.read_text(errors="replace"))
        except (OSError, TypeError):
            return None
        return len(re.findall(pattern, text))

    def rss_kib(self):
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self):
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        except ProcessLookupError:
            pass


def strip_ansi(s):
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(address):
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def proc_cpu_s(pid):
    """User + system CPU seconds of ``pid`` (all its threads) so far, from
    /proc/PID/stat (fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # fields[0] = field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_bench(args, server, workload, connections, in_flight, duration,
              extra=(), timeout=None):
    cmd = [args.bench_bin, "--address", server.address, "--workload", workload,
           "--connections", str(connections), "--in-flight", str(in_flight),
           "--duration", f"{duration:g}", "--server-pid", str(server.pid),
           "--json", *extra]
    if timeout is None:
        timeout = duration + 120
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"zeotemp-bench failed ({r.returncode}): "
                           f"{r.stderr.strip()[-500:]}")
    lines = [l for l in r.stdout.splitlines() if l.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"zeotemp-bench printed no JSON: {r.stdout[-300:]}")
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    return res


def with_server(args, kind, workdir, fn, servers_alive):
    server = Server(kind, args, workdir)
    servers_alive.append(server)
    try:
        server.start()
        return fn(server)
    finally:
        server.stop()
        servers_alive.remove(server)


class ClientGroup:
    """The ``session_client.py`` worker processes of one real-client run.
    Each runs in its own session (a Ctrl-C in the terminal reaches only us);
    ``stop()`` ends the ones still running (SIGTERM, SIGKILL after 5 s)."""

    def __init__(self, args, server, n, rundir):
        self.args, self.server, self.n = args, server, n
        self.rundir = Path(rundir)
        self.procs = []

    def start(self):
        for i in range(self.n):
            out = open(self.rundir / f"out-{i}", "wb")
            err = open(self.rundir / f"err-{i}", "wb")
            try:
                self.procs.append(subprocess.Popen(
                    [self.args.python, str(SESSION_CLIENT),
                     "--address", self.server.address, "--worker", str(i),
                     "--clients", str(self.n),
                     "--duration", f"{self.args.duration:g}",
                     "--sync-dir", str(self.rundir), *self.args.client_arg],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True))
            finally:
                out.close()
                err.close()

    def ready(self):
        return all((self.rundir / f"ready-{i}").exists() for i in range(self.n))

    def result(self, i):
        """Worker i's JSON line (complete lines only), or None."""
        try:
            text = (self.rundir / f"out-{i}").read_text(errors="replace")
        except OSError:
            return None
        for line in text.split("\n")[:-1]:
            if line.startswith("{"):
                return json.loads(line)
        return None

    def stderr_tail(self, i, lines=5):
        try:
            text = (self.rundir / f"err-{i}").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(l for l in text.splitlines()[-lines:] if l.strip())

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def real_client_run(args, server, n, workdir, alive):
    """Set up the session data, run ``n`` session_client.py workers for
    --duration seconds from a common start, and return their totals plus the
    server's CPU seconds from the start until every worker has reported."""
    rundir = Path(tempfile.mkdtemp(prefix=f"{server.kind}-{n}clients-",
                                   dir=workdir))
    setup_args = []      # the data-shaping --client-arg options, for --setup
    for a in args.client_arg:
        if a.split("=", 1)[0] in ("--sessions", "--hot", "--storage"):
            setup_args.append(a)
    r = subprocess.run([args.python, str(SESSION_CLIENT), "--setup",
                        "--address", server.address, *setup_args],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"session setup failed ({r.returncode}): "
                           f"{r.stderr.strip()[-500:]}")
    group = ClientGroup(args, server, n, rundir)
    alive.append(group)
    try:
        group.start()
        deadline = time.monotonic() + 120
        while not group.ready():
            for i, p in enumerate(group.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"client {i} exited with {p.returncode} "
                                       f"before the start: {group.stderr_tail(i)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients not connected after 120 s "
                                   f"(files in {rundir})")
            time.sleep(0.02)
        start_at = time.time() + 0.2
        (rundir / "start.tmp").write_text(f"{start_at!r}\n")
        (rundir / "start.tmp").rename(rundir / "start")
        time.sleep(max(0.0, start_at - time.time()))
        cpu0, t0 = proc_cpu_s(server.pid), time.monotonic()
        deadline = t0 + args.duration + 120
        results = [None] * n
        while True:
            for i, p in enumerate(group.procs):
                if results[i] is None:
                    exited = p.poll() is not None
                    results[i] = group.result(i)
                    if results[i] is None and exited:
                        raise RuntimeError(
                            f"client {i} exited with {p.returncode} without a "
                            f"result: {group.stderr_tail(i)}")
            if all(results):
                break
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.kind} server died "
                                   f"({server.proc.returncode}); log "
                                   f"{server.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients not finished {args.duration + 120:g} s "
                                   f"after the start (files in {rundir})")
            time.sleep(0.02)
        cpu1, window = proc_cpu_s(server.pid), time.monotonic() - t0
        for i, p in enumerate(group.procs):
            if "fatal" in results[i]:
                raise RuntimeError(f"client {i}: {results[i]['fatal']}")
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"client {i} did not exit after its run")
            if p.returncode != 0:
                raise RuntimeError(f"client {i} exited with {p.returncode}: "
                                   f"{group.stderr_tail(i)}")
    finally:
        group.stop()
        alive.remove(group)
    tot = {k: sum(r[k] for r in results)
           for k in ("requests", "commits", "read_only", "conflicts", "errors")}
    tot["elapsed_s"] = max(r["elapsed_s"] for r in results)
    tot["late_s"] = max(r["late_s"] for r in results)
    tot["client_cpu_s"] = sum(r["client_cpu_s"] for r in results)
    tot["server_cpu_s"] = cpu1 - cpu0
    tot["window_s"] = window
    samples = {}          # error text -> workers that reported it
    for r in results:
        for e in r["error_samples"]:
            samples.setdefault(e, []).append(r["worker"])
    tot["error_samples"] = [
        f"{e} ({len(ws)} x, client{'s' if len(set(ws)) > 1 else ''} "
        f"{', '.join(map(str, sorted(set(ws))))})"
        for e, ws in samples.items()][:10]
    el = tot["elapsed_s"] or None
    tot["requests_per_s"] = tot["requests"] / el if el else None
    tot["commits_per_s"] = tot["commits"] / el if el else None
    return tot


# ------------------------------------------------------------- formatting

def fmt(v, digits=None):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if digits is None:
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return f"{v:.{digits}f}"


def fmt_sig(v):
    return "–" if v is None else f"{v:.3g}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}x"


def text_table(header, rows):
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.rjust(w[i]) for i, c in enumerate(header)),
           "  ".join("-" * x for x in w)]
    out += ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells[1:]]
    return "\n".join(out)


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" ---: " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def throughput_rows(workload, conns, results):
    txn = workload in TXN_WORKLOADS
    header = ["conns", "py ops/s", "zt ops/s", "zt/py"]
    if txn:
        header += ["py txn/s", "zt txn/s", "zt/py"]
    unit = "1k txn" if txn else "1k ops"
    header += ["py p99 µs", "zt p99 µs",
               f"py CPU s/{unit}", f"zt CPU s/{unit}", "zt/py CPU", "errors py/zt"]
    rows = []
    for n in conns:
        py, zt = results.get(("python", workload, n)), results.get(("zeotemp", workload, n))

        def g(r, k):
            return None if r is None or "error" in r else r.get(k)

        def cpu_per_k(r):
            units = g(r, "txns" if txn else "ops")
            cpu = g(r, "server_cpu_s")
            if not units or cpu is None:
                return None
            return cpu / units * 1000

        row = [n, fmt(g(py, "ops_per_s")), fmt(g(zt, "ops_per_s")),
               fmt_ratio(ratio(g(zt, "ops_per_s"), g(py, "ops_per_s")))]
        if txn:
            row += [fmt(g(py, "txns_per_s")), fmt(g(zt, "txns_per_s")),
                    fmt_ratio(ratio(g(zt, "txns_per_s"), g(py, "txns_per_s")))]
        cp, cz = cpu_per_k(py), cpu_per_k(zt)
        row += [fmt(g(py, "p99_us")), fmt(g(zt, "p99_us")),
                fmt_sig(cp), fmt_sig(cz), fmt_ratio(ratio(cz, cp))]
        errs = []
        for r in (py, zt):
            if r is None:
                errs.append("–")
            elif "error" in r:
                errs.append("FAILED")
            else:
                errs.append(str(r.get("errors", 0)))
        row.append("/".join(errs))
        rows.append(row)
    return header, rows


def real_client_rows(clients, results):
    """Two tables (throughput, server CPU), rows = client process counts."""
    def g(kind, n, k):
        r = results.get((kind, n))
        return None if r is None or "error" in r else r.get(k)

    def per_k(kind, n, unit):
        units, cpu = g(kind, n, unit), g(kind, n, "server_cpu_s")
        if not units or cpu is None:
            return None
        return cpu / units * 1000

    def both(n, k):
        out = []
        for kind in SERVERS:
            r = results.get((kind, n))
            out.append("–" if r is None else "FAILED" if "error" in r
                       else fmt(r.get(k)) if isinstance(r.get(k), float)
                       else str(r.get(k)))
        return "/".join(out)

    th = ["clients", "py req/s", "zt req/s", "zt/py", "py commits/s",
          "zt commits/s", "zt/py", "conflicts py/zt", "errors py/zt"]
    tr, cr = [], []
    for n in clients:
        row = [n]
        for k in ("requests_per_s", "commits_per_s"):
            py, zt = g("python", n, k), g("zeotemp", n, k)
            row += [fmt(py), fmt(zt), fmt_ratio(ratio(zt, py))]
        row += [both(n, "conflicts"), both(n, "errors")]
        tr.append(row)
        row = [n, fmt(g("python", n, "server_cpu_s")),
               fmt(g("zeotemp", n, "server_cpu_s"))]
        for unit in ("requests", "commits"):
            py, zt = per_k("python", n, unit), per_k("zeotemp", n, unit)
            row += [fmt_sig(py), fmt_sig(zt), fmt_ratio(ratio(zt, py))]
        row.append(both(n, "client_cpu_s"))
        cr.append(row)
    ch = ["clients", "py CPU s", "zt CPU s", "py CPU s/1k req",
          "zt CPU s/1k req", "zt/py", "py CPU s/1k commits",
          "zt CPU s/1k commits", "zt/py", "client CPU s py/zt"]
    return (th, tr), (ch, cr)


def xpos(n, conns, width):
    lo, hi = math.log(min(conns)), math.log(max(conns))
    if hi == lo:
        return width // 2
    return round((math.log(n) - lo) / (hi - lo) * (width - 1))


def ascii_plot(workload, conns, results, width=56, height=12):
    """ops/s (y, from 0) against connections (x, log scale); P = stock
    Python server, Z = zeotemp, * = both on one cell."""
    series = {}
    for kind in SERVERS:
        pts = []
        for n in conns:
            r = results.get((kind, workload, n))
            if r and "error" not in r:
                pts.append((n, r["ops_per_s"]))
        series[kind] = pts
    ymax = max([v for pts in series.values() for _, v in pts] or [0])
    if ymax <= 0:
        return f"{workload}: no data"
    grid = [[" "] * width for _ in range(height)]

    def yrow(v):
        return height - 1 - min(height - 1, round(v / ymax * (height - 1)))

    for kind, mark in (("python", "P"), ("zeotemp", "Z")):
        pts = [(xpos(n, conns, width), v) for n, v in series[kind]]
        for (x0, v0), (x1, v1) in zip(pts, pts[1:]):   # dotted lines
            for x in range(x0 + 1, x1):
                v = v0 + (v1 - v0) * (x - x0) / (x1 - x0)
                if grid[yrow(v)][x] == " ":
                    grid[yrow(v)][x] = "."
        for x, v in pts:
            c = grid[yrow(v)][x]
            grid[yrow(v)][x] = "*" if c in "PZ*" and c != mark else mark
    label_w = len(f"{ymax:,.0f}")
    lines = [f"{workload}: ops/s vs connections (P = Python ZEO, Z = zeotemp, "
             f"* = both)"]
    for i, row in enumerate(grid):
        v = ymax * (height - 1 - i) / (height - 1)
        lab = f"{v:,.0f}" if i in (0, height // 2, height - 1) else ""
        lines.append(f"{lab:>{label_w}} |" + "".join(row))
    lines.append(" " * label_w + " +" + "-" * width)
    axis = [" "] * (width + 4)
    for n in conns:
        s = str(n)
        x = xpos(n, conns, width)
        for j, ch in enumerate(s):
            if x + j < len(axis):
                axis[x + j] = ch
    lines.append(" " * (label_w + 2) + "".join(axis).rstrip() + "  connections")
    return "\n".join(lines)


def svg_chart(workloads, conns, results):
    pw, ph = 340, 260
    ml, mr, mt, mb = 62, 14, 30, 40
    W = pw * len(workloads)
    H = ph + 24
    colors = {"python": "#1f77b4", "zeotemp": "#d62728"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    for i, w in enumerate(workloads):
        ox = i * pw
        x0, x1, y0, y1 = ox + ml, ox + pw - mr, mt, ph - mb
        vals = [results[(k, w, n)]["ops_per_s"] for k in SERVERS for n in conns
                if (k, w, n) in results and "error" not in results[(k, w, n)]]
        ymax = max(vals or [1]) * 1.1
        lo, hi = math.log(min(conns)), math.log(max(conns))

        def X(n):
            if hi == lo:
                return (x0 + x1) / 2
            return x0 + (math.log(n) - lo) / (hi - lo) * (x1 - x0)

        def Y(v):
            return y1 - v / ymax * (y1 - y0)

        out.append(f'<text x="{(x0 + x1) / 2}" y="18" text-anchor="middle" '
                   f'font-weight="bold">{w}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" '
                   f'fill="none" stroke="#888"/>')
        for t in range(5):
            v = ymax * t / 4
            y = Y(v)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" '
                       f'stroke="#eee"/>')
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">'
                       f'{v:,.0f}</text>')
        for n in conns:
            x = X(n)
            out.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 4}" '
                       f'stroke="#888"/>')
            out.append(f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="middle">'
                       f'{n}</text>')
        out.append(f'<text x="{(x0 + x1) / 2}" y="{y1 + 32}" text-anchor="middle">'
                   f'connections (log)</text>')
        out.append(f'<text x="{ox + 12}" y="{(y0 + y1) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {ox + 12} {(y0 + y1) / 2})">ops/s</text>')
        for k in SERVERS:
            pts = [(X(n), Y(results[(k, w, n)]["ops_per_s"])) for n in conns
                   if (k, w, n) in results and "error" not in results[(k, w, n)]]
            if len(pts) > 1:
                out.append('<polyline fill="none" stroke="{}" stroke-width="2" '
                           'points="{}"/>'.format(
                               colors[k], " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" '
                           f'fill="{colors[k]}"/>')
    ly = H - 8
    for j, (k, label) in enumerate((("python", "stock Python ZEO"),
                                    ("zeotemp", "zeotemp"))):
        lx = 20 + j * 180
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" '
                   f'stroke="{colors[k]}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 30}" y="{ly}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- machine

def cpu_model():
    """The CPU's model name from /proc/cpuinfo, or "?"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine_info(args):
    cpu = cpu_model()

    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (r.stdout.strip() or r.stderr.strip()).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - informational only
            return f"? ({e})"

    return {
        "nproc": out(["nproc"]),
        "cpu": cpu,
        "kernel": platform.release(),
        "zeotemp": out([args.zeotemp_bin, "--version"]),
        "ZEO": out([args.python, "-c", "import importlib.metadata as m; "
                    "print('ZEO', m.version('ZEO'), '/ ZODB', m.version('ZODB'), "
                    "'/ Python', __import__('platform').python_version())"]),
    }


# ------------------------------------------------------------------- runs

def run_throughput(args, workdir, alive, report):
    conns = args.connections
    results = {}
    total = len(args.workloads) * len(conns) * len(SERVERS) * args.repeat
    i = 0
    runs = {}
    # Rounds over the whole grid rather than repeats back to back, so a
    # slow spell of the machine does not hit all repeats of one case.
    for _ in range(args.repeat):
        for w in args.workloads:
            for n in conns:
                for kind in SERVERS:
                    i += 1
                    print(f"[{i}/{total}] {kind:7} {w:7} {n:3} conn x "
                          f"{args.in_flight} in flight, {args.duration:g} s ...",
                          end=" ", flush=True)
                    try:
                        r = with_server(args, kind, workdir, lambda s: run_bench(
                            args, s, w, n, args.in_flight, args.duration), alive)
                        print(f"{r['ops_per_s']:,.0f} ops/s, p99 {r['p99_us']} µs, "
                              f"CPU {r['server_cpu_s']} s, errors {r['errors']}",
                              flush=True)
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                        r = {"error": str(e)}
                        print(f"FAILED: {e}", flush=True)
                    runs.setdefault((kind, w, n), []).append(r)
    # Each case reports its median run by ops/s (all its figures from that
    # one run); a failed repeat fails the case.
    for key, rs in runs.items():
        failed = [r for r in rs if "error" in r]
        if failed:
            results[key] = failed[0]
            continue
        rs = sorted(rs, key=lambda r: r["ops_per_s"])
        results[key] = rs[(len(rs) - 1) // 2]
    for w in args.workloads:
        header, rows = throughput_rows(w, conns, results)
        report.section(f"{w}", text=text_table(header, rows),
                       md=md_table(header, rows))
        report.pre(ascii_plot(w, conns, results))
    fails = [f"{k} {w} {n}: {r['error']}" for (k, w, n), r in results.items()
             if "error" in r]
    if fails:
        report.para("Failed runs:\n" + "\n".join(f"* {f}" for f in fails))
    if args.svg:
        Path(args.svg).write_text(svg_chart(args.workloads, conns, results))
        print(f"\nSVG chart written to {args.svg}")
    return results, bool(fails)


def run_memory(args, workdir, alive, report):
    rows = []
    failed = False
    py_secs_per_obj = {}  # size -> (N, seconds per object) of the last Python setup
    py_rate = {}          # (size, N) -> seconds per object
    py_timed_out = []     # counts the stock server did not store in time
    for size in args.memory_sizes:
        for n in args.memory_objects:
            row = {"n": n, "size": size}
            for kind in SERVERS:
                label = f"{kind:7} {n:>9,} x {size:>5} B"
                if kind == "python" and py_timed_out and n >= min(py_timed_out):
                    msg = (f"skipped (the stock server took over "
                           f"{args.max_setup_seconds // 60} min for "
                           f"{min(py_timed_out):,} objects)")
                    print(f"{label}: {msg}", flush=True)
                    row[kind] = {"skipped": msg}
                    continue
                if kind == "python" and size in py_secs_per_obj:
                    # Linear from the smaller count of this size, times how
                    # much slower per object the stock server got at this
                    # count for an earlier size (its setup is superlinear).
                    small_n, rate = py_secs_per_obj[size]
                    growth = max([1.0] + [
                        r2 / r1 for (s1, n1), r1 in py_rate.items()
                        for (s2, n2), r2 in py_rate.items()
                        if s1 == s2 and n1 == small_n and n2 == n])
                    est = rate * n * growth
                    if est > args.max_setup_seconds:
                        msg = (f"skipped (estimated {est / 60:.0f} min from "
                               f"its setup time for {small_n:,} objects; over "
                               f"{args.max_setup_seconds // 60} min)")
                        print(f"{label}: {msg}", flush=True)
                        row[kind] = {"skipped": msg}
                        continue
                print(f"{label} ...", end=" ", flush=True)

                def measure(server):
                    time.sleep(0.3)
                    empty = server.rss_kib()
                    # load's setup commits the N objects (in batches) and a
                    # root referring to all of them; then 0.1 s of loads.
                    r = run_bench(args, server, "load", 1, 1, 0.1,
                                  extra=("--objects", str(n),
                                         "--object-size", str(size)),
                                  timeout=args.max_setup_seconds if server.kind
                                  == "python" else 600)
                    time.sleep(0.5)
                    return {"empty_kib": empty, "rss_kib": server.rss_kib(),
                            "setup_s": r["wall_s"], "errors": r["errors"]}
                try:
                    m = with_server(args, kind, workdir, measure, alive)
                    if kind == "python":
                        py_secs_per_obj[size] = (n, m["setup_s"] / n)
                        py_rate[(size, n)] = m["setup_s"] / n
                    print(f"RSS {m['rss_kib'] / 1024:,.1f} MiB (empty "
                          f"{m['empty_kib'] / 1024:,.1f} MiB), setup "
                          f"{m['setup_s']:.1f} s", flush=True)
                except subprocess.TimeoutExpired as e:
                    if kind == "python":
                        py_timed_out.append(n)
                        m = {"skipped": f"timed out (setup over "
                                        f"{e.timeout / 60:.0f} min)"}
                    else:
                        m = {"error": str(e)}
                        failed = True
                    print(f"{m.get('skipped') or 'FAILED: ' + str(e)}", flush=True)
                except (RuntimeError, ValueError) as e:
                    m = {"error": str(e)}
                    failed = True
                    print(f"FAILED: {e}", flush=True)
                row[kind] = m
            rows.append(row)

    header = ["objects", "size B", "payload MiB", "py empty MiB", "py RSS MiB",
              "zt empty MiB", "zt RSS MiB", "py B/obj overhead",
              "zt B/obj overhead", "zt/py overhead", "zt/py RSS"]
    out = []
    notes = []
    for row in rows:
        n, size = row["n"], row["size"]
        payload = n * size
        cells = [f"{n:,}", size, fmt(payload / 2**20)]
        over, rss = {}, {}
        for kind in SERVERS:
            m = row[kind]
            if "rss_kib" in m and m["rss_kib"] is not None:
                rss[kind] = m["rss_kib"] * 1024
                over[kind] = (rss[kind] - payload - m["empty_kib"] * 1024) / n
            elif "skipped" in m:
                notes.append(f"Python server, {n:,} x {size} B: {m['skipped']}.")
        for kind in SERVERS:
            m = row[kind]
            if "rss_kib" in m:
                cells += [fmt(m["empty_kib"] / 1024), fmt(m["rss_kib"] / 1024)]
            else:
                tag = "skipped" if "skipped" in m else "FAILED"
                cells += [tag, tag]
        # reorder to header: py empty, py RSS, zt empty, zt RSS — done above.
        cells += [fmt(over.get("python"), 0), fmt(over.get("zeotemp"), 0),
                  fmt_ratio(ratio(over.get("zeotemp"), over.get("python"))),
                  fmt_ratio(ratio(rss.get("zeotemp"), rss.get("python")))]
        out.append(cells)
    report.section("memory: RSS after storing N objects", text=text_table(header, out),
                   md=md_table(header, out))
    report.para(
        "overhead per object = (VmRSS - N x size - VmRSS of the same server "
        "right after start) / N. The setup also commits a root record "
        "referring to all N objects (~10 B each), counted as overhead; "
        "zeotemp keeps the root's first revision as history.")
    for note in notes:
        report.para(note)
    return failed


def run_real_client(args, workdir, alive, report):
    results = {}
    total = len(args.clients) * len(SERVERS)
    i = 0
    for n in args.clients:
        for kind in SERVERS:
            i += 1
            print(f"[{i}/{total}] {kind:7} {n:3} client processes, "
                  f"{args.duration:g} s ...", end=" ", flush=True)
            try:
                r = with_server(args, kind, workdir, lambda s: real_client_run(
                    args, s, n, workdir, alive), alive)
                print(f"{r['requests_per_s']:,.0f} req/s, "
                      f"{r['commits_per_s']:,.0f} commits/s, server CPU "
                      f"{r['server_cpu_s']:.2f} s, conflicts {r['conflicts']}, "
                      f"errors {r['errors']}", flush=True)
                if r["late_s"] > 0.5:
                    print(f"    note: a client started {r['late_s']:.1f} s late",
                          flush=True)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError,
                    OSError) as e:
                r = {"error": str(e)}
                print(f"FAILED: {e}", flush=True)
            results[(kind, n)] = r
    (th, tr), (ch, cr) = real_client_rows(args.clients, results)
    report.section("real client: throughput", text=text_table(th, tr),
                   md=md_table(th, tr))
    report.section("real client: server CPU", text=text_table(ch, cr),
                   md=md_table(ch, cr))
    report.para(
        "req/s = requests (transactions, read-only ones included) completed "
        "per second over all client processes; commits/s = those that wrote. "
        "Server CPU = user + system seconds of the server process from the "
        "common start until every client reported (/proc/PID/stat). "
        "Conflicts = ConflictErrors retried by the clients (write conflicts "
        "on the shared Length counter are resolved on the client and not "
        "counted). Client CPU = the client processes' own CPU seconds "
        "(they share the machine with the server).")
    errs = [f"{k} {n} clients: {s}" for (k, n), r in results.items()
            if "error" not in r for s in r["error_samples"]]
    if errs:
        report.para("Client errors (first few per client, alike ones "
                    "merged):\n"
                    + "\n".join(f"* {e}" for e in errs))
    fails = [f"{k} {n} clients: {r['error']}" for (k, n), r in results.items()
             if "error" in r]
    if fails:
        report.para("Failed runs:\n" + "\n".join(f"* {f}" for f in fails))
    failed = bool(fails) or any(r.get("errors") for r in results.values())
    return results, failed


# ----------------------------------------------------------------- report

class Report:
    def __init__(self):
        self.text, self.md = [], []

    def section(self, title, text, md):
        print(f"\n== {title}\n{text}", flush=True)
        self.text.append((title, text))
        self.md.append(f"\n### {title}\n\n{md}\n")

    def pre(self, s):
        print(f"\n{s}", flush=True)
        self.md.append(f"\n```\n{s}\n```\n")

    def para(self, s):
        print(f"\n{s}", flush=True)
        self.md.append(f"\n{s}\n")


def parse_list(conv):
    def f(s):
        try:
            return [conv(x) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    return f


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=parse_list(int), default=[1, 4, 16, 64])
    p.add_argument("--workloads", type=parse_list(str),
                   default=list(ALL_WORKLOADS))
    p.add_argument("--duration", type=float, default=None,
                   help="seconds measured per run (default 5; "
                        "--real-client: 20)")
    p.add_argument("--repeat", type=int, default=1,
                   help="throughput mode: runs per case; each case reports "
                        "its median run by ops/s")
    p.add_argument("--in-flight", type=int, default=8,
                   help="requests outstanding per connection (default 8)")
    p.add_argument("--out", help="also write the report as Markdown")
    p.add_argument("--svg", help="write an SVG line chart of ops/s")
    p.add_argument("--memory", action="store_true",
                   help="memory mode: RSS after storing N objects of S bytes")
    p.add_argument("--memory-objects", type=parse_list(int),
                   default=[100_000, 1_000_000])
    p.add_argument("--memory-sizes", type=parse_list(int), default=[200, 2048])
    p.add_argument("--max-setup-seconds", type=int, default=PY_SKIP_SECONDS,
                   help="memory mode: time the stock server gets to store the "
                        "objects (cases estimated to take longer are skipped)")
    p.add_argument("--real-client", action="store_true",
                   help="real-client mode: N processes of ZODB + ClientStorage "
                        "running a session mix (bench/session_client.py)")
    p.add_argument("--clients", type=parse_list(int), default=[4],
                   help="client process counts (real-client mode; default 4)")
    p.add_argument("--client-arg", action="append", default=[],
                   metavar="ARG", help="more session_client.py arguments in "
                   "the --opt=VALUE form, e.g. --client-arg=--write-fraction=0.2 "
                   "(repeatable)")
    p.add_argument("--zeotemp-bin", default=str(REPO / "target/release/zeotemp"))
    p.add_argument("--bench-bin",
                   default=str(REPO / "target/release/zeotemp-bench"))
    p.add_argument("--python", default=str(REPO / "target/pyvenv/bin/python"),
                   help="interpreter with ZEO, runs ZEO.runzeo")
    a = p.parse_args(argv)
    bad = [w for w in a.workloads if w not in ALL_WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {ALL_WORKLOADS}")
    if not a.connections or min(a.connections) < 1:
        p.error("--connections: positive integers")
    if not a.clients or min(a.clients) < 1:
        p.error("--clients: positive integers")
    if a.memory and a.real_client:
        p.error("--memory and --real-client exclude each other")
    if a.duration is None:
        a.duration = 20.0 if a.real_client else 5.0
    require_files(p, (a.zeotemp_bin, a.python)
                  + (() if a.real_client else (a.bench_bin,)))
    return a


def main(argv=None):
    args = parse_args(argv)
    cmdline = shlex.join([sys.executable, *sys.argv]) if argv is None else \
        shlex.join(["bench/compare.py", *argv])

    raise_on_sigterm()

    info = machine_info(args)
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}")
    print(f"servers: {info['zeotemp']}; {info['ZEO']}")
    workdir = tempfile.mkdtemp(prefix="zeotemp-compare-")
    print(f"server logs in {workdir}")
    alive = []
    report = Report()
    status = 0
    t0 = time.monotonic()
    try:
        if args.memory:
            failed = run_memory(args, workdir, alive, report)
        elif args.real_client:
            _, failed = run_real_client(args, workdir, alive, report)
        else:
            _, failed = run_throughput(args, workdir, alive, report)
        status = 1 if failed else 0
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}); stopping servers", file=sys.stderr)
        status = 130
    finally:
        for s in list(reversed(alive)):   # clients before their server
            s.stop()
    elapsed = time.monotonic() - t0
    if args.out and status != 130:
        mode = ("memory" if args.memory else
                "real client" if args.real_client else "throughput")
        head = [f"## zeotemp vs stock ZEO: {mode}", "",
                "```sh", cmdline, "```", "",
                f"* machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, "
                f"Linux {info['kernel']}",
                f"* {info['zeotemp']}; {info['ZEO']} (runzeo, MappingStorage, "
                "client-conflict-resolution)",
                f"* run took {elapsed:.0f} s; every run on a fresh server"]
        if args.real_client:
            head.append(f"* {', '.join(map(str, args.clients))} client "
                        f"processes (stock ZODB + ClientStorage, "
                        f"bench/session_client.py"
                        + (f" {shlex.join(args.client_arg)}"
                           if args.client_arg else "")
                        + f"), {args.duration:g} s per run; the clients "
                        "share the machine's CPUs with the server")
        elif not args.memory:
            head.append(f"* zeotemp-bench: {args.in_flight} requests in flight "
                        f"per connection (commit: one transaction at a time), "
                        f"{args.duration:g} s per run"
                        + (f", each case the median of {args.repeat} runs "
                           "(by ops/s)" if args.repeat > 1 else "")
                        + "; CPU = server CPU seconds "
                        "in the measured window per 1000 ops (load, echo) or "
                        "per 1000 transactions (commit, session)")
        Path(args.out).write_text("\n".join(head) + "\n" + "".join(report.md))
        print(f"\nMarkdown report written to {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
