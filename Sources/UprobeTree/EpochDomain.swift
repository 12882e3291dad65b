// Epoch-based reclamation domain: the RCU part of the uprobes tree.
//
// This file and PersistentAVL.swift are the whole unsafe core. Nothing here is public.
//
// ## Shape
// - Reader slots: N words, each alone on a 128-byte line (two 64-byte lines: x86's adjacent-line
//   prefetcher pulls lines in pairs, so 128 also keeps neighbouring slots from false sharing).
//   A slot word is a per-slot epoch counter: odd = a reader is inside, even = free. A reader makes
//   it odd on entry (claiming the slot) and even again, one higher, on exit; the value never
//   repeats (64 bits), so "changed since I looked" means "the read I saw has ended".
// - Global epoch (`Reclaimer.epoch`): the grace-period counter. Retired memory is tagged with the
//   epoch it was retired in; a grace period started at epoch e frees everything tagged < e+1.
//   Only the writer touches it.
// - Retire lists (`Reclaimer`): memory retired by the writer, waiting for a grace period; frees
//   are deferred to later batches (non-blocking polling) or to `synchronize()` (blocking).
//
// ## Why readers do not read the global epoch
// Classic EBR has each reader copy the global epoch into its slot. The first version of this file
// did that, and the benchmark showed the cost: the writer bumps the epoch on every publish, so
// after each publish every reader takes one more cross-core cache miss (p99 under churn 2.2x idle;
// see docs/BENCHMARKS.md). With per-slot counters the reader touches only its own slot line
// plus the data it reads (root pointer, nodes), and the writer instead snapshots the slots when a
// grace period starts and waits for each odd one to change (the urcu / SRCU-per-CPU-counter idea).
//
// ## How a reader gets a slot (and why not a thread-local or a handle)
// A read is a *synchronous* closure, so it runs start to finish on one thread even when called from
// a Swift concurrency task (a task only hops threads at an `await`, and the closure cannot await).
// So a slot needs to be owned only for the duration of one read: the reader claims a free slot with
// one CAS (even -> odd) and releases it with one store. The CAS *is* the announcement, so a read
// costs what an SRCU read costs with a pre-assigned slot: one locked RMW on a line this CPU usually
// already owns, a plain load of the root, a plain store on exit. The search starts at a slot chosen
// by hashing the thread's identity, so a thread keeps reusing one line (it stays in that CPU's
// cache) and concurrently running readers almost always use different lines; a busy slot just
// pushes the reader to the next one. No thread-local state, no per-thread registration that would
// leak when the cooperative pool or NIO retires a thread, no handle to thread through async code.
// If all N slots are busy (more than N simultaneous reads) the reader yields and retries: it waits
// for *other readers*, never for the writer. Size N for the number of threads that read at once.
//
// ## Memory orderings (why each is enough)
// Reader:  w = slot.load(relaxed) (even); CAS(slot, w -> w+1, seq_cst); v = root.load(seq_cst);
//          ... read nodes of v ...; slot.store(w+2, release)
// Writer:  root.store(v', seq_cst); retire(unlinked nodes); grace period: for each slot
//          x = slot.load(seq_cst), remember the odd ones; wait until each remembered slot's value
//          differs (acquire load); then free.
// (1) The reader's CAS precedes the writer's snapshot load in the single total order S of seq_cst
//     operations: the snapshot sees w+1 (or a later value). If w+1, the writer waits until the
//     value changes; the only way it changes is the reader's release store w+2 (or a later RMW in
//     its release sequence), so all the reader's node loads happen-before the writer's free. If it
//     already sees a later value, the same holds by the release sequence of that store.
// (2) The snapshot load precedes the CAS in S: then the root store (sequenced before the snapshot)
//     precedes the reader's root load in S, so the seq_cst load returns v' or newer, from which the
//     retired nodes are unreachable. This store->load ordering across two locations is exactly what
//     needs seq_cst (the kernel's smp_mb() in srcu_read_lock); on x86 it costs nothing extra: the
//     CAS is a locked instruction, the seq_cst load is a plain `mov`, the seq_cst store an `xchg`.
// (3) Node contents are written by the writer before the seq_cst (hence release) root store; the
//     reader's seq_cst (hence acquire) root load makes them visible. Nodes of a published version
//     are never written again (path copying), so readers need no further synchronization.
// (4) The initial relaxed load of the slot only picks the CAS's expected value; the CAS validates
//     it. `leave` is a release store: the reader's node loads cannot move after it.
// (5) Writers are serialized by the owner's writer mutex (which also orders the epoch, the retire
//     lists and one writer's root store before the next writer's).

import Glibc
import Synchronization

/// Raw storage for the reader slots.
///
/// `@unchecked Sendable` is sound because: the pointer is allocated in `init`, never reassigned,
/// and freed only in the owning domain's `deinit` (when no thread can hold the domain); every
/// access to the pointee goes through `Atomic<UInt64>` operations, so concurrent use from several
/// threads is race-free by construction.
struct SlotStorage: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let count: Int
    static let stride = 128

    /// `count` rounded up to a power of two, so the reader's start index is a mask, not a
    /// division (an `idiv` was ~10% of an idle read).
    init(count: Int) {
        precondition(count > 0 && count <= 1 << 16, "reader slots must be in 1...65536")
        var c = 1
        while c < count { c <<= 1 }
        self.count = c
        base = UnsafeMutableRawPointer.allocate(byteCount: count * Self.stride, alignment: Self.stride)
        for i in 0..<count {
            (base + i * Self.stride).bindMemory(to: Atomic<UInt64>.self, capacity: 1)
                .initialize(to: Atomic<UInt64>(0))
        }
    }

    @inline(__always)
    func slot(_ i: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        (base + i * Self.stride).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    func deallocate() {
        for i in 0..<count { _ = slot(i).deinitialize(count: 1) }
        base.deallocate()
    }
}

/// One atomic word alone on a 128-byte line (the tree's root pointer, the slot-wait counter).
///
/// `@unchecked Sendable` for the same reasons as `SlotStorage`: allocated once, freed only by the
/// owner's deinit, and only ever accessed through `Atomic` operations.
struct PaddedAtomicWord: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<Atomic<UInt>>

    init(_ value: UInt) {
        pointer = UnsafeMutableRawPointer.allocate(byteCount: SlotStorage.stride, alignment: SlotStorage.stride)
            .bindMemory(to: Atomic<UInt>.self, capacity: 1)
        pointer.initialize(to: Atomic(value))
    }

    func deallocate() {
        _ = pointer.deinitialize(count: 1)
        pointer.deallocate()
    }
}

/// A claimed reader slot: which one and the odd value the reader stored in it.
struct ReaderTicket {
    let index: Int
    let value: UInt64
}

/// The reader side of the domain plus the grace-period primitives the writer uses.
final class EpochDomain: Sendable {
    let slots: SlotStorage
    /// Reads that found every slot busy and had to yield (diagnostics). On its own line: this
    /// object's first line holds `slots`, which every read loads.
    let slotWaits = PaddedAtomicWord(0)

    init(readerSlots: Int) {
        slots = SlotStorage(count: readerSlots)
    }

    deinit {
        slots.deallocate()
        slotWaits.deallocate()
    }

    /// Enters a read-side critical section.
    @inline(__always)
    func enter() -> ReaderTicket {
        let n = slots.count
        var i = Self.threadHint() & (n - 1)      // n is a power of two
        var tried = 0
        while true {
            let s = slots.slot(i)
            let w = s.pointee.load(ordering: .relaxed)                       // (4)
            // An odd slot is busy: skip it without pulling its line exclusive.
            if w & 1 == 0,
               s.pointee.compareExchange(expected: w, desired: w &+ 1,
                                         ordering: .sequentiallyConsistent).exchanged { // (1)(2)
                return ReaderTicket(index: i, value: w &+ 1)
            }
            i += 1
            if i == n { i = 0 }
            tried += 1
            if tried >= n {
                tried = 0
                slotWaits.pointer.pointee.add(1, ordering: .relaxed)
                sched_yield()
            }
        }
    }

    /// Leaves the read-side critical section entered with `ticket`.
    @inline(__always)
    func leave(_ ticket: ReaderTicket) {
        // Only the owner writes an odd slot, so a plain store (no RMW) suffices.
        slots.slot(ticket.index).pointee.store(ticket.value &+ 1, ordering: .releasing)   // (4)
    }

    /// Start index for the slot search: a hash of the thread's identity, so a thread tends to reuse
    /// the same slot (its line stays in that CPU's cache) and running threads rarely collide (a
    /// collision costs one failed CAS and a probe to the next slot, never correctness).
    /// `pthread_self` is a thread-pointer load; `sched_getcpu` would be a better hint but Swift's
    /// Glibc module does not export it (it needs _GNU_SOURCE), and UprobeTree has no C shim.
    @inline(__always)
    static func threadHint() -> Int {
        let t = UInt64(pthread_self())   // pthread_t is the thread's control-block address
        return Int(truncatingIfNeeded: (t &* 0x9E37_79B9_7F4A_7C15) >> 40)
    }

    /// Writer: the readers inside right now (slot, odd value). Must be called after the root store
    /// that unlinked the memory this grace period is for (program order gives (2)).
    func snapshotReaders(into out: inout [ReaderTicket]) {
        out.removeAll(keepingCapacity: true)
        for i in 0..<slots.count {
            let x = slots.slot(i).pointee.load(ordering: .sequentiallyConsistent)   // (1)(2)
            if x & 1 == 1 { out.append(ReaderTicket(index: i, value: x)) }
        }
    }

    /// Writer: drops from `readers` every read that has ended; true when none is left.
    func pruneFinished(_ readers: inout [ReaderTicket]) -> Bool {
        readers.removeAll { slots.slot($0.index).pointee.load(ordering: .acquiring) != $0.value }  // (1)
        return readers.isEmpty
    }

    /// Number of slots currently held by readers (diagnostics and tests).
    func activeReaders() -> Int {
        var n = 0
        for i in 0..<slots.count where slots.slot(i).pointee.load(ordering: .relaxed) & 1 == 1 { n += 1 }
        return n
    }
}

/// A block of unlinked memory waiting for its grace period (size kept for debug poisoning).
struct RetiredBlock {
    var pointer: UnsafeMutableRawPointer
    var size: Int
    /// A retained object to release with the block (a version's payload), if any.
    var payload: UnsafeMutableRawPointer? = nil

    /// Frees the block and releases its payload: only once no reader can see either.
    func free() {
        RawMemory.free(pointer, size: size)
        if let payload { Unmanaged<AnyObject>.fromOpaque(payload).release() }
    }
}

/// The writer side: global epoch, retire lists and the grace-period state machine. Owned by the
/// writer (always accessed under the writer lock), so it needs no atomics of its own.
///
/// RCU-style two-stage pipeline: blocks retired while no grace period runs go to `next`; starting
/// a grace period moves `next` to `waiting` and snapshots the readers inside; when all of those
/// have left, `waiting` is freed. Blocks retired while a grace period runs wait for the next one
/// (a reader that entered after the snapshot may still see them).
struct Reclaimer {
    /// Global epoch = number of grace periods started. Retired blocks are tagged implicitly by
    /// which list they are on: `waiting` belongs to epoch `epoch`, `next` to `epoch + 1`.
    private(set) var epoch: UInt64 = 0
    private(set) var completedEpoch: UInt64 = 0
    private var waiting: [RetiredBlock] = []
    private var next: [RetiredBlock] = []
    private var gpReaders: [ReaderTicket] = []
    private var gpRunning = false
    private(set) var freedBlocks: UInt64 = 0

    var pendingBlocks: Int { waiting.count + next.count }

    mutating func retire(_ blocks: [RetiredBlock]) {
        next.append(contentsOf: blocks)
    }

    /// Blocks pending before the writer scans reader slots again (see `poll`).
    static let pollBlocks = 2048
    /// ... or this much time since the last scan, whichever comes first.
    static let pollNanos: UInt64 = 1_000_000
    private var lastScan: UInt64 = 0

    /// Non-blocking: completes the running grace period if its readers have left, and starts the
    /// next one if memory is waiting. Called by the writer after every publish.
    ///
    /// Throttled unless `force`: looking at a reader's slot pulls that line into the writer's cache
    /// in shared state, so the reader's next CAS on it misses. Scanning on every publish made the
    /// writer cost each reader one extra miss per batch at high batch rates; scanning once per
    /// `pollBlocks` retired blocks or `pollNanos` bounds both that cost (<= 1k scans/s) and the
    /// memory waiting for reclamation (~2 x pollBlocks blocks, ~400 KB, at any batch rate).
    mutating func poll(_ domain: EpochDomain, force: Bool = false) {
        if !force {
            if pendingBlocks == 0 { return }
            let now = monotonicNanos()
            if pendingBlocks < Self.pollBlocks && now &- lastScan < Self.pollNanos { return }
            lastScan = now
        }
        while true {
            if gpRunning {
                guard domain.pruneFinished(&gpReaders) else { return }
                freeWaiting()
                gpRunning = false
                completedEpoch = epoch
            }
            guard !next.isEmpty else { return }
            swap(&waiting, &next)
            epoch += 1
            gpRunning = true
            domain.snapshotReaders(into: &gpReaders)
        }
    }

    /// Blocking: returns after a full grace period has elapsed since the call, with everything
    /// retired before the call freed. Spins briefly, then yields, then sleeps: readers are short,
    /// but one may be preempted or (in tests) parked.
    mutating func synchronize(_ domain: EpochDomain) {
        waiting.append(contentsOf: next)
        next.removeAll()
        epoch += 1
        gpRunning = true
        domain.snapshotReaders(into: &gpReaders)
        var rounds = 0
        while !domain.pruneFinished(&gpReaders) {
            rounds += 1
            if rounds < 64 { sched_yield() } else { usleep(rounds < 1000 ? 20 : 200) }
        }
        freeWaiting()
        gpRunning = false
        completedEpoch = epoch
    }

    /// Frees everything without waiting: only for the owner's deinit (no readers can exist).
    mutating func freeAllUnconditionally() {
        freedBlocks += UInt64(Self.freeAll(&waiting) + Self.freeAll(&next))
    }

    private mutating func freeWaiting() {
        freedBlocks += UInt64(Self.freeAll(&waiting))
    }

    private static func freeAll(_ list: inout [RetiredBlock]) -> Int {
        for b in list { b.free() }
        let n = list.count
        list.removeAll(keepingCapacity: n < 4096)
        return n
    }
}

@inline(__always)
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// malloc/free, with freed memory poisoned in debug builds so that a reader touching retired
/// memory too late reads garbage keys (caught by the stress test's invariants) even without ASan.
enum RawMemory {
    static let poisonByte: Int32 = 0xDB

    @inline(__always)
    static func allocate(_ bytes: Int) -> UnsafeMutableRawPointer {
        guard let p = malloc(bytes) else { fatalError("uprobe tree: out of memory (\(bytes) bytes)") }
        return p
    }

    /// `alignment` bytes aligned (a power of two, multiple of the pointer size); free with `free`.
    static func allocate(_ bytes: Int, alignment: Int) -> UnsafeMutableRawPointer {
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, alignment, bytes) == 0, let p else {
            fatalError("uprobe tree: out of memory (\(bytes) bytes)")
        }
        return p
    }

    @inline(__always)
    static func free(_ p: UnsafeMutableRawPointer, size: Int) {
        #if DEBUG
        memset(p, poisonByte, size)
        #endif
        Glibc.free(p)
    }
}
