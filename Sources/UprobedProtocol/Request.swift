/// The operations of protocol v1 (DESIGN.md, "Core of the wire protocol").
public enum Request: Sendable, Equatable {
    /// `reply`: how the reply describes the new probes (one object each, or grouped by file).
    case register(probes: [ProbeSpec], consumer: String?, reply: RegisterReplyForm = .auto)
    /// By ids, or by a selection: consumer and/or `match` (globs over path and symbol).
    case unregister(ids: [String]?, consumer: String?, match: ProbeMatch = ProbeMatch())
    case list(consumer: String?, query: ListQuery = ListQuery())
    /// `versions`: always include the per-file breakdown (by default only probes that count in
    /// more than one file version, i.e. during an upgrade, carry it).
    /// `consumer`: only that consumer's probes (not together with `ids`).
    /// `query`: filter, order and cut the rows on the daemon's side.
    case stats(ids: [String]?, versions: Bool, consumer: String? = nil, query: StatsQuery = StatsQuery())
    case watch(intervalMs: Int, ids: [String]?)
    case status
    /// Dry run: resolve specs and report what would be probed, without attaching.
    case resolve(probes: [ProbeSpec])
    /// Makes the probe set `set` hold exactly `probes` (registers the missing ones, unregisters
    /// those no longer listed, keeps the rest with their ids and counts). `dryRun`: only say
    /// what it would change (`uprobectl diff`).
    case apply(set: String, probes: [ProbeSpec], dryRun: Bool)

    public static let ops = ["register", "unregister", "list", "stats", "watch", "status", "resolve", "apply"]

    public var op: String {
        switch self {
        case .register: return "register"
        case .unregister: return "unregister"
        case .list: return "list"
        case .stats: return "stats"
        case .watch: return "watch"
        case .status: return "status"
        case .resolve: return "resolve"
        case .apply: return "apply"
        }
    }

    /// Whether the operation changes registrations (used by access control).
    public var isMutating: Bool {
        switch self {
        case .register, .unregister: return true
        case .apply(_, _, let dryRun): return !dryRun
        default: return false
        }
    }
}

/// A decoded request line: the echoed `id` and the operation.
public struct RequestEnvelope: Sendable, Equatable {
    public var id: JSONValue?
    public var request: Request
    public init(id: JSONValue?, request: Request) {
        self.id = id
        self.request = request
    }
}

/// Why a line could not be decoded, with the `id` if the line got far enough to have one.
public struct RequestDecodingFailure: Error, Sendable {
    public var id: JSONValue?
    public var error: ProtocolError
}

public enum RequestDecoder {
    /// Limits that apply while decoding (the rest are enforced by the engine).
    public struct Limits: Sendable {
        public var maxProbesPerRequest: Int
        public var minWatchIntervalMs: Int
        public init(maxProbesPerRequest: Int = 10_000, minWatchIntervalMs: Int = 100) {
            self.maxProbesPerRequest = maxProbesPerRequest
            self.minWatchIntervalMs = minWatchIntervalMs
        }
    }

    /// Decodes one line (without its newline).
    public static func decode(_ line: some Collection<UInt8>, limits: Limits = Limits()) -> Result<RequestEnvelope, RequestDecodingFailure> {
        let value: JSONValue
        do {
            value = try JSONParser.parse(line)
        } catch {
            return .failure(RequestDecodingFailure(id: nil, error: ProtocolError(.invalidJSON, "malformed JSON: \(error)")))
        }
        guard let obj = value.objectValue else {
            return .failure(RequestDecodingFailure(
                id: nil, error: ProtocolError(.invalidRequest, "a request must be a JSON object, got \(value.typeName)")))
        }
        var id: JSONValue? = nil
        if let rawID = obj["id"] {
            guard rawID.isScalar else {
                return .failure(RequestDecodingFailure(
                    id: nil, error: ProtocolError(.invalidRequest, "'id' must be a JSON scalar (string, number, boolean or null)")))
            }
            id = rawID
        }
        do {
            let request = try decodeOp(obj, limits: limits)
            return .success(RequestEnvelope(id: id, request: request))
        } catch {
            return .failure(RequestDecodingFailure(id: id, error: error))
        }
    }

    private static func decodeOp(_ obj: JSONObject, limits: Limits) throws(ProtocolError) -> Request {
        guard let opValue = obj["op"] else {
            throw ProtocolError(.invalidRequest, "missing 'op' (one of: \(Request.ops.joined(separator: ", ")))")
        }
        guard let op = opValue.stringValue else {
            throw ProtocolError(.invalidRequest, "'op' must be a string, got \(opValue.typeName)")
        }
        let allowed: Set<String>
        switch op {
        case "register": allowed = ["probes", "consumer", "reply"]
        case "resolve": allowed = ["probes", "consumer"]
        case "unregister": allowed = ["probes", "consumer", "path", "symbol"]
        case "list": allowed = ["consumer", "probes", "path", "symbol", "offset", "limit"]
        case "stats": allowed = ["probes", "versions", "consumer", "path", "symbol", "sort", "top"]
        case "watch": allowed = ["probes", "interval_ms"]
        case "status": allowed = []
        case "apply": allowed = ["set", "probes", "dry_run"]
        default:
            throw ProtocolError(.unknownOp, "unknown op '\(op)' (known: \(Request.ops.joined(separator: ", ")))")
        }
        for key in obj.keys where key != "op" && key != "id" && !allowed.contains(key) {
            throw ProtocolError(.invalidRequest, "op '\(op)' has no field '\(key)'")
        }
        let consumer = try optionalString(obj, "consumer")
        if let consumer, consumer.isEmpty || consumer.utf8.count > 256 {
            throw ProtocolError(.invalidRequest, "'consumer' must be 1 to 256 bytes")
        }
        switch op {
        case "register", "resolve":
            guard let list = obj["probes"]?.arrayValue else {
                throw ProtocolError(.invalidRequest, "'\(op)' needs 'probes': a list of probe specs")
            }
            guard !list.isEmpty else { throw ProtocolError(.invalidRequest, "'probes' is empty") }
            guard list.count <= limits.maxProbesPerRequest else {
                throw ProtocolError(.tooManyProbes,
                                    "\(list.count) probes in one request; the limit is \(limits.maxProbesPerRequest) (max_probes_per_request)")
            }
            let specs = try decodeSpecs(list)
            guard op == "register" else { return .resolve(probes: specs) }
            var form = RegisterReplyForm.auto
            if let v = obj["reply"], v != .null {
                guard let name = v.stringValue, let f = RegisterReplyForm(rawValue: name) else {
                    throw ProtocolError(.invalidRequest, "'reply' must be one of: \(RegisterReplyForm.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                form = f
            }
            return .register(probes: specs, consumer: consumer, reply: form)
        case "apply":
            guard let set = obj["set"]?.stringValue, !set.isEmpty else {
                throw ProtocolError(.invalidRequest, "'apply' needs 'set': the probe set's name")
            }
            guard let list = obj["probes"]?.arrayValue else {
                throw ProtocolError(.invalidRequest, "'apply' needs 'probes': the set's probe specs (an empty list removes the set)")
            }
            guard list.count <= limits.maxProbesPerRequest else {
                throw ProtocolError(.tooManyProbes,
                                    "\(list.count) probes in one set; the limit is \(limits.maxProbesPerRequest) (max_probes_per_request)")
            }
            var dryRun = false
            if let v = obj["dry_run"] {
                guard let b = v.boolValue else { throw ProtocolError(.invalidRequest, "'dry_run' must be a boolean") }
                dryRun = b
            }
            return .apply(set: set, probes: try decodeSpecs(list), dryRun: dryRun)
        case "unregister":
            let ids = try optionalIDs(obj)
            let match = try ProbeMatch.decode(obj)
            let selects = consumer != nil || !match.isEmpty
            guard (ids == nil) == selects else {
                throw ProtocolError(.invalidRequest,
                                    "'unregister' needs either 'probes' (a list of ids) or a selection ('consumer', 'path', 'symbol'), not both")
            }
            return .unregister(ids: ids, consumer: consumer, match: match)
        case "list":
            let ids = try optionalIDs(obj)
            let offset = try optionalCount(obj, "offset", max: Int(Int32.max)) ?? 0
            let limit = try optionalCount(obj, "limit", max: Int(Int32.max))
            return .list(consumer: consumer, query: ListQuery(ids: ids, match: try ProbeMatch.decode(obj), offset: offset, limit: limit))
        case "stats":
            var versions = false
            if let v = obj["versions"] {
                guard let b = v.boolValue else { throw ProtocolError(.invalidRequest, "'versions' must be a boolean") }
                versions = b
            }
            let ids = try optionalIDs(obj)
            if ids != nil && consumer != nil {
                throw ProtocolError(.invalidRequest, "'stats' takes 'probes' (a list of ids) or 'consumer', not both")
            }
            var query = StatsQuery(match: try ProbeMatch.decode(obj))
            if let v = obj["sort"], v != .null {
                guard let name = v.stringValue, let sort = StatsSort(rawValue: name) else {
                    throw ProtocolError(.invalidRequest, "'sort' must be one of: \(StatsSort.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                query.sort = sort
            }
            query.top = try optionalCount(obj, "top", max: Int(Int32.max))
            if query.top == 0 { throw ProtocolError(.invalidRequest, "'top' must be at least 1") }
            return .stats(ids: ids, versions: versions, consumer: consumer, query: query)
        case "watch":
            var interval = 1000
            if let v = obj["interval_ms"] {
                guard let i = v.int64Value, i >= Int64(limits.minWatchIntervalMs), i <= 3_600_000 else {
                    throw ProtocolError(.invalidRequest,
                                        "'interval_ms' must be an integer from \(limits.minWatchIntervalMs) to 3600000")
                }
                interval = Int(i)
            }
            return .watch(intervalMs: interval, ids: try optionalIDs(obj))
        default:
            return .status
        }
    }

    /// A `probes` list of specs; an error names the spec (`probe`: its index).
    private static func decodeSpecs(_ list: [JSONValue]) throws(ProtocolError) -> [ProbeSpec] {
        var specs: [ProbeSpec] = []
        specs.reserveCapacity(list.count)
        for (n, item) in list.enumerated() {
            do {
                specs.append(try ProbeSpec(json: item, context: "probes[\(n)]"))
            } catch {
                var e = error
                e.details["probe"] = .int(Int64(n))
                throw e
            }
        }
        return specs
    }

    private static func optionalString(_ obj: JSONObject, _ key: String) throws(ProtocolError) -> String? {
        switch obj[key] {
        case nil, .null?: return nil
        case .string(let s)?: return s
        case let other?: throw ProtocolError(.invalidRequest, "'\(key)' must be a string, got \(other.typeName)")
        }
    }

    /// A non-negative integer member up to `max`, or nil when absent.
    private static func optionalCount(_ obj: JSONObject, _ key: String, max: Int) throws(ProtocolError) -> Int? {
        switch obj[key] {
        case nil, .null?: return nil
        case let v?:
            guard let i = v.int64Value, i >= 0, i <= Int64(max) else {
                throw ProtocolError(.invalidRequest, "'\(key)' must be an integer from 0 to \(max)")
            }
            return Int(i)
        }
    }

    private static func optionalIDs(_ obj: JSONObject) throws(ProtocolError) -> [String]? {
        switch obj["probes"] {
        case nil, .null?: return nil
        case .array(let items)?:
            var ids: [String] = []
            for (n, item) in items.enumerated() {
                guard let s = item.stringValue else {
                    throw ProtocolError(.invalidRequest, "probes[\(n)] must be a probe id string, got \(item.typeName)")
                }
                ids.append(s)
            }
            return ids
        case let other?:
            throw ProtocolError(.invalidRequest, "'probes' must be a list of probe ids, got \(other.typeName)")
        }
    }
}

/// Builders for reply lines.
public enum Reply {
    /// `{"id": …, "ok": true, …payload}`
    public static func success(id: JSONValue?, _ payload: JSONObject = JSONObject()) -> JSONValue {
        var o = JSONObject()
        if let id { o["id"] = id }
        o["ok"] = true
        for p in payload.pairs { o[p.key] = p.value }
        return .object(o)
    }

    /// `{"id": …, "ok": false, "error": {"code": …, "message": …, …details}}`
    public static func failure(id: JSONValue?, _ error: ProtocolError) -> JSONValue {
        var e = JSONObject()
        e["code"] = .string(error.code.rawValue)
        e["message"] = .string(error.message)
        for p in error.details.pairs { e[p.key] = p.value }
        var o = JSONObject()
        if let id { o["id"] = id }
        o["ok"] = false
        o["error"] = .object(e)
        return .object(o)
    }
}
