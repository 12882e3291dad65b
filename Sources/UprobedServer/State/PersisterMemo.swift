import Foundation
import UprobeCore

/// A set of probe ids kept as ranges of their numbers (`p<N>`): a request's registrations have
/// consecutive ids, so 241,362 of them are one range rather than 241,362 strings in a hash set
/// (5-7 MB, and a copy of it at every snapshot). Other ids (none are made today; a state file
/// may hold them) go into a plain set.
struct ProbeIDSet: Sendable {
    fileprivate var numbers = IndexSet()
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

    /// `contains(r.id)` and `insert(r.id)`, from the record's number: a record makes its id
    /// string when asked.
    func contains(_ r: ProbeRecord) -> Bool {
        if let n = r.number { return Int(exactly: n).map { numbers.contains($0) } ?? false }
        return others.contains(r.id)
    }

    mutating func insert(_ r: ProbeRecord) {
        if let n = r.number, let i = Int(exactly: n) { numbers.insert(i) } else { others.insert(r.id) }
    }

    mutating func formUnion(_ ids: some Sequence<String>) {
        for id in ids { insert(id) }
    }

    /// Removes `ids`, consecutive numbers as one range: removing a whole binary's 241,362
    /// ids one by one took 20 ms of the writer's time before an unregister's reply.
    mutating func subtract(_ ids: some Sequence<String>) {
        var list: [Int] = []
        for id in ids {
            if let n = Self.number(id) { list.append(n) } else { others.remove(id) }
        }
        list.sort()
        var i = 0
        while i < list.count {
            var end = i + 1
            while end < list.count, list[end] <= list[end - 1] &+ 1 { end += 1 }
            numbers.remove(integersIn: list[i]...list[end - 1])
            i = end
        }
    }
}

/// The stamps each registration was first saved with (`ProbeStamps`), by id. A request's
/// registrations have consecutive ids and share their binary's stamp, so numbered ids are
/// kept as runs of consecutive numbers with one stamp (each distinct stamp kept once): a few
/// runs for a whole binary's 241,362 registrations, where a dictionary entry per id took
/// ~6 MB and removing them all 23 ms of an unregister. Other ids (none are made today) map
/// one by one.
struct StampBook: Sendable {
    private var distinct: [ProbeStamps] = []
    private var indexOf: [ProbeStamps: Int32] = [:]
    /// Sorted by `lo`, never overlapping; adjacent runs have different stamps.
    private var runs: [Run] = []
    private var numbered = 0
    private var byOther: [String: Int32] = [:]

    private struct Run: Sendable {
        var lo: UInt64
        var hi: UInt64
        var stamp: Int32
    }

    init() {}

    var count: Int { numbered + byOther.count }

    mutating func reserveCapacity(_ n: Int) {}

    subscript(id: String) -> ProbeStamps? {
        get {
            let i: Int32?
            if let n = ProbeID.number(id) {
                let r = runIndex(containing: n)
                i = r.map { runs[$0].stamp }
            } else {
                i = byOther[id]
            }
            return i.map { distinct[Int($0)] }
        }
        set {
            if let n = ProbeID.number(id) {
                remove(n...n)
                if let newValue { insert(n, index(of: newValue)) }
            } else {
                byOther[id] = newValue.map { index(of: $0) }
            }
        }
    }

    /// `self[r.id]`, from the record's number (a record makes its id string when asked).
    subscript(record r: ProbeRecord) -> ProbeStamps? {
        get {
            guard let n = r.number else { return self[r.id] }
            return runIndex(containing: n).map { distinct[Int(runs[$0].stamp)] }
        }
        set {
            guard let n = r.number else { self[r.id] = newValue; return }
            remove(n...n)
            if let newValue { insert(n, index(of: newValue)) }
        }
    }

    private mutating func index(of s: ProbeStamps) -> Int32 {
        if let i = indexOf[s] { return i }
        let i = Int32(distinct.count)
        distinct.append(s)
        indexOf[s] = i
        return i
    }

    /// The run whose numbers include `n`.
    private func runIndex(containing n: UInt64) -> Int? {
        let p = lastRun(startingAtOrBefore: n)
        guard let p, runs[p].hi >= n else { return nil }
        return p
    }

    /// The last run with `lo <= n` (binary search; the newest run first, where ids grow).
    private func lastRun(startingAtOrBefore n: UInt64) -> Int? {
        guard let last = runs.last else { return nil }
        if last.lo <= n { return runs.count - 1 }
        var lo = 0, hi = runs.count - 1  // runs[hi].lo > n
        guard runs[0].lo <= n else { return nil }
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if runs[mid].lo <= n { lo = mid } else { hi = mid }
        }
        return lo
    }

    /// Enters `n` (in no run) with stamp `s`, joining a neighbouring run of the same stamp.
    private mutating func insert(_ n: UInt64, _ s: Int32) {
        numbered += 1
        let p = lastRun(startingAtOrBefore: n)
        let next = (p ?? -1) + 1
        let joinsLeft = p.map { runs[$0].stamp == s && runs[$0].hi &+ 1 == n && runs[$0].hi != .max } ?? false
        let joinsRight = next < runs.count && runs[next].stamp == s && n != .max && runs[next].lo == n + 1
        switch (joinsLeft, joinsRight) {
        case (true, true):
            runs[p ?? 0].hi = runs[next].hi
            runs.remove(at: next)
        case (true, false): runs[p ?? 0].hi = n
        case (false, true): runs[next].lo = n
        case (false, false): runs.insert(Run(lo: n, hi: n, stamp: s), at: next)
        }
    }

    /// Removes the numbers in `range` from the runs.
    private mutating func remove(_ range: ClosedRange<UInt64>) {
        guard var k = lastRun(startingAtOrBefore: range.upperBound) else { return }
        while k >= 0, runs[k].hi >= range.lowerBound {
            let r = runs[k]
            let cutLo = max(r.lo, range.lowerBound), cutHi = min(r.hi, range.upperBound)
            if cutLo <= cutHi {
                numbered -= Int(cutHi - cutLo) + 1
                var keep: [Run] = []
                if r.lo < cutLo { keep.append(Run(lo: r.lo, hi: cutLo - 1, stamp: r.stamp)) }
                if cutHi < r.hi { keep.append(Run(lo: cutHi + 1, hi: r.hi, stamp: r.stamp)) }
                runs.replaceSubrange(k...k, with: keep)
            }
            if r.lo <= range.lowerBound { break }
            k -= 1
        }
    }

    mutating func remove(_ id: String) { self[id] = nil }

    /// Removes `ids`, consecutive numbers as one range.
    mutating func remove(_ ids: [String]) {
        var list: [UInt64] = []
        list.reserveCapacity(ids.count)
        for id in ids {
            if let n = ProbeID.number(id) { list.append(n) } else { byOther[id] = nil }
        }
        list.sort()
        var i = 0
        while i < list.count {
            var end = i + 1
            while end < list.count, list[end] <= list[end - 1] &+ 1 { end += 1 }
            remove(list[i]...list[end - 1])
            i = end
        }
    }

    /// Only the stamps of `live`, with the distinct stamps no longer used dropped.
    func keeping(_ live: ProbeIDSet) -> StampBook {
        var out = StampBook()
        // Both sorted: the live ranges are walked once alongside the runs. (Not
        // `rangeView(of:)`: iterating it traps in this Foundation.)
        let ranges = Array(live.numbers.rangeView)
        var j = 0
        for r in runs {
            let stamp = out.index(of: distinct[Int(r.stamp)])
            if let lo = Int(exactly: r.lo), let hi = Int(exactly: r.hi) {
                while j < ranges.count, ranges[j].upperBound <= lo { j += 1 }
                var k = j
                while k < ranges.count, ranges[k].lowerBound <= hi {
                    let a = max(ranges[k].lowerBound, lo), b = min(ranges[k].upperBound - 1, hi)
                    if a <= b {
                        out.runs.append(Run(lo: UInt64(a), hi: UInt64(b), stamp: stamp))
                        out.numbered += b - a + 1
                    }
                    k += 1
                }
            } else {
                // Numbers beyond Int are kept as strings by `ProbeIDSet`.
                var n = r.lo
                while true {
                    if live.contains(ProbeID.make(n)) { out.insert(n, stamp) }
                    if n == r.hi { break }
                    n += 1
                }
            }
        }
        for (id, i) in byOther where live.contains(id) { out.byOther[id] = out.index(of: distinct[Int(i)]) }
        return out
    }
}
