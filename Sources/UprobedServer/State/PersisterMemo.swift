import Foundation
import UprobeCore

/// A set of probe ids kept as ranges of their numbers (`p<N>`): a request's registrations have
/// consecutive ids, so 241,362 of them are one range rather than 241,362 strings in a hash set
/// (5-7 MB, and a copy of it at every snapshot). Other ids (none are made today; a state file
/// may hold them) go into a plain set.
struct ProbeIDSet: Sendable {
    fileprivate private(set) var numbers = IndexSet()
    fileprivate private(set) var others: Set<String> = []

    init() {}
    init(_ ids: some Sequence<String>) { formUnion(ids) }

    private static func number(_ id: String) -> Int? { ProbeID.number(id).flatMap { Int(exactly: $0) } }

    var count: Int { numbers.count + others.count }

    func contains(_ id: String) -> Bool {
        if let n = Self.number(id) { return numbers.contains(n) }
        return others.contains(id)
    }

    mutating func insert(_ id: String) {
        if let n = Self.number(id) { numbers.insert(n) } else { others.insert(id) }
    }

    mutating func formUnion(_ ids: some Sequence<String>) {
        Self.runs(of: ids, numbers: { numbers.insert(integersIn: $0) }, other: { others.insert($0) })
    }

    mutating func subtract(_ ids: some Sequence<String>) {
        Self.runs(of: ids, numbers: { numbers.remove(integersIn: $0) }, other: { others.remove($0) })
    }

    mutating func subtract(_ other: ProbeIDSet) {
        numbers.subtract(other.numbers)
        others.subtract(other.others)
    }

    /// Whether every number in `range` is in the set.
    fileprivate func containsNumbers(_ range: ClosedRange<Int>) -> Bool { numbers.contains(integersIn: range) }

    /// Hands `ids` on as runs of consecutive numbers (a request's ids are one run) and the
    /// other ids one by one: an IndexSet call per id was most of removing a whole binary's ids.
    private static func runs(of ids: some Sequence<String>, numbers: (Range<Int>) -> Void, other: (String) -> Void) {
        var run: Range<Int>? = nil
        for id in ids {
            guard let n = number(id) else { other(id); continue }
            if let r = run, r.upperBound == n {
                run = r.lowerBound..<(n + 1)
                continue
            }
            if let r = run { numbers(r) }
            run = n..<(n + 1)
        }
        if let run { numbers(run) }
    }
}

/// The stamps each registration was first saved with (`ProbeStamps`), by id. A request's
/// registrations share their binary's stamp, so each distinct stamp is kept once and an id
/// maps to its index: about 20 bytes per registration instead of a 56-byte value under a
/// string key (the whole-binary glob's memo was 84 MB at its peak).
struct StampBook: Sendable {
    private var distinct: [ProbeStamps] = []
    private var indexOf: [ProbeStamps: Int32] = [:]
    private var byNumber: [UInt64: Int32] = [:]
    private var byOther: [String: Int32] = [:]

    init() {}

    var count: Int { byNumber.count + byOther.count }

    mutating func reserveCapacity(_ n: Int) { byNumber.reserveCapacity(n) }

    subscript(id: String) -> ProbeStamps? {
        get {
            let i = ProbeID.number(id).map { byNumber[$0] } ?? byOther[id]
            return i.map { distinct[Int($0)] }
        }
        set {
            var i: Int32? = nil
            if let newValue { i = index(of: newValue) }
            if let n = ProbeID.number(id) { byNumber[n] = i } else { byOther[id] = i }
        }
    }

    private mutating func index(of s: ProbeStamps) -> Int32 {
        if let i = indexOf[s] { return i }
        let i = Int32(distinct.count)
        distinct.append(s)
        indexOf[s] = i
        return i
    }

    mutating func remove(_ id: String) {
        if let n = ProbeID.number(id) { remove(number: n) } else { byOther[id] = nil }
    }

    private mutating func remove(number n: UInt64) {
        byNumber[n] = nil
        // A dictionary keeps its capacity when emptied: the whole binary's 241,000 entries
        // (6.4 MB) stayed allocated after every probe was removed. Rebuilt smaller once it is
        // a quarter full: each entry is copied O(1) times over a run of removals.
        if byNumber.capacity > 4096 && byNumber.count < byNumber.capacity / 4 {
            var smaller = [UInt64: Int32](minimumCapacity: byNumber.count * 2)
            for (n, i) in byNumber { smaller[n] = i }
            byNumber = smaller
        }
    }

    /// Drops the stamps of `gone`. When it covers every id kept (a whole binary's removal, one
    /// range of ids), the table goes in one step instead of 241,000 removals.
    mutating func remove(_ gone: ProbeIDSet) {
        for id in gone.others { byOther[id] = nil }
        if let low = byNumber.keys.min(), let high = byNumber.keys.max(),
           let lo = Int(exactly: low), let hi = Int(exactly: high), gone.containsNumbers(lo...hi) {
            byNumber = [:]
            return
        }
        for n in gone.numbers { remove(number: UInt64(n)) }
    }

    /// Entries the id table has room for (tests: a bulk's room goes with its entries).
    var capacity: Int { byNumber.capacity }

    /// Only the stamps of `live`, with the distinct stamps no longer used dropped.
    func keeping(_ live: ProbeIDSet) -> StampBook {
        var out = StampBook()
        out.reserveCapacity(live.count)
        for (n, i) in byNumber where live.contains(ProbeID.make(n)) { out.byNumber[n] = out.index(of: distinct[Int(i)]) }
        for (id, i) in byOther where live.contains(id) { out.byOther[id] = out.index(of: distinct[Int(i)]) }
        return out
    }
}
