import CUprobeSys
import SystemPackage
import UprobeSystem

#if canImport(Glibc)
import Glibc
#endif

/// uprobed's directory in a bpf file system: the counting and latency programs, their maps (by
/// name, see `KernelObjects`), every counting link (`links/<generation>`) and every latency
/// link (`latency/<generation>`) are pinned here, so they outlive the process and a restarted
/// daemon adopts them.
///
/// One daemon per directory: `open` takes an exclusive flock(2) on it (held for the process's
/// life, released by the kernel at any exit), so a second daemon cannot treat the first one's
/// links as stale.
public final class PinDirectory: Sendable {
    public let path: String
    /// Whether `open` had to mount bpffs (the start logs it).
    public let mounted: String?
    private let lock: Int32

    /// Where links are pinned.
    public var linksPath: String { path + "/links" }

    /// Where latency (uprobe session) links are pinned: apart from counting links, because a
    /// start must know which program's links it opens before it reads their cookies.
    public var latencyLinksPath: String { path + "/latency" }

    /// The pin of an object named `name` (see `KernelObjects`).
    public func objectPath(_ name: String) -> String { path + "/" + name }

    /// The pin of the link of `generation`.
    public func linkPath(_ generation: UInt32) -> String { linksPath + "/\(generation)" }

    /// The pin of the latency link of `generation`.
    public func latencyLinkPath(_ generation: UInt32) -> String { latencyLinksPath + "/\(generation)" }

    /// The default bpf file system mount point, mounted by `open` when missing.
    public static let defaultMount = "/sys/fs/bpf"
    static let bpffsMagic: Int = 0xcafe4a11

    /// Opens (creating it, mode 0700) the pin directory at `path`, mounting bpffs at
    /// /sys/fs/bpf first if `path` is below it and it is not mounted. Errors: `pin_failed`
    /// (not on bpffs, cannot mount or create, or another uprobed holds it).
    public init(path: String) throws(KernelError) {
        guard path.hasPrefix("/"), !path.split(separator: "/").contains("..") else {
            throw KernelError(code: .pinFailed, message: "pin_dir must be an absolute path without '..': \(path)")
        }
        var mountedAt: String? = nil
        if !Self.onBPFFS(Self.nearestExisting(path)) {
            let mount = Self.defaultMount
            guard path == mount || path.hasPrefix(mount + "/") else {
                throw KernelError(code: .pinFailed, message: "pin_dir \(path) is not on a bpf file system (mount one there, or use a directory under \(mount))")
            }
            do { mountedAt = try Self.mountBPFFSOnce(at: mount) ? mount : nil } catch {
                throw KernelError(code: .pinFailed, message: "\(mount) is not a bpf file system and mounting one failed: \(error)", errno: error.errno.rawValue)
            }
        }
        for dir in [path, path + "/links", path + "/latency"] {
            do { try Self.makeDirectories(dir) } catch {
                throw KernelError(code: .pinFailed, message: "cannot create \(dir): \(error)", errno: error.errno.rawValue)
            }
        }
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = Errno(rawValue: errno)
            throw KernelError(code: .pinFailed, message: "cannot open \(path): \(e)", errno: e.rawValue)
        }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = Errno(rawValue: errno)
            _ = close(fd)
            throw KernelError(code: .pinFailed,
                              message: "pin_dir \(path) is in use by another uprobed (flock: \(e)); give each daemon its own pin_dir",
                              errno: e.rawValue)
        }
        self.path = path
        self.mounted = mountedAt
        self.lock = fd
    }

    deinit { _ = close(lock) }

    /// The generations of the links pinned under `links/` (or `directory`), ascending; names
    /// that are not a generation are returned apart (they are no pin of ours and are left alone).
    public func pinnedLinkGenerations(in directory: String? = nil) -> (generations: [UInt32], foreign: [String]) {
        guard let dir = opendir(directory ?? linksPath) else { return ([], []) }
        defer { closedir(dir) }
        var gens: [UInt32] = [], foreign: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name == "." || name == ".." { continue }
            if let g = UInt32(name), String(g) == name, g > 0 { gens.append(g) } else { foreign.append(name) }
        }
        return (gens.sorted(), foreign)
    }

    /// A link pin opened at start, with what the kernel says the link probes.
    struct OpenedLinkPin {
        let generation: UInt32
        let path: String
        let fd: FileDescriptor
        let info: UprobeMultiLinkInfo
    }

    /// Opens every link pinned in `directory` (BPF_OBJ_GET, then BPF_OBJ_GET_INFO_BY_FD: path,
    /// offsets, cookies, pid, direction; Linux >= 6.8), oldest generation first, for the
    /// caller to check its cookies. Names that are not a generation are reported and left
    /// alone; a pin that cannot be opened or is no uprobe_multi link is unpinned and reported.
    func openLinkPins(in directory: String, pinPath: (UInt32) -> String) -> (opened: [OpenedLinkPin], unusable: [UnusablePin]) {
        let found = pinnedLinkGenerations(in: directory)
        var opened: [OpenedLinkPin] = [], unusable: [UnusablePin] = []
        for name in found.foreign {
            unusable.append(UnusablePin(path: directory + "/" + name, reason: "not named by a link generation; left alone"))
        }
        for g in found.generations {
            let path = pinPath(g)
            let fd: FileDescriptor
            do { fd = try BPFSyscall.objGet(path) } catch {
                Self.unpin(path)
                unusable.append(UnusablePin(path: path, reason: "cannot be opened (\(error)); removed"))
                continue
            }
            do {
                opened.append(OpenedLinkPin(generation: g, path: path, fd: fd, info: try BPFSyscall.uprobeMultiLinkInfo(fd)))
            } catch {
                try? fd.close()
                Self.unpin(path)
                unusable.append(UnusablePin(path: path, reason: "not a uprobe_multi link this kernel describes (\(error)); removed"))
            }
        }
        return (opened, unusable)
    }

    /// Removes a pin (unlink(2)); true if it was there.
    @discardableResult
    public static func unpin(_ path: String) -> Bool { unlink(path) == 0 }

    /// Removes every pin under `path` and the directories (the operator's `--remove-pins`):
    /// each link whose last reference was its pin is detached by the kernel. Returns the
    /// number of pins removed.
    public static func removeAll(at path: String) throws(KernelError) -> Int {
        var removed = 0
        func walk(_ dir: String) throws(KernelError) {
            guard let d = opendir(dir) else {
                let e = Errno(rawValue: errno)
                if e == .noSuchFileOrDirectory { return }
                throw KernelError(code: .pinFailed, message: "cannot read \(dir): \(e)", errno: e.rawValue)
            }
            var names: [(String, Bool)] = []
            while let entry = readdir(d) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
                }
                if name == "." || name == ".." { continue }
                names.append((name, entry.pointee.d_type == UInt8(DT_DIR)))
            }
            closedir(d)
            for (name, isDir) in names {
                let child = dir + "/" + name
                if isDir { try walk(child) } else if unlink(child) == 0 { removed += 1 } else {
                    let e = Errno(rawValue: errno)
                    throw KernelError(code: .pinFailed, message: "cannot remove \(child): \(e)", errno: e.rawValue)
                }
            }
            if rmdir(dir) != 0 && errno != ENOENT {
                let e = Errno(rawValue: errno)
                throw KernelError(code: .pinFailed, message: "cannot remove \(dir): \(e)", errno: e.rawValue)
            }
        }
        try walk(path)
        return removed
    }

    /// Whether `path` is on a bpf file system (statfs(2) f_type).
    static func onBPFFS(_ path: String) -> Bool {
        var type: Int64 = 0
        guard CUprobeSys_fs_type(path, &type) == 0 else { return false }
        return type == Int64(bpffsMagic)
    }

    /// `path` or its nearest ancestor that exists.
    static func nearestExisting(_ path: String) -> String {
        var p = path
        while p.count > 1 && access(p, F_OK) != 0 {
            p = String(p[..<(p.lastIndex(of: "/") ?? p.startIndex)])
            if p.isEmpty { p = "/" }
        }
        return p
    }

    /// Mounts bpffs at `mount` unless one is there by now. Two daemons starting at once must
    /// not both mount: the second mount would cover the first, hiding its pins. They serialize
    /// on an flock of the mount point's directory (the one underneath, which both open) and
    /// check again holding it. True if this call mounted.
    static func mountBPFFSOnce(at mount: String) throws(SyscallError) -> Bool {
        try makeDirectories(mount)
        let fd = try Syscall.run("open", mount) { open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { _ = close(fd) }
        try Syscall.run("flock", mount) { flock(fd, LOCK_EX) }
        if onBPFFS(mount) { return false }
        try Syscall.run("mount", mount) { CUprobeSys_mount_bpffs(mount, "mode=0700") }
        return true
    }

    static func makeDirectories(_ path: String) throws(SyscallError) {
        var built = ""
        for part in path.split(separator: "/") {
            built += "/" + part
            if mkdir(built, 0o700) != 0 && errno != EEXIST { throw Syscall.lastError("mkdir", built) }
        }
    }
}
