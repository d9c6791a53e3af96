#!/usr/bin/env python3
"""Backbone benchmark: idle memory of the control plane and the agent, the
time from `vm create` to QEMU started and to the guest's boot line, and the
overhead the control plane and agent add over starting the same QEMU command
by hand.

Usage: scripts/bench-backbone.py [--runs N]   (after `cargo build --release`)
Prints one JSON object; BENCHMARKS.md records the figures with the machine and
the date. Medians, since these machines are noisy.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "virt8ra")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


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


def wait(what, f, timeout=120, step=0.005):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = f()
        if v:
            return v
        time.sleep(step)
    sys.exit(f"timed out waiting for {what}")


def qemu_pid_for(needle):
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and needle in cmd:
            return int(p)
    return None


def has_boot_line(path):
    try:
        return b"VIRT8RA-GUEST-BOOTED" in open(path, "rb").read()
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    image = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/test-image.sh")]).decode().strip()
    tmp = tempfile.mkdtemp(prefix="virt8ra-bench-")
    procs = []
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(os.path.join(tmp, "server.log"), "w")
        server = subprocess.Popen([BIN, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", f"{tmp}/server"],
                                  stdout=log, stderr=log)
        procs.append(server)
        wait("server", lambda: os.path.exists(f"{tmp}/server/admin.token") and
             subprocess.call(["curl", "-fs", url + "/healthz"], stdout=subprocess.DEVNULL) == 0)
        api = Api(url, open(f"{tmp}/server/admin.token").read().strip())
        api.call("POST", "/providers", {"name": "p", "country": "DE"})
        api.call("POST", "/sites", {"name": "s", "provider": "p", "country": "DE", "city": "Frankfurt",
                                    "latitude": 50.1, "longitude": 8.7})
        tok = api.call("POST", "/join-tokens", {"site": "s"})["token"]
        alog = open(os.path.join(tmp, "agent.log"), "w")
        # The join token through the environment, not the command line (ps shows it to everyone).
        agent = subprocess.Popen([BIN, "agent", "--server", url, "--name", "h",
                                  "--data-dir", f"{tmp}/agent"], stdout=alog, stderr=alog,
                                 env=dict(os.environ, VIRT8RA_JOIN_TOKEN=tok))
        procs.append(agent)
        wait("host ready", lambda: any(h["state"] == "ready" for h in api.call("GET", "/hosts")["items"]))
        env = dict(os.environ, VIRT8RA_URL=url, VIRT8RA_TOKEN=api.token)
        subprocess.check_call([BIN, "image", "import", image, "--name", "t", "-o", "json"], env=env,
                              stdout=subprocess.DEVNULL)
        hv = api.call("GET", "/hosts")["items"][0]["inventory"]["hypervisor"]
        time.sleep(6)
        idle = {"server_idle_rss_kib": rss_kib(server.pid), "agent_idle_rss_kib": rss_kib(agent.pid)}

        to_qemu, to_boot, command = [], [], None
        # One warm-up VM fetches the image into the agent's cache.
        for i in range(args.runs + 1):
            t0 = time.monotonic()
            vm = api.call("POST", "/vms", {"name": f"b{i}", "image": "t", "memory_mib": 128})
            wait("QEMU", lambda: qemu_pid_for(vm["id"]))
            t1 = time.monotonic()
            con = f"{tmp}/agent/vms/{vm['id']}/console.log"
            wait("boot line", lambda: has_boot_line(con))
            t2 = time.monotonic()
            if i > 0:
                to_qemu.append((t1 - t0) * 1000)
                to_boot.append((t2 - t0) * 1000)
            if command is None:
                command = json.load(open(f"{tmp}/agent/vms/{vm['id']}/vm.json"))["command"]
                vm_dir = f"{tmp}/agent/vms/{vm['id']}"
            api.call("DELETE", f"/vms/{vm['id']}")
            wait("deleted", lambda: api.call("GET", f"/vms/{vm['id']}")["status"]["phase"] == "deleted")

        # The same QEMU command by hand, on a fresh overlay of the same base.
        by_hand = []
        base = [f for f in os.listdir(f"{tmp}/agent/images") if f.endswith(".qcow2")][0]
        for i in range(args.runs):
            d = f"{tmp}/hand{i}"
            os.makedirs(d)
            subprocess.check_call(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                                   f"{tmp}/agent/images/{base}", f"{d}/disk.qcow2", "1G"])
            cmd = [c.replace(vm_dir, d) for c in command]
            t0 = time.monotonic()
            subprocess.check_call(["qemu-system-x86_64"] + cmd)
            wait("boot line (by hand)", lambda: has_boot_line(f"{d}/console.log"))
            by_hand.append((time.monotonic() - t0) * 1000)
            pid = int(open(f"{d}/qemu.pid").read())
            os.kill(pid, 9)
            time.sleep(0.3)

        med = statistics.median
        out = {
            "hypervisor": hv,
            "runs": args.runs,
            **idle,
            "create_to_qemu_started_ms_median": round(med(to_qemu), 1),
            "create_to_boot_line_ms_median": round(med(to_boot), 1),
            "qemu_by_hand_to_boot_line_ms_median": round(med(by_hand), 1),
            "overhead_ms_median": round(med(to_boot) - med(by_hand), 1),
            "create_to_qemu_started_ms": [round(x, 1) for x in to_qemu],
            "create_to_boot_line_ms": [round(x, 1) for x in to_boot],
            "qemu_by_hand_to_boot_line_ms": [round(x, 1) for x in by_hand],
        }
        print(json.dumps(out, indent=2))
    finally:
        for p in procs:
            p.kill()
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if tmp in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace"):
                        os.kill(int(p), 9)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
