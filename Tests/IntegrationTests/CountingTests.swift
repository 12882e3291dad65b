import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// End to end: real daemon, real kernel, real binaries, exact counts.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct CountingTests {
    @Test("hits equal calls for each probe of a built target; 0 for a function that never ran")
    func exactCountsOnBuiltTarget() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let ids = try daemon.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b"), spec(target, symbol: "fn_never")])
        #expect(ids.count == 3)
        var r = try run([target, "1000", "2500"])
        #expect(r.status == 0)
        var hits = try daemon.hits()
        #expect(hits[ids[0]] == 1000)
        #expect(hits[ids[1]] == 2500)
        #expect(hits[ids[2]] == 0)
        // A second run adds exactly its own calls.
        r = try run([target, "7", "0"])
        hits = try daemon.hits(ids)
        #expect(hits[ids[0]] == 1007)
        #expect(hits[ids[1]] == 2500)
        // A probe registered later counts only what ran after it.
        let late = try daemon.register([spec(target, symbol: "fn_a")])
        try run([target, "5", "0"])
        hits = try daemon.hits()
        #expect(hits[late[0]] == 5)
        #expect(hits[ids[0]] == 1012)
    }

    @Test("stats of one consumer: exactly its probes, with their counts; ids and consumer together are refused")
    func statsOfOneConsumer() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let mine = try daemon.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "mine")
        let other = try daemon.register([spec(target, symbol: "fn_a")], consumer: "other")
        try run([target, "30", "40"])
        let r = try daemon.call(["op": "stats", "consumer": "mine"])
        #expect(r["ok"] == .bool(true))
        var got: [String: UInt64] = [:]
        for e in r["stats"]?.arrayValue ?? [] {
            if let o = e.objectValue, let id = o["id"]?.stringValue, let h = o["hits"]?.int64Value { got[id] = UInt64(h) }
        }
        #expect(got == [mine[0]: 30, mine[1]: 40], "\(got); the other consumer's \(other) must not appear")
        let none = try daemon.call(["op": "stats", "consumer": "nobody"])
        #expect(none["stats"]?.arrayValue?.isEmpty == true)
        let both = try daemon.call(["op": "stats", "consumer": "mine", "probes": [.string(mine[0])]])
        #expect(errorCode(both) == "invalid_request")
    }

    @Test("return probes count returns")
    func retprobeCountsReturns() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let ids = try daemon.register([spec(target, symbol: "fn_b", retprobe: true)])
        try run([target, "3", "321"])
        #expect(try daemon.hits(ids)[ids[0]] == 321)
    }

    @Test("pid filter counts only that process")
    func pidFilter() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let waiting = try WaitingProcess([target, "400", "0", "wait"])
        let ids = try daemon.register([spec(target, symbol: "fn_a", pid: waiting.pid), spec(target, symbol: "fn_a")])
        try run([target, "1000", "0"])  // another process: only the unfiltered probe sees it
        try waiting.release()
        let hits = try daemon.hits(ids)
        #expect(hits[ids[0]] == 400)
        #expect(hits[ids[1]] == 1400)
    }

    /// libc's getpid in a process we did not write. CPython's `os.getpid()` calls getpid(2)
    /// through libc every time (glibc stopped caching the pid in 2.25). The interpreter itself
    /// may call getpid on its own (it does not at start-up on Debian's 3.11, but we do not rely on
    /// that): a control run of the same script with K=0 measures those calls, and the probed run
    /// must equal K plus exactly that.
    @Test("libc getpid with a pid filter on a python3 loop counts exactly K (+ measured interpreter calls)")
    func libcGetpidInPython() throws {
        let python = "/usr/bin/python3.11"
        try #require(FileManager.default.isExecutableFile(atPath: python), "Debian's python3.11 is needed")
        let daemon = try TestDaemon()
        let script = "import os,sys\nprint(os.getpid(),flush=True)\nsys.stdin.readline()\nk=int(sys.argv[1])\nfor _ in range(k): os.getpid()\n"
        func probedRun(_ k: Int) throws -> UInt64 {
            let p = try WaitingProcess([python, "-c", script, String(k)])
            let ids = try daemon.register([spec("libc.so.6", symbol: "getpid", pid: p.pid)])
            try p.release()
            let h = try daemon.hits(ids)[ids[0]] ?? UInt64.max
            _ = try daemon.call(["op": "unregister", "probes": .array(ids.map { .string($0) })])
            return h
        }
        let control = try probedRun(0)
        let k = 5000
        let probed = try probedRun(k)
        #expect(control < 10, "interpreter's own getpid calls after start-up: \(control)")
        #expect(probed == UInt64(k) + control)
    }
}

/// A child that prints its pid and waits for a line on stdin before it does its work, so a
/// pid-filtered probe can be registered first.
final class WaitingProcess {
    let process = Process()
    let stdin = Pipe()
    let stdout = Pipe()
    let pid: Int32

    init(_ argv: [String]) throws {
        process.executableURL = URL(fileURLWithPath: argv[0])
        process.arguments = Array(argv.dropFirst())
        process.standardInput = stdin
        process.standardOutput = stdout
        try process.run()
        var line = Data()
        while true {
            let b = stdout.fileHandleForReading.readData(ofLength: 1)
            if b.isEmpty || b == Data([0x0A]) { break }
            line.append(b)
        }
        guard let p = Int32(String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespaces)) else {
            throw TestFailure("child did not print its pid")
        }
        pid = p
    }

    /// Lets the child run and waits for it to exit successfully.
    func release() throws {
        stdin.fileHandleForWriting.write(Data("go\n".utf8))
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw TestFailure("child exited with \(process.terminationStatus)") }
    }

    deinit { if process.isRunning { process.terminate() } }
}
