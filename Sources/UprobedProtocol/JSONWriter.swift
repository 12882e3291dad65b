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
    /// The text written so far.
    public var bytes: [UInt8] { storage }
    @usableFromInline var storage: [UInt8]
    /// Bit n set: the container at depth n already has a member (the next one needs a comma).
    @usableFromInline var hasMember: UInt64 = 0
    @usableFromInline var depth = 0
    /// A key was just written: the value follows without a comma.
    @usableFromInline var afterKey = false

    @inlinable
    public init(reservingCapacity capacity: Int = 256) {
        storage = []
        storage.reserveCapacity(capacity)
    }

    /// Ends the text with a newline and returns it: one protocol line. Write nothing after.
    @inlinable
    public mutating func line() -> [UInt8] {
        storage.append(0x0A)
        return storage
    }

    /// The text written so far.

    // MARK: - structure

    @inlinable
    public mutating func beginObject() {
        separate()
        storage.append(UInt8(ascii: "{"))
        push()
    }

    @inlinable
    public mutating func endObject() {
        pop()
        storage.append(UInt8(ascii: "}"))
    }

    @inlinable
    public mutating func beginArray() {
        separate()
        storage.append(UInt8(ascii: "["))
        push()
    }

    @inlinable
    public mutating func endArray() {
        pop()
        storage.append(UInt8(ascii: "]"))
    }

    /// An object member's key known at compile time (no escaping needed: it must be plain
    /// printable ASCII without quotes or backslashes, which debug builds check).
    @inlinable
    public mutating func key(_ k: StaticString) {
        separate()
        storage.append(UInt8(ascii: "\""))
        if k.hasPointerRepresentation {
            storage.append(contentsOf: UnsafeBufferPointer(start: k.utf8Start, count: k.utf8CodeUnitCount))
        } else {
            k.withUTF8Buffer { storage.append(contentsOf: $0) }
        }
        assert(k.withUTF8Buffer { !$0.contains { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C || $0 >= 0x80 } }, "JSON key needs escaping")
        storage.append(UInt8(ascii: "\""))
        storage.append(UInt8(ascii: ":"))
        afterKey = true
    }

    /// An object member's key; the next value written is its value.
    @inlinable
    public mutating func key(_ k: String) {
        separate()
        writeStringBody(k)
        storage.append(UInt8(ascii: ":"))
        afterKey = true
    }

    // MARK: - scalars

    @inlinable
    public mutating func string(_ s: String) {
        separate()
        writeStringBody(s)
    }

    @inlinable
    public mutating func int(_ v: Int64) {
        separate()
        writeDigits(v.magnitude, negative: v < 0)
    }

    /// Exact up to 2^64-1 (offsets, counters).
    @inlinable
    public mutating func uint(_ v: UInt64) {
        separate()
        writeDigits(v, negative: false)
    }

    @inlinable
    public mutating func bool(_ b: Bool) {
        separate()
        storage.append(contentsOf: (b ? "true" : "false").utf8)
    }

    @inlinable
    public mutating func null() {
        separate()
        storage.append(contentsOf: "null".utf8)
    }

    /// Whole numbers as integers; NaN and infinities (which JSON lacks) as null.
    @inlinable
    public mutating func double(_ d: Double) {
        separate()
        guard d.isFinite else { storage.append(contentsOf: "null".utf8); return }
        if d.rounded() == d, abs(d) < 1e18 {
            let i = Int64(d)
            writeDigits(i.magnitude, negative: i < 0)
        } else {
            storage.append(contentsOf: d.description.utf8)
        }
    }

    /// Any `JSONValue` (trees built elsewhere, request ids echoed back).
    @inlinable
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

    /// `"k": [ … ]`, each element written by `element`.
    @inlinable
    public mutating func array<S: Sequence>(_ k: StaticString, _ items: S, _ element: (inout JSONWriter, S.Element) -> Void) {
        key(k)
        beginArray()
        for item in items { element(&self, item) }
        endArray()
    }

    /// `"k": [{ … }, …]`, each object's members written by `members`.
    @inlinable
    public mutating func objects<S: Sequence>(_ k: StaticString, _ items: S, _ members: (inout JSONWriter, S.Element) -> Void) {
        key(k)
        beginArray()
        for item in items {
            beginObject()
            members(&self, item)
            endObject()
        }
        endArray()
    }

    /// `"k": ["a", "b", …]`
    @inlinable
    public mutating func field(_ k: StaticString, strings: [String]) {
        array(k, strings) { w, s in w.string(s) }
    }

    @inlinable
    public mutating func field(_ k: StaticString, _ s: String) { key(k); string(s) }
    @inlinable
    public mutating func field(_ k: StaticString, _ v: Int64) { key(k); int(v) }
    @inlinable
    public mutating func field(_ k: StaticString, _ v: UInt64) { key(k); uint(v) }
    @inlinable
    public mutating func field(_ k: StaticString, _ v: Double) { key(k); double(v) }
    @inlinable
    public mutating func field(_ k: StaticString, _ v: Bool) { key(k); bool(v) }
    @inlinable
    public mutating func field(_ k: StaticString, _ v: JSONValue) { key(k); value(v) }

    // MARK: - internals

    @inlinable
    mutating func separate() {
        if afterKey { afterKey = false; return }
        guard depth > 0 else { return }
        let bit: UInt64 = 1 << UInt64((depth - 1) & 63)
        if hasMember & bit != 0 { storage.append(UInt8(ascii: ",")) } else { hasMember |= bit }
    }

    @inlinable
    mutating func push() {
        depth += 1
        hasMember &= ~(1 << UInt64((depth - 1) & 63))
    }

    @inlinable
    mutating func pop() {
        depth -= 1
    }

    /// Decimal digits without allocating a String (replies carry many numbers).
    @inlinable
    mutating func writeDigits(_ value: UInt64, negative: Bool) {
        if negative { storage.append(UInt8(ascii: "-")) }
        if value < 10 { storage.append(UInt8(ascii: "0") + UInt8(value)); return }
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
        withUnsafeBytes(of: &digits) { buf in storage.append(contentsOf: buf[(24 - count)...]) }
    }

    @usableFromInline static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    @inlinable
    mutating func writeStringBody(_ s: String) {
        storage.append(UInt8(ascii: "\""))
        var plain = s
        plain.withUTF8 { utf8 in
            // Copy runs of bytes that need no escape in one go (ids, paths, symbols are one run).
            var runStart = 0
            for k in 0..<utf8.count {
                let c = utf8[k]
                guard c < 0x20 || c == 0x22 || c == 0x5C else { continue }
                storage.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[runStart..<k]))
                runStart = k + 1
                switch c {
                case 0x22: storage.append(0x5C); storage.append(0x22)
                case 0x5C: storage.append(0x5C); storage.append(0x5C)
                case 0x0A: storage.append(0x5C); storage.append(UInt8(ascii: "n"))
                case 0x0D: storage.append(0x5C); storage.append(UInt8(ascii: "r"))
                case 0x09: storage.append(0x5C); storage.append(UInt8(ascii: "t"))
                default:
                    storage.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, Self.hex[Int(c >> 4)], Self.hex[Int(c & 0xF)]])
                }
            }
            storage.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[runStart..<utf8.count]))
        }
        storage.append(UInt8(ascii: "\""))
    }
}
