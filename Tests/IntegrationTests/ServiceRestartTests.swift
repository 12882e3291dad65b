import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Hitless restarts: the counting program, its maps and every link are pinned in bpffs, so
/// probes count on while no daemon runs, and a start adopts them. Each test runs a workload
/// with a known number of calls across an exit and a start, and checks the exact total.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ServiceRestartTests {
    /// The link pins of a daemon's pin directory.
    static func linkPins(_ pinDir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: pinDir + "/links")) ?? []).sorted()
    }

    static func pins(_ d: ServiceDaemon) throws -> JSONObject {
        guard let p = try d.status()["pins"]?.objectValue else { throw TestFailure("status has no pins: \(try d.status())") }
        return p
    }

    /// Runs `target a b` `rounds` times in a row on a background thread, 20 ms apart: a steady
    /// workload whose total is known in advance (rounds × a calls of fn_a, rounds × b of fn_b).
    final class Workload: @unchecked Sendable {
        // @unchecked: `done` is guarded by `cond`; the rest is immutable.
        private let cond = NSCondition()
        private var done = false
        private var failures = 0
        let rounds: Int, a: Int, b: Int
        init(target: String, rounds: Int, a: Int, b: Int) {
            self.rounds = rounds
            self.a = a
            self.b = b
            let thread = Thread { [self] in
                for _ in 0..<rounds {
                    if (try? run([target, "\(a)", "\(b)"]))?.status != 0 { cond.lock(); failures += 1; cond.unlock() }
                    usleep(20_000)
                }
                cond.lock(); done = true; cond.broadcast(); cond.unlock()
            }
            thread.start()
        }
        /// Waits for the last round; the number of rounds that failed to run.
        func wait() -> Int {
            cond.lock()
            while !done { cond.wait() }
            defer { cond.unlock() }
            return failures
        }
    }

    /// Kills or stops the daemon in the middle of a steady workload, keeps it down for 1 s,
    /// starts it again on the same state and pin dir, and checks the exact totals.
    func acrossExit(_ exit: (ServiceDaemon) -> Void, name: String) throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let ids = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "restart")
        let work = Workload(target: target, rounds: 120, a: 100, b: 7)
        usleep(500_000)
        exit(d)
        #expect(Self.linkPins(d.pinDir).count == 1, "\(name): the link stays pinned after the exit")
        usleep(1_000_000)  // down for a second while the workload runs
        d = try ServiceDaemon(dir: dir)
        let pins = try Self.pins(d)
        #expect(pins["adopted_links"] == .int(1) && pins["adopted_probes"] == .int(2) && pins["rebuilt_probes"] == .int(0),
                "\(name): \(pins)")
        #expect(work.wait() == 0)
        let hits = try d.hits()
        #expect(hits[ids[0]] == UInt64(120 * 100) && hits[ids[1]] == UInt64(120 * 7), "\(name): \(hits)")
        #expect(d.stop() == 0)
    }

    @Test("SIGKILL in the middle of a steady workload, down for 1 s, restarted: the total is exact (the pinned link counted on)")
    func exactThroughKill() throws {
        try acrossExit({ $0.kill9() }, name: "SIGKILL")
    }

    @Test("SIGTERM in the middle of a steady workload, down for 1 s, restarted: the total is exact, and the stop left the link pinned")
    func exactThroughStop() throws {
        try acrossExit({ #expect($0.stop() == 0) }, name: "SIGTERM")
    }

    @Test("kill -9 in a 10,000-probe register between its pinned attach and its state write: it does not come back and its pin is detached as stale; one acknowledged and killed comes back counting exactly, hits while down included")
    func killInLargeRegister() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        // The test knob holds batches of ≥ 1,000 new registrations for 5 s after their attach.
        var d = try ServiceDaemon(dir: dir, environment: ["UPROBED_TEST_PERSIST_DELAY_MS": "5000"])
        let small = try d.register([spec(target, symbol: "fn_b")], consumer: "small")
        let work = Workload(target: target, rounds: 100, a: 3, b: 11)
        let big = Array(repeating: spec(target, symbol: "fn_a"), count: 10_000)
        let sender = Thread { [d] in _ = try? d.client().call(["op": "register", "consumer": "big", "probes": .array(big)]) }
        sender.start()
        // Wait until the big link is attached and pinned (a second pin), then kill.
        let deadline = Date().addingTimeInterval(120)
        while Self.linkPins(d.pinDir).count < 2 && Date() < deadline { usleep(10_000) }
        try #require(Self.linkPins(d.pinDir).count == 2, "the 10,000-probe link was pinned: \(Self.linkPins(d.pinDir))\n\(d.log.suffix(3000))")
        d.kill9()
        d = try ServiceDaemon(dir: dir)
        let listed = try d.list()
        #expect(Set(listed.keys) == Set(small), "only the acknowledged registration is back: \(listed.count) probes")
        let pins = try Self.pins(d)
        #expect(pins["stale_links"] == .int(1) && pins["adopted_probes"] == .int(1), "\(pins)")
        #expect(d.log.contains("pin_stale"), "the stale pin is logged")
        #expect(Self.linkPins(d.pinDir).count == 1)
        #expect(work.wait() == 0)
        #expect(try d.hits()[small[0]] == 100 * 11, "exact through the kill")

        // Acknowledged, then killed: counted from its registration on, including while down.
        let acked = try d.register(big, consumer: "big")
        #expect(acked.count == 10_000)
        try run([target, "3", "0"])
        d.kill9()
        try run([target, "4", "0"])
        d = try ServiceDaemon(dir: dir)
        #expect(try Self.pins(d)["adopted_probes"] == .int(10_001))
        let hits = try d.hits()
        #expect(acked.allSatisfy { hits[$0] == 7 }, "\(Set(acked.map { hits[$0] ?? 0 }))")
        #expect(d.stop() == 0)
    }

    @Test("kill -9 in the middle of a make-before-break (new link attached, old one not yet closed): the hand-off counts exactly with no daemon, the start closes the older link, totals exact")
    func killInHandoff() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        // Compaction at once; every link close held for 10 minutes (UPROBED_TEST_CLOSE_DELAY_MS),
        // so both links stay pinned until the kill below however late this thread sees them
        // (a hold of a few seconds could end unseen on a loaded machine).
        var d = try ServiceDaemon(dir: dir, config: "compaction_delay_ms = 0\n", environment: ["UPROBED_TEST_CLOSE_DELAY_MS": "600000"])
        let ids = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")])
        let work = Workload(target: target, rounds: 120, a: 100, b: 7)
        usleep(300_000)
        // Dropping fn_b rebuilds the link with fn_a alone; the old link's close is held.
        #expect(try d.call(["op": "unregister", "probes": [.string(ids[1])]])["removed"] == .int(1))
        let deadline = Date().addingTimeInterval(120)
        while Self.linkPins(d.pinDir).count < 2 && Date() < deadline { usleep(5_000) }
        try #require(Self.linkPins(d.pinDir).count == 2, "new and old link both pinned: \(Self.linkPins(d.pinDir))")
        d.kill9()
        usleep(500_000)  // both links count, hand-off on, no daemon
        d = try ServiceDaemon(dir: dir, config: "compaction_delay_ms = 0\n")
        let pins = try Self.pins(d)
        #expect(pins["handoffs_ended"] == .int(1) && pins["adopted_probes"] == .int(1) && pins["stale_links"] == .int(0), "\(pins)")
        #expect(Self.linkPins(d.pinDir).count == 1)
        #expect(work.wait() == 0)
        #expect(try d.hits()[ids[0]] == 120 * 100, "not one hit lost or counted twice")
        #expect(d.stop() == 0)
    }

    @Test("a changed counting program (test knob) moves every pinned link to it make-before-break while a workload runs: totals exact")
    func programChange() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        let a = try d.register([spec(target, symbol: "fn_a")], consumer: "one")
        let b = try d.register([spec(target, symbol: "fn_b"), spec(target, symbol: "fn_a")], consumer: "two")
        let work = Workload(target: target, rounds: 80, a: 50, b: 9)
        usleep(300_000)
        d.kill9()
        let before = Self.linkPins(d.pinDir)
        d = try ServiceDaemon(dir: dir, environment: ["UPROBED_TEST_PROGRAM_VARIANT": "1"])
        let pins = try Self.pins(d)
        #expect(pins["migrated_links"]?.int64Value == Int64(before.count) && before.count >= 1, "\(pins) \(before)")
        #expect(pins["objects_created"] == .array([.string("prog_count")]), "the new program replaced the pinned one: \(pins)")
        #expect(Set(Self.linkPins(d.pinDir)).isDisjoint(with: before), "every link is a new one")
        #expect(work.wait() == 0)
        let hits = try d.hits()
        #expect(hits[a[0]] == 80 * 50 && hits[b[0]] == 80 * 9 && hits[b[1]] == 80 * 50, "\(hits)")
        // The next start with the same program adopts without moving anything.
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir, environment: ["UPROBED_TEST_PROGRAM_VARIANT": "1"])
        #expect(try Self.pins(d)["migrated_links"] == .int(0))
        #expect(d.stop() == 0)
    }

    @Test("a changed slot_capacity moves every pinned link to counters of the new size make-before-break under a steady workload, totals exact; a smaller one attaches again only the registrations whose slots no longer fit, totals exact")
    func slotCapacityChange() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        var d = try ServiceDaemon(dir: dir, config: "slot_capacity = 64\n")
        let a = try d.register([spec(target, symbol: "fn_a")], consumer: "a")
        let b = try d.register([spec(target, symbol: "fn_b")], consumer: "b")
        let filler = try d.register(Array(repeating: spec(target, symbol: "fn_a"), count: 30), consumer: "filler")
        let x = try d.register([spec(target, symbol: "fn_b")], consumer: "x")
        let all = a + b + filler + x
        let work = Workload(target: target, rounds: 80, a: 20, b: 3)
        usleep(300_000)
        d.kill9()
        d = try ServiceDaemon(dir: dir, config: "slot_capacity = 128\n")
        var pins = try Self.pins(d)
        #expect(pins["resized_from"] == .int(64) && pins["adopted_probes"] == .int(33) && pins["rebuilt_probes"] == .int(0)
                    && pins["migrated_links"]?.int64Value ?? 0 >= 1, "\(pins)")
        #expect(Set(pins["objects_created"]?.arrayValue?.compactMap(\.stringValue) ?? []) == ["counters", "overlap", "prog_count"], "\(pins)")
        #expect(try d.status()["slot_capacity"] == .int(128))
        #expect(work.wait() == 0)
        var hits = try d.hits()
        #expect(all.allSatisfy { hits[$0] == (b.contains($0) || x.contains($0) ? 80 * 3 : 80 * 20) }, "\(hits)")

        // Smaller: the registrations whose slots lie beyond it (the last ones) are attached
        // again, the others moved; no calls while no daemon runs here. 20 fillers go first,
        // so that all that is left fits.
        let gone = Array(filler.prefix(20)), kept = all.filter { !gone.contains($0) }
        #expect(try d.call(["op": "unregister", "probes": .array(gone.map { .string($0) })])["removed"] == .int(20))
        #expect(d.stop() == 0)
        d = try ServiceDaemon(dir: dir, config: "slot_capacity = 24\n")
        pins = try Self.pins(d)
        let adopted = pins["adopted_probes"]?.int64Value ?? 0, rebuilt = pins["rebuilt_probes"]?.int64Value ?? 0
        #expect(pins["resized_from"] == .int(128) && adopted >= 2 && rebuilt >= 1 && adopted + rebuilt == 13, "\(pins)")
        try run([target, "2", "1"])
        hits = try d.hits()
        #expect(Set(hits.keys) == Set(kept))
        #expect(kept.allSatisfy { hits[$0] == (b.contains($0) || x.contains($0) ? 80 * 3 + 1 : 80 * 20 + 2) },
                "\(kept.map { hits[$0] ?? 0 })")
        #expect(!d.log.contains("probe_degraded"), "everything fits: \(d.log)")
        #expect(d.stop() == 0)
    }

    @Test("a pin no registration owns (its state gone) is detached at start and logged; --remove-pins detaches everything and is refused while a daemon runs")
    func stalePinsAndRemoval() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        var d = try ServiceDaemon(dir: dir)
        _ = try d.register([spec(target, symbol: "fn_a")])
        d.kill9()
        try FileManager.default.removeItem(atPath: d.stateDir)
        d = try ServiceDaemon(dir: dir)
        #expect(try Self.pins(d)["stale_links"] == .int(1))
        #expect(d.log.contains("detaching a pinned link no registration owns") && d.log.contains("pin_stale"), "\(d.log)")
        let links = try d.status()["links"]
        #expect(Self.linkPins(d.pinDir).isEmpty && links == .int(0))

        let ids = try d.register([spec(target, symbol: "fn_b")])
        let uprobed = try Paths.product("uprobed")
        let refused = try run([uprobed, "--remove-pins", "--pin-dir", d.pinDir, "--config", d.configPath])
        #expect(refused.status != 0 && refused.err.contains("in use by another uprobed"), "\(refused)")
        #expect(d.stop() == 0)
        #expect(Self.linkPins(d.pinDir).count == 1)
        let removed = try run([uprobed, "--remove-pins", "--pin-dir", d.pinDir, "--config", d.configPath])
        #expect(removed.status == 0 && removed.out.contains("removed 5 pins"), "\(removed)")
        #expect(!FileManager.default.fileExists(atPath: d.pinDir))
        // Not counted while no pin held it; the saved registration is attached again.
        try run([target, "0", "5"])
        d = try ServiceDaemon(dir: dir)
        #expect(try Self.pins(d)["rebuilt_probes"] == .int(1))
        try run([target, "0", "2"])
        #expect(try d.hits()[ids[0]] == 2)
        #expect(d.stop() == 0)
    }

    @Test("with no bpf file system at /sys/fs/bpf (a private mount namespace) the daemon mounts one and pins there")
    func mountsBPFFS() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        // In its own mount namespace every bpffs at /sys/fs/bpf is unmounted before the daemon
        // starts; what it mounts (and pins) goes away with the namespace.
        let script = "while grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; do umount /sys/fs/bpf || exit 9; done; exec \"$0\" \"$@\""
        let d = try ServiceDaemon(dir: dir, launcher: ["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script])
        #expect(d.log.contains("mounted a bpf file system for the pins"), "\(d.log)")
        let mounts = try String(contentsOfFile: "/proc/\(d.pid)/mounts", encoding: .utf8)
        #expect(mounts.contains(" /sys/fs/bpf bpf "), "\(mounts)")
        let pins = try Self.pins(d)
        #expect(pins["objects_created"]?.arrayValue?.count == 4)
        let ids = try d.register([spec(target, symbol: "fn_a")])
        try run([target, "3", "0"])
        #expect(try d.hits()[ids[0]] == 3)
        d.kill9()
    }
}
