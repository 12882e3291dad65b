import Foundation
import Synchronization
import Testing
@testable import UprobeELF

/// Symbol names compressed in blocks (`SymbolNames.compact`, `CompressedNames`,
/// `NameCompactor`): every name reads back as it was, before, during and after the swap.
@Suite("compressed symbol names")
struct CompressedNamesTests {
    /// Names like a C++ binary's: long shared prefixes, some unique parts; with the cases
    /// that stress the layout mixed in (nil, empty, length prefixes of one and two bytes,
    /// non-ASCII, one name larger than a block).
    static func names(_ count: Int) -> [String?] {
        let namespaces = ["_ZN5swift4Lowering", "_ZN4llvm12DenseMapBase", "_ZNK5clang4Sema", "_ZN5swift3SIL"]
        var out: [String?] = []
        for i in 0..<count {
            switch i % 97 {
            case 13: out.append(nil)
            case 14: out.append("")
            case 15: out.append(String(repeating: "a", count: 127))
            case 16: out.append(String(repeating: "b", count: 128))
            case 17: out.append("größe→∞ \(i)")
            default:
                out.append("\(namespaces[i % namespaces.count])\(i % 7)Type\(i / 3)E\(i)_callee_\(String(i * 7919, radix: 36))")
            }
        }
        out.insert(String(repeating: "c", count: 3 * CompressedNames.blockBytes), at: count / 2)
        return out
    }

    /// The buffer of `packed`'s first name.
    static func buffer(_ packed: [(names: SymbolNames, at: UInt32)?]) -> SymbolNames? {
        for case let p? in packed { return p.names }
        return nil
    }

    /// Every name of `packed` (one buffer) read back equals `names`, with a NUL after its bytes.
    static func check(_ packed: [(names: SymbolNames, at: UInt32)?], _ names: [String?], order: [Int]) {
        for i in order {
            #expect((packed[i] == nil) == (names[i] == nil))
            guard let p = packed[i], let name = names[i] else { continue }
            let ok = p.names.withName(at: p.at) { bytes in
                bytes.elementsEqual(name.utf8) && bytes.baseAddress?[bytes.count] == 0
            }
            #expect(ok, "name \(i)")
        }
    }

    @Test("every name reads back after compaction: in order, backwards, at random; nil, empty, non-ASCII, a name larger than a block")
    func roundTrip() throws {
        let names = Self.names(20_000)
        let packed = SymbolNames.pack(names, storeFrom: 0)
        let buffer = try #require(Self.buffer(packed))
        #expect(packed.allSatisfy { $0 == nil || $0?.names === buffer }, "one buffer")
        #expect(!buffer.isCompressed)
        let plain = buffer.byteCount
        let sizes = try #require(buffer.compact())
        #expect(buffer.isCompressed && sizes.plainBytes == plain && buffer.byteCount == plain)
        #expect(sizes.storedBytes == buffer.storedBytes && sizes.storedBytes < plain / 3, "\(sizes.storedBytes) of \(plain) bytes")
        #expect(buffer.compact() == nil, "compressed once")
        Self.check(packed, names, order: Array(names.indices))
        Self.check(packed, names, order: Array(names.indices.reversed()))
        var rng = SystemRandomNumberGenerator()
        Self.check(packed, names, order: names.indices.map { _ in Int.random(in: names.indices, using: &rng) })
        // The String and ResolvedProbe views too.
        let file = ResolvedFile(path: "/a", device: 1, inode: 2, buildID: nil)
        for i in [0, 13, 14, 17, names.count / 2, names.count - 1] {
            let p = packed[i]
            let probe = ResolvedProbe(file: p.map { file.with(names: $0.names) } ?? file, fileOffset: UInt64(i), nameAt: p?.at)
            #expect(probe.symbol == names[i] && probe.symbolIs(names[i]) && probe.symbolByteCount == (names[i]?.utf8.count ?? 0))
            #expect(probe == ResolvedProbe(file: file, fileOffset: UInt64(i), symbol: names[i]))
        }
    }

    @Test("the names on both sides of every block boundary read back, and a block covers whole names")
    func blockBoundaries() throws {
        let names = Self.names(10_000)
        let packed = SymbolNames.pack(names, storeFrom: 0)
        let buffer = try #require(Self.buffer(packed))
        let bytes: NameBytes = try #require(Self.plainBytes(buffer))
        let compressed = try #require(CompressedNames.make(bytes))
        #expect(compressed.blockCount > 10 && compressed.plainCount == bytes.count)
        // Each name lies inside one block; the first name of each block starts it.
        var firsts: [Int] = []
        for (i, p) in packed.enumerated() {
            guard let p else { continue }
            let at = Int(p.at)
            let (_, range) = compressed.block(containing: at)
            let end = at + NameBytes.storedSize(utf8Count: names[i]?.utf8.count ?? 0)
            #expect(range.contains(at) && end <= range.upperBound, "name \(i)")
            if range.lowerBound == at { firsts.append(i) }
        }
        #expect(firsts.count == compressed.blockCount)
        // The names around each boundary, each read first (cache miss) after the other block.
        _ = buffer.compact()
        var order: [Int] = []
        for f in firsts where f > 0 { order += [f, f - 1, f, f + 1, f - 1] }
        Self.check(packed, names, order: order.filter { names.indices.contains($0) })
        // A block decodes to exactly its stretch of the plain bytes.
        for index in [0, compressed.blockCount / 2, compressed.blockCount - 1] {
            let block = try #require(compressed.decode(block: index))
            let range = compressed.block(containing: Int(packed[firsts[index]]?.at ?? 0)).plain
            bytes.withBytes { all in block.withBytes { #expect($0.elementsEqual(all[range])) } }
        }
    }

    /// The plain bytes of an uncompressed buffer (a copy, made through the names' offsets).
    static func plainBytes(_ buffer: SymbolNames) -> NameBytes? {
        var copy: [UInt8] = []
        var at: UInt32 = 0
        while Int(at) < buffer.byteCount {
            let size = buffer.withName(at: at) { bytes -> Int in
                let stored = NameBytes.storedSize(utf8Count: bytes.count)
                // Prefix, bytes, NUL: the prefix is what precedes the bytes.
                let prefix = stored - bytes.count - 1
                copy += UnsafeBufferPointer(start: bytes.baseAddress.map { $0 - prefix }, count: stored)
                return stored
            }
            at += UInt32(size)
        }
        return copy.withUnsafeBufferPointer { c in NameBytes.make(count: c.count) { _ = $0.initialize(from: c) } }
    }

    @Test("readers on four threads read every name right while the buffer is compressed under them")
    func concurrentSwap() throws {
        let names = Self.names(30_000)
        let packed = SymbolNames.pack(names, storeFrom: 0)
        let buffer = try #require(Self.buffer(packed))
        let wrong = Atomic<Int>(0)
        let reads = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let group = DispatchGroup()
        // @unchecked: immutable after this point; the names are read-only.
        struct Shared: @unchecked Sendable { let packed: [(names: SymbolNames, at: UInt32)?]; let names: [String?] }
        let shared = Shared(packed: packed, names: names)
        for t in 0..<4 {
            DispatchQueue.global().async(group: group) {
                // Two threads scan in order, two jump around: both kinds of reader meet the swap.
                var i = t * 997
                while !stop.load(ordering: .acquiring) {
                    i = t < 2 ? (i + 1) % shared.names.count : (i &* 31 &+ 7) % shared.names.count
                    guard let p = shared.packed[i], let name = shared.names[i] else { continue }
                    if !p.names.withName(at: p.at, { $0.elementsEqual(name.utf8) }) { wrong.add(1, ordering: .relaxed) }
                    reads.add(1, ordering: .relaxed)
                }
            }
        }
        while reads.load(ordering: .relaxed) < 20_000 { usleep(1_000) }
        let sizes = buffer.compact()
        let atSwap = reads.load(ordering: .relaxed)
        while reads.load(ordering: .relaxed) < atSwap + 50_000 { usleep(1_000) }
        stop.store(true, ordering: .releasing)
        group.wait()
        #expect(sizes != nil && buffer.isCompressed)
        #expect(wrong.load(ordering: .relaxed) == 0)
    }

    @Test("buffers with no names, small ones and the pack of only nils")
    func smallAndEmpty() throws {
        let none = SymbolNames.pack([String?]())
        #expect(none.isEmpty)
        let nils = SymbolNames.pack([nil, nil] as [String?])
        #expect(nils.count == 2 && nils.allSatisfy { $0 == nil })
        let one = SymbolNames.single("")
        #expect(one.names.name(at: one.at) == "" && one.names.byteCount == 2)
        // A small buffer keeps its bytes inline and is never compressed; made as a store, a
        // buffer of one short name still compresses (the compactor does not ask it to).
        let inline = SymbolNames.pack(["f"] as [String?], compactor: NameCompactor(minimumBytes: 64 << 10))
        #expect(inline[0]?.names.header.store == nil && inline[0]?.names.compact() == nil && inline[0]?.names.name(at: 0) == "f")
        let small = SymbolNames.pack(["f", nil, "größe"] as [String?], storeFrom: 0)
        let buffer = try #require(small[0]?.names)
        #expect(buffer.compact() != nil)
        #expect(buffer.name(at: small[0]?.at ?? 0) == "f" && buffer.name(at: small[2]?.at ?? 0) == "größe")
    }

    @Test("the compactor compresses a large buffer after its delay, skips small ones and ones already freed")
    func compactor() async throws {
        let compactor = NameCompactor(delay: .milliseconds(50), minimumBytes: 64 << 10)
        let names = Self.names(5_000)
        let kept = SymbolNames.pack(names, compactor: compactor)
        let small = SymbolNames.pack(["f", "g"] as [String?], compactor: compactor)
        // Freed before its delay: never compressed, and its bytes go with it although the
        // compactor still holds its store.
        let droppedStore: NameStore? = {
            let dropped = SymbolNames.pack(Self.names(5_000), compactor: compactor)
            #expect(dropped.count == 5_001 && Self.buffer(dropped)?.header.store?.storedBytes ?? 0 > 64 << 10)
            return Self.buffer(dropped)?.header.store
        }()
        #expect(droppedStore?.storedBytes == 0)
        let buffer = try #require(kept[0]?.names)
        for _ in 0..<500 where !buffer.isCompressed { try await Task.sleep(for: .milliseconds(10)) }
        // The totals are counted after the swap: wait for them too.
        for _ in 0..<100 where compactor.totals.buffers == 0 { try await Task.sleep(for: .milliseconds(10)) }
        try await Task.sleep(for: .milliseconds(200))
        #expect(buffer.isCompressed && small[0]?.names.isCompressed == false)
        let totals = compactor.totals
        #expect(totals.buffers == 1 && totals.plainBytes == buffer.byteCount && totals.storedBytes == buffer.storedBytes)
        Self.check(kept, names, order: Array(names.indices))
    }
}
