// A batch's plan: registrations with their slots and sites (`PlannedRegister`), and how their
// sites are grouped into one uprobe_multi link per (binary, pid filter, direction).

import UprobeELF
import UprobeKernel

extension BatchApplier {
    struct PlannedProbe {
        var sites: [ProbeSite]
        var spec: ProbeSpecInput
        var restored: RestoreItem? = nil
    }

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

    /// Creates the links of a batch. A group's link failing is retried request by request so
    /// one bad request cannot fail its neighbours; a request that loses any group fails whole
    /// (its sites attached in other groups are retired like any removed probe's).
    /// `meanwhile`, if given, runs on the attach thread while this thread creates the links: a large
    /// request's records, registry and tree work overlap its attach.
    func attachPlanned(_ registers: inout [PlannedRegister], meanwhile: (() -> Void)? = nil) {
        // Plain values only (no target copies): a 10,000-site request spent as long grouping
        // its sites as the kernel took to attach them.
        struct Member { var reg: Int; var site: LinkSite }
        var groups: [(key: LinkGroupKey, path: String, members: [Member])] = []
        var groupOf: [LinkGroupKey: Int] = [:]
        var last: (key: LinkGroupKey, group: Int)?  // consecutive sites are mostly in one group
        for (r, plan) in registers.enumerated() where plan.failure == nil {
            for p in plan.probes {
                for s in p.sites {
                    let key = LinkGroupKey(file: FileID(device: s.target.device, inode: s.target.inode),
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
        let created = links.create(requests, meanwhile: meanwhile)
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
                for case .failure(let error) in links.create([mine], meanwhile: nil) {
                    registers[r].failure = attachFailure(error, path: request.path)
                }
            }
        }
    }

    func attachFailure(_ error: KernelError, path: String) -> EngineError {
        EngineError(code: error.code, message: "attaching probes in \(path) failed: \(error.message)")
    }
}
