import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Peers that try to stall, bloat or crowd out the daemon (issue 24): each test stands for one
/// hole an attack run found, and fails on the build that had it.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct HostilePeerTests {
    /// Resident memory of `pid` in bytes (VmRSS).
    static func rss(_ pid: Int32) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kb = line.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return 0 }
        return kb * 1024
    }

    /// Seconds `body` took.
    static func timed(_ body: () throws -> Void) rethrows -> Double {
        let start = Date()
        try body()
        return Date().timeIntervalSince(start)
    }

    @Test("a client that pipelines stats requests and never reads its replies does not grow the daemon; others are served meanwhile")
    func unreadRepliesAreBounded() throws {
        let d = try TestDaemon()
        let many = try Fixtures.build("many", relative: "kernel/many.c")
        let ids = try d.register([spec(many, symbol: "g*")])
        #expect(ids.count == 10_000)
        _ = try d.hits()  // one full stats reply, so its buffers are part of the baseline
        let before = Self.rss(d.process.processIdentifier)
        // 15,360 requests (230 KB) sent by a thread; the main thread watches for 5 s.
        let hog = """
            import socket, sys, threading, time
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(sys.argv[1])
            def send():
                try: s.sendall(b'{"op":"stats"}\\n' * 15360)
                except OSError: pass
            threading.Thread(target=send, daemon=True).start()
            time.sleep(5)
            print("done", flush=True)
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = ["-c", hog, d.socket]
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        var peak = before
        var slowest = 0.0
        var answeredDuringHog = 0
        let hogStarted = Date()
        while p.isRunning {
            peak = max(peak, Self.rss(d.process.processIdentifier))
            var answered = false
            slowest = max(slowest, try Self.timed { answered = try d.status()["ok"] == .bool(true) })
            #expect(answered)
            if answered && p.isRunning { answeredDuringHog += 1 }
            usleep(200_000)
        }
        let hogSeconds = Date().timeIntervalSince(hogStarted)
        peak = max(peak, Self.rss(d.process.processIdentifier))
        // Unbounded, this took the daemon past 4 GB in 7 s. Bounded, the client's socket buffers
        // and a few replies (10,000 probes: ~450 KB each) are queued at most.
        #expect(peak - before < 150 << 20, "RSS grew from \(before >> 20) MB to \(peak >> 20) MB while a client did not read")
        // Served while the hog runs, not after it: a daemon that waited on the unread client
        // answers once, when the hog's 5 s are over. The bounds leave room for a loaded 2-core
        // machine (a status then takes up to several hundred ms) and still catch that: no
        // answer slower than half the hog's run, and answers all along it (about one per
        // 200 ms sleep plus the answer's time).
        #expect(slowest < hogSeconds / 2, "status took \(slowest) s while a client did not read for \(hogSeconds) s")
        #expect(answeredDuringHog >= 5, "\(answeredDuringHog) status replies during the \(hogSeconds) s a client did not read")
        // The daemon is still whole: the hogging connection is gone and stats answers.
        #expect(try d.hits().count == 10_000)
    }

    @Test("a FIFO, a device or a socket named as a binary is refused at once and holds no thread; other clients are served")
    func specialFilesNeverBlock() throws {
        let d = try TestDaemon()
        let fifo = d.dir + "/fifo"
        #expect(mkfifo(fifo, 0o644) == 0)
        // Two connections (the task pool has two threads) each ask about the FIFO; no reply
        // would come on the build that opened it blocking, and list below would wait forever.
        var replies: [JSONObject] = []
        let elapsed = try Self.timed {
            let a = try LineClient(socketPath: d.socket, timeoutSeconds: 5)
            let b = try LineClient(socketPath: d.socket, timeoutSeconds: 5)
            try a.send(.object(["op": "resolve", "probes": [spec(fifo, symbol: "main")]]))
            try b.send(.object(["op": "register", "probes": [spec(fifo, symbol: "main")]]))
            let listed = try LineClient(socketPath: d.socket, timeoutSeconds: 5).call(["op": "list"])
            #expect(listed.objectValue?["ok"] == .bool(true))
            for c in [a, b] { if let o = try c.readReply().objectValue { replies.append(o) } }
        }
        #expect(elapsed < 3, "the FIFO requests and a list took \(elapsed) s")
        #expect(replies.count == 2)
        for r in replies {
            #expect(errorCode(r) == "not_elf", "\(r)")
            #expect(r["error"]?.objectValue?["message"]?.stringValue?.contains("FIFO") == true, "\(r)")
        }
        for (path, kind) in [("/dev/zero", "character device"), (d.socket, "socket")] {
            let r = try d.call(["op": "resolve", "probes": [spec(path, symbol: "main")]])
            #expect(errorCode(r) == "not_elf", "\(r)")
            #expect(r["error"]?.objectValue?["message"]?.stringValue?.contains(kind) == true, "\(r)")
        }
    }

    @Test("the cache of parsed binaries stays within elf_cache_bytes, and memory comes back")
    func elfCacheIsBoundedByBytes() throws {
        let budget = 8 << 20
        let d = try TestDaemon(config: "elf_cache_bytes = \(budget)\n")
        let many = try Fixtures.build("many", relative: "kernel/many.c")
        // 30 copies: 30 files with 10,000 symbols each, each parsed once.
        var copies: [String] = []
        for i in 0..<30 {
            let c = d.dir + "/many-\(i)"
            try FileManager.default.copyItem(atPath: many, toPath: c)
            copies.append(c)
        }
        let first = try d.call(["op": "resolve", "probes": [spec(copies[0], symbol: "g0001")]])
        #expect(first["ok"] == .bool(true), "\(first)")
        let before = Self.rss(d.process.processIdentifier)
        for c in copies.dropFirst() {
            let r = try d.call(["op": "resolve", "probes": [spec(c, symbol: "g0001")]])
            #expect(r["ok"] == .bool(true), "\(r)")
        }
        let after = Self.rss(d.process.processIdentifier)
        let cache = try d.status()["elf_cache"]?.objectValue
        let bytes = cache?["bytes"]?.int64Value ?? -1
        let files = cache?["files"]?.int64Value ?? -1
        #expect(bytes > 0 && bytes <= Int64(budget), "cache holds \(bytes) bytes in \(files) files")
        #expect(files > 0 && files < 30)
        // Unbounded (64 parses kept), 29 more parses added ~100 MB.
        #expect(after - before < 40 << 20, "RSS grew from \(before >> 20) MB to \(after >> 20) MB")
    }

    @Test("pid filters: an exited process, a zombie and a kernel thread are refused with the right code; pid 1 gives one answer")
    func pidErrors() throws {
        let d = try TestDaemon()
        let target = try d.privateTarget()
        func register(pid: Int32, path: String = "", symbol: String = "fn_a") throws -> JSONObject {
            try d.call(["op": "register", "probes": [spec(path.isEmpty ? target : path, symbol: symbol, pid: pid)]])
        }
        // Exited and reaped.
        let gone = try run(["/bin/sh", "-c", "echo $$"]).out.trimmingCharacters(in: .whitespacesAndNewlines)
        if let pid = Int32(gone) { #expect(errorCode(try register(pid: pid)) == "process_not_found") }
        // A zombie: the child exits at once and its parent (python, asleep) never reaps it.
        let parent = Process()
        parent.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        parent.arguments = ["-c", "import os, signal, time\nsignal.signal(signal.SIGCHLD, signal.SIG_DFL)\npid = os.fork()\nif pid == 0: os._exit(0)\nprint(pid, flush=True)\ntime.sleep(60)"]
        let out = Pipe()
        parent.standardOutput = out
        try parent.run()
        defer { kill(parent.processIdentifier, SIGKILL); parent.waitUntilExit() }
        let child = Int32(String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines))
        var zombie: Int32? = nil
        for _ in 0..<1000 where zombie == nil {
            if let c = child, let st = try? String(contentsOfFile: "/proc/\(c)/stat", encoding: .utf8), st.contains(") Z ") {
                zombie = c
            } else {
                usleep(10_000)
            }
        }
        let z = try #require(zombie)
        let zr = try register(pid: z)
        #expect(errorCode(zr) == "process_not_found", "\(zr)")
        #expect(zr["error"]?.objectValue?["message"]?.stringValue?.contains("zombie") == true, "\(zr)")
        let zl = try register(pid: z, path: "libc", symbol: "malloc")
        #expect(errorCode(zl) == "process_not_found", "\(zl)")
        // Kernel threads: kthreadd is pid 2 wherever pid 2 is visible.
        if let st = try? String(contentsOfFile: "/proc/2/stat", encoding: .utf8), st.hasPrefix("2 (kthreadd)") {
            let k = try register(pid: 2)
            #expect(errorCode(k) == "invalid_spec", "\(k)")
            #expect(k["error"]?.objectValue?["message"]?.stringValue?.contains("kernel thread") == true, "\(k)")
        }
        // pid 1, by path and by library name: one code, whatever pid 1 is on this machine.
        let byPath = try d.call(["op": "resolve", "probes": [spec("/usr/bin/bash", symbol: "main", pid: 1)]])
        let byLibrary = try d.call(["op": "resolve", "probes": [spec("libc", symbol: "malloc", pid: 1)]])
        #expect(errorCode(byPath) == errorCode(byLibrary), "\(byPath) vs \(byLibrary)")
        #expect(!["file_not_found", "library_not_found"].contains(errorCode(byPath) ?? ""), "\(byPath)")
    }

    @Test("blank lines get no reply (keep-alive); the next request's reply comes first")
    func blankLinesAreIgnored() throws {
        let d = try TestDaemon()
        let c = try d.client()
        try c.sendRaw(Array(" \n\t\n\n{\"op\":\"status\",\"id\":7}\n".utf8))
        let r = try c.readReply().objectValue
        #expect(r?["id"] == .int(7))
    }

    @Test("connections: a uid that is not an admin holds at most max_connections_per_uid, and the last admin_reserved_connections are root's")
    func connectionsPerUID() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let nobody: (uid: UInt32, gid: UInt32) = (65534, 65534)
        let d = try ServiceDaemon(dir: dir, config: """
            socket_mode = 0666
            read_uids = *
            max_connections = 8
            max_connections_per_uid = 4
            admin_reserved_connections = 2
            """)
        defer { d.stop() }
        // The test user asks for 5: 4 are served, the 5th is over its own limit.
        let mine = try ConnectionHolder.open(socket: d.socket, count: 5, asUser: user)
        defer { mine.release() }
        #expect(mine.results.filter { $0 == "ok" }.count == 4, "\(mine.results)")
        #expect(mine.results.filter { $0 == "too_many_connections" }.count == 1, "\(mine.results)")
        // nobody asks for 3 while those 4 are open: 2 fit below the admins' reserve (8 - 2).
        let theirs = try ConnectionHolder.open(socket: d.socket, count: 3, asUser: nobody)
        defer { theirs.release() }
        #expect(theirs.results.filter { $0 == "ok" }.count == 2, "\(theirs.results)")
        #expect(theirs.results.filter { $0 == "too_many_connections" }.count == 1, "\(theirs.results)")
        // Root still gets the two kept places, and can register.
        let root = try ConnectionHolder.open(socket: d.socket, count: 2)
        defer { root.release() }
        #expect(root.results == ["ok", "ok"], "\(root.results)")
        #expect(d.log.contains("connection refused"))
    }

    @Test("out of file descriptors: new clients are told too_many_open_files or closed, never left hanging, and it is logged")
    func descriptorExhaustion() throws {
        let d = try TestDaemon(launcher: ["/usr/bin/prlimit", "--nofile=64:64"])
        let outcomes = try ConnectionHolder.open(socket: d.socket, count: 80)
        defer { outcomes.release() }
        let tally = Dictionary(outcomes.results.map { ($0, 1) }, uniquingKeysWith: +)
        #expect(tally["hang"] == nil, "\(tally)")
        #expect(tally["ok", default: 0] > 10, "\(tally)")
        #expect(tally["too_many_open_files", default: 0] + tally["closed", default: 0] > 0, "\(tally)")
        #expect(d.log.contains("out of file descriptors"))
        outcomes.release()
        // Once those close, the daemon serves again.
        var served = false
        for _ in 0..<50 where !served {
            served = (try? d.status()["ok"]) == .bool(true)
            if !served { usleep(100_000) }
        }
        #expect(served)
    }
}

/// Opens `count` connections at once (in a python3 process, optionally as another uid), sends
/// `status` on each and classifies each first reply: `ok`, an error code, `closed`, `reset` or
/// `hang` (nothing within 3 s). The connections stay open until `release`.
final class ConnectionHolder: @unchecked Sendable {
    // @unchecked: used by the owning test only.
    let results: [String]
    private let process: Process
    private let input: Pipe

    static let script = """
        import json, socket, sys
        path, n = sys.argv[1], int(sys.argv[2])
        socks = []
        for i in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.sendall(b'{"op":"status"}\\n')
            socks.append(s)
        out = []
        for s in socks:
            s.settimeout(3)
            try:
                line = s.makefile("rb").readline()
                out.append("closed" if not line else ("ok" if json.loads(line).get("ok") else json.loads(line)["error"]["code"]))
            except socket.timeout:
                out.append("hang")
            except ConnectionResetError:
                out.append("reset")
        print(" ".join(out), flush=True)
        sys.stdin.read()
        """

    private init(results: [String], process: Process, input: Pipe) {
        self.results = results
        self.process = process
        self.input = input
    }

    static func open(socket: String, count: Int, asUser user: (uid: UInt32, gid: UInt32)? = nil) throws -> ConnectionHolder {
        let argv = ["/usr/bin/python3", "-c", script, socket, String(count)]
        let full = user.map { TestUser.asUser($0.uid, $0.gid, argv) } ?? argv
        let p = Process()
        p.executableURL = URL(fileURLWithPath: full[0])
        p.arguments = Array(full.dropFirst())
        let input = Pipe(), output = Pipe()
        p.standardInput = input
        p.standardOutput = output
        try p.run()
        var line = Data()
        while !line.contains(0x0A) {
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line += chunk
        }
        let words = String(decoding: line, as: UTF8.self).split(whereSeparator: \.isWhitespace).map(String.init)
        return ConnectionHolder(results: words, process: p, input: input)
    }

    /// Closes the connections (ends the python process).
    func release() {
        try? input.fileHandleForWriting.close()
        if process.isRunning { process.waitUntilExit() }
    }
}
