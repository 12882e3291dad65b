import Logging
import UprobeCore
import UprobeELF
import UprobeErrors
import UprobeKernel
#if canImport(Glibc)
import Glibc
#endif

/// What a start found in the pin directory and did with it (`status` → `pins`, and the log).
public struct PinSummary: Sendable {
    public var directory: String
    /// Links kept attached and taken over, and the registrations counting in them.
    public var adoptedLinks = 0
    public var adoptedProbes = 0
    /// Registrations to attach again (no pinned link counts for them, or it did not match).
    public var rebuiltProbes = 0
    /// Pinned links no registration owns: detached.
    public var staleLinks = 0
    /// Older links of a make-before-break interrupted by the exit: closed.
    public var handoffsEnded = 0
    /// Adopted links moved to this uprobed's program (it differs from the pinned one).
    public var migratedLinks = 0
    /// Of `adoptedLinks`, the latency (uprobe session) links.
    public var adoptedLatencyLinks = 0
    /// Latency pins removed at start: left without any latency link, or not fitting this
    /// configuration (`latency_capacity` changed); their probes are attached again.
    public var latencyPinsRemoved = 0
    /// The previous `slot_capacity`, when this start resized the pinned counters.
    public var resizedFrom: UInt32?
    /// Named objects (maps, program) adopted and created.
    public var objectsAdopted: [String] = []
    public var objectsCreated: [String] = []
    /// bpffs was mounted by this start at this path.
    public var mounted: String?
    /// How long the reconciliation took.
    public var micros: Int64 = 0
}

/// Reconciles the pin directory with the restored registrations before the engine takes over.
/// Counting links (`links/`) and latency links (`latency/`) are reconciled alike, each kind
/// with its own program; a registration is only ever matched with links of its own kind.
///
/// 1. the older link of every pair a make-before-break left attached (the exit came between
///    the new link's attach and the old one's close) is closed (a latency link once the calls
///    that entered through it have returned, as in any rebuild), then every hand-off is ended;
/// 2. each restored registration whose saved slots are counted by pinned links of the same
///    kind, file (device, inode), pid filter, direction, offset and USDT semaphore is adopted:
///    its counters (and a latency probe's rows) carry on from `baseHits` (and its saved
///    latency base), nothing is attached or reset for it;
/// 3. pinned links no adopted registration counts in are stale: detached and logged (a
///    latency link's rows freed); slots of adopted links that no registration claims are
///    handed to the engine as dead (detached by its next compaction, make-before-break);
/// 4. adopted links running another program than this uprobed's are moved to it
///    make-before-break (an upgrade), so counts stay exact through the move;
/// 5. later links get generations above every adopted one.
public enum PinReconciler {
    /// A pinned link of either kind.
    struct Found {
        var handle: any KernelLink
        var info: UprobeMultiLinkInfo
        var latency: Bool
        var generation: UInt32
        /// The (device, inode) its path names now; for a file unlinked since (an older
        /// version of a followed binary, replaced by rename), the one of the saved site that
        /// claims it (`deletedPath`).
        var file: FileID?
        var slots: [UInt32] { info.cookies.map { UInt32(truncatingIfNeeded: $0) } }
        /// The path the file had, when the kernel reports it unlinked (" (deleted)").
        var deletedPath: String? {
            info.path.hasSuffix(Self.deleted) ? String(info.path.dropLast(Self.deleted.count)) : nil
        }
        static let deleted = " (deleted)"
        /// A path that opens the linked file: its path, or for an unlinked file a process's
        /// `/proc/PID/map_files/…` link to it (found after matching), so that a move to a new
        /// program or a later rebuild of the link can reach the old inode.
        var openPath: String?
    }

    /// `latency`: the latency program, when the start found latency links pinned
    /// (`BPFKernelBackend.openPinnedLatency`).
    public static func reconcile(program: CounterProgram, latency: LatencyProgram? = nil, items: inout [RestoreItem],
                                 saved: SavedState?, logger: Logger) -> (adoption: Adoption, summary: PinSummary) {
        var summary = PinSummary(directory: program.pins?.path ?? "")
        summary.objectsAdopted = program.objects.adopted + (latency?.objects.adopted ?? [])
        summary.objectsCreated = program.objects.created + (latency?.objects.created ?? [])
        summary.mounted = program.pins?.mounted
        let counting = program.pinnedLinks()
        let measuring: (links: [PinnedLatencyLink], unusable: [UnusablePin]) = latency?.pinnedLinks() ?? ([], [])
        for u in counting.unusable + measuring.unusable {
            logger.warning("unusable pin in the pin directory", metadata: ["path": "\(u.path)", "reason": "\(u.reason)",
                                                                             "error_code": "\(ErrorCode.pinStale)"])
        }
        var links = counting.links.map { Found(handle: $0.link, info: $0.info, latency: false, generation: $0.link.generation,
                                               file: fileID($0.info.path)) }
            + measuring.links.map { Found(handle: $0.link, info: $0.info, latency: true, generation: $0.link.generation,
                                          file: fileID($0.info.path)) }
        if let top = links.map(\.generation).max() { program.continueGenerations(above: top) }

        // 1. Interrupted hand-offs: close the older link of every slot held twice.
        var newestBySlot: [UInt32: UInt32] = [:]
        for l in links { for s in l.slots { newestBySlot[s] = max(newestBySlot[s] ?? 0, l.generation) } }
        let superseded = links.filter { l in l.slots.contains { newestBySlot[$0] != l.generation } }
        if !superseded.isEmpty {
            closeLinks(superseded.map(\.handle))
            summary.handoffsEnded = superseded.count
            let gone = Set(superseded.map(\.generation))
            links.removeAll { gone.contains($0.generation) }
            logger.notice("ended make-before-break hand-offs interrupted by the last exit",
                          metadata: ["older_links_closed": "\(superseded.count)"])
        }
        if !links.isEmpty {
            do throws(KernelError) {
                try program.endAllHandoffs(slots: links.flatMap(\.slots))
                try latency?.endAllHandoffs()
            } catch {
                logger.error("clearing hand-off state failed", metadata: ["error": "\(error.message)"])
            }
        }

        // 2. Match registrations to pinned sites, slot by slot.
        struct Site { var link: Int; var offset: UInt64; var refCtr: UInt64 }
        var siteOfSlot: [UInt32: Site] = [:]
        for (i, l) in links.enumerated() {
            for (k, slot) in l.slots.enumerated() {
                siteOfSlot[slot] = Site(link: i, offset: l.info.offsets[k], refCtr: l.info.refCtrOffsets[k])
            }
        }
        let savedByID = Dictionary((saved?.probes ?? []).map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var claimed = Set<UInt32>()
        var linkUsed = [Bool](repeating: false, count: links.count)
        for i in items.indices where items[i].degradedReason == nil {
            guard let p = savedByID[items[i].id], let slots = p.slots, slots.count == items[i].targets.count,
                  !links.isEmpty else {
                summary.rebuiltProbes += 1
                continue
            }
            let item = items[i]
            let older = p.olderSites ?? []
            // Every site must match, those in older file versions included (else it is attached
            // again at its current file, as a registration that was never followed).
            var files: [Int: FileID] = [:]  // links of unlinked files, claimed here
            func match(_ t: ResolvedProbe, _ slot: UInt32) -> Bool {
                guard !claimed.contains(slot), let site = siteOfSlot[slot] else { return false }
                let l = links[site.link]
                let want = FileID(device: t.device, inode: t.inode)
                if let file = l.file ?? files[site.link] {
                    guard file == want else { return false }
                } else {
                    // An unlinked file: the saved site's path, and not the file at that path now.
                    guard let was = l.deletedPath, was == t.path, fileID(t.path) != want else { return false }
                    files[site.link] = want
                }
                return l.latency == item.spec.latency
                    && l.info.pid == (item.spec.pid ?? 0) && l.info.retprobe == item.spec.retprobe
                    && site.offset == t.fileOffset && site.refCtr == (t.refCtrOffset ?? 0)
            }
            let matches = zip(item.targets, slots).allSatisfy(match) && older.allSatisfy { match($0.target, $0.slot) }
            guard matches else {
                summary.rebuiltProbes += 1
                continue
            }
            for (link, file) in files { links[link].file = file }
            for s in slots + older.map(\.slot) {
                claimed.insert(s)
                if let site = siteOfSlot[s] { linkUsed[site.link] = true }
            }
            items[i].adoptedSlots = slots
            items[i].adoptedOlderSites = older.map { ProbeSite(target: $0.target, slot: $0.slot) }
            items[i].baseHits = p.baseHits
            // The rows kept measuring what came after the base (calls while down included).
            if item.spec.latency { items[i].baseLatency = p.latencyBase }
            summary.adoptedProbes += 1
        }

        // Unlinked files of adopted links are reached through a process that maps them.
        let unlinked = links.indices.filter { linkUsed[$0] && links[$0].deletedPath != nil }
        if !unlinked.isEmpty {
            let found = mappedFiles(unlinked.compactMap { links[$0].file })
            for i in unlinked { links[i].openPath = links[i].file.flatMap { found[$0] } }
        }

        // 3. Stale links: no adopted registration counts in them.
        let stale = links.indices.filter { !linkUsed[$0] }
        for i in stale {
            logger.warning("detaching a pinned link no registration owns", metadata: [
                "pin": "\((links[i].handle as? UprobeMultiLink)?.pinPath ?? (links[i].handle as? LatencyLink)?.pinPath ?? "")", "path": "\(links[i].info.path)", "probes": "\(links[i].info.offsets.count)",
                "latency": "\(links[i].latency)", "error_code": "\(ErrorCode.pinStale)"])
        }
        closeLinks(stale.map { links[$0].handle })
        // Their rows are free again (zeroed): no link measures into them now.
        latency?.release(slots: stale.filter { links[$0].latency }.flatMap { links[$0].slots })
        summary.staleLinks = stale.count

        // 4. Adopted links on another program move to this one, make-before-break.
        var kept = links.indices.filter { linkUsed[$0] }.map { links[$0] }
        let old = kept.indices.filter { i in
            kept[i].latency ? kept[i].info.programID != latency?.programID : kept[i].info.programID != program.programID
        }
        if !old.isEmpty {
            let slots = old.flatMap { kept[$0].slots }
            var moved: [any KernelLink] = []
            do {
                try program.setOverlap(true, slots: slots)
                for i in old {
                    let l = kept[i]
                    do {
                        guard let file = l.file, let pinned = try PinnedBinary.open(l.openPath ?? l.info.path, expecting: file) else {
                            throw KernelError(code: .fileChanged, message: "\(l.info.path) cannot be opened as the linked file")
                        }
                        let refs = l.info.refCtrOffsets.contains { $0 != 0 } ? l.info.refCtrOffsets : nil
                        let fresh: any KernelLink
                        if l.latency, let latency {
                            fresh = try latency.attach(path: pinned.kernelPath, offsets: l.info.offsets, refCtrOffsets: refs,
                                                       slots: l.slots, pid: l.info.pid == 0 ? nil : l.info.pid)
                        } else {
                            fresh = try program.attach(path: pinned.kernelPath, offsets: l.info.offsets, refCtrOffsets: refs,
                                                       slots: l.slots, pid: l.info.pid == 0 ? nil : l.info.pid, retprobe: l.info.retprobe)
                        }
                        moved.append(l.handle)
                        kept[i].handle = fresh
                    } catch {
                        logger.error("moving a pinned link to the new \(l.latency ? "latency" : "counting") program failed; it keeps the old one",
                                     metadata: ["path": "\(l.info.path)", "error": "\(error)"])
                    }
                }
                // The old links are older than their replacements: closing them keeps the
                // invariant (a latency link first lets the calls that entered through it return).
                closeLinks(moved)
                try program.endAllHandoffs(slots: slots)
                try latency?.endAllHandoffs()
            } catch {
                logger.error("moving pinned links to the new program failed", metadata: ["error": "\(error)"])
            }
            summary.migratedLinks = moved.count
            logger.notice("program changed: moved pinned links to it make-before-break", metadata: [
                "links": "\(moved.count)",
                "old_program_id": "\(program.replacedProgramID.map(String.init) ?? "")",
                "program_id": "\(program.programID)",
                "old_latency_program_id": "\(latency?.replacedProgramID.map(String.init) ?? "")",
                "latency_program_id": "\(latency.map { String($0.programID) } ?? "")"])
        }

        // 4b. `slot_capacity` changed: the adopted links were moved to counters of the new size
        // (step 4: the program that uses them is new). What each slot counted in the old map,
        // read now that no link counts there, joins its registration's base; so does a
        // registration attached again (a slot beyond a smaller capacity), whose total is then
        // exact up to this start instead of up to the last save.
        if let from = program.resizedFrom {
            summary.resizedFrom = from
            let stillOld = kept.filter { !$0.latency && $0.info.programID != program.programID }
            if !stillOld.isEmpty {
                logger.error("links still count into the counters of the previous slot_capacity; their hits from now on are lost",
                             metadata: ["links": "\(stillOld.count)"])
            }
            for i in items.indices {
                guard let p = savedByID[items[i].id], let slots = p.slots, !items[i].ended else { continue }
                let counts = (slots + (p.olderSites ?? []).map(\.slot)).map { program.resizedCount(slot: $0) }
                guard counts.allSatisfy({ $0 != nil }) else { continue }
                items[i].baseHits = counts.reduce(p.baseHits) { $0 &+ ($1 ?? 0) }
            }
            program.dropResizedMaps()
            logger.notice("slot_capacity changed: pinned links moved to counters of the new size, their counts carried over",
                          metadata: ["from": "\(from)", "to": "\(program.capacity)", "links": "\(summary.migratedLinks)"])
        }

        // 5. Hand the adopted links to the engine.
        var adoption = Adoption()
        for l in kept {
            guard let file = l.file else { continue }
            let sites = zip(l.info.offsets, zip(l.info.refCtrOffsets, l.slots)).map { off, rs in
                LinkSite(offset: off, refCtrOffset: rs.0 == 0 ? nil : rs.0, slot: rs.1)
            }
            adoption.links.append(AdoptedLink(file: file, pid: l.info.pid, retprobe: l.info.retprobe, path: l.openPath ?? l.info.path,
                                              sites: sites, handle: l.handle, latency: l.latency))
            adoption.deadSlots += l.slots.filter { !claimed.contains($0) }
        }
        summary.adoptedLinks = adoption.links.count
        summary.adoptedLatencyLinks = adoption.links.filter(\.latency).count
        return (adoption, summary)
    }

    /// Closes links of both kinds so that they share grace periods (latency links drain first).
    static func closeLinks(_ links: [any KernelLink]) {
        LinkCloser.closeAll(links.compactMap { $0 as? UprobeMultiLink }, latency: links.compactMap { $0 as? LatencyLink })
    }

    /// For each of `files`, a `/proc/PID/map_files/START-END` link of a process that maps it
    /// (opening it reaches that inode even once it is unlinked); files no process maps are left out.
    static func mappedFiles(_ files: [FileID]) -> [FileID: String] {
        var wanted: [String: FileID] = [:]
        for f in files { wanted[PathWatcher.mapsKey(device: f.device, inode: f.inode)] = f }
        var out: [FileID: String] = [:]
        guard let dir = opendir("/proc") else { return out }
        defer { closedir(dir) }
        while out.count < wanted.count, let entry = readdir(dir) {
            let pid = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            guard let first = pid.utf8.first, first >= 0x30 && first <= 0x39,
                  let bytes = readWholeFile("/proc/\(pid)/maps", limit: 64 << 20) else { continue }
            for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
                // address perms offset dev inode [path]
                let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
                let dev = fields.count >= 5 ? fields[3].split(separator: ":") : []
                guard dev.count == 2, let major = UInt64(dev[0], radix: 16), let minor = UInt64(dev[1], radix: 16),
                      let file = wanted["\(String(major, radix: 16)):\(String(minor, radix: 16)):\(fields[4])"], out[file] == nil else { continue }
                out[file] = "/proc/\(pid)/map_files/\(fields[0])"
            }
        }
        return out
    }

    /// The (device, inode) of the file a link's path names now; nil when it was deleted (the
    /// kernel appends " (deleted)") or cannot be stat'ed.
    static func fileID(_ path: String) -> FileID? {
        guard !path.hasSuffix(" (deleted)") else { return nil }
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return FileID(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }
}
