import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Issue 4's evidence: batching keeps counts exact under churn, requests stay atomic, and
/// nothing leaks under many concurrent clients.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct BatchingTests {
    /// A binary with `staying` functions s0… and `churn` functions c0…; `prog K delay_us` calls
    /// every s-function once per round for K rounds, sleeping between rounds so the run spans
    /// the churn. Bodies differ so no two functions are folded into one.
    static func churnSource(staying: Int, churn: Int) -> String {
        var c = "#include <stdlib.h>\n#include <unistd.h>\nvolatile long sink;\n"
        for i in 0..<staying { c += "__attribute__((noinline,used)) void s\(i)(void){ sink += \(i + 1); }\n" }
        for i in 0..<churn { c += "__attribute__((noinline,used)) void c\(i)(void){ sink ^= \(i + 7); }\n" }
        c += "int main(int argc,char**argv){ long k=atol(argv[1]); long d=argc>2?atol(argv[2]):0;\n"
        c += "for(long r=0;r<k;r++){\n"
        for i in 0..<staying { c += "s\(i)();" }
        c += "\nif(d) usleep(d);}\nreturn 0;}\n"
        return c
    }

    /// A daemon, and a private copy (its own inode) of a binary with 200 staying and 1,000 churn functions.
    static func daemonWithChurnBinary() throws -> (TestDaemon, String) {
        let daemon = try TestDaemon()
        let bin = daemon.dir + "/churn"
        try FileManager.default.copyItem(atPath: try Fixtures.build("churn", source: churnSource(staying: 200, churn: 1000)),
                                         toPath: bin)
        return (daemon, bin)
    }

    @Test("200 staying probes count exactly K while other clients add and remove 1,000 probes on the same binary")
    func exactnessUnderChurn() throws {
        let (daemon, bin) = try Self.daemonWithChurnBinary()
        // Staying probes in several requests: several links in one group, so merges and rebuilds
        // of the links that carry them happen while the workload runs.
        var staying: [String] = []
        for part in 0..<4 {
            staying += try daemon.register((0..<50).map { spec(bin, symbol: "s\(part * 50 + $0)") }, consumer: "stay")
        }
        #expect(staying.count == 200)
        let k = 60
        let workload = Process()
        workload.executableURL = URL(fileURLWithPath: bin)
        workload.arguments = [String(k), "40000"]  // ~2.4 s
        try workload.run()
        let stop = ManagedAtomicFlag()
        let errors = ErrorBox()
        let churners = 4
        let group = ThreadGroup()
        for client in 0..<churners {
            group.spawn {
                do {
                    let c = try daemon.client()
                    var round = 0
                    while !stop.isSet {
                        // Each client owns 250 churn functions; registers a slice, then removes it.
                        let base = client * 250 + (round % 10) * 25
                        let r = try c.call(["op": "register", "consumer": .string("churn\(client)"),
                                            "probes": .array((0..<25).map { spec(bin, symbol: "c\(base + $0)") })])
                        guard r.objectValue?["ok"] == .bool(true) else { throw TestFailure("register: \(r)") }
                        let u = try c.call(["op": "unregister", "consumer": .string("churn\(client)")])
                        guard u.objectValue?["removed"] == .int(25) else { throw TestFailure("unregister: \(u)") }
                        round += 1
                    }
                } catch { errors.record("\(error)") }
            }
        }
        workload.waitUntilExit()
        stop.set()
        group.wait()
        #expect(errors.messages.isEmpty, "\(errors.messages)")
        #expect(workload.terminationStatus == 0)
        let hits = try daemon.hits(staying)
        let wrong = staying.filter { hits[$0] != UInt64(k) }
        #expect(wrong.isEmpty, "probes off K=\(k): \(wrong.prefix(10).map { "\($0)=\(hits[$0] ?? 0)" })")
        // The test must have exercised rebuilds of links carrying staying probes.
        let batching = try daemon.status()["batching"]?.objectValue
        let rebuilds = batching?["link_rebuilds"]?.int64Value ?? 0
        #expect(rebuilds > 0, "no link was rebuilt during the workload: \(String(describing: batching))")
    }

    @Test("64 concurrent clients x 200 register/unregister round trips: all succeed, nothing leaks")
    func manyClientsNoLeaks() throws {
        let (daemon, bin) = try Self.daemonWithChurnBinary()
        let pid = daemon.process.processIdentifier
        usleep(200_000)  // let the daemon close the harness's readiness probe connection
        let fdsBefore = try fdTargets(pid)
        let errors = ErrorBox()
        let group = ThreadGroup()
        let clients = 64, rounds = 200
        let started = Date()
        for client in 0..<clients {
            group.spawn {
                do {
                    let c = try daemon.client()
                    for round in 0..<rounds {
                        let r = try c.call(["op": "register", "probes": [spec(bin, symbol: "c\((client * rounds + round) % 1000)")]])
                        guard let id = r.objectValue?["probes"]?.arrayValue?.first?.objectValue?["id"]?.stringValue else {
                            throw TestFailure("register failed: \(r)")
                        }
                        let u = try c.call(["op": "unregister", "probes": [.string(id)]])
                        guard u.objectValue?["removed"] == .int(1) else { throw TestFailure("unregister failed: \(u)") }
                    }
                } catch { errors.record("\(error)") }
            }
        }
        group.wait()
        let elapsed = Date().timeIntervalSince(started)
        #expect(errors.messages.isEmpty, "\(errors.messages.prefix(5))")
        // Removals are detached within the compaction delay; wait for them.
        var status = try daemon.status()
        for _ in 0..<200 {
            if status["links"] == .int(0), status["batching"]?.objectValue?["pending_removals"] == .int(0) { break }
            usleep(25_000)
            status = try daemon.status()
        }
        let batching = status["batching"]?.objectValue
        print("64x200 round trips: \(String(format: "%.2f", elapsed)) s, batches \(batching?["batches"].map(JSONSerializer.serialize) ?? "-"), max batch \(batching?["max_batch_size"].map(JSONSerializer.serialize) ?? "-"), grace periods \(batching?["grace_periods"].map(JSONSerializer.serialize) ?? "-")")
        #expect(status["probes"] == .int(0))
        #expect(status["uprobes"] == .int(0))
        #expect(status["links"] == .int(0))
        #expect(status["slots_in_use"] == .int(0))
        #expect(batching?["pending_removals"] == .int(0))
        #expect(batching?["requests"]?.int64Value == Int64(clients * rounds * 2))
        // Connections of finished clients are closed asynchronously; give them a moment.
        var fdsAfter = try fdTargets(pid)
        for _ in 0..<100 where fdsAfter != fdsBefore { usleep(20_000); fdsAfter = try fdTargets(pid) }
        #expect(fdsAfter == fdsBefore, "fds before: \(fdsBefore)\nafter: \(fdsAfter)")
        // Batching happened: far fewer grace periods than requests.
        let grace = batching?["grace_periods"]?.int64Value ?? Int64.max
        #expect(grace * 50 < Int64(clients * rounds * 2), "grace periods: \(grace)")
    }

    @Test("4 clients registering and removing 1,200-probe globs at once (state entries and replies encoded ahead): every request completes, nothing is left")
    func concurrentLargeRequests() throws {
        let (daemon, bin) = try Self.daemonWithChurnBinary()
        let errors = ErrorBox()
        let group = ThreadGroup()
        let clients = 4, rounds = 8
        for client in 0..<clients {
            group.spawn {
                do {
                    let c = try daemon.client()
                    for _ in 0..<rounds {
                        // Every client probes the same functions: shared uprobes, one consumer each.
                        let r = try c.call(["op": "register", "consumer": .string("big\(client)"),
                                            "probes": [spec(bin, symbol: "[cs][0-9]*")]])
                        guard r.objectValue?["probes"]?.arrayValue?.count == 1200 else { throw TestFailure("register: \(r)") }
                        let u = try c.call(["op": "unregister", "consumer": .string("big\(client)")])
                        guard u.objectValue?["removed"] == .int(1200) else { throw TestFailure("unregister: \(u)") }
                    }
                } catch { errors.record("\(error)") }
            }
        }
        group.wait()
        #expect(errors.messages.isEmpty, "\(errors.messages)")
        // The last removals' links close on the detach thread, after grace periods that take
        // far longer on a loaded machine: wait for them to be gone (a leak never gets there).
        var status = try daemon.status()
        let deadline = Date().addingTimeInterval(60)
        while (status["links"] != .int(0) || status["slots_in_use"] != .int(0)) && Date() < deadline {
            usleep(25_000)
            status = try daemon.status()
        }
        #expect(status["probes"] == .int(0))
        #expect(status["links"] == .int(0))
        #expect(status["slots_in_use"] == .int(0))
        #expect(status["batching"]?.objectValue?["requests"]?.int64Value == Int64(clients * rounds * 2))
    }

    @Test("capacity: retired slots are reclaimed before capacity_exhausted is refused")
    func capacityReclaim() throws {
        let daemon = try TestDaemon(config: "slot_capacity = 16\n")
        let target = try daemon.privateTarget()
        let first = try daemon.register(Array(repeating: spec(target, symbol: "fn_a"), count: 16))
        #expect(first.count == 16)
        let over = try daemon.call(["op": "register", "probes": [spec(target, symbol: "fn_b")]])
        #expect(errorCode(over) == "capacity_exhausted")
        #expect(over["error"]?.objectValue?["message"]?.stringValue?.contains("16 of 16") == true)
        _ = try daemon.call(["op": "unregister", "probes": .array(first.map { .string($0) })])
        // Immediately: the removed probes' slots are still retiring; the engine reclaims them.
        let again = try daemon.register(Array(repeating: spec(target, symbol: "fn_b"), count: 16))
        #expect(again.count == 16)
        try run([target, "0", "9"])
        let hits = try daemon.hits(again)
        #expect(again.allSatisfy { hits[$0] == 9 }, "reused slots start from zero")
    }
}

/// What each open fd of `pid` points to (sockets and anon inodes by kind, files by path),
/// as a multiset so a leak shows up as an extra entry.
func fdTargets(_ pid: Int32) throws -> [String: Int] {
    var out: [String: Int] = [:]
    for fd in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd") {
        let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) ?? "?"
        let kind = target.hasPrefix("socket:") ? "socket" : target
        out[kind, default: 0] += 1
    }
    return out
}

final class ManagedAtomicFlag: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
    func set() { lock.lock(); value = true; lock.unlock() }
}

final class ErrorBox: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var list: [String] = []
    func record(_ m: String) { lock.lock(); list.append(m); lock.unlock() }
    var messages: [String] { lock.lock(); defer { lock.unlock() }; return list }
}
