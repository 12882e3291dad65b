import Dispatch
import Glibc
import Synchronization
import Testing
import UprobeTree

/// Seconds each stress test runs; CI may override with UPROBETREE_STRESS_SECONDS.
let stressSeconds: Double = {
    if let s = getenv("UPROBETREE_STRESS_SECONDS"), let v = Double(String(cString: s)) { return v }
    return 2.0
}()

/// Per-consumer self-check value: a reader that sees a consumer whose `check` is not
/// `mix(key, registration)` read a torn, half-built or freed (debug-poisoned) record.
@inline(__always)
func mix(_ k: UprobeKey, _ reg: UInt64) -> UInt64 {
    var z = k.dev &* 0x9E37_79B9_7F4A_7C15 ^ k.inode &* 0xC2B2_AE3D_27D4_EB4F ^ k.offset &* 0x1656_67B1_9E37_79F9 ^ reg
    z = (z ^ (z >> 31)) &* 0xBF58_476D_1CE4_E5B9
    return z ^ (z >> 29)
}

/// The header uprobe of the stress tree: its single consumer describes the whole version
/// (consumer count in `slot`, order-independent checksum in `check`), and is rewritten in the
/// same batch as every other edit. A reader that sees half a batch, or a mix of two versions,
/// finds the summary and the contents disagree.
let headerKey = UprobeKey(dev: 0, inode: 0, offset: 0)

extension Consumer {
    /// A consumer carrying a 64-bit self-check value in its `pid` (high half) and `flags` (low
    /// half): every byte of the 20-byte record is then checked by the readers.
    init(registration: UInt64, slot: UInt32, check: UInt64) {
        self.init(registration: registration, slot: slot, pid: Int32(truncatingIfNeeded: check >> 32),
                  flags: UInt32(truncatingIfNeeded: check))
    }
    var check: UInt64 { UInt64(UInt32(bitPattern: pid)) << 32 | UInt64(flags) }
}

final class StressFailures: Sendable {
    let count = Atomic<Int>(0)
    let first = Mutex<String?>(nil)
    func fail(_ message: @autoclosure () -> String) {
        if count.add(1, ordering: .relaxed).newValue == 1 {
            let m = message()
            first.withLock { $0 = m }
        }
    }
}

/// Runs a churning writer against `readers` reader threads for `seconds`.
/// Returns (reads, batches).
func runStress(readers: Int, slots: Int, seconds: Double, seed: UInt64) -> (failures: StressFailures, reads: Int, batches: Int, tree: UprobeTree) {
    let tree = UprobeTree(readerSlots: slots)
    let failures = StressFailures()
    let stop = Atomic<Bool>(false)
    let totalReads = Atomic<Int>(0)
    let totalBatches = Atomic<Int>(0)
    tree.apply([.insertConsumer(headerKey, Consumer(registration: 0, slot: 0, check: 0))])

    let writer = TestThread {
        var rng = SplitMix64(seed: seed)
        var model: [UprobeKey: [UInt64]] = [:]   // key -> registrations
        var checksum: UInt64 = 0
        var consumers = 0
        var batchNo: UInt64 = 0
        while !stop.load(ordering: .relaxed) {
            batchNo += 1
            var batch: [TreeEdit] = []
            for _ in 0..<Int.random(in: 1...32, using: &rng) {
                let k = UprobeKey(dev: 1, inode: UInt64.random(in: 0..<4, using: &rng),
                                  offset: UInt64.random(in: 0..<1024, using: &rng) * 8)
                let roll = Int.random(in: 0..<100, using: &rng)
                if roll < 55 {
                    let reg = UInt64.random(in: 1...4, using: &rng)
                    batch.append(.insertConsumer(k, Consumer(registration: reg, slot: UInt32(reg), check: mix(k, reg))))
                    var list = model[k] ?? []
                    if !list.contains(reg) { list.append(reg); checksum &+= mix(k, reg); consumers += 1 }
                    model[k] = list
                } else if roll < 85 {
                    let reg = UInt64.random(in: 1...4, using: &rng)
                    batch.append(.removeConsumer(k, registration: reg))
                    if var list = model[k], let i = list.firstIndex(of: reg) {
                        list.remove(at: i); checksum &-= mix(k, reg); consumers -= 1
                        model[k] = list.isEmpty ? nil : list
                    }
                } else {
                    batch.append(.removeKey(k))
                    if let list = model.removeValue(forKey: k) {
                        for reg in list { checksum &-= mix(k, reg) }
                        consumers -= list.count
                    }
                }
            }
            batch.append(.insertConsumer(headerKey, Consumer(registration: 0, slot: UInt32(consumers),
                                                             check: checksum)))
            tree.apply(batch)
            if batchNo % 256 == 0 { tree.synchronize() }
        }
        totalBatches.store(Int(batchNo), ordering: .relaxed)
    }

    var threads: [TestThread] = []
    for r in 0..<readers {
        threads.append(TestThread {
            var rng = SplitMix64(seed: seed &+ UInt64(r) &+ 100)
            var reads = 0
            var lastSeq: UInt64 = 0
            while !stop.load(ordering: .relaxed) {
                reads += 1
                if reads % 4 == 0 {
                    // Full walk: contents must match the header's summary of this version.
                    tree.read { v in
                        if v.sequence < lastSeq { failures.fail("sequence went back \(lastSeq) -> \(v.sequence)") }
                        lastSeq = v.sequence
                        guard let header = v.withConsumers(of: headerKey, { $0[0] }) else {
                            failures.fail("header missing"); return
                        }
                        var sum: UInt64 = 0, n = 0, keys = 0
                        var prev: UprobeKey?
                        v.forEach(dev: 1, inode: 0) { _, _ in }   // exercise range walks
                        v.forEach { k, list in
                            keys += 1
                            if let p = prev, !(p < k) { failures.fail("order \(p) !< \(k)") }
                            prev = k
                            if k == headerKey { return }
                            if list.count < 1 || list.count > 4 { failures.fail("\(k): \(list.count) consumers") }
                            list.forEach { c in
                                if c.check != mix(k, c.registration) || c.slot != UInt32(truncatingIfNeeded: c.registration) {
                                    failures.fail("\(k): corrupt consumer \(c)")
                                }
                                sum &+= c.check
                                n += 1
                            }
                        }
                        if sum != header.check || n != Int(header.slot) {
                            failures.fail("half a batch: seq \(v.sequence) summary (\(header.slot), \(header.check)) contents (\(n), \(sum))")
                        }
                        if v.count != keys || v.consumerCount != n + 1 {
                            failures.fail("counts: \(v.count)/\(keys) \(v.consumerCount)/\(n + 1)")
                        }
                        if reads % 64 == 0, !v.validate().isEmpty { failures.fail("invalid: \(v.validate())") }
                    }
                } else {
                    // Point lookups (the stats path).
                    tree.read { v in
                        for _ in 0..<16 {
                            let k = UprobeKey(dev: 1, inode: UInt64.random(in: 0..<4, using: &rng),
                                              offset: UInt64.random(in: 0..<1024, using: &rng) * 8)
                            v.withConsumers(of: k) { list in
                                if list.isEmpty { failures.fail("\(k): empty list") }
                                list.forEach { c in
                                    if c.check != mix(k, c.registration) { failures.fail("\(k): corrupt consumer \(c)") }
                                }
                            }
                        }
                    }
                }
            }
            totalReads.add(reads, ordering: .relaxed)
        })
    }
    sleepMillis(Int(seconds * 1000))
    stop.store(true, ordering: .relaxed)
    writer.join()
    for t in threads { t.join() }
    return (failures, totalReads.load(ordering: .relaxed), totalBatches.load(ordering: .relaxed), tree)
}

@Suite(.serialized) struct ConcurrencyTests {
    @Test func stressReadersSeeConsistentVersionsUnderChurn() {
        let (failures, reads, batches, tree) = runStress(readers: 3, slots: 64, seconds: stressSeconds, seed: 42)
        #expect(failures.count.load(ordering: .relaxed) == 0, "\(failures.first.withLock { $0 ?? "" })")
        #expect(reads > 100)
        #expect(batches > 100)
        tree.synchronize()
        let s = tree.reclamationStats
        #expect(s.pendingBlocks == 0)
        #expect(s.freedBlocks > 0)
        #expect(s.activeReaders == 0)
        print("stress: \(reads) reads, \(batches) batches, \(s.freedBlocks) blocks freed, \(s.completedEpoch) grace periods")
    }

    /// More reader threads than slots: readers must share slots by waiting for each other,
    /// still never for the writer, and everything stays consistent.
    @Test func stressWithFewerSlotsThanReaders() {
        let (failures, reads, _, tree) = runStress(readers: 4, slots: 2, seconds: stressSeconds / 2, seed: 7)
        #expect(failures.count.load(ordering: .relaxed) == 0, "\(failures.first.withLock { $0 ?? "" })")
        #expect(reads > 100)
        tree.synchronize()
        #expect(tree.reclamationStats.pendingBlocks == 0)
    }

    /// `synchronize` must not return while a reader that started before it is still inside its
    /// read; `apply` must not wait for it at all; and the parked reader's version stays intact
    /// (under ASan, any premature free is a use-after-free report).
    @Test func synchronizeWaitsForParkedReaderAndApplyDoesNot() {
        let tree = UprobeTree(readerSlots: 8)
        let keys = (0..<500).map { UprobeKey(dev: 3, inode: 4, offset: UInt64($0)) }
        tree.apply(keys.map { .insertConsumer($0, Consumer(registration: $0.offset + 1, slot: 1, check: mix($0, $0.offset + 1))) })
        let inside = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let readerOK = Atomic<Bool>(false)
        let reader = TestThread {
            tree.read { v in
                inside.signal()
                release.wait()
                // The writer has removed everything meanwhile; this version must be untouched.
                var ok = v.count == 500 && v.validate().isEmpty
                v.forEach { k, list in ok = ok && list.count == 1 && list[0].check == mix(k, list[0].registration) }
                readerOK.store(ok, ordering: .relaxed)
            }
        }
        inside.wait()
        // apply never waits for readers.
        let t0 = monotonicNanos()
        tree.apply(keys.map { .removeKey($0) })
        for i in 0..<50 { tree.apply([.insertConsumer(keys[i], Consumer(registration: 9, slot: 9))]) }
        #expect(monotonicNanos() - t0 < 2_000_000_000)
        #expect(tree.count == 50)
        #expect(tree.reclamationStats.pendingBlocks >= 500)   // nothing the reader can see was freed
        #expect(tree.reclamationStats.activeReaders == 1)

        let done = Atomic<Bool>(false)
        let started = DispatchSemaphore(value: 0)
        let syncer = TestThread {
            started.signal()
            tree.synchronize()
            done.store(true, ordering: .sequentiallyConsistent)
        }
        started.wait()
        sleepMillis(300)
        let returnedEarly = done.load(ordering: .sequentiallyConsistent)
        #expect(!returnedEarly, "synchronize returned while a reader was inside")
        release.signal()
        reader.join()
        syncer.join()
        let returned = done.load(ordering: .sequentiallyConsistent)
        let sawIntactVersion = readerOK.load(ordering: .relaxed)
        #expect(returned)
        #expect(sawIntactVersion)
        #expect(tree.reclamationStats.pendingBlocks == 0)
        #expect(tree.reclamationStats.activeReaders == 0)
    }

    /// A grace period waits only for the readers that were inside when it started: a reader that
    /// enters later (and so cannot see the memory) must not hold it back, and `reclaim()` frees
    /// without blocking once the old readers have left.
    @Test func gracePeriodIgnoresReadersThatEnteredLater() {
        let tree = UprobeTree(readerSlots: 8)
        let k = UprobeKey(dev: 1, inode: 1, offset: 1)
        tree.apply([.insertConsumer(k, Consumer(registration: 1, slot: 1))])
        tree.synchronize()
        #expect(tree.reclamationStats.pendingBlocks == 0)

        func park() -> (TestThread, DispatchSemaphore) {
            let inside = DispatchSemaphore(value: 0)
            let release = DispatchSemaphore(value: 0)
            let t = TestThread { tree.read { _ in inside.signal(); release.wait() } }
            inside.wait()
            return (t, release)
        }
        let (oldReader, releaseOld) = park()
        tree.apply([.removeKey(k)])              // unlinks the old version block and its root
        tree.reclaim()                           // starts a grace period; oldReader holds it
        var s = tree.reclamationStats
        #expect(s.pendingBlocks >= 1)             // the old version block (with its embedded root)
        #expect(s.epoch == s.completedEpoch + 1)

        let (newReader, releaseNew) = park()     // enters after the grace period started
        releaseOld.signal()
        oldReader.join()
        tree.reclaim()                           // must complete although newReader is inside
        s = tree.reclamationStats
        #expect(s.pendingBlocks == 0)
        #expect(s.epoch == s.completedEpoch)
        #expect(s.activeReaders == 1)
        releaseNew.signal()
        newReader.join()
    }

    /// More concurrent reads than slots: the extra readers wait for a slot (and say so in the
    /// stats) but all complete.
    @Test func slotExhaustionWaitsForOtherReaders() {
        let tree = UprobeTree(readerSlots: 1)
        tree.apply([.insertConsumer(UprobeKey(dev: 1, inode: 1, offset: 1), Consumer(registration: 1, slot: 1))])
        let inside = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let holder = TestThread { tree.read { _ in inside.signal(); release.wait() } }
        inside.wait()
        let done = Atomic<Bool>(false)
        let waiter = TestThread {
            let n = tree.read { $0.count }
            done.store(n == 1, ordering: .sequentiallyConsistent)
        }
        // Wait (bounded) until the second reader has found the only slot busy.
        var waited = 0
        while tree.reclamationStats.readerSlotWaits == 0 && waited < 10_000 { sleepMillis(1); waited += 1 }
        let early = done.load(ordering: .sequentiallyConsistent)
        #expect(!early)
        #expect(tree.reclamationStats.readerSlotWaits > 0)
        release.signal()
        holder.join()
        waiter.join()
        let finished = done.load(ordering: .sequentiallyConsistent)
        #expect(finished)
    }
}
