/// Serializes a `JSONValue` into one compact line (no newline inside, by construction:
/// control characters in strings are escaped). The text itself is written by `JSONWriter`.
public enum JSONSerializer {
    public static func serialize(_ value: JSONValue) -> String {
        var w = JSONWriter()
        w.value(value)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    public static func serializeLine(_ value: JSONValue) -> [UInt8] {
        var w = JSONWriter()
        w.value(value)
        return w.line()
    }
}
