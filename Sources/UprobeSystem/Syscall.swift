import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Runs POSIX calls that report failure as -1 with errno, and turns the failure into a thrown
/// `SyscallError`. EINTR is retried; every other errno is captured at once.
public enum Syscall {
    /// `body` returns a result (an fd, 0, a byte count from `read`/`write`/`send`) or -1 with
    /// errno set.
    @inline(__always) @discardableResult
    public static func run<Result: BinaryInteger>(_ call: String, _ subject: String = "",
                                                  _ body: () -> Result) throws(SyscallError) -> Result {
        while true {
            let rc = body()
            if rc >= 0 { return rc }
            let e = Glibc.errno
            if e == EINTR { continue }
            throw SyscallError(call: call, subject: subject, errno: Errno(rawValue: e))
        }
    }

    /// `run` for calls that return a byte count (`read`, `write`, `send`).
    @inline(__always) @discardableResult
    public static func count(_ call: String, _ subject: String = "", _ body: () -> Int) throws(SyscallError) -> Int {
        try run(call, subject, body)
    }

    /// The error of a call that already failed (errno still set), for calls whose failure is
    /// not -1 (`realpath` returning NULL, `getpwnam`...). Read errno before anything else runs.
    @inline(__always)
    public static func lastError(_ call: String, _ subject: String = "") -> SyscallError {
        SyscallError(call: call, subject: subject, errno: Errno(rawValue: Glibc.errno))
    }
}
