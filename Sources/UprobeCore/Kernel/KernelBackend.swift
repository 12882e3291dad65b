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
    /// daemon), others are closed as by `closeAll`.
    func release(_ links: [any KernelLink])
    /// The counter of one slot.
    func readCounter(slot: UInt32) throws(KernelError) -> UInt64
}

extension KernelBackend {
    public func release(_ links: [any KernelLink]) { closeAll(links) }
    public func readCounter(slot: UInt32) throws(KernelError) -> UInt64 {
        try readCounters(upTo: slot + 1).last ?? 0
    }
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

/// The real kernel: one BPF counting program, uprobe_multi links.
public final class BPFKernelBackend: KernelBackend {
    public let program: CounterProgram
    /// Test-only: how long `closeAll` waits before closing links, so a test can kill the
    /// daemon in the middle of a make-before-break (both links attached, hand-off on).
    private let closeDelayMicros: UInt32

    /// `pins`: pin the maps, the program and every link there (see `CounterProgram.init`).
    /// `variant`: the test-only altered program; `closeDelayMicros`: the test-only close delay.
    public init(capacity: UInt32, pins: PinDirectory? = nil, variant: Bool = false, closeDelayMicros: UInt32 = 0) throws(KernelError) {
        try KernelSupport.check()
        program = try CounterProgram(capacity: capacity, pins: pins, variant: variant)
        self.closeDelayMicros = closeDelayMicros
    }

    public var capacity: UInt32 { program.capacity }

    public func attach(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool) throws(KernelError) -> any KernelLink {
        let refs: [UInt64]? = sites.contains(where: { $0.refCtrOffset != nil }) ? sites.map { $0.refCtrOffset ?? 0 } : nil
        return try program.attach(path: path, offsets: sites.map(\.offset), refCtrOffsets: refs,
                                  slots: sites.map(\.slot), pid: pid, retprobe: retprobe)
    }

    public func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) {
        try program.setOverlap(on, slots: slots)
    }

    public func sweepMarks(slots: Set<UInt32>) throws(KernelError) {
        try program.sweepMarks(slots: slots)
    }

    public func resetCounters(slots: [UInt32]) throws(KernelError) {
        try program.resetCounters(slots: slots)
    }

    public func readCounters(upTo: UInt32) throws(KernelError) -> [UInt64] {
        try program.readAllCounters(upTo: upTo)
    }

    public func closeAll(_ links: [any KernelLink]) {
        if closeDelayMicros > 0 && !links.isEmpty { usleep(closeDelayMicros) }
        let real = links.compactMap { $0 as? UprobeMultiLink }
        LinkCloser.closeAll(real)
        for l in links where !(l is UprobeMultiLink) { l.close() }
    }

    public func release(_ links: [any KernelLink]) {
        // Pinned links only lose this process's fd (no grace period: the pin holds them);
        // unpinned ones are detached together as before.
        let real = links.compactMap { $0 as? UprobeMultiLink }
        for l in real where l.pinPath != nil { l.release() }
        closeAll(links.filter { ($0 as? UprobeMultiLink)?.pinPath == nil })
    }

    public func readCounter(slot: UInt32) throws(KernelError) -> UInt64 {
        try program.readCounter(slot: slot)
    }
}
