import Logging
import UprobeCore
import UprobeELF
import UprobedProbeSets
import UprobedProtocol

extension ProbeSets {
    /// The `apply` op: makes the applied set `name` hold exactly `specs` (or, `dryRun`, says what
    /// that would change). Who may: a set name held by a file of `probes_dir` is the file's
    /// (`set_conflict`); an applied set is its applier's: only that uid or an admin may change
    /// it. A non-admin's set cannot gain probes, since a set has no `pid` filters and only
    /// admins register system-wide probes; it may empty (remove) its own set, and `diff` any
    /// set over binaries it can read. A dry run of a name held by a file compares with the
    /// file's set: what a reload with this content would change.
    func apply(_ name: String, specs: [ProbeSpec], dryRun: Bool, who: PeerIdentity,
               policy: AccessPolicy) async -> Result<SetOutcome, ProtocolError> {
        if let why = ProbeSetFile.nameProblem(name) { return .failure(ProtocolError(.invalidRequest, why)) }
        var seen: [ProbeSpec: Int] = [:]
        for (n, spec) in specs.enumerated() {
            let at: JSONObject = ["probe": .int(Int64(n))]
            if let why = spec.probeSetProblem { return .failure(ProtocolError(.invalidRequest, "probes[\(n)]: \(why)", details: at)) }
            if let first = seen[spec] {
                return .failure(ProtocolError(.invalidRequest, "probes[\(n)] is the same probe as probes[\(first)]", details: at))
            }
            seen[spec] = n
        }
        // A dry run changes nothing, so it does not wait in line: any reader may ask for one, and
        // one naming a file on a hung mount must not hold up reloads and applies behind it.
        let body: @Sendable () async -> Result<SetOutcome, ProtocolError> = {
            let fileOwned = self.filesByName[name] != nil || self.marks()[ProbeSetMark(.file, name)] != nil
            if fileOwned && !dryRun {
                if let file = self.filesByName[name] {
                    return .failure(ProtocolError(.setConflict,
                        "set '\(name)' comes from \(file) in probes_dir; edit that file and reload uprobed (SIGHUP) instead"))
                }
                return .failure(ProtocolError(.setConflict,
                    "set '\(name)' belongs to probes_dir (its file is gone; the next reload removes its probes)"))
            }
            let mark = ProbeSetMark(fileOwned ? .file : .api, name)
            let isAdmin = policy.role(of: who) == .admin
            let uid = who.peer.uid
            if !isAdmin && !fileOwned {
                let current = self.records(of: mark)
                if let other = current.first(where: { $0.owner.uid != uid }) {
                    return .failure(ProtocolError(.permissionDenied,
                        "set '\(name)' was applied by uid \(other.owner.uid); only that uid or an admin may change it"))
                }
                // Checked before anything is resolved, as for register: a set has no pid filters,
                // and only admins register system-wide probes.
                if !dryRun, !SetChange(desired: specs, records: current).added.isEmpty {
                    return .failure(ProtocolError(.permissionDenied,
                        "uid \(uid) may not add probes to set '\(name)': a probe set has no pid filters, and only admins register system-wide probes (admin_uids/admin_groups)"))
                }
            }
            // The set's list is saved between the additions and the removals (`AppliedSets`).
            let saveList: () -> ProtocolError? = {
                let current = self.applied.withLock { $0 }
                var next = current
                next.sets[name] = specs.isEmpty ? nil : specs
                guard next != current else { return nil }
                if let e = self.saveApplied(next) {
                    return ProtocolError(.stateWriteFailed, "the set's probe list could not be saved (\(e.message)); the set was not changed")
                }
                self.applied.withLock { $0 = next }
                return nil
            }
            let result = await self.reconcile(mark, desired: specs, owner: who.peer, dryRun: dryRun,
                                              authorize: { items in
                                                  isAdmin ? nil : AccessControl.checkTargets(who, items: items, held: nil, policy: policy)
                                              }, between: fileOwned ? nil : saveList)
            switch result {
            case .failure(let f): return .failure(f.error)
            case .success(let o):
                guard !dryRun else { return .success(o) }
                if specs.isEmpty {
                    self.table.update(name) { $0 = nil }
                } else {
                    self.table.update(name) { $0 = ProbeSetTable.Entry(source: .api, file: nil, refused: nil, appliedAt: clockRealtime()) }
                }
                self.logger.info("probe set applied", metadata: [
                    "set": "\(name)", "source": "api", "peer_uid": "\(uid)",
                    "added": "\(o.registered.reduce(0) { $0 + $1.count })",
                    "removed": "\(o.change.removed.reduce(0) { $0 + $1.ids.count })", "unchanged_specs": "\(o.change.unchanged)"])
                return .success(o)
            }
        }
        return dryRun ? await body() : await gate.run(body)
    }
}

extension RequestHandler {
    /// `apply`'s reply: the set, what was (or would be) added per spec (`probe`: its index in the
    /// request, `spec`, `count`, and `ids` unless dry), removed (`spec`, `ids`), the number of
    /// specs left as they were, and the functions added globs skipped.
    func apply(set name: String, specs: [ProbeSpec], dryRun: Bool, who: PeerIdentity,
               policy: AccessPolicy) async -> Result<ReplyBody, ProtocolError> {
        guard let sets = probeSets else {
            return .failure(ProtocolError(.internalError, "this uprobed serves no probe sets"))
        }
        return await sets.apply(name, specs: specs, dryRun: dryRun, who: who, policy: policy).map { o in
            let skipped = o.skipped.map { (probe: o.change.added[$0.probe].index, site: $0.site) }
            return .written(estimatedBytes: 256 + o.change.added.count * 256 + o.change.removed.count * 256) { w in
                w.field("set", name)
                w.field("dry_run", dryRun)
                w.key("added")
                w.beginArray()
                for (n, a) in o.change.added.enumerated() {
                    w.beginObject()
                    w.field("probe", Int64(a.index))
                    w.key("spec")
                    a.spec.write(into: &w)
                    w.field("count", Int64(n < o.counts.count ? o.counts[n] : 0))
                    if !dryRun { w.field("ids", strings: n < o.registered.count ? o.registered[n].map(\.id) : []) }
                    w.endObject()
                }
                w.endArray()
                w.key("removed")
                w.beginArray()
                for r in o.change.removed {
                    w.beginObject()
                    w.key("spec")
                    r.spec.write(into: &w)
                    w.field("ids", strings: r.ids)
                    w.endObject()
                }
                w.endArray()
                w.field("unchanged", Int64(o.change.unchanged))
                if let warning = o.warning { w.field("warning", warning) }
                Self.writeSkipped(skipped, into: &w)
            }
        }
    }

    /// Refuses an `unregister` that names a probe a set owns (`probe_in_set`): the set would
    /// bring it back at its next reconcile, or (applied) silently differ from what was applied.
    func setOwned(_ ids: [String]) -> ProtocolError? {
        let owned: (id: String, mark: String)? = engine.read { s, _ in
            for id in ids { if let r = s.probes[id], let m = r.probeSet { return (id, m) } }
            return nil
        }
        guard let owned, let mark = ProbeSetMark(owned.mark) else { return nil }
        let how = mark.source == .file
            ? "remove its line from the set's file in probes_dir and reload uprobed (SIGHUP)"
            : "apply the set without it (uprobectl apply)"
        return ProtocolError(.probeInSet, "probe \(owned.id) belongs to probe set '\(mark.name)'; \(how)")
    }
}
