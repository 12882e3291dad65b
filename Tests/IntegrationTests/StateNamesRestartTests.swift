import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// A glob's function names live in a names file beside the state (format 5), its log line
/// keeps offsets. Through a SIGKILL right after the register reply, every registration comes
/// back with its name and offset and counts exactly: with the names file, without it (names
/// from the unchanged binary), with the binary replaced (followed by name), and with both gone
/// (back without names, nothing else lost).
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct StateNamesRestartTests {
    static let config = "follow_check_ms = 100\ncompaction_delay_ms = 50\n"

    /// "symbol@offset" by id, from register reply or list entries.
    static func sites(_ probes: [JSONValue]) -> [String: String] {
        var out: [String: String] = [:]
        for p in probes {
            guard let o = p.objectValue, let id = o["id"]?.stringValue else { continue }
            let t = o["targets"]?.arrayValue?.first?.objectValue ?? o
            out[id] = "\(t["symbol"]?.stringValue ?? "-")@\(t["offset"]?.int64Value ?? -1)"
        }
        return out
    }

    /// Every registration, by id, listed page by page.
    static func listAll(_ d: ServiceDaemon) throws -> [String: JSONObject] {
        var out: [String: JSONObject] = [:]
        while true {
            let r = try d.call(["op": "list", "offset": .int(Int64(out.count)), "limit": 5000])
            guard r["ok"] == .bool(true) else { throw TestFailure("list: \(JSONSerializer.serialize(.object(r)).prefix(300))") }
            let page = r["probes"]?.arrayValue ?? []
            for p in page { if let o = p.objectValue, let id = o["id"]?.stringValue { out[id] = o } }
            if page.count < 5000 { return out }
        }
    }

    /// A private copy of the 10,000-function fixture, its g* registered, the daemon killed
    /// with SIGKILL as soon as the reply is in. Returns the binary, the sites the reply named,
    /// the id of g0000 (which each run of the binary calls once) and the killed daemon.
    static func registerAndKill(_ dir: String) throws -> (bin: String, sites: [String: String], g0: String, daemon: ServiceDaemon) {
        let bin = dir + "/many"
        try FileManager.default.copyItem(atPath: try Fixtures.build("many", relative: "kernel/many.c"), toPath: bin)
        let d = try ServiceDaemon(dir: dir, config: config)
        let r = try d.call(["op": "register", "consumer": "whole", "probes": [spec(bin, symbol: "g*")]])
        d.kill9()
        guard r["ok"] == .bool(true) else { throw TestFailure("register: \(JSONSerializer.serialize(.object(r)).prefix(300))") }
        let sites = Self.sites(r["probes"]?.arrayValue ?? [])
        guard sites.count == 10_000, let g0 = sites.first(where: { $0.value.hasPrefix("g0000@") })?.key else {
            throw TestFailure("the reply named \(sites.count) sites")
        }
        return (bin, sites, g0, d)
    }

    static func namesFiles(_ d: ServiceDaemon) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: d.stateDir + "/names")) ?? []).filter { $0.hasSuffix(".bin") }.sorted()
    }

    @Test("SIGKILL right after a 10,000-function glob's reply: the log line has no names, the names file does; every registration comes back with its name and offset, adopted, and counts exactly")
    func killAfterReply() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (bin, sites, g0, killed) = try Self.registerAndKill(dir)
        let log = try String(contentsOfFile: killed.stateDir + "/state.log", encoding: .utf8)
        #expect(log.contains(#""names":"names-"#) && !log.contains(#""symbols""#) && !log.contains("g0001"), "\(log.prefix(600))")
        #expect(Self.namesFiles(killed).count == 1)

        let d = try ServiceDaemon(dir: dir, config: Self.config)
        let listed = try Self.listAll(d)
        #expect(Self.sites(Array(listed.values.map { .object($0) })) == sites)
        #expect(listed.values.allSatisfy { $0["state"] == nil || $0["state"] == .string("active") })
        #expect(try ServiceRestartTests.pins(d)["adopted_probes"] == .int(10_000))
        for _ in 0..<7 { #expect(try IntegrationTests.run([bin]).status == 0) }
        #expect(try d.hits([g0])[g0] == 7)
        #expect(d.stop() == 0)
    }

    @Test("names file deleted while down, binary unchanged: names come from the binary, the names file is written again, counts exact")
    func namesFileMissing() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (bin, sites, g0, killed) = try Self.registerAndKill(dir)
        for f in Self.namesFiles(killed) { #expect(unlink(killed.stateDir + "/names/" + f) == 0) }

        let d = try ServiceDaemon(dir: dir, config: Self.config)
        #expect(d.log.contains("a names file of the state cannot be used") && d.log.contains("is missing or unreadable"), "\(d.log.suffix(2000))")
        #expect(Self.sites(Array(try Self.listAll(d).values.map { .object($0) })) == sites)
        try waitFor("the names file written again") { Self.namesFiles(d).count == 1 }
        for _ in 0..<3 { #expect(try IntegrationTests.run([bin]).status == 0) }
        #expect(try d.hits([g0])[g0] == 3)
        #expect(d.stop() == 0)
        // And the next start reads it: no warning this time.
        let again = try ServiceDaemon(dir: dir, config: Self.config)
        #expect(!again.log.contains("a names file of the state cannot be used"))
        #expect(Self.sites(Array(try Self.listAll(again).values.map { .object($0) })) == sites)
        #expect(try again.hits([g0])[g0] == 3)
        #expect(again.stop() == 0)
    }

    @Test("binary replaced while down (a new file at the path): the registrations follow it by name from the names file, and count exactly")
    func binaryReplaced() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (bin, sites, g0, _) = try Self.registerAndKill(dir)
        try FileManager.default.copyItem(atPath: bin, toPath: bin + ".new")
        #expect(rename(bin + ".new", bin) == 0)

        let d = try ServiceDaemon(dir: dir, config: Self.config)
        try waitFor("all 10,000 followed to the new file", seconds: 180) {
            let l = try Self.listAll(d)
            return l.count == 10_000 && l.values.allSatisfy { $0["state"] == nil || $0["state"] == .string("active") }
        }
        #expect(Self.sites(Array(try Self.listAll(d).values.map { .object($0) })) == sites, "same names, same offsets (same build)")
        for _ in 0..<4 { #expect(try IntegrationTests.run([bin]).status == 0) }
        #expect(try d.hits([g0])[g0] == 4)
        #expect(d.stop() == 0)
    }

    @Test("names file damaged and the binary replaced by another one while down: every registration comes back degraded with its id, offset and the reason, without a name; the daemon starts")
    func namesLostWithBinary() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (bin, sites, _, killed) = try Self.registerAndKill(dir)
        let file = killed.stateDir + "/names/" + (Self.namesFiles(killed).first ?? "")
        var bytes = try #require(FileManager.default.contents(atPath: file))
        bytes[bytes.count / 2] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: file))
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: bin + ".new")
        #expect(rename(bin + ".new", bin) == 0)

        let d = try ServiceDaemon(dir: dir, config: Self.config)
        #expect(d.log.contains("registrations restored without their function names"), "\(d.log.suffix(2000))")
        let listed = try Self.listAll(d)
        #expect(Set(listed.keys) == Set(sites.keys))
        for (id, o) in listed {
            #expect(o["state"] == .string("degraded") && o["symbol"] == nil, "\(o)")
            #expect(sites[id]?.hasSuffix("@\(o["offset"]?.int64Value ?? -1)") == true, "\(id): \(o)")
        }
        let reason = listed.values.first?["reason"]?.stringValue ?? listed.values.first?["degraded_reason"]?.stringValue ?? ""
        #expect(reason.contains("function's name is unknown") && reason.contains("is damaged"), "\(listed.values.first ?? [:])")
        #expect(d.stop() == 0)
    }
}
