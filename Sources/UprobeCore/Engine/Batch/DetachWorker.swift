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
/// `waitAll`. This worker only closes handles and waits.
final class DetachWorker: Sendable {
    private let thread: DrainingThread<(id: UInt64, links: [any KernelLink])>
    /// Rounds finished and not yet taken by the writer (shared with the thread's body).
    /// An NSLock (a pthread mutex) rather than `Mutex`: ThreadSanitizer does not see the
    /// Synchronization module's futex lock and reported its accesses as a race.
    private final class Finished: @unchecked Sendable {
        // @unchecked: `ids` is only touched with `lock` held.
        private let lock = NSLock()
        private var ids: [UInt64] = []
        func add(_ more: [UInt64]) { lock.withLock { ids += more } }
        func take() -> [UInt64] { lock.withLock { defer { ids.removeAll() }; return ids } }
    }
    private let finished = Finished()

    /// `wake` is called after each finished round (from the worker thread), so the writer
    /// collects it even when no client request is waking it.
    init(kernel: any KernelBackend, tree: UprobeTree, wake: @escaping @Sendable () -> Void) {
        let finished = self.finished
        thread = DrainingThread(name: "uprobed-detach") { rounds in
            kernel.closeAll(rounds.flatMap(\.links))
            // A reader may still hold a registry version naming the slots these rounds free
            // (it reads counters inside a tree read section): the writer reuses them only
            // after this grace period.
            tree.synchronize()
            // Before the thread counts the rounds as done, so `waitAll` finds them here.
            finished.add(rounds.map(\.id))
            wake()
        }
    }

    /// Queues a round: close `links` (possibly none), then wait for a tree grace period.
    func submit(id: UInt64, links: [any KernelLink]) { thread.submit((id, links)) }

    /// Ids of the rounds finished since the last call; never blocks.
    func takeFinished() -> [UInt64] { finished.take() }

    /// Blocks until every submitted round has finished; returns the ids not yet taken.
    func waitAll() -> [UInt64] {
        thread.waitAll()
        return takeFinished()
    }

    /// Finishes the queued rounds, then ends the thread.
    func stop() { thread.stop() }
}
