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
    /// Named objects (maps, program) adopted and created.
    public var objectsAdopted: [String] = []
    public var objectsCreated: [String] = []
    /// bpffs was mounted by this start at this path.
    public var mounted: String?
    /// How long the reconciliation took.
    public var micros: Int64 = 0
}

/// Reconciles the pin directory with the restored registrations before the engine takes over:
///
/// 1. the older link of every pair a make-before-break left attached (the exit came between
///    the new link's attach and the old one's close) is closed, then every hand-off is ended;
/// 2. each restored registration whose saved slots are counted by pinned links of the same
///    file (device, inode), pid filter, direction, offset and USDT semaphore is adopted: its
///    counters carry on from `baseHits`, nothing is attached or reset for it;
/// 3. pinned links no adopted registration counts in are stale: detached and logged;
///    slots of adopted links that no registration claims are handed to the engine as dead
///    (detached by its next compaction, make-before-break);
/// 4. adopted links running another program than this uprobed's are moved to it
///    make-before-break (an upgrade), so counts stay exact through the move;
/// 5. later links get generations above every adopted one.
public enum PinReconciler {
    public static func reconcile(program: CounterProgram, items: inout [RestoreItem], saved: SavedState?,
                                 logger: Logger) -> (adoption: Adoption, summary: PinSummary) {
        var summary = PinSummary(directory: program.pins?.path ?? "")
        summary.objectsAdopted = program.objects.adopted
        summary.objectsCreated = program.objects.created
        summary.mounted = program.pins?.mounted
        let found = program.pinnedLinks()
        for u in found.unusable {
            logger.warning("unusable pin in the pin directory", metadata: ["path": "\(u.path)", "reason": "\(u.reason)",
                                                                             "error_code": "\(ErrorCode.pinStale)"])
        }
        var links = found.links
        if let top = links.map(\.link.generation).max() { program.continueGenerations(above: top) }

        // 1. Interrupted hand-offs: close the older link of every slot held twice.
        var newestBySlot: [UInt32: UInt32] = [:]
        for l in links { for s in l.slots { newestBySlot[s] = max(newestBySlot[s] ?? 0, l.link.generation) } }
        let superseded = links.filter { l in l.slots.contains { newestBySlot[$0] != l.link.generation } }
        if !superseded.isEmpty {
            LinkCloser.closeAll(superseded.map(\.link))
            summary.handoffsEnded = superseded.count
            let gone = Set(superseded.map(\.link.generation))
            links.removeAll { gone.contains($0.link.generation) }
            logger.notice("ended make-before-break hand-offs interrupted by the last exit",
                          metadata: ["older_links_closed": "\(superseded.count)"])
        }
        if !links.isEmpty {
            do { try program.endAllHandoffs(slots: links.flatMap(\.slots)) } catch {
                logger.error("clearing hand-off state failed", metadata: ["error": "\(error.message)"])
            }
        }

        // 2. Match registrations to pinned sites, slot by slot.
        struct Site { var link: Int; var offset: UInt64; var refCtr: UInt64 }
        var siteOfSlot: [UInt32: Site] = [:]
        var fileOfLink: [FileID?] = []
        for (i, l) in links.enumerated() {
            fileOfLink.append(fileID(l.info.path))
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
            let matches = zip(item.targets, slots).allSatisfy { t, slot in
                guard !claimed.contains(slot), let site = siteOfSlot[slot], let file = fileOfLink[site.link] else { return false }
                let l = links[site.link].info
                return file == FileID(device: t.device, inode: t.inode) && l.pid == (item.spec.pid ?? 0)
                    && l.retprobe == item.spec.retprobe && site.offset == t.fileOffset && site.refCtr == (t.refCtrOffset ?? 0)
            }
            guard matches else {
                summary.rebuiltProbes += 1
                continue
            }
            for s in slots {
                claimed.insert(s)
                if let site = siteOfSlot[s] { linkUsed[site.link] = true }
            }
            items[i].adoptedSlots = slots
            items[i].baseHits = p.baseHits
            summary.adoptedProbes += 1
        }

        // 3. Stale links: no adopted registration counts in them.
        let stale = links.indices.filter { !linkUsed[$0] }
        for i in stale {
            logger.warning("detaching a pinned link no registration owns", metadata: [
                "pin": "\(links[i].link.pinPath ?? "")", "path": "\(links[i].info.path)", "probes": "\(links[i].info.offsets.count)",
                "error_code": "\(ErrorCode.pinStale)"])
        }
        LinkCloser.closeAll(stale.map { links[$0].link })
        summary.staleLinks = stale.count

        // 4. Adopted links on another program move to this one, make-before-break.
        var kept = links.indices.filter { linkUsed[$0] }.map { (link: links[$0].link, info: links[$0].info, file: fileOfLink[$0]) }
        let old = kept.indices.filter { kept[$0].info.programID != program.programID }
        if !old.isEmpty {
            let slots = old.flatMap { kept[$0].info.cookies.map { UInt32(truncatingIfNeeded: $0) } }
            var moved: [UprobeMultiLink] = []
            do {
                try program.setOverlap(true, slots: slots)
                for i in old {
                    let l = kept[i]
                    do {
                        guard let file = l.file, let pinned = try PinnedBinary.open(l.info.path, expecting: file) else {
                            throw KernelError(code: .fileChanged, message: "\(l.info.path) cannot be opened as the linked file")
                        }
                        let fresh = try program.attach(path: pinned.kernelPath, offsets: l.info.offsets,
                                                       refCtrOffsets: l.info.refCtrOffsets.contains { $0 != 0 } ? l.info.refCtrOffsets : nil,
                                                       slots: l.info.cookies.map { UInt32(truncatingIfNeeded: $0) },
                                                       pid: l.info.pid == 0 ? nil : l.info.pid, retprobe: l.info.retprobe)
                        moved.append(l.link)
                        kept[i].link = fresh
                    } catch {
                        logger.error("moving a pinned link to the new counting program failed; it keeps the old one",
                                     metadata: ["path": "\(l.info.path)", "error": "\(error)"])
                    }
                }
                // The old links are older than their replacements: closing them keeps the invariant.
                LinkCloser.closeAll(moved)
                try program.endAllHandoffs(slots: slots)
            } catch {
                logger.error("moving pinned links to the new counting program failed", metadata: ["error": "\(error)"])
            }
            summary.migratedLinks = moved.count
            logger.notice("counting program changed: moved pinned links to it make-before-break",
                          metadata: ["links": "\(moved.count)", "old_program_id": "\(program.replacedProgramID.map(String.init) ?? "")",
                                     "program_id": "\(program.programID)"])
        }

        // 5. Hand the adopted links to the engine.
        var adoption = Adoption()
        for l in kept {
            guard let file = l.file else { continue }
            let slots = l.info.cookies.map { UInt32(truncatingIfNeeded: $0) }
            let sites = zip(l.info.offsets, zip(l.info.refCtrOffsets, slots)).map { off, rs in
                LinkSite(offset: off, refCtrOffset: rs.0 == 0 ? nil : rs.0, slot: rs.1)
            }
            adoption.links.append(AdoptedLink(file: file, pid: l.info.pid, retprobe: l.info.retprobe, path: l.info.path,
                                              sites: sites, handle: l.link))
            adoption.deadSlots += slots.filter { !claimed.contains($0) }
        }
        summary.adoptedLinks = adoption.links.count
        return (adoption, summary)
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
