import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Latency probes across daemon exits: their session program, maps and links are pinned, so
/// calls go on being measured while no daemon runs (their returns included), and a start adopts
/// links and rows, so calls, returns and histograms continue exactly.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct LatencyRestartTests {
    /// The latency fixture, copied into the test dir (path-wide probes see only this copy).
    static func fixture(in dir: String) throws -> String {
        let built = try Fixtures.build("latency", relative: "kernel/latency.c", flags: ["-pthread"])
        let fx = dir + "/latency"
        if !FileManager.default.fileExists(atPath: fx) { try FileManager.default.copyItem(atPath: built, toPath: fx) }
        return fx
    }

    /// Runs `argv` on a background thread; `wait()` returns its exit status.
    final class Background: @unchecked Sendable {
        // @unchecked: `status` is guarded by `cond`.
        private let cond = NSCondition()
        private var status: Int32?
        init(_ argv: [String]) {
            Thread { [self] in
                let s = (try? run(argv))?.status ?? -1
                cond.lock(); status = s; cond.broadcast(); cond.unlock()
            }.start()
        }
        func wait() -> Int32 {
            cond.lock()
            defer { cond.unlock() }
            while status == nil { cond.wait() }
            return status ?? -1
        }
    }

    /// A probe's `latency` object (with buckets).
    static func latency(_ d: ServiceDaemon, _ id: String) throws -> JSONObject {
        try #require(try LatencyProbeTests.entries(d, [id], buckets: true)[id]?["latency"]?.objectValue)
    }

    static func u(_ o: JSONObject, _ key: String) -> UInt64? { LatencyProbeTests.u(o, key) }

    /// The sum of a latency object's bucket counts, and the lowest bucket's lower bound.
    static func buckets(_ l: JSONObject) -> (count: UInt64, lowest: UInt64?) {
        var n: UInt64 = 0, low: UInt64? = nil
        for b in l["buckets"]?.arrayValue ?? [] {
            guard let a = b.arrayValue, a.count == 3, let lo = a[0].int64Value, let c = a[2].int64Value else { continue }
            n += UInt64(c)
            low = min(low ?? UInt64(lo), UInt64(lo))
        }
        return (n, low)
    }

    /// A steady workload (`lat_plain`, one call per ~1 ms in one process), a 1 s call entered
    /// before the exit that returns while no daemon runs, and 5 calls of 10 ms made while no
    /// daemon runs: after the start every count is exact and the histograms hold the calls
    /// made and returned while down.
    func acrossExit(_ exit: (ServiceDaemon) -> Void, name: String) throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let fx = try Self.fixture(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let ids = try d.register(["lat_plain", "lat_sleep10", "lat_sleep_long"].map { LatencyProbeTests.latencySpec(fx, $0) })
        let (plain, sleep10, long) = (ids[0], ids[1], ids[2])
        let calls = 2_000
        let steady = Background([fx, "--plain=\(calls)", "--delay-us=1000"])
        let spanning = Background([fx, "--long=1", "--long-ms=1000"])
        usleep(300_000)
        exit(d)
        #expect(ServiceRestartTests.linkPins(d.pinDir).isEmpty, "\(name): no counting link")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: d.pinDir + "/latency")) ?? []).count == 1,
                "\(name): the latency link stays pinned after the exit")
        // Down: the 1 s call returns, and 5 calls of 10 ms are made and return.
        #expect(try run([fx, "--sleep10=5"]).status == 0)
        #expect(spanning.wait() == 0)
        d = try ServiceDaemon(dir: dir)
        let pins = try ServiceRestartTests.pins(d)
        #expect(pins["adopted_latency_links"] == .int(1) && pins["adopted_probes"] == .int(3) && pins["rebuilt_probes"] == .int(0),
                "\(name): \(pins)")
        #expect(pins["objects_adopted"]?.arrayValue?.contains(.string("lat_rows")) == true, "\(name): \(pins)")
        #expect(steady.wait() == 0)

        let p = try Self.latency(d, plain)
        #expect(Self.u(p, "calls") == UInt64(calls) && Self.u(p, "returns") == UInt64(calls), "\(name): \(p)")
        #expect(Self.u(p, "in_flight") == 0 && Self.u(p, "unobserved") == 0, "\(name): \(p)")
        #expect(Self.buckets(p).count == UInt64(calls), "\(name): every call is in the histogram once")
        #expect(try d.hits()[plain] == UInt64(calls), "\(name): hits are calls")

        let s = try Self.latency(d, sleep10)
        #expect(Self.u(s, "calls") == 5 && Self.u(s, "returns") == 5 && Self.buckets(s).count == 5, "\(name): \(s)")
        #expect((Self.u(s, "min_ns") ?? 0) >= 10_000_000, "\(name): the calls made while down were measured: \(s)")

        let l = try Self.latency(d, long)
        #expect(Self.u(l, "calls") == 1 && Self.u(l, "returns") == 1 && Self.u(l, "in_flight") == 0, "\(name): \(l)")
        #expect((Self.u(l, "min_ns") ?? 0) >= 1_000_000_000, "\(name): the call entered before the exit was measured whole: \(l)")

        // And on from there: the next calls add to the same rows.
        #expect(try run([fx, "--sleep10=2"]).status == 0)
        let more = try Self.latency(d, sleep10)
        #expect(Self.u(more, "calls") == 7 && Self.buckets(more).count == 7, "\(name): \(more)")
        #expect(d.stop() == 0)
        // A start after a clean stop with nothing new reports the same histograms.
        d = try ServiceDaemon(dir: dir)
        #expect(try Self.latency(d, sleep10) == more)
        #expect(try Self.latency(d, plain) == p)
        #expect(d.stop() == 0)
    }

    @Test("SIGKILL with a latency probe under a steady workload, calls made and returned while down: calls, returns and histograms exact, down-time calls measured")
    func exactThroughKill() throws {
        try acrossExit({ $0.kill9() }, name: "SIGKILL")
    }

    @Test("SIGTERM with a latency probe under a steady workload, calls made and returned while down: calls, returns and histograms exact, down-time calls measured")
    func exactThroughStop() throws {
        try acrossExit({ #expect($0.stop() == 0) }, name: "SIGTERM")
    }

    @Test("kill -9 in the middle of a latency link's make-before-break (new link attached, old one not closed): the start closes the older link once its calls returned; calls and returns exact")
    func killInHandoff() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let fx = try Self.fixture(in: dir)
        let latencyPins = { (d: ServiceDaemon) in (try? FileManager.default.contentsOfDirectory(atPath: d.pinDir + "/latency")) ?? [] }
        // Compaction at once; every link close held 5 s (UPROBED_TEST_CLOSE_DELAY_MS).
        var d = try ServiceDaemon(dir: dir, config: "compaction_delay_ms = 0\n", environment: ["UPROBED_TEST_CLOSE_DELAY_MS": "5000"])
        let ids = try d.register(["lat_plain", "lat_sleep10"].map { LatencyProbeTests.latencySpec(fx, $0) })
        let calls = 2_000
        let steady = Background([fx, "--plain=\(calls)", "--delay-us=1000"])
        usleep(200_000)
        // Dropping lat_sleep10 rebuilds the link with lat_plain alone; the old link's close is held.
        #expect(try d.call(["op": "unregister", "probes": [.string(ids[1])]])["removed"] == .int(1))
        let deadline = Date().addingTimeInterval(30)
        while latencyPins(d).count < 2 && Date() < deadline { usleep(5_000) }
        try #require(latencyPins(d).count == 2, "new and old latency link both pinned: \(latencyPins(d))")
        d.kill9()
        usleep(300_000)  // both links attached, hand-off on, no daemon
        d = try ServiceDaemon(dir: dir, config: "compaction_delay_ms = 0\n")
        let pins = try ServiceRestartTests.pins(d)
        #expect(pins["handoffs_ended"] == .int(1) && pins["adopted_probes"] == .int(1) && pins["adopted_latency_links"] == .int(1),
                "\(pins)")
        #expect(latencyPins(d).count == 1)
        #expect(steady.wait() == 0)
        let l = try Self.latency(d, ids[0])
        #expect(Self.u(l, "calls") == UInt64(calls) && Self.u(l, "returns") == UInt64(calls), "not one call lost or counted twice: \(l)")
        #expect(Self.u(l, "in_flight") == 0 && Self.u(l, "unobserved") == 0 && Self.buckets(l).count == UInt64(calls), "\(l)")
        #expect(d.stop() == 0)
    }

    @Test("a changed latency program (test knob) moves pinned latency links to it make-before-break under a steady workload: calls and returns exact")
    func programChange() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let fx = try Self.fixture(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let ids = try d.register([LatencyProbeTests.latencySpec(fx, "lat_plain"), spec(fx, symbol: "lat_plain")])
        let calls = 2_000
        let steady = Background([fx, "--plain=\(calls)", "--delay-us=1000"])
        usleep(300_000)
        d.kill9()
        let before = (try? FileManager.default.contentsOfDirectory(atPath: d.pinDir + "/latency")) ?? []
        d = try ServiceDaemon(dir: dir, environment: ["UPROBED_TEST_PROGRAM_VARIANT": "1"])
        let pins = try ServiceRestartTests.pins(d)
        #expect(pins["migrated_links"] == .int(2), "the latency link and the counting link moved: \(pins)")
        let created = Set(pins["objects_created"]?.arrayValue?.compactMap(\.stringValue) ?? [])
        #expect(created == ["prog_count", "prog_latency"], "\(pins)")
        let after = (try? FileManager.default.contentsOfDirectory(atPath: d.pinDir + "/latency")) ?? []
        #expect(after.count == 1 && Set(after).isDisjoint(with: before), "a new latency link: \(before) -> \(after)")
        #expect(steady.wait() == 0)
        let l = try Self.latency(d, ids[0])
        #expect(Self.u(l, "calls") == UInt64(calls) && Self.u(l, "returns") == UInt64(calls), "\(l)")
        #expect(Self.u(l, "in_flight") == 0 && Self.u(l, "unobserved") == 0 && Self.buckets(l).count == UInt64(calls), "\(l)")
        #expect(try d.hits()[ids[1]] == UInt64(calls), "the counting neighbour too")
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir, environment: ["UPROBED_TEST_PROGRAM_VARIANT": "1"])
        #expect(try ServiceRestartTests.pins(d)["migrated_links"] == .int(0))
        #expect(d.stop() == 0)
    }

    @Test("a changed latency_capacity removes the latency pins and attaches latency probes again from their saved histograms; counting probes are adopted as usual")
    func latencyCapacityChange() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let fx = try Self.fixture(in: dir)
        var d = try ServiceDaemon(dir: dir, config: "latency_capacity = 8\n")
        let ids = try d.register([LatencyProbeTests.latencySpec(fx, "lat_sleep10"), spec(fx, symbol: "lat_sleep10")])
        #expect(try run([fx, "--sleep10=3"]).status == 0)
        let before = try Self.latency(d, ids[0])
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir, config: "latency_capacity = 16\n")
        let pins = try ServiceRestartTests.pins(d)
        #expect(pins["latency_pins_removed"] == .int(5) && pins["rebuilt_probes"] == .int(1) && pins["adopted_probes"] == .int(1),
                "four latency objects and one latency link: \(pins)")
        #expect(d.log.contains("pinned latency objects cannot be used"), "\(d.log)")
        #expect(try Self.latency(d, ids[0]) == before, "the saved histogram is back")
        #expect(try run([fx, "--sleep10=2"]).status == 0)
        let after = try Self.latency(d, ids[0])
        #expect(Self.u(after, "calls") == 5 && Self.u(after, "returns") == 5 && Self.buckets(after).count == 5, "\(after)")
        #expect(try d.hits()[ids[1]] == 5)
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir, config: "latency_capacity = 16\n")
        #expect(try ServiceRestartTests.pins(d)["adopted_latency_links"] == .int(1), "pinned again on the new maps")
        #expect(try Self.latency(d, ids[0]) == after)
        #expect(d.stop() == 0)
    }

    @Test("a pinned latency link no registration owns is detached at start and its row freed; latency objects left without links are unpinned")
    func staleLatencyPins() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let fx = try Self.fixture(in: dir)
        var d = try ServiceDaemon(dir: dir, config: "latency_capacity = 1\n")
        _ = try d.register([LatencyProbeTests.latencySpec(fx, "lat_sleep10")])
        #expect(try run([fx, "--sleep10=3"]).status == 0)
        d.kill9()
        try FileManager.default.removeItem(atPath: d.stateDir)
        d = try ServiceDaemon(dir: dir, config: "latency_capacity = 1\n")
        let pins = try ServiceRestartTests.pins(d)
        #expect(pins["stale_links"] == .int(1) && pins["adopted_links"] == .int(0), "\(pins)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: d.pinDir + "/latency")) ?? []).isEmpty)
        // The one row is free and empty: a new probe gets it and starts from zero.
        let ids = try d.register([LatencyProbeTests.latencySpec(fx, "lat_sleep10")])
        #expect(try run([fx, "--sleep10=2"]).status == 0)
        let l = try Self.latency(d, ids[0])
        #expect(Self.u(l, "calls") == 2 && Self.buckets(l).count == 2, "\(l)")
        #expect(try d.call(["op": "unregister", "probes": [.string(ids[0])]])["removed"] == .int(1))
        let deadline = Date().addingTimeInterval(30)
        while !(((try? FileManager.default.contentsOfDirectory(atPath: d.pinDir + "/latency")) ?? []).isEmpty) && Date() < deadline {
            usleep(10_000)
        }
        #expect(d.stop() == 0)
        // No latency link left: the next start unpins the latency objects.
        d = try ServiceDaemon(dir: dir, config: "latency_capacity = 1\n")
        #expect(try ServiceRestartTests.pins(d)["latency_pins_removed"] == .int(4))
        #expect(!FileManager.default.fileExists(atPath: d.pinDir + "/lat_rows"))
        #expect(d.stop() == 0)
    }
}
