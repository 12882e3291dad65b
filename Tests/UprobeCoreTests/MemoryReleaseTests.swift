import CUprobeSys
import Dispatch
import Foundation
import Synchronization
import Testing
@testable import UprobeCore

/// A whole binary's registration and removal leave nothing of their size behind in the
/// writer, and a bulk removal's links are closed while the writer is still busy with it.
struct MemoryReleaseTests {
    static let bulk = 60_000

    @Test("after registering and removing 60,000 probes the writer's tables hold nothing of that size: slot table, free list, staged inserts, dead slots, rounds")
    func bulkLeavesNothing() throws {
        let h = Harness(kernel: FakeKernel(capacity: 1 << 17))
        let offsets = (0..<Self.bulk).map { UInt64(0x10 + $0 * 0x10) }
        let r = h.registerBatch([[item("/whole", inode: 7, offsets: offsets)]])
        let ids = try r[0].get().map(\.id)
        #expect(ids.count == Self.bulk)
        #expect(h.applier.links.slotTableCapacity >= Self.bulk, "the table grew to the registration (a check that can fail)")
        #expect(h.applier.trimmer.releasing, "a bulk registration opens a heap-release window")

        let removal = h.unregister(ids)
        #expect((try? removal?.get())?.count == Self.bulk)
        h.applier.finishDetaches()
        h.applier.maintain()
        let snap = h.published.load()
        #expect(snap.probes.isEmpty && snap.slotsInUse == 0 && snap.slotHighWater == 0)
        #expect(snap.counters.pendingRemovals == 0 && snap.linksOpen == 0)
        #expect(h.kernel.openSlots.isEmpty)
        #expect(h.applier.links.slotTableCapacity <= 4096)
        #expect(h.applier.slots.freeListCapacity <= 4096)
        #expect(h.applier.registry.insertBufferCapacity <= 16_384)
    }

    @Test("a bulk removal's links are closing while the writer writes its state entry; its slots are free only once that close is over")
    func bulkDetachStartsEarly() throws {
        let kernel = FakeKernel(capacity: 8192)
        let entered = DispatchSemaphore(value: 0)
        let gate = DispatchSemaphore(value: 0)
        // Set by `persist` during the unregister's batch (before it is published).
        let closingWhilePersisting = Mutex<Bool?>(nil)
        let removing = Atomic<Bool>(false)
        let h = Harness(kernel: kernel, persist: { _ in
            guard removing.load(ordering: .relaxed) else { return }
            let closing = entered.wait(timeout: .now() + 10) == .success
            closingWhilePersisting.withLock { $0 = closing }
        })
        let r = h.registerBatch([[item("/a", inode: 1, offsets: (0..<5000).map { UInt64(0x10 + $0 * 0x10) })]])
        let ids = try r[0].get().map(\.id)
        kernel.lock.withLock {
            kernel.closeEntered = entered
            kernel.closeGate = gate
        }
        removing.store(true, ordering: .relaxed)
        #expect((try? h.unregister(ids)?.get())?.count == 5000)
        #expect(closingWhilePersisting.withLock { $0 } == true, "the link's close began before the batch's state entry was written")
        // The close is held: the removal is published, its slots are not free yet.
        var snap = h.applier.makeSnapshot()
        #expect(snap.probes.isEmpty)
        #expect(snap.slotsInUse == 5000 && snap.counters.pendingRemovals == 5000)
        kernel.lock.withLock { kernel.closeGate = nil }
        gate.signal()
        h.applier.finishDetaches()
        snap = h.applier.makeSnapshot()
        #expect(snap.slotsInUse == 0 && snap.counters.pendingRemovals == 0 && snap.linksOpen == 0)
        #expect(kernel.openSlots.isEmpty)
    }

    @Test("the trimmer holds one heap-release window from a request to its last follow-up; a request meanwhile extends it")
    func trimmerWindow() {
        let trimmer = MemoryTrimmer(delay: .milliseconds(5))
        #expect(!trimmer.releasing)
        trimmer.request()
        #expect(trimmer.releasing)
        #expect(CUprobeSys_heap_release_windows() >= 1)
        trimmer.request()
        let deadline = Date().addingTimeInterval(30)
        while trimmer.releasing && Date() < deadline { usleep(2_000) }
        #expect(!trimmer.releasing, "the window closes after the follow-ups")
        #expect(trimmer.count >= 1)
    }

    @Test("heap-release windows nest: the kept trim threshold returns with the last one")
    func windowsNest() {
        let before = CUprobeSys_heap_release_windows()
        CUprobeSys_heap_release_begin()
        CUprobeSys_heap_release_begin()
        #expect(CUprobeSys_heap_release_windows() >= before + 2)
        CUprobeSys_heap_release_end()
        CUprobeSys_heap_release_end()
        #expect(CUprobeSys_heap_release_windows() >= 0)
    }

    @Test("slot table and free list give their storage back once a bulk is gone, and keep a small one")
    func tablesShrink() {
        var table = SlotTable<FakeKernel>()
        let v = FakeKernel()
        for s in 0..<UInt32(100_000) { table[s] = v }
        #expect(table.capacity >= 100_000)
        for s in 0..<UInt32(100_000) { table[s] = nil }
        #expect(table.capacity <= 4096)
        // Removed from the top down, as well.
        for s in 0..<UInt32(50_000) { table[s] = v }
        for s in (0..<UInt32(50_000)).reversed() { table[s] = nil }
        #expect(table.capacity <= 4096)
        // A slot still set keeps the table up to it, and reads stay right.
        for s in 0..<UInt32(50_000) { table[s] = v }
        for s in 0..<UInt32(49_999) { table[s] = nil }
        #expect(table[49_999] === v && table[10] == nil)

        var a = SlotAllocator(capacity: 200_000)
        let all = a.allocate(100_000) ?? []
        a.release(Array(all.dropFirst()))
        #expect(a.highWater == 1 && a.inUse == 1)
        #expect(a.freeListCapacity <= 4096)
        var small = [UInt32](repeating: 1, count: 100)
        small.removeAll(keepingCapacity: true)
        let kept = small.capacity
        small.shrinkIfSparse()
        #expect(small.capacity == kept, "a small array keeps its storage")
    }
}
