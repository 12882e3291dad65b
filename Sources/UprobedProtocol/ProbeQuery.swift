/// Selecting, ordering and paging registrations on the daemon's side, so that a client of a
/// 241,000-probe daemon names "every probe in this binary" or "the 20 busiest" in one small
/// request instead of fetching (or sending back) every id.

/// Shell globs (fnmatch(3)) over a registration's binary and symbol; both must match when both
/// are given. `path` matches the resolved file's full path, its file name, or the spec's path
/// as registered (`libc`); `symbol` matches the raw (mangled) symbol or one of its aliases.
public struct ProbeMatch: Sendable, Hashable {
    public var path: String?
    public var symbol: String?
    public init(path: String? = nil, symbol: String? = nil) {
        self.path = path
        self.symbol = symbol
    }
    public var isEmpty: Bool { path == nil && symbol == nil }

    static let fields = ["path", "symbol"]

    static func decode(_ obj: JSONObject) throws(ProtocolError) -> ProbeMatch {
        var m = ProbeMatch()
        for key in fields {
            switch obj[key] {
            case nil, .null?: continue
            case .string(let s)? where !s.isEmpty && s.utf8.count <= 4096:
                if key == "path" { m.path = s } else { m.symbol = s }
            case let other?:
                throw ProtocolError(.invalidRequest, "'\(key)' must be a glob of 1 to 4096 bytes, got \(other.typeName)")
            }
        }
        return m
    }

    func encode(into o: inout JSONObject) {
        if let path { o["path"] = .string(path) }
        if let symbol { o["symbol"] = .string(symbol) }
    }
}

/// How `stats` orders its rows. `id` is registration order (the default); the others are
/// descending. The latency keys rank latency probes by calls entered, median and 99th
/// percentile duration, and longest call; rows without that value (no call returned yet,
/// counting probes) come last.
public enum StatsSort: String, Sendable, CaseIterable {
    case id, hits, rate
    case calls, p50, p99, max
}

/// The ordering, cut and filter of a `stats` request.
public struct StatsQuery: Sendable, Hashable {
    public var match: ProbeMatch
    /// Nil: registration order, or `hits` when `top` is given.
    public var sort: StatsSort?
    /// Only the first N rows after sorting; the reply's `total` says how many matched.
    public var top: Int?
    public init(match: ProbeMatch = ProbeMatch(), sort: StatsSort? = nil, top: Int? = nil) {
        self.match = match
        self.sort = sort
        self.top = top
    }
    public var isDefault: Bool { match.isEmpty && sort == nil && top == nil }
    /// The sort in force: `top` without a `sort` ranks by hits.
    public var effectiveSort: StatsSort { sort ?? (top != nil ? .hits : .id) }
}

/// The filter and page of a `list` request. Rows are in id (registration) order; `offset`
/// skips that many matching rows and `limit` caps the rows returned; the reply's `total` says
/// how many matched in all.
public struct ListQuery: Sendable, Hashable {
    public var ids: [String]?
    public var match: ProbeMatch
    public var offset: Int
    public var limit: Int?
    public init(ids: [String]? = nil, match: ProbeMatch = ProbeMatch(), offset: Int = 0, limit: Int? = nil) {
        self.ids = ids
        self.match = match
        self.offset = offset
        self.limit = limit
    }
    public var isDefault: Bool { ids == nil && match.isEmpty && offset == 0 && limit == nil }
}

/// What a `register` reply says about each new probe (`"reply"` in the request).
public enum RegisterReplyForm: String, Sendable, CaseIterable {
    /// `full` up to `RegisterReplyForm.fullUpTo` probes, `compact` above.
    case auto
    /// One object per probe (id, path, offset, symbol, build_id, ...), as protocol v1 always did.
    case full
    /// One object per file and spec: what every probe there shares once, and id ranges.
    case compact

    /// The most probes an `auto` reply lists one by one: the old default request limit, so a
    /// client that worked before sees exactly the replies it saw before.
    public static let fullUpTo = 10_000

    public func isCompact(probes: Int) -> Bool {
        switch self {
        case .auto: return probes > Self.fullUpTo
        case .full: return false
        case .compact: return true
        }
    }
}
