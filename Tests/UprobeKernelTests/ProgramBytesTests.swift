import Foundation
import Testing
@testable import UprobeKernel

/// The counting and latency programs' instructions, for fixed map fds and BTF ids, equal the
/// ones recorded in `Golden/programs.txt`: a change to how they are assembled (a shared
/// emitter, a new assembler helper) must not change a byte the kernel loads. A program whose
/// bytes change on purpose gets its golden file regenerated (`UPROBED_WRITE_GOLDEN=1`).
struct ProgramBytesTests {
    static let golden = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("Golden/programs.txt")

    /// Every program variant, one line each: a name, then its 64-bit instructions in hex.
    static func dump() -> String {
        var lines: [String] = []
        func add(_ name: String, _ insns: [UInt64]) {
            lines.append(name + " " + insns.map { String(format: "%016llx", $0) }.joined(separator: " "))
        }
        add("counter", CounterProgram.instructions(counters: 11, overlap: 12, marks: 13))
        add("counter-variant", CounterProgram.instructions(counters: 11, overlap: 12, marks: 13, variant: true))
        add("latency", LatencyProgram.instructions(isReturn: 70_001, cookie: 70_002, rows: 21, rowOf: 22, marks: 23,
                                                   overlap: 24, counters: 25))
        add("latency-2", LatencyProgram.instructions(isReturn: 3, cookie: 4, rows: 5, rowOf: 6, marks: 7, overlap: 8, counters: 9))
        return lines.joined(separator: "\n") + "\n"
    }

    @Test("the counting and latency programs are byte-identical to the recorded instructions")
    func sameBytes() throws {
        let now = Self.dump()
        if ProcessInfo.processInfo.environment["UPROBED_WRITE_GOLDEN"] == "1" {
            try now.write(to: Self.golden, atomically: true, encoding: .utf8)
        }
        let recorded = try String(contentsOf: Self.golden, encoding: .utf8)
        let (a, b) = (recorded.split(separator: "\n"), now.split(separator: "\n"))
        #expect(a.count == b.count)
        for (x, y) in zip(a, b) {
            let name = x.split(separator: " ").first ?? ""
            let (xi, yi) = (x.split(separator: " ").dropFirst(), y.split(separator: " ").dropFirst())
            let first = zip(xi, yi).enumerated().first { $0.element.0 != $0.element.1 }
            #expect(x == y, "\(name): \(xi.count) recorded instructions, \(yi.count) now; first difference at \(first.map { "\($0.offset): \($0.element.0) vs \($0.element.1)" } ?? "the end")")
        }
    }
}
