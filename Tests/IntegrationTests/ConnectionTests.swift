import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// One connection's replies come back in the order of its requests, whichever thread answers them.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct ConnectionTests {
    @Test("stats and status are answered by the event loop at once, never ahead of an earlier request on the connection")
    func immediateRepliesKeepOrder() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let c = try daemon.client()
        // Read on this connection: a new one's first line may arrive before its task admitted it,
        // and then goes through the task.
        func onLoop() throws -> Int64 {
            try c.call(["op": "status"]).objectValue?["service"]?.objectValue?["replies_on_event_loop"]?.int64Value ?? -1
        }
        // One write: a register (answered only once its batch is attached and synced), a stats,
        // a blank line (never answered) and a status. The replies come back in that order, and
        // the stats sees what the register before it added.
        let register = JSONSerializer.serializeLine(.object(["op": "register", "id": "r", "probes": [spec(target, symbol: "fn_*")]]))
        let stats = JSONSerializer.serializeLine(.object(["op": "stats", "id": "s"]))
        let status = JSONSerializer.serializeLine(.object(["op": "status", "id": "t"]))
        try c.sendRaw(register + stats + Array("  \n".utf8) + status)
        let replies = try (0..<3).map { _ in try c.readReply().objectValue }
        #expect(replies.map { $0?["id"] } == ["r", "s", "t"])
        #expect(replies.allSatisfy { $0?["ok"] == .bool(true) })
        let registered = replies[0]?["probes"]?.arrayValue?.count ?? 0
        #expect(registered == 3, "fn_a, fn_b and fn_never")
        #expect(replies[1]?["stats"]?.arrayValue?.count == registered, "the stats came after the register it was sent after")
        // With nothing before them on the connection (the blank line left nothing pending), a
        // stats and a status are answered by the event loop: counted between two readings, with
        // the first reading (each is counted after its reply is made).
        let before = try onLoop()
        #expect(try c.call(["op": "stats"]).objectValue?["ok"] == .bool(true))
        #expect(try c.call(["op": "status"]).objectValue?["ok"] == .bool(true))
        #expect(try onLoop() == before + 3)
        // A stats that cannot be decoded goes the normal way and gets its error.
        try c.sendRaw(Array("{\"op\": \"stats\", \"probes\": 7}\n".utf8))
        #expect(try c.readReply().objectValue.flatMap(errorCode) == "invalid_request")
        #expect(try c.call(["op": "status"]).objectValue?["ok"] == .bool(true), "the connection still serves")
    }
}
