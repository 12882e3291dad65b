import UprobeSystem

#if canImport(Glibc)
import Glibc
#endif

/// A file as the kernel tells uprobes apart: its `(st_dev, st_ino)`. Two paths to one binary
/// (a hard link, a symlink, a bind mount) are one file; a new file renamed over a path (an
/// upgrade) is another, even at the same path.
public struct FileID: Hashable, Sendable, CustomStringConvertible {
    public var device: UInt64
    public var inode: UInt64
    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }

    public var description: String { "\(device):\(inode)" }
}

/// One binary held open, checked to be the file it was resolved as.
///
/// uprobe_multi takes a path and resolves it when the link is made. Handed the path the client
/// named, a link made after the file there was replaced would probe the new file at offsets
/// resolved in the old one; handed `/proc/self/fd/N` (`kernelPath`), it reaches the inode this
/// descriptor holds, whatever happened at the path since. The descriptor is closed when the
/// last reference goes.
public final class PinnedBinary {
    public let file: FileID
    public let descriptor: Int32

    /// The name the kernel resolves to this descriptor's file.
    public var kernelPath: String { "/proc/self/fd/\(descriptor)" }

    private init(file: FileID, descriptor: Int32) {
        self.file = file
        self.descriptor = descriptor
    }

    /// Opens the file at `path` if it is `file`. Returns nil when there is nothing to pin: the
    /// path cannot be opened, or is not a regular file (the caller passes the path on and lets
    /// the kernel report what is wrong with it). Throws `file_changed` when `path` now names
    /// another file: it was replaced after it was resolved.
    ///
    /// Opened read-only and non-blocking, without becoming a controlling terminal: the path may
    /// name a FIFO or a device by now, and the caller is the engine's writer thread, which must
    /// not hang on it.
    public static func open(_ path: String, expecting file: FileID) throws(KernelError) -> PinnedBinary? {
        guard let fd = try? Syscall.run("open", path, { Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY) })
        else { return nil }
        var st = stat()
        guard (try? Syscall.run("fstat", path, { fstat(fd, &st) })) != nil, (st.st_mode & S_IFMT) == S_IFREG else {
            _ = Glibc.close(fd)
            return nil
        }
        let found = FileID(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        guard found == file else {
            _ = Glibc.close(fd)
            throw KernelError(code: .fileChanged,
                              message: "\(path) was replaced after it was resolved (inode \(file.inode) -> \(found.inode)); resolve again")
        }
        return PinnedBinary(file: file, descriptor: fd)
    }

    // close(2) is not retried on EINTR: Linux has released the descriptor by then, and a retry
    // could close one another thread was just given.
    deinit { _ = Glibc.close(descriptor) }
}

/// The binaries a set of links was made from, one descriptor per file: pinned when the first
/// link of a file is made, kept while any link of it may be rebuilt (a rebuild after the path
/// was replaced still reaches the old file), closed when the owner unpins it. Not thread-safe:
/// one owner (the engine's writer thread) uses it.
public struct PinnedFiles {
    private var pinned: [FileID: PinnedBinary] = [:]

    public init() {}

    /// Files pinned now.
    public var count: Int { pinned.count }

    public func isPinned(_ file: FileID) -> Bool { pinned[file] != nil }

    /// The path to hand the kernel for `file`, which was resolved at `path`: its pinned
    /// descriptor's `/proc/self/fd/N`, pinning it first if it is not yet. A path that cannot be
    /// pinned (`PinnedBinary.open` returns nil) is returned as it is. Throws `file_changed` if
    /// `path` names another file now.
    public mutating func kernelPath(for file: FileID, at path: String) throws(KernelError) -> String {
        if let pin = pinned[file] { return pin.kernelPath }
        guard let pin = try PinnedBinary.open(path, expecting: file) else { return path }
        pinned[file] = pin
        return pin.kernelPath
    }

    /// Closes the descriptor of `file` (no link needs it any more).
    public mutating func unpin(_ file: FileID) {
        pinned.removeValue(forKey: file)
    }

    /// Closes every descriptor.
    public mutating func unpinAll() {
        pinned.removeAll()
    }
}
