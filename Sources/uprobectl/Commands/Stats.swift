import ArgumentParser
import UprobedProtocol

extension UprobeCtl {
    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show each probe's hits and current rate, with its symbol and binary, most hits first.",
            discussion: """
                HITS is exact, counted since the probe was registered. RATE is hits/s over the \
                last --interval: stats reads the counters twice, --interval apart (default 1s), so \
                it takes that long. --interval 0 answers at once and shows the mean rate since \
                registration instead (column MEAN RATE).

                With --top N (no ids, no --match) the daemon picks the N rows: by hits, with \
                --sort rate by mean rate since registration, or by a latency column; their \
                current rate is then measured over --interval. Cheap at any number of probes.

                Latency probes add CALLS, P50, P99 and MAX; --sort calls|p50|p99|max orders by \
                one of them, most first (--sort p99 --top 10: the ten slowest functions by \
                their 99th percentile). Rows without that value come last: latency probes none \
                of whose calls returned yet, then counting probes.

                SYMBOL is demangled (C++, Rust, Swift) when c++filt or swift-demangle is \
                installed; '(ret)' marks a return probe. On a terminal, long symbols and paths \
                are cut to fit (--wide: never); in a pipe or a file they are whole.

                --json prints {"ok", "interval_s", "stats": [...]}, one object per probe with \
                id, hits, rate (over interval_s; absent with --interval 0), mean_rate (since \
                registration), kind, path, offset, symbol (raw), demangled (if it differs), \
                pid, consumer, state, reason.
                """)

        @OptionGroup var global: GlobalOptions
        @OptionGroup var selection: Selection
        @OptionGroup var presentation: Presentation

        @Option(name: .long, help: ArgumentHelp("Time between the two samples the rate is computed from (500ms, 2s; a bare number is ms; 0: mean since registration).",
                                                valueName: "interval"))
        var interval = Interval(milliseconds: 1000)

        @Flag(name: .long, help: "Never cut symbols or paths to the terminal's width.")
        var wide = false

        /// The daemon's own `top`, when it can choose the rows: a cut, no ids, no --match (it
        /// also matches demangled names, which only this side knows), by hits or rate.
        var daemonTop: StatsQuery? {
            guard let top = presentation.top, selection.ids.isEmpty, selection.match == nil else { return nil }
            let key = presentation.sort ?? .hits
            guard key != .id, let sort = key.wire else { return nil }
            return StatsQuery(match: ProbeMatch(path: selection.path), sort: sort, top: top)
        }

        func run() throws {
            let daemon = try global.connect()
            var ids = selection.ids.isEmpty ? nil : selection.ids
            let catalog = Catalog(consumer: selection.consumer)
            var counts: [ProbeCount]
            var rates: [String: Double]? = nil
            if let query = daemonTop {
                // At 241,000 probes: the daemon picks the rows (by hits, or by mean rate since
                // registration), and only they are listed and sampled again for the rate.
                counts = try daemon.stats(consumer: selection.consumer, query: query).counts
                ids = counts.map(\.id)
                try catalog.refresh(daemon, ids: counts.map(\.id))
                if interval.milliseconds > 0, let ids, !ids.isEmpty {
                    var meter = RateMeter()
                    let t0 = Clock.monotonic()
                    _ = meter.update(counts, at: t0)
                    Clock.sleep(until: t0 + interval.seconds)
                    let t1 = Clock.monotonic()
                    // A probe removed meanwhile would fail the whole call: sample again without it.
                    counts = (try? daemon.stats(ids: ids)) ?? counts
                    rates = meter.update(counts, at: t1)
                }
            } else if interval.milliseconds > 0 {
                var meter = RateMeter()
                let t0 = Clock.monotonic()
                _ = meter.update(try daemon.stats(ids: ids, consumer: selection.consumer), at: t0)
                // The list is read while the interval runs, so it costs no extra time.
                try catalog.refresh(daemon)
                Clock.sleep(until: t0 + interval.seconds)
                let t1 = Clock.monotonic()
                counts = try daemon.stats(ids: ids, consumer: selection.consumer)
                rates = meter.update(counts, at: t1)
            } else {
                try catalog.refresh(daemon)
                counts = try daemon.stats(ids: ids, consumer: selection.consumer)
            }
            try catalog.refreshIfNeeded(for: counts, daemon)
            let all = counts.map { c in catalog.row(c, rate: rates.map { $0[c.id] ?? 0 }) }
            let chosen = daemonTop != nil ? all : all.filter(selection.filter.matches)  // the daemon filtered already
            let rows = Rows.ordered(chosen, by: presentation.sort ?? .hits, top: presentation.top)

            if global.json {
                var o: JSONObject = ["ok": true, "interval_s": .double(interval.seconds)]
                o["stats"] = .array(rows.map(\.json))
                print(JSONSerializer.serialize(.object(o)))
                return
            }
            var shown = rows
            if rates == nil { for i in shown.indices { shown[i].rate = shown[i].meanRate } }
            let table = Rows.table(shown, raw: presentation.raw, rateTitle: rates == nil ? "MEAN RATE" : "RATE")
            for line in table.render(width: wide ? nil : stdoutWidth()) { print(line) }
        }
    }
}
