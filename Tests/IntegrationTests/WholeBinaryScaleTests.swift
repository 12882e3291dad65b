import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Issue 26 at scale: selections (unregister, list and stats by path and symbol globs), compact
/// register replies, the daemon's `top`, and removal of 100,000+ probes leaving nothing behind.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct WholeBinaryScaleTests {
    /// Open descriptors of a process.
    static func fds(_ pid: Int32) -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1 }

    /// The daemon's open descriptors once they are down to `limit`, or after 10 s. A removal
    /// is followed by state writes on their own task (a snapshot's temporary file is open for a
    /// moment), so one look right after the removal can see one more descriptor than at rest;
    /// a leaked link's descriptor stays open and still fails the check.
    static func fdsAtRest(_ pid: Int32, limit: Int) -> Int {
        let deadline = Date().addingTimeInterval(10)
        var n = fds(pid)
        while n > limit && Date() < deadline {
            usleep(50_000)
            n = fds(pid)
        }
        return n
    }

    /// Waits until the daemon reports `probes` registrations, `links` links, `slots` slots in
    /// use and no pending removal.
    static func settle(_ d: TestDaemon, probes: Int, links: Int, slots: Int) throws -> JSONObject {
        let deadline = Date().addingTimeInterval(30)
        var s = try d.status()
        while Date() < deadline {
            s = try d.status()
            if s["probes"] == .int(Int64(probes)), s["links"] == .int(Int64(links)), s["slots_in_use"] == .int(Int64(slots)),
               s["batching"]?.objectValue?["pending_removals"] == .int(0) { return s }
            usleep(20_000)
        }
        return s
    }

    /// 11 copies of the 10,000-function fixture: 110,000 probes on 11 files, registered by
    /// glob two files per request (20,000 probes: a compact reply).
    static func registerMany(_ d: TestDaemon, consumer: String) throws -> (dir: String, count: Int) {
        let many = try Fixtures.build("many", relative: "kernel/many.c")
        let dir = d.dir + "/bins"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let copies = (0..<11).map { dir + "/many\($0)" }
        for c in copies { try FileManager.default.copyItem(atPath: many, toPath: c) }
        var count = 0
        for pair in stride(from: 0, to: copies.count, by: 2) {
            let files = copies[pair..<min(pair + 2, copies.count)]
            let r = try d.call(["op": "register", "consumer": .string(consumer),
                                "probes": .array(files.map { spec($0, symbol: "g*") })])
            #expect(r["ok"] == .bool(true), "\(JSONSerializer.serialize(.object(r)).prefix(500))")
            let n = files.count * 10_000
            if n > 10_000 {
                // Compact: nothing per probe, one entry per file with one id range.
                #expect(r["reply"] == .string("compact") && r["probes"] == nil)
                #expect(r["count"] == .int(Int64(n)))
                let entries = r["files"]?.arrayValue ?? []
                #expect(entries.map { $0.objectValue?["path"]?.stringValue ?? "" } == Array(files))
                for e in entries {
                    #expect(e.objectValue?["count"] == .int(10_000) && e.objectValue?["ids"]?.arrayValue?.count == 1, "\(e)")
                    #expect(e.objectValue?["inode"]?.int64Value != nil && e.objectValue?["device"]?.int64Value != nil)
                }
            } else {
                #expect(r["probes"]?.arrayValue?.count == n, "up to 10,000 the reply is the full one")
            }
            count += Int(r["count"]?.int64Value ?? Int64(r["probes"]?.arrayValue?.count ?? 0))
        }
        return (dir, count)
    }

    @Test("110,000 probes removed by one path glob: nothing left behind (links, slots, fds); a probe elsewhere stays and counts")
    func removeByGlob() throws {
        let d = try TestDaemon()
        let target = try d.privateTarget()
        let keep = try d.register([spec(target, symbol: "fn_a")])
        let baseline = try Self.settle(d, probes: 1, links: 1, slots: 1)
        let fdsBefore = Self.fds(d.process.processIdentifier)
        let (dir, count) = try Self.registerMany(d, consumer: "bulk")
        #expect(count == 110_000)
        let loaded = try d.status()
        #expect(loaded["probes"] == .int(110_001) && loaded["slots_in_use"] == .int(110_001), "\(loaded)")
        // list and stats by the same glob see exactly them.
        let page = try d.call(["op": "list", "path": .string(dir + "/*"), "offset": 5, "limit": 3])
        #expect(page["total"] == .int(110_000) && page["probes"]?.arrayValue?.count == 3, "\(page)")
        let one = try d.call(["op": "stats", "path": "many3", "symbol": "g000[0-4]"])
        #expect(one["total"] == .int(5) && one["stats"]?.arrayValue?.count == 5, "\(one)")

        let removed = try d.call(["op": "unregister", "path": .string(dir + "/many*")])
        #expect(removed["removed"] == .int(110_000), "\(removed)")
        let after = try Self.settle(d, probes: 1, links: 1, slots: 1)
        #expect(after["probes"] == .int(1) && after["links"] == .int(1) && after["slots_in_use"] == .int(1), "\(after)")
        #expect(after["uprobes"] == baseline["uprobes"], "\(after)")
        #expect(Self.fdsAtRest(d.process.processIdentifier, limit: fdsBefore) <= fdsBefore, "every link's descriptor closed")
        try run([target, "4", "0"])
        #expect(try d.hits(keep)[keep[0]] == 4)
        // Nothing matches any more: a second removal removes nothing and fails nothing.
        #expect(try d.call(["op": "unregister", "path": .string(dir + "/many*")])["removed"] == .int(0))
    }

    @Test("110,000 probes removed by consumer: nothing left behind (links, slots, fds)")
    func removeByConsumer() throws {
        let d = try TestDaemon()
        // One batch first, so the descriptors a daemon opens on its first change (the state
        // log's, kept for appends) are in the baseline, as in removeByGlob.
        let warm = try d.register([spec(try d.privateTarget(), symbol: "fn_a")])
        _ = try d.call(["op": "unregister", "probes": .array(warm.map { .string($0) })])
        _ = try Self.settle(d, probes: 0, links: 0, slots: 0)
        let fdsBefore = Self.fds(d.process.processIdentifier)
        let (_, count) = try Self.registerMany(d, consumer: "bulk")
        #expect(count == 110_000)
        let removed = try d.call(["op": "unregister", "consumer": "bulk"])
        #expect(removed["removed"] == .int(110_000), "\(removed)")
        let after = try Self.settle(d, probes: 0, links: 0, slots: 0)
        #expect(after["links"] == .int(0) && after["slots_in_use"] == .int(0) && after["uprobes"] == .int(0), "\(after)")
        #expect(Self.fdsAtRest(d.process.processIdentifier, limit: fdsBefore) <= fdsBefore, "every link's descriptor closed")
    }

    @Test("stats top/sort/filters and list paging on the daemon; unregister by symbol glob; reply forms")
    func queries() throws {
        let d = try TestDaemon()
        let target = try d.privateTarget()
        // Compact on request, even for 3 probes: one file, one id range.
        let compact = try d.call(["op": "register", "reply": "compact", "probes": [spec(target, symbol: "fn_*")]])
        #expect(compact["reply"] == .string("compact") && compact["count"] == .int(3), "\(compact)")
        let range = compact["files"]?.arrayValue?.first?.objectValue?["ids"]?.arrayValue?.first?.objectValue
        let first = try #require(range?["first"]?.stringValue), last = try #require(range?["last"]?.stringValue)
        #expect(ProbeIDNumber(first).map { $0 + 2 } == ProbeIDNumber(last), "\(compact)")
        try run([target, "30", "7"])  // fn_a 30 times, fn_b 7 times, fn_never never

        let top = try d.call(["op": "stats", "top": 2])
        #expect(top["total"] == .int(3), "\(top)")
        #expect(top["stats"]?.arrayValue?.map { $0.objectValue?["hits"] ?? .null } == [.int(30), .int(7)], "\(top)")
        let byRate = try d.call(["op": "stats", "sort": "rate", "top": 1])
        #expect(byRate["stats"]?.arrayValue?.first?.objectValue?["hits"] == .int(30), "\(byRate)")
        let byID = try d.call(["op": "stats", "sort": "id"])
        #expect(byID["stats"]?.arrayValue?.map { $0.objectValue?["id"]?.stringValue ?? "" }.first == first, "\(byID)")
        let sym = try d.call(["op": "stats", "symbol": "fn_b"])
        #expect(sym["stats"]?.arrayValue?.map { $0.objectValue?["hits"] ?? .null } == [.int(7)] && sym["total"] == .int(1), "\(sym)")
        #expect(try d.call(["op": "stats", "path": "/elsewhere/target"])["total"] == .int(0))
        let filteredTop = try d.call(["op": "stats", "symbol": "fn_[bn]*", "top": 1])
        #expect(filteredTop["stats"]?.arrayValue?.map { $0.objectValue?["hits"] ?? .null } == [.int(7)] && filteredTop["total"] == .int(2),
                "\(filteredTop)")
        let idsTop = try d.call(["op": "stats", "probes": [.string(first), .string(last)], "top": 1])
        #expect(idsTop["stats"]?.arrayValue?.count == 1 && idsTop["total"] == .int(2), "\(idsTop)")
        let sortedAll = try d.call(["op": "stats", "sort": "hits"])
        #expect(sortedAll["stats"]?.arrayValue?.map { $0.objectValue?["hits"] ?? .null } == [.int(30), .int(7), .int(0)], "\(sortedAll)")
        // Plain stats keeps its old shape (no total).
        #expect(try d.call(["op": "stats"])["total"] == nil)

        let page = try d.call(["op": "list", "path": "target", "offset": 1, "limit": 1])
        #expect(page["total"] == .int(3) && page["probes"]?.arrayValue?.first?.objectValue?["id"]?.stringValue != first, "\(page)")
        let named = try d.call(["op": "list", "probes": [.string(last), "p999999"]])
        #expect(named["probes"]?.arrayValue?.map { $0.objectValue?["id"]?.stringValue ?? "" } == [last], "\(named)")

        // Bad queries are refused, and nothing changes.
        for bad: JSONObject in [["op": "stats", "sort": "latency_p99"], ["op": "stats", "top": 0], ["op": "stats", "top": -1],
                                ["op": "list", "limit": "ten"], ["op": "unregister", "probes": [.string(first)], "path": "*"],
                                ["op": "unregister"], ["op": "unregister", "symbol": ""], ["op": "register", "reply": "tiny",
                                                                                          "probes": [spec(target, symbol: "fn_a")]]] {
            #expect(errorCode(try d.call(bad)) == "invalid_request", "\(bad)")
        }
        #expect(try d.status()["probes"] == .int(3))

        let rm = try d.call(["op": "unregister", "symbol": "fn_[ab]"])
        #expect(rm["removed"] == .int(2), "\(rm)")
        #expect(try d.call(["op": "list"])["probes"]?.arrayValue?.count == 1)
    }

    @Test("a non-admin's glob removal removes only its own probes; its consumer removal of a group holding another's is refused")
    func nonAdminGlob() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let target = try ServicePersistenceTests.target(in: dir)
        let d = try ServiceDaemon(dir: dir, config: "socket_mode = 0666\nregister_uids = \(TestUser.name)\n")
        let rootIDs = try d.register([spec(target, symbol: "fn_*")], consumer: "shared")
        let own = Process()
        own.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        own.arguments = ["--reuid=\(user.uid)", "--regid=\(user.gid)", "--clear-groups", "--", target, "1", "0", "wait"]
        let ownIn = Pipe(), ownOut = Pipe()
        own.standardInput = ownIn
        own.standardOutput = ownOut
        try own.run()
        defer { if own.isRunning { kill(own.processIdentifier, SIGKILL) } }
        let pidLine = String(decoding: ownOut.fileHandleForReading.availableData, as: UTF8.self)
        let ownPid = try #require(Int32(pidLine.trimmingCharacters(in: .whitespacesAndNewlines)))
        let replies = try callAsUser(uid: user.uid, gid: user.gid, socket: d.socket, [
            ["op": "register", "consumer": "shared", "probes": [spec(target, symbol: "fn_*", pid: ownPid)]],
            ["op": "unregister", "consumer": "shared"],                     // holds root's probes: refused
            ["op": "unregister", "path": "*", "symbol": "fn_*"],            // only its own 3
            ["op": "unregister", "path": "*"],                              // none left of its own
        ])
        #expect(replies.count == 4)
        guard replies.count == 4 else { return }
        #expect(replies[0]["ok"] == .bool(true), "\(replies[0])")
        #expect(errorCode(replies[1]) == "permission_denied", "\(replies[1])")
        #expect(replies[2]["removed"] == .int(3), "\(replies[2])")
        #expect(replies[3]["removed"] == .int(0), "\(replies[3])")
        #expect(Set(try d.list().keys) == Set(rootIDs))
        ownIn.fileHandleForWriting.write(Data("go\n".utf8))
        own.waitUntilExit()
    }
}

/// N of a probe id `pN`.
func ProbeIDNumber(_ id: String) -> Int? { id.hasPrefix("p") ? Int(id.dropFirst()) : nil }
