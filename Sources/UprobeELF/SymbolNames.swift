import Synchronization

/// Symbol names of many `ResolvedProbe`s in one buffer, which each probe references by the
/// offset of its name.
///
/// A whole binary's glob resolves 241,000 functions whose (mangled C++) names average 107
/// bytes: one `String` each was 151 bytes of heap per probe (string header and terminator)
/// plus malloc's own per-block overhead, 36 MB in all. Packed (`NameBytes`) they take 2-3
/// bytes on top of the name, and a reader gets the bytes without making a String (replies
/// and the state file write them out as bytes; `fnmatch` reads them in place).
///
/// Packed, they were still a third of the heap a resident whole binary holds, so a large
/// buffer is compressed (`compact`, by `NameCompactor` some seconds after it is made, off the
/// register's way): ~16 bytes a name. Readers meanwhile and after are unaffected but for
/// speed: the storage is swapped under a lock, a reader keeps what it took until it is done,
/// and offsets stay the same. A read of a compressed name decodes its block (16 KiB, ~30 µs)
/// unless one of the last two blocks decoded holds it, so a scan in order (`list`, a glob
/// over the symbols) decodes each block once.
///
/// A small buffer (below the compactor's `minimumBytes`, or made without one: a restore
/// resolves each named function apart, one buffer each) keeps its bytes in this object, as
/// one allocation, and is read without a lock; a large one keeps them in a `NameStore`.
///
/// Immutable itself (a large buffer's store does its own locking), so shared between threads
/// freely (a `ManagedBuffer` cannot declare itself `Sendable`: `ResolvedFile` holds it unchecked).
public final class SymbolNames: ManagedBuffer<SymbolNames.Header, UInt8> {
    public struct Header {
        /// Uncompressed bytes of the names.
        @usableFromInline let byteCount: Int
        /// A large buffer's storage (its bytes are not in this object), nil for a small one.
        /// Apart from this object so that a `NameCompactor` can hold it until its delay
        /// without keeping the names alive (`deinit` releases them) and without a weak
        /// reference to this one: a weak reference moves an object's reference count aside,
        /// and every retain and release of it (a register's 241,000 (buffer, offset) pairs
        /// each retain it) then takes the slow path.
        @usableFromInline let store: NameStore?
    }

    deinit { header.store?.release() }

    /// Uncompressed bytes of the names (for measurements and tests).
    public var byteCount: Int { header.byteCount }

    /// Packs `names` (nil: no name) into as few buffers as their offsets allow (a buffer's
    /// offsets are 32-bit): the buffer and offset of each name, in order. Each buffer of at
    /// least `compactor.minimumBytes` is handed to `compactor` (`NameCompactor.schedule`).
    public static func pack(_ names: some Collection<String?>, compactor: NameCompactor? = nil) -> [(names: SymbolNames, at: UInt32)?] {
        pack(names, storeFrom: compactor?.minimumBytes, compactor: compactor)
    }

    /// `storeFrom`: buffers of at least this many bytes keep them in a `NameStore` (can be
    /// compressed); nil: none.
    static func pack(_ names: some Collection<String?>, storeFrom: Int?, compactor: NameCompactor? = nil) -> [(names: SymbolNames, at: UInt32)?] {
        let names = Array(names)
        return pack(count: names.count, utf8Count: { names[$0]?.utf8.count }, withUTF8: { i, write in
            guard var name = names[i] else { return }
            name.withUTF8(write)
        }, storeFrom: storeFrom, compactor: compactor)
    }

    /// `pack` of `count` names given by their UTF-8 bytes: `utf8Count(i)` is name i's length
    /// (nil: no name), and `withUTF8(i, write)` calls `write` once with its bytes. A resolver
    /// packs a glob's names straight from its symbol table this way: a String made per name
    /// (twice: sized, then written) took a third of resolving a whole binary.
    public static func pack(count: Int, utf8Count: (Int) -> Int?, withUTF8: (Int, (UnsafeBufferPointer<UInt8>) -> Void) -> Void,
                            storeFrom: Int?, compactor: NameCompactor? = nil) -> [(names: SymbolNames, at: UInt32)?] {
        var out: [(names: SymbolNames, at: UInt32)?] = []
        out.reserveCapacity(count)
        var start = 0
        while start != count {
            // The names that fit in one buffer.
            var total = 0
            var end = start
            while end != count {
                let size = utf8Count(end).map { NameBytes.storedSize(utf8Count: $0) } ?? 0
                // Offsets below UInt32.max (`ResolvedProbe.noName`).
                if total + size >= Int(UInt32.max), end != start { break }
                total += size
                end += 1
            }
            let buffer: SymbolNames
            func fill(_ base: UnsafeMutablePointer<UInt8>) {
                var at = 0
                for i in start..<end {
                    withUTF8(i) { at = NameBytes.write($0, at: at, into: base) }
                }
            }
            if let storeFrom, total >= storeFrom {
                let bytes = NameBytes.make(count: total) { if let base = $0.baseAddress { fill(base) } }
                let store = NameStore(bytes)
                buffer = unsafeDowncast(create(minimumCapacity: 0) { _ in Header(byteCount: total, store: store) }, to: SymbolNames.self)
                compactor?.schedule(store)
            } else {
                buffer = unsafeDowncast(create(minimumCapacity: total) { _ in Header(byteCount: total, store: nil) }, to: SymbolNames.self)
                buffer.withUnsafeMutablePointerToElements { fill($0) }
            }
            var at = 0
            for i in start..<end {
                guard let n = utf8Count(i) else { out.append(nil); continue }
                out.append((buffer, UInt32(truncatingIfNeeded: at)))
                at += NameBytes.storedSize(utf8Count: n)
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

    /// The UTF-8 bytes of the name at `at` (followed in memory by a NUL), lent to `body`.
    @inlinable
    public func withName<R>(at: UInt32, _ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        if let store = header.store { return try store.withName(at: Int(at), body) }
        return try withUnsafeMutablePointerToElements { base in
            let (start, count) = storedName(at: Int(at), in: UnsafePointer(base))
            return try body(UnsafeBufferPointer(start: base + start, count: count))
        }
    }

    /// The name at `at` as a String.
    public func name(at: UInt32) -> String { withName(at: at) { String(decoding: $0, as: UTF8.self) } }

    /// Bytes the names take now: `byteCount`, or the compressed blocks and what goes with them
    /// (without the recently decoded blocks).
    public var storedBytes: Int { header.store?.storedBytes ?? header.byteCount }

    /// Whether the names are compressed.
    public var isCompressed: Bool { header.store?.isCompressed ?? false }

    /// Compresses the names of a large buffer (once; nothing if they are already compressed,
    /// if compressing fails, or for a small buffer): the sizes before and after. Readers at
    /// the same time read either form; the uncompressed bytes are freed inside `releasing`'s
    /// call of its argument (or, if a reader still holds them then, when it is done).
    public func compact(releasing: (_ free: () -> Void) -> Void = { $0() }) -> (plainBytes: Int, storedBytes: Int)? {
        header.store?.compact(releasing: releasing)
    }
}
