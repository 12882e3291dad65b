import UprobeELF
import UprobeKernel

/// Who made a request (from SO_PEERCRED), carried to the engine for ownership and limits.
public struct Peer: Sendable, Hashable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }
    public static let daemon = Peer(pid: 0, uid: 0, gid: 0)
}

/// One attached site of a probe: where it is and which counter slot it counts into.
public struct ProbeSite: Sendable, Equatable {
    public var target: ResolvedProbe
    public var slot: UInt32
    public init(target: ResolvedProbe, slot: UInt32) {
        self.target = target
        self.slot = slot
    }
}

/// Whether a registration is counting.
public enum ProbeState: Sendable, Equatable {
    case active
    /// Registered but not attached, e.g. its binary vanished or changed while the daemon was
    /// down; `reason` says what happened. It is never silently attached elsewhere.
    case degraded(reason: String)
    /// Finished for good: a pid-filtered registration whose process exited. Its sites are
    /// detached and its hits kept; it stays listed until unregistered.
    case ended(reason: String)

    /// The reason of a degraded or ended registration.
    public var reason: String? {
        switch self {
        case .active: return nil
        case .degraded(let r), .ended(let r): return r
        }
    }
    /// `active`, `degraded` or `ended`, as the wire shows it.
    public var name: String {
        switch self {
        case .active: return "active"
        case .degraded: return "degraded"
        case .ended: return "ended"
        }
    }
}

/// One file (device, inode) a registration has counted in, and the hits counted there. A
/// registration that follows its path gets one per file it has seen at that path.
public struct FileVersion: Sendable, Hashable {
    public var device: UInt64
    public var inode: UInt64
    public var buildID: String?
    public var path: String
    public init(device: UInt64, inode: UInt64, buildID: String?, path: String) {
        self.device = device
        self.inode = inode
        self.buildID = buildID
        self.path = path
    }
    public init(_ t: ResolvedProbe) {
        self.init(device: t.device, inode: t.inode, buildID: t.buildID, path: t.path)
    }
    /// Same file (device and inode).
    public func sameFile(_ t: ResolvedProbe) -> Bool { t.device == device && t.inode == inode }
}

/// Hits of a file version whose sites were retired (no process mapped it any more). They are
/// also included in `baseHits`; this keeps them visible per version.
public struct RetiredVersion: Sendable, Hashable {
    public var version: FileVersion
    public var hits: UInt64
    public init(version: FileVersion, hits: UInt64) {
        self.version = version
        self.hits = hits
    }
}

/// A registration's retired file versions: the newest `keptApart` each with its own hits, the
/// older ones folded into one count and one sum. Without the bound every upgrade of a probed
/// binary would add an entry to every probe on it for as long as the daemon runs (and one
/// more `versions` entry to each `stats` reply); the sum keeps their hits in the rate.
public struct RetiredVersions: Sendable, Hashable, ExpressibleByArrayLiteral {
    /// How many retired versions keep their own entry.
    public static let keptApart = 8
    /// The newest retired versions, oldest first.
    public private(set) var recent: [RetiredVersion] = []
    /// Versions retired before those in `recent`, and their hits.
    public private(set) var olderCount = 0
    public private(set) var olderHits: UInt64 = 0

    public init() {}
    public init(arrayLiteral elements: RetiredVersion...) { for e in elements { append(e) } }
    /// As saved (the state files keep a followed registration's retired versions).
    public init(recent: [RetiredVersion], olderCount: Int, olderHits: UInt64) {
        self.recent = Array(recent.suffix(Self.keptApart))
        self.olderCount = olderCount
        self.olderHits = olderHits
    }

    public var isEmpty: Bool { recent.isEmpty }
    /// Hits of every retired version, folded ones included.
    public var totalHits: UInt64 { recent.reduce(olderHits) { $0 &+ $1.hits } }
    /// Versions retired in all.
    public var count: Int { olderCount + recent.count }

    /// Adds the newest retired version, folding the oldest kept one first if all places are
    /// taken (first, so the array never grows past `keptApart` and its capacity stays bounded).
    public mutating func append(_ v: RetiredVersion) {
        if recent.count >= Self.keptApart {
            let oldest = recent.removeFirst()
            olderCount += 1
            olderHits &+= oldest.hits
        }
        recent.append(v)
    }
}

/// A registered probe: one id, one or more sites (several for a multi-site USDT probe).
///
/// Immutable and a class: snapshots and readers pass records around by one reference
/// (one retain) instead of copying a struct full of strings and arrays (many).
///
/// Compact, because a whole binary is 241,000 of them: 56 bytes each, the largest request
/// glibc serves from a 64-byte malloc chunk (57 takes 80). What every record of one request
/// shares (consumer, owner, spec, registration time, probe set) is one `RequestTerms` object;
/// the id is its number (`p<N>`), made into a string when asked; a single site is kept in the
/// record's own fields (file object, offset, name index, slot), not in a `ProbeSite` or an
/// array of its own; the id's number and the base hits are 32 bits each; and what few records
/// have (a degraded or ended state, no site or several, targets apart from the sites, retired
/// versions, a base histogram, an id not of the form `p<N>` or with N of 2^32 - 1 or more,
/// base hits of 2^32 - 1 or more) sits in one object, which also holds the sites, referenced
/// where the site's file would be. A site with aliases, a semaphore or a warning on an
/// otherwise usual record goes into a smaller object of its own there. Measured with
/// heaptrack on a whole-binary glob, the record with its site array was 264 bytes of requested
/// heap per probe.
///
/// Base hits stay in the record because every record restored after a restart has some: a
/// count below 4,294,967,295 needs no second object.
public final class ProbeRecord: Sendable {
    /// What the records of one request share. A field of its own: `r.spec`, `r.consumer` and
    /// `r.countingSince` over 241,000 records then touch no reference count.
    let terms: RequestTerms
    /// Where the sites are: the one site's file (its offset, name and slot in the fields
    /// below), the one site apart for its details, or the rare parts (which hold all sites).
    private let home: SiteHome
    /// The one site's file offset, name index (`ResolvedProbe.nameIndex`, `UInt32.max` for
    /// none) and counter slot, when `home` is `.file`.
    private let siteOffset: UInt64
    private let siteNameAt: UInt32
    private let siteSlot: UInt32
    /// N of the id `p<N>` when N < `UInt32.max`; `UInt32.max`: the id is in `rare`.
    private let numberLow: UInt32
    /// `baseHits` when below `UInt32.max`; `UInt32.max`: in `rare`.
    private let baseHitsLow: UInt32

    /// One reference, whichever (the enum lives in the pointer's spare bits).
    private enum SiteHome: Sendable {
        case file(ResolvedFile)
        /// Usual but for its one site's aliases, semaphore or warning (~2% of a large binary's
        /// functions): that site alone, a 64-byte block instead of the rare parts' 224.
        case detailed(DetailedSite)
        case rare(RareParts)
    }

    private final class DetailedSite: Sendable {
        let site: ProbeSite
        init(site: ProbeSite) { self.site = site }
    }

    /// What few records have, in one object, with the sites.
    private final class RareParts: Sendable {
        let sites: ProbeSites
        /// An id not of the form `p<N>`.
        let otherID: String?
        /// N of an id `p<N>` with N ≥ `UInt32.max`.
        let wideNumber: UInt64?
        /// `baseHits` when ≥ `UInt32.max` (else unused).
        let wideBaseHits: UInt64
        let state: ProbeState
        let ownTargets: [ResolvedProbe]?
        let retired: RetiredVersions
        let baseLatency: LatencyHistogram?
        init(sites: ProbeSites, otherID: String?, wideNumber: UInt64?, wideBaseHits: UInt64,
             state: ProbeState, ownTargets: [ResolvedProbe]?, retired: RetiredVersions, baseLatency: LatencyHistogram?) {
            self.sites = sites
            self.otherID = otherID
            self.wideNumber = wideNumber
            self.wideBaseHits = wideBaseHits
            self.state = state
            self.ownTargets = ownTargets
            self.retired = retired
            self.baseLatency = baseLatency
        }
    }

    /// The rarely present parts; nil when all have their usual value.
    private var rare: RareParts? {
        if case .rare(let r) = home { return r }
        return nil
    }

    /// Whether the record needed its rare parts (tests: what stays one block).
    var hasRareParts: Bool { rare != nil }
    /// Whether its one site is kept apart, for its details (tests).
    var keepsDetailedSite: Bool {
        if case .detailed = home { return true }
        return false
    }

    /// Attached sites: empty when degraded after a restart or ended. A registration that
    /// follows its path holds the sites of every file version still mapped by some process
    /// (the current file's plus older ones), so old processes keep being counted.
    public var sites: ProbeSites {
        switch home {
        case .file(let file):
            return ProbeSites(one: ProbeSite(target: ResolvedProbe(file: file, fileOffset: siteOffset,
                                                                   nameAt: siteNameAt == .max ? nil : siteNameAt),
                                             slot: siteSlot))
        case .detailed(let d): return ProbeSites(one: d.site)
        case .rare(let r): return r.sites
        }
    }

    /// Hits counted before this daemon process took over (carried over from the state file).
    public var baseHits: UInt64 {
        if baseHitsLow != .max { return UInt64(baseHitsLow) }
        return rare?.wideBaseHits ?? UInt64(baseHitsLow)
    }

    /// The id: `p<N>` for every id this daemon hands out (made from `number` when asked: a
    /// short string, kept inline, so no allocation).
    public var id: String {
        if numberLow != .max { return ProbeID.make(UInt64(numberLow)) }
        if let rare, let other = rare.otherID { return other }
        return ProbeID.make(rare?.wideNumber ?? UInt64(numberLow))
    }
    /// N of an id `p<N>` (`ProbeID.number`), nil for any other id: parsed once, because the
    /// registry and the tree key by it.
    public var number: UInt64? {
        if numberLow != .max { return UInt64(numberLow) }
        guard let rare else { return UInt64(numberLow) }
        return rare.otherID == nil ? rare.wideNumber ?? UInt64(numberLow) : nil
    }
    public var state: ProbeState { rare?.state ?? .active }
    /// Versions whose sites were retired, with their hits (already part of `baseHits`).
    public var retired: RetiredVersions { rare?.retired ?? RetiredVersions() }
    /// A latency probe's histogram from before this daemon process took over (the state
    /// file) and of its retired sites, added to what its sites measure now.
    public var baseLatency: LatencyHistogram? { rare?.baseLatency }
    /// Whether `state` is `.active` (without making the enum).
    public var isActive: Bool {
        guard let rare else { return true }
        if case .active = rare.state { return true }
        return false
    }
    /// Whether it has retired versions (without copying them).
    public var hasRetired: Bool { rare.map { !$0.retired.isEmpty } ?? false }

    // Borrowed, not copied (`_read`): `r.spec.pid` over 241,000 records must not copy and
    // release a spec with three strings for each.
    public var consumer: String? { _read { yield terms.consumer } }
    public var owner: Peer { terms.owner }
    public var spec: ProbeSpecInput { _read { yield terms.spec } }
    /// Seconds since the Unix epoch when the registration was first acknowledged.
    public var registeredAt: Double { terms.registeredAt }
    /// Monotonic time this daemon started counting it, for rates.
    public var registeredAtMonotonic: ContinuousClock.Instant { terms.registeredAtMonotonic }
    /// The same as seconds after `MonotonicEpoch.start`: `stats` computes 10,000 rates per
    /// call, and Duration arithmetic (128-bit) per record was a visible part of it.
    var countingSince: Double { terms.countingSince }
    /// The probe set that owns this registration (nil: registered through the API). Opaque to
    /// the engine; the server's probe-set reconciler spells it (source and name) and is the
    /// only one that adds or removes such registrations.
    public var probeSet: String? { _read { yield terms.probeSet } }

    /// Where the probe was resolved when it was registered (kept for degraded probes, whose
    /// `sites` are empty, so `list` still shows what was asked and where it was).
    /// For a registration that follows its path, `targets` are those of the newest good file.
    public var targets: [ResolvedProbe] { rare?.ownTargets ?? sites.map(\.target) }
    /// `targets.count`, without making the array.
    public var targetCount: Int {
        guard let rare else { return 1 }   // one site, in the fields or apart with its details
        return rare.ownTargets?.count ?? rare.sites.count
    }
    /// `targets.first`, without making the array.
    public var firstTarget: ResolvedProbe? {
        if let own = rare?.ownTargets { return own.first }
        return sites.firstTarget
    }

    /// `countingSince`: `registeredAtMonotonic` as seconds after `MonotonicEpoch.start`, if
    /// the caller has it (a batch computes it once for all its records).
    public convenience init(id: String, consumer: String?, owner: Peer, spec: ProbeSpecInput, sites: [ProbeSite],
                            registeredAt: Double, registeredAtMonotonic: ContinuousClock.Instant, countingSince: Double? = nil,
                            state: ProbeState, baseHits: UInt64, targets: [ResolvedProbe], retired: RetiredVersions = [],
                            probeSet: String? = nil, baseLatency: LatencyHistogram? = nil) {
        self.init(id: id, terms: RequestTerms(consumer: consumer, owner: owner, spec: spec, registeredAt: registeredAt,
                                              registeredAtMonotonic: registeredAtMonotonic, countingSince: countingSince,
                                              probeSet: probeSet),
                  sites: ProbeSites(sites), state: state, baseHits: baseHits, targets: targets, retired: retired,
                  baseLatency: baseLatency)
    }

    /// `targets` nil: the sites' targets.
    init(id: String, terms: RequestTerms, sites: ProbeSites, state: ProbeState, baseHits: UInt64,
         targets: [ResolvedProbe]?, retired: RetiredVersions = [], baseLatency: LatencyHistogram? = nil) {
        let number = ProbeID.number(id)
        let narrowNumber = number.flatMap { $0 < UInt64(UInt32.max) ? UInt32($0) : nil }
        let narrowBaseHits: UInt32? = baseHits < UInt64(UInt32.max) ? UInt32(baseHits) : nil
        self.numberLow = narrowNumber ?? .max
        self.baseHitsLow = narrowBaseHits ?? .max
        self.terms = terms
        let ownTargets = targets.flatMap { Self.same($0, as: sites) ? nil : $0 }
        let isActive: Bool
        if case .active = state { isActive = true } else { isActive = false }
        let usual = narrowNumber != nil && narrowBaseHits != nil && isActive && ownTargets == nil && retired.isEmpty
            && baseLatency == nil
        // The one site of a usual record goes in the record's fields unless it has details
        // (aliases, a semaphore, a warning), which only a `ResolvedProbe` holds.
        if usual, sites.count == 1, let only = sites.first, !only.target.hasDetails {
            home = .file(only.target.file)
            siteOffset = only.target.fileOffset
            siteNameAt = only.target.nameIndex ?? .max
            siteSlot = only.slot
        } else {
            siteOffset = 0
            siteNameAt = .max
            siteSlot = 0
            if usual, sites.count == 1, let only = sites.first {
                home = .detailed(DetailedSite(site: only))
            } else {
                home = .rare(RareParts(sites: sites, otherID: number == nil ? id : nil,
                                       wideNumber: narrowNumber == nil ? number : nil, wideBaseHits: baseHits,
                                       state: state, ownTargets: ownTargets, retired: retired, baseLatency: baseLatency))
            }
        }
    }

    /// Whether `targets` are exactly the targets of `sites` (then they are not kept twice).
    private static func same(_ targets: [ResolvedProbe], as sites: ProbeSites) -> Bool {
        guard targets.count == sites.count else { return false }
        for (t, s) in zip(targets, sites) where t != s.target { return false }
        return true
    }

    /// A new version of this registration (same id, registration time and consumers' owner).
    func with(sites: some Collection<ProbeSite>, state: ProbeState, baseHits: UInt64, targets: [ResolvedProbe],
              retired: RetiredVersions, baseLatency: LatencyHistogram?? = nil) -> ProbeRecord {
        ProbeRecord(id: id, terms: terms, sites: ProbeSites(sites), state: state, baseHits: baseHits, targets: targets,
                    retired: retired, baseLatency: baseLatency ?? self.baseLatency)
    }

    /// A latency probe's histogram: `baseLatency` plus what its sites' rows hold now
    /// (`read`: the kernel's row of a slot); nil for a counting probe.
    public func latency(_ read: (UInt32) -> LatencyHistogram?) -> LatencyHistogram? {
        guard spec.latency else { return nil }
        var h = baseLatency ?? LatencyHistogram()
        for s in sites { if let live = read(s.slot) { h.add(live) } }
        return h
    }

    /// Whether the daemon follows this registration's path through file replacements: asked
    /// for (the default), not pid-filtered (a process keeps the file it mapped; the
    /// registration ends with it), and not a raw file offset (an offset means nothing in
    /// another build).
    public var follows: Bool { spec.follow && spec.pid == nil && spec.offset == nil }
}

/// A registration's sites: one kept inline (nearly every registration: a function has one
/// site), several in an array (a multi-site USDT probe, a followed registration with older
/// files' sites), or none (degraded, ended). Reads like an array of `ProbeSite`.
public struct ProbeSites: RandomAccessCollection, Sendable, Equatable {
    @usableFromInline enum Storage: Sendable, Equatable {
        case one(ProbeSite)
        case many([ProbeSite])
    }
    @usableFromInline let storage: Storage

    public init(_ sites: some Collection<ProbeSite>) {
        if sites.count == 1, let only = sites.first {
            storage = .one(only)
        } else {
            storage = .many(Array(sites))
        }
    }
    public init(_ sites: ProbeSites) { self = sites }
    /// One site.
    init(one site: ProbeSite) { storage = .one(site) }
    /// No site.
    static var empty: ProbeSites { ProbeSites(storage: .many([])) }
    private init(storage: Storage) { self.storage = storage }

    // Inlinable: the state and reply encoders (another module) read a site per record.
    @inlinable public var startIndex: Int { 0 }
    @inlinable public var endIndex: Int {
        switch storage {
        case .one: return 1
        case .many(let a): return a.count
        }
    }
    @inlinable public subscript(i: Int) -> ProbeSite {
        switch storage {
        case .one(let s):
            precondition(i == 0, "site index out of range")
            return s
        case .many(let a): return a[i]
        }
    }
    /// `first?.target`, copying the target once.
    @inlinable public var firstTarget: ResolvedProbe? {
        switch storage {
        case .one(let s): return s.target
        case .many(let a): return a.first?.target
        }
    }

    public static func == (a: ProbeSites, b: ProbeSites) -> Bool { a.elementsEqual(b) }
}

/// What every registration a request makes shares: one object for a glob's 241,000 records.
final class RequestTerms: Sendable {
    let consumer: String?
    let owner: Peer
    let spec: ProbeSpecInput
    let registeredAt: Double
    let registeredAtMonotonic: ContinuousClock.Instant
    let countingSince: Double
    let probeSet: String?

    init(consumer: String?, owner: Peer, spec: ProbeSpecInput, registeredAt: Double,
         registeredAtMonotonic: ContinuousClock.Instant, countingSince: Double? = nil, probeSet: String?) {
        self.consumer = consumer
        self.owner = owner
        self.spec = spec
        self.registeredAt = registeredAt
        self.registeredAtMonotonic = registeredAtMonotonic
        self.countingSince = countingSince ?? MonotonicEpoch.seconds(registeredAtMonotonic)
        self.probeSet = probeSet
    }
}

/// A registration to bring back after a restart, with its original id.
public struct RestoreItem: Sendable {
    public var id: String
    public var consumer: String?
    public var owner: Peer
    public var spec: ProbeSpecInput
    public var registeredAt: Double
    public var baseHits: UInt64
    /// The targets as resolved now (attached when `degradedReason` is nil) or as recorded.
    public var targets: [ResolvedProbe]
    /// Why it is not attached: it comes back degraded (or ended, with `ended`).
    public var degradedReason: String?
    /// It comes back `ended` with `degradedReason` as the reason: it was over before the
    /// restart, or its process stopped being its owner's while the daemon was down.
    public var ended: Bool
    /// The counter slot of each target in a link adopted from the pin directory (`Adoption`):
    /// the registration keeps counting there, its counters are not reset and its sites are not
    /// attached again. nil: attached afresh.
    public var adoptedSlots: [UInt32]? = nil
    /// With `adoptedSlots`, for a followed registration: its sites in older file versions that
    /// processes still ran at the exit, adopted with their pinned links like the others.
    public var adoptedOlderSites: [ProbeSite] = []
    /// A followed registration's retired file versions (their hits are in `baseHits`).
    public var retired: RetiredVersions = []
    /// The probe set that owns it (`ProbeRecord.probeSet`).
    public var probeSet: String?
    /// A latency probe's histogram up to the save.
    public var baseLatency: LatencyHistogram?
    public init(id: String, consumer: String?, owner: Peer, spec: ProbeSpecInput, registeredAt: Double,
                baseHits: UInt64, targets: [ResolvedProbe], degradedReason: String?, ended: Bool = false,
                probeSet: String? = nil, baseLatency: LatencyHistogram? = nil) {
        self.probeSet = probeSet
        self.baseLatency = baseLatency
        self.id = id
        self.consumer = consumer
        self.owner = owner
        self.spec = spec
        self.registeredAt = registeredAt
        self.baseHits = baseHits
        self.targets = targets
        self.degradedReason = degradedReason
        self.ended = ended
    }
}

/// A fixed monotonic instant (first use in this process) to express instants as Doubles.
enum MonotonicEpoch {
    static let start = ContinuousClock.now
    static func seconds(_ t: ContinuousClock.Instant) -> Double { (t - start).inSeconds }
}

/// Counters of the engine's own work, reported by `status`.
public struct EngineCounters: Sendable {
    public var requests: UInt64 = 0
    public var batches: UInt64 = 0
    public var maxBatchSize: Int = 0
    public var linksCreated: UInt64 = 0
    public var linksClosed: UInt64 = 0
    public var linkRebuilds: UInt64 = 0
    /// Rounds of detach work; each round's closes are issued together and share grace periods.
    public var gracePeriods: UInt64 = 0
    public var pendingRemovals: Int = 0
    /// Rounds of deferred detach/merge work.
    public var compactions: UInt64 = 0
    public var lastBatchSize: Int = 0
    public var lastBatchMicros: UInt64 = 0
    /// Time the writer spent applying batches (busy, not waiting for work), in total.
    public var busyMicros: UInt64 = 0
    /// Part of `busyMicros` spent in the persist hook: encoding and appending the state-log line
    /// (and its fsync when there is no committer; with one, the sync runs off the writer).
    public var persistMicros: UInt64 = 0
    public var meanBatchSize: Double { batches == 0 ? 0 : Double(requests) / Double(batches) }
}

/// What readers see: one consistent version, published by the writer after each batch in the
/// same uprobes-tree version as the uprobes it names (see `Engine.read`).
public struct RegistrySnapshot: Sendable {
    public var probes = ProbeMap()
    /// Counter slots in use are all below this.
    public var slotHighWater: UInt32 = 0
    public var slotsInUse: Int = 0
    public var slotCapacity: UInt32 = 0
    public var linksOpen: Int = 0
    public var counters = EngineCounters()
    public var generation: UInt64 = 0
    /// On the snapshot handed to the persist hook: the registrations its batch added (restored
    /// ones included) and the ids it removed. Empty on every other snapshot. A batch whose
    /// persist fails is rolled back, so its registrations never appear in a later snapshot.
    public var batchAdded: [ProbeRecord] = []
    public var batchRemoved: [String] = []
    /// On the snapshot handed to the persist hook: registrations its batch ended (saved again
    /// at once, so an ended probe stays ended after a crash).
    public var batchEnded: [ProbeRecord] = []
    /// On the snapshot handed to the persist hook: registrations whose file versions its
    /// follow round changed (a new file's sites added, an old file's sites retired and their
    /// count folded in), saved again at once: a start after a crash then knows every site
    /// whose pinned link it adopts.
    public var batchFollowed: [ProbeRecord] = []

    /// Probes sorted by their numeric id, for stable listings.
    public var sortedProbes: [ProbeRecord] { probes.sorted }
}

/// The registry as published in a version of the uprobes tree (`UprobeTree.apply(_:publishing:)`):
/// the tree holds the only reference readers use, and frees it after a grace period.
public final class PublishedRegistry: Sendable {
    public let snapshot: RegistrySnapshot
    public init(_ snapshot: RegistrySnapshot) { self.snapshot = snapshot }
}

/// Probe ids are `p<N>`; sorting by N keeps listings in registration order.
public enum ProbeID {
    public static func make(_ n: UInt64) -> String {
        // Digits written in place, into exactly the capacity needed: ids below p10^14 fit in
        // the String value itself (no allocation), and interpolation went through the
        // generic formatter. Records make their id when asked (`ProbeRecord.id`).
        var digits = 1
        var m = n
        while m >= 10 { m /= 10; digits += 1 }
        return String(unsafeUninitializedCapacity: digits + 1) { buf in
            buf[0] = UInt8(ascii: "p")
            var v = n
            var i = digits
            repeat {
                buf[i] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: v % 10)
                v /= 10
                i -= 1
            } while i > 0
            return digits + 1
        }
    }
    /// The N of an id `make(N)` made; nil for anything else ("p+5" and "p007" are not ids).
    /// Read from the UTF-8 bytes: every registry lookup parses an id, and `hasPrefix` plus
    /// `UInt64(Substring)` went through Unicode-aware string code.
    public static func number(_ id: String) -> UInt64? {
        var id = id
        // Native strings hand out their bytes; the generic UTF8View walk took about twice as long.
        return id.withUTF8 { number(utf8: $0) }
    }

    static func number(utf8 bytes: UnsafeBufferPointer<UInt8>) -> UInt64? {
        // "p" and at most 20 digits; "p0" is an id, "p007" is not.
        guard bytes.count >= 2, bytes.count <= 21, bytes[0] == UInt8(ascii: "p"),
              bytes[1] != UInt8(ascii: "0") || bytes.count == 2 else { return nil }
        var n: UInt64 = 0
        for c in bytes[1...] {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
            let (times10, o1) = n.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(c &- UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            n = sum
        }
        return n
    }
    static func order(_ a: String, _ b: String) -> Bool {
        switch (number(a), number(b)) {
        case let (x?, y?): return x < y
        default: return a < b
        }
    }
}
