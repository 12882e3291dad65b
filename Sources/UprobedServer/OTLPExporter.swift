#if OTLP
import Foundation
import Logging
import Metrics
import OTel
import ServiceLifecycle
import Synchronization
import UprobeCore

/// Pushes the metrics of the Prometheus endpoint to an OpenTelemetry collector over OTLP/HTTP
/// (config `otlp_endpoint`), through swift-otel's metrics backend: a swift-metrics factory and
/// a periodic reader that exports every `otlp_interval_ms`.
///
/// The per-probe counters live in the kernel, not in swift-metrics instruments, so they are
/// copied into the backend's instruments at export time: swift-otel's reader announces each
/// read on its diagnostic logger ("Reading metrics from producer.") just before it reads the
/// instruments, and `OTLPExportMonitor` refreshes them right there from one bulk counter read,
/// so a push carries the counts of that moment (an observable instrument in OpenTelemetry's
/// terms; swift-otel has none). No per-hit work, nothing queued: each push is built afresh
/// from the current totals, so a collector that is down loses no counts, only data points.
///
/// A push takes at most `otlp_timeout_ms` (retries included, capped at the interval); a slow
/// or absent collector costs one in-flight request on swift-otel's own event loops, never the
/// daemon's. Failures are logged once per outage (`OTLPExportMonitor`).
///
/// A reload that changes an `otlp_*` key stops the running backend and starts a new one.
final class OTLPExporter: Service, Sendable {
    private let engine: Engine
    private let counters: ServiceCounters
    private let startTime: Double
    private let probeSets: ProbeSets?
    private let logger: Logger
    /// The exporter's own `metrics_probe_series` aggregates: its pushes and the scrapes of the
    /// Prometheus endpoint each take the hits gained since their own previous read.
    let series: MetricsSeriesState
    private let running: Mutex<(backend: Backend?, stopped: Bool)>
    private let initial: OTLPSettings?

    private struct Backend: Sendable {
        let settings: OTLPSettings
        let monitor: OTLPExportMonitor
        let task: Task<Void, Never>
    }

    init(config: DaemonConfig, engine: Engine, counters: ServiceCounters, startTime: Double, probeSets: ProbeSets?, logger: Logger) {
        self.engine = engine
        self.probeSets = probeSets
        self.counters = counters
        self.startTime = startTime
        self.logger = logger
        series = MetricsSeriesState(config.metricsProbeSeries)
        running = Mutex((nil, false))
        initial = OTLPSettings(config)
    }

    func run() async throws {
        apply(initial)
        // Runs until the daemon's task group cancels it (not on graceful shutdown: pushes go
        // on while requests drain).
        while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }
        await stop()
    }

    /// Starts, moves or stops the exporter (start and reload). Unchanged settings keep the
    /// running backend and its series.
    func apply(_ settings: OTLPSettings?) {
        let old: Backend? = running.withLock { r in
            guard !r.stopped, r.backend?.settings != settings else { return nil }
            let old = r.backend
            r.backend = settings.map(start)
            return old
        }
        if let old { Self.retire(old) }
    }

    /// Ends the running backend and waits for it; a reload after this starts nothing.
    private func stop() async {
        guard let old = running.withLock({ r in defer { r = (nil, true) }; return r.backend }) else { return }
        Self.retire(old)
        await old.task.value
    }

    /// Stops a backend; what it still logs while it winds down (its last push, cancelled) is
    /// not news.
    private static func retire(_ b: Backend) {
        b.monitor.retire()
        b.task.cancel()
    }

    private func start(_ s: OTLPSettings) -> Backend {
        let (engine, counters, series, startTime, probeSets) = (self.engine, self.counters, self.series, self.startTime, self.probeSets)
        let monitor = OTLPExportMonitor(endpoint: s.url, counters: counters, logger: logger)
        let logger = self.logger
        let task = Task {
            do {
                let backend = try OTel.makeMetricsBackend(configuration: Self.configuration(s, monitor: monitor))
                let mirror = OTLPInstruments(factory: backend.factory)
                monitor.onRead {
                    let (points, latency) = series.scrape { aggregator in
                        var latency: [ProbeSample] = []
                        let points = MetricsRenderer.points(engine: engine, counters: counters, aggregator: &aggregator,
                                                            startTime: startTime, probeSets: probeSets, latency: &latency)
                        return (points, latency)
                    }
                    mirror.update(points + LatencySeries.inFlightPoints(latency), latency: latency)
                }
                logger.notice("OTLP exporter pushing", metadata: ["endpoint": "\(s.url)", "interval_ms": "\(s.interval.milliseconds)",
                                                                  "timeout_ms": "\(s.timeout.milliseconds)"])
                try await backend.service.run()
                if !Task.isCancelled { throw ServerError(message: "swift-otel's metrics service ended by itself") }
            } catch {
                // Cancelled: retired by a reload or the stop, nothing to report.
                if !Task.isCancelled {
                    logger.error("OTLP exporter stopped; it is off until the next reload that changes an otlp_* key",
                                 metadata: ["endpoint": "\(s.url)", "error": "\(error)"])
                }
            }
        }
        return Backend(settings: s, monitor: monitor, task: task)
    }

    /// swift-otel's configuration: metrics only, OTLP/HTTP protobuf to exactly `s.url`. The
    /// OpenTelemetry environment variables (OTEL_EXPORTER_OTLP_*, OTEL_METRIC_EXPORT_*,
    /// OTEL_RESOURCE_ATTRIBUTES, ...) still override it, as the OpenTelemetry spec says.
    static func configuration(_ s: OTLPSettings, monitor: OTLPExportMonitor) -> OTel.Configuration {
        var c = OTel.Configuration.default
        c.serviceName = "uprobed"
        c.resourceAttributes = ["service.version": RequestHandler.version, "host.name": ProcessInfo.processInfo.hostName]
        c.logs.enabled = false
        c.traces.enabled = false
        c.metrics.exportInterval = s.interval
        c.metrics.exportTimeout = s.timeout
        c.metrics.otlpExporter.endpoint = s.url
        c.metrics.otlpExporter.timeout = s.timeout
        c.metrics.otlpExporter.headers = s.headers.map { ($0.name, $0.value) }
        c.metrics.otlpExporter.protocol = .httpProtobuf
        // The latency histograms' bounds: the `le` edges of the Prometheus endpoint.
        c.metrics.histogramTypes[LatencySeries.name] = .explicitBucket
        c.metrics.valueHistogramBuckets[LatencySeries.name] = LatencySeries.powers.map { LatencySeries.boundSeconds($0) }
        c.diagnosticLogger = .custom(Logger(label: "uprobed.otlp") { _ in OTLPDiagnosticHandler(monitor: monitor) })
        return c
    }
}

/// The backend's instruments, kept equal to the latest `MetricPoint`s: a counter is raised by
/// what its total gained since the last update (cumulative sums, as the totals are), a gauge
/// set, and a series that is gone (a removed probe, a probe out of the top N) destroyed, so it
/// stops being exported.
///
/// OTLP names are the Prometheus names without `_total` (a collector's Prometheus exporter
/// adds it back to monotonic sums, so the names come back the same); the help text is the
/// description; `_seconds` metrics have unit `s`.
///
/// Latency probes are OTLP histograms `uprobed_probe_latency_seconds` (cumulative, explicit
/// bounds at the Prometheus endpoint's `le` edges, the attributes of its labels), carried over
/// by `LatencyReplay`: counts, sum, min and max equal the daemon's.
final class OTLPInstruments: Sendable {
    private let factory: any MetricsFactory
    private struct Series {
        var counter: Counter?
        var gauge: Gauge?
        var total: UInt64
    }
    private let series = Mutex<[String: Series]>([:])
    private struct HistogramSeries {
        var recorder: Recorder
        var replay = LatencyReplay()
    }
    private struct Histograms {
        var series: [String: HistogramSeries] = [:]
        var rotation = 0
    }
    private let histograms = Mutex(Histograms())

    init(factory: any MetricsFactory) { self.factory = factory }

    static func otlpName(_ prometheusName: String) -> String {
        prometheusName.hasSuffix("_total") ? String(prometheusName.dropLast(6)) : prometheusName
    }

    /// The most calls one export records into the latency histograms, all probes together
    /// (`LatencyReplay`): a larger backlog is caught up over the next exports.
    static let replayBudget: UInt64 = 2_000_000

    /// The instruments of these points and latency probes; those of series not among them end.
    func update(_ points: [MetricPoint], latency: [ProbeSample]) {
        update(points)
        histograms.withLock { state in
            var next: [String: HistogramSeries] = [:]
            var budget = Self.replayBudget
            // Each export starts the budget at another probe, so a backlog of one cannot keep
            // the others waiting export after export.
            let start = latency.isEmpty ? 0 : state.rotation % latency.count
            state.rotation &+= 1
            for p in latency[start...] + latency[..<start] {
                guard let h = p.latency else { continue }
                let labels = LatencySeries.labels(p)
                let key = labels.map(\.1).joined(separator: "\u{1F}")
                var s = state.series.removeValue(forKey: key) ?? HistogramSeries(recorder: makeRecorder(labels))
                let recorder = s.recorder
                var done = s.replay.advance(to: h, budget: budget) { ns, times in Self.record(ns, times, into: recorder) }
                if done == nil {
                    // Fewer calls than already exported: not the same histogram, a new series.
                    recorder.destroy()
                    s = HistogramSeries(recorder: makeRecorder(labels))
                    let fresh = s.recorder
                    done = s.replay.advance(to: h, budget: budget) { ns, times in Self.record(ns, times, into: fresh) }
                }
                budget -= Swift.min(budget, done ?? 0)
                next[key] = s
            }
            for gone in state.series.values { gone.recorder.destroy() }
            state.series = next
        }
    }

    private func makeRecorder(_ labels: [(String, String)]) -> Recorder {
        Recorder(label: LatencySeries.name, dimensions: [("description", LatencySeries.help), ("unit", "s")] + labels,
                 aggregate: true, factory: factory)
    }

    /// A duration of whole nanoseconds in seconds, in the OTLP bucket the Prometheus endpoint
    /// counts it in: there `le` = 2^k ns counts the durations below 2^k ns, an OTLP bucket ends
    /// at its bound inclusive, so a duration of exactly 2^k ns is recorded a hair above it.
    static func record(_ ns: UInt64, _ times: UInt64, into recorder: Recorder) {
        var v = Double(ns) / 1e9
        if ns.nonzeroBitCount == 1, LatencySeries.powers.contains(ns.trailingZeroBitCount) { v = v.nextUp }
        for _ in 0..<times { recorder.record(v) }
    }

    func update(_ points: [MetricPoint]) {
        series.withLock { old in
            var next: [String: Series] = [:]
            next.reserveCapacity(points.count)
            for p in points {
                let key = ([p.name] + p.labels.flatMap { [$0.0, $0.1] }).joined(separator: "\u{1F}")
                var s = old.removeValue(forKey: key)
                switch p.value {
                case .counter(let total):
                    // A total below the last one is a new series (not expected: totals only grow).
                    if let c = s?.counter, total < s?.total ?? 0 { c.destroy(); s = nil }
                    let counter = s?.counter ?? Counter(label: Self.otlpName(p.name), dimensions: dimensions(p), factory: factory)
                    let gained = total - (s?.total ?? 0)
                    if gained > 0 { counter.increment(by: Int64(clamping: gained)) }
                    next[key] = Series(counter: counter, gauge: nil, total: total)
                case .gauge(let v):
                    let gauge = s?.gauge ?? Gauge(label: p.name, dimensions: dimensions(p), factory: factory)
                    gauge.record(v)
                    next[key] = Series(counter: nil, gauge: gauge, total: 0)
                }
            }
            for gone in old.values {
                gone.counter?.destroy()
                gone.gauge?.destroy()
            }
            old = next
        }
    }

    /// swift-otel reads `description` and `unit` out of the dimensions; the rest are attributes.
    private func dimensions(_ p: MetricPoint) -> [(String, String)] {
        var d = [("description", p.help)]
        if p.name.hasSuffix("_seconds") { d.append(("unit", "s")) }
        return d + p.labels
    }
}

/// Watches swift-otel's diagnostic log of one backend: refreshes the instruments when the
/// reader is about to read them, tells pushes that failed from those that succeeded, counts
/// both (`uprobed_otlp_exports_total`, `uprobed_otlp_export_failures_total`), and logs an
/// outage once: the first failed push as a warning, each further distinct problem once, and
/// the first push that succeeds after it as a notice with the count of failed ones. Nothing
/// is buffered.
///
/// A push's outcome is known when the next one starts: it failed if the backend logged a
/// warning or worse in between (swift-otel logs "Failed to export metrics." with the error),
/// else the collector took it. So a recovery is reported one interval late.
final class OTLPExportMonitor: Sendable {
    /// What swift-otel's periodic reader logs (at trace) just before it reads the instruments.
    static let readMessage = "Reading metrics from producer."

    private let endpoint: String
    private let counters: ServiceCounters
    private let logger: Logger
    private let hook = Mutex<(@Sendable () -> Void)?>(nil)
    private let state = Mutex(State())

    struct State: Sendable {
        var retired = false
        /// A push has started and its outcome is not known yet.
        var pushing = false
        var pushFailed = false
        /// Failed pushes since the last one that succeeded (0: no outage).
        var failedInARow = 0
        var outageSince: ContinuousClock.Instant?
        /// The problems already logged in this outage.
        var logged: Set<String> = []
    }

    init(endpoint: String, counters: ServiceCounters, logger: Logger) {
        self.endpoint = endpoint
        self.counters = counters
        self.logger = logger
    }

    func onRead(_ body: @escaping @Sendable () -> Void) { hook.withLock { $0 = body } }

    func retire() { state.withLock { $0.retired = true } }

    /// One line of swift-otel's diagnostic log.
    func observe(_ event: LogEvent) {
        let text = event.message.description
        if text == Self.readMessage {
            pushStarts()
            if let refresh = hook.withLock({ $0 }), !state.withLock({ $0.retired }) { refresh() }
        } else if event.level >= .warning {
            problem(text, event)
        }
    }

    private func pushStarts() {
        let recovered: (failed: Int, since: ContinuousClock.Instant?)? = state.withLock { s in
            defer { s.pushing = true; s.pushFailed = false }
            guard s.pushing, !s.pushFailed, !s.retired else { return nil }
            counters.otlpExports.add(1, ordering: .relaxed)
            guard s.failedInARow > 0 else { return nil }
            defer { s.failedInARow = 0; s.outageSince = nil; s.logged = [] }
            return (s.failedInARow, s.outageSince)
        }
        if let recovered {
            logger.notice("OTLP push succeeded again", metadata: [
                "endpoint": "\(endpoint)", "failed_pushes": "\(recovered.failed)",
                "outage_seconds": "\(recovered.since.map { String(format: "%.1f", (ContinuousClock.now - $0).inSeconds) } ?? "?")"])
        }
    }

    private func problem(_ text: String, _ event: LogEvent) {
        let first: (new: Bool, outageStarts: Bool) = state.withLock { s in
            guard !s.retired else { return (false, false) }
            var starts = false
            if s.pushing && !s.pushFailed {
                s.pushFailed = true
                counters.otlpExportFailures.add(1, ordering: .relaxed)
                starts = s.failedInARow == 0
                if starts { s.outageSince = .now }
                s.failedInARow += 1
            }
            return (s.logged.insert(text).inserted, starts)
        }
        guard first.new else { return }
        var metadata: Logger.Metadata = ["endpoint": "\(endpoint)", "otel_message": "\(text)"]
        if let error = event.error { metadata["error"] = "\(error)" }
        for (k, v) in event.metadata ?? [:] where k != "component" { metadata["otel_" + k] = v }
        logger.log(level: first.outageStarts ? .warning : event.level,
                   first.outageStarts ? "OTLP push failed; failures are not logged again until a push succeeds" : "OTLP exporter: \(text)",
                   metadata: metadata)
    }
}

/// Hands every line of swift-otel's diagnostic log to the monitor. Its level stays `trace`
/// whatever is asked (OTEL_LOG_LEVEL sets it), since the monitor needs the reader's trace line.
struct OTLPDiagnosticHandler: LogHandler {
    let monitor: OTLPExportMonitor
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level {
        get { .trace }
        set {}
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { monitor.observe(event) }
}

extension Duration {
    var milliseconds: Int64 { components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000 }
}
#endif
