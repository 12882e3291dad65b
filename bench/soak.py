#!/usr/bin/env python3
"""Soak run: one uprobed under mixed load for a while, then checks that it is still whole.

Usage: bench/soak.py UPROBED_BINARY TARGET_BINARY [SECONDS]   (root; `make soak` builds both)

TARGET_BINARY is a binary with functions g0000..g9999 (bench-batch's `many`); a private copy
is probed and replaced by rename(2) every 2 s, as a package upgrade would. Meanwhile:
3 clients register single probes and 1,000-probe globs and remove them by consumer, read
`stats` and `list`; a `watch` client comes and goes; a client sends a glob register and
vanishes without reading the reply, another sends half a line and vanishes; SIGHUP every 1.5 s.
Slot capacity is 20,000, so `capacity_exhausted` happens and must be clean.

Fails (exit 1) if a reply takes over 30 s (a hang), a reply carries an unexpected error code,
the registry, links, slots or file descriptors do not come back to where they started once
everything is removed, the log (at notice) grows by more than 5 lines per second, or SIGTERM does not stop
the daemon with status 0 within 10 s. Memory (RSS) is reported, not judged.

Runs like this found: a writer deadlock between two large registers in a row; one log line per
probe per follow event (567 MB in 60 s); registrations degraded for want of slots that never
came back; and an ELF parse cache that grew with every replacement of the binary.
"""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, random

daemon_bin, target = sys.argv[1], sys.argv[2]
duration = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
work = tempfile.mkdtemp(prefix="uprobed-soak-")
sock = work + "/s.sock"
app = work + "/app"
shutil.copy(target, app)
with open(work + "/uprobed.conf", "w") as f:
    f.write("slot_capacity = 20000\nfollow_check_ms = 250\n")
log_path = work + "/uprobed.log"
daemon = subprocess.Popen([daemon_bin, "--socket", sock, "--state-dir", work + "/state", "--pin-dir", "",
                           "--config", work + "/uprobed.conf", "--log-level", "notice"],
                          stderr=open(log_path, "w"))
failures = []
lock = threading.Lock()
counts = {}
stop = threading.Event()


def fail(what):
    with lock:
        failures.append(what)


def bump(what):
    with lock:
        counts[what] = counts.get(what, 0) + 1


def connect(timeout=30):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock)
    return s, s.makefile("rb")


def close(c):
    c[1].close()  # the file object holds the socket open too
    c[0].close()


def call(c, request):
    c[0].sendall((json.dumps(request) + "\n").encode())
    line = c[1].readline()
    if not line:
        raise EOFError("connection closed by uprobed")
    return json.loads(line)


for _ in range(400):
    try:
        close(connect())
        break
    except OSError:
        time.sleep(0.025)
else:
    sys.exit("uprobed did not start serving")
time.sleep(0.5)  # the readiness probe's connection closes


def proc(field):
    with open("/proc/%d/status" % daemon.pid) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def fds():
    return len(os.listdir("/proc/%d/fd" % daemon.pid))


def fd_targets():
    out = []
    for fd in os.listdir("/proc/%d/fd" % daemon.pid):
        try:
            out.append(os.readlink("/proc/%d/fd/%s" % (daemon.pid, fd)))
        except OSError:
            pass
    return sorted(out)


base_fds, base_targets, base_rss, peak_rss = fds(), fd_targets(), proc("VmRSS"), 0
expected_errors = {"capacity_exhausted"}


def registrar(k):
    try:
        c = connect()
        n = 0
        while not stop.is_set():
            step = n % 4
            if step == 0:
                specs = [{"path": app, "symbol": "g%04d" % random.randrange(10000)} for _ in range(5)]
                r = call(c, {"op": "register", "probes": specs, "consumer": "w%d" % k})
            elif step == 1:
                r = call(c, {"op": "register", "probes": [{"path": app, "symbol": "g%d*" % random.randrange(10)}],
                             "consumer": "w%d" % k})
            elif step == 2:
                r = call(c, {"op": "stats", "consumer": "w%d" % k})
                if r.get("ok"):
                    r = call(c, {"op": "list", "consumer": "w%d" % k})
            else:
                r = call(c, {"op": "unregister", "consumer": "w%d" % k})
            if not r.get("ok") and r.get("error", {}).get("code") not in expected_errors:
                fail("client %d: %s" % (k, r))
            bump("requests")
            n += 1
    except Exception as e:  # a timeout is a hang
        fail("client %d: %r" % (k, e))


def watcher():
    while not stop.is_set():
        try:
            c = connect()
            c[0].sendall(b'{"op":"watch","interval_ms":100}\n')
            for _ in range(3):
                if not json.loads(c[1].readline()).get("ok"):
                    fail("watch event not ok")
            close(c)
            bump("watches")
        except Exception as e:
            fail("watch: %r" % e)


def vanisher():
    while not stop.is_set():
        try:
            c = connect()
            c[0].sendall(json.dumps({"op": "register", "consumer": "ghost",
                                     "probes": [{"path": app, "symbol": "g1*"}]}).encode() + b"\n")
            close(c)
            c = connect()
            c[0].sendall(b'{"op":"regis')
            close(c)
            c = connect()
            r = call(c, {"op": "unregister", "consumer": "ghost"})
            close(c)
            if not r.get("ok"):
                fail("unregister ghost: %s" % r)
            bump("vanished")
            time.sleep(0.05)
        except Exception as e:
            fail("vanisher: %r" % e)


def upgrader():
    while not stop.wait(2.0):
        shutil.copy(target, app + ".new")
        os.rename(app + ".new", app)
        bump("replacements")


def reloader():
    while not stop.wait(1.5):
        os.kill(daemon.pid, signal.SIGHUP)
        bump("reloads")


# SOAK_LOAD=registrar,watcher,... runs only those (to find which load a leak comes with).
only = set(filter(None, os.environ.get("SOAK_LOAD", "").split(",")))
threads = [threading.Thread(target=registrar, args=(k,)) for k in range(3) if not only or "registrar" in only]
threads += [threading.Thread(target=f) for f in (watcher, vanisher, upgrader, reloader) if not only or f.__name__ in only]
start = time.time()
for t in threads:
    t.start()
while time.time() - start < duration:
    time.sleep(min(5.0, duration / 6))
    peak_rss = max(peak_rss, proc("VmRSS"))
    print("t=%3.0fs rss=%d MB fds=%d %s failures=%d" % (time.time() - start, proc("VmRSS") // 1024, fds(),
                                                        dict(counts), len(failures)), flush=True)
stop.set()
for t in threads:
    t.join(60)
    if t.is_alive():
        fail("a load thread did not finish: a request hangs")
elapsed = time.time() - start

# Everything removed: the registry, links, slots and descriptors come back.
c = connect()
for consumer in ["w0", "w1", "w2", "ghost"]:
    call(c, {"op": "unregister", "consumer": consumer})
status = {}
for _ in range(200):
    status = call(c, {"op": "status"})
    if (status["probes"], status["links"], status["slots_in_use"], status["batching"]["pending_removals"]) == (0, 0, 0, 0):
        break
    time.sleep(0.05)
else:
    fail("not back to empty: %s" % {k: status.get(k) for k in ("probes", "links", "slots_in_use")})
close(c)
for _ in range(100):
    if fds() <= base_fds:
        break
    time.sleep(0.05)
else:
    extra = list(fd_targets())
    for t in base_targets:
        if t in extra:
            extra.remove(t)
    fail("file descriptors: %d at the start, %d at the end; new: %s" % (base_fds, fds(), extra))
end_rss = proc("VmRSS")
with open(log_path) as f:
    log_lines = sum(1 for _ in f)
if log_lines > 5 * elapsed:  # notice and above: reloads, follow outcomes; not one line per probe
    fail("log: %d lines in %.0f s" % (log_lines, elapsed))

t0 = time.time()
daemon.send_signal(signal.SIGTERM)
try:
    rc = daemon.wait(10)
    if rc != 0:
        fail("exit status %d after SIGTERM" % rc)
except subprocess.TimeoutExpired:
    fail("did not stop within 10 s of SIGTERM")
    daemon.kill()
stopped = time.time() - t0

print("soak: %.0f s, %s; RSS %d MB at the start, %d MB at the peak, %d MB once empty; fds %d at the start;"
      " log %d lines; stopped in %.2f s" % (elapsed, dict(counts), base_rss // 1024, peak_rss // 1024,
                                           end_rss // 1024, base_fds, log_lines, stopped))
if failures:
    print("FAILED (%d):" % len(failures))
    for f in failures[:20]:
        print("  " + f)
    print("work dir kept: " + work)
    sys.exit(1)
shutil.rmtree(work, ignore_errors=True)
print("ok")
