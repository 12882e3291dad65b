import CUprobeSys
import Dispatch
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import UprobeCore
import UprobeELF
import UprobeKernel
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

/// How the daemon was started, beyond the config file: what a reload must re-read and re-apply.
public struct StartOptions: Sendable {
    /// The config file given with --config (nil: the default path if it exists).
    public var configPath: String?
    /// Command-line flags that override the file (applied again after every reload).
    public var overrides: @Sendable (inout DaemonConfig) -> Void
    /// Move corrupt or incomplete state files aside and start empty instead of refusing to start.
    public var moveCorruptState: Bool
    /// The log level every handler follows.
    public var logLevel: LogLevelCell

    public init(configPath: String? = nil, overrides: @escaping @Sendable (inout DaemonConfig) -> Void = { _ in },
                moveCorruptState: Bool = false, logLevel: LogLevelCell = .shared) {
        self.configPath = configPath
        self.overrides = overrides
        self.moveCorruptState = moveCorruptState
        self.logLevel = logLevel
    }
}

/// The daemon as a swift-service-lifecycle `Service`: kernel, state file, engine, socket server
/// and metrics listener, with systemd readiness sent only once the socket is serving (after the
/// saved registrations are restored), SIGHUP reloads, and a graceful drain on SIGTERM that saves
/// the final hit counts.
public final class UprobedService: Service, Sendable {
    public let config: DaemonConfig
    private let logger: Logger
    private let options: StartOptions

    public init(config: DaemonConfig, logger: Logger, options: StartOptions = StartOptions()) {
        self.config = config
        self.logger = logger
        self.options = options
    }

    /// Threads that open and parse the binaries named in requests (see `RequestHandler.resolverPool`).
    static let resolverThreads = 4

    public func run() async throws {
        // SIGHUP's default action kills the process: ignore it before anything else; the
        // dispatch source below still sees it.
        signal(SIGHUP, SIG_IGN)
        let files = DaemonProcess.raiseFileLimit()
        if files.soft < UInt64(config.maxConnections) + DaemonProcess.descriptorReserve {
            logger.warning("few file descriptors: connections and uprobe_multi links share them", metadata: [
                "nofile_limit": "\(files.soft)", "max_connections": "\(config.maxConnections)",
                "hint": "raise LimitNOFILE (or ulimit -n) to at least max_connections + \(DaemonProcess.descriptorReserve)"])
        }
        let kernel: BPFKernelBackend
        do {
            kernel = try BPFKernelBackend(capacity: config.slotCapacity)
        } catch {
            logger.critical("kernel support missing", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
            throw ServerError(message: "cannot start: \(error.message) [\(error.code)]")
        }
        let counters = ServiceCounters()

        // The state file is read before anything attaches; a corrupt or incomplete one stops the start.
        let store = StateStore(dir: config.stateDir, logger: logger)
        let saved: SavedState?
        do {
            try store.prepare()
            saved = try Self.loadState(store, moveCorrupt: options.moveCorruptState, logger: logger)
        } catch {
            logger.critical("cannot use the state file", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
            throw ServerError(message: "cannot start: \(error.message) [\(error.code)]")
        }
        // Encoding done ahead of a large register (its state entry, then its reply) while the
        // writer is in the kernel attach: one queue, so the entry the writer waits for is first.
        let aheadQueue = DispatchQueue(label: "uprobed-encode-ahead")
        let persister = StatePersister(store: store, kernel: kernel, counters: counters, restored: saved,
                                       aheadQueue: aheadQueue, logger: logger)

        let engineConfig = EngineConfig(batchWindow: .microseconds(Int64(config.batchWindowMicros)),
                                        maxBatchRequests: config.maxBatchRequests,
                                        slotCapacity: config.slotCapacity,
                                        compactionDelay: .milliseconds(Int64(config.compactionDelayMs)),
                                        maxLinksPerGroup: config.maxLinksPerGroup)
        let engine = Engine(config: engineConfig, kernel: kernel, logger: logger,
                            persist: { snapshot in try persister.persist(snapshot) },
                            sync: { try persister.sync() },
                            prepare: { records in persister.prepare(records) })
        let resolver = UprobeELF.Resolver(limits: ResolverLimits(maxMatchesPerSpec: config.maxGlobMatches),
                                          locator: LibraryLocator(),
                                          cache: ELFFileCache(byteBudget: config.elfCacheBytes))
        let policy = AccessPolicy(config: config)
        for w in policy.warnings { logger.warning("access policy: \(w)") }
        let resolverPool = NIOThreadPool(numberOfThreads: Self.resolverThreads)
        resolverPool.start()
        // Not awaited at exit: a thread stuck in open(2) on a hung mount must not hold the stop.
        defer { resolverPool.shutdownGracefully { _ in } }
        let access = PolicyCell(policy)
        // Made before the handler, which tells it of registrations; started after the restore.
        let owners = OwnershipWatcher(engine: engine, access: access, logger: logger,
                                      checkEvery: .milliseconds(Int64(config.ownerCheckMs)),
                                      idleEvery: .milliseconds(Int64(config.followCheckMs)))
        let handler = RequestHandler(
            engine: engine, resolver: resolver,
            limits: RequestDecoder.Limits(maxProbesPerRequest: config.maxProbesPerRequest,
                                          minWatchIntervalMs: config.minWatchIntervalMs),
            logger: logger, access: access, counters: counters, aheadQueue: aheadQueue,
            resolverPool: resolverPool, registered: { records in owners.registered(records) })
        let server = SocketServer(handler: handler, logger: logger, maxLineBytes: config.maxLineBytes,
                                  minWatchIntervalMs: config.minWatchIntervalMs, sendBufferBytes: config.sendBufferBytes,
                                  connectionLimits: ConnectionLimits(maxConnections: config.maxConnections,
                                                                     maxPerUID: config.maxConnectionsPerUID,
                                                                     adminReserved: config.adminReservedConnections))

        if let saved {
            // Also with no registrations left: the restore carries the id floor.
            if !saved.probes.isEmpty { Systemd.notify("STATUS=restoring \(saved.probes.count) registrations") }
            await Self.restore(saved, engine: engine, resolver: resolver, policy: policy, logger: logger)
        }

        // After the restore: the watcher follows what is registered now.
        let watcher = PathWatcher(engine: engine, resolver: resolver, logger: logger,
                                  checkEvery: .milliseconds(Int64(config.followCheckMs)),
                                  settle: .milliseconds(Int64(config.followSettleMs)))
        watcher.start()
        owners.start()

        let endpoint: SocketServer.Endpoint
        let activated = Systemd.listenFDs()
        if let fd = activated.first {
            guard activated.count == 1, Systemd.isUnixStreamListener(fd) else {
                watcher.stop()
                owners.stop()
                engine.shutdown()
                throw ServerError(message: "socket activation passed \(activated.count) fds; expected one listening Unix stream socket")
            }
            endpoint = .activated(fd: fd)
        } else {
            endpoint = .path(config.socketPath, mode: config.socketMode)
        }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let startedAt = handler.startedAt
        let metrics = MetricsServer(logger: logger) {
            counters.metricsScrapes.add(1, ordering: .relaxed)
            return MetricsRenderer.render(engine: engine, counters: counters, startedAt: startedAt)
        }
        let logger = self.logger
        let config = self.config
        let where_ = { if case .activated(let fd) = endpoint { return "socket-activated fd \(fd)" } else { return config.socketPath } }()
        let reloader = Reloader(options: options, running: config, access: handler.access, counters: counters,
                                metrics: metrics, group: group, logger: logger, serving: where_)
        do {
            do {
                if let m = try MetricsEndpoint.parse(config.metricsListen) {
                    try await metrics.start(m, group: group, socketMode: config.socketMode)
                }
            } catch {
                throw ServerError(message: "cannot start the metrics listener on '\(config.metricsListen)': \(error)")
            }
            let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: DispatchQueue(label: "uprobed-sighup"))
            hup.setEventHandler { reloader.reload() }
            hup.resume()
            defer { hup.cancel() }
            try await withGracefulShutdownHandler {
                try await withThrowingTaskGroup(of: Void.self) { tasks in
                    tasks.addTask {
                        try await server.run(endpoint: endpoint, group: group) {
                            logger.notice("uprobed serving", metadata: ["socket": "\(where_)", "version": "\(RequestHandler.version)"])
                            let s = engine.snapshot
                            Systemd.notify("READY=1\nSTATUS=serving on \(where_); \(s.probes.count) probes, \(s.linksOpen) links")
                        }
                    }
                    if config.stateCheckpointSeconds > 0 {
                        let checkpoints = DispatchQueue(label: "uprobed-checkpoint")
                        tasks.addTask {
                            // Hit totals between batches; the writer saves registrations itself.
                            // The blocking write (25 MB for 64,000 probes) runs on its own
                            // thread, not on one of the task pool's two, which serve requests.
                            while !Task.isCancelled {
                                try await Task.sleep(for: .seconds(config.stateCheckpointSeconds))
                                await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                                    checkpoints.async {
                                        do throws(StateError) { try persister.checkpoint(engine.snapshot) } catch {
                                            logger.warning("hit checkpoint failed", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
                                        }
                                        done.resume()
                                    }
                                }
                            }
                        }
                    }
                    // STATUS every 10 s (or with each watchdog ping: half the manager's
                    // interval, as sd_watchdog_enabled(3) recommends). No-ops without NOTIFY_SOCKET.
                    let watchdog = Systemd.watchdogInterval()
                    if Systemd.notifySocketSet {
                        tasks.addTask {
                            while !Task.isCancelled {
                                let s = engine.snapshot
                                let status = "STATUS=\(s.probes.count) probes, \(s.linksOpen) links, last batch \(s.counters.lastBatchSize) requests in \(s.counters.lastBatchMicros) us"
                                Systemd.notify(watchdog == nil ? status : "WATCHDOG=1\n" + status)
                                try await Task.sleep(for: watchdog.map { $0 / 2 } ?? .seconds(10))
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
            watcher.stop()
            owners.stop()
            engine.shutdown()
            _ = Self.finalSave(persister, engine: engine, logger: logger)
            await metrics.stop()
            try? await group.shutdownGracefully()
            throw error
        }
        watcher.stop()
        owners.stop()
        engine.shutdown()
        let unsaved = Self.finalSave(persister, engine: engine, logger: logger)
        await metrics.stop()
        try await group.shutdownGracefully()
        // A stop that could not save is a failed stop: thrown, it makes the exit status 1, so
        // the service manager records the failure instead of a clean stop.
        if let unsaved { throw unsaved }
        logger.notice("uprobed stopped")
    }

    /// Reads the state files; corrupt or incomplete ones are an error unless the operator asked
    /// to move them aside. A torn last log line (a crash during an append) is cut off, so that
    /// the next append starts a line of its own.
    static func loadState(_ store: StateStore, moveCorrupt: Bool, logger: Logger) throws(StateError) -> SavedState? {
        let saved: SavedState?
        do { saved = try store.load() } catch {
            guard error.code == "state_corrupt" || error.code == "state_incomplete" else { throw error }
            guard moveCorrupt else {
                let consequence = error.code == "state_corrupt"
                    ? "refusing to start so the registrations in it are not overwritten (inspect it, or restart with --move-corrupt-state to move the state files aside and start with no registrations)"
                    : "refusing to start, because saving a state without them would lose them for good (restore \(store.path) from a backup and start again, or restart with --move-corrupt-state to move the state files aside and start with no registrations)"
                throw StateError(code: error.code, message: "\(error.message); \(consequence)", missingChanges: error.missingChanges)
            }
            let moved = try store.moveAside()
            logger.error("state files are \(error.code == "state_corrupt" ? "corrupt" : "incomplete"); moved them aside and starting with no registrations",
                         metadata: ["error_code": "\(error.code)", "error": "\(error.message)", "moved_to": "\(moved.joined(separator: ","))"])
            return nil
        }
        let cut = try store.dropTornTail()
        if cut > 0 {
            logger.notice("cut a torn last line off the state log (an append a crash cut short; it was never acknowledged)",
                          metadata: ["path": "\(store.logPath)", "bytes": "\(cut)"])
        }
        return saved
    }

    /// Restores every saved registration in one engine batch; logs each degraded one.
    static func restore(_ saved: SavedState, engine: Engine, resolver: UprobeELF.Resolver, policy: AccessPolicy,
                        logger: Logger) async {
        let items = RestorePlanner.plan(saved, resolver: resolver, bootID: currentBootID(),
                                        ownership: RestorePlanner.ownershipCheck(policy: policy))
        let results = await engine.restore(items, nextIDFloor: saved.nextID)
        var active = 0, degraded = 0, ended = 0
        let endedBefore = Set(saved.probes.filter { $0.endedReason != nil }.map(\.id))
        for (item, result) in zip(items, results) {
            switch result {
            case .success(let r):
                switch r.state {
                case .degraded(let reason):
                    degraded += 1
                    logger.warning("restored probe is degraded", metadata: [
                        "probe_id": "\(r.id)", "path": "\(item.targets.first?.path ?? item.spec.path)",
                        "consumer": "\(r.consumer ?? "")", "error_code": "probe_degraded", "reason": "\(reason)"])
                case .ended(let reason):
                    ended += 1
                    // Ended by this restore: its process stopped being its owner's meanwhile.
                    if !endedBefore.contains(r.id) {
                        logger.warning("probe ended: its process is no longer its owner's", metadata: [
                            "probe_id": "\(r.id)", "pid": "\(item.spec.pid.map(String.init) ?? "")",
                            "owner_uid": "\(r.owner.uid)", "error_code": "process_not_owned", "reason": "\(reason)"])
                    }
                case .active:
                    active += 1
                }
            case .failure(let e):
                degraded += 1
                logger.error("restoring probe failed", metadata: ["probe_id": "\(item.id)", "error_code": "\(e.code)", "error": "\(e.message)"])
            }
        }
        logger.notice("registrations restored", metadata: ["active": "\(active)", "degraded": "\(degraded)", "ended": "\(ended)"])
    }

    /// Saves the final hit counts after the writer has stopped (links are closed by then, so
    /// the counters no longer move). If that fails: logs what the files lack (removals that
    /// will come back, registrations that will be missing, hit counts) and returns the error
    /// the stop fails with.
    static func finalSave(_ persister: StatePersister, engine: Engine, logger: Logger) -> ServerError? {
        let snap = engine.snapshot
        do {
            try persister.checkpoint(snap)
            logger.notice("state saved", metadata: ["probes": "\(snap.probes.count)", "path": "\(persister.store.path)"])
            return nil
        } catch {
            let unsaved = persister.unsaved(snap)
            let risk = unsaved.describe(now: clockRealtime())
            var metadata: Logger.Metadata = [
                "error_code": "\(error.code)", "error": "\(error.message)", "path": "\(persister.store.path)",
                "unsaved_removals": "\(unsaved.removals.count)", "unsaved_registrations": "\(unsaved.registrations.count)"]
            let ids = unsaved.removals + unsaved.registrations
            if !ids.isEmpty { metadata["probe_ids"] = "\(UnsavedChanges.list(ids))" }
            logger.critical("saving the final state failed: \(risk)", metadata: metadata)
            Systemd.notify("STATUS=stopped; the final state save failed: \(error.message)")
            return ServerError(message: "stopped without saving the state (\(error.message)): \(risk)")
        }
    }
}

/// SIGHUP: re-reads the config file and applies what can change while running (log level,
/// access policy, per-uid limit, metrics listener). A bad file is refused with a log line and
/// the old config stays in force; keys that need a restart are named in a warning and keep
/// their running value. Tells systemd RELOADING=1 ... READY=1 around it.
final class Reloader: Sendable {
    let options: StartOptions
    let access: PolicyCell
    let counters: ServiceCounters
    let metrics: MetricsServer
    let group: MultiThreadedEventLoopGroup
    let logger: Logger
    let serving: String
    /// The config in force (reloadable keys updated by each good reload). Reloads run one at a
    /// time on the signal source's serial queue.
    private let current: Mutex<DaemonConfig>

    init(options: StartOptions, running: DaemonConfig, access: PolicyCell, counters: ServiceCounters,
         metrics: MetricsServer, group: MultiThreadedEventLoopGroup, logger: Logger, serving: String) {
        self.options = options
        self.access = access
        self.counters = counters
        self.metrics = metrics
        self.group = group
        self.logger = logger
        self.serving = serving
        self.current = Mutex(running)
    }

    func reload() {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        Systemd.notify("RELOADING=1\nMONOTONIC_USEC=\(Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000)\nSTATUS=reloading config")
        let path = options.configPath ?? DaemonConfig.defaultPath
        var next: DaemonConfig
        do {
            next = try DaemonConfig.load(path: options.configPath)
            options.overrides(&next)
            guard Logger.Level(rawValue: next.logLevel) != nil else {
                throw ConfigError(line: 0, message: "unknown log level '\(next.logLevel)'")
            }
        } catch {
            counters.configReloadFailures.add(1, ordering: .relaxed)
            logger.error("config reload refused; the previous configuration stays in force",
                         metadata: ["path": "\(path)", "error_code": "config_invalid", "error": "\(error)"])
            Systemd.notify("READY=1\nSTATUS=serving on \(serving); config reload refused: \(error)")
            return
        }
        let old = current.withLock { $0 }
        let fixed = Self.restartOnlyChanges(old, next)
        if !fixed.isEmpty {
            logger.warning("config keys that need a restart changed; they keep their running values until then",
                           metadata: ["keys": "\(fixed.joined(separator: ","))", "path": "\(path)"])
        }
        var applied = old
        applied.logLevel = next.logLevel
        applied.adminUsers = next.adminUsers; applied.adminGroups = next.adminGroups
        applied.registerUsers = next.registerUsers; applied.registerGroups = next.registerGroups
        applied.readUsers = next.readUsers; applied.readGroups = next.readGroups
        applied.maxProbesPerUID = next.maxProbesPerUID
        applied.metricsListen = next.metricsListen
        let policy = AccessPolicy(config: applied)
        for w in policy.warnings { logger.warning("access policy: \(w)") }
        if let level = Logger.Level(rawValue: applied.logLevel) { options.logLevel.level = level }
        access.store(policy)
        current.withLock { $0 = applied }
        if old.metricsListen != applied.metricsListen {
            // Rebinding waits on the event loop: never block the signal queue on it.
            let metrics = self.metrics, group = self.group, logger = self.logger, mode = applied.socketMode
            let listen = applied.metricsListen
            Task {
                await metrics.stop()
                do {
                    if let m = try MetricsEndpoint.parse(listen) { try await metrics.start(m, group: group, socketMode: mode) }
                } catch {
                    logger.error("metrics listener could not move; it is off until the next good reload",
                                 metadata: ["error": "\(error)", "address": "\(listen)"])
                }
            }
        }
        counters.configReloads.add(1, ordering: .relaxed)
        logger.notice("config reloaded", metadata: ["path": "\(path)", "log_level": "\(applied.logLevel)"])
        Systemd.notify("READY=1\nSTATUS=serving on \(serving); config reloaded")
    }

    /// Keys whose new value only takes effect after a restart.
    static func restartOnlyChanges(_ a: DaemonConfig, _ b: DaemonConfig) -> [String] {
        var out: [String] = []
        if a.socketPath != b.socketPath { out.append("socket") }
        if a.socketMode != b.socketMode { out.append("socket_mode") }
        if a.stateDir != b.stateDir { out.append("state_dir") }
        if a.stateCheckpointSeconds != b.stateCheckpointSeconds { out.append("state_checkpoint_s") }
        if a.maxLineBytes != b.maxLineBytes { out.append("max_line_bytes") }
        if a.maxProbesPerRequest != b.maxProbesPerRequest { out.append("max_probes_per_request") }
        if a.sendBufferBytes != b.sendBufferBytes { out.append("send_buffer_bytes") }
        if a.maxConnections != b.maxConnections { out.append("max_connections") }
        if a.maxConnectionsPerUID != b.maxConnectionsPerUID { out.append("max_connections_per_uid") }
        if a.adminReservedConnections != b.adminReservedConnections { out.append("admin_reserved_connections") }
        if a.elfCacheBytes != b.elfCacheBytes { out.append("elf_cache_bytes") }
        if a.maxGlobMatches != b.maxGlobMatches { out.append("max_glob_matches") }
        if a.batchWindowMicros != b.batchWindowMicros { out.append("batch_window_us") }
        if a.maxBatchRequests != b.maxBatchRequests { out.append("max_batch_requests") }
        if a.compactionDelayMs != b.compactionDelayMs { out.append("compaction_delay_ms") }
        if a.maxLinksPerGroup != b.maxLinksPerGroup { out.append("max_links_per_group") }
        if a.slotCapacity != b.slotCapacity { out.append("slot_capacity") }
        if a.minWatchIntervalMs != b.minWatchIntervalMs { out.append("min_watch_interval_ms") }
        if a.followCheckMs != b.followCheckMs { out.append("follow_check_ms") }
        if a.followSettleMs != b.followSettleMs { out.append("follow_settle_ms") }
        if a.ownerCheckMs != b.ownerCheckMs { out.append("owner_check_ms") }
        return out
    }
}

/// Settings of the daemon's process, made once by `main` before the service starts.
public enum DaemonProcess {
    /// Descriptors to keep beyond `max_connections` for the engine: a batch of single-probe
    /// registrations makes one link (one fd) each until the next merge, and the resolver opens
    /// the binaries it reads. Below this, the daemon warns at start.
    static let descriptorReserve: UInt64 = 4096

    /// Raises the soft RLIMIT_NOFILE to the hard limit (setrlimit(2)) and returns the limits
    /// then in force. The daemon never uses select(2), so the historical soft limit of 1024
    /// protects nothing here, while every uprobe_multi link and client connection is an fd.
    /// The shipped unit filters setrlimit out (`~@resources`); its `LimitNOFILE` sets both
    /// limits, so there is nothing to raise there.
    @discardableResult
    public static func raiseFileLimit() -> (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0 else { return (0, 0) }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(resource, &raised) == 0 { limit = raised }
        }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }

    /// Large requests build multi-megabyte buffers (a 10,000-probe request: its 0.5 MB line,
    /// the 3.5 MB state-log line, the 1.2 MB reply; a `stats` of 10,000 probes: 330 KB).
    /// glibc gives each block over 128 KiB its own mmap and unmaps it on free, so each such
    /// request faulted in fresh zeroed pages: ~4,000 faults (16 MB) per 10,000-probe register
    /// and unregister, measured; encoding that register's state-log line took 14 ms instead
    /// of 9. Blocks up to 32 MiB now come from the heap, and up to 64 MiB of freed heap stays
    /// mapped for the next request (that much resident memory is the price).
    /// Returns false if glibc refused the settings (the daemon runs anyway, slower on big requests).
    @discardableResult
    public static func keepFreedMemory() -> Bool {
        CUprobeSys_keep_freed_memory(32 << 20, 64 << 20) != 0
    }
}
