// Where a bulk batch's time goes, phase by phase, logged once per such batch.

import Logging

/// The phases of one batch on the writer (and the work lent to the attach thread), timed so
/// that a slow whole-binary register or removal can be taken apart from the daemon's log
/// without a profiler. Only bulk batches are logged (`logMinimum` probes added or removed):
/// one line each, and a clock read per phase costs nothing next to them.
struct BatchTimings {
    /// Probes a batch adds or removes for its timings to be logged.
    static let logMinimum = 50_000

    private var last = ContinuousClock.now
    private let started: ContinuousClock.Instant
    private(set) var phases: [(name: String, micros: UInt64)] = []

    init() { started = last }

    /// Ends the phase running since the previous mark (or the start) as `name`.
    mutating func mark(_ name: String) {
        let now = ContinuousClock.now
        phases.append((name, (now - last).microseconds))
        last = now
    }

    /// Adds a duration measured elsewhere (the attach thread's work, the kernel calls alone).
    mutating func note(_ name: String, micros: UInt64) {
        phases.append((name, micros))
    }

    /// Logs the phases as one line at info, if the batch is a bulk one.
    func log(_ logger: Logger, probes: Int, what: String) {
        guard probes >= Self.logMinimum else { return }
        var meta: Logger.Metadata = ["probes": "\(probes)", "total_us": "\((ContinuousClock.now - started).microseconds)"]
        for p in phases { meta[p.name + "_us"] = "\(p.micros)" }
        logger.info("bulk batch timings: \(what)", metadata: meta)
    }
}
