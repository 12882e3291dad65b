import Foundation
import Testing
@testable import UprobeKernel

/// Real-kernel tests. Serialized: probes are path-wide, so parallel tests on one fixture would
/// see each other's hits.
@Suite(.serialized, .enabled(if: KernelEnv.enabled, "kernel lacks BPF/uprobe_multi (set UPROBED_REQUIRE_KERNEL to fail instead)"))
struct UprobeKernelTests {
    static let workload = Result { try Fixture.build("workload.c") }

    func fixture() throws -> Fixture {
        try KernelEnv.requireSupport()
        return try Self.workload.get()
    }

    @Test func supportCheckPasses() throws {
        try KernelSupport.check()
    }

    @Test func exactCountsOnThreeFunctions() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 64)
        let link = try program.attach(path: fx.binary,
                                      offsets: [try fx.offset("uk_f1"), try fx.offset("uk_f2"),
                                                try fx.offset("uk_f3"), try fx.offset("uk_never")],
                                      refCtrOffsets: nil, slots: [3, 4, 5, 6], pid: nil, retprobe: false)
        #expect(link.offsetCount == 4)
        let n = 1000
        for _ in 0..<3 { try fx.run(iterations: n) }          // 3 processes
        try fx.run(iterations: n, threads: 2)                   // one with 2 threads
        let all = try program.readAllCounters(upTo: 64)
        link.close()
        link.close()  // idempotent
        let runs = UInt64(5 * n)
        #expect(all[3] == runs)
        #expect(all[4] == 2 * runs)
        #expect(all[5] == 3 * runs)
        #expect(all[6] == 0)
        #expect(all.enumerated().allSatisfy { [3, 4, 5].contains($0.offset) || $0.element == 0 })
        #expect(try program.readCounter(slot: 4) == 2 * runs)
        try program.resetCounters(slots: [3, 4, 5])
        #expect(try program.readAllCounters(upTo: 8) == [0, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test func batchReadSpansChunks() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 10_000)
        let link = try program.attach(path: fx.binary, offsets: [try fx.offset("uk_f1"), try fx.offset("uk_f3")],
                                      refCtrOffsets: nil, slots: [9_999, 4_500], pid: nil, retprobe: false)
        try fx.run(iterations: 100)
        link.close()
        let all = try program.readAllCounters(upTo: 10_000)
        #expect(all.count == 10_000)
        #expect(all[9_999] == 100)
        #expect(all[4_500] == 300)
        #expect(all.reduce(0, +) == 400)
        #expect(try program.readAllCounters(upTo: 9_999).count == 9_999)
    }

    @Test func pidFilterCountsOnlyThatProcess() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 8)
        // Two threads: the filter is per process (thread group), not per thread.
        let target = try fx.start(iterations: 700, threads: 2, wait: true)
        let link = try program.attach(path: fx.binary, offsets: [try fx.offset("uk_f1")], refCtrOffsets: nil,
                                      slots: [1], pid: target.pid, retprobe: false)
        let other = try fx.start(iterations: 500)               // not filtered in
        target.release()
        try target.finish()
        try other.finish()
        #expect(try program.readCounter(slot: 1) == 1400)
        link.close()
    }

    @Test func retprobeCountsReturns() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 8)
        let ret = try program.attach(path: fx.binary, offsets: [try fx.offset("uk_f2"), try fx.offset("uk_never")],
                                     refCtrOffsets: nil, slots: [0, 1], pid: nil, retprobe: true)
        try fx.run(iterations: 400, threads: 2)
        ret.close()
        #expect(try program.readAllCounters(upTo: 2) == [1600, 0])
    }

    /// Rebuilds the link of a hot probe many times while a multi-threaded workload runs.
    /// `handOff` false is the negative control: same loop without overlap/marks must miscount.
    func rebuildLoop(handOff: Bool, retprobe: Bool = false) throws -> (count: UInt64, expected: UInt64, rebuilds: Int, marksLeft: Int) {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 16)
        let slot: UInt32 = 7
        let offsets = [try fx.offset("uk_f1"), try fx.offset("uk_never")]
        let slots: [UInt32] = [slot, 8]
        var current = try program.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: slots,
                                         pid: nil, retprobe: retprobe)
        func rebuild() throws {
            if handOff { try program.setOverlap(true, slots: [slot]) }
            let next = try program.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: slots,
                                          pid: nil, retprobe: retprobe)
            usleep(3_000)               // keep both links attached for a while
            current.close()
            current = next
            if handOff {
                try program.setOverlap(false, slots: [slot])
                try program.sweepMarks(slots: [slot])
            }
        }
        // What a rebuild costs on this machine now (a close waits for a grace period, far longer
        // under load), measured before any hit: the workload is stretched to last 40 of them,
        // and at least ~1 s, so that enough rebuilds land in it however busy the machine is
        // (load that grows after the measurement makes rebuilds slower: 9 of 20 were seen).
        let t0 = Date()
        for _ in 0..<3 { try rebuild() }
        let perRebuild = Date().timeIntervalSince(t0) / 3
        // 4 threads × 6,000 = 24,000 hits, each thread sleeping `delay` after every call.
        let threads = 4, iterations = 6_000
        let delay = max(100, Int(40 * perRebuild / Double(iterations) * 1e6))
        let workload = try fx.start(iterations: iterations, threads: threads, delayMicroseconds: delay)
        var rebuilds = 0
        while workload.process.isRunning {
            try rebuild()
            rebuilds += 1
        }
        try workload.finish()
        current.close()
        return (try program.readCounter(slot: slot), UInt64(threads * iterations), rebuilds,
                try program.markCount(slot: slot))
    }

    @Test(arguments: [false, true])
    func makeBeforeBreakIsExact(retprobe: Bool) throws {
        let r = try rebuildLoop(handOff: true, retprobe: retprobe)
        print("make-before-break (retprobe: \(retprobe)): \(r.rebuilds) rebuilds, counted \(r.count), expected \(r.expected)")
        #expect(r.rebuilds >= 5)
        #expect(r.count == r.expected)
        #expect(r.marksLeft == 0)
    }

    @Test(arguments: [false, true])
    func rebuildWithoutHandOffMiscounts(retprobe: Bool) throws {
        let r = try rebuildLoop(handOff: false, retprobe: retprobe)
        print("negative control (retprobe: \(retprobe)): \(r.rebuilds) rebuilds, counted \(r.count), expected \(r.expected)")
        #expect(r.rebuilds >= 5)
        #expect(r.count != r.expected)
        #expect(r.count > r.expected)   // both programs count during the overlap
    }

    @Test func usdtSemaphoreIsIncrementedWhileAttached() throws {
        try KernelEnv.requireSupport()
        let fx = try Fixture.build("usdt.c")
        let program = try CounterProgram(capacity: 4)
        func runOnce(refCtr: Bool) throws -> String {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: fx.binary)
            let stdin = Pipe(), stdout = Pipe()
            p.standardInput = stdin
            p.standardOutput = stdout
            try p.run()
            let link = try program.attach(path: fx.binary, offsets: [try fx.offset("uk_site")],
                                          refCtrOffsets: refCtr ? [try fx.offset("uk_sema")] : nil,
                                          slots: [refCtr ? 1 : 2], pid: nil, retprobe: false)
            stdin.fileHandleForWriting.write(Data([0x31]))
            let out = stdout.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            link.close()
            #expect(p.terminationStatus == 0)
            return String(decoding: out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try runOnce(refCtr: true) == "1")
        #expect(try runOnce(refCtr: false) == "0")
        #expect(try program.readAllCounters(upTo: 3) == [0, 1, 1])
    }

    @Test func linkCloserSharesGracePeriods() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 64)
        let offsets = [try fx.offset("uk_f1"), try fx.offset("uk_f2"), try fx.offset("uk_f3"), try fx.offset("uk_never")]
        func make() throws -> [UprobeMultiLink] {
            try (0..<20).map { i in
                try program.attach(path: fx.binary, offsets: [offsets[i % 4]], refCtrOffsets: nil,
                                   slots: [UInt32(i)], pid: nil, retprobe: false)
            }
        }
        let a = try make()
        let sequential = seconds { for l in a { l.close() } }
        let b = try make()
        let concurrent = seconds { LinkCloser.closeAll(b) }
        print(String(format: "close 20 links: sequential %.1f ms, LinkCloser.closeAll %.1f ms", sequential * 1e3, concurrent * 1e3))
        #expect(b.allSatisfy { $0.rawDescriptor == nil })
        // More links than closer threads: every one is closed once.
        let many = try (0..<(LinkCloser.maxThreads + 18)).map { i in
            try program.attach(path: fx.binary, offsets: [offsets[i % 4]], refCtrOffsets: nil,
                               slots: [UInt32(i % 64)], pid: nil, retprobe: false)
        }
        let manyTime = seconds { LinkCloser.closeAll(many) }
        print(String(format: "close %d links with LinkCloser.closeAll: %.1f ms", many.count, manyTime * 1e3))
        #expect(many.allSatisfy { $0.rawDescriptor == nil })
    }

    @Test func tenThousandOffsetsOneLink() throws {
        try KernelEnv.requireSupport()
        let many = try Fixture.build("many.c")
        let offs = many.symbols.filter { $0.key.hasPrefix("g") && $0.key.count == 5 }.map(\.value).sorted()
        #expect(offs.count == 10_000)
        let program = try CounterProgram(capacity: 10_000)
        let slots = (0..<UInt32(offs.count)).map { $0 }
        // 1) No process maps the file: registration only.
        var link: UprobeMultiLink?
        let create = try seconds {
            link = try program.attach(path: many.binary, offsets: offs, refCtrOffsets: nil, slots: slots,
                                      pid: nil, retprobe: false)
        }
        try Fixture.run(many.binary, [])                       // calls g0000 once
        let close = seconds { link?.close() }
        print(String(format: "10,000-offset link, file not mapped: create %.1f ms, close %.1f ms", create * 1e3, close * 1e3))
        // 2) A live process maps the file: breakpoints are written into it at create time.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: many.binary)
        p.arguments = ["--wait"]
        let stdin = Pipe()
        p.standardInput = stdin
        try p.run()
        usleep(100_000)                                        // let it map the binary
        let createLive = try seconds {
            link = try program.attach(path: many.binary, offsets: offs, refCtrOffsets: nil, slots: slots,
                                      pid: nil, retprobe: false)
        }
        stdin.fileHandleForWriting.write(Data([0x31]))
        p.waitUntilExit()
        let closeLive = seconds { link?.close() }
        print(String(format: "10,000-offset link, mapped by a live process: create %.1f ms, close %.1f ms", createLive * 1e3, closeLive * 1e3))
        let all = try program.readAllCounters(upTo: 10_000)
        #expect(all[0] == 2)
        #expect(all.reduce(0, +) == 2)
    }

    @Test func perfEventBaselineCountsExactly() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 8)
        let entry = try PerfEventUprobe(program: program, path: fx.binary, offset: try fx.offset("uk_f3"),
                                        slot: 2, pid: nil, retprobe: false)
        let ret = try PerfEventUprobe(program: program, path: fx.binary, offset: try fx.offset("uk_f2"),
                                      slot: 3, pid: nil, retprobe: true)
        try fx.run(iterations: 300, threads: 2)
        entry.close(); ret.close(); ret.close()
        #expect(try program.readAllCounters(upTo: 4) == [0, 0, 1800, 1200])
    }

    /// Prints the cost of a hit: uprobe_multi link vs one perf_event per probe (not asserted).
    @Test func hitCostMultiVsPerfEvent() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 8)
        let names = ["uk_f1", "uk_f2", "uk_f3"]
        let offsets = try names.map { try fx.offset($0) }
        let iterations = 20_000                                  // 6 hits per iteration
        let bare = try seconds { try fx.run(iterations: iterations) }
        let link = try program.attach(path: fx.binary, offsets: offsets, refCtrOffsets: nil, slots: [0, 1, 2],
                                      pid: nil, retprobe: false)
        let multi = try seconds { try fx.run(iterations: iterations) }
        link.close()
        let perf = try offsets.enumerated().map {
            try PerfEventUprobe(program: program, path: fx.binary, offset: $0.element, slot: UInt32(3 + $0.offset),
                                pid: nil, retprobe: false)
        }
        let perfTime = try seconds { try fx.run(iterations: iterations) }
        perf.forEach { $0.close() }
        let counts = try program.readAllCounters(upTo: 6)
        let hits = Double(6 * iterations)
        print(String(format: "hit cost: uprobe_multi %.2f µs, perf_event %.2f µs (bare run %.0f ms, %d hits each)",
                     (multi - bare) / hits * 1e6, (perfTime - bare) / hits * 1e6, bare * 1e3, 6 * iterations))
        #expect(counts == [20_000, 40_000, 60_000, 20_000, 40_000, 60_000].map { UInt64($0) })
    }

    @Test func errorsHaveClearCodes() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 4)
        #expect(throws: KernelError.self) {
            try program.attach(path: "/nonexistent/uprobed-test", offsets: [0x1000], refCtrOffsets: nil,
                               slots: [0], pid: nil, retprobe: false)
        }
        func code(_ body: () throws -> Void) -> String? {
            do { try body(); return nil } catch let e as KernelError { print("error: \(e)"); return e.code.rawValue } catch { return "other" }
        }
        #expect(code { _ = try program.attach(path: "/nonexistent/x", offsets: [0x1000], refCtrOffsets: nil, slots: [0], pid: nil, retprobe: false) } == "path_not_found")
        #expect(code { _ = try program.attach(path: fx.binary, offsets: [1 << 40], refCtrOffsets: nil, slots: [0], pid: nil, retprobe: false) } == "offset_out_of_range")
        #expect(code { _ = try program.attach(path: fx.binary, offsets: [0x10], refCtrOffsets: nil, slots: [0], pid: nil, retprobe: false) } == "offset_not_executable")
        #expect(code { _ = try program.attach(path: "/tmp", offsets: [0], refCtrOffsets: nil, slots: [0], pid: nil, retprobe: false) } == "link_create_failed")
        #expect(code { _ = try program.attach(path: fx.binary, offsets: [try fx.offset("uk_f1")], refCtrOffsets: nil, slots: [4], pid: nil, retprobe: false) } == "capacity_exhausted")
        #expect(code { _ = try program.attach(path: fx.binary, offsets: [], refCtrOffsets: nil, slots: [], pid: nil, retprobe: false) } == "invalid_argument")
        #expect(code { _ = try program.attach(path: fx.binary, offsets: [try fx.offset("uk_f1")], refCtrOffsets: nil, slots: [0], pid: 0x3fff_fff0, retprobe: false) } == "process_not_found")
        #expect(code { _ = try PerfEventUprobe(program: program, path: "/nonexistent/x", offset: 0x1000, slot: 0, pid: nil, retprobe: false) } == "path_not_found")
    }

    /// What the kernel itself does with offsets the pre-check would refuse, on a live mapping
    /// (raw BPF_LINK_CREATE, bypassing `attach`'s checks). Printed; see the report.
    @Test func kernelBehaviourOnBadOffsets() throws {
        let fx = try fixture()
        let program = try CounterProgram(capacity: 4)
        let w = try fx.start(iterations: 10, wait: true)
        usleep(50_000)
        for (name, off) in [("ELF header (non-exec segment)", UInt64(0x10)),
                            ("uk_f1+1 (mid-instruction)", try fx.offset("uk_f1") + 1)] {
            do {
                let fd = try BPFSyscall.linkCreateUprobeMulti(program: program.multiProgram, path: fx.binary,
                                                              offsets: [off], refCtrOffsets: nil, cookies: [0],
                                                              flags: 0, pid: 0)
                print("kernel accepted \(name)")
                try? fd.close()
            } catch {
                print("kernel refused \(name): \(error.errno)")
            }
        }
        w.release()
        try w.finish()
    }

    @Test func verifierLogIsSurfaced() throws {
        try KernelEnv.requireSupport()
        // `exit` with r0 never written: the verifier must reject it with a log.
        var a = BPFAssembler()
        a.exit()
        switch BPFSyscall.progLoad(type: CounterProgram.kprobeProgramType, expectedAttachType: 0, instructions: a.finish(),
                                   license: "GPL", name: "bad") {
        case .success(let fd):
            try? fd.close()
            Issue.record("an invalid program was accepted")
        case .failure(let f):
            #expect(f.failure.errno.rawValue == EACCES)
            #expect(f.log.contains("R0"))
        }
    }
}
