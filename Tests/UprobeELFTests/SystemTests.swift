import Foundation
import Testing
@testable import UprobeELF

/// Real binaries nobody here wrote: glibc, Debian's python3.11, libsqlite3.
@Suite("system binaries")
struct SystemTests {
    let r = Resolver()

    @Test("libc by short name and soname; malloc plain and versioned")
    func libcMalloc() throws {
        let a = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc")).first)
        let b = try #require(try r.resolve(ProbeSpecInput(path: "libc.so.6", symbol: "malloc@@GLIBC_2.2.5")).first)
        #expect(a.path.hasSuffix("/libc.so.6"))
        #expect(a.path == b.path && a.fileOffset == b.fileOffset && a.inode == b.inode)
        let vaddr = try #require(try readelfSymbol(a.path, "malloc@@GLIBC_2.2.5", dynamic: true))
        #expect(a.fileOffset == (try expectedOffset(a.path, vaddr: vaddr)))
        #expect(a.symbol == "malloc")
        #expect(a.buildID == (try readelfBuildID(a.path)))
        let g = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "getpid")).first)
        let gv = try #require(try readelfSymbol(g.path, "getpid@@GLIBC_2.2.5", dynamic: true))
        #expect(g.fileOffset == (try expectedOffset(g.path, vaddr: gv)))
        expectCode("symbol_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc@@GLIBC_9.9")) }
        let e = expectCode("symbol_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: "libc", symbol: "mallocc")) }
        #expect(e?.message.contains("did you mean 'malloc'") == true)
    }

    @Test("libc IFUNCs probe the resolver and say so", arguments: ["memcpy", "strlen"])
    func libcIFunc(name: String) throws {
        let p = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: name)).first)
        let w = try #require(p.warning)
        #expect(w.contains("IFUNC") && w.contains(name))
        let elf = try ELFFile(path: p.path)
        #expect(elf.functionSymbols.contains { $0.name == name && $0.isIFunc })
    }

    @Test("libc glob: one probe per distinct address")
    func libcGlob() throws {
        let probes = try r.resolve(ProbeSpecInput(path: "libc", symbol: "mem???"))
        #expect(Set(probes.map(\.fileOffset)).count == probes.count)
        #expect(probes.contains { $0.symbol == "memcpy" || $0.aliases.contains("memcpy") })
        let small = Resolver(limits: ResolverLimits(maxMatchesPerSpec: 10))
        expectCode("too_many_matches") { () throws(ResolveError) in try small.resolve(ProbeSpecInput(path: "libc", symbol: "*")) }
    }

    @Test("python3.11 USDT python:function__entry with a semaphore")
    func pythonUSDT() throws {
        let path = "/usr/bin/python3.11"
        try #require(FileManager.default.fileExists(atPath: path))
        let probes = try r.resolve(ProbeSpecInput(path: path, usdt: "python:function__entry"))
        let notes = try readelfUSDT(path, provider: "python", name: "function__entry")
        #expect(!probes.isEmpty && probes.count == Set(notes.map(\.0)).count)
        // Base adjustment is a no-op for this file (section address == note base), so readelf's
        // Location translates directly.
        let expected = try Set(notes.map { try #require(try expectedOffset(path, vaddr: $0.0)) })
        #expect(Set(probes.map(\.fileOffset)) == expected)
        let first = try #require(notes.first)
        let sema = try #require(try expectedOffset(path, vaddr: first.1, executable: false))
        #expect(probes.allSatisfy { $0.refCtrOffset == sema })
    }

    @Test("libsqlite3 by soname")
    func sqlite() throws {
        let p = try #require(try r.resolve(ProbeSpecInput(path: "libsqlite3.so.0", symbol: "sqlite3_step")).first)
        #expect(p.path.contains("libsqlite3.so.0"))
        let v = try #require(try readelfSymbol(p.path, "sqlite3_step", dynamic: true))
        #expect(p.fileOffset == (try expectedOffset(p.path, vaddr: v)))
        let short = try r.resolve(ProbeSpecInput(path: "libsqlite3", symbol: "sqlite3_step"))
        #expect(short.first?.inode == p.inode)
    }

    @Test("pid: library from /proc/PID/maps, absolute path under /proc/PID/root")
    func pidView() throws {
        let me = getpid()
        let p = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc", pid: me)).first)
        let q = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc")).first)
        #expect(p.inode == q.inode && p.device == q.device && p.fileOffset == q.fileOffset)
        let t = try r.resolve(ProbeSpecInput(path: q.path, symbol: "malloc", pid: me))
        #expect(t.first?.inode == q.inode)
    }

    @Test("ld.so.cache parser agrees with ldconfig -p")
    func ldCache() throws {
        let bytes = try #require(readWholeFile("/etc/ld.so.cache"))
        let entries = try LibraryLocator.parseCache(bytes)
        #expect(!entries.isEmpty)
        let libc = entries.first { $0.soname == "libc.so.6" && LibraryLocator.isX8664($0.flags) }
        let out = try run("/sbin/ldconfig", ["-p"])
        let line = try #require(out.split(separator: "\n").first { $0.contains("libc.so.6 (libc6,x86-64)") })
        #expect(libc.map { line.hasSuffix("=> " + $0.path) } == true)
        let count = out.split(separator: "\n").filter { $0.hasPrefix("\t") }.count
        #expect(entries.count == count)
        #expect(try LibraryLocator().locate("libc") == libc?.path)
        // Garbage cache data is an error, not a crash.
        #expect(throws: ResolveError.self) { try LibraryLocator.parseCache(Array("glibc-ld.so.cache1.1".utf8) + [0xff, 0xff, 0xff, 0x00]) }
    }

    @Test("without a loader cache, standard directories are searched")
    func directoryFallback() throws {
        let noCache = LibraryLocator(cachePath: "/nonexistent/ld.so.cache")
        #expect(try noCache.locate("libc.so.6").hasSuffix("/libc.so.6"))
        let sq = try noCache.locate("libsqlite3")
        #expect(sq.contains("/libsqlite3.so."))
        #expect(throws: ResolveError.self) { try noCache.locate("libnope_nope") }
        #expect(LibraryLocator.matches(fileName: "libc.so.6", name: "libc"))
        #expect(LibraryLocator.matches(fileName: "libc-2.31.so", name: "libc"))
        #expect(!LibraryLocator.matches(fileName: "libcrypt.so.1", name: "libc"))
        #expect(!LibraryLocator.matches(fileName: "libc.so.6", name: "libc.so.7"))
    }

    @Test("corrupt loader caches never crash the parser")
    func ldCacheFuzz() throws {
        let original = try #require(readWholeFile("/etc/ld.so.cache"))
        var rng = SplitMix(seed: 42)
        for i in 0..<300 {
            var b = original
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let at = i % 2 == 0 ? Int.random(in: 0..<min(b.count, 256), using: &rng) : Int.random(in: 0..<b.count, using: &rng)
                b[at] = UInt8.random(in: 0...255, using: &rng)
            }
            if i % 5 == 0 { b = Array(b.prefix(Int.random(in: 0..<b.count, using: &rng))) }
            _ = try? LibraryLocator.parseCache(b)
        }
    }
}
