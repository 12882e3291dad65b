import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A latency link found pinned at start: held open again as a `LatencyLink` (its `close()`
/// drains, unpins, detaches and settles like any latency link's), with what the kernel says it
/// probes.
public struct PinnedLatencyLink: Sendable {
    public let link: LatencyLink
    public let info: UprobeMultiLinkInfo
    /// The counter slot of each offset (the low half of its cookie).
    public var slots: [UInt32] { info.cookies.map { UInt32(truncatingIfNeeded: $0) } }
}

extension LatencyProgram {
    /// Opens every latency link pinned under the pin directory's `latency/` (oldest generation
    /// first) and takes their rows back: each slot of these links keeps the row the pinned
    /// `lat_row_of` map gives it (that map is what the program reads, so it is the allocation
    /// of record), and its newest link's tag (so the next link of the slot takes the other
    /// phase). Every other row is made free, and zeroed if an earlier life left counts in it
    /// (a row is dirty only if calls entered it). Pins that are no latency link of ours are
    /// unpinned (their links detached) and reported.
    ///
    /// Only valid at start, before any latency link is attached by this process.
    public func pinnedLinks() -> (links: [PinnedLatencyLink], unusable: [UnusablePin]) {
        guard let pins = counter.pins else { return ([], []) }
        let found = pins.openLinkPins(in: pins.latencyLinksPath, pinPath: pins.latencyLinkPath)
        var unusable = found.unusable
        var links: [PinnedLatencyLink] = []
        for pin in found.opened {
            let (g, path, fd, info) = (pin.generation, pin.path, pin.fd, pin.info)
            // Cookie: (tag << 32) | slot, tag = generation << 1 | phase.
            let tags = info.cookies.map { UInt32($0 >> 32) }
            let slots = info.cookies.map { UInt32(truncatingIfNeeded: $0) }
            let rows = slots.map { $0 < counter.capacity ? row(of: $0) : nil }
            guard !info.cookies.isEmpty, !info.retprobe, tags.allSatisfy({ $0 >> 1 == g }),
                  rows.allSatisfy({ $0 != nil }) else {
                // Detached at once: no call through it is measured into a row anyone keeps.
                UprobeMultiLink(fd: fd, generation: g, offsetCount: info.offsets.count, pinPath: path).close()
                unusable.append(UnusablePin(path: path, reason: "its cookies are not generation \(g)'s latency slots with rows; detached"))
                continue
            }
            let sites = (0..<slots.count).map { LatencyLink.Site(slot: slots[$0], row: rows[$0] ?? 0, tag: tags[$0]) }
            links.append(PinnedLatencyLink(link: LatencyLink(fd: fd, generation: g, sites: sites, program: self, pinPath: path),
                                           info: info))
        }
        table.withLock { t in
            var used = Set<UInt32>()
            for l in links {
                for s in l.link.sites {
                    t.rowOfSlot[s.slot] = s.row
                    t.newestTag[s.slot] = s.tag  // links come oldest first: the newest one's tag stays
                    used.insert(s.row)
                }
            }
            t.highWater = used.max().map { $0 + 1 } ?? 0
            t.free = (0..<t.highWater).reversed().filter { !used.contains($0) }
            for r in 0..<rowCapacity where !used.contains(r) && isDirty(row: r) { mapping.zero(row: Int(r)) }
        }
        return (links, unusable)
    }

    /// The row `lat_row_of` gives `slot`, nil if none (or one beyond the row map).
    private func row(of slot: UInt32) -> UInt32? {
        var key = slot, value: UInt32 = 0
        guard (try? BPFSyscall.mapLookup(rowOf, key: &key, value: &value)) == true, value > 0, value - 1 < rowCapacity else { return nil }
        return value - 1
    }

    /// Whether a row holds anything: every count of a row follows a call entered into it.
    private func isDirty(row: UInt32) -> Bool {
        let w = { (i: Int) in self.mapping.word(row: Int(row), i).pointee.load(ordering: .relaxed) }
        return w(Layout.callsPhase) != 0 || w(Layout.callsPhase + 1) != 0
    }

    /// Ends every hand-off of latency links at start (see `CounterProgram.endAllHandoffs`, which
    /// clears the shared `overlap` flags): deletes every mark of this program's own map.
    public func endAllHandoffs() throws(KernelError) {
        try CounterProgram.deleteAll(marks)
    }
}
