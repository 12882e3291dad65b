import Foundation
import Logging
import Testing
@testable import UprobeCore
import UprobeELF

/// The bulk paths of a whole-binary register: records made and entered in runs must give the
/// same registry as one at a time, and names packed from bytes the same names as from Strings.
@Suite struct BulkRegisterTests {
    /// Records `p<first>…` sharing one request's terms (as a glob's do), one site each.
    static func run(_ numbers: ClosedRange<UInt64>, consumer: String?, terms: RequestTerms? = nil) -> [ProbeRecord] {
        let shared = terms ?? RequestTerms(consumer: consumer, owner: .daemon, spec: ProbeSpecInput(path: "/x", symbol: "*"),
                                           registeredAt: 1, registeredAtMonotonic: .now, probeSet: nil)
        return numbers.map { n in
            ProbeRecord(id: ProbeID.make(n), terms: shared, sites: ProbeSites(CollectionOfOne(ProbeSite(target: target("/x", inode: 1, offset: n * 16),
                                                                                                 slot: UInt32(n)))),
                        state: .active, baseHits: n % 3, targets: nil)
        }
    }

    /// The rows `stats` reads, with the records they sit beside, in id order.
    static func rows(_ m: ProbeMap) -> [String] {
        var out: [String] = []
        m.forEachRow(consumer: nil, wantsRecord: { _ in true }) { n, row, r in
            out.append("\(n.map(String.init) ?? r?.id ?? "?") c\(row.consumer) plain \(row.plain) slot \(row.slot) base \(row.baseHits) \(r.map { ObjectIdentifier($0).hashValue } ?? 0)")
        }
        return out
    }

    @Test("probe map: runs entered together (across chunks, over taken places, mixed terms and ids) equal one insert each")
    func insertContentsOf() {
        // Across the chunk boundary at 1024, a second request's run, a record replacing a
        // taken place, one consumer-less run and an id this daemon does not make.
        let a = Self.run(1000...1100, consumer: "whole")
        let b = Self.run(1101...1110, consumer: "other")
        let c = Self.run(5...9, consumer: nil)
        let replacing = Self.run(1050...1050, consumer: "other")
        let replacingRun = Self.run(1060...1061, consumer: "other")
        let odd = ProbeRecord(id: "custom", consumer: "whole", owner: .daemon, spec: ProbeSpecInput(path: "/x", symbol: "f"),
                              sites: [], registeredAt: 0, registeredAtMonotonic: .now, state: .active, baseHits: 0, targets: [])
        var one = ProbeMap(), bulk = ProbeMap()
        for batch in [a + b, c + [odd], replacing, replacingRun] {
            for r in batch { one.insert(r) }
            bulk.insert(contentsOf: batch)
        }
        #expect(bulk.count == one.count && bulk.count == 101 + 10 + 5 + 1)
        #expect(Self.rows(bulk) == Self.rows(one))
        #expect(bulk["p1050"] === replacing[0] && bulk["p1061"] === replacingRun[1] && bulk["custom"] === odd)
        // Consumer names are counted per record: removing every "whole" record drops the name.
        #expect(bulk.consumerKey("whole")?.records == one.consumerKey("whole")?.records)
        #expect(bulk.consumerKey("other")?.records == 13)
        for r in a where !["p1050", "p1060", "p1061"].contains(r.id) { bulk.remove(r.id) }
        bulk.remove("custom")
        #expect(bulk.consumerKey("whole") == nil && bulk.consumerNames == 1)
    }

    @Test("probe map: a run entered while a snapshot shares its chunk leaves the snapshot as it was")
    func insertContentsOfCopiesSharedChunk() {
        var m = ProbeMap()
        m.insert(contentsOf: Self.run(1...10, consumer: "a"))
        let snapshot = m
        m.insert(contentsOf: Self.run(11...20, consumer: "a"))
        #expect(snapshot.count == 10 && snapshot["p11"] == nil && snapshot.sorted.map(\.id) == (1...10).map { "p\($0)" })
        #expect(m.count == 20 && m["p20"] != nil)
    }

    @Test("names packed from bytes are the names packed from Strings; nil stays no name")
    func packFromBytes() throws {
        let names: [String?] = ["_ZN5swift3FooEv", nil, "", "ünïcödé", String(repeating: "x", count: 300)]
        let fromStrings = SymbolNames.pack(names)
        let utf8 = names.map { $0.map { Array($0.utf8) } }
        // Both ways a buffer keeps its bytes: in the object (small), in a store (large).
        for storeFrom in [nil, 1] as [Int?] {
            let fromBytes = SymbolNames.pack(count: utf8.count, utf8Count: { utf8[$0]?.count }, withUTF8: { i, write in
                utf8[i]?.withUnsafeBufferPointer(write)
            }, storeFrom: storeFrom)
            #expect(fromBytes.count == names.count)
            for (k, name) in names.enumerated() {
                if let name {
                    #expect(fromBytes[k].map { $0.names.name(at: $0.at) } == name)
                } else {
                    #expect(fromBytes[k] == nil)
                }
                #expect(fromBytes[k]?.at == fromStrings[k]?.at)
            }
            #expect(fromBytes.compactMap { $0 }.first?.names.byteCount == fromStrings.compactMap { $0 }.first?.names.byteCount)
        }
    }
}

/// A log handler that keeps what it is given (message and metadata), for `BatchTimings`.
final class KeptLog: LogHandler, @unchecked Sendable {
    // @unchecked: `kept` only behind `lock`.
    private let lock = NSLock()
    private var kept: [(String, Logger.Metadata)] = []
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String,
             function: String, line: UInt) {
        lock.lock(); kept.append(("\(message)", metadata ?? [:])); lock.unlock()
    }
    var lines: [(String, Logger.Metadata)] { lock.lock(); defer { lock.unlock() }; return kept }
}

@Suite struct BatchTimingsTests {
    @Test("batch timings: a bulk batch logs one line with each phase; a small one keeps and logs nothing")
    func bulkOnly() {
        let kept = KeptLog()
        let logger = Logger(label: "test") { _ in kept }
        var small = BatchTimings()
        small.keep(probes: BatchTimings.logMinimum - 1, firstPhase: "plan")
        small.mark("attach")
        small.note("attach_kernel", micros: 5)
        #expect(small.phases.isEmpty)
        small.log(logger, probes: BatchTimings.logMinimum - 1, what: "request batch")
        #expect(kept.lines.isEmpty)

        var bulk = BatchTimings()
        bulk.keep(probes: BatchTimings.logMinimum, firstPhase: "plan")
        usleep(2_000)
        bulk.mark("attach")
        bulk.note("attach_kernel", micros: 1234)
        bulk.log(logger, probes: BatchTimings.logMinimum, what: "request batch")
        #expect(bulk.phases.map(\.name) == ["plan", "attach", "attach_kernel"])
        let line = kept.lines
        #expect(line.count == 1 && line.first?.0 == "bulk batch timings: request batch")
        let meta = line.first?.1 ?? [:]
        #expect(meta["attach_kernel_us"] == "1234" && meta["probes"] == "\(BatchTimings.logMinimum)")
        #expect(UInt64("\(meta["attach_us"] ?? "0")") ?? 0 >= 2_000, "a phase is the time since the mark before it")
        #expect(meta["plan_us"] != nil && meta["total_us"] != nil)
    }
}
