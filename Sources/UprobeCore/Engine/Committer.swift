import Foundation

/// Makes batches durable off the writer thread (group commit).
///
/// The writer appends a batch's state-log line itself (a failed write is rolled back at once,
/// as before), then hands the batch's replies here instead of waiting for the sync. This thread
/// syncs once for every batch queued meanwhile and only then sends their replies: no client
/// hears "registered" before its registration is on disk, but the writer applies the next batch
/// while the disk works, and one sync covers several batches under load.
///
/// Ownership: the jobs are handed over whole; `cond` guards the queue. A job's closures are
/// called on this thread, exactly one of them, in submission order.
final class Committer: @unchecked Sendable {
    // @unchecked: `queued`, `outstanding` and `stopping` are guarded by `cond`.
    struct Job {
        /// The batch is durable: send its replies.
        var durable: @Sendable () -> Void
        /// The sync failed: tell the batch's clients, and undo what cannot be acknowledged.
        var failed: @Sendable (String) -> Void
    }
    private let cond = NSCondition()
    private var queued: [Job] = []
    private var outstanding = 0
    private var stopping = false
    private let done = DispatchSemaphore(value: 0)
    /// Syncs a durable point of the log; each call covers every line appended before it.
    private let sync: @Sendable () throws -> Void

    init(sync: @escaping @Sendable () throws -> Void) {
        self.sync = sync
        let thread = Thread { [self] in
            while let jobs = next() {
                // Every line of these jobs was appended before they were queued.
                var failure: String?
                do { try self.sync() } catch { failure = "\(error)" }
                for job in jobs {
                    if let failure { job.failed(failure) } else { job.durable() }
                }
                cond.lock()
                outstanding -= jobs.count
                cond.broadcast()
                cond.unlock()
            }
            done.signal()
        }
        thread.name = "uprobed-commit"
        thread.start()
    }

    func submit(_ job: Job) {
        cond.lock()
        queued.append(job)
        outstanding += 1
        cond.broadcast()
        cond.unlock()
    }

    /// Blocks until every submitted job has been answered.
    func waitAll() {
        cond.lock()
        while outstanding > 0 { cond.wait() }
        cond.unlock()
    }

    /// Answers the queued jobs, then ends the thread.
    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        cond.unlock()
        done.wait()
    }

    private func next() -> [Job]? {
        cond.lock()
        defer { cond.unlock() }
        while queued.isEmpty && !stopping { cond.wait() }
        if queued.isEmpty { return nil }
        let jobs = queued
        queued.removeAll()
        return jobs
    }
}
