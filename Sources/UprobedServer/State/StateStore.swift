import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The state on disk: `DIR/state.json`, a full snapshot replaced atomically (write a
/// temporary file, fsync it, rename it over the old one, fsync the directory), plus
/// `DIR/state.log`, one appended and fsynced line per batch with the registrations the batch
/// added and removed (two when the engine writes a batch's new registrations ahead of their
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

    public init(dir: String, logger: Logger? = nil) {
        self.dir = dir
        reserve = SpaceReserve(dir: dir, logger: logger)
    }

    /// Creates the directory (mode 0700) if it is missing, and the space reserve in it.
    public func prepare() throws(StateError) {
        var built = ""
        let parts = dir.split(separator: "/")
        for (i, part) in parts.enumerated() {
            built += "/" + part
            if mkdir(built, i == parts.count - 1 ? 0o700 : 0o755) != 0 && errno != EEXIST {
                throw StateError(code: "state_io", message: "cannot create state directory \(built): \(String(cString: strerror(errno)))")
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
        let fd = open(logPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return 0 }
            throw StateError.io("cannot open \(logPath)")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StateError.io("cannot stat \(logPath)") }
        // The end of the last complete line: read backwards until a newline.
        var end = Int(st.st_size)
        let size = end
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        scan: while end > 0 {
            let from = max(0, end - chunk.count)
            let n = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, end - from, off_t(from)) }
            guard n == end - from else { throw StateError.io("cannot read \(logPath)") }
            for i in stride(from: n - 1, through: 0, by: -1) where chunk[i] == 0x0A {
                end = from + i + 1
                break scan
            }
            end = from
        }
        guard end < size else { return 0 }
        guard ftruncate(fd, off_t(end)) == 0, fsync(fd) == 0 else { throw StateError.io("cannot cut the torn last line off \(logPath)") }
        return size - end
    }

    /// The saved state, or nil if there is no state file yet. A file that exists but cannot be
    /// parsed is an error: starting empty would overwrite registrations on the next batch.
    public func load() throws(StateError) -> SavedState? {
        var base: SavedState? = nil
        var st = stat()
        let hasSnapshot = stat(path, &st) == 0
        if hasSnapshot {
            guard let bytes = readWholeFile(path, limit: 1 << 30) else {
                throw StateError(code: "state_io", message: "cannot read \(path): \(String(cString: strerror(errno)))")
            }
            do { base = try StateCodec.decode(bytes) } catch {
                throw StateError(code: error.code, message: "\(path): \(error.message)")
            }
        } else if errno != ENOENT {
            throw StateError(code: "state_io", message: "cannot stat \(path): \(String(cString: strerror(errno)))")
        }
        // Lines at or below the snapshot's seq are skipped: `prev` is all such lines once the
        // snapshot taken with it is in place.
        for log in [previousLogPath, logPath] {
            guard stat(log, &st) == 0 else {
                if errno == ENOENT { continue }
                throw StateError(code: "state_io", message: "cannot stat \(log): \(String(cString: strerror(errno)))")
            }
            guard let bytes = readWholeFile(log, limit: 1 << 30) else {
                throw StateError(code: "state_io", message: "cannot read \(log): \(String(cString: strerror(errno)))")
            }
            do {
                base = try StateCodec.replay(bytes, onto: base ?? SavedState(bootID: nil, savedAt: 0, probes: []))
            } catch {
                guard let missing = error.missingChanges else {
                    throw StateError(code: error.code, message: "\(log): \(error.message)")
                }
                throw incomplete(log, missing, hasSnapshot: hasSnapshot)
            }
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
        return StateError(code: "state_incomplete", message: why, missingChanges: missing)
    }

    /// Moves the log aside for a snapshot written in the background: fsyncs it (lines appended
    /// without a sync are in it, and the committer syncs the new log by path from now on), then
    /// renames it to `previousLogPath`. False if there is no log, or a `prev` is still there (a
    /// snapshot that did not finish; the next snapshot written drops it).
    func rotateLog() throws(StateError) -> Bool {
        if access(previousLogPath, F_OK) == 0 { return false }
        let fd = open(logPath, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return false }
            throw StateError(code: "state_io", message: "cannot open \(logPath): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        guard fsync(fd) == 0 else {
            throw StateError(code: "state_io", message: "cannot fsync \(logPath): \(String(cString: strerror(errno)))")
        }
        guard rename(logPath, previousLogPath) == 0 else {
            throw StateError(code: "state_io", message: "cannot rename \(logPath): \(String(cString: strerror(errno)))")
        }
        return true
    }

    /// Size of a file, 0 if missing.
    func size(_ p: String) -> Int {
        var st = stat()
        return stat(p, &st) == 0 ? Int(st.st_size) : 0
    }

    /// write(2) of all of `bytes`, through short writes and EINTR; false (errno set) on an error.
    private static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            off += n
        }
        return true
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
        // Opened without O_CREAT first: a log that exists (every batch but the first after a
        // snapshot rewrite) costs one path lookup, not a stat(2) and an open(2).
        var fd = open(logPath, O_WRONLY | O_APPEND | O_CLOEXEC)
        if fd < 0 && errno == ENOENT {
            fd = open(logPath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
            if fd >= 0 { created = true }
        }
        guard fd >= 0 else { throw StateError.io("cannot open \(logPath)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StateError.io("cannot stat \(logPath)") }
        let start = st.st_size
        for line in parts where !Self.writeAll(fd, line) {
            let e = StateError.io("cannot append to \(logPath)")
            _ = ftruncate(fd, start)
            throw e
        }
        guard !sync || fsync(fd) == 0 else {
            let e = StateError.io("cannot fsync \(logPath)")
            _ = ftruncate(fd, start)
            throw e
        }
    }

    /// fsync(2) of the state directory (new names and renames in it).
    private func syncDirectory() throws(StateError) {
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { throw StateError.io("cannot open \(dir) to fsync it") }
        defer { close(dfd) }
        guard fsync(dfd) == 0 else { throw StateError.io("cannot fsync \(dir)") }
    }

    /// fsync(2) of the log: everything appended before the call is durable when it returns.
    /// (No log yet, e.g. a snapshot rewrite just replaced it: nothing to sync.) A failure is
    /// not cut back: later lines may follow it, and the caller undoes what it cannot confirm.
    public func syncLog() throws(StateError) {
        let fd = open(logPath, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return }
            throw StateError(code: "state_io", message: "cannot open \(logPath): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        guard fsync(fd) == 0 else {
            throw StateError(code: "state_io", message: "cannot fsync \(logPath): \(String(cString: strerror(errno)))")
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
            if rename(file, target) == 0 {
                moved.append(target)
            } else if errno != ENOENT {
                throw StateError(code: "state_io", message: "cannot move \(file) aside: \(String(cString: strerror(errno)))")
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
    public func write(_ state: SavedState, covering covered: Covered = .allLogs) throws(StateError) {
        let bytes = StateCodec.encode(state)
        try withReserve(.ifItFits(bytes.count)) { () throws(StateError) in try writeTemporary(bytes) }
        guard rename(tmpPath, path) == 0 else {
            let e = StateError.io("cannot rename \(tmpPath) to \(path)")
            unlink(tmpPath)
            throw e
        }
        // The snapshot holds everything these logs did (its seq says so); a crash before the
        // unlink only makes the next start skip their lines.
        unlink(previousLogPath)
        if covered == .allLogs { unlink(logPath) }
        try syncDirectory()
    }

    /// `bytes` into the temporary snapshot file, fsynced; nothing left behind if that fails.
    private func writeTemporary(_ bytes: [UInt8]) throws(StateError) {
        let fd = open(tmpPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StateError.io("cannot create \(tmpPath)") }
        guard Self.writeAll(fd, bytes) else {
            let e = StateError.io("cannot write \(tmpPath)")
            close(fd)
            unlink(tmpPath)
            throw e
        }
        guard fsync(fd) == 0 else {
            let e = StateError.io("cannot fsync \(tmpPath)")
            close(fd)
            unlink(tmpPath)
            throw e
        }
        close(fd)
    }
}
