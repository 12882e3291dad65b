import Foundation
import UprobeTree

/// Runs the slow half of detach work off the writer thread.
///
/// Closing a link returns only after a uprobe grace period (tens of milliseconds here), and
/// freeing a counter slot waits for a grace period of the uprobes tree. Done on the writer, that
/// wait stalled every client's batch behind it; here the writer hands over a round of links and
/// keeps applying batches. Rounds queued while one is closing are closed together, so they still
/// share grace periods.
///
/// Ownership: the writer owns every round's bookkeeping (which slots to free, which hand-off to
/// end) and acts on it only after it has taken the round's id back from `takeFinished` or
/// `waitAll`. This worker only closes handles and waits; `cond` guards its three fields.
final class DetachWorker: @unchecked Sendable {
    // @unchecked: `queued`, `finished`, `outstanding` and `stopping` are guarded by `cond`.
    private let cond = NSCondition()
    private var queued: [(id: UInt64, links: [any KernelLink])] = []
    private var finished: [UInt64] = []
    /// Rounds submitted and not yet finished.
    private var outstanding = 0
    private var stopping = false
    private let done = DispatchSemaphore(value: 0)

    /// `wake` is called after each finished round (from the worker thread), so the writer
    /// collects it even when no client request is waking it.
    init(kernel: any KernelBackend, tree: UprobeTree, wake: @escaping @Sendable () -> Void) {
        let thread = Thread { [self] in
            while let work = nextWork() {
                kernel.closeAll(work.flatMap(\.links))
                // A reader may still hold a registry version naming the slots this round frees
                // (it reads counters inside a tree read section): the writer reuses them only
                // after this grace period.
                tree.synchronize()
                cond.lock()
                finished += work.map(\.id)
                outstanding -= work.count
                cond.broadcast()
                cond.unlock()
                wake()
            }
            done.signal()
        }
        thread.name = "uprobed-detach"
        thread.start()
    }

    /// Queues a round: close `links` (possibly none), then wait for a tree grace period.
    func submit(id: UInt64, links: [any KernelLink]) {
        cond.lock()
        queued.append((id, links))
        outstanding += 1
        cond.broadcast()
        cond.unlock()
    }

    /// Ids of the rounds finished since the last call; never blocks.
    func takeFinished() -> [UInt64] {
        cond.lock()
        defer { cond.unlock() }
        let ids = finished
        finished.removeAll()
        return ids
    }

    /// Blocks until every submitted round has finished; returns the ids not yet taken.
    func waitAll() -> [UInt64] {
        cond.lock()
        defer { cond.unlock() }
        while outstanding > 0 { cond.wait() }
        let ids = finished
        finished.removeAll()
        return ids
    }

    /// Finishes the queued rounds, then ends the thread.
    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        cond.unlock()
        done.wait()
    }

    private func nextWork() -> [(id: UInt64, links: [any KernelLink])]? {
        cond.lock()
        defer { cond.unlock() }
        while queued.isEmpty && !stopping { cond.wait() }
        if queued.isEmpty { return nil }
        let work = queued
        queued.removeAll()
        return work
    }
}
