// The codes themselves live in UprobeErrors, shared by every layer; the protocol's users see
// them through this module.
@_exported import UprobeErrors

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
