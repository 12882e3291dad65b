import UprobedProtocol

extension ProbeSpec {
    /// The spec in the spelling `uprobectl add` and probe-set files take (the inverse of
    /// `init(cliSpelling:)`), with options a spelling cannot carry in parentheses: what `diff`
    /// and `apply` print.
    public var spelling: String {
        var s: String
        if let usdt { s = "usdt:\(path):\(usdt)" } else {
            let target = symbol ?? offset.map { "0x" + String($0, radix: 16) } ?? "?"
            s = (retprobe ? "uretprobe:" : "uprobe:") + path + ":" + target
        }
        var options: [String] = []
        if !follow { options.append("follow: false") }
        if force { options.append("force: true") }
        if latency { options.append("latency: true") }
        if let pid { options.append("pid: \(pid)") }
        if !options.isEmpty { s += " (" + options.joined(separator: ", ") + ")" }
        return s
    }
}
