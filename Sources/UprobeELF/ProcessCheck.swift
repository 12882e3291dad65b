import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Whether a process named as a pid filter can be probed, from `/proc/PID/stat` and
/// `/proc/PID/root`, with one error per reason: a pid that never existed or has exited, a
/// zombie, a kernel thread, or a process whose files the daemon may not see (another user
/// namespace or sandbox: its `root` link cannot be read even by root).
enum ProcessCheck {
    /// PF_KTHREAD from include/linux/sched.h: the process is a kernel thread.
    static let kernelThreadFlag: UInt64 = 0x0020_0000

    /// Throws why `pid` cannot be probed; returns its `/proc/PID/root` when that is not the
    /// daemon's own root ("" when it is).
    static func probeableRoot(of pid: Int32) throws(ResolveError) -> String {
        guard pid > 0 else { throw .invalidSpec("pid must be positive (got \(pid))") }
        guard let stat = readWholeFile("/proc/\(pid)/stat", limit: 4096), let parsed = parse(stat) else {
            throw .processNotFound("process \(pid) not found; give the pid of a running process")
        }
        if parsed.state == UInt8(ascii: "Z") || parsed.state == UInt8(ascii: "X") {
            throw .processNotFound("process \(pid) (\(parsed.comm)) has exited (a zombie its parent has not reaped yet); it runs no code to probe")
        }
        if parsed.flags & kernelThreadFlag != 0 {
            throw .invalidSpec("pid \(pid) (\(parsed.comm)) is a kernel thread; it has no user-space code to probe")
        }
        var buf = [CChar](repeating: 0, count: 8)
        if readlink("/proc/\(pid)/root", &buf, buf.count) < 0 {
            let e = Syscall.lastError("readlink", "/proc/\(pid)/root")
            if e.errno == .noSuchFileOrDirectory || e.errno == .noSuchProcess {
                throw .processNotFound("process \(pid) (\(parsed.comm)) has exited")
            }
            throw .permissionDenied("uprobed cannot see the files of process \(pid) (\(parsed.comm)): \(e) "
                + "(it runs in a namespace or sandbox the daemon may not enter)")
        }
        return sameFile("/proc/\(pid)/root", "/") ? "" : "/proc/\(pid)/root"
    }

    /// State letter, flags and command name from the text of `/proc/PID/stat`
    /// (proc_pid_stat(5)): `pid (comm) state ppid pgrp session tty_nr tpgid flags …`. The name
    /// may hold spaces and parentheses, so fields are counted from its last `)`.
    static func parse(_ bytes: [UInt8]) -> (state: UInt8, flags: UInt64, comm: String)? {
        guard let open = bytes.firstIndex(of: UInt8(ascii: "(")),
              let close = bytes.lastIndex(of: UInt8(ascii: ")")), open < close else { return nil }
        let comm = String(decoding: bytes[(open + 1)..<close], as: UTF8.self)
        let fields = bytes[(close + 1)...].split(separator: UInt8(ascii: " "))
        guard fields.count > 6, let state = fields[0].first,
              let flags = UInt64(String(decoding: fields[6], as: UTF8.self)) else { return nil }
        return (state, flags, comm)
    }
}
