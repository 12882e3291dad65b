import Dispatch
import Logging
import ServiceLifecycle
import UprobeCore

/// Saves the hit totals every `every`, between batches (the writer saves registrations itself
/// with each batch), so a crash loses at most that much of the carried-over totals. The write
/// (25 MB for 64,000 probes) runs on a queue of its own, not on one of the task pool's two
/// threads, which serve requests. Ends when its task is cancelled.
struct CheckpointService: Service {
    let persister: StatePersister
    let engine: Engine
    let every: Duration
    let logger: Logger
    private let queue = DispatchQueue(label: "uprobed-checkpoint")

    init(persister: StatePersister, engine: Engine, every: Duration, logger: Logger) {
        self.persister = persister
        self.engine = engine
        self.every = every
        self.logger = logger
    }

    func run() async throws {
        while !Task.isCancelled {
            try await Task.sleep(for: every)
            let (persister, engine, logger) = (self.persister, self.engine, self.logger)
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                queue.async {
                    do throws(StateError) { try persister.checkpoint(engine.snapshot) } catch {
                        logger.warning("hit checkpoint failed", metadata: ["error_code": "\(error.code)", "error": "\(error.message)"])
                    }
                    done.resume()
                }
            }
        }
    }
}

/// Tells systemd the daemon's STATUS every 10 s, or with each watchdog ping at half the
/// manager's interval (as sd_watchdog_enabled(3) recommends). Runs only under a notify socket.
struct SystemdStatusService: Service {
    let engine: Engine
    let watchdog: Duration?

    func run() async throws {
        while !Task.isCancelled {
            let status = engine.read { s, _ in
                "STATUS=\(s.probes.count) probes, \(s.linksOpen) links, last batch \(s.counters.lastBatchSize) requests in \(s.counters.lastBatchMicros) us"
            }
            Systemd.notify(watchdog == nil ? status : "WATCHDOG=1\n" + status)
            try await Task.sleep(for: watchdog.map { $0 / 2 } ?? .seconds(10))
        }
    }
}
