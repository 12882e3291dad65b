import ArgumentParser
import Logging
import ServiceLifecycle
import UprobedProtocol
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
            Listens for JSON-lines requests on a Unix socket (or the socket systemd passes by socket \
            activation). Built-in defaults need no config file; a config file overrides them and \
            flags override both. Needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for uprobe_multi links).
            """,
        version: UprobedVersion.current)

    @Option(name: .long, help: "Config file (default \(DaemonConfig.defaultPath) if it exists).")
    var config: String?

    @Option(name: .long, help: "Unix socket to bind when not socket-activated (default /run/uprobed/uprobed.sock).")
    var socket: String?

    @Option(name: .long, help: "Directory for the state file (default /var/lib/uprobed).")
    var stateDir: String?

    @Option(name: .long, help: "Directory in bpffs for the pinned program, maps and links (default /sys/fs/bpf/uprobed; \"\" pins nothing).")
    var pinDir: String?

    @Flag(name: .long, help: "Detach every probe by removing every pin under the pin directory, then exit (the daemon must be stopped; saved registrations stay and are attached again at the next start).")
    var removePins = false

    @Option(name: .long, help: "Directory of probe-set files (default /etc/uprobed/probes.d).")
    var probesDir: String?

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical (default info).")
    var logLevel: String?

    @Flag(name: .long, help: "If the state files are corrupt or incomplete (changes missing between them, e.g. a deleted state.json), move them aside (state.json.corrupt-TIME, state.log.corrupt-TIME, state.log.prev.corrupt-TIME) and start with no registrations, instead of refusing to start.")
    var moveCorruptState = false

    func run() async throws {
        DaemonProcess.keepFreedMemory()
        var cfg: DaemonConfig
        do { cfg = try DaemonConfig.load(path: config) } catch {
            throw ValidationError("bad config: \(error)")
        }
        if let socket, !socket.hasPrefix("/") { throw ValidationError("--socket must be an absolute path") }
        if let stateDir, !stateDir.hasPrefix("/") { throw ValidationError("--state-dir must be an absolute path") }
        if let pinDir, !pinDir.isEmpty, !pinDir.hasPrefix("/") { throw ValidationError("--pin-dir must be an absolute path or empty") }
        if let probesDir, !probesDir.hasPrefix("/") { throw ValidationError("--probes-dir must be an absolute path") }
        // Flags override the file, at start and again after every reload (SIGHUP).
        let (socket, stateDir, logLevel, pinDir, probesDir) = (self.socket, self.stateDir, self.logLevel, self.pinDir, self.probesDir)
        let overrides: @Sendable (inout DaemonConfig) -> Void = { c in
            if let socket { c.socketPath = socket }
            if let stateDir { c.stateDir = stateDir }
            if let pinDir { c.pinDir = pinDir }
            if let probesDir { c.probesDir = probesDir }
            if let logLevel { c.logLevel = logLevel }
        }
        overrides(&cfg)
        guard let level = Logger.Level(rawValue: cfg.logLevel) else {
            throw ValidationError("unknown log level '\(cfg.logLevel)'")
        }
        let levelCell = LogLevelCell.shared
        levelCell.level = level
        // Under systemd with stderr on the journal: structured entries; otherwise `<N>` lines.
        if Systemd.stderrIsJournal {
            LoggingSystem.bootstrap { label in JournalLogHandler(label: label, levelCell: levelCell) }
        } else {
            LoggingSystem.bootstrap { label in PriorityStderrLogHandler(label: label, levelCell: levelCell) }
        }
        let logger = Logger(label: "uprobed")
        if removePins {
            do {
                let summary = try PinRemoval.run(config: cfg, logger: logger)
                print(summary)
                return
            } catch {
                throw ValidationError("\(error)")
            }
        }
        let service = UprobedService(config: cfg, logger: logger,
                                     options: StartOptions(configPath: config, overrides: overrides,
                                                           moveCorruptState: moveCorruptState, logLevel: levelCell))
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


