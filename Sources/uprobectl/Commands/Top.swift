import ArgumentParser
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

extension UprobeCtl {
    struct Top: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "A live full-screen view of the hottest probes, like top or perf top.",
            discussion: """
                Rows are the probes with the highest current rate (hits/s over the last \
                interval), as many as the terminal holds; the header shows the daemon's version, \
                uptime, probes, links and the total rate of the probes shown by the filters.

                Keys: q quit · p or space pause/resume · s next sort key · h/r/n/i sort by \
                hits/rate/name/id · l sort by P99 (latency probes) · ? help. Ctrl-C quits too; \
                the terminal is restored either way. The s cycle goes on through the latency \
                columns calls, p50, p99 and max.

                When stdout is not a terminal, top prints plain frames instead (like 'watch', \
                --top rows, default 20), one per interval, until interrupted or -n frames.
                """)

        @OptionGroup var global: GlobalOptions
        @OptionGroup var selection: Selection
        @OptionGroup var presentation: Presentation

        @Option(name: [.customShort("d"), .long],
                help: ArgumentHelp("Time between updates (500ms, 2s; a bare number is ms; at least 100ms).", valueName: "interval"))
        var interval = Interval(milliseconds: 1000)

        @Option(name: [.customShort("n"), .long], help: ArgumentHelp("Stop after this many updates.", valueName: "n"))
        var iterations: Int?

        func validate() throws {
            if interval.milliseconds < 100 {
                throw ValidationError("--interval \(interval) is below 100ms (a bare number is milliseconds: 2s or 2000)")
            }
            if let iterations, iterations < 1 { throw ValidationError("-n needs a positive number of updates") }
            if global.json { throw ValidationError("top has no --json; use 'uprobectl watch --json'") }
        }

        func run() throws {
            let daemon = try global.connect()
            var view = TopView(daemon: daemon, filter: selection.filter, ids: selection.ids.isEmpty ? nil : selection.ids,
                               sort: presentation.sort ?? .rate, top: presentation.top, raw: presentation.raw,
                               interval: interval)
            if isatty(1) == 1 {
                try view.runScreen(iterations: iterations)
            } else {
                try view.runPlain(iterations: iterations)
            }
        }
    }
}

/// The state of `uprobectl top` and its two ways of showing it.
struct TopView {
    let daemon: Daemon
    let filter: ProbeFilter
    let ids: [String]?
    var sort: SortKey
    let top: Int?
    let raw: Bool
    let interval: Interval

    private let catalog = Catalog(consumer: nil)
    private var meter = RateMeter()
    private var rows: [ProbeRow] = []
    private var status: DaemonStatus? = nil
    private var haveRates = false
    private var paused = false
    private var showHelp = false

    init(daemon: Daemon, filter: ProbeFilter, ids: [String]?, sort: SortKey, top: Int?, raw: Bool, interval: Interval) {
        self.daemon = daemon
        self.filter = filter
        self.ids = ids
        self.sort = sort
        self.top = top
        self.raw = raw
        self.interval = interval
    }

    /// Reads the counters (and the daemon's status) and turns them into rows.
    private mutating func sample() throws(CtlError) {
        let t = Clock.monotonic()
        let counts = try daemon.stats(ids: ids)
        let rates = meter.update(counts, at: t)
        try catalog.refreshIfNeeded(for: counts, daemon, minimumGap: 5)
        status = try daemon.status()
        haveRates = rates != nil
        rows = counts.map { c in catalog.row(c, rate: rates.map { $0[c.id] ?? 0 }) }.filter(filter.matches)
    }

    // MARK: plain frames (stdout is not a terminal)

    mutating func runPlain(iterations: Int?) throws(CtlError) {
        try catalog.refresh(daemon)
        try sample()
        var next = Clock.monotonic() + interval.seconds
        var done = 0
        while iterations.map({ done < $0 }) ?? true {
            Clock.sleep(until: next)
            next += interval.seconds
            try sample()
            let shown = Rows.ordered(rows, by: sort, top: top ?? 20)
            writeAll(1, UprobeCtl.Watch.frame(kept: rows, shown: shown, raw: raw))
            done += 1
        }
    }

    // MARK: full screen

    mutating func runScreen(iterations: Int?) throws(CtlError) {
        let session = try ScreenSession()
        session.enter()
        defer { session.restore() }
        try catalog.refresh(daemon)
        try sample()
        var next = Clock.monotonic() + interval.seconds
        var done = 0
        draw()
        while true {
            let now = Clock.monotonic()
            var redraw = false
            for event in session.wait(timeout: paused ? 3600 : next - now) {
                switch event {
                case .quit: return
                case .resized: redraw = true
                case .suspend:
                    session.suspend()
                    redraw = true
                case .timeout: break
                case .key(let k):
                    switch k {
                    case UInt8(ascii: "q"), UInt8(ascii: "Q"): return
                    case UInt8(ascii: "p"), UInt8(ascii: " "):
                        paused.toggle()
                        if !paused {
                            // Rates restart from now: averaging over the pause would show a dip.
                            meter.reset()
                            try sample()
                            next = Clock.monotonic() + interval.seconds
                        }
                    case UInt8(ascii: "s"): sort = sort.next
                    case UInt8(ascii: "h"): sort = .hits
                    case UInt8(ascii: "r"): sort = .rate
                    case UInt8(ascii: "n"): sort = .name
                    case UInt8(ascii: "i"): sort = .id
                    case UInt8(ascii: "l"): sort = .p99
                    case UInt8(ascii: "?"): showHelp.toggle()
                    default: continue
                    }
                    redraw = true
                }
            }
            if !paused && Clock.monotonic() >= next {
                try sample()
                // Keep the beat; after a stall (suspended, slow daemon) start again from now.
                next += interval.seconds
                if next < Clock.monotonic() { next = Clock.monotonic() + interval.seconds }
                redraw = true
                done += 1
            }
            if redraw { draw() }
            if let iterations, done >= iterations { return }
        }
    }

    private func draw() {
        let size = Terminal.size(fd: 1) ?? Terminal.Size(rows: 24, columns: 80)
        writeAll(1, screen(size))
    }

    /// The whole screen as one string: cursor home, each line cleared to its end, the rest of
    /// the screen cleared. Drawn over the previous frame (no full clear), so it does not flicker.
    func screen(_ size: Terminal.Size) -> String {
        typealias E = Terminal.Escape
        let width = size.columns
        guard size.rows >= 5, width >= 40 else {
            return E.home + "terminal too small (\(width)x\(size.rows)); top needs 40x5 — q quits".truncatedRight(to: width)
                + E.clearToEndOfLine + E.clearToEndOfScreen
        }
        var lines: [String] = []
        if let s = status {
            var head = "uprobed \(s.version)  up \(Human.duration(s.uptimeSeconds))  probes \(s.probes)"
            if s.degraded > 0 { head += " (\(s.degraded) degraded)" }
            head += "  links \(s.links)"
            let total = haveRates ? Rows.totalRate(rows).map { Human.perSecond($0) } ?? "-" : "-"
            head += "  \(total) hits/s"
            let clock = Clock.wallTime(dateToo: false)
            lines.append(head.count + 2 + clock.count <= width
                ? head.padded(to: width - clock.count) + clock : head.truncatedRight(to: width))
        }
        var mode = "sort: \(sort.rawValue)  every \(interval)"
        if !filter.isEmpty { mode += "  \(rows.count) of \(status?.probes ?? rows.count) probes match" }
        if paused { mode += "  PAUSED" }
        lines.append((mode + "   q quit  p pause  s sort  ? help").truncatedRight(to: width))
        if showHelp {
            lines.append("keys: q quit · p/space pause · s next sort · h hits · r rate · n name · i id · l p99 · ? hide help"
                .truncatedRight(to: width))
        }
        lines.append("")
        let room = size.rows - lines.count - 1
        let shown = Rows.ordered(rows, by: sort, top: min(top ?? room, room))
        var table = Rows.table(shown, raw: raw, compact: width < 90)
        if !haveRates { table.rows = table.rows.map { var r = $0; r[2] = "…"; return r } }
        let rendered = table.render(width: width)
        if let header = rendered.first {
            lines.append(E.reverse + header.truncatedRight(to: width).padded(to: width) + E.reset)
        }
        for line in rendered.dropFirst() { lines.append(line.truncatedRight(to: width)) }
        if shown.isEmpty {
            lines.append(rows.isEmpty && filter.isEmpty ? "no probes registered" : "no probe matches the filters")
        }
        var out = E.home
        for (i, line) in lines.enumerated() {
            out += line + E.clearToEndOfLine
            if i < lines.count - 1 { out += "\r\n" }
        }
        return out + E.clearToEndOfScreen
    }
}

extension ProbeFilter {
    var isEmpty: Bool { consumer == nil && path == nil && match == nil }
}
