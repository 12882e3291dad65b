import SystemPackage

/// The pinned `counters` and `overlap` maps of a previous `slot_capacity`. A start with another
/// capacity cannot adopt them (an array map's size is fixed), so it creates maps of the new
/// size and pins them in their place, while the links found pinned still count into these.
/// The start moves those links to the new maps make-before-break (a new link of the new
/// program on the same slots; both programs share the `marks` map, and `setOverlap` raises
/// the flag in both `overlap` maps, so the hand-off is the usual one), then reads what each
/// slot counted here (`resizedCount`) into its registration's base, and lets go of them.
struct ResizedCounters: Sendable {
    var counters: (fd: FileDescriptor, entries: UInt32)?
    var overlap: (fd: FileDescriptor, entries: UInt32)?

    init?(counters: (fd: FileDescriptor, entries: UInt32)?, overlap: (fd: FileDescriptor, entries: UInt32)?) {
        guard counters != nil || overlap != nil else { return nil }
        self.counters = counters
        self.overlap = overlap
    }
}

extension CounterProgram {
    /// The number of slots of the replaced counters map, when this start resized it.
    public var resizedFrom: UInt32? { previous.withLock { $0?.counters?.entries } }

    /// Raises or clears the hand-off flag of `slots` in the replaced `overlap` map too, for
    /// the old program still running there (slots beyond its size have no link there).
    func setResizedOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) {
        guard let old = previous.withLock({ $0?.overlap }) else { return }
        let inside = slots.filter { $0 < old.entries }
        do {
            try updateBatch(old.fd, keys: inside, values: [UInt32](repeating: on ? 1 : 0, count: inside.count), valueSize: 4)
        } catch {
            throw KernelError(code: .mapOpFailed, error, context: "previous overlap (\(inside.count) slots)")
        }
    }

    /// What `slot` counted in the replaced counters map (nil if there is none, or the slot is
    /// beyond it). Exact once no link counts there any more.
    public func resizedCount(slot: UInt32) -> UInt64? {
        guard let old = previous.withLock({ $0?.counters }), slot < old.entries else { return nil }
        var key = slot, value: UInt64 = 0
        guard (try? BPFSyscall.mapLookup(old.fd, key: &key, value: &value)) == true else { return nil }
        return value
    }

    /// Closes the replaced maps (the kernel frees them with their last program).
    public func dropResizedMaps() {
        let old = previous.withLock { p -> ResizedCounters? in
            defer { p = nil }
            return p
        }
        try? old?.counters?.fd.close()
        try? old?.overlap?.fd.close()
    }
}
