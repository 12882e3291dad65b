import CSystemd
#if canImport(Glibc)
import Glibc
#endif

/// The daemon's side of the systemd protocols, through libsystemd.
public enum Systemd {
    /// Sends a state string to the service manager (sd_notify(3)); a no-op without NOTIFY_SOCKET.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        sd_notify(0, state) > 0
    }

    /// Whether a service manager listens for notifications (NOTIFY_SOCKET is set).
    public static var notifySocketSet: Bool { getenv("NOTIFY_SOCKET") != nil }

    /// Sockets passed by socket activation (sd_listen_fds(3)), starting at fd 3.
    /// Unsets LISTEN_* so children don't inherit them.
    public static func listenFDs() -> [Int32] {
        let n = sd_listen_fds(1)
        guard n > 0 else { return [] }
        return (0..<n).map { SD_LISTEN_FDS_START + $0 }
    }

    /// Whether `fd` is a listening Unix stream socket (sd_is_socket_unix(3)).
    public static func isUnixStreamListener(_ fd: Int32) -> Bool {
        sd_is_socket_unix(fd, Int32(SOCK_STREAM.rawValue), 1, nil, 0) > 0
    }

    /// The watchdog interval the manager asked for, if any (sd_watchdog_enabled(3)).
    public static func watchdogInterval() -> Duration? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return .microseconds(Int64(usec))
    }

    /// Whether stderr is connected to the journal (sd_journal_stream_fd / JOURNAL_STREAM).
    public static var stderrIsJournal: Bool {
        guard let env = getenv("JOURNAL_STREAM") else { return false }
        let parts = String(cString: env).split(separator: ":")
        guard parts.count == 2, let dev = UInt64(parts[0]), let ino = UInt64(parts[1]) else { return false }
        var st = stat()
        guard fstat(2, &st) == 0 else { return false }
        return UInt64(st.st_dev) == dev && UInt64(st.st_ino) == ino
    }
}
