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

    func contains(number n: UInt64) -> Bool { Int(exactly: n).map { numbers.contains($0) } ?? false }

    func contains(_ id: String) -> Bool {
        if let n = Self.number(id) { return numbers.contains(n) }
        return others.contains(id)
    }

    /// `r.id`, read from its number (a record makes its id string when asked).
    func contains(_ r: ProbeRecord) -> Bool {
        if let n = r.number { return contains(number: n) }
        return others.contains(r.id)
    }

    mutating func insert(_ r: ProbeRecord) {
        if let n = r.number, let i = Int(exactly: n) { numbers.insert(i) } else { others.insert(r.id) }
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
/// maps to its index, in `StampIndices` (4 bytes per registration where ids are dense; a
/// dictionary by id number was 26 bytes per registration, 6.4 MB for a whole binary's glob).
struct StampBook: Sendable {
    private var distinct: [ProbeStamps] = []
    private var indexOf: [ProbeStamps: Int32] = [:]
    private var byNumber = StampIndices()
    private var byOther: [String: Int32] = [:]

    init() {}

    var count: Int { byNumber.count + byOther.count }

    /// Kept for callers that know how many are coming; the chunks grow by themselves.
    mutating func reserveCapacity(_ n: Int) {}

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

    /// `self[r.id]`, read from its number (a record makes its id string when asked).
    subscript(record r: ProbeRecord) -> ProbeStamps? {
        get {
            guard let n = r.number else { return self[r.id] }
            return byNumber[n].map { distinct[Int($0)] }
        }
        set {
            guard let n = r.number else { self[r.id] = newValue; return }
            var i: Int32? = nil
            if let newValue { i = index(of: newValue) }
            byNumber[n] = i
        }
    }

    private mutating func index(of s: ProbeStamps) -> Int32 {
        if let i = indexOf[s] { return i }
        let i = Int32(distinct.count)
        distinct.append(s)
        indexOf[s] = i
        return i
    }

    mutating func remove(_ id: String) { self[id] = nil }

    /// Only the stamps of `live`, with the distinct stamps no longer used dropped.
    func keeping(_ live: ProbeIDSet) -> StampBook {
        var out = StampBook()
        out.reserveCapacity(live.count)
        byNumber.forEach { n, i in if live.contains(number: n) { out.byNumber[n] = out.index(of: distinct[Int(i)]) } }
        for (id, i) in byOther where live.contains(id) { out.byOther[id] = out.index(of: distinct[Int(i)]) }
        return out
    }
}

/// Stamp indices by id number, in chunks of 1024 consecutive numbers: a request's ids are
/// consecutive, so a chunk is mostly full (4 bytes per id) and a lookup is one hash and an
/// index. -1 marks a number without a stamp.
struct StampIndices: Sendable {
    private static let chunkSize = 1024
    private struct Chunk: Sendable {
        var indices = [Int32](repeating: -1, count: StampIndices.chunkSize)
        var count = 0
    }
    private var chunks: [UInt64: Chunk] = [:]
    private(set) var count = 0

    subscript(n: UInt64) -> Int32? {
        get {
            guard let c = chunks[n / UInt64(Self.chunkSize)] else { return nil }
            let i = c.indices[Int(n % UInt64(Self.chunkSize))]
            return i < 0 ? nil : i
        }
        set {
            let key = n / UInt64(Self.chunkSize), at = Int(n % UInt64(Self.chunkSize))
            guard let newValue else {
                guard let found = chunks.index(forKey: key), chunks.values[found].indices[at] >= 0 else { return }
                chunks.values[found].indices[at] = -1
                chunks.values[found].count -= 1
                count -= 1
                if chunks.values[found].count == 0 { chunks.remove(at: found) }
                return
            }
            // In place, one hash (a whole binary's first save comes here 241,000 times).
            let added = Self.set(&chunks[key, default: Chunk()], at: at, to: newValue)
            if added { count += 1 }
        }
    }

    /// Whether the place was empty before.
    private static func set(_ c: inout Chunk, at: Int, to value: Int32) -> Bool {
        let added = c.indices[at] < 0
        if added { c.count += 1 }
        c.indices[at] = value
        return added
    }

    /// Every (number, index), in no particular order.
    func forEach(_ body: (UInt64, Int32) -> Void) {
        for (key, c) in chunks {
            for (at, i) in c.indices.enumerated() where i >= 0 { body(key &* UInt64(Self.chunkSize) &+ UInt64(at), i) }
        }
    }
}
