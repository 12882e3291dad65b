import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import UprobeELF
import UprobeKernel

/// What the engine needs from the kernel. The real implementation is `BPFKernelBackend`;
/// unit tests of batching decisions use a fake. Integration tests always use the real one.
public protocol KernelBackend: Sendable {
    /// Number of counter slots.
    var capacity: UInt32 { get }
    /// Creates one uprobe_multi link for `sites` of one binary (one pid filter, one direction).
    func attach(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool) throws(KernelError) -> any KernelLink
    /// Turns the make-before-break hand-off on or off for `slots` (see `CounterProgram.setOverlap`).
    func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError)
    /// Forgets hand-off marks of `slots`; only valid once no older link holds them.
    func sweepMarks(slots: Set<UInt32>) throws(KernelError)
    /// Zeroes the counters of `slots` on every CPU.
    func resetCounters(slots: [UInt32]) throws(KernelError)
    /// Reads counters `[0, upTo)`.
    func readCounters(upTo: UInt32) throws(KernelError) -> [UInt64]
    /// Closes links so that they share grace periods; returns once none of them can fire.
    func closeAll(_ links: [any KernelLink])
    /// Lets go of links at shutdown: pinned ones stay attached (counting on for the next
    /// daemon), others are closed as by `closeAll` (latency links without draining).
    func release(_ links: [any KernelLink])
    /// The counter of one slot.
    func readCounter(slot: UInt32) throws(KernelError) -> UInt64

    // Latency probes (uprobe sessions). The defaults below refuse them: a backend without
    // them answers `latency_unsupported`.
    /// Creates one session link measuring each call of `sites` into their slots' rows.
    func attachLatency(path: String, sites: [LinkSite], pid: Int32?) throws(KernelError) -> any KernelLink
    /// The histogram of a latency slot; nil for a slot without one.
    func readLatency(slot: UInt32) -> LatencyHistogram?
    /// Slots given back to the allocator (no link can use them): their latency rows are free.
    func releaseSlots(_ slots: [UInt32])
}

extension KernelBackend {
    public func release(_ links: [any KernelLink]) { closeAll(links) }
    public func readCounter(slot: UInt32) throws(KernelError) -> UInt64 {
        try readCounters(upTo: slot + 1).last ?? 0
    }
    public func attachLatency(path: String, sites: [LinkSite], pid: Int32?) throws(KernelError) -> any KernelLink {
        throw KernelError(code: .latencyUnsupported, message: "this kernel backend has no latency probes")
    }
    public func readLatency(slot: UInt32) -> LatencyHistogram? { nil }
    public func releaseSlots(_ slots: [UInt32]) {}
}

/// One offset of a link and the counter slot its hits go to.
public struct LinkSite: Sendable, Hashable {
    public var offset: UInt64
    public var refCtrOffset: UInt64?
    public var slot: UInt32
    public init(offset: UInt64, refCtrOffset: UInt64?, slot: UInt32) {
        self.offset = offset
        self.refCtrOffset = refCtrOffset
        self.slot = slot
    }
}

/// An attached link; closing it detaches all its offsets.
public protocol KernelLink: AnyObject, Sendable {
    var generation: UInt32 { get }
    func close()
}

extension UprobeMultiLink: KernelLink {}
extension LatencyLink: KernelLink {}

/// The real kernel: one BPF counting program, uprobe_multi links; and, made on the first
/// latency probe, the latency program (uprobe session links).
public final class BPFKernelBackend: KernelBackend {
    public let program: CounterProgram
    /// Test-only: how long `closeAll` waits before closing links, so a test can kill the
    /// daemon in the middle of a make-before-break (both links attached, hand-off on).
    private let closeDelayMicros: UInt32
    /// Rows of the latency program (latency probe sites at once).
    public let latencyCapacity: UInt32
    /// Made on first use: its row map is `latencyCapacity` × 2.7 KB of kernel memory, which a
    /// daemon without latency probes should not pay; or at start, when latency links were
    /// found pinned (`openPinnedLatency`). Kept here, next to `program`, so every kernel object
    /// of the daemon is made in one place; pinned in `program`'s pin directory like it.
    private let latencyProgram = Mutex<Result<LatencyProgram, KernelError>?>(nil)
    /// The test-only altered programs (see `CounterProgram.init`).
    private let variant: Bool

    /// `pins`: pin the maps, the program and every link there (see `CounterProgram.init`).
    /// `variant`: the test-only altered program; `closeDelayMicros`: the test-only close delay.
    public init(capacity: UInt32, latencyCapacity: UInt32 = 16_384, pins: PinDirectory? = nil, variant: Bool = false,
                closeDelayMicros: UInt32 = 0) throws(KernelError) {
        try KernelSupport.check()
        program = try CounterProgram(capacity: capacity, pins: pins, variant: variant)
        self.variant = variant
        self.closeDelayMicros = closeDelayMicros
        self.latencyCapacity = latencyCapacity
    }

    public var capacity: UInt32 { program.capacity }

    /// The latency program, made (or its failure remembered) on first call.
    public func latency() throws(KernelError) -> LatencyProgram {
        let result: Result<LatencyProgram, KernelError> = latencyProgram.withLock { slot in
            if let made = slot { return made }
            let made = Result { () throws(KernelError) in
                try LatencyProgram(counter: program, rowCapacity: latencyCapacity, variant: variant)
            }
            slot = made
            return made
        }
        return try result.get()
    }

    /// What a start found of the latency program's pins.
    public enum PinnedLatency: Sendable {
        /// No latency link is pinned. Latency objects pinned without one were unpinned (their
        /// rows belong to no link; the first latency probe makes fresh ones): `removed` pins.
        case none(removed: Int)
        /// Latency links are pinned: the latency program is made now, adopting the pinned maps
        /// (rows included) and program, so the restore can adopt the links.
        case opened(LatencyProgram)
        /// Latency links are pinned but the program cannot be made on them (`latency_capacity`
        /// changed, or no uprobe sessions any more): every latency pin was removed, which
        /// detaches those links; their probes are attached again from their saved totals.
        case discarded(KernelError, removed: Int)
    }

    /// At start, before the restore: opens the latency program if latency links are pinned.
    public func openPinnedLatency() -> PinnedLatency {
        guard let pins = program.pins else { return .none(removed: 0) }
        let generations = pins.pinnedLinkGenerations(in: pins.latencyLinksPath).generations
        let objects = KernelObjectName.latency.map(pins.objectPath)
        guard !generations.isEmpty else { return .none(removed: objects.filter { PinDirectory.unpin($0) }.count) }
        do { return .opened(try latency()) } catch {
            latencyProgram.withLock { $0 = nil }  // the first latency probe tries again, on fresh objects
            let removed = (generations.map(pins.latencyLinkPath) + objects).filter { PinDirectory.unpin($0) }.count
            return .discarded(error, removed: removed)
        }
    }

    /// The latency program if it was made (reads never make it).
    private var existingLatency: LatencyProgram? {
        latencyProgram.withLock { slot in if case .success(let p)? = slot { return p } else { return nil } }
    }

    public func attach(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool) throws(KernelError) -> any KernelLink {
        try program.attach(path: path, offsets: sites.map(\.offset), refCtrOffsets: Self.refs(sites),
                           slots: sites.map(\.slot), pid: pid, retprobe: retprobe)
    }

    public func attachLatency(path: String, sites: [LinkSite], pid: Int32?) throws(KernelError) -> any KernelLink {
        try latency().attach(path: path, offsets: sites.map(\.offset), refCtrOffsets: Self.refs(sites),
                             slots: sites.map(\.slot), pid: pid)
    }

    private static func refs(_ sites: [LinkSite]) -> [UInt64]? {
        sites.contains(where: { $0.refCtrOffset != nil }) ? sites.map { $0.refCtrOffset ?? 0 } : nil
    }

    public func readLatency(slot: UInt32) -> LatencyHistogram? {
        existingLatency?.read(slot: slot)
    }

    public func releaseSlots(_ slots: [UInt32]) {
        existingLatency?.release(slots: slots)
    }

    public func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) {
        try program.setOverlap(on, slots: slots)
    }

    public func sweepMarks(slots: Set<UInt32>) throws(KernelError) {
        try program.sweepMarks(slots: slots)
        try existingLatency?.sweepMarks(slots: slots)
    }

    public func resetCounters(slots: [UInt32]) throws(KernelError) {
        try program.resetCounters(slots: slots)
    }

    public func readCounters(upTo: UInt32) throws(KernelError) -> [UInt64] {
        try program.readAllCounters(upTo: upTo)
    }

    /// Closes links so that they share grace periods; a latency link first lets its calls
    /// drain (see `LatencyLink.close`), on its own closer thread like every other link.
    public func closeAll(_ links: [any KernelLink]) {
        if closeDelayMicros > 0 && !links.isEmpty { usleep(closeDelayMicros) }
        close(links, drain: true)
    }

    private func close(_ links: [any KernelLink], drain: Bool) {
        LinkCloser.closeAll(links.compactMap { $0 as? UprobeMultiLink }, latency: links.compactMap { $0 as? LatencyLink },
                            drain: drain)
        for l in links where !(l is UprobeMultiLink) && !(l is LatencyLink) { l.close() }
    }

    public func release(_ links: [any KernelLink]) {
        // Pinned links only lose this process's fd (no grace period: the pin holds them);
        // unpinned ones are detached together as before.
        let real = links.compactMap { $0 as? UprobeMultiLink }
        for l in real where l.pinPath != nil { l.release() }
        let sessions = links.compactMap { $0 as? LatencyLink }
        for l in sessions where l.pinPath != nil { l.release() }
        // Unpinned latency links do not wait for their calls at shutdown.
        close(links.filter { ($0 as? UprobeMultiLink)?.pinPath == nil && ($0 as? LatencyLink)?.pinPath == nil }, drain: false)
    }

    public func readCounter(slot: UInt32) throws(KernelError) -> UInt64 {
        try program.readCounter(slot: slot)
    }
}
