// Follow rounds: the path watcher's changes to existing registrations (a replaced binary, a
// retired file version, an ended process), applied by the writer as one batch.

import UprobeELF
import UprobeKernel
import UprobeTree

extension BatchApplier {
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
        var followedIDs: [String] = []
        var log = FollowLog()
        defer { log.emit(to: logger) }
        for change in changes {
            guard let r = registry[change.id] else { continue }
            switch change.kind {
            case .attach(let targets):
                guard let first = targets.first, r.follows, !isEnded(r) else { continue }
                // Back to a file this registration still counts in (moved back): no new sites.
                let known = r.sites.filter { $0.target.device == first.device && $0.target.inode == first.inode }
                if !known.isEmpty {
                    registry.replace(r.with(sites: r.sites, state: .active, baseHits: r.baseHits, targets: known.map(\.target), retired: r.retired))
                    followedIDs.append(r.id)
                    changed = true
                    log.note(.init(event: .followedBack, path: first.path, inode: first.inode), id: r.id)
                } else {
                    attaches.append((r.id, targets))
                }
            case .degrade(let reason):
                guard r.state != .degraded(reason: reason), !isEnded(r) else { continue }
                registry.replace(r.with(sites: r.sites, state: .degraded(reason: reason), baseHits: r.baseHits, targets: r.targets,
                                        retired: r.retired))
                changed = true
                log.note(.init(event: .degraded, path: r.firstTarget?.path ?? r.spec.path, inode: 0,
                               errorCode: "probe_degraded", reason: reason), id: r.id)
            case .retire(let device, let inode):
                // Never the current file: new processes still get it.
                if let t = r.firstTarget, t.device == device, t.inode == inode, r.state == .active { continue }
                let gone = r.sites.filter { $0.target.device == device && $0.target.inode == inode }
                guard !gone.isEmpty else { continue }
                retiring.append((r.id, gone, gone.first.map { FileVersion($0.target) }))
            case .end(let reason):
                // Ended with sites left means an earlier counter read failed: retry the detach.
                guard !(isEnded(r) && r.sites.isEmpty) else { continue }
                retiring.append((r.id, Array(r.sites), nil))
                endedIDs.append(r.id)
                registry.replace(r.with(sites: r.sites, state: .ended(reason: reason), baseHits: r.baseHits, targets: r.targets,
                                        retired: r.retired))
                changed = true
                log.note(.init(event: .ended, path: r.firstTarget?.path ?? r.spec.path, inode: 0, reason: reason), id: r.id)
            }
        }

        // New versions: allocate, reset, attach per group; a registration whose group fails is
        // degraded (its older sites keep counting).
        if !attaches.isEmpty {
            var plans: [PlannedRegister] = []
            var ids: [String] = []
            var newSlots: [UInt32] = []
            for (id, targets) in attaches {
                guard let r = registry[id] else { continue }
                var plan = PlannedRegister(index: plans.count, consumer: r.consumer, peer: r.owner)
                if slots.available < targets.count { compactor.reclaim(slots: &slots) }
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
                guard let r = registry[id] else { continue }
                let newSites: [ProbeSite] = plan.probes.first.map { Array($0.sites) } ?? []
                if let failure = plan.failure {
                    for s in newSites {
                        if links.isAttached(s.slot) {
                            compactor.retire(s.slot)
                            changed = true  // detach work to schedule
                        } else {
                            slots.release([s.slot])
                        }
                    }
                    let path = newSites.first?.target.path ?? r.spec.path
                    let reason = "the new file at \(path) could not be attached (\(failure.code): \(failure.message)); processes running the old file are still counted"
                    // The watcher retries at every check; only a change of state is news.
                    guard r.state != .degraded(reason: reason) else { continue }
                    registry.replace(r.with(sites: r.sites, state: .degraded(reason: reason), baseHits: r.baseHits, targets: r.targets, retired: r.retired))
                    log.note(.init(event: .degraded, path: path, inode: 0, errorCode: failure.code.rawValue, reason: reason), id: r.id)
                } else {
                    registry.addConsumers(of: r, sites: newSites)
                    registry.replace(r.with(sites: r.sites + newSites, state: .active, baseHits: r.baseHits,
                                            targets: newSites.map(\.target), retired: r.retired))
                    followedIDs.append(id)
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
                    guard let r = registry[id] else { continue }
                    let goneSlots = Set(gone.map(\.slot))
                    let hits = gone.reduce(UInt64(0)) { $0 &+ (Int($1.slot) < counts.count ? counts[Int($1.slot)] : 0) }
                    var retired = r.retired
                    if let version {
                        retired.append(RetiredVersion(version: version, hits: hits))
                        log.note(.init(event: .retired, path: version.path, inode: version.inode), id: r.id, hits: hits)
                    }
                    registry.removeConsumers(of: r, sites: gone, into: &treeRemovals)
                    for site in gone { compactor.retire(site.slot) }
                    // A latency probe keeps the histogram of the sites it drops, like their hits.
                    var baseLatency = r.baseLatency
                    if r.spec.latency {
                        var h = baseLatency ?? LatencyHistogram()
                        for site in gone { if let live = kernel.readLatency(slot: site.slot) { h.add(live) } }
                        baseLatency = h
                    }
                    registry.replace(r.with(sites: r.sites.filter { !goneSlots.contains($0.slot) }, state: r.state,
                                            baseHits: r.baseHits &+ hits, targets: r.targets, retired: retired,
                                            baseLatency: baseLatency))
                    followedIDs.append(id)
                    changed = true
                }
            }
        }
        guard changed || !treeRemovals.isEmpty else { return }
        registry.stageInserts()
        var snapshot = makeSnapshot()
        // The ended records as they are now, their final counts folded in.
        snapshot.batchEnded = endedIDs.compactMap { registry[$0] }
        let ended = Set(endedIDs)
        snapshot.batchFollowed = Set(followedIDs).subtracting(ended).sorted().compactMap { registry[$0] }
        commit.saveAndWait(snapshot)
        publish(snapshot, removing: treeRemovals)
        compactor.schedule()
        compactor.runIfDue(slots: &slots)
        publish(makeSnapshot())
    }

    private func isEnded(_ r: ProbeRecord) -> Bool {
        if case .ended = r.state { return true }
        return false
    }
}
