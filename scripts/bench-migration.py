#!/usr/bin/env python3
"""Migration benchmark: a running guest with 256 MiB of memory and a 1 GiB
disk (of which the guest has written 256 MiB) moved between two agents of
different providers (Spain, Germany) on this machine: live migration
downtime (median, p99), total time and bytes moved; cold migration time.

Usage: scripts/bench-migration.py [--live N] [--cold N] [--relay]   (after `cargo build --release`)
Prints one JSON object; BENCHMARKS.md records the figures with the machine and
the date. Medians, since these machines are noisy.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VIRT8RA_BIN", os.path.join(ROOT, "target", "release", "virt8ra"))

# Writes 256 MiB of random data to the disk once, then keeps a little memory busy.
USER_DATA = """#!/bin/sh
dd if=/dev/urandom of=/dev/vda bs=1048576 seek=256 count=256 conv=fsync 2>/dev/null
echo BENCH-DISK-WRITTEN
i=0
while true; do i=$((i+1)); echo "COUNT $i"; sleep 0.1; done
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Api:
    def __init__(self, url, token):
        self.url, self.token = url, token

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + "/api/v1" + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req) as r:
            raw = r.read()
            return json.loads(raw) if raw else None


def wait(what, f, timeout=300, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = f()
        if v:
            return v
        time.sleep(step)
    sys.exit(f"timed out waiting for {what}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", type=int, default=20)
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--relay", action="store_true",
                    help="agents without --migration-address: live streams relayed through the control plane")
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    image = subprocess.run(["bash", os.path.join(ROOT, "scripts/test-image.sh")],
                           check=True, capture_output=True, text=True).stdout.strip()
    d = tempfile.mkdtemp(prefix="virt8ra-bench-mig-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = []
    log = open(os.path.join(d, "log"), "a")
    try:
        procs.append(subprocess.Popen([BIN, "server", "--listen", f"127.0.0.1:{port}",
                                       "--data-dir", f"{d}/server", "--heartbeat-interval", "1"],
                                      stdout=log, stderr=log))
        wait("server", lambda: os.path.exists(f"{d}/server/admin.token"), 30, 0.1)
        time.sleep(0.5)
        api = Api(url, open(f"{d}/server/admin.token").read().strip())
        for prov, cc, site, city, lat, lon in [
                ("provider-es", "ES", "es-logrono", "Logroño", 42.46, -2.44),
                ("provider-de", "DE", "de-frankfurt", "Frankfurt", 50.11, 8.68)]:
            api.call("POST", "/providers", {"name": prov, "country": cc})
            api.call("POST", "/sites", {"name": site, "provider": prov, "country": cc,
                                        "city": city, "latitude": lat, "longitude": lon})
            tok = api.call("POST", "/join-tokens", {"site": site})["token"]
            name = "host-" + cc.lower()
            procs.append(subprocess.Popen(
                [BIN, "agent", "--server", url, "--name", name,
                 "--data-dir", f"{d}/{name}", "--vcpus", "4", "--memory-mib", "4096",
                 "--disk-gib", "40"] + ([] if a.relay else ["--migration-address", "127.0.0.1"]),
                stdout=log, stderr=log,
                # The join token through the environment, not the command line (ps shows it).
                env=dict(os.environ, VIRT8RA_JOIN_TOKEN=tok)))
        wait("hosts", lambda: len([h for h in api.call("GET", "/hosts")["items"]
                                   if h["state"] == "ready"]) == 2)
        env = dict(os.environ, VIRT8RA_URL=url, VIRT8RA_TOKEN=api.token)
        subprocess.run([BIN, "image", "import", image, "--name", "test"], env=env,
                       check=True, capture_output=True)
        api.call("POST", "/vms", {"name": "bench", "image": "test", "memory_mib": 256,
                                  "disk_gib": 1, "user_data": USER_DATA,
                                  "placement": {"countries": ["ES", "DE"]}})
        def console():
            try:
                return (api.call("GET", "/vms/bench/console") or {}).get("data", "")
            except urllib.error.HTTPError:
                return ""  # not placed or not connected yet
        wait("guest", lambda: "BENCH-DISK-WRITTEN" in console(), 300, 1)

        def migrate(mode):
            vm = api.call("GET", "/vms/bench")
            to = "host-de" if vm["status"]["host"] == "host-es" else "host-es"
            out = subprocess.run([BIN, "vm", "migrate", "bench", "--to-host", to, "--mode", mode,
                                  "--wait", "-o", "json"], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"migration failed: {out.stderr}")
            m = json.loads(out.stdout)
            wait("running", lambda: api.call("GET", "/vms/bench")["status"]["phase"] == "running")
            return m

        live = [migrate("live") for _ in range(a.live)]
        cold = [migrate("cold") for _ in range(a.cold)]
        dt = [m["downtime_ms"] for m in live]
        r = {
            "guest": {"memory_mib": 256, "disk_gib": 1, "disk_written_mib": 256},
            "relayed": a.relay,
            "live_runs": len(live),
            "live_downtime_ms_median": statistics.median(dt),
            "live_downtime_ms_p99": pct(dt, 99),
            "live_downtime_ms_max": max(dt),
            "live_total_ms_median": statistics.median(m["total_ms"] for m in live),
            "live_bytes_median": statistics.median(m["bytes"] for m in live),
            "cold_runs": len(cold),
            "cold_total_ms_median": statistics.median(m["total_ms"] for m in cold) if cold else None,
            "cold_downtime_ms_median": statistics.median(m["downtime_ms"] for m in cold) if cold else None,
            "cold_bytes_median": statistics.median(m["bytes"] for m in cold) if cold else None,
        }
        print(json.dumps(r, indent=2))
    finally:
        for p in procs:
            p.kill()
        subprocess.run(["pkill", "-9", "-f", d])


if __name__ == "__main__":
    main()
