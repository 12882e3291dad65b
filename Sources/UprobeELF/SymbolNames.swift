/// Symbol names of many `ResolvedProbe`s in one block of memory, which each probe references
/// by the offset of its name.
///
/// A whole binary's glob resolves 241,000 functions whose (mangled C++) names average 107
/// bytes: one `String` each was 151 bytes of heap per probe (string header and terminator)
/// plus malloc's own per-block overhead, 36 MB in all. Packed here they take 2-3 bytes on top
/// of the name. A name is stored as its length (LEB128), its UTF-8 bytes and a NUL, so a
/// reader gets the bytes without making a String (replies and the state file write them out
/// as bytes) and `fnmatch` reads them in place.
///
/// Immutable once made (`pack`), hence `@unchecked Sendable`.
public final class SymbolNames: ManagedBuffer<Int, UInt8>, @unchecked Sendable {
    /// Packs `names` (nil: no name) into as few buffers as their offsets allow (a buffer's
    /// offsets are 32-bit): the buffer and offset of each name, in order.
    public static func pack(_ names: some Collection<String?>) -> [(names: SymbolNames, at: UInt32)?] {
        let names = Array(names)
        return pack(count: names.count, utf8Count: { names[$0]?.utf8.count }) { i, write in
            guard var name = names[i] else { return }
            name.withUTF8(write)
        }
    }

    /// `pack` of `count` names given by their UTF-8 bytes: `utf8Count(i)` is name i's length
    /// (nil: no name), and `withUTF8(i, write)` calls `write` once with its bytes. A resolver
    /// packs names straight from a symbol table this way, without a String per name.
    public static func pack(count: Int, utf8Count: (Int) -> Int?,
                            withUTF8: (Int, (UnsafeBufferPointer<UInt8>) -> Void) -> Void) -> [(names: SymbolNames, at: UInt32)?] {
        var out: [(names: SymbolNames, at: UInt32)?] = []
        out.reserveCapacity(count)
        var start = 0
        while start != count {
            // The names that fit in one buffer.
            var total = 0
            var end = start
            while end != count {
                let size = utf8Count(end).map(Self.storedSize(utf8Count:)) ?? 0
                // Offsets below UInt32.max (`ResolvedProbe.noName`).
                if total + size >= Int(UInt32.max), end != start { break }
                total += size
                end += 1
            }
            let buffer = unsafeDowncast(Self.create(minimumCapacity: total) { _ in total }, to: SymbolNames.self)
            buffer.withUnsafeMutablePointerToElements { base in
                var at = 0
                for i in start..<end {
                    guard utf8Count(i) != nil else { out.append(nil); continue }
                    out.append((buffer, UInt32(truncatingIfNeeded: at)))
                    withUTF8(i) { utf8 in
                        var n = utf8.count
                        repeat {
                            base[at] = UInt8(truncatingIfNeeded: n & 0x7f) | (n >= 0x80 ? 0x80 : 0)
                            n >>= 7
                            at += 1
                        } while n > 0
                        if let src = utf8.baseAddress { (base + at).initialize(from: src, count: utf8.count) }
                        at += utf8.count
                        base[at] = 0
                        at += 1
                    }
                }
            }
            start = end
        }
        return out
    }

    /// One name in a buffer of its own.
    public static func single(_ name: String) -> (names: SymbolNames, at: UInt32) {
        guard let packed = pack(CollectionOfOne(Optional(name))).first ?? nil else {
            preconditionFailure("a name packs to one entry")
        }
        return packed
    }

    /// Bytes a name of `n` UTF-8 bytes takes here: length prefix, UTF-8, NUL.
    static func storedSize(utf8Count n: Int) -> Int {
        var prefix = 1
        var v = n >> 7
        while v > 0 { prefix += 1; v >>= 7 }
        return prefix + n + 1
    }

    /// The UTF-8 bytes of the name at `at` (followed in memory by a NUL), lent to `body`.
    @inlinable
    public func withName<R>(at: UInt32, _ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        try withUnsafeMutablePointerToElements { base in
            var p = Int(at)
            var n = 0
            var shift = 0
            while true {
                let b = base[p]
                p += 1
                n |= Int(b & 0x7f) << shift
                if b & 0x80 == 0 { break }
                shift += 7
            }
            return try body(UnsafeBufferPointer(start: base + p, count: n))
        }
    }

    /// The name at `at` as a String.
    public func name(at: UInt32) -> String { withName(at: at) { String(decoding: $0, as: UTF8.self) } }

    /// Bytes used by the names (for measurements and tests).
    public var byteCount: Int { header }
}
