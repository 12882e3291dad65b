// Committing a batch: its state-log entry (written ahead of the kernel work when it can), and
// its replies, sent once the committer has synced the log.

import Dispatch
import Logging

/// The writer's side of committing: appends each batch's state entry (`persist`) and sends the
/// batch's replies once that entry is durable. With a separate sync (group commit) the
/// `Committer` thread syncs and replies while the writer goes on; without one, `persist` is
/// durable by itself and replies go at once.
///
/// Owned by the writer thread; only the committer's jobs run elsewhere.
final class BatchCommit {
    private let persist: (RegistrySnapshot) throws -> Void
    /// Syncs the state log and sends replies off the writer thread; nil when `persist` is
    /// durable by itself (no separate sync hook).
    private let committer: Committer?
    /// Queues an op for the writer (a rollback after a failed sync).
    private let requeue: @Sendable (PendingOp) -> Void
    private let logger: Logger
    /// Time spent in `persist` by `save` (`status`: state_write_us).
    private(set) var persistMicros: UInt64 = 0

    /// `sync`, if given, makes what `persist` appended durable; it runs on the committer
    /// thread, and replies wait for it.
    init(persist: @escaping (RegistrySnapshot) throws -> Void, sync: (@Sendable () throws -> Void)?,
         requeue: @escaping @Sendable (PendingOp) -> Void, logger: Logger) {
        self.persist = persist
        self.committer = sync.map { Committer(sync: $0) }
        self.requeue = requeue
        self.logger = logger
    }

    /// Whether entries are synced apart from being appended: only then is there a sync worth
    /// starting early, so only then are entries written ahead (`BatchApplier.writeAhead`).
    var groupCommit: Bool { committer != nil }

    /// `persist`, timed into `persistMicros`; its error, logged, or nil.
    func save(_ snapshot: RegistrySnapshot) -> (any Error)? {
        let started = ContinuousClock.now
        defer { persistMicros += (ContinuousClock.now - started).microseconds }
        do {
            try persist(snapshot)
            return nil
        } catch {
            logger.error("saving state failed", metadata: ["error": "\(error)"])
            return error
        }
    }

    /// An entry was written ahead of the batch's kernel work: its sync starts now. The batch's
    /// own `reply` follows it and carries the outcome.
    func wroteAhead() {
        committer?.submit(.ahead)
    }

    /// Sends a batch's replies: once the committer has synced the log, or at once if there is
    /// no separate sync or nothing to wait for (`saved` false: the entry could not be written,
    /// and no entry was written ahead). If the sync fails, no registration of the batch is
    /// acknowledged: they are refused and taken back out through the writer. `appends`: the
    /// batch appended an entry of its own (else its job needs no sync of its own).
    func reply(_ replies: BatchReplies, saved: Bool, wroteAhead: Bool, appends: Bool) {
        // After an entry written ahead, this batch's job always follows it: it carries that
        // sync's outcome.
        guard let committer, saved || wroteAhead else {
            replies.send()
            return
        }
        let logger = self.logger, requeue = self.requeue
        committer.submit(Committer.Job(durable: { replies.send() }, failed: { why in
            // Not durable: no registration of this batch may be acknowledged. Take them
            // back out through the writer (an ordinary removal, itself logged).
            logger.error("syncing the state log failed", metadata: ["error": "\(why)"])
            let undo = replies.sendNotSynced(why)
            // One removal per id: an unregister by ids fails whole if one is already gone
            // (another client may have removed it by consumer meanwhile).
            for id in undo {
                requeue(.unregister(ids: [id], selection: nil, peer: .daemon, authorize: { _ in true }, reply: { _ in }))
            }
        }, needsSync: appends))
    }

    /// Appends a follow round's entry and waits until it is durable. A failure is logged and
    /// left for the next batch or checkpoint to retry: the state file keeps registrations,
    /// not file versions, and the kernel side is already right. Not timed into
    /// `persistMicros`, which belongs to request batches.
    func saveAndWait(_ snapshot: RegistrySnapshot) {
        do {
            try persist(snapshot)
            if let committer {
                let synced = DispatchSemaphore(value: 0)
                let logger = self.logger
                committer.submit(Committer.Job(durable: { synced.signal() }, failed: { why in
                    logger.error("syncing the state log failed", metadata: ["error": "\(why)"])
                    synced.signal()
                }))
                synced.wait()
            }
        } catch { logger.error("saving state failed", metadata: ["error": "\(error)"]) }
    }

    /// Blocks until every batch handed to the committer has been answered.
    func waitAll() {
        committer?.waitAll()
    }

    /// Answers what the committer holds, then ends its thread.
    func stop() {
        committer?.stop()
    }

    /// What a registration whose state could not be written fails with.
    static func notRegistered(_ error: any Error) -> EngineError {
        EngineError(code: .stateWriteFailed,
                    message: "the state file could not be written, so these probes were not registered: \(error)")
    }
}

/// The replies of one batch, decided by the writer and sent together by `BatchCommit.reply`.
struct BatchReplies: Sendable {
    typealias RegisterReply = @Sendable (Result<[ProbeRecord], EngineError>) -> Void
    typealias RestoreReply = @Sendable ([Result<ProbeRecord, EngineError>]) -> Void
    typealias RemovalReply = @Sendable (Result<Removal, EngineError>) -> Void

    var registers: [(reply: RegisterReply, result: Result<[ProbeRecord], EngineError>)] = []
    var restores: [(reply: RestoreReply, results: [Result<ProbeRecord, EngineError>])] = []
    /// Removals happened whether or not they were saved: the kernel no longer counts them.
    var removals: [(reply: RemovalReply, count: Int)] = []
    /// Why the batch's removals are not saved, if they are not (its entry could not be
    /// written): they are acknowledged all the same, with the reason, and the persister
    /// carries them into the next save.
    var unsavedRemoval: String?

    /// Sends every reply as decided.
    func send() {
        for r in registers { r.reply(r.result) }
        for r in restores { r.reply(r.results) }
        for r in removals { r.reply(.success(Removal(count: r.count, unsaved: unsavedRemoval))) }
    }

    /// Sends the replies of a batch whose entry could not be synced: its registrations are
    /// refused (returns their ids, to be taken back out), restored ones were on disk already,
    /// removals are acknowledged as not saved.
    func sendNotSynced(_ why: String) -> [String] {
        let error = EngineError(code: .stateWriteFailed,
                                message: "the state file could not be synced, so these probes were not registered: \(why)")
        var undo: [String] = []
        for r in registers {
            if case .success(let records) = r.result {
                undo += records.map(\.id)
                r.reply(.failure(error))
            } else {
                r.reply(r.result)
            }
        }
        for r in restores { r.reply(r.results) }
        for r in removals {
            r.reply(.success(Removal(count: r.count, unsaved: "the state file could not be synced: \(why)")))
        }
        return undo
    }
}

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
        guard commit.groupCommit else { return false }
        let small = registers.indices.filter {
            registers[$0].failure == nil && !registers[$0].large && registers[$0].restoreID == nil
        }
        guard !small.isEmpty else { return false }
        var added: [ProbeRecord] = []
        for i in small {
            let plan = registers[i]
            registers[i].early = plan.probes.map { p in
                record(id: registry.nextID(), plan: plan, spec: p.spec, sites: p.sites, now: now, restored: nil, state: .active,
                       probeSet: p.probeSet)
            }
            added += registers[i].early
        }
        var snapshot = makeSnapshot()
        snapshot.batchAdded = added
        if let error = commit.save(snapshot) {
            let failure = BatchCommit.notRegistered(error)
            for i in small { registers[i].failure = failure }
            return false
        }
        for i in small { registers[i].ahead = true }
        commit.wroteAhead()
        return true
    }
}
