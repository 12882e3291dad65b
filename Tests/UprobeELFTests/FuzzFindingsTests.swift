import Foundation
import Testing
@testable import UprobeELF

/// The ELF regression inputs (fuzz/README.md, "Regression inputs"), kept under fuzz/repro/elf: a
/// crafted file gets an error or a sane parse, never a trap, a blow-up or a wrong name.
struct FuzzFindingsTests {
    static let repro = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("fuzz/repro/elf").path

    func resolve(_ file: String, _ spec: (String) -> ProbeSpecInput) -> Result<[ResolvedProbe], ResolveError> {
        let r = Resolver(limits: ResolverLimits(), locator: LibraryLocator(), debugDirectories: [], cache: ELFFileCache(capacity: 0))
        do throws(ResolveError) { return .success(try r.resolve(spec(Self.repro + "/" + file))) } catch { return .failure(error) }
    }

    @Test("a segment placed near 2^64 gives an error for an offset inside it, not an overflow trap")
    func virtualAddressOverflow() {
        for off: UInt64 in [16, 64, 119] {
            if case .success(let p) = resolve("vaddr-overflow.elf", { ProbeSpecInput(path: $0, offset: off, force: true) }) {
                Issue.record("offset \(off) resolved to \(p)")
            }
        }
    }

    @Test("a segment whose file offset is near 2^64 parses (its function is not mapped) instead of trapping")
    func fileOffsetOverflow() {
        if case .success(let p) = resolve("fileoffset-overflow.elf", { ProbeSpecInput(path: $0, symbol: "f") }) {
            Issue.record("f resolved to \(p)")
        }
    }

    @Test("many section headers over one symbol table yield its symbols once")
    func symbolTableAmplification() throws {
        let path = Self.repro + "/symtab-amplification.elf"
        let size = try #require(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int)
        let elf = try ELFFile(path: path)
        #expect(elf.functionSymbols.count <= size / 24, "\(elf.functionSymbols.count) symbols from \(size) bytes")
    }

    @Test("a USDT provider that is not UTF-8 does not shift the probe's name")
    func usdtNameAfterInvalidProvider() throws {
        let elf = try ELFFile(path: Self.repro + "/usdt-invalid-utf8-provider.elf")
        #expect(elf.usdtNotes.map(\.name) == ["tick"], "\(elf.usdtNotes)")
    }

    @Test("a symbol spelled only @VERSION is not a function with an empty name")
    func emptyBaseName() throws {
        let elf = try ELFFile(path: Self.repro + "/empty-symbol-name.elf")
        #expect(!elf.functionSymbols.contains { $0.name.isEmpty })
    }

    @Test("a segment that claims bytes past the end of the file maps no function")
    func segmentBeyondFile() throws {
        let path = Self.repro + "/segment-beyond-file.elf"
        let size = try #require(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int)
        if case .success(let probes) = resolve("segment-beyond-file.elf", { ProbeSpecInput(path: $0, symbol: "*") }) {
            #expect(probes.allSatisfy { $0.fileOffset < UInt64(size) }, "\(probes.map(\.fileOffset))")
        }
    }
}
