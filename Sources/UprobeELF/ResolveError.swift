import UprobeErrors

/// A resolution failure with a stable, machine-readable `code` and a human message that names
/// the path/symbol and says what to do.
public struct ResolveError: Error, Sendable, Equatable, CustomStringConvertible {
    public let code: ErrorCode
    /// Human-readable explanation.
    public let message: String

    public init(code: ErrorCode, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    static func fileNotFound(_ m: String) -> Self { .init(code: .fileNotFound, message: m) }
    static func permissionDenied(_ m: String) -> Self { .init(code: .permissionDenied, message: m) }
    static func notELF(_ m: String) -> Self { .init(code: .notELF, message: m) }
    static func unsupported(_ m: String) -> Self { .init(code: .unsupportedELF, message: m) }
    static func malformed(_ m: String) -> Self { .init(code: .malformedELF, message: m) }
    static func noSymbols(_ m: String) -> Self { .init(code: .noSymbols, message: m) }
    static func symbolNotFound(_ m: String) -> Self { .init(code: .symbolNotFound, message: m) }
    static func notExecutable(_ m: String) -> Self { .init(code: .offsetNotExecutable, message: m) }
    static func notFunctionStart(_ m: String) -> Self { .init(code: .offsetNotFunctionStart, message: m) }
    static func instructionNotProbeable(_ m: String) -> Self { .init(code: .instructionNotProbeable, message: m) }
    static func usdtNotFound(_ m: String) -> Self { .init(code: .usdtNotFound, message: m) }
    static func libraryNotFound(_ m: String) -> Self { .init(code: .libraryNotFound, message: m) }
    static func tooMany(_ m: String) -> Self { .init(code: .tooManyMatches, message: m) }
    static func invalidSpec(_ m: String) -> Self { .init(code: .invalidSpec, message: m) }
    static func retprobeOnGo(_ m: String) -> Self { .init(code: .retprobeOnGo, message: m) }
    static func processNotFound(_ m: String) -> Self { .init(code: .processNotFound, message: m) }
    static func tooManyOpenFiles(_ m: String) -> Self { .init(code: .tooManyOpenFiles, message: m) }
}
