import Glibc
import Testing
@testable import UprobeTree

/// The node layout the daemon's memory per probe depends on: a uprobe with one consumer is one
/// 72-byte malloc request (an 80-byte glibc chunk), and the packed fields read back whole.
@Suite struct NodeLayoutTests {
    @Test("a consumer is 20 bytes, 4-byte aligned; a node header 52; one consumer per node is a 72-byte request")
    func sizes() {
        #expect(MemoryLayout<Consumer>.size == 20 && MemoryLayout<Consumer>.stride == 20)
        #expect(MemoryLayout<Consumer>.alignment == 4)
        #expect(MemoryLayout<NodeHeader>.size == 52)
        #expect(NodeHeader.consumersOffset == 52)
        #expect(NodeHeader.size(count: 1) == 72)
        #expect(NodeHeader.size(count: 2) == 92)
        #expect(NodeHeader.consumersOffset % MemoryLayout<Consumer>.alignment == 0)
    }

    @Test("the blocks the tree allocates: 72 usable bytes for one consumer (an 80-byte chunk), more for several")
    func mallocBlocks() {
        let t = UprobeTree()
        // Keys 0..<63 with one consumer, key 63 with three.
        var edits = (0..<64).map { TreeEdit.insertConsumer(UprobeKey(dev: 1, inode: 2, offset: UInt64($0)),
                                                            Consumer(registration: UInt64($0), slot: UInt32($0))) }
        let many = UprobeKey(dev: 1, inode: 2, offset: 63)
        edits += [.insertConsumer(many, Consumer(registration: 100, slot: 1)),
                  .insertConsumer(many, Consumer(registration: 101, slot: 2))]
        t.apply(edits)
        t.read { v in
            let f = v.footprint()
            #expect(f.nodes == 64)
            #expect(f.requestedBytes == 63 * 72 + (52 + 3 * 20))
            #expect(f.mallocChunkBytes == 63 * 80 + 128)
            // The root is embedded in the version block; every other node is its own block.
            var usable: [Int: Int] = [:]   // consumers -> usable size seen
            func visit(_ n: NodePtr?) {
                guard let n else { return }
                usable[Int(n.pointee.count)] = mallocUsableSize(UnsafeMutableRawPointer(n))
                visit(n.pointee.left)
                visit(n.pointee.right)
            }
            visit(v.version.pointee.root?.pointee.left)
            visit(v.version.pointee.root?.pointee.right)
            // glibc: the chunk less its 8-byte header (72 of 80: a 96-byte chunk would give 88).
            // The sanitizers' allocators report the requested size instead.
            #expect(usable[1] == 72, "one-consumer node: usable \(usable[1] ?? -1) bytes (80-byte chunk)")
            #expect(usable[3] == (underSanitizer ? 112 : 120),
                    "three-consumer node (112 requested): usable \(usable[3] ?? -1) bytes")
        }
    }

    @Test("registration ids near the limits, pid filters and flags read back from the packed consumer")
    func consumerEdges() {
        let t = UprobeTree()
        let k = UprobeKey(dev: .max, inode: .max, offset: .max)
        let regs: [UInt64] = [0, 1, UInt64(UInt32.max), UInt64(UInt32.max) + 1, 1 << 63, .max - 1, .max]
        t.apply(regs.enumerated().map { i, r in
            TreeEdit.insertConsumer(k, Consumer(registration: r, slot: UInt32.max - UInt32(i), pid: i % 2 == 0 ? Int32.max : -1,
                                        flags: i % 3 == 0 ? Consumer.retprobe : UInt32.max))
        })
        t.read { v in
            let cs = v.consumers(of: k)
            #expect(cs.map(\.registration) == regs)
            #expect(cs.map(\.slot) == regs.indices.map { UInt32.max - UInt32($0) })
            #expect(cs.map(\.pid) == regs.indices.map { $0 % 2 == 0 ? Int32.max : -1 })
            #expect(cs.map(\.isRetprobe) == regs.indices.map { _ in true })
            #expect(cs.map(\.flags) == regs.indices.map { $0 % 3 == 0 ? Consumer.retprobe : UInt32.max })
            #expect(v.lookup(k)?.contains(registration: .max) == true)
            #expect(v.lookup(k)?.contains(registration: UInt64(UInt32.max) + 2) == false)
            #expect(v.validate().isEmpty)
        }
        // Removing by a 64-bit id: the high half counts.
        t.apply([.removeConsumer(k, registration: UInt64(UInt32.max) + 1), .removeConsumer(k, registration: 1 << 32 | 1)])
        t.read { v in
            #expect(v.consumers(of: k).map(\.registration) == regs.filter { $0 != UInt64(UInt32.max) + 1 })
        }
        var c = Consumer(registration: 5, slot: 1)
        c.registration = .max
        #expect(c.registration == .max && c == Consumer(registration: .max, slot: 1))
        #expect(Consumer(registration: 1, slot: 1) != Consumer(registration: 1 << 32 | 1, slot: 1))
    }

    @Test("a node's batch number and height share a word: each reads back whole at its limits")
    func genAndHeight() {
        let k = UprobeKey(dev: 1, inode: 2, offset: 3)
        for (gen, height) in [(UInt64(0), Int32(1)), (1, 93), (NodeHeader.maxGen, 1), (NodeHeader.maxGen, 255),
                              (NodeHeader.maxGen - 1, 17), (1 << 32, 2)] {
            var n = NodeHeader(key: k, gen: gen, height: height, count: 1)
            #expect(n.gen == gen && n.height == height && n.key == k && n.count == 1)
            n.height = 7
            #expect(n.gen == gen && n.height == 7)
            n.gen = 12
            #expect(n.gen == 12 && n.height == 7)
        }
        #expect(NodeHeader.maxGen == 1 << 56 - 1)
    }

    @Test("heights stay right in a deep tree built and thinned in batches (100,000 keys)")
    func deepTree() {
        let t = UprobeTree()
        let keys = (0..<100_000).map { UprobeKey(dev: 1, inode: UInt64($0 % 3), offset: UInt64($0) &* 0x9E37_79B9) }
        for chunk in stride(from: 0, to: keys.count, by: 10_000) {
            t.apply(keys[chunk..<chunk + 10_000].map { TreeEdit.insertConsumer($0, Consumer(registration: $0.offset, slot: 0)) })
        }
        t.read { v in
            #expect(v.count == 100_000 && v.validate().isEmpty)
            #expect(v.height >= 17 && v.height <= 25, "height \(v.height)")
        }
        t.apply(keys.enumerated().filter { $0.offset % 2 == 0 }.map { TreeEdit.removeKey($0.element) })
        t.read { v in #expect(v.count == 50_000 && v.validate().isEmpty) }
    }
}

/// Whether a sanitizer's allocator stands in for glibc's (its usable size is the request).
private let underSanitizer = dlsym(nil, "__asan_init") != nil || dlsym(nil, "__tsan_init") != nil

/// glibc's size of the malloc block at `p` (not in the Glibc module's headers).
@_silgen_name("malloc_usable_size")
private func mallocUsableSize(_ p: UnsafeMutableRawPointer) -> Int
