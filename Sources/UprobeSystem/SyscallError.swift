import SystemPackage

/// A failed system call: which call, on what, and the errno it left, captured right after the
/// call returned (before anything else can change errno), as swift-nio's and swift-system's
/// wrappers do. Its description names all three: `open(/var/lib/uprobed/state.log): No space
/// left on device`.
public struct SyscallError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The call, as the man page names it: `open`, `fsync`, `bpf(BPF_LINK_CREATE)`.
    public let call: String
    /// What it was called on (a path, an fd's role), if that helps the reader; may be empty.
    public let subject: String
    public let errno: Errno

    public init(call: String, subject: String = "", errno: Errno) {
        self.call = call
        self.subject = subject
        self.errno = errno
    }

    public var description: String {
        subject.isEmpty ? "\(call): \(errno)" : "\(call)(\(subject)): \(errno)"
    }
}
