#!/usr/bin/env python3
"""A bystander's ping while a vote makes room under the memory limit.

    python3 bench/pressure_ping.py [--zeotemp-bin [LABEL=]PATH ...]
        [--repeat 1] [--objects 200000] [--object-size 200]
        [--margin BYTES] [--duration 10] [--probe-interval 0.001]
        [--zeotemp-arg=--opt=VALUE ...] [--out FILE.md] [--json FILE.json]

Near zeotemp's memory limit every vote that would cross it drops history and
runs a whole garbage collection (``ensure_room``) before it commits.  Up to
commit 52189dd that collection ran inline on the connection's tokio worker,
so with the default ``--threads 1`` every other connection waited for it.
This measures what another client sees then: the round-trip time of its
pings.  For every binary given (``--zeotemp-bin``, repeatable; runs alternate
between binaries, ``--repeat`` rounds) one run is:

1. calibration: a fresh server without a memory limit; ``zeotemp-bench
   --workload load --objects N --duration 1`` (its setup commits N records
   and a root linking all of them); the storage's ``accounted-bytes`` (from a
   ``ruok`` probe); then 1 s of the committer below, for the accounted bytes
   one of its transactions adds (T); the server is stopped;
2. a fresh server with default settings but ``--memory-limit`` = the
   accounted bytes after the setup + ``--margin`` (default 1.5 T); the same
   setup;
3. baseline: ``zeotemp-bench --workload echo --connections 1 --in-flight 1``
   for ``--duration`` seconds alone (the floor);
4. under pressure: ``zeotemp-bench --workload commit --connections 1
   --in-flight 1`` (5 new, never linked objects per transaction) for
   ``--duration`` + 1 seconds and, started 0.5 s after it, the same echo
   bystander for ``--duration`` seconds.  With a margin between T and 2 T,
   every vote but the first crosses the limit and fits only once a whole
   collection has freed the previous transaction's objects.  (A collection
   frees all garbage at once, so with a margin of M bytes only about one
   vote in M / T collects.)

During both echo windows a paced probe in this script (one ``ping`` every
``--probe-interval`` seconds on its own connection, stdlib socket + pickle)
records every round trip, for the longest one: ``zeotemp-bench`` reports
p50 / p99 / p99.9 but no maximum.  The server's ``collections`` counter
(``ruok``) is read before and after each window.

Listens and connects on 127.0.0.1 only; every wait is bounded; Ctrl-C or
SIGTERM stop whatever it started (exit status 130).  Exit status 1 if a run
failed.  Stdlib only.  See bench/README.md.
"""

import argparse
import json
import math
import os
import pickle
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "python"))

from compare import (Interrupted, Server, cpu_model, md_table,  # noqa: E402
                     raise_on_sigterm, text_table)
from zeotemp_util import stop_group  # noqa: E402

STORAGE = "1"


# ---------------------------------------------------------------- server

def host_port(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


def read_frame(f):
    head = f.read(4)
    if len(head) < 4:
        raise RuntimeError("server closed the connection")
    (n,) = struct.unpack(">I", head)
    payload = f.read(n)
    if len(payload) < n:
        raise RuntimeError("server closed the connection")
    return payload


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def ruok(address, storage=STORAGE, timeout=30):
    """The storage's status from a ``ruok`` probe: the server's protocol frame
    first, then the JSON answer (README "Monitoring")."""
    with socket.create_connection(host_port(address), timeout) as s:
        s.sendall(frame(b"ruok"))
        f = s.makefile("rb")
        read_frame(f)                       # b"Z5" (or b"M5")
        return json.loads(read_frame(f))[storage]


# ----------------------------------------------------------------- probe

class Probe(threading.Thread):
    """One connection sending a ``ping`` every ``interval`` seconds (the next
    one right away if a reply came late) and keeping every round trip, from
    the request written to its reply read, for ``duration`` seconds."""

    def __init__(self, address, duration, interval):
        super().__init__(daemon=True)
        self.address, self.duration, self.interval = address, duration, interval
        self.rtts_us = []
        self.error = None
        self._halt = threading.Event()
        self.sock = socket.create_connection(host_port(address), 30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")
        hello = read_frame(self.f)
        if hello != b"Z5":
            raise RuntimeError(f"server greeted with {hello!r}, not b'Z5'")
        self.sock.sendall(frame(b"Z5"))
        # As zeotemp-bench's connections: ping needs a registered storage
        # (the connection then also receives the committer's invalidations).
        self.sock.sendall(frame(pickle.dumps((0, False, "register",
                                              (STORAGE, False)), 3)))
        while True:
            mid, flag, name, value = pickle.loads(read_frame(self.f))
            if name == ".reply":
                break
        if flag:
            raise RuntimeError(f"register failed: {value!r}")

    def run(self):
        try:
            msgid = 0
            t_end = time.monotonic() + self.duration
            next_at = time.monotonic()
            while not self._halt.is_set():
                now = time.monotonic()
                if now >= t_end:
                    break
                if next_at > now:
                    time.sleep(next_at - now)
                next_at = max(next_at + self.interval, time.monotonic())
                msgid += 1
                req = frame(pickle.dumps((msgid, False, "ping", ()), 3))
                t0 = time.perf_counter_ns()
                self.sock.sendall(req)
                while True:
                    mid, flag, name, value = pickle.loads(read_frame(self.f))
                    if name == ".reply":
                        break
                t1 = time.perf_counter_ns()
                if mid != msgid or flag:
                    raise RuntimeError(f"bad ping reply {mid} {flag} {value!r}")
                self.rtts_us.append((t1 - t0) / 1000)
        except Exception as e:  # noqa: BLE001 - reported with the run
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def stop(self):
        self._halt.set()
        if not self.is_alive():
            self.close()

    def summary(self):
        r = sorted(self.rtts_us)
        n = len(r)
        if not n:
            return {"probes": 0, "error": self.error}

        def pct(q):             # as zeotemp-bench: the ceil(n*q)-th smallest
            return r[min(n, max(1, math.ceil(n * q))) - 1]
        return {"probes": n, "p50_us": pct(0.50), "p99_us": pct(0.99),
                "max_us": r[-1], "over_1ms": sum(x > 1000 for x in r),
                "over_10ms": sum(x > 10_000 for x in r), "error": self.error}


# ------------------------------------------------------------------ bench

class Bench:
    """One ``zeotemp-bench --json`` process (own session)."""

    def __init__(self, args, binary, address, workload, duration, extra=()):
        self.cmd = [binary, "--address", address, "--storage", STORAGE,
                    "--workload", workload, "--connections", "1",
                    "--in-flight", "1", "--duration", f"{duration:g}",
                    "--json", *extra]
        self.timeout = duration + 120
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def result(self):
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"zeotemp-bench did not finish within "
                               f"{self.timeout:g} s: {shlex.join(self.cmd)}")
        if self.proc.returncode != 0:
            raise RuntimeError(f"zeotemp-bench failed ({self.proc.returncode}): "
                               f"{err.strip()[-500:]}")
        lines = [l for l in out.splitlines() if l.strip().startswith("{")]
        if not lines:
            raise RuntimeError(f"zeotemp-bench printed no JSON: {out[-300:]}")
        return json.loads(lines[-1])

    def stop(self):
        stop_group(self.proc, 5)


class Alive:
    """Everything started and not yet stopped, stopped newest first."""

    def __init__(self):
        self.items = []

    def add(self, x):
        self.items.append(x)
        return x

    def done(self, x):
        x.stop()
        if x in self.items:
            self.items.remove(x)

    def stop_all(self):
        for x in reversed(self.items):
            x.stop()
        self.items.clear()


def loadavg():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------- runs

def setup(args, bench_bin, server, alive):
    """Commit --objects records and a root linking them (the load workload's
    setup), then 1 s of loads."""
    b = alive.add(Bench(args, bench_bin, server.address, "load", 1.0,
                        extra=("--objects", str(args.objects),
                               "--object-size", str(args.object_size))))
    try:
        r = b.result()
    finally:
        alive.done(b)
    if r.get("errors"):
        raise RuntimeError(f"setup: zeotemp-bench counted {r['errors']} errors")
    return r


def echo_window(args, bench_bin, server, alive):
    """The echo bystander and the probe for --duration seconds; returns
    (bench report, probe summary)."""
    probe = Probe(server.address, args.duration, args.probe_interval)
    alive.add(probe)
    echo = alive.add(Bench(args, bench_bin, server.address, "echo",
                           args.duration))
    try:
        probe.start()
        r = echo.result()
        probe.join(args.duration + 30)
        if probe.is_alive():
            raise RuntimeError("the probe did not finish")
    finally:
        alive.done(echo)
        alive.done(probe)
    return r, probe.summary()


def run_dir(workdir, tag, step):
    """A folder of its own for one server (its log is zeotemp-0.log there)."""
    d = Path(workdir) / f"{tag}-{step}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def one_run(args, label, binary, workdir, run_no, alive):
    bench_bin = str(Path(binary).with_name("zeotemp-bench"))
    res = {"run": run_no, "label": label, "binary": binary,
           "version": version_of(binary), "commit": commit_of(binary),
           "loadavg_start": loadavg()}
    tag = f"{run_no:02d}-{label}"

    # 1. calibration
    server_args = SimpleNamespace(zeotemp_bin=binary)
    srv = alive.add(Server("zeotemp", server_args, run_dir(workdir, tag, "calibrate"),
                           ["--memory-limit", "0", *args.zeotemp_arg]))
    try:
        srv.start()
        setup(args, bench_bin, srv, alive)
        st = ruok(srv.address)
        res["calibrated_accounted"] = st["accounted-bytes"]
        res["calibrated_objects"] = st["objects"]
        # What one of the committer's transactions adds (nothing is freed:
        # no limit, and its objects are younger than the retention).
        b = alive.add(Bench(args, bench_bin, srv.address, "commit", 1.0))
        try:
            b.result()
        finally:
            alive.done(b)
        st2 = ruok(srv.address)
        txns = st2["commits"] - st["commits"]
        if txns <= 0:
            raise RuntimeError("calibration: the committer committed nothing")
        res["txn_accounted"] = (st2["accounted-bytes"]
                                - st["accounted-bytes"]) / txns
    finally:
        alive.done(srv)
    margin = args.margin if args.margin is not None \
        else int(1.5 * res["txn_accounted"])
    res["margin"] = margin
    limit = res["calibrated_accounted"] + margin
    res["memory_limit"] = limit

    # 2. the measured server
    srv = alive.add(Server("zeotemp", server_args, run_dir(workdir, tag, "measured"),
                           ["--memory-limit", str(limit), *args.zeotemp_arg]))
    try:
        srv.start()
        setup(args, bench_bin, srv, alive)
        s0 = ruok(srv.address)
        res["after_setup"] = {k: s0[k] for k in ("accounted-bytes", "objects",
                                                 "collections")}

        # 3. baseline: the bystander alone
        echo, probe = echo_window(args, bench_bin, srv, alive)
        s1 = ruok(srv.address)
        res["baseline"] = {"echo": echo, "probe": probe,
                           "collections": s1["collections"] - s0["collections"]}

        # 4. the committer under memory pressure, the bystander beside it
        committer = alive.add(Bench(args, bench_bin, srv.address, "commit",
                                    args.duration + 1.0,
                                    extra=("--server-pid", str(srv.pid))))
        try:
            time.sleep(0.5)
            echo, probe = echo_window(args, bench_bin, srv, alive)
            com = committer.result()
        finally:
            alive.done(committer)
        s2 = ruok(srv.address)
        res["pressure"] = {
            "echo": echo, "probe": probe, "commit": com,
            "collections": s2["collections"] - s1["collections"],
            "accounted_end": s2["accounted-bytes"],
            "objects_end": s2["objects"],
            "longest_pause_ms": s2.get("longest-pause-ms"),
            "last_collection_ms": s2.get("last-collection-ms"),
            "made_room_lines": srv.log_count(r"memory limit: made room"),
            "full_lines": srv.log_count(r"is full: this transaction needs"),
        }
        if not srv.alive():
            raise RuntimeError(f"zeotemp died; log {srv.log_path}")
    finally:
        alive.done(srv)
    res["loadavg_end"] = loadavg()
    return res


# ------------------------------------------------------------- formatting

def ms(us):
    if us is None:
        return "–"
    v = us / 1000
    if v < 1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def rows_of(results):
    header = ["run", "binary", "clients", "commit txn/s", "failed votes",
              "collections", "pings/s", "ping p50 ms", "p99 ms", "p99.9 ms",
              "probe max ms", "probes > 10 ms", "load avg"]
    rows = []
    for r in results:
        name = f"{r['label']} ({r['commit'] or '?'})"
        if "error" in r:
            rows.append([r["run"], name, "FAILED: " + r["error"][:120]]
                        + [""] * (len(header) - 3))
            continue
        for phase, clients in (("baseline", "echo alone"),
                               ("pressure", "echo + committer")):
            p = r[phase]
            e, pr = p["echo"], p["probe"]
            com = p.get("commit")
            rows.append([
                r["run"], name, clients,
                f"{com['txns_per_s']:,.0f}" if com else "–",
                f"{com['errors']}" if com else "–",
                p["collections"],
                f"{e['ops_per_s']:,.0f}",
                ms(e["p50_us"]), ms(e["p99_us"]), ms(e["p999_us"]),
                ms(pr.get("max_us")),
                f"{pr.get('over_10ms', '–')} / {pr['probes']:,}",
                f"{r['loadavg_start']:.1f}→{r['loadavg_end']:.1f}"
                if r.get("loadavg_start") is not None
                and r.get("loadavg_end") is not None else "–",
            ])
    return header, rows


def version_of(binary):
    try:
        return subprocess.run([binary, "--version"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def commit_of(binary):
    """The short HEAD of the git checkout a target/<profile>/ binary sits in
    (the commit it was presumably built from), or None."""
    p = Path(binary).resolve()
    if len(p.parents) > 2 and p.parents[1].name == "target":
        try:
            r = subprocess.run(["git", "-C", str(p.parents[2]), "rev-parse",
                                "--short", "HEAD"], capture_output=True,
                               text=True, timeout=30)
            if r.returncode == 0:
                return r.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


# ------------------------------------------------------------------- main

def parse_binary(text):
    label, sep, path = text.partition("=")
    if not sep:
        label, path = None, text
    path = str(Path(path).absolute())
    if label is None:
        label = Path(path).parents[2].name if len(Path(path).parents) > 2 \
            else Path(path).name
    return label, path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zeotemp-bin", action="append", type=parse_binary,
                   metavar="[LABEL=]PATH",
                   help="server binary, zeotemp-bench next to it (repeatable; "
                        "default target/release/zeotemp); the label defaults "
                        "to the checkout's directory name")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds; each round runs every binary once, in order")
    p.add_argument("--objects", type=int, default=200_000,
                   help="records the setup commits and links from the root")
    p.add_argument("--object-size", type=int, default=200)
    p.add_argument("--margin", type=int, default=None,
                   help="memory limit = calibrated accounted bytes + this "
                        "(default: 1.5 x one committer transaction's accounted "
                        "bytes, so that every vote crosses the limit and fits "
                        "once the previous transaction's objects are freed)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of each echo window")
    p.add_argument("--probe-interval", type=float, default=0.001,
                   help="seconds between the probe's pings")
    p.add_argument("--zeotemp-arg", action="append", default=[], metavar="ARG",
                   help="more zeotemp arguments, --opt=VALUE (repeatable)")
    p.add_argument("--workdir", help="server logs (default: a new temporary "
                   "directory)")
    p.add_argument("--out", help="also write the report as Markdown")
    p.add_argument("--json", help="also write every figure as JSON")
    a = p.parse_args(argv)
    if not a.zeotemp_bin:
        a.zeotemp_bin = [parse_binary(str(REPO / "target/release/zeotemp"))]
    for _, path in a.zeotemp_bin:
        for f in (path, str(Path(path).with_name("zeotemp-bench"))):
            if not Path(f).exists():
                p.error(f"{f} not found (cargo build --release)")
    if a.repeat < 1 or a.objects < 1 or a.duration <= 0 \
            or (a.margin is not None and a.margin < 0) or a.probe_interval <= 0:
        p.error("--repeat, --objects, --duration, --probe-interval: positive; "
                "--margin: not negative")
    return a


def main(argv=None):
    args = parse_args(argv)
    cmdline = shlex.join(["bench/pressure_ping.py",
                          *(sys.argv[1:] if argv is None else argv)])
    raise_on_sigterm()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="zeotemp-pressure-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ncpu = os.cpu_count()
    print(f"machine: {ncpu} CPUs, {cpu_model()}")
    print(f"server logs in {workdir}")
    alive = Alive()
    results = []
    status = 0
    t0 = time.monotonic()
    total = args.repeat * len(args.zeotemp_bin)
    try:
        n = 0
        for _ in range(args.repeat):
            for label, binary in args.zeotemp_bin:
                n += 1
                print(f"[{n}/{total}] {label} ({binary}) ...", flush=True)
                try:
                    r = one_run(args, label, binary, workdir, n, alive)
                    b, p = r["baseline"], r["pressure"]
                    print(f"    limit {r['memory_limit']:,} B (accounted "
                          f"{r['calibrated_accounted']:,} + {r['margin']:,}; "
                          f"a transaction {r['txn_accounted']:,.0f} B); "
                          f"alone: ping p50 {ms(b['echo']['p50_us'])} ms, p99 "
                          f"{ms(b['echo']['p99_us'])}, probe max "
                          f"{ms(b['probe'].get('max_us'))}; with committer "
                          f"({p['commit']['txns_per_s']:,.0f} txn/s, "
                          f"{p['collections']} collections, "
                          f"{p['commit']['errors']} failed): ping p50 "
                          f"{ms(p['echo']['p50_us'])} ms, p99 "
                          f"{ms(p['echo']['p99_us'])}, p99.9 "
                          f"{ms(p['echo']['p999_us'])}, probe max "
                          f"{ms(p['probe'].get('max_us'))}", flush=True)
                    for ph in ("baseline", "pressure"):
                        if r[ph]["probe"].get("error"):
                            print(f"    probe ({ph}): {r[ph]['probe']['error']}")
                    if p["collections"] == 0:
                        print("    note: no collection during the pressure "
                              "window: the committer never reached the limit")
                except (RuntimeError, OSError, ValueError, KeyError,
                        subprocess.SubprocessError) as e:
                    r = {"run": n, "label": label, "binary": binary,
                         "commit": commit_of(binary), "error": str(e)}
                    print(f"    FAILED: {e}", flush=True)
                    status = 1
                results.append(r)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}); stopping what runs",
              file=sys.stderr)
        status = 130
    finally:
        alive.stop_all()
    elapsed = time.monotonic() - t0
    header, rows = rows_of(results)
    print()
    print(text_table(header, rows))
    if status == 130:
        return status
    binaries = "\n".join(
        f"* {label}: `{binary}` ({version_of(binary)}, checkout at "
        f"{commit_of(binary) or '?'})" for label, binary in args.zeotemp_bin)
    margin = (f"{args.margin:,} B" if args.margin is not None else
              "1.5 x the accounted bytes one committer transaction adds "
              "(calibrated too; a vote crosses the limit unless the previous "
              "transaction's objects were freed)")
    notes = (
        f"Every run: a fresh server without a limit for the calibration "
        f"({args.objects:,} records of {args.object_size} B linked from the "
        f"root: zeotemp-bench's load setup), then a fresh server with "
        f"`--memory-limit` = that accounted figure + {margin} and "
        f"otherwise default settings (`--threads 1`), the same setup, "
        f"{args.duration:g} s of the bystander alone, then {args.duration:g} s "
        f"of it beside the committer. Bystander: `zeotemp-bench --workload "
        f"echo --connections 1 --in-flight 1` (pings/s and p50 / p99 / "
        f"p99.9), plus this script's probe, a ping every "
        f"{args.probe_interval * 1000:g} ms on its own connection (probe max; "
        f"probes > 10 ms of all probes). Committer: `zeotemp-bench --workload "
        f"commit --connections 1 --in-flight 1` (5 new unlinked objects per "
        f"transaction), started 0.5 s before the bystander, "
        f"{args.duration + 1:g} s. Collections: the storage's `collections` "
        f"counter (ruok) over the window (votes that collected and the "
        f"periodic cycle every 10 s). Load avg: 1-minute load average at "
        f"the run's start and end.")
    md = ["## A bystander's ping while a vote makes room under the memory "
          "limit", "", "```sh", cmdline, "```", "",
          f"* machine: {ncpu} CPUs, {cpu_model()}", binaries,
          f"* run took {elapsed:.0f} s", "", md_table(header, rows), "", notes,
          ""]
    print(f"\n{notes}")
    if args.out:
        Path(args.out).write_text("\n".join(md))
        print(f"\nMarkdown report written to {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"command": cmdline, "cpus": ncpu, "cpu": cpu_model(),
             "options": {k: v for k, v in vars(args).items()},
             "runs": results}, indent=1) + "\n")
        print(f"JSON written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
