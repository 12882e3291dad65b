import UprobeCore
import UprobeELF
import UprobeTree

/// Decides, for each saved registration, whether it can attach again: the binary must be the
/// same file (device, inode, build-id; size and mtime when there is no build-id), the symbol
/// must still resolve to the same offsets, and a `pid` filter's process must still be the same
/// process and, for a non-admin owner, still the owner's (`ProcessOwnership`). Anything else
/// comes back degraded with a reason, never attached elsewhere; a registration that had ended,
/// or whose process stopped being its owner's while the daemon was down, comes back ended.
public enum RestorePlanner {
    /// `ownership`: for a `pid`-filtered registration, why its process may no longer be probed
    /// for its owner (nil: it may, or the owner is an admin).
    public static func plan(_ state: SavedState, resolver: Resolver, bootID: String?,
                            ownership: (SavedProbe, Int32) -> String? = { _, _ in nil }) -> [RestoreItem] {
        // One resolution per distinct spec: a glob registered once is saved as one record per
        // function, and each must not resolve the glob again.
        let cache = ResolutionCache(resolver: resolver)
        func item(_ p: SavedProbe) -> RestoreItem {
            if let why = p.endedReason {
                return RestoreItem(id: p.id, consumer: p.consumer, owner: p.owner, spec: p.spec,
                                   registeredAt: p.registeredAt, baseHits: p.hits, targets: p.targets,
                                   degradedReason: why, ended: true, probeSet: p.probeSet, baseLatency: p.latency)
            }
            switch check(p, savedBoot: state.bootID, bootID: bootID, resolver: cache, ownership: ownership) {
            case .success(let targets):
                return RestoreItem(id: p.id, consumer: p.consumer, owner: p.owner, spec: p.spec,
                                   registeredAt: p.registeredAt, baseHits: p.hits, targets: targets, degradedReason: nil,
                                   probeSet: p.probeSet, baseLatency: p.latency)
            case .failure(let why):
                // Without its function's name (`NameFiles.fill`), it says so: a followed one
                // cannot find its function in a new file.
                let reason = p.unknownNames.map { "\(why.reason); its function's name is unknown (\($0))" } ?? why.reason
                return RestoreItem(id: p.id, consumer: p.consumer, owner: p.owner, spec: p.spec,
                                   registeredAt: p.registeredAt, baseHits: p.hits, targets: p.targets,
                                   degradedReason: reason, ended: why.ended, probeSet: p.probeSet, baseLatency: p.latency)
            }
        }
        var items = state.probes.map { p in
            var restored = item(p)
            restored.retired = p.retired  // history: kept whether or not the registration is adopted
            return restored
        }
        shareFiles(&items, compactor: resolver.names)
        return items
    }

    /// Gives the targets of one file one file object and one names buffer (see
    /// `ResolvedProbe.sharingFiles`): each function of a saved glob was resolved apart.
    static func shareFiles(_ items: inout [RestoreItem], compactor: NameCompactor?) {
        let shared = ResolvedProbe.sharingFiles(items.flatMap(\.targets), compactor: compactor)
        var next = shared.startIndex
        for i in items.indices {
            let n = items[i].targets.count
            items[i].targets = Array(shared[next..<next + n])
            next += n
        }
    }

    /// The ownership rule for a restore under `policy`: judged like the running daemon's
    /// `OwnershipWatcher` (owner's groups from the user database; root and admins exempt).
    public static func ownershipCheck(policy: AccessPolicy) -> (SavedProbe, Int32) -> String? {
        var admin: [UInt32: Bool] = [:]
        return { p, pid in
            guard p.owner.uid != 0 else { return nil }
            let isAdmin = admin[p.owner.uid] ?? {
                let who = PeerIdentity(peer: p.owner, supplementaryGroups: OwnershipWatcher.groups(of: p.owner.uid, primary: p.owner.gid))
                let a = policy.role(of: who) == .admin
                admin[p.owner.uid] = a
                return a
            }()
            guard !isAdmin, let problem = ProcessOwnership.problem(pid: pid, uid: p.owner.uid), problem != .gone else { return nil }
            return "process \(pid) is no longer uid \(p.owner.uid)'s (\(problem.likelyCause): \(problem.detail)); noticed when uprobed restarted, so it was not attached again, its hits up to the last save are kept"
        }
    }

    struct Degraded: Error {
        let reason: String
        /// Final: it comes back ended, not degraded.
        var ended = false
    }

    /// The recorded targets as resolved now (fresh warnings etc.), or why they cannot attach.
    static func check(_ p: SavedProbe, savedBoot: String?, bootID: String?, resolver: ResolutionCache,
                      ownership: (SavedProbe, Int32) -> String?) -> Result<[ResolvedProbe], Degraded> {
        var resolvedNow: [UprobeKey: ResolvedProbe] = [:]
        if let why = degradedReason(p, savedBoot: savedBoot, bootID: bootID, resolver: resolver, now: &resolvedNow) {
            return .failure(Degraded(reason: why))
        }
        // After the start-time check: the pid is still the process that was registered.
        if let pid = p.spec.pid, let why = ownership(p, pid) { return .failure(Degraded(reason: why, ended: true)) }
        return .success(p.targets.compactMap { resolvedNow[UprobeKey($0)] })
    }

    static func degradedReason(_ p: SavedProbe, savedBoot: String?, bootID: String?, resolver: ResolutionCache,
                               now resolvedNow: inout [UprobeKey: ResolvedProbe]) -> String? {
        if let pid = p.spec.pid {
            if let savedBoot, let bootID, savedBoot != bootID {
                return "process \(pid) belonged to an earlier boot of this host; not attached"
            }
            guard let start = processStartTime(pid) else { return "process \(pid) no longer exists; not attached" }
            if let was = p.pidStartTime, was != start {
                return "process \(pid) is a different process now (pid reused); not attached"
            }
        }
        guard let first = p.targets.first else { return "the state file recorded no target for this probe" }
        let now: [ResolvedProbe]
        let bySite: [UprobeKey: ResolvedProbe]
        do { (now, bySite) = try resolver.resolve(p.spec) } catch {
            switch error.code {
            case .fileNotFound, .libraryNotFound:
                return "binary \(first.path) no longer exists (\(error.code)); not attached"
            case .notELF, .malformedELF, .unsupportedELF:
                return "binary \(first.path) is no longer a usable ELF file (\(error.code): \(error.message)); not attached"
            default:
                return "cannot resolve the probe again (\(error.code): \(error.message)); not attached"
            }
        }
        resolvedNow = bySite
        guard let current = now.first else { return "the probe no longer resolves to any site; not attached" }
        if current.device != first.device || current.inode != first.inode {
            return "binary \(first.path) was replaced while uprobed was down (device:inode \(first.device):\(first.inode) -> \(current.device):\(current.inode)); not attached"
        }
        if let was = first.buildID, let isNow = current.buildID {
            if was != isNow {
                return "binary \(first.path) was rewritten in place (build-id \(was) -> \(isNow)); not attached"
            }
        } else if let was = p.stamp, let isNow = fileStamp(current.path), was.size != isNow.size || was.mtimeNanos != isNow.mtimeNanos {
            return "binary \(first.path) was modified in place (size or mtime changed, and it has no build-id to prove it is the same build); not attached"
        }
        for t in p.targets where bySite[UprobeKey(t)] == nil {
            if let skipped = resolver.skipped(p.spec, at: t.fileOffset) {
                return "\(t.symbol ?? "offset") at offset \(t.fileOffset) of \(t.path) cannot be probed (its first \(skipped.reason)); not attached"
            }
            return "\(t.symbol ?? "offset") is no longer at offset \(t.fileOffset) of \(t.path); not attached"
        }
        return nil
    }
}

extension UprobeKey {
    /// The uprobe `t` attaches to: a saved target and a fresh resolution are the same site
    /// exactly when their keys are equal.
    init(_ t: ResolvedProbe) { self.init(dev: t.device, inode: t.inode, offset: t.fileOffset) }
}

/// Resolves each distinct spec once during a restore.
final class ResolutionCache {
    let resolver: Resolver
    private var done: [ProbeSpecInput: Result<([ResolvedProbe], [UprobeKey: ResolvedProbe]), ResolveError>] = [:]
    /// The functions each glob skipped (their first instruction cannot be probed), by offset.
    private var skippedBySpec: [ProbeSpecInput: [UInt64: SkippedSite]] = [:]
    init(resolver: Resolver) { self.resolver = resolver }

    /// The site at `offset` that `spec` (a glob) skipped, once `resolve(spec)` ran.
    func skipped(_ spec: ProbeSpecInput, at offset: UInt64) -> SkippedSite? { skippedBySpec[spec]?[offset] }

    func resolve(_ spec: ProbeSpecInput) throws(ResolveError) -> ([ResolvedProbe], [UprobeKey: ResolvedProbe]) {
        if let r = done[spec] { return try r.get() }
        let r: Result<([ResolvedProbe], [UprobeKey: ResolvedProbe]), ResolveError>
        do {
            let resolution = try resolver.resolution(spec)
            let targets = resolution.probes
            if !resolution.skipped.isEmpty {
                skippedBySpec[spec] = Dictionary(resolution.skipped.map { ($0.fileOffset, $0) }, uniquingKeysWith: { a, _ in a })
            }
            var index: [UprobeKey: ResolvedProbe] = [:]
            for t in targets { index[UprobeKey(t)] = t }
            r = .success((targets, index))
        } catch {
            r = .failure(error)
        }
        done[spec] = r
        return try r.get()
    }
}
