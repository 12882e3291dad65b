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
    /// Told every released slot (the kernel frees what it kept per slot: latency rows).
    private let released: ([UInt32]) -> Void

    init(capacity: UInt32, released: @escaping ([UInt32]) -> Void = { _ in }) {
        self.capacity = capacity
        self.released = released
    }

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

    /// Marks `slots` in use: links adopted at start count into them. Slots already in use
    /// are ignored.
    mutating func claim(_ slots: [UInt32]) {
        var claimed = Set(slots)
        guard !claimed.isEmpty else { return }
        if let top = claimed.max(), top >= highWater {
            // Slots between the old and the new high-water mark that nobody claims are free.
            for s in highWater...top where !claimed.contains(s) { freeBelowHighWater.append(s) }
            for s in highWater...top where claimed.contains(s) { inUse += 1; claimed.remove(s) }
            highWater = top + 1
        }
        let before = freeBelowHighWater.count
        freeBelowHighWater.removeAll { claimed.contains($0) }
        inUse += before - freeBelowHighWater.count
        freeBelowHighWater.sort(by: >)
    }

    mutating func release(_ slots: [UInt32]) {
        guard !slots.isEmpty else { return }
        released(slots)
        inUse -= slots.count
        freeBelowHighWater.append(contentsOf: slots)
        freeBelowHighWater.sort(by: >)
        // Shrink the high-water mark when the top slots are free, so reads stay short: the
        // free run at the top is dropped in one go (one removeFirst per slot moved the whole
        // array each time, which for the 10,000 slots of a churn ending was quadratic).
        var top = 0
        while top < freeBelowHighWater.count, freeBelowHighWater[top] == highWater - 1 - UInt32(top) { top += 1 }
        freeBelowHighWater.removeFirst(top)
        highWater -= UInt32(top)
        freeBelowHighWater.shrinkIfSparse()
    }

    /// Bytes the free list holds (tests: a bulk's list goes with its slots).
    var freeListCapacity: Int { freeBelowHighWater.capacity }
}

extension Array {
    /// Gives back the storage of an array that has shrunk to a quarter of its capacity, once
    /// the capacity is large: a whole binary's 241,000 slots left their tables allocated at
    /// that size after every probe was gone. Small arrays keep theirs (a batch refills them).
    /// Over a run of shrinking calls, each element is copied O(1) times.
    mutating func shrinkIfSparse() {
        guard capacity > Self.keptCapacity, count < capacity / 4 else { return }
        var smaller: [Element] = []
        smaller.reserveCapacity(Swift.max(count * 2, Self.keptCapacity / 4))
        smaller.append(contentsOf: self)
        self = smaller
    }

    private static var keptCapacity: Int { 4096 }
}

/// Slots as a bitmap. Slots are small and dense (handed out lowest first), so membership is a
/// shift and a mask, where a `Set<UInt32>` hashed every slot: the detach bookkeeping tests
/// each site of every link it rebuilds, 10,000 of them for one large unregister.
struct SlotSet: Sequence {
    private var words: [UInt64] = []
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    func contains(_ slot: UInt32) -> Bool {
        let w = Int(slot >> 6)
        return w < words.count && words[w] & (1 << UInt64(slot & 63)) != 0
    }

    mutating func insert(_ slot: UInt32) {
        let w = Int(slot >> 6), bit: UInt64 = 1 << UInt64(slot & 63)
        if w >= words.count { words += repeatElement(0, count: w + 1 - words.count) }
        guard words[w] & bit == 0 else { return }
        words[w] |= bit
        count += 1
    }

    mutating func remove(_ slot: UInt32) {
        let w = Int(slot >> 6), bit: UInt64 = 1 << UInt64(slot & 63)
        guard w < words.count, words[w] & bit != 0 else { return }
        words[w] &= ~bit
        count -= 1
        if count == 0 { words.removeAll(keepingCapacity: true) }
    }

    mutating func formUnion<S: Sequence<UInt32>>(_ slots: S) { for s in slots { insert(s) } }
    mutating func subtract<S: Sequence<UInt32>>(_ slots: S) { for s in slots { remove(s) } }

    /// The slots in ascending order.
    struct Iterator: IteratorProtocol {
        fileprivate let words: [UInt64]
        fileprivate var index = 0
        fileprivate var current: UInt64 = 0
        mutating func next() -> UInt32? {
            while current == 0 {
                guard index < words.count else { return nil }
                current = words[index]
                index += 1
            }
            let bit = current.trailingZeroBitCount
            current &= current - 1
            return UInt32((index - 1) << 6 + bit)
        }
    }
    func makeIterator() -> Iterator { Iterator(words: words) }
    var underestimatedCount: Int { count }
}

/// A value per slot in an array indexed by slot (see `SlotSet`), grown as slots are set.
struct SlotTable<Value: AnyObject> {
    private var values: [Value?] = []

    subscript(slot: UInt32) -> Value? {
        get { Int(slot) < values.count ? values[Int(slot)] : nil }
        set {
            let i = Int(slot)
            if i >= values.count {
                guard newValue != nil else { return }
                values += repeatElement(nil, count: i + 1 - values.count)
            }
            values[i] = newValue
            if newValue == nil && i == values.count - 1 {
                // The table ends at the highest slot set: reads stay short, and a bulk's table
                // goes with its slots (see `shrinkIfSparse`).
                while let last = values.last, last == nil { values.removeLast() }
                values.shrinkIfSparse()
            }
        }
    }

    mutating func removeAll() { values.removeAll() }

    /// Entries the table has room for (tests).
    var capacity: Int { values.capacity }
}
