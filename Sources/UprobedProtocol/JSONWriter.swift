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
        Self.copy(k.utf8Start, n, to: base + count + 1)
        base[count + 1 + n] = UInt8(ascii: "\"")
        base[count + 2 + n] = UInt8(ascii: ":")
        count += n + 3
        afterKey = true
    }

    /// An object member's key made at run time (escaped as needed); the next value written is
    /// its value. Labelled so that a literal, `key("rate")`, goes to `key(_: StaticString)`:
    /// unlabelled, the String overload won for literals and scanned every key for escapes.
    @inlinable
    public mutating func key(string k: String) {
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

    /// A string value from UTF-8 bytes (valid UTF-8, as a String's are), without making a
    /// String: a whole binary's replies and state write 241,000 symbol names.
    @inlinable
    public mutating func string(utf8: UnsafeBufferPointer<UInt8>) {
        separate()
        writeStringBody(utf8: utf8)
    }

    /// A string value made of a literal prefix and a decimal number, `"p17"`, without making a
    /// String (`stats` writes one such id per probe). The prefix must not need escaping.
    @inlinable
    public mutating func string(_ prefix: StaticString, number: UInt64) {
        separate()
        put(UInt8(ascii: "\""))
        put(prefix)
        writeDigits(number, negative: false)
        put(UInt8(ascii: "\""))
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
        reserve(Unchecked.numberBytes)
        var u = Unchecked(base + count)
        u.double(d)
        count += u.written
    }

    /// `d` rounded to `decimals` places (at most 6), as a plain decimal without trailing zeros
    /// ("12.5", "3"): the same number as `double((d * 10^decimals).rounded() / 10^decimals)`,
    /// without formatting a String (`stats` writes one rate per probe). Magnitudes of 10^12 or
    /// more, NaN and the infinities are written as `double` writes them.
    @inlinable
    public mutating func fixed(_ d: Double, decimals: Int) {
        separate()
        reserve(Unchecked.numberBytes)
        var u = Unchecked(base + count)
        u.fixed(d, decimals: decimals)
        count += u.written
    }

    /// Writes the next value — or, in an array, a run of elements — through `body`, with room
    /// for `maxBytes` checked once instead of at every piece: for the many small objects of
    /// one shape a hot reply is made of (a `stats` entry). The caller vouches that the text is
    /// valid compact JSON and no longer than `maxBytes` (debug builds check the length).
    @inlinable
    public mutating func unchecked(maxBytes: Int, _ body: (inout Unchecked) -> Void) {
        separate()
        reserve(maxBytes)
        var u = Unchecked(base + count)
        body(&u)
        assert(u.written <= maxBytes, "JSONWriter.unchecked wrote past its room")
        count += u.written
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
                key(string: p.key)
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

    public mutating func field(_ k: StaticString, utf8: UnsafeBufferPointer<UInt8>) { key(k); string(utf8: utf8) }
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
        Self.copy(from, run.count, to: base + count)
        count += run.count
    }

    /// Copies `n` bytes; a few bytes (keys, punctuation, ids) one by one, which is cheaper
    /// than a call to memmove.
    @inlinable @inline(__always)
    static func copy(_ from: UnsafePointer<UInt8>, _ n: Int, to: UnsafeMutablePointer<UInt8>) {
        if n <= 16 {
            for k in 0..<n { to[k] = from[k] }
        } else {
            to.initialize(from: from, count: n)
        }
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
        var u = Unchecked(base + count)
        u.digits(value, negative: negative)
        count += u.written
    }

    @usableFromInline static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    @inlinable
    mutating func writeStringBody(_ s: String) {
        var plain = s
        plain.withUTF8 { writeStringBody(utf8: $0) }
    }

    /// `utf8` must be valid UTF-8 (as a String's bytes are).
    @inlinable
    mutating func writeStringBody(utf8: UnsafeBufferPointer<UInt8>) {
        put(UInt8(ascii: "\""))
        do {
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

extension JSONWriter {
    /// Appends to room a `JSONWriter` has already reserved, with no checks: see `unchecked`.
    /// The number formatting of the writer lives here, so it exists once.
    public struct Unchecked: ~Copyable {
        @usableFromInline let start: UnsafeMutablePointer<UInt8>
        /// Bytes written so far.
        @usableFromInline var written = 0

        /// The most any one number takes: a sign and 20 digits, or `Double.description`
        /// (at most 24 bytes, "-2.2250738585072014e-308").
        public static let numberBytes = 32

        @inlinable
        init(_ start: UnsafeMutablePointer<UInt8>) { self.start = start }

        /// Text that needs no escaping, as it is (punctuation, keys with their quotes).
        @inlinable @inline(__always)
        public mutating func literal(_ text: StaticString) {
            guard text.hasPointerRepresentation else {
                text.withUTF8Buffer { for b in $0 { start[written] = b; written += 1 } }
                return
            }
            JSONWriter.copy(text.utf8Start, text.utf8CodeUnitCount, to: start + written)
            written += text.utf8CodeUnitCount
        }

        /// A whole number in decimal.
        @inlinable
        public mutating func digits(_ value: UInt64, negative: Bool = false) {
            if negative { start[written] = UInt8(ascii: "-"); written += 1 }
            if value < 10 { start[written] = UInt8(ascii: "0") + UInt8(value); written += 1; return }
            // The width by comparing (no divisions; 10^19 is the last power of ten below 2^64).
            var width = 2
            var bound: UInt64 = 100
            while width < 20 && value >= bound { width += 1; bound &*= 10 }
            var magnitude = value
            var at = written + width - 1
            repeat {
                start[at] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
                at -= 1
            } while magnitude > 0
            written += width
        }

        /// See `JSONWriter.double`.
        @inlinable
        public mutating func double(_ d: Double) {
            guard d.isFinite else { literal("null"); return }
            if d.rounded() == d, abs(d) < 1e18 {
                let i = Int64(d)
                digits(i.magnitude, negative: i < 0)
            } else {
                var text = d.description
                text.withUTF8 { utf8 in
                    guard let from = utf8.baseAddress else { return }
                    JSONWriter.copy(from, utf8.count, to: start + written)
                    written += utf8.count
                }
            }
        }

        /// See `JSONWriter.fixed`.
        @inlinable
        public mutating func fixed(_ d: Double, decimals: Int) {
            let places = min(max(decimals, 0), 6)
            var scale: UInt64 = 1
            for _ in 0..<places { scale *= 10 }
            guard d.isFinite, d.magnitude < 1e12 else { double(d); return }
            // Rounded half away from zero, as `rounded()` does, without its libm call: `x` is
            // below 2^60, so truncating it and subtracting back are exact.
            let x = d.magnitude * Double(scale)
            var scaled = UInt64(x)
            if x - Double(scaled) >= 0.5 { scaled += 1 }
            digits(scaled / scale, negative: d < 0 && scaled != 0)
            var fraction = scaled % scale
            guard fraction != 0 else { return }
            var width = places
            while fraction % 10 == 0 { fraction /= 10; width -= 1 }
            start[written] = UInt8(ascii: ".")
            // Leading zeros included: 0.05 is ".05".
            for k in stride(from: width, to: 0, by: -1) {
                start[written + k] = UInt8(ascii: "0") + UInt8(fraction % 10)
                fraction /= 10
            }
            written += width + 1
        }
    }
}
