import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Whether tests must run against the kernel (CI sets UPROBED_REQUIRE_KERNEL=1): then a missing
/// kernel feature is a failure, never a skip.
enum Kernel {
    static let required = ProcessInfo.processInfo.environment["UPROBED_REQUIRE_KERNEL"].map { !$0.isEmpty && $0 != "0" } ?? false

    /// A cheap look for uprobe support: root, the uprobe PMU, and Linux >= 6.6 (uprobe_multi).
    static let looksSupported: Bool = {
        guard getuid() == 0, FileManager.default.fileExists(atPath: "/sys/bus/event_source/devices/uprobe/type") else { return false }
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        let parts = release.split(separator: ".").prefix(2).compactMap { Int($0.prefix(while: \.isNumber)) }
        guard parts.count == 2 else { return false }
        return parts[0] > 6 || (parts[0] == 6 && parts[1] >= 6)
    }()

    /// Tests that need the kernel run when it looks supported, and always when required.
    static var enabled: Bool { required || looksSupported }
}

enum Paths {
    /// The repository root (this file is Tests/IntegrationTests/Support.swift).
    static let repo: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// A built executable of this package (`swift build --build-tests` builds them).
    static func product(_ name: String) throws -> String {
        // UPROBED_BIN: another build of the daemon (e.g. an older one, to see a test fail on it).
        if name == "uprobed", let other = ProcessInfo.processInfo.environment["UPROBED_BIN"], !other.isEmpty { return other }
        var candidates: [URL] = []
        if let exe = CommandLine.arguments.first {
            candidates.append(URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent(name))
        }
        candidates.append(repo.appendingPathComponent(".build/debug/\(name)"))
        for c in candidates where FileManager.default.isExecutableFile(atPath: c.path) { return c.path }
        throw TestFailure("\(name) is not built; run `swift build --build-tests` first (looked in \(candidates.map(\.path)))")
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Runs a command and returns (exit status, stdout, stderr).
@discardableResult
func run(_ argv: [String], stdin: String? = nil, environment: [String: String]? = nil) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: argv[0])
    p.arguments = Array(argv.dropFirst())
    if let environment { p.environment = environment }
    let out = Pipe(), err = Pipe(), inp = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = inp
    try p.run()
    if let stdin { inp.fileHandleForWriting.write(Data(stdin.utf8)) }
    try? inp.fileHandleForWriting.close()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

/// C fixtures compiled once per test process into a private temp dir.
enum Fixtures {
    private static let dir: String = {
        let d = NSTemporaryDirectory() + "uprobed-fixtures-\(getpid())"
        try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }()
    private static let lock = NSLock()
    nonisolated(unsafe) private static var built: [String: String] = [:]

    /// Compiles `Tests/Fixtures/<relative>` (or `source` text) with gcc; returns the binary path.
    static func build(_ name: String, relative: String? = nil, source: String? = nil, flags: [String] = []) throws -> String {
        lock.lock()
        defer { lock.unlock() }
        let key = name + flags.joined(separator: " ")
        if let b = built[key] { return b }
        let src: String
        if let relative { src = Paths.repo.appendingPathComponent("Tests/Fixtures/\(relative)").path } else {
            src = dir + "/\(name).c"
            try (source ?? "").write(toFile: src, atomically: true, encoding: .utf8)
        }
        let bin = dir + "/\(name)"
        let r = try run(["/usr/bin/gcc", "-O1", "-g", "-fno-inline", "-o", bin, src] + flags)
        guard r.status == 0 else { throw TestFailure("gcc failed for \(name): \(r.err)") }
        built[key] = bin
        return bin
    }

    static var target: String { get throws { try build("target", relative: "target/target.c") } }
}

/// A uprobed started for one test: its own socket and state dir, stopped and cleaned up at the end.
final class TestDaemon: DaemonClient, @unchecked Sendable {
    // @unchecked: the Process is only touched from the owning test.
    let dir: String
    let socket: String
    let stateDir: String
    let process: Process
    /// The daemon's stderr goes to a file: a pipe nobody drains would fill and block it.
    let logPath: String
    /// Its pin directory, removed at the end (see `removePins`).
    let pinDir: String
    private var stopped = false

    /// `launcher`: a command that execs the daemon in its own place (the same pid), e.g.
    /// `["/usr/bin/prlimit", "--nofile=256:8192"]`.
    init(config: String? = nil, extraArgs: [String] = [], environment: [String: String] = [:], launcher: [String] = []) throws {
        let template = NSTemporaryDirectory() + "uprobed-test-XXXXXX"
        var buf = Array(template.utf8CString)
        guard mkdtemp(&buf) != nil else { throw TestFailure("mkdtemp failed") }
        dir = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        StaleTestPins.markOwner(dir)
        _ = StaleTestPins.sweptOnce
        socket = dir + "/uprobed.sock"
        stateDir = dir + "/state"
        logPath = dir + "/uprobed.log"
        pinDir = testPinDir(for: dir)
        // A probes directory of its own (absent unless a test makes it): never the host's.
        var args = ["--socket", socket, "--state-dir", stateDir, "--log-level", "debug", "--probes-dir", dir + "/probes.d"]
        if !extraArgs.contains("--pin-dir") { args += ["--pin-dir", pinDir] }
        if let config {
            let path = dir + "/uprobed.conf"
            try config.write(toFile: path, atomically: true, encoding: .utf8)
            args += ["--config", path]
        } else {
            args += ["--config", dir + "/none.conf"]
            try "".write(toFile: dir + "/none.conf", atomically: true, encoding: .utf8)
        }
        process = Process()
        let daemon = try Paths.product("uprobed")
        process.executableURL = URL(fileURLWithPath: launcher.first ?? daemon)
        process.arguments = (launcher.isEmpty ? [] : Array(launcher.dropFirst()) + [daemon]) + args + extraArgs
        var env = ProcessInfo.processInfo.environment
        env.removeValue(forKey: "NOTIFY_SOCKET")
        env.removeValue(forKey: "LISTEN_FDS")
        env.removeValue(forKey: "LISTEN_PID")
        for (k, v) in environment { env[k] = v }
        process.environment = env
        guard FileManager.default.createFile(atPath: logPath, contents: nil) else {
            throw TestFailure("cannot create \(logPath)")
        }
        process.standardError = FileHandle(forWritingAtPath: logPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        try waitUntilServing()
    }

    /// Until the socket accepts; fails at once if the daemon exits first (see
    /// `ServiceDaemon.waitUntilServing` for the deadline).
    private func waitUntilServing() throws {
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline {
            if !process.isRunning {
                let err = log
                throw TestFailure("uprobed exited with \(process.terminationStatus) before serving:\n\(err)")
            }
            if (try? LineClient(socketPath: socket, timeoutSeconds: 2)) != nil { return }
            usleep(20_000)
        }
        throw TestFailure("uprobed did not serve \(socket) within 120 s:\n\(log)")
    }

    /// A private copy of the target fixture (its own inode), so unfiltered probes of parallel
    /// tests never see each other's processes.
    func privateTarget() throws -> String {
        let copy = dir + "/target"
        if !FileManager.default.fileExists(atPath: copy) {
            try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: copy)
        }
        return copy
    }


    /// SIGTERM and wait; returns the exit status.
    @discardableResult
    func stop() -> Int32 {
        if stopped { return process.terminationStatus }
        stopped = true
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        let deadline = Date().addingTimeInterval(20)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        return process.terminationStatus
    }

    var log: String {
        (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
    }

    deinit {
        stop()
        removePins(pinDir)
        try? FileManager.default.removeItem(atPath: dir)
    }
}

func spec(_ path: String, symbol: String? = nil, offset: UInt64? = nil, usdt: String? = nil, pid: Int32? = nil,
          retprobe: Bool = false, follow: Bool = true) -> JSONValue {
    ProbeSpec(path: path, symbol: symbol, offset: offset, usdt: usdt, pid: pid, retprobe: retprobe, follow: follow).json
}

/// Polls `condition` every 20 ms for up to `seconds`; fails with `what` if it never holds.
func waitFor(_ what: String, seconds: Double = 15, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return }
        usleep(20_000)
    }
    throw TestFailure("timed out waiting for: \(what)")
}

func errorCode(_ reply: JSONObject) -> String? { reply["error"]?.objectValue?["code"]?.stringValue }

/// Request helpers shared by the test harnesses that run a daemon (TestDaemon, ServiceDaemon).
protocol DaemonClient {
    var socket: String { get }
}

extension DaemonClient {
    func client() throws -> LineClient { try LineClient(socketPath: socket, timeoutSeconds: 60) }

    /// One request on a fresh connection; returns the reply object.
    func call(_ request: JSONObject) throws -> JSONObject {
        let reply = try client().call(request)
        guard let o = reply.objectValue else { throw TestFailure("reply is not an object: \(reply)") }
        return o
    }

    /// Registers and returns the probe ids; fails the test on error.
    func register(_ specs: [JSONValue], consumer: String? = nil) throws -> [String] {
        var req: JSONObject = ["op": "register", "probes": .array(specs)]
        if let consumer { req["consumer"] = .string(consumer) }
        let r = try call(req)
        guard r["ok"] == .bool(true) else { throw TestFailure("register failed: \(JSONSerializer.serialize(.object(r)))") }
        return (r["probes"]?.arrayValue ?? []).compactMap { $0.objectValue?["id"]?.stringValue }
    }

    /// Hits per probe id (all probes if `ids` is nil).
    func hits(_ ids: [String]? = nil) throws -> [String: UInt64] {
        var req: JSONObject = ["op": "stats"]
        if let ids { req["probes"] = .array(ids.map { .string($0) }) }
        let r = try call(req)
        guard r["ok"] == .bool(true) else { throw TestFailure("stats failed: \(JSONSerializer.serialize(.object(r)))") }
        var out: [String: UInt64] = [:]
        for s in r["stats"]?.arrayValue ?? [] {
            if let o = s.objectValue, let id = o["id"]?.stringValue, let h = o["hits"]?.int64Value { out[id] = UInt64(h) }
        }
        return out
    }

    func status() throws -> JSONObject { try call(["op": "status"]) }

    /// Every registration by id, from `list`.
    func list() throws -> [String: JSONObject] {
        let r = try call(["op": "list"])
        guard r["ok"] == .bool(true) else { throw TestFailure("list failed: \(JSONSerializer.serialize(.object(r)))") }
        var out: [String: JSONObject] = [:]
        for p in r["probes"]?.arrayValue ?? [] {
            if let o = p.objectValue, let id = o["id"]?.stringValue { out[id] = o }
        }
        return out
    }
}
