#!/usr/bin/env python3
"""Bad clients against a good one: does load from misbehaving connections
stall a well-behaved real client, or grow the server's memory without bound?

    python bench/bad_clients.py [--server zeotemp[,python]]
        [--scenarios baseline,held,half-frames,pipeline,new_oids,churn]
        [--hold 10] [--held 3000] [--unhandshaken 300] [--half 300]
        [--pipeliners 4] [--pipeline-requests 50000] [--big-size 4096]
        [--flood-clients 2] [--flood-requests 50000] [--churn-threads 4]
        [--zeotemp-bin target/release/zeotemp] [--zeotemp-arg=--opt=VALUE ...]
        [--out FILE.md] [--json FILE.json]

For each server kind (zeotemp's release binary; ``python`` adds the stock
``ZEO.runzeo`` with a MappingStorage for the side-by-side) and each
scenario, it starts a fresh server and a well-behaved real client (a
separate process: stock ``ClientStorage`` with ``server_sync`` + ``ZODB.DB``
looping a load, a commit into an OOBTree and the wait for that commit's
invalidation at a second ``ClientStorage``; ``tests/python/zeotemp_badclients.py``),
lets it warm up, then runs the attack from this process on raw sockets for
``--hold`` seconds and tears it down:

* ``baseline``   -- no attack (the good client alone, for reference);
* ``held``       -- ``--held`` connections opened, handshaken and held, and
  ``--unhandshaken`` more that connect and never send anything;
* ``half-frames``-- ``--half`` connections that send a frame header and part
  of the frame (1000 B .. max-frame-size announced) and hold;
* ``pipeline``   -- ``--pipeliners`` registered clients that each pipeline
  ``--pipeline-requests`` ``loadBefore`` (of a ``--big-size``-byte object;
  every 10th a ``lastTransaction``) and never read a reply;
* ``new_oids``   -- ``--flood-clients`` clients pipelining
  ``--flood-requests`` ``new_oids`` each, one in 20 with an absurd count
  (2**31, -1, 10**9, 2**200, ...), replies read and checked;
* ``churn``      -- ``--churn-threads`` loops of connect / handshake /
  (register) / close (FIN or reset).

Per scenario it reports the good client's operations, errors, longest
operation (the "stall"), p99 and the longest time between two operations
finishing, from the attack's start until its teardown finished; and the
server's VmRSS (/proc/PID/status, sampled every 50 ms) before the attack,
its peak during attack and teardown, and ``--settle`` seconds after the
teardown.  Prints a table; ``--out`` writes Markdown.

The bad clients, the good client and the server share the machine's CPUs:
on a small machine every figure is noisy; compare within one run.
Stdlib + the test venv (target/pyvenv: ZEO 6.2 / ZODB 6.4).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "python"))

import zeotemp_badclients as bc  # noqa: E402
from zeotemp_churn import ServerProcess  # noqa: E402
from zeotemp_util import stop_group  # noqa: E402
from compare import Interrupted, raise_on_sigterm, require_files  # noqa: E402

SCENARIOS = ("baseline", "held", "half-frames", "pipeline", "new_oids", "churn")
MIB = 1024 * 1024


class GoodClient:
    def __init__(self, args, address, workdir, tag):
        self.out = Path(workdir) / f"good-{tag}.ops"
        self.setup_path = Path(workdir) / f"good-{tag}.json"
        self.err = open(Path(workdir) / f"good-{tag}.stderr", "wb")
        self.proc = subprocess.Popen(
            [args.python, str(REPO / "tests/python/zeotemp_badclients.py"),
             "good", "--address", f"{address[0]}:{address[1]}",
             "--out", str(self.out), "--setup", str(self.setup_path),
             "--big-size", str(args.big_size), "--pause", str(args.pause)],
            stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err,
            start_new_session=True)

    def wait_setup(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.setup_path.exists():
                return json.loads(self.setup_path.read_text())
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"good client not set up (exit {self.proc.poll()}); "
                           f"see {self.err.name}")

    def ops(self):
        return bc.read_ops(self.out)

    def stop(self):
        stop_group(self.proc, 15, 5)
        self.err.close()


def make_attack(args, name, address, setup, max_frame_size):
    if name == "held":
        return bc.HeldConnections(address, args.held, args.unhandshaken)
    if name == "half-frames":
        return bc.HalfFrames(address, args.half, max_frame_size=max_frame_size)
    if name == "pipeline":
        return bc.Pipeliners(address, args.pipeliners, args.pipeline_requests,
                             bytes.fromhex(setup["big_oid"]))
    if name == "new_oids":
        return bc.NewOidsFlood(address, args.flood_clients, args.flood_requests)
    if name == "churn":
        return bc.Churn(address, args.churn_threads)
    return None


def describe(name, st, closed):
    if name == "held":
        return (f"{st['held']} held + {st['unhandshaken']} silent "
                f"(opened in {st['open_seconds']} s; {st['failed']} failed); "
                f"{closed} closed by the server during the hold")
    if name == "half-frames":
        return (f"{st['held']} half frames ({st['bytes_sent'] / MIB:.1f} MiB "
                f"sent); {closed} closed by the server during the hold")
    if name == "pipeline":
        return (f"{st['clients']} × {bc_fmt(st['requests_sent'] // max(1, st['clients']))} "
                f"requests sent of {st['clients']} × {bc_fmt(st['want'])}, "
                f"none read; {closed} disconnected by the server")
    if name == "new_oids":
        errs = ", ".join(f"{k} {v}" for k, v in sorted(st["error_replies"].items()))
        return (f"{bc_fmt(st['replies'])} of {bc_fmt(st['requests'])} replies, "
                f"{bc_fmt(st['oids'])} oids, {st['duplicates']} duplicates"
                + (f"; error replies: {errs}" if errs else ""))
    if name == "churn":
        return (f"{bc_fmt(st['cycles'])} connections "
                f"({st['per_second']}/s), {st['failures']} failed")
    return "no attack"


def bc_fmt(n):
    return f"{n:,}"


def run_scenario(args, kind, name, workdir):
    sdir = Path(workdir) / f"{kind}-{name}"
    zargs = list(args.zeotemp_arg)
    server = ServerProcess(kind, sdir, zeotemp_bin=args.zeotemp_bin,
                           zeotemp_args=zargs, python=args.python)
    server.start()
    good = sampler = attack = None
    try:
        sampler = bc.RssSampler(server.pid)
        good = GoodClient(args, server.address, sdir, name)
        setup = good.wait_setup()
        time.sleep(args.warmup)
        rss_before = sampler.now()
        ta = time.monotonic()
        attack = make_attack(args, name, server.address, setup, args.max_frame_size)
        closed = 0
        if attack is not None:
            attack.start()
        time.sleep(args.hold)
        if attack is not None and hasattr(attack, "closed_by_server"):
            closed = attack.closed_by_server()
        if attack is not None:
            attack.stop()
        tb = time.monotonic()
        time.sleep(args.settle)
        rss_after = sampler.now()
        peak = sampler.peak(ta, time.monotonic())
        alive = server.running()
        good.stop()
        ops = good.ops()
        w = bc.window_stats(ops, ta, tb)
        st = attack.stats() if attack is not None else {}
        if name == "pipeline":
            st["want"] = args.pipeline_requests
        if name == "new_oids":
            st["duplicates"] = attack.duplicate_oids()
        return {
            "server": kind, "scenario": name, "seconds": round(tb - ta, 1),
            "good": w, "rss_before_kib": rss_before, "rss_peak_kib": peak,
            "rss_after_kib": rss_after, "server_alive": alive,
            "attack": st, "closed_by_server": closed,
            "what": describe(name, st, closed) if attack is not None or
            name == "baseline" else "",
            "log_tail": server.log_tail(8),
        }
    finally:
        if attack is not None:
            attack.stop()
        if good is not None:
            good.stop()
        if sampler is not None:
            sampler.stop()
        server.stop()


def ms(v):
    if v is None:
        return "-"
    v *= 1000
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:,.0f}"


HEADER = ["server", "scenario", "good ops", "errors", "max ms", "p99 ms",
          "max gap ms", "RSS before/peak/after MiB", "attack"]


def row(r):
    g = r["good"]
    errs = str(g["errors"]) + (f" ({', '.join(g['error_kinds'])})"
                               if g["error_kinds"] else "")
    if not r["server_alive"]:
        errs += " SERVER DIED"
    return [r["server"], r["scenario"], bc_fmt(g["ops"]), errs, ms(g["max"]),
            ms(g["p99"]), ms(g["max_gap"]),
            f"{mib(r['rss_before_kib'])} / {mib(r['rss_peak_kib'])} / "
            f"{mib(r['rss_after_kib'])}", r["what"]]


def text_table(rows):
    rows = [HEADER] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    out = []
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(out)


def md_table(rows):
    out = ["| " + " | ".join(HEADER) + " |",
           "| " + " | ".join(["---"] * 2 + ["---:"] * 6 + ["---"]) + " |"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="zeotemp",
                   help="zeotemp, python or zeotemp,python")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--hold", type=float, default=10.0,
                   help="seconds each attack is held after it started")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds after the teardown before RSS 'after'")
    p.add_argument("--held", type=int, default=3000)
    p.add_argument("--unhandshaken", type=int, default=300)
    p.add_argument("--half", type=int, default=300)
    p.add_argument("--max-frame-size", type=int, default=64 * MIB,
                   help="largest length the half frames announce (the "
                        "server's max-frame-size)")
    p.add_argument("--pipeliners", type=int, default=4)
    p.add_argument("--pipeline-requests", type=int, default=50_000)
    p.add_argument("--big-size", type=int, default=4096,
                   help="bytes of the object the pipeliners load")
    p.add_argument("--flood-clients", type=int, default=2)
    p.add_argument("--flood-requests", type=int, default=50_000)
    p.add_argument("--churn-threads", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.002,
                   help="good client's pause between iterations (s)")
    p.add_argument("--zeotemp-bin", default=str(REPO / "target/release/zeotemp"))
    p.add_argument("--zeotemp-arg", action="append", default=[],
                   metavar="ARG", help="extra zeotemp argument, e.g. "
                   "--zeotemp-arg=--max-outbox-bytes=67108864 (repeatable)")
    p.add_argument("--python", default=str(REPO / "target/pyvenv/bin/python"),
                   help="interpreter with ZEO (good client, runzeo)")
    p.add_argument("--out", help="also write the report as Markdown")
    p.add_argument("--json", help="also write the raw results as JSON")
    a = p.parse_args(argv)
    a.servers = [s.strip() for s in a.server.split(",") if s.strip()]
    a.scenario_list = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in a.servers if s not in ("zeotemp", "python")]
    bad += [s for s in a.scenario_list if s not in SCENARIOS]
    if bad:
        p.error(f"unknown {bad}; servers: zeotemp, python; scenarios: {SCENARIOS}")
    # Absolute: the servers run in their own directories.
    a.zeotemp_bin = str(Path(a.zeotemp_bin).absolute())
    a.python = str(Path(a.python).absolute())
    require_files(p, [a.python] + ([a.zeotemp_bin] if "zeotemp" in a.servers
                                   else []))
    return a


def main(argv=None):
    args = parse_args(argv)
    cmdline = shlex.join(["bench/bad_clients.py", *(sys.argv[1:] if argv is None
                                                      else argv)])

    raise_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="zeotemp-badclients-")
    print(f"server logs and good-client records in {workdir}", flush=True)
    results = []
    load_before = os.getloadavg()
    t0 = time.monotonic()
    try:
        for name in args.scenario_list:
            for kind in args.servers:
                print(f"-- {kind}: {name}", flush=True)
                try:
                    r = run_scenario(args, kind, name, workdir)
                except (KeyboardInterrupt, Interrupted):
                    raise
                except Exception as e:  # noqa: BLE001 - report, go on
                    print(f"   failed: {type(e).__name__}: {e}", flush=True)
                    continue
                results.append(r)
                print("   " + " | ".join(row(r)), flush=True)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"interrupted ({e or 'Ctrl-C'})", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - t0
    rows = [row(r) for r in results]
    print()
    print(text_table(rows))
    failed = any(r["good"]["errors"] or not r["server_alive"] for r in results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        zt = subprocess.run([args.zeotemp_bin, "--version"], capture_output=True,
                            text=True).stdout.strip() if "zeotemp" in args.servers else ""
        git = subprocess.run(["git", "-C", str(REPO), "describe", "--always",
                              "--dirty"], capture_output=True, text=True)
        if zt and git.returncode == 0:
            zt += f" (at {git.stdout.strip()})"
        md = ["## Bad clients against a good one", "", "```sh",
              f"target/pyvenv/bin/python {cmdline}", "```", "",
              f"* machine: {os.cpu_count()} CPUs, load average "
              f"{load_before[0]:.1f} at the start and {os.getloadavg()[0]:.1f} "
              f"at the end (other work included); {zt}"
              + ("; stock server: ZEO.runzeo, MappingStorage" if "python"
                 in args.servers else ""),
              f"* each scenario on a fresh server; attack held {args.hold:g} s "
              f"after it started, RSS 'after' {args.settle:g} s after the "
              f"teardown; run took {elapsed:.0f} s",
              "* good client: one process, stock ClientStorage (server_sync) + "
              "ZODB.DB, looping load (sync + loadSerial), commit (OOBTree "
              "insert + counter), wait for the commit's invalidation at a "
              f"second ClientStorage; {args.pause * 1000:g} ms pause per loop; "
              "figures over the operations started from the attack's start "
              "to the end of its teardown; max gap = longest time between "
              "two operations finishing",
              "* the attack, the good client and the server share the CPUs: "
              "noisy, compare within one run", "",
              md_table(rows), ""]
        Path(args.out).write_text("\n".join(md))
        print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
