import UprobeKernel

/// `stats` of many probes as columns, row i being one registration with `hits[i]` and
/// `rates[i]`.
///
/// Made from the registry's `StatsRow`s: a plain registration (one site, active, no retired
/// versions) becomes an id number, hits and a rate without its record being read. The others
/// keep their record as the row's `Detail` (its id, state, sites and per-file breakdown).
/// Under load, reading 10,000 record objects and their site arrays (scattered cache misses)
/// was most of a `stats` call.
public struct StatsTable: Sendable {
    /// Row i's id is `p<numbers[i]>` when it has no detail.
    private var numbers: [UInt64] = []
    public private(set) var hits: [UInt64] = []
    /// Mean hits per second since the registration.
    public private(set) var rates: [Double] = []
    /// 1 + the index of row i's detail in `details`; 0 for a plain row.
    private var detailIndex: [UInt32] = []
    private var details: [Detail] = []

    /// A row that is not plain: its record, and its per-file breakdown when shown (see
    /// `ProbeStats.versions`).
    public struct Detail: Sendable {
        public let record: ProbeRecord
        public let versions: [VersionStats]?
        /// A latency probe's histogram (saved base plus its sites' rows); nil otherwise.
        public let latency: LatencyHistogram?
    }

    public var count: Int { hits.count }
    /// Rows that matched before `top` cut them (`count` when nothing was cut).
    public private(set) var total = 0

    /// Row i's detail; nil for a plain row (active, one site, id `p<plainID(i)>`).
    public func detail(_ i: Int) -> Detail? {
        let d = detailIndex[i]
        return d == 0 ? nil : details[Int(d) - 1]
    }

    /// The number N of a plain row's id `p<N>`; nil when the row has a detail.
    public func plainID(_ i: Int) -> UInt64? {
        detailIndex[i] == 0 ? numbers[i] : nil
    }

    public func id(_ i: Int) -> String {
        detail(i)?.record.id ?? ProbeID.make(numbers[i])
    }

    public func row(_ i: Int) -> ProbeStats {
        guard let d = detail(i) else {
            return ProbeStats(id: ProbeID.make(numbers[i]), hits: hits[i], ratePerSecond: rates[i], sites: 1, state: .active)
        }
        return ProbeStats(id: d.record.id, hits: hits[i], ratePerSecond: rates[i], sites: d.record.sites.count,
                          state: d.record.state, versions: d.versions ?? [], latency: d.latency)
    }

    public var rows: [ProbeStats] { (0..<count).map(row) }

    /// The table of the given ids (`probe_not_found` for an unknown one), else of one
    /// consumer's registrations (none for an unknown consumer), else of all, in id order.
    /// `counts`: the counter slots, read after `probes` was published (a slot a record names
    /// still belongs to it). `now`: seconds on `MonotonicEpoch`, for the rates.
    /// `allVersions`: a per-file breakdown for every row; otherwise only for rows that count
    /// in more than one file (an upgrade in progress).
    /// `match`: only rows whose record it matches (path and symbol globs, owner); its
    /// consumer, if any, is ignored (`consumer` is the parameter).
    /// `top` (with `order`): only the first `top` rows in that order, chosen while the rows
    /// are read (`makeTop`); `total` counts every matching row. Not with `ids`.
    /// `latency`: a latency slot's row (the kernel's), read for latency probes only.
    static func make(_ probes: ProbeMap, counts: [UInt64], ids: [String]?, consumer: String?, allVersions: Bool,
                     now: Double, match: ProbeSelection? = nil, order: Order = .id, top: Int? = nil,
                     latency: (UInt32) -> LatencyHistogram? = { _ in nil }) -> Result<StatsTable, EngineError> {
        var table = StatsTable()
        var matcher = match.flatMap { $0.needsRecord ? $0.matcher() : nil }
        if let ids {
            table.reserve(ids.count)
            for id in ids {
                guard let r = probes[id] else {
                    return .failure(EngineError(code: .probeNotFound, message: "no probe with id '\(id)'"))
                }
                if matcher?.matches(r) == false { continue }
                counts.withUnsafeBufferPointer { table.add(r, counts: $0, allVersions: allVersions, now: now, latency: latency) }
            }
            return .success(table.counted())
        }
        var key: UInt32? = nil
        if let consumer {
            guard let (k, records) = probes.consumerKey(consumer) else { return .success(table.counted()) }
            key = k
            table.reserve(records)
        } else {
            table.reserve(probes.count)
        }
        let filtering = matcher != nil
        if let top {
            return .success(makeTop(probes, counts: counts, consumer: key, matcher: &matcher, allVersions: allVersions,
                                    now: now, order: order, top: top, latency: latency))
        }
        counts.withUnsafeBufferPointer { counts in
            probes.forEachRow(consumer: key, wantsRecord: { filtering || allVersions || !$0.plain }) { number, row, record in
                if let record, matcher?.matches(record) == false { return }
                if let number, row.plain && !allVersions {
                    table.addPlain(number, row, counts: counts, now: now)
                } else if let record {
                    table.add(record, counts: counts, allVersions: allVersions, now: now, latency: latency)
                }
            }
        }
        return .success(table.counted())
    }

    /// The first `top` rows in `order`, picked during the one walk over the registry's rows:
    /// a row that does not beat the last of the `top` kept so far costs one comparison and
    /// nothing is appended for it. At 241,000 probes building the whole table (five arrays of
    /// 241,000) to keep 100 rows was most of a `stats` with `top`.
    private static func makeTop(_ probes: ProbeMap, counts: [UInt64], consumer: UInt32?, matcher: inout ProbeSelection.Matcher?,
                                allVersions: Bool, now: Double, order: Order, top: Int,
                                latency: (UInt32) -> LatencyHistogram?) -> StatsTable {
        struct Candidate {
            var seq: Int
            var key: Order.Key
            var number: UInt64?
            var row: StatsRow
            var record: ProbeRecord?
        }
        func beats(_ a: Candidate, _ b: Candidate) -> Bool {
            order.ranks(a.key, before: b.key) ?? (a.seq < b.seq)
        }
        var best: [Candidate] = []
        best.reserveCapacity(top + 1)
        var seen = 0
        let filtering = matcher != nil
        counts.withUnsafeBufferPointer { counts in
            probes.forEachRow(consumer: consumer, wantsRecord: { filtering || allVersions || !$0.plain }) { number, row, record in
                if let record, matcher?.matches(record) == false { return }
                let c: Candidate
                if let number, row.plain {
                    let slot = Int(row.slot)
                    let counted = slot < counts.count ? counts[slot] : 0
                    let secs = now - row.countingSince
                    let key = Order.Key(hits: row.baseHits &+ counted, rate: secs > 0 ? Double(counted) / secs : 0)
                    c = Candidate(seq: seen, key: key, number: number, row: row, record: allVersions ? record : nil)
                } else if let record {
                    let t = totals(record, counts: counts, now: now)
                    // The histogram (its kernel row read, its buckets summed) only for a latency order.
                    let h = order.isLatency ? record.latency(latency) : nil
                    let key = Order.Key(hits: t.hits, rate: t.rate, latency: h.flatMap(order.latencyValue), isLatency: record.spec.latency)
                    c = Candidate(seq: seen, key: key, number: number, row: row, record: record)
                } else {
                    return
                }
                seen += 1
                if best.count == top {
                    guard let last = best.last, beats(c, last) else { return }
                    best.removeLast()
                }
                var lo = 0, hi = best.count
                while lo < hi {
                    let mid = (lo + hi) / 2
                    if beats(c, best[mid]) { hi = mid } else { lo = mid + 1 }
                }
                best.insert(c, at: lo)
            }
        }
        var table = StatsTable()
        table.reserve(best.count)
        counts.withUnsafeBufferPointer { counts in
            for c in best {
                if let record = c.record {
                    table.add(record, counts: counts, allVersions: allVersions, now: now, latency: latency)
                } else if let number = c.number {
                    table.addPlain(number, c.row, counts: counts, now: now)
                }
            }
        }
        table.total = seen
        return table
    }

    /// A registration's hits (base plus every site's counter) and mean rate since it started
    /// counting (its retired versions' hits included).
    static func totals(_ r: ProbeRecord, counts: UnsafeBufferPointer<UInt64>, now: Double) -> (hits: UInt64, rate: Double) {
        var counted: UInt64 = 0
        for site in r.sites where Int(site.slot) < counts.count { counted &+= counts[Int(site.slot)] }
        let secs = now - r.countingSince
        return (r.baseHits &+ counted, secs > 0 ? Double(counted &+ r.retired.totalHits) / secs : 0)
    }

    /// What rows are ordered by (descending; ties in id order).
    ///
    /// The latency orders rank latency probes by what `stats` shows of them: `calls` entered,
    /// the median and 99th percentile of the returned calls' durations, and the longest one.
    /// Rows without that value come after every row with one: latency probes none of whose
    /// calls returned yet (for the durations), then counting probes; each group in id order.
    public enum Order: Sendable, CaseIterable {
        case id, hits, rate
        case calls, p50, p99, max

        public var isLatency: Bool {
            switch self {
            case .id, .hits, .rate: return false
            case .calls, .p50, .p99, .max: return true
            }
        }

        /// A latency probe's value in this order; nil when it has none (no call returned).
        func latencyValue(_ h: LatencyHistogram) -> UInt64? {
            switch self {
            case .id, .hits, .rate: return nil
            case .calls: return h.calls
            case .p50: return h.quantile(0.5)
            case .p99: return h.quantile(0.99)
            case .max: return h.returns > 0 ? h.maxNanoseconds : nil
            }
        }

        /// What a row is ranked by (only the fields of the order in force are read).
        struct Key {
            var hits: UInt64 = 0
            var rate: Double = 0
            /// `latencyValue` of a latency probe's histogram.
            var latency: UInt64? = nil
            var isLatency = false
        }

        /// Whether `a` ranks before `b` (true) or after (false); nil when they tie, which the
        /// caller breaks by id.
        func ranks(_ a: Key, before b: Key) -> Bool? {
            switch self {
            case .id: return nil
            case .hits: return a.hits != b.hits ? a.hits > b.hits : nil
            case .rate: return a.rate != b.rate ? a.rate > b.rate : nil
            case .calls, .p50, .p99, .max:
                switch (a.latency, b.latency) {
                case let (x?, y?): return x != y ? x > y : nil
                case (_?, nil): return true
                case (nil, _?): return false
                case (nil, nil): return a.isLatency != b.isLatency ? a.isLatency : nil
                }
            }
        }
    }

    /// The rows in `order`, cut to the first `top` if given; `total` stays the count before
    /// the cut. A top-N keeps N candidates while it scans (most rows lose to the smallest of
    /// them in one comparison), so the 20 busiest of 241,000 probes cost one pass, not a sort.
    public func ordered(by order: Order, top: Int?) -> StatsTable {
        let n = count
        let limit = Swift.min(top ?? n, n)
        if order == .id {
            guard limit < n else { return self }
            return picking(Array(0..<limit))
        }
        // A latency order's values once per row (a percentile sums the histogram's buckets),
        // not per comparison.
        let latencyValues: [UInt64?]? = order.isLatency ? (0..<n).map { detail($0)?.latency.flatMap(order.latencyValue) } : nil
        func key(_ i: Int) -> Order.Key {
            Order.Key(hits: hits[i], rate: rates[i], latency: latencyValues?[i], isLatency: latencyValues != nil && detail(i)?.latency != nil)
        }
        func beats(_ a: Int, _ b: Int) -> Bool {  // a ranks before b
            order.ranks(key(a), before: key(b)) ?? (a < b)
        }
        if limit == n { return picking((0..<n).sorted(by: beats)) }
        var best: [Int] = []  // ranked, at most `limit`
        best.reserveCapacity(limit + 1)
        for i in 0..<n {
            if best.count == limit {
                guard let last = best.last, beats(i, last) else { continue }
                best.removeLast()
            }
            var lo = 0, hi = best.count  // first place whose row `i` beats
            while lo < hi {
                let mid = (lo + hi) / 2
                if beats(i, best[mid]) { hi = mid } else { lo = mid + 1 }
            }
            best.insert(i, at: lo)
        }
        return picking(best)
    }

    /// `total` set to the rows there are.
    private func counted() -> StatsTable {
        var t = self
        t.total = count
        return t
    }

    /// These rows, in this order; `total` kept.
    private func picking(_ rows: [Int]) -> StatsTable {
        var t = StatsTable()
        t.reserve(rows.count)
        t.total = total
        for i in rows {
            t.numbers.append(numbers[i])
            t.hits.append(hits[i])
            t.rates.append(rates[i])
            if let d = detail(i) {
                t.details.append(d)
                t.detailIndex.append(UInt32(t.details.count))
            } else {
                t.detailIndex.append(0)
            }
        }
        return t
    }

    private mutating func reserve(_ n: Int) {
        numbers.reserveCapacity(n)
        hits.reserveCapacity(n)
        rates.reserveCapacity(n)
        detailIndex.reserveCapacity(n)
    }

    private mutating func addPlain(_ number: UInt64, _ row: borrowing StatsRow, counts: UnsafeBufferPointer<UInt64>, now: Double) {
        let slot = Int(row.slot)
        let counted = slot < counts.count ? counts[slot] : 0
        let secs = now - row.countingSince
        numbers.append(number)
        hits.append(row.baseHits &+ counted)
        rates.append(secs > 0 ? Double(counted) / secs : 0)
        detailIndex.append(0)
    }

    private mutating func add(_ r: ProbeRecord, counts: UnsafeBufferPointer<UInt64>, allVersions: Bool, now: Double,
                              latency: (UInt32) -> LatencyHistogram?) {
        // One pass over the sites by index (no copy of each site's strings): the total, and
        // whether they all lie in one file. The per-file breakdown takes a second pass, only
        // when it is shown.
        var counted: UInt64 = 0
        var oneFile = r.retired.isEmpty
        let sites = r.sites
        if let first = sites.first {
            let device = first.target.device, inode = first.target.inode
            for i in sites.indices {
                let slot = Int(sites[i].slot)
                if slot < counts.count { counted &+= counts[slot] }
                if oneFile && (sites[i].target.device != device || sites[i].target.inode != inode) { oneFile = false }
            }
        }
        var versions: [VersionStats]? = nil
        if allVersions || !oneFile {
            var breakdown: [VersionStats] = []
            for site in sites {
                let c = Int(site.slot) < counts.count ? counts[Int(site.slot)] : 0
                if let i = breakdown.firstIndex(where: { $0.version.sameFile(site.target) }) {
                    breakdown[i].hits &+= c
                } else {
                    let current = r.firstTarget.map { $0.device == site.target.device && $0.inode == site.target.inode } ?? false
                    breakdown.append(VersionStats(version: FileVersion(site.target), hits: c, current: current, retired: false))
                }
            }
            for old in r.retired.recent { breakdown.append(VersionStats(version: old.version, hits: old.hits, current: false, retired: true)) }
            versions = breakdown
        }
        let retiredHits = r.retired.totalHits
        let secs = now - r.countingSince
        numbers.append(0)
        hits.append(r.baseHits &+ counted)
        rates.append(secs > 0 ? Double(counted &+ retiredHits) / secs : 0)
        details.append(Detail(record: r, versions: versions, latency: r.latency(latency)))
        detailIndex.append(UInt32(details.count))
    }
}
