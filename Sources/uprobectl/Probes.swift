import ArgumentParser
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

/// One probe as `stats`, `watch` and `top` show it: its registration (from `list`) joined with
/// its counts (from `stats` or a `watch` event).
struct ProbeRow {
    var id: String
    var path: String
    var symbol: String?
    var demangled: String?
    var offset: UInt64?
    var retprobe = false
    var usdt = false
    var pid: Int32?
    var consumer: String?
    var hits: UInt64
    /// Hits/s over the last interval; nil before there are two samples.
    var rate: Double?
    /// The daemon's mean hits/s since registration.
    var meanRate: Double
    var state: String?
    var reason: String?
    /// A latency probe's calls and durations.
    var latency: LatencySummary? = nil

    /// What the SYMBOL column shows: the demangled name, marked when it counts returns.
    var name: String {
        let base = demangled ?? symbol ?? offset.map { "0x" + String($0, radix: 16) } ?? "?"
        return retprobe ? base + " (ret)" : base
    }

    var kind: String { usdt ? "usdt" : (retprobe ? "uretprobe" : (latency != nil ? "latency" : "uprobe")) }

    /// `p123` → 123, for `--sort id` in registration order; other ids sort after.
    var idNumber: Int { id.hasPrefix("p") ? Int(id.dropFirst()) ?? Int.max : Int.max }

    var json: JSONValue {
        var o: JSONObject = ["id": .string(id), "hits": JSONValue(hits)]
        if let rate { o["rate"] = .double((rate * 1000).rounded() / 1000) }
        o["mean_rate"] = .double((meanRate * 1000).rounded() / 1000)
        o["kind"] = .string(kind)
        o["path"] = .string(path)
        if let offset { o["offset"] = JSONValue(offset) }
        if let symbol { o["symbol"] = .string(symbol) }
        if let demangled { o["demangled"] = .string(demangled) }
        if let pid { o["pid"] = .int(Int64(pid)) }
        if let consumer { o["consumer"] = .string(consumer) }
        o["state"] = .string(state ?? "active")
        if let reason { o["reason"] = .string(reason) }
        if let l = latency {
            var lo: JSONObject = ["calls": JSONValue(l.calls), "returns": JSONValue(l.returns), "in_flight": JSONValue(l.inFlight),
                                  "unobserved": JSONValue(l.unobserved), "sum_ns": JSONValue(l.sumNs)]
            for (k, v) in [("min_ns", l.minNs), ("max_ns", l.maxNs), ("p50_ns", l.p50Ns), ("p90_ns", l.p90Ns),
                           ("p99_ns", l.p99Ns), ("p999_ns", l.p999Ns)] {
                lo[k] = v.map { JSONValue($0) } ?? .null
            }
            o["latency"] = .object(lo)
        }
        return .object(o)
    }
}

/// What the CLI knows of the registrations: one `list` per run, again only when a sample names
/// a probe it has not seen (so at 241,000 probes a refresh costs one `stats` reply, not a list).
final class Catalog {
    private(set) var probes: [String: ListedProbe] = [:]
    /// Raw symbol → demangled, kept across lists (demangling runs once per name).
    private var demangled: [String: String] = [:]
    private var demangledNames = Set<String>()
    let consumer: String?

    init(consumer: String?) { self.consumer = consumer }

    func refresh(_ daemon: Daemon) throws(CtlError) {
        listedAt = Clock.monotonic()
        let listed = try daemon.list(consumer: consumer)
        probes = Dictionary(listed.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        demangle(listed)
    }

    /// Lists only these ids (the rows a daemon-side `top` chose), not every registration.
    func refresh(_ daemon: Daemon, ids: [String]) throws(CtlError) {
        guard !ids.isEmpty else { return }
        listedAt = Clock.monotonic()
        let listed = try daemon.list(consumer: nil, query: ListQuery(ids: ids)).probes
        for p in listed { probes[p.id] = p }
        demangle(listed)
    }

    private func demangle(_ listed: [ListedProbe]) {
        let fresh = Set(listed.compactMap(\.symbol)).subtracting(demangledNames)
        if !fresh.isEmpty {
            demangled.merge(Demangler.demangle(fresh)) { a, _ in a }
            demangledNames.formUnion(fresh)
        }
    }

    /// Ids a fresh list did not name (registered by someone and gone again, or outside the
    /// consumer): not worth another list on every sample.
    private var unnamed = Set<String>()

    private var listedAt = -Double.infinity

    /// Lists again if `counts` names a probe the catalog lacks, but not more often than every
    /// `minimumGap` seconds: under steady registration churn a live view would otherwise
    /// list (60 MB at 241,000 probes) on every update. Meanwhile new probes show as '?'.
    func refreshIfNeeded(for counts: [ProbeCount], _ daemon: Daemon, minimumGap: Double = 0) throws(CtlError) {
        guard counts.contains(where: { probes[$0.id] == nil && !unnamed.contains($0.id) }) else { return }
        let now = Clock.monotonic()
        guard now - listedAt >= minimumGap else { return }
        try refresh(daemon)
        for c in counts where probes[c.id] == nil { unnamed.insert(c.id) }
    }

    func row(_ c: ProbeCount, rate: Double?) -> ProbeRow {
        let p = probes[c.id]
        return ProbeRow(id: c.id, path: p?.path ?? "?", symbol: p?.symbol, demangled: p?.symbol.flatMap { demangled[$0] },
                        offset: p?.offset, retprobe: p?.spec?.retprobe ?? false, usdt: p?.spec?.usdt != nil,
                        pid: p?.spec?.pid, consumer: p?.consumer, hits: c.hits, rate: rate, meanRate: c.rate,
                        state: c.state ?? p?.state, reason: c.reason ?? p?.reason, latency: c.latency)
    }
}

/// Current rates from two samples of the counters: hits/s between them, on the client's
/// monotonic clock (the daemon's own `rate` in `stats` is the mean since registration).
struct RateMeter {
    private var previous: [String: UInt64] = [:]
    private var at: Double? = nil

    /// Rates since the last sample; nil on the first. A probe new since then counts from 0.
    mutating func update(_ counts: [ProbeCount], at now: Double) -> [String: Double]? {
        defer {
            previous = Dictionary(counts.map { ($0.id, $0.hits) }, uniquingKeysWith: { a, _ in a })
            at = now
        }
        guard let at, now > at else { return nil }
        let dt = now - at
        var rates: [String: Double] = [:]
        rates.reserveCapacity(counts.count)
        for c in counts {
            let was = previous[c.id] ?? 0
            rates[c.id] = c.hits >= was ? Double(c.hits - was) / dt : 0
        }
        return rates
    }

    /// Forget the last sample (after a pause, the next rate must not average over the pause).
    mutating func reset() { previous = [:]; at = nil }
}

/// How rows are ordered. The latency keys rank latency probes by the CALLS, P50, P99 and MAX
/// columns (most first); rows without that value (no call returned yet, counting probes) last.
enum SortKey: String, CaseIterable, ExpressibleByArgument {
    case hits, rate, name, id
    case calls, p50, p99, max

    /// The daemon's key for the same order; nil for `name` (symbols are demangled here).
    var wire: StatsSort? {
        switch self {
        case .hits: return .hits
        case .rate: return .rate
        case .name: return nil
        case .id: return .id
        case .calls: return .calls
        case .p50: return .p50
        case .p99: return .p99
        case .max: return .max
        }
    }

    /// A latency key's value of a row; nil for a counting probe or a duration no call has yet.
    func latencyValue(_ r: ProbeRow) -> UInt64? {
        guard let l = r.latency else { return nil }
        switch self {
        case .hits, .rate, .name, .id: return nil
        case .calls: return l.calls
        case .p50: return l.p50Ns
        case .p99: return l.p99Ns
        case .max: return l.maxNs
        }
    }

    var next: SortKey {
        let all = Self.allCases
        let i = all.firstIndex(of: self) ?? 0
        return all[(i + 1) % all.count]
    }
}

/// Which probes to show: the options `stats`, `watch` and `top` share.
struct Selection: ParsableArguments {
    @Argument(help: "Probe ids (default: all).")
    var ids: [String] = []

    @Option(name: .long, help: "Only the probes registered under this consumer name.")
    var consumer: String?

    @Option(name: .long, help: ArgumentHelp(
        "Only probes in this binary: its full path, its file name (libc.so.6) or a glob ('*/libssl*').",
        valueName: "path"))
    var path: String?

    @Option(name: .long, help: ArgumentHelp(
        "Only probes whose symbol (raw or demangled) or path matches this shell glob ('*malloc*').",
        valueName: "glob"))
    var match: String?

    func validate() throws {
        if consumer != nil && !ids.isEmpty { throw ValidationError("give probe ids or --consumer, not both") }
    }

    var filter: ProbeFilter { ProbeFilter(consumer: consumer, path: path, match: match) }
}

/// The client-side filters of a selection, as plain values (an unparsed ArgumentParser group
/// cannot be built and read in code, e.g. by `rm --match`).
struct ProbeFilter {
    var consumer: String?
    var path: String?
    var match: String?

    func matches(_ row: ProbeRow) -> Bool {
        if let consumer, row.consumer != consumer { return false }
        if let path, !Self.pathMatches(path, row.path) { return false }
        if let match, !Self.globMatches(match, row) { return false }
        return true
    }

    static func pathMatches(_ pattern: String, _ path: String) -> Bool {
        let base = path.split(separator: "/").last.map(String.init) ?? path
        if pattern == path || pattern == base { return true }
        return fnmatch(pattern, path, 0) == 0 || fnmatch(pattern, base, 0) == 0
    }

    /// A glob against the symbol (raw and demangled), the path and the file name: `rm --match`
    /// and `stats --match` select "by symbol or path" without asking which.
    static func globMatches(_ pattern: String, _ row: ProbeRow) -> Bool {
        for s in [row.symbol, row.demangled] {
            if let s, fnmatch(pattern, s, 0) == 0 { return true }
        }
        return pathMatches(pattern, row.path)
    }
}

/// How rows are ordered, cut and printed: shared by `stats`, `watch` and `top`.
struct Presentation: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Order rows by hits, rate (current hits/s), name (symbol), id, or a latency column: calls, p50, p99, max (default: hits; rate in top).",
                                            valueName: "key"))
    var sort: SortKey?

    @Option(name: .customLong("top"), help: ArgumentHelp("Show only the first N rows after sorting.", valueName: "n"))
    var top: Int?

    @Flag(name: .long, help: "Exact numbers (hits as integers, rates to 0.1/s) instead of 1.2k, 35.1k/s.")
    var raw = false

    func validate() throws {
        if let top, top < 1 { throw ValidationError("--top needs a positive number of rows") }
    }
}

enum Rows {
    static func sorted(_ rows: [ProbeRow], by key: SortKey) -> [ProbeRow] {
        rows.sorted { a, b in
            switch key {
            case .hits:
                if a.hits != b.hits { return a.hits > b.hits }
            case .rate:
                // Before a second sample there is no current rate: the mean since registration stands in.
                let (ra, rb) = (a.rate ?? a.meanRate, b.rate ?? b.meanRate)
                if ra != rb { return ra > rb }
                if a.hits != b.hits { return a.hits > b.hits }
            case .name:
                if a.name != b.name { return a.name < b.name }
                if a.path != b.path { return a.path < b.path }
            case .id:
                break
            case .calls, .p50, .p99, .max:
                switch (key.latencyValue(a), key.latencyValue(b)) {
                case let (x?, y?): if x != y { return x > y }
                case (_?, nil): return true
                case (nil, _?): return false
                case (nil, nil): if (a.latency != nil) != (b.latency != nil) { return a.latency != nil }
                }
            }
            return a.idNumber != b.idNumber ? a.idNumber < b.idNumber : a.id < b.id
        }
    }

    /// Sort and cut to the first `top` rows (nil: all).
    static func ordered(_ rows: [ProbeRow], by key: SortKey, top: Int?) -> [ProbeRow] {
        let out = sorted(rows, by: key)
        guard let top, out.count > top else { return out }
        return Array(out.prefix(max(0, top)))
    }

    static var columns: [Table.Column] {
        [Table.Column(title: "ID"),
         Table.Column(title: "HITS", rightAligned: true),
         Table.Column(title: "RATE", rightAligned: true),
         Table.Column(title: "PID"),
         Table.Column(title: "STATE"),
         Table.Column(title: "SYMBOL", cut: .keepStart, minWidth: 12),
         Table.Column(title: "PATH", cut: .keepEnd, minWidth: 12)]
    }

    static func cells(_ r: ProbeRow, raw: Bool) -> [String] {
        let hits = raw ? String(r.hits) : Human.count(r.hits)
        let rate = r.rate.map { raw ? Human.fixed($0, decimals: 1) : Human.rate($0) } ?? "-"
        return [r.id, hits, rate, r.pid.map(String.init) ?? "-", r.state ?? "active", r.name, r.path]
    }

    /// `compact`: without PID and STATE, for a narrow screen (ID, HITS and RATE stay first).
    /// When a row is a latency probe, CALLS, P50, P99 and MAX follow RATE (durations in human
    /// units: 850ns, 12.3µs, 1.2ms; '-' for a counting probe or before any call returned).
    static func table(_ rows: [ProbeRow], raw: Bool, rateTitle: String = "RATE", compact: Bool = false) -> Table {
        var cols = columns
        cols[2].title = rateTitle
        var keep = compact ? [0, 1, 2, 5, 6] : Array(cols.indices)
        let latency = rows.contains { $0.latency != nil }
        if latency {
            cols += [Table.Column(title: "CALLS", rightAligned: true), Table.Column(title: "P50", rightAligned: true),
                     Table.Column(title: "P99", rightAligned: true), Table.Column(title: "MAX", rightAligned: true)]
            keep.insert(contentsOf: [7, 8, 9, 10], at: 3)
        }
        var t = Table(keep.map { cols[$0] })
        t.rows = rows.map { r in
            var c = cells(r, raw: raw)
            if latency {
                let l = r.latency
                func ns(_ v: UInt64?) -> String { v.map { raw ? String($0) : Human.nanoseconds($0) } ?? "-" }
                c += [l.map { raw ? String($0.calls) : Human.count($0.calls) } ?? "-", ns(l?.p50Ns), ns(l?.p99Ns), ns(l?.maxNs)]
            }
            return keep.map { c[$0] }
        }
        return t
    }

    /// Sum of the current rates (nil until there are two samples).
    static func totalRate(_ rows: [ProbeRow]) -> Double? {
        var sum = 0.0
        for r in rows {
            guard let rate = r.rate else { return nil }
            sum += rate
        }
        return sum
    }
}

/// The terminal's width for a table on stdout; nil when stdout is not a terminal (then lines
/// are never cut: a file or a pipe gets whole names and paths).
func stdoutWidth() -> Int? {
    guard isatty(1) == 1 else { return nil }
    return Terminal.size(fd: 1)?.columns
}
