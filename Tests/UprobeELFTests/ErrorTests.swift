import Foundation
import Testing
@testable import UprobeELF

@Suite("error paths and hostile input")
struct ErrorTests {
    let r = Resolver()

    func write(_ bytes: [UInt8], _ name: String) throws -> String {
        let fx = try Fixtures.get()
        let p = fx.dir + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: p))
        return p
    }

    @Test func missingFile() {
        let e = expectCode("file_not_found") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: "/nonexistent/dir/binary", symbol: "main"))
        }
        #expect(e?.message.contains("/nonexistent/dir/binary") == true)
    }

    @Test func notELF() throws {
        expectCode("not_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "/etc/passwd", symbol: "main")) }
        let script = try write(Array("#!/bin/sh\necho hello\n".utf8), "script.sh")
        expectCode("not_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: script, symbol: "main")) }
        let empty = try write([], "empty")
        expectCode("not_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: empty, symbol: "main")) }
        expectCode("not_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "/tmp", symbol: "main")) }
    }

    @Test func unsupported() throws {
        let fx = try Fixtures.get()
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: fx.pie)))
        var variants: [(String, (inout [UInt8]) -> Void)] = []
        variants.append(("c32", { $0[4] = 1 }))                 // ELFCLASS32
        variants.append(("be", { $0[5] = 2 }))                  // big-endian
        variants.append(("arm", { $0[18] = 183 }))              // aarch64
        variants.append(("rel", { $0[16] = 1 }))                // ET_REL
        for (name, mutate) in variants {
            var b = bytes
            mutate(&b)
            let p = try write(b, name)
            expectCode("unsupported_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: p, symbol: "main")) }
        }
    }

    @Test("truncated files are malformed_elf, never a crash")
    func truncated() throws {
        let fx = try Fixtures.get()
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: fx.pie)))
        for n in [4, 40, 63, 64, 200, 1000, 4096, bytes.count / 2, bytes.count - 100] {
            let p = try write(Array(bytes.prefix(n)), "trunc-\(n)")
            do {
                _ = try r.resolve(ProbeSpecInput(path: p, symbol: "fix_add"))
                // Cutting off only the section headers' tail may still leave usable tables: not an error.
            } catch {
                #expect(["malformed_elf", "no_symbols", "symbol_not_found", "offset_not_executable"].contains(error.code.rawValue),
                        "\(n): \(error)")
            }
        }
        let p = try write(Array(bytes.prefix(40)), "trunc-hdr")
        expectCode("malformed_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: p, symbol: "x")) }
        let q = try write(Array(bytes.prefix(bytes.count / 2)), "trunc-half")
        expectCode("malformed_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: q, symbol: "fix_add")) }
    }

    @Test("garbage after a valid ELF ident and random corruption never crash")
    func fuzz() throws {
        let fx = try Fixtures.get()
        let original = [UInt8](try Data(contentsOf: URL(fileURLWithPath: fx.pie)))
        var rng = SplitMix(seed: 0x5eed)
        // Pure garbage behind a plausible header.
        var garbage = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &rng) }
        garbage.replaceSubrange(0..<20, with: [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 62, 0])
        let g = try write(garbage, "garbage")
        expectCode("malformed_elf") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: g, symbol: "main")) }
        // Targeted corruption of header/table fields plus random byte flips.
        let hot = [32, 33, 38, 40, 41, 46, 54, 56, 58, 60, 62]
        var outcomes: [String: Int] = [:]
        for i in 0..<400 {
            var b = original
            let flips = Int.random(in: 1...8, using: &rng)
            for _ in 0..<flips {
                let at = i % 2 == 0 ? hot[Int.random(in: 0..<hot.count, using: &rng)] : Int.random(in: 0..<b.count, using: &rng)
                b[at] = UInt8.random(in: 0...255, using: &rng)
            }
            let p = try write(b, "fuzz")
            for spec in [ProbeSpecInput(path: p, symbol: "fix_add"), ProbeSpecInput(path: p, symbol: "gen_*"),
                         ProbeSpecInput(path: p, usdt: "fixprov:hit"), ProbeSpecInput(path: p, offset: 0x1200, force: true)] {
                do { _ = try r.resolve(spec); outcomes["ok", default: 0] += 1 } catch { outcomes[error.code.rawValue, default: 0] += 1 }
            }
        }
        #expect(outcomes.values.reduce(0, +) == 1600)
        #expect(outcomes["malformed_elf", default: 0] > 0)
    }

    @Test func invalidSpecs() throws {
        let fx = try Fixtures.get()
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie)) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "main", offset: 4)) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "relative/prog", symbol: "main")) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "")) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "", symbol: "main")) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, usdt: "fixprov:hit", retprobe: true)) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "main", pid: -3)) }
    }

    @Test func libraryAndProcessNotFound() {
        let e = expectCode("library_not_found") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: "libdefinitely_not_here_42", symbol: "f"))
        }
        #expect(e?.message.contains("libdefinitely_not_here_42") == true)
        expectCode("library_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "libnothere.so.7", symbol: "f")) }
        expectCode("process_not_found") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc", pid: Int32.max))
        }
        expectCode("process_not_found") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: "/usr/bin/true", symbol: "main", pid: Int32.max))
        }
    }
}

/// Deterministic RNG so a fuzz failure reproduces.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
