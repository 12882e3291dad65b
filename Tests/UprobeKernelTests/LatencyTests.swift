import Foundation
import Testing
@testable import UprobeKernel

/// The latency (uprobe session) program on the real kernel, against a fixture that measures
/// its own calls. Serialized like the other kernel tests: probes are path-wide.
@Suite(.serialized, .enabled(if: KernelEnv.enabled, "kernel lacks BPF/uprobe_multi (set UPROBED_REQUIRE_KERNEL to fail instead)"))
struct LatencyTests {
    static let latency = Result { try Fixture.build("latency.c") }

    /// What the fixture printed for one function: calls, and medians measured inside the
    /// function and around the call.
    struct Measured { let calls: UInt64; let inner: UInt64; let outer: UInt64 }

    /// Runs the fixture with `args` (+ --wait), lets `attached` attach first, returns its report.
    static func run(_ fx: Fixture, _ args: [String], whileRunning: (Int32) throws -> Void = { _ in },
                    attached: () throws -> Void = {}) throws -> [String: Measured] {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: fx.binary)
        p.arguments = args + ["--wait"]
        let stdin = Pipe(), stdout = Pipe()
        p.standardInput = stdin
        p.standardOutput = stdout
        try p.run()
        try attached()
        stdin.fileHandleForWriting.write(Data([0x31]))
        try whileRunning(p.processIdentifier)
        let data = stdout.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw FixtureError("latency fixture exited \(p.terminationStatus)") }
        var out: [String: Measured] = [:]
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count == 4, let c = UInt64(f[1]), let i = UInt64(f[2]), let o = UInt64(f[3]) else { continue }
            out[String(f[0])] = Measured(calls: c, inner: i, outer: o)
        }
        return out
    }

    /// The fixture's sleep after each of `calls` calls (µs, at least `minimum`) that makes a
    /// thread's run last 20 times what `rebuild` (a link attached, replaced once and closed,
    /// before any call) takes on this machine now: a close waits for a grace period, which
    /// grows with load, and a fixed workload could end before enough rebuilds landed in it.
    static func delayFor(calls: Int, minimum: Int, rebuild: () throws -> Void) throws -> Int {
        let t0 = Date()
        for _ in 0..<3 { try rebuild() }
        let perRebuild = Date().timeIntervalSince(t0) / 3
        return max(minimum, Int(20 * perRebuild / Double(calls) * 1e6))
    }

    func setup() throws -> (Fixture, CounterProgram, LatencyProgram) {
        try KernelEnv.requireSupport()
        let fx = try Self.latency.get()
        let counter = try CounterProgram(capacity: 64)
        let latency = try LatencyProgram(counter: counter, rowCapacity: 16)
        return (fx, counter, latency)
    }

    @Test func bucketMathMatchesItsBounds() {
        // Pure: every bucket's bounds map back to it, widths are at most 1/8 of the lower bound.
        for i in 0..<LatencyHistogram.bucketCount {
            let b = LatencyHistogram.bounds(i)
            #expect(LatencyHistogram.bucket(of: b.lower) == i)
            if let upper = b.upper {
                #expect(LatencyHistogram.bucket(of: upper - 1) == i)
                #expect(LatencyHistogram.bucket(of: upper) == i + 1)
                if b.lower >= 8 { #expect((upper - b.lower) * 8 <= b.lower) }
            }
        }
        #expect(LatencyHistogram.bucket(of: 3_600_000_000_000) < LatencyHistogram.overflowIndex)  // 1 h has its own
        #expect(LatencyHistogram.bucket(of: .max) == LatencyHistogram.overflowIndex)
        var h = LatencyHistogram()
        h.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        for v: UInt64 in [1_000, 1_000, 1_000, 50_000] { h.buckets[LatencyHistogram.bucket(of: v)] += 1 }
        h.returns = 4; h.minNanoseconds = 1_000; h.maxNanoseconds = 50_000
        let p50 = h.quantile(0.5) ?? 0
        #expect(p50 >= 1_000 && p50 < 1_000 + 1_000 / 8)
        #expect(h.quantile(1.0) == 50_000 || (h.quantile(1.0).map { $0 > 49_000 && $0 <= 50_000 } ?? false))
    }

    /// The verifier accepts the program, and the BTF ids of the kfuncs were found.
    @Test func programLoads() throws {
        let (_, _, latency) = try setup()
        #expect(latency.rowCapacity == 16)
        let ids = try KernelBTF.functionIDs(named: LatencyProgram.kfuncNames)
        #expect(ids.count == 2)
    }

    /// Without the kernel's BTF (missing, or not BTF) the latency program refuses with
    /// `latency_unsupported`, saying why; a BTF without the session kfuncs likewise.
    @Test func missingBTFIsLatencyUnsupported() throws {
        try KernelEnv.requireSupport()
        let counter = try CounterProgram(capacity: 4)
        for path in ["/nonexistent/vmlinux", "/etc/hostname"] {
            do {
                _ = try LatencyProgram(counter: counter, rowCapacity: 1, btfPath: path)
                Issue.record("\(path) accepted")
            } catch {
                #expect(error.code == .latencyUnsupported && error.message.contains(path), "\(error)")
            }
        }
        #expect(throws: KernelBTF.Failure.self) { try KernelBTF.functionIDs(named: ["x"], in: [0x9f, 0xeb, 1, 0, 24, 0, 0, 0] + [UInt8](repeating: 0xff, count: 16)) }
        // The real BTF walks to the end with every kind known, and finds well-known functions.
        let ids = try KernelBTF.functionIDs(named: ["bpf_session_cookie", "schedule", "no_such_function_here"])
        #expect(ids["schedule"] != nil && ids["no_such_function_here"] == nil)
    }

    /// Exact calls/returns/in-flight on threads, recursion and a thread exiting mid-call; each
    /// p50 between what the function body took and what its caller saw, within bucket precision.
    @Test func measuresKnownDurationsExactly() throws {
        let (fx, counter, latency) = try setup()
        let names = ["lat_busy", "lat_sleep1", "lat_sleep10", "lat_recurse", "lat_exit_mid", "lat_never"]
        let slots: [UInt32] = [10, 11, 12, 13, 14, 15]
        var link: LatencyLink?
        let threads = 3, depth = 9
        let measured = try Self.run(fx, ["--threads=\(threads)", "--busy=300", "--busy-ns=20000", "--sleep1=20",
                                         "--sleep10=6", "--recurse=40", "--depth=\(depth)", "--exiters=2"], attached: {
            link = try latency.attach(path: fx.binary, offsets: try names.map { try fx.offset($0) }, refCtrOffsets: nil,
                                      slots: slots, pid: nil)
        })
        defer { link?.close() }
        func hist(_ name: String) throws -> LatencyHistogram {
            let i = try #require(names.firstIndex(of: name))
            return try #require(latency.read(slot: slots[i]))
        }
        for name in ["lat_busy", "lat_sleep1", "lat_sleep10", "lat_recurse"] {
            let h = try hist(name), m = try #require(measured[name == "lat_sleep1" ? "lat_sleep1" : name])
            #expect(h.calls == m.calls, "\(name) calls")
            #expect(h.returns == m.calls, "\(name) returns")
            #expect(h.inFlight == 0, "\(name) in flight")
            #expect(h.unobserved == 0)
            #expect(h.buckets.reduce(0, +) == m.calls)
            #expect(try counter.readCounter(slot: slots[names.firstIndex(of: name)!]) == m.calls, "hits are calls")
            if name != "lat_recurse" {
                let p50 = Double(try #require(h.quantile(0.5)))
                print("\(name): p50 \(p50) ns, fixture inner \(m.inner) outer \(m.outer), min \(h.minNanoseconds) max \(h.maxNanoseconds)")
                #expect(p50 >= Double(m.inner) * (1 - 1.0 / 16) && p50 <= Double(m.outer) * (1 + 1.0 / 16), "\(name) p50")
                #expect(h.minNanoseconds > 0 && h.minNanoseconds <= h.maxNanoseconds)
                #expect(h.sumNanoseconds >= h.minNanoseconds * h.returns && h.sumNanoseconds <= h.maxNanoseconds * h.returns)
            }
        }
        // Two threads ended inside lat_exit_mid: entered, never returned.
        let exited = try hist("lat_exit_mid")
        #expect(exited.calls == 2 && exited.returns == 0 && exited.inFlight == 2)
        let never = try hist("lat_never")
        #expect(never.calls == 0 && never.returns == 0)
    }

    /// Rebuilds the latency link of hot functions many times while threads call them
    /// (make-before-break: overlap flag, new link, old link drained and closed, marks swept):
    /// calls and returns stay exact, nothing in flight or unobserved, no mark left.
    @Test func rebuildsKeepCountsExact() throws {
        let (fx, counter, latency) = try setup()
        let names = ["lat_plain", "lat_busy", "lat_never"]
        let offsets = try names.map { try fx.offset($0) }
        let slots: [UInt32] = [20, 21, 22]
        var current: LatencyLink?
        var rebuilds = 0
        let threads = 4
        func rebuild() throws {
            try counter.setOverlap(true, slots: slots)
            let next = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: slots, pid: nil)
            usleep(2_000)
            current?.close()
            current = next
            try counter.setOverlap(false, slots: slots)
            try latency.sweepMarks(slots: Set(slots))
        }
        // The workload lasts 20 rebuilds as measured now, before any call (see
        // `Self.delayFor`), so that enough of them land in it on a loaded machine.
        let delay = try Self.delayFor(calls: 2500, minimum: 500) {
            current = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: slots, pid: nil)
            try rebuild()
            current?.close()
            current = nil
        }
        let measured = try Self.run(fx, ["--threads=\(threads)", "--plain=2500", "--delay-us=\(delay)", "--busy=100", "--busy-ns=3000"],
                                    whileRunning: { pid in
            while kill(pid, 0) == 0 && rebuilds < 200 {
                var st: Int32 = 0
                if waitpid(pid, &st, WNOHANG) != 0 { break }
                try rebuild()
                rebuilds += 1
            }
        }, attached: {
            current = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: slots, pid: nil)
        })
        current?.close()
        print("latency make-before-break: \(rebuilds) rebuilds")
        #expect(rebuilds >= 3)
        for (i, name) in names.enumerated() where name != "lat_never" {
            let h = try #require(latency.read(slot: slots[i]))
            let expected = try #require(measured[name]).calls
            #expect(h.calls == expected, "\(name) calls")
            #expect(h.returns == expected, "\(name) returns")
            #expect(h.inFlight == 0 && h.unobserved == 0, "\(name)")
            #expect(h.buckets.reduce(0, +) == expected)
        }
    }

    /// The negative control of `rebuildsKeepCountsExact`: the same rebuilds without the
    /// overlap flag (no hand-off) count calls twice while two links are attached.
    @Test func rebuildWithoutHandOffDoubleCounts() throws {
        let (fx, _, latency) = try setup()
        let offsets = [try fx.offset("lat_plain")]
        var current: LatencyLink?
        var rebuilds = 0
        func rebuild() throws {
            let next = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: [30], pid: nil)
            usleep(3_000)
            current?.close()
            current = next
        }
        let delay = try Self.delayFor(calls: 800, minimum: 300) {
            current = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: [30], pid: nil)
            try rebuild()
            current?.close()
            current = nil
        }
        let measured = try Self.run(fx, ["--threads=2", "--plain=800", "--delay-us=\(delay)"], whileRunning: { pid in
            while rebuilds < 100 {
                var st: Int32 = 0
                if waitpid(pid, &st, WNOHANG) != 0 { break }
                try rebuild()
                rebuilds += 1
            }
        }, attached: {
            current = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: [30], pid: nil)
        })
        current?.close()
        let h = try #require(latency.read(slot: 30))
        let expected = try #require(measured["lat_plain"]).calls
        print("latency negative control: \(rebuilds) rebuilds, \(h.calls) calls counted, \(expected) made")
        #expect(rebuilds >= 5)
        #expect(h.calls > expected)
    }

    /// A call still running when its link must close (a 1.5 s sleep, a drain limit of 1 ms):
    /// it becomes `unobserved`, and calls = returns + in flight + unobserved still holds.
    @Test func callOutlivingTheDrainLimitIsUnobserved() throws {
        try KernelEnv.requireSupport()
        let fx = try Self.latency.get()
        let counter = try CounterProgram(capacity: 8)
        let latency = try LatencyProgram(counter: counter, rowCapacity: 4, drainLimit: .milliseconds(1))
        let offsets = [try fx.offset("lat_sleep10"), try fx.offset("lat_sleep_long")]
        var old: LatencyLink?
        let measured = try Self.run(fx, ["--threads=1", "--sleep10=5", "--long=1", "--long-ms=1500"], whileRunning: { _ in
            usleep(500_000)           // inside the long sleep (the 10 ms ones are over)
            try counter.setOverlap(true, slots: [1, 2])
            let new = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: [1, 2], pid: nil)
            old?.close()
            old = new
            try counter.setOverlap(false, slots: [1, 2])
        }, attached: {
            old = try latency.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: [1, 2], pid: nil)
        })
        old?.close()
        let short = try #require(latency.read(slot: 1)), long = try #require(latency.read(slot: 2))
        #expect(short.calls == measured["lat_sleep10"]?.calls && short.returns == short.calls && short.unobserved == 0)
        #expect(long.calls == 1 && long.unobserved == 1 && long.returns == 0 && long.inFlight == 0)
    }

    @Test func pidFilterMeasuresOnlyThatProcess() throws {
        let (fx, _, latency) = try setup()
        var link: LatencyLink?
        var other: Process?
        // Attach filtered on a waiting process, run another one unfiltered-out alongside.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: fx.binary)
        p.arguments = ["--threads=2", "--busy=70", "--busy-ns=1000", "--wait"]
        let stdin = Pipe()
        p.standardInput = stdin
        p.standardOutput = Pipe()
        try p.run()
        link = try latency.attach(path: fx.binary, offsets: [try fx.offset("lat_busy")], refCtrOffsets: nil, slots: [3],
                                  pid: p.processIdentifier)
        let q = Process()
        q.executableURL = URL(fileURLWithPath: fx.binary)
        q.arguments = ["--threads=1", "--busy=40", "--busy-ns=1000"]
        q.standardOutput = Pipe()
        try q.run()
        other = q
        stdin.fileHandleForWriting.write(Data([0x31]))
        p.waitUntilExit()
        other?.waitUntilExit()
        link?.close()
        let h = try #require(latency.read(slot: 3))
        #expect(h.calls == 140 && h.returns == 140)
    }
}
