import Foundation

/// Runs blocking client work on dedicated threads and waits for all of it (load generators in
/// tests and benchmarks). Not Dispatch's global queues: on Linux those run only about one
/// blocking work item per core, so "64 concurrent clients" would quietly become two.
public final class ThreadGroup: @unchecked Sendable {
    // @unchecked: `pending` is guarded by `cond`.
    private let cond = NSCondition()
    private var pending = 0

    public init() {}

    /// Starts `body` on a new thread.
    public func spawn(_ body: @escaping @Sendable () -> Void) {
        cond.lock(); pending += 1; cond.unlock()
        let t = Thread { [self] in
            body()
            cond.lock(); pending -= 1; cond.broadcast(); cond.unlock()
        }
        t.stackSize = 1 << 20
        t.start()
    }

    /// Blocks until every spawned body has returned.
    public func wait() {
        cond.lock()
        while pending > 0 { cond.wait() }
        cond.unlock()
    }
}
