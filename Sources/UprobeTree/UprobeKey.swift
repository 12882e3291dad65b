// The plain-old-data vocabulary of the uprobes tree: key, consumer record, batch edit.
//
// Everything stored in the tree is `BitwiseCopyable`, so readers copy values out of node memory
// with plain loads: no ARC retain/release, no shared-cache-line writes. Strings (paths, specs,
// consumer names) are kept by the engine, keyed by registration id.

/// The kernel's own key for a uprobe: the (device, inode) of the probed file and the file offset.
///
/// Two paths reaching the same binary (hard link, symlink, bind mount) have the same
/// `(st_dev, st_ino)`, so they are the same uprobe. The caller computes the key from `fstat(2)`
/// of the opened file; see ``init(dev:inode:offset:)``.
///
/// Ordering is lexicographic on (dev, inode, offset), so all probes of one file are contiguous
/// and sorted by offset (``TreeView/forEach(dev:inode:_:)`` relies on it).
@frozen
public struct UprobeKey: Hashable, Comparable, Sendable, BitwiseCopyable, CustomStringConvertible {
    public var dev: UInt64
    public var inode: UInt64
    public var offset: UInt64

    /// - Parameters:
    ///   - dev: `st_dev` of the probed file (from `fstat`, not from the path string).
    ///   - inode: `st_ino` of the probed file.
    ///   - offset: file offset of the probed instruction (what `uprobe_multi` takes).
    @inlinable
    public init(dev: UInt64, inode: UInt64, offset: UInt64) {
        self.dev = dev
        self.inode = inode
        self.offset = offset
    }

    @inlinable
    public static func < (a: UprobeKey, b: UprobeKey) -> Bool {
        if a.dev != b.dev { return a.dev < b.dev }
        if a.inode != b.inode { return a.inode < b.inode }
        return a.offset < b.offset
    }

    public var description: String {
        "\(dev):\(inode)+0x\(String(offset, radix: 16))"
    }
}

/// One consumer (registration) of a uprobe. 20 bytes, 4-byte aligned, plain data.
///
/// Packed for the daemon's per-probe memory: a uprobe with one consumer is one malloc block of
/// `NodeHeader` (52 bytes) plus this, 72 bytes, which glibc serves from an 80-byte chunk (a
/// request of 73 bytes or more takes 96). The registration id is kept as two 32-bit halves so
/// that the struct needs only 4-byte alignment and follows the 52-byte header without padding.
/// Hits are counted relative to the registry's records (`baseHits`), not here.
@frozen
public struct Consumer: Hashable, Sendable, BitwiseCopyable {
    @usableFromInline var registrationLow: UInt32
    @usableFromInline var registrationHigh: UInt32
    /// Counter slot in the counters map.
    public var slot: UInt32
    /// Pid filter: 0 = any process.
    public var pid: Int32
    /// Bit 0 = return probe (`Consumer.retprobe`); other bits reserved for the engine.
    public var flags: UInt32

    public static let retprobe: UInt32 = 1

    @inlinable
    public init(registration: UInt64, slot: UInt32, pid: Int32 = 0, flags: UInt32 = 0) {
        registrationLow = UInt32(truncatingIfNeeded: registration)
        registrationHigh = UInt32(truncatingIfNeeded: registration >> 32)
        self.slot = slot
        self.pid = pid
        self.flags = flags
    }

    /// Registration id (unique per registration; the engine maps it to its spec and name).
    @inlinable public var registration: UInt64 {
        get { UInt64(registrationHigh) << 32 | UInt64(registrationLow) }
        set {
            registrationLow = UInt32(truncatingIfNeeded: newValue)
            registrationHigh = UInt32(truncatingIfNeeded: newValue >> 32)
        }
    }

    @inlinable public var isRetprobe: Bool { flags & Consumer.retprobe != 0 }
}

/// One edit of a batch. A batch is applied atomically by ``UprobeTree/apply(_:)``.
public enum TreeEdit: Hashable, Sendable {
    /// Adds `consumer` to the uprobe `key`, creating the uprobe if needed. If the uprobe already
    /// has a consumer with the same registration id, that consumer is replaced (upsert).
    case insertConsumer(UprobeKey, Consumer)
    /// Removes the consumer with this registration id from `key`; the uprobe goes away with its
    /// last consumer. No-op if absent.
    case removeConsumer(UprobeKey, registration: UInt64)
    /// Removes the uprobe `key` with all its consumers. No-op if absent.
    case removeKey(UprobeKey)
}

/// What a batch did (returned by ``UprobeTree/apply(_:)``).
public struct BatchResult: Hashable, Sendable {
    /// Sequence number of the version published by this batch (unchanged if nothing changed).
    public var version: UInt64
    public var keysAdded: Int
    public var keysRemoved: Int
    public var consumersAdded: Int
    public var consumersRemoved: Int
    public var consumersReplaced: Int
    /// Whether a new version was published.
    public var published: Bool { keysAdded + keysRemoved + consumersAdded + consumersRemoved + consumersReplaced > 0 }
}

#if canImport(Glibc)
import Glibc

extension UprobeKey {
    /// The key of `offset` in the file described by `st` (from `fstat` on the opened binary).
    /// Hard links, symlinks and bind mounts of one binary share (st_dev, st_ino), hence the key.
    @inlinable
    public init(_ st: stat, offset: UInt64) {
        self.init(dev: UInt64(st.st_dev), inode: UInt64(st.st_ino), offset: offset)
    }
}
#endif
