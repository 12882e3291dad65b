import CUprobeSys
import Dispatch
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A bounded cache of parsed ELF files keyed by identity *and* version of the file
/// (dev, inode, size, mtime, ctime), so a 10,000-probe request against libc parses libc once,
/// while a rebuilt or replaced binary is re-parsed. A new version read at a path drops the
/// version cached for that path before, so a binary upgraded every few seconds does not fill
/// the cache with its old parses.
///
/// Bounded by bytes as well as by count (`ELFFile.estimatedBytes`): any peer that may resolve
/// can make the daemon parse files of its choosing, and one parse of a 300,000-symbol binary
/// holds about 80 MB. A parse larger than the whole budget is used once and not kept. Memory
/// freed by an eviction is handed back to the kernel (malloc_trim), or a burst of large parses
/// would leave the daemon's RSS at its peak. A parse not used for one to two `idleLifetime`s
/// is dropped too: a whole binary's parse (35 MB for 246,000 symbols) is worth keeping while requests
/// for that file come, not for the rest of the daemon's life. Thread-safe; parsing happens
/// outside the lock.
public final class ELFFileCache: Sendable {
    struct Key: Hashable {
        var dev: UInt64, ino: UInt64, size: Int64
        var mtime: Int, mtimeNs: Int, ctime: Int, ctimeNs: Int
        var debugDirectories: [String]
    }

    /// A parse, and whether it was handed out since the last sweep: a flag, not a time, so a
    /// hit reads no clock (clock_gettime is a system call in some VMs: 10,000 of them made a
    /// 10,000-name resolve measurably slower).
    private struct Cached {
        var file: ELFFile
        var used = true
    }

    private struct State {
        var entries: [Key: Cached] = [:]
        var sweepScheduled = false
        var order: [Key] = []            // least recently inserted first
        /// The version last cached for each path (only versions still cached).
        var newestAt: [String: Key] = [:]
        /// Sum of the cached parses' `estimatedBytes`.
        var bytes = 0

        mutating func remove(_ key: Key) {
            if let gone = entries.removeValue(forKey: key) { bytes -= gone.file.estimatedBytes }
            order.removeAll { $0 == key }
            newestAt = newestAt.filter { $0.value != key }
        }
    }

    /// Maximum number of parsed files kept.
    public let capacity: Int
    /// Maximum sum of the kept parses' estimated sizes, in bytes.
    public let byteBudget: Int
    private let state = Mutex(State())

    /// A parse unused for one to two of these is dropped.
    public let idleLifetime: Duration

    public static let defaultByteBudget = 256 << 20

    public init(capacity: Int = 64, byteBudget: Int = ELFFileCache.defaultByteBudget, idleLifetime: Duration = .seconds(5)) {
        self.capacity = max(0, capacity)
        self.byteBudget = max(0, byteBudget)
        self.idleLifetime = idleLifetime
    }

    /// The parsed file open on `fd`, from the cache when the file has not changed.
    /// - Parameter debugDirectories: when the file has no `.symtab`, attach the symbols of
    ///   `DIR/.build-id/xx/yyyy.debug` from the first directory that has a matching one.
    public func file(fd: FileDescriptor, path: String, debugDirectories: [String] = []) throws(ResolveError) -> ELFFile {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else { return try Self.parse(fd: fd, path: path, debugDirectories: debugDirectories) }
        let key = Key(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino), size: Int64(st.st_size),
                      mtime: st.st_mtim.tv_sec, mtimeNs: st.st_mtim.tv_nsec,
                      ctime: st.st_ctim.tv_sec, ctimeNs: st.st_ctim.tv_nsec, debugDirectories: debugDirectories)
        if let hit = state.withLock({ s -> ELFFile? in
            guard let at = s.entries.index(forKey: key) else { return nil }
            s.entries.values[at].used = true
            return s.entries.values[at].file
        }) { return hit }
        let parsed = try Self.parse(fd: fd, path: path, debugDirectories: debugDirectories)
        guard capacity > 0, parsed.estimatedBytes <= byteBudget else { return parsed }
        let (evicted, sweep) = state.withLock { s -> (Int, Bool) in
            let before = s.bytes
            if let older = s.newestAt[path], older != key { s.remove(older) }
            s.newestAt[path] = key
            if let replaced = s.entries.updateValue(Cached(file: parsed), forKey: key) {
                s.bytes -= replaced.file.estimatedBytes
            } else {
                s.order.append(key)
            }
            s.bytes += parsed.estimatedBytes
            while s.order.count > capacity || s.bytes > byteBudget, let oldest = s.order.first {
                s.remove(oldest)
            }
            let sweep = !s.sweepScheduled && !s.entries.isEmpty
            if sweep { s.sweepScheduled = true }
            return (before + parsed.estimatedBytes - s.bytes, sweep)
        }
        // Only after a real eviction (a few MB): a trim walks the heap.
        if evicted >= Self.trimThreshold { _ = malloc_trim(0) }
        if sweep { scheduleSweep(after: idleLifetime) }
        return parsed
    }

    /// Every `idleLifetime` while parses are kept: drops those not handed out since the sweep
    /// before (so an unused parse goes after one to two lifetimes).
    private func scheduleSweep(after delay: Duration) {
        let nanos = Int(min(delay.components.seconds, 86_400)) * 1_000_000_000 + Int(delay.components.attoseconds / 1_000_000_000)
        DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + .nanoseconds(max(nanos, 1_000_000))) { [weak self] in
            self?.sweep()
        }
    }

    private func sweep() {
        var (dropped, again) = state.withLock { s -> ([ELFFile], Bool) in
            var dropped: [ELFFile] = []
            for (key, entry) in s.entries where !entry.used {
                dropped.append(entry.file)
                s.remove(key)
            }
            for i in s.entries.indices { s.entries.values[i].used = false }
            s.sweepScheduled = !s.entries.isEmpty
            return (dropped, s.sweepScheduled)
        }
        if dropped.reduce(0, { $0 + $1.estimatedBytes }) >= Self.trimThreshold {
            // Freed here, outside the lock, in a heap-release window: the frees hand the top of
            // the arena the parse was made in back too, which malloc_trim cannot (see
            // `CUprobeSys_heap_release_begin`; a whole binary's parse lay in such a top).
            CUprobeSys_heap_release_begin()
            dropped.removeAll()
            _ = malloc_trim(0)
            CUprobeSys_heap_release_end()
        }
        if again { scheduleSweep(after: idleLifetime) }
    }

    static let trimThreshold = 4 << 20

    static func parse(fd: FileDescriptor, path: String, debugDirectories: [String]) throws(ResolveError) -> ELFFile {
        // Instructions are checked once the debug file's names (more function starts) are in.
        var elf = try ELFFile(fd: fd, path: path, checkingInstructions: false)
        if !elf.hasSymtab, let bid = elf.buildID, bid.count > 2 {
            for dir in debugDirectories {
                let p = "\(dir)/.build-id/\(bid.prefix(2))/\(bid.dropFirst(2)).debug"
                // Best effort: a missing, unreadable, corrupt or mismatched debug file is not used.
                // Its code sections are empty (NOBITS): only its names are used, never its bytes.
                guard fileExists(p), let dbg = try? ELFFile(path: p, checkingInstructions: false) else { continue }
                if elf.attachDebugSymbols(dbg, path: p) { break }
            }
        }
        try elf.checkInstructions(fd: fd, path: path)
        return elf
    }

    /// Number of cached files (for tests and status).
    public var count: Int { state.withLock { $0.entries.count } }
    /// Sum of the cached parses' estimated sizes (for tests and status).
    public var bytes: Int { state.withLock { $0.bytes } }
}
