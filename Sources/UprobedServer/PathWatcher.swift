import Dispatch
import Foundation
import Logging
import Synchronization
import UprobeCore
import UprobeELF
import UprobeKernel
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Keeps registrations in step with the files and processes they name (issue 7).
///
/// A uprobe is bound to an inode, but an operator registers a path: when a package upgrade or a
/// deploy replaces the file by rename, the path names a new inode. This watcher notices (inotify
/// on the directories of followed paths for promptness, plus a periodic check every
/// `follow_check_ms` as a backstop for what inotify misses), resolves the same probe in the new
/// file outside any lock, and hands the engine a `FollowChange` round:
/// - `attach`: the new file's sites join the registration (same id, one total);
/// - `degrade`: the new file is missing, not ELF or lacks the symbol; the registration says
///   why, older sites keep counting, and it recovers when a good file appears;
/// - `retire`: an older file that no process maps any more (`/proc/*/maps`, deleted files
///   included) has its sites detached, their hits kept;
/// - `end`: a pid-filtered registration whose process exited.
///
/// Runs on its own thread; it reads the engine's published snapshot and never blocks readers.
public final class PathWatcher: Sendable {
    private let engine: Engine
    private let resolver: Resolver
    private let logger: Logger
    private let checkEvery: Duration
    private let settle: Duration
    private let stopping = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    /// A pipe whose write end wakes the thread for stop.
    private let wakeFD: Int32
    private let wakeWriteFD: Int32
    private let finished = DispatchSemaphore(value: 0)

    public init(engine: Engine, resolver: Resolver, logger: Logger, checkEvery: Duration, settle: Duration) {
        self.engine = engine
        self.resolver = resolver
        self.logger = logger
        self.checkEvery = checkEvery
        self.settle = settle
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) == 0 {
            _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        }
        self.wakeFD = fds[0]
        self.wakeWriteFD = fds[1]
    }

    public func start() {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let thread = Thread { [self] in
            ThreadName.setCurrent("uprobed-follow")
            self.run()
            self.finished.signal()
        }
        thread.start()
    }

    /// Stops the thread and waits for it (at most one check round).
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if wakeWriteFD >= 0 {
            var one: UInt8 = 1
            _ = write(wakeWriteFD, &one, 1)
        }
        // The pipe is closed only once the thread is done with it (or it never started).
        if started.load(ordering: .acquiring) && finished.wait(timeout: .now() + .seconds(10)) == .timedOut { return }
        if wakeFD >= 0 { close(wakeFD) }
        if wakeWriteFD >= 0 { close(wakeWriteFD) }
    }

    /// What the watcher remembers between rounds; owned by its thread.
    struct Memo {
        /// The file each registration was last resolved against, so a bad file is not resolved
        /// again every round (size and mtime are part of it: a file still being written is
        /// tried again once it changes).
        var tried: [String: FileIdentity] = [:]
        /// Start time of each pid-filtered registration's process, first seen alive.
        var pidStart: [String: UInt64] = [:]
        /// inotify watch descriptor per directory.
        var watched: [String: Int32] = [:]
        /// Free counter slots seen by the last round (see `check`).
        var freeSlots = Int.max
    }

    struct FileIdentity: Hashable {
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var mtimeNanos: Int64
    }

    private func run() {
        let ifd = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        if ifd < 0 {
            logger.warning("inotify unavailable; replaced binaries are noticed by the periodic check only",
                           metadata: ["error": "\(Syscall.lastError("inotify_init1"))"])
        }
        defer {
            if ifd >= 0 { close(ifd) }

        }
        var memo = Memo()
        let timeoutMs = Int32(clamping: Int64(checkEvery.inSeconds * 1000))
        while !stopping.load(ordering: .acquiring) {
            check(&memo, inotifyFD: ifd)
            var fds = [pollfd(fd: ifd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 2, max(timeoutMs, 1))
            if stopping.load(ordering: .acquiring) { break }
            if n > 0 && fds[0].revents != 0 {
                // A rename is atomic, but a copy in place arrives in several events: let them settle.
                let micros = Int64(settle.inSeconds * 1_000_000)
                if micros > 0 { usleep(UInt32(clamping: micros)) }
                drain(ifd, memo: &memo)
            }
        }
    }

    /// Reads and discards pending inotify events (they only say "look now"); forgets watches
    /// the kernel dropped (directory deleted).
    private func drain(_ ifd: Int32, memo: inout Memo) {
        var buf = [UInt8](repeating: 0, count: 16 * 1024)
        while true {
            let n = buf.withUnsafeMutableBytes { read(ifd, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            var off = 0
            while off + MemoryLayout<inotify_event>.size <= n {
                let (wd, mask, len) = buf.withUnsafeBytes { raw -> (Int32, UInt32, UInt32) in
                    let e = raw.loadUnaligned(fromByteOffset: off, as: inotify_event.self)
                    return (e.wd, e.mask, e.len)
                }
                if mask & UInt32(IN_IGNORED) != 0, let dir = memo.watched.first(where: { $0.value == wd })?.key {
                    memo.watched.removeValue(forKey: dir)
                }
                off += MemoryLayout<inotify_event>.size + Int(len)
            }
        }
    }

    /// One round: compare every followed path with its registration, check pid filters'
    /// processes, retire unmapped old files; hand the engine all changes at once.
    func check(_ memo: inout Memo, inotifyFD: Int32) {
        let snap = engine.snapshot
        // Slots were freed since the last round (a detach finished): a registration left
        // degraded on a file it already tried is tried again, since the engine may have refused
        // the attach for want of slots (`capacity_exhausted`). Degraded for any other reason,
        // its resolution fails as before and nothing changes; only rounds after a free pay this.
        let freeSlots = Int(snap.slotCapacity) - snap.slotsInUse
        let slotsFreed = freeSlots > memo.freeSlots
        memo.freeSlots = freeSlots
        var changes: [FollowChange] = []
        var candidates: [(id: String, device: UInt64, inode: UInt64)] = []
        var dirs = Set<String>()
        // Per round, one stat per path and one resolution per spec: a glob registered once is
        // one record per function, and an upgrade must not resolve the glob once per record.
        var identities: [String: FileIdentity?] = [:]
        var resolutions: [ProbeSpecInput: FollowResolution] = [:]
        // Consecutive records mostly share their path (one request, one binary): the previous
        // record's path answers without hashing it again. This round runs every second on every
        // machine, and hashing each of 10,000 ids and paths was most of its ~6 ms.
        var previous: (path: String, identity: FileIdentity?)? = nil
        for r in snap.sortedProbes {
            if case .ended = r.state { continue }
            if let pid = r.spec.pid {
                let start = Self.processStart(pid)
                if let start, memo.pidStart[r.id] == nil { memo.pidStart[r.id] = start }
                if start == nil || start != memo.pidStart[r.id] {
                    changes.append(FollowChange(id: r.id, kind: .end(reason: "process \(pid) exited; the probe's hits are kept")))
                }
                continue
            }
            guard r.follows, let cur = r.firstTarget else { continue }
            let path = cur.path
            let now: FileIdentity?
            if let previous, previous.path == path { now = previous.identity } else {
                if let known = identities[path] { now = known } else {
                    // A path seen for the first time this round: stat it, and watch its directory.
                    now = Self.identity(path)
                    identities[path] = now
                    if let slash = path.lastIndex(of: "/") { dirs.insert(slash == path.startIndex ? "/" : String(path[..<slash])) }
                }
                previous = (path, now)
            }
            if let now {
                let isCurrent = now.device == cur.device && now.inode == cur.inode
                let retry = slotsFreed && r.state != .active
                if !(isCurrent && r.state == .active) && (memo.tried[r.id] != now || retry) {
                    memo.tried[r.id] = now
                    if let change = resolveNew(r, path: path, file: now, cache: &resolutions) { changes.append(change) }
                }
            } else {
                memo.tried.removeValue(forKey: r.id)
                let reason = "binary \(path) no longer exists; processes still running the old file are counted"
                if r.state != .degraded(reason: reason) { changes.append(FollowChange(id: r.id, kind: .degrade(reason: reason))) }
            }
            var seen = Set<FileID>()
            for s in r.sites {
                let f = FileID(device: s.target.device, inode: s.target.inode)
                if let now, now.device == f.device && now.inode == f.inode { continue }
                if seen.insert(f).inserted { candidates.append((r.id, f.device, f.inode)) }
            }
        }
        if !candidates.isEmpty {
            let mapped = Self.mappedFiles()
            for c in candidates where !mapped.contains(Self.mapsKey(device: c.device, inode: c.inode)) {
                changes.append(FollowChange(id: c.id, kind: .retire(device: c.device, inode: c.inode)))
            }
        }
        // Forget registrations that are gone (an id lookup is cheaper than a set of every id).
        if !memo.tried.isEmpty { memo.tried = memo.tried.filter { snap.probes[$0.key] != nil } }
        if !memo.pidStart.isEmpty { memo.pidStart = memo.pidStart.filter { snap.probes[$0.key] != nil } }
        if inotifyFD >= 0 { updateWatches(inotifyFD, dirs: dirs, memo: &memo) }
        if !changes.isEmpty { engine.followSync(changes) }
    }

    /// Resolves the registration's probe in the file now at `path`: an `attach` of the sites
    /// that correspond to this registration, or a `degrade` saying why there are none.
    private func resolveNew(_ r: ProbeRecord, path: String, file: FileIdentity,
                            cache: inout [ProbeSpecInput: FollowResolution]) -> FollowChange? {
        // A glob's registration restored without its function's name (its names file was lost
        // with its binary: see `NameFiles`) has nothing to look for in the new file; it stays
        // degraded with the reason the restore gave.
        if r.spec.usdt == nil, r.firstTarget?.symbol == nil, let s = r.spec.symbol, s.contains(where: { "*?[".contains($0) }) {
            return nil
        }
        var spec = r.spec
        spec.path = path
        let what = r.spec.usdt.map { "USDT probe \($0)" } ?? "symbol \(r.firstTarget?.symbol ?? r.spec.symbol ?? "?")"
        let followed: FollowResolution
        if let known = cache[spec] { followed = known } else {
            do throws(ResolveError) { followed = FollowResolution(.success(try resolver.resolution(spec))) } catch {
                followed = FollowResolution(.failure(error))
            }
            cache[spec] = followed
        }
        let resolution: Resolution
        do { resolution = try followed.result.get() } catch {
            let reason = "binary \(path) was replaced (inode \(file.inode)) and the \(what) cannot be probed in it (\(error.code): \(error.message)); processes still running the old file are counted"
            logger.debug("follow: new file does not resolve", metadata: ["probe_id": "\(r.id)", "error_code": "\(error.code)"])
            return r.state == .degraded(reason: reason) ? nil : FollowChange(id: r.id, kind: .degrade(reason: reason))
        }
        let targets = resolution.probes
        // A glob registration is one record per matched function: keep that function only.
        let picked: [ResolvedProbe]
        if r.spec.usdt == nil, let s = r.spec.symbol, s.contains(where: { "*?[".contains($0) }) {
            let name = r.firstTarget?.symbol
            picked = name.map { followed.targets(named: $0) } ?? []
            // The function is there, but the glob skipped it: its first instruction changed.
            if picked.isEmpty, let skipped = resolution.skipped.first(where: { $0.symbol == name }) {
                let reason = "binary \(path) was replaced (inode \(file.inode)) and the \(what) cannot be probed in it (its first \(skipped.reason)); processes still running the old file are counted"
                return r.state == .degraded(reason: reason) ? nil : FollowChange(id: r.id, kind: .degrade(reason: reason))
            }
        } else {
            picked = targets
        }
        guard let first = picked.first else {
            let reason = "binary \(path) was replaced (inode \(file.inode)) and the \(what) is no longer in it; processes still running the old file are counted"
            return r.state == .degraded(reason: reason) ? nil : FollowChange(id: r.id, kind: .degrade(reason: reason))
        }
        guard first.device == file.device && first.inode == file.inode else { return nil }  // replaced again: next round
        return FollowChange(id: r.id, kind: .attach(targets: picked))
    }

    private func updateWatches(_ ifd: Int32, dirs: Set<String>, memo: inout Memo) {
        for dir in dirs where memo.watched[dir] == nil {
            let mask = UInt32(IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_CLOSE_WRITE | IN_DELETE | IN_ATTRIB)
            let wd = inotify_add_watch(ifd, dir, mask)
            if wd >= 0 { memo.watched[dir] = wd }
        }
        for (dir, wd) in memo.watched where !dirs.contains(dir) {
            _ = inotify_rm_watch(ifd, wd)
            memo.watched.removeValue(forKey: dir)
        }
    }

    static func identity(_ path: String) -> FileIdentity? {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
                            mtimeNanos: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
    }

    /// `/proc/PID/stat` field 22 (start time in clock ticks since boot); nil if the process is
    /// gone or a zombie (it maps nothing and runs no code any more).
    static func processStart(_ pid: Int32) -> UInt64? {
        guard let bytes = readWholeFile("/proc/\(pid)/stat", limit: 1 << 16) else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is the state (field 3), so field 22 is fields[19].
        guard fields.count > 19, fields[0] != "Z", fields[0] != "X" else { return nil }
        return UInt64(fields[19])
    }

    /// "major:minor:inode" as `/proc/PID/maps` spells a file (hex device numbers).
    static func mapsKey(device: UInt64, inode: UInt64) -> String {
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff))
        let minor = (device & 0xff) | ((device >> 12) & ~UInt64(0xff))
        return "\(String(major, radix: 16)):\(String(minor, radix: 16)):\(inode)"
    }

    /// Every file mapped by any process (deleted ones included), as `mapsKey` spells them.
    static func mappedFiles() -> Set<String> {
        var out = Set<String>()
        guard let dir = opendir("/proc") else { return out }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            guard let first = name.utf8.first, first >= 0x30 && first <= 0x39 else { continue }
            guard let bytes = readWholeFile("/proc/\(name)/maps", limit: 64 << 20) else { continue }
            for line in bytes.split(separator: 0x0A) {
                // address perms offset dev inode [path]
                var fields: [ArraySlice<UInt8>] = []
                for f in line.split(separator: 0x20, maxSplits: 5, omittingEmptySubsequences: true) {
                    fields.append(f)
                    if fields.count == 5 { break }
                }
                guard fields.count == 5, fields[4] != [0x30] else { continue }
                let dev = String(decoding: fields[3], as: UTF8.self)
                let parts = dev.split(separator: ":")
                guard parts.count == 2, let ma = UInt64(parts[0], radix: 16), let mi = UInt64(parts[1], radix: 16) else { continue }
                out.insert("\(String(ma, radix: 16)):\(String(mi, radix: 16)):\(String(decoding: fields[4], as: UTF8.self))")
            }
        }
        return out
    }
}

/// A spec resolved in a replaced file, shared by the round's registrations of that spec. A
/// glob is one registration per function: each looks up its own function by name here, in a
/// table made once per round, instead of scanning every function the glob matched (a whole
/// binary's 241,000 registrations scanning 241,000 targets each never finished).
private final class FollowResolution {
    let result: Result<Resolution, ResolveError>
    private var byName: [String: [ResolvedProbe]]?

    init(_ result: Result<Resolution, ResolveError>) { self.result = result }

    /// The targets whose primary name is `name`.
    func targets(named name: String) -> [ResolvedProbe] {
        if let byName { return byName[name] ?? [] }
        var table: [String: [ResolvedProbe]] = [:]
        if case .success(let resolution) = result {
            for t in resolution.probes { if let s = t.symbol { table[s, default: []].append(t) } }
        }
        byName = table
        return table[name] ?? []
    }
}
