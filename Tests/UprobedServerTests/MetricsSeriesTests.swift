import Foundation
import Testing
import UprobeKernel
@testable import UprobedServer

/// `metrics_probe_series`: which series the renderer exports for the probes, and that its
/// aggregates behave as Prometheus counters (never down while the daemon runs).
struct MetricsSeriesTests {
    static func sample(_ id: String, _ hits: UInt64, consumer: String = "", degraded: Bool = false) -> ProbeSample {
        ProbeSample(id: id, path: "/bin/t", symbol: "fn_\(id)", consumer: consumer, hits: hits, degraded: degraded)
    }

    @Test("metrics_probe_series parses all, per_consumer and top:N, and refuses anything else")
    func parse() throws {
        #expect(MetricsProbeSeries.parse("all") == .all)
        #expect(MetricsProbeSeries.parse("per_consumer") == .perConsumer)
        #expect(MetricsProbeSeries.parse("top:25") == .top(25))
        for bad in ["", "ALL", "per-consumer", "top", "top:", "top:0", "top:-1", "top:x", "top: 5", "top:1000001"] {
            #expect(MetricsProbeSeries.parse(bad) == nil, "\(bad)")
        }
        #expect(try DaemonConfig.parse("metrics_probe_series = top:100\n").metricsProbeSeries == .top(100))
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("metrics_probe_series = top:0\n") }
        #expect(MetricsProbeSeries.top(7).description == "top:7" && MetricsProbeSeries.perConsumer.description == "per_consumer")
    }

    @Test("all: one series per probe, as given, no aggregates")
    func all() {
        var agg = ProbeSeriesAggregator(mode: .all)
        let samples = [Self.sample("p1", 5), Self.sample("p2", 0, degraded: true)]
        let out = agg.apply(samples)
        #expect(out == ProbeSeriesOutput(probes: samples))
        let text = MetricsRenderer.text(of: out)
        #expect(text.contains(#"uprobed_probe_hits_total{id="p1",path="/bin/t",symbol="fn_p1",consumer=""} 5"#), "\(text)")
        #expect(text.contains(#"uprobed_probe_degraded{id="p2"} 1"#), "\(text)")
    }

    @Test("per_consumer: hits summed per consumer; a removed probe's hits stay counted; a consumer with no probes left ends")
    func perConsumer() {
        var agg = ProbeSeriesAggregator(mode: .perConsumer)
        var out = agg.apply([Self.sample("p1", 10, consumer: "a"), Self.sample("p2", 5, consumer: "a", degraded: true),
                             Self.sample("p3", 7, consumer: "b"), Self.sample("p4", 1)])
        #expect(out.probes.isEmpty && out.other == nil)
        #expect(out.consumers == [ConsumerSeries(consumer: "", hits: 1, probes: 1, degraded: 0),
                                  ConsumerSeries(consumer: "a", hits: 15, probes: 2, degraded: 1),
                                  ConsumerSeries(consumer: "b", hits: 7, probes: 1, degraded: 0)])
        // p1 gains 3, then p2 is removed: a's counter keeps p2's 5 and grows by 3.
        out = agg.apply([Self.sample("p1", 13, consumer: "a"), Self.sample("p3", 7, consumer: "b"), Self.sample("p4", 1)])
        #expect(out.consumers.first { $0.consumer == "a" } == ConsumerSeries(consumer: "a", hits: 18, probes: 1, degraded: 0))
        // b's only probe goes and a new probe of a arrives with 4 hits: b ends, a counts all 4.
        out = agg.apply([Self.sample("p1", 13, consumer: "a"), Self.sample("p5", 4, consumer: "a"), Self.sample("p4", 1)])
        #expect(out.consumers.map(\.consumer) == ["", "a"])
        #expect(out.consumers.first { $0.consumer == "a" }?.hits == 22)
        // b comes back later: a new series from its new probes only.
        out = agg.apply([Self.sample("p6", 2, consumer: "b")])
        #expect(out.consumers == [ConsumerSeries(consumer: "b", hits: 2, probes: 1, degraded: 0)])

        let text = MetricsRenderer.text(of: out)
        #expect(text.contains(#"uprobed_consumer_hits_total{consumer="b"} 2"#), "\(text)")
        #expect(text.contains(#"uprobed_consumer_probes{consumer="b"} 1"#), "\(text)")
        #expect(!text.contains("uprobed_probe_hits_total"), "\(text)")
    }

    @Test("top:N: the N probes with most hits (ties by id) plus other = the rest, which never goes down")
    func top() {
        var agg = ProbeSeriesAggregator(mode: .top(2))
        var out = agg.apply([Self.sample("p1", 10), Self.sample("p2", 50), Self.sample("p3", 10), Self.sample("p4", 3)])
        #expect(out.probes.map(\.id) == ["p2", "p1"])  // p1 and p3 tie at 10: p1 first by id
        #expect(out.other == 13 && out.otherProbes == 2)
        // First scrape: the series add up to exactly all hits.
        #expect(out.probes.reduce(0) { $0 + $1.hits } + (out.other ?? 0) == 73)

        // p4 overtakes p1 and enters the top 2: its own series starts with all 40 of its hits;
        // other keeps the 3 it had from p4 (no drop, which rate() would read as a reset) and
        // gains p3's 2 and p1's 1 since the last scrape.
        out = agg.apply([Self.sample("p1", 11), Self.sample("p2", 50), Self.sample("p3", 12), Self.sample("p4", 40)])
        #expect(out.probes.map(\.id) == ["p2", "p4"])
        #expect(out.other == 16 && out.otherProbes == 2)

        // p3 is removed: other keeps its hits. A new probe counts in full.
        out = agg.apply([Self.sample("p1", 11), Self.sample("p2", 50), Self.sample("p4", 41), Self.sample("p7", 6)])
        #expect(out.other == 22 && out.otherProbes == 2)

        // Fewer probes than N: all exported, other is 0 probes but still there (and kept).
        var small = ProbeSeriesAggregator(mode: .top(5))
        out = small.apply([Self.sample("p1", 1), Self.sample("p2", 2)])
        #expect(out.probes.map(\.id) == ["p2", "p1"] && out.other == 0 && out.otherProbes == 0)

        let text = MetricsRenderer.text(of: ProbeSeriesOutput(probes: [Self.sample("p2", 50)], other: 22, otherProbes: 3))
        #expect(text.contains(#"uprobed_probe_hits_total{id="other",path="",symbol="",consumer=""} 22"#), "\(text)")
        #expect(text.contains("uprobed_probes_other 3"), "\(text)")
    }

    @Test("a new mode starts its aggregates afresh; the same mode keeps them")
    func modeChange() {
        let state = MetricsSeriesState(.perConsumer)
        let first = state.scrape { $0.apply([Self.sample("p1", 10, consumer: "a")]) }
        #expect(first.consumers.first?.hits == 10)
        state.set(.perConsumer)
        // The same mode: p1 gained nothing, p1's removal keeps its 10.
        #expect(state.scrape { $0.apply([Self.sample("p2", 1, consumer: "a")]) }.consumers.first?.hits == 11)
        state.set(.top(1))
        #expect(state.mode == .top(1))
        #expect(state.scrape { $0.apply([Self.sample("p2", 1), Self.sample("p3", 0)]) }.other == 0)
    }

    static func histogram(_ durations: [UInt64], calls: UInt64) -> LatencyHistogram {
        var h = LatencyHistogram()
        h.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        for d in durations {
            h.buckets[LatencyHistogram.bucket(of: d)] += 1
            h.sumNanoseconds += d
        }
        h.calls = calls
        h.returns = UInt64(durations.count)
        h.minNanoseconds = durations.min() ?? 0
        h.maxNanoseconds = durations.max() ?? 0
        return h
    }

    @Test("a latency probe is a Prometheus histogram: cumulative buckets at powers of two, +Inf and _count are the returns, _sum in seconds, in flight as a gauge")
    func latencyHistogramSeries() {
        var s = Self.sample("p9", 7, consumer: "c")
        s.latency = Self.histogram([150, 3_000, 3_000, 1_000_000_000, 1 << 50], calls: 7)
        let text = String(decoding: LatencySeries.text([s]), as: UTF8.self)
        func value(_ series: String) -> String? {
            text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.map { String($0.split(separator: " ").last ?? "") }
        }
        let labels = "id=\"p9\",path=\"/bin/t\",symbol=\"fn_p9\",consumer=\"c\""
        #expect(value("uprobed_probe_latency_seconds_bucket{\(labels),le=\"0.000000128\"}") == "0")
        #expect(value("uprobed_probe_latency_seconds_bucket{\(labels),le=\"0.000000256\"}") == "1")
        #expect(value("uprobed_probe_latency_seconds_bucket{\(labels),le=\"0.000004096\"}") == "3")
        #expect(value("uprobed_probe_latency_seconds_bucket{\(labels),le=\"1.073741824\"}") == "4")
        #expect(value("uprobed_probe_latency_seconds_bucket{\(labels),le=\"4398.046511104\"}") == "4", "2^50 ns is beyond the last bound")
        #expect(value("uprobed_probe_latency_seconds_bucket{\(labels),le=\"+Inf\"}") == "5")
        #expect(value("uprobed_probe_latency_seconds_count{\(labels)}") == "5")
        #expect(value("uprobed_probe_calls_in_flight{id=\"p9\"}") == "2")
        #expect(text.components(separatedBy: "_bucket{").count - 1 == LatencySeries.powers.count + 1)
    }

    @Test("promtool check metrics accepts the output of every mode")
    func promtoolEveryMode() throws {
        let promtool = "/usr/bin/promtool"
        let required = ProcessInfo.processInfo.environment["UPROBED_REQUIRE_KERNEL"].map { !$0.isEmpty && $0 != "0" } ?? false
        guard FileManager.default.isExecutableFile(atPath: promtool) else {
            #expect(!required, "promtool missing: apt-get install prometheus (make deps)")
            return
        }
        var latency = Self.sample("p4", 9, consumer: "svc \"q\"")
        latency.latency = Self.histogram([150, 3_000, 3_000, 1_000_000_000, 1 << 50], calls: 9)
        let samples = [Self.sample("p1", 10, consumer: "svc \"q\""), Self.sample("p2", 5, consumer: "b", degraded: true), Self.sample("p3", 1), latency]
        for mode in [MetricsProbeSeries.all, .perConsumer, .top(1)] {
            var agg = ProbeSeriesAggregator(mode: mode)
            let text = MetricsRenderer.text(of: agg.apply(samples))
            let p = Process()
            p.executableURL = URL(fileURLWithPath: promtool)
            p.arguments = ["check", "metrics"]
            let input = Pipe(), output = Pipe()
            p.standardInput = input
            p.standardOutput = output
            p.standardError = output
            try p.run()
            input.fileHandleForWriting.write(Data(text.utf8))
            try input.fileHandleForWriting.close()
            let said = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(p.terminationStatus == 0 && said.isEmpty, "\(mode): \(said)\n\(text)")
        }
    }
}
