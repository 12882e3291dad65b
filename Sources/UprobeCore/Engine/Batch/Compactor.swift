// Removals made physical: dead sites are dropped by rebuilding their links make-before-break,
// small links are merged, and the old links are closed in rounds on the detach worker.

import Logging
import UprobeTree

/// The writer's deferred detach and merge work.
///
/// A removed probe's slots become dead here (`retire`); they stay attached until a compaction
/// rebuilds their links without them (or closes links left with no live site), and their slots
/// are free again only once the detach worker has closed the old links and a tree grace period
/// has passed (`collect`). Work is deferred (`EngineConfig.compactionDelay`) so that the
/// removals of many batches share one rebuild per link and one grace period; `due` says when
/// it must run at the latest.
///
/// Owned by the writer thread. The slot allocator stays the writer's: the calls that can free
/// slots take it `inout`.
final class Compactor {
    private let kernel: any KernelBackend
    private let links: LinkTable
    private let tuning: EngineConfig
    private let logger: Logger
    /// Closes links and waits for grace periods off the writer thread.
    private let detacher: DetachWorker
    /// Slots whose probe is gone but which are still attached (waiting for detach work).
    private var deadSlots = SlotSet()
    /// Slots freed by a round that ran before the batch removing their registrations was
    /// published (`startBulkDetach`): a reader may still find them in the registry, so the
    /// grace period that lets them be reused must start after that publication (`published`).
    private var awaitingPublication: [UInt32] = []
    /// Detach rounds handed to `detacher` and not yet finished, by id.
    private var rounds: [UInt64: DetachRound] = [:]
    private var nextRoundID: UInt64 = 1
    /// When the pending detach/merge work must run at the latest (nil: nothing pending).
    private(set) var due: ContinuousClock.Instant?
    /// The last compaction could do nothing (every dead site is in a link still in hand-off,
    /// or its rebuilds failed). Until a detach round is collected or a later compaction makes
    /// progress, pending work waits for the delay like any other instead of being due at once:
    /// the bulk-removal rule made it due after every batch, and each one rescanned thousands
    /// of dead sites for nothing while a merge's old links closed.
    private var stalled = false
    // `status` counters (see `EngineCounters`).
    private var linkRebuilds: UInt64 = 0
    private var gracePeriods: UInt64 = 0
    private var compactions: UInt64 = 0
    private var linksClosed: UInt64 = 0

    /// `wake` is called from the detach worker when a round finishes, so that the writer
    /// collects it.
    /// Told when a round freed a bulk of slots (nil in tests that build a compactor alone).
    let trimmer: MemoryTrimmer?

    init(kernel: any KernelBackend, links: LinkTable, tree: UprobeTree, tuning: EngineConfig, logger: Logger,
         wake: @escaping @Sendable () -> Void, trimmer: MemoryTrimmer? = nil) {
        self.trimmer = trimmer
        self.kernel = kernel
        self.links = links
        self.tuning = tuning
        self.logger = logger
        self.detacher = DetachWorker(kernel: kernel, tree: tree, wake: wake)
    }

    /// Marks an attached slot dead: its probe is gone, its link is rebuilt without it later.
    func retire(_ slot: UInt32) { deadSlots.insert(slot) }

    func retire<S: Sequence<UInt32>>(_ slots: S) { deadSlots.formUnion(slots) }

    /// Removals not yet physically gone: dead sites waiting for compaction or for their round.
    var pendingRemovals: Int {
        deadSlots.count + awaitingPublication.count + rounds.values.reduce(0) { $0 + $1.freeSlots.count }
    }

    /// This compactor's `status` counters, into `counters`.
    func count(into counters: inout EngineCounters) {
        counters.linkRebuilds = linkRebuilds
        counters.gracePeriods = gracePeriods
        counters.compactions = compactions
        counters.linksClosed = linksClosed
        counters.pendingRemovals = pendingRemovals
    }

    /// Sets `due` when there is detach or merge work, keeping an earlier deadline.
    func schedule() {
        let pending = !deadSlots.isEmpty || links.groups.contains(where: groupNeedsMerge)
        guard pending else { due = nil; return }
        let now = ContinuousClock.now
        if !stalled {
            // Too many open links (fds, kernel objects): do it now rather than after the delay.
            if links.count > tuning.maxOpenLinks { due = now; return }
            // A bulk removal is already one big batch: waiting would only delay the detach.
            if deadSlots.count >= tuning.bulkDetachSites { due = now; return }
        }
        if due == nil { due = now + tuning.compactionDelay }
    }

    /// Compacts if the work is due.
    func runIfDue(slots: inout SlotAllocator) {
        if let due, ContinuousClock.now >= due { compact(slots: &slots) }
    }

    /// Compacts now if the dead sites retired so far are a bulk removal (`bulkDetachSites`),
    /// before the batch that retired them is published: the kernel closes their links while
    /// the writer finishes the batch. The slots this frees wait for `published`. Other work
    /// (a few removals, too many links) waits for the end of the batch as before: one round
    /// there frees its slots in the same grace period.
    func startBulkDetach(slots: inout SlotAllocator) {
        guard !stalled, deadSlots.count >= tuning.bulkDetachSites else { return }
        compact(slots: &slots, unpublished: true)
    }

    /// The batch is published: the slots freed before that (`startBulkDetach`) go to the
    /// detach worker as a round of their own, whose grace period starts now. Queued behind
    /// the round closing their links, it finishes after it.
    func published() {
        guard !awaitingPublication.isEmpty else { return }
        var round = DetachRound()
        round.freeSlots = awaitingPublication
        awaitingPublication = []
        let id = nextRoundID
        nextRoundID += 1
        rounds[id] = round
        detacher.submit(id: id, links: [])
    }

    /// Replaces every link of each group that holds dead sites or has too many links by one
    /// link of the group's live sites (make-before-break, with the BPF hand-off on so no hit is
    /// lost or doubled during the overlap), and closes groups whose sites all died.
    ///
    /// Only the attach half runs here. The links to close, the hand-off to end and the slots to
    /// free go to the detach worker as one round; the writer finishes the round's bookkeeping
    /// in `collect` once the worker has closed them (a slot is never reused while a link
    /// can still count into it). Links still in hand-off from an earlier round are left for a
    /// later compaction. `compact(wait: true)` first lets running rounds finish (so nothing is
    /// in hand-off) and returns only once its own round has finished: every dead site is then
    /// detached and its slot free.
    /// `unpublished`: the registrations of the dead sites are still in the published registry
    /// (`startBulkDetach`): the slots freed are held for `published`.
    func compact(wait: Bool = false, slots: inout SlotAllocator, unpublished: Bool = false) {
        if wait { finish(slots: &slots) }
        defer { if wait { finish(slots: &slots) } }
        // Per group, the links to replace: every link holding a dead site, plus all its small
        // links when there are too many of them. Their live sites go into one new link.
        var replace: [LinkGroupKey: [ObjectIdentifier: LinkRecord]] = [:]
        var previous: LinkRecord? = nil
        for s in deadSlots {
            // Dead slots come in slot order, and neighbours mostly share a link.
            guard let l = links.link(holding: s), l !== previous else { continue }
            previous = l
            if !links.isInHandoff(l) {
                replace[l.group, default: [:]][ObjectIdentifier(l)] = l
            }
        }
        for g in links.groups where groupNeedsMerge(g) {
            for l in smallLinks(of: g) where !links.isInHandoff(l) {
                replace[g, default: [:]][ObjectIdentifier(l)] = l
            }
        }
        var round = DetachRound()
        round.freeSlots = deadSlots.filter { !links.isAttached($0) }
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
                    let record = try links.rebuild(r.group, path: path, sites: r.live)
                    round.handoffLinks.append(ObjectIdentifier(record))
                    round.overlapSlots += r.live.map(\.slot)
                    linkRebuilds += 1
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
            round.freeSlots += links.close(l, dead: deadSlots.contains)
        }
        deadSlots.subtract(round.freeSlots)
        // No progress: nothing to close or free (also when every rebuild failed).
        stalled = round.closing.isEmpty && round.freeSlots.isEmpty
        if unpublished {
            awaitingPublication += round.freeSlots
            round.freeSlots = []
        }
        if !round.closing.isEmpty || !round.freeSlots.isEmpty {
            let id = nextRoundID
            nextRoundID += 1
            rounds[id] = round
            if !round.closing.isEmpty { gracePeriods += 1 }
            detacher.submit(id: id, links: round.closing.map(\.handle))
        }
        compactions += 1
        due = nil
        schedule()
        // Work left (a failed rebuild, links still in hand-off) must not spin: retry after the delay.
        if let due, due <= ContinuousClock.now { self.due = ContinuousClock.now + tuning.compactionDelay }
    }

    /// Collects the rounds the detach worker has finished since the last look; never blocks.
    func collect(slots: inout SlotAllocator) {
        collect(detacher.takeFinished(), slots: &slots)
    }

    /// Blocks until the detach worker has finished every round, and collects them.
    func finish(slots: inout SlotAllocator) {
        collect(detacher.waitAll(), slots: &slots)
    }

    /// Before refusing with `capacity_exhausted`: detaches every dead site now and waits until
    /// their slots are free.
    func reclaim(slots: inout SlotAllocator) {
        guard !deadSlots.isEmpty || !rounds.isEmpty else { return }
        compact(wait: true, slots: &slots)
    }

    /// Finishes the queued rounds and ends the detach worker (shutdown; `finish` first).
    func stop() { detacher.stop() }

    /// Finishes rounds the detach worker has completed: their old links are closed and a tree
    /// grace period has passed, so the hand-off ends and their dead slots become free.
    private func collect(_ ids: [UInt64], slots: inout SlotAllocator) {
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
            links.roundFinished(closed: round.closing.count, handoff: round.handoffLinks)
            stalled = false
            slots.release(round.freeSlots)
            linksClosed += UInt64(round.closing.count)
            // The records of a bulk removal go right after this (the writer's reclaim: their
            // tree grace period has passed): trim soon after (see MemoryTrimmer.request).
            if round.freeSlots.count >= MemoryTrimmer.bulk { trimmer?.request(within: .milliseconds(200)) }
        }
        schedule()
    }

    /// Whether a group has more small links than it should (many small batches each added
    /// one). Big links are never rebuilt just to merge: that would make every merge cost the
    /// size of the biggest registration on the binary. Asked for every group after every
    /// batch, so it counts in place and stops past the limit (listing the small links
    /// allocated two arrays per group per batch).
    private func groupNeedsMerge(_ g: LinkGroupKey) -> Bool {
        var small = 0
        for l in links.links(of: g) where isSmall(l) {
            small += 1
            if small > tuning.maxLinksPerGroup { return true }
        }
        return false
    }

    private func smallLinks(of g: LinkGroupKey) -> [LinkRecord] {
        links.links(of: g).filter(isSmall)
    }

    /// A link merges are allowed to rebuild (see `groupNeedsMerge`).
    private func isSmall(_ l: LinkRecord) -> Bool { l.sites.count <= tuning.mergeLinksUpTo }
}

/// One round of detach work handed to the detach worker: what the writer does once the worker
/// has closed `closing` and waited for a tree grace period.
struct DetachRound {
    /// The links being closed.
    var closing: [LinkRecord] = []
    /// Slots of the links that replaced them, in hand-off until the round ends.
    var overlapSlots: [UInt32] = []
    /// Those replacement links (not rebuilt again before the round ends).
    var handoffLinks: [ObjectIdentifier] = []
    /// Dead slots freed when the round ends.
    var freeSlots: [UInt32] = []
}
