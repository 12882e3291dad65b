/// Writes compact JSON text straight into bytes, without building a `JSONValue` tree first.
///
/// The daemon's large outputs — a 10,000-probe register reply, `stats` of every probe, the
/// state log line of a big batch — are made of thousands of small objects; building each as a
/// `JSONObject` (an array of pairs) and then walking it cost more than the rest of the request.
/// `JSONSerializer` uses this writer too, so escaping and number formatting exist once.
///
/// Commas and colons are placed by the writer: call `key` before each member of an object and
/// nothing between array elements. Control characters in strings are escaped, so the output
/// never contains a newline and can be sent as one line. Nesting is tracked to depth 64 (the
/// parser's limit).
public struct JSONWriter {
    public private(set) var bytes: [UInt8]
    /// Bit n set: the container at depth n already has a member (the next one needs a comma).
    private var hasMember: UInt64 = 0
    private var depth = 0
    /// A key was just written: the value follows without a comma.
    private var afterKey = false

    public init(reservingCapacity capacity: Int = 256) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    /// Ends the text with a newline and returns it: one protocol line. Write nothing after.
    public mutating func line() -> [UInt8] {
        bytes.append(0x0A)
        return bytes
    }

    /// The text written so far.

    // MARK: - structure

    public mutating func beginObject() {
        separate()
        bytes.append(UInt8(ascii: "{"))
        push()
    }

    public mutating func endObject() {
        pop()
        bytes.append(UInt8(ascii: "}"))
    }

    public mutating func beginArray() {
        separate()
        bytes.append(UInt8(ascii: "["))
        push()
    }

    public mutating func endArray() {
        pop()
        bytes.append(UInt8(ascii: "]"))
    }

    /// An object member's key; the next value written is its value.
    public mutating func key(_ k: String) {
        separate()
        writeStringBody(k)
        bytes.append(UInt8(ascii: ":"))
        afterKey = true
    }

    // MARK: - scalars

    public mutating func string(_ s: String) {
        separate()
        writeStringBody(s)
    }

    public mutating func int(_ v: Int64) {
        separate()
        writeDigits(v.magnitude, negative: v < 0)
    }

    /// Exact up to 2^64-1 (offsets, counters).
    public mutating func uint(_ v: UInt64) {
        separate()
        writeDigits(v, negative: false)
    }

    public mutating func bool(_ b: Bool) {
        separate()
        bytes.append(contentsOf: (b ? "true" : "false").utf8)
    }

    public mutating func null() {
        separate()
        bytes.append(contentsOf: "null".utf8)
    }

    /// Whole numbers as integers; NaN and infinities (which JSON lacks) as null.
    public mutating func double(_ d: Double) {
        separate()
        guard d.isFinite else { bytes.append(contentsOf: "null".utf8); return }
        if d.rounded() == d, abs(d) < 1e18 {
            let i = Int64(d)
            writeDigits(i.magnitude, negative: i < 0)
        } else {
            bytes.append(contentsOf: d.description.utf8)
        }
    }

    /// Any `JSONValue` (trees built elsewhere, request ids echoed back).
    public mutating func value(_ v: JSONValue) {
        switch v {
        case .null: null()
        case .bool(let b): bool(b)
        case .int(let i): int(i)
        case .double(let d): double(d)
        case .string(let s): string(s)
        case .array(let items):
            beginArray()
            for item in items { value(item) }
            endArray()
        case .object(let o):
            beginObject()
            for p in o.pairs {
                key(p.key)
                value(p.value)
            }
            endObject()
        }
    }

    // MARK: - members, for brevity at call sites

    public mutating func field(_ k: String, _ s: String) { key(k); string(s) }
    public mutating func field(_ k: String, _ v: Int64) { key(k); int(v) }
    public mutating func field(_ k: String, _ v: UInt64) { key(k); uint(v) }
    public mutating func field(_ k: String, _ v: Double) { key(k); double(v) }
    public mutating func field(_ k: String, _ v: Bool) { key(k); bool(v) }
    public mutating func field(_ k: String, _ v: JSONValue) { key(k); value(v) }

    // MARK: - internals

    private mutating func separate() {
        if afterKey { afterKey = false; return }
        guard depth > 0 else { return }
        let bit: UInt64 = 1 << UInt64((depth - 1) & 63)
        if hasMember & bit != 0 { bytes.append(UInt8(ascii: ",")) } else { hasMember |= bit }
    }

    private mutating func push() {
        depth += 1
        hasMember &= ~(1 << UInt64((depth - 1) & 63))
    }

    private mutating func pop() {
        depth -= 1
    }

    /// Decimal digits without allocating a String (replies carry many numbers).
    private mutating func writeDigits(_ value: UInt64, negative: Bool) {
        if negative { bytes.append(UInt8(ascii: "-")) }
        if value < 10 { bytes.append(UInt8(ascii: "0") + UInt8(value)); return }
        var magnitude = value
        var digits: (UInt64, UInt64, UInt64) = (0, 0, 0)  // 24 bytes of scratch, enough for 20 digits
        let count = withUnsafeMutableBytes(of: &digits) { buf -> Int in
            var n = 0
            while magnitude > 0 {
                buf[23 - n] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
                n += 1
            }
            return n
        }
        withUnsafeBytes(of: &digits) { buf in bytes.append(contentsOf: buf[(24 - count)...]) }
    }

    private static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    private mutating func writeStringBody(_ s: String) {
        bytes.append(UInt8(ascii: "\""))
        // Fast path: nothing to escape (ids, paths, symbols) — copy the UTF-8 in one go.
        var plain = s
        let copied = plain.withUTF8 { utf8 -> Bool in
            guard !utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }) else { return false }
            bytes.append(contentsOf: utf8)
            return true
        }
        if !copied {
            for c in s.utf8 {
                switch c {
                case 0x22: bytes.append(contentsOf: [0x5C, 0x22])
                case 0x5C: bytes.append(contentsOf: [0x5C, 0x5C])
                case 0x0A: bytes.append(contentsOf: [0x5C, UInt8(ascii: "n")])
                case 0x0D: bytes.append(contentsOf: [0x5C, UInt8(ascii: "r")])
                case 0x09: bytes.append(contentsOf: [0x5C, UInt8(ascii: "t")])
                case 0..<0x20:
                    bytes.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, Self.hex[Int(c >> 4)], Self.hex[Int(c & 0xF)]])
                default: bytes.append(c)
                }
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}
