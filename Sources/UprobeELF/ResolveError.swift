/// A resolution failure with a stable, machine-readable `code` and a human message that names
/// the path/symbol and says what to do. Codes are part of the wire protocol; never rename them.
public struct ResolveError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Stable snake_case code, e.g. `symbol_not_found`.
    public let code: String
    /// Human-readable explanation.
    public let message: String

    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    static func fileNotFound(_ m: String) -> Self { .init(code: "file_not_found", message: m) }
    static func permissionDenied(_ m: String) -> Self { .init(code: "permission_denied", message: m) }
    static func notELF(_ m: String) -> Self { .init(code: "not_elf", message: m) }
    static func unsupported(_ m: String) -> Self { .init(code: "unsupported_elf", message: m) }
    static func malformed(_ m: String) -> Self { .init(code: "malformed_elf", message: m) }
    static func noSymbols(_ m: String) -> Self { .init(code: "no_symbols", message: m) }
    static func symbolNotFound(_ m: String) -> Self { .init(code: "symbol_not_found", message: m) }
    static func notExecutable(_ m: String) -> Self { .init(code: "offset_not_executable", message: m) }
    static func notFunctionStart(_ m: String) -> Self { .init(code: "offset_not_function_start", message: m) }
    static func usdtNotFound(_ m: String) -> Self { .init(code: "usdt_not_found", message: m) }
    static func libraryNotFound(_ m: String) -> Self { .init(code: "library_not_found", message: m) }
    static func tooMany(_ m: String) -> Self { .init(code: "too_many_matches", message: m) }
    static func invalidSpec(_ m: String) -> Self { .init(code: "invalid_spec", message: m) }
    static func retprobeOnGo(_ m: String) -> Self { .init(code: "retprobe_on_go", message: m) }
    static func processNotFound(_ m: String) -> Self { .init(code: "process_not_found", message: m) }
    static func tooManyOpenFiles(_ m: String) -> Self { .init(code: "too_many_open_files", message: m) }
}
