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

    @Test("watch into a pipe delivers a time-stamped frame within two intervals")
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
        let fd = out.fileHandleForReading.fileDescriptor
        var text = ""
        // A frame ends with a blank line. Two frames: the second proves frames are flushed as
        // they come, not only the first one or at exit.
        func waitForFrames(_ n: Int, within seconds: Double) -> Bool {
            let deadline = started.addingTimeInterval(seconds)
            while text.components(separatedBy: "\n\n").count - 1 < n {
                let left = deadline.timeIntervalSinceNow
                guard left > 0 else { return false }
                var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, Int32(left * 1000)) > 0 else { return false }
                var buf = [UInt8](repeating: 0, count: 65536)
                let got = read(fd, &buf, buf.count)
                guard got > 0 else { return false }
                text += String(decoding: buf[0..<got], as: UTF8.self)
            }
            return true
        }
        #expect(waitForFrames(1, within: 2.0), "no frame within two intervals: \(text)")
        #expect(waitForFrames(2, within: 4.0), "no second frame within two more intervals: \(text)")
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

    /// The index of the first screen line showing `symbol` in a probe row.
    static func line(_ screen: String, _ symbol: String) -> Int? {
        screen.split(separator: "\n").firstIndex { l in
            let f = l.split(separator: " ")
            return f.first?.hasPrefix("p") == true && f.contains { $0 == symbol }
        }
    }
}
