import Logging

/// What one follow batch did, gathered for the log: one line per (event, path, file, reason)
/// with how many registrations it concerned and a few of their ids.
///
/// Why grouped: logged per registration, an upgrade of a binary carrying 10,000 probes writes
/// 10,000 lines, and a retry that keeps failing (no free slots) is logged again at every follow
/// check. Per-probe detail stays in `list` and `stats`.
struct FollowLog {
    enum Event {
        case followedBack, followed, degraded, retired, ended

        var message: Logger.Message {
            switch self {
            case .followedBack: return "probe follows its path back to a known file"
            case .followed: return "probe follows its path to a new file"
            case .degraded: return "probe degraded"
            case .retired: return "probe retired an old file version"
            case .ended: return "probe ended"
            }
        }

        var level: Logger.Level { self == .degraded ? .warning : .notice }
    }

    struct Key: Hashable {
        var event: Event
        var path: String
        var inode: UInt64
        var buildID: String = ""
        var errorCode: String = ""
        var reason: String = ""
    }

    private struct Entry {
        var count = 0
        var ids: [String] = []
        var hits: UInt64 = 0

        mutating func add(id: String, hits more: UInt64) {
            count += 1
            hits &+= more
            if ids.count < FollowLog.idsShown { ids.append(id) }
        }
    }

    /// Ids named per line; the rest are counted.
    static let idsShown = 5
    private var entries: [Key: Entry] = [:]
    /// Keys in the order first seen, so the log reads in the order things happened.
    private var order: [Key] = []

    mutating func note(_ key: Key, id: String, hits: UInt64 = 0) {
        if entries[key] == nil { order.append(key) }
        entries[key, default: Entry()].add(id: id, hits: hits)
    }

    func emit(to logger: Logger) {
        for key in order {
            guard let e = entries[key] else { continue }
            var meta: Logger.Metadata = [
                "probes": "\(e.count)",
                "probe_ids": "\(e.ids.joined(separator: ","))\(e.count > e.ids.count ? ",…" : "")",
                "path": "\(key.path)",
            ]
            if key.inode != 0 { meta["inode"] = "\(key.inode)" }
            if !key.buildID.isEmpty { meta["build_id"] = "\(key.buildID)" }
            if !key.errorCode.isEmpty { meta["error_code"] = "\(key.errorCode)" }
            if !key.reason.isEmpty { meta["reason"] = "\(key.reason)" }
            if key.event == .retired { meta["hits"] = "\(e.hits)" }
            logger.log(level: key.event.level, key.event.message, metadata: meta)
        }
    }
}
