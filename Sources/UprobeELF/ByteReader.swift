/// Bounds-checked little-endian reads over a byte array read from an untrusted file.
/// Every accessor throws `malformed_elf` instead of trapping when out of range.
struct ByteReader: Sendable {
    let bytes: [UInt8]
    /// Used in error messages only.
    let what: String

    var count: Int { bytes.count }

    private func check(_ off: Int, _ len: Int) throws(ResolveError) {
        guard off >= 0, len >= 0, off <= bytes.count, len <= bytes.count - off else {
            throw .malformed("\(what): read of \(len) bytes at \(off) is outside its \(bytes.count) bytes")
        }
    }

    func u8(_ off: Int) throws(ResolveError) -> UInt8 {
        try check(off, 1)
        return bytes[off]
    }

    func u16(_ off: Int) throws(ResolveError) -> UInt16 {
        try check(off, 2)
        return UInt16(bytes[off]) | UInt16(bytes[off + 1]) << 8
    }

    func u32(_ off: Int) throws(ResolveError) -> UInt32 {
        try check(off, 4)
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(bytes[off + i]) }
        return v
    }

    func u64(_ off: Int) throws(ResolveError) -> UInt64 {
        try check(off, 8)
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(bytes[off + i]) }
        return v
    }

    func slice(_ off: Int, _ len: Int) throws(ResolveError) -> ArraySlice<UInt8> {
        try check(off, len)
        return bytes[off..<(off + len)]
    }

    /// NUL-terminated string starting at `off`; a missing terminator is malformed.
    /// Invalid UTF-8 is repaired rather than rejected (names are only compared, never executed).
    func cString(_ off: Int) throws(ResolveError) -> String {
        try cStringAndEnd(off).string
    }

    /// `cString`, and the offset of its terminating NUL: where the next string of a packed
    /// list starts is counted in the file's bytes, not in the repaired string's.
    func cStringAndEnd(_ off: Int) throws(ResolveError) -> (string: String, end: Int) {
        guard off >= 0, off < bytes.count else {
            throw .malformed("\(what): string offset \(off) is outside its \(bytes.count) bytes")
        }
        guard let end = bytes[off...].firstIndex(of: 0) else {
            throw .malformed("\(what): unterminated string at \(off)")
        }
        return (String(decoding: bytes[off..<end], as: UTF8.self), end)
    }
}

/// `a + b` without overflow traps.
@inline(__always)
func checkedAdd(_ a: UInt64, _ b: UInt64) -> UInt64? {
    let (r, o) = a.addingReportingOverflow(b)
    return o ? nil : r
}
