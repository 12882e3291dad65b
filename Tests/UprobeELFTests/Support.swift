import Foundation
import Testing
@testable import UprobeELF

/// Runs a tool, returning stdout; throws with stderr on failure.
@discardableResult
func run(_ tool: String, _ args: [String]) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: tool.hasPrefix("/") ? tool : "/usr/bin/\(tool)")
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else {
        throw FixtureError(message: "\(tool) \(args.joined(separator: " ")) failed: \(String(decoding: e, as: UTF8.self))")
    }
    return String(decoding: o, as: UTF8.self)
}

struct FixtureError: Error, CustomStringConvertible { var message: String; var description: String { message } }

/// The C fixtures compiled once per test process into a temporary directory.
struct Fixtures: Sendable {
    let dir: String
    var pie: String { dir + "/prog_pie" }
    var nopie: String { dir + "/prog_nopie" }
    var stripped: String { dir + "/prog_stripped" }         // -rdynamic + strip: .dynsym only
    var bare: String { dir + "/prog_bare" }                 // strip --strip-all, no -rdynamic
    var bareUnstripped: String { dir + "/prog_bare_unstripped" }
    var lib: String { dir + "/libver.so" }
    var gofake: String { dir + "/gofake" }
    /// Functions whose first instruction x86 uprobes cannot probe (Tests/Fixtures/insn).
    var insn: String { dir + "/insn" }

    static let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/elf").path

    static let shared: Result<Fixtures, FixtureError> = {
        do {
            let tmp = NSTemporaryDirectory()
            // Remove fixture dirs left by earlier test processes that are gone.
            for name in (try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [] where name.hasPrefix("uprobeelf-tests-") {
                if let pid = Int32(name.dropFirst("uprobeelf-tests-".count)), kill(pid, 0) != 0, errno == ESRCH {
                    try? FileManager.default.removeItem(atPath: tmp + "/" + name)
                }
            }
            let dir = (tmp.hasSuffix("/") ? tmp : tmp + "/") + "uprobeelf-tests-\(getpid())"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let src = source + "/prog.c"
            try run("gcc", ["-O2", "-pie", "-fPIE", "-o", dir + "/prog_pie", src])
            try run("gcc", ["-O2", "-no-pie", "-fno-pie", "-o", dir + "/prog_nopie", src])
            try run("gcc", ["-O2", "-pie", "-fPIE", "-rdynamic", "-o", dir + "/prog_stripped", src])
            try run("strip", [dir + "/prog_stripped"])
            try run("gcc", ["-O2", "-pie", "-fPIE", "-o", dir + "/prog_bare_unstripped", src])
            try run("strip", ["--strip-all", "-o", dir + "/prog_bare", dir + "/prog_bare_unstripped"])
            try run("gcc", ["-O2", "-shared", "-fPIC", "-Wl,--version-script=" + source + "/libver.map",
                            "-o", dir + "/libver.so", source + "/libver.c"])
            try run("gcc", ["-O2", "-o", dir + "/gofake", source + "/gofake.c"])
            try run("gcc", ["-O1", "-fno-inline", "-o", dir + "/insn", source + "/../insn/insn.c"])
            return .success(Fixtures(dir: dir))
        } catch let e as FixtureError {
            return .failure(e)
        } catch {
            return .failure(FixtureError(message: "\(error)"))
        }
    }()

    static func get() throws -> Fixtures { try shared.get() }
}

// MARK: independent answers from binutils' readelf

struct Segment { var offset: UInt64; var vaddr: UInt64; var filesz: UInt64; var flags: String }

func hexValue(_ s: Substring) -> UInt64? {
    UInt64(s.hasPrefix("0x") ? s.dropFirst(2) : s, radix: 16)
}

/// PT_LOAD segments from `readelf -lW`.
func readelfLoads(_ path: String) throws -> [Segment] {
    try run("readelf", ["-lW", path]).split(separator: "\n").compactMap { line in
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.first == "LOAD", f.count >= 8, let off = hexValue(f[1]), let va = hexValue(f[2]),
              let fs = hexValue(f[4]) else { return nil }
        return Segment(offset: off, vaddr: va, filesz: fs, flags: f[6...(f.count - 2)].joined())
    }
}

/// `st_value` of the first symbol named exactly `name` (as readelf prints it, e.g. `malloc@@GLIBC_2.2.5`).
func readelfSymbol(_ path: String, _ name: String, dynamic: Bool = false) throws -> UInt64? {
    for line in try run("readelf", [dynamic ? "--dyn-syms" : "-sW", "-W", path]).split(separator: "\n") {
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 8, f[7] == name, let v = hexValue(f[1]) else { continue }
        return v
    }
    return nil
}

/// (location, semaphore) of every stapsdt note `provider:name` in `readelf -n`.
func readelfUSDT(_ path: String, provider: String, name: String) throws -> [(UInt64, UInt64)] {
    var out: [(UInt64, UInt64)] = []
    var curProvider = "", curName = ""
    for line in try run("readelf", ["-n", path]).split(separator: "\n") {
        let t = line.trimmingCharacters(in: .whitespaces)
        if t.hasPrefix("Provider: ") { curProvider = String(t.dropFirst(10)) }
        if t.hasPrefix("Name: ") { curName = String(t.dropFirst(6)) }
        if t.hasPrefix("Location: "), curProvider == provider, curName == name {
            // Location: 0x..., Base: 0x..., Semaphore: 0x...
            let parts = t.split(separator: ",").map { $0.split(separator: ":").last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "" }
            if parts.count == 3, let loc = UInt64(parts[0].dropFirst(2), radix: 16),
               let sem = UInt64(parts[2].dropFirst(2), radix: 16) {
                out.append((loc, sem))
            }
        }
    }
    return out
}

func readelfBuildID(_ path: String) throws -> String? {
    for line in try run("readelf", ["-n", path]).split(separator: "\n") {
        let t = line.trimmingCharacters(in: .whitespaces)
        if t.hasPrefix("Build ID: ") { return String(t.dropFirst(10)) }
    }
    return nil
}

/// vaddr -> file offset computed from readelf's segments (R E for code, any for data).
func expectedOffset(_ path: String, vaddr: UInt64, executable: Bool = true) throws -> UInt64? {
    for s in try readelfLoads(path) where (!executable || s.flags.contains("E"))
        && vaddr >= s.vaddr && vaddr < s.vaddr + s.filesz {
        return vaddr - s.vaddr + s.offset
    }
    return nil
}

/// Asserts `body` throws a ResolveError with `code`; returns it for message checks.
@discardableResult
func expectCode(_ code: String, sourceLocation: SourceLocation = #_sourceLocation,
                _ body: () throws(ResolveError) -> [ResolvedProbe]) -> ResolveError? {
    do {
        let r = try body()
        Issue.record("expected \(code), got \(r)", sourceLocation: sourceLocation)
        return nil
    } catch {
        #expect(error.code.rawValue == code, "\(error.message)", sourceLocation: sourceLocation)
        return error
    }
}

func statOf(_ path: String) -> (UInt64, UInt64) {
    var st = stat()
    _ = stat(path, &st)
    return (UInt64(st.st_dev), UInt64(st.st_ino))
}
