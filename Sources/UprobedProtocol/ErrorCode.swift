/// A stable, snake_case error code carried in `error.code` of a failed reply.
///
/// Codes are part of the wire contract: scripts match on them, so a code is never renamed.
/// The set is open because the resolver and the kernel layer contribute their own codes
/// (`symbol_not_found`, `not_elf`, ...), which pass through unchanged.
public struct ErrorCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public init(_ rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }

    /// The line is not valid JSON (UTF-8, RFC 8259).
    public static let invalidJSON = ErrorCode("invalid_json")
    /// Valid JSON, but not a request of this protocol (not an object, wrong field types, ...).
    public static let invalidRequest = ErrorCode("invalid_request")
    /// `op` names no operation this daemon knows.
    public static let unknownOp = ErrorCode("unknown_op")
    /// The line exceeded the configured maximum; it was discarded unread.
    public static let lineTooLong = ErrorCode("line_too_long")
    /// A request carried more probes than the configured maximum.
    public static let tooManyProbes = ErrorCode("too_many_probes")
    /// A probe id in the request names no registration.
    public static let probeNotFound = ErrorCode("probe_not_found")
    /// No counter slot is free, even after reclaiming retired ones.
    public static let capacityExhausted = ErrorCode("capacity_exhausted")
    /// The peer's credentials do not allow this operation.
    public static let permissionDenied = ErrorCode("permission_denied")
    /// The kernel refused an attach; the message carries the errno.
    public static let kernelError = ErrorCode("kernel_error")
    /// The daemon already serves `max_connections` clients; this connection is closed.
    public static let tooManyConnections = ErrorCode("too_many_connections")
    /// The daemon is out of file descriptors: a binary could not be opened, or this connection
    /// could not be served (it is closed after this reply).
    public static let tooManyOpenFiles = ErrorCode("too_many_open_files")
    /// The daemon is stopping and takes no new work.
    public static let shuttingDown = ErrorCode("shutting_down")
    /// A bug: the daemon could not complete an operation it accepted.
    public static let internalError = ErrorCode("internal_error")
}

/// A failed request, as it goes on the wire.
public struct ProtocolError: Error, Sendable, Equatable {
    public var code: ErrorCode
    public var message: String
    /// Extra machine-readable context, e.g. `{"probe": 3}` for the index of the failing spec.
    public var details: JSONObject

    public init(_ code: ErrorCode, _ message: String, details: JSONObject = JSONObject()) {
        self.code = code
        self.message = message
        self.details = details
    }
}
