#!/usr/bin/env python3
"""Two zeotemp builds side by side: alternating runs of one zeotemp-bench
against each, in one sitting, medians per workload as a Markdown table.

    bench/ab_servers.py BEFORE/zeotemp AFTER/zeotemp path/to/zeotemp-bench

For a change that must not slow the server down (e.g. a restructure): keep
the old build's binaries, build the new one, and compare. Each run starts a
fresh server with its defaults on a free loopback port, measures DUR
seconds (default 5) and stops it; ROUNDS rounds (default 3) alternate the
order of the two builds; WL picks the workloads as
`workload:connections:in_flight,...`. Per-run figures go to stderr.
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time

WORKLOADS = "load:16:16,load:1:1,commit:8:1,session:8:4,echo:16:16"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(server, bench, workload, conns, in_flight, duration):
    """One measured run against a fresh server; zeotemp-bench's JSON."""
    port = free_port()
    srv = subprocess.Popen(
        [server, "--address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        out = subprocess.run(
            [bench, "-a", f"127.0.0.1:{port}", "-w", workload,
             "-c", str(conns), "-k", str(in_flight), "-d", duration,
             "--server-pid", str(srv.pid), "--json"],
            capture_output=True, text=True, check=True).stdout
        result = json.loads(out)
        result["cpu_us_per_op"] = (
            result["server_cpu_s"] * 1e6 / max(result["ops"], 1))
        return result
    finally:
        srv.terminate()
        srv.wait()


def median(runs, field):
    return statistics.median(r[field] for r in runs)


def main():
    before, after, bench = sys.argv[1:4]
    rounds = int(os.environ.get("ROUNDS", "3"))
    duration = os.environ.get("DUR", "5")
    workloads = []
    for spec in os.environ.get("WL", WORKLOADS).split(","):
        name, conns, in_flight = spec.split(":")
        workloads.append((name, int(conns), int(in_flight)))
    builds = [("before", before), ("after", after)]
    results = {}
    for r in range(rounds):
        for workload in workloads:
            for label, server in builds if r % 2 == 0 else builds[::-1]:
                j = run(server, bench, *workload, duration)
                results.setdefault((workload, label), []).append(j)
                print(label, *workload, {k: j[k] for k in (
                    "ops_per_s", "p50_us", "p99_us", "cpu_us_per_op",
                    "server_user_us_per_op")},
                    file=sys.stderr, flush=True)
    print("| workload | conns × in flight | before ops/s | after ops/s "
          "| after/before | before p99 µs | after p99 µs "
          "| before server CPU µs/op | after server CPU µs/op "
          "| before user µs/op | after user µs/op |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: | ---: |")
    for workload in workloads:
        b, a = results[(workload, "before")], results[(workload, "after")]
        bo, ao = median(b, "ops_per_s"), median(a, "ops_per_s")
        name, conns, in_flight = workload
        print(f"| {name} | {conns} × {in_flight} | {bo:,.0f} | {ao:,.0f} "
              f"| {ao / bo:.3f} | {median(b, 'p99_us'):,.0f} "
              f"| {median(a, 'p99_us'):,.0f} "
              f"| {median(b, 'cpu_us_per_op'):.2f} "
              f"| {median(a, 'cpu_us_per_op'):.2f} "
              f"| {median(b, 'server_user_us_per_op'):.2f} "
              f"| {median(a, 'server_user_us_per_op'):.2f} |")


if __name__ == "__main__":
    main()
