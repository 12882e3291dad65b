import Foundation
import Testing
@testable import UprobeCore
import UprobeELF

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
}
