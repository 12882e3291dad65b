import UprobeErrors
import UprobeELF

/// What an unregister did.
public struct Removal: Sendable, Equatable {
    /// Registrations removed; their probes no longer count and are detached from the kernel.
    public var count: Int
    /// Why the removal is not saved in the state file yet, if it is not: a restart before the
    /// next successful save (the next change's, a checkpoint's or the final one) would bring
    /// these registrations back.
    public var unsaved: String?
    /// Registrations a selection matched but left to their probe set (its file or `apply`
    /// changes it), by the set's mark.
    public var leftInSets: [String: Int] = [:]
    public init(count: Int, unsaved: String? = nil) {
        self.count = count
        self.unsaved = unsaved
    }
}

/// A failed engine operation, with a stable code and (when one probe is to blame) its index
/// in the request.
public struct EngineError: Error, Sendable, Equatable {
    public var code: ErrorCode
    public var message: String
    public var probeIndex: Int?
    public init(code: ErrorCode, message: String, probeIndex: Int? = nil) {
        self.code = code
        self.message = message
        self.probeIndex = probeIndex
    }
}

/// One spec of a register request after resolution: what the client asked and where it lands.
public struct RegisterItem: Sendable {
    public var spec: ProbeSpecInput
    public var targets: [ResolvedProbe]
    /// The probe set its registrations belong to (`ProbeRecord.probeSet`); nil for the API's.
    public var probeSet: String?
    public init(spec: ProbeSpecInput, targets: [ResolvedProbe], probeSet: String? = nil) {
        self.spec = spec
        self.targets = targets
        self.probeSet = probeSet
    }
}

/// Engine tuning; defaults are the daemon's built-in defaults (config/uprobed.conf mirrors them).
public struct EngineConfig: Sendable {
    /// How long the writer waits for more requests after the first one of a batch, when that
    /// one found it idle (work queued while it was busy is taken at once).
    public var batchWindow: Duration
    /// At most this many requests per batch.
    public var maxBatchRequests: Int
    /// Counter slots (one per attached site); registrations beyond it get `capacity_exhausted`.
    public var slotCapacity: UInt32
    /// A removed probe is physically detached within this delay; removals within it share one
    /// link rebuild and one grace period.
    public var compactionDelay: Duration
    /// A (binary, pid, direction) with more small links than this gets them merged into one.
    public var maxLinksPerGroup: Int
    /// Links of at most this many sites count as small (merged); bigger ones are only rebuilt
    /// to drop dead sites.
    public var mergeLinksUpTo: Int
    /// Above this many open links, compaction runs at once instead of after the delay.
    public var maxOpenLinks: Int
    /// This many removed sites waiting for detach make it run at once (a bulk unregister).
    public var bulkDetachSites: Int
    /// A register request of at least this many probes has its records made, handed to the
    /// `prepare` hook and to the request's `early` hook (its state entry and its reply are
    /// encoded on another CPU) and entered into the registry while the kernel attaches it.
    /// Smaller ones skip the hand-off: it costs thread wake-ups.
    public var prepareMinimum: Int

    public init(batchWindow: Duration = .microseconds(250), maxBatchRequests: Int = 1024, slotCapacity: UInt32 = 65_536,
                compactionDelay: Duration = .milliseconds(250), maxLinksPerGroup: Int = 8, mergeLinksUpTo: Int = 256,
                maxOpenLinks: Int = 512, bulkDetachSites: Int = 1000, prepareMinimum: Int = 1000) {
        self.prepareMinimum = prepareMinimum
        self.batchWindow = batchWindow
        self.maxBatchRequests = maxBatchRequests
        self.slotCapacity = slotCapacity
        self.compactionDelay = compactionDelay
        self.maxLinksPerGroup = maxLinksPerGroup
        self.mergeLinksUpTo = mergeLinksUpTo
        self.maxOpenLinks = maxOpenLinks
        self.bulkDetachSites = bulkDetachSites
    }
}

/// A change the path watcher asks the writer to make to an existing registration. The watcher
/// decides (outside any lock, after resolving and scanning /proc); the writer applies all
/// changes of one round together: one slot allocation, one link per (binary, direction).
public struct FollowChange: Sendable {
    public enum Kind: Sendable {
        /// The file at the path changed: count these sites of the new file too. Older files'
        /// sites stay while processes still map them.
        case attach(targets: [ResolvedProbe])
        /// The file at the path cannot be probed (gone, not ELF, symbol missing): report it;
        /// sites of older files keep counting the processes that still run them.
        case degrade(reason: String)
        /// No process maps this file any more: detach its sites and keep their hits.
        case retire(device: UInt64, inode: UInt64)
        /// The registration is over (its process exited): detach everything, keep the hits.
        case end(reason: String)
    }
    public var id: String
    public var kind: Kind
    public init(id: String, kind: Kind) {
        self.id = id
        self.kind = kind
    }
}
