#!/usr/bin/env python3
"""Soak test: Transience-like session churn from several real ZEO client
processes against one server, sampling the server's memory.

    python bench/soak.py [--duration 600] [--clients 4] [--server zeotemp|python]
                         [--zeotemp-bin PATH] [--slice-seconds 2] [--sessions N]
                         [--out FILE]

Starts the server (zeotemp's release binary by default, or the stock
``ZEO.runzeo`` with a MappingStorage and client-conflict-resolution, never
packed, for comparison), runs the churn of ``tests/python/zeotemp_churn.py``
from ``--clients`` processes for ``--duration`` seconds, samples the server's
RSS (VmRSS from /proc/PID/status) every second and ``server_status()`` every
~5 s, stops everything it started, and prints a table, an ASCII plot of RSS
over time and a verdict line.  See bench/README.md.

Exit status: 0 = ran, no errors (and, for zeotemp, RSS plateaued); 1 = errors
(a transaction failing after its retries, any other client exception, a
worker that did not finish, the server dying); 2 = zeotemp's RSS still
growing; 130 = interrupted.
"""

import argparse
import multiprocessing
import queue
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "python"))

import zeotemp_churn  # noqa: E402

STATUS_KEYS = ("objects", "revisions", "retained-bytes", "collections",
               "freed-objects", "longest-pause-ms", "commits", "conflicts")
MIB = 1024 * 1024


# -- child process ---------------------------------------------------------------

def worker_main(cfg, results):
    """Run in a spawned child: the churn, result put on ``results``.
    SIGINT is ignored (the parent stops the children on Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Failed transactions are counted and reported; keep the transaction
    # package's CRITICAL log lines ("A storage error occurred during the
    # second phase ...") off the terminal.
    import logging
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        result = zeotemp_churn.churn_worker(cfg)
    except BaseException as e:  # report, never hang the parent
        result = dict(worker=cfg["worker"], commits=0, conflicts=0, errors=1,
                      error_samples=[f"worker crashed: {e!r}"])
    results.put(result)


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


# -- main ------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600,
                   help="seconds of churn (default 600)")
    p.add_argument("--clients", type=int, default=4,
                   help="client processes (default 4)")
    p.add_argument("--server", choices=("zeotemp", "python"), default="zeotemp")
    p.add_argument("--zeotemp-bin", default=str(REPO / "target" / "release" / "zeotemp"),
                   help="zeotemp binary (default target/release/zeotemp)")
    p.add_argument("--gc-interval", type=float, default=10,
                   help="zeotemp --gc-interval (default 10)")
    p.add_argument("--history-retention", type=float, default=60,
                   help="zeotemp --history-retention (default 60 here; the "
                        "server's own default is 600, which needs a soak of "
                        "well over 30 minutes to reach its plateau)")
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
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds each client sleeps between transactions "
                        "(default 0: as fast as it can)")
    p.add_argument("--status-interval", type=float, default=5)
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for runzeo (--server python)")
    p.add_argument("--out", help="also write the report as Markdown here")
    return p.parse_args(argv)


class Interrupted(Exception):
    pass


def main(argv=None):
    args = parse_args(argv)
    if args.server == "zeotemp" and not Path(args.zeotemp_bin).exists():
        sys.exit(f"no zeotemp binary at {args.zeotemp_bin} "
                 "(cargo build --release, or --zeotemp-bin PATH)")

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C even when started from a shell that ignores SIGINT for
    # background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    workdir = Path(tempfile.mkdtemp(prefix="zeotemp-soak-"))
    zargs = ["--gc-interval", f"{args.gc_interval:g}",
             "--history-retention", f"{args.history_retention:g}"] + args.zeotemp_arg
    server = zeotemp_churn.ServerProcess(
        args.server, workdir, zeotemp_bin=args.zeotemp_bin,
        zeotemp_args=zargs, python=args.python)
    ctx = multiprocessing.get_context("spawn")
    procs = []
    sampler = None
    results = {}
    rss = []
    interrupted = None
    server_died = None
    try:
        server.start()
        print(f"server: {' '.join(server.cmd)} (pid {server.pid}, "
              f"{server.address[0]}:{server.address[1]}); log {server.log_path}",
              flush=True)
        setup_container(server.address, args.slice_seconds)

        result_q = ctx.Queue()
        per_client = max(1, args.sessions // max(1, args.clients))
        t0 = time.monotonic()
        for w in range(args.clients):
            cfg = dict(addr=server.address, worker=w, duration=args.duration,
                       slice_seconds=args.slice_seconds, keep=args.keep,
                       known=per_client, new_fraction=args.new_fraction,
                       pause=args.pause, max_errors=1000)
            p = ctx.Process(target=worker_main, args=(cfg, result_q),
                            name=f"churn-{w}", daemon=True)
            p.start()
            procs.append(p)
        sampler = StatusSampler(server.address, "1", args.status_interval, t0)
        sampler.start()

        hard_end = args.duration + 120     # worker start-up + last commits
        next_print = 30.0
        while len(results) < args.clients:
            now = time.monotonic() - t0
            rss.append((now, zeotemp_churn.rss_kib(server.pid)))
            while True:
                try:
                    r = result_q.get_nowait()
                except queue.Empty:
                    break
                results[r["worker"]] = r
            if not server.running():
                server_died = f"server exited with status {server.proc.returncode}"
                break
            if now >= next_print:
                next_print += 30
                last = sampler.samples[-1][1] if sampler.samples else {}
                print(f"  t={now:5.0f}s  RSS {rss[-1][1] / 1024 if rss[-1][1] else 0:7.1f} MiB"
                      f"  objects {fmt_int(last.get('objects'))}"
                      f"  commits {fmt_int(last.get('commits'))}", flush=True)
            if now > hard_end:
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - now)))
        end = min(args.duration, time.monotonic() - t0)
        if sampler.is_alive() and server.running():
            try:                     # a final status, after the churn
                sampler.sample()
            except Exception as e:
                sampler.errors.append(repr(e))
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = str(e) or "Ctrl-C"
        print(f"\ninterrupted ({interrupted}): stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup in peace
        if sampler is not None:
            sampler.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        server.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        print(f"server log: {server.log_path}", file=sys.stderr)
        return 130

    missing = [w for w in range(args.clients) if w not in results]
    report = build_report(args, server, rss, sampler, results, missing,
                          server_died, end)
    print(report["text"])
    if args.out:
        Path(args.out).write_text(report["markdown"])
        print(f"(Markdown report written to {args.out})")
    if report["errors"] or server_died or missing:
        print(f"server log: {server.log_path}\n{server.log_tail(15)}")
        return 1
    if args.server == "zeotemp" and report["verdict"] != "plateau":
        return 2
    return 0


def setup_container(address, slice_seconds):
    import transaction
    import ZEO.ClientStorage
    import ZODB
    cs = ZEO.ClientStorage.ClientStorage(address, wait_timeout=30)
    db = ZODB.DB(cs)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        zeotemp_churn.setup_container(conn, tm, slice_seconds)
        conn.close()
    finally:
        db.close()


def build_report(args, server, rss, sampler, results, missing, server_died, end):
    statuses = sampler.samples if sampler else []
    totals = zeotemp_churn.sum_counts(results.values())
    errors = totals.get("errors", 0) + len(missing) + (1 if server_died else 0)
    distinct = {}
    for r in results.values():
        for e in r.get("error_samples", []):
            distinct[e] = distinct.get(e, 0) + 1
    samples = [f"{e} (x{n} among the first 5 errors kept per client)"
               for e, n in distinct.items()]
    if missing:
        samples.append(f"workers {missing} did not report (killed)")
    if server_died:
        samples.append(server_died)
    ratio = plateau([(t, k) for t, k in rss if t <= end + 1], end)
    verdict = ("no data" if ratio is None else
               "plateau" if ratio <= 1.10 else "growing")
    kib = [k for _, k in rss if k is not None]
    last_status = statuses[-1][1] if statuses else {}
    rows = table_rows(rss, statuses, end)
    plot = ascii_plot([(t, k) for t, k in rss if t <= end + 1], end)

    params = (f"server {args.server} ({' '.join(server.cmd)}), "
              f"{args.clients} clients, {args.duration:g} s, slice "
              f"{args.slice_seconds:g} s, keep {args.keep} buckets, "
              f"{args.sessions} recent sessions, new-visitor share "
              f"{args.new_fraction:g}, pause {args.pause:g} s")
    figures = (f"RSS start {kib[0] / 1024 if kib else 0:.1f} MiB, peak "
               f"{max(kib) / 1024 if kib else 0:.1f} MiB, end "
               f"{kib[-1] / 1024 if kib else 0:.1f} MiB; final status: "
               + ", ".join(f"{k} {last_status[k]}" for k in STATUS_KEYS
                           if k in last_status))
    ratio_text = "n/a" if ratio is None else f"{ratio:.3f}"
    verdict_line = (
        f"VERDICT: {verdict} (max RSS last third / middle third = "
        f"{ratio_text}; <= 1.10 is a plateau); commits "
        f"{totals.get('commits', 0)}, conflicts retried "
        f"{totals.get('conflicts', 0)}, errors {errors}")
    work = (f"sessions created {totals.get('created', 0)}, moved "
            f"{totals.get('moved', 0)}, updated {totals.get('updated', 0)}, "
            f"buckets deleted {totals.get('buckets_deleted', 0)}")

    notes = []
    retained_for = (args.history_retention + args.keep * args.slice_seconds
                    + args.gc_interval)
    if args.server == "zeotemp" and end < 3 * retained_for:
        notes.append(
            f"note: garbage lives up to ~{retained_for:g} s here (history "
            f"retention + keep x slice + gc interval); a run shorter than "
            f"3x that ({3 * retained_for:g} s) cannot show a plateau")
    if args.server == "python":
        notes.append("note: the stock server never collects here (no pack): "
                     "its memory only grows; its status has no object counts")

    text = "\n".join([
        "", "== zeotemp soak ==", params, *notes, "",
        text_table(rows), "", plot, "", figures, work,
        *(f"error: {s}" for s in samples[:10]),
        *(f"status sampler error: {e}" for e in (sampler.errors[:3] if sampler else [])),
        verdict_line, ""])
    md = "\n".join([
        f"### Soak: {args.server}, {args.clients} clients, {args.duration:g} s", "",
        params + ".", "",
        *(n + "." for n in notes), *([""] if notes else []),
        md_table(rows), "",
        "```", plot, "```", "",
        figures + ".", "", work + ".", "",
        *(f"* error: `{s}`" for s in samples[:10]),
        f"**{verdict_line}**", ""])
    return dict(text=text, markdown=md, errors=errors, verdict=verdict)


if __name__ == "__main__":
    sys.exit(main())
