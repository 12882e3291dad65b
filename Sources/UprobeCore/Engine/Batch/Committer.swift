/// Makes batches durable off the writer thread (group commit).
///
/// The writer appends a batch's state-log line itself (a failed write is rolled back at once,
/// as before), then hands the batch's replies here instead of waiting for the sync. This thread
/// syncs once for every batch queued meanwhile and only then sends their replies: no client
/// hears "registered" before its registration is on disk, but the writer applies the next batch
/// while the disk works, and one sync covers several batches under load.
///
/// A job's closures are called on the committer thread, exactly one of them, in submission order.
final class Committer: Sendable {
    struct Job: Sendable {
        /// The batch is durable: send its replies.
        var durable: @Sendable () -> Void
        /// The sync failed: tell the batch's clients, and undo what cannot be acknowledged.
        var failed: @Sendable (String) -> Void
        /// Whether the batch appended anything since the job before it was submitted. A job
        /// that did not needs no sync of its own: the jobs before it were answered first.
        var needsSync = true
        /// A batch's entry written ahead of its kernel work: no replies of its own. Its sync
        /// starts while the writer is still attaching; the same batch's next job (always the
        /// next one submitted) fails if this sync failed, even if its own sync succeeds.
        var writtenAhead = false

        /// The sync of an entry written ahead (see `writtenAhead`).
        static let ahead = Job(durable: {}, failed: { _ in }, writtenAhead: true)
    }
    private let thread: DrainingThread<Job>

    /// `sync` makes durable every line appended before the call.
    init(sync: @escaping @Sendable () throws -> Void) {
        let carried = CarriedFailure()
        thread = DrainingThread(name: "uprobed-commit") { jobs in
            // Every line of these jobs was appended before they were queued.
            var failure: String?
            if jobs.contains(where: \.needsSync) {
                do { try sync() } catch { failure = "\(error)" }
            }
            for job in jobs {
                if job.writtenAhead {
                    carried.reason = failure
                    continue
                }
                let reason = failure ?? carried.reason
                carried.reason = nil
                if let reason { job.failed(reason) } else { job.durable() }
            }
        }
    }

    func submit(_ job: Job) { thread.submit(job) }

    /// Blocks until every submitted job has been answered.
    func waitAll() { thread.waitAll() }

    /// Answers the queued jobs, then ends the thread.
    func stop() { thread.stop() }

    /// A failed sync of an entry written ahead, kept for the batch's next job. Only the
    /// committer thread touches it.
    private final class CarriedFailure: @unchecked Sendable {
        // @unchecked: read and written on the committer thread only.
        var reason: String?
    }
}
