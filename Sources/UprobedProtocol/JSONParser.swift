#if canImport(Glibc)
import Glibc
#endif
/// A strict RFC 8259 parser for one request line.
///
/// Written by hand rather than going through Foundation because the daemon needs three things
/// JSONSerialization does not give: integers that stay integers (ids, offsets up to 2^64-1),
/// booleans that are not numbers, and a hard nesting limit so a hostile line cannot exhaust the
/// stack. It is also several times faster on the 0.6 MB lines of a 10,000-probe request.
public struct JSONParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public let byteOffset: Int
    public var description: String { "\(message) at byte \(byteOffset)" }
}

public enum JSONParser {
    public static let maxDepth = 64

    /// Parses exactly one JSON value; surrounding whitespace is allowed, anything else is an error.
    public static func parse(_ bytes: some Collection<UInt8>) throws(JSONParseError) -> JSONValue {
        let array = Array(bytes)
        return try array.withUnsafeBufferPointer { (buf) throws(JSONParseError) -> JSONValue in
            var p = Cursor(buf: buf)
            p.skipWhitespace()
            let v = try p.value(depth: 0)
            p.skipWhitespace()
            if p.i != buf.count { throw p.fail("unexpected data after the JSON value") }
            return v
        }
    }

    public static func parse(_ string: String) throws(JSONParseError) -> JSONValue {
        try parse(Array(string.utf8))
    }

    private struct Cursor {
        let buf: UnsafeBufferPointer<UInt8>
        var i = 0
        /// The last few long strings made, by where their text is in `buf`: a 10,000-probe
        /// reply repeats one path and one build id in every entry, and a string found here is
        /// neither validated nor allocated again.
        var recent: [SeenString] = []
        var nextRecent = 0
        /// Object keys, which repeat in every entry of a list: a short key found here by its
        /// bytes is not made again (making a small String costs more than comparing its bytes).
        var keys: [SeenString] = []
        static let keySlots = 8
        static let recentSlots = 4
        static let recentMinimum = 16
        /// The members of the objects and arrays being parsed, innermost last. Each container is
        /// copied out at its exact size when it closes: grown in place, a 10,000-entry reply's
        /// 5-key objects took 1, 2, 4 then 8 pairs' room each, and freeing that much memory made
        /// glibc hand it back to the kernel, so the next parse page-faulted it in again.
        var pairStack: [JSONMember] = []
        var itemStack: [JSONValue] = []

        struct SeenString {
            var start: Int
            var count: Int
            var value: String
        }

        func fail(_ message: String) -> JSONParseError { JSONParseError(message: message, byteOffset: i) }

        mutating func skipWhitespace() {
            while i < buf.count {
                switch buf[i] {
                case 0x20, 0x09, 0x0A, 0x0D: i += 1
                default: return
                }
            }
        }

        mutating func value(depth: Int) throws(JSONParseError) -> JSONValue {
            guard depth < JSONParser.maxDepth else { throw fail("nesting deeper than \(JSONParser.maxDepth)") }
            guard i < buf.count else { throw fail("unexpected end of input") }
            switch buf[i] {
            case UInt8(ascii: "{"): return try object(depth: depth)
            case UInt8(ascii: "["): return try array(depth: depth)
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): try literal("true"); return .bool(true)
            case UInt8(ascii: "f"): try literal("false"); return .bool(false)
            case UInt8(ascii: "n"): try literal("null"); return .null
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
            default: throw fail("unexpected character '\(Unicode.Scalar(buf[i]))'")
            }
        }

        mutating func literal(_ word: String) throws(JSONParseError) {
            for c in word.utf8 {
                guard i < buf.count, buf[i] == c else { throw fail("invalid literal") }
                i += 1
            }
        }

        mutating func object(depth: Int) throws(JSONParseError) -> JSONValue {
            i += 1
            skipWhitespace()
            if i < buf.count, buf[i] == UInt8(ascii: "}") { i += 1; return .object(JSONObject()) }
            let base = pairStack.count
            while true {
                skipWhitespace()
                guard i < buf.count, buf[i] == UInt8(ascii: "\"") else { throw fail("expected a string key") }
                let key = try self.key()
                skipWhitespace()
                guard i < buf.count, buf[i] == UInt8(ascii: ":") else { throw fail("expected ':'") }
                i += 1
                skipWhitespace()
                let v = try value(depth: depth + 1)
                // A repeated key keeps its first place and takes the last value (as `JSONObject`'s setter).
                // The same key is the same UTF-8 (RFC 8259 §8.3). Not String's ==, canonical equivalence:
                // behind the length test it would merge "a\u0301\u0323" with "a\u0323\u0301" (equal
                // lengths) yet not "\u00e9" with "e\u0301". Lengths first: small strings keep theirs
                // inline, and most keys differ in it.
                let length = key.utf8.count
                if let k = pairStack[base...].lastIndex(where: { $0.key.utf8.count == length && $0.key.utf8.elementsEqual(key.utf8) }) {
                    pairStack[k].value = v
                } else {
                    pairStack.append(JSONMember(key, v))
                }
                skipWhitespace()
                guard i < buf.count else { throw fail("unterminated object") }
                if buf[i] == UInt8(ascii: ",") { i += 1; continue }
                if buf[i] == UInt8(ascii: "}") {
                    i += 1
                    let obj = JSONObject(pairs: Array(pairStack[base...]))
                    pairStack.removeSubrange(base...)
                    return .object(obj)
                }
                throw fail("expected ',' or '}'")
            }
        }

        mutating func array(depth: Int) throws(JSONParseError) -> JSONValue {
            i += 1
            skipWhitespace()
            if i < buf.count, buf[i] == UInt8(ascii: "]") { i += 1; return .array([]) }
            let base = itemStack.count
            while true {
                skipWhitespace()
                itemStack.append(try value(depth: depth + 1))
                skipWhitespace()
                guard i < buf.count else { throw fail("unterminated array") }
                if buf[i] == UInt8(ascii: ",") { i += 1; continue }
                if buf[i] == UInt8(ascii: "]") {
                    i += 1
                    let items = Array(itemStack[base...])
                    itemStack.removeSubrange(base...)
                    return .array(items)
                }
                throw fail("expected ',' or ']'")
            }
        }

        mutating func hex4() throws(JSONParseError) -> UInt32 {
            guard i + 4 <= buf.count else { throw fail("truncated \\u escape") }
            var v: UInt32 = 0
            for _ in 0..<4 {
                let c = buf[i]
                let d: UInt32
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - UInt8(ascii: "A") + 10)
                default: throw fail("invalid \\u escape")
                }
                v = v << 4 | d
                i += 1
            }
            return v
        }

        /// An object key: `string()`, through `keys` for a short key without escapes.
        mutating func key() throws(JSONParseError) -> String {
            let start = i + 1
            var end = start
            while end < buf.count, end - start < Self.recentMinimum {
                let c = buf[end]
                if c == UInt8(ascii: "\"") { break }
                if c == UInt8(ascii: "\\") || c < 0x20 || c >= 0x80 { return try string() }
                end += 1
            }
            guard end < buf.count, buf[end] == UInt8(ascii: "\""), let base = buf.baseAddress else { return try string() }
            let count = end - start
            for k in keys where k.count == count && base[k.start] == base[start] && memcmp(base + k.start, base + start, count) == 0 {
                i = end + 1
                return k.value
            }
            let s = try string()
            if keys.count < Self.keySlots { keys.append(SeenString(start: start, count: count, value: s)) }
            return s
        }

        mutating func string() throws(JSONParseError) -> String {
            i += 1  // opening quote
            let start = i
            // A long string seen before ends where its text ends: compare before scanning. Its
            // text holds no quote or backslash (only strings without escapes are kept).
            if let base = buf.baseAddress {
                for r in recent where start + r.count < buf.count && buf[start + r.count] == UInt8(ascii: "\"")
                    && memcmp(base + r.start, base + start, r.count) == 0 {
                    i = start + r.count + 1
                    return r.value
                }
            }
            // Fast path: no escapes.
            var ascii = true
            while i < buf.count {
                let c = buf[i]
                if c == UInt8(ascii: "\"") {
                    let count = i - start
                    let bytes = UnsafeBufferPointer(rebasing: buf[start..<i])
                    // ASCII needs no validation, and `String(decoding:)` on a buffer is specialized;
                    // the generic validating initializer spent most of its time in metadata lookups.
                    let s = ascii ? String(decoding: bytes, as: UTF8.self) : String(validating: bytes, as: UTF8.self)
                    guard let s else { throw fail("invalid UTF-8 in string") }
                    if count >= Self.recentMinimum {
                        let seen = SeenString(start: start, count: count, value: s)
                        if recent.count < Self.recentSlots { recent.append(seen) } else {
                            recent[nextRecent] = seen
                            nextRecent = (nextRecent + 1) % Self.recentSlots
                        }
                    }
                    i += 1
                    return s
                }
                if c == UInt8(ascii: "\\") { break }
                if c < 0x20 { throw fail("control character in string") }
                if c >= 0x80 { ascii = false }
                i += 1
            }
            var out: [UInt8] = Array(buf[start..<i])
            while true {
                guard i < buf.count else { throw fail("unterminated string") }
                let c = buf[i]
                if c == UInt8(ascii: "\"") { i += 1; break }
                if c < 0x20 { throw fail("control character in string") }
                if c != UInt8(ascii: "\\") { out.append(c); i += 1; continue }
                i += 1
                guard i < buf.count else { throw fail("unterminated escape") }
                let e = buf[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800...0xDBFF).contains(scalar) {
                        guard i + 1 < buf.count, buf[i] == UInt8(ascii: "\\"), buf[i + 1] == UInt8(ascii: "u") else {
                            throw fail("unpaired surrogate")
                        }
                        i += 2
                        let low = try hex4()
                        guard (0xDC00...0xDFFF).contains(low) else { throw fail("unpaired surrogate") }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(scalar) {
                        throw fail("unpaired surrogate")
                    }
                    guard let u = Unicode.Scalar(scalar) else { throw fail("invalid code point") }
                    out.append(contentsOf: Array(String(Character(u)).utf8))
                default: throw fail("invalid escape")
                }
            }
            guard let s = String(validating: out, as: UTF8.self) else { throw fail("invalid UTF-8 in string") }
            return s
        }

        mutating func number() throws(JSONParseError) -> JSONValue {
            let start = i
            var isInteger = true
            if buf[i] == UInt8(ascii: "-") { i += 1 }
            guard i < buf.count else { throw fail("truncated number") }
            if buf[i] == UInt8(ascii: "0") {
                i += 1
            } else if (UInt8(ascii: "1")...UInt8(ascii: "9")).contains(buf[i]) {
                while i < buf.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(buf[i]) { i += 1 }
            } else {
                throw fail("invalid number")
            }
            if i < buf.count, buf[i] == UInt8(ascii: ".") {
                isInteger = false
                i += 1
                let d = i
                while i < buf.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(buf[i]) { i += 1 }
                if i == d { throw fail("invalid number") }
            }
            if i < buf.count, buf[i] == UInt8(ascii: "e") || buf[i] == UInt8(ascii: "E") {
                isInteger = false
                i += 1
                if i < buf.count, buf[i] == UInt8(ascii: "+") || buf[i] == UInt8(ascii: "-") { i += 1 }
                let d = i
                while i < buf.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(buf[i]) { i += 1 }
                if i == d { throw fail("invalid number") }
            }
            if isInteger, i - start <= 18 {
                // Up to 18 digits cannot overflow Int64: accumulate without making a String.
                var v: Int64 = 0
                let negative = buf[start] == UInt8(ascii: "-")
                for k in (negative ? start + 1 : start)..<i { v = v * 10 + Int64(buf[k] - UInt8(ascii: "0")) }
                return .int(negative ? -v : v)
            }
            let text = String(decoding: UnsafeBufferPointer(rebasing: buf[start..<i]), as: UTF8.self)
            if isInteger, let v = Int64(text) { return .int(v) }
            // Offsets can exceed Int64.max only in theory; keep them exact when they fit UInt64.
            if isInteger, let u = UInt64(text) { return .double(Double(u)) }
            guard let d = Double(text), d.isFinite else { throw fail("number out of range") }
            return .double(d)
        }
    }
}
