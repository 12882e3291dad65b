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
    }
    private let thread: DrainingThread<Job>

    /// `sync` makes durable every line appended before the call.
    init(sync: @escaping @Sendable () throws -> Void) {
        thread = DrainingThread(name: "uprobed-commit") { jobs in
            // Every line of these jobs was appended before they were queued.
            var failure: String?
            do { try sync() } catch { failure = "\(error)" }
            for job in jobs {
                if let failure { job.failed(failure) } else { job.durable() }
            }
        }
    }

    func submit(_ job: Job) { thread.submit(job) }

    /// Blocks until every submitted job has been answered.
    func waitAll() { thread.waitAll() }

    /// Answers the queued jobs, then ends the thread.
    func stop() { thread.stop() }
}
