// Committing a batch: its state-log entry (written ahead of the kernel work when it can), and
// its replies, sent once the committer has synced the log.

extension BatchApplier {
    /// Write-ahead, with group commit only: makes and enters the records of the batch's small
    /// registrations and appends their state entry before the kernel attaches them, so that
    /// the committer syncs it meanwhile. Under churn the sync (~430 µs) used to start only
    /// after the attach (a register batch's link, ~230 µs). A registration that then fails to
    /// attach is removed again by the batch's own entry; its failure reply, like every reply of
    /// the batch, waits for that entry's sync. Returns whether it appended. If the append
    /// fails, they fail `state_write_failed` here, before any kernel work. Large requests
    /// overlap their own way (`prepare`: doing this for them too made a 10,000-probe register
    /// slower); restored ones are on disk already.
    func writeAhead(_ registers: inout [PlannedRegister], now: BatchClock) -> Bool {
        guard let committer else { return false }
        let small = registers.indices.filter {
            registers[$0].failure == nil && !registers[$0].large && registers[$0].restoreID == nil
        }
        guard !small.isEmpty else { return false }
        var added: [ProbeRecord] = []
        for i in small {
            let plan = registers[i]
            registers[i].early = plan.probes.map { p in
                defer { nextProbeNumber += 1 }
                return record(id: ProbeID.make(nextProbeNumber), plan: plan, spec: p.spec, sites: p.sites, now: now,
                              restored: nil, state: .active)
            }
            added += registers[i].early
        }
        var snapshot = makeSnapshot()
        snapshot.batchAdded = added
        if let error = save(snapshot) {
            let failure = Self.notRegistered(error)
            for i in small { registers[i].failure = failure }
            return false
        }
        for i in small { registers[i].ahead = true }
        committer.submit(.ahead)
        return true
    }

    /// `persist`, timed into the batch counters; its error, logged, or nil.
    func save(_ snapshot: RegistrySnapshot) -> (any Error)? {
        let started = ContinuousClock.now
        defer { counters.persistMicros += (ContinuousClock.now - started).microseconds }
        do {
            try persist(snapshot)
            return nil
        } catch {
            logger.error("saving state failed", metadata: ["error": "\(error)"])
            return error
        }
    }

    /// What a registration whose state could not be written fails with.
    static func notRegistered(_ error: any Error) -> EngineError {
        EngineError(code: "state_write_failed",
                    message: "the state file could not be written, so these probes were not registered: \(error)")
    }

    /// Blocks until every batch handed to the committer has been answered (tests).
    func waitForCommits() {
        committer?.waitAll()
    }
}
