import Foundation
import Testing
import UprobedProtocol

/// A real Prometheus server (Debian's `prometheus`) scraping a real uprobed: what its query API
/// answers for a probe is what the probe counted.
@Suite(.enabled(if: Kernel.enabled && (Kernel.required || PrometheusServer.installed),
                "needs root, a kernel with uprobe_multi and /usr/bin/prometheus (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct PrometheusTests {
    @Test("Prometheus scrapes uprobed: a probe's hits are exact in its query API, and rate() matches a known steady rate")
    func scrapedByPrometheus() throws {
        try #require(PrometheusServer.installed, "prometheus missing: apt-get install prometheus (make deps)")
        let metricsPort = try freeLoopbackPort()
        let d = try TestDaemon(config: "metrics_listen = 127.0.0.1:\(metricsPort)\n")
        let target = try d.privateTarget()  // its own inode: other tests' runs of the fixture do not count here
        let ids = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "prom-test")
        try #require(ids.count == 2)
        let (a, b) = (ids[0], ids[1])
        try run([target, "1234", "56"])

        let prom = try PrometheusServer(dir: d.dir, scrapeTarget: "127.0.0.1:\(metricsPort)")
        defer { prom.stop() }
        try prom.waitReady(seconds: 20)
        // Two scrapes stored: the value is not an accident of one scrape.
        try prom.waitUntil("two scrapes of uprobed", seconds: 15) {
            try prom.query("count_over_time(uprobed_probe_hits_total{id=\"\(a)\"}[1m])").first?.value ?? 0 >= 2
        }

        // Exact hits, and the labels that identify the probe.
        let hitsA = try prom.query("uprobed_probe_hits_total{id=\"\(a)\"}")
        #expect(hitsA.count == 1 && hitsA.first?.value == 1234, "\(hitsA)")
        #expect(hitsA.first?.labels["symbol"] == "fn_a" && hitsA.first?.labels["path"] == target
                && hitsA.first?.labels["consumer"] == "prom-test", "\(hitsA)")
        #expect(try prom.query("uprobed_probe_hits_total{id=\"\(b)\"}").first?.value == 56)
        #expect(try prom.query("up{job=\"uprobed\"}").first?.value == 1)

        // A steady known rate: a burst of 500 calls every 100 ms (5,000 hits/s) for 7 s, each
        // burst started on its own deadline (late ones catch up rather than shift the rest).
        // Every finished burst is logged with its wall-clock time, which is what Prometheus
        // stamps its samples with.
        let burst = 500, tick = 0.1, bursts = 70
        let start = Date()
        var finished: [Date] = []
        for k in 0..<bursts {
            let due = start.addingTimeInterval(Double(k) * tick)
            let wait = due.timeIntervalSinceNow
            if wait > 0 { usleep(useconds_t(wait * 1e6)) }
            try run([target, "\(burst)", "0"])
            finished.append(Date())
        }
        let end = finished.last ?? Date()
        let total = 1234 + Double(burst * bursts)

        // Exact again once a scrape after the workload is stored (no more calls: the value can
        // only reach the total, never pass it).
        var last = 0.0
        let reached = try prom.waitUntil("a scrape after the workload", seconds: 10, failing: false) {
            last = try prom.query("uprobed_probe_hits_total{id=\"\(a)\"}").first?.value ?? 0
            return last == total
        }
        #expect(reached, "Prometheus has \(last) hits for \(a), the workload made \(total)")

        // rate() over 5 s, evaluated 0.3 s before the last burst ended, so the whole window
        // lies inside the workload. The rate the workload really ran at in that window comes
        // from its own log (on a loaded machine it falls behind its 5,000/s; what is compared
        // is what it did). rate() is not an exact count: it takes the increase between the
        // first and last samples inside the window and extrapolates it to the window's edges.
        // The error has two parts, each taken from this run: the bursts make the counter a
        // staircase (a sample may land just before or after a burst: ±1 burst at each end over
        // the span between the first and last samples, (samples - 1) scrape intervals of 1 s),
        // and a scrape that is late or missed makes Prometheus extrapolate by only half an
        // interval at an edge (up to -10% over 5 s); plus 5% for the workload's own clock.
        let at = end.addingTimeInterval(-0.3)
        let windowStart = at.addingTimeInterval(-5)
        let ran = Double(finished.filter { $0 > windowStart && $0 <= at }.count * burst) / 5
        #expect(ran >= 1000, "the workload ran \(ran) calls/s in the window: too few bursts to measure a rate")
        let samples = try prom.query("count_over_time(uprobed_probe_hits_total{id=\"\(a)\"}[5s])", at: at).first?.value ?? 0
        #expect(samples >= 2, "rate() needs two samples in the window, Prometheus has \(samples)")
        let tolerance = 2 * Double(burst) / (ran * max(1, samples - 1)) + 0.1 + 0.05
        let rate = try prom.query("rate(uprobed_probe_hits_total{id=\"\(a)\"}[5s])", at: at).first?.value
        #expect(rate.map { abs($0 - ran) / ran <= tolerance } == true,
                "rate() says \(rate.map { "\($0)" } ?? "nothing"), the workload ran \(ran) calls/s in that window (tolerance \(tolerance), \(samples) samples)")
        // fn_b was not called: its rate is exactly 0.
        #expect(try prom.query("rate(uprobed_probe_hits_total{id=\"\(b)\"}[5s])", at: at).first?.value == 0)
        print("prometheus: hits \(Int(total)) exact; rate(5s) \(rate.map { String(format: "%.0f", $0) } ?? "-")/s vs \(ran)/s run, \(samples) samples, tolerance \(tolerance)")
        #expect(d.stop() == 0)
    }
}

/// One Prometheus server for a test: its own config, data directory and loopback port, scraping
/// one target every second. Stopped (SIGTERM, then SIGKILL) by `stop()`.
final class PrometheusServer: @unchecked Sendable {
    // @unchecked: only the owning test touches it.
    static let binary = "/usr/bin/prometheus"
    static var installed: Bool { FileManager.default.isExecutableFile(atPath: binary) }

    let port: UInt16
    let logPath: String
    private let process = Process()

    init(dir: String, scrapeTarget: String) throws {
        port = try freeLoopbackPort()
        let config = dir + "/prometheus.yml"
        logPath = dir + "/prometheus.log"
        try """
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: uprobed
                static_configs:
                  - targets: ['\(scrapeTarget)']
            """.write(toFile: config, atomically: true, encoding: .utf8)
        guard FileManager.default.createFile(atPath: logPath, contents: nil) else { throw TestFailure("cannot create \(logPath)") }
        process.executableURL = URL(fileURLWithPath: Self.binary)
        // No admin API (the default), nothing outside the test's directory.
        process.arguments = ["--config.file=\(config)", "--storage.tsdb.path=\(dir)/tsdb",
                             "--web.listen-address=127.0.0.1:\(port)", "--log.level=warn"]
        process.standardOutput = FileHandle(forWritingAtPath: logPath)
        process.standardError = FileHandle(forWritingAtPath: logPath)
        try process.run()
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// Until `/-/ready` answers 200 (the TSDB is open and the API serves).
    func waitReady(seconds: Double) throws {
        try waitUntil("/-/ready", seconds: seconds) {
            guard process.isRunning else { throw TestFailure("prometheus exited with \(process.terminationStatus):\n\(log)") }
            return ((try? httpGet(port: port, path: "/-/ready"))?.status.hasPrefix("HTTP/1.1 200")) == true
        }
    }

    /// Polls `condition` every 200 ms for at most `seconds`. Throws on a timeout when `failing`,
    /// else returns whether it held.
    @discardableResult
    func waitUntil(_ what: String, seconds: Double, failing: Bool = true, _ condition: () throws -> Bool) throws -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            if try condition() { return true }
            usleep(200_000)
        } while Date() < deadline
        if failing { throw TestFailure("prometheus: no \(what) within \(seconds) s; its log:\n\(log)") }
        return false
    }

    struct Sample { var labels: [String: String]; var value: Double }

    /// An instant query (`/api/v1/query`), at `at` or now; the vector's samples.
    func query(_ expr: String, at: Date? = nil) throws -> [Sample] {
        var path = "/api/v1/query?query=" + (expr.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? "")
        if let at { path += "&time=" + String(format: "%.3f", at.timeIntervalSince1970) }
        let (status, body) = try httpGet(port: port, path: path)
        guard status.hasPrefix("HTTP/1.1 200"),
              let top = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any],
              top["status"] as? String == "success",
              let data = top["data"] as? [String: Any], data["resultType"] as? String == "vector",
              let result = data["result"] as? [[String: Any]] else {
            throw TestFailure("query \(expr): \(status) \(body)")
        }
        return try result.map { r in
            // A sample's value is [unix time, "number as a string"].
            guard let pair = r["value"] as? [Any], pair.count == 2, let text = pair[1] as? String, let v = Double(text) else {
                throw TestFailure("query \(expr): unexpected sample \(r)")
            }
            return Sample(labels: r["metric"] as? [String: String] ?? [:], value: v)
        }
    }
}
