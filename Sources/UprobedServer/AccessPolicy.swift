import UprobeCore
import UprobeELF
import UprobedProtocol
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Who is on the other end of a connection: SO_PEERCRED's pid/uid/gid plus the supplementary
/// groups from SO_PEERGROUPS, all taken by the kernel when the peer connected (so a process
/// cannot gain a group or a uid by changing its own credentials afterwards).
public struct PeerIdentity: Sendable, Hashable {
    public var peer: Peer
    /// The primary gid and every supplementary group.
    public var groups: Set<UInt32>
    public init(peer: Peer, supplementaryGroups: [UInt32]) {
        self.peer = peer
        self.groups = Set(supplementaryGroups).union([peer.gid])
    }
}

/// What a peer may do, in increasing order of power.
public enum AccessRole: Int, Sendable, Comparable, CustomStringConvertible {
    /// Nothing at all.
    case none = 0
    /// `list`, `stats`, `watch`, `status`, and `resolve` of binaries it can read.
    case read = 1
    /// Also `register` on binaries it can read in processes it owns, and `unregister` of its own probes.
    case register = 2
    /// Everything.
    case admin = 3

    public static func < (a: AccessRole, b: AccessRole) -> Bool { a.rawValue < b.rawValue }
    public var description: String {
        switch self {
        case .none: return "none"
        case .read: return "read"
        case .register: return "register"
        case .admin: return "admin"
        }
    }
}

/// The access policy built from the config: names resolved to ids once per (re)load.
public struct AccessPolicy: Sendable, Equatable {
    /// One list of the config (`*`, uids or gids).
    struct IDSet: Sendable, Equatable {
        var everyone = false
        var ids: Set<UInt32> = []
        func contains(_ id: UInt32) -> Bool { everyone || ids.contains(id) }
        func intersects(_ s: Set<UInt32>) -> Bool { everyone || !ids.isDisjoint(with: s) }
    }

    var adminUsers = IDSet(), adminGroups = IDSet()
    var registerUsers = IDSet(), registerGroups = IDSet()
    var readUsers = IDSet(), readGroups = IDSet()
    /// Most probes a non-admin uid may hold (0: unlimited).
    public var maxProbesPerUID: Int
    /// Names that resolved to no user or group (logged; they match nobody).
    public var warnings: [String] = []

    public init(config: DaemonConfig) {
        maxProbesPerUID = config.maxProbesPerUID
        var warnings: [String] = []
        func users(_ list: [String], _ key: String) -> IDSet {
            var s = IDSet()
            for item in list {
                if item == "*" { s.everyone = true } else if let n = UInt32(item) { s.ids.insert(n) } else if let n = Self.uid(named: item) {
                    s.ids.insert(n)
                } else { warnings.append("\(key): no user named '\(item)'; the entry matches nobody") }
            }
            return s
        }
        func groups(_ list: [String], _ key: String) -> IDSet {
            var s = IDSet()
            for item in list {
                if item == "*" { s.everyone = true } else if let n = UInt32(item) { s.ids.insert(n) } else if let n = Self.gid(named: item) {
                    s.ids.insert(n)
                } else { warnings.append("\(key): no group named '\(item)'; the entry matches nobody") }
            }
            return s
        }
        adminUsers = users(config.adminUsers, "admin_uids")
        adminGroups = groups(config.adminGroups, "admin_groups")
        registerUsers = users(config.registerUsers, "register_uids")
        registerGroups = groups(config.registerGroups, "register_groups")
        readUsers = users(config.readUsers, "read_uids")
        readGroups = groups(config.readGroups, "read_groups")
        self.warnings = warnings
    }

    /// The strongest role the peer's uid or any of its groups grants.
    public func role(of who: PeerIdentity) -> AccessRole {
        let uid = who.peer.uid
        if uid == 0 || adminUsers.contains(uid) || adminGroups.intersects(who.groups) { return .admin }
        if registerUsers.contains(uid) || registerGroups.intersects(who.groups) { return .register }
        if readUsers.contains(uid) || readGroups.intersects(who.groups) { return .read }
        return .none
    }

    static func uid(named name: String) -> UInt32? {
        var pw = passwd()
        var result: UnsafeMutablePointer<passwd>? = nil
        var buf = [CChar](repeating: 0, count: 16384)
        let rc = getpwnam_r(name, &pw, &buf, buf.count, &result)
        guard rc == 0, result != nil else { return nil }
        return pw.pw_uid
    }

    static func gid(named name: String) -> UInt32? {
        var gr = group()
        var result: UnsafeMutablePointer<group>? = nil
        var buf = [CChar](repeating: 0, count: 65536)
        let rc = getgrnam_r(name, &gr, &buf, buf.count, &result)
        guard rc == 0, result != nil else { return nil }
        return gr.gr_gid
    }
}

/// The checks a request must pass before it reaches the engine. Every denial is a
/// `permission_denied` (or `probe_limit_exceeded`) error whose message names what is missing.
public enum AccessControl {
    /// The least role each operation needs.
    public static func requiredRole(_ request: Request) -> AccessRole {
        switch request {
        case .register, .unregister: return .register
        case .apply(_, _, let dryRun): return dryRun ? .read : .register
        case .list, .stats, .watch, .status, .resolve: return .read
        }
    }

    static func denied(_ message: String) -> ProtocolError { ProtocolError(.permissionDenied, message) }

    /// Whether `who` holds `role`; the error says which config keys would grant it.
    public static func check(_ who: PeerIdentity, has role: AccessRole, for op: String, policy: AccessPolicy) -> ProtocolError? {
        let mine = policy.role(of: who)
        guard mine < role else { return nil }
        let keys: String
        switch role {
        case .admin: keys = "admin_uids/admin_groups"
        case .register: keys = "register_uids/register_groups (or admin_*)"
        default: keys = "read_uids/read_groups (or register_*/admin_*)"
        }
        return denied("uid \(who.peer.uid) may not '\(op)': it needs the \(role) role (\(keys)); it has '\(mine)'")
    }

    /// Checks a non-admin's specs before anything is resolved (so a refused peer learns
    /// nothing about files or processes it may not see): every spec must name a `pid` the peer
    /// owns. `systemWideOK` is false for register (an unfiltered probe counts every process).
    static func checkSpecs(_ who: PeerIdentity, specs: [ProbeSpecInput], systemWideOK: Bool, policy: AccessPolicy) -> ProtocolError? {
        if policy.role(of: who) == .admin { return nil }
        for (n, spec) in specs.enumerated() {
            guard let pid = spec.pid else {
                if systemWideOK { continue }
                return ProtocolError(.permissionDenied,
                                     "probes[\(n)]: only admins may register system-wide probes; give a \"pid\" of a process uid \(who.peer.uid) owns",
                                     details: ["probe": .int(Int64(n))])
            }
            if let why = processNotOwned(pid: pid, uid: who.peer.uid) {
                return ProtocolError(.permissionDenied, "probes[\(n)]: \(why)", details: ["probe": .int(Int64(n))])
            }
        }
        return nil
    }

    /// Checks a non-admin's register request after resolution: every binary must be readable
    /// by the peer (and still be the file the resolver read), and the peer's probes must stay
    /// within `max_probes_per_uid`. `held` is how many probes the uid holds now (including
    /// ones still in flight).
    static func checkTargets(_ who: PeerIdentity, items: [RegisterItem], held: Int?, policy: AccessPolicy) -> ProtocolError? {
        if policy.role(of: who) == .admin { return nil }
        for (n, item) in items.enumerated() {
            var checked: Set<String> = []
            for t in item.targets where checked.insert(t.path).inserted {
                if let why = unreadable(path: t.path, device: t.device, inode: t.inode, uid: who.peer.uid, groups: who.groups) {
                    return ProtocolError(.permissionDenied, "probes[\(n)]: \(why)", details: ["probe": .int(Int64(n))])
                }
            }
        }
        let adding = items.reduce(0) { $0 + $1.probeCount }
        if let held, policy.maxProbesPerUID > 0 && held + adding > policy.maxProbesPerUID {
            return ProtocolError(.probeLimitExceeded,
                                 "uid \(who.peer.uid) holds \(held) probes; \(adding) more would exceed max_probes_per_uid (\(policy.maxProbesPerUID))")
        }
        return nil
    }

    /// Nil if the process exists and is `uid`'s by `ProcessOwnership`'s rule (all four uids
    /// `uid`, one gid, no capability, dumpable); otherwise why not.
    static func processNotOwned(pid: Int32, uid: UInt32) -> String? {
        guard let problem = ProcessOwnership.problem(pid: pid, uid: uid) else { return nil }
        switch problem {
        case .gone: return "process \(pid) does not exist"
        case .uids(let ids):
            return "process \(pid) is not owned by uid \(uid) (its uids: \(ids.map(String.init).joined(separator: " ")))"
        case .gids, .capabilities:
            return "process \(pid) is not owned by uid \(uid) alone (\(problem.detail): \(problem.likelyCause))"
        case .notDumpable:
            return "process \(pid) is not dumpable, so uid \(uid) may not probe it (\(problem.likelyCause))"
        }
    }

    /// Nil if the peer could open `path` for reading by the permission bits: search (x) on
    /// every directory of its canonical path and read (r) on the file, judged by owner, group
    /// (primary and supplementary) and other bits like the kernel does. POSIX ACLs are not
    /// consulted. The file must still be (device, inode): the one the resolver read.
    static func unreadable(path: String, device: UInt64?, inode: UInt64?, uid: UInt32, groups: Set<UInt32>) -> String? {
        guard let real = realpath(path, nil) else { return "cannot resolve \(Syscall.lastError("realpath", path))" }
        let canonical = String(cString: real)
        free(real)
        var prefix = ""
        let parts = canonical.split(separator: "/")
        for (i, part) in parts.enumerated() {
            let dir = prefix.isEmpty ? "/" : prefix
            var st = stat()
            guard stat(dir, &st) == 0 else { return "cannot \(Syscall.lastError("stat", dir))" }
            if !allowed(st, bit: 1, uid: uid, groups: groups) {
                return "uid \(uid) cannot search directory \(dir), so it cannot read \(path)"
            }
            prefix += "/" + part
            if i == parts.count - 1 {
                guard stat(prefix, &st) == 0 else { return "cannot \(Syscall.lastError("stat", prefix))" }
                if !allowed(st, bit: 4, uid: uid, groups: groups) {
                    return "uid \(uid) cannot read \(path) (mode \(String(st.st_mode & 0o777, radix: 8)), owner \(st.st_uid):\(st.st_gid))"
                }
                if let device, let inode, UInt64(st.st_dev) != device || UInt64(st.st_ino) != inode {
                    return "\(path) changed while the request was checked; try again"
                }
            }
        }
        return nil
    }

    /// The kernel's owner/group/other choice: the first class that matches decides.
    static func allowed(_ st: stat, bit: UInt32, uid: UInt32, groups: Set<UInt32>) -> Bool {
        let mode = UInt32(st.st_mode)
        if st.st_uid == uid { return mode & (bit << 6) != 0 }
        if groups.contains(st.st_gid) { return mode & (bit << 3) != 0 }
        return mode & bit != 0
    }
}

extension RegisterItem {
    /// How many probe ids this spec becomes (one per function; one for a USDT probe).
    var probeCount: Int { spec.usdt != nil ? (targets.isEmpty ? 0 : 1) : targets.count }
}
