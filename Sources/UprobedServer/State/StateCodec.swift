import UprobeCore
import UprobeELF
import UprobeKernel
import UprobedProtocol

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

    public static func encode(_ state: SavedState) -> [UInt8] { encode(state, names: nil) }

    /// `encode`; with `names`, glob groups' names go to names files (`NameFiles`).
    static func encode(_ state: SavedState, names: NameRefs?) -> [UInt8] {
        var w = JSONWriter(reservingCapacity: 256 + estimatedSize(state.probes))
        w.beginObject()
        w.field("format", SavedState.format)
        w.field("version", SavedState.version)
        if let b = state.bootID { w.field("boot_id", b) }
        w.field("saved_at", state.savedAt)
        w.field("seq", u64(state.seq))
        w.field("next_id", u64(state.nextID))
        w.key("probes")
        w.beginArray()
        writeProbes(state.probes, names: names, into: &w)
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
    /// runs written ahead are passed through, not copied into one line. A line can be
    /// megabytes, and splicing a run into the writer and copying the line out again costs the
    /// writer milliseconds before the batch's reply.
    public static func logEntryParts(seq: UInt64, add: [SavedProbe], encoded: [[UInt8]] = [], remove: [String]) -> [[UInt8]] {
        let runs = encoded.filter { !$0.isEmpty }
        var parts: [[UInt8]] = []
        var w = JSONWriter(reservingCapacity: 64 + (add.isEmpty ? 0 : estimatedSize(add)) + remove.count * 12)
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
        writeRemovals(remove, into: &w)
        w.endObject()
        parts.append(w.line())
        return parts
    }

    /// A log line's removed ids: `p<N>` ids by N, a lone one as a number and consecutive ones
    /// as a range (`"remove_ids": [n, [first, last], …]`: removing every registration of a
    /// 241,362-probe glob is a few bytes, not 2.4 MB, and scattered ids take 8 bytes each
    /// rather than 11), any other id listed (`"remove": ["…", …]`).
    static func writeRemovals(_ ids: [String], into w: inout JSONWriter) {
        guard !ids.isEmpty else { return }
        var numbers: [UInt64] = []
        var others: [String] = []
        numbers.reserveCapacity(ids.count)
        for id in ids {
            if let n = ProbeID.number(id) { numbers.append(n) } else { others.append(id) }
        }
        if !others.isEmpty { w.field("remove", strings: others.sorted()) }
        guard !numbers.isEmpty else { return }
        numbers.sort()
        w.key("remove_ids")
        w.beginArray()
        var i = 0
        while i < numbers.count {
            var end = i + 1
            while end < numbers.count, numbers[end] <= numbers[end - 1] &+ 1 { end += 1 }
            if numbers[end - 1] == numbers[i] {
                writeU64(numbers[i], into: &w)
            } else {
                w.beginArray()
                writeU64(numbers[i], into: &w)
                writeU64(numbers[end - 1], into: &w)
                w.endArray()
            }
            i = end
        }
        w.endArray()
    }

    /// The ids a log line removes (`writeRemovals`).
    static func removals(_ o: JSONObject) throws(StateError) -> [String] {
        var ids = o["remove"]?.arrayValue?.compactMap(\.stringValue) ?? []
        guard let ranges = o["remove_ids"] else { return ids }
        guard let list = ranges.arrayValue else { throw StateError(code: .stateCorrupt, message: "remove_ids is not a list") }
        for r in list {
            if let n = readU64(r) {
                ids.append(ProbeID.make(n))
                continue
            }
            guard let pair = r.arrayValue, pair.count == 2, let a = readU64(pair[0]), let b = readU64(pair[1]), a <= b,
                  b - a < 1 << 24 else { throw StateError(code: .stateCorrupt, message: "remove_ids has a bad entry") }
            for n in a...b { ids.append(ProbeID.make(n)) }
        }
        return ids
    }

    /// Registrations as array elements, `{…},{…}`, for `encodeLogEntry(encoded:)`.
    static func encodeElements(_ probes: [SavedProbe]) -> [UInt8] {
        var w = JSONWriter(reservingCapacity: estimatedSize(probes))
        w.beginArray()  // for the commas between elements; its bracket is dropped
        _ = w.flush()
        writeProbes(probes, into: &w)
        return w.flush()  // the elements, without the closing bracket
    }

    /// A saved probe written in full takes ~350 bytes (`estimatedSize`).
    static let bytesPerProbe = 400

    /// Whether `p` can be a row of a format 2 or 3 run (read, no longer written): one target,
    /// no aliases, no USDT semaphore, and a spec that is that target's plain symbol.
    static func isRow(_ p: SavedProbe) -> Bool {
        // A latency probe that has measured nothing yet (a new registration) rides in a run:
        // every row shares its empty histogram. One that has measured something is written in full.
        guard p.targets.count == 1, let symbol = p.spec.symbol, p.spec.offset == nil, p.spec.usdt == nil,
              p.latency.map({ $0.calls == 0 && $0.unobserved == 0 && $0.returns == 0 }) ?? true,
              p.latencyBase == nil, p.olderSites == nil, p.retired.isEmpty else { return false }
        let t = p.targets[0]
        return t.symbolIs(symbol) && t.aliases.isEmpty && t.refCtrOffset == nil
    }

    /// Whether two rows share everything but the id, the hits and their target's symbol and
    /// offset (`isRow` holds for both). Listed by hand: comparing copies with those fields
    /// cleared costs 7 ms for 10,000 probes. `StateFileTests.rowFields` fails when one of these
    /// types gains a field, so a new field cannot be silently dropped from runs.
    static func sameRowShape(_ a: SavedProbe, _ b: SavedProbe) -> Bool {
        // Fields read in place: copying the spec and the target first (their strings retained
        // and released) took half the comparison's time over 241,000 registrations.
        a.consumer == b.consumer && a.owner == b.owner && a.registeredAt == b.registeredAt
            && a.stamp == b.stamp && a.pidStartTime == b.pidStartTime && a.degradedReason == b.degradedReason
            && a.endedReason == b.endedReason && a.probeSet == b.probeSet
            && a.spec.path == b.spec.path && a.spec.pid == b.spec.pid && a.spec.retprobe == b.spec.retprobe
            && a.spec.force == b.spec.force && a.spec.follow == b.spec.follow
            && a.spec.latency == b.spec.latency && (a.latency == nil) == (b.latency == nil)
            && a.latencyBase == b.latencyBase && a.olderSites == b.olderSites && a.retired == b.retired
            && a.targets[0].path == b.targets[0].path && a.targets[0].device == b.targets[0].device
            && a.targets[0].inode == b.targets[0].inode && a.targets[0].buildID == b.targets[0].buildID
    }

    /// Writes `probes` as array elements into an open array. Consecutive registrations of one
    /// shape (`sameGroupShape`: a large request's probes on one binary, a glob's included)
    /// share one element, a group (`writeGroup`); any other is written in full.
    static func writeProbes(_ probes: [SavedProbe], names: NameRefs? = nil, into w: inout JSONWriter) {
        // Compared through the buffer: its elements are passed by reference, where an array's
        // would be copied for each call (10,000 copies of a registration cost ~2 ms).
        probes.withUnsafeBufferPointer { buf in
            var i = 0
            while i < buf.count {
                var end = i + 1
                if isGroupMember(buf[i]) {
                    while end < buf.count, isGroupMember(buf[end]), sameGroupShape(buf[i], buf[end]) { end += 1 }
                }
                if end - i > 1 { writeGroup(UnsafeBufferPointer(rebasing: buf[i..<end]), names: names, into: &w) } else { writeProbe(buf[i], into: &w) }
                i = end
            }
        }
    }

    /// The registrations of a `probes` or `add` list, groups (format 4) and runs (formats 2
    /// and 3: `{"run": <the first, in full>, "rows": [[id, symbol, offset(, hits(, slot(,
    /// base hits)))], …]}`) expanded.
    static func decodeProbes(_ list: [JSONValue], names: NameSource? = nil) throws(StateError) -> [SavedProbe] {
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: why) }
        var out: [SavedProbe] = []
        out.reserveCapacity(list.count)
        for (n, v) in list.enumerated() {
            if let o = v.objectValue, o["group"] != nil {
                try decodeGroup(o, n, names: names, into: &out)
                continue
            }
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
                guard let a = row.arrayValue, (3...6).contains(a.count), let id = a[0].stringValue, !id.isEmpty,
                      let symbol = a[1].stringValue, !symbol.isEmpty, let offset = readU64(a[2]),
                      let hits = a.count >= 4 ? readU64(a[3]) : 0,
                      let slot = a.count >= 5 ? readU64(a[4]).flatMap({ UInt32(exactly: $0) }) : 0,
                      let base = a.count == 6 ? readU64(a[5]) : 0 else {
                    throw corrupt("probes[\(n)].rows[\(k)] is not [id, symbol, offset], [id, symbol, offset, hits] or [id, symbol, offset, hits, slot(, base hits)]")
                }
                var p = template
                p.id = id
                p.hits = hits
                p.slots = a.count >= 5 ? [slot] : nil
                p.baseHits = base
                p.spec.symbol = symbol
                p.targets[0].symbol = symbol
                p.targets[0].fileOffset = offset
                out.append(p)
            }
        }
        return out
    }

    /// One registration as the state file stores it, written directly rather than built as a
    /// JSON tree first: for a 10,000-probe request the tree would take most of its time.
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
            t.withSymbolUTF8 { w.field("symbol", utf8: $0) }
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
        if let slots = p.slots {
            w.key("slots")
            w.beginArray()
            for s in slots { w.value(u64(UInt64(s))) }
            w.endArray()
            if p.baseHits != 0 { w.field("base_hits", u64(p.baseHits)) }
        }
        if let s = p.probeSet { w.field("set", s) }
        if let h = p.latency { w.field("latency", latencyJSON(h)) }
        if let h = p.latencyBase { w.field("latency_base", latencyJSON(h)) }
        writeFollowed(p, into: &w)
        w.endObject()
    }

    public static func decode(_ bytes: [UInt8]) throws(StateError) -> SavedState { try decode(bytes, names: nil) }

    /// `decode`; with `names`, glob groups' members get their names from their names files as
    /// they are read (`NameSource`), those it cannot name keep `nameFile` for `NameFiles.fill`.
    static func decode(_ bytes: [UInt8], names: NameSource?) throws(StateError) -> SavedState {
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: why) }
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
        let probes = try decodeProbes(list, names: names)
        var seen: Set<String> = []
        for p in probes {
            guard seen.insert(p.id).inserted else { throw corrupt("probe id \(p.id) appears twice") }
        }
        var state = SavedState(bootID: root["boot_id"]?.stringValue, savedAt: root["saved_at"]?.doubleValue ?? 0, probes: probes)
        state.formatVersion = version
        state.seq = readU64(root["seq"]) ?? 0
        // A file without `next_id` (an older uprobed's): the highest saved id is the best floor there is.
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
        try replay(log, onto: base, names: nil)
    }

    /// `replay`, naming glob groups' members as `decode(_:names:)` does.
    static func replay(_ log: [UInt8], onto base: SavedState, names: NameSource?) throws(StateError) -> SavedState {
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: why) }
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
                throw StateError(code: .stateIncomplete,
                                 message: "log line \(n + 1) is change \(seq), but the last change before it is \(state.seq): changes \(state.seq + 1) to \(seq - 1) are in no file",
                                 missingChanges: state.seq + 1...seq - 1)
            }
            let gone: [String]
            do throws(StateError) { gone = try removals(o) } catch {
                throw corrupt("log line \(n + 1): \(error.message)")
            }
            for id in gone {
                if index.removeValue(forKey: id) != nil { removed.insert(id) }
            }
            let added: [SavedProbe]
            do throws(StateError) { added = try decodeProbes(o["add"]?.arrayValue ?? [], names: names) } catch {
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
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: why) }
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
        var p = SavedProbe(
            id: id, consumer: o["consumer"]?.stringValue,
            owner: Peer(pid: Int32(clamping: owner["pid"]?.int64Value ?? 0), uid: uid32, gid: gid32),
            spec: RequestHandler.input(spec), registeredAt: registeredAt, hits: hits, targets: targets,
            stamp: stamp, pidStartTime: readU64(o["pid_start_time"]), degradedReason: o["degraded_reason"]?.stringValue,
            endedReason: o["ended_reason"]?.stringValue, probeSet: o["set"]?.stringValue)
        if let list = o["slots"] {
            guard let values = list.arrayValue, values.count == targets.count else {
                throw corrupt("probes[\(n)].slots is not one slot per target")
            }
            var slots: [UInt32] = []
            for v in values {
                guard let s = readU64(v).flatMap({ UInt32(exactly: $0) }) else { throw corrupt("probes[\(n)].slots has a bad slot") }
                slots.append(s)
            }
            p.slots = slots
            p.baseHits = readU64(o["base_hits"]) ?? 0
        }
        if let l = o["latency"] {
            guard let h = latency(l) else { throw corrupt("probes[\(n)].latency is malformed") }
            p.latency = h
        } else if spec.latency {
            p.latency = LatencyHistogram()
        }
        if let l = o["latency_base"] {
            guard let h = latency(l), p.slots != nil else { throw corrupt("probes[\(n)].latency_base is malformed or without slots") }
            p.latencyBase = h
        }
        try decodeFollowed(o, into: &p, n)
        return p
    }

    /// A latency probe's histogram in the state files: the counts, and the non-empty buckets
    /// as [index, count] (`LatencyHistogram` fixes what an index means).
    static func latencyJSON(_ h: LatencyHistogram) -> JSONValue {
        var o = JSONObject()
        o["calls"] = u64(h.calls)
        o["returns"] = u64(h.returns)
        o["unobserved"] = u64(h.unobserved)
        o["sum_ns"] = u64(h.sumNanoseconds)
        o["min_ns"] = u64(h.minNanoseconds)
        o["max_ns"] = u64(h.maxNanoseconds)
        o["buckets"] = .array(h.buckets.indices.compactMap { i in
            h.buckets[i] == 0 ? nil : .array([.int(Int64(i)), u64(h.buckets[i])])
        })
        return .object(o)
    }

    static func latency(_ v: JSONValue) -> LatencyHistogram? {
        guard let o = v.objectValue, let calls = readU64(o["calls"]), let returns = readU64(o["returns"]),
              let unobserved = readU64(o["unobserved"]), let sum = readU64(o["sum_ns"]), let lo = readU64(o["min_ns"]),
              let hi = readU64(o["max_ns"]), let list = o["buckets"]?.arrayValue else { return nil }
        var h = LatencyHistogram()
        (h.calls, h.returns, h.unobserved, h.sumNanoseconds, h.minNanoseconds, h.maxNanoseconds) = (calls, returns, unobserved, sum, lo, hi)
        guard !list.isEmpty else { return h }   // nothing measured: no bucket array (as it was made)
        h.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        for b in list {
            guard let pair = b.arrayValue, pair.count == 2, let i = pair[0].int64Value, i >= 0,
                  i < Int64(LatencyHistogram.bucketCount), let c = readU64(pair[1]) else { return nil }
            h.buckets[Int(i)] = c
        }
        return h
    }
}
