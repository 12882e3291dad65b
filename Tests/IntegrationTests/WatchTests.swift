import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// `watch` streams stats events until the client closes or sends another request.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct WatchTests {
    @Test("watch streams events with exact hits and interval rates; a new request ends it")
    func watchStream() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let ids = try daemon.register([spec(target, symbol: "fn_a")])
        let c = try daemon.client()
        try c.send(.object(["op": "watch", "id": "w", "interval_ms": 100, "probes": .array(ids.map { .string($0) })]))
        let first = try c.readReply().objectValue
        #expect(first?["id"] == "w")
        #expect(first?["event"] == "stats")
        #expect(first?["stats"]?.arrayValue?.first?.objectValue?["hits"] == .int(0))
        try run([target, "250", "0"])
        // Events keep coming; one of the next few must show the 250 hits.
        var seen: Int64 = -1
        for _ in 0..<20 {
            let e = try c.readReply().objectValue
            #expect(e?["id"] == "w")
            seen = e?["stats"]?.arrayValue?.first?.objectValue?["hits"]?.int64Value ?? -1
            if seen == 250 { break }
        }
        #expect(seen == 250)
        // Another request on the connection ends the stream and is answered in order.
        try c.send(.object(["op": "status", "id": "s"]))
        var reply: JSONObject? = nil
        for _ in 0..<20 {  // events already in flight may arrive first
            let r = try c.readReply().objectValue
            if r?["id"] == "s" { reply = r; break }
        }
        #expect(reply?["ok"] == .bool(true))
        #expect(reply?["probes"] == .int(1))
        // …and the stream is over: no event follows within ten intervals.
        let quiet = try LineClient(socketPath: daemon.socket, timeoutSeconds: 1)
        try quiet.send(.object(["op": "watch", "id": "w2", "interval_ms": 100]))
        #expect(try quiet.readReply().objectValue?["id"] == "w2")
        try quiet.send(.object(["op": "stats", "id": "s2"]))
        var answered = false
        for _ in 0..<20 {
            let r = try quiet.readReply().objectValue
            if r?["id"] == "s2" { answered = true; break }
        }
        #expect(answered)
        #expect(throws: ClientError.self, "an event after the stream ended") { try quiet.readReply() }
    }

    @Test("watch with bad arguments is refused and the connection stays usable")
    func watchErrors() throws {
        let daemon = try TestDaemon()
        let c = try daemon.client()
        let bad = try c.call(["op": "watch", "interval_ms": 1]).objectValue
        #expect(bad.flatMap(errorCode) == "invalid_request")
        let unknown = try c.call(["op": "watch", "probes": ["p404"]]).objectValue
        #expect(unknown.flatMap(errorCode) == "probe_not_found")
        #expect(try c.call(["op": "status"]).objectValue?["ok"] == .bool(true))
    }
}
