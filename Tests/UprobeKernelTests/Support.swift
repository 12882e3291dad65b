import Foundation
import Testing
@testable import UprobeKernel

/// Kernel gating: a test runs when the kernel has what it needs, or when
/// UPROBED_REQUIRE_KERNEL is set (CI) — then missing support is a failure, not a skip.
enum KernelEnv {
    static let required = ProcessInfo.processInfo.environment["UPROBED_REQUIRE_KERNEL"] != nil
    static let supportError: KernelError? = {
        do throws(KernelError) { try KernelSupport.check(); return nil } catch { return error }
    }()
    static var enabled: Bool { required || supportError == nil }

    /// Call first in every kernel test: fails (with the probe's error) when required and absent.
    static func requireSupport() throws {
        if let supportError { throw supportError }
    }
}

/// Compiles a fixture from Tests/Fixtures/kernel into a fresh temp dir and finds file offsets.
struct Fixture {
    let binary: String
    let symbols: [String: UInt64]   // name -> file offset

    static let fixtureDir: URL = URL(fileURLWithPath: #filePath).resolvingSymlinksInPath()
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/kernel")

    /// All fixtures of this test process live under one directory, removed at exit.
    static var root: URL {
        FileManager.default.temporaryDirectory.appendingPathComponent("uprobekernel-tests-\(getpid())")
    }
    private static let cleanupRegistered: Bool = {
        atexit { try? FileManager.default.removeItem(at: Fixture.root) }
        return true
    }()

    static func build(_ source: String, extraFlags: [String] = []) throws -> Fixture {
        _ = cleanupRegistered
        let dir = Self.root.appendingPathComponent(UUID().uuidString.prefix(8).description)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let out = dir.appendingPathComponent((source as NSString).deletingPathExtension).path
        let src = fixtureDir.appendingPathComponent(source).path
        _ = try run("/usr/bin/gcc", ["-O1", "-fno-ipa-icf", "-pthread"] + extraFlags + ["-o", out, src])
        return Fixture(binary: out, symbols: try fileOffsets(of: out))
    }

    func offset(_ name: String) throws -> UInt64 {
        guard let off = symbols[name] else { throw FixtureError("no symbol \(name) in \(binary)") }
        return off
    }

    /// Symbol file offsets, independently of UprobeELF: `readelf -sW` gives FUNC/OBJECT symbol
    /// addresses, `readelf -lW` the LOAD segments; offset = addr - seg.vaddr + seg.offset
    /// (file-backed part of the segment only, so .bss objects are left out).
    static func fileOffsets(of path: String) throws -> [String: UInt64] {
        var segments: [(offset: UInt64, vaddr: UInt64, size: UInt64)] = []
        for line in try run("/usr/bin/readelf", ["-lW", path]).split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.first == "LOAD", f.count >= 6,
                  let off = UInt64(f[1].dropFirst(2), radix: 16),
                  let vaddr = UInt64(f[2].dropFirst(2), radix: 16),
                  let size = UInt64(f[4].dropFirst(2), radix: 16) else { continue }   // FileSiz
            segments.append((off, vaddr, size))
        }
        var result: [String: UInt64] = [:]
        for line in try run("/usr/bin/readelf", ["-sW", path]).split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 8, f[3] == "FUNC" || f[3] == "OBJECT", f[6] != "UND",
                  let addr = UInt64(f[1], radix: 16), addr != 0 else { continue }
            let name = String(f[7])
            if let seg = segments.first(where: { addr >= $0.vaddr && addr < $0.vaddr + $0.size }) {
                result[name] = addr - seg.vaddr + seg.offset
            }
        }
        return result
    }

    @discardableResult
    static func run(_ exe: String, _ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw FixtureError("\(exe) \(args.joined(separator: " ")) exited \(p.terminationStatus)")
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Starts the workload; `wait` makes it block until `release()`.
    func start(iterations: Int, threads: Int = 1, wait: Bool = false, delayMicroseconds: Int = 0) throws -> Workload {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["\(iterations)", "\(threads)"] + (wait ? ["--wait"] : [])
            + (delayMicroseconds > 0 ? ["--delay=\(delayMicroseconds)"] : [])
        let stdin = Pipe()
        p.standardInput = stdin
        try p.run()
        return Workload(process: p, stdin: stdin)
    }

    /// Runs the workload to completion.
    func run(iterations: Int, threads: Int = 1) throws {
        let w = try start(iterations: iterations, threads: threads)
        try w.finish()
    }
}

struct Workload {
    let process: Process
    let stdin: Pipe
    var pid: Int32 { process.processIdentifier }
    func release() { stdin.fileHandleForWriting.write(Data([0x31])) }
    func finish() throws {
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw FixtureError("workload exited \(process.terminationStatus)") }
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

func seconds(_ body: () throws -> Void) rethrows -> Double {
    let start = ContinuousClock.now
    try body()
    let d = ContinuousClock.now - start
    return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}
