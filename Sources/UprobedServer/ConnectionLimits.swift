/// How many client connections the daemon serves at once: in all (`max_connections`), per
/// uid that is not an admin (`max_connections_per_uid`), and how many of the total only admins
/// may take (`admin_reserved_connections`), so no reader can take every connection and root
/// can always connect. Pure logic; `SocketServer.admit` applies it under its lock.
struct ConnectionLimits: Sendable, Equatable {
    var maxConnections = 1024
    /// 0: no per-uid limit.
    var maxPerUID = 64
    /// At most half of `maxConnections` is kept, so a small `max_connections` still serves
    /// everyone else.
    var adminReserved = 16

    /// Why a new connection may not be served, or nil if it may. `open`: connections open now;
    /// `heldByUID`: how many of them the peer's uid holds; `uid` is nil when the kernel gave no
    /// credentials (such a connection is refused later, but still counts against the total).
    func refusal(open: Int, heldByUID: Int, uid: UInt32?, isAdmin: Bool) -> String? {
        if open >= maxConnections {
            return "uprobed already serves \(maxConnections) connections (max_connections). Retry later, or close idle clients"
        }
        if isAdmin { return nil }
        let reserved = min(adminReserved, maxConnections / 2)
        if open >= maxConnections - reserved {
            return "only the \(maxConnections - open) connections kept for admins are left (admin_reserved_connections = "
                + "\(reserved) of max_connections = \(maxConnections)); uid \(uid.map(String.init) ?? "?") is not an admin. Retry later"
        }
        if let uid, maxPerUID > 0, heldByUID >= maxPerUID {
            return "uid \(uid) already holds \(heldByUID) connections (max_connections_per_uid = \(maxPerUID)); close some of them"
        }
        return nil
    }
}
