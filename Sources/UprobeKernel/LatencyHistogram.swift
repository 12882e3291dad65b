/// The call-duration histogram of one latency probe: exact counts and log-linear buckets.
///
/// Buckets (the BPF program computes the same index without loops, see `LatencyProgram`):
/// durations 0..7 ns have a bucket each; above, each power of two [2^k, 2^(k+1)) is split into
/// 8 equal sub-buckets of width 2^(k-3), up to 2^42 ns (~73 minutes); longer calls share one
/// overflow bucket. A bucket's width is at most 1/8 of its lower bound, so a value reported as
/// the middle of its bucket is within 1/16 (6.25%) of every duration in it. BCC's
/// `funclatency` and bpftrace's `hist()` use one bucket per power of two: up to 100% off.
public struct LatencyHistogram: Sendable, Equatable {
    /// Sub-buckets per power of two (2^subBits).
    public static let subBits = 3
    public static let subBuckets = 1 << subBits
    /// The highest power of two with its own buckets: 2^42 ns ≈ 73.3 min > 1 h.
    public static let topPower = 41
    /// Index of the overflow bucket (durations ≥ 2^(topPower+1) ns); also the count - 1.
    public static let overflowIndex = (topPower - subBits + 2) * subBuckets
    public static let bucketCount = overflowIndex + 1

    /// Calls entered.
    public var calls: UInt64 = 0
    /// Calls seen returning (each has its duration in `buckets` and `sumNanoseconds`).
    public var returns: UInt64 = 0
    /// Calls whose return can no longer be seen: they were still running through a link that
    /// a rebuild had to close after waiting `LatencyProgram.drainLimit` (see there).
    public var unobserved: UInt64 = 0
    public var sumNanoseconds: UInt64 = 0
    /// Shortest and longest returned call; 0 when none returned.
    public var minNanoseconds: UInt64 = 0
    public var maxNanoseconds: UInt64 = 0
    /// Counts per bucket, `bucketCount` of them (or empty: all zero).
    public var buckets: [UInt64] = []

    public init() {}

    /// Entered and not (yet) seen returning: long calls, and calls that never return normally
    /// (`longjmp` past the frame, thread or process exit in the call).
    public var inFlight: UInt64 { calls &- returns &- unobserved }

    /// The bucket of a duration.
    public static func bucket(of ns: UInt64) -> Int {
        if ns < UInt64(subBuckets) { return Int(ns) }
        let k = 63 - ns.leadingZeroBitCount
        if k > topPower { return overflowIndex }
        let sub = Int((ns >> UInt64(k - subBits)) & UInt64(subBuckets - 1))
        return (k - subBits + 1) * subBuckets + sub
    }

    /// The durations of bucket `i`: [lower, upper) in ns; the overflow bucket's upper is nil.
    public static func bounds(_ i: Int) -> (lower: UInt64, upper: UInt64?) {
        if i < subBuckets { return (UInt64(i), UInt64(i) + 1) }
        if i >= overflowIndex { return (1 << UInt64(topPower + 1), nil) }
        let k = i / subBuckets + subBits - 1, sub = i % subBuckets
        let width = UInt64(1) << UInt64(k - subBits)
        let lower = (UInt64(subBuckets + sub)) << UInt64(k - subBits)
        return (lower, lower + width)
    }

    /// The non-empty buckets as (lower, upper, count); the overflow bucket's upper is nil.
    public var nonEmptyBuckets: [(lower: UInt64, upper: UInt64?, count: UInt64)] {
        buckets.indices.compactMap { i in
            buckets[i] == 0 ? nil : { let b = Self.bounds(i); return (b.lower, b.upper, buckets[i]) }()
        }
    }

    /// The q-quantile (0 < q ≤ 1) of the returned calls' durations: the middle of the bucket
    /// holding the ⌈q·n⌉-th shortest, kept within [min, max]; nil when none returned.
    public func quantile(_ q: Double) -> UInt64? {
        let n = buckets.reduce(0, &+)
        guard n > 0 else { return nil }
        let rank = max(1, UInt64((q * Double(n)).rounded(.up)))
        var seen: UInt64 = 0
        for (i, c) in buckets.enumerated() where c > 0 {
            seen &+= c
            guard seen >= rank else { continue }
            let b = Self.bounds(i)
            // Durations are whole nanoseconds: the bucket holds lower ... upper-1.
            var v = b.upper.map { b.lower + ($0 - 1 - b.lower) / 2 } ?? b.lower
            if maxNanoseconds > 0 { v = min(max(v, minNanoseconds), maxNanoseconds) }
            return v
        }
        return nil
    }

    /// Adds another histogram (a site's to a probe's, the live one to the saved base).
    public mutating func add(_ o: LatencyHistogram) {
        if o.returns > 0 {
            minNanoseconds = returns == 0 ? o.minNanoseconds : min(minNanoseconds, o.minNanoseconds)
            maxNanoseconds = max(maxNanoseconds, o.maxNanoseconds)
        }
        calls &+= o.calls
        returns &+= o.returns
        unobserved &+= o.unobserved
        sumNanoseconds &+= o.sumNanoseconds
        if !o.buckets.isEmpty {
            if buckets.isEmpty { buckets = o.buckets } else {
                for i in 0..<min(buckets.count, o.buckets.count) { buckets[i] &+= o.buckets[i] }
            }
        }
    }

    /// What happened between `earlier` and this reading of the same probe (a `watch`
    /// interval): counts and buckets subtracted; min and max from the interval's lowest and
    /// highest non-empty bucket (within bucket precision), kept within the totals' range.
    public func since(_ earlier: LatencyHistogram) -> LatencyHistogram {
        var d = LatencyHistogram()
        d.calls = calls &- earlier.calls
        d.returns = returns &- earlier.returns
        d.unobserved = unobserved &- earlier.unobserved
        d.sumNanoseconds = sumNanoseconds &- earlier.sumNanoseconds
        if !buckets.isEmpty {
            d.buckets = buckets
            if !earlier.buckets.isEmpty {
                for i in 0..<min(buckets.count, earlier.buckets.count) { d.buckets[i] &-= earlier.buckets[i] }
            }
            if let lo = d.buckets.firstIndex(where: { $0 > 0 }), let hi = d.buckets.lastIndex(where: { $0 > 0 }) {
                d.minNanoseconds = max(Self.bounds(lo).lower, minNanoseconds)
                d.maxNanoseconds = min(Self.bounds(hi).upper.map { $0 - 1 } ?? maxNanoseconds, maxNanoseconds)
                if d.minNanoseconds > d.maxNanoseconds { d.minNanoseconds = d.maxNanoseconds }
            }
        }
        return d
    }
}
