import Logging
import UprobeELF
import SystemPackage
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// The state on disk: `DIR/state.json`, a full snapshot replaced atomically (write a
/// temporary file, fsync it, rename it over the old one, fsync the directory), plus
/// `DIR/state.log`, one appended line per batch (fsynced before the batch is answered) with the
/// registrations the batch added and removed (two when the engine writes a batch's new registrations ahead of their
/// attach: see `BatchApplier.writeAhead`). A batch costs a write proportional to its own
/// changes, not to the whole registry; the snapshot is rewritten (and the log dropped) when
/// the log grows, at hit checkpoints and at stop. A crash at any moment leaves the old or the
/// new snapshot and a log whose only possibly torn line is its last, unsynced one.
///
/// A snapshot written while batches go on (see `StatePersister`) first moves the log aside to
/// `DIR/state.log.prev` (`rotateLog`); new lines start a new log, and `prev` is dropped once
/// the snapshot that covers it is in place. `load` replays `prev`, then the log.
public final class StateStore: Sendable {
    public let dir: String
    public var path: String { dir + "/state.json" }
    public var logPath: String { dir + "/state.log" }
    /// The log as it was when a snapshot being written in the background was taken.
    public var previousLogPath: String { dir + "/state.log.prev" }
    var tmpPath: String { dir + "/state.json.tmp" }
    /// Room for removals and snapshots when the disk fills up (`SpaceReserve`); made by `prepare`.
    public let reserve: SpaceReserve
    /// The names files of glob groups (`DIR/names/`, format 5).
    let names: NameFiles
    let logger: Logger?
    /// Where `load` takes a group's names from when its names file cannot be used: the
    /// binary, if it is still the file they were registered on (tests replace it).
    let recoverNames: @Sendable (NameIdentity, ProbeSpecInput) -> NameFiles.Names?

    public convenience init(dir: String, logger: Logger? = nil) {
        self.init(dir: dir, logger: logger, recoverNames: NameFiles.fromBinary)
    }

    init(dir: String, logger: Logger?, recoverNames: @escaping @Sendable (NameIdentity, ProbeSpecInput) -> NameFiles.Names?) {
        self.dir = dir
        self.logger = logger
        self.recoverNames = recoverNames
        reserve = SpaceReserve(dir: dir, logger: logger)
        names = NameFiles(stateDir: dir)
    }

    /// Creates the directory (mode 0700) if it is missing, and the space reserve in it.
    public func prepare() throws(StateError) {
        var built = ""
        let parts = dir.split(separator: "/")
        for (i, part) in parts.enumerated() {
            built += "/" + part
            let mode: mode_t = i == parts.count - 1 ? 0o700 : 0o755
            do throws(SyscallError) { try Syscall.run("mkdir", built) { mkdir(built, mode) } } catch {
                guard error.errno == .fileExists else { throw .io("cannot create the state directory", error) }
            }
        }
        reserve.create()
    }

    /// Cuts a last log line without its newline off `state.log`: an append that a crash cut
    /// short (never synced, never acknowledged; `replay` ignores it). Left there, the next
    /// append would complete it into a line that is not JSON, and the start after that would
    /// refuse the log as corrupt. Called at start, after `load`, before anything is appended.
    /// Returns the bytes cut.
    public func dropTornTail() throws(StateError) -> Int {
        let cut: Int?
        do throws(SyscallError) { cut = try cutTornTail() } catch {
            throw .io("cannot cut the torn last line off the log", error)
        }
        guard let cut else {
            throw StateError(code: .stateIO, message: "cannot cut the torn last line off the log: \(logPath) shrank while it was read (is another process writing it?)")
        }
        return cut
    }

    /// The work of `dropTornTail`: the bytes cut, or nil if the log is shorter than its fstat
    /// said by the time it is read (cutting at an offset found then could extend it instead).
    private func cutTornTail() throws(SyscallError) -> Int? {
        guard let fd = try Self.openExisting(logPath, O_RDWR) else { return 0 }
        defer { close(fd) }
        var st = stat()
        try Syscall.run("fstat", logPath) { fstat(fd, &st) }
        // The end of the last complete line: read backwards until a newline.
        var end = Int(st.st_size)
        let size = end
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        scan: while end > 0 {
            let from = max(0, end - chunk.count)
            let want = end - from
            let n = try Syscall.count("pread", logPath) {
                chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(from)) }
            }
            guard n == want else { return nil }
            for i in stride(from: n - 1, through: 0, by: -1) where chunk[i] == 0x0A {
                end = from + i + 1
                break scan
            }
            end = from
        }
        guard end < size else { return 0 }
        try Syscall.run("ftruncate", logPath) { ftruncate(fd, off_t(end)) }
        try Syscall.run("fsync", logPath) { fsync(fd) }
        return size - end
    }

    /// The saved state, or nil if there is no state file yet. A file that exists but cannot be
    /// parsed is an error: starting empty would overwrite registrations on the next batch.
    public func load() throws(StateError) -> SavedState? {
        var base: SavedState? = nil
        // Names files read once for the snapshot and the logs.
        let source = NameSource(names)
        let snapshot = try Self.readIfExists(path, "the snapshot")
        if let bytes = snapshot {
            do { base = try StateCodec.decode(bytes, names: source) } catch {
                throw StateError(code: error.code, message: "\(path): \(error.message)")
            }
        }
        // Lines at or below the snapshot's seq are skipped: `prev` is all such lines once the
        // snapshot taken with it is in place.
        for log in [previousLogPath, logPath] {
            guard let bytes = try Self.readIfExists(log, "the log") else { continue }
            do {
                base = try StateCodec.replay(bytes, onto: base ?? SavedState(bootID: nil, savedAt: 0, probes: []), names: source)
            } catch {
                guard let missing = error.missingChanges else {
                    throw StateError(code: error.code, message: "\(log): \(error.message)")
                }
                throw incomplete(log, missing, hasSnapshot: snapshot != nil)
            }
        }
        if var state = base {
            let problems = names.fill(&state, source: source, recover: recoverNames)
            state.namesRepairDue = !problems.isEmpty
            for problem in problems {
                logger?.warning("a names file of the state cannot be used: names taken from the binary where it is unchanged",
                                metadata: ["error": "\(problem)"])
            }
            let unknown = state.probes.filter { $0.unknownNames != nil }
            if let first = unknown.first, let why = first.unknownNames {
                logger?.error("registrations restored without their function names (they come back degraded; ids, offsets and hits are kept)",
                              metadata: ["registrations": "\(unknown.count)", "first": "\(first.id)", "reason": "\(why)"])
            }
            base = state
        }
        return base
    }

    /// The `state_incomplete` error of `load`: which changes are missing and what that loses.
    private func incomplete(_ log: String, _ missing: ClosedRange<UInt64>, hasSnapshot: Bool) -> StateError {
        let changes = missing.lowerBound == missing.upperBound ? "change \(missing.lowerBound) is" : "changes \(missing.lowerBound) to \(missing.upperBound) are"
        let next = missing.upperBound + 1
        let why: String
        if !hasSnapshot && missing.lowerBound == 1 {
            why = "\(path) is missing and \(log) begins at change \(next): \(changes) in no file, so every registration made before this log began (and not removed since) is missing; the snapshot that held them was deleted or lost"
        } else {
            why = "\(log) goes from change \(missing.lowerBound - 1) to change \(next): \(changes) in no file (a file that held them was deleted or lost), so the registrations and removals made in them are missing"
        }
        return StateError(code: .stateIncomplete, message: why, missingChanges: missing)
    }

    /// Moves the log aside for a snapshot written in the background: fsyncs it (lines appended
    /// without a sync are in it, and the committer syncs the new log by path from now on), then
    /// renames it to `previousLogPath`. False if there is no log, or a `prev` is still there (a
    /// snapshot that did not finish; the next snapshot written drops it).
    func rotateLog() throws(StateError) -> Bool {
        if access(previousLogPath, F_OK) == 0 { return false }
        do throws(SyscallError) {
            guard let fd = try Self.openExisting(logPath, O_WRONLY) else { return false }
            defer { close(fd) }
            try Syscall.run("fsync", logPath) { fsync(fd) }
            try Syscall.run("rename", "\(logPath), \(previousLogPath)") { rename(logPath, previousLogPath) }
        } catch {
            throw .io("cannot move the log aside", error)
        }
        return true
    }

    /// Size of a file, 0 if missing.
    func size(_ p: String) -> Int {
        var st = stat()
        return stat(p, &st) == 0 ? Int(st.st_size) : 0
    }

    /// Appends one log line and, if `sync`, fsyncs it. A failed write is cut back off, so the
    /// log never keeps a partial line in its middle. Without `sync` the caller must call
    /// `syncLog` before it tells anyone the line is saved. `useReserve`: if the disk is full,
    /// delete the space reserve and try once more (for lines that remove registrations).
    public func append(_ line: [UInt8], sync: Bool = true, useReserve: Bool = false) throws(StateError) {
        try append(parts: [line], sync: sync, useReserve: useReserve)
    }

    /// `append` of one line given in parts, written one after another (`logEntryParts`).
    public func append(parts: [[UInt8]], sync: Bool = true, useReserve: Bool = false) throws(StateError) {
        var created = false
        try withReserve(useReserve ? .always : .never) { () throws(StateError) in
            try appendOnce(parts, sync: sync, created: &created)
        }
        // A new log's name must be durable too (the first line after a snapshot rewrite).
        if created { try syncDirectory() }
    }

    private func appendOnce(_ parts: [[UInt8]], sync: Bool, created: inout Bool) throws(StateError) {
        let fd: Int32
        do throws(SyscallError) {
            // Opened without O_CREAT first: a log that exists (every batch but the first after
            // a snapshot rewrite) costs one path lookup, not a stat(2) and an open(2).
            if let existing = try Self.openExisting(logPath, O_WRONLY | O_APPEND) {
                fd = existing
            } else {
                fd = try Syscall.run("open", logPath) { open(logPath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600) }
                created = true
            }
        } catch {
            throw .io("cannot append to the log", error)
        }
        defer { close(fd) }
        var st = stat()
        do throws(SyscallError) { try Syscall.run("fstat", logPath) { fstat(fd, &st) } } catch {
            throw .io("cannot append to the log", error)
        }
        let start = st.st_size
        do throws(SyscallError) {
            for line in parts { try Self.writeAll(fd, line, logPath) }
            if sync { try Syscall.run("fsync", logPath) { fsync(fd) } }
        } catch {
            _ = ftruncate(fd, start)
            throw .io("cannot append to the log", error)
        }
    }

    /// fsync(2) of the state directory (new names and renames in it).
    private func syncDirectory() throws(StateError) {
        do throws(SyscallError) {
            let dfd = try Syscall.run("open", dir) { open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
            defer { close(dfd) }
            try Syscall.run("fsync", dir) { fsync(dfd) }
        } catch {
            throw .io("cannot sync the state directory", error)
        }
    }

    /// fsync(2) of the log: everything appended before the call is durable when it returns.
    /// (No log yet, e.g. a snapshot rewrite just replaced it: nothing to sync.) A failure is
    /// not cut back: later lines may follow it, and the caller undoes what it cannot confirm.
    public func syncLog() throws(StateError) {
        do throws(SyscallError) {
            guard let fd = try Self.openExisting(logPath, O_WRONLY) else { return }
            defer { close(fd) }
            try Syscall.run("fsync", logPath) { fsync(fd) }
        } catch {
            throw .io("cannot sync the log", error)
        }
    }

    /// Renames the state files out of the way (`state.json.corrupt-<unix time>`, the same for
    /// `state.log` and `state.log.prev`), for a start without them; returns the new names of
    /// those that existed.
    public func moveAside() throws(StateError) -> [String] {
        let stamp = Int(clockRealtime())
        var moved: [String] = []
        for file in [path, logPath, previousLogPath] {
            let target = file + ".corrupt-\(stamp)"
            do throws(SyscallError) {
                try Syscall.run("rename", "\(file), \(target)") { rename(file, target) }
                moved.append(target)
            } catch {
                guard error.errno == .noSuchFileOrDirectory else { throw .io("cannot move the state files aside", error) }
            }
        }
        return moved
    }

    /// Which logs a new snapshot makes redundant.
    public enum Covered: Sendable {
        /// Both: the snapshot holds every line (written with the writer held).
        case allLogs
        /// `previousLogPath` only: lines appended after `rotateLog` are newer than it.
        case previousLog
    }

    /// Writes `state` atomically and durably, then drops the logs it covers. On a full disk
    /// the space reserve is given up for it if that makes room enough (`ReserveUse.ifItFits`).
    /// Returns the names files the snapshot refers to (`NameFiles.collect` keeps them).
    @discardableResult
    public func write(_ state: SavedState, covering covered: Covered = .allLogs) throws(StateError) -> Set<String> {
        let refs = NameRefs(names)
        let bytes = StateCodec.encode(state, names: refs)
        try withReserve(.ifItFits(bytes.count)) { () throws(StateError) in try writeTemporary(bytes) }
        do throws(SyscallError) { try Syscall.run("rename", "\(tmpPath), \(path)") { rename(tmpPath, path) } } catch {
            unlink(tmpPath)
            throw .io("cannot write the snapshot", error)
        }
        // The snapshot holds everything these logs did (its seq says so); a crash before the
        // unlink only makes the next start skip their lines.
        unlink(previousLogPath)
        if covered == .allLogs { unlink(logPath) }
        try syncDirectory()
        return refs.used
    }

    /// `bytes` into the temporary snapshot file, fsynced; nothing left behind if that fails.
    private func writeTemporary(_ bytes: [UInt8]) throws(StateError) {
        let fd: Int32
        do throws(SyscallError) { fd = try Syscall.run("open", tmpPath) { open(tmpPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) } } catch {
            throw .io("cannot write the snapshot", error)
        }
        defer { close(fd) }
        do throws(SyscallError) {
            try Self.writeAll(fd, bytes, tmpPath)
            try Syscall.run("fsync", tmpPath) { fsync(fd) }
        } catch {
            unlink(tmpPath)
            throw .io("cannot write the snapshot", error)
        }
    }

    /// open(2) of a file that may be missing: nil if it is.
    private static func openExisting(_ path: String, _ flags: Int32) throws(SyscallError) -> Int32? {
        do throws(SyscallError) {
            return try Syscall.run("open", path) { open(path, flags | O_CLOEXEC) }
        } catch {
            guard error.errno == .noSuchFileOrDirectory else { throw error }
            return nil
        }
    }

    /// write(2) of all of `bytes`, through short writes.
    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], _ path: String) throws(SyscallError) {
        var off = 0
        while off < bytes.count {
            let n = try Syscall.count("write", path) { bytes[off...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } }
            off += n
        }
    }

    /// Replaces `DIR/name` with `bytes` atomically and durably (temporary file, fsync, rename,
    /// directory fsync), for the small files kept beside the state (`AppliedSets`).
    public func replaceFile(_ name: String, with bytes: [UInt8]) throws(StateError) {
        let target = dir + "/" + name, tmp = target + ".tmp"
        do throws(SyscallError) {
            let fd = try Syscall.run("open", tmp) { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
            defer { close(fd) }
            try Self.writeAll(fd, bytes, tmp)
            try Syscall.run("fsync", tmp) { fsync(fd) }
            try Syscall.run("rename", "\(tmp), \(target)") { rename(tmp, target) }
        } catch {
            unlink(tmp)
            throw .io("cannot write \(target)", error)
        }
        try syncDirectory()
    }

    /// The whole of `DIR/name`, nil if it does not exist.
    public func readFile(_ name: String) throws(StateError) -> [UInt8]? {
        try Self.readIfExists(dir + "/" + name, dir + "/" + name)
    }

    /// The whole of `path`, nil if it does not exist. A file over 1 GiB is refused (EFBIG):
    /// the daemon never writes one, and reading it would take that much memory.
    private static func readIfExists(_ path: String, _ what: String) throws(StateError) -> [UInt8]? {
        do throws(SyscallError) {
            guard let fd = try openExisting(path, O_RDONLY) else { return nil }
            defer { close(fd) }
            var out: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 64 << 10)
            while true {
                let n = try Syscall.count("read", path) { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
                if n == 0 { return out }
                out.append(contentsOf: chunk[0..<n])
                if out.count > 1 << 30 { throw SyscallError(call: "read", subject: path, errno: .fileTooLarge) }
            }
        } catch {
            throw .io("cannot read \(what)", error)
        }
    }
}
