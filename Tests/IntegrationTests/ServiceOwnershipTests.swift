import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// A registrant's `pid` probe holds only while the process is the registrant's: a process of
/// the test user registers a probe on itself (through the user's own connection), counts an
/// exact number of calls, then execs a setuid-root (or file-capability) copy of itself that
/// calls the same library function in a loop. The probe must end with a reason, promptly, and
/// stop counting; a plain exec must not end it; a restart must neither revive an ended probe
/// nor revive one whose process turned privileged while the daemon was down.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ServiceOwnershipTests {
    /// Calls the fixture makes before its exec: all of them must be counted, exactly.
    static let before = 25
    /// How long the probe may take to end after the exec (generous for a loaded machine:
    /// measured, it takes a few milliseconds).
    static let bound = 3.0

    /// The fixtures, built in the test's own directory (world-searchable, on a filesystem
    /// mounted without nosuid): `libowned.so` (owned_fn), `privexec` linked against it, and
    /// copies of `privexec` that gain privileges when exec'd.
    struct Built {
        let lib: String
        let plain: String
        let setuid: String
        let capped: String
    }

    static func build(in dir: String) throws -> Built {
        var fs = statvfs()
        guard statvfs(dir, &fs) == 0, fs.f_flag & UInt(ST_NOSUID) == 0 else {
            throw TestFailure("\(dir) is on a nosuid mount: a setuid binary there gains nothing, so the test would prove nothing")
        }
        let src = Paths.repo.appendingPathComponent("Tests/Fixtures/privexec").path
        let b = Built(lib: dir + "/libowned.so", plain: dir + "/privexec", setuid: dir + "/privexec-setuid",
                      capped: dir + "/privexec-caps")
        for argv in [["/usr/bin/gcc", "-O1", "-g", "-shared", "-fPIC", "-o", b.lib, src + "/owned.c"],
                     ["/usr/bin/gcc", "-O1", "-g", "-o", b.plain, src + "/privexec.c", "-L" + dir, "-lowned", "-Wl,-rpath," + dir]] {
            let r = try run(argv)
            guard r.status == 0 else { throw TestFailure("\(argv.joined(separator: " ")) failed: \(r.err)") }
        }
        try FileManager.default.copyItem(atPath: b.plain, toPath: b.setuid)
        try FileManager.default.copyItem(atPath: b.plain, toPath: b.capped)
        for p in [b.lib, b.plain, b.capped] { chmod(p, 0o755) }
        guard chown(b.setuid, 0, 0) == 0, chmod(b.setuid, 0o4755) == 0 else { throw TestFailure("chown/chmod of \(b.setuid): errno \(errno)") }
        let cap = try run(["/usr/sbin/setcap", "cap_net_raw+p", b.capped])
        guard cap.status == 0 else { throw TestFailure("setcap failed: \(cap.err)") }
        return b
    }

    /// A `privexec run` process of the test user, driven line by line.
    final class UserProcess {
        let process = Process()
        let input = Pipe(), output = Pipe()
        private var buffered = [UInt8]()
        private(set) var pid: Int32 = 0

        init(_ user: (uid: UInt32, gid: UInt32), _ built: Built, execs next: String) throws {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = ["--reuid=\(user.uid)", "--regid=\(user.gid)", "--clear-groups", "--",
                                 built.plain, "run", "\(ServiceOwnershipTests.before)", next]
            process.standardInput = input
            process.standardOutput = output
            try process.run()
            guard let p = Int32(try line()) else { throw TestFailure("no pid from the user's process") }
            pid = p
        }

        /// The next line it prints (20 s at most).
        func line() throws -> String {
            let fd = output.fileHandleForReading.fileDescriptor
            let deadline = Date().addingTimeInterval(20)
            while true {
                if let nl = buffered.firstIndex(of: 0x0A) {
                    defer { buffered.removeSubrange(...nl) }
                    return String(decoding: buffered[..<nl], as: UTF8.self)
                }
                var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let left = Int32(max(0, deadline.timeIntervalSinceNow) * 1000)
                guard left > 0, poll(&pfd, 1, left) > 0 else { throw TestFailure("the user's process printed no line in 20 s") }
                var chunk = [UInt8](repeating: 0, count: 4096)
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                guard n > 0 else { throw TestFailure("the user's process closed its output") }
                buffered += chunk[..<n]
            }
        }

        func send(_ text: String) { input.fileHandleForWriting.write(Data((text + "\n").utf8)) }

        /// Ends it, whatever it runs as now (the test is root).
        func kill() {
            if process.isRunning { Glibc.kill(pid, SIGKILL) }
            process.waitUntilExit()
        }

        deinit { kill() }
    }

    static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static let config = """
        socket_mode = 0666
        register_uids = \(TestUser.name)
        """

    /// Starts the user's process, registers its probe as the user, runs the exact calls and
    /// checks they were all counted. Returns the process and the probe id.
    static func registered(_ d: ServiceDaemon, _ user: (uid: UInt32, gid: UInt32), _ built: Built,
                           execs next: String) throws -> (UserProcess, String) {
        let p = try UserProcess(user, built, execs: next)
        let replies = try callAsUser(uid: user.uid, gid: user.gid, socket: d.socket, [
            ["op": "register", "probes": [spec(built.lib, symbol: "owned_fn", pid: p.pid)], "consumer": "own"],
        ])
        guard let id = replies.first?["probes"]?.arrayValue?.first?.objectValue?["id"]?.stringValue else {
            throw TestFailure("register as uid \(user.uid) failed: \(replies)")
        }
        p.send("go")
        #expect(try p.line() == "ran")
        #expect(try d.hits([id])[id] == UInt64(before), "every call before the exec is counted")
        return (p, id)
    }

    /// Polls `list` until `id` is ended (or `bound` passes); the entry and when it was seen.
    static func waitEnded(_ d: ServiceDaemon, _ id: String) throws -> (entry: JSONObject?, seenAt: UInt64) {
        let deadline = Date().addingTimeInterval(bound)
        while Date() < deadline {
            if let e = try d.list()[id], e["state"]?.stringValue == "ended" { return (e, monotonicNanos()) }
            usleep(2_000)
        }
        return (nil, monotonicNanos())
    }

    @Test("a setuid-root or file-capability exec ends the registrant's probe within the bound, with a reason; hits stop; list, stats and the log say so; a crash and restart keep it ended",
          arguments: ["setuid", "file capabilities"])
    func privilegedExecEndsProbe(kind: String) throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let built = try Self.build(in: dir)
        let next = kind == "setuid" ? built.setuid : built.capped
        var d = try ServiceDaemon(dir: dir, config: Self.config)
        let (p, id) = try Self.registered(d, user, built, execs: next)
        defer { p.kill() }

        p.send("exec")
        let execLine = try p.line()
        guard execLine.hasPrefix("exec_at "), let execAt = UInt64(execLine.dropFirst(8)) else {
            Issue.record("unexpected line: \(execLine)")
            return
        }
        // The new image runs with the privileges (else the test would prove nothing).
        #expect(try p.line() == "euid \(kind == "setuid" ? 0 : user.uid)")

        let (entry, seenAt) = try Self.waitEnded(d, id)
        guard let entry else {
            Issue.record("the probe did not end within \(Self.bound) s of the exec: \(String(describing: try d.list()[id]))")
            return
        }
        let reason = entry["reason"]?.stringValue ?? ""
        #expect(reason.contains("process \(p.pid) is no longer uid \(user.uid)'s"), "\(reason)")
        #expect(reason.contains("hits up to then are kept"), "\(reason)")
        if kind == "setuid" {
            #expect(reason.contains("setuid") && reason.contains("uids \(user.uid) 0 0 0"), "\(reason)")
        } else {
            #expect(reason.contains("file-capability") && reason.contains("CapPrm 0000000000002000"), "\(reason)")
        }
        // Hits: all before the exec, and none once it ended (the loop calls owned_fn every 100 us).
        let atEnd = try d.hits([id])[id] ?? 0
        #expect(atEnd >= UInt64(Self.before))
        usleep(300_000)
        #expect(try d.hits([id])[id] == atEnd, "hits must stop growing once the probe ended")
        let stats = try d.call(["op": "stats", "probes": [.string(id)]])
        #expect(stats["stats"]?.arrayValue?.first?.objectValue?["state"]?.stringValue == "ended", "\(stats)")
        #expect(waitForLog(d, "probe ended: its process is no longer its owner's"), "\(d.log)")
        #expect(d.log.contains("probe_id=\(id)") && d.log.contains("error_code=process_not_owned"), "\(d.log)")
        let window = Double(seenAt &- execAt) / 1e6
        let logged = d.log.split(separator: "\n").first { $0.contains("exec_to_end_us=") }.map(String.init) ?? "none"
        print("ownership window (\(kind)): ended \(String(format: "%.1f", window)) ms after the exec as seen by list polling; \(atEnd &- UInt64(Self.before)) hits after the exec; daemon: \(logged)")

        // A restart keeps it ended, with its reason and hits, while the process still runs
        // privileged. SIGKILL: no final save, so the end itself must have been saved.
        d.kill9()
        d = try ServiceDaemon(dir: dir, config: Self.config)
        let again = try d.list()[id]
        #expect(again?["state"]?.stringValue == "ended" && again?["reason"]?.stringValue == reason, "\(String(describing: again))")
        #expect(try d.hits([id])[id] == atEnd)
        usleep(200_000)
        #expect(try d.hits([id])[id] == atEnd)
        #expect(p.process.isRunning, "the privileged loop still runs")
        #expect(d.stop() == 0)
    }

    @Test("negative control: a plain exec (no privilege gained) keeps the probe counting")
    func plainExecKeepsCounting() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let built = try Self.build(in: dir)
        let d = try ServiceDaemon(dir: dir, config: Self.config)
        let (p, id) = try Self.registered(d, user, built, execs: built.plain)
        defer { p.kill() }
        p.send("exec")
        #expect(try p.line().hasPrefix("exec_at "))
        #expect(try p.line() == "euid \(user.uid)")
        // Ten times the periodic check and more than the bound: still active, and counting.
        usleep(UInt32(Self.bound * 1_000_000))
        let entry = try d.list()[id]
        #expect(entry?["state"] == nil, "still active: \(String(describing: entry))")
        let h1 = try d.hits([id])[id] ?? 0
        #expect(h1 > UInt64(Self.before) + 100, "the exec'd image is counted: \(h1)")
        usleep(200_000)
        #expect((try d.hits([id])[id] ?? 0) > h1)
        #expect(!d.log.contains("no longer its owner's"))
        #expect(d.stop() == 0)
    }

    @Test("a restart does not revive a probe whose process turned privileged while the daemon was down")
    func restoreChecksOwnership() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let built = try Self.build(in: dir)
        var d = try ServiceDaemon(dir: dir, config: Self.config)
        let (p, id) = try Self.registered(d, user, built, execs: built.setuid)
        defer { p.kill() }
        #expect(d.stop() == 0)  // saved as active, with its hits
        p.send("exec")
        #expect(try p.line().hasPrefix("exec_at "))
        #expect(try p.line() == "euid 0")
        d = try ServiceDaemon(dir: dir, config: Self.config)
        let entry = try d.list()[id]
        #expect(entry?["state"]?.stringValue == "ended", "\(String(describing: entry))")
        let reason = entry?["reason"]?.stringValue ?? ""
        #expect(reason.contains("process \(p.pid) is no longer uid \(user.uid)'s") && reason.contains("restarted"), "\(reason)")
        let h = try d.hits([id])[id]
        #expect(h == UInt64(Self.before), "only the calls before the exec: \(String(describing: h))")
        usleep(300_000)
        #expect(try d.hits([id])[id] == h)
        #expect(d.log.contains("probe ended: its process is no longer its owner's") && d.log.contains("probe_id=\(id)"), "\(d.log)")
        #expect(d.stop() == 0)
    }
}
