#!/usr/bin/env python3
"""Soak test: a bounded run of real ZEO clients (Transience-like session
churn, each keeping a ledger of what it committed) and the Rust load
generator against one zeotemp, with clients SIGKILLed and restarted; at
the end every ledger is verified against the database.

    python bench/soak.py [--duration 1800] [--clients 4]
                         [--kill-interval 20:60] [--vote-kills 0.3]
                         [--bench-workloads commit,session] [--out FILE]

Starts the server (zeotemp's release binary by default), creates the
session container and one tree per client slot, then for ``--duration``
seconds:

* ``--clients`` worker processes (stock ZEO ``ClientStorage`` + ZODB ``DB``,
  code in ``tests/python/zeotemp_soak.py``) run the churn of
  ``tests/python/zeotemp_churn.py`` plus writes to keys only they write,
  and append what they commit to a per-slot ledger file;
* every ``--kill-interval`` seconds (random in MIN:MAX) one random worker is
  SIGKILLed -- a share ``--vote-kills`` of the kills right between its
  storage's vote and ``tpc_finish`` (the worker kills itself there), the
  others at whatever moment -- and a new process takes its slot, resuming
  from its ledger;
* ``zeotemp-bench`` runs in bursts (``--bench-burst`` seconds every
  ``--bench-burst + --bench-pause``), alternating ``--bench-workloads``:
  ``commit`` on the workers' storage ``1`` (new objects only, garbage to
  collect, commit-lock contention) and ``session`` on storage ``2`` (its
  setup rewrites the root, so it gets its own storage);
* the server's RSS is sampled every second, ``server_status()`` every
  ``--status-interval`` seconds; with ``--memory-limit`` the report judges
  the peak RSS against the limit (a commit refused at the limit is
  counted, not an error).  The server is never restarted: its death
  fails the run.

Then a fresh ``ClientStorage`` checks every ledger entry (value present and
equal to the last committed one; deleted keys absent; sessions whose
timeslice bucket was legitimately expired are counted, not checked) and
loads every object reachable from the root.  See bench/README.md.

Exit status: 0 = PASS (ledgers verified, no lost or wrong entry, no error
other than retried conflicts, server up throughout, and RSS plateaued when
the run is long enough to tell); 1 = FAIL; 2 = only the RSS is still growing;
130 = interrupted.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "python"))

import zeotemp_churn  # noqa: E402
import zeotemp_soak  # noqa: E402
from compare import Interrupted, cpu_model, raise_on_sigterm  # noqa: E402

STATUS_KEYS = ("objects", "revisions", "retained-bytes", "accounted-bytes", "collections",
               "freed-objects", "longest-pause-ms", "commits", "conflicts")
MIB = 1024 * 1024
PLATEAU_MAX = 1.10        # default --plateau-threshold
# zeotemp's own defaults (src/storage/mod.rs DEFAULT_RETENTION_SECS,
# src/config.rs DEFAULT_GC_INTERVAL_SECS): the soak runs the server with
# them unless --history-retention / --gc-interval are given.
SERVER_RETENTION = 60.0
SERVER_GC_INTERVAL = 10.0


# -- sampling --------------------------------------------------------------------

class StatusSampler(threading.Thread):
    """server_status() every ``interval`` s through its own ClientStorage.
    A daemon thread: a call blocked on a hung server does not block exit."""

    def __init__(self, address, storage, interval, t0):
        super().__init__(daemon=True, name="status-sampler")
        self.address, self.storage = address, storage
        self.interval, self.t0 = interval, t0
        self.samples = []          # (t, dict)
        self.errors = []
        self.stopping = threading.Event()
        self.cs = None

    def sample(self):
        st = dict(self.cs.server_status())
        self.samples.append((time.monotonic() - self.t0, st))
        return st

    def run(self):
        import ZEO.ClientStorage
        try:
            self.cs = ZEO.ClientStorage.ClientStorage(
                self.address, storage=self.storage, wait_timeout=30)
        except Exception as e:
            self.errors.append(f"status client: {e!r}")
            return
        while not self.stopping.is_set():
            try:
                self.sample()
            except Exception as e:
                self.errors.append(repr(e))
            self.stopping.wait(self.interval)

    def close(self):
        self.stopping.set()
        if self.cs is not None:
            try:
                self.cs.close()
            except Exception:
                pass


# -- report ----------------------------------------------------------------------

def memory_figures(limit, rss_kib, statuses, refusals):
    """Peak RSS against ``--memory-limit`` (None without one): the ratio,
    the peak accounted bytes of storage 1 (the workers' storage; with
    --no-bench storage 2 holds only its root) and RSS per accounted byte
    at their peaks (the allocator's overhead the server's budget allows
    for), and the commits refused at the limit."""
    if limit is None:
        return None
    peak_rss = max(rss_kib) * 1024 if rss_kib else None
    accounted = [st.get("accounted-bytes") for _, st in statuses
                 if st.get("accounted-bytes") is not None]
    peak_acc = max(accounted) if accounted else None
    acc_limit = next((st.get("accounted-limit") for _, st in reversed(statuses)
                      if st.get("accounted-limit") is not None), None)
    return dict(
        limit_bytes=limit,
        peak_rss_bytes=peak_rss,
        peak_rss_over_limit=None if peak_rss is None else round(peak_rss / limit, 3),
        rss_below_limit=peak_rss is not None and peak_rss < limit,
        accounted_limit_bytes=acc_limit,
        peak_accounted_bytes=peak_acc,
        peak_rss_over_peak_accounted=(round(peak_rss / peak_acc, 2)
                                      if peak_rss and peak_acc else None),
        commits_refused_at_limit=refusals)


def memory_line(m):
    mib = lambda b: "n/a" if b is None else f"{b / 1048576:.1f}"
    return (f"limit {mib(m['limit_bytes'])} MiB; peak RSS "
            f"{mib(m['peak_rss_bytes'])} MiB = {m['peak_rss_over_limit']} of "
            f"the limit ({'below' if m['rss_below_limit'] else 'NOT below'}); "
            f"peak accounted (storage 1) {mib(m['peak_accounted_bytes'])} MiB of "
            f"{mib(m['accounted_limit_bytes'])} MiB allowed; peak RSS / peak "
            f"accounted = {m['peak_rss_over_peak_accounted']}; "
            f"{m['commits_refused_at_limit']} commits refused at the limit")


def at_or_before(samples, t):
    """The last (t, value) sample at or before ``t`` (else the first)."""
    best = None
    for s in samples:
        if s[0] <= t + 1e-9:
            best = s
        else:
            break
    return best if best is not None else (samples[0] if samples else None)


def fmt_int(v):
    return "-" if v is None else f"{v:,}".replace(",", " ")


def fmt_mib(v):
    return "-" if v is None else f"{v / MIB:.1f}"


def table_rows(rss, statuses, end, step=30):
    marks = list(range(0, int(end) + 1, step))
    if not marks or marks[-1] < end - 1:
        marks.append(end)
    rows = []
    for t in marks:
        r = at_or_before(rss, t)
        s = at_or_before(statuses, t)
        st = s[1] if s else {}
        rows.append([
            f"{t:.0f}",
            "-" if r is None or r[1] is None else f"{r[1] / 1024:.1f}",
            fmt_int(st.get("objects")),
            fmt_int(st.get("revisions")),
            fmt_mib(st.get("retained-bytes")),
            fmt_int(st.get("collections")),
            fmt_int(st.get("freed-objects")),
            fmt_int(st.get("commits")),
        ])
    return rows


TABLE_HEAD = ["t (s)", "RSS MiB", "objects", "revisions", "retained MiB",
              "GC cycles", "freed", "commits"]


def text_table(rows):
    widths = [max(len(h), *(len(r[i]) for r in rows))
              for i, h in enumerate(TABLE_HEAD)]
    line = "  ".join(h.rjust(w) for h, w in zip(TABLE_HEAD, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def md_table(rows):
    out = ["| " + " | ".join(TABLE_HEAD) + " |",
           "|" + "|".join("---:" for _ in TABLE_HEAD) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def ascii_plot(rss, end, width=60, height=15):
    """RSS (MiB) over time: ``width`` time columns (max RSS in each),
    ``height`` rows from 0 to the maximum."""
    pts = [(t, kib / 1024) for t, kib in rss if kib is not None]
    if not pts or end <= 0:
        return "(no RSS samples)"
    cols = [None] * width
    for t, mib in pts:
        c = min(width - 1, int(t / end * width))
        cols[c] = mib if cols[c] is None else max(cols[c], mib)
    for c in range(width):          # fill gaps with the previous column
        if cols[c] is None and c > 0:
            cols[c] = cols[c - 1]
    top = max(m for m in cols if m is not None)
    top = top if top > 0 else 1.0
    grid = [[" "] * width for _ in range(height)]
    for c, mib in enumerate(cols):
        if mib is None:
            continue
        level = min(height - 1, int(round(mib / top * (height - 1))))
        for row in range(level):
            grid[height - 1 - row][c] = ":"
        grid[height - 1 - level][c] = "*"
    lines = []
    for i, row in enumerate(grid):
        value = top * (height - 1 - i) / (height - 1)
        label = f"{value:7.1f} |" if i % 2 == 0 else "        |"
        lines.append(label + "".join(row))
    lines.append("        +" + "-" * width)
    axis = [" "] * (width + 1)
    ticks = 6
    for k in range(ticks + 1):
        c = round(k * width / ticks)
        text = f"{end * k / ticks:.0f}"
        start = min(max(0, c - len(text) // 2), width + 1 - len(text))
        for j, ch in enumerate(text):
            axis[start + j] = ch
    lines.append("         " + "".join(axis) + "  (s)")
    lines.insert(0, "RSS MiB")
    return "\n".join(lines)


def plateau(rss, end):
    """max RSS over the last third / max RSS over the middle third."""
    mid = [k for t, k in rss if k is not None and end / 3 <= t < 2 * end / 3]
    last = [k for t, k in rss if k is not None and t >= 2 * end / 3]
    if not mid or not last:
        return None
    return max(last) / max(mid)


# -- the Rust load generator --------------------------------------------------------

class BenchRunner(threading.Thread):
    """Runs ``zeotemp-bench`` in bursts until ``end_at`` (epoch seconds),
    cycling through ``workloads`` (``commit`` on storage 1, ``session`` on
    storage 2).  Totals: bursts, txns, ops, conflicts retried/resolved,
    errors (the bench's own error count, plus a burst that failed)."""

    STORAGE = {"commit": "1", "session": "2", "load": "2", "echo": "1"}

    def __init__(self, args, address, end_at):
        super().__init__(daemon=True, name="bench")
        self.args, self.address, self.end_at = args, address, end_at
        self.workloads = [w for w in args.bench_workloads.split(",") if w]
        self.stopping = threading.Event()
        self.proc = None
        self.t = dict(bursts=0, txns=0, ops=0, conflicts_retried=0,
                      conflicts_resolved=0, errors=0, failed_bursts=0)
        self.by_workload = {}
        self.error_samples = []

    def run(self):
        i = 0
        while not self.stopping.is_set():
            left = self.end_at - time.time()
            if left < 2:
                break
            w = self.workloads[i % len(self.workloads)]
            i += 1
            self.burst(w, min(self.args.bench_burst, left - 1))
            self.stopping.wait(self.args.bench_pause)

    def burst(self, workload, duration):
        a = self.args
        cmd = [a.bench_bin, "--address", f"{self.address[0]}:{self.address[1]}",
               "--storage", self.STORAGE[workload], "--workload", workload,
               "--connections", str(a.bench_connections),
               "--in-flight", str(a.bench_in_flight),
               "--duration", f"{duration:.1f}",
               "--objects", str(a.bench_objects), "--json"]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
            out, err = self.proc.communicate(timeout=duration + 120)
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            rc = "timeout"
        except OSError as e:
            out, err, rc = "", repr(e), "could not start"
        self.proc = None
        self.t["bursts"] += 1
        bw = self.by_workload.setdefault(workload, dict(bursts=0, txns=0,
                                                        ops=0, errors=0))
        bw["bursts"] += 1
        if rc != 0:
            if self.stopping.is_set() and rc == -signal.SIGTERM:
                return                     # stopped by us (interrupted)
            self.t["failed_bursts"] += 1
            self.t["errors"] += 1
            bw["errors"] += 1
            tail = " | ".join(err.strip().splitlines()[-3:])
            self.sample(f"zeotemp-bench {workload} exited {rc}: {tail}")
            return
        try:
            rep = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.t["errors"] += 1
            bw["errors"] += 1
            self.sample(f"zeotemp-bench {workload}: unreadable output {out[:200]!r}")
            return
        for k in ("txns", "ops", "conflicts_retried", "conflicts_resolved",
                  "errors"):
            self.t[k] += int(rep.get(k, 0))
        for k in ("txns", "ops", "errors"):
            bw[k] += int(rep.get(k, 0))
        if rep.get("errors"):
            self.sample(f"zeotemp-bench {workload}: {rep['errors']} errors in "
                        "a burst")

    def sample(self, text):
        if len(self.error_samples) < 5:
            self.error_samples.append(text)

    def stop(self):
        self.stopping.set()
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()


# -- workers and faults -------------------------------------------------------------

class Slots:
    """The worker processes, one per slot, restarted after each kill."""

    def __init__(self, args, ctx, address, ledger_dir, end_at):
        self.args, self.ctx, self.address = args, ctx, address
        self.ledger_dir, self.end_at = Path(ledger_dir), end_at
        self.procs = {}            # slot -> Process
        self.events = {}           # slot -> Event (kill yourself at vote)
        self.expected_death = {}   # slot -> "kill" | "vote"
        self.vote_deadline = {}    # slot -> monotonic time to give up waiting
        self.started = 0
        self.kills = dict(total=0, vote=0, plain=0, vote_fallback=0)
        self.unexpected = []       # text of workers that died on their own
        self.finished = set()

    def cfg(self, slot):
        a = self.args
        return dict(addr=self.address, slot=slot, end_at=self.end_at,
                    ledger=str(zeotemp_soak.ledger_path(self.ledger_dir, slot)),
                    slice_seconds=a.slice_seconds, keep=a.keep,
                    known=max(1, a.sessions // max(1, a.clients)),
                    new_fraction=a.new_fraction, pause=a.pause,
                    owned_keys=a.owned_keys, owned_fraction=a.owned_fraction)

    def start(self, slot):
        ev = self.ctx.Event()
        p = self.ctx.Process(target=zeotemp_soak.worker_main,
                             args=(self.cfg(slot), ev),
                             name=f"soak-worker-{slot}", daemon=True)
        p.start()
        self.procs[slot], self.events[slot] = p, ev
        self.expected_death.pop(slot, None)
        self.vote_deadline.pop(slot, None)
        self.started += 1

    def kill(self, rnd, vote):
        alive = [s for s, p in self.procs.items()
                 if p.is_alive() and s not in self.expected_death]
        if not alive:
            return None
        slot = rnd.choice(alive)
        if vote:
            self.expected_death[slot] = "vote"
            self.vote_deadline[slot] = time.monotonic() + 30
            self.events[slot].set()
        else:
            self.expected_death[slot] = "kill"
            self.procs[slot].kill()
        return slot

    def poll(self, now_epoch):
        """Reaps dead workers and restarts them (until the end)."""
        for slot, p in list(self.procs.items()):
            why = self.expected_death.get(slot)
            if p.is_alive():
                if why == "vote" and time.monotonic() > self.vote_deadline[slot]:
                    # No ledgered commit within 30 s: kill it plainly.
                    self.kills["vote_fallback"] += 1
                    self.expected_death[slot] = "kill"
                    p.kill()
                continue
            p.join(1)
            code = p.exitcode
            if why is not None:
                self.kills["total"] += 1
                self.kills["vote" if why == "vote" else "plain"] += 1
                if code != -signal.SIGKILL:
                    self.unexpected.append(
                        f"slot {slot}: expected a SIGKILL death, exit status {code}")
            elif code == 0 and now_epoch >= self.end_at - 1:
                self.finished.add(slot)
                del self.procs[slot]
                continue
            else:
                self.unexpected.append(f"slot {slot}: worker exited with "
                                       f"status {code} before the end")
            if now_epoch < self.end_at - 2:
                self.start(slot)
            else:
                del self.procs[slot]

    def all_done(self):
        return not self.procs

    def stop_all(self):
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(5)


def parse_interval(text):
    lo, _, hi = text.partition(":")
    lo = float(lo)
    hi = float(hi) if hi else lo
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"bad interval {text!r} (MIN:MAX)")
    return lo, hi


def is_vote_kill(i, fraction):
    """Kill number ``i`` (0-based) is a vote kill when the running count of
    vote kills ceil((i+1) * fraction) grows: with fraction > 0 the first kill
    is one, and they are spread evenly."""
    import math
    return math.ceil((i + 1) * fraction - 1e-9) > math.ceil(i * fraction - 1e-9)


# -- main -----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1800,
                   help="seconds of load (default 1800)")
    p.add_argument("--clients", type=int, default=4,
                   help="worker slots: real client processes running at once "
                        "(default 4)")
    p.add_argument("--server", choices=("zeotemp", "python"), default="zeotemp",
                   help="server under test (python: stock runzeo with "
                        "MappingStorages, for comparison)")
    p.add_argument("--zeotemp-bin", default=str(REPO / "target" / "release" / "zeotemp"),
                   help="zeotemp binary (default target/release/zeotemp)")
    p.add_argument("--bench-bin", default=None,
                   help="zeotemp-bench binary (default: next to --zeotemp-bin)")
    p.add_argument("--gc-interval", type=float, default=None,
                   help="zeotemp --gc-interval (default: not passed, the "
                        f"server's own, {SERVER_GC_INTERVAL:g})")
    p.add_argument("--history-retention", type=float, default=None,
                   help="zeotemp --history-retention (default: not passed, "
                        f"the server's own, {SERVER_RETENTION:g})")
    p.add_argument("--memory-limit", type=int, default=None,
                   help="the server's --memory-limit (bytes); the report then "
                        "judges peak RSS against it (FAIL if it reaches it) "
                        "and counts the commits refused at the limit")
    p.add_argument("--zeotemp-arg", action="append", default=[],
                   help="extra zeotemp argument (repeatable)")
    p.add_argument("--slice-seconds", type=float, default=2,
                   help="timeslice length (default 2)")
    p.add_argument("--keep", type=int, default=10,
                   help="timeslice buckets kept (session lifetime = keep x "
                        "slice; default 10)")
    p.add_argument("--sessions", type=int, default=2000,
                   help="recent visitors' session ids revisited, over all "
                        "clients (default 2000)")
    p.add_argument("--new-fraction", type=float, default=0.3,
                   help="share of touches that are new visitors (default 0.3)")
    p.add_argument("--owned-keys", type=int, default=200,
                   help="keys in each slot's own tree (default 200)")
    p.add_argument("--owned-fraction", type=float, default=0.5,
                   help="share of transactions that also set or delete an "
                        "owned key (default 0.5)")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds each client sleeps between transactions "
                        "(default 0: as fast as it can)")
    p.add_argument("--kill-interval", type=parse_interval, default=(20.0, 60.0),
                   metavar="MIN:MAX",
                   help="seconds between two worker kills, uniformly random "
                        "in MIN:MAX (default 20:60); 0 = no kills")
    p.add_argument("--vote-kills", type=float, default=0.3,
                   help="share of kills made between vote and tpc_finish "
                        "(default 0.3; the first kill is one if > 0)")
    p.add_argument("--no-bench", action="store_true",
                   help="do not run zeotemp-bench")
    p.add_argument("--bench-workloads", default="commit,session",
                   help="zeotemp-bench workloads, cycled burst by burst "
                        "(default commit,session; commit runs on storage 1, "
                        "session on storage 2)")
    p.add_argument("--bench-burst", type=float, default=10,
                   help="seconds per zeotemp-bench burst (default 10)")
    p.add_argument("--bench-pause", type=float, default=10,
                   help="seconds between bursts (default 10)")
    p.add_argument("--bench-connections", type=int, default=2)
    p.add_argument("--bench-in-flight", type=int, default=4)
    p.add_argument("--bench-objects", type=int, default=2000,
                   help="objects of the session workload's setup (default 2000)")
    p.add_argument("--status-interval", type=float, default=5)
    p.add_argument("--plateau-threshold", type=float, default=PLATEAU_MAX,
                   help="max RSS of the last third / of the middle third "
                        "above which RSS is 'growing' (default 1.10)")
    p.add_argument("--no-rss-verdict", action="store_true",
                   help="report the RSS figures but do not judge them (for "
                        "short runs such as the CI smoke test)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the kill schedule (default: random)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for runzeo (--server python)")
    p.add_argument("--workdir", default=None,
                   help="directory for the server log and the ledgers "
                        "(default: a new temporary directory, kept)")
    p.add_argument("--out", help="also write the report as Markdown here "
                        "(e.g. bench/results/soak-DATE.md)")
    p.add_argument("--json", help="also write the summary as JSON here")
    args = p.parse_args(argv)
    args.zeotemp_bin = str(Path(args.zeotemp_bin).absolute())
    if args.bench_bin is None:
        args.bench_bin = str(Path(args.zeotemp_bin).with_name("zeotemp-bench"))
    args.bench_bin = str(Path(args.bench_bin).absolute())
    if args.clients < 1:
        p.error("--clients must be at least 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable)
                          if sys.executable.startswith(os.getcwd()) else
                          sys.executable, sys.argv[0], *argv])
    if args.server == "zeotemp" and not Path(args.zeotemp_bin).exists():
        sys.exit(f"no zeotemp binary at {args.zeotemp_bin} "
                 "(cargo build --release, or --zeotemp-bin PATH)")
    if not args.no_bench and not Path(args.bench_bin).exists():
        sys.exit(f"no zeotemp-bench binary at {args.bench_bin} "
                 "(cargo build --release, --bench-bin PATH or --no-bench)")

    raise_on_sigterm()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="zeotemp-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ledger_dir = workdir / "ledgers"
    ledger_dir.mkdir(exist_ok=True)
    for old in ledger_dir.glob("ledger-*.jsonl"):
        old.unlink()
    # The server runs as a new user starts it: a setting is passed only when
    # asked for.
    zargs = []
    if args.gc_interval is not None:
        zargs += ["--gc-interval", f"{args.gc_interval:g}"]
    if args.history_retention is not None:
        zargs += ["--history-retention", f"{args.history_retention:g}"]
    if args.memory_limit is not None:
        zargs += ["--memory-limit", str(args.memory_limit)]
    zargs += args.zeotemp_arg
    server = zeotemp_churn.ServerProcess(
        args.server, workdir, zeotemp_bin=args.zeotemp_bin,
        zeotemp_args=zargs, python=args.python, extra_storages=["2"])
    ctx = multiprocessing.get_context("spawn")
    rnd = random.Random(args.seed)
    slots = sampler = bench = None
    rss = []
    interrupted = server_died = None
    verification = None
    end = 0.0
    try:
        server.start()
        print(f"server: {' '.join(server.cmd)} (pid {server.pid}, "
              f"{server.address[0]}:{server.address[1]}); workdir {workdir}",
              flush=True)
        setup_db(server.address, args.clients, args.slice_seconds)

        t0 = time.monotonic()
        end_at = time.time() + args.duration
        slots = Slots(args, ctx, server.address, ledger_dir, end_at)
        for w in range(args.clients):
            slots.start(w)
        sampler = StatusSampler(server.address, "1", args.status_interval, t0)
        sampler.start()
        if not args.no_bench:
            bench = BenchRunner(args, server.address, end_at)
            bench.start()

        lo, hi = args.kill_interval
        kill_on = hi > 0
        next_kill = rnd.uniform(lo, hi) if kill_on else None
        kill_no = 0
        hard_end = args.duration + 120
        next_print = 30.0
        while True:
            now = time.monotonic() - t0
            rss.append((now, zeotemp_churn.rss_kib(server.pid)))
            if not server.running():
                server_died = f"server exited with status {server.proc.returncode}"
                break
            slots.poll(time.time())
            if slots.all_done():
                break
            if kill_on and now >= next_kill and now < args.duration - 5:
                vote = is_vote_kill(kill_no, args.vote_kills)
                slot = slots.kill(rnd, vote)
                if slot is not None:
                    kill_no += 1
                    print(f"  t={now:5.0f}s  kill #{kill_no}: slot {slot} "
                          f"({'between vote and finish' if vote else 'SIGKILL'})",
                          flush=True)
                next_kill = now + rnd.uniform(lo, hi)
            if now >= next_print:
                next_print += 30
                last = sampler.samples[-1][1] if sampler.samples else {}
                print(f"  t={now:5.0f}s  RSS {(rss[-1][1] or 0) / 1024:7.1f} MiB"
                      f"  objects {fmt_int(last.get('objects'))}"
                      f"  commits {fmt_int(last.get('commits'))}"
                      f"  kills {slots.kills['total']}", flush=True)
            if now > hard_end:
                break
            time.sleep(max(0.0, 0.5 - (time.monotonic() - t0 - now)))
        end = min(args.duration, time.monotonic() - t0)
        for slot, p in slots.procs.items():
            slots.unexpected.append(f"slot {slot}: worker still running "
                                    f"{hard_end - args.duration:g} s after the end")
        slots.stop_all()
        if bench is not None:
            bench.join(args.bench_burst + 130)
        if sampler.is_alive() and server.running():
            try:                     # a final status, after the load
                sampler.sample()
            except Exception as e:
                sampler.errors.append(repr(e))
        if server.running():
            print("verifying the ledgers ...", flush=True)
            verification = verify_all(server.address, ledger_dir, args.clients)
        if not server.running() and not server_died:
            server_died = f"server exited with status {server.proc.returncode}"
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = str(e) or "Ctrl-C"
        print(f"\ninterrupted ({interrupted}): stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup in peace
        if sampler is not None:
            sampler.close()
        if bench is not None:
            bench.stop()
        if slots is not None:
            slots.stop_all()
        server.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        print(f"workdir (server log, ledgers): {workdir}", file=sys.stderr)
        return 130

    replays = [zeotemp_soak.replay(zeotemp_soak.ledger_path(ledger_dir, w), w)
               for w in range(args.clients)]
    report = build_report(args, command, server, rss, sampler, slots, bench,
                          replays, verification, server_died, end, workdir)
    print(report["text"])
    if args.out:
        Path(args.out).write_text(report["markdown"])
        print(f"(Markdown report written to {args.out})")
    if args.json:
        Path(args.json).write_text(json.dumps(report["summary"], indent=2) + "\n")
    if not report["summary"]["correct"]:
        print(f"server log: {server.log_path}\n{server.log_tail(15)}")
        return 1
    if report["summary"]["rss"]["verdict"] == "growing":
        return 2
    return 0


def setup_db(address, slots, slice_seconds):
    import transaction
    import ZEO.ClientStorage
    import ZODB
    cs = ZEO.ClientStorage.ClientStorage(address, wait_timeout=30)
    db = ZODB.DB(cs)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        zeotemp_soak.setup(conn, tm, slots, slice_seconds)
        conn.close()
    finally:
        db.close()


def verify_all(address, ledger_dir, clients):
    """The ledger check and a walk of everything reachable, through a fresh
    ClientStorage (nothing cached)."""
    import transaction
    import ZEO.ClientStorage
    import ZODB
    t = time.monotonic()
    replays = [zeotemp_soak.replay(zeotemp_soak.ledger_path(ledger_dir, w), w)
               for w in range(clients)]
    out = {}
    cs = ZEO.ClientStorage.ClientStorage(address, wait_timeout=30)
    db = ZODB.DB(cs)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        try:
            out["ledger"] = zeotemp_soak.verify(conn.root(), replays)
        except Exception as e:
            out["ledger"] = None
            out["ledger_error"] = repr(e)
        finally:
            tm.abort()
            conn.close()
        try:
            out["reachable"] = len(zeotemp_churn.reachable_oids(cs))
            out["reachable_error"] = None
        except Exception as e:   # POSKeyError: a live object was freed
            out["reachable"] = None
            out["reachable_error"] = repr(e)
    finally:
        db.close()
    out["seconds"] = round(time.monotonic() - t, 1)
    return out


_LOG_LEVEL = re.compile(r"\b(ERROR|WARN)\b")


def scan_server_log(path):
    """Counts of the server's WARN and ERROR lines (and panics), with the
    first few of each."""
    out = dict(WARN=0, ERROR=0, panics=0, samples=[], aborted_on_disconnect=0)
    try:
        text = zeotemp_churn._ANSI.sub("", Path(path).read_text(errors="replace"))
    except OSError:
        return out
    for line in text.splitlines():
        if "disconnected during a transaction: aborted" in line:
            out["aborted_on_disconnect"] += 1
        if "panic" in line.lower():
            out["panics"] += 1
        m = _LOG_LEVEL.search(line)
        if m:
            out[m.group(1)] += 1
            if len(out["samples"]) < 8:
                out["samples"].append(line.strip()[:300])
    return out


def machine_info(args):
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                               cwd=REPO)
            return (r.stdout.strip() or r.stderr.strip()).splitlines()[0]
        except Exception as e:  # informational only
            return f"? ({e})"
    cpu = cpu_model()
    import importlib.metadata as md
    dirty = out(["git", "status", "--porcelain", "--untracked-files=no"])
    return dict(
        nproc=os.cpu_count(), cpu=cpu, kernel=platform.release(),
        zeotemp=out([args.zeotemp_bin, "--version"]) if args.server == "zeotemp" else "-",
        commit=out(["git", "rev-parse", "--short", "HEAD"])
        + (" (with uncommitted changes)" if dirty and not dirty.startswith("?") else ""),
        stack=f"ZEO {md.version('ZEO')} / ZODB {md.version('ZODB')} / "
              f"Python {platform.python_version()}")


def build_report(args, command, server, rss, sampler, slots, bench, replays,
                 verification, server_died, end, workdir):
    statuses = sampler.samples if sampler else []
    led = {}
    for r in replays:
        for k, v in r.c.items():
            led[k] = led.get(k, 0) + v
    errors = []                                    # (count, text)
    worker_errors = led.get("errors", 0)
    if worker_errors:
        samples = [s for r in replays for s in r.error_samples]
        errors.append((worker_errors, "worker errors, e.g. " + "; ".join(samples[:5])))
    for text in (slots.unexpected if slots else []):
        errors.append((1, text))
    if bench is not None and bench.t["errors"]:
        errors.append((bench.t["errors"], "zeotemp-bench: "
                       + "; ".join(bench.error_samples)))
    if server_died:
        errors.append((1, server_died))
    if sampler and sampler.errors:
        errors.append((len(sampler.errors), "server_status: " + "; ".join(sampler.errors[:3])))
    log = scan_server_log(server.log_path)
    if log["ERROR"] or log["panics"]:
        errors.append((log["ERROR"] + log["panics"], "server log ERROR/panic lines"))
    ver = (verification or {}).get("ledger")
    if verification is None:
        errors.append((1, "ledgers not verified (server not running)"))
    elif ver is None:
        errors.append((1, f"ledger verification failed: {verification.get('ledger_error')}"))
    if verification and verification.get("reachable_error"):
        errors.append((1, "loading the reachable objects: "
                       + verification["reachable_error"]))
    vote_records = led.get("vote_kills", 0)
    if slots and vote_records != slots.kills["vote"]:
        errors.append((1, f"{slots.kills['vote']} vote kills but {vote_records} "
                       "'vk' ledger records"))

    n_errors = sum(n for n, _ in errors)
    lost = (ver["missing"] + ver["wrong"] + ver["unreadable"]) if ver else None
    rss_pts = [(t, k) for t, k in rss if t <= end + 1]
    ratio = plateau(rss_pts, end)
    retention = SERVER_RETENTION if args.history_retention is None else args.history_retention
    gc_interval = SERVER_GC_INTERVAL if args.gc_interval is None else args.gc_interval
    retained_for = retention + args.keep * args.slice_seconds + gc_interval
    long_enough = end >= 3 * retained_for
    if args.no_rss_verdict:
        rss_verdict = "not judged (--no-rss-verdict)"
    elif args.server != "zeotemp":
        rss_verdict = "not judged (stock server: never collects)"
    elif ratio is None:
        rss_verdict = "no data"
    elif not long_enough:
        rss_verdict = "not judged (run too short)"
    else:
        rss_verdict = "plateau" if ratio <= args.plateau_threshold else "growing"
    kib = [k for _, k in rss_pts if k is not None]
    mid = at_or_before(rss_pts, end / 2)
    rss_fig = dict(
        start_mib=round(kib[0] / 1024, 1) if kib else None,
        middle_mib=round(mid[1] / 1024, 1) if mid and mid[1] else None,
        end_mib=round(kib[-1] / 1024, 1) if kib else None,
        peak_mib=round(max(kib) / 1024, 1) if kib else None,
        ratio=None if ratio is None else round(ratio, 3),
        verdict=rss_verdict)
    memory = memory_figures(args.memory_limit, kib, statuses,
                            led.get("memory_refusals", 0))
    if memory and not memory["rss_below_limit"]:
        errors.append((1, f"peak RSS {rss_fig['peak_mib']} MiB reached the "
                          f"memory limit ({args.memory_limit} bytes)"))
        n_errors += 1
    ok = (ver is not None and lost == 0 and ver["checked"] > 0
          and n_errors == 0 and not server_died)
    verdict = "PASS" if ok and rss_verdict != "growing" else "FAIL"
    kills = slots.kills if slots else dict(total=0, vote=0, plain=0, vote_fallback=0)
    bt = bench.t if bench is not None else None
    last_status = statuses[-1][1] if statuses else {}
    info = machine_info(args)

    summary = dict(
        verdict=verdict, correct=ok, command=command, date=datetime.date.today().isoformat(),
        duration_s=args.duration, ran_s=round(end, 1), clients=args.clients,
        worker_processes=slots.started if slots else 0,
        kills=kills, commits=dict(
            workers_ledgered=led.get("commits", 0),
            workers_bucket_expiry=led.get("gc_commits", 0),
            bench_txns=bt["txns"] if bt else 0,
            server=last_status.get("commits")),
        conflicts_retried=dict(workers=led.get("conflicts", 0),
                               bench=bt["conflicts_retried"] if bt else 0,
                               bench_resolved=bt["conflicts_resolved"] if bt else 0),
        in_doubt_transactions=led.get("in_doubt", 0),
        resume_checks=dict(checks=led.get("resume_checks", 0),
                           entries=led.get("resume_checked", 0),
                           problems=led.get("resume_problems", 0),
                           in_doubt_keys_committed=led.get(
                               "resume_in_doubt_committed", 0),
                           in_doubt_keys_not_committed=led.get(
                               "resume_in_doubt_not_committed", 0)),
        ledger=ver, reachable_objects=(verification or {}).get("reachable"),
        verify_seconds=(verification or {}).get("seconds"),
        errors=n_errors, error_list=[t for _, t in errors],
        server_died=server_died, server_log=dict(
            (k, log[k]) for k in ("WARN", "ERROR", "panics", "aborted_on_disconnect")),
        rss=rss_fig, memory=memory, bench=dict(totals=bt, by_workload=bench.by_workload)
        if bench is not None else None,
        final_status={k: last_status[k] for k in STATUS_KEYS if k in last_status},
        machine=info, workdir=str(workdir))

    # -- text
    def row(k, v):
        return f"{k:<22} {v}"
    bench_line = ("not run" if bt is None else
                  f"{bt['bursts']} bursts ({args.bench_workloads}; "
                  f"{args.bench_connections} connections x {args.bench_in_flight} "
                  f"in flight, {args.bench_burst:g} s every "
                  f"{args.bench_burst + args.bench_pause:g} s): {bt['txns']} txns, "
                  f"{bt['ops']} ops, conflicts retried {bt['conflicts_retried']} "
                  f"(resolved {bt['conflicts_resolved']}), errors {bt['errors']}")
    ledger_line = ("not verified" if ver is None else
                   f"{ver['checked']} entries checked: {ver['ok']} equal to the "
                   f"last committed value, {ver['ok_in_doubt']} in-doubt commits "
                   f"found committed, {ver['not_committed_in_doubt']} in-doubt "
                   f"not committed; missing {ver['missing']}, wrong "
                   f"{ver['wrong']}, unreadable {ver['unreadable']}; "
                   f"{ver['expired']} sessions expired (not checked)")
    rss_line = (f"start {rss_fig['start_mib']}, middle {rss_fig['middle_mib']}, "
                f"end {rss_fig['end_mib']}, peak {rss_fig['peak_mib']} MiB; "
                "max last third / max middle third = "
                f"{'n/a' if ratio is None else f'{ratio:.3f}'} "
                f"(<= {args.plateau_threshold:g}: plateau) -> {rss_verdict}")
    rows = [
        ("verdict", verdict),
        ("duration", f"{args.duration:g} s (load ran {end:.0f} s)"),
        ("clients", f"{args.clients} slots, {summary['worker_processes']} "
                    "worker processes started"),
        ("kills", f"{kills['total']} ({kills['vote']} between vote and "
                  f"tpc_finish, {kills['plain']} SIGKILL at a random moment"
                  + (f", {kills['vote_fallback']} vote kills fell back to a plain kill"
                     if kills['vote_fallback'] else "") + ")"),
        ("commits", f"workers {led.get('commits', 0)} ledgered + "
                    f"{led.get('gc_commits', 0)} bucket expiries; bench "
                    f"{bt['txns'] if bt else 0}; server status (storage 1) "
                    f"{fmt_int(last_status.get('commits'))}"),
        ("conflicts retried", f"workers {led.get('conflicts', 0)}, bench "
                              f"{bt['conflicts_retried'] if bt else 0}"),
        ("resume checks", f"{led.get('resume_checks', 0)} replacement workers "
                          f"checked {led.get('resume_checked', 0)} ledger entries "
                          f"before resuming: {led.get('resume_problems', 0)} "
                          "missing/wrong; keys of in-doubt transactions: "
                          f"{led.get('resume_in_doubt_committed', 0)} found "
                          "committed, "
                          f"{led.get('resume_in_doubt_not_committed', 0)} not"),
        ("in-doubt transactions", f"{led.get('in_doubt', 0)} (worker killed "
                                  "after its intent record, before its commit record)"),
        ("ledger", ledger_line),
        ("reachable objects", f"{(verification or {}).get('reachable')} loaded"
                              + (f" -- {verification['reachable_error']}"
                                 if verification and verification.get('reachable_error')
                                 else "")),
        ("errors", f"{n_errors}"),
        ("server", ("DIED: " + server_died) if server_died else
                   f"up the whole run; log: {log['WARN']} WARN, {log['ERROR']} "
                   f"ERROR, {log['aborted_on_disconnect']} transactions aborted "
                   "on disconnect"),
        ("zeotemp-bench", bench_line),
        ("RSS", rss_line),
    ]
    if memory:
        rows.append(("memory limit", memory_line(memory)))
    params = (f"server {args.server} ({' '.join(server.cmd or [])}); "
              f"{args.clients} client slots, kill every "
              f"{args.kill_interval[0]:g}-{args.kill_interval[1]:g} s "
              f"(vote-kill share {args.vote_kills:g}); slice "
              f"{args.slice_seconds:g} s, keep {args.keep} buckets, "
              f"{args.sessions} recent sessions, new-visitor share "
              f"{args.new_fraction:g}, {args.owned_keys} owned keys per slot "
              f"(written by {args.owned_fraction:g} of transactions), pause "
              f"{args.pause:g} s")
    machine = (f"{info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; "
               f"{info['zeotemp']}, commit {info['commit']}; {info['stack']}")
    table = table_rows(rss, statuses, end,
                       step=10 if end <= 180 else 30 if end <= 900 else 60)
    plot = ascii_plot(rss_pts, end)
    err_lines = [f"error: {t}" for _, t in errors][:12]
    log_lines = [f"server log: {s}" for s in log["samples"]]
    problems = [f"ledger {p}" for p in (ver or {}).get("problems", [])]
    text = "\n".join([
        "", "== zeotemp soak ==", params, f"machine: {machine}",
        f"command: {command}", "",
        text_table(table), "", plot, "",
        *(row(k, v) for k, v in rows),
        *problems, *err_lines, *log_lines,
        f"workdir (server log, ledgers): {workdir}", ""])
    md = "\n".join([
        f"# Soak: {args.server}, {args.clients} clients, {args.duration:g} s, "
        f"{summary['date']}", "",
        f"**Verdict: {verdict}**", "",
        "```", command, "```", "",
        params + ".", "",
        f"Machine: {machine}.", "",
        "| | |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows), "",
        *(f"* {p}" for p in problems),
        *(f"* {e}" for e in err_lines),
        *(f"* `{s}`" for s in log_lines), *([""] if problems or err_lines
                                             or log_lines else []),
        "Server memory and status over time:", "",
        md_table(table), "",
        "```", plot, "```", ""])
    return dict(text=text, markdown=md, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
