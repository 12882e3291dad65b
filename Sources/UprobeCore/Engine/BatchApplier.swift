#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import Logging
import UprobeELF
import UprobeKernel
import UprobeTree

/// A request waiting for the writer.
enum PendingOp: Sendable {
    /// `early`: told the request's records while the kernel attaches them, if the request is large
    /// (see `EngineConfig.prepareMinimum`); they are its reply's records if it succeeds.
    case register(items: [RegisterItem], consumer: String?, peer: Peer,
                  early: (@Sendable ([ProbeRecord]) -> Void)?,
                  reply: @Sendable (Result<[ProbeRecord], EngineError>) -> Void)
    /// Registrations from the state file, with their ids; each one is atomic on its own.
    case restore(items: [RestoreItem], nextIDFloor: UInt64, reply: @Sendable ([Result<ProbeRecord, EngineError>]) -> Void)
    case unregister(ids: [String]?, consumer: String?, peer: Peer, authorize: @Sendable (ProbeRecord) -> Bool,
                    reply: @Sendable (Result<Removal, EngineError>) -> Void)
    /// The path watcher's changes to existing registrations (see `FollowChange`).
    case follow(changes: [FollowChange], reply: @Sendable () -> Void)
    /// Wakes the writer: a detach round finished on the detach worker.
    case detachFinished
}

extension PendingOp {
    /// Probes a register or an unregister by ids names; 0 for every other op.
    var probeCount: Int {
        switch self {
        case .register(let items, _, _, _, _): return items.count
        case .unregister(let ids?, _, _, _, _): return ids.count
        default: return 0
        }
    }
}

/// The single writer: applies a whole batch of requests to the kernel and the registry.
///
/// Lives on the engine's writer thread and is never shared, so it needs no lock of its own.
/// One batch = one slot allocation pass, at most one new uprobe_multi link per
/// (binary, pid filter, direction), one publication, one round of detach work whose link
/// closes are issued together so they share grace periods.
final class BatchApplier {
    private let kernel: any KernelBackend
    /// The uprobes tree readers use; this writer is its only writer.
    private let tree: UprobeTree
    private let logger: Logger
    private let persist: (RegistrySnapshot) throws -> Void
    private let prepare: (@Sendable ([ProbeRecord]) -> Void)?

    private var slots: SlotAllocator
    private var probes = ProbeMap()
    private var nextProbeNumber: UInt64 = 1
    private var links: [ObjectIdentifier: LinkRecord] = [:]
    /// The newest link holding each attached slot.
    private var slotLink = SlotTable<LinkRecord>()
    /// Slots whose probe is gone but which are still attached (waiting for detach work).
    private var deadSlots = SlotSet()
    /// Open links of each (binary, pid filter, direction).
    private var groupLinks: [LinkGroupKey: Set<ObjectIdentifier>] = [:]
    /// When the pending detach/merge work must run at the latest (nil: nothing pending).
    private(set) var compactionDue: ContinuousClock.Instant?
    /// The last compaction could do nothing (every dead site is in a link still in hand-off,
    /// or its rebuilds failed). Until a detach round is collected or a later compaction makes
    /// progress, pending work waits for the delay like any other instead of being due at once:
    /// the bulk-removal rule made it due after every batch, and each one rescanned thousands
    /// of dead sites for nothing while a merge's old links closed.
    private var compactionStalled = false
    private let tuning: EngineConfig
    private var counters = EngineCounters()
    private var generation: UInt64 = 0
    private var pendingTreeInserts: [TreeEdit] = []
    /// An open descriptor per attached file (device, inode). Links are created through
    /// `/proc/self/fd/N`, so a rebuild after the path was replaced (an upgrade by rename)
    /// still attaches the old inode, and a file replaced between resolution and attach is
    /// refused (`file_changed`) instead of being probed at offsets meant for another build.
    private var pinned: [PinnedFile: Int32] = [:]
    /// Closes links and waits for grace periods off this thread.
    private let detacher: DetachWorker
    /// Enters a large batch's registrations while this thread creates its links (`attachPlanned`).
    private let attacher = DrainingThread<@Sendable () -> Void>(name: "uprobed-attach") { jobs in
        for job in jobs { job() }
    }
    /// Syncs the state log and sends replies off this thread; nil when `persist` is durable
    /// by itself (no separate sync hook).
    private let committer: Committer?
    /// Queues an op for this writer (a rollback after a failed sync).
    private let requeue: @Sendable (PendingOp) -> Void
    /// Detach rounds handed to `detacher` and not yet finished, by id.
    private var rounds: [UInt64: DetachRound] = [:]
    private var nextRoundID: UInt64 = 1
    /// Links a running round attached in place of the ones it is closing. Their slots are in
    /// hand-off with an older link, and the counting program allows at most two links on a slot,
    /// so they are not rebuilt again until that round has finished.
    private var handoffLinks: Set<ObjectIdentifier> = []
    /// Links being closed by running rounds (still attached as far as `status` is concerned).
    private var closingLinks = 0

    /// `wake` is called from the detach worker when a round finishes; the engine turns it into
    /// a `.detachFinished` op so the writer collects the round. `sync`, if given, makes what
    /// `persist` appended durable; it runs on the committer thread, and replies wait for it.
    init(kernel: any KernelBackend, tree: UprobeTree = UprobeTree(), tuning: EngineConfig, logger: Logger,
         persist: @escaping (RegistrySnapshot) throws -> Void,
         sync: (@Sendable () throws -> Void)? = nil,
         prepare: (@Sendable ([ProbeRecord]) -> Void)? = nil,
         wake: @escaping @Sendable () -> Void = {},
         requeue: @escaping @Sendable (PendingOp) -> Void = { _ in }) {
        self.kernel = kernel
        self.tree = tree
        self.tuning = tuning
        self.logger = logger
        self.persist = persist
        self.prepare = prepare
        self.slots = SlotAllocator(capacity: kernel.capacity)
        self.detacher = DetachWorker(kernel: kernel, tree: tree, wake: wake)
        self.committer = sync.map { Committer(sync: $0) }
        self.requeue = requeue
    }

    // MARK: - One batch

    private struct PlannedProbe {
        var sites: [ProbeSite]
        var spec: ProbeSpecInput
        var restored: RestoreItem? = nil
    }

    private struct PlannedRegister {
        var index: Int  // position in the batch
        var probes: [PlannedProbe] = []
        var failure: EngineError?
        var consumer: String?
        var peer: Peer
        var restoreID: String? = nil
        /// A large request (`EngineConfig.prepareMinimum`): its records are made while the
        /// kernel attaches, handed to `prepare` and to the request's own hook, and entered
        /// into the registry and the tree then (and taken out again if the request fails).
        var large = false
        var earlyHook: (@Sendable ([ProbeRecord]) -> Void)? = nil
        /// A large request's records, once made; a small one's if they were written ahead.
        var early: [ProbeRecord] = []
        /// Its records were made and entered before the attach, and appended to the state log
        /// (`writeAhead`; false if that append failed).
        var ahead = false
    }

    func apply(_ batch: [PendingOp]) {
        var requests: [PendingOp] = []
        var follows: [(changes: [FollowChange], reply: @Sendable () -> Void)] = []
        for op in batch {
            switch op {
            case .follow(let changes, let reply): follows.append((changes, reply))
            case .detachFinished: continue  // collected below
            default: requests.append(op)
            }
        }
        // Only wake-ups from the detach worker: the idle path collects them.
        if requests.isEmpty && follows.isEmpty { maintain(); return }
        collectDetaches(detacher.takeFinished())
        if !requests.isEmpty { applyRequests(requests) }
        if !follows.isEmpty {
            applyFollow(follows.flatMap(\.changes))
            for f in follows { f.reply() }
        }
    }

    private func applyRequests(_ batch: [PendingOp]) {
        let started = ContinuousClock.now
        let now = BatchClock()
        counters.batches += 1
        counters.requests += UInt64(batch.count)
        counters.lastBatchSize = batch.count
        counters.maxBatchSize = max(counters.maxBatchSize, batch.count)

        // Phase A: plan. Allocate slots for registrations; validate removals.
        var registers: [PlannedRegister] = []
        var removals: [(ids: [String], reply: @Sendable (Result<Removal, EngineError>) -> Void)] = []
        var removedInBatch: Set<String> = []
        var newSlots: [UInt32] = []
        for (n, op) in batch.enumerated() {
            switch op {
            case .register(let items, let consumer, let peer, let early, _):
                var plan = PlannedRegister(index: n, consumer: consumer, peer: peer)
                let needed = items.reduce(0) { $0 + $1.targets.count }  // one slot per site
                if slots.available < needed {
                    // Reclaim retired slots (their links close, a grace period passes) before refusing.
                    reclaimSlots()
                }
                guard let allocated = slots.allocate(needed) else {
                    plan.failure = EngineError(
                        code: .capacityExhausted,
                        message: "no counter slots left for \(needed) probe sites (\(slots.inUse) of \(slots.capacity) in use); unregister probes or raise slot_capacity")
                    registers.append(plan)
                    continue
                }
                newSlots += allocated
                var next = allocated.makeIterator()
                plan.probes.reserveCapacity(needed)
                for item in items {
                    // A USDT spec is one probe with one site per note; a symbol glob is one probe
                    // per function.
                    if item.spec.usdt != nil {
                        let sites = item.targets.compactMap { t in next.next().map { ProbeSite(target: t, slot: $0) } }
                        plan.probes.append(PlannedProbe(sites: sites, spec: item.spec))
                    } else {
                        for t in item.targets {
                            guard let slot = next.next() else { break }  // never: `needed` slots were allocated
                            plan.probes.append(PlannedProbe(sites: [ProbeSite(target: t, slot: slot)], spec: item.spec))
                        }
                    }
                }
                if prepare != nil || early != nil, plan.probes.count >= tuning.prepareMinimum {
                    plan.large = true
                    plan.earlyHook = early
                }
                registers.append(plan)
            case .restore(let items, let floor, _):
                nextProbeNumber = max(nextProbeNumber, floor)
                // Each restored registration is its own request, so one that cannot attach
                // never takes the others down with it.
                for item in items {
                    var plan = PlannedRegister(index: n, consumer: item.consumer, peer: item.owner)
                    plan.restoreID = item.id
                    if item.degradedReason != nil {
                        plan.probes = [PlannedProbe(sites: [], spec: item.spec, restored: item)]
                        registers.append(plan)
                        continue
                    }
                    if slots.available < item.targets.count { reclaimSlots() }
                    guard let allocated = slots.allocate(item.targets.count) else {
                        plan.failure = EngineError(code: .capacityExhausted, message: "no counter slots left to restore \(item.id)")
                        plan.probes = [PlannedProbe(sites: [], spec: item.spec, restored: item)]
                        registers.append(plan)
                        continue
                    }
                    newSlots += allocated
                    plan.probes = [PlannedProbe(sites: zip(item.targets, allocated).map { ProbeSite(target: $0, slot: $1) },
                                                spec: item.spec, restored: item)]
                    registers.append(plan)
                }
            case .unregister(let ids, let consumer, _, let authorize, let reply):
                let selected: [String]
                if let ids {
                    if let missing = ids.first(where: { probes[$0] == nil || removedInBatch.contains($0) }) {
                        reply(.failure(EngineError(code: .probeNotFound, message: "no probe with id '\(missing)'")))
                        continue
                    }
                    selected = Array(Set(ids))
                } else {
                    selected = probes.values.filter { $0.consumer == consumer && !removedInBatch.contains($0.id) }.map(\.id)
                }
                if let denied = selected.first(where: { id in probes[id].map { !authorize($0) } ?? false }) {
                    reply(.failure(EngineError(code: .permissionDenied,
                                               message: "probe '\(denied)' belongs to another user")))
                    continue
                }
                removedInBatch.formUnion(selected)
                removals.append((selected, reply))
            case .follow, .detachFinished:
                continue  // split off by `apply`
            }
        }

        // Counters of reused slots still hold their previous owner's hits.
        if !newSlots.isEmpty {
            do { try kernel.resetCounters(slots: newSlots) } catch {
                logger.error("resetting counters failed", metadata: ["error": "\(error.message)"])
                for i in registers.indices where registers[i].failure == nil {
                    registers[i].failure = EngineError(code: error.code, message: "resetting counters failed: \(error.message)")
                }
            }
        }

        // The small registrations' state entry goes to the log now, and its sync runs while
        // the kernel attaches them.
        let wroteAhead = writeAhead(&registers, now: now)

        // Phase B: attach, one link per (binary, pid filter, direction) across all requests.
        // While the kernel attaches, a large request's records are made, handed to the hooks
        // (which encode its state entry and reply on other threads) and entered into the
        // registry and the tree; they leave both again below if the request fails. No reader
        // sees them meanwhile: the registry is published only with the batch, and readers
        // find tree consumers through the registry. Made before the attach, they delayed it
        // by 3-3.5 ms, half of it in the two hooks, which only queue work (probably the
        // threads they wake taking this CPU; not proven).
        let entered = registers.indices.filter { registers[$0].failure == nil && registers[$0].large }
        if entered.isEmpty {
            attachPlanned(&registers)
        } else {
            let large = entered.map { (index: $0, plan: registers[$0]) }
            var made: [Int: [ProbeRecord]] = [:]
            attachPlanned(&registers) {
                for (index, plan) in large {
                    let (consumer, peer) = (plan.consumer, plan.peer)  // not `plan`, which the closure would copy per record
                    let records = plan.probes.map { p in
                        defer { self.nextProbeNumber += 1 }
                        return self.makeRecord(id: ProbeID.make(self.nextProbeNumber), consumer: consumer, peer: peer,
                                               spec: p.spec, sites: p.sites, now: now, restored: nil, state: .active)
                    }
                    // The state entry first: the writer waits for it, the reply can wait longer.
                    self.prepare?(records)
                    plan.earlyHook?(records)
                    for r in records { self.insert(r) }
                    made[index] = records
                }
                self.applyPendingTreeInserts()
            }
            for (index, records) in made { registers[index].early = records }
        }

        // Phase C: commit, persist, publish, reply.
        var orphanSlots: [UInt32] = []  // attached for a request that then failed
        var unattachedSlots: [UInt32] = []
        var created: [Int: [ProbeRecord]] = [:]
        var restored: [Int: [Result<ProbeRecord, EngineError>]] = [:]
        var withdrawn: [TreeEdit] = []  // consumers of entered requests that failed
        var withdrawnAhead: [String] = []  // their ids, where the log has them already
        let aheadIndices = Set(registers.filter(\.ahead).map(\.index))  // batch positions written ahead
        for plan in registers {
            if let failure = plan.failure {
                for p in plan.probes {
                    for s in p.sites {
                        if slotLink[s.slot] != nil { orphanSlots.append(s.slot) } else { unattachedSlots.append(s.slot) }
                    }
                }
                // Entered during the attach (large) or before it (written ahead).
                for r in plan.early { _ = removeRecord(r.id, treeEdits: &withdrawn) }
                if plan.ahead { withdrawnAhead += plan.early.map(\.id) }
                if let item = plan.probes.first?.restored {
                    // A restored registration that cannot attach stays registered, degraded:
                    // dropping it silently would lose an acknowledged registration.
                    let r = record(id: item.id, plan: plan, spec: item.spec, sites: [], now: now,
                                   restored: item, state: .degraded(reason: failure.message))
                    restored[plan.index, default: []].append(.success(r))
                }
                continue
            }
            // Made and entered during the attach (a large request) or before it (written ahead).
            var records: [ProbeRecord] = plan.early
            for p in plan.probes where !plan.large && !plan.ahead {
                let id: String
                if let fixed = plan.restoreID {
                    id = fixed
                    if let n = ProbeID.number(fixed) { nextProbeNumber = max(nextProbeNumber, n + 1) }
                } else {
                    id = ProbeID.make(nextProbeNumber)
                    nextProbeNumber += 1
                }
                let state: ProbeState
                if let restored = p.restored, let reason = restored.degradedReason {
                    state = restored.ended ? .ended(reason: reason) : .degraded(reason: reason)
                } else {
                    state = .active
                }
                records.append(record(id: id, plan: plan, spec: p.spec, sites: p.sites, now: now,
                                      restored: p.restored, state: state))
            }
            if plan.restoreID != nil {
                restored[plan.index, default: []] += records.map { .success($0) }
            } else {
                created[plan.index] = records
            }
        }
        var removedCount: [Int] = []
        var removedIDs: [String] = []
        var treeRemovals: [TreeEdit] = []
        for removal in removals {
            var n = 0
            for id in removal.ids {
                guard let r = removeRecord(id, treeEdits: &treeRemovals) else { continue }
                n += 1
                removedIDs.append(id)
                for s in r.sites { deadSlots.insert(s.slot) }
            }
            removedCount.append(n)
        }
        deadSlots.formUnion(orphanSlots)
        slots.release(unattachedSlots)
        updatePendingRemovals()

        // New consumers are staged now and published with the registry below, in one version
        // with the removals (`publish`).
        applyPendingTreeInserts()
        if !withdrawn.isEmpty { tree.stage(withdrawn) }  // staged, never published: gone before readers look
        var snapshot = makeSnapshot()
        // What this batch changed, so the state file can record it without diffing the registry.
        // Registrations written ahead are in the log already; those of them that failed to
        // attach leave it again here, before their failure is told.
        snapshot.batchAdded = created.filter { !aheadIndices.contains($0.key) }.values.flatMap { $0 }
            + restored.values.flatMap { $0.compactMap { try? $0.get() } }
        snapshot.batchRemoved = removedIDs + withdrawnAhead
        let appends = !snapshot.batchAdded.isEmpty || !snapshot.batchRemoved.isEmpty
        var persistError: EngineError? = nil
        var unsavedRemoval: String? = nil
        if let error = save(snapshot) {
            persistError = Self.notRegistered(error)
            unsavedRemoval = "the state file could not be written: \(error)"
            // The clients are told their registrations failed: take them back out (they are
            // detached by the next compaction) instead of leaving them counting unacknowledged.
            // Those written ahead were saved by their own entry: their replies wait for its
            // sync. (The removal of those that failed to attach is carried into the next save;
            // a crash before it would bring them back, degraded, like an unsaved unregister.)
            for (index, records) in created where !aheadIndices.contains(index) {
                for r in records {
                    if let gone = removeRecord(r.id, treeEdits: &treeRemovals) { deadSlots.formUnion(gone.sites.map(\.slot)) }
                }
            }
            created = created.filter { aheadIndices.contains($0.key) }
            updatePendingRemovals()
            snapshot = makeSnapshot()
        }
        publish(snapshot, removing: treeRemovals)
        // Replies: at once if the state write failed or is already durable; otherwise once the
        // committer has synced the log (`persist` only appended to it).
        var registerReplies: [(reply: @Sendable (Result<[ProbeRecord], EngineError>) -> Void, result: Result<[ProbeRecord], EngineError>)] = []
        for plan in registers {
            guard case .register(_, _, _, _, let reply) = batch[plan.index] else { continue }
            if let f = plan.failure { registerReplies.append((reply, .failure(f))) } else if let persistError, !plan.ahead {
                registerReplies.append((reply, .failure(persistError)))
            } else {
                registerReplies.append((reply, .success(created[plan.index] ?? [])))
            }
        }
        var restoreReplies: [(reply: @Sendable ([Result<ProbeRecord, EngineError>]) -> Void, results: [Result<ProbeRecord, EngineError>])] = []
        for (n, op) in batch.enumerated() {
            if case .restore(_, _, let reply) = op { restoreReplies.append((reply, restored[n] ?? [])) }
        }
        // Removals happened whether or not they were saved: the kernel no longer counts them.
        // An unsaved one is still acknowledged, with the reason; the persister carries it into
        // the next save.
        let removalReplies = zip(removals, removedCount).map { (reply: $0.reply, count: $1) }
        let replyAll: @Sendable () -> Void = { [registerReplies, restoreReplies, unsavedRemoval] in
            for r in registerReplies { r.reply(r.result) }
            for r in restoreReplies { r.reply(r.results) }
            for r in removalReplies { r.reply(.success(Removal(count: r.count, unsaved: unsavedRemoval))) }
        }
        // After an entry written ahead, this batch's job always follows it: it carries that
        // sync's outcome.
        if let committer, persistError == nil || wroteAhead {
            let logger = self.logger, requeue = self.requeue
            committer.submit(Committer.Job(durable: replyAll, failed: { [registerReplies, restoreReplies] why in
                // Not durable: no registration of this batch may be acknowledged. Take them
                // back out through the writer (an ordinary removal, itself logged).
                logger.error("syncing the state log failed", metadata: ["error": "\(why)"])
                let error = EngineError(code: .stateWriteFailed,
                                        message: "the state file could not be synced, so these probes were not registered: \(why)")
                var undo: [String] = []
                for r in registerReplies {
                    if case .success(let records) = r.result {
                        undo += records.map(\.id)
                        r.reply(.failure(error))
                    } else {
                        r.reply(r.result)
                    }
                }
                // Restored registrations were on disk already; removals did happen.
                for r in restoreReplies { r.reply(r.results) }
                for r in removalReplies {
                    r.reply(.success(Removal(count: r.count, unsaved: "the state file could not be synced: \(why)")))
                }
                // One removal per id: an unregister by ids fails whole if one is already gone
                // (another client may have removed it by consumer meanwhile).
                for id in undo {
                    requeue(.unregister(ids: [id], consumer: nil, peer: .daemon, authorize: { _ in true }, reply: { _ in }))
                }
            }, needsSync: appends))
        } else {
            replyAll()
        }

        // Phase D: detach work is deferred (compaction_delay) so that the removals of many
        // batches share one rebuild per link and one grace period; it runs now if it is due.
        scheduleCompaction()
        if let due = compactionDue, ContinuousClock.now >= due { compact() }
        counters.lastBatchMicros = (ContinuousClock.now - started).microseconds
        counters.busyMicros += counters.lastBatchMicros
        publish(makeSnapshot())
    }

    /// Write-ahead, with group commit only: makes and enters the records of the batch's small
    /// registrations and appends their state entry before the kernel attaches them, so that
    /// the committer syncs it meanwhile. Under churn the sync (~430 µs) used to start only
    /// after the attach (a register batch's link, ~230 µs). A registration that then fails to
    /// attach is removed again by the batch's own entry; its failure reply, like every reply of
    /// the batch, waits for that entry's sync. Returns whether it appended. If the append
    /// fails, they fail `state_write_failed` here, before any kernel work. Large requests
    /// overlap their own way (`prepare`: doing this for them too made a 10,000-probe register
    /// slower); restored ones are on disk already.
    private func writeAhead(_ registers: inout [PlannedRegister], now: BatchClock) -> Bool {
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
    private func save(_ snapshot: RegistrySnapshot) -> (any Error)? {
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
    private static func notRegistered(_ error: any Error) -> EngineError {
        EngineError(code: .stateWriteFailed,
                    message: "the state file could not be written, so these probes were not registered: \(error)")
    }

    // MARK: - Following paths

    /// Applies the path watcher's changes: new file versions of all affected registrations are
    /// attached together (one slot allocation, one link per (binary, pid, direction)); each
    /// registration then gets a new immutable record version with the same id. Retired and
    /// ended sites fold their final counts into `baseHits` in the same published version that
    /// drops them (exact: no process maps those files any more, so no hit can follow the read),
    /// and their slots go to the usual deferred detach.
    func applyFollow(_ changes: [FollowChange]) {
        var attaches: [(id: String, targets: [ResolvedProbe])] = []
        var treeRemovals: [TreeEdit] = []
        var changed = false
        var retiring: [(id: String, sites: [ProbeSite], version: FileVersion?)] = []
        var endedIDs: [String] = []
        var log = FollowLog()
        defer { log.emit(to: logger) }
        for change in changes {
            guard let r = probes[change.id] else { continue }
            switch change.kind {
            case .attach(let targets):
                guard let first = targets.first, r.follows, !isEnded(r) else { continue }
                // Back to a file this registration still counts in (moved back): no new sites.
                let known = r.sites.filter { $0.target.device == first.device && $0.target.inode == first.inode }
                if !known.isEmpty {
                    replace(r.with(sites: r.sites, state: .active, baseHits: r.baseHits, targets: known.map(\.target), retired: r.retired))
                    changed = true
                    log.note(.init(event: .followedBack, path: first.path, inode: first.inode), id: r.id)
                } else {
                    attaches.append((r.id, targets))
                }
            case .degrade(let reason):
                guard r.state != .degraded(reason: reason), !isEnded(r) else { continue }
                replace(r.with(sites: r.sites, state: .degraded(reason: reason), baseHits: r.baseHits, targets: r.targets,
                               retired: r.retired))
                changed = true
                log.note(.init(event: .degraded, path: r.targets.first?.path ?? r.spec.path, inode: 0,
                               errorCode: "probe_degraded", reason: reason), id: r.id)
            case .retire(let device, let inode):
                // Never the current file: new processes still get it.
                if let t = r.targets.first, t.device == device, t.inode == inode, r.state == .active { continue }
                let gone = r.sites.filter { $0.target.device == device && $0.target.inode == inode }
                guard !gone.isEmpty else { continue }
                retiring.append((r.id, gone, gone.first.map { FileVersion($0.target) }))
            case .end(let reason):
                // Ended with sites left means an earlier counter read failed: retry the detach.
                guard !(isEnded(r) && r.sites.isEmpty) else { continue }
                retiring.append((r.id, r.sites, nil))
                endedIDs.append(r.id)
                replace(r.with(sites: r.sites, state: .ended(reason: reason), baseHits: r.baseHits, targets: r.targets,
                               retired: r.retired))
                changed = true
                log.note(.init(event: .ended, path: r.targets.first?.path ?? r.spec.path, inode: 0, reason: reason), id: r.id)
            }
        }

        // New versions: allocate, reset, attach per group; a registration whose group fails is
        // degraded (its older sites keep counting).
        if !attaches.isEmpty {
            var plans: [PlannedRegister] = []
            var ids: [String] = []
            var newSlots: [UInt32] = []
            for (id, targets) in attaches {
                guard let r = probes[id] else { continue }
                var plan = PlannedRegister(index: plans.count, consumer: r.consumer, peer: r.owner)
                if slots.available < targets.count { reclaimSlots() }
                if let allocated = slots.allocate(targets.count) {
                    newSlots += allocated
                    plan.probes = [PlannedProbe(sites: zip(targets, allocated).map { ProbeSite(target: $0, slot: $1) }, spec: r.spec)]
                } else {
                    plan.failure = EngineError(code: .capacityExhausted, message: "no counter slots left for the new file's \(targets.count) sites")
                }
                plans.append(plan)
                ids.append(id)
            }
            if !newSlots.isEmpty {
                do { try kernel.resetCounters(slots: newSlots) } catch {
                    for i in plans.indices where plans[i].failure == nil {
                        plans[i].failure = EngineError(code: error.code, message: "resetting counters failed: \(error.message)")
                    }
                }
            }
            attachPlanned(&plans)
            for (plan, id) in zip(plans, ids) {
                guard let r = probes[id] else { continue }
                let newSites = plan.probes.first?.sites ?? []
                if let failure = plan.failure {
                    for s in newSites {
                        if slotLink[s.slot] != nil {
                            deadSlots.insert(s.slot)
                            changed = true  // detach work to schedule
                        } else {
                            slots.release([s.slot])
                        }
                    }
                    let path = newSites.first?.target.path ?? r.spec.path
                    let reason = "the new file at \(path) could not be attached (\(failure.code): \(failure.message)); processes running the old file are still counted"
                    // The watcher retries at every check; only a change of state is news.
                    guard r.state != .degraded(reason: reason) else { continue }
                    replace(r.with(sites: r.sites, state: .degraded(reason: reason), baseHits: r.baseHits, targets: r.targets, retired: r.retired))
                    log.note(.init(event: .degraded, path: path, inode: 0, errorCode: failure.code.rawValue, reason: reason), id: r.id)
                } else {
                    for site in newSites {
                        if let number = r.number {
                            pendingTreeInserts.append(.insertConsumer(Self.treeKey(site), Consumer(
                                registration: number, slot: site.slot, pid: r.spec.pid ?? 0,
                                flags: r.spec.retprobe ? Consumer.retprobe : 0)))
                        }
                    }
                    replace(r.with(sites: r.sites + newSites, state: .active, baseHits: r.baseHits,
                                   targets: newSites.map(\.target), retired: r.retired))
                    log.note(.init(event: .followed, path: newSites.first?.target.path ?? "", inode: newSites.first?.target.inode ?? 0,
                                   buildID: newSites.first?.target.buildID ?? ""), id: r.id)
                }
                changed = true
            }
        }

        // Retirements and ends: read the final counts of the sites, fold them in, drop the sites.
        if !retiring.isEmpty {
            let counts: [UInt64]
            do { counts = try kernel.readCounters(upTo: slots.highWater) } catch {
                logger.error("reading counters for a retirement failed; retrying later", metadata: ["error": "\(error.message)"])
                counts = []
            }
            if !counts.isEmpty {
                for (id, gone, version) in retiring {
                    guard let r = probes[id] else { continue }
                    let goneSlots = Set(gone.map(\.slot))
                    let hits = gone.reduce(UInt64(0)) { $0 &+ (Int($1.slot) < counts.count ? counts[Int($1.slot)] : 0) }
                    var retired = r.retired
                    if let version {
                        retired.append(RetiredVersion(version: version, hits: hits))
                        log.note(.init(event: .retired, path: version.path, inode: version.inode), id: r.id, hits: hits)
                    }
                    if let number = r.number {
                        for site in gone { treeRemovals.append(.removeConsumer(Self.treeKey(site), registration: number)) }
                    }
                    for site in gone { deadSlots.insert(site.slot) }
                    replace(r.with(sites: r.sites.filter { !goneSlots.contains($0.slot) }, state: r.state,
                                   baseHits: r.baseHits &+ hits, targets: r.targets, retired: retired))
                    changed = true
                }
            }
        }
        updatePendingRemovals()
        guard changed || !treeRemovals.isEmpty else { return }
        applyPendingTreeInserts()
        var snapshot = makeSnapshot()
        // The ended records as they are now, their final counts folded in.
        snapshot.batchEnded = endedIDs.compactMap { probes[$0] }
        // The state file keeps registrations, not file versions: a failed save is logged and
        // retried by the next batch or checkpoint (the kernel side is already right).
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
        publish(snapshot, removing: treeRemovals)
        scheduleCompaction()
        if let due = compactionDue, ContinuousClock.now >= due { compact() }
        publish(makeSnapshot())
    }

    private func isEnded(_ r: ProbeRecord) -> Bool {
        if case .ended = r.state { return true }
        return false
    }

    /// Swaps in a new version of an existing registration (same id).
    private func replace(_ r: ProbeRecord) { probes.insert(r) }

    /// Makes a registration and enters it (registry, uprobe counts, tree).
    private func record(id: String, plan: PlannedRegister, spec: ProbeSpecInput, sites: [ProbeSite], now: BatchClock,
                        restored: RestoreItem?, state: ProbeState) -> ProbeRecord {
        let r = makeRecord(id: id, consumer: plan.consumer, peer: plan.peer, spec: spec, sites: sites, now: now,
                           restored: restored, state: state)
        insert(r)
        return r
    }

    private func makeRecord(id: String, consumer: String?, peer: Peer, spec: ProbeSpecInput, sites: [ProbeSite], now: BatchClock,
                            restored: RestoreItem?, state: ProbeState) -> ProbeRecord {
        ProbeRecord(id: id, consumer: consumer, owner: peer, spec: spec, sites: sites,
                    registeredAt: restored?.registeredAt ?? now.realtime, registeredAtMonotonic: now.monotonic,
                    countingSince: now.countingSince, state: state, baseHits: restored?.baseHits ?? 0,
                    targets: sites.isEmpty ? (restored?.targets ?? []) : sites.map(\.target))
    }

    /// A batch's registration time, read once: every record of the batch carries it.
    struct BatchClock {
        let realtime = Double(clockRealtimeSeconds())
        let monotonic = ContinuousClock.now
        /// `monotonic` as `ProbeRecord.countingSince` (Duration arithmetic once per batch, not per record).
        let countingSince: Double
        init() { countingSince = MonotonicEpoch.seconds(monotonic) }
    }

    /// Stages the consumers `insert` queued in the tree; they are published with the registry
    /// that names them (`publish`).
    private func applyPendingTreeInserts() {
        guard !pendingTreeInserts.isEmpty else { return }
        tree.stage(pendingTreeInserts)
        pendingTreeInserts.removeAll(keepingCapacity: true)
    }

    /// Enters a new registration: the registry, and (at the next publication) the tree.
    private func insert(_ r: ProbeRecord) {
        probes.insert(r)
        if let number = r.number {
            for site in r.sites {
                pendingTreeInserts.append(.insertConsumer(Self.treeKey(site), Consumer(
                    registration: number, slot: site.slot, pid: r.spec.pid ?? 0,
                    flags: r.spec.retprobe ? Consumer.retprobe : 0)))
            }
        }
    }

    /// Takes a registration out of the registry; its tree removals go into `treeEdits` (applied
    /// with the registry that no longer has it). Its slots are left for the caller to retire.
    private func removeRecord(_ id: String, treeEdits: inout [TreeEdit]) -> ProbeRecord? {
        guard let r = probes.remove(id) else { return nil }
        if let number = r.number {
            for site in r.sites { treeEdits.append(.removeConsumer(Self.treeKey(site), registration: number)) }
        }
        return r
    }

    static func treeKey(_ site: ProbeSite) -> UprobeKey {
        UprobeKey(dev: site.target.device, inode: site.target.inode, offset: site.target.fileOffset)
    }

    /// Creates the links of a batch. A group's link failing is retried request by request so
    /// one bad request cannot fail its neighbours; a request that loses any group fails whole
    /// (its sites attached in other groups are retired like any removed probe's).
    /// `meanwhile`, if given, runs on `attacher` while this thread creates the links: a large
    /// request's records, registry and tree work overlap its attach.
    private func attachPlanned(_ registers: inout [PlannedRegister], meanwhile: (() -> Void)? = nil) {
        // Plain values only (no target copies): a 10,000-site request spent as long grouping
        // its sites as the kernel took to attach them.
        struct Member { var reg: Int; var site: LinkSite }
        var groups: [(key: LinkGroupKey, path: String, members: [Member])] = []
        var groupOf: [LinkGroupKey: Int] = [:]
        var last: (key: LinkGroupKey, group: Int)?  // consecutive sites are mostly in one group
        for (r, plan) in registers.enumerated() where plan.failure == nil {
            for p in plan.probes {
                for s in p.sites {
                    let key = LinkGroupKey(device: s.target.device, inode: s.target.inode,
                                           pid: p.spec.pid ?? 0, retprobe: p.spec.retprobe)
                    let g: Int
                    if let last, last.key == key {
                        g = last.group
                    } else if let known = groupOf[key] {
                        g = known
                    } else {
                        g = groups.count
                        groups.append((key, s.target.path, []))
                        groupOf[key] = g
                    }
                    last = (key, g)
                    groups[g].members.append(Member(reg: r, site: LinkSite(
                        offset: s.target.fileOffset, refCtrOffset: s.target.refCtrOffset, slot: s.slot)))
                }
            }
        }
        let live = groups.map { $0.members.filter { registers[$0.reg].failure == nil } }
        let used = groups.indices.filter { !live[$0].isEmpty }
        let requests = used.map { g in LinkRequest(key: groups[g].key, path: groups[g].path, sites: live[g].map(\.site)) }
        let created = createLinks(requests, meanwhile: meanwhile)
        for (g, (request, result)) in zip(used, zip(requests, created)) {
            guard case .failure(let whole) = result else { continue }
            let members = live[g]
            let regsInGroup = Array(Set(members.map(\.reg))).sorted()
            if regsInGroup.count == 1 {
                registers[regsInGroup[0]].failure = attachFailure(whole, path: request.path)
                continue
            }
            for r in regsInGroup where registers[r].failure == nil {
                let mine = LinkRequest(key: request.key, path: request.path, sites: members.filter { $0.reg == r }.map(\.site))
                for case .failure(let error) in createLinks([mine], meanwhile: nil) {
                    registers[r].failure = attachFailure(error, path: request.path)
                }
            }
        }
    }

    /// One link to create: a group's file and the sites of its requests that are still good.
    private struct LinkRequest: Sendable {
        var key: LinkGroupKey
        var path: String
        var sites: [LinkSite]
    }

    /// Creates the links and adopts those the kernel made; returns each one's outcome.
    /// `meanwhile`, if given, runs on `attacher` while the kernel calls run here. The
    /// descriptors (`kernelPath`) are opened here first: `pinned` is this writer's.
    private func createLinks(_ requests: [LinkRequest], meanwhile: (() -> Void)?) -> [Result<Void, KernelError>] {
        var paths: [Result<String, KernelError>] = []
        for r in requests {
            do { paths.append(.success(try kernelPath(r.key, path: r.path))) } catch { paths.append(.failure(error)) }
        }
        let kernel = self.kernel
        let work = zip(requests, paths).map { (request: $0, path: $1) }
        @Sendable func create() -> [Result<any KernelLink, KernelError>] {
            work.map { job in
                do throws(KernelError) {
                    let path = try job.path.get()
                    return .success(try kernel.attach(path: path, sites: job.request.sites,
                                                      pid: job.request.key.pid == 0 ? nil : job.request.key.pid,
                                                      retprobe: job.request.key.retprobe))
                } catch {
                    return .failure(error)
                }
            }
        }
        let made: [Result<any KernelLink, KernelError>]
        if let meanwhile {
            // This thread makes the kernel calls, the long pole, at once; `meanwhile` is lent
            // to `attacher`. When `attacher` made the kernel calls instead, its start waited up
            // to 2.4 ms for a CPU: `meanwhile` can afford such a wait, the attach cannot.
            let lent = LentWork(meanwhile)
            attacher.submit { lent.run() }
            made = create()
            lent.wait()
        } else {
            made = create()
        }
        return zip(requests, made).map { request, result in
            switch result {
            case .success(let handle):
                adopt(LinkRecord(group: request.key, path: request.path, sites: request.sites, handle: handle))
                return .success(())
            case .failure(let error):
                unpinIfUnused(request.key)
                return .failure(error)
            }
        }
    }

    /// Work on this writer's state run by `attacher` while the writer waits in the kernel.
    /// The writer touches none of its state between `submit` and `wait`, so the state still
    /// has one user at a time; the NSCondition orders the two threads' accesses (and
    /// ThreadSanitizer sees it, as it does not see `Mutex` or a Dispatch semaphore).
    private final class LentWork: @unchecked Sendable {
        // @unchecked: `work` runs on one thread while its owner waits in `wait`; `done` is
        // guarded by `cond`.
        private let work: () -> Void
        private let cond = NSCondition()
        private var done = false
        init(_ work: @escaping () -> Void) { self.work = work }
        func run() {
            work()
            cond.lock()
            done = true
            cond.signal()
            cond.unlock()
        }
        func wait() {
            cond.lock()
            while !done { cond.wait() }
            cond.unlock()
        }
    }

    private func attachFailure(_ error: KernelError, path: String) -> EngineError {
        EngineError(code: error.code, message: "attaching probes in \(path) failed: \(error.message)")
    }

    /// The path to hand the kernel for a group's file: its pinned descriptor (opened and
    /// checked against the group's device and inode the first time). A path that cannot be
    /// opened here is passed as is and the kernel reports its own error. Opened non-blocking:
    /// the path may name a FIFO by now, and this is the writer thread.
    private func kernelPath(_ key: LinkGroupKey, path: String) throws(KernelError) -> String {
        let file = PinnedFile(device: key.device, inode: key.inode)
        if let fd = pinned[file] { return "/proc/self/fd/\(fd)" }
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else { return path }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { close(fd); return path }
        guard UInt64(st.st_dev) == key.device, UInt64(st.st_ino) == key.inode else {
            close(fd)
            throw KernelError(code: .fileChanged,
                              message: "\(path) was replaced after it was resolved (inode \(key.inode) -> \(st.st_ino)); resolve again")
        }
        pinned[file] = fd
        return "/proc/self/fd/\(fd)"
    }

    /// Closes the pinned descriptor of a file once no link of any group uses it.
    private func unpinIfUnused(_ key: LinkGroupKey) {
        let file = PinnedFile(device: key.device, inode: key.inode)
        guard let fd = pinned[file], !groupLinks.keys.contains(where: { $0.device == key.device && $0.inode == key.inode }) else { return }
        close(fd)
        pinned.removeValue(forKey: file)
    }

    private func adopt(_ record: LinkRecord) {
        links[ObjectIdentifier(record)] = record
        groupLinks[record.group, default: []].insert(ObjectIdentifier(record))
        for s in record.sites { slotLink[s.slot] = record }
        counters.linksCreated += 1
    }

    private func forget(_ record: LinkRecord) {
        links.removeValue(forKey: ObjectIdentifier(record))
        groupLinks[record.group]?.remove(ObjectIdentifier(record))
        if groupLinks[record.group]?.isEmpty == true {
            groupLinks.removeValue(forKey: record.group)
            unpinIfUnused(record.group)
        }
    }

    /// Whether a group has more small links than it should (many small batches each added
    /// one). Big links are never rebuilt just to merge: that would make every merge cost the
    /// size of the biggest registration on the binary. Asked for every group after every
    /// batch, so it counts in place and stops past the limit (listing the small links
    /// allocated two arrays per group per batch).
    private func groupNeedsMerge(_ g: LinkGroupKey) -> Bool {
        var small = 0
        for id in groupLinks[g] ?? [] {
            guard let l = links[id], isSmall(l) else { continue }
            small += 1
            if small > tuning.maxLinksPerGroup { return true }
        }
        return false
    }

    private func smallLinks(of g: LinkGroupKey) -> [LinkRecord] {
        (groupLinks[g] ?? []).compactMap { links[$0] }.filter(isSmall)
    }

    /// A link merges are allowed to rebuild (see `groupNeedsMerge`).
    private func isSmall(_ l: LinkRecord) -> Bool { l.sites.count <= tuning.mergeLinksUpTo }

    /// Sets `compactionDue` when there is detach or merge work, keeping an earlier deadline.
    private func scheduleCompaction() {
        let pending = !deadSlots.isEmpty || groupLinks.keys.contains(where: groupNeedsMerge)
        guard pending else { compactionDue = nil; return }
        let now = ContinuousClock.now
        if !compactionStalled {
            // Too many open links (fds, kernel objects): do it now rather than after the delay.
            if links.count > tuning.maxOpenLinks { compactionDue = now; return }
            // A bulk removal is already one big batch: waiting would only delay the detach.
            if deadSlots.count >= tuning.bulkDetachSites { compactionDue = now; return }
        }
        if compactionDue == nil { compactionDue = now + tuning.compactionDelay }
    }

    /// Runs pending detach/merge work if it is due (called by the writer when it wakes idle).
    func maintain() {
        collectDetaches(detacher.takeFinished())
        if let due = compactionDue, ContinuousClock.now >= due { compact() }
        tree.reclaim()
        publish(makeSnapshot())
    }

    /// Replaces every link of each group that holds dead sites or has too many links by one
    /// link of the group's live sites (make-before-break, with the BPF hand-off on so no hit is
    /// lost or doubled during the overlap), and closes groups whose sites all died.
    ///
    /// Only the attach half runs here. The links to close, the hand-off to end and the slots to
    /// free go to the detach worker as one round; the writer finishes the round's bookkeeping
    /// in `collectDetaches` once the worker has closed them (a slot is never reused while a link
    /// can still count into it). Links still in hand-off from an earlier round are left for a
    /// later compaction. `compact(wait: true)` first lets running rounds finish (so nothing is
    /// in hand-off) and returns only once its own round has finished: every dead site is then
    /// detached and its slot free.
    func compact(wait: Bool = false) {
        if wait { finishDetaches() }
        defer { if wait { finishDetaches() } }
        // Per group, the links to replace: every link holding a dead site, plus all its small
        // links when there are too many of them. Their live sites go into one new link.
        var replace: [LinkGroupKey: [ObjectIdentifier: LinkRecord]] = [:]
        var previous: LinkRecord? = nil
        for s in deadSlots {
            // Dead slots come in slot order, and neighbours mostly share a link.
            guard let l = slotLink[s], l !== previous else { continue }
            previous = l
            if !handoffLinks.contains(ObjectIdentifier(l)) {
                replace[l.group, default: [:]][ObjectIdentifier(l)] = l
            }
        }
        for g in groupLinks.keys where groupNeedsMerge(g) {
            for l in smallLinks(of: g) where !handoffLinks.contains(ObjectIdentifier(l)) {
                replace[g, default: [:]][ObjectIdentifier(l)] = l
            }
        }
        var round = DetachRound()
        round.freeSlots = deadSlots.filter { slotLink[$0] == nil }
        var rebuilds: [(group: LinkGroupKey, old: [LinkRecord], live: [LinkSite])] = []
        for (g, set) in replace {
            let old = Array(set.values)
            let live = old.flatMap { $0.sites.filter { !deadSlots.contains($0.slot) } }
            if live.isEmpty { round.closing += old } else { rebuilds.append((g, old, live)) }
        }
        let overlapSlots = rebuilds.flatMap { $0.live.map(\.slot) }
        var overlapOn = false
        if !overlapSlots.isEmpty {
            do {
                try kernel.setOverlap(true, slots: overlapSlots)
                overlapOn = true
            } catch {
                logger.error("cannot start link hand-off; removals stay pending", metadata: ["error": "\(error.message)"])
            }
        }
        if overlapOn {
            for r in rebuilds {
                guard let path = r.old.first?.path else { continue }
                do {
                    let handle = try kernel.attach(path: try kernelPath(r.group, path: path), sites: r.live, pid: r.group.pid == 0 ? nil : r.group.pid,
                                                   retprobe: r.group.retprobe)
                    let record = LinkRecord(group: r.group, path: path, sites: r.live, handle: handle)
                    adopt(record)
                    handoffLinks.insert(ObjectIdentifier(record))
                    round.handoffLinks.append(ObjectIdentifier(record))
                    round.overlapSlots += r.live.map(\.slot)
                    counters.linkRebuilds += 1
                    round.closing += r.old
                } catch {
                    // The old links keep counting their live sites exactly; dead ones stay pending.
                    logger.warning("link rebuild failed; removal stays pending",
                                   metadata: ["path": "\(path)", "error": "\(error.message)"])
                }
            }
            // Rebuilds that failed: nothing of theirs is in hand-off.
            let inHandoff = Set(round.overlapSlots)
            let unused = overlapSlots.filter { !inHandoff.contains($0) }
            if !unused.isEmpty {
                do { try kernel.setOverlap(false, slots: unused) } catch {
                    logger.error("ending link hand-off failed", metadata: ["error": "\(error.message)"])
                }
            }
        }
        for l in round.closing {
            forget(l)
            for s in l.sites where deadSlots.contains(s.slot) && slotLink[s.slot] === l {
                slotLink[s.slot] = nil
                round.freeSlots.append(s.slot)
            }
        }
        deadSlots.subtract(round.freeSlots)
        if !round.closing.isEmpty || !round.freeSlots.isEmpty {
            let id = nextRoundID
            nextRoundID += 1
            rounds[id] = round
            closingLinks += round.closing.count
            if !round.closing.isEmpty { counters.gracePeriods += 1 }
            detacher.submit(id: id, links: round.closing.map(\.handle))
        }
        // No progress: nothing to close or free (also when every rebuild failed).
        compactionStalled = round.closing.isEmpty && round.freeSlots.isEmpty
        updatePendingRemovals()
        counters.compactions += 1
        compactionDue = nil
        scheduleCompaction()
        // Work left (a failed rebuild, links still in hand-off) must not spin: retry after the delay.
        if let due = compactionDue, due <= ContinuousClock.now { compactionDue = ContinuousClock.now + tuning.compactionDelay }
    }

    /// Finishes rounds the detach worker has completed: their old links are closed and a tree
    /// grace period has passed, so the hand-off ends and their dead slots become free.
    private func collectDetaches(_ ids: [UInt64]) {
        guard !ids.isEmpty else { return }
        for id in ids {
            guard let round = rounds.removeValue(forKey: id) else { continue }
            if !round.overlapSlots.isEmpty {
                // Only now is no older link left on these slots.
                do {
                    try kernel.setOverlap(false, slots: round.overlapSlots)
                    try kernel.sweepMarks(slots: Set(round.overlapSlots))
                } catch {
                    logger.error("ending link hand-off failed", metadata: ["error": "\(error.message)"])
                }
            }
            handoffLinks.subtract(round.handoffLinks)
            compactionStalled = false
            slots.release(round.freeSlots)
            closingLinks -= round.closing.count
            counters.linksClosed += UInt64(round.closing.count)
        }
        updatePendingRemovals()
        scheduleCompaction()
    }

    /// Blocks until every batch handed to the committer has been answered (tests).
    func waitForCommits() {
        committer?.waitAll()
    }

    /// Blocks until the detach worker has finished every round, and collects them.
    func finishDetaches() {
        collectDetaches(detacher.waitAll())
    }

    /// Before refusing with `capacity_exhausted`: detaches every dead site now and waits until
    /// their slots are free.
    private func reclaimSlots() {
        guard !deadSlots.isEmpty || !rounds.isEmpty else { return }
        compact(wait: true)
    }

    /// Removals not yet physically gone: dead sites waiting for compaction or for their round.
    private func updatePendingRemovals() {
        counters.pendingRemovals = deadSlots.count + rounds.values.reduce(0) { $0 + $1.freeSlots.count }
    }

    /// Publishes `snapshot` as the registry readers see, in one tree version with the consumers
    /// staged for its new registrations (`applyPendingTreeInserts`) and without those of the
    /// registrations it no longer has (`removing`): a reader sees a batch's registry and its
    /// uprobes together or neither.
    private func publish(_ snapshot: RegistrySnapshot, removing: [TreeEdit] = []) {
        tree.apply(removing, publishing: PublishedRegistry(snapshot))
    }

    private func makeSnapshot() -> RegistrySnapshot {
        generation += 1
        var s = RegistrySnapshot()
        s.probes = probes
        s.slotHighWater = slots.highWater
        s.slotsInUse = slots.inUse
        s.slotCapacity = slots.capacity
        s.linksOpen = links.count + closingLinks
        s.counters = counters
        s.generation = generation
        return s
    }

    /// Detaches everything (daemon shutdown without persistence of kernel state: links die with
    /// the process anyway, but closing them together is faster than the kernel doing it one by one).
    func shutdown() {
        committer?.stop()
        finishDetaches()
        detacher.stop()
        attacher.stop()
        kernel.closeAll(links.values.map(\.handle))
        links.removeAll()
        groupLinks.removeAll()
        slotLink.removeAll()
        for fd in pinned.values { close(fd) }
        pinned.removeAll()
    }
}

struct PinnedFile: Hashable {
    var device: UInt64
    var inode: UInt64
}

func clockRealtimeSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
