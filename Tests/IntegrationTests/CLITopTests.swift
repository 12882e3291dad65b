import Foundation
import Testing
import UprobedProtocol

/// `uprobectl top` in a real terminal (tmux), and `watch`/`top` into a pipe.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct CLITopTests {
    @Test("top shows function names and a rate that moves with the workload; keys change the sort; q restores the terminal")
    func topInTerminal() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        #expect(try ctl(["--socket", daemon.socket, "add", "\(target):fn_a", "\(target):fn_b"]).status == 0)
        // fn_b is the hot one: sorted by rate it is first, sorted by name it is second.
        let workload = try Workload(target: target, a: 10, b: 5000)
        defer { workload.stop() }
        let term = try Tmux(columns: 120, rows: 30)
        try term.type("\(try Paths.product("uprobectl")) --socket \(daemon.socket) top --interval 300; "
                      + "echo TOP\"\"_EXIT=$?; stty -a | grep -q -- '-icanon' && echo TTY\"\"_RAW || echo TTY\"\"_COOKED")
        var screen = try term.waitFor("fn_a and fn_b with rates") { s in
            s.contains("sort: rate") && topRow(s, symbol: "fn_a") != nil && (topRow(s, symbol: "fn_b")?[2].hasSuffix("/s") ?? false)
        }
        #expect(try term.pane("alternate_on") == "1")
        #expect(screen.contains("uprobed 0.1.0") && screen.contains("probes 2"), "\(screen)")
        // Sorted by rate: the hot fn_b above fn_a, with a rate above zero.
        screen = try term.waitFor("fn_b above fn_a with a rate above zero") { s in
            guard let b = topRow(s, symbol: "fn_b"), b[2] != "0/s", let ib = Self.line(s, "fn_b"), let ia = Self.line(s, "fn_a") else { return false }
            return ib < ia
        }
        // The rate moves: it drops to zero once the workload stops.
        workload.stop()
        try term.waitFor("fn_b's rate drop to 0/s") { s in topRow(s, symbol: "fn_b")?[2] == "0/s" }
        // 'n' sorts by name: fn_a first, and the header says so.
        try term.press("n")
        screen = try term.waitFor("sort: name with fn_a above fn_b") { s in
            guard s.contains("sort: name"), let ib = Self.line(s, "fn_b"), let ia = Self.line(s, "fn_a") else { return false }
            return ia < ib
        }
        // 's' cycles to the next key (name → id).
        try term.press("s")
        try term.waitFor("sort: id") { $0.contains("sort: id") }
        // 'q' quits cleanly: exit status 0, normal screen, cursor shown, terminal out of raw mode.
        // (The markers are typed as TOP""_EXIT, so only their output matches.)
        try term.press("q")
        screen = try term.waitFor("the shell after top") { $0.contains("TTY_") }
        #expect(screen.contains("TOP_EXIT=0"), "\(screen)")
        #expect(screen.contains("TTY_COOKED"), "\(screen)")
        #expect(!screen.contains("sort: id"), "the alternate screen is gone: \(screen)")
        #expect(try term.pane("alternate_on") == "0")
        #expect(try term.pane("cursor_flag") == "1")
    }

    @Test("top on a small terminal says so instead of drawing garbage, and Ctrl-C restores the terminal")
    func topSmallTerminalAndInterrupt() throws {
        let daemon = try TestDaemon()
        let term = try Tmux(columns: 30, rows: 6)
        try term.type("\(try Paths.product("uprobectl")) --socket \(daemon.socket) top; echo TOP\"\"_EXIT=$?")
        try term.waitFor("the too-small message") { $0.contains("terminal too small") }
        try term.press("C-c")
        let screen = try term.waitFor("the shell after top") { $0.contains("TOP_EXIT=") }
        #expect(screen.contains("TOP_EXIT=0"), "\(screen)")
        #expect(try term.pane("alternate_on") == "0")
    }

    @Test("watch into a pipe delivers time-stamped frames as they come, not when a buffer fills")
    func watchThroughPipe() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        #expect(try ctl(["--socket", daemon.socket, "add", "\(target):fn_a"]).status == 0)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try Paths.product("uprobectl"))
        p.arguments = ["watch", "--socket", daemon.socket, "--interval", "1000"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        let started = Date()
        try p.run()
        defer { p.terminate(); p.waitUntilExit() }
        let reader = PipeText(out)
        // A frame ends with a blank line. Two frames: the second proves frames are flushed as
        // they come, not only the first one or at exit. A frame is about 200 bytes: output
        // buffered by stdio (4 KiB into a pipe) would show none for 20 intervals, so 10 s for
        // two frames catches it and leaves room for a slow start on a loaded machine.
        func waitForFrames(_ n: Int, within seconds: Double) -> Bool {
            reader.readUntil(started.addingTimeInterval(seconds)) { _ in reader.frames.count >= n }
        }
        #expect(waitForFrames(2, within: 10), "no two frames within 10 s: \(reader.text)")
        #expect(reader.text.utf8.count < 4096, "frames of about 200 bytes: \(reader.text.utf8.count) bytes read")
        let text = reader.text
        let header = text.split(separator: "\n").first.map(String.init) ?? ""
        #expect(header.range(of: #"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] 1 probes"#, options: .regularExpression) != nil, "\(header)")
        #expect(text.contains("fn_a"), "\(text)")
    }

    @Test("top into a pipe prints plain frames without escape codes and stops after -n")
    func topThroughPipe() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        #expect(try ctl(["--socket", daemon.socket, "add", "\(target):fn_a"]).status == 0)
        let r = try ctl(["--socket", daemon.socket, "top", "--interval", "200ms", "-n", "2"])
        #expect(r.status == 0, "\(r.err)")
        #expect(!r.out.contains("\u{1B}"), "\(r.out)")
        #expect(r.out.components(separatedBy: "\n\n").count - 1 == 2, "\(r.out)")
        #expect(r.out.contains("fn_a"), "\(r.out)")
    }

    @Test("top shows CALLS, P50, P99 and MAX of latency probes ('-' for a counting one); 'l' sorts by P99, 's' goes on to max")
    func topLatencyColumns() throws {
        let daemon = try TestDaemon()
        let fx = try LatencyProbeTests.fixture(daemon)
        _ = try daemon.register([LatencyProbeTests.latencySpec(fx, "lat_sleep1"), LatencyProbeTests.latencySpec(fx, "lat_busy")])
        _ = try daemon.register([spec(fx, symbol: "lat_plain")])
        // 10 calls of 1 ms, 20 of 40 µs, 5 counted only.
        #expect(try run([fx, "--sleep1=10", "--busy=20", "--busy-ns=40000", "--plain=5"]).status == 0)
        let term = try Tmux(columns: 140, rows: 30)
        try term.type("\(try Paths.product("uprobectl")) --socket \(daemon.socket) top --interval 300; echo TOP\"\"_EXIT=$?")
        // Columns: ID HITS RATE CALLS P50 P99 MAX PID STATE SYMBOL PATH.
        var screen = try term.waitFor("the latency columns with the calls of both latency probes") { s in
            s.contains("CALLS") && s.contains("P99") && topRow(s, symbol: "lat_sleep1")?[3] == "10"
                && topRow(s, symbol: "lat_busy")?[3] == "20" && topRow(s, symbol: "lat_plain") != nil
        }
        let header = screen.split(separator: "\n").first { $0.contains("CALLS") }.map { $0.split(separator: " ").map(String.init) } ?? []
        #expect(Array(header.prefix(7)) == ["ID", "HITS", "RATE", "CALLS", "P50", "P99", "MAX"], "\(screen)")
        let sleep = try #require(topRow(screen, symbol: "lat_sleep1")), busy = try #require(topRow(screen, symbol: "lat_busy"))
        let plain = try #require(topRow(screen, symbol: "lat_plain"))
        #expect(sleep[4].hasSuffix("ms") && sleep[5].hasSuffix("ms") && sleep[6].hasSuffix("ms"), "\(sleep)")
        #expect(busy[4].hasSuffix("µs"), "\(busy)")
        #expect(plain[1] == "5" && plain[3] == "-" && plain[4] == "-" && plain[6] == "-", "\(plain)")
        // 'l': by P99, the 1 ms sleeps above the 40 µs busy loops, the counting probe last.
        try term.press("l")
        screen = try term.waitFor("sort: p99 with lat_sleep1 above lat_busy above lat_plain") { s in
            guard s.contains("sort: p99"), let a = Self.line(s, "lat_sleep1"), let b = Self.line(s, "lat_busy"),
                  let c = Self.line(s, "lat_plain") else { return false }
            return a < b && b < c
        }
        try term.press("s")
        try term.waitFor("sort: max") { $0.contains("sort: max") }
        try term.press("q")
        screen = try term.waitFor("the shell after top") { $0.contains("TOP_EXIT=") }
        #expect(screen.contains("TOP_EXIT=0"), "\(screen)")
    }

    @Test("watch into a pipe shows each interval's calls of latency probes: over the frames they add up exactly, durations in their range")
    func watchLatencyColumns() throws {
        let daemon = try TestDaemon()
        let fx = try LatencyProbeTests.fixture(daemon)
        _ = try daemon.register([LatencyProbeTests.latencySpec(fx, "lat_sleep1"), LatencyProbeTests.latencySpec(fx, "lat_busy")])
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try Paths.product("uprobectl"))
        p.arguments = ["watch", "--socket", daemon.socket, "--interval", "200", "--raw", "--sort", "p99"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        let reader = PipeText(out)
        func readUntil(seconds: Double, _ condition: ([String]) -> Bool) -> Bool {
            reader.readUntil(Date().addingTimeInterval(seconds)) { _ in condition(reader.frames) }
        }
        #expect(readUntil(seconds: 10) { !$0.isEmpty }, "no first frame: \(reader.text)")
        // 10 calls of 1 ms and 20 of 40 µs while the frames run.
        #expect(try run([fx, "--sleep1=10", "--busy=20", "--busy-ns=40000"]).status == 0)
        /// Per symbol, the calls of every frame's row, and the P50 (raw ns) of rows with calls.
        func rows(_ frames: [String], _ symbol: String) -> [[String]] {
            frames.flatMap { $0.split(separator: "\n").map { $0.split(separator: " ").map(String.init) } }
                .filter { $0.first?.hasPrefix("p") == true && $0.contains(symbol) }
        }
        func calls(_ frames: [String], _ symbol: String) -> Int { rows(frames, symbol).compactMap { Int($0[3]) }.reduce(0, +) }
        let complete = readUntil(seconds: 10) { calls($0, "lat_sleep1") >= 10 && calls($0, "lat_busy") >= 20 }
        let frames = reader.frames
        #expect(complete && calls(frames, "lat_sleep1") == 10 && calls(frames, "lat_busy") == 20, "\(reader.text)")
        #expect(frames.first?.contains("CALLS") == true, "\(frames.first ?? "")")
        for r in rows(frames, "lat_sleep1") where Int(r[3]) ?? 0 > 0 {
            #expect((Int(r[4]) ?? 0) >= 1_000_000, "a 1 ms sleep's P50 in ns: \(r)")
        }
        for r in rows(frames, "lat_busy") where Int(r[3]) ?? 0 > 0 {
            let p50 = Int(r[4]) ?? 0
            #expect(p50 >= 37_000 && p50 < 1_000_000, "a 40 µs busy loop's P50 in ns: \(r)")
        }
    }

    /// The index of the first screen line showing `symbol` in a probe row.
    static func line(_ screen: String, _ symbol: String) -> Int? {
        screen.split(separator: "\n").firstIndex { l in
            let f = l.split(separator: " ")
            return f.first?.hasPrefix("p") == true && f.contains { $0 == symbol }
        }
    }
}
