/// One probe as a client asks for it (DESIGN.md, "probe spec").
///
/// Exactly one of `symbol`, `offset` and `usdt` is set. `path` is an absolute path or a
/// library name (`libc`, `libc.so.6`).
public struct ProbeSpec: Sendable, Hashable {
    public var path: String
    public var symbol: String?
    public var offset: UInt64?
    public var usdt: String?
    public var pid: Int32?
    public var retprobe: Bool
    public var force: Bool
    /// Follow the path through replacements of its file (default); false pins the probe to
    /// the inode it was registered on.
    public var follow: Bool

    public init(path: String, symbol: String? = nil, offset: UInt64? = nil, usdt: String? = nil,
                pid: Int32? = nil, retprobe: Bool = false, force: Bool = false, follow: Bool = true) {
        self.follow = follow
        self.path = path
        self.symbol = symbol
        self.offset = offset
        self.usdt = usdt
        self.pid = pid
        self.retprobe = retprobe
        self.force = force
    }

    static let knownKeys: Set<String> = ["path", "symbol", "offset", "usdt", "pid", "retprobe", "force", "follow"]

    /// Decodes a spec object; `context` names it in errors (e.g. `probes[3]`).
    public init(json: JSONValue, context: String) throws(ProtocolError) {
        guard let obj = json.objectValue else {
            throw ProtocolError(.invalidRequest, "\(context) must be an object, got \(json.typeName)")
        }
        for key in obj.keys where !Self.knownKeys.contains(key) {
            throw ProtocolError(.invalidRequest,
                                "\(context) has unknown field '\(key)' (known: \(Self.knownKeys.sorted().joined(separator: ", ")))")
        }
        guard let path = obj["path"]?.stringValue, !path.isEmpty else {
            throw ProtocolError(.invalidRequest, "\(context).path must be a non-empty string")
        }
        self.path = path
        self.symbol = try Self.optionalString(obj, "symbol", context)
        self.usdt = try Self.optionalString(obj, "usdt", context)
        switch obj["offset"] {
        case nil, .null?: self.offset = nil
        case .int(let i)? where i >= 0: self.offset = UInt64(i)
        case .string(let s)?:
            let parsed = s.hasPrefix("0x") || s.hasPrefix("0X") ? UInt64(s.dropFirst(2), radix: 16) : UInt64(s)
            guard let parsed else {
                throw ProtocolError(.invalidRequest, "\(context).offset '\(s)' is not a number (decimal or 0x-hex)")
            }
            self.offset = parsed
        case let other?:
            throw ProtocolError(.invalidRequest, "\(context).offset must be a non-negative integer, got \(other.typeName)")
        }
        let kinds = [symbol != nil, offset != nil, usdt != nil].filter { $0 }.count
        guard kinds == 1 else {
            throw ProtocolError(.invalidRequest, "\(context) needs exactly one of 'symbol', 'offset' or 'usdt'")
        }
        if let s = symbol, s.isEmpty { throw ProtocolError(.invalidRequest, "\(context).symbol is empty") }
        if let u = usdt, u.isEmpty { throw ProtocolError(.invalidRequest, "\(context).usdt is empty") }
        switch obj["pid"] {
        case nil, .null?: self.pid = nil
        case let v?:
            guard let p = v.int64Value, p > 0, p <= Int64(Int32.max) else {
                throw ProtocolError(.invalidRequest, "\(context).pid must be a positive process id")
            }
            self.pid = Int32(p)
        }
        self.retprobe = try Self.optionalBool(obj, "retprobe", context) ?? false
        self.force = try Self.optionalBool(obj, "force", context) ?? false
        self.follow = try Self.optionalBool(obj, "follow", context) ?? true
    }

    private static func optionalString(_ obj: JSONObject, _ key: String, _ context: String) throws(ProtocolError) -> String? {
        switch obj[key] {
        case nil, .null?: return nil
        case .string(let s)?: return s
        case let other?: throw ProtocolError(.invalidRequest, "\(context).\(key) must be a string, got \(other.typeName)")
        }
    }

    private static func optionalBool(_ obj: JSONObject, _ key: String, _ context: String) throws(ProtocolError) -> Bool? {
        switch obj[key] {
        case nil, .null?: return nil
        case .bool(let b)?: return b
        case let other?: throw ProtocolError(.invalidRequest, "\(context).\(key) must be a boolean, got \(other.typeName)")
        }
    }

    /// The spec as it goes on the wire (also how `list` shows it).
    public var json: JSONValue {
        var o = JSONObject()
        for (key, value) in members { o["\(key)"] = value }
        return .object(o)
    }

    /// Writes the spec as an object (same members as `json`, without building it).
    public func write(into w: inout JSONWriter) {
        w.beginObject()
        for (key, value) in members { w.field(key, value) }
        w.endObject()
    }

    /// The spec's members in wire order; defaults (no retprobe, no force, follow) are left out.
    private var members: [(StaticString, JSONValue)] {
        var m: [(StaticString, JSONValue)] = [("path", .string(path))]
        if let symbol { m.append(("symbol", .string(symbol))) }
        if let offset { m.append(("offset", JSONValue(offset))) }
        if let usdt { m.append(("usdt", .string(usdt))) }
        if let pid { m.append(("pid", .int(Int64(pid)))) }
        if retprobe { m.append(("retprobe", true)) }
        if force { m.append(("force", true)) }
        if !follow { m.append(("follow", false)) }
        return m
    }
}

extension ProbeSpec {
    /// Parses the command-line spellings `uprobectl` accepts:
    /// - `PATH:SYMBOL` or `PATH:0xOFFSET` (PATH may be a library name such as `libc`)
    /// - bpftrace's `uprobe:PATH:SYMBOL`, `uretprobe:PATH:SYMBOL`, `usdt:PATH:PROVIDER:NAME`
    ///   (and the short forms `u:`, `ur:`, `U:`).
    public init(cliSpelling text: String) throws(ProtocolError) {
        var parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        var retprobe = false
        var isUSDT = false
        switch parts.first {
        case "uprobe", "u": parts.removeFirst()
        case "uretprobe", "ur": parts.removeFirst(); retprobe = true
        case "usdt", "U": parts.removeFirst(); isUSDT = true
        default: break
        }
        func bad(_ why: String) -> ProtocolError {
            ProtocolError(.invalidRequest,
                          "cannot parse probe '\(text)': \(why); expected PATH:SYMBOL, uprobe:PATH:SYMBOL, uretprobe:PATH:SYMBOL or usdt:PATH:PROVIDER:NAME")
        }
        if isUSDT {
            guard parts.count == 3, parts.allSatisfy({ !$0.isEmpty }) else { throw bad("a USDT probe needs PATH:PROVIDER:NAME") }
            self.init(path: parts[0], usdt: parts[1] + ":" + parts[2])
            return
        }
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { throw bad("missing PATH or SYMBOL") }
        let target = parts[1]
        if target.hasPrefix("0x") || target.hasPrefix("0X") {
            guard let off = UInt64(target.dropFirst(2), radix: 16) else { throw bad("'\(target)' is not a hex offset") }
            self.init(path: parts[0], offset: off, retprobe: retprobe)
        } else {
            self.init(path: parts[0], symbol: target, retprobe: retprobe)
        }
    }
}
