import Testing
import UprobeTree

/// Model-based test: thousands of random batches applied to the tree and to a plain dictionary
/// model; after every batch the tree must match the model (order, counts, lookups, ranges) and be
/// structurally sound.
@Suite struct ModelTests {
    /// Small key space (2 devs x 4 inodes x 48 offsets) so inserts, upserts and removals collide.
    static func randomKey(_ rng: inout SplitMix64) -> UprobeKey {
        UprobeKey(dev: UInt64.random(in: 0..<2, using: &rng), inode: UInt64.random(in: 0..<4, using: &rng),
                  offset: UInt64.random(in: 0..<48, using: &rng) * 4)
    }

    static func applyToModel(_ model: inout [UprobeKey: [Consumer]], _ e: TreeEdit) {
        switch e {
        case let .insertConsumer(k, c):
            var list = model[k] ?? []
            if let i = list.firstIndex(where: { $0.registration == c.registration }) { list[i] = c } else { list.append(c) }
            model[k] = list
        case let .removeConsumer(k, r):
            guard var list = model[k] else { return }
            list.removeAll { $0.registration == r }
            model[k] = list.isEmpty ? nil : list
        case let .removeKey(k):
            model[k] = nil
        }
    }

    @Test(arguments: [UInt64(1), 2, 3])
    func randomBatchesMatchModel(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        let tree = UprobeTree(readerSlots: 4)
        var model: [UprobeKey: [Consumer]] = [:]
        var lastVersion: UInt64 = 0
        for batchNo in 0..<1500 {
            var batch: [TreeEdit] = []
            // Grow first, then hover around a few hundred keys.
            let n = Int.random(in: 0...24, using: &rng)
            let insertBias = batchNo < 300 ? 75 : 50
            for _ in 0..<n {
                let k = Self.randomKey(&rng)
                let roll = Int.random(in: 0..<100, using: &rng)
                if roll < insertBias {
                    let reg = UInt64.random(in: 1...6, using: &rng)
                    batch.append(.insertConsumer(k, Consumer(registration: reg, slot: UInt32(batchNo),
                                                             pid: Int32.random(in: 0...3, using: &rng),
                                                             flags: UInt32(reg & 1))))
                } else if roll < insertBias + 35 {
                    batch.append(.removeConsumer(k, registration: UInt64.random(in: 1...6, using: &rng)))
                } else {
                    batch.append(.removeKey(k))
                }
            }
            let before = model
            for e in batch { Self.applyToModel(&model, e) }
            let r = tree.apply(batch)
            if model != before {
                #expect(r.published)
                #expect(r.version == lastVersion + 1)
                lastVersion = r.version
            } else if !r.published {
                #expect(r.version == lastVersion)
            } else {
                lastVersion = r.version   // e.g. an upsert with an identical consumer
            }
            let ok = tree.read { view -> Bool in
                var ok = view.validate().isEmpty
                ok = ok && view.count == model.count
                ok = ok && view.consumerCount == model.values.reduce(0) { $0 + $1.count }
                ok = ok && view.sequence == lastVersion
                // In-order traversal equals the sorted model.
                var walked: [(UprobeKey, [Consumer])] = []
                view.forEach { k, list in walked.append((k, list.toArray())) }
                let sorted = model.sorted { $0.key < $1.key }
                ok = ok && walked.count == sorted.count
                    && zip(walked, sorted).allSatisfy { $0.0 == $1.key && $0.1 == $1.value }
                ok = ok && view.first == sorted.first?.key && view.last == sorted.last?.key
                // Point lookups, hits and misses.
                for _ in 0..<8 {
                    let k = Self.randomKey(&rng)
                    ok = ok && view.consumers(of: k) == (model[k] ?? [])
                    ok = ok && view.contains(k) == (model[k] != nil)
                    let viaLookup: [Consumer]? = view.withConsumers(of: k) { $0.toArray() }
                    ok = ok && viaLookup == model[k]
                    if let c = model[k]?.first {
                        ok = ok && view.withConsumers(of: k) { $0.first(registration: c.registration) } == c
                    }
                }
                // Range over one file.
                let dev = UInt64.random(in: 0..<2, using: &rng), ino = UInt64.random(in: 0..<4, using: &rng)
                var inFile: [UprobeKey] = []
                view.forEach(dev: dev, inode: ino) { k, _ in inFile.append(k) }
                ok = ok && inFile == sorted.map(\.key).filter { $0.dev == dev && $0.inode == ino }
                return ok
            }
            #expect(ok, "tree diverged from model at batch \(batchNo) (seed \(seed))")
            if !ok { return }
            if batchNo % 100 == 0 { tree.synchronize() }
        }
        tree.synchronize()
        let stats = tree.reclamationStats
        #expect(stats.pendingBlocks == 0)
        #expect(stats.freedBlocks > 0)
    }

    @Test func largeSequentialBuildStaysBalanced() {
        let tree = UprobeTree()
        var edits: [TreeEdit] = []
        for i in 0..<20_000 {
            edits.append(.insertConsumer(UprobeKey(dev: 7, inode: 9, offset: UInt64(i) * 16),
                                         Consumer(registration: UInt64(i) + 1, slot: UInt32(i))))
            if edits.count == 1000 { tree.apply(edits); edits.removeAll() }
        }
        tree.read { v in
            #expect(v.count == 20_000)
            #expect(v.validate().isEmpty)
            #expect(v.height <= 21)          // AVL bound 1.44*log2(20002) ~ 20.6
        }
        // Remove every other key in one batch.
        tree.apply((0..<10_000).map { .removeKey(UprobeKey(dev: 7, inode: 9, offset: UInt64($0) * 32)) })
        tree.read { v in
            #expect(v.count == 10_000)
            #expect(v.validate().isEmpty)
            var expected: UInt64 = 16
            var ok = true
            v.forEach { k, _ in ok = ok && k.offset == expected; expected += 32 }
            #expect(ok)
        }
    }
}
