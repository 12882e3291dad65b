import Synchronization
import Testing
import UprobeTree

/// The object published with each version (the engine's registry) and staged edits.
@Suite struct PayloadTests {
    let k1 = UprobeKey(dev: 1, inode: 10, offset: 0x100)
    let k2 = UprobeKey(dev: 1, inode: 10, offset: 0x200)

    final class Freed: Sendable {
        let count = Atomic<Int>(0)
        var value: Int { count.load(ordering: .relaxed) }
    }

    final class Box: Sendable {
        let value: Int
        let freed: Freed
        init(_ value: Int, freed: Freed) { self.value = value; self.freed = freed }
        deinit { freed.count.add(1, ordering: .relaxed) }
    }

    @Test("a payload is seen with the edits of its batch, kept by later versions, and freed only after a grace period")
    func payloadTravelsWithItsVersion() {
        let freed = Freed()
        let t = UprobeTree(readerSlots: 4)
        #expect(t.read { $0.withPayload(as: Box.self) { $0.value } } == nil)
        t.apply([.insertConsumer(k1, Consumer(registration: 1, slot: 1))], publishing: Box(1, freed: freed))
        t.read { v in
            #expect(v.count == 1 && v.withPayload(as: Box.self, { $0.value }) == 1)
        }
        // A batch without a payload keeps the current one.
        t.apply([.insertConsumer(k2, Consumer(registration: 2, slot: 2))])
        #expect(t.read { $0.withPayload(as: Box.self) { $0.value } } == 1)
        // A payload with no edits still publishes a version.
        let r = t.apply([], publishing: Box(2, freed: freed))
        #expect(r.version == 3)
        #expect(t.read { $0.withPayload(as: Box.self) { $0.value } } == 2)
        // Of another class: not handed out.
        #expect(t.read { $0.withPayload(as: PayloadTests.Other.self) { _ in true } } == nil)
        t.synchronize()
        #expect(freed.value == 1, "the first box went with the versions that held it")
    }

    final class Other: Sendable {}

    @Test("a reader inside its section keeps the payload it saw, though the writer publishes another")
    func readerKeepsItsPayload() {
        let freed = Freed()
        let t = UprobeTree(readerSlots: 4)
        t.apply([], publishing: Box(1, freed: freed))
        t.read { v in
            t.apply([], publishing: Box(2, freed: freed))
            t.reclaim()
            #expect(v.withPayload(as: Box.self, { $0.value }) == 1)
            #expect(freed.value == 0)
        }
        t.synchronize()
        #expect(freed.value == 1)
        #expect(t.read { $0.withPayload(as: Box.self) { $0.value } } == 2)
    }

    @Test("staged edits stay invisible until the next apply publishes them with its own")
    func stagedEditsPublishTogether() {
        let freed = Freed()
        let t = UprobeTree(readerSlots: 4)
        t.apply([.insertConsumer(k1, Consumer(registration: 1, slot: 1))], publishing: Box(1, freed: freed))
        t.stage([.insertConsumer(k2, Consumer(registration: 2, slot: 2))])
        t.stage([.insertConsumer(k2, Consumer(registration: 3, slot: 3))])
        t.read { v in
            #expect(v.count == 1 && v.consumerCount == 1 && v.sequence == 1)
        }
        let r = t.apply([.removeConsumer(k1, registration: 1)], publishing: Box(2, freed: freed))
        #expect(r.version == 2 && r.keysAdded == 1 && r.keysRemoved == 1 && r.consumersAdded == 2)
        t.read { v in
            #expect(v.count == 1 && v.consumers(of: k2).map(\.registration) == [2, 3])
            #expect(v.withPayload(as: Box.self, { $0.value }) == 2)
        }
    }
}
