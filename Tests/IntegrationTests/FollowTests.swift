import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Probes follow their path through replacements of the file (upgrade by rename),
/// report a degraded state when the new file cannot be probed, can be pinned with
/// `"follow": false`, and pid-filtered probes end with their process. Real kernel, exact counts.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct FollowTests {
    static let config = "follow_check_ms = 100\ncompaction_delay_ms = 50\n"

    /// A daemon with `config` (plus `extraConfig`) and a private copy of the target binary at
    /// DIR/app, the path the follow tests replace.
    func daemonWithApp(extraConfig: String = "") throws -> (TestDaemon, String) {
        let daemon = try TestDaemon(config: Self.config + extraConfig)
        let path = daemon.dir + "/app"
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: path)
        return (daemon, path)
    }

    func inode(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0
    }

    /// Atomically replaces `path` by a copy of `source` (a new inode), like a package upgrade.
    func replace(_ path: String, with source: String) throws {
        let tmp = path + ".tmp-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.copyItem(atPath: source, toPath: tmp)
        guard rename(tmp, path) == 0 else { throw TestFailure("rename failed: \(errno)") }
    }

    func replace(_ path: String, withText text: String) throws {
        let tmp = path + ".tmp-\(UInt32.random(in: 0...UInt32.max))"
        try text.write(toFile: tmp, atomically: false, encoding: .utf8)
        chmod(tmp, 0o755)
        guard rename(tmp, path) == 0 else { throw TestFailure("rename failed: \(errno)") }
    }

    func statsEntry(_ daemon: TestDaemon, _ id: String) throws -> JSONObject {
        let r = try daemon.call(["op": "stats", "probes": [.string(id)], "versions": true])
        guard let o = r["stats"]?.arrayValue?.first?.objectValue else { throw TestFailure("no stats for \(id): \(r)") }
        return o
    }

    func listEntry(_ daemon: TestDaemon, _ id: String) throws -> JSONObject {
        let r = try daemon.call(["op": "list"])
        guard let o = r["probes"]?.arrayValue?.compactMap(\.objectValue).first(where: { $0["id"]?.stringValue == id }) else {
            throw TestFailure("\(id) not listed: \(r)")
        }
        return o
    }

    func versions(_ daemon: TestDaemon, _ id: String) throws -> [UInt64: JSONObject] {
        var out: [UInt64: JSONObject] = [:]
        for v in try statsEntry(daemon, id)["versions"]?.arrayValue ?? [] {
            if let o = v.objectValue, let ino = o["inode"]?.int64Value { out[UInt64(ino)] = o }
        }
        return out
    }

    func links(_ daemon: TestDaemon) throws -> Int64 { try daemon.status()["links"]?.int64Value ?? -1 }

    @Test("a binary replaced by rename(2): old and new processes are both counted exactly; the old link goes when its process exits")
    func followsRename() throws {
        let (daemon, path) = try daemonWithApp()
        let oldInode = inode(path)
        let old = try WaitingProcess([path, "300", "0", "wait"])
        let ids = try daemon.register([spec(path, symbol: "fn_a")])
        let id = ids[0]
        #expect(try listEntry(daemon, id)["follow"] == .bool(true))

        let rebuilt = try Fixtures.build("target-follow-v2", relative: "target/target.c", flags: ["-DREBUILT=2", "-O0"])
        try replace(path, with: rebuilt)
        let newInode = inode(path)
        #expect(newInode != oldInode)
        try waitFor("the new file's sites attached") { try versions(daemon, id)[newInode]?["current"] == .bool(true) }
        #expect(try links(daemon) == 2, "one link per file while the old process runs")

        try old.release()  // 300 calls in the old file
        #expect(try run([path, "200", "0"]).status == 0)
        #expect(try run([path, "50", "0"]).status == 0)
        #expect(try daemon.hits([id])[id] == 550)
        var v = try versions(daemon, id)
        #expect(v[oldInode]?["hits"]?.int64Value == 300)
        #expect(v[newInode]?["hits"]?.int64Value == 250)
        #expect(v[oldInode]?["build_id"] != v[newInode]?["build_id"], "different builds side by side: \(v)")

        // The old process is gone: nothing maps the old inode, so its sites retire.
        try waitFor("the old file retired") { try versions(daemon, id)[oldInode]?["retired"] == .bool(true) }
        try waitFor("the old link closed") { try links(daemon) == 1 }
        v = try versions(daemon, id)
        #expect(v[oldInode]?["hits"]?.int64Value == 300)
        #expect(try daemon.hits([id])[id] == 550)
        #expect(try run([path, "7", "0"]).status == 0)
        #expect(try daemon.hits([id])[id] == 557)
        #expect(try statsEntry(daemon, id)["state"] == nil)
        #expect(daemon.log.contains("probe follows its path to a new file"))
    }

    @Test("eleven upgrades: the newest eight retired versions keep their own entry, older ones fold into one count and sum; hits stay exact")
    func retiredVersionsAreBounded() throws {
        let (daemon, path) = try daemonWithApp()
        let id = try daemon.register([spec(path, symbol: "fn_a")])[0]
        var retiredInodes: [UInt64] = []
        for calls in 1...11 {
            #expect(try run([path, "\(calls)", "0"]).status == 0)
            retiredInodes.append(inode(path))
            try replace(path, with: try Fixtures.target)
            // Nothing maps the old file: it retires as soon as the new one is attached.
            try waitFor("upgrade \(calls) retired") {
                let s = try statsEntry(daemon, id)
                let kept = s["versions"]?.arrayValue?.filter { $0.objectValue?["retired"] == .bool(true) }.count ?? 0
                let folded = s["older_versions"]?.objectValue?["retired"]?.int64Value ?? 0
                return kept + Int(folded) == calls
            }
        }
        let s = try statsEntry(daemon, id)
        #expect(s["hits"]?.int64Value == 66, "1 + 2 + … + 11 calls, each in its own file")
        let versions = s["versions"]?.arrayValue?.compactMap(\.objectValue) ?? []
        let kept = versions.filter { $0["retired"] == .bool(true) }
        #expect(kept.count == 8 && versions.count == 9, "eight retired and the current file: \(versions)")
        #expect(kept.compactMap { $0["inode"]?.int64Value }.map(UInt64.init) == Array(retiredInodes.suffix(8)),
                "the newest eight, oldest first")
        #expect(kept.compactMap { $0["hits"]?.int64Value } == Array(4...11))
        #expect(s["older_versions"]?.objectValue == ["retired": 3, "hits": 6], "the first three upgrades: 1 + 2 + 3 hits")
        #expect(try run([path, "5", "0"]).status == 0)
        #expect(try daemon.hits([id])[id] == 71)
    }

    @Test("a replacement without the symbol (not ELF, symbol gone) is reported degraded; a good file brings it back")
    func degradedAndRecovered() throws {
        let (daemon, path) = try daemonWithApp()
        let id = try daemon.register([spec(path, symbol: "fn_a")])[0]
        #expect(try run([path, "10", "0"]).status == 0)

        try replace(path, withText: "#!/bin/sh\nexit 0\n")
        try waitFor("degraded: not ELF") { try listEntry(daemon, id)["state"]?.stringValue == "degraded" }
        var reason = try listEntry(daemon, id)["reason"]?.stringValue ?? ""
        #expect(reason.contains("not_elf") && reason.contains(path), "\(reason)")
        let s = try statsEntry(daemon, id)
        #expect(s["state"]?.stringValue == "degraded" && s["hits"]?.int64Value == 10)

        let noSymbol = try Fixtures.build("follow-nofn", source: "int main(void) { return 0; }\n")
        try replace(path, with: noSymbol)
        try waitFor("degraded: symbol gone") {
            (try listEntry(daemon, id)["reason"]?.stringValue ?? "").contains("symbol_not_found")
        }
        reason = try statsEntry(daemon, id)["reason"]?.stringValue ?? ""
        #expect(reason.contains("fn_a"), "\(reason)")
        #expect(daemon.log.contains("probe degraded"))

        try replace(path, with: try Fixtures.target)
        try waitFor("recovered") { try listEntry(daemon, id)["state"] == nil }
        #expect(try run([path, "7", "0"]).status == 0)
        #expect(try daemon.hits([id])[id] == 17)
        #expect(try statsEntry(daemon, id)["state"] == nil)
    }

    @Test("one log line per follow outcome, not per probe; registrations degraded for want of slots follow once slots are freed")
    func followLogIsAggregated() throws {
        let (daemon, path) = try daemonWithApp(extraConfig: "slot_capacity = 16\n")
        // 12 of 16 slots; a process keeps the old file mapped, so its sites cannot retire.
        let ids = try daemon.register(Array(repeating: spec(path, symbol: "fn_a"), count: 12))
        let old = try WaitingProcess([path, "3", "0", "wait"])
        try replace(path, with: try Fixtures.target)
        // 4 slots left: 4 registrations follow, 8 are degraded (capacity_exhausted).
        try waitFor("8 degraded") {
            try ids.filter { try listEntry(daemon, $0)["state"]?.stringValue == "degraded" }.count == 8
        }
        usleep(1_000_000)  // ten more follow checks
        func lines(_ message: String) -> [Substring] { daemon.log.split(separator: "\n").filter { $0.contains(message) } }
        let degraded = lines("probe degraded"), followed = lines("probe follows its path to a new file")
        #expect(degraded.count == 1, "\(degraded)")
        #expect(degraded.first?.contains("probes=8") == true && degraded.first?.contains("capacity_exhausted") == true,
                "\(degraded)")
        #expect(degraded.first?.contains(",…") == true, "five ids named, the rest counted: \(degraded)")
        #expect(followed.count == 1 && followed.first?.contains("probes=4") == true, "\(followed)")

        // Once the old process is gone its sites retire and free their slots, and the watcher
        // tries the 8 again (the file has not changed since their failed attach).
        try old.release()
        try waitFor("all 12 active again") { try ids.allSatisfy { try listEntry(daemon, $0)["state"] == nil } }
        #expect(lines("probe follows its path to a new file").count == 2)
        #expect(try daemon.hits(ids).values.reduce(0, +) == 36, "3 calls in the old file, counted by each of 12")
    }

    @Test("follow: false pins a probe to its inode; a followed one on the same file moves on")
    func pinned() throws {
        let (daemon, path) = try daemonWithApp()
        let ids = try daemon.register([spec(path, symbol: "fn_a", follow: false), spec(path, symbol: "fn_a")])
        let (pin, fol) = (ids[0], ids[1])
        #expect(try listEntry(daemon, pin)["follow"] == .bool(false))
        #expect(try listEntry(daemon, pin)["spec"]?.objectValue?["follow"] == .bool(false))
        let old = try WaitingProcess([path, "40", "0", "wait"])
        let oldInode = inode(path)

        try replace(path, with: try Fixtures.target)
        let newInode = inode(path)
        try waitFor("the followed probe attached the new file") { try versions(daemon, fol)[newInode] != nil }
        #expect(try run([path, "5", "0"]).status == 0)
        try old.release()
        var hits = try daemon.hits(ids)
        #expect(hits[pin] == 40)
        #expect(hits[fol] == 45)
        // Retiring the followed probe's old site rebuilds the shared old link for the pinned
        // probe alone: it must stay on the old inode, not attach whatever the path names now.
        try waitFor("old site retired") { try versions(daemon, fol)[oldInode]?["retired"] == .bool(true) }
        try waitFor("old link rebuilt") { try daemon.status()["batching"]?.objectValue?["pending_removals"]?.int64Value == 0 }
        #expect(try run([path, "3", "0"]).status == 0)
        hits = try daemon.hits(ids)
        #expect(hits[pin] == 40)
        #expect(hits[fol] == 48)
        #expect(try versions(daemon, pin).keys.sorted() == [oldInode])
    }

    @Test("a pid-filtered probe ends cleanly when its process exits: reported, detached, hits kept")
    func pidProbeEnds() throws {
        let daemon = try TestDaemon(config: Self.config)
        let target = try daemon.privateTarget()
        let p = try WaitingProcess([target, "30", "0", "wait"])
        let id = try daemon.register([spec(target, symbol: "fn_a", pid: p.pid)])[0]
        #expect(try links(daemon) == 1)
        try p.release()
        try waitFor("ended") { try listEntry(daemon, id)["state"]?.stringValue == "ended" }
        let entry = try listEntry(daemon, id)
        #expect(entry["reason"]?.stringValue?.contains("process \(p.pid) exited") == true, "\(entry)")
        #expect(entry["follow"] == .bool(false))
        let s = try statsEntry(daemon, id)
        #expect(s["state"]?.stringValue == "ended")
        #expect(s["hits"]?.int64Value == 30)
        try waitFor("its link detached") { try links(daemon) == 0 }
        #expect(try daemon.hits([id])[id] == 30)
        // Still listed until removed.
        let rm = try daemon.call(["op": "unregister", "probes": [.string(id)]])
        #expect(rm["removed"]?.int64Value == 1)
    }

    @Test("probes on two files in two directories, interleaved in id order: replacing one moves only its probes")
    func interleavedPaths() throws {
        let daemon = try TestDaemon(config: Self.config)
        let a = daemon.dir + "/app"
        try FileManager.default.createDirectory(atPath: daemon.dir + "/sub", withIntermediateDirectories: true)
        let b = daemon.dir + "/sub/app"
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: a)
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: b)
        let (oldA, oldB) = (inode(a), inode(b))
        let ids = try daemon.register([spec(a, symbol: "fn_a"), spec(b, symbol: "fn_a"), spec(a, symbol: "fn_b"),
                                       spec(b, symbol: "fn_b"), spec(b, symbol: "fn_never")])
        try replace(b, with: try Fixtures.build("target-follow-v2", relative: "target/target.c", flags: ["-DREBUILT=2", "-O0"]))
        let newB = inode(b)
        for id in [ids[1], ids[3], ids[4]] {
            try waitFor("\(id) attached in the new file") { try versions(daemon, id)[newB]?["current"] == .bool(true) }
        }
        for id in [ids[0], ids[2]] { #expect(try versions(daemon, id).keys.sorted() == [oldA], "\(id) stays on its file") }
        #expect(try run([a, "3", "2"]).status == 0)
        #expect(try run([b, "5", "4"]).status == 0)
        let hits = try daemon.hits(ids)
        #expect(hits[ids[0]] == 3 && hits[ids[2]] == 2)
        #expect(hits[ids[1]] == 5 && hits[ids[3]] == 4 && hits[ids[4]] == 0)
        #expect(try versions(daemon, ids[1])[oldB] != nil)
    }

    @Test("after a restart, a followed probe whose file was replaced while down is re-resolved in the new file")
    func followsAcrossRestart() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let path = dir + "/app"
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: path)
        var d = try ServiceDaemon(dir: dir, config: Self.config)
        let id = try d.register([spec(path, symbol: "fn_a")])[0]
        #expect(try run([path, "6", "0"]).status == 0)
        #expect(d.stop() == 0)
        try replace(path, with: try Fixtures.build("target-follow-v2", relative: "target/target.c", flags: ["-DREBUILT=2", "-O0"]))
        d = try ServiceDaemon(dir: dir, config: Self.config)
        try waitFor("re-resolved in the new file") { try d.list()[id]?["state"] == nil }
        #expect(try run([path, "4", "0"]).status == 0)
        #expect(try d.hits()[id] == 10)
        #expect(d.stop() == 0)
    }
}
