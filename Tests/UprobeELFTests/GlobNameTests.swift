import Foundation
import Testing
@testable import UprobeELF

/// A glob's names are packed from the symbol table's bytes (`Resolver.pack`): they must be the
/// names a String of each gives, also where a name is not ASCII or not even UTF-8 (the parser
/// repairs it, and the packed bytes, which replies and the state file write as they are, must
/// be the repaired ones).
@Suite("glob names from the symbol table")
struct GlobNameTests {
    /// Compiles `source` into a PIE in a directory of its own and returns its path.
    static func build(_ source: String, _ name: String) throws -> String {
        let dir = NSTemporaryDirectory() + "uprobeelf-globnames-\(getpid())-\(name)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try source.write(toFile: dir + "/\(name).c", atomically: true, encoding: .utf8)
        _ = try run("gcc", ["-O1", "-fno-inline", "-pie", "-fPIE", "-o", dir + "/\(name)", dir + "/\(name).c"])
        return dir + "/\(name)"
    }

    static func check(_ path: String, expect wanted: [String]) throws {
        defer { try? FileManager.default.removeItem(atPath: URL(fileURLWithPath: path).deletingLastPathComponent().path) }
        let elf = try ELFFile(path: path)
        let probes = try Resolver().resolve(ProbeSpecInput(path: path, symbol: "*"))
        let names = Set(probes.compactMap(\.symbol))
        for w in wanted { #expect(names.contains(w), "\(w) among \(names.sorted())") }
        // Every name is the table's own, as a String made from its bytes would be.
        let table = Set((0..<elf.symbols.count).map { elf.symbols.name($0) })
        for p in probes {
            let name = try #require(p.symbol)
            #expect(table.contains(name), "\(name)")
            #expect(p.symbolIs(name) && p.symbolByteCount == name.utf8.count)
        }
    }

    @Test("ASCII names: packed from the table's bytes, every one as the table has it")
    func asciiNames() throws {
        try Self.check(try Self.build("int plain_one(int x) { return x + 1; }\nint plain_two(int x) { return x * 2; }\n"
            + "int main(int c, char **v) { return plain_one(c) + plain_two(c); }\n", "ascii"), expect: ["plain_one", "plain_two", "main"])
    }

    @Test("a non-ASCII name is packed as it is")
    func unicodeNames() throws {
        try Self.check(try Self.build("int z\u{00E4}hler(int x) { return x + 1; }\nint plain_three(int x) { return x * 3; }\n"
            + "int main(int c, char **v) { return z\u{00E4}hler(c) + plain_three(c); }\n", "unicode"), expect: ["zähler", "plain_three", "main"])
    }

    @Test("a name that is not valid UTF-8 is stored repaired, as its String is: the bytes the replies and state file write are UTF-8")
    func invalidUTF8Name() throws {
        try Self.check(try Self.build("int f(int x) __asm__(\"bad\\377name\");\nint f(int x) { return x + 1; }\n"
            + "int main(int c, char **v) { return f(c); }\n", "invalid"), expect: ["bad\u{FFFD}name", "main"])
    }
}
