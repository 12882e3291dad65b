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
    /// Measure each call from entry to return (calls, returns, in flight, a histogram of
    /// durations) instead of counting entries.
    public var latency: Bool

    public init(path: String, symbol: String? = nil, offset: UInt64? = nil, usdt: String? = nil,
                pid: Int32? = nil, retprobe: Bool = false, force: Bool = false, follow: Bool = true,
                latency: Bool = false) {
        self.follow = follow
        self.latency = latency
        self.path = path
        self.symbol = symbol
        self.offset = offset
        self.usdt = usdt
        self.pid = pid
        self.retprobe = retprobe
        self.force = force
    }

    static let knownKeys: Set<String> = ["path", "symbol", "offset", "usdt", "pid", "retprobe", "force", "follow", "latency"]

    /// Decodes a spec object; `context` names it in errors (e.g. `probes[3]`) and is only
    /// made when there is one (a 10,000-probe request formatted 10,000 unused names).
    /// One pass over the members: the request decode spent half its time looking each known
    /// key up again in every spec.
    public init(json: JSONValue, context: @autoclosure () -> String) throws(ProtocolError) {
        guard case .object(let obj) = json else {
            throw ProtocolError(.invalidRequest, "\(context()) must be an object, got \(json.typeName)")
        }
        func mistyped(_ key: String, _ wanted: String, _ got: JSONValue) -> ProtocolError {
            ProtocolError(.invalidRequest, "\(context()).\(key) must be \(wanted), got \(got.typeName)")
        }
        var path: String?
        var symbol: String?
        var usdt: String?
        var offset: UInt64?
        var pid: Int32?
        var retprobe = false, force = false, follow = true, latency = false
        for member in obj.pairs {
            let (key, value) = (member.key, member.value)
            if case .null = value, key != "path" { continue }  // an explicit null is an absent member
            switch key {
            case "path":
                guard case .string(let s) = value, !s.isEmpty else {
                    throw ProtocolError(.invalidRequest, "\(context()).path must be a non-empty string")
                }
                path = s
            case "symbol":
                guard case .string(let s) = value else { throw mistyped(key, "a string", value) }
                symbol = s
            case "usdt":
                guard case .string(let s) = value else { throw mistyped(key, "a string", value) }
                usdt = s
            case "offset":
                switch value {
                case .int(let i) where i >= 0: offset = UInt64(i)
                case .string(let s):
                    let parsed = s.hasPrefix("0x") || s.hasPrefix("0X") ? UInt64(s.dropFirst(2), radix: 16) : UInt64(s)
                    guard let parsed else {
                        throw ProtocolError(.invalidRequest, "\(context()).offset '\(s)' is not a number (decimal or 0x-hex)")
                    }
                    offset = parsed
                default: throw mistyped(key, "a non-negative integer", value)
                }
            case "pid":
                guard let p = value.int64Value, p > 0, p <= Int64(Int32.max) else {
                    throw ProtocolError(.invalidRequest, "\(context()).pid must be a positive process id")
                }
                pid = Int32(p)
            case "retprobe", "force", "follow", "latency":
                guard case .bool(let b) = value else { throw mistyped(key, "a boolean", value) }
                switch key {
                case "retprobe": retprobe = b
                case "force": force = b
                case "latency": latency = b
                default: follow = b
                }
            default:
                throw ProtocolError(.invalidRequest,
                                    "\(context()) has unknown field '\(key)' (known: \(Self.knownKeys.sorted().joined(separator: ", ")))")
            }
        }
        guard let path else { throw ProtocolError(.invalidRequest, "\(context()).path must be a non-empty string") }
        let kinds = (symbol != nil ? 1 : 0) + (offset != nil ? 1 : 0) + (usdt != nil ? 1 : 0)
        guard kinds == 1 else {
            throw ProtocolError(.invalidRequest, "\(context()) needs exactly one of 'symbol', 'offset' or 'usdt'")
        }
        if let s = symbol, s.isEmpty { throw ProtocolError(.invalidRequest, "\(context()).symbol is empty") }
        if let u = usdt, u.isEmpty { throw ProtocolError(.invalidRequest, "\(context()).usdt is empty") }
        if latency && retprobe {
            throw ProtocolError(.invalidRequest, "\(context()) cannot be both 'latency' and 'retprobe': a latency probe already sees each call's return")
        }
        if latency && usdt != nil {
            throw ProtocolError(.invalidRequest, "\(context()) cannot be 'latency' on a USDT probe: a USDT note is a point, not a function with a return")
        }
        self.init(path: path, symbol: symbol, offset: offset, usdt: usdt, pid: pid, retprobe: retprobe, force: force, follow: follow,
                  latency: latency)
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
        if latency { m.append(("latency", true)) }
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
