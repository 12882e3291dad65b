import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// The symbol names of a large glob are compressed a while after its register
/// (`NameCompactor`): everything that reads them afterwards still sees each probe's own name.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct NamesCompactionTests {
    @Test("after a 10,000-function glob's names are compressed: list, list and stats by symbol glob and unregister by symbol glob name every probe right")
    func namesAfterCompaction() throws {
        let d = try TestDaemon(environment: ["UPROBED_TEST_NAMES_COMPACT_DELAY_MS": "300"])
        let many = try Fixtures.build("many", relative: "kernel/many.c")
        let bin = d.dir + "/many-names"
        try FileManager.default.copyItem(atPath: many, toPath: bin)
        // The name of every offset, from a `resolve` (its names are never compressed).
        let dry = try d.call(["op": "resolve", "probes": [spec(bin, symbol: "g*")]])
        var nameAt: [Int64: String] = [:]
        for p in dry["probes"]?.arrayValue ?? [] {
            if let o = p.objectValue, let off = o["offset"]?.int64Value, let s = o["symbol"]?.stringValue { nameAt[off] = s }
        }
        #expect(nameAt.count == 10_000 && Set(nameAt.values) == Set((0..<10_000).map { String(format: "g%04d", $0) }))
        let reg = try d.call(["op": "register", "consumer": "names", "reply": "compact", "probes": [spec(bin, symbol: "g*")]])
        #expect(reg["ok"] == .bool(true) && reg["count"] == .int(10_000), "\(JSONSerializer.serialize(.object(reg)).prefix(300))")

        // The one names buffer of the register is compressed (the resolve's was freed before its delay).
        var compacted: JSONObject = [:]
        try waitFor("the names compressed", seconds: 30) {
            compacted = try d.status()["names_compacted"]?.objectValue ?? [:]
            return compacted["buffers"] == .int(1)
        }
        let plain = compacted["plain_bytes"]?.int64Value ?? 0, stored = compacted["stored_bytes"]?.int64Value ?? 0
        #expect(plain >= 70_000 && stored > 0 && stored < plain / 2, "\(compacted)")

        // list: each probe's name is the one of its offset.
        let all = try d.list()
        #expect(all.count == 10_000)
        let wrong = all.values.filter { o in
            guard let off = o["offset"]?.int64Value else { return true }
            return o["symbol"]?.stringValue != nameAt[off]
        }
        #expect(wrong.isEmpty, "\(wrong.prefix(3))")
        // A glob over the symbols (every name matched), in list and stats.
        let listed = try d.call(["op": "list", "symbol": "g12*"])
        let listedNames = Set((listed["probes"]?.arrayValue ?? []).compactMap { $0.objectValue?["symbol"]?.stringValue })
        #expect(listedNames == Set((1200..<1300).map { String(format: "g%04d", $0) }), "\(listedNames.sorted().prefix(5))")
        // stats rows carry ids: they are the ids `list` names g99xx.
        let idsOf = { (prefix: String) in Set(all.filter { $0.value["symbol"]?.stringValue?.hasPrefix(prefix) ?? false }.map(\.key)) }
        let stats = try d.call(["op": "stats", "symbol": "g99*"])
        let statIDs = (stats["stats"]?.arrayValue ?? []).compactMap { $0.objectValue?["id"]?.stringValue }
        #expect(Set(statIDs) == idsOf("g99") && statIDs.count == 100)

        // stats top: the one function the binary calls, with its exact count.
        for _ in 0..<3 { try run([bin]) }
        let top = try d.call(["op": "stats", "top": 2])
        let rows = (top["stats"]?.arrayValue ?? []).compactMap(\.objectValue)
        #expect(rows.first?["id"]?.stringValue.flatMap { all[$0]?["symbol"] } == .string("g0000") && rows.first?["hits"] == .int(3), "\(rows)")
        #expect(rows.dropFirst().first?["hits"] == .int(0))

        // unregister by a symbol glob removes exactly those names.
        let rm = try d.call(["op": "unregister", "symbol": "g5*"])
        #expect(rm["removed"] == .int(1_000), "\(rm)")
        let left = try d.list()
        #expect(left.count == 9_000)
        #expect(!left.values.contains { $0["symbol"]?.stringValue?.hasPrefix("g5") ?? true })
        #expect(left.values.allSatisfy { o in o["offset"]?.int64Value.flatMap { nameAt[$0] } == o["symbol"]?.stringValue })
        // Still one compaction: the unregister made no new buffer to compress.
        #expect(try d.status()["names_compacted"]?.objectValue?["buffers"] == .int(1))
        _ = try d.call(["op": "unregister", "consumer": "names"])
    }
}
