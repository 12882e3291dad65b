import ArgumentParser
import UprobedClient
import UprobedProtocol

extension UprobeCtl {
    struct Watch: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a table of hits and rates every interval until interrupted.",
            discussion: """
                Each frame starts with a line '[YYYY-MM-DD HH:MM:SS] N probes, TOTAL hits/s' \
                (local time) and ends with a blank line, and is written out at once, also into a \
                pipe or a file (uprobectl watch | tee log). RATE is hits/s over the interval \
                before the frame ('-' in the first frame). For a full-screen view use \
                'uprobectl top'.

                --json prints the daemon's watch events, one per line, each with a 'time' member \
                added (Unix seconds).
                """)

        @OptionGroup var global: GlobalOptions
        @OptionGroup var selection: Selection
        @OptionGroup var presentation: Presentation

        @Option(name: .long, help: ArgumentHelp("Time between frames (500ms, 2s; a bare number is ms; at least 100ms).",
                                                valueName: "interval"))
        var interval = Interval(milliseconds: 1000)

        func validate() throws {
            if interval.milliseconds < 100 {
                throw ValidationError("--interval \(interval) is below the daemon's minimum of 100ms (a bare number is milliseconds: 2s or 2000)")
            }
        }

        func run() throws {
            // A read timeout well above the interval: a silent daemon is reported, not waited on forever.
            let daemon = try global.connect(timeoutSeconds: max(30, interval.milliseconds / 1000 * 3))
            // All probes: the daemon's watch cannot select a consumer, so the filter is ours.
            let catalog = Catalog(consumer: nil)
            if !global.json { try catalog.refresh(daemon) }
            let req = Request.watch(intervalMs: interval.milliseconds, ids: selection.ids.isEmpty ? nil : selection.ids).json()
            do { try daemon.client.send(.object(req)) } catch { throw CtlError.unreachable(error.message) }
            var first = true
            while true {
                let event: JSONValue
                do { event = try daemon.client.readReply() } catch { throw CtlError.unreachable(error.message) }
                guard var o = event.objectValue else { throw CtlError.unreachable("unexpected event: \(JSONSerializer.serialize(event))") }
                if let e = ReplyError(reply: o) {
                    if global.json { writeAll(1, JSONSerializer.serialize(event) + "\n") }
                    throw CtlError.refused(e.description)
                }
                if global.json {
                    o["time"] = .double((Clock.unixTime() * 1000).rounded() / 1000)
                    writeAll(1, JSONSerializer.serialize(.object(o)) + "\n")
                    continue
                }
                let counts = (try? ProbeCount.fromStats(o)) ?? []
                // A probe registered since the last list: list once more to name it.
                try catalog.refreshIfNeeded(for: counts, daemon, minimumGap: 5)
                // The daemon's rate is per interval except in its first event (mean since registration).
                let filter = selection.filter
                let kept = counts.map { catalog.row($0, rate: first ? nil : $0.rate) }.filter(filter.matches)
                let shown = Rows.ordered(kept, by: presentation.sort ?? .hits, top: presentation.top)
                writeAll(1, Self.frame(kept: kept, shown: shown, raw: presentation.raw))
                first = false
            }
        }

        /// One frame as one string, so it reaches a pipe in one write and is never half there.
        /// The header counts every selected probe, also those --top leaves out.
        static func frame(kept: [ProbeRow], shown: [ProbeRow], raw: Bool) -> String {
            var out = "[\(Clock.wallTime())] \(kept.count) probes"
            if let total = Rows.totalRate(kept) {
                out += ", " + (raw ? Human.fixed(total, decimals: 1) : Human.perSecond(total)) + " hits/s"
            }
            if shown.count < kept.count { out += " (top \(shown.count))" }
            out += "\n"
            for line in Rows.table(shown, raw: raw).render() { out += line + "\n" }
            return out + "\n"
        }
    }
}
