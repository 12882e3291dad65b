import Foundation
import Testing
@testable import UprobeELF

@Suite("compiled fixtures")
struct FixtureTests {
    let r = Resolver()

    @Test("PIE: offset matches readelf, alias collapses, dev/inode/build-id reported")
    func pieSymbol() throws {
        let fx = try Fixtures.get()
        let probes = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_add"))
        #expect(probes.count == 1)
        let p = try #require(probes.first)
        let vaddr = try #require(try readelfSymbol(fx.pie, "fix_add"))
        #expect(p.fileOffset == (try expectedOffset(fx.pie, vaddr: vaddr)))
        #expect(p.symbol == "fix_add")
        #expect(p.aliases == ["fix_alias"])
        #expect(p.path == fx.pie)
        let (dev, ino) = statOf(fx.pie)
        #expect(p.device == dev && p.inode == ino)
        #expect(p.buildID != nil)
        #expect(p.buildID == (try readelfBuildID(fx.pie)))
        #expect(p.refCtrOffset == nil && p.warning == nil)
        // Asking by the alias gives the same single probe.
        let byAlias = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_alias"))
        #expect(byAlias.map(\.fileOffset) == [p.fileOffset])
        #expect(Set([byAlias[0].symbol ?? ""] + byAlias[0].aliases) == ["fix_add", "fix_alias"])
    }

    @Test("non-PIE (ET_EXEC): vaddr translated through the executable PT_LOAD")
    func nonPIE() throws {
        let fx = try Fixtures.get()
        let elf = try ELFFile(path: fx.nopie)
        #expect(elf.elfType == 2)
        for name in ["fix_mul", "fix_usdt_b", "gen_29", "main"] {
            let p = try #require(try r.resolve(ProbeSpecInput(path: fx.nopie, symbol: name)).first)
            let vaddr = try #require(try readelfSymbol(fx.nopie, name))
            #expect(vaddr > 0x400000)
            #expect(p.fileOffset == (try expectedOffset(fx.nopie, vaddr: vaddr)), "\(name)")
        }
    }

    @Test("weak and strong at one address: one probe, strong name primary")
    func weakStrong() throws {
        let fx = try Fixtures.get()
        for asked in ["fix_weak", "fix_strong"] {
            let probes = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: asked))
            #expect(probes.count == 1)
            #expect(probes[0].symbol == "fix_strong")
            #expect(probes[0].aliases == ["fix_weak"])
        }
    }

    @Test("the one-lookup index holds plain names only; resolveMany answers each spec as resolve does, in order")
    func uniqueIndexAndRuns() throws {
        let fx = try Fixtures.get()
        let elf = try ELFFile(path: fx.pie)
        // Aliases (both names), weak+strong pairs and IFUNCs take the general path.
        for name in ["fix_add", "fix_alias", "fix_weak", "fix_strong", "fix_copy"] {
            #expect(elf.uniqueFunctionOffsets[name] == nil, "\(name)")
        }
        let vaddr = try #require(try readelfSymbol(fx.pie, "fix_mul"))
        #expect(elf.uniqueFunctionOffsets["fix_mul"] == (try expectedOffset(fx.pie, vaddr: vaddr)))
        // Runs of one file, another file, an invalid spec inside a run, a missing file.
        let specs = [
            ProbeSpecInput(path: fx.pie, symbol: "fix_mul"), ProbeSpecInput(path: fx.pie, symbol: "fix_alias"),
            ProbeSpecInput(path: fx.pie, symbol: ""), ProbeSpecInput(path: fx.pie, symbol: "no_such_function"),
            ProbeSpecInput(path: fx.nopie, symbol: "fix_mul"), ProbeSpecInput(path: "/nonexistent/x", symbol: "f"),
            ProbeSpecInput(path: "/nonexistent/x", offset: 1, usdt: "a:b"), ProbeSpecInput(path: fx.pie, symbol: "fix_copy"),
        ]
        let many = r.resolveMany(specs)
        #expect(many.count == specs.count)
        for (spec, got) in zip(specs, many) {
            let one: Result<[ResolvedProbe], ResolveError>
            do throws(ResolveError) { one = .success(try r.resolve(spec)) } catch { one = .failure(error) }
            switch (got, one) {
            case (.success(let a), .success(let b)): #expect(a == b, "\(spec)")
            case (.failure(let a), .failure(let b)): #expect(a.code == b.code, "\(spec)")
            default: Issue.record("\(spec): resolveMany \(got), resolve \(one)")
            }
        }
        #expect(many.map { (try? $0.get()) != nil } == [true, true, false, false, true, false, false, true])
    }

    @Test("IFUNC: resolver offset with a warning naming the implementations")
    func ifunc() throws {
        let fx = try Fixtures.get()
        let p = try #require(try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_copy")).first)
        let vaddr = try #require(try readelfSymbol(fx.pie, "fix_copy"))
        #expect(p.fileOffset == (try expectedOffset(fx.pie, vaddr: vaddr)))
        let w = try #require(p.warning)
        #expect(w.contains("IFUNC"))
        #expect(w.contains("__fix_copy_fast") && w.contains("__fix_copy_slow"))
        // The local resolver shares the address; it is an alias, not the primary.
        #expect(p.symbol == "fix_copy")
        #expect(p.aliases.contains("fix_copy_resolver"))
    }

    @Test("USDT: two sites, semaphore as a file offset in the data segment", arguments: ["pie", "nopie"])
    func usdt(kind: String) throws {
        let fx = try Fixtures.get()
        let path = kind == "pie" ? fx.pie : fx.nopie
        let probes = try r.resolve(ProbeSpecInput(path: path, usdt: "fixprov:hit"))
        let notes = try readelfUSDT(path, provider: "fixprov", name: "hit")
        #expect(notes.count == 2)
        #expect(probes.count == 2)
        let expected = try notes.map { try #require(try expectedOffset(path, vaddr: $0.0)) }.sorted()
        #expect(probes.map(\.fileOffset) == expected)
        let sema = try #require(try expectedOffset(path, vaddr: notes[0].1, executable: false))
        for p in probes {
            #expect(p.refCtrOffset == sema)
            #expect(p.symbol == "fixprov:hit")
        }
        // The semaphore is not in an executable segment, the probe pcs are.
        let elf = try ELFFile(path: path)
        #expect(elf.fileOffset(ofVirtualAddress: notes[0].1, executable: true) == nil)
        let single = try r.resolve(ProbeSpecInput(path: path, usdt: "fixprov2:plain"))
        #expect(single.count == 1)
        let e = expectCode("usdt_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: path, usdt: "fixprov:nope")) }
        #expect(e?.message.contains("fixprov:hit") == true)
        expectCode("usdt_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.lib, usdt: "a:b")) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: path, usdt: "nocolon")) }
    }

    @Test("globs: one probe per distinct address, limits, no match")
    func globs() throws {
        let fx = try Fixtures.get()
        let gens = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "gen_*"))
        #expect(gens.count == 20)
        #expect(Set(gens.map(\.fileOffset)).count == 20)
        for p in gens {
            let name = try #require(p.symbol)
            let vaddr = try #require(try readelfSymbol(fx.pie, name))
            #expect(p.fileOffset == (try expectedOffset(fx.pie, vaddr: vaddr)))
        }
        #expect(try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "gen_2?")).count == 10)
        // fix_add and fix_alias share an address: 2 probes for 3 names.
        let am = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_[am]*"))
        #expect(am.count == 2)
        #expect(Set(am.compactMap(\.symbol)) == ["fix_add", "fix_mul"])
        let small = Resolver(limits: ResolverLimits(maxMatchesPerSpec: 5))
        expectCode("too_many_matches") { () throws(ResolveError) in try small.resolve(ProbeSpecInput(path: fx.pie, symbol: "gen_*")) }
        #expect(try small.resolve(ProbeSpecInput(path: fx.pie, symbol: "gen_1[0-4]")).count == 5)
        expectCode("symbol_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "zz_nomatch*")) }
    }

    @Test("stripped with -rdynamic: resolved from .dynsym only, same offsets")
    func strippedDynsym() throws {
        let fx = try Fixtures.get()
        let elf = try ELFFile(path: fx.stripped)
        #expect(!elf.hasSymtab && elf.hasDynsym)
        #expect(elf.functionSymbols.allSatisfy { $0.table == .dynsym })
        let p = try #require(try r.resolve(ProbeSpecInput(path: fx.stripped, symbol: "fix_mul")).first)
        let vaddr = try #require(try readelfSymbol(fx.stripped, "fix_mul", dynamic: true))
        #expect(p.fileOffset == (try expectedOffset(fx.stripped, vaddr: vaddr)))
    }

    @Test("no symbols at all: no_symbols; raw offsets need force")
    func bare() throws {
        let fx = try Fixtures.get()
        let e = expectCode("no_symbols") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.bare, symbol: "fix_add")) }
        #expect(e?.message.contains(fx.bare) == true)
        // Offset known from the unstripped twin.
        let off = try #require(try r.resolve(ProbeSpecInput(path: fx.bareUnstripped, symbol: "fix_add")).first?.fileOffset)
        expectCode("offset_not_function_start") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.bare, offset: off)) }
        let forced = try r.resolve(ProbeSpecInput(path: fx.bare, offset: off, force: true))
        #expect(forced.map(\.fileOffset) == [off])
        #expect(forced[0].symbol == nil)
    }

    @Test("raw offsets: function start, mid-function, outside code")
    func offsets() throws {
        let fx = try Fixtures.get()
        let start = try #require(try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_usdt_a")).first?.fileOffset)
        let ok = try r.resolve(ProbeSpecInput(path: fx.pie, offset: start))
        #expect(ok.map(\.fileOffset) == [start] && ok[0].symbol == "fix_usdt_a")
        let e = expectCode("offset_not_function_start") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: fx.pie, offset: start + 1))
        }
        #expect(e?.message.contains("fix_usdt_a+0x1") == true)
        let forced = try r.resolve(ProbeSpecInput(path: fx.pie, offset: start + 1, force: true))
        #expect(forced.map(\.fileOffset) == [start + 1])
        #expect(forced[0].warning?.contains("fix_usdt_a+0x1") == true)
        // The ELF header (offset 0) is in a read-only segment; past EOF is nowhere.
        for bad: UInt64 in [0, 1 << 40, UInt64.max] {
            expectCode("offset_not_executable") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, offset: bad)) }
            expectCode("offset_not_executable") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, offset: bad, force: true)) }
        }
        // Right after the last byte of the executable segment's file range.
        let x = try #require(try readelfLoads(fx.pie).first { $0.flags.contains("E") })
        expectCode("offset_not_executable") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: fx.pie, offset: x.offset + x.filesz, force: true))
        }
    }

    @Test("symbol versions in a shared library")
    func versions() throws {
        let fx = try Fixtures.get()
        let v2 = try #require(try readelfSymbol(fx.lib, "vfunc@@VER_2", dynamic: true))
        let v1 = try #require(try readelfSymbol(fx.lib, "vfunc@VER_1", dynamic: true))
        #expect(v1 != v2)
        let off2 = try expectedOffset(fx.lib, vaddr: v2), off1 = try expectedOffset(fx.lib, vaddr: v1)
        #expect(try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc")).map(\.fileOffset) == [off2].compactMap { $0 })
        #expect(try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@@VER_2")).map(\.fileOffset) == [off2].compactMap { $0 })
        #expect(try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@VER_1")).map(\.fileOffset) == [off1].compactMap { $0 })
        #expect(try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@VER_2")).map(\.fileOffset) == [off2].compactMap { $0 })
        expectCode("symbol_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@@VER_1")) }
        expectCode("symbol_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@VER_9")) }
        expectCode("invalid_spec") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@")) }
        #expect(try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc@*")).count == 2)
        #expect(try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "lib_plain@@VER_1")).count == 1)
        let elf = try ELFFile(path: fx.lib)
        let dyn = elf.functionSymbols.filter { $0.table == .dynsym && $0.name == "vfunc" }
        #expect(Set(dyn.map(\.versionedName)) == ["vfunc@@VER_2", "vfunc@VER_1"])
    }

    @Test("unknown symbol names the path and suggests the closest name")
    func unknownSymbol() throws {
        let fx = try Fixtures.get()
        let e = expectCode("symbol_not_found") { () throws(ResolveError) in try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_ad")) }
        #expect(e?.message.contains(fx.pie) == true)
        #expect(e?.message.contains(".symtab") == true)
        #expect(e?.message.contains("did you mean 'fix_add'") == true)
    }

    @Test("Go detection: retprobe refused unless forced")
    func goBinary() throws {
        let fx = try Fixtures.get()
        #expect(try ELFFile(path: fx.gofake).isGoBinary)
        #expect(try !ELFFile(path: fx.pie).isGoBinary)
        expectCode("retprobe_on_go") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: fx.gofake, symbol: "go_func", retprobe: true))
        }
        #expect(try r.resolve(ProbeSpecInput(path: fx.gofake, symbol: "go_func", retprobe: true, force: true)).count == 1)
        #expect(try r.resolve(ProbeSpecInput(path: fx.gofake, symbol: "go_func")).count == 1)
        #expect(try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_add", retprobe: true)).count == 1)
    }

    @Test("symlinks and hard links give the same (dev, inode) and canonical path")
    func links() throws {
        let fx = try Fixtures.get()
        let sym = fx.dir + "/link-sym", hard = fx.dir + "/link-hard"
        try? FileManager.default.removeItem(atPath: sym)
        try? FileManager.default.removeItem(atPath: hard)
        try FileManager.default.createSymbolicLink(atPath: sym, withDestinationPath: "prog_pie")
        try FileManager.default.linkItem(atPath: fx.pie, toPath: hard)
        let a = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_mul"))[0]
        let b = try r.resolve(ProbeSpecInput(path: sym, symbol: "fix_mul"))[0]
        let c = try r.resolve(ProbeSpecInput(path: hard, symbol: "fix_mul"))[0]
        #expect(b.path == fx.pie)
        #expect(a.device == b.device && a.inode == b.inode && a.inode == c.inode && a.fileOffset == c.fileOffset)
    }
}
