// Phase A of a batch, its plan: registrations with their slots and sites, removals checked
// (`plan`); then phase B's grouping of every registration's sites into one uprobe_multi link per
// (binary, pid filter, direction) (`attachPlanned`).

import UprobeELF
import UprobeKernel

struct PlannedProbe {
    /// What the probes of one spec share: a glob's 241,000 planned probes hold one of these
    /// instead of a copy each of the spec and of an (absent) restored registration, which
    /// made the plan of a whole binary 88 MB.
    final class Origin {
        let spec: ProbeSpecInput
        let restored: RestoreItem?
        /// `RegisterItem.probeSet` (or the restored registration's).
        let probeSet: String?
        init(spec: ProbeSpecInput, restored: RestoreItem? = nil, probeSet: String? = nil) {
            self.spec = spec
            self.restored = restored
            self.probeSet = probeSet
        }
    }
    /// A function's one site inline, as its record will keep it: an array per planned probe
    /// was 241,000 allocations of a whole binary's plan, made and freed before the attach.
    var sites: ProbeSites
    let origin: Origin
    /// Its sites are in links adopted from the pin directory: not attached again.
    var adopted = false

    init(sites: ProbeSites, origin: Origin, adopted: Bool = false) {
        self.sites = sites
        self.origin = origin
        self.adopted = adopted
    }

    init(sites: [ProbeSite], origin: Origin, adopted: Bool = false) {
        self.init(sites: ProbeSites(sites), origin: origin, adopted: adopted)
    }

    init(sites: [ProbeSite], spec: ProbeSpecInput, restored: RestoreItem? = nil, adopted: Bool = false, probeSet: String? = nil) {
        self.init(sites: sites, origin: Origin(spec: spec, restored: restored, probeSet: probeSet), adopted: adopted)
    }

    var spec: ProbeSpecInput { _read { yield origin.spec } }
    var restored: RestoreItem? { origin.restored }
    var probeSet: String? { origin.probeSet }
}

/// One registration of a batch (a register request, one restored registration, or a follow
/// round's new file for one registration) on its way through the batch.
struct PlannedRegister {
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

/// What phase A decided for a batch's requests.
struct BatchPlan {
    /// `slots`: the counter slots of the registrations `ids` names (taken in the pass that
    /// selects them: a lookup per id afterwards was the cost).
    typealias Unregister = (ids: [String], slots: [UInt32], reply: @Sendable (Result<Removal, EngineError>) -> Void)
    /// Registrations, with their slots allocated and reset (or their failure).
    var registers: [PlannedRegister]
    /// Unregisters that may go ahead, with the ids each removes; those refused were answered.
    var removals: [Unregister]
}

/// A batch's sites grouped by link: one group per (binary, pid filter, direction), in the order
/// first seen, each with the sites of every registration in it.
struct LinkGroups {
    struct Group {
        var key: LinkGroupKey
        var path: String
        /// The sites, handed to the kernel as they are (no copy per link request).
        var sites: [LinkSite]
        /// `regs[i]`: the registration (index into the registrations) of `sites[i]`.
        var regs: [Int]
    }
    private(set) var groups: [Group] = []

    /// The groups of the registrations that have not failed. Each group has a site.
    init(_ registers: [PlannedRegister]) {
        // Plain values only (no target copies): a 10,000-site request spent as long grouping
        // its sites as the kernel took to attach them. A site's key is worked out again only
        // when its spec (origin) or its file object changes: a glob's 241,000 sites share both.
        var groupOf: [LinkGroupKey: Int] = [:]
        var last: (origin: PlannedProbe.Origin, file: ResolvedFile, group: Int)?
        for (r, plan) in registers.enumerated() where plan.failure == nil {
            for p in plan.probes where !p.adopted {
                for s in p.sites {
                    let g: Int
                    if let last, last.origin === p.origin, last.file === s.target.file {
                        g = last.group
                    } else {
                        let key = LinkGroupKey(file: FileID(device: s.target.device, inode: s.target.inode),
                                               pid: p.spec.pid ?? 0, retprobe: p.spec.retprobe, latency: p.spec.latency)
                        if let known = groupOf[key] {
                            g = known
                        } else {
                            g = groups.count
                            groups.append(Group(key: key, path: s.target.path, sites: [], regs: []))
                            groupOf[key] = g
                        }
                        last = (p.origin, s.target.file, g)
                    }
                    groups[g].sites.append(LinkSite(offset: s.target.fileOffset, refCtrOffset: s.target.refCtrOffset, slot: s.slot))
                    groups[g].regs.append(r)
                }
            }
        }
    }
}

extension BatchApplier {
    /// Phase A: allocates and resets slots for the batch's registrations (each restored
    /// registration on its own) and checks its unregisters, answering those refused at once.
    /// Short of slots, it first waits for pending detach work to free some.
    func plan(_ batch: [PendingOp]) -> BatchPlan {
        var registers: [PlannedRegister] = []
        var removals: [BatchPlan.Unregister] = []
        var removedInBatch: Set<String> = []
        let lastUnregister = batch.lastIndex { if case .unregister = $0 { return true } else { return false } } ?? -1
        var newSlots: [UInt32] = []
        for (n, op) in batch.enumerated() {
            switch op {
            case .register(let items, let consumer, let peer, let early, _):
                var plan = PlannedRegister(index: n, consumer: consumer, peer: peer)
                let needed = items.reduce(0) { $0 + $1.targets.count }  // one slot per site
                if slots.available < needed {
                    // Reclaim retired slots (their links close, a grace period passes) before refusing.
                    compactor.reclaim(slots: &slots)
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
                        plan.probes.append(PlannedProbe(sites: sites, spec: item.spec, probeSet: item.probeSet))
                    } else {
                        let origin = PlannedProbe.Origin(spec: item.spec, probeSet: item.probeSet)
                        for t in item.targets {
                            guard let slot = next.next() else { break }  // never: `needed` slots were allocated
                            plan.probes.append(PlannedProbe(sites: ProbeSites(CollectionOfOne(ProbeSite(target: t, slot: slot))), origin: origin))
                        }
                    }
                }
                if prepare != nil || early != nil, plan.probes.count >= tuning.prepareMinimum {
                    plan.large = true
                    plan.earlyHook = early
                }
                registers.append(plan)
            case .restore(let items, let floor, let adoption, _):
                registry.skipNumbers(below: floor)
                if !adoption.links.isEmpty {
                    // The adopted links' slots are held before anything is allocated; slots no
                    // registration claims are retired (detached by the next compaction).
                    slots.claim(adoption.links.flatMap { $0.sites.map(\.slot) })
                    links.adopt(adoption.links)
                    compactor.retire(adoption.deadSlots)
                }
                // Each restored registration is its own request, so one that cannot attach
                // never takes the others down with it.
                for item in items {
                    var plan = PlannedRegister(index: n, consumer: item.consumer, peer: item.owner)
                    plan.restoreID = item.id
                    if item.degradedReason != nil {
                        plan.probes = [PlannedProbe(sites: [], spec: item.spec, restored: item, probeSet: item.probeSet)]
                        registers.append(plan)
                        continue
                    }
                    if let adopted = item.adoptedSlots, adopted.count == item.targets.count {
                        plan.probes = [PlannedProbe(sites: item.adoptedOlderSites + zip(item.targets, adopted).map { ProbeSite(target: $0, slot: $1) },
                                                    spec: item.spec, restored: item, adopted: true, probeSet: item.probeSet)]
                        registers.append(plan)
                        continue
                    }
                    if slots.available < item.targets.count { compactor.reclaim(slots: &slots) }
                    guard let allocated = slots.allocate(item.targets.count) else {
                        plan.failure = EngineError(code: .capacityExhausted, message: "no counter slots left to restore \(item.id)")
                        plan.probes = [PlannedProbe(sites: [], spec: item.spec, restored: item, probeSet: item.probeSet)]
                        registers.append(plan)
                        continue
                    }
                    newSlots += allocated
                    plan.probes = [PlannedProbe(sites: zip(item.targets, allocated).map { ProbeSite(target: $0, slot: $1) },
                                                spec: item.spec, restored: item, probeSet: item.probeSet)]
                    registers.append(plan)
                }
            case .unregister(let ids, let selection, _, let authorize, var reply):
                let selected: [String]
                var removedSlots: [UInt32] = []
                if let ids {
                    if let missing = ids.first(where: { registry[$0] == nil || removedInBatch.contains($0) }) {
                        reply(.failure(EngineError(code: .probeNotFound, message: "no probe with id '\(missing)'")))
                        continue
                    }
                    selected = Array(Set(ids))
                } else {
                    // A probe set's registrations share its name as consumer but are left to the
                    // set (its file or `apply`): removing them here would only last until the
                    // next reconcile brings them back. The same holds for a glob.
                    var matcher = (selection ?? ProbeSelection()).matcher()
                    var leftInSets: [String: Int] = [:]  // the reply says what was left alone
                    // Authorized in the same pass: a lookup by id per selected probe afterwards
                    // was a visible part of removing a whole binary.
                    var denied: String?
                    selected = registry.probes.selectIDs { r in
                        guard matcher.matches(r) && (removedInBatch.isEmpty || !removedInBatch.contains(r.id)) else { return false }
                        if let set = r.probeSet { leftInSets[set, default: 0] += 1; return false }
                        if denied == nil && !authorize(r) { denied = r.id }
                        for site in r.sites { removedSlots.append(site.slot) }
                        return true
                    }
                    if let denied {
                        reply(.failure(EngineError(code: .permissionDenied,
                                                   message: "probe '\(denied)' belongs to another user")))
                        continue
                    }
                    if !leftInSets.isEmpty {
                        let left = leftInSets, told = reply
                        reply = { result in told(result.map { var removal = $0; removal.leftInSets = left; return removal }) }
                    }
                }
                if ids != nil, let denied = selected.first(where: { id in registry[id].map { !authorize($0) } ?? false }) {
                    reply(.failure(EngineError(code: .permissionDenied,
                                               message: "probe '\(denied)' belongs to another user")))
                    continue
                }
                // Only a later unregister of this batch asks (hashing a whole binary's 241,000 ids
                // was 3% of a register/unregister cycle's samples).
                if n < lastUnregister { removedInBatch.formUnion(selected) }
                if ids != nil { removedSlots = selected.flatMap { registry[$0]?.sites.map(\.slot) ?? [] } }
                removals.append((selected, removedSlots, reply))
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
        return BatchPlan(registers: registers, removals: removals)
    }

    /// Creates the links of a batch. A group's link failing is retried request by request so
    /// one bad request cannot fail its neighbours; a request that loses any group fails whole
    /// (its sites attached in other groups are retired like any removed probe's).
    /// `meanwhile`, if given, runs on the attach thread while this thread creates the links: a
    /// large request's records, registry and tree work overlap its attach.
    func attachPlanned(_ registers: inout [PlannedRegister], meanwhile: (() -> Void)? = nil) {
        let groups = LinkGroups(registers).groups
        let requests = groups.map { LinkRequest(key: $0.key, path: $0.path, sites: $0.sites) }
        let created = links.create(requests, meanwhile: meanwhile)
        for (group, result) in zip(groups, created) {
            guard case .failure(let whole) = result else { continue }
            let regsInGroup = Array(Set(group.regs)).sorted()
            if regsInGroup.count == 1 {
                registers[regsInGroup[0]].failure = attachFailure(whole, path: group.path)
                continue
            }
            for r in regsInGroup where registers[r].failure == nil {
                let mine = LinkRequest(key: group.key, path: group.path,
                                       sites: group.sites.indices.filter { group.regs[$0] == r }.map { group.sites[$0] })
                for case .failure(let error) in links.create([mine], meanwhile: nil) {
                    registers[r].failure = attachFailure(error, path: group.path)
                }
            }
        }
    }

    private func attachFailure(_ error: KernelError, path: String) -> EngineError {
        EngineError(code: error.code, message: "attaching probes in \(path) failed: \(error.message)")
    }
}
