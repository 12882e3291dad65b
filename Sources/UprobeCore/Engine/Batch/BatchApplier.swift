#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import UprobeELF
import UprobeKernel
import UprobeTree

/// The single writer: applies a whole batch of requests to the kernel and the registry.
///
/// Lives on the engine's writer thread and is never shared, so it needs no lock of its own.
/// One batch = one slot allocation pass, at most one new uprobe_multi link per
/// (binary, pid filter, direction), one publication, one round of detach work whose link
/// closes are issued together so they share grace periods.
///
/// A batch of requests goes through `plan` (Planning.swift: slots, removals checked),
/// `writeAhead` and `attachPlanned` (links made by the `LinkTable`), the records entered in the
/// `RegistryWriter`, one publication, `BatchCommit` (state log, replies) and the `Compactor`
/// (deferred detach work); a follow round through `applyFollow` (Following.swift). Each of those
/// types owns its state; this class owns the slot allocator and the order of the steps.
final class BatchApplier {
    let kernel: any KernelBackend
    /// The uprobes tree readers use; this writer is its only writer.
    private let tree: UprobeTree
    let tuning: EngineConfig
    let logger: Logger
    /// Told a large request's records while the kernel attaches them (`EngineConfig.prepareMinimum`).
    let prepare: (@Sendable ([ProbeRecord]) -> Void)?

    /// Counter slots: allocated by planning, released by the compactor once no link can count
    /// into them (it borrows the allocator for the calls that release).
    var slots: SlotAllocator
    /// The registrations, as the next batch publishes them.
    let registry: RegistryWriter
    /// The links this writer holds in the kernel.
    let links: LinkTable
    /// Removed probes' sites until they are detached and their slots free.
    let compactor: Compactor
    /// Appends each batch's state entry and sends its replies once it is durable.
    let commit: BatchCommit
    /// Gives the heap back to the kernel after bulk registrations and removals.
    let trimmer = MemoryTrimmer()
    /// The batch counters; the link table, compactor and committer count their own work.
    private var counters = EngineCounters()
    private var generation: UInt64 = 0
    /// The terms of the record `record` made last (see `makeRecord`).
    private var lastTerms: RequestTerms?

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
        self.prepare = prepare
        self.slots = SlotAllocator(capacity: kernel.capacity, released: { kernel.releaseSlots($0) })
        self.registry = RegistryWriter(tree: tree)
        let links = LinkTable(kernel: kernel)
        self.links = links
        self.compactor = Compactor(kernel: kernel, links: links, tree: tree, tuning: tuning, logger: logger, wake: wake,
                                   trimmer: trimmer)
        self.commit = BatchCommit(persist: persist, sync: sync, requeue: requeue, logger: logger)
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
        compactor.collect(slots: &slots)
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
        var timings = BatchTimings()
        let planned = plan(batch)
        var registers = planned.registers
        let removals = planned.removals
        timings.keep(probes: registers.reduce(0) { $0 + ($1.failure == nil ? $1.probes.count : 0) }
                        + removals.reduce(0) { $0 + $1.ids.count }, firstPhase: "plan")

        // The removed registrations' slots die now, and a bulk removal's links start closing
        // on the detach worker at once, while this writer takes the registrations out of the
        // registry and the tree and writes the state entry. After those, the close of a whole
        // binary's link began ~250 ms after its unregister arrived (the kernel's close itself
        // takes ~140 ms). Its slots are freed only after a grace period that starts once the
        // registry without them is published (`Compactor.published`).
        for removal in removals { compactor.retire(removal.slots) }
        compactor.startBulkDetach(slots: &slots)
        // A whole binary's removal frees much in this batch already (the persister's tables,
        // the registry's): its heap-release window opens now (see MemoryTrimmer).
        let removing = removals.reduce(0) { $0 + $1.ids.count }
        if removing >= MemoryTrimmer.bulk { trimmer.request() }

        // The small registrations' state entry goes to the log now, and its sync runs while
        // the kernel attaches them.
        let wroteAhead = writeAhead(&registers, now: now)
        timings.mark("write_ahead")

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
            var lent = BatchTimings(kept: true)  // the attach thread's own phases (copied only if kept)
            // What the attach thread may touch: the registry (and the tree through it) and the hooks.
            let registry = self.registry, prepare = self.prepare
            attachPlanned(&registers) {
                lent = BatchTimings(kept: true)
                for (index, plan) in large {
                    let records = Self.makeRecords(plan, ids: registry, now: now)
                    lent.mark("lent_records")
                    // The state entry first: the writer waits for it, the reply can wait longer.
                    prepare?(records)
                    plan.earlyHook?(records)
                    lent.mark("lent_hooks")
                    registry.insert(contentsOf: records)
                    lent.mark("lent_registry")
                    made[index] = records
                }
                registry.stageInserts()
                lent.mark("lent_tree_stage")
            }
            for (index, records) in made { registers[index].early = records }
            for p in lent.phases { timings.note(p.name, micros: p.micros) }
        }
        timings.mark("attach")
        timings.note("attach_kernel", micros: links.lastCreateMicros.kernel)
        timings.note("attach_lent_wait", micros: links.lastCreateMicros.lentWait)

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
                        if links.isAttached(s.slot) { orphanSlots.append(s.slot) } else { unattachedSlots.append(s.slot) }
                    }
                }
                // Entered during the attach (large) or before it (written ahead).
                for r in plan.early { _ = registry.remove(r.id, treeEdits: &withdrawn) }
                if plan.ahead { withdrawnAhead += plan.early.map(\.id) }
                if let item = plan.probes.first?.restored {
                    // A restored registration that cannot attach stays registered, degraded:
                    // dropping it silently would lose an acknowledged registration.
                    let r = record(id: item.id, plan: plan, spec: item.spec, sites: ProbeSites([ProbeSite]()), now: now,
                                   restored: item, state: .degraded(reason: failure.message), probeSet: item.probeSet)
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
                    registry.reserve(fixed)
                } else {
                    id = registry.nextID()
                }
                let state: ProbeState
                if let restored = p.restored, let reason = restored.degradedReason {
                    state = restored.ended ? .ended(reason: reason) : .degraded(reason: reason)
                } else {
                    state = .active
                }
                records.append(record(id: id, plan: plan, spec: p.spec, sites: p.sites, now: now,
                                      restored: p.restored, state: state, probeSet: p.probeSet))
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
        treeRemovals.reserveCapacity(removals.reduce(0) { $0 + $1.slots.count })
        for removal in removals {
            var n = 0
            for id in removal.ids {
                guard registry.remove(id, treeEdits: &treeRemovals) != nil else { continue }
                n += 1
                removedIDs.append(id)
            }
            removedCount.append(n)
        }
        compactor.retire(orphanSlots)
        slots.release(unattachedSlots)
        timings.mark("collect")

        // New consumers are staged now and published with the registry below, in one version
        // with the removals (`publish`).
        registry.stageInserts()
        if !withdrawn.isEmpty { tree.stage(withdrawn) }  // staged, never published: gone before readers look
        timings.mark("tree_stage")
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
        timings.mark("snapshot")
        if let error = commit.save(snapshot) {
            persistError = BatchCommit.notRegistered(error)
            unsavedRemoval = "the state file could not be written: \(error)"
            // The clients are told their registrations failed: take them back out (they are
            // detached by the next compaction) instead of leaving them counting unacknowledged.
            // Those written ahead were saved by their own entry: their replies wait for its
            // sync. (The removal of those that failed to attach is carried into the next save;
            // a crash before it would bring them back, degraded, like an unsaved unregister.)
            for (index, records) in created where !aheadIndices.contains(index) {
                for r in records {
                    if let gone = registry.remove(r.id, treeEdits: &treeRemovals) { compactor.retire(gone.sites.map(\.slot)) }
                }
            }
            created = created.filter { aheadIndices.contains($0.key) }
            snapshot = makeSnapshot()
        }
        timings.mark("persist")
        publish(snapshot, removing: treeRemovals)
        compactor.published()
        timings.mark("publish")
        // Replies: at once if the state write failed or is already durable; otherwise once the
        // committer has synced the log (`persist` only appended to it).
        var replies = BatchReplies(unsavedRemoval: unsavedRemoval)
        for plan in registers {
            guard case .register(_, _, _, _, let reply) = batch[plan.index] else { continue }
            if let f = plan.failure { replies.registers.append((reply, .failure(f))) } else if let persistError, !plan.ahead {
                replies.registers.append((reply, .failure(persistError)))
            } else {
                replies.registers.append((reply, .success(created[plan.index] ?? [])))
            }
        }
        for (n, op) in batch.enumerated() {
            if case .restore(_, _, _, let reply) = op { replies.restores.append((reply, restored[n] ?? [])) }
        }
        replies.removals = zip(removals, removedCount).map { (reply: $0.reply, count: $1) }
        commit.reply(replies, saved: persistError == nil, wroteAhead: wroteAhead, appends: appends)
        timings.mark("reply")

        // Phase D: detach work is deferred (compaction_delay) so that the removals of many
        // batches share one rebuild per link and one grace period; it runs now if it is due.
        compactor.schedule()
        compactor.runIfDue(slots: &slots)
        counters.lastBatchMicros = (ContinuousClock.now - started).microseconds
        counters.busyMicros += counters.lastBatchMicros
        publish(makeSnapshot())
        timings.mark("after")
        timings.log(logger, probes: removing + created.values.reduce(0, { $0 + $1.count }), what: "request batch")
        // A whole binary's registration: once its transient buffers are gone, return the heap
        // (see MemoryTrimmer). Asked last: a heap-release window open during the rest of the
        // batch (its state write, the tree's 241,000 inserts) would hand back buffers the batch
        // itself takes again.
        if removing < MemoryTrimmer.bulk && removing + created.values.reduce(0, { $0 + $1.count }) >= MemoryTrimmer.bulk {
            trimmer.request()
        }
    }

    /// Makes a registration and enters it (registry and, at the next publication, tree).
    func record(id: String, plan: PlannedRegister, spec: ProbeSpecInput, sites: ProbeSites, now: BatchClock,
                restored: RestoreItem?, state: ProbeState, probeSet: String?) -> ProbeRecord {
        let r = Self.makeRecord(id: id, consumer: plan.consumer, peer: plan.peer, spec: spec, sites: sites, now: now,
                                restored: restored, state: state, probeSet: probeSet, shared: &lastTerms)
        registry.insert(r)
        return r
    }

    /// - Parameter shared: the terms of the record made before; used again when this one's
    ///   are the same (the records of one request), so a glob's records share one object.
    private static func makeRecord(id: String, consumer: String?, peer: Peer, spec: ProbeSpecInput, sites: ProbeSites,
                                   now: BatchClock, restored: RestoreItem?, state: ProbeState, probeSet: String?,
                                   shared: inout RequestTerms?) -> ProbeRecord {
        let registeredAt = restored?.registeredAt ?? now.realtime
        let terms: RequestTerms
        if let last = shared, last.registeredAtMonotonic == now.monotonic, last.registeredAt == registeredAt,
           last.owner == peer, last.consumer == consumer, last.probeSet == probeSet, last.spec == spec {
            terms = last
        } else {
            terms = RequestTerms(consumer: consumer, owner: peer, spec: spec, registeredAt: registeredAt,
                                 registeredAtMonotonic: now.monotonic, countingSince: now.countingSince, probeSet: probeSet)
            shared = terms
        }
        return ProbeRecord(id: id, terms: terms, sites: sites, state: state, baseHits: restored?.baseHits ?? 0,
                           // An adopted followed registration also has sites in older file
                           // versions (placed before its targets' sites): its targets are then
                           // not its sites' targets.
                           targets: sites.isEmpty || (restored?.adoptedSlots != nil && sites.count != restored?.targets.count)
                               ? (restored?.targets ?? []) : nil,
                           retired: restored?.retired ?? [], baseLatency: restored?.baseLatency)
    }

    /// The records of a large new registration, with ids from `ids`, in its probes' order.
    /// The probes of one spec share their `Origin`, and their records one `RequestTerms`,
    /// found by the origin's identity: comparing each probe's spec with the last one (its
    /// path, symbol and consumer strings), 241,000 times for a whole binary, was a tenth of
    /// making the records.
    static func makeRecords(_ plan: PlannedRegister, ids: RegistryWriter, now: BatchClock) -> [ProbeRecord] {
        var records: [ProbeRecord] = []
        records.reserveCapacity(plan.probes.count)
        var last: (origin: PlannedProbe.Origin, terms: RequestTerms)?
        for p in plan.probes {
            let terms: RequestTerms
            if let last, last.origin === p.origin {
                terms = last.terms
            } else {
                terms = RequestTerms(consumer: plan.consumer, owner: plan.peer, spec: p.spec, registeredAt: now.realtime,
                                     registeredAtMonotonic: now.monotonic, countingSince: now.countingSince,
                                     probeSet: p.probeSet)
                last = (p.origin, terms)
            }
            // New: no restored parts, and its targets are its sites'.
            records.append(ProbeRecord(id: ids.nextID(), terms: terms, sites: p.sites, state: .active, baseHits: 0,
                                       targets: nil))
        }
        return records
    }

    /// A batch's registration time, read once: every record of the batch carries it.
    struct BatchClock {
        let realtime = Double(clockRealtimeSeconds())
        let monotonic = ContinuousClock.now
        /// `monotonic` as `ProbeRecord.countingSince` (Duration arithmetic once per batch, not per record).
        let countingSince: Double
        init() { countingSince = MonotonicEpoch.seconds(monotonic) }
    }

    /// Runs pending detach/merge work if it is due (called by the writer when it wakes idle).
    func maintain() {
        compactor.collect(slots: &slots)
        compactor.runIfDue(slots: &slots)
        tree.reclaim()
        publish(makeSnapshot())
    }

    /// When pending detach/merge work must run at the latest (the writer wakes for it).
    var compactionDue: ContinuousClock.Instant? { compactor.due }

    /// Runs the detach/merge work now (see `Compactor.compact`).
    func compact(wait: Bool = false) {
        compactor.compact(wait: wait, slots: &slots)
    }

    /// Blocks until the detach worker has finished every round, and collects them.
    func finishDetaches() {
        compactor.finish(slots: &slots)
    }

    /// Blocks until every batch handed to the committer has been answered (tests).
    func waitForCommits() {
        commit.waitAll()
    }

    /// Publishes `snapshot` as the registry readers see, in one tree version with the consumers
    /// staged for its new registrations (`RegistryWriter.stageInserts`) and without those of the
    /// registrations it no longer has (`removing`): a reader sees a batch's registry and its
    /// uprobes together or neither.
    func publish(_ snapshot: RegistrySnapshot, removing: [TreeEdit] = []) {
        // Without what the batch changed: that is for the persist hook, and readers keep the
        // published version until the next batch (a whole binary's `batchAdded` held an
        // array of 241,000 records for as long as no other batch came).
        var published = snapshot
        published.batchAdded = []
        published.batchRemoved = []
        published.batchEnded = []
        published.batchFollowed = []
        tree.apply(removing, publishing: PublishedRegistry(published))
    }

    func makeSnapshot() -> RegistrySnapshot {
        generation += 1
        var s = RegistrySnapshot()
        s.probes = registry.probes
        s.slotHighWater = slots.highWater
        s.slotsInUse = slots.inUse
        s.slotCapacity = slots.capacity
        s.linksOpen = links.openCount
        s.counters = counters
        // Counted where the work is done.
        s.counters.linksCreated = links.created
        s.counters.persistMicros = commit.persistMicros
        compactor.count(into: &s.counters)
        s.generation = generation
        return s
    }

    /// Detaches everything (daemon shutdown without persistence of kernel state: links die with
    /// the process anyway, but closing them together is faster than the kernel doing it one by one).
    func shutdown() {
        commit.stop()
        compactor.finish(slots: &slots)
        compactor.stop()
        links.closeAll()
    }
}

private func clockRealtimeSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
