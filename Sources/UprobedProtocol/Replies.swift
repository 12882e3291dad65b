/// Typed readers for the replies clients consume (`list`, `stats`, `status`, `watch` events).
///
/// The daemon writes these replies with `JSONWriter`; these readers are the client side of the
/// same contract (README, "Protocol (v1)"). They read what they know and ignore the rest, so a
/// newer daemon that adds members does not break an older client. Nothing here changes the wire.

/// A failed reply's `error` member.
public struct ReplyError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: String
    public var message: String
    /// Index of the request's spec to blame (`"probe": N`), if the daemon named one.
    public var probe: Int?

    public init(code: String, message: String, probe: Int? = nil) {
        self.code = code
        self.message = message
        self.probe = probe
    }

    public var description: String { "\(message) [\(code)]" }

    /// The error of a reply with `"ok": false`; nil for a successful reply.
    public init?(reply: JSONObject) {
        guard reply["ok"] != .bool(true) else { return nil }
        let e = reply["error"]?.objectValue
        code = e?["code"]?.stringValue ?? "unknown"
        message = e?["message"]?.stringValue ?? JSONSerializer.serialize(.object(reply))
        probe = e?["probe"]?.int64Value.map { Int($0) }
    }
}

/// One registration as `list` reports it.
public struct ListedProbe: Sendable, Equatable {
    public var id: String
    /// The (first) resolved site: the file actually probed and the symbol found there. A probe
    /// by offset may have no symbol; a USDT probe's symbol is `provider:name`.
    public var path: String
    public var offset: UInt64?
    public var symbol: String?
    /// Number of sites (a USDT probe can have several); 1 for plain probes.
    public var siteCount: Int
    /// The spec as registered (its `path` may be a library name such as `libc`).
    public var spec: ProbeSpec?
    public var consumer: String?
    public var ownerUID: Int64?
    public var registeredAt: Double?
    /// `nil` when active; otherwise e.g. `degraded`, with `reason`.
    public var state: String?
    public var reason: String?
    /// The probe set that owns it (nil: registered through the API); such a probe is changed
    /// through its set, not removed by id.
    public var probeSet: String? = nil

    public init(id: String, path: String, offset: UInt64? = nil, symbol: String? = nil, siteCount: Int = 1,
                spec: ProbeSpec? = nil, consumer: String? = nil, ownerUID: Int64? = nil, registeredAt: Double? = nil,
                state: String? = nil, reason: String? = nil) {
        self.id = id
        self.path = path
        self.offset = offset
        self.symbol = symbol
        self.siteCount = siteCount
        self.spec = spec
        self.consumer = consumer
        self.ownerUID = ownerUID
        self.registeredAt = registeredAt
        self.state = state
        self.reason = reason
    }

    /// Reads one member of a `list` reply's `probes`; nil if it lacks an id.
    public init?(json: JSONValue) {
        guard let o = json.objectValue, let id = o["id"]?.stringValue else { return nil }
        let spec = o["spec"].flatMap { try? ProbeSpec(json: $0, context: "spec") }
        self.init(id: id,
                  path: o["path"]?.stringValue ?? spec?.path ?? "",
                  offset: o["offset"]?.int64Value.flatMap { $0 >= 0 ? UInt64($0) : nil },
                  symbol: o["symbol"]?.stringValue,
                  siteCount: o["sites"]?.arrayValue?.count ?? 1,
                  spec: spec,
                  consumer: o["consumer"]?.stringValue,
                  ownerUID: o["owner_uid"]?.int64Value,
                  registeredAt: o["registered_at"]?.doubleValue,
                  state: o["state"]?.stringValue,
                  reason: o["reason"]?.stringValue)
        probeSet = o["set"]?.stringValue
    }

    /// Reads a whole `list` reply (successful or not).
    public static func fromList(_ reply: JSONObject) throws(ReplyError) -> [ListedProbe] {
        if let e = ReplyError(reply: reply) { throw e }
        return (reply["probes"]?.arrayValue ?? []).compactMap(ListedProbe.init(json:))
    }
}

/// One row of a `stats` reply or `watch` event.
public struct ProbeCount: Sendable, Equatable {
    public var id: String
    public var hits: UInt64
    /// In a `stats` reply: the mean hits/s since registration. In a `watch` event: hits/s over
    /// the interval since the previous event.
    public var rate: Double
    public var state: String?
    public var reason: String?

    public init(id: String, hits: UInt64, rate: Double, state: String? = nil, reason: String? = nil) {
        self.id = id
        self.hits = hits
        self.rate = rate
        self.state = state
        self.reason = reason
    }

    public init?(json: JSONValue) {
        guard let o = json.objectValue, let id = o["id"]?.stringValue else { return nil }
        // Hits above Int64.max arrive as a double (JSONValue(UInt64)); keep them as large as
        // they are, and clamp at UInt64.max (2^64 as a double would trap in the conversion).
        let hits: UInt64
        switch o["hits"] {
        case .int(let i)?: hits = i >= 0 ? UInt64(i) : 0
        case .double(let d)? where d >= 0 && d.isFinite: hits = d >= 18_446_744_073_709_551_616.0 ? .max : UInt64(d)
        default: hits = 0
        }
        self.init(id: id, hits: hits, rate: o["rate"]?.doubleValue ?? 0,
                  state: o["state"]?.stringValue, reason: o["reason"]?.stringValue)
    }

    /// Reads a whole `stats` reply or `watch` event (successful or not).
    public static func fromStats(_ reply: JSONObject) throws(ReplyError) -> [ProbeCount] {
        if let e = ReplyError(reply: reply) { throw e }
        return (reply["stats"]?.arrayValue ?? []).compactMap(ProbeCount.init(json:))
    }
}

/// The members of a `status` reply a client shows in a summary.
public struct DaemonStatus: Sendable, Equatable {
    public var version: String
    public var uptimeSeconds: Double
    public var probes: Int
    public var uprobes: Int
    public var links: Int
    public var degraded: Int

    public init(version: String, uptimeSeconds: Double, probes: Int, uprobes: Int, links: Int, degraded: Int) {
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.probes = probes
        self.uprobes = uprobes
        self.links = links
        self.degraded = degraded
    }

    public init(reply: JSONObject) throws(ReplyError) {
        if let e = ReplyError(reply: reply) { throw e }
        func int(_ k: String) -> Int { reply[k]?.int64Value.map { Int($0) } ?? 0 }
        self.init(version: reply["version"]?.stringValue ?? "?", uptimeSeconds: reply["uptime_s"]?.doubleValue ?? 0,
                  probes: int("probes"), uprobes: int("uprobes"), links: int("links"), degraded: int("degraded"))
    }
}
