import Foundation
import Logging
import Synchronization
import UprobeCore
import UprobeELF
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

/// A state file that cannot be read or written, with a stable code.
public struct StateError: Error, Sendable, CustomStringConvertible {
    /// `state_corrupt` (the file exists but is not a state file this daemon understands),
    /// `state_incomplete` (the files are readable but changes are missing between them: see
    /// `StateCodec.replay`) or `state_io` (the file system refused).
    public let code: String
    public let message: String
    /// The errno of a `state_io` error, to tell a full disk (ENOSPC, EDQUOT) from other failures.
    public var systemError: Int32? = nil
    /// For `state_incomplete`: the sequence numbers of the changes that are in no file.
    public var missingChanges: ClosedRange<UInt64>? = nil
    public var description: String { "\(message) [\(code)]" }

    /// A `state_io` error for the failed call `what`, with the current errno.
    static func io(_ what: String) -> StateError {
        let e = errno
        return StateError(code: "state_io", message: "\(what): \(String(cString: strerror(e)))", systemError: e)
    }

    /// The file system is out of space (or the quota is used up): a write may succeed once
    /// space is freed, e.g. by the space reserve (`SpaceReserve`).
    var isDiskFull: Bool { systemError == ENOSPC || systemError == EDQUOT }
}

/// What identified a probed binary when it was registered, to tell after a restart whether it
/// is still the same file.
public struct FileStamp: Sendable, Equatable {
    public var device: UInt64
    public var inode: UInt64
    public var size: Int64
    public var mtimeNanos: Int64
}

/// One registration as the state file keeps it.
public struct SavedProbe: Sendable, Equatable {
    public var id: String
    public var consumer: String?
    public var owner: Peer
    public var spec: ProbeSpecInput
    public var registeredAt: Double
    /// Hits counted up to the save (carried over as `baseHits` after a restart).
    public var hits: UInt64
    /// Where it was resolved when first registered (never replaced by a later resolution).
    public var targets: [ResolvedProbe]
    /// The first target's file as it was when registered.
    public var stamp: FileStamp?
    /// For a `pid` filter: the process's start time (clock ticks after boot, /proc/PID/stat
    /// field 22) when registered, to notice a reused pid.
    public var pidStartTime: UInt64?
    /// Why it was degraded at the last start (informational; every start decides afresh).
    public var degradedReason: String?
    /// Why it ended (its process exited or stopped being its owner's). Unlike a degraded
    /// registration, an ended one is never attached again: it comes back ended.
    public var endedReason: String? = nil
}

/// The whole state file.
public struct SavedState: Sendable, Equatable {
    public static let format = "uprobed-state"
    /// 2: runs (`StateCodec.writeProbes`) in the snapshot and the log. Version 1 files are read.
    public static let version: Int64 = 2
    /// The format version of the file this state was read from (`version` when made here).
    public var formatVersion: Int64 = SavedState.version
    /// /proc/sys/kernel/random/boot_id when saved: pids and start times mean nothing across boots.
    public var bootID: String?
    public var savedAt: Double
    public var probes: [SavedProbe]
    /// Sequence number of the last change this state includes: log entries at or below it are
    /// already in it (see StateStore).
    public var seq: UInt64 = 0
    /// Lowest probe number never handed out (ids are `p<N>`): a restart must not give a removed
    /// probe's id to a new one, or a client still holding it would act on someone else's probe.
    public var nextID: UInt64 = 1
}

/// JSON encoding of the state file (format name + version; unknown versions are refused).
public enum StateCodec {
    static func u64(_ v: UInt64) -> JSONValue { v <= UInt64(Int64.max) ? .int(Int64(v)) : .string(String(v)) }
    static func readU64(_ v: JSONValue?) -> UInt64? {
        switch v {
        case .int(let i)?: return i >= 0 ? UInt64(i) : nil
        case .string(let s)?: return UInt64(s)
        default: return nil
        }
    }

    public static func encode(_ state: SavedState) -> [UInt8] {
        var w = JSONWriter(reservingCapacity: 256 + state.probes.count * bytesPerProbe)
        w.beginObject()
        w.field("format", SavedState.format)
        w.field("version", SavedState.version)
        if let b = state.bootID { w.field("boot_id", b) }
        w.field("saved_at", state.savedAt)
        w.field("seq", u64(state.seq))
        w.field("next_id", u64(state.nextID))
        w.key("probes")
        w.beginArray()
        writeProbes(state.probes, into: &w)
        w.endArray()
        w.endObject()
        return w.line()
    }

    /// One log line: the registrations one batch added and the ids it removed. `encoded`:
    /// more added registrations, already written as runs of array elements (`{…},{…}`, see
    /// `encodeElements`); the order of `add` does not matter to `replay`.
    public static func encodeLogEntry(seq: UInt64, add: [SavedProbe], encoded: [[UInt8]] = [], remove: [String]) -> [UInt8] {
        Array(logEntryParts(seq: seq, add: add, encoded: encoded, remove: remove).joined())
    }

    /// `encodeLogEntry` in pieces to be written one after another (`StateStore.append(parts:)`):
    /// runs written ahead are passed through, not copied into one line (splicing a 10,000-probe
    /// run, then copying the line out of the writer, took milliseconds when it was 3.5 MB).
    public static func logEntryParts(seq: UInt64, add: [SavedProbe], encoded: [[UInt8]] = [], remove: [String]) -> [[UInt8]] {
        let runs = encoded.filter { !$0.isEmpty }
        var parts: [[UInt8]] = []
        var w = JSONWriter(reservingCapacity: 64 + add.count * bytesPerProbe + remove.count * 12)
        w.beginObject()
        w.field("seq", u64(seq))
        if !add.isEmpty || !runs.isEmpty {
            w.key("add")
            w.beginArray()
            writeProbes(add, into: &w)
            for run in runs {
                w.externalValue()
                parts.append(w.flush())
                parts.append(run)
            }
            w.endArray()
        }
        if !remove.isEmpty { w.field("remove", strings: remove) }
        w.endObject()
        parts.append(w.line())
        return parts
    }

    /// Registrations as array elements, `{…},{…}`, for `encodeLogEntry(encoded:)`.
    static func encodeElements(_ probes: [SavedProbe]) -> [UInt8] {
        // Probes that cannot be rows (aliases, USDT) are written in full: reserve for that.
        let each = probes.first.map(isRow) == true ? bytesPerRow : bytesPerProbe
        var w = JSONWriter(reservingCapacity: 2 + probes.count * each + 1024)
        w.beginArray()  // for the commas between elements; its bracket is dropped
        _ = w.flush()
        writeProbes(probes, into: &w)
        return w.flush()  // the elements, without the closing bracket
    }

    /// A saved probe written in full takes ~350 bytes, as a row of a run ~30; reserving enough
    /// up front spares copying a large line when the buffer would otherwise double.
    static let bytesPerProbe = 400
    static let bytesPerRow = 40

    /// Whether `p` can be a row of a run (see `writeProbes`): one target, no aliases, no USDT
    /// semaphore, and a spec that is that target's plain symbol (a glob's probes have one
    /// target each and qualify). What a row cannot carry is written in full.
    static func isRow(_ p: SavedProbe) -> Bool {
        guard p.targets.count == 1, let symbol = p.spec.symbol, p.spec.offset == nil, p.spec.usdt == nil else { return false }
        let t = p.targets[0]
        return t.symbol == symbol && t.aliases.isEmpty && t.refCtrOffset == nil
    }

    /// Whether two rows share everything but the id, the hits and their target's symbol and
    /// offset (`isRow` holds for both). Listed by hand: comparing copies with those fields
    /// cleared took 7 ms for 10,000 probes. `StateFileTests.rowFields` fails when one of these
    /// types gains a field, so a new field cannot be silently dropped from runs.
    static func sameRowShape(_ a: SavedProbe, _ b: SavedProbe) -> Bool {
        let s = a.spec, z = b.spec, t = a.targets[0], u = b.targets[0]
        return a.consumer == b.consumer && a.owner == b.owner && a.registeredAt == b.registeredAt
            && a.stamp == b.stamp && a.pidStartTime == b.pidStartTime && a.degradedReason == b.degradedReason
            && a.endedReason == b.endedReason
            && s.path == z.path && s.pid == z.pid && s.retprobe == z.retprobe && s.force == z.force && s.follow == z.follow
            && t.path == u.path && t.device == u.device && t.inode == u.inode && t.buildID == u.buildID
    }

    /// Writes `probes` as array elements into an open array. Consecutive registrations of one
    /// shape (`sameRowShape`: a large request's probes on one binary) share one element, a run:
    /// `{"run": <the first, in full>, "rows": [[id, symbol, offset], …]}`, with hits as a
    /// fourth member of a row when they are not zero. The log entry of a 10,000-probe request
    /// on one binary took 4.1 MB written one object per probe; as a run, 0.24 MB.
    static func writeProbes(_ probes: [SavedProbe], into w: inout JSONWriter) {
        var i = probes.startIndex
        while i < probes.endIndex {
            var end = i + 1
            if isRow(probes[i]) {
                while end < probes.endIndex, isRow(probes[end]), sameRowShape(probes[i], probes[end]) { end += 1 }
            }
            guard end - i > 1 else {
                writeProbe(probes[i], into: &w)
                i = end
                continue
            }
            w.beginObject()
            w.key("run")
            writeProbe(probes[i], into: &w)
            w.key("rows")
            w.beginArray()
            for p in probes[i..<end] {
                w.beginArray()
                w.string(p.id)
                w.string(p.spec.symbol ?? "")
                w.value(u64(p.targets[0].fileOffset))
                if p.hits != 0 { w.value(u64(p.hits)) }
                w.endArray()
            }
            w.endArray()
            w.endObject()
            i = end
        }
    }

    /// The registrations of a `probes` or `add` list, runs expanded (see `writeProbes`).
    static func decodeProbes(_ list: [JSONValue]) throws(StateError) -> [SavedProbe] {
        func corrupt(_ why: String) -> StateError { StateError(code: "state_corrupt", message: why) }
        var out: [SavedProbe] = []
        out.reserveCapacity(list.count)
        for (n, v) in list.enumerated() {
            guard let o = v.objectValue, let rowsValue = o["rows"] else {
                out.append(try decodeProbe(v, n))
                continue
            }
            guard let first = o["run"], let rows = rowsValue.arrayValue, !rows.isEmpty else {
                throw corrupt("probes[\(n)] is a run without its first probe or rows")
            }
            let template = try decodeProbe(first, n)
            guard isRow(template) else {
                throw corrupt("probes[\(n)] is a run of probes that cannot share one entry")
            }
            out.reserveCapacity(out.count + rows.count)
            for (k, row) in rows.enumerated() {
                guard let a = row.arrayValue, a.count == 3 || a.count == 4, let id = a[0].stringValue, !id.isEmpty,
                      let symbol = a[1].stringValue, !symbol.isEmpty, let offset = readU64(a[2]),
                      let hits = a.count == 4 ? readU64(a[3]) : 0 else {
                    throw corrupt("probes[\(n)].rows[\(k)] is not [id, symbol, offset] or [id, symbol, offset, hits]")
                }
                var p = template
                p.id = id
                p.hits = hits
                p.spec.symbol = symbol
                p.targets[0].symbol = symbol
                p.targets[0].fileOffset = offset
                out.append(p)
            }
        }
        return out
    }

    /// One registration as the state file stores it (written directly: a batch of 10,000 was
    /// most of a 10,000-probe request's time when built as a JSON tree first).
    static func writeProbe(_ p: SavedProbe, into w: inout JSONWriter) {
        w.beginObject()
        w.field("id", p.id)
        if let c = p.consumer { w.field("consumer", c) }
        w.key("owner")
        w.beginObject()
        w.field("uid", Int64(p.owner.uid))
        w.field("gid", Int64(p.owner.gid))
        w.field("pid", Int64(p.owner.pid))
        w.endObject()
        w.key("spec")
        ProbeSpec(p.spec).write(into: &w)
        w.field("registered_at", p.registeredAt)
        w.field("hits", u64(p.hits))
        w.objects("targets", p.targets) { w, t in
            w.field("path", t.path)
            w.field("device", u64(t.device))
            w.field("inode", u64(t.inode))
            if let b = t.buildID { w.field("build_id", b) }
            w.field("offset", u64(t.fileOffset))
            if let s = t.symbol { w.field("symbol", s) }
            if !t.aliases.isEmpty { w.field("aliases", strings: t.aliases) }
            if let r = t.refCtrOffset { w.field("ref_ctr_offset", u64(r)) }
        }
        if let s = p.stamp {
            w.key("file")
            w.beginObject()
            w.field("device", u64(s.device))
            w.field("inode", u64(s.inode))
            w.field("size", s.size)
            w.field("mtime_ns", s.mtimeNanos)
            w.endObject()
        }
        if let st = p.pidStartTime { w.field("pid_start_time", u64(st)) }
        if let r = p.degradedReason { w.field("degraded_reason", r) }
        if let r = p.endedReason { w.field("ended_reason", r) }
        w.endObject()
    }

    public static func decode(_ bytes: [UInt8]) throws(StateError) -> SavedState {
        func corrupt(_ why: String) -> StateError { StateError(code: "state_corrupt", message: why) }
        let value: JSONValue
        do { value = try JSONParser.parse(bytes) } catch { throw corrupt("not valid JSON: \(error)") }
        guard let root = value.objectValue, root["format"]?.stringValue == SavedState.format else {
            throw corrupt("not a uprobed state file (no \"format\": \"\(SavedState.format)\")")
        }
        guard let version = root["version"]?.int64Value else { throw corrupt("no format version") }
        guard (1...SavedState.version).contains(version) else {
            throw corrupt("state format version \(version) is not supported (this uprobed reads versions 1 to \(SavedState.version))")
        }
        guard let list = root["probes"]?.arrayValue else { throw corrupt("no \"probes\" list") }
        let probes = try decodeProbes(list)
        var seen: Set<String> = []
        for p in probes {
            guard seen.insert(p.id).inserted else { throw corrupt("probe id \(p.id) appears twice") }
        }
        var state = SavedState(bootID: root["boot_id"]?.stringValue, savedAt: root["saved_at"]?.doubleValue ?? 0, probes: probes)
        state.formatVersion = version
        state.seq = readU64(root["seq"]) ?? 0
        // Files written before `next_id` existed: the highest saved id is the best floor there is.
        state.nextID = max(readU64(root["next_id"]) ?? 1, nextID(after: probes.map(\.id)))
        return state
    }

    /// One more than the highest `p<N>` among `ids` (1 if none).
    static func nextID(after ids: [String]) -> UInt64 {
        ids.reduce(UInt64(1)) { next, id in
            guard let n = ProbeID.number(id), n < UInt64.max else { return next }
            return max(next, n + 1)
        }
    }

    /// Applies the log's complete lines with a sequence number above `base.seq`, in order. A
    /// last line without its newline is a write the crash cut short: it was never synced, so
    /// no reply depended on it, and it is ignored. Any other bad line is corruption.
    ///
    /// The changes must follow `base` without a hole: every line applied has the seq after the
    /// last one applied (after `base.seq` for the first). Each change takes the next seq, and a
    /// snapshot records the seq of the last change it holds (a rewrite takes one of its own),
    /// so the lines after a snapshot continue at its seq + 1, and the first log ever starts at
    /// 1 (no snapshot: base seq 0). Lines at or below the seq reached are skipped, not
    /// checked: a snapshot holds them (a crash before the log it covers was deleted). A
    /// hole means a file that held those changes is gone (a deleted `state.json`): the error
    /// is `state_incomplete` with the missing seqs, because the registrations and removals in
    /// them, and every registration made before the log began, are not in what is left.
    public static func replay(_ log: [UInt8], onto base: SavedState) throws(StateError) -> SavedState {
        func corrupt(_ why: String) -> StateError { StateError(code: "state_corrupt", message: why) }
        var state = base
        var index: [String: Int] = [:]
        for (i, p) in state.probes.enumerated() { index[p.id] = i }
        var removed: Set<String> = []
        var lines = log.split(separator: 0x0A, omittingEmptySubsequences: false)
        if lines.last?.isEmpty == true { lines.removeLast() } else if !lines.isEmpty { lines.removeLast() }  // torn tail
        for (n, line) in lines.enumerated() {
            let value: JSONValue
            do { value = try JSONParser.parse(line) } catch { throw corrupt("log line \(n + 1) is not valid JSON: \(error)") }
            guard let o = value.objectValue, let seq = readU64(o["seq"]) else { throw corrupt("log line \(n + 1) has no seq") }
            guard seq > state.seq else { continue }
            guard seq == state.seq + 1 else {
                throw StateError(code: "state_incomplete",
                                 message: "log line \(n + 1) is change \(seq), but the last change before it is \(state.seq): changes \(state.seq + 1) to \(seq - 1) are in no file",
                                 missingChanges: state.seq + 1...seq - 1)
            }
            for id in o["remove"]?.arrayValue?.compactMap(\.stringValue) ?? [] {
                if index.removeValue(forKey: id) != nil { removed.insert(id) }
            }
            let added: [SavedProbe]
            do throws(StateError) { added = try decodeProbes(o["add"]?.arrayValue ?? []) } catch {
                throw corrupt("log line \(n + 1): \(error.message)")
            }
            for p in added {
                state.nextID = max(state.nextID, nextID(after: [p.id]))
                if let i = index[p.id], !removed.contains(p.id) { state.probes[i] = p } else {
                    index[p.id] = state.probes.count
                    removed.remove(p.id)
                    state.probes.append(p)
                }
            }
            state.seq = seq
        }
        if !removed.isEmpty || state.probes.count != index.count {
            state.probes = state.probes.enumerated().filter { index[$0.element.id] == $0.offset }.map(\.element)
        }
        return state
    }

    static func decodeProbe(_ v: JSONValue, _ n: Int) throws(StateError) -> SavedProbe {
        func corrupt(_ why: String) -> StateError { StateError(code: "state_corrupt", message: why) }
            guard let o = v.objectValue, let id = o["id"]?.stringValue, !id.isEmpty,
                  let owner = o["owner"]?.objectValue, let uid = owner["uid"]?.int64Value, let gid = owner["gid"]?.int64Value,
                  let specValue = o["spec"], let registeredAt = o["registered_at"]?.doubleValue,
                  let hits = readU64(o["hits"]), let targetList = o["targets"]?.arrayValue,
                  let uid32 = UInt32(exactly: uid), let gid32 = UInt32(exactly: gid) else {
                throw corrupt("probes[\(n)] is incomplete")
            }
            let spec: ProbeSpec
            do { spec = try ProbeSpec(json: specValue, context: "probes[\(n)].spec") } catch {
                throw corrupt("probes[\(n)].spec: \(error.message)")
            }
            var targets: [ResolvedProbe] = []
            for t in targetList {
                guard let x = t.objectValue, let path = x["path"]?.stringValue, let dev = readU64(x["device"]),
                      let ino = readU64(x["inode"]), let off = readU64(x["offset"]) else {
                    throw corrupt("probes[\(n)] has an incomplete target")
                }
                targets.append(ResolvedProbe(path: path, device: dev, inode: ino, buildID: x["build_id"]?.stringValue,
                                             fileOffset: off, symbol: x["symbol"]?.stringValue,
                                             aliases: x["aliases"]?.arrayValue?.compactMap(\.stringValue) ?? [],
                                             refCtrOffset: readU64(x["ref_ctr_offset"])))
            }
            var stamp: FileStamp? = nil
            if let f = o["file"]?.objectValue {
                guard let d = readU64(f["device"]), let i = readU64(f["inode"]), let sz = f["size"]?.int64Value,
                      let mt = f["mtime_ns"]?.int64Value else { throw corrupt("probes[\(n)].file is incomplete") }
                stamp = FileStamp(device: d, inode: i, size: sz, mtimeNanos: mt)
            }
            return SavedProbe(
                id: id, consumer: o["consumer"]?.stringValue,
                owner: Peer(pid: Int32(clamping: owner["pid"]?.int64Value ?? 0), uid: uid32, gid: gid32),
                spec: RequestHandler.input(spec), registeredAt: registeredAt, hits: hits, targets: targets,
                stamp: stamp, pidStartTime: readU64(o["pid_start_time"]), degradedReason: o["degraded_reason"]?.stringValue,
                endedReason: o["ended_reason"]?.stringValue)
    }
}
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
    @discardableResult
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

/// Turns engine snapshots into state files: called by the engine's writer once per batch
/// (before replies, so an acknowledged registration is on disk) and once more at a graceful
/// stop with the final hit counts. Log appends are serialized by the memo lock; snapshots are
/// taken with it held and written outside it, one at a time, and an older snapshot never
/// overwrites a newer one.
public final class StatePersister: Sendable {
    let store: StateStore
    let kernel: any KernelBackend
    let counters: ServiceCounters
    private struct Memo {
        /// File and process identity taken when each probe was first saved.
        var stamps: [String: (FileStamp?, UInt64?)] = [:]
        var lastGeneration: UInt64 = 0
        /// Ids the files on disk hold (snapshot plus log). A registration whose batch could not
        /// be saved is never added: the engine answers `state_write_failed` and rolls it back,
        /// so no later snapshot carries it and a restart cannot bring it back.
        var written: Set<String> = []
        /// Sequence number of the last change on disk.
        var seq: UInt64 = 0
        /// Lowest probe number not in any file written so far (see `SavedState.nextID`).
        var nextID: UInt64 = 1
        var snapshotBytes = 0
        var logBytes = 0
        /// The snapshot on disk is an older format version: the first change rewrites it rather
        /// than appending lines an older uprobed, finding the old version, would misread.
        var olderSnapshot = false
        /// Removals done but not on disk: their batch's append failed, or the sync of their
        /// line did. The next append carries them, and any snapshot covers them (it holds only
        /// live registrations).
        var unsavedRemovals: [String] = []
        /// A sync failed. Lines appended before it may have been dropped from the page cache
        /// with the error, so the next change rewrites the snapshot instead of appending.
        var rewriteDue = false
        /// Group commit: removals in lines appended but not yet known to be synced, by the
        /// line's seq. A failed sync turns them into `unsavedRemovals` (their lines may be lost).
        var unsyncedRemovals: [(seq: UInt64, ids: [String])] = []
        /// When the snapshot on disk was written (wall clock); nil if there is none.
        var snapshotAt: Double?
        /// Runs appended to the log whose ids and stamps are not in `written`, `stamps` and
        /// `nextID` yet. Entering 10,000 of them took ~3 ms of the writer's time before the
        /// reply, so `persist` leaves it to the encode-ahead queue; whatever reads the memo
        /// first settles it (`persist` and `checkpoint` begin with `settle()`).
        var unsettled: [(records: [ProbeRecord], stamps: [(FileStamp?, UInt64?)])] = []
        /// A snapshot taken by `capture` is being written outside the lock (`writeCaptured`).
        /// Only one at a time: they share the temporary file, and a later one must not be
        /// overtaken by an earlier one.
        var snapshotInFlight = false
        /// The registry generation and the sum of all hit counters the snapshot on disk was
        /// taken with. A checkpoint that finds both unchanged (an idle daemon) writes nothing:
        /// counters only grow while a generation lasts (a slot is reused only in a new one).
        var savedMark: (generation: UInt64, hits: UInt64)?

        mutating func settle() {
            for run in unsettled {
                stamps.reserveCapacity(stamps.count + run.records.count)
                for (r, s) in zip(run.records, run.stamps) { stamps[r.id] = s }
                noteWritten(run.records.map(\.id))
            }
            unsettled.removeAll()
        }

        /// `ids` are in the log now: on disk, and never to be handed out again.
        mutating func noteWritten(_ ids: [String]) {
            written.formUnion(ids)
            nextID = max(nextID, StateCodec.nextID(after: ids))
        }
    }
    /// The memo's lock. An NSLock (a pthread mutex) rather than `Mutex`: the memo is settled on
    /// the encode-ahead queue too, and ThreadSanitizer does not see `Mutex`.
    private final class MemoCell: @unchecked Sendable {
        // @unchecked: `memo` is only touched with `lock` held.
        private let lock = NSLock()
        private var memo = Memo()
        func withLock<R>(_ body: (inout Memo) -> R) -> R {
            lock.lock()
            defer { lock.unlock() }
            return body(&memo)
        }
    }
    private let memo = MemoCell()
    let bootID: String?
    let groupCommit: Bool
    let aheadQueue: DispatchQueue
    let logger: Logger?
    /// Writes snapshots taken by `capture`, one at a time (see `Memo.snapshotInFlight`).
    private let snapshotQueue: DispatchQueue

    /// Registrations whose log entries are being written ahead of their batch (`prepare`),
    /// keyed by the first record. Taken by the next `persist`, used or not.
    private let prepared = Mutex<[ObjectIdentifier: PreparedRun]>([:])

    /// The log text of a run of new registrations, written on a background queue.
    private final class PreparedRun: Sendable {
        let records: [ProbeRecord]
        private let result = Mutex<(text: [UInt8], stamps: [(FileStamp?, UInt64?)])?>(nil)
        private let done = DispatchSemaphore(value: 0)
        init(_ records: [ProbeRecord]) { self.records = records }

        func fill() {
            var files: [String: FileStamp?] = [:]
            var stamps: [(FileStamp?, UInt64?)] = []
            stamps.reserveCapacity(records.count)
            let saved = records.map { r -> SavedProbe in
                let ids = StatePersister.firstStamps(r, files: &files)
                stamps.append(ids)
                return StatePersister.savedProbe(r, hits: r.baseHits, stamps: ids)
            }
            let text = StateCodec.encodeElements(saved)
            result.withLock { $0 = (text, stamps) }
            done.signal()
        }

        /// Waits for `fill`.
        func get() -> (text: [UInt8], stamps: [(FileStamp?, UInt64?)]) {
            done.wait()
            done.signal()  // stays readable
            return result.withLock { $0 } ?? ([], [])
        }
    }

    /// The engine's prepare hook: `records` are new registrations of one request that a
    /// coming `persist` will probably add (unless the request fails). Their log text is
    /// written now on a background queue, while the writer attaches them in the kernel: a
    /// 10,000-probe request no longer encodes its entry after the attach. A run that
    /// its batch does not add (the request failed) is dropped by that batch's `persist`.
    public func prepare(_ records: [ProbeRecord]) {
        guard let first = records.first else { return }
        let run = PreparedRun(records)
        prepared.withLock { $0[ObjectIdentifier(first)] = run }
        aheadQueue.async { run.fill() }
    }

    /// The engine's sync hook (group commit): makes every line appended so far durable.
    public func sync() throws(StateError) {
        // The lines this sync covers, if any of them removes registrations (the memo lock is
        // not taken otherwise: the writer holds it while it appends the next batch).
        let covers = unsyncedRemovalLines.load(ordering: .relaxed) > 0 ? memo.withLock { $0.seq } : nil
        do throws(StateError) { try store.syncLog() } catch {
            memo.withLock { m in
                m.rewriteDue = true
                // Those lines may be lost with the error: their removals are not known to be
                // on disk, and the rewrite the next change makes must leave them out.
                for line in m.unsyncedRemovals {
                    m.written.formUnion(line.ids)
                    m.unsavedRemovals += line.ids
                }
                m.unsyncedRemovals.removeAll()
                publishUnsaved(m)
            }
            counters.stateWriteFailures.add(1, ordering: .relaxed)
            throw error
        }
        if let covers {
            memo.withLock { m in
                m.unsyncedRemovals.removeAll { $0.seq <= covers }
                publishUnsaved(m)
            }
        }
        counters.stateSyncs.add(1, ordering: .relaxed)
    }

    /// `unsyncedRemovals.count`, readable without the memo lock.
    private let unsyncedRemovalLines = Atomic<Int>(0)

    /// With the memo lock held, after `unsavedRemovals` or `unsyncedRemovals` changed: the
    /// counts `status` shows and `sync` reads.
    private func publishUnsaved(_ m: Memo) {
        counters.stateUnsavedRemovals.store(m.unsavedRemovals.count, ordering: .relaxed)
        unsyncedRemovalLines.store(m.unsyncedRemovals.count, ordering: .relaxed)
        counters.stateReserveBytes.store(store.reserve.heldBytes, ordering: .relaxed)
    }

    /// `groupCommit`: `persist` appends without syncing and the engine calls `sync` (once for
    /// several batches) before it replies; otherwise every append is synced at once.
    /// `aheadQueue` runs `prepare`'s encoding; the daemon shares one serial queue with the
    /// register replies written ahead, so the entry the writer waits for comes first.
    public init(store: StateStore, kernel: any KernelBackend, counters: ServiceCounters, restored: SavedState?,
                groupCommit: Bool = false, aheadQueue: DispatchQueue = .global(), logger: Logger? = nil,
                snapshotQueue: DispatchQueue = DispatchQueue(label: "uprobed-snapshot")) {
        self.logger = logger
        self.snapshotQueue = snapshotQueue
        self.groupCommit = groupCommit
        self.aheadQueue = aheadQueue
        self.store = store
        self.kernel = kernel
        self.counters = counters
        self.bootID = currentBootID()
        var m = Memo()
        for p in restored?.probes ?? [] { m.stamps[p.id] = (p.stamp, p.pidStartTime) }
        m.written = Set(restored?.probes.map(\.id) ?? [])
        m.seq = restored?.seq ?? 0
        m.nextID = restored?.nextID ?? 1
        m.snapshotBytes = store.size(store.path)
        m.logBytes = store.size(store.logPath) + store.size(store.previousLogPath)
        m.olderSnapshot = (restored?.formatVersion ?? SavedState.version) < SavedState.version
        var st = stat()
        if stat(store.path, &st) == 0 { m.snapshotAt = Double(st.st_mtim.tv_sec) }
        memo.withLock { $0 = m }
        counters.stateReserveBytes.store(store.reserve.heldBytes, ordering: .relaxed)
    }

    /// The engine's persist hook, once per batch before its replies: appends the batch's added
    /// and removed registrations (`batchAdded`, `batchRemoved`: the engine says what changed, so
    /// this costs the size of the batch, not of the registry) to the log. Once the log has grown
    /// past the snapshot (at least 1 MiB) a new snapshot is started on `snapshotQueue`; only a
    /// rewrite the replies must wait for (`rewriteDue`, `olderSnapshot`) is written here.
    public func persist(_ snapshot: RegistrySnapshot) throws(StateError) {
        // Runs written ahead by `prepare` are spliced in; the rest is written here. A run's
        // registrations are new (restored ones are never prepared): none is on disk yet.
        // The runs this batch adds whole are found, and waited for, before the memo lock is
        // taken: their encoding is queued on `aheadQueue`, possibly behind a deferred `settle`
        // that needs that lock. Waiting with it held deadlocked the writer (two large
        // registers in a row, found by a soak run).
        let runs = prepared.withLock { p in defer { p.removeAll() }; return p }
        let batch = snapshot.batchAdded
        var runStarts: [Int: PreparedRun] = [:]
        var i = batch.startIndex
        while i < batch.endIndex {
            if let run = runs[ObjectIdentifier(batch[i])], batch.count - i >= run.records.count,
               zip(run.records, batch[i...]).allSatisfy({ $0 === $1 }) {
                runStarts[i] = run
                i += run.records.count
            } else {
                i += 1
            }
        }
        let filled = runStarts.mapValues { run in (run: run, encoded: run.get()) }
        // nil: a full rewrite is due while a snapshot is being written; wait for it, then again.
        var outcome: Result<Bool, StateError>? = nil
        while outcome == nil {
            outcome = persistLocked(snapshot, filled: filled)
            if outcome == nil { snapshotQueue.sync {} }
        }
        let result = outcome ?? .success(false)
        if case .success(true) = result {
            // Once the batch's fsync and reply are done: settled at once, it took the second
            // CPU from them (fsync 0.7 -> 1.2-3.2 ms); started at the sync, it slowed the reply
            // by 1-2 ms. 20 ms later the reply is out and its client is reading it.
            let memo = self.memo
            aheadQueue.asyncAfter(deadline: .now() + .milliseconds(20)) { memo.withLock { $0.settle() } }
        }
        try counted(result.map { _ in () })
    }

    /// `persist` with the memo lock held. True: runs written ahead were appended (to settle).
    private func persistLocked(_ snapshot: RegistrySnapshot,
                               filled: [Int: (run: PreparedRun, encoded: (text: [UInt8], stamps: [(FileStamp?, UInt64?)]))])
        -> Result<Bool, StateError>? {
        let batch = snapshot.batchAdded
        return memo.withLock { m -> Result<Bool, StateError>? in
            guard snapshot.generation >= m.lastGeneration else { return .success(false) }
            m.settle()
            var spliced: [(run: PreparedRun, encoded: (text: [UInt8], stamps: [(FileStamp?, UInt64?)]))] = []
            var added: [ProbeRecord] = []
            var i = batch.startIndex
            while i < batch.endIndex {
                if let f = filled[i] {
                    spliced.append(f)
                    i += f.run.records.count
                } else {
                    if !m.written.contains(batch[i].id) { added.append(batch[i]) }
                    i += 1
                }
            }
            // An ended registration is written again (a log entry's add replaces an earlier one
            // of the same id): a crash must not bring it back as it was.
            let addedIDs = Set(added.map(\.id))
            added += snapshot.batchEnded.filter { !addedIDs.contains($0.id) }
            let removed = (m.unsavedRemovals + snapshot.batchRemoved).filter { m.written.contains($0) }
            if added.isEmpty && spliced.isEmpty && removed.isEmpty {
                m.lastGeneration = snapshot.generation
                return .success(false)
            }
            if m.olderSnapshot || m.rewriteDue {
                // A full rewrite that the batch's reply waits for, with the writer held: after a
                // failed sync the log may have lost lines, and an older format must not be
                // appended to.
                if m.snapshotInFlight { return nil }
                let counts = (try? kernel.readCounters(upTo: snapshot.slotHighWater)) ?? []
                do throws(StateError) { try writeSnapshot(&m, snapshot, counts: counts) } catch {
                    m.unsavedRemovals = removed
                    publishUnsaved(m)
                    return .failure(error)
                }
                publishUnsaved(m)
                return .success(false)
            }
            var files: [String: FileStamp?] = [:]
            let adds = added.map { Self.saved($0, hits: $0.baseHits, stamps: &m.stamps, files: &files) }
            let parts = StateCodec.logEntryParts(seq: m.seq + 1, add: adds, encoded: spliced.map(\.encoded.text), remove: removed.sorted())
            // A line that removes registrations may use the space reserve: acknowledged
            // removals must not come back after a restart because the disk was full.
            do throws(StateError) { try store.append(parts: parts, sync: !groupCommit, useReserve: !removed.isEmpty) } catch {
                m.unsavedRemovals = removed
                publishUnsaved(m)
                return .failure(error)
            }
            m.unsavedRemovals.removeAll()
            m.seq += 1
            if groupCommit && !removed.isEmpty { m.unsyncedRemovals.append((m.seq, removed)) }
            publishUnsaved(m)
            m.logBytes += parts.reduce(0) { $0 + $1.count }
            m.written.subtract(removed)
            for id in removed { m.stamps.removeValue(forKey: id) }
            m.noteWritten(added.map(\.id))
            m.unsettled += spliced.map { ($0.run.records, $0.encoded.stamps) }
            m.lastGeneration = snapshot.generation
            if m.logBytes > max(1 << 20, m.snapshotBytes) && !m.snapshotInFlight {
                // The log has grown past the snapshot: a new one is written on `snapshotQueue`
                // while batches go on. (Written here, a 10,000-probe registry held the writer
                // 32-64 ms, and every request waited.)
                let counts = (try? kernel.readCounters(upTo: snapshot.slotHighWater)) ?? []
                do throws(StateError) {
                    let captured = try capture(&m, snapshot, counts: counts)
                    snapshotQueue.async { _ = self.writeCaptured(captured) }
                } catch {
                    // The log's fsync failed: the batch's sync will say so; rewrite in full next.
                    m.rewriteDue = true
                }
            }
            return .success(!spliced.isEmpty)
        }
    }

    /// Waits until a snapshot being written outside the memo lock is in place (tests; a stop
    /// waits through `checkpoint`).
    func waitForSnapshotWrite() { snapshotQueue.sync {} }

    /// What a snapshot written outside the memo lock needs, taken with it held (`capture`).
    private struct Captured: Sendable {
        let snapshot: RegistrySnapshot
        let counts: [UInt64]
        let stamps: [String: (FileStamp?, UInt64?)]
        let unsettled: [(records: [ProbeRecord], stamps: [(FileStamp?, UInt64?)])]
        /// The last log line the snapshot covers.
        let seq: UInt64
        let nextID: UInt64
        /// Removals not on disk when it was taken: the snapshot, which leaves them out, saves them.
        let unsavedRemovals: [String]
    }

    static func hitSum(_ counts: [UInt64]) -> UInt64 { counts.reduce(0, &+) }

    /// With the memo lock held: takes the registry as of the last log line and moves the log
    /// aside (`StateStore.rotateLog`), so the new snapshot can drop it. Cheap: the snapshot and
    /// the stamps are shared copies. If the log cannot be moved aside (a `prev` left by a
    /// snapshot that failed), it stays: its lines are skipped by their seq after the snapshot.
    private func capture(_ m: inout Memo, _ snapshot: RegistrySnapshot, counts: [UInt64]) throws(StateError) -> Captured {
        if try store.rotateLog() {
            m.logBytes = 0
            // Rotating fsynced the log: every line in it is on disk.
            m.unsyncedRemovals.removeAll()
            publishUnsaved(m)
        }
        m.snapshotInFlight = true
        m.lastGeneration = max(m.lastGeneration, snapshot.generation)
        return Captured(snapshot: snapshot, counts: counts, stamps: m.stamps, unsettled: m.unsettled, seq: m.seq, nextID: m.nextID,
                        unsavedRemovals: m.unsavedRemovals)
    }

    /// Writes a captured snapshot (on `snapshotQueue`, one at a time) and drops the log it
    /// covers. A failure leaves the old snapshot and both logs, which `load` reads together,
    /// and makes the next batch rewrite in full.
    private func writeCaptured(_ c: Captured) -> Result<Void, StateError> {
        var stamps = c.stamps
        for run in c.unsettled {
            for (r, st) in zip(run.records, run.stamps) where stamps[r.id] == nil { stamps[r.id] = st }
        }
        let probes = Self.savedProbes(c.snapshot, counts: c.counts, stamps: &stamps)
        var state = SavedState(bootID: bootID, savedAt: clockRealtime(), probes: probes)
        state.seq = c.seq
        state.nextID = max(c.nextID, StateCodec.nextID(after: probes.map(\.id)))
        let result: Result<Void, StateError>
        do throws(StateError) {
            try store.write(state, covering: .previousLog)
            result = .success(())
        } catch {
            result = .failure(error)
        }
        let store = self.store
        let mark = (generation: c.snapshot.generation, hits: Self.hitSum(c.counts))
        memo.withLock { m in
            m.snapshotInFlight = false
            if case .success = result {
                m.snapshotBytes = store.size(store.path)
                m.olderSnapshot = false
                m.savedMark = mark
                m.snapshotAt = state.savedAt
                if !c.unsavedRemovals.isEmpty {
                    let saved = Set(c.unsavedRemovals)
                    m.unsavedRemovals.removeAll { saved.contains($0) }
                    m.written.subtract(saved)
                }
            } else {
                m.rewriteDue = true
            }
            publishUnsaved(m)
        }
        if case .failure(let e) = result {
            logger?.error("writing the state snapshot failed; the next batch rewrites it with the writer held",
                          metadata: ["error_code": "\(e.code)", "error": "\(e.message)"])
        }
        try? counted(result)
        return result
    }

    /// Rewrites the snapshot with the hit totals of `snapshot` (periodic checkpoint, final
    /// save), waiting for it; the writer is held only while it is taken. Skipped if the writer
    /// has already saved a newer registry.
    public func checkpoint(_ snapshot: RegistrySnapshot) throws(StateError) {
        let counts: [UInt64]
        do { counts = try kernel.readCounters(upTo: snapshot.slotHighWater) } catch {
            throw StateError(code: "state_io", message: "cannot read hit counters: \(error.message)")
        }
        let hits = Self.hitSum(counts)
        while true {
            // Taken with the lock held, written outside it: the writer goes on meanwhile.
            let step: Result<Captured?, StateError>? = memo.withLock { m in
                guard snapshot.generation >= m.lastGeneration else { return .success(nil) }
                if m.snapshotInFlight { return nil }
                // Nothing registered, removed or counted since the snapshot on disk.
                if let saved = m.savedMark, saved.generation == snapshot.generation, saved.hits == hits,
                   m.logBytes == 0, !m.rewriteDue {
                    return .success(nil)
                }
                m.settle()
                do throws(StateError) { return .success(try capture(&m, snapshot, counts: counts)) } catch {
                    m.rewriteDue = true
                    return .failure(error)
                }
            }
            switch step {
            case nil: snapshotQueue.sync {}  // another snapshot is being written; then again
            case .success(nil)?: return
            case .success(let captured?)?:
                let result = snapshotQueue.sync { writeCaptured(captured) }
                if case .failure(let e) = result { throw e }
                return
            case .failure(let e)?: try counted(.failure(e))
            }
        }
    }

    /// What the state files lack compared with `snapshot` (the registry now), for the log line
    /// of a failed final save.
    public func unsaved(_ snapshot: RegistrySnapshot) -> UnsavedChanges {
        memo.withLock { m in
            m.settle()
            var seen: Set<String> = []
            let removals = (m.unsavedRemovals + m.unsyncedRemovals.flatMap(\.ids)).filter { seen.insert($0).inserted }
            let registrations = snapshot.sortedProbes.map(\.id).filter { !m.written.contains($0) }
            return UnsavedChanges(removals: removals, registrations: registrations, snapshotAt: m.snapshotAt)
        }
    }

    /// Counts a write attempt in the service counters and passes its failure on.
    private func counted(_ result: Result<Void, StateError>) throws(StateError) {
        switch result {
        case .success: counters.stateWrites.add(1, ordering: .relaxed)
        case .failure(let e):
            counters.stateWriteFailures.add(1, ordering: .relaxed)
            throw e
        }
    }

    /// `files`: stamps already taken during this write, by path (a batch of 10,000 probes on one
    /// binary stats it once).
    private static func saved(_ r: ProbeRecord, hits: UInt64, stamps: inout [String: (FileStamp?, UInt64?)],
                              files: inout [String: FileStamp?]) -> SavedProbe {
        var ids = stamps[r.id] ?? firstStamps(r, files: &files)
        // A registration that followed its path to a new file is stamped with that file.
        if let t = r.targets.first, let was = ids.0, was.device != t.device || was.inode != t.inode {
            ids.0 = currentStamp(of: t, files: &files)
        }
        stamps[r.id] = ids
        return savedProbe(r, hits: hits, stamps: ids)
    }

    /// Every registration of `snapshot` as the snapshot file keeps it, with its hit total.
    private static func savedProbes(_ snapshot: RegistrySnapshot, counts: [UInt64],
                                    stamps: inout [String: (FileStamp?, UInt64?)]) -> [SavedProbe] {
        var files: [String: FileStamp?] = [:]
        return snapshot.sortedProbes.map { r in
            let hits = r.sites.reduce(r.baseHits) { acc, s in acc &+ (Int(s.slot) < counts.count ? counts[Int(s.slot)] : 0) }
            return saved(r, hits: hits, stamps: &stamps, files: &files)
        }
    }

    /// A registration's identity when first saved: its first target's file (if that is still
    /// the file it was resolved in) and, with a `pid` filter, the process's start time. Used
    /// by `saved` and by runs encoded ahead, so both stamp alike.
    static func firstStamps(_ r: ProbeRecord, files: inout [String: FileStamp?]) -> (FileStamp?, UInt64?) {
        (r.targets.first.flatMap { currentStamp(of: $0, files: &files) }, r.spec.pid.flatMap { processStartTime($0) })
    }

    /// The stamp of `t`'s file as it is now, nil unless it is still `t`'s device and inode.
    /// `files`: stamps already taken during this write, by path (a batch of 10,000 probes on
    /// one binary stats it once).
    static func currentStamp(of t: ResolvedProbe, files: inout [String: FileStamp?]) -> FileStamp? {
        let s: FileStamp?
        if let known = files[t.path] { s = known } else {
            s = fileStamp(t.path)
            files[t.path] = s
        }
        return s.flatMap { $0.device == t.device && $0.inode == t.inode ? $0 : nil }
    }

    static func savedProbe(_ r: ProbeRecord, hits: UInt64, stamps ids: (FileStamp?, UInt64?)) -> SavedProbe {
        var degraded: String? = nil, ended: String? = nil
        switch r.state {
        case .active: break
        case .degraded(let why): degraded = why
        case .ended(let why): ended = why
        }
        return SavedProbe(id: r.id, consumer: r.consumer, owner: r.owner, spec: r.spec, registeredAt: r.registeredAt,
                          hits: hits, targets: r.targets, stamp: ids.0, pidStartTime: ids.1, degradedReason: degraded,
                          endedReason: ended)
    }

    /// Writes the whole registry as the new snapshot.
    private func writeSnapshot(_ m: inout Memo, _ snapshot: RegistrySnapshot, counts: [UInt64]) throws(StateError) {
        let probes = Self.savedProbes(snapshot, counts: counts, stamps: &m.stamps)
        let live = Set(probes.map(\.id))
        var state = SavedState(bootID: bootID, savedAt: clockRealtime(), probes: probes)
        state.seq = m.seq + 1
        m.nextID = max(m.nextID, StateCodec.nextID(after: probes.map(\.id)))
        state.nextID = m.nextID
        try store.write(state)
        m.seq += 1
        m.written = live
        m.stamps = m.stamps.filter { live.contains($0.key) }
        m.snapshotBytes = store.size(store.path)
        m.logBytes = 0
        m.olderSnapshot = false
        m.unsavedRemovals.removeAll()
        m.unsyncedRemovals.removeAll()
        m.snapshotAt = state.savedAt
        m.rewriteDue = false
        m.lastGeneration = snapshot.generation
        m.savedMark = (snapshot.generation, Self.hitSum(counts))
    }
}

/// Decides, for each saved registration, whether it can attach again: the binary must be the
/// same file (device, inode, build-id; size and mtime when there is no build-id), the symbol
/// must still resolve to the same offsets, and a `pid` filter's process must still be the same
/// process and, for a non-admin owner, still the owner's (`ProcessOwnership`). Anything else
/// comes back degraded with a reason, never attached elsewhere; a registration that had ended,
/// or whose process stopped being its owner's while the daemon was down, comes back ended.
public enum RestorePlanner {
    /// `ownership`: for a `pid`-filtered registration, why its process may no longer be probed
    /// for its owner (nil: it may, or the owner is an admin).
    public static func plan(_ state: SavedState, resolver: Resolver, bootID: String?,
                            ownership: (SavedProbe, Int32) -> String? = { _, _ in nil }) -> [RestoreItem] {
        // One resolution per distinct spec: a glob registered once is saved as one record per
        // function, and each must not resolve the glob again.
        let cache = ResolutionCache(resolver: resolver)
        return state.probes.map { p in
            if let why = p.endedReason {
                return RestoreItem(id: p.id, consumer: p.consumer, owner: p.owner, spec: p.spec,
                                   registeredAt: p.registeredAt, baseHits: p.hits, targets: p.targets,
                                   degradedReason: why, ended: true)
            }
            switch check(p, savedBoot: state.bootID, bootID: bootID, resolver: cache, ownership: ownership) {
            case .success(let targets):
                return RestoreItem(id: p.id, consumer: p.consumer, owner: p.owner, spec: p.spec,
                                   registeredAt: p.registeredAt, baseHits: p.hits, targets: targets, degradedReason: nil)
            case .failure(let why):
                return RestoreItem(id: p.id, consumer: p.consumer, owner: p.owner, spec: p.spec,
                                   registeredAt: p.registeredAt, baseHits: p.hits, targets: p.targets,
                                   degradedReason: why.reason, ended: why.ended)
            }
        }
    }

    /// The ownership rule for a restore under `policy`: judged like the running daemon's
    /// `OwnershipWatcher` (owner's groups from the user database; root and admins exempt).
    public static func ownershipCheck(policy: AccessPolicy) -> (SavedProbe, Int32) -> String? {
        var admin: [UInt32: Bool] = [:]
        return { p, pid in
            guard p.owner.uid != 0 else { return nil }
            let isAdmin = admin[p.owner.uid] ?? {
                let who = PeerIdentity(peer: p.owner, supplementaryGroups: OwnershipWatcher.groups(of: p.owner.uid, primary: p.owner.gid))
                let a = policy.role(of: who) == .admin
                admin[p.owner.uid] = a
                return a
            }()
            guard !isAdmin, let problem = ProcessOwnership.problem(pid: pid, uid: p.owner.uid), problem != .gone else { return nil }
            return "process \(pid) is no longer uid \(p.owner.uid)'s (\(problem.likelyCause): \(problem.detail)); noticed when uprobed restarted, so it was not attached again, its hits up to the last save are kept"
        }
    }

    struct Degraded: Error {
        let reason: String
        /// Final: it comes back ended, not degraded.
        var ended = false
    }

    /// The recorded targets as resolved now (fresh warnings etc.), or why they cannot attach.
    static func check(_ p: SavedProbe, savedBoot: String?, bootID: String?, resolver: ResolutionCache,
                      ownership: (SavedProbe, Int32) -> String? = { _, _ in nil }) -> Result<[ResolvedProbe], Degraded> {
        var resolvedNow: [UprobeSiteID: ResolvedProbe] = [:]
        if let why = degradedReason(p, savedBoot: savedBoot, bootID: bootID, resolver: resolver, now: &resolvedNow) {
            return .failure(Degraded(reason: why))
        }
        // After the start-time check: the pid is still the process that was registered.
        if let pid = p.spec.pid, let why = ownership(p, pid) { return .failure(Degraded(reason: why, ended: true)) }
        return .success(p.targets.compactMap { resolvedNow[UprobeSiteID($0)] })
    }

    static func degradedReason(_ p: SavedProbe, savedBoot: String?, bootID: String?, resolver: ResolutionCache,
                               now resolvedNow: inout [UprobeSiteID: ResolvedProbe]) -> String? {
        if let pid = p.spec.pid {
            if let savedBoot, let bootID, savedBoot != bootID {
                return "process \(pid) belonged to an earlier boot of this host; not attached"
            }
            guard let start = processStartTime(pid) else { return "process \(pid) no longer exists; not attached" }
            if let was = p.pidStartTime, was != start {
                return "process \(pid) is a different process now (pid reused); not attached"
            }
        }
        guard let first = p.targets.first else { return "the state file recorded no target for this probe" }
        let now: [ResolvedProbe]
        let byID: [UprobeSiteID: ResolvedProbe]
        do { (now, byID) = try resolver.resolve(p.spec) } catch {
            switch error.code {
            case .fileNotFound, .libraryNotFound:
                return "binary \(first.path) no longer exists (\(error.code)); not attached"
            case .notELF, .malformedELF, .unsupportedELF:
                return "binary \(first.path) is no longer a usable ELF file (\(error.code): \(error.message)); not attached"
            default:
                return "cannot resolve the probe again (\(error.code): \(error.message)); not attached"
            }
        }
        resolvedNow = byID
        guard let current = now.first else { return "the probe no longer resolves to any site; not attached" }
        if current.device != first.device || current.inode != first.inode {
            return "binary \(first.path) was replaced while uprobed was down (device:inode \(first.device):\(first.inode) -> \(current.device):\(current.inode)); not attached"
        }
        if let was = first.buildID, let isNow = current.buildID {
            if was != isNow {
                return "binary \(first.path) was rewritten in place (build-id \(was) -> \(isNow)); not attached"
            }
        } else if let was = p.stamp, let isNow = fileStamp(current.path), was.size != isNow.size || was.mtimeNanos != isNow.mtimeNanos {
            return "binary \(first.path) was modified in place (size or mtime changed, and it has no build-id to prove it is the same build); not attached"
        }
        for t in p.targets where byID[UprobeSiteID(t)] == nil {
            return "\(t.symbol ?? "offset") is no longer at offset \(t.fileOffset) of \(t.path); not attached"
        }
        return nil
    }
}

/// (device, inode, file offset): one uprobe site.
struct UprobeSiteID: Hashable {
    var device: UInt64, inode: UInt64, offset: UInt64
    init(_ t: ResolvedProbe) { device = t.device; inode = t.inode; offset = t.fileOffset }
}

/// Resolves each distinct spec once during a restore.
final class ResolutionCache {
    let resolver: Resolver
    private var done: [String: Result<([ResolvedProbe], [UprobeSiteID: ResolvedProbe]), ResolveError>] = [:]
    init(resolver: Resolver) { self.resolver = resolver }

    func resolve(_ spec: ProbeSpecInput) throws(ResolveError) -> ([ResolvedProbe], [UprobeSiteID: ResolvedProbe]) {
        let key = "\(spec.path)\u{0}\(spec.symbol ?? "")\u{0}\(spec.offset.map(String.init) ?? "")\u{0}\(spec.usdt ?? "")\u{0}\(spec.pid.map(String.init) ?? "")\u{0}\(spec.retprobe)\u{0}\(spec.force)\u{0}\(spec.follow)"
        if let r = done[key] { return try r.get() }
        let r: Result<([ResolvedProbe], [UprobeSiteID: ResolvedProbe]), ResolveError>
        do {
            let targets = try resolver.resolve(spec)
            var index: [UprobeSiteID: ResolvedProbe] = [:]
            for t in targets { index[UprobeSiteID(t)] = t }
            r = .success((targets, index))
        } catch {
            r = .failure(error)
        }
        done[key] = r
        return try r.get()
    }
}

/// (device, inode, size, mtime) of `path`, following symlinks.
func fileStamp(_ path: String) -> FileStamp? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return FileStamp(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
                     mtimeNanos: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
}

/// Field 22 of /proc/PID/stat (start time in clock ticks after boot); nil if there is no such process.
func processStartTime(_ pid: Int32) -> UInt64? {
    guard pid > 0, let bytes = readWholeFile("/proc/\(pid)/stat", limit: 1 << 16) else { return nil }
    // The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    guard let close = bytes.lastIndex(of: UInt8(ascii: ")")) else { return nil }
    let rest = String(decoding: bytes[(close + 1)...], as: UTF8.self).split(separator: " ")
    // rest[0] is field 3 (state); field 22 is rest[19].
    guard rest.count > 19 else { return nil }
    return UInt64(rest[19])
}

func currentBootID() -> String? {
    guard let b = readWholeFile("/proc/sys/kernel/random/boot_id", limit: 256) else { return nil }
    return String(decoding: b, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

func clockRealtime() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
