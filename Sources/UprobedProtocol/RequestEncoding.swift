extension Request {
    /// The request as it goes on the wire (the inverse of `RequestDecoder`): what a client
    /// sends, so that the field names are spelled here once, next to their decoder.
    public func json(id: JSONValue? = nil) -> JSONObject {
        var o: JSONObject = ["op": .string(op)]
        if let id { o["id"] = id }
        func ids(_ list: [String]?) { if let list { o["probes"] = .array(list.map { .string($0) }) } }
        func consumer(_ name: String?) { if let name { o["consumer"] = .string(name) } }
        switch self {
        case .register(let probes, let c):
            o["probes"] = .array(probes.map(\.json))
            consumer(c)
        case .resolve(let probes):
            o["probes"] = .array(probes.map(\.json))
        case .unregister(let list, let c):
            ids(list)
            consumer(c)
        case .list(let c):
            consumer(c)
        case .stats(let list, let versions, let c):
            ids(list)
            if versions { o["versions"] = .bool(true) }
            consumer(c)
        case .watch(let interval, let list):
            o["interval_ms"] = .int(Int64(interval))
            ids(list)
        case .status:
            break
        case .apply(let set, let probes, let dryRun):
            o["set"] = .string(set)
            o["probes"] = .array(probes.map(\.json))
            if dryRun { o["dry_run"] = .bool(true) }
        }
        return o
    }
}
