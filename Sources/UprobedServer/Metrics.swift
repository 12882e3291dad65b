import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization
import UprobeCore
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

/// Renders the Prometheus text format (version 0.0.4) from the engine's published snapshot and
/// one bulk counter read, into a fresh swift-prometheus registry per scrape (so probes that are
/// gone leave no stale series).
public enum MetricsRenderer {
    /// A full metric name (already prefixed `uprobed_`, unit suffix included) and its HELP text.
    static func desc(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    /// One scrape, from one version of the registry (read through the uprobes tree).
    /// `startTime`: when the daemon started, in seconds since the Unix epoch.
    public static func render(engine: Engine, counters: ServiceCounters, startTime: Double) -> [UInt8] {
        engine.read { snap, uprobes in
            render(engine: engine, snap, uprobes: uprobes, counters: counters, startTime: startTime)
        }
    }

    private static func render(engine: Engine, _ snap: borrowing RegistrySnapshot, uprobes: Int, counters: ServiceCounters,
                               startTime: Double) -> [UInt8] {
        let registry = PrometheusCollectorRegistry()
        if case .success(let stats) = engine.statsTable(of: snap, ids: nil).map(\.rows) {
            for s in stats {
                guard let r = snap.probes[s.id] else { continue }
                let labels = [("id", s.id), ("path", r.targets.first?.path ?? r.spec.path),
                              ("symbol", r.targets.first?.symbol ?? r.spec.symbol ?? r.spec.usdt ?? ""),
                              ("consumer", r.consumer ?? "")]
                registry.makeCounter(descriptor: desc("uprobed_probe_hits_total", "Hits of one probe since it was registered (hits while uprobed was down are not counted)."), labels: labels)
                    .increment(by: Int64(clamping: s.hits))
                registry.makeGauge(descriptor: desc("uprobed_probe_degraded", "1 if the probe is degraded (registered but its file cannot be probed) or ended (its process exited); `uprobectl list` says why."), labels: [("id", s.id)])
                    .set(Double(s.state == .active ? 0 : 1))
            }
        } else {
            counters.counterReadFailures.add(1, ordering: .relaxed)
        }
        func gauge(_ name: String, _ help: String, _ v: Double) { registry.makeGauge(descriptor: desc(name, help)).set(v) }
        func counter(_ name: String, _ help: String, _ v: UInt64) {
            registry.makeCounter(descriptor: desc(name, help)).increment(by: Int64(clamping: v))
        }
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
        counter("uprobed_metrics_scrapes_total", "Scrapes of this endpoint.", counters.metricsScrapes.load(ordering: .relaxed))
        counter("uprobed_hits_read_failures_total", "Scrapes whose read of the kernel hit counters failed (they export no probe series).",
                counters.counterReadFailures.load(ordering: .relaxed))
        registry.makeGauge(descriptor: desc("uprobed_build_info", "Always 1; the version label says which uprobed runs."), labels: [("version", RequestHandler.version)]).set(Double(1))
        var out: [UInt8] = []
        registry.emit(into: &out)
        return out
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
