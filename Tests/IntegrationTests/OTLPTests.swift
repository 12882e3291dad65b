import Foundation
import Testing
import UprobedProtocol

/// uprobed's OTLP/HTTP exporter against a receiver of the tests' own (Tests/OTLPReceiver:
/// Python with the OpenTelemetry project's opentelemetry-proto decoding each
/// ExportMetricsServiceRequest): what arrives is what the probes counted, under the names,
/// attributes and resource the docs promise, and a collector that is down or stuck costs the
/// daemon nothing but one log line per outage.
@Suite(.enabled(if: Kernel.enabled && (Kernel.required || OTLPReceiver.installed),
                "needs root, a kernel with uprobe_multi and the receiver's venv (Tests/OTLPReceiver/venv.sh; set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct OTLPTests {
    @Test("Pushes carry the exact hits with the Prometheus endpoint's metrics, labels as attributes, and the resource; a reload moves them")
    func pushedToReceiver() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (d, receiver, port, metricsPort) = try Self.pushing(dir: dir, config: "otlp_headers = x-test-token=abc%20def")
        defer { receiver.stop() }
        let target = try d.privateTarget()
        let ids = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "otlp-test")
        try #require(ids.count == 2)
        let (a, b) = (ids[0], ids[1])
        try run([target, "1234", "56"])
        let ended = Date()

        // Exact, and read when pushed: the first push whose data points were taken after the
        // workload ended carries what the probes counted (a sample taken on a timer of its own
        // could be up to an interval older than its push).
        let push = try receiver.waitFor("a push read after the workload", seconds: 15) { p in
            p.metric("uprobed_probe_hits")?.points.first.map { Double($0.timeNs) / 1e9 > ended.timeIntervalSince1970 } == true
        }
        #expect(push.hits(a) == 1234 && push.hits(b) == 56, "\(String(describing: push.hits(a))), \(String(describing: push.hits(b)))")
        let hits = try #require(push.metric("uprobed_probe_hits"))
        #expect(hits.kind == "sum" && hits.monotonic == true && hits.temporality == 2, "a cumulative monotonic sum: \(hits)")
        #expect(hits.description.hasPrefix("Hits of one probe since it was registered"))
        let pa = try #require(hits.points.first { $0.attributes["id"] as? String == a })
        #expect(pa.attributes["path"] as? String == target && pa.attributes["symbol"] as? String == "fn_a"
                && pa.attributes["consumer"] as? String == "otlp-test" && pa.attributes.count == 4, "\(pa.attributes)")
        #expect(push.resource["service.name"] as? String == "uprobed")
        #expect(push.resource["service.version"] as? String == (try d.status()["version"]?.stringValue))
        #expect(push.resource["host.name"] as? String == ProcessInfo.processInfo.hostName)
        #expect(push.headers["x-test-token"] == "abc def" && push.headers["content-type"] == "application/x-protobuf")
        #expect(push.metric("uprobed_probes")?.points.first?.value == 2)
        #expect(push.metric("uprobed_probes")?.kind == "gauge")
        #expect(push.metric("uprobed_last_batch_seconds")?.unit == "s")
        #expect(push.metric("uprobed_build_info")?.points.first?.attributes["version"] as? String
                == (try d.status()["version"]?.stringValue))

        // The same metrics as the Prometheus endpoint: every name there is here (counters
        // without `_total`), and nothing else.
        let prometheus = try Self.prometheusNames(port: metricsPort)
        #expect(!prometheus.isEmpty && Set(push.metrics.map(\.name)) == prometheus,
                "only in Prometheus: \(prometheus.subtracting(push.metrics.map(\.name))); only in OTLP: \(Set(push.metrics.map(\.name)).subtracting(prometheus))")

        // More calls: the next pushes follow exactly. A removed probe's series ends.
        try run([target, "766", "0"])
        let later = try receiver.waitFor("2,000 hits of \(a)", seconds: 15) { $0.hits(a) == 2000 }
        // One cumulative series: the same start time in every push, before the points' times.
        let laterA = try #require(later.metric("uprobed_probe_hits")?.points.first { $0.attributes["id"] as? String == a })
        #expect(laterA.startNs == pa.startNs && pa.startNs > 0 && pa.startNs < pa.timeNs && pa.timeNs < laterA.timeNs)
        // Pushes the collector took are counted (a push knows of those before it: not the first).
        #expect((later.metric("uprobed_otlp_exports")?.points.first?.value ?? 0) >= 1, "the pushes the collector took are counted")
        let removed = try d.call(["op": "unregister", "probes": [.string(b)]])
        #expect(removed["removed"]?.int64Value == 1)
        let after = try receiver.waitFor("a push without \(b)", seconds: 15) { $0.hits(b) == nil && $0.hits(a) != nil }
        #expect(after.hits(a) == 2000)

        // A reload with a bad URL is refused and the pushes go on; a good one moves them.
        let confPath = d.dir + "/uprobed.conf"
        let good = try String(contentsOfFile: confPath, encoding: .utf8)
        try good.replacingOccurrences(of: "http://127.0.0.1:\(port)", with: "ftp://127.0.0.1:\(port)")
            .write(toFile: confPath, atomically: true, encoding: .utf8)
        kill(d.process.processIdentifier, SIGHUP)
        try waitForLog(d, "config reload refused", seconds: 10)
        #expect(d.log.contains("otlp_endpoint must be empty or an http:// or https:// URL"), "\(d.log)")
        let before = receiver.records().count
        _ = try receiver.waitFor("pushes after the refused reload", seconds: 10) { _ in receiver.records().count >= before + 2 }

        let port2 = try freeLoopbackPort()
        let second = try OTLPReceiver(port: port2, out: dir + "/otlp2.jsonl")
        defer { second.stop() }
        try good.replacingOccurrences(of: "http://127.0.0.1:\(port)", with: "http://127.0.0.1:\(port2)/v1/metrics")
            .write(toFile: confPath, atomically: true, encoding: .utf8)
        kill(d.process.processIdentifier, SIGHUP)
        let moved = try second.waitFor("a push to the new endpoint", seconds: 15) { $0.hits(a) == 2000 }
        #expect(moved.hits(a) == 2000)
        let firstCount = receiver.records().count
        usleep(1_000_000)
        #expect(receiver.records().count <= firstCount + 1, "the old endpoint still gets pushes after the move")
        #expect(!d.log.contains("OTLP push failed"), "\(d.log)")
        #expect(d.stop() == 0)
    }

    @Test("A collector that is down, then stuck, then back: the daemon serves throughout, logs the outage once, and the exact count arrives")
    func collectorDownStuckAndBack() throws {
        try #require(OTLPReceiver.installed, "the OTLP receiver's venv is missing: run Tests/OTLPReceiver/venv.sh (make test does)")
        let (port, metricsPort) = (try freeLoopbackPort(), try freeLoopbackPort())
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let d = try TestDaemon(config: """
            otlp_endpoint = http://127.0.0.1:\(port)
            otlp_interval_ms = 300
            otlp_timeout_ms = 200
            metrics_listen = 127.0.0.1:\(metricsPort)
            """)
        let target = try d.privateTarget()
        let a = try #require(try d.register([spec(target, symbol: "fn_a")], consumer: "otlp-down").first)
        try run([target, "500", "0"])

        func failures() throws -> Double { try prometheusValue(port: metricsPort, "uprobed_otlp_export_failures_total") }
        // Down: nothing listens. The daemon serves, and the failures are counted, logged once.
        try waitUntil("3 failed pushes", seconds: 15) { try failures() >= 3 }
        #expect(try d.hits([a])[a] == 500)
        #expect(try prometheusValue(port: metricsPort, "uprobed_otlp_exports_total") == 0)
        let service = try d.status()["service"]?.objectValue
        #expect(service?["otlp_exports"] == .int(0) && (service?["otlp_export_failures"]?.int64Value ?? 0) >= 3, "status: \(String(describing: service))")

        // Stuck: a listener that accepts and never answers. Each push gives up after
        // otlp_timeout_ms; requests are still answered.
        func openFiles() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(d.process.processIdentifier)/fd").count) ?? -1 }
        let filesBefore = openFiles()
        let stuck = try OTLPReceiver(port: port, out: dir + "/unused.jsonl", hang: true)
        let atStuck = try failures()
        try waitUntil("3 more failed pushes (timeouts)", seconds: 15) { try failures() >= atStuck + 3 }
        try run([target, "500", "0"])
        #expect(try d.hits([a])[a] == 1000)
        // A push that timed out leaves no connection behind (the listener keeps its end open).
        #expect(openFiles() <= filesBefore + 2, "open files: \(filesBefore) before the stuck collector, \(openFiles()) after")
        stuck.stop()
        #expect(d.log.components(separatedBy: "OTLP push failed").count - 1 == 1, "one warning per outage:\n\(d.log)")

        // Back: the next pushes arrive with the exact count, and the recovery is logged.
        let receiver = try OTLPReceiver(port: port, out: dir + "/otlp.jsonl")
        defer { receiver.stop() }
        _ = try receiver.waitFor("1,000 hits of \(a)", seconds: 15) { $0.hits(a) == 1000 }
        try waitForLog(d, "OTLP push succeeded again", seconds: 10)
        let recovery = d.log.split(separator: "\n").first { $0.contains("OTLP push succeeded again") }.map(String.init) ?? ""
        let failed = recovery.split(separator: " ").first { $0.hasPrefix("failed_pushes=") }.flatMap { Int($0.dropFirst(14)) } ?? 0
        #expect(failed >= 6, "the recovery names the failed pushes: \(recovery)")
        #expect(d.log.components(separatedBy: "OTLP push failed").count - 1 == 1, "\(d.log)")
        #expect(d.stop() == 0)
    }

    @Test("Latency probes are OTLP histograms with the Prometheus name, labels and le bounds: count, sum, min, max and every bucket exactly as stats says; calls in flight as a gauge")
    func latencyHistograms() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (d, receiver, _, metricsPort) = try Self.pushing(dir: dir)
        defer { receiver.stop() }
        let fx = try LatencyProbeTests.fixture(d)
        let names = ["lat_busy", "lat_sleep1", "lat_exit_mid"]
        let ids = try d.register(names.map { LatencyProbeTests.latencySpec(fx, $0) }, consumer: "otlp-latency")
        let plain = try d.register([spec(fx, symbol: "lat_plain")])
        try #require(ids.count == 3 && plain.count == 1)
        // Durations from ~µs to ms, spread over several power-of-two bounds; two calls that never
        // return (their threads exit inside).
        #expect(try run([fx, "--busy=40", "--busy-ns=3000", "--sleep1=6", "--recurse=0", "--exiters=2", "--plain=5"]).status == 0)

        /// Checks one push against `stats` read after the workload: every latency probe's point.
        func check(_ push: OTLPReceiver.Push, _ stats: [String: JSONObject]) throws {
            let metric = try #require(push.metric("uprobed_probe_latency_seconds"))
            #expect(metric.kind == "histogram" && metric.temporality == 2 && metric.unit == "s", "\(metric)")
            #expect(metric.description.hasPrefix("Duration of the calls of a latency probe"))
            #expect(metric.points.count == 3, "one series per latency probe, none for the counting one")
            for (name, id) in zip(names, ids) {
                let l = try #require(stats[id]?["latency"]?.objectValue)
                let p = try #require(push.latency(id), "\(name)")
                #expect(p.attributes["path"] as? String == fx && p.attributes["symbol"] as? String == name
                        && p.attributes["consumer"] as? String == "otlp-latency" && p.attributes.count == 4, "\(p.attributes)")
                // The bounds: 2^7 … 2^42 ns, the Prometheus endpoint's le edges.
                #expect(p.explicitBounds == (7...42).map { Double(UInt64(1) << UInt64($0)) / 1e9 }, "\(p.explicitBounds)")
                let returns = try #require(LatencyProbeTests.u(l, "returns"))
                #expect(p.count == returns, "\(name): count \(String(describing: p.count)), returns \(returns)")
                // Per OTLP bucket, the calls of the daemon's buckets below its bound and at or above the previous one.
                var expected = [UInt64](repeating: 0, count: 37)
                for b in l["buckets"]?.arrayValue ?? [] {
                    let f = b.arrayValue ?? []
                    let count = UInt64(f[2].int64Value ?? 0)
                    guard let upper = f[1].int64Value else { expected[36] += count; continue }
                    let bound: UInt64 = UInt64(upper)
                    let k: Int? = (7...42).first { (k: Int) -> Bool in bound <= (UInt64(1) << UInt64(k)) }
                    let j: Int = k.map { $0 - 7 } ?? 36
                    expected[j] += count
                }
                #expect(p.bucketCounts == expected, "\(name): \(p.bucketCounts) vs \(expected)")
                guard returns > 0 else {
                    #expect(p.min == nil && p.max == nil && (p.sum ?? 0) == 0, "\(name): no call returned")
                    continue
                }
                let sum = Double(try #require(LatencyProbeTests.u(l, "sum_ns"))) / 1e9
                let (minS, maxS) = (Double(try #require(LatencyProbeTests.u(l, "min_ns"))) / 1e9, Double(try #require(LatencyProbeTests.u(l, "max_ns"))) / 1e9)
                // Sums of doubles: exact up to rounding (far below a nanosecond).
                #expect(abs((p.sum ?? -1) - sum) <= sum * 1e-12, "\(name): sum \(String(describing: p.sum)) vs \(sum)")
                #expect(abs((p.min ?? -1) - minS) <= minS * 1e-15 && abs((p.max ?? -1) - maxS) <= maxS * 1e-15,
                        "\(name): min \(String(describing: p.min)) vs \(minS), max \(String(describing: p.max)) vs \(maxS)")
            }
            let inFlight = try #require(push.metric("uprobed_probe_calls_in_flight"))
            #expect(inFlight.kind == "gauge" && inFlight.points.count == 3)
            for id in ids {
                let point = inFlight.points.first { $0.attributes["id"] as? String == id }
                #expect(point?.value == Double(LatencyProbeTests.u(stats[id]?["latency"]?.objectValue, "in_flight") ?? 99), "\(id)")
            }
        }
        let stats = try LatencyProbeTests.entries(d, ids, buckets: true)
        #expect(LatencyProbeTests.u(stats[ids[2]]?["latency"]?.objectValue, "in_flight") == 2)
        let ended = Date()
        let push = try receiver.waitFor("a push read after the workload", seconds: 15) { p in
            p.latency(ids[0]).map { Double($0.timeNs) / 1e9 > ended.timeIntervalSince1970 } == true
        }
        try check(push, stats)

        // The same names as the Prometheus endpoint, the histogram included.
        let prometheus = try Self.prometheusNames(port: metricsPort)
        #expect(prometheus.contains("uprobed_probe_latency_seconds") && Set(push.metrics.map(\.name)) == prometheus,
                "only in Prometheus: \(prometheus.subtracting(push.metrics.map(\.name))); only in OTLP: \(Set(push.metrics.map(\.name)).subtracting(prometheus))")

        // More calls: the next pushes carry the new totals in the same cumulative series.
        #expect(try run([fx, "--busy=25", "--busy-ns=200000", "--sleep1=3", "--recurse=0"]).status == 0)
        let stats2 = try LatencyProbeTests.entries(d, ids, buckets: true)
        let returns2 = LatencyProbeTests.u(stats2[ids[0]]?["latency"]?.objectValue, "returns")
        #expect(returns2 == 65)
        let later = try receiver.waitFor("\(ids[0]) with 65 returned calls", seconds: 15) { $0.latency(ids[0])?.count == 65 }
        try check(later, stats2)
        #expect(later.latency(ids[0])?.startNs == push.latency(ids[0])?.startNs)
        #expect(!d.log.contains("OTLP push failed"), "\(d.log)")
        #expect(d.stop() == 0)
    }

    /// A receiver on a free port in `dir` and a daemon pushing to it every 250 ms (plus the
    /// `config` lines), with a Prometheus endpoint on another port.
    static func pushing(dir: String, config: String = "") throws -> (TestDaemon, OTLPReceiver, port: UInt16, metricsPort: UInt16) {
        try #require(OTLPReceiver.installed, "the OTLP receiver's venv is missing: run Tests/OTLPReceiver/venv.sh (make test does)")
        let (port, metricsPort) = (try freeLoopbackPort(), try freeLoopbackPort())
        let receiver = try OTLPReceiver(port: port, out: dir + "/otlp.jsonl")
        let d = try TestDaemon(config: """
            otlp_endpoint = http://127.0.0.1:\(port)
            otlp_interval_ms = 250
            metrics_listen = 127.0.0.1:\(metricsPort)
            \(config)
            """)
        return (d, receiver, port, metricsPort)
    }

    /// The metric names a scrape of the Prometheus endpoint has, as OTLP names them (counters
    /// without `_total`).
    static func prometheusNames(port: UInt16) throws -> Set<String> {
        let (_, text) = try httpGet(port: port, path: "/metrics")
        var names = Set<String>()
        for line in text.split(separator: "\n") where line.hasPrefix("# TYPE ") {
            let f = line.split(separator: " ")
            guard f.count == 4 else { continue }
            names.insert(f[3] == "counter" && f[2].hasSuffix("_total") ? String(f[2].dropLast(6)) : String(f[2]))
        }
        return names
    }

    @Test("A bad otlp_endpoint stops the start with the key and line named")
    func badEndpointRefusesStart() throws {
        for (value, why) in [("ftp://collector:4318", "has scheme 'ftp'"), ("http://", "has no host"),
                             ("http://u:p@collector:4318", "has user info"), ("collector:4318", "has scheme 'collector'")] {
            let dir = try ServiceDaemon.makeDir()
            defer { removeServiceDir(dir) }
            try "otlp_endpoint = \(value)\n".write(toFile: dir + "/uprobed.conf", atomically: true, encoding: .utf8)
            let r = try run([try Paths.product("uprobed"), "--socket", dir + "/s.sock", "--state-dir", dir + "/state",
                             "--config", dir + "/uprobed.conf"])
            #expect(r.status != 0)
            #expect(r.err.contains("line 1") && r.err.contains("otlp_endpoint must be empty or an http:// or https:// URL")
                    && r.err.contains(why), "\(value): \(r.err)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/s.sock"), "it must not serve")
        }
    }
}

/// Polls `condition` every 100 ms for at most `seconds`; throws on timeout.
private func waitUntil(_ what: String, seconds: Double, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    repeat {
        if try condition() { return }
        usleep(100_000)
    } while Date() < deadline
    throw TestFailure("no \(what) within \(seconds) s")
}

private func waitForLog(_ d: TestDaemon, _ text: String, seconds: Double) throws {
    do { try waitUntil("'\(text)' in the log", seconds: seconds) { d.log.contains(text) } } catch {
        throw TestFailure("\(error); the log:\n\(d.log)")
    }
}

/// One unlabelled series of the Prometheus endpoint.
private func prometheusValue(port: UInt16, _ name: String) throws -> Double {
    let (_, text) = try httpGet(port: port, path: "/metrics")
    for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
        if let v = Double(line.split(separator: " ")[1]) { return v }
    }
    throw TestFailure("\(name) not in the scrape:\n\(text)")
}

/// The test receiver (Tests/OTLPReceiver/receiver.py) on a loopback port, run with the venv
/// `venv.sh` makes; every request it decoded is one JSON line in `out`.
final class OTLPReceiver: @unchecked Sendable {
    // @unchecked: only the owning test touches it.
    static let python = Paths.repo.appendingPathComponent(".build-otlp/venv/bin/python").path
    static var installed: Bool { FileManager.default.isExecutableFile(atPath: python) }

    let port: UInt16
    let out: String
    private let process = Process()

    init(port: UInt16, out: String, hang: Bool = false) throws {
        self.port = port
        self.out = out
        process.executableURL = URL(fileURLWithPath: Self.python)
        process.arguments = [Paths.repo.appendingPathComponent("Tests/OTLPReceiver/receiver.py").path, "\(port)", out] + (hang ? ["--hang"] : [])
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try process.run()
        // Listening once a connection is accepted.
        let deadline = Date().addingTimeInterval(15)
        while Date() < deadline {
            guard process.isRunning else { throw TestFailure("receiver.py exited with \(process.terminationStatus)") }
            if Self.accepts(port) { return }
            usleep(50_000)
        }
        throw TestFailure("receiver.py does not listen on \(port)")
    }

    private static func accepts(_ port: UInt16) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }

    /// SIGKILL (the test runner's blocked signal mask is inherited) and reap.
    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }

    struct Point {
        var attributes: [String: Any]
        var value: Double
        var startNs: UInt64
        var timeNs: UInt64
        /// A histogram's point: count, sum, min, max, per-bucket counts and bounds.
        var count: UInt64? = nil
        var sum: Double? = nil
        var min: Double? = nil
        var max: Double? = nil
        var bucketCounts: [UInt64] = []
        var explicitBounds: [Double] = []
    }
    struct Metric {
        var name, description, unit, kind: String
        var monotonic: Bool?
        var temporality: Int?
        var points: [Point]
    }
    struct Push {
        var headers: [String: String]
        var resource: [String: Any]
        var metrics: [Metric]
        func metric(_ name: String) -> Metric? { metrics.first { $0.name == name } }
        /// The value of `uprobed_probe_hits{id}` in this push, if it has that series.
        func hits(_ id: String) -> UInt64? {
            metric("uprobed_probe_hits")?.points.first { $0.attributes["id"] as? String == id }.map { UInt64($0.value) }
        }
        /// The point of `uprobed_probe_latency_seconds{id}` in this push, if it has that series.
        func latency(_ id: String) -> Point? {
            metric("uprobed_probe_latency_seconds")?.points.first { $0.attributes["id"] as? String == id }
        }
    }

    /// Every push received so far, oldest first (one resource and scope each, as uprobed sends).
    func records() -> [Push] {
        guard let text = try? String(contentsOfFile: out, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let resources = o["resources"] as? [[String: Any]], let r = resources.first else { return nil }
            let metrics = ((r["scopes"] as? [[String: Any]]) ?? []).flatMap { ($0["metrics"] as? [[String: Any]]) ?? [] }.map { m in
                Metric(name: m["name"] as? String ?? "", description: m["description"] as? String ?? "",
                       unit: m["unit"] as? String ?? "", kind: m["kind"] as? String ?? "",
                       monotonic: m["monotonic"] as? Bool, temporality: m["temporality"] as? Int,
                       points: ((m["points"] as? [[String: Any]]) ?? []).map {
                           Point(attributes: $0["attributes"] as? [String: Any] ?? [:], value: ($0["value"] as? NSNumber)?.doubleValue ?? .nan,
                                 startNs: ($0["start_ns"] as? NSNumber)?.uint64Value ?? 0, timeNs: ($0["time_ns"] as? NSNumber)?.uint64Value ?? 0,
                                 count: ($0["count"] as? NSNumber)?.uint64Value, sum: ($0["sum"] as? NSNumber)?.doubleValue,
                                 min: ($0["min"] as? NSNumber)?.doubleValue, max: ($0["max"] as? NSNumber)?.doubleValue,
                                 bucketCounts: (($0["bucket_counts"] as? [NSNumber]) ?? []).map(\.uint64Value),
                                 explicitBounds: (($0["explicit_bounds"] as? [NSNumber]) ?? []).map(\.doubleValue))
                       })
            }
            return Push(headers: o["headers"] as? [String: String] ?? [:], resource: r["attributes"] as? [String: Any] ?? [:],
                        metrics: metrics)
        }
    }

    /// The first push (oldest first) that satisfies `condition`, waiting up to `seconds`.
    func waitFor(_ what: String, seconds: Double, _ condition: (Push) -> Bool) throws -> Push {
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            if let p = records().first(where: condition) { return p }
            usleep(100_000)
        } while Date() < deadline
        throw TestFailure("the receiver on \(port) got no push with \(what) within \(seconds) s (\(records().count) pushes)")
    }
}
