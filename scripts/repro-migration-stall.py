#!/usr/bin/env python3
"""Reproduction of issue 35: after a live migration under load, the test
guest's `sleep 0.1` loop (or another of its loops) stops for good.

Cause: QEMU 7.2 under TCG loses guest writes made during pre-copy (see
crates/agent/src/driver/qemu_migrate.rs and docs/ARCHITECTURE.md), so the
target runs on stale memory. Fix: under TCG the agent stops the guest
before the memory copy.

Two QEMU processes on loopback move the test guest back and forth with the
agent's own sequence (qemu-nbd on the target, drive-mirror sync=top, [stop],
migrate with pause-before-switchover, block-job-cancel, migrate-continue,
stop qemu-nbd, `cont`), with the QEMU command line the agent builds (TCG,
`-cpu qemu64`, machine `pc`; --qemu-arg adds options), and the user-data
script of crates/virt8ra/tests/migration.rs. Beside it, a CPU hog and an
fsync-heavy I/O hog (both stop by themselves). After each move it watches
the target's console for --watch seconds: the COUNT loop, the 1 s tick loop
and the 5 s watchdog loop must all go on. It records the guest's pause as
the guest sees it (source paused to target running), its clock against the
host's, and its clock source.

Usage: scripts/repro-migration-stall.py [--rounds N] [--live-precopy] [--kmsg]
                                        [--no-load] [--qemu-arg ARG]...
  --live-precopy  the sequence before the fix (memory copied while the
                  guest runs): fails on demand under load
  --kmsg          the guest kernel's messages on its console (dmesg -n 8)
  --load-only S   only the two hogs, for S seconds (to load the machine
                  beside `cargo test -p virt8ra --test migration`)
Exit status 0 when every move kept the loops going, 1 at the first that did
not (its console, and QEMU's view of the stalled guest, are kept in /tmp and
their paths printed). One JSON summary on stdout; progress on stderr.
Everything it starts is stopped and its temporary directory removed.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print("repro:", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def user_data():
    """The SCRIPT of tests/migration.rs, so the guest runs what the test runs."""
    src = open(os.path.join(ROOT, "crates/virt8ra/tests/migration.rs")).read()
    m = re.search(r'const SCRIPT: &str = r#"(.*?)"#;', src, re.S)
    if not m:
        sys.exit("repro: no SCRIPT in tests/migration.rs")
    return m.group(1)


def with_kernel_log(script):
    """The script with every kernel message copied to the console."""
    first, rest = script.split("\n", 1)
    return first + "\ndmesg -n 8\n" + rest


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.settimeout(60)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        r = self._read()
        if "error" in r:
            raise RuntimeError(f"{name}: {r['error']}")
        return r["return"]

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class Vm:
    """One QEMU of the guest, in its own directory (as the agent keeps it)."""

    def __init__(self, work, name, base, seed, extra):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.disk = os.path.join(self.dir, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", base, self.disk, "1G"], check=True)
        shutil.copy(seed, os.path.join(self.dir, "seed.img"))
        self.console = os.path.join(self.dir, "console.log")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.extra = extra
        self.qmp = None
        self.nbd_port = None

    def args(self):
        p = lambda f: os.path.join(self.dir, f)  # noqa: E731
        return ["qemu-system-x86_64", "-name", "phoenix,process=virt8ra-repro",
                "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-smp", "1", "-m", "256",
                "-nodefaults", "-display", "none", "-vga", "none",
                "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=writeback,discard=unmap",
                "-drive", f"file={p('seed.img')},if=virtio,format=raw,readonly=on",
                "-chardev", f"file,id=con0,path={self.console},append=on",
                "-serial", "chardev:con0",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
                "-daemonize", "-pidfile", p("qemu.pid")] + self.extra

    def start(self, incoming=False):
        a = self.args()
        if incoming:
            self.nbd_port = free_port()
            subprocess.run(["qemu-nbd", "--fork", "--persistent", "-f", "qcow2", "-x", "disk0",
                            "-b", "127.0.0.1", "-p", str(self.nbd_port), "--cache=writeback",
                            "--pid-file", os.path.join(self.dir, "nbd.pid"), self.disk], check=True)
            a += ["-incoming", "defer", "-S"]
        subprocess.run(a, check=True)
        self.qmp = Qmp(self.qmp_path)
        if incoming:
            self.mig_port = free_port()
            self.qmp.cmd("migrate-set-capabilities", capabilities=[
                {"capability": "late-block-activate", "state": True}])
            self.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{self.mig_port}")

    def pid(self, f="qemu.pid"):
        try:
            return int(open(os.path.join(self.dir, f)).read())
        except (OSError, ValueError):
            return None

    def stop_nbd(self):
        pid = self.pid("nbd.pid")
        if pid:
            kill_wait(pid)

    def stop(self):
        if self.qmp:
            try:
                self.qmp.cmd("quit")
            except (RuntimeError, OSError):
                pass
            self.qmp.close()
            self.qmp = None
        for f in ("qemu.pid", "nbd.pid"):
            pid = self.pid(f)
            if pid:
                kill_wait(pid)

    def text(self):
        try:
            return open(self.console, errors="replace").read()
        except OSError:
            return ""


def kill_wait(pid, timeout=5):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


def counts(text):
    return [int(m) for m in re.findall(r"^COUNT (\d+)\s*$", text, re.M)]


def uptimes(text):
    """The guest's uptime as its 1 s tick loop prints it."""
    return [float(m) for m in re.findall(r"VIRT8RA-TICK \d+ uptime=([\d.]+)", text)]


def migrate(src, dst, timings, stop_first=True):
    """The agent's live sequence (qemu_migrate.rs send_live / await_incoming);
    under TCG it stops the guest before the memory copy, unless `stop_first`
    is false (the sequence before the fix of issue 35: pre-copy while the
    guest runs)."""
    q = src.qmp
    paused = None
    q.cmd("drive-mirror", **{"job-id": "virt8ra-mirror", "device": "virtio0",
                             "target": f"nbd:127.0.0.1:{dst.nbd_port}:exportname=disk0",
                             "sync": "top", "mode": "existing", "format": "raw"})
    while not all(j.get("ready") for j in q.cmd("query-block-jobs")):
        time.sleep(0.05)
    q.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": True},
        {"capability": "events", "state": True}])
    q.cmd("migrate-set-parameters", **{"downtime-limit": 30, "max-bandwidth": 10 << 30})
    if stop_first:
        paused = time.monotonic()
        q.cmd("stop")
    q.cmd("migrate", uri=f"tcp:127.0.0.1:{dst.mig_port}")
    continued = False
    while True:
        st = q.cmd("query-migrate")
        s = st.get("status")
        if s == "pre-switchover" and not continued:
            t = time.monotonic()
            paused = paused or t
            for j in q.cmd("query-block-jobs"):
                q.cmd("block-job-cancel", device=j["device"])
            while q.cmd("query-block-jobs"):
                time.sleep(0.01)
            timings["mirror_end_ms"] = round((time.monotonic() - t) * 1000)
            q.cmd("migrate-continue", state="pre-switchover")
            continued = True
        elif s == "completed":
            timings["downtime_ms"] = st.get("downtime")
            break
        elif s in ("failed", "cancelled"):
            raise RuntimeError(f"migration {s}: {st.get('error-desc')}")
        time.sleep(0.005)
    while dst.qmp.cmd("query-status")["status"] == "inmigrate":
        time.sleep(0.005)
    t = time.monotonic()
    dst.stop_nbd()
    dst.qmp.cmd("cont")
    timings["cont_ms"] = round((time.monotonic() - t) * 1000)
    # What the guest sees: from the source's pause to the target's run.
    timings["paused_ms"] = round((time.monotonic() - paused) * 1000) if paused else None


def diagnose(vm):
    """What a stalled guest's QEMU shows: its state, the vCPU, the timers,
    whether the console grows, the serial port's registers."""
    d = {"console_bytes": len(vm.text())}
    time.sleep(20)
    d["console_bytes_20s_later"] = len(vm.text())
    q = vm.qmp
    d["status"] = q.cmd("query-status")
    for c in ("info registers", "info lapic", "info pic", "info irq",
              "info mtree -f", "info qtree"):
        try:
            out = q.cmd("human-monitor-command", **{"command-line": c})
        except RuntimeError as e:
            out = str(e)
        if c == "info registers":
            # Sampled a few times: a vCPU spinning with interrupts off
            # (RFL without IF, 0x200) shows the same few addresses.
            for _ in range(5):
                d.setdefault("rip", []).extend(re.findall(r"RIP=\S+ RFL=\S+", out))
                time.sleep(0.2)
                out = q.cmd("human-monitor-command", **{"command-line": c})
            d["hlt"] = re.findall(r"HLT=\d", out)
        d[c] = out[:3000] if c not in ("info qtree", "info mtree -f") else None
    return d


def start_loads(work, seconds):
    """A CPU hog and an fsync-heavy I/O hog, both ending by themselves."""
    procs = []
    procs.append(subprocess.Popen(["timeout", str(seconds), "sh", "-c", "while :; do :; done"]))
    f = os.path.join(work, "io-hog")
    procs.append(subprocess.Popen(
        ["timeout", str(seconds), "sh", "-c",
         f"while :; do dd if=/dev/zero of={f} bs=64k count=256 oflag=dsync 2>/dev/null; done"]))
    return procs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20, help="live migrations (ping-pong)")
    ap.add_argument("--no-load", action="store_true")
    ap.add_argument("--watch", type=float, default=12.0,
                    help="seconds to watch the COUNT loop after each move")
    ap.add_argument("--qemu-arg", action="append", default=[])
    ap.add_argument("--kmsg", action="store_true",
                    help="copy the guest kernel's messages to its console (dmesg -n 8)")
    ap.add_argument("--live-precopy", action="store_true",
                    help="copy memory while the guest runs, as the agent did before the "
                         "fix of issue 35 (reproduces the stall)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--load-only", type=int, metavar="SECONDS",
                    help="only run the CPU and I/O hogs for SECONDS (e.g. beside the "
                         "migration kill test), then stop")
    o = ap.parse_args()
    if o.load_only:
        work = tempfile.mkdtemp(prefix="virt8ra-load.")
        loads = start_loads(work, o.load_only)
        try:
            for p in loads:
                p.wait()
        finally:
            for p in loads:
                p.terminate()
            shutil.rmtree(work, ignore_errors=True)
        return
    extra = o.qemu_arg + os.environ.get("EXTRA_QEMU_ARGS", "").split()
    base = subprocess.run(["bash", os.path.join(ROOT, "scripts/test-image.sh")],
                          check=True, capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="virt8ra-stall.")
    loads, vms = [], []
    result = {"rounds": o.rounds, "load": not o.no_load, "qemu_args": extra,
              "live_precopy": o.live_precopy, "moves": []}
    ok = True
    try:
        seed = os.path.join(work, "seed.img")
        sd = os.path.join(work, "seed.d")
        os.makedirs(sd)
        open(os.path.join(sd, "meta-data"), "w").write(
            'instance-id: "i-1"\nlocal-hostname: "phoenix"\n')
        open(os.path.join(sd, "user-data"), "w").write(
            with_kernel_log(user_data()) if o.kmsg else user_data())
        subprocess.run(["mformat", "-C", "-f", "1440", "-v", "cidata", "-i", seed, "::"], check=True)
        for f in ("meta-data", "user-data"):
            subprocess.run(["mcopy", "-i", seed, os.path.join(sd, f), "::" + f], check=True)
        src = Vm(work, "vm-0", base, seed, extra)
        vms.append(src)
        src.start()
        log(f"booting the guest in {work}")
        end = time.monotonic() + 300
        while not (counts(src.text()) and "DATA-SHA" in src.text()):
            if time.monotonic() > end:
                raise RuntimeError("the guest did not boot: " + src.text()[-2000:])
            time.sleep(0.5)
        if not o.no_load:
            loads = start_loads(work, int(o.rounds * (o.watch + 30) + 120))
        for r in range(o.rounds):
            dst = Vm(work, f"vm-{r + 1}", base, seed, extra)
            vms.append(dst)
            dst.start(incoming=True)
            t = {"round": r + 1}
            before = src.text()
            c0 = counts(before)[-1]
            u0 = uptimes(before)[-1] if uptimes(before) else None
            h0 = time.monotonic()
            migrate(src, dst, t, not o.live_precopy)
            src.stop()
            vms.remove(src)
            shutil.rmtree(src.dir, ignore_errors=True)
            time.sleep(o.watch)
            txt = dst.text()
            cs, us = counts(txt), uptimes(txt)
            t["count_before"] = c0
            t["counts_after"] = len(cs)
            t["last_count"] = cs[-1] if cs else None
            h1 = time.monotonic()
            if us and u0 is not None:
                # Guest uptime advance vs host time over the same span (the
                # guest's clock is stopped while the VM is paused).
                t["guest_advance_s"] = round(us[-1] - u0, 2)
                t["host_advance_s"] = round(h1 - h0, 2)
            clk = re.findall(r"clock=(\S+)", txt)
            t["clocksource"] = clk[-1] if clk else None
            k = re.findall(r"^WATCHK (.*)$", txt, re.M)
            t["kernel"] = k[-2:]
            # Stalled: fewer than ~2 s worth of COUNT lines in the watch
            # window, or the 1 s tick loop or the 5 s watchdog loop silent.
            t["ticks_after"] = len(us)
            t["watch_after"] = len(re.findall(r"^WATCH ", txt, re.M))
            t["stalled"] = bool(len(cs) < 20 or cs[-1] - c0 < 20 or len(us) < 5
                                or t["watch_after"] < 1)
            log(json.dumps(t))
            result["moves"].append(t)
            if t["stalled"]:
                ok = False
                keep = os.path.join(tempfile.gettempdir(), f"virt8ra-stall-console-{os.getpid()}.log")
                shutil.copy(dst.console, keep)
                result["stalled_console"] = keep
                log(f"STALL after move {r + 1}; console kept at {keep}")
                diag = diagnose(dst)
                with open(keep + ".diag.json", "w") as f:
                    json.dump(diag, f, indent=1)
                result["diagnosis"] = keep + ".diag.json"
                log("diagnosis:", {k: v for k, v in diag.items() if not k.startswith("info")})
                break
            src = dst
    finally:
        for p in loads:
            p.terminate()
        for p in loads:
            p.wait()
        for v in vms:
            v.stop()
        if o.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["passed"] = sum(1 for m in result["moves"] if not m["stalled"])
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
