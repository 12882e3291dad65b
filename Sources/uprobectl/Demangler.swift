#if canImport(Glibc)
import Glibc
#endif

/// Turns mangled symbol names into what people read, with the tools already on the machine:
/// `c++filt` (binutils) for Itanium C++ (`_Z…`) and Rust (legacy `_ZN…E` and v0 `_R…`),
/// `swift-demangle` (or `swift demangle`) from a Swift toolchain for Swift (`$s…`, `_$s…`).
///
/// Each tool runs once per batch, all names on its stdin (one process for 241,000 names, not
/// one per name). A missing tool or a failure leaves the names as they are: demangling is
/// for display and must never fail a command.
enum Demangler {
    enum Tool { case cxxfilt, swift }

    /// Which tool, if any, reads this name. Names carry no version suffix here.
    static func tool(for name: String) -> Tool? {
        if name.hasPrefix("_Z") || name.hasPrefix("_R") { return .cxxfilt }
        for p in ["$s", "_$s", "$S", "_$S", "$e", "_$e", "_T0"] where name.hasPrefix(p) { return .swift }
        return nil
    }

    /// The readable form of every name that has one (names without one are left out).
    /// A symbol version (`@@GLIBCXX_3.4`) is kept after the demangled name.
    static func demangle(_ names: some Sequence<String>) -> [String: String] {
        var byTool: [Tool: [(full: String, bare: String, version: Substring)]] = [:]
        var seen = Set<String>()
        for name in names where seen.insert(name).inserted && !name.contains("\n") {
            let at = name.firstIndex(of: "@") ?? name.endIndex
            let bare = String(name[..<at])
            guard let tool = tool(for: bare) else { continue }
            byTool[tool, default: []].append((name, bare, name[at...]))
        }
        var out: [String: String] = [:]
        for (tool, items) in byTool {
            let commands: [[String]] = tool == .cxxfilt ? [["c++filt"]] : [["swift-demangle"], ["swift", "demangle"]]
            var lines: [String]? = nil
            for argv in commands {
                lines = Subprocess.filterLines(argv, input: items.map(\.bare))
                if lines != nil { break }
            }
            guard let lines, lines.count == items.count else { continue }
            for (item, line) in zip(items, lines) where line != item.bare && !line.isEmpty {
                out[item.full] = stripRustHash(line, mangled: item.bare) + item.version
            }
        }
        return out
    }

    /// Rust's legacy mangling ends every path with a hash segment (`::h0123456789abcdef`) that
    /// c++filt keeps and rustc's own demangler hides by default; it only makes names longer.
    static func stripRustHash(_ s: String, mangled: String) -> String {
        guard mangled.hasPrefix("_ZN"), s.count > 19 else { return s }
        let tail = s.suffix(19)
        guard tail.hasPrefix("::h"), tail.dropFirst(3).allSatisfy(\.isHexDigit) else { return s }
        return String(s.dropLast(19))
    }
}

/// Running a filter program without a shell.
enum Subprocess {
    /// Runs `argv` (found on $PATH) with `input` as its stdin, one item per line, and returns
    /// its stdout split into lines; nil if it cannot run or does not exit 0. The input goes
    /// through an unlinked temporary file, not a pipe: the child then never blocks on a full
    /// stdout pipe while we are still writing its stdin.
    static func filterLines(_ argv: [String], input: [String]) -> [String]? {
        guard !argv.isEmpty else { return nil }
        var template = Array("/tmp/uprobectl-XXXXXX".utf8CString)
        let inFD = template.withUnsafeMutableBufferPointer { b in b.baseAddress.map { mkstemp($0) } ?? -1 }
        guard inFD >= 0 else { return nil }
        template.withUnsafeBufferPointer { b in _ = b.baseAddress.map { unlink($0) } }
        defer { close(inFD) }
        var text = input.joined(separator: "\n")
        text += "\n"
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { write(inFD, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            bytes = bytes.dropFirst(n)
        }
        guard lseek(inFD, 0, SEEK_SET) == 0 else { return nil }

        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { return nil }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        // Close-on-exec on the originals: the child keeps only its dup2'ed stdin and stdout, so
        // its exit (not some inherited copy) ends our read. (pipe2 is not in Swift's Glibc.)
        for fd in [readEnd, writeEnd, inFD] { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inFD, 0)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 1)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cArgs.append(nil)
        defer { for p in cArgs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], &actions, nil, cArgs, environ)
        close(writeEnd)
        guard rc == 0 else {
            close(readEnd)
            return nil
        }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(readEnd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out.append(contentsOf: chunk[0..<n])
        }
        close(readEnd)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED && WEXITSTATUS == 0, spelled out: the C macros are not imported.
        guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else { return nil }
        var lines = String(decoding: out, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if lines.last == "" { lines.removeLast() }
        return lines
    }
}
