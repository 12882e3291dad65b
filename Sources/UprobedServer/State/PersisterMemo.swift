import Foundation
import UprobeCore

/// A set of probe ids kept as ranges of their numbers (`p<N>`): a request's registrations have
/// consecutive ids, so 241,362 of them are one range rather than 241,362 strings in a hash set
/// (5-7 MB, and a copy of it at every snapshot). Other ids (none are made today; a state file
/// may hold them) go into a plain set.
struct ProbeIDSet: Sendable {
    private var numbers = IndexSet()
    private var others: Set<String> = []

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
        for id in ids { insert(id) }
    }

    mutating func subtract(_ ids: some Sequence<String>) {
        for id in ids {
            if let n = Self.number(id) { numbers.remove(n) } else { others.remove(id) }
        }
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
        self[id] = nil
        // A dictionary keeps its capacity when emptied: the whole binary's 241,000 entries
        // (6.4 MB) stayed allocated after every probe was removed. Rebuilt smaller once it is
        // a quarter full: each entry is copied O(1) times over a run of removals.
        if byNumber.capacity > 4096 && byNumber.count < byNumber.capacity / 4 {
            var smaller = [UInt64: Int32](minimumCapacity: byNumber.count * 2)
            for (n, i) in byNumber { smaller[n] = i }
            byNumber = smaller
        }
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
