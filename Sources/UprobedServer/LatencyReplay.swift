import UprobeKernel

/// Carries a latency probe's histogram into a histogram instrument that only takes single
/// observations (swift-metrics' `Recorder`, as swift-otel implements it: it keeps the count,
/// sum, min, max and bucket counts of the values recorded into it).
///
/// The kernel has already bucketed every call; what it does not keep is each duration. So at
/// each export the calls that returned since the previous one are recorded as durations chosen
/// to reproduce what the kernel counted: each in its own bucket of the daemon's (so every
/// coarser bucket count is exact), the shortest and longest call exactly (`min_ns`, `max_ns`),
/// and the others spread within their buckets so that the recorded sum equals `sum_ns`. Such
/// durations always exist (the real ones are one choice). Work is done at export time only,
/// one `record` per call returned since the previous export; nothing on the probe's path.
///
/// An export records at most `budget` calls: a backlog larger than that (a probe's first
/// export after a restart brings back its saved calls) is recorded over several exports, the
/// same share of every bucket each time, the rest of the sum kept for the calls still to come,
/// so the instrument catches up exactly instead of one export taking minutes.
///
/// The kernel updates a bucket and the sum of a call with separate atomic adds, so a read
/// while calls return can see one without the other: what does not fit this time (a sum ahead
/// of its buckets) is carried into the next export.
struct LatencyReplay: Sendable {
    /// The daemon's bucket counts recorded so far (empty: none).
    private(set) var buckets: [UInt64] = []
    /// Sum, shortest and longest of the durations recorded so far.
    private(set) var sumNanoseconds: UInt64 = 0
    private(set) var minNanoseconds: UInt64?
    private(set) var maxNanoseconds: UInt64?

    /// Records (`record(duration_ns, times)`) what `h` holds beyond what was recorded before,
    /// at most `budget` calls; returns how many it recorded. Nil, recording nothing, when `h`
    /// holds less in some bucket than was recorded (not the same histogram any more): the
    /// caller starts a new instrument and a new replay.
    mutating func advance(to h: LatencyHistogram, budget: UInt64 = .max, record: (UInt64, UInt64) -> Void) -> UInt64? {
        let n = LatencyHistogram.bucketCount
        if buckets.isEmpty { buckets = [UInt64](repeating: 0, count: n) }
        var delta = [UInt64](repeating: 0, count: n)
        var total: UInt64 = 0
        for i in 0..<n {
            let now = i < h.buckets.count ? h.buckets[i] : 0
            guard now >= buckets[i] else { return nil }
            delta[i] = now - buckets[i]
            total &+= delta[i]
        }
        guard total > 0, budget > 0 else { return 0 }

        // Durations a returned call can have: its bucket's, within the probe's min and max (a
        // read racing with returns may show a min or max the buckets do not hold yet: then the
        // bucket's bounds alone).
        func range(_ i: Int) -> (lo: UInt64, hi: UInt64) {
            let b = LatencyHistogram.bounds(i)
            let lower = b.lower, upper = b.upper.map { $0 - 1 } ?? Swift.max(b.lower, h.maxNanoseconds)
            let lo = Swift.max(lower, h.minNanoseconds), hi = Swift.min(upper, h.maxNanoseconds)
            return lo <= hi ? (lo, hi) : (lower, upper)
        }
        var recorded: UInt64 = 0, count: UInt64 = 0
        func put(_ v: UInt64, _ times: UInt64, bucket i: Int) {
            guard times > 0 else { return }
            record(v, times)
            recorded &+= v &* times
            count &+= times
            buckets[i] &+= times
            minNanoseconds = Swift.min(minNanoseconds ?? v, v)
            maxNanoseconds = Swift.max(maxNanoseconds ?? v, v)
        }
        // The new shortest and longest call, exactly, when their buckets have new calls.
        var fixed: [UInt64] = []
        if h.returns > 0 {
            if h.minNanoseconds < (minNanoseconds ?? .max) { fixed.append(h.minNanoseconds) }
            if h.maxNanoseconds > (maxNanoseconds ?? 0), !(fixed.first == h.maxNanoseconds) { fixed.append(h.maxNanoseconds) }
        }
        var fixedSum: UInt64 = 0
        for v in fixed where count < budget {
            let i = LatencyHistogram.bucket(of: v)
            guard delta[i] > 0 else { continue }
            delta[i] -= 1
            total -= 1
            fixedSum &+= v
            put(v, 1, bucket: i)
        }
        // The rest: a plan for every new call, each at its range's low end, then raised in order
        // until the sum is reached; of each bucket's planned calls, the budget's share.
        var low: UInt64 = 0, room: UInt64 = 0
        for i in 0..<n where delta[i] > 0 {
            let r = range(i)
            low &+= delta[i] &* r.lo
            room &+= delta[i] &* (r.hi - r.lo)
        }
        let target = h.sumNanoseconds > sumNanoseconds ? h.sumNanoseconds - sumNanoseconds : 0
        var raise = target > fixedSum &+ low ? Swift.min(target - fixedSum - low, room) : 0
        let left = budget - count
        // Of `c` planned calls, the share recorded now: all when the budget allows, else the
        // budget's fraction (at least one, so that every export makes progress) while it lasts.
        func share(_ c: UInt64) -> UInt64 {
            guard total > left else { return c }
            let fraction = UInt64((Double(c) * Double(left) / Double(total)).rounded(.down))
            return Swift.min(Swift.max(fraction, 1), c, budget - count)
        }
        for i in 0..<n where delta[i] > 0 {
            let r = range(i), c = delta[i]
            let here = Swift.min(raise, c &* (r.hi - r.lo))
            raise -= here
            let (q, extra) = here.quotientAndRemainder(dividingBy: c)
            // Planned: `extra` calls at lo + q + 1, the others at lo + q.
            let take = share(c)
            put(r.lo + q + 1, Swift.min(take, extra), bucket: i)
            put(r.lo + q, take - Swift.min(take, extra), bucket: i)
        }
        sumNanoseconds &+= recorded
        return count
    }
}
