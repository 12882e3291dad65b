import ArgumentParser
import UprobedProtocol

extension UprobeCtl {
    struct Hist: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a latency probe's histogram of call durations as bars, as bpftrace prints hist().",
            discussion: """
                One line per bucket from the shortest to the longest call seen: [lower, upper) \
                count |bar|. Buckets are 1/8 of a power of two wide (bpftrace's and BCC's are a \
                whole power of two), so a percentile is within 1/16 of the true duration. Above \
                the bars: calls, returns, calls in flight (entered, not returned yet) and the \
                percentiles. --json prints the daemon's stats reply with the buckets.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "The id of a latency probe (uprobectl add --latency).")
        var id: String

        /// bpftrace's bar width.
        static let barWidth = 52

        func run() throws {
            let reply = try global.call(Request.stats(ids: [id], versions: false, buckets: true).json())
            guard !global.json else { return }
            guard let entry = reply["stats"]?.arrayValue?.first.flatMap(ProbeCount.init(json:)) else {
                throw CtlError.refused("no stats for \(id)")
            }
            guard let l = entry.latency else {
                throw CtlError.refused("\(id) is not a latency probe (register one with uprobectl add --latency)")
            }
            for line in Self.render(l) { print(line) }
        }

        static func render(_ l: LatencySummary) -> [String] {
            var out: [String] = []
            var head = "calls \(l.calls), returns \(l.returns), in flight \(l.inFlight)"
            if l.unobserved > 0 { head += ", unobserved \(l.unobserved)" }
            out.append(head)
            func ns(_ v: UInt64?) -> String { v.map(Human.nanoseconds) ?? "-" }
            out.append("min \(ns(l.minNs))  p50 \(ns(l.p50Ns))  p90 \(ns(l.p90Ns))  p99 \(ns(l.p99Ns))  p99.9 \(ns(l.p999Ns))  max \(ns(l.maxNs))")
            guard let peak = l.buckets.map(\.count).max(), peak > 0 else {
                out.append("(no call has returned yet)")
                return out
            }
            out.append("")
            let labels = l.buckets.map { b in "[\(Human.nanoseconds(b.lower)), \(b.upper.map(Human.nanoseconds) ?? "...")" + ")" }
            let labelWidth = labels.map(\.count).max() ?? 0
            let countWidth = l.buckets.map { String($0.count).count }.max() ?? 1
            for (b, label) in zip(l.buckets, labels) {
                let filled = Int((Double(b.count) / Double(peak) * Double(barWidth)).rounded(.up))
                out.append(label.padded(to: labelWidth) + " " + String(b.count).padded(to: countWidth, right: true)
                           + " |" + String(repeating: "@", count: filled) + String(repeating: " ", count: barWidth - filled) + "|")
            }
            return out
        }
    }
}
