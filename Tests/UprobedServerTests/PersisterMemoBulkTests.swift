import Testing
import UprobeCore
@testable import UprobedServer

/// The persister's memo after bulk removals: the right ids and stamps left, and no room kept
/// for a whole binary that is gone.
struct PersisterMemoBulkTests {
    static func ids(_ range: ClosedRange<UInt64>) -> [String] { range.map { ProbeID.make($0) } }

    @Test("probe id set: runs of ids and other ids in, runs and sets out, membership exact")
    func idSet() {
        var set = ProbeIDSet(Self.ids(1...100_000) + ["custom", ProbeID.make(200_000)])
        #expect(set.count == 100_002)
        set.subtract(ProbeIDSet(Self.ids(10...50_000) + ["custom"]))
        #expect(set.count == 100_002 - 49_991 - 1)
        #expect(set.contains("p9") && !set.contains("p10") && !set.contains("p50000") && set.contains("p50001"))
        #expect(!set.contains("custom") && set.contains("p200000"))
        set.subtract(["p1", "p3", "p200000", "p7"])
        #expect(!set.contains("p1") && set.contains("p2") && !set.contains("p3") && !set.contains("p200000"))
        #expect(set.count == 100_002 - 49_991 - 1 - 4)
    }

    @Test("stamp book: removing every id empties its table in one step; removing most gives the room back; what stays reads right")
    func stampBookRemovals() {
        let a = ProbeStamps(file: nil, processStart: 1), b = ProbeStamps(file: nil, processStart: 2)
        var book = StampBook()
        for id in Self.ids(1...100_000) { book[id] = a }
        book["custom"] = b
        #expect(book.count == 100_001 && book.capacity >= 100_000)
        book.remove(ProbeIDSet(Self.ids(1...100_000)))
        #expect(book.count == 1 && book.capacity == 0)
        #expect(book["custom"] == b && book["p5"] == nil)

        for id in Self.ids(1...100_000) { book[id] = id == "p77777" ? b : a }
        // Not a cover of every id: removed one by one, and the table shrinks as it empties.
        book.remove(ProbeIDSet(Self.ids(1...50_000) + Self.ids(50_002...99_000)))
        #expect(book.count == 1 + 1 + 1_000)
        #expect(book.capacity <= 8_192)
        #expect(book["p50001"] == a && book["p77777"] == nil && book["p99001"] == a && book["custom"] == b)
        for id in Self.ids(99_001...100_000) + ["p50001", "custom"] { book.remove(id) }
        #expect(book.count == 0 && book.capacity <= 4_096)
    }
}
