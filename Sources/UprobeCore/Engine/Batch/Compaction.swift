// Removals made physical: dead sites are dropped by rebuilding their links make-before-break,
// small links are merged, and the old links are closed in rounds on the detach worker.

extension BatchApplier {
    /// Sets `compactionDue` when there is detach or merge work, keeping an earlier deadline.
    func scheduleCompaction() {
        let pending = !deadSlots.isEmpty || links.groups.contains(where: groupNeedsMerge)
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

    /// Whether a group has more small links than it should (many small batches each added
    /// one). Big links are never rebuilt just to merge: that would make every merge cost the
    /// size of the biggest registration on the binary. Asked for every group after every
    /// batch, so it counts in place and stops past the limit (listing the small links
    /// allocated two arrays per group per batch).
    func groupNeedsMerge(_ g: LinkGroupKey) -> Bool {
        var small = 0
        for l in links.links(of: g) where isSmall(l) {
            small += 1
            if small > tuning.maxLinksPerGroup { return true }
        }
        return false
    }

    func smallLinks(of g: LinkGroupKey) -> [LinkRecord] {
        links.links(of: g).filter(isSmall)
    }

    /// A link merges are allowed to rebuild (see `groupNeedsMerge`).
    func isSmall(_ l: LinkRecord) -> Bool { l.sites.count <= tuning.mergeLinksUpTo }

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
            round.freeSlots += links.close(l, dead: deadSlots.contains)
        }
        deadSlots.subtract(round.freeSlots)
        if !round.closing.isEmpty || !round.freeSlots.isEmpty {
            let id = nextRoundID
            nextRoundID += 1
            rounds[id] = round
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
    func collectDetaches(_ ids: [UInt64]) {
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
            compactionStalled = false
            slots.release(round.freeSlots)
            counters.linksClosed += UInt64(round.closing.count)
        }
        updatePendingRemovals()
        scheduleCompaction()
    }

    /// Blocks until the detach worker has finished every round, and collects them.
    func finishDetaches() {
        collectDetaches(detacher.waitAll())
    }

    /// Before refusing with `capacity_exhausted`: detaches every dead site now and waits until
    /// their slots are free.
    func reclaimSlots() {
        guard !deadSlots.isEmpty || !rounds.isEmpty else { return }
        compact(wait: true)
    }

    /// Removals not yet physically gone: dead sites waiting for compaction or for their round.
    func updatePendingRemovals() {
        counters.pendingRemovals = deadSlots.count + rounds.values.reduce(0) { $0 + $1.freeSlots.count }
    }
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
