import CUprobeSys
import Foundation

/// A thread that takes everything queued since its last turn as one batch and hands it to
/// `body`, batches in submission order. The engine's helpers (detach worker, committer) are
/// built on it: work that waits on the kernel or the disk, batched so that one wait serves
/// everything that queued up behind it.
///
/// `cond` guards `queued`, `outstanding` and `stopping`; `body` runs without it.
final class DrainingThread<Item: Sendable>: @unchecked Sendable {
    // @unchecked: every mutable field is guarded by `cond`.
    private let cond = NSCondition()
    private var queued: [Item] = []
    /// Items submitted whose batch has not returned from `body` yet.
    private var outstanding = 0
    private var stopping = false
    private let done = DispatchSemaphore(value: 0)

    init(name: String, body: @escaping @Sendable ([Item]) -> Void) {
        let thread = Thread { [self] in
            ThreadName.setCurrent(name)
            while let items = next() {
                body(items)
                cond.lock()
                outstanding -= items.count
                cond.broadcast()
                cond.unlock()
            }
            done.signal()
        }
        thread.start()
    }

    func submit(_ item: Item) {
        cond.lock()
        queued.append(item)
        outstanding += 1
        cond.broadcast()
        cond.unlock()
    }

    /// Blocks until every submitted item has been through `body`.
    func waitAll() {
        cond.lock()
        while outstanding > 0 { cond.wait() }
        cond.unlock()
    }

    /// Processes what is queued, then ends the thread.
    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        cond.unlock()
        done.wait()
    }

    private func next() -> [Item]? {
        cond.lock()
        defer { cond.unlock() }
        while queued.isEmpty && !stopping { cond.wait() }
        if queued.isEmpty { return nil }
        let items = queued
        queued.removeAll()
        return items
    }
}

/// Thread names the kernel knows. Foundation's `Thread.name` does not reach it on Linux: the
/// engine's threads kept the name of the Dispatch worker that started them ("oot.default-qos",
/// the tail of "com.apple.root.default-qos"), so `top -H`, `ps -L` and `perf` showed the
/// writer, the attach, commit, detach and follow threads and the task pool all alike.
public enum ThreadName {
    /// Names the calling thread (at most 15 bytes are kept). Wraps prctl(2) PR_SET_NAME; a
    /// failure only leaves the old name, so it is ignored.
    public static func setCurrent(_ name: String) {
        _ = CUprobeSys_set_thread_name(name)
    }
}
