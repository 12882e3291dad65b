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
    /// Whether phases are kept: only for a bulk batch (`keep`), so that the thousands of small
    /// batches of a churn pay a clock read per phase and nothing more.
    private var kept: Bool

    /// `kept`: time the phases from the start (else from `keep`).
    init(kept: Bool = false) {
        started = last
        self.kept = kept
    }

    /// Keeps the phases from now on if `probes` makes the batch a bulk one; the time since the
    /// start (or the last mark) becomes phase `name`.
    mutating func keep(probes: Int, firstPhase name: String) {
        if probes >= Self.logMinimum { kept = true }
        mark(name)
    }

    /// Ends the phase running since the previous mark (or the start) as `name`.
    mutating func mark(_ name: String) {
        guard kept else { return }
        let now = ContinuousClock.now
        phases.append((name, (now - last).microseconds))
        last = now
    }

    /// Adds a duration measured elsewhere (the attach thread's work, the kernel calls alone).
    mutating func note(_ name: String, micros: UInt64) {
        guard kept else { return }
        phases.append((name, micros))
    }

    /// Logs the phases as one line at info, if the batch is a bulk one.
    func log(_ logger: Logger, probes: Int, what: String) {
        guard kept, probes >= Self.logMinimum else { return }
        var meta: Logger.Metadata = ["probes": "\(probes)", "total_us": "\((ContinuousClock.now - started).microseconds)"]
        for p in phases { meta[p.name + "_us"] = "\(p.micros)" }
        logger.info("bulk batch timings: \(what)", metadata: meta)
    }
}
