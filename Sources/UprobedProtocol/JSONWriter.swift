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
///
/// The text lives in a buffer this writer owns (grown by doubling) rather than an `[UInt8]`:
/// each of the ~15 small appends per `stats` entry paid Array's uniqueness and capacity checks,
/// which were half of a 10,000-entry reply's time. Noncopyable, so two writers can never
/// share (and overwrite) one buffer; pass it `inout`.
public struct JSONWriter: ~Copyable {
    /// The text written so far.
    public var bytes: [UInt8] { Array(UnsafeBufferPointer(start: base, count: count)) }
    /// `base[0..<count]` is the text; the rest up to `capacity` is not yet initialized (bytes
    /// are written by initializing them).
    @usableFromInline var base: UnsafeMutablePointer<UInt8>
    @usableFromInline var count = 0
    @usableFromInline var capacity: Int
    /// Bit n set: the container at depth n already has a member (the next one needs a comma).
    @usableFromInline var hasMember: UInt64 = 0
    @usableFromInline var depth = 0
    /// A key was just written: the value follows without a comma.
    @usableFromInline var afterKey = false

    @inlinable
    public init(reservingCapacity capacity: Int = 256) {
        self.capacity = max(capacity, 16)
        base = .allocate(capacity: self.capacity)
    }

    deinit { base.deallocate() }

    /// Ends the text with a newline and returns it: one protocol line. Write nothing after.
    @inlinable
    public mutating func line() -> [UInt8] {
        put(0x0A)
        return bytes
    }

    /// `line()` lent to `body` instead of copied out: ends the text with a newline. Write
    /// nothing after.
    @inlinable
    public mutating func withLine<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        put(0x0A)
        return try body(UnsafeBufferPointer(start: base, count: count))
    }

    // MARK: - structure

    @inlinable
    public mutating func beginObject() {
        separate()
        put(UInt8(ascii: "{"))
        push()
    }

    @inlinable
    public mutating func endObject() {
        pop()
        put(UInt8(ascii: "}"))
    }

    @inlinable
    public mutating func beginArray() {
        separate()
        put(UInt8(ascii: "["))
        push()
    }

    @inlinable
    public mutating func endArray() {
        pop()
        put(UInt8(ascii: "]"))
    }

    /// An object member's key known at compile time (no escaping needed: it must be plain
    /// printable ASCII without quotes or backslashes, which debug builds check).
    @inlinable
    public mutating func key(_ k: StaticString) {
        separate()
        assert(k.withUTF8Buffer { !$0.contains { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C || $0 >= 0x80 } }, "JSON key needs escaping")
        // A literal is a pointer and a length: copied without a closure (this runs per member).
        guard k.hasPointerRepresentation else {
            k.withUTF8Buffer { put(UInt8(ascii: "\"")); put($0); put(UInt8(ascii: "\"")); put(UInt8(ascii: ":")) }
            afterKey = true
            return
        }
        let n = k.utf8CodeUnitCount
        reserve(n + 3)
        base[count] = UInt8(ascii: "\"")
        (base + count + 1).initialize(from: k.utf8Start, count: n)
        base[count + 1 + n] = UInt8(ascii: "\"")
        base[count + 2 + n] = UInt8(ascii: ":")
        count += n + 3
        afterKey = true
    }

    /// An object member's key; the next value written is its value.
    @inlinable
    public mutating func key(_ k: String) {
        separate()
        writeStringBody(k)
        put(UInt8(ascii: ":"))
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
        put(b ? "true" : "false")
    }

    @inlinable
    public mutating func null() {
        separate()
        put("null")
    }

    /// Whole numbers as integers; NaN and infinities (which JSON lacks) as null.
    @inlinable
    public mutating func double(_ d: Double) {
        separate()
        guard d.isFinite else { put("null"); return }
        if d.rounded() == d, abs(d) < 1e18 {
            let i = Int64(d)
            writeDigits(i.magnitude, negative: i < 0)
        } else {
            var text = d.description
            text.withUTF8 { put($0) }
        }
    }

    /// `d` rounded to `decimals` places (at most 6), as a plain decimal without trailing zeros
    /// ("12.5", "3"): the same number as `double((d * 10^decimals).rounded() / 10^decimals)`,
    /// without formatting a String (`stats` writes one rate per probe). Magnitudes of 10^12 or
    /// more, NaN and the infinities go through `double`.
    @inlinable
    public mutating func fixed(_ d: Double, decimals: Int) {
        let places = min(max(decimals, 0), 6)
        var scale: UInt64 = 1
        for _ in 0..<places { scale *= 10 }
        guard d.isFinite, d.magnitude < 1e12 else { double(d); return }
        let scaled = UInt64((d.magnitude * Double(scale)).rounded())
        separate()
        writeDigits(scaled / scale, negative: d < 0 && scaled != 0)
        var fraction = scaled % scale
        guard fraction != 0 else { return }
        var width = places
        while fraction % 10 == 0 { fraction /= 10; width -= 1 }
        put(UInt8(ascii: "."))
        var divisor: UInt64 = 1
        for _ in 1..<width { divisor *= 10 }
        while divisor > 0 {  // leading zeros included: 0.05 is ".05"
            put(UInt8(ascii: "0") + UInt8(fraction / divisor % 10))
            divisor /= 10
        }
    }

    /// JSON text written elsewhere, spliced in as the next value; inside an array it may be a
    /// run of elements (`a,b,c`). The caller vouches that it is valid compact JSON.
    @inlinable
    public mutating func rawValue(_ json: UnsafeBufferPointer<UInt8>) {
        separate()
        put(json)
    }

    /// The next value is written elsewhere and goes between this writer's pieces (see
    /// `flush`): places the comma it needs and counts it as a member. Inside an array it may
    /// be a run of elements (`a,b,c`).
    @inlinable
    public mutating func externalValue() {
        separate()
    }

    /// The text written so far, leaving the buffer empty; nesting carries on, so one document
    /// can be emitted in pieces with large parts (`externalValue`) passed along uncopied.
    @inlinable
    public mutating func flush() -> [UInt8] {
        defer { count = 0 }
        return bytes
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

    @inlinable @inline(__always)
    mutating func separate() {
        if afterKey { afterKey = false; return }
        guard depth > 0 else { return }
        let bit: UInt64 = 1 << UInt64((depth - 1) & 63)
        if hasMember & bit != 0 { put(UInt8(ascii: ",")) } else { hasMember |= bit }
    }

    /// Room for `n` more bytes.
    @inlinable @inline(__always)
    mutating func reserve(_ n: Int) {
        if count + n > capacity { grow(toAtLeast: count + n) }
    }

    @usableFromInline
    mutating func grow(toAtLeast needed: Int) {
        let bigger = max(needed, capacity * 2)
        let moved = UnsafeMutablePointer<UInt8>.allocate(capacity: bigger)
        moved.initialize(from: base, count: count)
        base.deallocate()
        base = moved
        capacity = bigger
    }

    @inlinable @inline(__always)
    mutating func put(_ byte: UInt8) {
        reserve(1)
        base[count] = byte
        count += 1
    }

    @inlinable
    mutating func put(_ run: UnsafeBufferPointer<UInt8>) {
        guard let from = run.baseAddress, run.count > 0 else { return }
        reserve(run.count)
        (base + count).initialize(from: from, count: run.count)
        count += run.count
    }

    @inlinable
    mutating func put(_ text: StaticString) {
        text.withUTF8Buffer { put($0) }
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

    /// Decimal digits written in place (replies carry many numbers).
    @inlinable
    mutating func writeDigits(_ value: UInt64, negative: Bool) {
        reserve(21)  // sign and 20 digits
        if negative { base[count] = UInt8(ascii: "-"); count += 1 }
        var width = 1
        var rest = value / 10
        while rest > 0 { width += 1; rest /= 10 }
        var magnitude = value
        var at = count + width - 1
        repeat {
            base[at] = UInt8(ascii: "0") + UInt8(magnitude % 10)
            magnitude /= 10
            at -= 1
        } while magnitude > 0
        count += width
    }

    @usableFromInline static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    @inlinable
    mutating func writeStringBody(_ s: String) {
        put(UInt8(ascii: "\""))
        var plain = s
        plain.withUTF8 { utf8 in
            // Copy runs of bytes that need no escape in one go (ids, paths, symbols are one run).
            var runStart = 0
            for k in 0..<utf8.count {
                let c = utf8[k]
                guard c < 0x20 || c == 0x22 || c == 0x5C else { continue }
                put(UnsafeBufferPointer(rebasing: utf8[runStart..<k]))
                runStart = k + 1
                put(0x5C)
                switch c {
                case 0x22: put(0x22)
                case 0x5C: put(0x5C)
                case 0x0A: put(UInt8(ascii: "n"))
                case 0x0D: put(UInt8(ascii: "r"))
                case 0x09: put(UInt8(ascii: "t"))
                default:
                    put(UInt8(ascii: "u")); put(0x30); put(0x30)
                    put(Self.hex[Int(c >> 4)]); put(Self.hex[Int(c & 0xF)])
                }
            }
            put(UnsafeBufferPointer(rebasing: utf8[runStart..<utf8.count]))
        }
        put(UInt8(ascii: "\""))
    }
}
