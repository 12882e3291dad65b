// The safe API of the uprobes tree.

import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The daemon's uprobes tree: an ordered map from ``UprobeKey`` to the uprobe's consumers.
///
/// - **Writer** (``apply(_:)``): one batch at a time (an internal writer lock serializes callers;
///   readers never touch it). A batch is built as a new version by path copying and published with
///   one store, so readers see the tree before the batch or after it, never half of it. Memory the
///   batch unlinked is retired to the tree's epoch domain and freed once every reader that could
///   see it has left. `apply` never waits for readers; frees are deferred to later batches or to
///   ``synchronize()``.
/// - **Readers** (``read(_:)``): take no lock, never wait for the writer, allocate nothing, do no
///   ARC traffic on shared objects, and write only their own reader slot (one cache line, claimed
///   for the duration of the read; a thread keeps getting the same one). The closure sees one
///   consistent version through a ``TreeView``.
///
/// Memory: one malloc block per uprobe (52-byte header + 20 bytes per consumer), i.e. 72
/// requested bytes and an 80-byte glibc malloc chunk per registration with one consumer per
/// uprobe; see docs/BENCHMARKS.md.
///
/// Within a batch the writer's own lookups see the version it is building, and nothing reachable
/// from it is freed before the batch is published and a grace period has passed, so no lookup
/// result ever "vanishes" mid-batch (no retry loops).
public final class UprobeTree: Sendable {
    // Layout note: every field of this object is immutable after init, and the two things the
    // writer writes on every batch live on lines of their own: the root pointer in a padded cell,
    // the writer mutex in a separate object. (An inline Mutex or Atomic would share this object's
    // first cache line with what readers load, so each writer lock/unlock would cost every reader
    // a cache miss.)
    let domain: EpochDomain
    /// Address of the current `VersionHeader` (never 0). Written only by the writer (seq_cst
    /// store), read by readers (seq_cst load); see EpochDomain.swift for the ordering argument.
    let root: PaddedAtomicWord
    let writerBox: WriterBox

    /// The writer's lock and what it guards. A pthread mutex rather than `Mutex`:
    /// ThreadSanitizer does not see the Synchronization module's futex lock, and reported the
    /// writer's `apply` and the detach worker's `synchronize` as racing on `WriterState`.
    final class WriterBox: @unchecked Sendable {
        // @unchecked: `state` is only touched with `lock` held.
        private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        private var state = WriterState()
        init() { pthread_mutex_init(lock, nil) }
        deinit {
            pthread_mutex_destroy(lock)
            lock.deallocate()
        }
        func withLock<R>(_ body: (inout WriterState) throws -> R) rethrows -> R {
            pthread_mutex_lock(lock)
            defer { pthread_mutex_unlock(lock) }
            return try body(&state)
        }
    }


    struct WriterState {
        var reclaimer = Reclaimer()
        var batches: UInt64 = 0
        /// Edits staged for the next version (``stage(_:)``), which readers do not see yet.
        var staged: BatchBuilder? = nil
    }

    /// - Parameter readerSlots: how many reads may be in progress at the same time without
    ///   waiting for each other (not for the writer). 64 covers the cooperative pool, NIO threads
    ///   and a few extra threads; each slot costs 128 bytes. Rounded up to a power of two.
    public init(readerSlots: Int = 64) {
        domain = EpochDomain(readerSlots: readerSlots)
        let v = VersionHeader.make(root: nil, keyCount: 0, consumerCount: 0, sequence: 0)
        root = PaddedAtomicWord(UInt(bitPattern: v))
        writerBox = WriterBox()
    }

    deinit {
        // No reader can be inside: `read` holds a strong reference to `self` while it runs.
        // Staged edits are published first, so the nodes they made are freed with the rest.
        apply([], payload: nil)
        writerBox.withLock { $0.reclaimer.freeAllUnconditionally() }
        let v = UnsafeMutablePointer<VersionHeader>(bitPattern: root.pointer.pointee.load(ordering: .acquiring))!
        freeVersion(v)
        root.deallocate()
    }

    // MARK: writer

    /// Applies a whole batch atomically and publishes it with one store.
    ///
    /// Edits apply in order (a later edit sees earlier ones). An empty or no-op batch publishes
    /// nothing. Never blocks on readers; memory retired by earlier batches whose grace period has
    /// elapsed is freed here (throttled; see ``reclaim()``).
    @discardableResult
    public func apply(_ edits: some Sequence<TreeEdit>) -> BatchResult {
        apply(edits, payload: nil)
    }

    /// Applies a batch and publishes `payload` with it, in the same version: a reader sees the
    /// tree and the payload of one batch together (``TreeView/withPayload(as:_:)``). The engine
    /// publishes its registry this way, so the registry and the uprobes it names are one view.
    /// The version holds one reference to `payload`; it is released after the version is
    /// retired and its grace period has passed, so readers use it without retaining it.
    /// Always publishes a version, even when `edits` change nothing.
    @discardableResult
    public func apply(_ edits: some Sequence<TreeEdit>, publishing payload: AnyObject) -> BatchResult {
        apply(edits, payload: Unmanaged.passRetained(payload).toOpaque())
    }

    /// Applies `edits` to the version being built without publishing it: readers keep seeing
    /// the current version, and the next ``apply(_:publishing:)`` (or ``apply(_:)``) publishes
    /// these edits and its own as one version. The engine stages a large request's consumers
    /// while the kernel attaches it, and publishes them with the registry that names them.
    public func stage(_ edits: some Sequence<TreeEdit>) {
        writerBox.withLock { state in
            var b = state.staged ?? BatchBuilder(base: currentVersion.pointee, gen: currentVersion.pointee.sequence + 1)
            for e in edits { b.apply(e) }
            state.staged = b
        }
    }

    /// The published version (writer lock held: nothing else publishes meanwhile).
    private var currentVersion: UnsafeMutablePointer<VersionHeader> {
        // Relaxed would do (the previous writer's store is ordered by the mutex); acquire
        // documents that we read the nodes behind the pointer.
        UnsafeMutablePointer<VersionHeader>(bitPattern: root.pointer.pointee.load(ordering: .acquiring))!
    }

    /// `payload`: retained for the new version, or nil to keep the current version's payload.
    private func apply(_ edits: some Sequence<TreeEdit>, payload: UnsafeMutableRawPointer?) -> BatchResult {
        writerBox.withLock { state in
            let old = currentVersion
            let seq = old.pointee.sequence + 1
            // Staged edits were built on `old` with this same sequence number (only `apply`
            // publishes, and it consumes them), so their fresh nodes stay mutable here.
            var b = state.staged ?? BatchBuilder(base: old.pointee, gen: seq)
            state.staged = nil
            for e in edits { b.apply(e) }
            var result = b.result
            if result.published || payload != nil {
                // The new version takes its own reference to a payload it inherits: the old
                // version's is released when the old version is freed.
                let kept = payload ?? old.pointee.payload.map { Unmanaged<AnyObject>.fromOpaque($0).retain().toOpaque() }
                let newRoot = b.detachRootForPublishing()
                let v = VersionHeader.make(root: newRoot, keyCount: b.keyCount,
                                           consumerCount: b.consumerCount, sequence: seq, payload: kept)
                if let fresh = b.pendingFreshRoot {   // copied into v; never published itself
                    RawMemory.free(fresh, size: NodeHeader.size(count: Int(fresh.pointee.count)))
                }
                root.pointer.pointee.store(UInt(bitPattern: v), ordering: .sequentiallyConsistent)
                b.retired.append(VersionHeader.retired(old))
                state.reclaimer.retire(b.retired)
                state.batches += 1
                result.version = seq
            } else {
                // Nothing changed, so nothing fresh was allocated (inserts always change
                // something) and nothing was unlinked.
                precondition(b.retired.isEmpty)
            }
            state.reclaimer.poll(domain)
            return result
        }
    }

    /// Non-blocking reclamation: frees retired memory whose grace period has elapsed and starts
    /// a grace period for the rest. `apply` does this itself, throttled (at most about once per
    /// millisecond or per 2,048 retired blocks); call this e.g. from a timer when batches stop
    /// coming, so the last batches' garbage does not wait for the next batch.
    public func reclaim() {
        writerBox.withLock { state in state.reclaimer.poll(domain, force: true) }
    }

    /// Waits for a grace period: returns once every read that started before the call has
    /// finished, then frees all memory retired so far. Must not be called from inside ``read(_:)``
    /// (it would wait for itself). Blocks other writers meanwhile, never readers.
    public func synchronize() {
        writerBox.withLock { state in state.reclaimer.synchronize(domain) }
    }

    /// Reclamation counters, e.g. for the daemon's `status` op.
    public struct ReclamationStats: Hashable, Sendable {
        /// Global epoch: grace periods started.
        public var epoch: UInt64
        /// Grace periods completed (memory of epochs up to this one has been freed).
        public var completedEpoch: UInt64
        public var batchesPublished: UInt64
        /// Blocks (nodes and version records) retired but not yet freed.
        public var pendingBlocks: Int
        public var freedBlocks: UInt64
        /// Reads in progress right now (approximate).
        public var activeReaders: Int
        /// Times a reader found all slots busy and had to yield.
        public var readerSlotWaits: UInt64
    }

    public var reclamationStats: ReclamationStats {
        writerBox.withLock { s in
            ReclamationStats(epoch: s.reclaimer.epoch, completedEpoch: s.reclaimer.completedEpoch,
                             batchesPublished: s.batches,
                             pendingBlocks: s.reclaimer.pendingBlocks, freedBlocks: s.reclaimer.freedBlocks,
                             activeReaders: domain.activeReaders(),
                             readerSlotWaits: UInt64(domain.slotWaits.pointer.pointee.load(ordering: .relaxed)))
        }
    }

    // MARK: readers

    /// Lock-free read: `body` sees one consistent version of the tree.
    ///
    /// The view and the consumer lists it hands out are `~Copyable` and only ever lent
    /// (`borrowing`), so they cannot be stored or returned from `body`; return copied values
    /// (keys, ``Consumer`` records, counts) instead. Keep `body` short: memory retired while it
    /// runs is not freed until it returns. Do not call ``synchronize()`` from `body`.
    @inline(__always)
    public func read<R, E: Error>(_ body: (borrowing TreeView) throws(E) -> R) throws(E) -> R {
        let ticket = domain.enter()
        defer { domain.leave(ticket) }
        let v = UnsafePointer<VersionHeader>(bitPattern: root.pointer.pointee.load(ordering: .sequentiallyConsistent))!
        return try body(TreeView(version: v))
    }

    /// Convenience: number of uprobes (keys) in the current version.
    public var count: Int { read { $0.count } }
}

/// One consistent version of the tree, lent to a ``UprobeTree/read(_:)`` closure.
public struct TreeView: ~Copyable {
    let version: UnsafePointer<VersionHeader>

    /// Number of uprobes (keys).
    @inlinable public var count: Int { keyCount }
    public var keyCount: Int { Int(version.pointee.keyCount) }
    /// Number of consumers (registrations) over all uprobes.
    public var consumerCount: Int { Int(version.pointee.consumerCount) }
    /// Sequence number of this version (number of batches that changed the tree).
    public var sequence: UInt64 { version.pointee.sequence }
    public var isEmpty: Bool { version.pointee.root == nil }
    /// Height of the tree (diagnostics).
    public var height: Int { Int(subtreeHeight(version.pointee.root)) }

    public func contains(_ key: UprobeKey) -> Bool { findNode(version.pointee.root, key) != nil }

    /// Calls `body` with the object published with this version, if it is a `T`; nil if there
    /// is none. No reference count is touched: the version keeps the object alive until this
    /// read has left, so `body` borrows it. Like the view, it must not escape `body`.
    public func withPayload<T: AnyObject, R>(as type: T.Type, _ body: (T) -> R) -> R? {
        guard let raw = version.pointee.payload else { return nil }
        // The exact class, compared without a cast (a cast would hand back a retained reference).
        let matches = Unmanaged<AnyObject>.fromOpaque(raw)._withUnsafeGuaranteedRef {
            ObjectIdentifier(Swift.type(of: $0)) == ObjectIdentifier(T.self)
        }
        guard matches else { return nil }
        return Unmanaged<T>.fromOpaque(raw)._withUnsafeGuaranteedRef(body)
    }

    /// The consumers of `key`, or nil if there is no such uprobe.
    public func lookup(_ key: UprobeKey) -> ConsumerList? {
        guard let n = findNode(version.pointee.root, key) else { return nil }
        return ConsumerList(n)
    }

    /// Calls `body` with the consumers of `key` if present; returns its result.
    public func withConsumers<R, E: Error>(of key: UprobeKey,
                                           _ body: (borrowing ConsumerList) throws(E) -> R) throws(E) -> R? {
        guard let n = findNode(version.pointee.root, key) else { return nil }
        return try body(ConsumerList(n))
    }

    /// Copies the consumers of `key` into an array (allocates; empty if absent).
    public func consumers(of key: UprobeKey) -> [Consumer] {
        guard let n = findNode(version.pointee.root, key) else { return [] }
        return Array(UnsafeBufferPointer(start: n.consumers, count: Int(n.pointee.count)))
    }

    /// Visits every uprobe in key order.
    public func forEach<E: Error>(_ body: (UprobeKey, borrowing ConsumerList) throws(E) -> Void) throws(E) {
        try walk(version.pointee.root, lower: nil, upper: nil, body)
    }

    /// Visits the uprobes with `range.lowerBound <= key <= range.upperBound` in key order.
    public func forEach<E: Error>(in range: ClosedRange<UprobeKey>,
                                  _ body: (UprobeKey, borrowing ConsumerList) throws(E) -> Void) throws(E) {
        try walk(version.pointee.root, lower: range.lowerBound, upper: range.upperBound, body)
    }

    /// Visits the uprobes of one file (dev, inode) in offset order.
    public func forEach<E: Error>(dev: UInt64, inode: UInt64,
                                  _ body: (UprobeKey, borrowing ConsumerList) throws(E) -> Void) throws(E) {
        try forEach(in: UprobeKey(dev: dev, inode: inode, offset: 0)...UprobeKey(dev: dev, inode: inode, offset: .max), body)
    }

    /// Smallest and largest key.
    public var first: UprobeKey? {
        var n = version.pointee.root
        while let l = n?.pointee.left { n = l }
        return n?.pointee.key
    }
    public var last: UprobeKey? {
        var n = version.pointee.root
        while let r = n?.pointee.right { n = r }
        return n?.pointee.key
    }

    /// Memory held by this version's nodes (for the bytes-per-registration figure).
    public struct Footprint: Hashable, Sendable {
        public var nodes: Int
        /// Sum of the sizes passed to malloc.
        public var requestedBytes: Int
        /// The same rounded up to glibc malloc chunks (size + 8-byte header, 16-byte granules,
        /// 32-byte minimum): what the heap actually gives up per node on x86_64.
        public var mallocChunkBytes: Int
    }

    public func footprint() -> Footprint {
        var f = Footprint(nodes: 0, requestedBytes: 0, mallocChunkBytes: 0)
        func visit(_ n: NodePtr?) {
            guard let n else { return }
            let size = NodeHeader.size(count: Int(n.pointee.count))
            f.nodes += 1
            f.requestedBytes += size
            f.mallocChunkBytes += max(32, (size + 8 + 15) & ~15)
            visit(n.pointee.left)
            visit(n.pointee.right)
        }
        visit(version.pointee.root)
        return f
    }

    /// Checks the structural invariants of this version (search order, AVL balance and heights,
    /// key and consumer counts, no empty consumer list, unique registrations per key) and returns
    /// a description of every violation (empty when sound). O(n); for tests and debugging.
    public func validate() -> [String] {
        var problems: [String] = []
        var keys = 0, consumers = 0
        var prev: UprobeKey?
        func check(_ n: NodePtr?) -> Int32 {
            guard let n else { return 0 }
            let hl = check(n.pointee.left)
            let k = n.pointee.key
            if let p = prev, !(p < k) { problems.append("order: \(p) !< \(k)") }
            prev = k
            keys += 1
            let c = Int(n.pointee.count)
            if c <= 0 { problems.append("\(k): consumer count \(c)") }
            consumers += max(c, 0)
            if c > 1 {
                let regs = Set((0..<c).map { n.consumers[$0].registration })
                if regs.count != c { problems.append("\(k): duplicate registration") }
            }
            let hr = check(n.pointee.right)
            if abs(hl - hr) > 1 { problems.append("\(k): unbalanced \(hl)/\(hr)") }
            if n.pointee.height != max(hl, hr) + 1 { problems.append("\(k): height \(n.pointee.height)") }
            return max(hl, hr) + 1
        }
        _ = check(version.pointee.root)
        if keys != keyCount { problems.append("keyCount \(keyCount) but \(keys) nodes") }
        if consumers != consumerCount { problems.append("consumerCount \(consumerCount) but \(consumers)") }
        return problems
    }

    private func walk<E: Error>(_ n: NodePtr?, lower: UprobeKey?, upper: UprobeKey?,
                                _ body: (UprobeKey, borrowing ConsumerList) throws(E) -> Void) throws(E) {
        guard let n else { return }
        let k = n.pointee.key
        let aboveLower = lower.map { $0 <= k } ?? true
        let belowUpper = upper.map { k <= $0 } ?? true
        if aboveLower { try walk(n.pointee.left, lower: lower, upper: upper, body) }
        if aboveLower && belowUpper { try body(k, ConsumerList(n)) }
        if belowUpper { try walk(n.pointee.right, lower: lower, upper: upper, body) }
    }
}

@inline(__always)
func subtreeHeight(_ n: NodePtr?) -> Int32 { height(n) }

/// The consumers of one uprobe, in insertion order, read in place (no copy, no ARC).
/// Only valid inside the ``UprobeTree/read(_:)`` closure that produced it (enforced by being
/// `~Copyable` and lent; do not smuggle it out in a class box).
public struct ConsumerList: ~Copyable {
    let base: UnsafePointer<Consumer>
    public let count: Int

    init(_ n: NodePtr) {
        base = UnsafePointer(n.consumers)
        count = Int(n.pointee.count)
    }

    public var isEmpty: Bool { count == 0 }

    public subscript(i: Int) -> Consumer {
        precondition(i >= 0 && i < count, "consumer index out of range")
        return base[i]
    }

    public func first(registration: UInt64) -> Consumer? {
        for i in 0..<count where base[i].registration == registration { return base[i] }
        return nil
    }

    public func contains(registration: UInt64) -> Bool { first(registration: registration) != nil }

    public func forEach<E: Error>(_ body: (Consumer) throws(E) -> Void) throws(E) {
        for i in 0..<count { try body(base[i]) }
    }

    /// Copies the list out (allocates).
    public func toArray() -> [Consumer] { Array(UnsafeBufferPointer(start: base, count: count)) }
}
