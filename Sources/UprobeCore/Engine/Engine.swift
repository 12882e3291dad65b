import Foundation
import Logging
import Synchronization
import UprobeELF
import UprobeKernel
import UprobeTree

/// Per-probe statistics as `stats` reports them.
public struct ProbeStats: Sendable {
    public var id: String
    public var hits: UInt64
    /// Mean hits per second since the registration.
    public var ratePerSecond: Double
    public var sites: Int
    public var state: ProbeState
    /// Hits per file version (device, inode, build-id), current and retired ones: old and new
    /// builds side by side during a rolling upgrade. They add up to `hits` minus the hits
    /// carried over from before a daemon restart. Empty for a single-file probe unless asked
    /// for (`stats(ids:allVersions:)`).
    public var versions: [VersionStats] = []
}

/// Hits counted in one file version of a registration.
public struct VersionStats: Sendable {
    public var version: FileVersion
    public var hits: UInt64
    /// The newest good file at the path (what new processes get).
    public var current: Bool
    /// Its sites were detached once no process mapped it.
    public var retired: Bool
}

/// The engine: batches requests from every connection and applies them on one writer thread.
///
/// Readers (`stats`, `list`, `watch`, `status`, metrics) read through the uprobes tree
/// (`read`): the writer publishes each batch's registry in the same tree version as its
/// uprobes, and a reader sees one such version without a lock and without waiting for the
/// writer, which is never held up by readers either (it frees what they may see only after a
/// grace period).
public final class Engine: Sendable {
    public let config: EngineConfig
    private let kernel: any KernelBackend
    private let logger: Logger
    private let queue: OpQueue
    /// The uprobes tree: (dev, inode, offset) → consumers, and with each version the registry
    /// that names them. Written by the writer thread once per batch; read without locks.
    public let tree: UprobeTree
    private let writerDone = DispatchSemaphore(value: 0)

    /// Starts the writer thread. `persist` is called on the writer thread once per batch,
    /// after the kernel work and before any reply, with the registrations to save. If `sync`
    /// is given, `persist` only has to append, and `sync` (on a committer thread, once for all
    /// batches appended meanwhile) makes it durable; replies wait for it. `prepare`, if given,
    /// is told about the new registrations of a large request while the kernel attaches them (see
    /// `EngineConfig.prepareMinimum`), so their state can be encoded while the kernel works.
    public init(config: EngineConfig, kernel: any KernelBackend, logger: Logger,
                persist: @escaping @Sendable (RegistrySnapshot) throws -> Void = { _ in },
                sync: (@Sendable () throws -> Void)? = nil,
                prepare: (@Sendable ([ProbeRecord]) -> Void)? = nil) {
        self.config = config
        self.kernel = kernel
        self.logger = logger
        self.queue = OpQueue()
        let tree = UprobeTree(readerSlots: 64)
        self.tree = tree
        var initial = RegistrySnapshot()
        initial.slotCapacity = kernel.capacity
        tree.apply([], publishing: PublishedRegistry(initial))
        let queue = self.queue
        let done = self.writerDone
        let window = config.batchWindow
        let maxBatch = config.maxBatchRequests
        let tuning = config
        let thread = Thread {
            ThreadName.setCurrent("uprobed-writer")
            let applier = BatchApplier(kernel: kernel, tree: tree, tuning: tuning, logger: logger,
                                       persist: persist,
                                       sync: sync,
                                       prepare: prepare,
                                       wake: { _ = queue.push(.detachFinished) },
                                       requeue: { op in _ = queue.push(op) })
            while let batch = queue.nextBatch(window: window, max: maxBatch, wakeAt: applier.compactionDue,
                                              largeRequest: tuning.prepareMinimum) {
                if batch.isEmpty { applier.maintain() } else { applier.apply(batch) }
            }
            applier.shutdown()
            done.signal()
        }
        thread.start()
    }

    /// Registers the probes of one request atomically: all of them or none. `early`, if given,
    /// is told a large request's records (ids included) while the kernel attaches them, on the
    /// engine's attach thread (so it must only hand them on): on success they are the records
    /// returned.
    public func register(_ items: [RegisterItem], consumer: String?, peer: Peer,
                         early: (@Sendable ([ProbeRecord]) -> Void)? = nil) async -> Result<[ProbeRecord], EngineError> {
        await withCheckedContinuation { (cont: CheckedContinuation<Result<[ProbeRecord], EngineError>, Never>) in
            let accepted = queue.push(.register(items: items, consumer: consumer, peer: peer, early: early,
                                                reply: { cont.resume(returning: $0) }))
            if !accepted { cont.resume(returning: .failure(Self.stopping)) }
        }
    }

    /// Unregisters by ids (all must exist) or by consumer name. `authorize` is asked for each probe.
    public func unregister(ids: [String]?, consumer: String?, peer: Peer,
                           authorize: @escaping @Sendable (ProbeRecord) -> Bool = { _ in true }) async -> Result<Removal, EngineError> {
        await unregister(ids: ids, selection: ids == nil ? ProbeSelection(consumer: consumer) : nil, peer: peer, authorize: authorize)
    }

    /// Unregisters every registration `selection` matches (in one batch: one link rebuild
    /// round, one grace period). `authorize` is asked for each selected probe; one it refuses
    /// fails the request (a selection with `ownerUID` never selects another user's).
    public func unregister(matching selection: ProbeSelection, peer: Peer,
                           authorize: @escaping @Sendable (ProbeRecord) -> Bool = { _ in true }) async -> Result<Removal, EngineError> {
        await unregister(ids: nil, selection: selection, peer: peer, authorize: authorize)
    }

    private func unregister(ids: [String]?, selection: ProbeSelection?, peer: Peer,
                            authorize: @escaping @Sendable (ProbeRecord) -> Bool) async -> Result<Removal, EngineError> {
        await withCheckedContinuation { (cont: CheckedContinuation<Result<Removal, EngineError>, Never>) in
            let accepted = queue.push(.unregister(ids: ids, selection: selection, peer: peer, authorize: authorize,
                                                  reply: { cont.resume(returning: $0) }))
            if !accepted { cont.resume(returning: .failure(Self.stopping)) }
        }
    }

    /// Brings back registrations from the state file in one batch, keeping their ids. Each item
    /// stands alone: one that cannot attach comes back degraded, never dropped. New ids start
    /// at `nextIDFloor` or above, so an id used before the restart is never handed out again.
    /// `adoption`: links found pinned that the items' `adoptedSlots` count in (see `Adoption`).
    public func restore(_ items: [RestoreItem], nextIDFloor: UInt64 = 1,
                        adoption: Adoption = Adoption()) async -> [Result<ProbeRecord, EngineError>] {
        return await withCheckedContinuation { (cont: CheckedContinuation<[Result<ProbeRecord, EngineError>], Never>) in
            let accepted = queue.push(.restore(items: items, nextIDFloor: nextIDFloor, adoption: adoption, reply: { cont.resume(returning: $0) }))
            if !accepted { cont.resume(returning: items.map { _ in .failure(Self.stopping) }) }
        }
    }

    /// Applies the path watcher's changes in one writer batch; returns once they are published.
    public func follow(_ changes: [FollowChange]) async {
        guard !changes.isEmpty else { return }
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            let accepted = queue.push(.follow(changes: changes, reply: { cont.resume() }))
            if !accepted { cont.resume() }
        }
    }

    /// Blocking form of `follow` for the watcher's own thread.
    public func followSync(_ changes: [FollowChange]) {
        guard !changes.isEmpty else { return }
        let done = DispatchSemaphore(value: 0)
        if queue.push(.follow(changes: changes, reply: { done.signal() })) { done.wait() }
    }

    private static let stopping = EngineError(code: .shuttingDown, message: "uprobed is stopping")

    /// The last published registry, copied out of the tree (one reference taken). Readers that
    /// answer a request use `read` instead, which takes none; this is for those that keep a
    /// registry across slow work (the path watcher's file checks, a state snapshot written to
    /// disk), which must not hold a read section that long.
    public var snapshot: RegistrySnapshot { read { snapshot, _ in snapshot } }

    /// Calls `body` inside a read section of the uprobes tree with the registry of the current
    /// version and the number of distinct uprobes (dev, inode, offset) in that same version.
    /// No lock, no wait for the writer, no reference count touched to get there: the version
    /// keeps the registry alive until `body` returns, and `body` borrows it. Keep `body` short
    /// (memory the writer retires meanwhile waits for it). Whatever `body` returns that shares
    /// the registry's storage (a record, a copy of the map) is a retained copy.
    ///
    /// Readers take each probe's counter slots from the registry's rows, not by walking the
    /// tree's consumer lists: both are the same version, and the rows lie in one array per
    /// registration (a `stats` of 10,000 probes reads them in order) where the consumers are
    /// spread over the tree's nodes. The tree's keys give the uprobe count.
    public func read<R>(_ body: (borrowing RegistrySnapshot, _ uprobes: Int) -> R) -> R {
        tree.read { view in
            let uprobes = view.keyCount
            // Never nil: the engine publishes a registry with the tree's first version.
            return view.withPayload(as: PublishedRegistry.self) { body($0.snapshot, uprobes) }
                ?? body(RegistrySnapshot(), uprobes)
        }
    }

    /// Hit counts of the given probes, or of one consumer's, or of all. Unknown ids give
    /// `probe_not_found`; an unknown consumer has no probes.
    ///
    /// The registry and the counters are read inside one read section of the uprobes tree: the
    /// writer frees a slot only after a grace period of that tree, so every slot a record of
    /// this registry names still belongs to it while it is summed here. A retirement is exact
    /// too: the writer publishes a record whose `baseHits` absorbed a slot's final count in the
    /// same version that drops the slot.
    /// `allVersions`: fill `versions` for every probe; otherwise only for probes that count in
    /// more than one file (an upgrade in progress) — the common single-file probe skips it.
    public func stats(ids: [String]?, consumer: String? = nil, allVersions: Bool = false) -> Result<[ProbeStats], EngineError> {
        statsTable(ids: ids, consumer: consumer, allVersions: allVersions).map(\.rows)
    }

    /// `stats` as a `StatsTable` (what the socket server writes from).
    /// `match`: only the registrations it selects (globs over path and symbol, an owner).
    /// `order`, `top`: the rows in that order, only the first `top` (picked while the rows
    /// are read when there are no `ids`).
    public func statsTable(ids: [String]?, consumer: String? = nil, allVersions: Bool = false,
                           match: ProbeSelection? = nil, order: StatsTable.Order = .id, top: Int? = nil) -> Result<StatsTable, EngineError> {
        read { snap, _ in statsTable(of: snap, ids: ids, consumer: consumer, allVersions: allVersions, match: match, order: order, top: top) }
    }

    /// `statsTable` of a registry lent by `read` (for a reader that needs more than the table
    /// from the same version; read sections do not nest).
    public func statsTable(of snap: borrowing RegistrySnapshot, ids: [String]?, consumer: String? = nil,
                           allVersions: Bool = false, match: ProbeSelection? = nil, order: StatsTable.Order = .id,
                           top: Int? = nil) -> Result<StatsTable, EngineError> {
        let counts: [UInt64]
        do throws(KernelError) { counts = try kernel.readCounters(upTo: snap.slotHighWater) } catch {
            return .failure(EngineError(code: error.code, message: "reading counters failed: \(error.message)"))
        }
        return StatsTable.make(snap.probes, counts: counts, ids: ids, consumer: consumer, allVersions: allVersions,
                               now: MonotonicEpoch.seconds(.now), match: match, order: order, top: ids == nil ? top : nil)
            // Picked while reading (all rows with `top`); otherwise ordered and cut here.
            .map { t in ids == nil && top != nil || order == .id && top == nil ? t : t.ordered(by: order, top: top) }
    }

    /// Stops taking requests, answers those already queued, detaches everything and waits for
    /// the writer to finish.
    public func shutdown() {
        guard queue.close() else { return }
        writerDone.wait()
    }
}

/// The queue between connections and the writer, with its batching window.
///
/// One lock (the NSCondition) protects the pending list; the writer holds it only to take a
/// batch, never while it talks to the kernel.
final class OpQueue: @unchecked Sendable {
    // @unchecked: every field is guarded by `cond`.
    private let cond = NSCondition()
    private var pending: [PendingOp] = []
    private var closed = false
    /// What the writer waits for, so that `push` wakes it only when that is met. While the
    /// window gathered a batch, every arriving request signalled the writer, which woke only
    /// to see that the batch was not full yet and went back to sleep.
    private var writerWaits = WriterWait.nothing

    private enum WriterWait {
        case nothing
        case work
        case batch(of: Int)
    }

    /// False once the queue is closed (the op was not queued).
    func push(_ op: PendingOp) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        guard !closed else { return false }
        pending.append(op)
        switch writerWaits {
        case .work: cond.signal()
        case .batch(let n) where pending.count >= n: cond.signal()
        case .batch, .nothing: break  // the window's deadline or the writer's next look finds it
        }
        return true
    }

    /// Closes the queue; returns false if it was already closed.
    func close() -> Bool {
        cond.lock()
        defer { cond.unlock() }
        guard !closed else { return false }
        closed = true
        cond.broadcast()
        return true
    }

    /// Blocks until there is work; then, if the writer had to wait for it, waits up to `window`
    /// for more (or until `max` requests). Work that queued while the writer was busy is taken
    /// at once: those requests have met already, and waiting would only add to their latency.
    /// So is a request naming at least `largeRequest` probes: it is a batch's worth of kernel
    /// work by itself, and company would save it nothing.
    /// Returns an empty batch if `wakeAt` passes with no work (time for deferred maintenance),
    /// nil once closed and drained.
    func nextBatch(window: Duration, max: Int, wakeAt: ContinuousClock.Instant? = nil,
                   largeRequest: Int = .max) -> [PendingOp]? {
        cond.lock()
        defer { writerWaits = .nothing; cond.unlock() }
        let queuedMeanwhile = !pending.isEmpty
        writerWaits = .work
        while pending.isEmpty && !closed {
            if let wakeAt {
                let secs = (wakeAt - ContinuousClock.now).inSeconds
                if secs <= 0 { return [] }
                if !cond.wait(until: Date(timeIntervalSinceNow: secs)) && pending.isEmpty { return [] }
            } else {
                cond.wait()
            }
        }
        if pending.isEmpty { return nil }
        let secs = window.inSeconds
        if secs > 0 && !queuedMeanwhile && !pending.contains(where: { $0.probeCount >= largeRequest }) {
            writerWaits = .batch(of: max)
            let deadline = Date(timeIntervalSinceNow: secs)
            while pending.count < max && !closed {
                if !cond.wait(until: deadline) { break }
            }
        }
        let n = Swift.min(max, pending.count)
        let batch = Array(pending.prefix(n))
        pending.removeFirst(n)
        return batch
    }
}

extension Duration {
    /// The duration in seconds, as a Double (for rates, timeouts and reports).
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }

    /// Whole microseconds (negative durations give 0).
    public var microseconds: UInt64 {
        let c = components
        guard c.seconds >= 0 else { return 0 }
        return UInt64(c.seconds) * 1_000_000 + UInt64(max(0, c.attoseconds) / 1_000_000_000_000)
    }
}
