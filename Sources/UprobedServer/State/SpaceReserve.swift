import Logging
import Synchronization
import SystemPackage
import UprobeSystem
#if canImport(Glibc)
import Glibc
import UprobeErrors
#endif

/// Space held in the state directory for the state writes that must not fail when its file
/// system fills up: a file (`state.reserve`) of allocated blocks, deleted to make room.
///
/// When a log line that removes registrations, or a snapshot, fails with ENOSPC or EDQUOT, the
/// store deletes the reserve and makes the write once more (`StateStore.withReserve`). A
/// removal is acknowledged to its client and the probes stop counting either way; without its
/// line on disk a restart would bring them back. Lines that only add registrations never use
/// the reserve: on a full disk they fail (`state_write_failed`) and leave it to removals.
///
/// Once the reserve is gone, each later state write checks the free space (statvfs(2)) and
/// re-creates it when twice its size is free, so that making it does not fill the disk again.
public final class SpaceReserve: Sendable {
    /// A removal line costs at most 8 bytes per id (`1234567,`, for scattered ids; consecutive
    /// ones are one range): 10,000 scattered 7-digit ids take 80,031 bytes
    /// (`StateSpaceTests.reserveSize`). 1 MiB holds the line of a batch removing ~130,000 such
    /// ids at once, or thirteen 10,000-id requests in a row.
    public static let defaultBytes = 1 << 20

    public let path: String
    /// The directory it is in (the state directory).
    let dir: String
    public let bytes: Int
    let logger: Logger?
    /// Bytes held now (0 or `bytes`), for `status`.
    private let held = Atomic<Int>(0)
    /// Serializes making and deleting the file (the writer appends while a snapshot is written
    /// on another thread; both may reach for the reserve). Holds when making it last failed:
    /// a file system that refuses it for another reason than space (read-only, no
    /// fallocate) is not asked again at every write.
    private let lock = Mutex<ContinuousClock.Instant?>(nil)
    static let retryAfterFailure = Duration.seconds(10)

    public init(dir: String, bytes: Int = SpaceReserve.defaultBytes, logger: Logger? = nil) {
        self.dir = dir
        self.path = dir + "/state.reserve"
        self.bytes = bytes
        self.logger = logger
    }

    public var heldBytes: Int { held.load(ordering: .relaxed) }

    /// Makes the reserve (or completes one a crash left short). At start; a warning if the
    /// file system refused.
    func create() {
        lock.withLock { failedAt in
            if let why = make() {
                failedAt = .now
                logger?.warning("cannot make the state directory's space reserve; a full disk will fail removals",
                                metadata: ["path": "\(path)", "bytes": "\(bytes)", "error": "\(why)"])
            }
        }
    }

    /// Deletes the reserve to make room for `failed`'s write to be tried again. False if there
    /// was none to delete (nothing freed: not worth a retry).
    func release(for failed: StateError) -> Bool {
        lock.withLock { failedAt in
            failedAt = nil
            guard held.load(ordering: .relaxed) > 0 else { return false }
            held.store(0, ordering: .relaxed)
            do throws(SyscallError) { try Syscall.run("unlink", path) { unlink(path) } } catch {
                guard error.errno == .noSuchFileOrDirectory else { return false }
            }
            // On ext4, blocks freed by a transaction that has not committed are not handed out
            // again; syncing the directory commits it.
            let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if dfd >= 0 {
                _ = fsync(dfd)
                close(dfd)
            }
            logger?.error("the state directory's file system is full: its space reserve was deleted so that a state write could be made; free space there (the reserve comes back by itself)",
                          metadata: ["error_code": "\(ErrorCode.stateDiskFull)", "path": "\(path)", "bytes": "\(bytes)",
                                     "error": "\(failed.message)"])
            return true
        }
    }

    /// Whether deleting the reserve would make room for a file of `size` bytes.
    func couldHold(_ size: Int) -> Bool {
        let held = heldBytes
        return held > 0 && freeBytes() + held >= size
    }

    /// After a state write: makes the reserve again if it is gone and twice its size is free.
    func replenish() {
        guard held.load(ordering: .relaxed) == 0 else { return }
        lock.withLock { failedAt in
            guard held.load(ordering: .relaxed) == 0 else { return }
            if let failedAt, ContinuousClock.now - failedAt < Self.retryAfterFailure { return }
            guard freeBytes() >= 2 * bytes else { return }
            if make() == nil {
                failedAt = nil
                logger?.notice("the state directory's space reserve is back", metadata: ["path": "\(path)", "bytes": "\(bytes)"])
            } else {
                failedAt = .now
            }
        }
    }

    /// Space an unprivileged writer could still use on the reserve's file system (statvfs(2));
    /// 0 if unknown.
    private func freeBytes() -> Int {
        var fs = statvfs()
        guard statvfs(dir, &fs) == 0 else { return 0 }
        let (free, overflow) = UInt64(fs.f_bavail).multipliedReportingOverflow(by: UInt64(fs.f_frsize))
        return overflow ? Int.max : Int(clamping: free)
    }

    /// Allocates the file's blocks (posix_fallocate(3): fallocate(2), or glibc writes them
    /// where the file system does not support it). nil on success, else what failed; a
    /// partial file is deleted.
    private func make() -> SyscallError? {
        let fd: Int32
        do throws(SyscallError) { fd = try Syscall.run("open", path) { open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600) } } catch {
            return error
        }
        defer { close(fd) }
        // posix_fallocate returns the error number instead of setting errno.
        var rc: Int32
        repeat { rc = posix_fallocate(fd, 0, off_t(bytes)) } while rc == EINTR
        guard rc == 0 else {
            unlink(path)
            return SyscallError(call: "posix_fallocate", subject: "\(path), \(bytes) bytes", errno: Errno(rawValue: rc))
        }
        held.store(bytes, ordering: .relaxed)
        return nil
    }
}

extension StateStore {
    /// When a write may delete the space reserve to get room.
    enum ReserveUse {
        case never
        /// A removal: whatever it costs.
        case always
        /// A snapshot of this many bytes: only if the free space and the reserve together hold
        /// it (a large snapshot on a full disk would use the reserve up and fail anyway).
        case ifItFits(Int)
    }

    /// Runs a write (which undoes itself when it fails). If it fails because the disk is full
    /// and `use` allows, deletes the space reserve and runs it once more. Afterwards, success
    /// or not, a reserve that is gone is made again if there is room.
    func withReserve(_ use: ReserveUse, _ body: () throws(StateError) -> Void) throws(StateError) {
        defer { reserve.replenish() }
        do throws(StateError) { try body() } catch {
            guard error.isDiskFull else { throw error }
            switch use {
            case .never: throw error
            case .always: break
            case .ifItFits(let bytes): guard reserve.couldHold(bytes) else { throw error }
            }
            guard reserve.release(for: error) else { throw error }
            try body()
        }
    }
}
