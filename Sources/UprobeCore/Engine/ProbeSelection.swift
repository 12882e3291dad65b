#if canImport(Glibc)
import Glibc
#endif

/// Registrations chosen by what they are rather than by id: a consumer, shell globs over the
/// binary and the symbol, and an owner. `unregister`, `list` and `stats` use it so that a
/// client of a whole-binary registration (241,000 probes) never has to send or fetch every id.
public struct ProbeSelection: Sendable, Hashable {
    public var consumer: String?
    /// fnmatch(3) glob against the (first) resolved file's path, its file name, or the path as
    /// the spec named it (`libc`).
    public var path: String?
    /// fnmatch(3) glob against the (first) resolved symbol or one of its aliases.
    public var symbol: String?
    /// Only this uid's registrations (a non-admin's glob selects only its own probes).
    public var ownerUID: UInt32?

    public init(consumer: String? = nil, path: String? = nil, symbol: String? = nil, ownerUID: UInt32? = nil) {
        self.consumer = consumer
        self.path = path
        self.symbol = symbol
        self.ownerUID = ownerUID
    }

    /// Selects nothing in particular (every registration).
    public var isEverything: Bool { consumer == nil && path == nil && symbol == nil && ownerUID == nil }
    /// Needs the record's path or symbol (not only what `StatsRow` keeps).
    var needsRecord: Bool { path != nil || symbol != nil || ownerUID != nil }

    /// A matcher for many records in a row. It remembers the last path it judged: the records
    /// of one glob registration share their path, and fnmatch per record was the cost.
    public func matcher() -> Matcher { Matcher(self) }

    public struct Matcher {
        let selection: ProbeSelection
        private var lastPath: String?
        private var lastPathMatched = false
        private let symbolIsAny: Bool
        private let pathIsAny: Bool

        init(_ s: ProbeSelection) {
            selection = s
            symbolIsAny = s.symbol == "*"
            pathIsAny = s.path == "*"
        }

        public mutating func matches(_ r: ProbeRecord) -> Bool {
            let s = selection
            if let uid = s.ownerUID, r.owner.uid != uid { return false }
            if let c = s.consumer, r.consumer != c { return false }
            let target = r.firstTarget ?? r.sites.first?.target
            if let pattern = s.path, !pathIsAny {
                let path = target?.path ?? r.spec.path
                if path != lastPath {
                    lastPath = path
                    lastPathMatched = Self.pathMatches(pattern, path) || (path != r.spec.path && Self.pathMatches(pattern, r.spec.path))
                }
                if !lastPathMatched { return false }
            }
            if let pattern = s.symbol, !symbolIsAny {
                guard let t = target else { return false }
                // On the name's bytes in place (NUL-terminated there): no String per record.
                let matched = t.withSymbolUTF8 { name in
                    name.baseAddress.map { UnsafeRawPointer($0).withMemoryRebound(to: CChar.self, capacity: name.count + 1) {
                        fnmatch(pattern, $0, 0) == 0
                    } } ?? false
                }
                if matched == true { return true }
                return t.aliases.contains { fnmatch(pattern, $0, 0) == 0 }
            }
            return true
        }

        /// The pattern against the full path or the file name (`libc.so.6`, `*/libssl*`).
        static func pathMatches(_ pattern: String, _ path: String) -> Bool {
            if pattern == path || fnmatch(pattern, path, 0) == 0 { return true }
            guard let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")) else { return false }
            let base = String(path[path.utf8.index(after: slash)...])
            return pattern == base || fnmatch(pattern, base, 0) == 0
        }
    }
}
