import Dispatch
import Synchronization
import UprobeCore
import UprobedProtocol

/// The `probes` member of a large register's reply, written on the encode-ahead queue from
/// the records the engine made during the attach (`Engine.register`'s `early`): the reply is
/// ready when the batch is durable instead of being written after the sync. Never waited
/// for: if it is not done (or the request failed), the reply is written as usual.
final class PreparedReply: Sendable {
    private let written = Mutex<(records: [ProbeRecord], text: [UInt8])?>(nil)

    func start(_ records: [ProbeRecord], on queue: DispatchQueue) {
        queue.async {
            var w = JSONWriter(reservingCapacity: records.count * 128)
            RequestHandler.writeRegistered(records, into: &w)
            let text = w.bytes
            self.written.withLock { $0 = (records, text) }
        }
    }

    /// The text, if it is done and was written for exactly `records`.
    func take(for records: [ProbeRecord]) -> [UInt8]? {
        written.withLock { done in
            guard let done, done.records.count == records.count,
                  zip(done.records, records).allSatisfy({ $0 === $1 }) else { return nil }
            return done.text
        }
    }
}
