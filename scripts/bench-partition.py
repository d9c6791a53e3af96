#!/usr/bin/env python3
"""Partition benchmark (issue 30, item 1): how fast each side of the agent's
channel finds a silent partition, and how fast the agent is back after the
link heals and after a control-plane restart.

Runs the end-to-end tests of crates/virt8ra/tests/partition.rs (real
processes, network namespaces, `tc` dropping every packet, a 1 s heartbeat
interval) N times, one test at a time, and prints one JSON object with
every run's figures and their medians. Needs root (network namespaces).

Usage: scripts/bench-partition.py [--runs N]
BENCHMARKS.md records the figures with the machine, the date and the load.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once():
    out = subprocess.run(
        ["cargo", "test", "-q", "-p", "virt8ra", "--test", "partition", "--",
         "--nocapture", "--test-threads=1"],
        cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit("the partition tests failed")
    figures = {}
    for line in out.stdout.splitlines():
        # The test harness's progress dots may share the line.
        if "TIMINGS " in line:
            _, _, payload = line.split("TIMINGS ", 1)[1].partition(" ")
            figures.update(json.loads(payload))
    return figures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs = [run_once() for _ in range(args.runs)]
    keys = sorted({k for r in runs for k in r})
    print(json.dumps({
        "runs": runs,
        "median": {k: round(statistics.median(r[k] for r in runs if k in r), 2)
                   for k in keys},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "nproc": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
