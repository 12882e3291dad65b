import CUprobeSys
import Dispatch
import Foundation
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
            kernel = try Self.openKernel(config: config, logger: logger)
        } catch {
            logger.critical("kernel support missing", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
            throw ServerError(message: "cannot start: \(error.message) [\(error.code)]")
        }
        let counters = ServiceCounters()

        // The state file is read before anything attaches; a corrupt or incomplete one stops the start.
        let store = StateStore(dir: config.stateDir, logger: logger)
        // Dropped once restored (below): `run` lasts as long as the daemon, and an async
        // function's locals live in its frame until their scope ends.
        var saved: SavedState?
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
        // Test-only: hold large batches between their attach (links pinned) and their state
        // write, so a test can kill the daemon there.
        let persistDelay = ProcessInfo.processInfo.environment["UPROBED_TEST_PERSIST_DELAY_MS"].flatMap { UInt32($0) }
        let engine = Engine(config: engineConfig, kernel: kernel, logger: logger,
                            persist: { snapshot in
                                if let persistDelay, snapshot.batchAdded.count >= 1000 { usleep(persistDelay * 1000) }
                                try persister.persist(snapshot)
                            },
                            sync: { try persister.sync() },
                            prepare: { records in persister.prepare(records) })
        // Test-only: compress large names buffers this soon after they are made.
        let namesDelay = ProcessInfo.processInfo.environment["UPROBED_TEST_NAMES_COMPACT_DELAY_MS"].flatMap { Int64($0) }
        let resolver = UprobeELF.Resolver(limits: ResolverLimits(maxMatchesPerSpec: config.maxGlobMatches),
                                          locator: LibraryLocator(),
                                          cache: ELFFileCache(byteBudget: config.elfCacheBytes),
                                          names: NameCompactor(delay: namesDelay.map { .milliseconds($0) } ?? NameCompactor.defaultDelay))
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
        let probeSets = ProbeSets(engine: engine, logger: logger, store: store)
        let handler = RequestHandler(
            engine: engine, resolver: resolver,
            limits: RequestDecoder.Limits(maxProbesPerRequest: config.maxProbesPerRequest,
                                          minWatchIntervalMs: config.minWatchIntervalMs),
            logger: logger, access: access, counters: counters, aheadQueue: aheadQueue,
            resolverPool: resolverPool, registered: { records in owners.registered(records) }, probeSets: probeSets)
        probeSets.connect(handler)
        let server = SocketServer(handler: handler, logger: logger, maxLineBytes: config.maxLineBytes,
                                  minWatchIntervalMs: config.minWatchIntervalMs, sendBufferBytes: config.sendBufferBytes,
                                  connectionLimits: ConnectionLimits(maxConnections: config.maxConnections,
                                                                     maxPerUID: config.maxConnectionsPerUID,
                                                                     adminReserved: config.adminReservedConnections))

        if let saved, !saved.probes.isEmpty { Systemd.notify("STATUS=restoring \(saved.probes.count) registrations") }
        // Also with no registrations left: the restore carries the id floor, and pins no
        // registration owns are detached.
        await Self.restore(saved, engine: engine, resolver: resolver, policy: policy, logger: logger,
                           kernel: kernel, counters: counters)
        if saved?.namesRepairDue == true {
            // A names file could not be used at load: a snapshot now writes the restored
            // registrations' names files again, so a later replacement of the binary does not
            // leave them without names.
            do throws(StateError) { try persister.checkpoint(engine.snapshot) } catch {
                logger.error("could not write the names files again", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
            }
        }
        // The loaded state is ~750 bytes per registration (180 MB for a whole binary's glob);
        // the engine, the persister and the pins hold what they need of it by now.
        saved = nil
        // After the restore (the sets' registrations are back, so only changes are made) and
        // before serving: a client that connects finds the sets in place.
        await probeSets.completeApplied()
        await probeSets.reconcileDirectory(config.probesDir)

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
        // The start as wall-clock time, taken once so every scrape reports the same value.
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let startTime = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 - (ContinuousClock.now - handler.startedAt).inSeconds
        let series = MetricsSeriesState(config.metricsProbeSeries)
        let metrics = MetricsServer(logger: logger) {
            counters.metricsScrapes.add(1, ordering: .relaxed)
            return MetricsRenderer.render(engine: engine, counters: counters, series: series, startTime: startTime,
                                          probeSets: probeSets)
        }
        let logger = self.logger
        let config = self.config
        // The OTLP exporter (built with the package trait OTLP) and what a reload tells it.
        #if OTLP
        let otlp = OTLPExporter(config: config, engine: engine, counters: counters, startTime: startTime, probeSets: probeSets,
                                logger: logger)
        let reloadExporters: @Sendable (DaemonConfig) -> Void = { c in
            otlp.series.set(c.metricsProbeSeries)
            otlp.apply(OTLPSettings(c))
        }
        #else
        let reloadExporters: @Sendable (DaemonConfig) -> Void = { _ in }
        #endif
        let where_ = { if case .activated(let fd) = endpoint { return "socket-activated fd \(fd)" } else { return config.socketPath } }()
        let reloader = Reloader(options: options, running: config, access: handler.access, counters: counters,
                                metrics: metrics, series: series, group: group, logger: logger, serving: where_,
                                probeSets: probeSets, reloadExporters: reloadExporters)
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
                        let checkpoints = CheckpointService(persister: persister, engine: engine,
                                                            every: .seconds(config.stateCheckpointSeconds), logger: logger)
                        tasks.addTask { try await checkpoints.run() }
                    }
                    #if OTLP
                    tasks.addTask { try await otlp.run() }
                    #endif
                    if Systemd.notifySocketSet {
                        let status = SystemdStatusService(engine: engine, watchdog: Systemd.watchdogInterval())
                        tasks.addTask { try await status.run() }
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
            guard error.code == .stateCorrupt || error.code == .stateIncomplete else { throw error }
            guard moveCorrupt else {
                let consequence = error.code == .stateCorrupt
                    ? "refusing to start so the registrations in it are not overwritten (inspect it, or restart with --move-corrupt-state to move the state files aside and start with no registrations)"
                    : "refusing to start, because saving a state without them would lose them for good (restore \(store.path) from a backup and start again, or restart with --move-corrupt-state to move the state files aside and start with no registrations)"
                throw StateError(code: error.code, message: "\(error.message); \(consequence)", missingChanges: error.missingChanges)
            }
            let moved = try store.moveAside()
            logger.error("state files are \(error.code == .stateCorrupt ? "corrupt" : "incomplete"); moved them aside and starting with no registrations",
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

    /// The kernel backend: the counting program and its maps, pinned under `pin_dir` unless it
    /// is empty. Counter maps of another `slot_capacity` are replaced and their links moved by
    /// the restore (`PinReconciler`); pinned objects that do not fit otherwise are removed
    /// with every pin (their probes are attached again by the restore) and made anew.
    static func openKernel(config: DaemonConfig, logger: Logger) throws(KernelError) -> BPFKernelBackend {
        // Test-only: a program with one more instruction, i.e. an upgrade's new program.
        let variant = ProcessInfo.processInfo.environment["UPROBED_TEST_PROGRAM_VARIANT"].map { !$0.isEmpty } ?? false
        // Test-only: hold every link close (a make-before-break's old links) this long.
        let closeDelay = (ProcessInfo.processInfo.environment["UPROBED_TEST_CLOSE_DELAY_MS"].flatMap { UInt32($0) } ?? 0) * 1000
        guard !config.pinDir.isEmpty else {
            return try BPFKernelBackend(capacity: config.slotCapacity, latencyCapacity: config.latencyCapacity, variant: variant, closeDelayMicros: closeDelay)
        }
        var pins = try PinDirectory(path: config.pinDir)
        if let m = pins.mounted { logger.notice("mounted a bpf file system for the pins", metadata: ["path": "\(m)"]) }
        do throws(KernelError) {
            return try BPFKernelBackend(capacity: config.slotCapacity, latencyCapacity: config.latencyCapacity, pins: pins, variant: variant, closeDelayMicros: closeDelay)
        } catch {
            guard PinnedObjects.Mismatch.matches(error) else { throw error }
            logger.error("pinned objects do not fit this configuration: removing every pin and attaching the saved registrations again (hits since the last state save are lost)",
                         metadata: ["pin_dir": "\(config.pinDir)", "error_code": "\(error.code)", "error": "\(error.message)"])
            let path = pins.path
            let removed = try PinDirectory.removeAll(at: path)
            logger.notice("removed pins", metadata: ["pins": "\(removed)"])
            pins = try PinDirectory(path: path)
            return try BPFKernelBackend(capacity: config.slotCapacity, latencyCapacity: config.latencyCapacity, pins: pins, variant: variant, closeDelayMicros: closeDelay)
        }
    }

    /// Restores every saved registration in one engine batch, adopting the links pinned for
    /// them (`PinReconciler`); logs each degraded one.
    static func restore(_ saved: SavedState?, engine: Engine, resolver: UprobeELF.Resolver, policy: AccessPolicy,
                        logger: Logger, kernel: BPFKernelBackend? = nil, counters: ServiceCounters? = nil) async {
        var items = saved.map { RestorePlanner.plan($0, resolver: resolver, bootID: currentBootID(),
                                                     ownership: RestorePlanner.ownershipCheck(policy: policy)) } ?? []
        var adoption = Adoption()
        if let kernel, kernel.program.pins != nil {
            let started = ContinuousClock.now
            var latency: LatencyProgram? = nil
            var latencyPinsRemoved = 0
            switch kernel.openPinnedLatency() {
            case .none(let removed):
                latencyPinsRemoved = removed
            case .opened(let program):
                latency = program
            case .discarded(let error, let removed):
                latencyPinsRemoved = removed
                logger.error("pinned latency objects cannot be used: removed every latency pin; latency probes are attached again (calls since the last state save are lost)",
                             metadata: ["removed_pins": "\(removed)", "error_code": "\(error.code)", "error": "\(error.message)"])
            }
            let result = PinReconciler.reconcile(program: kernel.program, latency: latency, items: &items, saved: saved, logger: logger)
            adoption = result.adoption
            var summary = result.summary
            summary.latencyPinsRemoved = latencyPinsRemoved
            summary.micros = Int64((ContinuousClock.now - started).microseconds)
            counters?.pins.withLock { $0 = summary }
            logger.notice("pins reconciled", metadata: [
                "pin_dir": "\(summary.directory)", "adopted_links": "\(summary.adoptedLinks)", "adopted_probes": "\(summary.adoptedProbes)",
                "adopted_latency_links": "\(summary.adoptedLatencyLinks)", "latency_pins_removed": "\(summary.latencyPinsRemoved)",
                "attached_again": "\(summary.rebuiltProbes)", "stale_links": "\(summary.staleLinks)",
                "migrated_links": "\(summary.migratedLinks)", "handoffs_ended": "\(summary.handoffsEnded)",
                "objects_adopted": "\(summary.objectsAdopted.joined(separator: ","))", "objects_created": "\(summary.objectsCreated.joined(separator: ","))"])
        }
        guard let saved else { return }
        let results = await engine.restore(items, nextIDFloor: saved.nextID, adoption: adoption)
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
                        "consumer": "\(r.consumer ?? "")", "error_code": "\(ErrorCode.probeDegraded)", "reason": "\(reason)"])
                case .ended(let reason):
                    ended += 1
                    // Ended by this restore: its process stopped being its owner's meanwhile.
                    if !endedBefore.contains(r.id) {
                        logger.warning("probe ended: its process is no longer its owner's", metadata: [
                            "probe_id": "\(r.id)", "pid": "\(item.spec.pid.map(String.init) ?? "")",
                            "owner_uid": "\(r.owner.uid)", "error_code": "\(ErrorCode.processNotOwned)", "reason": "\(reason)"])
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
