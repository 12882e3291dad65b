extension Request {
    /// The request as it goes on the wire (the inverse of `RequestDecoder`): what a client
    /// sends, so that the field names are spelled here once, next to their decoder.
    public func json(id: JSONValue? = nil) -> JSONObject {
        var o: JSONObject = ["op": .string(op)]
        if let id { o["id"] = id }
        func ids(_ list: [String]?) { if let list { o["probes"] = .array(list.map { .string($0) }) } }
        func consumer(_ name: String?) { if let name { o["consumer"] = .string(name) } }
        switch self {
        case .register(let probes, let c, let form):
            o["probes"] = .array(probes.map(\.json))
            consumer(c)
            if form != .auto { o["reply"] = .string(form.rawValue) }
        case .resolve(let probes):
            o["probes"] = .array(probes.map(\.json))
        case .unregister(let list, let c, let match):
            ids(list)
            consumer(c)
            match.encode(into: &o)
        case .list(let c, let query):
            consumer(c)
            ids(query.ids)
            query.match.encode(into: &o)
            if query.offset > 0 { o["offset"] = .int(Int64(query.offset)) }
            if let limit = query.limit { o["limit"] = .int(Int64(limit)) }
        case .stats(let list, let versions, let c, let query):
            ids(list)
            if versions { o["versions"] = .bool(true) }
            consumer(c)
            query.match.encode(into: &o)
            if let sort = query.sort { o["sort"] = .string(sort.rawValue) }
            if let top = query.top { o["top"] = .int(Int64(top)) }
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
