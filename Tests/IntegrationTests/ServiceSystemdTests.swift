import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// The systemd protocols without systemd as PID 1: a test-owned NOTIFY_SOCKET, and
/// systemd-socket-activate for socket activation.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ServiceSystemdTests {
    @Test("sd_notify: READY=1 only once the socket serves, STATUS lines, WATCHDOG=1 at half WATCHDOG_USEC, RELOADING/READY on SIGHUP, STOPPING=1 on SIGTERM, exit 0 with state saved")
    func notifyProtocol() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let notify = try NotifyListener(path: dir + "/notify.sock", controlSocket: dir + "/uprobed.sock")
        defer { notify.close() }
        let target = try ServicePersistenceTests.target(in: dir)
        // A first run leaves a registration so the second start has something to restore first.
        let first = try ServiceDaemon(dir: dir)
        _ = try first.register([spec(target, symbol: "fn_a")])
        #expect(first.stop() == 0)

        // 400 ms watchdog: pings expected every ~200 ms. WATCHDOG_PID is left out: the pid is
        // not known before the spawn, and sd_watchdog_enabled accepts its absence.
        let d = try ServiceDaemon(dir: dir, environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"],
                                  waitServing: false)
        #expect(notify.wait(for: "READY=1"), "no READY=1; got \(notify.all)\n\(d.log)")
        #expect(notify.servingAtReady == [true], "READY=1 came before the socket accepted connections")
        // The restore status precedes readiness.
        let all = notify.all
        let restoring = all.firstIndex { $0.contains("STATUS=restoring 1 registrations") }
        let ready = all.firstIndex { $0.split(separator: "\n").contains("READY=1") }
        if let restoring, let ready { #expect(restoring < ready, "\(all)") } else { Issue.record("missing restore STATUS or READY: \(all)") }
        #expect(all.contains { $0.contains("STATUS=serving on") })
        #expect(notify.wait(for: "WATCHDOG=1", count: 4, seconds: 5), "watchdog pings too slow: \(notify.all)")
        #expect(notify.all.contains { $0.contains("WATCHDOG=1") && $0.contains("STATUS=1 probes") })

        kill(d.pid, SIGHUP)
        #expect(notify.wait(for: "RELOADING=1"))
        #expect(notify.wait(for: "MONOTONIC_USEC="))
        #expect(notify.wait(for: "READY=1", count: 2))
        #expect(try d.call(["op": "status"])["ok"] == .bool(true))

        try? FileManager.default.removeItem(atPath: dir + "/state/state.json")
        kill(d.pid, SIGTERM)
        #expect(notify.wait(for: "STOPPING=1"))
        #expect(d.waitExit() == 0)
        #expect(FileManager.default.fileExists(atPath: dir + "/state/state.json"), "state not saved at stop")
    }

    @Test("send_buffer_bytes: each connection's send buffer on the daemon's side is what the kernel grants for it (ss -x -m); 0 keeps the kernel's default")
    func sendBuffer() throws {
        func readInt(_ path: String) throws -> Int {
            guard let n = Int(try String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)) else {
                throw TestFailure("cannot read \(path)")
            }
            return n
        }
        let wmemMax = try readInt("/proc/sys/net/core/wmem_max"), wmemDefault = try readInt("/proc/sys/net/core/wmem_default")
        // The kernel doubles a granted SO_SNDBUF (bookkeeping overhead) and caps the request at wmem_max.
        for (asked, expected) in [(1_048_576, 2 * min(1_048_576, wmemMax)), (0, wmemDefault)] {
            let d = try TestDaemon(config: "send_buffer_bytes = \(asked)\n")
            let c = try d.client()
            _ = try c.call(["op": "status"])  // accepted, and its options set before the first read
            let ss = try run(["/bin/ss", "-x", "-m", "-p", "-n"])
            let pid = d.process.processIdentifier
            // The daemon's end of the connection: listed under its socket path and its pid.
            let mine = ss.out.split(separator: "\n").filter {
                $0.contains("ESTAB") && $0.contains(d.socket) && $0.contains("pid=\(pid),")
            }
            #expect(mine.count == 1, "\(ss.out)")
            let granted = mine.first.flatMap { line in
                line.firstRange(of: /tb(\d+)/).flatMap { Int(line[$0].dropFirst(2)) }
            }
            #expect(granted == expected, "send_buffer_bytes = \(asked): \(mine)")
            withExtendedLifetime(c) {}
        }
    }

    @Test("file descriptors: the daemon raises its soft RLIMIT_NOFILE to the hard limit, and warns at start when connections and links would have too few")
    func fileLimit() throws {
        /// The daemon's "Max open files" soft and hard limits from /proc/PID/limits.
        func limits(_ d: TestDaemon) throws -> [String] {
            let text = try String(contentsOfFile: "/proc/\(d.process.processIdentifier)/limits", encoding: .utf8)
            let line = text.split(separator: "\n").first { $0.hasPrefix("Max open files") } ?? ""
            return line.split(separator: " ").dropFirst(3).prefix(2).map(String.init)
        }
        let raised = try TestDaemon(launcher: ["/usr/bin/prlimit", "--nofile=256:8192"])
        #expect(try limits(raised) == ["8192", "8192"])
        #expect(!raised.log.contains("few file descriptors"))
        #expect(try raised.status()["ok"] == .bool(true))

        let tight = try TestDaemon(config: "max_connections = 100\n", launcher: ["/usr/bin/prlimit", "--nofile=1024:1024"])
        #expect(try limits(tight) == ["1024", "1024"])
        #expect(tight.log.contains("few file descriptors"), "\(tight.log)")
        #expect(try tight.status()["ok"] == .bool(true), "it warns but serves")
    }

    @Test("socket activation: the daemon serves on the fd systemd-socket-activate passes and binds nothing itself")
    func socketActivation() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let activated = dir + "/activated.sock"
        let d = try ServiceDaemon(dir: dir, launcher: ["/usr/bin/systemd-socket-activate", "-l", activated],
                                  socket: activated, waitServing: false)
        // The launcher listens first, then execs uprobed on the first connection.
        var client: LineClient? = nil
        let deadline = Date().addingTimeInterval(20)
        while client == nil && Date() < deadline {
            client = try? LineClient(socketPath: activated, timeoutSeconds: 30)
            if client == nil { usleep(20_000) }
        }
        guard let client else { Issue.record("no listener on \(activated): \(d.log)"); return }
        let reply = try client.call(["op": "status", "id": 1]).objectValue
        #expect(reply?["ok"] == .bool(true), "\(String(describing: reply)) \(d.log)")
        #expect(d.log.contains("socket-activated fd 3"), "\(d.log)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/uprobed.sock"), "the daemon bound its own socket too")
        #expect(d.stop() == 0)
    }

    @Test("SIGHUP: a bad config is refused with a clear log line and the old policy stays; a good one applies")
    func sighupReload() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let base = "socket_mode = 0666\n"
        let d = try ServiceDaemon(dir: dir, config: base + "read_uids = \(user.uid)\n")
        func statusAsUser() throws -> JSONObject {
            try callAsUser(uid: user.uid, gid: user.gid, socket: d.socket, [["op": "status"]])[0]
        }
        #expect(try statusAsUser()["ok"] == .bool(true))

        try (base + "read_uids = \(user.uid)\nslot_capacity = lots\n").write(toFile: d.configPath, atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        #expect(waitForLog(d, "config reload refused"), "\(d.log)")
        #expect(d.log.contains("slot_capacity"))
        #expect(try statusAsUser()["ok"] == .bool(true), "the old policy must stay in force")

        try (base + "read_uids = root\n").write(toFile: d.configPath, atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        #expect(waitForLog(d, "config reloaded"), "\(d.log)")
        let denied = try statusAsUser()
        #expect(errorCode(denied) == "permission_denied", "\(denied)")
        let status = try d.call(["op": "status"])
        #expect(status["service"]?.objectValue?["config_reloads"] == .int(1))
        #expect(status["service"]?.objectValue?["config_reload_failures"] == .int(1))
        #expect(d.stop() == 0)
    }
}

extension ServiceSystemdTests {
    @Test("journald: under a journal stream, entries carry PRIORITY, MESSAGE and fields PROBE_ID, PATH, CONSUMER, ERROR_CODE, PEER_UID (a private systemd-journald in its own mount namespace)")
    func journaldFields() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        let uprobed = try Paths.product("uprobed")
        // journald and everything it writes live on tmpfs mounts that exist only in this
        // namespace; they vanish with it. JOURNAL_STREAM names the daemon's stderr file, which
        // is what tells uprobed it runs under systemd with the journal as stderr.
        // Written to a file and run by bash: no shell quoting games in a Swift literal. Every
        // background process is killed on exit, whatever fails.
        let script = #"""
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/log && mount -t tmpfs tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
/lib/systemd/systemd-journald > "$D/journald.out" 2>&1 &
JP=$!
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
: > "$D/err"
JOURNAL_STREAM=$(stat -c '%d:%i' "$D/err") "$U" --socket "$D/j.sock" --state-dir "$D/state" --pin-dir "" --config /dev/null 2>>"$D/err" </dev/null >/dev/null &
UP=$!
trap 'kill $UP $JP 2>/dev/null' EXIT
trap 'kill $UP $JP 2>/dev/null; exit 1' TERM INT
for i in $(seq 200); do [ -S "$D/j.sock" ] && break; sleep 0.05; done
python3 - "$D/j.sock" "$T" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
for spec in ({"path": sys.argv[2], "symbol": "fn_a"}, {"path": sys.argv[2], "symbol": "no_such_fn"}):
    f.write((json.dumps({"op": "register", "consumer": "journal-test", "probes": [spec]}) + "\n").encode()); f.flush()
    f.readline()
PY
kill -TERM $UP; wait $UP
journalctl --no-pager -o verbose SYSLOG_IDENTIFIER=uprobed
kill $JP; wait $JP
exit 0
"""#
        try script.write(toFile: dir + "/journal.sh", atomically: true, encoding: .utf8)
        let r = try run(["/usr/bin/timeout", "120", "/usr/bin/unshare", "-m", "--propagation", "private", "/bin/bash", dir + "/journal.sh"],
                        environment: ["D": dir, "U": uprobed, "T": target, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"])
        #expect(r.status == 0, "\(r.err)")
        let out = r.out
        #expect(out.contains("MESSAGE=probes registered"), "\(out.prefix(3000)) \(r.err)")
        #expect(out.contains("PROBE_ID=p1"))
        #expect(out.contains("COUNT=1"))
        #expect(out.contains("PATH=\(target)"))
        #expect(out.contains("CONSUMER=journal-test"))
        #expect(out.contains("PEER_UID=0"))
        #expect(out.contains("ERROR_CODE=symbol_not_found"))
        #expect(out.contains("PRIORITY=6") && out.contains("PRIORITY=5"))
        #expect(out.contains("MESSAGE=uprobed serving"))
        // Nothing fell back to the stderr stream.
        let err = (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? ""
        #expect(!err.contains("probes registered"), "\(err)")
    }
}

func waitForLog(_ d: ServiceDaemon, _ text: String, seconds: Double = 10) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if d.log.contains(text) { return true }
        usleep(20_000)
    }
    return false
}
