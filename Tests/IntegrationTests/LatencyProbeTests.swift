import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Latency probes end to end: real daemon, real kernel (uprobe sessions), a fixture that
/// measures its own calls, and python3 calling libc.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct LatencyProbeTests {
    /// The latency fixture (Tests/Fixtures/kernel/latency.c), copied into the daemon's dir so
    /// that path-wide probes of parallel tests never see each other's processes.
    static func fixture(_ daemon: TestDaemon) throws -> String {
        let built = try Fixtures.build("latency", relative: "kernel/latency.c", flags: ["-pthread"])
        let copy = daemon.dir + "/latency"
        if !FileManager.default.fileExists(atPath: copy) { try FileManager.default.copyItem(atPath: built, toPath: copy) }
        return copy
    }

    static func latencySpec(_ path: String, _ symbol: String, pid: Int32? = nil) -> JSONValue {
        ProbeSpec(path: path, symbol: symbol, pid: pid, latency: true).json
    }

    /// The fixture's report: per function, calls and the medians it measured inside the
    /// function and around the call.
    static func report(_ out: String) -> [String: (calls: UInt64, inner: Double, outer: Double)] {
        var r: [String: (UInt64, Double, Double)] = [:]
        for line in out.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count == 4, let c = UInt64(f[1]), let i = Double(f[2]), let o = Double(f[3]) { r[String(f[0])] = (c, i, o) }
        }
        return r
    }

    /// Each probe's stats entry, by id.
    static func entries(_ daemon: any DaemonClient, _ ids: [String], buckets: Bool = false) throws -> [String: JSONObject] {
        var req: JSONObject = ["op": "stats", "probes": .array(ids.map { .string($0) })]
        if buckets { req["buckets"] = true }
        let r = try daemon.call(req)
        guard r["ok"] == .bool(true) else { throw TestFailure("stats failed: \(JSONSerializer.serialize(.object(r)))") }
        var out: [String: JSONObject] = [:]
        for e in r["stats"]?.arrayValue ?? [] { if let o = e.objectValue, let id = o["id"]?.stringValue { out[id] = o } }
        return out
    }

    static func u(_ o: JSONObject?, _ key: String) -> UInt64? { o?[key]?.int64Value.map { UInt64($0) } }

    @Test("calls, returns and in_flight exact on threads, recursion and a thread exiting mid-call; p50 where the fixture measured it; hits are calls; a plain probe on the same function coexists")
    func exactOnBuiltFixture() throws {
        let daemon = try TestDaemon()
        let fx = try Self.fixture(daemon)
        let names = ["lat_busy", "lat_sleep1", "lat_sleep10", "lat_recurse", "lat_exit_mid", "lat_never"]
        let ids = try daemon.register(names.map { Self.latencySpec(fx, $0) })
        let plain = try daemon.register([spec(fx, symbol: "lat_busy")])
        let r = try run([fx, "--threads=3", "--busy=200", "--busy-ns=30000", "--sleep1=15", "--sleep10=5",
                         "--recurse=30", "--depth=12", "--exiters=2"])
        #expect(r.status == 0)
        let measured = Self.report(r.out)
        let stats = try Self.entries(daemon, ids + plain, buckets: true)
        for (name, id) in zip(names, ids) {
            let e = stats[id], l = e?["latency"]?.objectValue
            let calls = name == "lat_never" ? 0 : try #require(measured[name]).calls
            #expect(Self.u(l, "calls") == calls, "\(name)")
            #expect(Self.u(e, "hits") == calls, "\(name): hits are calls")
            let returned = name == "lat_exit_mid" ? 0 : calls
            #expect(Self.u(l, "returns") == returned, "\(name)")
            #expect(Self.u(l, "in_flight") == calls - returned, "\(name)")
            #expect(Self.u(l, "unobserved") == 0)
            let buckets = l?["buckets"]?.arrayValue ?? []
            #expect(buckets.reduce(UInt64(0)) { $0 + UInt64($1.arrayValue?[2].int64Value ?? 0) } == returned, "\(name) buckets")
            if ["lat_busy", "lat_sleep1", "lat_sleep10"].contains(name), let m = measured[name] {
                let p50 = Double(try #require(Self.u(l, "p50_ns")))
                print("\(name): p50 \(p50) ns; fixture inner \(m.inner), outer \(m.outer)")
                #expect(p50 >= m.inner * (1 - 1.0 / 16) && p50 <= m.outer * (1 + 1.0 / 16), "\(name) p50 \(p50)")
                let p99 = try #require(Self.u(l, "p99_ns")), maxNs = try #require(Self.u(l, "max_ns"))
                #expect(UInt64(p50) <= p99 && p99 <= maxNs)
            }
        }
        #expect(stats[ids[5]]?["latency"]?.objectValue?["p50_ns"] == .null, "no returns: no percentile")
        #expect(Self.u(stats[plain[0]], "hits") == measured["lat_busy"]?.calls)
        #expect(stats[plain[0]]?["latency"] == nil)
    }

    @Test("python3 calling libc usleep 2 ms, pid-filtered: every call measured, p50 between 2 ms and what python saw")
    func pythonUsleepPidFiltered() throws {
        let daemon = try TestDaemon()
        let n = 40
        let script = """
        import ctypes, os, sys, time
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        print(os.getpid(), flush=True)
        sys.stdin.readline()
        d = []
        for _ in range(\(n)):
            t = time.monotonic_ns(); libc.usleep(2000); d.append(time.monotonic_ns() - t)
        d.sort()
        print(d[(len(d) - 1) // 2], flush=True)
        """
        let proc = try WaitingProcess(["/usr/bin/python3", "-c", script])
        let other = try WaitingProcess(["/usr/bin/python3", "-c", script])  // same library, not filtered in
        let ids = try daemon.register([Self.latencySpec("libc", "usleep", pid: proc.pid)])
        proc.stdin.fileHandleForWriting.write(Data("go\n".utf8))
        other.stdin.fileHandleForWriting.write(Data("go\n".utf8))
        let median = Double(String(decoding: proc.stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        proc.process.waitUntilExit()
        other.process.waitUntilExit()
        let l = try Self.entries(daemon, ids)[ids[0]]?["latency"]?.objectValue
        #expect(Self.u(l, "calls") == UInt64(n))
        #expect(Self.u(l, "returns") == UInt64(n))
        #expect(Self.u(l, "in_flight") == 0)
        let p50 = Double(Self.u(l, "p50_ns") ?? 0)
        print("python usleep(2000): p50 \(p50) ns, python measured \(median) ns")
        #expect(p50 >= 2_000_000 * (1 - 1.0 / 16) && p50 <= median * (1 + 1.0 / 16))
    }

    @Test("latency probes stay exact while neighbouring probes on the same binary are added and removed under load")
    func exactThroughNeighbourChurn() throws {
        // One small link per binary and kind: each batch that adds a neighbour merges it with the
        // watched probes' link, and each removal rebuilds that link without it (make-before-break).
        let daemon = try TestDaemon(config: "compaction_delay_ms = 5\nmax_links_per_group = 1\n")
        let fx = try Self.fixture(daemon)
        let watched = try daemon.register([Self.latencySpec(fx, "lat_plain"), Self.latencySpec(fx, "lat_busy")])
        let counting = try daemon.register([spec(fx, symbol: "lat_plain")])
        let p = Process()
        p.executableURL = URL(fileURLWithPath: fx)
        p.arguments = ["--threads=3", "--plain=1200", "--delay-us=400", "--busy=300", "--busy-ns=2000"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        var rounds = 0
        let neighbours = ["lat_sleep1", "lat_recurse", "lat_never", "lat_sleep10"]
        while p.isRunning && rounds < 60 {
            let added = try daemon.register(neighbours.map { rounds % 2 == 0 ? Self.latencySpec(fx, $0) : spec(fx, symbol: $0) }
                                            + [Self.latencySpec(fx, "lat_plain")])
            usleep(15_000)
            let r = try daemon.call(["op": "unregister", "probes": .array(added.map { .string($0) })])
            #expect(r["ok"] == .bool(true))
            usleep(10_000)
            rounds += 1
        }
        let report = Self.report(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
        p.waitUntilExit()
        let rebuilds = try daemon.status()["batching"]?.objectValue?["link_rebuilds"]?.int64Value ?? 0
        print("neighbour churn: \(rounds) rounds, \(rebuilds) link rebuilds")
        #expect(rounds >= 5)
        #expect(rebuilds >= 5, "the watched probes' links were rebuilt while the workload ran")
        let stats = try Self.entries(daemon, watched + counting)
        for (id, name) in zip(watched, ["lat_plain", "lat_busy"]) {
            let l = stats[id]?["latency"]?.objectValue
            let calls = try #require(report[name]).calls
            #expect(Self.u(l, "calls") == calls, "\(name)")
            #expect(Self.u(l, "returns") == calls, "\(name)")
            #expect(Self.u(l, "in_flight") == 0 && Self.u(l, "unobserved") == 0, "\(name)")
        }
        #expect(Self.u(stats[counting[0]], "hits") == report["lat_plain"]?.calls)
    }

    @Test("a restart keeps calls, returns and the histogram")
    func survivesRestart() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let built = try Fixtures.build("latency", relative: "kernel/latency.c", flags: ["-pthread"])
        let fx = dir + "/latency"
        try FileManager.default.copyItem(atPath: built, toPath: fx)
        var d = try ServiceDaemon(dir: dir)
        let ids = try d.register([Self.latencySpec(fx, "lat_busy")])
        try run([fx, "--threads=2", "--busy=50", "--busy-ns=5000"])
        let before = try Self.entries(d, ids, buckets: true)[ids[0]]?["latency"]?.objectValue
        #expect(Self.u(before, "calls") == 100)
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir)
        let after = try Self.entries(d, ids, buckets: true)[ids[0]]?["latency"]?.objectValue
        #expect(after == before)
        try run([fx, "--threads=1", "--busy=7", "--busy-ns=5000"])
        let more = try Self.entries(d, ids)[ids[0]]?["latency"]?.objectValue
        #expect(Self.u(more, "calls") == 107 && Self.u(more, "returns") == 107)
        #expect(Self.u(try Self.entries(d, ids)[ids[0]], "hits") == 107)
        #expect(d.stop() == 0)
    }

    @Test("latency with retprobe or usdt, and a non-boolean latency or buckets, are refused")
    func badInput() throws {
        let daemon = try TestDaemon()
        let fx = try Self.fixture(daemon)
        for bad: JSONObject in [["path": .string(fx), "symbol": "lat_busy", "latency": true, "retprobe": true],
                                ["path": .string(fx), "usdt": "p:n", "latency": true],
                                ["path": .string(fx), "symbol": "lat_busy", "latency": "yes"]] {
            let r = try daemon.call(["op": "register", "probes": [.object(bad)]])
            #expect(errorCode(r) == "invalid_request", "\(bad)")
        }
        let r = try daemon.call(["op": "stats", "buckets": 1])
        #expect(errorCode(r) == "invalid_request")
        #expect(try daemon.hits().isEmpty)
    }

    @Test("latency_capacity bounds latency probe sites: beyond it capacity_exhausted, nothing half-registered; a removal frees its rows")
    func latencyCapacity() throws {
        let daemon = try TestDaemon(config: "latency_capacity = 2\ncompaction_delay_ms = 5\n")
        let fx = try Self.fixture(daemon)
        let r = try daemon.call(["op": "register", "probes": .array(["lat_busy", "lat_plain", "lat_sleep1"].map { Self.latencySpec(fx, $0) })])
        #expect(errorCode(r) == "capacity_exhausted", "\(r)")
        let message = r["error"]?.objectValue?["message"]?.stringValue ?? ""
        #expect(message.contains("latency_capacity"), "\(message)")
        #expect(try daemon.hits().isEmpty)
        let two = try daemon.register([Self.latencySpec(fx, "lat_busy"), Self.latencySpec(fx, "lat_plain")])
        let counting = try daemon.register([spec(fx, symbol: "lat_sleep1")])  // counting probes need no row
        #expect(two.count == 2 && counting.count == 1)
        #expect(try daemon.call(["op": "unregister", "probes": .array([.string(two[0])])])["ok"] == .bool(true))
        // The freed row comes back once the link is rebuilt without it and its slot is free.
        var again: JSONObject = [:]
        for _ in 0..<100 {
            again = try daemon.call(["op": "register", "probes": [Self.latencySpec(fx, "lat_sleep1")]])
            if again["ok"] == .bool(true) { break }
            usleep(50_000)
        }
        #expect(again["ok"] == .bool(true), "\(again)")
    }

    @Test("watch events carry the calls that returned in each interval")
    func watchIntervals() throws {
        let daemon = try TestDaemon()
        let fx = try Self.fixture(daemon)
        let ids = try daemon.register([Self.latencySpec(fx, "lat_busy")])
        try run([fx, "--busy=30", "--busy-ns=5000"])
        let c = try daemon.client()
        try c.send(.object(["op": "watch", "interval_ms": 200, "probes": .array(ids.map { .string($0) }), "buckets": true]))
        func next() throws -> JSONObject? {
            while true {
                guard let o = try c.readReply().objectValue else { return nil }
                if o["event"] == .string("stats") { return o["stats"]?.arrayValue?.first?.objectValue?["latency"]?.objectValue }
            }
        }
        let firstEvent = try next()
        #expect(Self.u(firstEvent, "returns") == 30)
        try run([fx, "--busy=12", "--busy-ns=5000"])
        var seen: UInt64 = 0
        for _ in 0..<10 where seen < 12 {
            let e = try next()
            seen += Self.u(e, "returns") ?? 0
            if let b = e?["buckets"]?.arrayValue { #expect(b.reduce(UInt64(0)) { $0 + UInt64($1.arrayValue?[2].int64Value ?? 0) } == Self.u(e, "returns")) }
        }
        #expect(seen == 12)
    }

    @Test("uprobectl add --latency, stats with CALLS/P50/P99/MAX in human units, hist ID as bars, ls kind")
    func cli() throws {
        let daemon = try TestDaemon()
        let fx = try Self.fixture(daemon)
        let uprobectl = try Paths.product("uprobectl")
        let add = try run([uprobectl, "add", "--socket", daemon.socket, "--latency", "\(fx):lat_sleep1", "\(fx):lat_busy"])
        #expect(add.status == 0, "\(add.err)")
        let ids = add.out.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map(String.init) }
        #expect(ids.count == 2, "\(add.out)")
        let plain = try daemon.register([spec(fx, symbol: "lat_plain")])
        #expect(try run([fx, "--sleep1=10", "--busy=20", "--busy-ns=40000", "--plain=3"]).status == 0)
        let stats = try run([uprobectl, "stats", "--socket", daemon.socket, "--interval", "0"])
        #expect(stats.status == 0, "\(stats.err)")
        let lines = stats.out.split(separator: "\n").map(String.init)
        let header = lines.first?.split(separator: " ", omittingEmptySubsequences: true).map(String.init) ?? []
        #expect(Array(header.prefix(7)) == ["ID", "HITS", "MEAN", "RATE", "CALLS", "P50", "P99"], "\(stats.out)")
        func row(_ id: String) -> [String] {
            lines.first { $0.hasPrefix(id + " ") }?.split(separator: " ", omittingEmptySubsequences: true).map(String.init) ?? []
        }
        let sleep = row(ids[0]), busy = row(ids[1]), counting = row(plain[0])
        #expect(sleep.count > 6 && sleep[3] == "10" && sleep[4].hasSuffix("ms") && sleep[6].hasSuffix("ms"), "\(stats.out)")
        #expect(busy.count > 6 && busy[3] == "20" && busy[4].hasSuffix("µs"), "\(stats.out)")
        #expect(counting.count > 6 && counting[3] == "-" && counting[4] == "-", "\(stats.out)")
        let hist = try run([uprobectl, "hist", "--socket", daemon.socket, ids[1]])
        #expect(hist.status == 0, "\(hist.err)")
        #expect(hist.out.hasPrefix("calls 20, returns 20, in flight 0"), "\(hist.out)")
        let bars = hist.out.split(separator: "\n").filter { $0.hasPrefix("[") }
        let total = bars.compactMap { $0.split(separator: "|").first?.split(separator: " ").last.flatMap { Int($0) } }.reduce(0, +)
        #expect(total == 20 && bars.contains { $0.contains("µs") && $0.contains("@") }, "\(hist.out)")
        let notLatency = try run([uprobectl, "hist", "--socket", daemon.socket, plain[0]])
        #expect(notLatency.status != 0 && notLatency.err.contains("not a latency probe"), "\(notLatency.err)")
        let ls = try run([uprobectl, "ls", "--socket", daemon.socket])
        #expect(ls.out.contains("latency"), "\(ls.out)")
        let both = try run([uprobectl, "add", "--socket", daemon.socket, "--latency", "--retprobe", "\(fx):lat_busy"])
        #expect(both.status != 0)
    }

    @Test("stats sorted by calls, p50, p99 and max ranks latency probes of known durations; no value, then counting probes, last; top, the CLI, a bad key")
    func sortByLatency() throws {
        let daemon = try TestDaemon()
        let fx = try Self.fixture(daemon)
        // The counting probe comes first in id order and has the most hits: it must still rank last.
        let counting = try daemon.register([spec(fx, symbol: "lat_plain")])
        let names = ["lat_plain", "lat_busy", "lat_sleep1", "lat_sleep10", "lat_never"]
        let ids = try daemon.register(names.map { Self.latencySpec(fx, $0) })
        let id = Dictionary(uniqueKeysWithValues: zip(names, ids))
        // Calls: 300, 40, 10, 4, 0. Durations: ~1 µs, 50 µs of busy loop, 1 ms and 10 ms of sleep.
        #expect(try run([fx, "--plain=300", "--busy=40", "--busy-ns=50000", "--sleep1=10", "--sleep10=4"]).status == 0)
        func sorted(_ key: String, top: Int? = nil) throws -> (ids: [String], entries: [JSONObject], total: Int64?) {
            var req: JSONObject = ["op": "stats", "sort": .string(key)]
            if let top { req["top"] = .int(Int64(top)) }
            let r = try daemon.call(req)
            #expect(r["ok"] == .bool(true), "\(r)")
            let entries = (r["stats"]?.arrayValue ?? []).compactMap(\.objectValue)
            return (entries.compactMap { $0["id"]?.stringValue }, entries, r["total"]?.int64Value)
        }
        let tail = [id["lat_never"]!, counting[0]]
        let calls = try sorted("calls")
        #expect(calls.ids == ["lat_plain", "lat_busy", "lat_sleep1", "lat_sleep10"].map { id[$0]! } + tail)
        #expect(calls.entries.map { Self.u($0["latency"]?.objectValue, "calls") } == [300, 40, 10, 4, 0, nil])
        // Medians lie far apart (each within 1/16 of the true duration): their order is known.
        let p50 = try sorted("p50")
        #expect(p50.ids == ["lat_sleep10", "lat_sleep1", "lat_busy", "lat_plain"].map { id[$0]! } + tail,
                "\(p50.entries.map { Self.u($0["latency"]?.objectValue, "p50_ns") })")
        // A tail or a maximum can be stretched by preemption on a loaded machine, so the order is
        // checked against the values of the same reply; 10 ms sleeps stay above 1 µs calls.
        for key in ["p99", "max"] {
            let r = try sorted(key)
            let values = r.entries.map { Self.u($0["latency"]?.objectValue, key + "_ns") }
            #expect(Array(r.ids.suffix(2)) == tail, "\(key): \(r.ids)")
            let measured = values.prefix(4).compactMap { $0 }
            #expect(measured.count == 4 && measured == measured.sorted(by: >), "\(key): \(values)")
            let rank = { (name: String) in r.ids.firstIndex(of: id[name]!) ?? -1 }
            #expect(rank("lat_sleep10") < rank("lat_plain"), "\(key): \(r.ids) \(values)")
        }
        // top: the first rows of the same order, picked by the daemon; total counts every row.
        let top2 = try sorted("p50", top: 2)
        #expect(top2.ids == [id["lat_sleep10"]!, id["lat_sleep1"]!] && top2.total == 6, "\(top2.ids)")
        let cut = try sorted("calls", top: 5)
        #expect(cut.ids == Array(calls.ids.prefix(5)))
        // The CLI: the daemon's top by p50, and a client-side sort by calls (ids named).
        let uprobectl = try Paths.product("uprobectl")
        let cliTop = try run([uprobectl, "stats", "--socket", daemon.socket, "--interval", "0", "--sort", "p50", "--top", "3"])
        #expect(cliTop.status == 0, "\(cliTop.err)")
        let shown = cliTop.out.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map(String.init) }
        #expect(shown == ["lat_sleep10", "lat_sleep1", "lat_busy"].map { id[$0]! }, "\(cliTop.out)")
        let cliCalls = try run([uprobectl, "stats", "--socket", daemon.socket, "--interval", "0", "--sort", "calls"] + ids + counting)
        #expect(cliCalls.status == 0, "\(cliCalls.err)")
        let all = cliCalls.out.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map(String.init) }
        #expect(all == calls.ids, "\(cliCalls.out)")
        // A key that does not exist: a clear error naming the keys; the connection stays usable.
        let c = try daemon.client()
        let bad = try c.call(["op": "stats", "sort": "p95"]).objectValue
        #expect(bad.flatMap(errorCode) == "invalid_request")
        let message = bad?["error"]?.objectValue?["message"]?.stringValue ?? ""
        #expect(message.contains("p99") && message.contains("calls") && message.contains("max"), "\(message)")
        #expect(try c.call(["op": "stats", "sort": 99]).objectValue.flatMap(errorCode) == "invalid_request")
        #expect(try c.call(["op": "status"]).objectValue?["ok"] == .bool(true))
        let cliBad = try run([uprobectl, "stats", "--socket", daemon.socket, "--sort", "p95"])
        #expect(cliBad.status == 2 && cliBad.err.contains("p99"), "\(cliBad.err)")
    }
}
