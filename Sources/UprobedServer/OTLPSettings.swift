import Foundation

/// Where and how the OTLP exporter pushes metrics (config `otlp_endpoint`, `otlp_interval_ms`,
/// `otlp_timeout_ms`, `otlp_headers`). Parsed and checked when the config is read, so a bad URL
/// or header refuses the start or the reload with the line at fault instead of failing later
/// on every push.
public struct OTLPSettings: Sendable, Equatable {
    /// The URL pushed to (`otlp_endpoint` with `/v1/metrics` added when it has no path).
    public var url: String
    public var interval: Duration
    public var timeout: Duration
    public var headers: [OTLPHeader]

    /// The settings of a config, or nil when `otlp_endpoint` is empty (the exporter is off).
    public init?(_ config: DaemonConfig) {
        guard let url = try? OTLPEndpoint.parse(config.otlpEndpoint) else { return nil }
        self.url = url
        interval = .milliseconds(config.otlpIntervalMs)
        // A push never outlasts the interval, so pushes never queue up behind a slow collector.
        timeout = .milliseconds(min(config.otlpTimeoutMs, config.otlpIntervalMs))
        headers = config.otlpHeaders
    }
}

/// One extra HTTP header of every push (`otlp_headers`), e.g. a collector's auth token.
public struct OTLPHeader: Sendable, Equatable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }

    /// `name=value` pairs separated by commas, values percent-decoded: the format of
    /// OTEL_EXPORTER_OTLP_HEADERS. Names must be HTTP tokens; values may not hold control
    /// characters once decoded (no header injection through `%0d%0a`).
    static func parseList(_ text: String) throws(OTLPEndpoint.ParseError) -> [OTLPHeader] {
        var out: [OTLPHeader] = []
        for item in text.split(separator: ",") {
            let pair = item.trimmingCharacters(in: .whitespaces)
            if pair.isEmpty { continue }
            guard let eq = pair.firstIndex(of: "=") else {
                throw .init(message: "otlp_headers: '\(pair)' is not name=value")
            }
            let name = pair[..<eq].trimmingCharacters(in: .whitespaces)
            let raw = pair[pair.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            let token = CharacterSet(charactersIn: "!#$%&'*+-.^_`|~").union(.alphanumerics)
            guard !name.isEmpty, name.unicodeScalars.allSatisfy({ $0.isASCII && token.contains($0) }) else {
                throw .init(message: "otlp_headers: '\(name)' is not a valid HTTP header name")
            }
            guard let value = raw.removingPercentEncoding,
                  !value.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else {
                throw .init(message: "otlp_headers: the value of '\(name)' is not valid (bad percent-encoding or a control character)")
            }
            out.append(OTLPHeader(name: name, value: value))
        }
        return out
    }
}

public enum OTLPEndpoint {
    public struct ParseError: Error, Sendable { public let message: String }

    /// The OTLP/HTTP metrics path a collector serves (OTLP specification).
    static let metricsPath = "/v1/metrics"

    /// "" is nil (off). Otherwise an `http://` or `https://` URL with a host: without a path
    /// (or with `/`) it is the collector's base URL and `/v1/metrics` is added, as
    /// OTEL_EXPORTER_OTLP_ENDPOINT is read; with a path it is used as it is. No user info (put
    /// credentials in `otlp_headers`), query or fragment.
    public static func parse(_ text: String) throws(ParseError) -> String? {
        if text.isEmpty { return nil }
        let bad = { (why: String) in ParseError(message: "otlp_endpoint must be empty or an http:// or https:// URL like http://127.0.0.1:4318; '\(text)' \(why)") }
        guard let url = URLComponents(string: text), let scheme = url.scheme?.lowercased() else { throw bad("is not a URL") }
        guard scheme == "http" || scheme == "https" else { throw bad("has scheme '\(scheme)'") }
        guard let host = url.host, !host.isEmpty else { throw bad("has no host") }
        if let port = url.port, !(1...65535).contains(port) { throw bad("has port \(port)") }
        if url.user != nil || url.password != nil { throw bad("has user info (put credentials in otlp_headers)") }
        if url.query != nil || url.fragment != nil { throw bad("has a query or fragment") }
        #if !OTLP
        throw ParseError(message: "otlp_endpoint is set but this uprobed was built without OTLP support (the package trait OTLP)")
        #else
        return url.path.isEmpty || url.path == "/" ? text.replacingOccurrences(of: "/+$", with: "", options: .regularExpression) + metricsPath : text
        #endif
    }
}
