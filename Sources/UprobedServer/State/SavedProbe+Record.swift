import UprobeCore
import UprobeELF
import UprobeKernel
import UprobedProtocol

/// What identified a registration when it was first saved: its first target's file and, with a
/// `pid` filter, its process's start time. Later saves carry them unchanged, so that a restart
/// compares the binary and the process with those of the registration (`RestorePlanner`), not
/// with whatever was there at the last save.
struct ProbeStamps: Sendable, Hashable {
    var file: FileStamp?
    var processStart: UInt64?
}

extension ProbeStamps {
    /// The stamps of `r` saved for the first time: its first target's file (if that is still
    /// the file it was resolved in) and, with a `pid` filter, the process's start time. Used
    /// by every save and by runs encoded ahead, so both stamp alike.
    init(firstSave r: ProbeRecord, files: inout FileStampCache) {
        file = r.firstTarget.flatMap { files.stamp(of: $0) }
        processStart = r.spec.pid.flatMap { processStartTime($0) }
    }
}

/// Files stamped during one write, by path: a batch of 10,000 probes on one binary stats it once.
struct FileStampCache {
    private var byPath: [String: FileStamp?] = [:]

    /// The stamp of `t`'s file as it is now, nil unless it is still `t`'s device and inode.
    mutating func stamp(of t: ResolvedProbe) -> FileStamp? {
        let s: FileStamp?
        if let known = byPath[t.path] { s = known } else {
            s = fileStamp(t.path)
            byPath[t.path] = s
        }
        return s.flatMap { $0.device == t.device && $0.inode == t.inode ? $0 : nil }
    }
}

extension SavedProbe {
    /// `r` as the state files keep it, with `hits` as its count.
    init(_ r: ProbeRecord, hits: UInt64, stamps: ProbeStamps) {
        var degraded: String? = nil, ended: String? = nil
        switch r.state {
        case .active: break
        case .degraded(let why): degraded = why
        case .ended(let why): ended = why
        }
        self.init(id: r.id, consumer: r.consumer, owner: r.owner, spec: r.spec, registeredAt: r.registeredAt,
                  hits: hits, targets: r.targets, stamp: stamps.file, pidStartTime: stamps.processStart,
                  degradedReason: degraded, endedReason: ended, probeSet: r.probeSet)
        latency = r.latency { _ in nil }   // its saved base; the caller adds what the kernel holds
        retired = r.retired
        if let split = Self.slots(of: r) {
            slots = split.slots
            if !split.older.isEmpty { olderSites = split.older }
        }
        if slots != nil {
            baseHits = r.baseHits
            if r.spec.latency, let base = r.baseLatency, base.calls != 0 { latencyBase = base }
        }
    }

    /// The slot of each of `r`'s targets (one site per target), and its other sites: those of a
    /// followed registration in older file versions. nil when some target has no site (a
    /// degraded or ended registration): a restart attaches it again, if at all.
    /// A latency probe's slots name its rows too (the pinned `lat_row_of` map keeps which).
    static func slots(of r: ProbeRecord) -> (slots: [UInt32], older: [SavedSite])? {
        guard !r.sites.isEmpty else { return nil }
        if r.sites.count == r.targetCount {
            // The common case: sites are the targets, in order.
            var out: [UInt32] = []
            out.reserveCapacity(r.sites.count)
            for (s, t) in zip(r.sites, r.targets) {
                guard s.target.device == t.device, s.target.inode == t.inode, s.target.fileOffset == t.fileOffset else { break }
                out.append(s.slot)
            }
            if out.count == r.sites.count { return (out, []) }
        }
        struct Key: Hashable { var device: UInt64; var inode: UInt64; var offset: UInt64 }
        var current: [Key: Int] = [:]
        for (i, t) in r.targets.enumerated() { current[Key(device: t.device, inode: t.inode, offset: t.fileOffset)] = i }
        var slots = [UInt32?](repeating: nil, count: r.targets.count)
        var older: [SavedSite] = []
        for s in r.sites {
            if let i = current[Key(device: s.target.device, inode: s.target.inode, offset: s.target.fileOffset)], slots[i] == nil {
                slots[i] = s.slot
            } else {
                older.append(SavedSite(target: s.target, slot: s.slot))
            }
        }
        let found = slots.compactMap { $0 }
        return found.count == r.targets.count ? (found, older) : nil
    }
}

extension StatePersister {
    /// `r` as saved, stamped from `stamps` (the registration's first stamps, entered there
    /// when it has none yet).
    static func saved(_ r: ProbeRecord, hits: UInt64, stamps: inout StampBook,
                      files: inout FileStampCache) -> SavedProbe {
        let known = stamps[record: r]
        var own = known ?? ProbeStamps(firstSave: r, files: &files)
        // A registration that followed its path to a new file is stamped with that file.
        if let t = r.firstTarget, let was = own.file, was.device != t.device || was.inode != t.inode {
            own.file = files.stamp(of: t)
        }
        if own != known { stamps[record: r] = own }
        return SavedProbe(r, hits: hits, stamps: own)
    }

    /// Every registration of `snapshot` as the snapshot file keeps it, with its hit total
    /// (and a latency probe's histogram).
    static func savedProbes(_ snapshot: RegistrySnapshot, counts: KernelCounts,
                            stamps: inout StampBook) -> [SavedProbe] {
        var files = FileStampCache()
        let hits = counts.hits
        return snapshot.sortedProbes.map { r in
            let total = r.sites.reduce(r.baseHits) { acc, s in acc &+ (Int(s.slot) < hits.count ? hits[Int(s.slot)] : 0) }
            var p = saved(r, hits: total, stamps: &stamps, files: &files)
            p.latency = r.latency { counts.latency[$0] }
            return p
        }
    }
}

/// The kernel's counts as one save writes them: hits of every slot up to the high-water mark,
/// and the histograms of latency probes' slots, read together.
struct KernelCounts: Sendable {
    var hits: [UInt64] = []
    var latency: [UInt32: LatencyHistogram] = [:]

    static func read(_ kernel: any KernelBackend, _ snapshot: RegistrySnapshot) throws(KernelError) -> KernelCounts {
        var c = KernelCounts()
        // Histograms first: a call counted in them has been counted in `hits` already.
        for r in snapshot.probes.values where r.spec.latency {
            for s in r.sites { c.latency[s.slot] = kernel.readLatency(slot: s.slot) }
        }
        c.hits = try kernel.readCounters(upTo: snapshot.slotHighWater)
        return c
    }
}

/// New records as a group's columns (`StateCodec.writeGroup`), written ahead of their attach:
/// each one's hits are its base hits, as `SavedProbe(r, hits: r.baseHits, stamps:)` has them.
struct RecordColumns: GroupColumns {
    let records: [ProbeRecord]
    let base: Int
    let count: Int
    var indices: Range<Int> { 0..<count }
    func id(_ i: Int) -> String { records[base + i].id }
    func idNumber(_ i: Int) -> UInt64? { records[base + i].number }
    func writeSymbol(_ i: Int, into w: inout JSONWriter) {
        if let t = records[base + i].firstTarget { StateCodec.writeSymbol(of: t, into: &w) } else { w.string("") }
    }
    func offset(_ i: Int) -> UInt64 { records[base + i].firstTarget?.fileOffset ?? 0 }
    func slot(_ i: Int) -> UInt32? { StateCodec.slot(of: records[base + i]) }
    func hits(_ i: Int) -> UInt64 { records[base + i].baseHits }
    func baseHits(_ i: Int) -> UInt64 { slot(i) == nil ? 0 : records[base + i].baseHits }
    func aliases(_ i: Int) -> [String] { records[base + i].firstTarget?.aliases ?? [] }
}

extension StateCodec {
    /// `encodeElements` of new records' saved form (`SavedProbe(r, hits: r.baseHits, stamps:)`),
    /// the same bytes, without making a saved registration per record: for the 241,362 records
    /// of a whole binary, making, comparing and releasing those was half of the encoding's
    /// time. Groups are found on the records (`sameShape`, the record-side `sameGroupShape`);
    /// a run with a registration that is not an active counting one is encoded the long way.
    static func encodeElements(records: [ProbeRecord], stamps: [ProbeStamps]) -> [UInt8] {
        func saved(_ k: Int) -> SavedProbe { SavedProbe(records[k], hits: records[k].baseHits, stamps: stamps[k]) }
        guard stamps.count == records.count,
              records.allSatisfy({ $0.state == .active && !$0.spec.latency && $0.baseLatency == nil }) else {
            return encodeElements(records.indices.map(saved))
        }
        var size = 1024
        for r in records { size += r.targetCount == 1 ? bytesPerMember + (r.firstTarget?.symbolByteCount ?? 0) : bytesPerProbe }
        var w = JSONWriter(reservingCapacity: size)
        w.beginArray()  // for the commas between elements; its bracket is dropped
        _ = w.flush()
        var i = 0
        while i < records.count {
            var end = i + 1
            if isMember(records[i]) {
                while end < records.count, isMember(records[end]), sameShape(records[i], stamps[i], records[end], stamps[end]) { end += 1 }
            }
            if end - i > 1 {
                writeGroup(first: saved(i), RecordColumns(records: records, base: i, count: end - i), into: &w)
            } else {
                writeProbe(saved(i), into: &w)
            }
            i = end
        }
        return w.flush()
    }

    /// `isGroupMember` of an active counting record's saved form.
    static func isMember(_ r: ProbeRecord) -> Bool {
        r.targetCount == 1 && r.spec.symbol != nil && r.spec.offset == nil && r.spec.usdt == nil && r.firstTarget?.refCtrOffset == nil
    }

    /// `SavedProbe.slots(of:)` of a one-target record, without making the array.
    static func slot(of r: ProbeRecord) -> UInt32? {
        guard r.sites.count == 1, r.targetCount == 1, let t = r.firstTarget else { return nil }
        let s = r.sites[0].target
        return s.device == t.device && s.inode == t.inode && s.fileOffset == t.fileOffset ? r.sites[0].slot : nil
    }

    /// `sameGroupShape` of two active counting records' saved forms (`isMember` holds for both).
    static func sameShape(_ a: ProbeRecord, _ sa: ProbeStamps, _ b: ProbeRecord, _ sb: ProbeStamps) -> Bool {
        // `firstTarget`: a record's `targets` is made on demand (see ProbeRecord).
        guard let ta = a.firstTarget, let tb = b.firstTarget else { return false }
        // On the name's bytes: a String made from each target's name was an allocation per record.
        let each = ta.symbolIs(a.spec.symbol)
        return a.consumer == b.consumer && a.owner == b.owner && a.registeredAt == b.registeredAt && sa == sb
            && a.probeSet == b.probeSet
            && a.spec.path == b.spec.path && a.spec.pid == b.spec.pid && a.spec.retprobe == b.spec.retprobe
            && a.spec.force == b.spec.force && a.spec.follow == b.spec.follow && a.spec.latency == b.spec.latency
            && ta.path == tb.path && ta.device == tb.device
            && ta.inode == tb.inode && ta.buildID == tb.buildID
            && (slot(of: a) == nil) == (slot(of: b) == nil)
            && each == tb.symbolIs(b.spec.symbol) && (each || a.spec.symbol == b.spec.symbol)
    }
}
