import Foundation
import Testing
@testable import UprobeCore
import UprobeELF
import UprobeKernel

/// `stats` with `top`/`sort` (issue 26): the rows picked while reading are exactly the first
/// rows of the whole table in that order, and selections by path and symbol glob pick the
/// registrations they name.
struct StatsTopTests {
    /// `n` registrations p1…pn: one site each (slot i-1) on /bin/a (odd) or /lib/b.so (even),
    /// symbol `f<i>`; every seventh has two sites (not a plain row), every fifth a consumer.
    static func registry(_ n: Int) -> ProbeMap {
        var map = ProbeMap()
        let now = ContinuousClock.now - .seconds(10)
        for i in 1...n {
            let path = i % 2 == 1 ? "/bin/a" : "/lib/b.so"
            func target(_ off: UInt64) -> ResolvedProbe {
                ResolvedProbe(path: path, device: 1, inode: UInt64(i % 2), buildID: nil, fileOffset: off, symbol: "f\(i)")
            }
            var sites = [ProbeSite(target: target(UInt64(i)), slot: UInt32(i - 1))]
            if i % 7 == 0 { sites.append(ProbeSite(target: target(UInt64(i) + 100_000), slot: UInt32(n + i))) }
            map.insert(ProbeRecord(id: ProbeID.make(UInt64(i)), consumer: i % 5 == 0 ? "five" : nil, owner: .daemon,
                                   spec: ProbeSpecInput(path: path, symbol: "f*"), sites: sites, registeredAt: 0,
                                   registeredAtMonotonic: now, state: .active, baseHits: UInt64(i % 3), targets: sites.map(\.target)))
        }
        return map
    }

    static func rows(_ t: StatsTable) -> [String] { (0..<t.count).map { "\(t.id($0))=\(t.hits[$0])" } }

    @Test("top N while reading equals the whole table ordered and cut, for hits, rate and id, with ties in id order")
    func topMatchesOrdered() throws {
        let n = 300
        let map = Self.registry(n)
        // Counts with many ties (i % 13) and the second sites' counters too.
        let counts = (0..<(2 * n + 1)).map { UInt64(($0 * 7919) % 13) }
        for order in [StatsTable.Order.hits, .rate, .id] {
            for top in [1, 5, 100, n, n + 10] {
                let whole = try StatsTable.make(map, counts: counts, ids: nil, consumer: nil, allVersions: false, now: 100).get()
                let picked = try StatsTable.make(map, counts: counts, ids: nil, consumer: nil, allVersions: false, now: 100,
                                                 order: order, top: top).get()
                let expected = whole.ordered(by: order, top: top)
                #expect(Self.rows(picked) == Self.rows(expected), "\(order) top \(top)")
                #expect(picked.total == n && expected.total == n)
            }
        }
        // The whole table sorted by hits is descending, ties ascending by id.
        let sorted = try StatsTable.make(map, counts: counts, ids: nil, consumer: nil, allVersions: false, now: 100).get()
            .ordered(by: .hits, top: nil)
        for i in 1..<sorted.count {
            let (a, b) = (sorted.hits[i - 1], sorted.hits[i])
            #expect(a > b || (a == b && ProbeID.number(sorted.id(i - 1))! < ProbeID.number(sorted.id(i))!))
        }
    }

    @Test("selections: path (full, file name, glob), symbol glob, consumer, owner")
    func selections() throws {
        let map = Self.registry(40)
        let counts = [UInt64](repeating: 1, count: 81)
        func total(_ s: ProbeSelection, consumer: String? = nil) throws -> Int {
            try StatsTable.make(map, counts: counts, ids: nil, consumer: consumer, allVersions: false, now: 100, match: s,
                                order: .hits, top: 3).get().total
        }
        #expect(try total(ProbeSelection(path: "/bin/a")) == 20)
        #expect(try total(ProbeSelection(path: "b.so")) == 20)
        #expect(try total(ProbeSelection(path: "/lib/*")) == 20)
        #expect(try total(ProbeSelection(path: "*")) == 40)
        #expect(try total(ProbeSelection(symbol: "f1?")) == 10)
        #expect(try total(ProbeSelection(path: "/bin/a", symbol: "f1?")) == 5)
        #expect(try total(ProbeSelection(path: "nothing")) == 0)
        #expect(try total(ProbeSelection(symbol: "f*"), consumer: "five") == 8)
        #expect(try total(ProbeSelection(ownerUID: 1000)) == 0)
        var m = ProbeSelection(consumer: "five", path: "/lib/b.so").matcher()
        var ids: [String] = []
        map.forEach { if m.matches($0) { ids.append($0.id) } }
        #expect(ids == ["p10", "p20", "p30", "p40"])
    }

    /// A histogram of `calls` entered, of which `durations` returned.
    static func histogram(calls: UInt64, durations: [UInt64]) -> LatencyHistogram {
        var h = LatencyHistogram()
        h.calls = calls
        h.returns = UInt64(durations.count)
        h.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        for d in durations {
            h.buckets[LatencyHistogram.bucket(of: d)] += 1
            h.sumNanoseconds += d
        }
        h.minNanoseconds = durations.min() ?? 0
        h.maxNanoseconds = durations.max() ?? 0
        return h
    }

    @Test("latency orders: calls, p50, p99, max rank latency probes most first; no value, then counting probes, last")
    func latencyOrders() throws {
        // p1, p5: counting probes with the most hits. p2: 10 calls of 1 µs (its kernel row, read
        // through the slot). p3: 4 calls of 100 ns and one of 1 ms (median low, tail high).
        // p4: 3 calls, none returned. p6: 20 calls of 50 µs. p2..p6 latency ones from saved bases.
        let live = Self.histogram(calls: 10, durations: [UInt64](repeating: 1_000, count: 10))
        let bases: [Int: LatencyHistogram] = [
            3: Self.histogram(calls: 5, durations: [100, 100, 100, 100, 1_000_000]),
            4: Self.histogram(calls: 3, durations: []),
            6: Self.histogram(calls: 20, durations: [UInt64](repeating: 50_000, count: 20)),
        ]
        var map = ProbeMap()
        let now = ContinuousClock.now - .seconds(10)
        for i in 1...6 {
            let latency = i != 1 && i != 5
            let target = ResolvedProbe(path: "/bin/a", device: 1, inode: 1, buildID: nil, fileOffset: UInt64(i), symbol: "f\(i)")
            let sites = [ProbeSite(target: target, slot: UInt32(i - 1))]
            map.insert(ProbeRecord(id: ProbeID.make(UInt64(i)), consumer: nil, owner: .daemon,
                                   spec: ProbeSpecInput(path: "/bin/a", symbol: "f\(i)", latency: latency), sites: sites,
                                   registeredAt: 0, registeredAtMonotonic: now, state: .active, baseHits: latency ? 0 : 1_000,
                                   targets: sites.map(\.target), baseLatency: bases[i]))
        }
        let counts = [UInt64](repeating: 0, count: 6)
        let read: (UInt32) -> LatencyHistogram? = { $0 == 1 ? live : nil }
        let expected: [(StatsTable.Order, [String])] = [
            (.calls, ["p6", "p2", "p3", "p4", "p1", "p5"]),
            (.p50, ["p6", "p2", "p3", "p4", "p1", "p5"]),
            (.p99, ["p3", "p6", "p2", "p4", "p1", "p5"]),
            (.max, ["p3", "p6", "p2", "p4", "p1", "p5"]),
        ]
        for (order, ids) in expected {
            // Picked during the walk, for every cut…
            for top in 1...7 {
                let picked = try StatsTable.make(map, counts: counts, ids: nil, consumer: nil, allVersions: false, now: 100,
                                                 order: order, top: top, latency: read).get()
                #expect((0..<picked.count).map(picked.id) == Array(ids.prefix(top)), "\(order) top \(top)")
                #expect(picked.total == 6)
            }
            // …and the whole table ordered afterwards (a request naming ids) agree.
            let whole = try StatsTable.make(map, counts: counts, ids: ["p1", "p2", "p3", "p4", "p5", "p6"], consumer: nil,
                                            allVersions: false, now: 100, latency: read).get().ordered(by: order, top: nil)
            #expect((0..<whole.count).map(whole.id) == ids, "\(order)")
        }
    }
}
