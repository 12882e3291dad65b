import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Registrations survive a graceful restart and a SIGKILL; changed binaries and gone processes
/// come back degraded with a reason; a corrupt state file stops the start.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ServicePersistenceTests {
    /// A private copy of the target fixture in `dir` (its own inode).
    static func target(in dir: String, name: String = "target") throws -> String {
        let copy = dir + "/" + name
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: copy)
        chmod(copy, 0o755)
        return copy
    }

    @Test("a graceful restart keeps ids, specs, consumers and hit totals; counting goes on exactly")
    func restartKeepsRegistrationsAndHits() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let ids = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "svc-restart")
        let glob = try d.register([spec(target, symbol: "fn_*")])
        #expect(ids.count == 2 && glob.count == 3)
        try run([target, "100", "30"])
        var hits = try d.hits()
        #expect(hits[ids[0]] == 100 && hits[ids[1]] == 30)
        #expect(d.stop() == 0)
        #expect(d.log.contains("state saved"))

        d = try ServiceDaemon(dir: dir)
        let listed = try d.list()
        #expect(Set(listed.keys) == Set(ids + glob))
        #expect(listed[ids[0]]?["consumer"]?.stringValue == "svc-restart")
        #expect(listed.values.allSatisfy { $0["state"] == nil }, "nothing changed, so nothing is degraded: \(listed)")
        hits = try d.hits()
        #expect(hits[ids[0]] == 100 && hits[ids[1]] == 30, "totals carried over: \(hits)")
        try run([target, "7", "2"])
        hits = try d.hits()
        #expect(hits[ids[0]] == 107 && hits[ids[1]] == 32)
        #expect(hits[glob[0]] == 107)
        // A new registration never reuses a restored id.
        let fresh = try d.register([spec(target, symbol: "fn_never")])
        #expect(!(ids + glob).contains(fresh[0]))
        #expect(d.stop() == 0)
    }

    @Test("ids of removed probes are never handed out again after a restart, even when nothing is left registered")
    func removedIDsStayRetired() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let first = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")])
        let last = try d.register([spec(target, symbol: "fn_never")])
        // Remove the newest id (and, below, everything): only the state file can remember it.
        _ = try d.call(["op": "unregister", "probes": .array(last.map { .string($0) })])
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir)
        let afterRestart = try d.register([spec(target, symbol: "fn_a")])
        #expect(!(first + last).contains(afterRestart[0]), "\(afterRestart[0]) was used before the restart")
        _ = try d.call(["op": "unregister", "probes": .array((first + afterRestart).map { .string($0) })])
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir)
        let afterEmpty = try d.register([spec(target, symbol: "fn_b")])
        #expect(!(first + last + afterRestart).contains(afterEmpty[0]), "\(afterEmpty[0]) was used before")
        #expect(d.stop() == 0)
    }

    @Test("a large request's state entry, encoded while the kernel attaches, survives kill -9 whole")
    func largeRequestSurvivesKill() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        // 1,200 probes in one request (above the engine's prepare threshold of 1,000), next to
        // a small one; then the daemon dies before any snapshot rewrite.
        let big = try d.register(Array(repeating: spec(target, symbol: "fn_a"), count: 1200), consumer: "svc-big")
        let small = try d.register([spec(target, symbol: "fn_b")], consumer: "svc-small")
        #expect(big.count == 1200 && Set(big).count == 1200)
        d.kill9()
        d = try ServiceDaemon(dir: dir)
        let listed = try d.list()
        #expect(Set(listed.keys) == Set(big + small), "\(listed.count) probes back instead of \(big.count + small.count)")
        #expect(big.allSatisfy { listed[$0]?["consumer"]?.stringValue == "svc-big" && listed[$0]?["state"] == nil })
        try run([target, "5", "2"])
        let hits = try d.hits()
        #expect(big.allSatisfy { hits[$0] == 5 } && hits[small[0]] == 2)
        #expect(d.stop() == 0)
    }

    @Test("kill -9 during a stream of registrations loses none that was acknowledged and resurrects none that was refused")
    func kill9KeepsAcknowledged() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var acked: [String] = []
        for round in 0..<3 {
            let d = try ServiceDaemon(dir: dir)
            // Everything acknowledged in earlier rounds is back.
            let before = Set(try d.list().keys)
            #expect(Set(acked).isSubset(of: before), "round \(round): lost \(Set(acked).subtracting(before))")
            acked = Array(before)
            let refusedConsumer = "svc-refused-\(round)"
            let box = KillLoopState()
            let worker = Thread {
                guard let client = try? d.client() else { box.finish(); return }
                var n = 0
                while !box.stopRequested {
                    n += 1
                    // Every third request is refused (no such symbol) and must never appear.
                    let bad = n % 3 == 0
                    let req: JSONObject = ["op": "register", "consumer": .string(bad ? refusedConsumer : "svc-kill"),
                                           "probes": [spec(target, symbol: bad ? "no_such_function" : "fn_a")]]
                    box.sending()
                    guard let reply = try? client.call(req).objectValue else { break }
                    if reply["ok"] == .bool(true) {
                        box.acked((reply["probes"]?.arrayValue ?? []).compactMap { $0.objectValue?["id"]?.stringValue })
                    } else if !bad {
                        break
                    }
                }
                box.finish()
            }
            worker.start()
            usleep(UInt32.random(in: 100_000...600_000))
            d.kill9()
            box.requestStop()
            box.waitFinished()
            let got = box.ackedIDs
            #expect(!got.isEmpty, "round \(round): no registration was acknowledged before the kill")
            acked += got

            let after = try ServiceDaemon(dir: dir)
            let present = try after.list()
            let missing = Set(acked).subtracting(present.keys)
            #expect(missing.isEmpty, "round \(round): acknowledged but lost after kill -9: \(missing.sorted())")
            #expect(!present.values.contains { $0["consumer"]?.stringValue == refusedConsumer }, "a refused registration came back")
            // At most the one request in flight at the kill may be present without an ack.
            let unacked = Set(present.keys).subtracting(acked)
            #expect(unacked.count <= 1, "round \(round): unacknowledged registrations present: \(unacked.sorted())")
            acked = Array(present.keys)
            // The restored probes count.
            try run([target, "3", "0"])
            let hits = try after.hits()
            #expect(present.keys.allSatisfy { hits[$0].map { $0 >= 3 } ?? false })
            #expect(after.stop() == 0)
        }
    }

    @Test("a binary replaced, rewritten or deleted while down, and a pid that is gone, come back degraded with a reason")
    func changedWhileDownIsDegraded() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let replaced = try Self.target(in: dir, name: "replaced")
        let deleted = try Self.target(in: dir, name: "deleted")
        let kept = try Self.target(in: dir, name: "kept")
        let rewritten = try Self.target(in: dir, name: "rewritten")
        // A short-lived process to filter on.
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: kept)
        sleeper.arguments = ["0", "0", "wait"]
        let input = Pipe(), output = Pipe()
        sleeper.standardInput = input
        sleeper.standardOutput = output
        try sleeper.run()
        let pid = sleeper.processIdentifier

        var d = try ServiceDaemon(dir: dir)
        // Pinned (`follow: false`): a followed registration would re-resolve in the new file
        // after the restart (FollowTests cover that).
        let ids = try d.register([spec(replaced, symbol: "fn_a", follow: false), spec(deleted, symbol: "fn_a", follow: false),
                                  spec(kept, symbol: "fn_a"), spec(kept, symbol: "fn_b", pid: pid),
                                  spec(rewritten, symbol: "fn_a", follow: false)])
        #expect(ids.count == 5)
        #expect(d.stop() == 0)

        // While down: a new inode at the same path, a deleted file, a rebuilt file written
        // over the same inode, and the filtered process exits.
        // Like a package upgrade: write the new file beside it, rename it over (a new inode).
        try FileManager.default.copyItem(atPath: kept, toPath: replaced + ".new")
        #expect(rename(replaced + ".new", replaced) == 0)
        try FileManager.default.removeItem(atPath: deleted)
        let other = try Fixtures.build("target-rebuilt", relative: "target/target.c", flags: ["-DREBUILT=1", "-O0"])
        let r = try run(["/bin/sh", "-c", "cat '\(other)' > '\(rewritten)'"])
        #expect(r.status == 0)
        try input.fileHandleForWriting.close()
        sleeper.waitUntilExit()

        d = try ServiceDaemon(dir: dir)
        let listed = try d.list()
        func reason(_ id: String) -> String { listed[id]?["reason"]?.stringValue ?? "" }
        #expect(listed[ids[0]]?["state"]?.stringValue == "degraded")
        #expect(reason(ids[0]).contains("replaced"), "\(reason(ids[0]))")
        #expect(reason(ids[1]).contains("no longer exists"), "\(reason(ids[1]))")
        #expect(listed[ids[2]]?["state"] == nil, "unchanged binary attaches again")
        #expect(reason(ids[3]).contains("process \(pid)"), "\(reason(ids[3]))")
        #expect(reason(ids[4]).contains("rewritten") || reason(ids[4]).contains("modified"), "\(reason(ids[4]))")
        #expect(d.log.contains("restored probe is degraded"))
        // Degraded probes still answer stats (their carried-over total) and say why.
        let stats = try d.call(["op": "stats"])
        #expect(stats["ok"] == .bool(true))
        // The kept one counts; the replaced path is not silently probed.
        try run([kept, "4", "0"])
        try run([replaced, "5", "0"])
        let hits = try d.hits()
        #expect(hits[ids[2]] == 4)
        #expect(hits[ids[0]] == 0)
        // They stay registered (and can be removed) rather than vanishing.
        let rm = try d.call(["op": "unregister", "probes": [.string(ids[0]), .string(ids[1])]])
        #expect(rm["ok"] == .bool(true))
        #expect(d.stop() == 0)
    }

    @Test("hit totals survive kill -9 through the periodic checkpoint (state_checkpoint_s)")
    func checkpointKeepsHitsAcrossKill() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir, config: "state_checkpoint_s = 1\n")
        let ids = try d.register([spec(target, symbol: "fn_a")])
        try run([target, "50", "0"])
        #expect(try d.hits()[ids[0]] == 50)
        usleep(2_500_000)  // at least one checkpoint after the workload
        d.kill9()
        d = try ServiceDaemon(dir: dir, config: "state_checkpoint_s = 1\n")
        #expect(try d.hits()[ids[0]] == 50, "hits counted before the kill are carried over")
        try run([target, "1", "0"])
        #expect(try d.hits()[ids[0]] == 51)
        #expect(d.stop() == 0)
    }

    /// Runs `body` while the daemon's state writes fail: a directory stands where the log file
    /// must be (root ignores permission bits, so a read-only file would not fail). The log is
    /// put back afterwards.
    static func withStateWritesFailing<T>(_ d: ServiceDaemon, _ body: () throws -> T) throws -> T {
        let log = d.stateDir + "/state.log"
        #expect(rename(log, log + ".aside") == 0)
        try FileManager.default.createDirectory(atPath: log, withIntermediateDirectories: false)
        defer {
            try? FileManager.default.removeItem(atPath: log)
            #expect(rename(log + ".aside", log) == 0)
        }
        return try body()
    }

    @Test("a registration refused with state_write_failed is never saved, so a restart does not bring it back")
    func failedWriteIsNotResurrected() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let a = try d.register([spec(target, symbol: "fn_a")])
        let refused = try Self.withStateWritesFailing(d) {
            try d.call(["op": "register", "consumer": "svc-unsaved", "probes": [spec(target, symbol: "fn_b")]])
        }
        #expect(errorCode(refused) == "state_write_failed", "\(refused)")
        let c = try d.register([spec(target, symbol: "fn_never")])
        d.kill9()
        d = try ServiceDaemon(dir: dir)
        let listed = try d.list()
        #expect(Set(listed.keys) == Set(a + c), "\(listed.keys.sorted())")
        #expect(!listed.values.contains { $0["consumer"]?.stringValue == "svc-unsaved" })
        #expect(d.stop() == 0)
    }

    @Test("a registration saved ahead of its attach and then refused by the kernel is removed from the log: kill -9 and a restart do not bring it back")
    func refusedAttachIsNotResurrected() throws {
        let python = "/usr/bin/python3.11"
        try #require(FileManager.default.isExecutableFile(atPath: python))
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        var d = try ServiceDaemon(dir: dir)
        // A plain uprobe where a USDT probe with a semaphore already sits: the kernel refuses it
        // (ref_ctr_offset mismatch, EINVAL), after its entry was written ahead of the attach.
        let usdt = try d.call(["op": "register", "probes": [spec(python, usdt: "python:function__entry")]])
        let entry = try #require(usdt["probes"]?.arrayValue?.first?.objectValue, "\(usdt)")
        let kept = try #require(entry["id"]?.stringValue)
        let offset = try #require(entry["offset"]?.int64Value)
        let refused = try d.call(["op": "register", "consumer": "svc-refused",
                                  "probes": [.object(["path": .string(python), "offset": .int(offset), "force": true])]])
        #expect(errorCode(refused) == "link_create_failed", "\(refused)")
        #expect(refused["error"]?.objectValue?["message"]?.stringValue?.contains("ref_ctr_offset") == true, "\(refused)")
        #expect(try d.list().keys.sorted() == [kept])
        d.kill9()
        d = try ServiceDaemon(dir: dir)
        let listed = try d.list()
        #expect(listed.keys.sorted() == [kept], "\(listed.keys.sorted())")
        #expect(!listed.values.contains { $0["consumer"]?.stringValue == "svc-refused" })
        #expect(d.stop() == 0)
    }

    @Test("an unregister whose state write fails is done and says it is not saved; the next save carries it, so a restart does not bring it back")
    func unsavedRemovalIsCarried() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let a = try d.register([spec(target, symbol: "fn_a")])
        let b = try d.register([spec(target, symbol: "fn_b")])
        let removed = try Self.withStateWritesFailing(d) {
            try d.call(["op": "unregister", "probes": .array(b.map { .string($0) })])
        }
        #expect(removed["ok"] == .bool(true), "\(removed)")
        #expect(removed["removed"] == .int(1))
        #expect(removed["warning"]?.stringValue?.contains("not saved") == true, "\(removed)")
        #expect(try d.list().keys.sorted() == a, "removed from the daemon all the same")
        let c = try d.register([spec(target, symbol: "fn_never")])  // its save carries the removal
        d.kill9()
        d = try ServiceDaemon(dir: dir)
        #expect(Set(try d.list().keys) == Set(a + c))
        #expect(d.stop() == 0)
    }

    @Test("a corrupt state file stops the start with a clear message and is left untouched; --move-corrupt-state moves it aside")
    func corruptStateRefusesToStart() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        try FileManager.default.createDirectory(atPath: dir + "/state", withIntermediateDirectories: true)
        let garbage = "{\"format\":\"uprobed-state\",\"version\":1,\"probes\":[{\"id\":" // torn
        try garbage.write(toFile: dir + "/state/state.json", atomically: true, encoding: .utf8)
        let d = try ServiceDaemon(dir: dir, waitServing: false)
        let status = d.waitExit()
        #expect(status != nil && status != 0)
        #expect(d.log.contains("refusing to start"), "\(d.log)")
        #expect(d.log.contains("state_corrupt"))
        #expect(try String(contentsOfFile: dir + "/state/state.json", encoding: .utf8) == garbage)

        let moved = try ServiceDaemon(dir: dir, extraArgs: ["--move-corrupt-state"])
        #expect(try moved.list().isEmpty)
        let aside = try FileManager.default.contentsOfDirectory(atPath: dir + "/state").filter { $0.hasPrefix("state.json.corrupt-") }
        #expect(aside.count == 1)
        #expect(moved.stop() == 0)
    }

    @Test("a state dir whose snapshot was deleted (the log alone) stops the start with state_incomplete, naming the missing changes; --move-corrupt-state moves the files aside and starts empty")
    func deletedSnapshotRefusesToStart() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        var before: [String] = []
        for symbol in ["fn_a", "fn_b", "fn_a"] { before += try d.register([spec(target, symbol: symbol)]) }
        #expect(d.stop() == 0)  // the snapshot holds them
        d = try ServiceDaemon(dir: dir)
        let after = try d.register([spec(target, symbol: "fn_b")])
        d.kill9()  // the log holds this one
        #expect(FileManager.default.fileExists(atPath: d.stateDir + "/state.log"))
        try FileManager.default.removeItem(atPath: d.stateDir + "/state.json")

        let refused = try ServiceDaemon(dir: dir, waitServing: false)
        let status = refused.waitExit(seconds: 15)
        #expect(status != nil && status != 0, "it must not start with \(after) alone and without \(before)")
        let log = refused.log
        #expect(log.contains("state_incomplete"), "\(log)")
        #expect(log.contains("state.json is missing") && log.contains("changes 1 to 3 are in no file"), "\(log)")
        #expect(log.contains("every registration made before this log began"))
        #expect(log.contains("refusing to start") && log.contains("--move-corrupt-state"))
        #expect(FileManager.default.fileExists(atPath: d.stateDir + "/state.log"), "left untouched")

        let moved = try ServiceDaemon(dir: dir, extraArgs: ["--move-corrupt-state"])
        #expect(try moved.list().isEmpty)
        let aside = try FileManager.default.contentsOfDirectory(atPath: d.stateDir).filter { $0.hasPrefix("state.log.corrupt-") }
        #expect(aside.count == 1, "\(aside)")
        #expect(moved.log.contains("moved them aside"))
        #expect(moved.stop() == 0)
    }

    /// Writes DIR/filler until the file system is full.
    static func fill(_ dir: String) {
        let fd = open(dir + "/filler", O_WRONLY | O_CREAT | O_APPEND, 0o600)
        defer { close(fd) }
        let chunk = [UInt8](repeating: 1, count: 64 << 10)
        for size in [64 << 10, 4096, 1] {
            while chunk.withUnsafeBytes({ write(fd, $0.baseAddress, size) }) > 0 {}
        }
    }

    @Test("disk full: an unregister is saved all the same (the space reserve), a stop that cannot save fails naming what is lost, and the removed probes do not come back after the restart")
    func fullDiskKeepsRemovals() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try Self.target(in: dir)
        let state = dir + "/state"
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: false)
        guard mount("tmpfs", state, "tmpfs", 0, "size=4m,mode=0700") == 0 else {
            throw TestFailure("mount tmpfs on \(state): errno \(errno)")
        }
        defer { umount2(state, Int32(MNT_DETACH)) }
        var d = try ServiceDaemon(dir: dir)
        let kept = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "svc-kept")
        let registered = try d.register(Array(repeating: spec(target, symbol: "fn_a"), count: 2000), consumer: "svc-doomed")
        #expect(registered.count == 2000)
        // Every other one: scattered ids, whose removal line (~5 KB; consecutive ids would be
        // one range of a few bytes) needs pages the file system no longer has.
        let doomed = stride(from: 0, to: registered.count, by: 2).map { registered[$0] }
        let spared = stride(from: 1, to: registered.count, by: 2).map { registered[$0] }

        Self.fill(state)
        let removed = try d.call(["op": "unregister", "probes": .array(doomed.map { .string($0) })])
        #expect(removed["ok"] == .bool(true) && removed["removed"] == .int(1000), "\(removed)")
        #expect(removed["warning"] == nil, "saved with the space the reserve gave back: \(removed)")
        let service = try d.status()["service"]?.objectValue
        #expect(service?["state_reserve_bytes"] == .int(0), "the reserve was used: \(String(describing: service))")
        #expect(service?["state_unsaved_removals"] == .int(0), "\(String(describing: service))")
        #expect(d.log.contains("state_disk_full"))

        // The room the reserve made is taken too: the final snapshot cannot be written.
        Self.fill(state)
        let status = d.stop()
        #expect(status != 0, "a stop that could not save must not look clean (exit \(status))")
        let log = d.log
        #expect(log.contains("saving the final state failed") && log.contains("every registration and removal is on disk")
                && log.contains("hit counts"), "\(log)")

        unlink(state + "/filler")
        d = try ServiceDaemon(dir: dir)
        let back = Set(try d.list().keys)
        #expect(back == Set(kept + spared), "\(back.intersection(doomed).count) unregistered probes came back")
        #expect(d.stop() == 0)
    }
}

/// Shared between the kill -9 test's client thread and the test.
final class KillLoopState: @unchecked Sendable {
    // @unchecked: every field is guarded by `lock`.
    private let lock = NSCondition()
    private var stop = false
    private var done = false
    private var ids: [String] = []

    var stopRequested: Bool { lock.lock(); defer { lock.unlock() }; return stop }
    var ackedIDs: [String] { lock.lock(); defer { lock.unlock() }; return ids }
    func sending() {}
    func acked(_ new: [String]) { lock.lock(); ids += new; lock.unlock() }
    func requestStop() { lock.lock(); stop = true; lock.unlock() }
    func finish() { lock.lock(); done = true; lock.broadcast(); lock.unlock() }
    func waitFinished() { lock.lock(); while !done { lock.wait() }; lock.unlock() }
}
