/// Hands out counter slots, lowest first (so a bulk counter read covers a short prefix).
///
/// Owned by the writer thread. A slot goes back to the free pool only after every link that
/// could still count into it has been closed (a grace period) and its counters were zeroed —
/// the caller enforces that by calling `release` only at that point.
struct SlotAllocator {
    let capacity: UInt32
    /// Free slots below `highWater`, kept as a max-heap by negation would be faster; a sorted
    /// array is simple and allocation volume is bounded by batch size.
    private var freeBelowHighWater: [UInt32] = []  // sorted descending: popLast() is the lowest
    private(set) var highWater: UInt32 = 0
    private(set) var inUse: Int = 0

    init(capacity: UInt32) { self.capacity = capacity }

    var available: Int { Int(capacity - highWater) + freeBelowHighWater.count }

    /// Allocates `n` slots or none.
    mutating func allocate(_ n: Int) -> [UInt32]? {
        guard n <= available else { return nil }
        var out: [UInt32] = []
        out.reserveCapacity(n)
        while out.count < n, let s = freeBelowHighWater.popLast() { out.append(s) }
        while out.count < n { out.append(highWater); highWater += 1 }
        inUse += n
        return out
    }

    mutating func release(_ slots: [UInt32]) {
        guard !slots.isEmpty else { return }
        inUse -= slots.count
        freeBelowHighWater.append(contentsOf: slots)
        freeBelowHighWater.sort(by: >)
        // Shrink the high-water mark when the top slots are free, so reads stay short.
        while let lowest = freeBelowHighWater.first, lowest == highWater - 1 {
            freeBelowHighWater.removeFirst()
            highWater -= 1
        }
    }
}
