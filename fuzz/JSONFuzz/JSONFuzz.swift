// libFuzzer harness for the wire JSON code of UprobedProtocol (built by SwiftPM with coverage
// and ASan: fuzz/build.sh).
//
// Per input it checks that:
//  1. JSONParser.parse never traps, and a parse error points inside the input;
//  2. whatever it accepts, JSONSerializer writes as one line that parses back to the same value,
//     and writing that again gives the same bytes;
//  3. Foundation's JSONSerialization reads that line back as the same value (a second, independent
//     reader of the writer's output);
//  4. differential: when JSONParser accepts, JSONSerialization (.fragmentsAllowed) accepts too
//     and reads the same value. Inputs only ours refuses are skipped, never flagged: ours is
//     stricter by design (RFC 8259 only, nesting limit 64, no infinities, no lone surrogates).
//     Known legitimate differences are allowed for, each where it is handled: key spelling
//     (`hasCanonicalTwins`), number representation (`numberMatches`), member order.
// A failed check prints what differed and aborts, so libFuzzer saves the input as a crash.
import Foundation
import UprobedProtocol

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJSON(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    var ours: JSONValue?
    do {
        ours = try JSONParser.parse(input)
    } catch {
        check(error.byteOffset >= 0 && error.byteOffset <= input.count, "error offset \(error.byteOffset) outside input", input)
    }
    guard let ours else { return 0 }  // Foundation is knowingly more lenient: nothing to compare.
    check(keysUnique(ours), "an object kept two members with the same UTF-8 key", input)
    // The String overload must agree with the bytes overload on valid UTF-8.
    if let text = String(validating: input, as: UTF8.self) {
        check((try? JSONParser.parse(text)) == ours, "parse(String) differs from parse(bytes)", input)
    }
    let comparable = foundationComparable(ours)
    roundTrip(ours, input, foundation: comparable)
    if comparable { differential(ours, input) }
    return 0
}

/// The parser merges a repeated key (same UTF-8) into one member.
func keysUnique(_ v: JSONValue) -> Bool {
    switch v {
    case .array(let items): return items.allSatisfy(keysUnique)
    case .object(let o): return Set(o.keys.map { Array($0.utf8) }).count == o.count && o.pairs.allSatisfy { keysUnique($0.value) }
    default: return true
    }
}

/// False for values where Foundation legitimately (or through its own bug) reads other text:
/// - keys that are canonically equivalent but spelled differently ("\u00e9", "e\u0301") are two
///   members for us (RFC 8259 §8.3: compared as code units) and one for Foundation, whose
///   dictionaries key by String ==;
/// - Foundation drops a raw U+FEFF that starts a string or follows an escape in it ("\"\u{FEFF}x\""
///   reads as "x"): its bug, not ours.
func foundationComparable(_ v: JSONValue) -> Bool {
    switch v {
    case .string(let s): return !s.unicodeScalars.contains("\u{FEFF}")
    case .array(let items): return items.allSatisfy(foundationComparable)
    case .object(let o):
        return Set(o.keys).count == o.count
            && o.pairs.allSatisfy { foundationComparable(.string($0.key)) && foundationComparable($0.value) }
    default: return true
    }
}

// MARK: - round trip through our writer

func roundTrip(_ value: JSONValue, _ input: [UInt8], foundation: Bool) {
    let line = JSONSerializer.serializeLine(value)
    check(line.last == 0x0A && !line.dropLast().contains(0x0A), "serialized value is not exactly one line", input)
    let text = Array(line.dropLast())
    let back: JSONValue
    do {
        back = try JSONParser.parse(text)
    } catch {
        fail("our own output does not parse (\(error)): \(String(decoding: text, as: UTF8.self))", input)
    }
    if let why = differ(value, back) { fail("round trip changed the value: \(why)", input) }
    check(JSONSerializer.serializeLine(back) == line, "writing the re-parsed value gives other bytes", input)
    // Foundation as a second reader of what we write (our output is strict JSON, so no skips).
    // Compared with `back`, which has the writer's integer spelling of whole doubles.
    guard foundation else { return }
    do {
        let f = try JSONSerialization.jsonObject(with: Data(text), options: [.fragmentsAllowed])
        if let why = differ(back, foundation: f) { fail("Foundation reads our output differently: \(why)", input) }
    } catch {
        fail("Foundation rejects our output (\(error)): \(String(decoding: text, as: UTF8.self))", input)
    }
}

/// Equality up to JSON's single number type: the writer prints whole doubles below 1e18 as
/// integers ("1.0" comes back as 1, and -0.0 as 0), which is intended.
func differ(_ a: JSONValue, _ b: JSONValue, _ path: String = "$") -> String? {
    switch (a, b) {
    case (.null, .null): return nil
    case let (.bool(x), .bool(y)): return x == y ? nil : "\(path): \(x) vs \(y)"
    case let (.string(x), .string(y)):
        return x.utf8.elementsEqual(y.utf8) ? nil : "\(path): string \(x.debugDescription) vs \(y.debugDescription)"
    case (.int, .int), (.int, .double), (.double, .int), (.double, .double):
        return sameNumber(a, b) ? nil : "\(path): number \(a) vs \(b)"
    case let (.array(x), .array(y)):
        guard x.count == y.count else { return "\(path): \(x.count) vs \(y.count) elements" }
        for (k, (p, q)) in zip(x, y).enumerated() { if let d = differ(p, q, "\(path)[\(k)]") { return d } }
        return nil
    case let (.object(x), .object(y)):
        guard x.count == y.count else { return "\(path): \(x.count) vs \(y.count) members" }
        for (p, q) in zip(x.pairs, y.pairs) {
            guard p.key.utf8.elementsEqual(q.key.utf8) else { return "\(path): key \(p.key.debugDescription) vs \(q.key.debugDescription)" }
            if let d = differ(p.value, q.value, "\(path).\(p.key)") { return d }
        }
        return nil
    default: return "\(path): \(a.typeName) vs \(b.typeName)"
    }
}

func sameNumber(_ a: JSONValue, _ b: JSONValue) -> Bool {
    switch (a, b) {
    case let (.int(x), .int(y)): return x == y
    case let (.double(x), .double(y)): return x == y
    case let (.int(i), .double(d)), let (.double(d), .int(i)):
        return d.magnitude < 0x1p63 && Double(i) == d && Int64(d) == i
    default: return false
    }
}

// MARK: - differential against Foundation

/// Only inputs ours accepted come here: where ours refuses, Foundation is knowingly more lenient
/// (trailing commas, a BOM, lone surrogates, nesting beyond 64, ...), and refusing more is never
/// a bug here.
func differential(_ ours: JSONValue, _ input: [UInt8]) {
    guard let theirs = try? JSONSerialization.jsonObject(with: Data(input), options: [.fragmentsAllowed]) else {
        // Nothing legitimate is known to make Foundation refuse what a strict RFC 8259 parser
        // accepts, so it is flagged: either ours is too lenient or Foundation is wrong.
        fail("ours accepts, Foundation rejects; ours read \(JSONSerializer.serialize(ours))", input)
    }
    if let why = differ(ours, foundation: theirs) { fail("differs from Foundation: \(why)", input) }
}

/// Compares our value with JSONSerialization's. Objects are compared as maps (Foundation's
/// dictionaries have no order); both sides keep the last value of a repeated key, and both
/// merge keys that Swift's String equality calls equal (canonically equivalent spellings).
func differ(_ v: JSONValue, foundation f: Any, _ path: String = "$") -> String? {
    switch v {
    case .null:
        return f is NSNull ? nil : "\(path): null vs \(type(of: f))"
    case .bool(let b):
        guard let n = f as? NSNumber, isBool(n) else { return "\(path): bool vs \(type(of: f)) \(f)" }
        return n.boolValue == b ? nil : "\(path): \(b) vs \(n)"
    case .int, .double:
        guard let n = f as? NSNumber, !isBool(n) else { return "\(path): number vs \(type(of: f)) \(f)" }
        return numberMatches(v, n) ? nil : "\(path): number \(v) vs Foundation \(n) (\(String(cString: n.objCType)))"
    case .string(let s):
        guard let t = f as? String else { return "\(path): string vs \(type(of: f))" }
        return s.unicodeScalars.elementsEqual(t.unicodeScalars) ? nil : "\(path): string \(s.debugDescription) vs \(t.debugDescription)"
    case .array(let items):
        guard let a = f as? [Any] else { return "\(path): array vs \(type(of: f))" }
        guard a.count == items.count else { return "\(path): \(items.count) vs \(a.count) elements" }
        for (k, (x, y)) in zip(items, a).enumerated() { if let d = differ(x, foundation: y, "\(path)[\(k)]") { return d } }
        return nil
    case .object(let o):
        guard let d = f as? [String: Any] else { return "\(path): object vs \(type(of: f))" }
        guard d.count == o.count else { return "\(path): \(o.count) vs \(d.count) members (keys \(o.keys) vs \(Array(d.keys)))" }
        for m in o.pairs {
            guard let y = d[m.key] else { return "\(path): key \(m.key.debugDescription) missing in Foundation's" }
            if let e = differ(m.value, foundation: y, "\(path).\(m.key)") { return e }
        }
        return nil
    }
}

/// Foundation on Linux makes booleans as NSNumbers of ObjC type "c" (char), and never makes
/// a JSON number with that type.
func isBool(_ n: NSNumber) -> Bool { String(cString: n.objCType) == "c" }

func numberMatches(_ v: JSONValue, _ n: NSNumber) -> Bool {
    if n is NSDecimalNumber {
        // Numbers that fit neither Int64/UInt64 nor a Double exactly come back as Decimals
        // (38 significant digits, exponent -128...127) whose doubleValue is not correctly
        // rounded; ours goes through strtod. Compare loosely, and skip outside Decimal's range,
        // where it legitimately loses the value.
        guard let ours = v.doubleValue else { return false }
        let theirs = n.doubleValue
        if ours == 0 || ours.magnitude < 1e-100 || ours.magnitude > 1e100 || !theirs.isFinite { return true }
        return (ours - theirs).magnitude <= ours.magnitude * 1e-12
    }
    switch String(cString: n.objCType) {
    case "d", "f":
        // Both sides read a decimal fraction/exponent with correct rounding: exact, sign of zero included.
        guard case .double(let d) = v else { return false }
        return d == n.doubleValue && d.sign == n.doubleValue.sign
    case "Q":
        // Above Int64.max: ours keeps it as the nearest Double (documented in JSONParser.number).
        let u = n.uint64Value
        switch v {
        case .int(let i): return i >= 0 && UInt64(i) == u
        case .double(let d): return d == Double(u)
        default: return false
        }
    default:
        guard case .int(let i) = v else { return false }
        return n.int64Value == i
    }
}

// MARK: - reporting

func check(_ ok: @autoclosure () -> Bool, _ message: @autoclosure () -> String, _ input: [UInt8]) {
    if !ok() { fail(message(), input) }
}

func fail(_ message: String, _ input: [UInt8]) -> Never {
    let shown = String(decoding: input.prefix(300), as: UTF8.self).debugDescription
    FileHandle.standardError.write(Data("JSONFuzz check failed: \(message)\n  input (\(input.count) bytes): \(shown)\n".utf8))
    abort()
}
