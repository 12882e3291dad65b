import Foundation
import Testing
@testable import UprobedProtocol

struct JSONTests {
    @Test("round trip keeps integers, key order, escapes and unicode")
    func roundTrip() throws {
        let text = #"{"id":7,"op":"register","x":[1,-2,3.5,true,false,null,"a\"b\\c\n\u00e9\ud83d\ude00"],"big":18446744073709551615}"#
        let v = try JSONParser.parse(text)
        #expect(v.objectValue?["id"] == .int(7))
        #expect(v.objectValue?.keys == ["id", "op", "x", "big"])
        let again = try JSONParser.parse(JSONSerializer.serialize(v))
        #expect(again == v)
        #expect(v.objectValue?["x"]?.arrayValue?[6] == .string("a\"b\\c\né😀"))
    }

    @Test("the direct writer places commas and colons, escapes, and makes one line")
    func directWriter() throws {
        var w = JSONWriter()
        w.beginObject()
        w.field("id", "p1")
        w.key("empty")
        w.beginArray()
        w.endArray()
        w.key("list")
        w.beginArray()
        w.beginObject()
        w.endObject()
        w.beginObject()
        w.field("n", UInt64.max)
        w.field("neg", Int64(-12))
        w.field("rate", 1.5)
        w.field("whole", 3.0)
        w.field("nan", Double.nan)
        w.endObject()
        w.string("line\nbreak \"q\"")
        w.value(.object(["a": [1, 2], "b": .null]))
        w.endArray()
        w.field("ok", true)
        w.endObject()
        let line = w.line()
        #expect(line.last == 0x0A && line.dropLast().allSatisfy { $0 != 0x0A })
        #expect(String(decoding: line.dropLast(), as: UTF8.self) ==
            #"{"id":"p1","empty":[],"list":[{},{"n":18446744073709551615,"neg":-12,"rate":1.5,"whole":3,"nan":null},"line\nbreak \"q\"",{"a":[1,2],"b":null}],"ok":true}"#)
        let parsed = try JSONParser.parse(line.dropLast())
        #expect(parsed.objectValue?["list"]?.arrayValue?[2] == .string("line\nbreak \"q\""))
    }

    @Test("a document written in pieces around values written elsewhere is the document written at once")
    func piecesAndExternalValues() {
        let run = Array(#"{"a":1},{"b":2}"#.utf8), alone = Array(#""x""#.utf8)
        for (before, after) in [(false, false), (true, false), (false, true), (true, true)] {
            var pieces: [[UInt8]] = []
            var w = JSONWriter()
            var whole = JSONWriter()  // the same calls, not cut into pieces
            w.beginObject(); whole.beginObject()
            w.key("list"); whole.key("list")
            w.beginArray(); whole.beginArray()
            if before { w.int(0); whole.int(0) }
            w.externalValue(); pieces.append(w.flush()); pieces.append(run)
            run.withUnsafeBufferPointer { whole.rawValue($0) }
            w.externalValue(); pieces.append(w.flush()); pieces.append(alone)
            alone.withUnsafeBufferPointer { whole.rawValue($0) }
            if after { w.int(9); whole.int(9) }
            w.endArray(); whole.endArray()
            w.field("ok", true); whole.field("ok", true)
            w.endObject(); whole.endObject()
            pieces.append(w.line())
            #expect(Array(pieces.joined()) == whole.line(), "before \(before), after \(after)")
        }
    }

    @Test("whole numbers of every width, on both sides of each power of ten, signed and unsigned")
    func numberWidths() {
        var values: [UInt64] = [0, 1, 9, UInt64.max - 1, UInt64.max]
        var power: UInt64 = 10
        for _ in 1...19 {
            values += [power - 1, power, power + 1]
            guard power <= UInt64.max / 10 else { break }
            power *= 10
        }
        for v in values {
            var w = JSONWriter(reservingCapacity: 1)
            w.beginArray()
            w.uint(v)
            if v <= UInt64(Int64.max) { w.int(-Int64(v)) }
            w.endArray()
            let want = v <= UInt64(Int64.max) ? "[\(v),-\(v)]" : "[\(v)]"
            #expect(String(decoding: w.bytes, as: UTF8.self) == want.replacingOccurrences(of: "-0]", with: "0]"))
        }
        var w = JSONWriter()
        w.int(Int64.min)
        #expect(String(decoding: w.bytes, as: UTF8.self) == "\(Int64.min)")
    }

    @Test("the unchecked writer writes what the checked calls write, commas placed by the writer")
    func uncheckedEntries() throws {
        let rows: [(UInt64, UInt64, Double)] = [(0, 0, 0), (7, 12, 0.0005), (123_456, UInt64.max, 1e12), (10, 99, .nan), (1, 1, -2.25)]
        var checked = JSONWriter(), unchecked = JSONWriter(reservingCapacity: 1)  // the second grows from the smallest buffer
        checked.beginArray(); unchecked.beginArray()
        for (id, hits, rate) in rows {
            checked.beginObject()
            checked.key("id"); checked.string("p", number: id)
            checked.field("hits", hits)
            checked.key("rate"); checked.fixed(rate, decimals: 3)
            checked.endObject()
            unchecked.unchecked(maxBytes: 32 + 3 * JSONWriter.Unchecked.numberBytes) { t in
                t.literal("{\"id\":\"p"); t.digits(id)
                t.literal("\",\"hits\":"); t.digits(hits)
                t.literal(",\"rate\":"); t.fixed(rate, decimals: 3)
                t.literal("}")
            }
        }
        checked.endArray(); unchecked.endArray()
        #expect(unchecked.bytes == checked.bytes)
        let text = String(decoding: checked.bytes, as: UTF8.self)
        #expect(text == #"[{"id":"p0","hits":0,"rate":0},{"id":"p7","hits":12,"rate":0.001},{"id":"p123456","hits":18446744073709551615,"rate":1000000000000},{"id":"p10","hits":99,"rate":null},{"id":"p1","hits":1,"rate":-2.25}]"#)
    }

    @Test("fixed-point numbers are the same numbers as rounding then formatting the Double")
    func fixedPoint() throws {
        var cases: [Double] = [0, 3, 12.5, 0.05, 0.0004, 0.0005, 1.23456, -2.5, -0.0001, 999_999.9996, 1e12, 12345.678901, .nan, .infinity,
                               2.0005, 0.0015, 999_999_999_999.9995, 4_503_599_627.4995, -0.0005, 1e-300]
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {  // every magnitude from 10^-6 to 10^12 (where `double` takes over), both signs, and ties
            let d = Double.random(in: 1..<10, using: &generator) * pow(10, Double(Int.random(in: -6...11, using: &generator)))
            cases += [d, -d, (d * 1000).rounded(.down) / 1000 + 0.0005]
        }
        for d in cases {
            var w = JSONWriter(reservingCapacity: 1)  // grows from the smallest buffer
            w.beginArray()
            w.fixed(d, decimals: 3)
            w.endArray()
            let text = String(decoding: w.bytes, as: UTF8.self)
            var expected = JSONWriter()
            expected.beginArray()
            expected.double((d * 1000).rounded() / 1000)
            expected.endArray()
            let want = try JSONParser.parse(expected.bytes)
            #expect(try JSONParser.parse(text) == want, "\(d) → \(text)")
            // Plain decimals: no exponent, no trailing zeros after the point.
            if d.isFinite { #expect(!text.contains("e") && !(text.contains(".") && text.hasSuffix("0]")), "\(d) → \(text)") }
        }
        var w = JSONWriter()
        w.fixed(0.05, decimals: 3)
        #expect(String(decoding: w.bytes, as: UTF8.self) == "0.05")
    }

    @Test("long strings seen before are reused only for the same bytes: repeats, near misses, escapes, non-ASCII, more than the cache holds")
    func repeatedLongStrings() throws {
        let a = "/tmp/bench-batch-12345/many", b = "/tmp/bench-batch-12345/manx"  // same length, last byte differs
        let names = (0..<6).map { "/usr/lib/x86_64-linux-gnu/lib\($0).so" }   // more than the cache's slots
        let accented = "/opt/caf\u{e9}/bin/server-binary"
        var expected: [JSONValue] = []
        var text = "["
        func add(_ json: String, _ value: String) {
            if expected.count > 0 { text += "," }
            text += json
            expected.append(.string(value))
        }
        for round in 0..<3 {
            add("\"\(a)\"", a)
            add("\"\(b)\"", b)
            for n in names { add("\"\(n)\"", n) }
            add("\"\(accented)\"", accented)
            add(#""/tmp/bench-batch-12345/m\u0061ny""#, a)      // the same value written with an escape
            add("\"\(a.dropLast())\"", String(a.dropLast()))   // a prefix
            if round == 1 { add("\"short\"", "short") }
        }
        text += "]"
        let parsed = try JSONParser.parse(text)
        #expect(parsed == .array(expected))
    }

    @Test("object keys seen before are reused only for the same bytes: prefixes, escapes, non-ASCII, long keys, more than the cache holds")
    func repeatedObjectKeys() throws {
        // (as written in the document, as parsed)
        let keys: [(String, String)] = [("id", "id"), ("i", "i"), ("ids", "ids"), ("", ""), ("path", "path"),
            (#"pat\u0068"#, "path2"), ("caf\u{e9}", "caf\u{e9}"),
            ("a_key_longer_than_sixteen_bytes", "a_key_longer_than_sixteen_bytes")]
            + (0..<10).map { ("k\($0)", "k\($0)") }
        let text = "[" + (0..<3).map { round in
            "{" + keys.enumerated().map { n, k in
                // The escaped spelling of "path" gets a suffix so it is a key of its own.
                "\"\(k.0)\(k.0.hasPrefix("pat\\") ? "2" : "")\":\(n + round)"
            }.joined(separator: ",") + "}"
        }.joined(separator: ",") + "]"
        guard case .array(let items) = try JSONParser.parse(text) else { Issue.record("not an array"); return }
        #expect(items.count == 3)
        for (round, item) in items.enumerated() {
            let o = try #require(item.objectValue)
            #expect(o.keys == keys.map(\.1))
            for (n, k) in keys.enumerated() { #expect(o[k.1] == .int(Int64(n + round))) }
        }
    }

    @Test("a repeated key keeps its first position and takes the last value")
    func repeatedKeys() throws {
        let o = try #require(try JSONParser.parse(#"{"a":1,"b":2,"a":3}"#).objectValue)
        #expect(o.keys == ["a", "b"])
        #expect(o["a"] == .int(3) && o["b"] == .int(2))
        // Each object merges only its own keys, however deep it sits inside another that has
        // the same keys before it.
        let nested = try JSONParser.parse(#"{"a":0,"b":[{"a":{"a":1,"b":2,"a":3},"b":[1,[2]],"a":4}],"c":{}}"#)
        #expect(JSONSerializer.serialize(nested) == #"{"a":0,"b":[{"a":4,"b":[1,[2]]}],"c":{}}"#)
        let inner = try JSONParser.parse(#"{"a":0,"b":1,"x":{"b":2,"a":1,"a":2}}"#)
        #expect(JSONSerializer.serialize(inner) == #"{"a":0,"b":1,"x":{"b":2,"a":2}}"#)
        // Keys of one length are told apart by their text; long keys merge too.
        let long = "a_key_longer_than_sixteen_bytes"
        let same = try #require(try JSONParser.parse(#"{"ab":1,"ba":2,"é":3,"ab":4,"\#(long)":5,"\#(long)":6}"#).objectValue)
        #expect(same.keys == ["ab", "ba", "é", long])
        #expect(same["ab"] == .int(4) && same["ba"] == .int(2) && same["é"] == .int(3) && same[long] == .int(6))
    }

    @Test("integers at the edges serialize exactly")
    func integerEdges() throws {
        for i: Int64 in [0, 7, -1, -10, 1_000_000, Int64.max, Int64.min] {
            #expect(JSONSerializer.serialize(.int(i)) == String(i))
            #expect(try JSONParser.parse(JSONSerializer.serialize(.int(i))) == .int(i))
        }
    }

    @Test("malformed documents are rejected with a position", arguments: [
        "", "{", "{\"a\":}", "[1,]", "{\"a\" 1}", "tru", "01", "1.", "-", "\"\u{01}\"", "\"\\x\"", "\"\\ud800\"",
        "{} {}", "[" + String(repeating: "[", count: 100) + String(repeating: "]", count: 101),
    ])
    func rejects(_ text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(text) }
    }

    @Test("agrees with Foundation on random documents")
    func agreesWithFoundation() throws {
        var rng = SystemRandomNumberGenerator()
        func gen(_ depth: Int) -> JSONValue {
            switch Int.random(in: 0..<(depth > 3 ? 4 : 6), using: &rng) {
            case 0: return .int(Int64.random(in: -1_000_000...1_000_000, using: &rng))
            case 1: return .bool(Bool.random(using: &rng))
            case 2: return .string(String((0..<Int.random(in: 0..<8, using: &rng)).map { _ in "aé\"\\\n\t/😀z".randomElement(using: &rng)! }))
            case 3: return .null
            case 4: return .array((0..<Int.random(in: 0..<4, using: &rng)).map { _ in gen(depth + 1) })
            default:
                var o = JSONObject()
                for i in 0..<Int.random(in: 0..<4, using: &rng) { o["k\(i)"] = gen(depth + 1) }
                return .object(o)
            }
        }
        for _ in 0..<300 {
            let v = gen(0)
            let text = JSONSerializer.serialize(.array([v]))
            let ours = try JSONParser.parse(text)
            #expect(ours == .array([v]))
            let theirs = try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
            let back = try JSONSerialization.data(withJSONObject: theirs, options: [.fragmentsAllowed])
            #expect(try JSONParser.parse(Array(back)).arrayValue?.count == 1)
        }
    }
}

struct RequestDecodingTests {
    func fail(_ line: String) -> RequestDecodingFailure? {
        if case .failure(let f) = RequestDecoder.decode(Array(line.utf8)) { return f } else { return nil }
    }

    @Test func decodesRegister() throws {
        let line = #"{"op":"register","id":"a","consumer":"me","probes":[{"path":"/bin/x","symbol":"f*","pid":42,"retprobe":true},{"path":"libc","offset":"0x10"},{"path":"/usr/bin/python3","usdt":"python:function__entry"}]}"#
        guard case .success(let env) = RequestDecoder.decode(Array(line.utf8)) else { Issue.record("failed"); return }
        #expect(env.id == "a")
        guard case .register(let probes, let consumer, _) = env.request else { Issue.record("wrong op"); return }
        #expect(consumer == "me")
        #expect(probes[0] == ProbeSpec(path: "/bin/x", symbol: "f*", pid: 42, retprobe: true))
        #expect(probes[1].offset == 16)
        #expect(probes[2].usdt == "python:function__entry")
    }

    @Test func errorCodes() {
        #expect(fail("{")?.error.code == .invalidJSON)
        #expect(fail("{\"op\":\"nope\",\"id\":3}")?.error.code == .unknownOp)
        #expect(fail("{\"op\":\"nope\",\"id\":3}")?.id == .int(3))
        #expect(fail("{\"op\":\"status\",\"id\":[1]}")?.error.code == .invalidRequest)
        #expect(fail("{\"op\":\"status\",\"extra\":1}")?.error.code == .invalidRequest)
        #expect(fail("{\"op\":\"register\",\"probes\":[{\"path\":\"/x\",\"symbol\":\"a\",\"offset\":1}]}")?.error.code == .invalidRequest)
        #expect(fail("{\"op\":\"register\",\"probes\":[{\"path\":\"/x\",\"symbl\":\"a\"}]}")?.error.message.contains("symbl") == true)
        #expect(fail("{\"op\":\"register\",\"probes\":[{\"path\":\"/x\",\"symbol\":\"a\",\"pid\":-1}]}")?.error.details["probe"] == .int(0))
        #expect(fail("{\"op\":\"unregister\"}")?.error.code == .invalidRequest)
        #expect(fail("{\"op\":\"stats\",\"versions\":1}")?.error.code == .invalidRequest)
        if case .success(let env) = RequestDecoder.decode(Array("{\"op\":\"stats\",\"versions\":true}".utf8)) {
            #expect(env.request == .stats(ids: nil, versions: true))
        } else {
            Issue.record("stats with versions did not decode")
        }
        #expect(fail("{\"op\":\"watch\",\"interval_ms\":1}")?.error.code == .invalidRequest)
    }

    /// The spec decoder reads each member once: nulls count as absent, every type is checked,
    /// and each error names the spec (`probes[1]`) and the member.
    @Test func specMembers() throws {
        func spec(_ json: String) -> Result<ProbeSpec, ProtocolError> {
            let line = #"{"op":"register","probes":[{"path":"/x","symbol":"a"},"# + json + "]}"
            switch RequestDecoder.decode(Array(line.utf8)) {
            case .success(let env):
                guard case .register(let probes, _, _) = env.request, probes.count == 2 else { return .failure(ProtocolError(.internalError, "not a register")) }
                return .success(probes[1])
            case .failure(let f): return .failure(f.error)
            }
        }
        func message(_ json: String) -> String {
            if case .failure(let e) = spec(json) { return e.message } else { return "decoded" }
        }
        #expect(try spec(#"{"path":"/x","offset":"0X1f","pid":null,"usdt":null,"retprobe":false,"force":true,"follow":false}"#).get()
                == ProbeSpec(path: "/x", offset: 0x1f, force: true, follow: false))
        #expect(try spec(#"{"symbol":"f","path":"/x","pid":7.0}"#).get() == ProbeSpec(path: "/x", symbol: "f", pid: 7))
        #expect(message(#"{"path":"/x","symbol":"a","bogus":1}"#).hasPrefix("probes[1] has unknown field 'bogus'"))
        #expect(message(#"{"path":null,"symbol":"a"}"#) == "probes[1].path must be a non-empty string")
        #expect(message(#"{"symbol":"a"}"#) == "probes[1].path must be a non-empty string")
        #expect(message(#"{"path":"/x","symbol":1}"#) == "probes[1].symbol must be a string, got number")
        #expect(message(#"{"path":"/x","offset":-1}"#) == "probes[1].offset must be a non-negative integer, got number")
        #expect(message(#"{"path":"/x","offset":"12z"}"#) == "probes[1].offset '12z' is not a number (decimal or 0x-hex)")
        #expect(message(#"{"path":"/x","symbol":"a","retprobe":"yes"}"#) == "probes[1].retprobe must be a boolean, got string")
        #expect(message(#"{"path":"/x","symbol":"a","pid":0}"#) == "probes[1].pid must be a positive process id")
        #expect(message(#"{"path":"/x","symbol":"a","usdt":"p:n"}"#) == "probes[1] needs exactly one of 'symbol', 'offset' or 'usdt'")
        #expect(message(#"{"path":"/x"}"#) == "probes[1] needs exactly one of 'symbol', 'offset' or 'usdt'")
        #expect(message(#"{"path":"/x","symbol":""}"#) == "probes[1].symbol is empty")
        #expect(message(#"[1]"#) == "probes[1] must be an object, got array")
    }

    @Test("bpftrace spellings", arguments: [
        ("uprobe:/bin/bash:readline", ProbeSpec(path: "/bin/bash", symbol: "readline")),
        ("uretprobe:/bin/bash:readline", ProbeSpec(path: "/bin/bash", symbol: "readline", retprobe: true)),
        ("/bin/bash:readline", ProbeSpec(path: "/bin/bash", symbol: "readline")),
        ("libc:malloc", ProbeSpec(path: "libc", symbol: "malloc")),
        ("/bin/x:0x1f0", ProbeSpec(path: "/bin/x", offset: 0x1f0)),
        ("usdt:/usr/bin/python3:python:function__entry", ProbeSpec(path: "/usr/bin/python3", usdt: "python:function__entry")),
    ])
    func cliSpellings(_ text: String, _ expected: ProbeSpec) throws {
        #expect(try ProbeSpec(cliSpelling: text) == expected)
    }

    @Test func badCLISpellings() {
        for t in ["nocolon", "uprobe:/bin/x", "usdt:/bin/x:onlyone", "/bin/x:0xzz", ":f"] {
            #expect(throws: ProtocolError.self) { try ProbeSpec(cliSpelling: t) }
        }
    }
}

struct ErrorCodeCatalogTests {
    @Test("README's table of error codes lists exactly ErrorCode.all, each once")
    func readmeListsEveryCode() throws {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let readme = try String(contentsOf: repo.appendingPathComponent("README.md"), encoding: .utf8)
        let start = try #require(readme.range(of: "### Error codes"))
        let table = readme[start.upperBound...].split(separator: "\n").drop { !$0.hasPrefix("|") }.prefix { $0.hasPrefix("|") }
        // The second column's backticked snake_case words, skipping config keys named in parentheses.
        var listed: [String] = []
        for row in table.dropFirst(2) {
            let cells = row.split(separator: "|", omittingEmptySubsequences: false)
            guard cells.count > 2 else { continue }
            var text = String(cells[2])
            while let open = text.firstIndex(of: "("), let close = text[open...].firstIndex(of: ")") {
                text.removeSubrange(open...close)
            }
            for part in text.split(separator: "`").enumerated() where part.offset % 2 == 1 { listed.append(String(part.element)) }
        }
        #expect(listed == ErrorCode.all.map(\.rawValue), "README: \(listed)")
        #expect(Set(listed).count == listed.count)
        #expect(ErrorCode(rawValue: "symbol_not_found") == .symbolNotFound)
        #expect(ErrorCode(rawValue: "no_such_code") == nil)
    }
}

struct RequestEncodingTests {
    @Test("every request encodes to what the decoder reads back")
    func roundTrip() throws {
        let spec = ProbeSpec(path: "/usr/bin/bash", symbol: "readline", pid: 7, retprobe: true)
        let requests: [Request] = [
            .register(probes: [spec], consumer: "c"), .register(probes: [spec], consumer: nil),
            .resolve(probes: [spec]), .unregister(ids: ["p1", "p2"], consumer: nil), .unregister(ids: nil, consumer: "c"),
            .list(consumer: nil), .list(consumer: "c"), .stats(ids: nil, versions: true), .stats(ids: ["p3"], versions: false),
            .stats(ids: nil, versions: false, consumer: "c"), .watch(intervalMs: 250, ids: ["p1"]), .status,
            // Issue 26: reply forms, selections, paging, top.
            .register(probes: [spec], consumer: nil, reply: .compact), .register(probes: [spec], consumer: "c", reply: .full),
            .unregister(ids: nil, consumer: nil, match: ProbeMatch(path: "/usr/bin/*")),
            .unregister(ids: nil, consumer: "c", match: ProbeMatch(path: "bash", symbol: "read*")),
            .list(consumer: nil, query: ListQuery(ids: ["p1"], match: ProbeMatch(symbol: "x*"), offset: 10, limit: 5)),
            .stats(ids: nil, versions: false, consumer: nil, query: StatsQuery(match: ProbeMatch(path: "libc"), sort: .rate, top: 100)),
            .stats(ids: nil, versions: false, consumer: "c", query: StatsQuery(sort: .hits)),
            .apply(set: "alloc", probes: [ProbeSpec(path: "libc", symbol: "malloc")], dryRun: false),
            .apply(set: "alloc", probes: [], dryRun: true),
        ]
        for r in requests {
            let line = JSONSerializer.serializeLine(.object(r.json(id: .int(9))))
            guard case .success(let env) = RequestDecoder.decode(Array(line.dropLast())) else {
                Issue.record("\(r) did not decode: \(String(decoding: line, as: UTF8.self))")
                continue
            }
            #expect(env.request == r && env.id == .int(9))
        }
    }
}

struct ProbeQueryDecodingTests {
    @Test("selections, paging, top and reply forms: bad values are refused with invalid_request and name the member")
    func badValues() throws {
        let cases: [(String, String)] = [
            (#"{"op":"unregister"}"#, "selection"),
            (#"{"op":"unregister","probes":["p1"],"symbol":"f*"}"#, "not both"),
            (#"{"op":"unregister","path":""}"#, "'path'"),
            (#"{"op":"unregister","symbol":7}"#, "'symbol'"),
            (#"{"op":"stats","sort":"latency"}"#, "'sort'"),
            (#"{"op":"stats","top":0}"#, "'top'"),
            (#"{"op":"stats","top":1.5}"#, "'top'"),
            (#"{"op":"list","offset":-1}"#, "'offset'"),
            (#"{"op":"list","limit":"all"}"#, "'limit'"),
            (#"{"op":"list","sort":"hits"}"#, "no field 'sort'"),
            (#"{"op":"register","probes":[{"path":"/bin/sh","symbol":"main"}],"reply":"short"}"#, "'reply'"),
        ]
        for (line, mentions) in cases {
            guard case .failure(let f) = RequestDecoder.decode(Array(line.utf8)) else {
                Issue.record("\(line) decoded")
                continue
            }
            #expect(f.error.code == .invalidRequest, "\(line)")
            #expect(f.error.message.contains(mentions), "\(line): \(f.error.message)")
        }
    }

    @Test("auto replies are full up to 10,000 probes and compact above; explicit forms win")
    func replyForms() {
        #expect(!RegisterReplyForm.auto.isCompact(probes: 10_000))
        #expect(RegisterReplyForm.auto.isCompact(probes: 10_001))
        #expect(RegisterReplyForm.compact.isCompact(probes: 1))
        #expect(!RegisterReplyForm.full.isCompact(probes: 241_363))
        #expect(StatsQuery(top: 5).effectiveSort == .hits && StatsQuery().effectiveSort == .id)
    }
}

struct RepeatedKeyTests {
    @Test("keys are the same when their UTF-8 is (RFC 8259 §8.3), not when they are canonically equivalent")
    func keysCompareByBytes() throws {
        for text in [#"{"a\u0301\u0323":1,"a\u0323\u0301":2}"#, #"{"\u00e9":1,"e\u0301":2}"#] {
            let o = try #require(try JSONParser.parse(text).objectValue)
            #expect(o.count == 2, "\(text)")
        }
        let same = try #require(try JSONParser.parse(#"{"k":1,"k":2}"#).objectValue)
        #expect(same.count == 1 && same["k"] == .int(2))
    }
}
