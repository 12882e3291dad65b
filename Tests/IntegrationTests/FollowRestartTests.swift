import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// A followed probe across daemon exits: after its binary was replaced by rename, it counts in
/// two file versions (old processes run the unlinked old file). A start adopts both versions'
/// pinned links, so processes of either version are counted exactly through the exit, and its
/// retired versions are kept.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct FollowRestartTests {
    static let config = "follow_check_ms = 100\ncompaction_delay_ms = 50\n"

    func inode(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0
    }

    /// The probe's `versions` by inode.
    func versions(_ d: ServiceDaemon, _ id: String) throws -> [UInt64: JSONObject] {
        let r = try d.call(["op": "stats", "probes": [.string(id)], "versions": true])
        var out: [UInt64: JSONObject] = [:]
        for v in r["stats"]?.arrayValue?.first?.objectValue?["versions"]?.arrayValue ?? [] {
            if let o = v.objectValue, let ino = o["inode"]?.int64Value { out[UInt64(ino)] = o }
        }
        return out
    }

    func run(_ exit: (ServiceDaemon) -> Void, name: String) throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let app = try ServicePersistenceTests.target(in: dir, name: "app")
        let oldInode = inode(app)
        // Two processes of the old file, waiting: one runs while no daemon does, one after the start.
        let whileDown = try WaitingProcess([app, "300", "0", "wait"])
        let afterStart = try WaitingProcess([app, "40", "0", "wait"])
        var d = try ServiceDaemon(dir: dir, config: Self.config)
        // Two probes in one request: one link per file holds both.
        let both = try d.register([spec(app, symbol: "fn_a"), spec(app, symbol: "fn_b")])
        let id = both[0]
        #expect(try IntegrationTests.run([app, "5", "0"]).status == 0)

        let rebuilt = try Fixtures.build("target-follow-v2", relative: "target/target.c", flags: ["-DREBUILT=2", "-O0"])
        let tmp = app + ".new"
        try FileManager.default.copyItem(atPath: rebuilt, toPath: tmp)
        #expect(rename(tmp, app) == 0)
        let newInode = inode(app)
        try waitFor("\(name): the new file's sites attached") { try versions(d, id)[newInode]?["current"] == .bool(true) }
        #expect(try IntegrationTests.run([app, "20", "0"]).status == 0)

        exit(d)
        #expect(ServiceRestartTests.linkPins(d.pinDir).count == 2, "\(name): one link per file version stays pinned")
        try whileDown.release()  // 300 calls in the old (unlinked) file, no daemon running
        #expect(try IntegrationTests.run([app, "30", "0"]).status == 0)  // and 30 in the new one

        d = try ServiceDaemon(dir: dir, config: Self.config)
        let pins = try ServiceRestartTests.pins(d)
        #expect(pins["adopted_links"] == .int(2) && pins["adopted_probes"] == .int(2) && pins["rebuilt_probes"] == .int(0)
                    && pins["stale_links"] == .int(0), "\(name): \(pins)")
        var v = try versions(d, id)
        #expect(v[oldInode]?["hits"]?.int64Value == 305 && v[newInode]?["hits"]?.int64Value == 50, "\(name): \(v)")
        #expect(v[newInode]?["current"] == .bool(true) && v[oldInode]?["retired"] != .bool(true), "\(name): \(v)")
        // Removing fn_b rebuilds the old file's adopted link with fn_a alone: its file is
        // unlinked, and reached through the process that still maps it.
        #expect(try d.call(["op": "unregister", "probes": [.string(both[1])]])["removed"] == .int(1))
        try waitFor("\(name): both links rebuilt without fn_b") {
            let st = try d.status()["batching"]?.objectValue
            return (st?["link_rebuilds"]?.int64Value ?? 0) >= 2 || d.log.contains("link rebuild failed")
        }
        #expect(!d.log.contains("link rebuild failed"), "\(name): \(d.log)")
        try afterStart.release()  // the old file, counted by its rebuilt link
        #expect(try d.hits([id])[id] == 5 + 20 + 300 + 30 + 40, "\(name)")

        // No process maps the old file now: it retires with its exact count, and that survives a restart.
        try waitFor("\(name): the old file retired") { try versions(d, id)[oldInode]?["retired"] == .bool(true) }
        try waitFor("\(name): the old link closed") { ServiceRestartTests.linkPins(d.pinDir).count == 1 }
        exit(d)
        d = try ServiceDaemon(dir: dir, config: Self.config)
        #expect(try ServiceRestartTests.pins(d)["adopted_probes"] == .int(1))
        v = try versions(d, id)
        #expect(v[oldInode]?["retired"] == .bool(true) && v[oldInode]?["hits"]?.int64Value == 345, "\(name): \(v)")
        #expect(try IntegrationTests.run([app, "2", "0"]).status == 0)
        #expect(try d.hits([id])[id] == 397, "\(name)")
        #expect(try versions(d, id)[newInode]?["hits"]?.int64Value == 52, "\(name)")
        #expect(d.stop() == 0)
    }

    @Test("SIGKILL with a followed probe counting in two file versions (old one unlinked): both pinned links are adopted, old and new processes counted exactly, hits while down included; the retired version survives a restart")
    func followedThroughKill() throws {
        try run({ $0.kill9() }, name: "SIGKILL")
    }

    @Test("SIGTERM with a followed probe counting in two file versions: both pinned links are adopted, counts exact")
    func followedThroughStop() throws {
        try run({ #expect($0.stop() == 0) }, name: "SIGTERM")
    }
}
