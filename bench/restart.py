#!/usr/bin/python3
"""Restart benchmark: time from exec to READY=1 for a daemon with N registrations, when it adopts
N pinned probes versus when it attaches them all again (pins removed first), next to an empty
daemon's start (the floor every start pays: process, config, state files, socket).

    bench/restart.py [--runs 3] [--uprobed .build/release/uprobed] [N ...]

N is a number of probes: 10000 probes one function each of a generated C binary; "latency10000"
the same as latency probes (uprobe session links, a histogram row each); "frontend" (or any N
above 200000) globs every function of the Swift toolchain's swift-frontend (~241,000 sites)
with the limits raised in the daemon's config (a private copy of the file: probing the
toolchain's own file would trap every compiler on the machine). A "-mapped" suffix
("frontend-mapped") keeps processes (`--mappers`, 1) mapping the binary executable during the
starts, as running programs do: attaching must then write every breakpoint into it, adopting writes
none. Root, Linux >= 6.8 with uprobe_multi (6.13 for latency). Prints one table; each cell is
the median of the runs and their min-max.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frontend_path():
    swift = shutil.which("swift")
    if not swift:
        sys.exit("no swift on PATH")
    return os.path.join(os.path.dirname(os.path.realpath(swift)), "swift-frontend")


def many_functions(work, n):
    """A C binary with n probeable functions f0..f{n-1} (one call site each, so none is inlined away)."""
    src = os.path.join(work, "many.c")
    with open(src, "w") as f:
        for i in range(n):
            f.write("__attribute__((noinline, used)) int f%d(int x) { return x + %d; }\n" % (i, i))
        f.write("int main(void) { return 0; }\n")
    binary = os.path.join(work, "many")
    subprocess.run(["gcc", "-O1", "-o", binary, src], check=True)
    return binary


class Daemon:
    """One uprobed run: started with a NOTIFY_SOCKET the benchmark owns, timed from exec to READY=1."""

    def __init__(self, exe, work, pin_dir, config):
        self.exe, self.work, self.pin_dir, self.config = exe, work, pin_dir, config
        self.sock = os.path.join(work, "uprobed.sock")

    def start(self):
        notify = os.path.join(self.work, "notify.sock")
        if os.path.exists(notify):
            os.unlink(notify)
        n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        n.bind(notify)
        n.settimeout(900)
        env = dict(os.environ, NOTIFY_SOCKET=notify)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([self.exe, "--socket", self.sock, "--state-dir", os.path.join(self.work, "state"),
                                      "--pin-dir", self.pin_dir, "--config", self.config, "--log-level", "notice"],
                                     env=env, stderr=open(os.path.join(self.work, "uprobed.log"), "a"))
        while True:
            msg = n.recv(65536).decode()
            if "READY=1" in msg.split("\n"):
                ready = time.monotonic() - t0
                break
        n.close()
        return ready

    def call(self, request):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.sock)
        f = s.makefile("rwb")
        f.write((json.dumps(request) + "\n").encode())
        f.flush()
        reply = json.loads(f.readline())
        s.close()
        if not reply.get("ok"):
            sys.exit("request failed: %s" % json.dumps(reply)[:500])
        return reply

    def kill(self):
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(600) != 0:
            sys.exit("uprobed exited with %d; see %s/uprobed.log" % (self.proc.returncode, self.work))


def remove_pins(exe, pin_dir, config):
    subprocess.run([exe, "--remove-pins", "--pin-dir", pin_dir, "--config", config], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cell(xs):
    return "%.3f s (%.3f-%.3f)" % (statistics.median(xs), min(xs), max(xs))


def measure(exe, size, runs, mappers):
    work = tempfile.mkdtemp(prefix="uprobed-restart-bench-")
    pin_dir = "/sys/fs/bpf/uprobed-bench-%d" % os.getpid()
    config = os.path.join(work, "uprobed.conf")
    d = None
    mapper = None
    try:
        mapped = size.endswith("-mapped")
        base = size[:-len("-mapped")] if mapped else size
        latency = base.startswith("latency")
        if base == "frontend":
            binary, symbol = os.path.join(work, "swift-frontend"), "*"
            shutil.copy(frontend_path(), binary)
        else:
            binary, symbol = many_functions(work, int(base[len("latency"):] if latency else base)), "f*"
        if mapped:
            # An executable mapping is what uprobes install breakpoints into (a process running it).
            mapper = [subprocess.Popen([sys.executable, "-c", "import mmap,sys,time\n"
                                       "f = open(sys.argv[1], 'rb')\n"
                                       "m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)\n"
                                       "time.sleep(86400)", binary]) for _ in range(mappers)]
        with open(config, "w") as f:
            f.write("slot_capacity = 524288\nmax_glob_matches = 1000000\nmax_probes_per_request = 1000000\nmax_line_bytes = 268435456\n"
                    "state_checkpoint_s = 0\nlog_level = notice\n")
        d = Daemon(exe, work, pin_dir, config)
        empty = []
        for _ in range(runs):
            empty.append(d.start())
            d.stop()
        d.start()
        t0 = time.monotonic()
        spec = {"path": binary, "symbol": symbol}
        if latency:
            spec["latency"] = True
        reply = d.call({"op": "register", "probes": [spec]})
        register = time.monotonic() - t0
        probes = reply["count"] if reply.get("reply") == "compact" else len(reply["probes"])
        links = d.call({"op": "status"})["links"]
        d.stop()
        adopt, adopt_us, again = [], [], []
        for _ in range(runs):
            adopt.append(d.start())
            pins = d.call({"op": "status"})["pins"]
            if pins["adopted_probes"] != probes or pins["rebuilt_probes"] != 0:
                sys.exit("not adopted: %s" % pins)
            adopt_us.append(pins["reconcile_us"] / 1e6)
            d.stop()
        for _ in range(runs):
            remove_pins(exe, pin_dir, config)
            again.append(d.start())
            pins = d.call({"op": "status"})["pins"]
            if pins["rebuilt_probes"] != probes:
                sys.exit("not attached again: %s" % pins)
            d.stop()
        return dict(size=size, latency=latency, mapped=mappers if mapped else 0, probes=probes, links=links, register=register, empty=empty, adopt=adopt,
                    adopt_reconcile=adopt_us, again=again)
    finally:
        for m in mapper or []:
            m.kill()
            m.wait()
        if d:
            d.kill()  # a failed request exits with the daemon still running
        try:
            remove_pins(exe, pin_dir, config)
        except Exception:
            pass
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--uprobed", default=os.path.join(REPO, ".build/release/uprobed"))
    ap.add_argument("--mappers", type=int, default=1, help="processes mapping the binary for -mapped sizes")
    ap.add_argument("sizes", nargs="*", default=["10000", "frontend"])
    args = ap.parse_args()
    if not os.access(args.uprobed, os.X_OK):
        sys.exit("%s not built (swift build -c release --product uprobed)" % args.uprobed)
    rows = [measure(args.uprobed, s if not s.isdigit() or int(s) <= 200000 else "frontend", args.runs, args.mappers) for s in args.sizes]
    print("uprobed restart, exec to READY=1 (%d runs each: median (min-max)); %s" % (args.runs, os.path.basename(args.uprobed)))
    print("| probes | links | empty daemon (floor) | adopt pinned | attach again | attach again / adopt | adopt / floor | adopt's reconcile | first register |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        adopt, again, floor = statistics.median(r["adopt"]), statistics.median(r["again"]), statistics.median(r["empty"])
        print("| %s | %d | %s | %s | %s | %.1fx | %.1fx | %.3f s | %.3f s |" % (
            "{:,}".format(r["probes"]) + (" latency" if r["latency"] else "") + (", mapped by %d" % r["mapped"] if r["mapped"] else ""), r["links"], cell(r["empty"]), cell(r["adopt"]), cell(r["again"]), again / adopt,
            adopt / floor, statistics.median(r["adopt_reconcile"]), r["register"]))


if __name__ == "__main__":
    main()
