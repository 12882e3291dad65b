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
    /// by every save; runs encoded ahead take the same stamps once per request and file
    /// (`RecordTable`), so both stamp alike.
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

/// New records as read once for their encoding: each one's first target's columns and its
/// counter slot. `firstTarget` copies a target (its file, symbol and details retained and
/// released), and so does reading an element of an array of targets: done per column and per
/// comparison, as before, it was most of the time of encoding the 241,362 records of a whole
/// binary (400 ms on the second CPU, longer than the kernel's attach), the more so as every
/// target of a resolution retains one shared file object, which the writer's CPU retains
/// and releases meanwhile too. Here each record's target is copied once.
struct RecordTable {
    let records: [ProbeRecord]
    /// Each record's first target, whose name is read in place (`symbolIs`, `withSymbolUTF8`)
    /// and made into a String only where a line holds it: a String per record was a third
    /// of a whole binary's table, whose names go to a names file that a glob registered again
    /// reuses without reading them.
    let firstTargets: [ResolvedProbe?]
    let offsets: [UInt64]
    /// Aliases of the records that have some.
    let aliases: [Int: [String]]
    /// The index of each record's first target's file among `files` (-1: no target).
    let fileIndex: [Int32]
    let files: [ResolvedFile]
    /// Whether the first target can be a group member's (`isMember`): it has a symbol, no
    /// USDT semaphore, and it is the record's only target.
    let memberTarget: [Bool]
    let slots: [UInt32?]
    /// `ProbeStamps(firstSave:files:)` of each record when made with `stamping` (else empty),
    /// taken once per request and file: the records of one request on one binary share them.
    let stamps: [ProbeStamps]

    init(_ records: [ProbeRecord], stamping: Bool = false) {
        self.records = records
        let n = records.count
        var firstTargets: [ResolvedProbe?] = [], offsets: [UInt64] = [], aliases: [Int: [String]] = [:]
        var fileIndex: [Int32] = [], files: [ResolvedFile] = [], memberTarget: [Bool] = []
        var slots: [UInt32?] = [], stamps: [ProbeStamps] = []
        firstTargets.reserveCapacity(n); offsets.reserveCapacity(n); fileIndex.reserveCapacity(n)
        memberTarget.reserveCapacity(n); slots.reserveCapacity(n)
        if stamping { stamps.reserveCapacity(n) }
        var stampFiles = FileStampCache()
        var last: (record: ProbeRecord, file: Int32, stamps: ProbeStamps)?
        for (k, r) in records.enumerated() {
            guard let t = r.firstTarget else {
                firstTargets.append(nil); offsets.append(0); fileIndex.append(-1); memberTarget.append(false); slots.append(nil)
                if stamping { stamps.append(ProbeStamps(file: nil, processStart: r.spec.pid.flatMap { processStartTime($0) })) }
                continue
            }
            firstTargets.append(t)
            offsets.append(t.fileOffset)
            let a = t.aliases
            if !a.isEmpty { aliases[k] = a }
            let f: Int32
            if let i = files.indices.last, files[i] === t.file || files[i] == t.file { f = Int32(i) } else if let i = files.firstIndex(of: t.file) {
                f = Int32(i)
            } else {
                f = Int32(files.count)
                files.append(t.file)
            }
            fileIndex.append(f)
            memberTarget.append(t.hasSymbol && t.refCtrOffset == nil && r.targetCount == 1)
            slots.append(StateCodec.slot(of: r, first: t))
            guard stamping else { continue }
            if let l = last, l.file == f, r.sameRequest(as: l.record) {
                stamps.append(l.stamps)
            } else {
                let s = ProbeStamps(file: stampFiles.stamp(of: t), processStart: r.spec.pid.flatMap { processStartTime($0) })
                last = (r, f, s)
                stamps.append(s)
            }
        }
        (self.firstTargets, self.offsets, self.aliases, self.fileIndex, self.files) = (firstTargets, offsets, aliases, fileIndex, files)
        (self.memberTarget, self.slots, self.stamps) = (memberTarget, slots, stamps)
    }
}

extension RecordTable {
    /// Whether record k's first target's symbol is `name` (both nil: no target, or no name, and
    /// no name asked for), as `firstTarget?.symbol == name` without making the String.
    func symbolIs(_ k: Int, _ name: String?) -> Bool {
        guard let t = firstTargets[k] else { return name == nil }
        return t.symbolIs(name)
    }
}

/// New records as a group's columns (`StateCodec.writeGroup`), written ahead of their attach:
/// each one's hits are its base hits, as `SavedProbe(r, hits: r.baseHits, stamps:)` has them.
struct RecordColumns: GroupColumns {
    let table: RecordTable
    let base: Int
    let count: Int
    var indices: Range<Int> { 0..<count }
    var freshlyResolved: Bool { true }
    func id(_ i: Int) -> String { table.records[base + i].id }
    func idNumber(_ i: Int) -> UInt64? { table.records[base + i].number }
    func symbol(_ i: Int) -> String? { table.firstTargets[base + i]?.symbol }
    func offset(_ i: Int) -> UInt64 { table.offsets[base + i] }
    func slot(_ i: Int) -> UInt32? { table.slots[base + i] }
    func hits(_ i: Int) -> UInt64 { table.records[base + i].baseHits }
    func baseHits(_ i: Int) -> UInt64 { slot(i) == nil ? 0 : table.records[base + i].baseHits }
    func aliases(_ i: Int) -> [String] { table.aliases[base + i] ?? [] }
}

extension StateCodec {
    /// `encodeElements` of new records' saved form (`SavedProbe(r, hits: r.baseHits, stamps:)`),
    /// the same bytes, without making a saved registration per record: for the 241,362 records
    /// of a whole binary, making, comparing and releasing those was half of the encoding's
    /// time. Groups are found on the records (`sameShape`, the record-side `sameGroupShape`);
    /// a run with a registration that is not an active counting one is encoded the long way.
    /// With `names`, a glob group's names go to a names file (`NameFiles`).
    static func encodeElements(records: [ProbeRecord], stamps: [ProbeStamps], names: NameRefs? = nil) -> [UInt8] {
        encodeElements(RecordTable(records), stamps: stamps, names: names)
    }

    /// `encodeElements(records:stamps:names:)` of records read already.
    static func encodeElements(_ table: RecordTable, stamps: [ProbeStamps], names: NameRefs? = nil) -> [UInt8] {
        let records = table.records
        func saved(_ k: Int) -> SavedProbe { SavedProbe(records[k], hits: records[k].baseHits, stamps: stamps[k]) }
        guard stamps.count == records.count,
              records.allSatisfy({ $0.state == .active && !$0.spec.latency && $0.baseLatency == nil }) else {
            var w = JSONWriter(reservingCapacity: 1024 + records.count * bytesPerProbe)
            w.beginArray()  // for the commas between elements; its bracket is dropped
            _ = w.flush()
            writeProbes(records.indices.map(saved), names: names, into: &w)
            return w.flush()
        }
        var member = [Bool](repeating: false, count: records.count)
        var specFits = false
        for k in records.indices {
            // A request's records share their spec: judged once per request, not copied per record.
            if k == 0 || !records[k].sameRequest(as: records[k - 1]) { specFits = isMember(spec: records[k].spec) }
            member[k] = specFits && table.memberTarget[k]
        }
        // Without names in the line, a member takes its offset, id and slot: ~40 bytes.
        var size = 1024
        for k in records.indices {
            size += records[k].targetCount != 1 ? bytesPerProbe
                : bytesPerMember + (names == nil ? (table.firstTargets[k]?.symbolByteCount ?? 0) : 0)
        }
        var w = JSONWriter(reservingCapacity: size)
        w.beginArray()  // for the commas between elements; its bracket is dropped
        _ = w.flush()
        var i = 0
        while i < records.count {
            var end = i + 1
            if member[i] {
                let specSymbol = records[i].spec.symbol
                let each = table.symbolIs(i, specSymbol)
                while end < records.count, member[end],
                      sameShape(table, i, stamps[i], specSymbol: specSymbol, each: each, end, stamps[end]) { end += 1 }
            }
            if end - i > 1 {
                writeGroup(first: saved(i), RecordColumns(table: table, base: i, count: end - i), names: names, into: &w)
            } else {
                writeProbe(saved(i), into: &w)
            }
            i = end
        }
        return w.flush()
    }

    /// The spec's part of `isGroupMember` (`RecordTable.memberTarget` is the target's).
    static func isMember(spec: ProbeSpecInput) -> Bool { spec.symbol != nil && spec.offset == nil && spec.usdt == nil }

    /// `SavedProbe.slots(of:)` of a one-target record (`first`: its first target), without
    /// making the array.
    static func slot(of r: ProbeRecord, first: ResolvedProbe?) -> UInt32? {
        guard r.sites.count == 1, r.targetCount == 1, let t = first else { return nil }
        let s = r.sites[0]
        return s.target.device == t.device && s.target.inode == t.inode && s.target.fileOffset == t.fileOffset ? s.slot : nil
    }

    /// `sameGroupShape` of two active counting records' saved forms (`isMember` holds for both).
    /// `specSymbol`: `a`'s spec symbol; `each`: whether it is its target's own (`eachSymbol`).
    static func sameShape(_ table: RecordTable, _ i: Int, _ sa: ProbeStamps, specSymbol: String?, each: Bool,
                          _ k: Int, _ sb: ProbeStamps) -> Bool {
        let a = table.records[i], b = table.records[k]
        guard table.fileIndex[i] >= 0, table.fileIndex[i] == table.fileIndex[k], sa == sb,
              (table.slots[i] == nil) == (table.slots[k] == nil) else { return false }
        if a.sameRequest(as: b) {
            // Same spec: a glob's spec symbol is no function's name, so only a request that
            // named its functions has `each`, and then every member's symbol is its spec's.
            return each == table.symbolIs(k, specSymbol)
        }
        return a.consumer == b.consumer && a.owner == b.owner && a.registeredAt == b.registeredAt
            && a.probeSet == b.probeSet
            && a.spec.path == b.spec.path && a.spec.pid == b.spec.pid && a.spec.retprobe == b.spec.retprobe
            && a.spec.force == b.spec.force && a.spec.follow == b.spec.follow && a.spec.latency == b.spec.latency
            && each == table.symbolIs(k, b.spec.symbol) && (each || a.spec.symbol == b.spec.symbol)
    }
}
