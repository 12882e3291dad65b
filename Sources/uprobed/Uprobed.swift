import ArgumentParser
import Logging
import ServiceLifecycle
import UprobedServer
#if canImport(Glibc)
import Glibc
#endif

/// `uprobed` — the daemon. Thin: parse flags, load config, run the service.
@main
struct UprobedCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uprobed",
        abstract: "Own every user-space probe on this host: attach them in batches, count every hit exactly.",
        discussion: """
            Listens for JSON-lines requests on a Unix socket (or the socket systemd passes by socket
            activation). Built-in defaults need no config file; a config file overrides them and
            flags override both. Needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for uprobe_multi links).
            """,
        version: "0.1.0")

    @Option(name: .long, help: "Config file (default \(DaemonConfig.defaultPath) if it exists).")
    var config: String?

    @Option(name: .long, help: "Unix socket to bind when not socket-activated (default /run/uprobed/uprobed.sock).")
    var socket: String?

    @Option(name: .long, help: "Directory for the state file (default /var/lib/uprobed).")
    var stateDir: String?

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical (default info).")
    var logLevel: String?

    func run() async throws {
        var cfg: DaemonConfig
        do { cfg = try DaemonConfig.load(path: config) } catch {
            throw ValidationError("bad config: \(error)")
        }
        if let socket {
            guard socket.hasPrefix("/") else { throw ValidationError("--socket must be an absolute path") }
            cfg.socketPath = socket
        }
        if let stateDir { cfg.stateDir = stateDir }
        if let logLevel { cfg.logLevel = logLevel }
        guard let level = Logger.Level(rawValue: cfg.logLevel) else {
            throw ValidationError("unknown log level '\(cfg.logLevel)'")
        }
        LoggingSystem.bootstrap { label in PriorityStderrLogHandler(label: label, level: level) }
        let logger = Logger(label: "uprobed")
        let service = UprobedService(config: cfg, logger: logger)
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: service, successTerminationBehavior: .gracefullyShutdownGroup,
                             failureTerminationBehavior: .gracefullyShutdownGroup)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        do { try await group.run() } catch {
            logger.critical("uprobed failed", metadata: ["error": "\(error)"])
            Foundation_exit(1)
        }
    }
}

@inline(never) func Foundation_exit(_ code: Int32) -> Never { exit(code) }


