import Synchronization

/// The access policy in force. Readers copy it per request; a reload swaps it whole.
public final class PolicyCell: Sendable {
    private let value: Mutex<AccessPolicy>
    public init(_ p: AccessPolicy) { value = Mutex(p) }
    public func load() -> AccessPolicy { value.withLock { $0 } }
    public func store(_ p: AccessPolicy) { value.withLock { $0 = p } }
}
