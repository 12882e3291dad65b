import UprobeCore
import UprobeELF
import UprobedProtocol

/// Groups (format 4): the registrations of one request on one binary written as one element,
/// what they share once and what each has in columns.
///
///     {"group": <the first registration, in full>,
///      "each_symbol": true,            // the spec's symbol is each one's own (not a glob)
///      "ids": [[first, last], …],      // p<N> ranges; or "id_list": ["…", …]
///      "symbols": ["…", …], "offsets": [n, …],
///      "slots": [[first, count], …],   // with the shared shape's slots
///      "hits": [n, …],                 // omitted when all are zero
///      "base_hits": [[i, n], …], "aliases": [[i, ["…"]], …]}   // sparse: only where present
///
/// What the members share is what `sameGroupShape` compares; the first registration's own
/// fields (id, symbol, offset, hits, slot, aliases) are ignored in favour of the columns.
///
/// Adding a per-registration field: a sparse column (`[[index, value], …]`, omitted when no
/// member has it) written in `writeGroup` and read in `decodeGroup`; a member that has it stays
/// in its group, and a reader that does not know the column ignores it. A field every member
/// of a request shares goes into the full form (`writeProbe`/`decodeProbe`) and into
/// `sameGroupShape` instead.
///
/// A glob over 241,362 functions of swift-frontend is 30 MB as one group (mostly the symbols,
/// 107 bytes on average) against 122 MB as full entries: a glob's spec symbol is the glob, so
/// none of its registrations could be a row of a format 3 run.
extension StateCodec {
    /// Whether `p` can be a member of a group: one target, not USDT, a symbol spec (plain or a
    /// glob), no latency measured yet (a histogram is written in full), and no file versions of
    /// a followed binary (`older_sites`, `retired`: written in full).
    static func isGroupMember(_ p: SavedProbe) -> Bool {
        guard p.targets.count == 1, p.spec.symbol != nil, p.targets[0].symbol != nil, p.spec.offset == nil, p.spec.usdt == nil,
              p.targets[0].refCtrOffset == nil,
              p.latency.map({ $0.calls == 0 && $0.unobserved == 0 && $0.returns == 0 }) ?? true,
              p.latencyBase == nil, p.olderSites == nil, p.retired.isEmpty else { return false }
        return p.slots.map { $0.count == 1 } ?? true
    }

    /// Whether the spec's symbol is the target's own (a plain symbol) rather than a glob's.
    static func eachSymbol(_ p: SavedProbe) -> Bool { p.spec.symbol == p.targets[0].symbol }

    /// Whether two group members share everything a group writes once (`sameRowShape`, the
    /// presence of slots, and the spec's symbol unless each has its own).
    static func sameGroupShape(_ a: SavedProbe, _ b: SavedProbe) -> Bool {
        let each = eachSymbol(a)
        return sameRowShape(a, b) && (a.slots == nil) == (b.slots == nil) && each == eachSymbol(b)
            && (each || a.spec.symbol == b.spec.symbol)
    }

    /// Bytes a group takes per member beyond its symbol: reserving enough up front spares
    /// copying a line of tens of megabytes when the buffer would double.
    static let bytesPerMember = 40

    /// An estimate of the encoded size of `probes` (groups and full entries).
    static func estimatedSize(_ probes: [SavedProbe]) -> Int {
        var n = 1024
        for i in probes.indices {
            n += probes[i].targets.count == 1 ? bytesPerMember + probes[i].targets[0].symbolByteCount : bytesPerProbe
        }
        return n
    }

    static func writeU64(_ v: UInt64, into w: inout JSONWriter) {
        if v <= UInt64(Int64.max) { w.uint(v) } else { w.string(String(v)) }
    }

    /// Writes `probes` (members of one group, at least two) as one group element.
    static func writeGroup(_ probes: UnsafeBufferPointer<SavedProbe>, names: NameRefs?, into w: inout JSONWriter) {
        guard let first = probes.first else { return }
        writeGroup(first: first, SavedColumns(probes: probes), names: names, into: &w)
    }

    /// The names of a glob group's members as their names file holds them (`NameTable`); nil
    /// if the group keeps its names inline: each member's spec symbol is its own (a request
    /// that named its functions: the names are the request), the binary has no stamp to check
    /// it by at restore, or a member has no name.
    static func nameTable(first: SavedProbe, _ probes: some GroupColumns) -> NameTable? {
        guard !eachSymbol(first), let identity = NameIdentity(first) else { return nil }
        var t = NameTable(identity: identity)
        t.offsets.reserveCapacity(probes.indices.count)
        t.symbols.reserveCapacity(probes.indices.count)
        for i in probes.indices {
            guard let s = probes.symbol(i), !s.isEmpty else { return nil }
            t.offsets.append(probes.offset(i))
            t.symbols.append(s)
            let a = probes.aliases(i)
            if !a.isEmpty { t.aliases[i] = a }
        }
        return t
    }

    /// The names file of a glob group's members (stored if new), or nil to write the names
    /// inline (`nameTable`). Members resolved by this process (`freshlyResolved`) are first
    /// looked up by what determines their names here, the binary, the spec and the offsets
    /// (`NameFiles.reused`): a glob registered again on the same file skips making its table
    /// and its checksum (~40 ms for a whole binary, on the CPU the kernel's attach leaves).
    static func storedNames(first: SavedProbe, _ probes: some GroupColumns, _ refs: NameRefs) -> String? {
        guard !eachSymbol(first), let identity = NameIdentity(first) else { return nil }
        var layout: UInt64? = nil
        if probes.freshlyResolved {
            var c = NameChecksum()
            identity.json().withUnsafeBytes { c.add($0) }
            let pid = first.spec.pid.map { String($0) } ?? ""
            let spec: [UInt8] = Array(first.spec.path.utf8) + [0] + Array((first.spec.symbol ?? "").utf8) + [0] + Array(pid.utf8) + [0]
            spec.withUnsafeBytes { c.add($0) }
            let offsets: [UInt64] = probes.indices.map { probes.offset($0) }
            offsets.withUnsafeBytes { c.add($0) }
            layout = c.value
            if let key = layout, let name = refs.reused(layout: key) { return name }
        }
        guard let table = nameTable(first: first, probes), let name = refs.store(table) else { return nil }
        if let layout { refs.files.remember(layout: layout, name: name) }
        return name
    }

    /// Writes a group element: `first` in full, then each member's columns. With `names`, a
    /// glob group's names go to a names file (written and synced first) that the element
    /// names instead of its `symbols` and `aliases` columns.
    static func writeGroup(first: SavedProbe, _ probes: some GroupColumns, names: NameRefs?, into w: inout JSONWriter) {
        let nameFile = names.flatMap { storedNames(first: first, probes, $0) }
        w.beginObject()
        w.key("group")
        writeProbe(first, into: &w)
        if eachSymbol(first) { w.field("each_symbol", true) }
        // Members are read in place (`probes[i].field`, through the buffer) rather than as loop
        // values or through an array: either copies the whole registration, retains and
        // releases included, and copying 10,000 of them per column took as long as writing
        // the columns.
        let numbers = probes.indices.map { probes.idNumber($0) }
        if numbers.allSatisfy({ $0 != nil }) {
            w.key("ids")
            w.beginArray()
            var i = probes.startIndex
            while i < probes.endIndex {
                let start = numbers[i] ?? 0
                var end = i + 1
                while end < probes.endIndex, numbers[end] == start &+ UInt64(end - i) { end += 1 }
                w.beginArray()
                writeU64(start, into: &w)
                writeU64(start &+ UInt64(end - i - 1), into: &w)
                w.endArray()
                i = end
            }
            w.endArray()
        } else {
            w.key("id_list")
            w.beginArray()
            for i in probes.indices { w.string(probes.id(i)) }
            w.endArray()
        }
        if let nameFile {
            w.field("names", nameFile)
        } else {
            w.key("symbols")
            w.beginArray()
            for i in probes.indices { w.string(probes.symbol(i) ?? "") }
            w.endArray()
        }
        w.key("offsets")
        w.beginArray()
        for i in probes.indices { writeU64(probes.offset(i), into: &w) }
        w.endArray()
        if first.slots != nil {
            // Runs of consecutive slots: a fresh request's slots are mostly one run.
            w.key("slots")
            w.beginArray()
            var i = probes.startIndex
            while i < probes.endIndex {
                let start = probes.slot(i) ?? 0
                var end = i + 1
                while end < probes.endIndex, probes.slot(end) == start &+ UInt32(truncatingIfNeeded: end - i) { end += 1 }
                w.beginArray()
                w.uint(UInt64(start))
                w.uint(UInt64(end - i))
                w.endArray()
                i = end
            }
            w.endArray()
        }
        if probes.indices.contains(where: { probes.hits($0) != 0 }) {
            w.key("hits")
            w.beginArray()
            for i in probes.indices { writeU64(probes.hits(i), into: &w) }
            w.endArray()
        }
        writeSparse("base_hits", probes.indices, where: { probes.baseHits($0) != 0 }, into: &w) { i, w in writeU64(probes.baseHits(i), into: &w) }
        if nameFile == nil { writeAliases(probes, into: &w) }
        w.endObject()
    }

    static func writeAliases(_ probes: some GroupColumns, into w: inout JSONWriter) {
        writeSparse("aliases", probes.indices, where: { !probes.aliases($0).isEmpty }, into: &w) { i, w in
            w.beginArray()
            for a in probes.aliases(i) { w.string(a) }
            w.endArray()
        }
    }

    /// A sparse column: `[[index, value], …]` for the members where `has` holds; nothing if none.
    static func writeSparse(_ key: StaticString, _ indices: Range<Int>, where has: (Int) -> Bool,
                            into w: inout JSONWriter, _ value: (Int, inout JSONWriter) -> Void) {
        guard indices.contains(where: has) else { return }
        w.key(key)
        w.beginArray()
        for i in indices where has(i) {
            w.beginArray()
            w.uint(UInt64(i))
            value(i, &w)
            w.endArray()
        }
        w.endArray()
    }

    /// The members of a group element (`writeGroup`), appended to `out`.
    static func decodeGroup(_ o: JSONObject, _ n: Int, names: NameSource? = nil, into out: inout [SavedProbe]) throws(StateError) {
        func corrupt(_ why: String) -> StateError { StateError(code: .stateCorrupt, message: "probes[\(n)]: \(why)") }
        guard let first = o["group"] else { throw corrupt("a group without its first registration") }
        let template = try decodeProbe(first, n)
        guard isGroupMember(template) else { throw corrupt("a group of registrations that cannot share one entry") }
        let each = o["each_symbol"]?.boolValue ?? false
        // Format 5: a glob group's names in a names file (`NameFiles.fill` reads them).
        var nameFile: String? = nil
        if let v = o["names"] {
            guard let name = v.stringValue, !name.isEmpty, !each, o["symbols"] == nil, o["aliases"] == nil else {
                throw corrupt("a group's names file is not a name, or comes with its own symbols")
            }
            nameFile = name
        }
        guard let offsets = o["offsets"]?.arrayValue, let symbols = nameFile == nil ? o["symbols"]?.arrayValue : offsets else {
            throw corrupt("a group without symbols or offsets")
        }
        let count = symbols.count
        guard count > 0, offsets.count == count else { throw corrupt("a group's symbols and offsets differ in number") }
        // Ids: p<N> ranges, or a list.
        var ids: [String] = []
        ids.reserveCapacity(count)
        if let ranges = o["ids"]?.arrayValue {
            for r in ranges {
                guard let pair = r.arrayValue, pair.count == 2, let a = readU64(pair[0]), let b = readU64(pair[1]), a <= b,
                      b - a < UInt64(count - ids.count) else { throw corrupt("a group has a bad id range") }
                for k in a...b { ids.append(ProbeID.make(k)) }
            }
        } else if let list = o["id_list"]?.arrayValue {
            for v in list {
                guard let id = v.stringValue, !id.isEmpty else { throw corrupt("a group has a bad id") }
                ids.append(id)
            }
        }
        guard ids.count == count else { throw corrupt("a group has \(ids.count) ids for \(count) registrations") }
        var slots: [UInt32]? = nil
        if template.slots != nil {
            guard let runs = o["slots"]?.arrayValue else { throw corrupt("a group without the slots its first registration has") }
            var all: [UInt32] = []
            all.reserveCapacity(count)
            for r in runs {
                guard let pair = r.arrayValue, pair.count == 2, let a = readU64(pair[0]).flatMap({ UInt32(exactly: $0) }),
                      let len = readU64(pair[1]), len > 0, len <= UInt64(count - all.count),
                      UInt64(a) + len - 1 <= UInt64(UInt32.max) else { throw corrupt("a group has a bad slot run") }
                for k in 0..<UInt32(len) { all.append(a + k) }
            }
            guard all.count == count else { throw corrupt("a group has \(all.count) slots for \(count) registrations") }
            slots = all
        } else if o["slots"] != nil {
            throw corrupt("a group has slots its first registration lacks")
        }
        var hits: [UInt64]? = nil
        if let list = o["hits"] {
            guard let a = list.arrayValue, a.count == count else { throw corrupt("a group's hits differ in number") }
            var h: [UInt64] = []
            h.reserveCapacity(count)
            for v in a {
                guard let x = readU64(v) else { throw corrupt("a group has a bad hit count") }
                h.append(x)
            }
            hits = h
        }
        let baseHits = try sparse(o["base_hits"], count, corrupt) { readU64($0) }
        let aliases = try sparse(o["aliases"], count, corrupt) { v -> [String]? in
            guard let a = v.arrayValue else { return nil }
            let names = a.compactMap(\.stringValue)
            return names.count == a.count && !names.isEmpty ? names : nil
        }
        out.reserveCapacity(out.count + count)
        // Named as they are made (a second pass over 241,000 registrations took 120 ms of a restart).
        let loaded = nameFile.flatMap { names?.loaded($0, for: template) }
        for i in 0..<count {
            guard let symbol = nameFile == nil ? symbols[i].stringValue : "", nameFile != nil || !symbol.isEmpty,
                  let offset = readU64(offsets[i]) else {
                throw corrupt("member \(i) of a group has no symbol or a bad offset")
            }
            var p = template
            p.id = ids[i]
            p.hits = hits?[i] ?? 0
            p.slots = slots.map { [$0[i]] }
            p.baseHits = baseHits[i] ?? 0
            if each { p.spec.symbol = symbol }
            p.targets[0].fileOffset = offset
            if let loaded, let k = loaded.entry(at: offset) {
                p.targets[0].symbol = loaded.table.symbols[k]
                p.targets[0].aliases = loaded.table.aliases[k] ?? []
            } else {
                p.targets[0].symbol = nameFile == nil ? symbol : nil
                p.targets[0].aliases = aliases[i] ?? []
                p.nameFile = nameFile
            }
            out.append(p)
        }
    }

    /// A sparse column read back: the value of each member that has one.
    static func sparse<T>(_ v: JSONValue?, _ count: Int, _ corrupt: (String) -> StateError,
                          _ read: (JSONValue) -> T?) throws(StateError) -> [Int: T] {
        guard let v else { return [:] }
        guard let list = v.arrayValue else { throw corrupt("a group's sparse column is not a list") }
        var out: [Int: T] = [:]
        for e in list {
            guard let pair = e.arrayValue, pair.count == 2, let i = pair[0].int64Value, i >= 0, i < Int64(count),
                  let x = read(pair[1]) else { throw corrupt("a group's sparse column has a bad entry") }
            out[Int(i)] = x
        }
        return out
    }
}

/// What a group's columns read from each of its members (`StateCodec.writeGroup`), indexed
/// from 0: saved registrations, or the records of a request written ahead of its attach.
protocol GroupColumns {
    var indices: Range<Int> { get }
    /// The members were resolved by this process (new registrations): their names follow from
    /// their binary, spec and offsets (`StateCodec.storedNames`).
    var freshlyResolved: Bool { get }
    func id(_ i: Int) -> String
    func idNumber(_ i: Int) -> UInt64?
    func symbol(_ i: Int) -> String?
    func offset(_ i: Int) -> UInt64
    func slot(_ i: Int) -> UInt32?
    func hits(_ i: Int) -> UInt64
    func baseHits(_ i: Int) -> UInt64
    func aliases(_ i: Int) -> [String]
}

extension GroupColumns {
    var freshlyResolved: Bool { false }
    var startIndex: Int { 0 }
    var endIndex: Int { indices.upperBound }
}

/// Saved registrations as a group's columns, read in place through their buffer.
struct SavedColumns: GroupColumns {
    let probes: UnsafeBufferPointer<SavedProbe>
    var indices: Range<Int> { 0..<probes.count }
    func id(_ i: Int) -> String { probes[i].id }
    func idNumber(_ i: Int) -> UInt64? { ProbeID.number(probes[i].id) }
    func symbol(_ i: Int) -> String? { probes[i].targets[0].symbol }
    func offset(_ i: Int) -> UInt64 { probes[i].targets[0].fileOffset }
    func slot(_ i: Int) -> UInt32? { probes[i].slots?.first }
    func hits(_ i: Int) -> UInt64 { probes[i].hits }
    func baseHits(_ i: Int) -> UInt64 { probes[i].baseHits }
    func aliases(_ i: Int) -> [String] { probes[i].targets[0].aliases }
}
