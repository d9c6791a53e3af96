#!/usr/bin/env python3
"""Benchmark of the encrypted data path between sites (issue 27, item 3).

In two network namespaces joined by a veth (two hosts, the link between
their sites) it measures, in one run on one machine:
  - plain:     the veth itself (the underlay),
  - boringtun: boringtun-cli 0.7 as it comes, one on each end,
  - virt8ra:   `virt8ra tunnel run` on each end,
TCP throughput with iperf3 (RUNS runs of DURATION seconds, median) and the
round-trip time with ping (median of 100). It prints a table, then one
JSON object. Needs root, iperf3, ping, and boringtun-cli (installed with
`cargo install boringtun-cli --locked` if missing). The namespaces are
removed at exit, also on failure.

With --relay it measures the relay instead (a host behind NAT reached
through a relay): three namespaces, A and B each linked only to R, which
routes between the two links, and in the same run
  - plain:   A -> B, routed by R,
  - direct:  `virt8ra tunnel run` on A and B, peers of each other (R
             routes their encrypted datagrams),
  - relayed: `virt8ra tunnel run` on A, R and B; A and B are peers of R
             only, which decrypts, forwards between tunnel addresses and
             encrypts again (what the control plane sets up for a host
             behind NAT: `relays_for` on A's and B's peer R).
No boringtun there.

    sudo scripts/bench-tunnel.py [--runs 3] [--duration 10] [--bin target/release/virt8ra] [--relay]
"""

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

A, B = "v8bench-a", "v8bench-b"
A_UNDER, B_UNDER = "192.168.78.1", "192.168.78.2"
A_TUN, B_TUN = "10.77.0.1", "10.77.0.2"


def run(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def ns(name, *args, **kw):
    return run("ip", "netns", "exec", name, *args, **kw)


R = "v8bench-r"
R_UNDER_A, R_UNDER_B, B_UNDER_R = "192.168.78.3", "192.168.79.3", "192.168.79.2"
R_TUN = "10.77.0.3"


def cleanup():
    for n in (A, B, R):
        run("ip", "netns", "del", n, check=False)


def setup():
    cleanup()
    for n in (A, B):
        run("ip", "netns", "add", n)
    run("ip", "link", "add", "va", "netns", A, "type", "veth", "peer", "name", "vb", "netns", B)
    for n, dev, addr in ((A, "va", A_UNDER), (B, "vb", B_UNDER)):
        run("ip", "-n", n, "addr", "add", addr + "/24", "dev", dev)
        run("ip", "-n", n, "link", "set", dev, "up")
        run("ip", "-n", n, "link", "set", "lo", "up")


def iperf(server_addr, runs, duration):
    rates = []
    for _ in range(runs):
        srv = subprocess.Popen(["ip", "netns", "exec", B, "iperf3", "-s", "-1", "-B", server_addr],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        out = ns(A, "iperf3", "-c", server_addr, "-t", str(duration), "-J", check=False)
        srv.wait(timeout=30)
        try:
            bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            sys.exit(f"iperf3 failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        rates.append(bps / 1e9)
    return rates


def ping(addr):
    out = ns(A, "ping", "-c", "100", "-i", "0.02", addr, check=False)
    rtts = [float(l.split("time=")[1].split()[0]) for l in out.stdout.splitlines() if "time=" in l]
    if len(rtts) < 90:
        sys.exit(f"ping {addr}: {len(rtts)} answers of 100")
    return statistics.median(rtts)


def wait_for(what, cond, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def link_up(name, dev):
    return ns(name, "ip", "link", "show", dev, check=False).returncode == 0


def keys(binary, d):
    out = {}
    for side in "abr":
        path = os.path.join(d, side + ".key")
        pub = run(binary, "tunnel", "genkey", path).stdout.strip()
        out[side] = (path, pub)
    return out


def start_virt8ra(binary, d, k):
    procs = []
    for side, n, own, peer_pub, peer_under, peer_tun in (
        ("a", A, A_TUN, k["b"][1], B_UNDER, B_TUN),
        ("b", B, B_TUN, k["a"][1], A_UNDER, A_TUN),
    ):
        cfg = os.path.join(d, side + ".yaml")
        with open(cfg, "w") as f:
            f.write(f"interface: v8bwg\nprivate_key_file: {k[side][0]}\nlisten_port: 51820\n"
                    f"address: {own}/24\npeers:\n  - public_key: \"{peer_pub}\"\n"
                    f"    endpoint: {peer_under}:51820\n    allowed_ips: [{peer_tun}/32]\n")
        procs.append(subprocess.Popen(["ip", "netns", "exec", n, binary, "tunnel", "run", "--config", cfg],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("the virt8ra tunnel in " + n, lambda: link_up(n, "v8bwg"))
    return procs


def setup_relay():
    """A - R - B: A and B each on a link of their own to R, which routes."""
    cleanup()
    for n in (A, B, R):
        run("ip", "netns", "add", n)
        run("ip", "-n", n, "link", "set", "lo", "up")
    run("ip", "link", "add", "va", "netns", A, "type", "veth", "peer", "name", "ra", "netns", R)
    run("ip", "link", "add", "vb", "netns", B, "type", "veth", "peer", "name", "rb", "netns", R)
    for n, dev, addr in ((A, "va", A_UNDER), (R, "ra", R_UNDER_A), (R, "rb", R_UNDER_B), (B, "vb", B_UNDER_R)):
        run("ip", "-n", n, "addr", "add", addr + "/24", "dev", dev)
        run("ip", "-n", n, "link", "set", dev, "up")
    run("ip", "-n", A, "route", "add", "192.168.79.0/24", "via", R_UNDER_A)
    run("ip", "-n", B, "route", "add", "192.168.78.0/24", "via", R_UNDER_B)
    for k in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0"):
        ns(R, "sysctl", "-qw", k)


def start_tunnels(binary, d, k, ends):
    """`ends`: (side, namespace, own tunnel address, [(peer side, endpoint, allowed)])."""
    procs = []
    for side, n, own, peers in ends:
        cfg = os.path.join(d, side + ".yaml")
        with open(cfg, "w") as f:
            f.write(f"interface: v8bwg\nprivate_key_file: {k[side][0]}\nlisten_port: 51820\n"
                    f"address: {own}/24\npeers:\n")
            for peer, endpoint, allowed in peers:
                f.write(f"  - public_key: \"{k[peer][1]}\"\n    endpoint: {endpoint}:51820\n"
                        f"    allowed_ips: [{', '.join(a + '/32' for a in allowed)}]\n")
        procs.append(subprocess.Popen(["ip", "netns", "exec", n, binary, "tunnel", "run", "--config", cfg],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("the virt8ra tunnel in " + n, lambda: link_up(n, "v8bwg"))
    return procs


def relay_main(args):
    results = {}
    try:
        setup_relay()
        with tempfile.TemporaryDirectory() as d:
            k = keys(args.bin, d)
            measure("plain", B_UNDER_R, args, results)
            procs = start_tunnels(args.bin, d, k, [
                ("a", A, A_TUN, [("b", B_UNDER_R, [B_TUN])]),
                ("b", B, B_TUN, [("a", A_UNDER, [A_TUN])]),
            ])
            try:
                measure("direct", B_TUN, args, results)
            finally:
                stop(procs)
            procs = start_tunnels(args.bin, d, k, [
                ("r", R, R_TUN, [("a", A_UNDER, [A_TUN]), ("b", B_UNDER_R, [B_TUN])]),
                ("a", A, A_TUN, [("r", R_UNDER_A, [R_TUN, B_TUN])]),
                ("b", B, B_TUN, [("r", R_UNDER_B, [R_TUN, A_TUN])]),
            ])
            try:
                measure("relayed", B_TUN, args, results)
            finally:
                stop(procs)
    finally:
        cleanup()
    plain_rtt = results["plain"]["rtt_ms_median"]
    for r in results.values():
        r["added_rtt_ms"] = round(r["rtt_ms_median"] - plain_rtt, 3)
    ratio = results["relayed"]["gbit_s_median"] / max(results["direct"]["gbit_s_median"], 1e-9)
    print(f"{'path':<10} {'TCP Gbit/s (median)':>20} {'RTT ms (median)':>16} {'added ms':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['gbit_s_median']:>20.3f} {r['rtt_ms_median']:>16.3f} {r['added_rtt_ms']:>9.3f}")
    print(f"relayed / direct throughput: {ratio:.2f}x")
    load = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                      "loadavg": load, "runs": args.runs, "duration_s": args.duration, "mode": "relay",
                      "results": results, "ratio_relayed_vs_direct": round(ratio, 2)}))


def hexkey(b64):
    return base64.b64decode(b64.strip()).hex()


def start_boringtun(bt, k):
    procs = []
    for side, n, own, peer_pub, peer_under, peer_tun in (
        ("a", A, A_TUN, k["b"][1], B_UNDER, B_TUN),
        ("b", B, B_TUN, k["a"][1], A_UNDER, A_TUN),
    ):
        dev = "v8bt" + side
        sock = f"/var/run/wireguard/{dev}.sock"
        procs.append(subprocess.Popen(["ip", "netns", "exec", n, bt, "--foreground", "--disable-drop-privileges",
                                       "--threads", "1", dev], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("boringtun in " + n, lambda: os.path.exists(sock))
        priv = open(k[side][0]).read()
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.sendall((f"set=1\nprivate_key={hexkey(priv)}\nlisten_port=51820\npublic_key={hexkey(peer_pub)}\n"
                   f"endpoint={peer_under}:51820\nallowed_ip={peer_tun}/32\n\n").encode())
        if b"errno=0" not in s.recv(100):
            sys.exit("boringtun refused its configuration")
        s.close()
        run("ip", "-n", n, "addr", "add", own + "/24", "dev", dev)
        run("ip", "-n", n, "link", "set", dev, "mtu", "1420", "up")
    return procs


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def measure(name, addr, args, results):
    ns(A, "ping", "-c", "3", "-i", "0.2", "-W", "3", addr, check=False)  # handshake
    rates = iperf(addr, args.runs, args.duration)
    rtt = ping(addr)
    results[name] = {"gbit_s_median": round(statistics.median(rates), 3),
                     "gbit_s_runs": [round(r, 3) for r in rates], "rtt_ms_median": rtt}
    print(f"  {name}: {results[name]}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--bin", default="target/release/virt8ra")
    p.add_argument("--relay", action="store_true", help="measure the relay (see above)")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, TUN)")
    for tool in ("iperf3", "ping", "ip"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (scripts/deps.sh installs it)")
    if args.relay:
        return relay_main(args)
    bt = shutil.which("boringtun-cli") or os.path.expanduser("~/.cargo/bin/boringtun-cli")
    if not os.path.exists(bt):
        subprocess.run(["cargo", "install", "boringtun-cli", "--locked"], check=True)
    results = {}
    try:
        setup()
        with tempfile.TemporaryDirectory() as d:
            k = keys(args.bin, d)
            measure("plain", B_UNDER, args, results)
            procs = start_boringtun(bt, k)
            try:
                measure("boringtun", B_TUN, args, results)
            finally:
                stop(procs)
            procs = start_virt8ra(args.bin, d, k)
            try:
                measure("virt8ra", B_TUN, args, results)
            finally:
                stop(procs)
    finally:
        cleanup()
    plain_rtt = results["plain"]["rtt_ms_median"]
    for r in results.values():
        r["added_rtt_ms"] = round(r["rtt_ms_median"] - plain_rtt, 3)
    ratio = results["virt8ra"]["gbit_s_median"] / max(results["boringtun"]["gbit_s_median"], 1e-9)
    print(f"{'path':<10} {'TCP Gbit/s (median)':>20} {'RTT ms (median)':>16} {'added ms':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['gbit_s_median']:>20.3f} {r['rtt_ms_median']:>16.3f} {r['added_rtt_ms']:>9.3f}")
    print(f"virt8ra / boringtun throughput: {ratio:.2f}x")
    load = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                      "loadavg": load, "runs": args.runs, "duration_s": args.duration,
                      "results": results, "ratio_vs_boringtun": round(ratio, 2)}))


if __name__ == "__main__":
    main()
