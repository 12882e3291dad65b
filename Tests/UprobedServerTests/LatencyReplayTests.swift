import Testing
import UprobeKernel
@testable import UprobedServer

/// `LatencyReplay`: the durations it records reproduce the kernel's histogram exactly (every
/// bucket, the sum, the shortest and the longest call), export after export.
struct LatencyReplayTests {
    /// What an instrument that takes single values keeps of them.
    struct Recorded {
        var buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        var count: UInt64 = 0
        var sum: UInt64 = 0
        var min: UInt64?
        var max: UInt64?
        mutating func add(_ ns: UInt64, _ times: UInt64) {
            buckets[LatencyHistogram.bucket(of: ns)] += times
            count += times
            sum += ns * times
            min = Swift.min(min ?? ns, ns)
            max = Swift.max(max ?? ns, ns)
        }
    }

    static func add(_ durations: [UInt64], to h: inout LatencyHistogram) {
        if h.buckets.isEmpty { h.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount) }
        for d in durations {
            h.buckets[LatencyHistogram.bucket(of: d)] += 1
            h.sumNanoseconds += d
            h.minNanoseconds = h.returns == 0 ? d : Swift.min(h.minNanoseconds, d)
            h.maxNanoseconds = Swift.max(h.maxNanoseconds, d)
            h.returns += 1
            h.calls += 1
        }
    }

    @Test("random durations over several exports: buckets, count, sum, min and max equal the kernel's; nothing recorded when nothing returned")
    func exactOverExports() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var h = LatencyHistogram()
            var replay = LatencyReplay()
            var got = Recorded()
            for _ in 0..<4 {
                // Durations from 0 ns to beyond the overflow bound, with powers of two and repeats.
                let n = Int.random(in: 0...60, using: &rng)
                let durations: [UInt64] = (0..<n).map { _ in
                    switch Int.random(in: 0..<4, using: &rng) {
                    case 0: return UInt64.random(in: 0...200, using: &rng)
                    case 1: return UInt64(1) << UInt64.random(in: 3...43, using: &rng)
                    case 2: return UInt64.random(in: 1_000...5_000_000, using: &rng)
                    default: return UInt64.random(in: 0...(UInt64(1) << 44), using: &rng)
                    }
                }
                Self.add(durations, to: &h)
                #expect(replay.advance(to: h) { got.add($0, $1) } != nil)
                #expect(got.count == h.returns)
                #expect(got.buckets == (h.buckets.isEmpty ? got.buckets.map { _ in 0 } : h.buckets))
                #expect(got.sum == h.sumNanoseconds, "sum \(got.sum) vs \(h.sumNanoseconds)")
                if h.returns > 0 {
                    #expect(got.min == h.minNanoseconds && got.max == h.maxNanoseconds)
                } else {
                    #expect(got.min == nil && got.max == nil)
                }
            }
        }
    }

    @Test("a histogram with fewer calls in a bucket than recorded is refused (a new series); a sum read ahead of its buckets is carried over")
    func refusalAndCarry() {
        var h = LatencyHistogram()
        Self.add([1_000, 2_000, 3_000], to: &h)
        var replay = LatencyReplay()
        var got = Recorded()
        #expect(replay.advance(to: h) { got.add($0, $1) } == 3)
        var smaller = LatencyHistogram()
        Self.add([1_000], to: &smaller)
        var called = false
        #expect(replay.advance(to: smaller) { _, _ in called = true } == nil)
        #expect(!called)
        // A read that saw a call's sum but not yet its bucket: the sum is ahead.
        var torn = h
        torn.sumNanoseconds += 5_000
        #expect(replay.advance(to: torn) { got.add($0, $1) } == 0)
        #expect(got.count == 3 && got.sum == h.sumNanoseconds)
        // The bucket arrives: the sum is exact again.
        var whole = h
        Self.add([5_000], to: &whole)
        #expect(replay.advance(to: whole) { got.add($0, $1) } == 1)
        #expect(got.count == 4 && got.sum == whole.sumNanoseconds && got.buckets == whole.buckets)
    }

    @Test("a backlog larger than the budget is recorded over several exports, never more than the budget each, and comes out exact")
    func budgetCatchesUp() {
        var rng = SystemRandomNumberGenerator()
        for budget: UInt64 in [1, 2, 7, 100, 1_000] {
            var h = LatencyHistogram()
            Self.add((0..<2_000).map { _ in UInt64.random(in: 50...3_000_000, using: &rng) }, to: &h)
            var replay = LatencyReplay()
            var got = Recorded()
            var exports = 0
            while got.count < h.returns {
                let before = got.count
                let done = replay.advance(to: h, budget: budget) { got.add($0, $1) }
                #expect(done == got.count - before && (done ?? 0) <= budget && (done ?? 0) > 0, "budget \(budget): \(String(describing: done))")
                // The shortest and longest come first: exact from the first export on (with a
                // budget of one, the longest from the second).
                if budget >= 2 || exports >= 1 { #expect(got.min == h.minNanoseconds && got.max == h.maxNanoseconds) }
                exports += 1
                if exports > 10_000 { break }
                // New calls arrive meanwhile, now and then.
                if exports % 3 == 0 { Self.add([UInt64.random(in: 50...3_000_000, using: &rng)], to: &h) }
            }
            #expect(got.count == h.returns && got.buckets == h.buckets && got.sum == h.sumNanoseconds,
                    "budget \(budget): \(got.count) of \(h.returns), sum \(got.sum) vs \(h.sumNanoseconds), \(exports) exports")
            #expect(budget >= 2_000 || exports > 1)
        }
    }
}
