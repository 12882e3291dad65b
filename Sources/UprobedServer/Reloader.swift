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

/// SIGHUP: re-reads the config file and applies what can change while running (log level,
/// access policy, per-uid limit, metrics listener and series, OTLP exporter). A bad file is refused with a log line and
/// the old config stays in force; keys that need a restart are named in a warning and keep
/// their running value. Tells systemd RELOADING=1 ... READY=1 around it.
final class Reloader: Sendable {
    let options: StartOptions
    let access: PolicyCell
    let counters: ServiceCounters
    let metrics: MetricsServer
    let series: MetricsSeriesState
    let group: MultiThreadedEventLoopGroup
    let logger: Logger
    let serving: String
    let probeSets: ProbeSets
    /// Hands a reloaded config to the exporters other than the Prometheus listener (OTLP).
    let reloadExporters: @Sendable (DaemonConfig) -> Void
    /// The config in force (reloadable keys updated by each good reload). Reloads run one at a
    /// time on the signal source's serial queue.
    private let current: Mutex<DaemonConfig>

    init(options: StartOptions, running: DaemonConfig, access: PolicyCell, counters: ServiceCounters,
         metrics: MetricsServer, series: MetricsSeriesState, group: MultiThreadedEventLoopGroup, logger: Logger, serving: String,
         probeSets: ProbeSets, reloadExporters: @escaping @Sendable (DaemonConfig) -> Void) {
        self.probeSets = probeSets
        self.options = options
        self.access = access
        self.counters = counters
        self.metrics = metrics
        self.series = series
        self.group = group
        self.logger = logger
        self.serving = serving
        self.reloadExporters = reloadExporters
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
                         metadata: ["path": "\(path)", "error_code": "\(ErrorCode.configInvalid)", "error": "\(error)"])
            // The probe sets are files of their own: a bad config file does not hold them back.
            let sets = reconcileProbeSets(current.withLock { $0.probesDir })
            Systemd.notify("READY=1\nSTATUS=serving on \(serving); config reload refused: \(error); \(sets)")
            return
        }
        let old = current.withLock { $0 }
        let fixed = ConfigKey.restartOnlyChanges(old, next)
        if !fixed.isEmpty {
            logger.warning("config keys that need a restart changed; they keep their running values until then",
                           metadata: ["keys": "\(fixed.joined(separator: ","))", "path": "\(path)"])
        }
        let applied = ConfigKey.reloaded(old, from: next)
        let policy = AccessPolicy(config: applied)
        for w in policy.warnings { logger.warning("access policy: \(w)") }
        if let level = Logger.Level(rawValue: applied.logLevel) { options.logLevel.level = level }
        access.store(policy)
        current.withLock { $0 = applied }
        series.set(applied.metricsProbeSeries)
        reloadExporters(applied)
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
        let sets = reconcileProbeSets(applied.probesDir)
        Systemd.notify("READY=1\nSTATUS=serving on \(serving); config reloaded; \(sets)")
    }

    /// Reconciles the probe sets of `dir` and waits for it, so that READY=1 (the end of
    /// `systemctl reload`) comes once the sets are in place. Waiting blocks only this signal
    /// queue: the reconcile runs on the engine's writer and the resolver threads.
    private func reconcileProbeSets(_ dir: String) -> String {
        let done = DispatchSemaphore(value: 0)
        let summary = Mutex("")
        let sets = probeSets
        Task {
            let o = await sets.reconcileDirectory(dir)
            summary.withLock { $0 = "probe sets: \(o.sets), \(o.refused) refused" }
            done.signal()
        }
        done.wait()
        return summary.withLock { $0 }
    }
}
