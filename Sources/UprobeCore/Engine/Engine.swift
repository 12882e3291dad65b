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
}

/// The engine: batches requests from every connection and applies them on one writer thread.
///
/// Readers (`stats`, `list`, `status`) never wait for the writer: they read the last published
/// snapshot and the kernel counters directly.
public final class Engine: Sendable {
    public let config: EngineConfig
    private let kernel: any KernelBackend
    private let logger: Logger
    private let queue: OpQueue
    /// The uprobes tree: (dev, inode, offset) → consumers. Written by the writer thread once per
    /// batch; read without locks by `stats` (and anything else that reads uprobes).
    public let tree: UprobeTree
    /// The last published snapshot. Written by the writer once per batch; readers copy it.
    private let published: SnapshotCell
    private let writerDone = DispatchSemaphore(value: 0)

    /// Starts the writer thread. `persist` is called on the writer thread once per batch,
    /// after the kernel work and before any reply, with the registrations to save.
    public init(config: EngineConfig, kernel: any KernelBackend, logger: Logger,
                persist: @escaping @Sendable (RegistrySnapshot) throws -> Void = { _ in }) {
        self.config = config
        self.kernel = kernel
        self.logger = logger
        self.queue = OpQueue()
        let tree = UprobeTree(readerSlots: 64)
        self.tree = tree
        var initial = RegistrySnapshot()
        initial.slotCapacity = kernel.capacity
        self.published = SnapshotCell(initial)
        let queue = self.queue
        let published = self.published
        let done = self.writerDone
        let window = config.batchWindow
        let maxBatch = config.maxBatchRequests
        let tuning = config
        let thread = Thread {
            let applier = BatchApplier(kernel: kernel, tree: tree, tuning: tuning, logger: logger,
                                       publish: { s in published.store(s) },
                                       persist: persist)
            while let batch = queue.nextBatch(window: window, max: maxBatch, wakeAt: applier.compactionDue) {
                if batch.isEmpty { applier.maintain() } else { applier.apply(batch) }
            }
            applier.shutdown()
            done.signal()
        }
        thread.name = "uprobed-writer"
        thread.start()
    }

    /// Registers the probes of one request atomically: all of them or none.
    public func register(_ items: [RegisterItem], consumer: String?, peer: Peer) async -> Result<[ProbeRecord], EngineError> {
        await withCheckedContinuation { (cont: CheckedContinuation<Result<[ProbeRecord], EngineError>, Never>) in
            let accepted = queue.push(.register(items: items, consumer: consumer, peer: peer, reply: { cont.resume(returning: $0) }))
            if !accepted { cont.resume(returning: .failure(Self.stopping)) }
        }
    }

    /// Unregisters by ids (all must exist) or by consumer name. `authorize` is asked for each probe.
    public func unregister(ids: [String]?, consumer: String?, peer: Peer,
                           authorize: @escaping @Sendable (ProbeRecord) -> Bool = { _ in true }) async -> Result<Int, EngineError> {
        await withCheckedContinuation { (cont: CheckedContinuation<Result<Int, EngineError>, Never>) in
            let accepted = queue.push(.unregister(ids: ids, consumer: consumer, peer: peer, authorize: authorize,
                                                  reply: { cont.resume(returning: $0) }))
            if !accepted { cont.resume(returning: .failure(Self.stopping)) }
        }
    }

    /// Brings back registrations from the state file in one batch, keeping their ids. Each item
    /// stands alone: one that cannot attach comes back degraded, never dropped.
    public func restore(_ items: [RestoreItem]) async -> [Result<ProbeRecord, EngineError>] {
        guard !items.isEmpty else { return [] }
        return await withCheckedContinuation { (cont: CheckedContinuation<[Result<ProbeRecord, EngineError>], Never>) in
            let accepted = queue.push(.restore(items: items, reply: { cont.resume(returning: $0) }))
            if !accepted { cont.resume(returning: items.map { _ in .failure(Self.stopping) }) }
        }
    }

    private static let stopping = EngineError(code: "shutting_down", message: "uprobed is stopping")

    /// The last published registry.
    public var snapshot: RegistrySnapshot { published.load() }

    /// Hit counts of the given probes (all if nil). Unknown ids give `probe_not_found`.
    ///
    /// The counters and the consumers' slots are read inside one read section of the uprobes
    /// tree: the writer reuses a slot only after a grace period of that tree, so a slot read
    /// here still belongs to the registration that names it.
    public func stats(ids: [String]?) -> Result<[ProbeStats], EngineError> {
        let snap = snapshot
        let records: [ProbeRecord]
        if let ids {
            var r: [ProbeRecord] = []
            for id in ids {
                guard let p = snap.probes[id] else {
                    return .failure(EngineError(code: "probe_not_found", message: "no probe with id '\(id)'"))
                }
                r.append(p)
            }
            records = r
        } else {
            records = snap.sortedProbes
        }
        var hits: [UInt64: UInt64] = [:]
        hits.reserveCapacity(records.count)
        let kernel = self.kernel
        let read: Result<Void, KernelError> = tree.read { (view: borrowing TreeView) -> Result<Void, KernelError> in
            let counts: [UInt64]
            do throws(KernelError) { counts = try kernel.readCounters(upTo: snap.slotHighWater) } catch { return .failure(error) }
            func add(_ c: Consumer) {
                if Int(c.slot) < counts.count { hits[c.registration, default: 0] &+= counts[Int(c.slot)] }
            }
            if ids != nil {
                // A few probes: look their uprobes up instead of walking the whole tree.
                for r in records {
                    guard let number = ProbeID.number(r.id) else { continue }
                    for site in r.sites {
                        let key = UprobeKey(dev: site.target.device, inode: site.target.inode, offset: site.target.fileOffset)
                        _ = view.withConsumers(of: key) { list in
                            if let c = list.first(registration: number) { add(c) }
                        }
                    }
                }
            } else {
                view.forEach { _, list in list.forEach { add($0) } }
            }
            return .success(())
        }
        if case .failure(let error) = read {
            return .failure(EngineError(code: error.code, message: "reading counters failed: \(error.message)"))
        }
        let now = ContinuousClock.now
        return .success(records.map { r in
            let counted = ProbeID.number(r.id).flatMap { hits[$0] } ?? 0
            let secs = durationSeconds(now - r.registeredAtMonotonic)
            return ProbeStats(id: r.id, hits: r.baseHits &+ counted, ratePerSecond: secs > 0 ? Double(counted) / secs : 0,
                              sites: r.sites.count, state: r.state)
        })
    }

    /// Stops taking requests, answers those already queued, detaches everything and waits for
    /// the writer to finish.
    public func shutdown() {
        guard queue.close() else { return }
        writerDone.wait()
    }
}

/// Holds the last published registry. The lock is held only to swap or copy one reference-
/// counted value, never while the writer works.
final class SnapshotCell: Sendable {
    private let mutex: Mutex<RegistrySnapshot>
    init(_ initial: RegistrySnapshot) { mutex = Mutex(initial) }
    func store(_ s: RegistrySnapshot) { mutex.withLock { $0 = s } }
    func load() -> RegistrySnapshot { mutex.withLock { $0 } }
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

    /// False once the queue is closed (the op was not queued).
    func push(_ op: PendingOp) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        guard !closed else { return false }
        pending.append(op)
        cond.signal()
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

    /// Blocks until there is work; then waits up to `window` for more (or until `max`
    /// requests). Returns an empty batch if `wakeAt` passes with no work (time for deferred
    /// maintenance), nil once closed and drained.
    func nextBatch(window: Duration, max: Int, wakeAt: ContinuousClock.Instant? = nil) -> [PendingOp]? {
        cond.lock()
        defer { cond.unlock() }
        while pending.isEmpty && !closed {
            if let wakeAt {
                let secs = durationSeconds(wakeAt - ContinuousClock.now)
                if secs <= 0 { return [] }
                if !cond.wait(until: Date(timeIntervalSinceNow: secs)) && pending.isEmpty { return [] }
            } else {
                cond.wait()
            }
        }
        if pending.isEmpty { return nil }
        let secs = durationSeconds(window)
        if secs > 0 {
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

func durationSeconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}
