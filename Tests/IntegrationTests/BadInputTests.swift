import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Every bad input gets a clear error code, the daemon keeps serving, nothing is registered.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct BadInputTests {
    /// Sends `line` raw, then checks the reply's code and that the same connection still answers.
    func expectError(_ daemon: TestDaemon, raw line: String, code: String, id: JSONValue? = nil) throws {
        let c = try daemon.client()
        try c.sendRaw(Array(line.utf8) + [0x0A])
        let reply = try c.readReply().objectValue
        #expect(reply?["ok"] == .bool(false), "\(line)")
        #expect(reply.flatMap(errorCode) == code, "\(line) -> \(String(describing: reply))")
        #expect((reply?["error"]?.objectValue?["message"]?.stringValue ?? "").count > 10, "a human message")
        if let id { #expect(reply?["id"] == id) }
        let status = try c.call(["op": "status", "id": "after"]).objectValue
        #expect(status?["ok"] == .bool(true))
        #expect(status?["id"] == "after")
        #expect(status?["probes"] == .int(0), "nothing registered by a failing request")
    }

    @Test("malformed JSON, wrong shapes and unknown ops")
    func protocolErrors() throws {
        let daemon = try TestDaemon()
        try expectError(daemon, raw: "{\"op\": \"status\"", code: "invalid_json")
        try expectError(daemon, raw: "not json at all", code: "invalid_json")
        try expectError(daemon, raw: "[1,2,3]", code: "invalid_request")
        try expectError(daemon, raw: "{\"id\": 7}", code: "invalid_request", id: 7)
        try expectError(daemon, raw: "{\"op\": \"explode\", \"id\": \"x\"}", code: "unknown_op", id: "x")
        try expectError(daemon, raw: "{\"op\": \"register\", \"id\": 1, \"probes\": \"nope\"}", code: "invalid_request", id: 1)
        try expectError(daemon, raw: "{\"op\": \"register\", \"probes\": [{\"path\": \"/bin/true\"}]}", code: "invalid_request")
        try expectError(daemon, raw: "{\"op\": \"stats\", \"probes\": [\"p999\"]}", code: "probe_not_found")
        try expectError(daemon, raw: "{\"op\": \"unregister\", \"probes\": [\"p999\"]}", code: "probe_not_found")
    }

    @Test("missing file, non-ELF file, unknown symbol: clear errors naming the probe")
    func resolverErrors() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let notELF = daemon.dir + "/script.sh"
        try "#!/bin/sh\necho hi\n".write(toFile: notELF, atomically: true, encoding: .utf8)
        func register(_ s: JSONValue) -> String {
            "{\"op\":\"register\",\"id\":\"r\",\"probes\":[" + JSONSerializer.serialize(spec(target, symbol: "fn_a")) + "," + JSONSerializer.serialize(s) + "]}"
        }
        try expectError(daemon, raw: register(spec("/nonexistent/bin", symbol: "main")), code: "file_not_found", id: "r")
        try expectError(daemon, raw: register(spec(notELF, symbol: "main")), code: "not_elf", id: "r")
        try expectError(daemon, raw: register(spec(target, symbol: "no_such_function")), code: "symbol_not_found", id: "r")
        // The failing spec is named by index.
        let c = try daemon.client()
        try c.sendRaw(Array(register(spec(target, symbol: "no_such_function")).utf8) + [0x0A])
        let reply = try c.readReply().objectValue
        #expect(reply?["error"]?.objectValue?["probe"] == .int(1))
    }

    @Test("a line over the limit is refused without being buffered; the connection stays usable")
    func hugeLine() throws {
        let daemon = try TestDaemon(config: "max_line_bytes = 4096\n")
        let c = try daemon.client()
        let big = "{\"op\":\"status\",\"pad\":\"" + String(repeating: "x", count: 100_000) + "\"}\n"
        try c.sendRaw(Array(big.utf8))
        let reply = try c.readReply().objectValue
        #expect(reply.flatMap(errorCode) == "line_too_long")
        let status = try c.call(["op": "status"]).objectValue
        #expect(status?["ok"] == .bool(true))
    }

    @Test("too many probes in one request")
    func tooManyProbes() throws {
        let daemon = try TestDaemon(config: "max_probes_per_request = 10\n")
        let target = try daemon.privateTarget()
        let r = try daemon.call(["op": "register", "probes": .array(Array(repeating: spec(target, symbol: "fn_a"), count: 11))])
        #expect(errorCode(r) == "too_many_probes")
        #expect(try daemon.status()["probes"] == .int(0))
    }

    @Test("a request with 99 good specs and 1 bad one attaches nothing")
    func atomicity() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        var specs = Array(repeating: spec(target, symbol: "fn_a"), count: 99)
        specs.insert(spec(target, offset: 0), at: 50)  // ELF header: not executable code
        let r = try daemon.call(["op": "register", "probes": .array(specs)])
        #expect(r["ok"] == .bool(false))
        #expect(errorCode(r) == "offset_not_executable")
        #expect(r["error"]?.objectValue?["probe"] == .int(50))
        let s = try daemon.status()
        #expect(s["probes"] == .int(0))
        #expect(s["links"] == .int(0))
    }

    @Test("clients that vanish mid-line or mid-request leave the daemon serving and lose nothing")
    func vanishingClients() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        do {  // half a line, then gone: never a request
            let c = try daemon.client()
            try c.sendRaw(Array("{\"op\":\"register\",\"probes\":[".utf8))
        }
        do {  // a whole request, then gone before the reply
            let c = try daemon.client()
            try c.send(.object(["op": "register", "consumer": "ghost", "probes": [spec(target, symbol: "fn_b")]]))
        }
        // The daemon serves; the vanished client's complete request was applied whole (it is
        // listed under its consumer and counts), the partial one was not.
        var listed: [JSONValue] = []
        for _ in 0..<100 {
            listed = try daemon.call(["op": "list", "consumer": "ghost"])["probes"]?.arrayValue ?? []
            if !listed.isEmpty { break }
            usleep(20_000)
        }
        #expect(listed.count == 1)
        #expect(try daemon.status()["probes"] == .int(1))
        try run([target, "0", "42"])
        let id = listed.first?.objectValue?["id"]?.stringValue ?? ""
        #expect(try daemon.hits([id])[id] == 42)
        let removed = try daemon.call(["op": "unregister", "consumer": "ghost"])
        #expect(removed["removed"] == .int(1))
    }

    @Test("max_connections: a connection over the limit is told too_many_connections and closed; the open ones keep working, and a freed place is taken again")
    func tooManyConnections() throws {
        let daemon = try TestDaemon(config: "max_connections = 3\n")
        func service(_ c: LineClient) throws -> JSONObject? { try c.call(["op": "status"]).objectValue?["service"]?.objectValue }
        // The start-up check's own connections close asynchronously: wait until only this one is open.
        let a = try daemon.client()
        var open: JSONValue? = nil
        for _ in 0..<250 {
            open = try service(a)?["connections"]
            if open == .int(1) { break }
            usleep(20_000)
        }
        #expect(open == .int(1))
        let b = try daemon.client(), c = try daemon.client()
        #expect(try service(c)?["connections"] == .int(3))

        // The fourth: accepted by the kernel, answered with one error line, then end of stream.
        // The stats it sends at once is not answered (not even by the event loop, which reads it).
        let over = try daemon.client()
        try over.send(.object(["op": "stats"]))
        let refusal = try over.readReply().objectValue
        #expect(refusal?["ok"] == .bool(false))
        #expect(refusal.flatMap(errorCode) == "too_many_connections", "\(String(describing: refusal))")
        #expect(refusal?["error"]?.objectValue?["message"]?.stringValue?.contains("max_connections") == true)
        #expect(try over.readLine() == nil, "closed after the error")

        // The three still serve; the refusal is counted and logged.
        for x in [a, b, c] { #expect(try x.call(["op": "status"]).objectValue?["ok"] == .bool(true)) }
        let counted = try service(b)
        #expect(counted?["connections"] == .int(3))
        #expect(counted?["connections_refused"] == .int(1))
        #expect(daemon.log.contains("connection refused") && daemon.log.contains("connections (max_connections)"))

        // Closing one frees its place (the daemon notices the close asynchronously).
        c.shutdownWrite()
        #expect(try c.readLine() == nil)
        for _ in 0..<250 {
            open = try service(a)?["connections"]
            if open == .int(2) { break }
            usleep(20_000)
        }
        #expect(open == .int(2))
        let d = try daemon.client()
        #expect(try d.call(["op": "status"]).objectValue?["ok"] == .bool(true))
        #expect(try service(d)?["connections_refused"] == .int(1))
        withExtendedLifetime((a, b)) {}
    }
}
