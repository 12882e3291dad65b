import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import UprobeCore
import UprobeELF
import UprobeKernel
import UprobedProtocol

/// The daemon as a swift-service-lifecycle `Service`: kernel, engine and socket server, with
/// systemd readiness sent only once the socket is serving and a graceful drain on SIGTERM.
public final class UprobedService: Service, Sendable {
    public let config: DaemonConfig
    private let logger: Logger

    public init(config: DaemonConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    public func run() async throws {
        let kernel: BPFKernelBackend
        do {
            kernel = try BPFKernelBackend(capacity: config.slotCapacity)
        } catch {
            logger.critical("kernel support missing", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
            throw ServerError(message: "cannot start: \(error.message) [\(error.code)]")
        }
        let engineConfig = EngineConfig(batchWindow: .microseconds(Int64(config.batchWindowMicros)),
                                        maxBatchRequests: config.maxBatchRequests,
                                        slotCapacity: config.slotCapacity)
        let engine = Engine(config: engineConfig, kernel: kernel, logger: logger)
        let handler = RequestHandler(
            engine: engine,
            resolver: Resolver(limits: ResolverLimits(maxMatchesPerSpec: config.maxGlobMatches)),
            limits: RequestDecoder.Limits(maxProbesPerRequest: config.maxProbesPerRequest,
                                          minWatchIntervalMs: config.minWatchIntervalMs),
            logger: logger)
        let server = SocketServer(handler: handler, logger: logger, maxLineBytes: config.maxLineBytes,
                                  minWatchIntervalMs: config.minWatchIntervalMs)

        let endpoint: SocketServer.Endpoint
        let activated = Systemd.listenFDs()
        if let fd = activated.first {
            guard activated.count == 1, Systemd.isUnixStreamListener(fd) else {
                throw ServerError(message: "socket activation passed \(activated.count) fds; expected one listening Unix stream socket")
            }
            endpoint = .activated(fd: fd)
        } else {
            endpoint = .path(config.socketPath, mode: config.socketMode)
        }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let logger = self.logger
        let config = self.config
        do {
            try await withGracefulShutdownHandler {
                try await withThrowingTaskGroup(of: Void.self) { tasks in
                    tasks.addTask {
                        try await server.run(endpoint: endpoint, group: group) {
                            let where_ = { if case .activated(let fd) = endpoint { return "socket-activated fd \(fd)" } else { return config.socketPath } }()
                            logger.notice("uprobed serving", metadata: ["socket": "\(where_)", "version": "\(RequestHandler.version)"])
                            Systemd.notify("READY=1\nSTATUS=serving on \(where_)")
                        }
                    }
                    if let interval = Systemd.watchdogInterval() {
                        tasks.addTask {
                            // Half the manager's interval, as sd_watchdog_enabled(3) recommends.
                            while !Task.isCancelled {
                                let s = engine.snapshot
                                Systemd.notify("WATCHDOG=1\nSTATUS=\(s.probes.count) probes, \(s.linksOpen) links, last batch \(s.counters.lastBatchSize) requests")
                                try await Task.sleep(for: interval / 2)
                            }
                        }
                    }
                    try await tasks.next()
                    tasks.cancelAll()
                }
            } onGracefulShutdown: {
                logger.notice("stopping: draining requests")
                Systemd.notify("STOPPING=1\nSTATUS=draining requests")
                server.stop()
            }
        } catch {
            engine.shutdown()
            try? await group.shutdownGracefully()
            throw error
        }
        engine.shutdown()
        try await group.shutdownGracefully()
        logger.notice("uprobed stopped")
    }
}
