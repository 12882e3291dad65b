import Foundation
import Testing

/// Runs `uprobectl` with `args` (the socket is the caller's to give, before or after the command).
@discardableResult
func ctl(_ args: [String], stdin: String? = nil, environment: [String: String]? = nil) throws -> (status: Int32, out: String, err: String) {
    try run([try Paths.product("uprobectl")] + args, stdin: stdin, environment: environment)
}

/// The data rows of a uprobectl table (header dropped), split into blank-separated fields.
func tableRows(_ out: String) -> [[String]] {
    out.split(separator: "\n").dropFirst().map { $0.split(separator: " ").map(String.init) }
}

/// A workload that keeps calling the target fixture's functions until stopped: a shell loop,
/// so the rate stays up for as long as a test watches it.
final class Workload {
    let process = Process()

    init(target: String, a: Int, b: Int) throws {
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "while :; do '\(target)' \(a) \(b); done"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
    }

    /// SIGKILL: the test runner's threads block SIGTERM, and children inherit that mask.
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { stop() }
}

/// A real terminal for `uprobectl top`: a tmux session of a fixed size on a private tmux
/// server (its own socket), so tests neither see nor disturb anyone's tmux.
final class Tmux {
    let server: String
    let session = "t"
    private static let binary = ["/usr/bin/tmux", "/usr/local/bin/tmux"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// Starts `bash` in a `columns`×`rows` terminal; commands are typed into it with `type`, so
    /// the shell prompt shows what the terminal looks like after a command exits.
    init(columns: Int = 120, rows: Int = 30) throws {
        guard Self.binary != nil else { throw TestFailure("tmux is not installed (make deps installs it)") }
        server = "uprobed-test-\(getpid())-\(UUID().uuidString.prefix(8))"
        // The tmux server forks off the first client and would inherit every descriptor the
        // client got, among them the one Foundation's Process watches to learn that the client
        // exited: then `run` never returns. So the client starts with descriptors 0-2 only.
        let closeAndExec = #"for fd in /proc/$$/fd/*; do n=${fd##*/}; ((n > 2)) && eval "exec $n>&-"; done; exec "$@""#
        let r = try run(["/bin/bash", "-c", closeAndExec, "bash", Self.binary ?? "tmux", "-L", server, "-f", "/dev/null",
                         "new-session", "-d", "-s", session, "-x", "\(columns)", "-y", "\(rows)",
                         "env PS1='$ ' TERM=xterm-256color bash --norc --noprofile"])
        guard r.status == 0 else { throw TestFailure("tmux new-session failed: \(r.err)") }
    }

    @discardableResult
    func tmux(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run([Self.binary ?? "tmux", "-L", server, "-f", "/dev/null"] + args)
    }

    /// Types a line into the shell and presses Enter.
    func type(_ line: String) throws {
        try tmux(["send-keys", "-t", session, "-l", line])
        try tmux(["send-keys", "-t", session, "Enter"])
    }

    /// Presses one key (tmux key name or a literal character).
    func press(_ key: String) throws { try tmux(["send-keys", "-t", session, key]) }

    /// What the screen shows now.
    func screen() throws -> String { try tmux(["capture-pane", "-p", "-t", session]).out }

    /// A tmux format variable of the pane, e.g. `alternate_on`, `cursor_flag`.
    func pane(_ variable: String) throws -> String {
        try tmux(["display-message", "-p", "-t", session, "#{\(variable)}"]).out.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Polls the screen until `condition` holds or `seconds` pass; returns the last screen.
    @discardableResult
    func waitFor(_ what: String, seconds: Double = 15, _ condition: (String) -> Bool) throws -> String {
        let deadline = Date().addingTimeInterval(seconds)
        var last = ""
        while Date() < deadline {
            last = try screen()
            if condition(last) { return last }
            usleep(100_000)
        }
        throw TestFailure("screen never showed \(what) within \(seconds) s; last screen:\n\(last)")
    }

    /// The shell in the pane inherited the test runner's blocked SIGHUP, so `kill-server`
    /// alone would leave it (and the server waiting for it) running: it is killed first, and
    /// a `top` still running in it sees the terminal hang up.
    deinit {
        if let pid = try? pane("pane_pid"), let n = Int32(pid) { kill(n, SIGKILL) }
        _ = try? tmux(["kill-server"])
    }
}

/// The row of `symbol` on a `top` screen, as fields (ID HITS RATE ... SYMBOL PATH).
func topRow(_ screen: String, symbol: String) -> [String]? {
    screen.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }.first { $0.contains(symbol) && $0.first?.hasPrefix("p") == true }
}

/// What a child process writes into a pipe, read as it comes (`watch` and `top` into a pipe).
final class PipeText {
    private let fd: Int32
    private(set) var text = ""
    init(_ pipe: Pipe) { fd = pipe.fileHandleForReading.fileDescriptor }

    /// Reads until `done(text)` holds or `deadline` passes; whether it holds.
    func readUntil(_ deadline: Date, _ done: (String) -> Bool) -> Bool {
        while !done(text) {
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

    /// The frames read so far: blocks that end with a blank line.
    var frames: [String] {
        let parts: [String] = text.components(separatedBy: "\n\n")
        return Array(parts.dropLast())
    }
}

