import Synchronization

/// Probes per uid in register requests that were checked but not yet answered.
final class InFlightProbes: Sendable {
    private let counts = Mutex<[UInt32: Int]>([:])
    /// Adds `n` (may be negative) and returns the uid's new in-flight total.
    @discardableResult
    func add(uid: UInt32, _ n: Int) -> Int {
        counts.withLock { c in
            let v = (c[uid] ?? 0) + n
            if v == 0 { c.removeValue(forKey: uid) } else { c[uid] = v }
            return v
        }
    }
}
