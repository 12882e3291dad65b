import Foundation
import Testing

/// Test daemons pin under /sys/fs/bpf/uprobed-test/NAME, NAME being their test directory's
/// name in the temporary directory. A test process that crashes or is killed skips its
/// cleanup (`removeServiceDir`, `TestDaemon.stop`) and leaves those pins behind, their links
/// attached: every later run of the binary would pay a uprobe hit per call. So the first test
/// daemon of each test process removes the pins whose test process is gone:
/// - each test directory names its owner in `.owner` (pid and start time, so a reused pid is
///   not taken for it), written when the directory is made;
/// - a pin directory is left alone while a daemon holds its flock (it is running), while its
///   owner lives, and when its test directory exists without an owner file (a test support
///   that writes none: it cannot be told apart from a live one);
/// - with no test directory at all, it is removed once it is older than `orphanAge` (a test
///   running with another TMPDIR may be between two daemons).
enum StaleTestPins {
    static let root = "/sys/fs/bpf/uprobed-test"
    static let ownerFile = ".owner"
    static let orphanAge: TimeInterval = 600

    /// Removed once per test process, before its first daemon starts.
    static let sweptOnce: [String] = sweep()

    /// Names `dir`'s owner: this process.
    static func markOwner(_ dir: String) {
        let me = getpid()
        try? "\(me) \(startTime(me) ?? 0)\n".write(toFile: dir + "/" + ownerFile, atomically: true, encoding: .utf8)
    }

    /// Removes stale pin directories under `root`; returns their paths.
    static func sweep(root: String = root, tmp: String = NSTemporaryDirectory()) -> [String] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: root) else { return [] }
        var removed: [String] = []
        for name in names {
            let pins = root + "/" + name
            let testDir = (tmp.hasSuffix("/") ? tmp : tmp + "/") + name
            guard !inUse(pins) else { continue }
            if FileManager.default.fileExists(atPath: testDir) {
                guard let owner = try? String(contentsOfFile: testDir + "/" + ownerFile, encoding: .utf8) else { continue }
                let f = owner.split(whereSeparator: \.isWhitespace)
                guard f.count == 2, let pid = Int32(f[0]), let start = UInt64(f[1]) else { continue }
                if startTime(pid) == start { continue }  // its test process still runs
            } else {
                let changed = (try? FileManager.default.attributesOfItem(atPath: pins)[.modificationDate] as? Date) ?? Date()
                guard Date().timeIntervalSince(changed) > orphanAge else { continue }
            }
            removePins(pins)
            if !FileManager.default.fileExists(atPath: pins) { removed.append(pins) }
        }
        return removed
    }

    /// Whether a daemon holds the pin directory's lock (see `PinDirectory`).
    static func inUse(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 { return true }
        flock(fd, LOCK_UN)
        return false
    }

    /// Field 22 of /proc/PID/stat (clock ticks after boot), nil if there is no such process.
    static func startTime(_ pid: Int32) -> UInt64? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 19 ? UInt64(fields[19]) : nil
    }
}

@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct StaleTestPinsTests {
    @Test("pins left by a test process that died are removed (its link detached); a live owner's, a running daemon's and an unowned test dir's are kept")
    func sweepsOnlyTheDead() throws {
        // A test dir whose owner is a process that has exited, and one of ours.
        let dead = try ServiceDaemon.makeDir(), live = try ServiceDaemon.makeDir(), unowned = try ServiceDaemon.makeDir()
        defer { for d in [dead, live, unowned] { removeServiceDir(d) } }
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/true")
        try child.run()
        let childStart = StaleTestPins.startTime(child.processIdentifier) ?? 1
        child.waitUntilExit()
        try "\(child.processIdentifier) \(childStart)\n".write(toFile: dead + "/" + StaleTestPins.ownerFile, atomically: true, encoding: .utf8)
        try FileManager.default.removeItem(atPath: unowned + "/" + StaleTestPins.ownerFile)

        let target = try ServicePersistenceTests.target(in: dead)
        for dir in [dead, live, unowned] {
            let d = try ServiceDaemon(dir: dir)
            _ = try d.register([spec(dir == dead ? target : try ServicePersistenceTests.target(in: dir), symbol: "fn_a")])
            d.kill9()  // as a crash would: the pins stay
        }
        let running = try ServiceDaemon.makeDir()
        defer { removeServiceDir(running) }
        let r = try ServiceDaemon(dir: running)
        _ = try r.register([spec(try ServicePersistenceTests.target(in: running), symbol: "fn_a")])
        try FileManager.default.removeItem(atPath: running + "/" + StaleTestPins.ownerFile)  // only its lock protects it

        // The links' ids, to look for them after the sweep.
        func linkID(_ dir: String) throws -> String? {
            let pins = testPinDir(for: dir) + "/links"
            guard let pin = try FileManager.default.contentsOfDirectory(atPath: pins).first else { return nil }
            return try run(["/usr/sbin/bpftool", "link", "show", "pinned", pins + "/" + pin]).out.split(separator: ":").first.map(String.init)
        }
        let deadLink = try #require(try linkID(dead)), liveLink = try #require(try linkID(live))
        let removed = StaleTestPins.sweep()
        #expect(removed.contains(testPinDir(for: dead)), "\(removed)")
        #expect(!FileManager.default.fileExists(atPath: testPinDir(for: dead)))
        for kept in [live, unowned, running] {
            #expect(!removed.contains(testPinDir(for: kept)) && FileManager.default.fileExists(atPath: testPinDir(for: kept) + "/links"),
                    "\(kept)")
        }
        // The dead test's link is detached (the pin was its last reference); the live one's is not.
        #expect(try run(["/usr/sbin/bpftool", "link", "show", "id", deadLink]).status != 0, "link \(deadLink) is gone")
        #expect(try run(["/usr/sbin/bpftool", "link", "show", "id", liveLink]).status == 0, "link \(liveLink) stays")
        #expect(r.stop() == 0)
    }
}
