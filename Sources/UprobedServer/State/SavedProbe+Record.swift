import UprobeCore
import UprobeELF
import UprobeKernel

/// What identified a registration when it was first saved: its first target's file and, with a
/// `pid` filter, its process's start time. Later saves carry them unchanged, so that a restart
/// compares the binary and the process with those of the registration (`RestorePlanner`), not
/// with whatever was there at the last save.
struct ProbeStamps: Sendable {
    var file: FileStamp?
    var processStart: UInt64?
}

extension ProbeStamps {
    /// The stamps of `r` saved for the first time: its first target's file (if that is still
    /// the file it was resolved in) and, with a `pid` filter, the process's start time. Used
    /// by every save and by runs encoded ahead, so both stamp alike.
    init(firstSave r: ProbeRecord, files: inout FileStampCache) {
        file = r.targets.first.flatMap { files.stamp(of: $0) }
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
        if r.sites.count == r.targets.count {
            // The common case: sites are the targets, in order.
            var out: [UInt32] = []
            out.reserveCapacity(r.sites.count)
            for (s, t) in zip(r.sites, r.targets) {
                guard s.target.device == t.device, s.target.inode == t.inode, s.target.fileOffset == t.fileOffset else { break }
                out.append(s.slot)
            }
            if out.count == r.targets.count { return (out, []) }
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
    static func saved(_ r: ProbeRecord, hits: UInt64, stamps: inout [String: ProbeStamps],
                      files: inout FileStampCache) -> SavedProbe {
        var own = stamps[r.id] ?? ProbeStamps(firstSave: r, files: &files)
        // A registration that followed its path to a new file is stamped with that file.
        if let t = r.targets.first, let was = own.file, was.device != t.device || was.inode != t.inode {
            own.file = files.stamp(of: t)
        }
        stamps[r.id] = own
        return SavedProbe(r, hits: hits, stamps: own)
    }

    /// Every registration of `snapshot` as the snapshot file keeps it, with its hit total
    /// (and a latency probe's histogram).
    static func savedProbes(_ snapshot: RegistrySnapshot, counts: KernelCounts,
                            stamps: inout [String: ProbeStamps]) -> [SavedProbe] {
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
