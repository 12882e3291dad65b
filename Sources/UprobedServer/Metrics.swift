import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization
import UprobeCore
import UprobeKernel
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Where the metrics listener binds (config `metrics_listen`).
public enum MetricsEndpoint: Sendable, Equatable {
    case tcp(host: String, port: Int)
    case unix(path: String)

    public struct ParseError: Error, Sendable { public let message: String }

    /// "" is nil (off); `/abs/path` a Unix socket; `HOST:PORT` or `[V6]:PORT` TCP. Only
    /// loopback hosts are accepted: the metrics carry probed paths and are not authenticated.
    public static func parse(_ text: String) throws(ParseError) -> MetricsEndpoint? {
        if text.isEmpty { return nil }
        if text.hasPrefix("/") { return .unix(path: text) }
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (1...65535).contains(port) else {
            throw ParseError(message: "metrics_listen must be empty, an absolute Unix socket path or HOST:PORT, got '\(text)'")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard host == "localhost" || host == "::1" || host.hasPrefix("127.") else {
            throw ParseError(message: "metrics_listen must be a loopback address (127.x.x.x, ::1 or localhost), got '\(host)'")
        }
        return .tcp(host: host, port: port)
    }
}

/// How the per-probe hit counters are exported (config `metrics_probe_series`). One series per
/// probe is what a few thousand probes want; at 241,000 probes (four label values each) that is
/// more series than a Prometheus server should take from one target, so the other two modes
/// bound the count by the number of consumers or by N.
public enum MetricsProbeSeries: Sendable, Equatable, CustomStringConvertible {
    /// `uprobed_probe_hits_total` and `uprobed_probe_degraded` for every probe.
    case all
    /// `uprobed_consumer_hits_total`, `uprobed_consumer_probes` and
    /// `uprobed_consumer_probes_degraded` per consumer; no per-probe series.
    case perConsumer
    /// The N probes with the most hits as in `all`, plus one `uprobed_probe_hits_total{id="other"}`
    /// holding the hits of all the others.
    case top(Int)

    /// The most series `top:N` may ask for (more is what `all` is for).
    public static let maxTop = 1_000_000

    /// `all`, `per_consumer` or `top:N` (1 ≤ N ≤ maxTop); nil for anything else.
    public static func parse(_ text: String) -> MetricsProbeSeries? {
        switch text {
        case "all": return .all
        case "per_consumer": return .perConsumer
        default:
            guard text.hasPrefix("top:"), let n = Int(text.dropFirst(4)), (1...maxTop).contains(n) else { return nil }
            return .top(n)
        }
    }

    public var description: String {
        switch self {
        case .all: "all"
        case .perConsumer: "per_consumer"
        case .top(let n): "top:\(n)"
        }
    }
}

/// One probe as a scrape sees it: its label values, hits and state.
struct ProbeSample: Sendable, Equatable {
    var id: String
    var path: String
    var symbol: String
    var consumer: String
    var hits: UInt64
    var degraded: Bool
    /// A latency probe's histogram (exported as `uprobed_probe_latency_seconds`).
    var latency: LatencyHistogram? = nil
}

/// One consumer's series in `per_consumer` mode.
struct ConsumerSeries: Sendable, Equatable {
    var consumer: String
    var hits: UInt64
    var probes: Int
    var degraded: Int
}

/// What one scrape exports for the probes, after `metrics_probe_series` is applied.
struct ProbeSeriesOutput: Sendable, Equatable {
    /// Probes exported one series each: all of them, or the top N (most hits first).
    var probes: [ProbeSample] = []
    /// `top:N` only: the value of the `id="other"` series, and how many probes it stands for.
    var other: UInt64?
    var otherProbes = 0
    /// `per_consumer` only, by consumer name.
    var consumers: [ConsumerSeries] = []
}

/// Applies `metrics_probe_series` to the probes of one scrape after another.
///
/// The aggregates are counters, so they must never go down while the daemon runs: a drop is a
/// counter reset to Prometheus, and `rate()` would count the whole value again as new hits. A
/// plain sum over the probes present now would drop whenever a probe is removed (its hits
/// leave the sum), and `other` would drop whenever a probe moves into the top N. So each
/// aggregate instead accumulates the hits its probes gained between scrapes (the first time a
/// probe is seen, all of its hits): removing a probe keeps what it contributed, and a probe
/// that enters the top N keeps its earlier hits in `other` while its own series starts with
/// its full count. The price: a probe's hits between the last scrape and its removal are not
/// counted, and once probes have moved into the top N the values of all series add up to a
/// little more than the hits of the probes registered now; the rates add up right.
struct ProbeSeriesAggregator: Sendable {
    let mode: MetricsProbeSeries
    /// Hits of every probe at the previous scrape (aggregating modes only).
    private var lastHits: [String: UInt64] = [:]
    /// `per_consumer`: the counter of each consumer that has probes.
    private var consumerHits: [String: UInt64] = [:]
    /// `top:N`: the counter behind `id="other"`.
    private var otherHits: UInt64 = 0

    init(mode: MetricsProbeSeries) { self.mode = mode }

    mutating func apply(_ samples: [ProbeSample]) -> ProbeSeriesOutput {
        switch mode {
        case .all:
            return ProbeSeriesOutput(probes: samples)
        case .perConsumer:
            var counts: [String: (probes: Int, degraded: Int)] = [:]
            var next: [String: UInt64] = [:]
            next.reserveCapacity(samples.count)
            for s in samples {
                consumerHits[s.consumer, default: 0] &+= gained(s)
                counts[s.consumer, default: (0, 0)].probes += 1
                if s.degraded { counts[s.consumer, default: (0, 0)].degraded += 1 }
                next[s.id] = s.hits
            }
            lastHits = next
            // A consumer whose probes are all gone ends its series (as a removed probe does)
            // instead of being exported until the daemon stops.
            consumerHits = consumerHits.filter { counts[$0.key] != nil }
            let consumers = counts.keys.sorted().map { c in
                ConsumerSeries(consumer: c, hits: consumerHits[c] ?? 0, probes: counts[c]?.probes ?? 0, degraded: counts[c]?.degraded ?? 0)
            }
            return ProbeSeriesOutput(consumers: consumers)
        case .top(let n):
            // Most hits first; ties by id, so equal probes do not swap places between scrapes.
            let order = samples.indices.sorted { a, b in
                samples[a].hits != samples[b].hits ? samples[a].hits > samples[b].hits : samples[a].id < samples[b].id
            }
            var next: [String: UInt64] = [:]
            next.reserveCapacity(samples.count)
            for i in order.dropFirst(n) { otherHits &+= gained(samples[i]) }
            for s in samples { next[s.id] = s.hits }
            lastHits = next
            return ProbeSeriesOutput(probes: order.prefix(n).map { samples[$0] }, other: otherHits,
                                     otherProbes: max(0, samples.count - n))
        }
    }

    /// Hits the probe gained since the previous scrape; all of them if it is new. A count
    /// below the previous one (not expected: a probe's hits only grow) adds nothing.
    private func gained(_ s: ProbeSample) -> UInt64 {
        let before = lastHits[s.id] ?? 0
        return s.hits >= before ? s.hits - before : 0
    }
}

/// The renderer's state between scrapes: the configured mode and its aggregator. Shared by the
/// metrics listener (each scrape) and the reloader (a changed `metrics_probe_series`).
public final class MetricsSeriesState: Sendable {
    private let cell: Mutex<ProbeSeriesAggregator>

    public init(_ mode: MetricsProbeSeries) { cell = Mutex(ProbeSeriesAggregator(mode: mode)) }

    /// A new mode starts its aggregates afresh (its metric names differ anyway).
    public func set(_ mode: MetricsProbeSeries) {
        cell.withLock { if $0.mode != mode { $0 = ProbeSeriesAggregator(mode: mode) } }
    }

    public var mode: MetricsProbeSeries { cell.withLock { $0.mode } }

    /// Runs one scrape with the aggregator held: counters read by two scrapes at once and
    /// applied in the other order would count the hits between them twice.
    func scrape<R: Sendable>(_ body: (inout ProbeSeriesAggregator) -> R) -> R {
        cell.withLock { body(&$0) }
    }
}

/// Renders the Prometheus text format (version 0.0.4) from the engine's published snapshot and
/// one bulk counter read, into a fresh swift-prometheus registry per scrape (so probes that are
/// gone leave no stale series).
public enum MetricsRenderer {
    /// A full metric name (already prefixed `uprobed_`, unit suffix included) and its HELP text.
    static func desc(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    static let hitsHelp = "Hits of one probe since it was registered (hits while uprobed was down are not counted); with metrics_probe_series = top:N, id=\"other\" holds the hits of the probes outside the top N."
    static let degradedHelp = "1 if the probe is degraded (registered but its file cannot be probed) or ended (its process exited); `uprobectl list` says why."

    /// One scrape, from one version of the registry (read through the uprobes tree).
    /// `startTime`: when the daemon started, in seconds since the Unix epoch.
    public static func render(engine: Engine, counters: ServiceCounters, series: MetricsSeriesState, startTime: Double,
                              probeSets: ProbeSets? = nil) -> [UInt8] {
        let registry = PrometheusCollectorRegistry()
        var latency: [ProbeSample] = []
        emit(series.scrape { points(engine: engine, counters: counters, aggregator: &$0, startTime: startTime, probeSets: probeSets,
                                    latency: &latency) },
             into: registry)
        var out: [UInt8] = []
        registry.emit(into: &out)
        out += LatencySeries.text(latency)
        return out
    }

    /// Every series one read exports, the Prometheus endpoint and the OTLP exporter alike: the
    /// probe series after `metrics_probe_series` (none if the bulk counter read failed, which
    /// `uprobed_hits_read_failures_total` counts), then the daemon's own metrics. `latency`:
    /// the exported probes that are latency probes (`LatencySeries`).
    static func points(engine: Engine, counters: ServiceCounters, aggregator: inout ProbeSeriesAggregator, startTime: Double,
                       probeSets: ProbeSets?, latency: inout [ProbeSample]) -> [MetricPoint] {
        engine.read { snap, uprobes in
            var out: [MetricPoint] = []
            if case .success(let stats) = engine.statsTable(of: snap, ids: nil).map(\.rows) {
                var samples: [ProbeSample] = []
                samples.reserveCapacity(stats.count)
                for s in stats {
                    guard let r = snap.probes[s.id] else { continue }
                    samples.append(ProbeSample(id: s.id, path: r.firstTarget?.path ?? r.spec.path,
                                               symbol: r.firstTarget?.symbol ?? r.spec.symbol ?? r.spec.usdt ?? "",
                                               consumer: r.consumer ?? "", hits: s.hits, degraded: s.state != .active,
                                               latency: s.latency))
                }
                let output = aggregator.apply(samples)
                latency = output.probes.filter { $0.latency != nil }
                out = points(of: output)
            } else {
                counters.counterReadFailures.add(1, ordering: .relaxed)
            }
            out += daemonPoints(snap, uprobes: uprobes, counters: counters, startTime: startTime, probeSets: probeSets)
            return out
        }
    }

    /// The daemon's own gauges and counters (no labels but `uprobed_build_info`'s).
    private static func daemonPoints(_ snap: borrowing RegistrySnapshot, uprobes: Int, counters: ServiceCounters,
                                     startTime: Double, probeSets: ProbeSets?) -> [MetricPoint] {
        var out: [MetricPoint] = []
        func gauge(_ name: String, _ help: String, _ v: Double) { out.append(MetricPoint(name, help, .gauge(v))) }
        func counter(_ name: String, _ help: String, _ v: UInt64) { out.append(MetricPoint(name, help, .counter(v))) }
        let c = snap.counters
        gauge("uprobed_probes", "Registered probes.", Double(snap.probes.count))
        gauge("uprobed_probes_degraded", "Registered probes that are not attached.",
              Double(snap.probes.values.reduce(0) { $0 + ($1.state == .active ? 0 : 1) }))
        gauge("uprobed_uprobes", "Distinct (device, inode, offset) uprobes attached.", Double(uprobes))
        gauge("uprobed_links", "Open uprobe_multi links.", Double(snap.linksOpen))
        gauge("uprobed_slots_in_use", "Counter slots in use.", Double(snap.slotsInUse))
        gauge("uprobed_slot_capacity", "Counter slots available in all (slot_capacity).", Double(snap.slotCapacity))
        gauge("uprobed_pending_removals", "Removed probe sites still waiting for detach work.", Double(c.pendingRemovals))
        gauge("uprobed_last_batch_requests", "Requests in the last batch.", Double(c.lastBatchSize))
        gauge("uprobed_last_batch_seconds", "Time the last batch took.", Double(c.lastBatchMicros) / 1e6)
        // A start timestamp, not an uptime: Prometheus' convention for "time since", so the
        // value stays constant and `time() - uprobed_start_time_seconds` is the uptime.
        gauge("uprobed_start_time_seconds", "Start time of this uprobed process, in seconds since the Unix epoch.", startTime)
        counter("uprobed_requests_total", "Mutating requests applied by the writer.", c.requests)
        counter("uprobed_batches_total", "Batches applied by the writer.", c.batches)
        counter("uprobed_links_created_total", "uprobe_multi links created.", c.linksCreated)
        counter("uprobed_links_closed_total", "uprobe_multi links closed.", c.linksClosed)
        counter("uprobed_link_rebuilds_total", "Links rebuilt make-before-break to drop some of their probes.", c.linkRebuilds)
        counter("uprobed_grace_periods_total", "Rounds of detach work (each shares its grace periods).", c.gracePeriods)
        gauge("uprobed_connections", "Client connections open on the request socket.", Double(counters.connectionsOpen.load(ordering: .relaxed)))
        counter("uprobed_connections_refused_total", "Connections closed at once because max_connections were open.",
                counters.connectionsRefused.load(ordering: .relaxed))
        counter("uprobed_access_denied_total", "Requests refused by the access policy.", counters.accessDenied.load(ordering: .relaxed))
        counter("uprobed_state_writes_total", "State file writes.", counters.stateWrites.load(ordering: .relaxed))
        counter("uprobed_state_write_failures_total", "State file writes that failed.", counters.stateWriteFailures.load(ordering: .relaxed))
        counter("uprobed_config_reloads_total", "Config reloads applied (SIGHUP).", counters.configReloads.load(ordering: .relaxed))
        counter("uprobed_config_reload_failures_total", "Config reloads refused (bad config; the old one stayed).",
                counters.configReloadFailures.load(ordering: .relaxed))
        counter("uprobed_metrics_scrapes_total", "Scrapes of the Prometheus endpoint.", counters.metricsScrapes.load(ordering: .relaxed))
        counter("uprobed_hits_read_failures_total", "Scrapes and OTLP pushes whose read of the kernel hit counters failed (they export no probe series).",
                counters.counterReadFailures.load(ordering: .relaxed))
        counter("uprobed_otlp_exports_total", "OTLP pushes the collector accepted (otlp_endpoint).", counters.otlpExports.load(ordering: .relaxed))
        counter("uprobed_otlp_export_failures_total", "OTLP pushes that failed (collector down, slow or refusing; otlp_endpoint).",
                counters.otlpExportFailures.load(ordering: .relaxed))
        if let probeSets {
            // Per state, not per set: an alert on any refused set needs no label per file.
            let (applied, refused) = probeSets.table.counts(marks: snap.probes.values.compactMap { ProbeSetMark($0.probeSet) })
            let help = "Probe sets (probes_dir files and applied sets) by the state of their last reconcile."
            out.append(MetricPoint("uprobed_probe_sets", help, .gauge(Double(applied)), labels: [("state", "applied")]))
            out.append(MetricPoint("uprobed_probe_sets", help, .gauge(Double(refused)), labels: [("state", "refused")]))
            counter("uprobed_probe_set_reconciles_total", "Reconciles of probes_dir (at start and on each reload).",
                    probeSets.table.directoryReconciles.load(ordering: .relaxed))
        }
        out.append(MetricPoint("uprobed_build_info", "Always 1; the version label says which uprobed runs.", .gauge(1),
                               labels: [("version", RequestHandler.version)]))
        return out
    }

    /// The probe series alone, as text (the unit tests check each mode's output with promtool).
    static func text(of output: ProbeSeriesOutput) -> String {
        let registry = PrometheusCollectorRegistry()
        emit(points(of: output), into: registry)
        var out: [UInt8] = []
        registry.emit(into: &out)
        out += LatencySeries.text(output.probes.filter { $0.latency != nil })
        return String(decoding: out, as: UTF8.self)
    }

    /// The probe series of one read. Every `uprobed_probe_hits_total` series has the same four
    /// labels (the `other` one with empty path, symbol and consumer), so `sum()` over them and
    /// joins on `id` behave the same in `all` and `top:N`.
    static func points(of output: ProbeSeriesOutput) -> [MetricPoint] {
        var out: [MetricPoint] = []
        out.reserveCapacity(2 * output.probes.count + 3 * output.consumers.count + 2)
        for p in output.probes {
            out.append(MetricPoint("uprobed_probe_hits_total", hitsHelp, .counter(p.hits),
                                   labels: [("id", p.id), ("path", p.path), ("symbol", p.symbol), ("consumer", p.consumer)]))
            out.append(MetricPoint("uprobed_probe_degraded", degradedHelp, .gauge(p.degraded ? 1 : 0), labels: [("id", p.id)]))
        }
        if let other = output.other {
            out.append(MetricPoint("uprobed_probe_hits_total", hitsHelp, .counter(other),
                                   labels: [("id", "other"), ("path", ""), ("symbol", ""), ("consumer", "")]))
            out.append(MetricPoint("uprobed_probes_other", "Probes whose hits are in uprobed_probe_hits_total{id=\"other\"} (metrics_probe_series = top:N).",
                                   .gauge(Double(output.otherProbes))))
        }
        for c in output.consumers {
            let labels = [("consumer", c.consumer)]
            out.append(MetricPoint("uprobed_consumer_hits_total", "Hits of one consumer's probes (metrics_probe_series = per_consumer); the hits of its removed probes stay counted.",
                                   .counter(c.hits), labels: labels))
            out.append(MetricPoint("uprobed_consumer_probes", "Probes registered by one consumer (metrics_probe_series = per_consumer).",
                                   .gauge(Double(c.probes)), labels: labels))
            out.append(MetricPoint("uprobed_consumer_probes_degraded", "Probes of one consumer that are not attached (metrics_probe_series = per_consumer).",
                                   .gauge(Double(c.degraded)), labels: labels))
        }
        return out
    }

    /// Writes points into a fresh swift-prometheus registry (one per scrape, so probes that are
    /// gone leave no stale series).
    static func emit(_ points: [MetricPoint], into registry: PrometheusCollectorRegistry) {
        for p in points {
            switch p.value {
            case .counter(let v):
                registry.makeCounter(descriptor: desc(p.name, p.help), labels: p.labels).increment(by: Int64(clamping: v))
            case .gauge(let v):
                registry.makeGauge(descriptor: desc(p.name, p.help), labels: p.labels).set(v)
            }
        }
    }
}

/// One series as both exporters take it: its Prometheus name (counters end in `_total`), help
/// text, labels and value. Counters carry the running total; the OTLP side turns it into
/// increments of a cumulative sum.
struct MetricPoint: Sendable {
    enum Value: Sendable, Equatable {
        case counter(UInt64)
        case gauge(Double)
    }
    var name: String
    var help: String
    var value: Value
    var labels: [(String, String)]

    init(_ name: String, _ help: String, _ value: Value, labels: [(String, String)] = []) {
        self.name = name
        self.help = help
        self.value = value
        self.labels = labels
    }
}

/// A minimal HTTP/1.1 responder for `GET /metrics` (and `GET /` with a pointer to it).
/// Anything else gets 404 or 405. Each scrape renders afresh; nothing is cached.
final class MetricsServer: Sendable {
    private let render: @Sendable () -> [UInt8]
    private let logger: Logger
    private let channel = Mutex<(any Channel)?>(nil)

    init(logger: Logger, render: @escaping @Sendable () -> [UInt8]) {
        self.logger = logger
        self.render = render
    }

    /// Binds and starts serving; returns once bound (the bound address is logged).
    func start(_ endpoint: MetricsEndpoint, group: MultiThreadedEventLoopGroup, socketMode: UInt32) async throws {
        let render = self.render
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(render: render))
                }
            }
        let bound: any Channel
        switch endpoint {
        case .tcp(let host, let port):
            bound = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path):
            try SocketServer.prepareSocketPath(path)
            let old = umask(0o177)
            defer { umask(old) }
            bound = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            guard chmod(path, mode_t(socketMode)) == 0 else {
                bound.close(promise: nil)
                throw ServerError(message: Syscall.lastError("chmod", path).description)
            }
        }
        channel.withLock { $0 = bound }
        logger.notice("metrics listener serving", metadata: ["address": "\(bound.localAddress.map { "\($0)" } ?? "\(endpoint)")"])
    }

    /// Closes the listener (open scrapes finish).
    func stop() async {
        let c = channel.withLock { c in defer { c = nil }; return c }
        try? await c?.close()
    }
}

/// Serves one HTTP connection; keep-alive is honoured.
private final class MetricsHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    private let render: @Sendable () -> [UInt8]
    private var head: HTTPRequestHead?

    init(render: @escaping @Sendable () -> [UInt8]) { self.render = render }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            let path = h.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? h.uri
            let (status, type, body): (HTTPResponseStatus, String, [UInt8])
            if h.method != .GET && h.method != .HEAD {
                (status, type, body) = (.methodNotAllowed, "text/plain; charset=utf-8", Array("only GET\n".utf8))
            } else if path == "/metrics" {
                (status, type, body) = (.ok, "text/plain; version=0.0.4; charset=utf-8", render())
            } else if path == "/" {
                (status, type, body) = (.ok, "text/plain; charset=utf-8", Array("uprobed metrics: GET /metrics\n".utf8))
            } else {
                (status, type, body) = (.notFound, "text/plain; charset=utf-8", Array("not found; try /metrics\n".utf8))
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: type)
            headers.add(name: "Content-Length", value: "\(body.count)")
            let keepAlive = h.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
            if h.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
            }
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !keepAlive {
                let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
                done.whenComplete { _ in ctx.value.close(promise: nil) }
            }
        }
    }
}

/// Latency probes as Prometheus histograms, written as text (swift-prometheus' histograms
/// only observe values; these are counts the kernel already bucketed).
///
/// `uprobed_probe_latency_seconds` (histogram: `_bucket{le}`, `_sum`, `_count` = calls that
/// returned) with the labels of `uprobed_probe_hits_total`, plus `uprobed_probe_calls_in_flight`.
/// The `le` bounds are fixed powers of two from 128 ns to 2^42 ns (about 73 minutes): 36
/// series per probe whatever it measures, so series never appear or vanish with the data.
/// They are edges of the daemon's own buckets (1/8 of a power of two), so each cumulative
/// count is exact; `stats` gives percentiles 8 times finer.
enum LatencySeries {
    static let powers = 7...42
    static let name = "uprobed_probe_latency_seconds"

    static let help = "Duration of the calls of a latency probe, from entry to return (calls that returned)."
    static let inFlightName = "uprobed_probe_calls_in_flight"
    static let inFlightHelp = "Calls of a latency probe entered and not returned yet (long calls, and calls that left by longjmp or thread exit)."

    /// The histogram's labels: those of `uprobed_probe_hits_total`.
    static func labels(_ p: ProbeSample) -> [(String, String)] {
        [("id", p.id), ("path", p.path), ("symbol", p.symbol), ("consumer", p.consumer)]
    }

    /// The bound 2^k ns in seconds (exact in decimal; the OTLP exporter's explicit bounds).
    static func boundSeconds(_ k: Int) -> Double { Double(UInt64(1) << UInt64(k)) / 1e9 }

    /// `uprobed_probe_calls_in_flight` as points (the OTLP exporter's gauges).
    static func inFlightPoints(_ probes: [ProbeSample]) -> [MetricPoint] {
        probes.compactMap { p in
            p.latency.map { MetricPoint(inFlightName, inFlightHelp, .gauge(Double($0.inFlight)), labels: [("id", p.id)]) }
        }
    }

    static func text(_ probes: [ProbeSample]) -> [UInt8] {
        guard !probes.isEmpty else { return [] }
        var t = "# HELP \(name) \(help)\n"
        t += "# TYPE \(name) histogram\n"
        for p in probes {
            guard let h = p.latency else { continue }
            let labels = Self.labels(p).map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",")
            var cumulative: UInt64 = 0
            var bucket = 0
            for k in powers {
                let edge = UInt64(1) << UInt64(k)
                while bucket < h.buckets.count, LatencyHistogram.bounds(bucket).upper.map({ $0 <= edge }) ?? false {
                    cumulative &+= h.buckets[bucket]
                    bucket += 1
                }
                t += "\(name)_bucket{\(labels),le=\"\(seconds(edge))\"} \(cumulative)\n"
            }
            t += "\(name)_bucket{\(labels),le=\"+Inf\"} \(h.returns)\n"
            t += "\(name)_sum{\(labels)} \(seconds(h.sumNanoseconds))\n"
            t += "\(name)_count{\(labels)} \(h.returns)\n"
        }
        t += "# HELP \(inFlightName) \(inFlightHelp)\n"
        t += "# TYPE \(inFlightName) gauge\n"
        for p in probes { if let h = p.latency { t += "\(inFlightName){id=\"\(escape(p.id))\"} \(h.inFlight)\n" } }
        return Array(t.utf8)
    }

    /// ns as seconds in plain decimal (exact for the powers of two used as bounds).
    static func seconds(_ ns: UInt64) -> String {
        let whole = ns / 1_000_000_000, frac = ns % 1_000_000_000
        guard frac > 0 else { return String(whole) }
        var f = String(frac)
        f = String(repeating: "0", count: 9 - f.count) + f
        while f.hasSuffix("0") { f.removeLast() }
        return "\(whole).\(f)"
    }

    /// A label value: backslash, double quote and newline escaped (text format 0.0.4).
    static func escape(_ s: String) -> String {
        var out = ""
        for c in s.unicodeScalars {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }
}
