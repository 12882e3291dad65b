import UprobeSystem

/// Where a `SymbolNames` keeps its names: plain (`NameBytes`) or compressed
/// (`CompressedNames`), swapped under a lock; released when the `SymbolNames` goes.
///
/// A reader takes what it needs under the lock and reads outside it: the plain bytes or a
/// decoded block, which stay alive while it holds them, so a swap (or the release) under a
/// reader's feet frees nothing it reads. The last two blocks decoded are kept for the next
/// readers.
@usableFromInline
final class NameStore: Sendable {
    // @unchecked (both): `NameBytes` is immutable once made, but a ManagedBuffer cannot say so.
    private enum Storage: @unchecked Sendable {
        case plain(NameBytes)
        /// `recent`: the last blocks decoded (most recent first), with the stretch each covers.
        case compressed(CompressedNames, recent: [(plain: Range<Int>, bytes: NameBytes)])
        /// The `SymbolNames` is gone (a compactor may still hold this).
        case released
    }

    /// Where a reader finds a name, taken under the lock and read outside it.
    private enum Source: @unchecked Sendable {
        case bytes(NameBytes, offset: Int)
        case decode(CompressedNames)
    }

    /// A pthread mutex, which ThreadSanitizer understands (`PThreadMutex`).
    private let storage: PThreadMutex<Storage>
    let byteCount: Int

    /// Blocks decoded recently that a buffer keeps: two scans at once (a `list` and a
    /// `stats`) each find their block again.
    static let recentBlocks = 2

    init(_ bytes: NameBytes) {
        storage = PThreadMutex(.plain(bytes))
        byteCount = bytes.count
    }

    /// Drops the names (their `SymbolNames` is gone).
    func release() {
        // Freed outside the lock.
        let dropped = storage.withLock { s -> Storage in
            let was = s
            s = .released
            return was
        }
        _ = dropped
    }

    /// The UTF-8 bytes of the name whose length prefix is at `at` (followed in memory by a
    /// NUL), lent to `body`.
    @usableFromInline
    func withName<R>(at: Int, _ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        switch source(at) {
        case .bytes(let bytes, let offset):
            return try bytes.withName(at: at - offset, body)
        case .decode(let compressed):
            let (index, plain) = compressed.block(containing: at)
            guard let bytes = compressed.decode(block: index) else {
                // `CompressedNames.make` decoded every block once: only memory exhaustion gets here.
                preconditionFailure("a compressed names block did not decode")
            }
            storage.withLock { s in
                // Another reader may have decoded the same block meanwhile.
                guard case .compressed(let c, var recent) = s, c === compressed, !recent.contains(where: { $0.plain == plain }) else { return }
                recent.insert((plain, bytes), at: 0)
                if recent.count > Self.recentBlocks { recent.removeLast() }
                s = .compressed(c, recent: recent)
            }
            return try bytes.withName(at: at - plain.lowerBound, body)
        }
    }

    private func source(_ at: Int) -> Source {
        storage.withLock { s in
            switch s {
            case .plain(let bytes):
                return .bytes(bytes, offset: 0)
            case .compressed(let c, let recent):
                for r in recent where r.plain.contains(at) { return .bytes(r.bytes, offset: r.plain.lowerBound) }
                return .decode(c)
            case .released:
                // Only `SymbolNames` reads, and it releases the names in its deinit.
                preconditionFailure("names read after their release")
            }
        }
    }

    /// Bytes the names take now (without the recently decoded blocks).
    var storedBytes: Int {
        storage.withLock { s in
            switch s {
            case .plain(let bytes): return bytes.count
            case .compressed(let c, _): return c.storedBytes
            case .released: return 0
            }
        }
    }

    var isCompressed: Bool {
        storage.withLock { s in
            if case .compressed = s { return true }
            return false
        }
    }

    /// See `SymbolNames.compact`; nil also once released (the `SymbolNames` went meanwhile).
    func compact(releasing: (_ free: () -> Void) -> Void) -> (plainBytes: Int, storedBytes: Int)? {
        // In a closure of its own: no reference to the plain bytes outlives it.
        let made: CompressedNames? = {
            guard case .plain(let bytes) = storage.withLock({ $0 }) else { return nil }
            return CompressedNames.make(bytes)
        }()
        guard let made else { return nil }
        var replaced: NameBytes? = storage.withLock { s in
            guard case .plain(let bytes) = s else { return nil }
            s = .compressed(made, recent: [])
            return bytes
        }
        guard replaced != nil else { return nil }
        releasing { replaced = nil }
        return (byteCount, made.storedBytes)
    }
}
