/// Names laid out one after another, each as its length (LEB128), its UTF-8 bytes and a NUL,
/// in one block of memory (the header is the byte count). `SymbolNames` keeps a resolution's
/// names in one of these until they are compressed, and a block decoded from
/// `CompressedNames` is one too: decoding gives back exactly the bytes of that stretch, so a
/// name's offset is the same in both.
///
/// The NUL lets `fnmatch` read a name in place; the length lets a reader find its end without
/// scanning. Immutable once filled (`make`), so shared between threads freely (a
/// `ManagedBuffer` cannot declare itself `Sendable`: its holders do, unchecked).
final class NameBytes: ManagedBuffer<Int, UInt8> {
    /// A block of `count` bytes that `fill` initializes (all of them; or the caller, before
    /// anyone reads them).
    static func make(count: Int, _ fill: (UnsafeMutableBufferPointer<UInt8>) throws -> Void) rethrows -> NameBytes {
        let buffer = unsafeDowncast(create(minimumCapacity: count) { _ in count }, to: NameBytes.self)
        try buffer.withUnsafeMutablePointerToElements { try fill(UnsafeMutableBufferPointer(start: $0, count: count)) }
        return buffer
    }

    /// The bytes.
    var count: Int { header }

    func withBytes<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        try withUnsafeMutablePointerToElements { try body(UnsafeBufferPointer(start: $0, count: header)) }
    }

    /// The UTF-8 bytes of the name whose length prefix is at `at` (followed by a NUL), lent to `body`.
    func withName<R>(at: Int, _ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        try withUnsafeMutablePointerToElements { base in
            let (start, length) = storedName(at: at, in: UnsafePointer(base))
            return try body(UnsafeBufferPointer(start: base + start, count: length))
        }
    }

    /// Bytes a name takes: length prefix, UTF-8, NUL.
    static func storedSize(utf8Count n: Int) -> Int {
        var prefix = 1
        var v = n >> 7
        while v > 0 { prefix += 1; v >>= 7 }
        return prefix + n + 1
    }

    /// Writes `utf8` as one name at `at`; returns the offset after it.
    static func write(_ utf8: UnsafeBufferPointer<UInt8>, at: Int, into base: UnsafeMutablePointer<UInt8>) -> Int {
        var at = at
        var n = utf8.count
        repeat {
            base[at] = UInt8(truncatingIfNeeded: n & 0x7f) | (n >= 0x80 ? 0x80 : 0)
            n >>= 7
            at += 1
        } while n > 0
        if let src = utf8.baseAddress { (base + at).initialize(from: src, count: utf8.count) }
        at += utf8.count
        base[at] = 0
        return at + 1
    }
}

/// Where the bytes of the name whose length prefix (LEB128) is at `at` start, and their count:
/// the one reader of the layout, for `NameBytes` and for `SymbolNames`' inline bytes.
@usableFromInline @inline(__always)
func storedName(at: Int, in base: UnsafePointer<UInt8>) -> (start: Int, count: Int) {
    var p = at
    var n = 0
    var shift = 0
    while true {
        let b = base[p]
        p += 1
        n |= Int(b & 0x7f) << shift
        if b & 0x80 == 0 { break }
        shift += 7
    }
    return (p, n)
}
