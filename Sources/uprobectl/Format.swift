import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// Numbers as people read them in `top` and `perf`: 999, 1.2k, 35.1k, 123k, 1.2M, 3.4G.
enum Human {
    private static let units = ["", "k", "M", "G", "T", "P", "E"]

    /// A hit count: exact below 1000, else three significant digits with a unit.
    static func count(_ v: UInt64) -> String {
        v < 1000 ? String(v) : scaled(Double(v))
    }

    /// A rate in hits/s: one decimal below 10 (a probe hit twice a second is not "0").
    static func rate(_ v: Double) -> String { perSecond(v) + "/s" }

    /// The number of a rate, without the unit: 0, 0.5, 12, 35.1k.
    static func perSecond(_ v: Double) -> String {
        guard v.isFinite, v > 0 else { return "0" }
        if v < 9.95 { return fixed(v, decimals: 1) }
        return scaled(v)
    }

    static func scaled(_ value: Double) -> String {
        var x = value
        var unit = 0
        // Move up a unit before rounding would print "1000k".
        while x >= 999.5 && unit < units.count - 1 {
            x /= 1000
            unit += 1
        }
        if unit == 0 { return String(Int64(x.rounded())) }
        if x < 99.95 { return fixed(x, decimals: 1) + units[unit] }
        return String(Int64(x.rounded())) + units[unit]
    }

    /// `v` rounded to `decimals` places, without Foundation's `String(format:)`.
    static func fixed(_ v: Double, decimals: Int) -> String {
        guard v.isFinite else { return "-" }
        var scale = 1.0
        for _ in 0..<decimals { scale *= 10 }
        let r = (abs(v) * scale).rounded()
        guard r < 9e18 else { return String(v) }
        let n = Int64(r)
        let p = Int64(scale)
        let sign = v < 0 && n != 0 ? "-" : ""
        guard decimals > 0 else { return sign + String(n) }
        let frac = String(n % p)
        return sign + String(n / p) + "." + String(repeating: "0", count: decimals - frac.count) + frac
    }

    /// A call's duration: 850ns, 12.3µs, 1.2ms, 3.40s, 2m05s; three significant digits.
    static func nanoseconds(_ ns: UInt64) -> String {
        let v = Double(ns)
        func three(_ x: Double, _ unit: String) -> String {
            fixed(x, decimals: x < 9.995 ? 2 : (x < 99.95 ? 1 : 0)) + unit
        }
        if ns < 1000 { return "\(ns)ns" }
        if v < 999_500 { return three(v / 1e3, "µs") }
        if v < 999_500_000 { return three(v / 1e6, "ms") }
        if v < 59.995e9 { return three(v / 1e9, "s") }
        return duration(v / 1e9)
    }

    /// 45s, 12m05s, 2h03m, 3d04h.
    static func duration(_ seconds: Double) -> String {
        let s = Int64(max(0, seconds))
        func two(_ n: Int64) -> String { n < 10 ? "0\(n)" : "\(n)" }
        if s < 60 { return "\(s)s" }
        if s < 3600 { return "\(s / 60)m\(two(s % 60))s" }
        if s < 86400 { return "\(s / 3600)h\(two(s / 60 % 60))m" }
        return "\(s / 86400)d\(two(s / 3600 % 24))h"
    }
}

/// Shortening text to a width, marking the cut with "…".
extension String {
    /// Keeps the start: symbols are read from the left (`std::vector<…`).
    func truncatedRight(to width: Int) -> String {
        guard count > width else { return self }
        guard width > 1 else { return width == 1 ? "…" : "" }
        return String(prefix(width - 1)) + "…"
    }

    /// Keeps the end: a path's file name is the part that tells binaries apart.
    func truncatedLeft(to width: Int) -> String {
        guard count > width else { return self }
        guard width > 1 else { return width == 1 ? "…" : "" }
        return "…" + String(suffix(width - 1))
    }

    /// A path cut at a directory boundary where it can be (`…/x86_64-linux-gnu/libc.so.6`,
    /// then `…/libc.so.6`), and only inside the file name when even that does not fit.
    func shortenedPath(to width: Int) -> String {
        guard count > width else { return self }
        var rest = Substring(self)
        while let slash = rest.dropFirst().firstIndex(of: "/") {
            rest = rest[slash...]
            if rest.count + 1 <= width { return "…" + rest }
        }
        return truncatedLeft(to: width)
    }

    func padded(to width: Int, right: Bool = false) -> String {
        let n = count
        guard n < width else { return self }
        let pad = String(repeating: " ", count: width - n)
        return right ? pad + self : self + pad
    }
}

/// A text table with aligned columns; flexible columns shrink to fit a terminal's width.
struct Table {
    /// `keepEnd` is for paths: it cuts at a directory boundary when it can.
    enum Cut { case none, keepStart, keepEnd }

    struct Column {
        var title: String
        var rightAligned = false
        /// How the column shrinks when the table is wider than the screen (`.none`: it does not).
        var cut: Cut = .none
        /// A flexible column never shrinks below this.
        var minWidth = 8
    }

    var columns: [Column]
    var rows: [[String]] = []

    init(_ columns: [Column]) { self.columns = columns }

    /// The lines of the table, the header first. `width`: the screen's width (nil: no limit).
    /// The last column is not padded, so lines carry no trailing blanks.
    func render(width: Int? = nil, header: Bool = true) -> [String] {
        let widths = columnWidths(limit: width)
        let all = header ? [columns.map(\.title)] + rows : rows
        return all.map { row in
            var cells: [String] = []
            for (i, col) in columns.enumerated() {
                var cell = i < row.count ? row[i] : ""
                switch col.cut {
                case .none: break
                case .keepStart: cell = cell.truncatedRight(to: widths[i])
                case .keepEnd: cell = cell.shortenedPath(to: widths[i])
                }
                let last = i == columns.count - 1
                cells.append(last && !col.rightAligned ? cell : cell.padded(to: widths[i], right: col.rightAligned))
            }
            return cells.joined(separator: "  ")
        }
    }

    func columnWidths(limit: Int?) -> [Int] {
        var widths = columns.indices.map { i in
            rows.reduce(columns[i].title.count) { max($0, i < $1.count ? $1[i].count : 0) }
        }
        guard let limit else { return widths }
        let flexible = columns.indices.filter { columns[$0].cut != .none }
        let fixed = columns.indices.filter { columns[$0].cut == .none }.reduce(0) { $0 + widths[$1] }
        let gaps = 2 * max(0, columns.count - 1)
        var room = limit - fixed - gaps
        guard flexible.reduce(0, { $0 + widths[$1] }) > room else { return widths }
        // Narrowest first: a column that needs less than its fair share leaves the rest to the others.
        var pending = flexible.sorted { widths[$0] < widths[$1] }
        while !pending.isEmpty {
            let share = max(room / pending.count, 0)
            let i = pending.removeFirst()
            let w = max(columns[i].minWidth, min(widths[i], share))
            widths[i] = w
            room -= w
        }
        return widths
    }
}

enum Clock {
    /// Seconds on the monotonic clock: rates are deltas, immune to wall-clock steps.
    static func monotonic() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Local wall-clock time, `2026-06-10 07:30:01` (or `07:30:01` with `dateToo: false`).
    static func wallTime(dateToo: Bool = true) -> String {
        var now = time(nil)
        var t = tm()
        localtime_r(&now, &t)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, dateToo ? "%Y-%m-%d %H:%M:%S" : "%H:%M:%S", &t)
        return String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func unixTime() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Sleeps until `deadline` on the monotonic clock (nanosleep restarts after a signal).
    static func sleep(until deadline: Double) {
        while true {
            let left = deadline - monotonic()
            if left <= 0 { return }
            var ts = timespec(tv_sec: Int(left), tv_nsec: Int((left - Double(Int(left))) * 1e9))
            if nanosleep(&ts, nil) == 0 { return }
        }
    }
}

/// An interval on the command line: `500ms`, `1s`, `1.5s`, `2m`; a bare number is milliseconds
/// (what `watch --interval 1000` always meant).
struct Interval: ExpressibleByArgument, CustomStringConvertible {
    var milliseconds: Int

    init(milliseconds: Int) { self.milliseconds = milliseconds }

    init?(argument: String) {
        let text = argument.lowercased()
        let (number, scale): (Substring, Double)
        if text.hasSuffix("ms") { (number, scale) = (text.dropLast(2), 1) }
        else if text.hasSuffix("s") { (number, scale) = (text.dropLast(), 1000) }
        else if text.hasSuffix("m") { (number, scale) = (text.dropLast(), 60_000) }
        else { (number, scale) = (text[...], 1) }
        guard let v = Double(number), v >= 0, v.isFinite, v * scale <= 3_600_000 else { return nil }
        milliseconds = Int((v * scale).rounded())
    }

    var seconds: Double { Double(milliseconds) / 1000 }

    var description: String {
        if milliseconds % 1000 == 0 { return "\(milliseconds / 1000)s" }
        return milliseconds > 1000 ? Human.fixed(seconds, decimals: 1) + "s" : "\(milliseconds)ms"
    }

    static var defaultCompletionKind: CompletionKind { .list(["500ms", "1s", "2s", "5s"]) }
}

/// Writes all of `text` to a file descriptor (stdout for frames: one write per frame, so a
/// reader of a pipe never sees half a frame).
func writeAll(_ fd: Int32, _ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
        if n <= 0 { return }
        bytes = bytes.dropFirst(n)
    }
}
