#if canImport(Glibc)
import Glibc
#endif

/// Whether a process is still its owner's: the rule a non-admin's `pid` filter must meet at
/// registration and for as long as the probe lives.
///
/// It is the kernel's own test for "may this user ptrace that process" (ptrace_may_access),
/// minus the LSM hooks: the user could then read the process's memory and registers anyway, so
/// counting its function calls discloses nothing more. A process fails it when:
/// - its real, effective, saved or filesystem uid is not the owner's uid (a setuid binary, or
///   a privileged process that switched users);
/// - its real, effective, saved and filesystem gids are not all one gid (a setgid binary);
/// - it holds a capability (permitted, effective or ambient; for an owner other than root),
///   unless it holds it inside a user namespace the owner created (an unprivileged
///   `unshare -U`, a rootless container: those capabilities do not reach beyond the
///   namespace, and the owner has them there too);
/// - it is not dumpable. The kernel makes a process undumpable when it execs a setuid, setgid
///   or file-capability binary (or one its user cannot read) and when it changes credentials;
///   it stays so after the program drops its privileges again, until the next ordinary exec.
///   That makes it the one trace left by a privileged program that gave its privileges up
///   between two looks. A process can also make itself undumpable (`prctl(PR_SET_DUMPABLE,
///   0)`, as ssh-agent does against its own user); the kernel then refuses its owner ptrace
///   too, and the probe ends alike: from outside the two cases cannot be told apart.
///
/// Cost: one open, fstat and read of /proc/PID/status (about 11 us measured), plus a look at
/// the user namespace only when a capability set is not empty. The fstat gives dumpability:
/// the kernel makes /proc/PID's files owned by root while the process is not dumpable (by its
/// effective uid and gid otherwise).
public enum ProcessOwnership {
    /// What /proc/PID/status says about a process's credentials.
    public struct Credentials: Sendable, Equatable {
        /// Real, effective, saved, filesystem.
        public var uids: [UInt32]
        public var gids: [UInt32]
        public var capPermitted: UInt64
        public var capEffective: UInt64
        public var capAmbient: UInt64
        /// Owner of /proc/PID/status: 0 while the process is not dumpable.
        public var statusFileUID: UInt32
    }

    /// Why a process is not (or no longer) its owner's.
    public enum Problem: Sendable, Equatable {
        case gone
        case uids([UInt32])
        case gids([UInt32])
        case capabilities(permitted: UInt64, effective: UInt64, ambient: UInt64)
        case notDumpable

        /// What happened, for a message: "uids 1000 0 0 0" etc.
        public var detail: String {
            switch self {
            case .gone: return "it does not exist"
            case .uids(let ids): return "uids \(ids.map(String.init).joined(separator: " "))"
            case .gids(let ids): return "gids \(ids.map(String.init).joined(separator: " "))"
            case .capabilities(let p, let e, let a):
                return "capabilities CapPrm \(Self.hex(p)) CapEff \(Self.hex(e)) CapAmb \(Self.hex(a))"
            case .notDumpable: return "it is not dumpable"
            }
        }

        /// How it most likely came about, for the reason of an ended probe.
        public var likelyCause: String {
            switch self {
            case .gone: return "it exited"
            case .uids, .capabilities: return "it exec'd a setuid or file-capability binary"
            case .gids: return "it exec'd a setgid binary"
            case .notDumpable: return "it exec'd a privileged binary, or made itself undumpable; its owner may not ptrace it"
            }
        }

        static func hex(_ v: UInt64) -> String {
            let digits = String(v, radix: 16)
            return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
        }
    }

    /// Nil if `pid` is `uid`'s by the rule above; otherwise what is wrong.
    public static func problem(pid: Int32, uid: UInt32) -> Problem? {
        guard let creds = credentials(of: pid) else { return .gone }
        return judge(creds, uid: uid, capsConfined: { capabilitiesConfined(pid: pid, owner: uid) })
    }

    /// The rule on credentials already read. `capsConfined` is asked only when the process
    /// holds a capability: true when those are confined to a user namespace `uid` created.
    public static func judge(_ c: Credentials, uid: UInt32, capsConfined: () -> Bool) -> Problem? {
        guard c.uids.count == 4, c.uids.allSatisfy({ $0 == uid }) else { return .uids(c.uids) }
        guard c.gids.count == 4, c.gids.allSatisfy({ $0 == c.gids[0] }) else { return .gids(c.gids) }
        // Root's processes hold root's capabilities; for anyone else they are a privilege.
        if uid != 0 && c.capPermitted | c.capEffective | c.capAmbient != 0 && !capsConfined() {
            return .capabilities(permitted: c.capPermitted, effective: c.capEffective, ambient: c.capAmbient)
        }
        // Dumpable: the file is owned by the effective uid. (Undumpable inside a user namespace
        // it is owned by that namespace's root as mapped here, often the owner: not noticed,
        // but such a process has no privilege outside the namespace either.)
        if c.statusFileUID != uid { return .notDumpable }
        return nil
    }

    /// Reads /proc/PID/status (and its owner); nil if the process is gone.
    public static func credentials(of pid: Int32) -> Credentials? {
        guard pid > 0 else { return nil }
        let fd = open("/proc/\(pid)/status", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        var buf = [UInt8](repeating: 0, count: 8192)
        var used = 0
        while used < buf.count {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress.map { $0 + used }, $0.count - used) }
            if n < 0 { if errno == EINTR { continue }; return nil }
            if n == 0 { break }
            used += n
        }
        return parse(buf[..<used], fileUID: UInt32(st.st_uid))
    }

    /// The lines of /proc/PID/status the rule needs; nil if one is missing or malformed.
    public static func parse(_ bytes: ArraySlice<UInt8>, fileUID: UInt32) -> Credentials? {
        var uids: [UInt32]? = nil, gids: [UInt32]? = nil
        var prm: UInt64? = nil, eff: UInt64? = nil, amb: UInt64? = nil
        for line in bytes.split(separator: 0x0A) {
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else { continue }
            let key = String(decoding: line[line.startIndex..<colon], as: UTF8.self)
            let value = line[line.index(after: colon)...]
            func fields() -> [Substring] {
                String(decoding: value, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\t" })
            }
            switch key {
            case "Uid": uids = fields().compactMap { UInt32($0) }
            case "Gid": gids = fields().compactMap { UInt32($0) }
            case "CapPrm": prm = fields().first.flatMap { UInt64($0, radix: 16) }
            case "CapEff": eff = fields().first.flatMap { UInt64($0, radix: 16) }
            case "CapAmb": amb = fields().first.flatMap { UInt64($0, radix: 16) }
            default: continue
            }
        }
        guard let uids, let gids, let prm, let eff else { return nil }
        // CapAmb exists since Linux 4.3; without it there are no ambient capabilities.
        return Credentials(uids: uids, gids: gids, capPermitted: prm, capEffective: eff, capAmbient: amb ?? 0,
                           statusFileUID: fileUID)
    }

    /// True when `pid` is in a user namespace other than the daemon's that `owner` created
    /// (NS_GET_OWNER_UID, as seen from the daemon's namespace). Any doubt counts as false.
    static func capabilitiesConfined(pid: Int32, owner: UInt32) -> Bool {
        var mine = stat(), theirs = stat()
        guard stat("/proc/self/ns/user", &mine) == 0, stat("/proc/\(pid)/ns/user", &theirs) == 0 else { return false }
        if mine.st_ino == theirs.st_ino && mine.st_dev == theirs.st_dev { return false }
        let fd = open("/proc/\(pid)/ns/user", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var uid: UInt32 = UInt32.max
        // NS_GET_OWNER_UID = _IO(0xb7, 0x4): writes the namespace creator's uid.
        let rc = withUnsafeMutablePointer(to: &uid) { ioctl(fd, 0xb704, $0) }
        return rc == 0 && uid == owner
    }
}
