import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// A daemon for the service-grade tests: unlike TestDaemon it can be restarted on the same
/// state dir, killed with SIGKILL, started through another program (systemd-socket-activate),
/// given a NOTIFY_SOCKET, and its directory is world-searchable so a second uid can connect.
/// Its stderr goes to a file (a pipe could fill up and block the daemon).
final class ServiceDaemon: DaemonClient, @unchecked Sendable {
    // @unchecked: touched only by the owning test.
    let dir: String
    let socket: String
    let stateDir: String
    let configPath: String
    let logPath: String
    /// Where this daemon pins its links (one per test dir, so a restart on the dir adopts them;
    /// removed with the dir by `removeServiceDir`).
    let pinDir: String
    let process: Process
    private var finished = false

    /// A fresh world-searchable (0755) directory for one test; removed by `ServiceDir.remove`.
    static func makeDir() throws -> String {
        let template = NSTemporaryDirectory() + "uprobed-svc-XXXXXX"
        var buf = Array(template.utf8CString)
        guard mkdtemp(&buf) != nil else { throw TestFailure("mkdtemp failed") }
        let dir = String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        chmod(dir, 0o755)
        StaleTestPins.markOwner(dir)
        _ = StaleTestPins.sweptOnce
        return dir
    }

    /// Starts `uprobed` with `dir`'s socket, state dir and config (written from `config`).
    /// `launcher` runs before the daemon's own argv (e.g. systemd-socket-activate -l PATH).
    init(dir: String, config: String = "", extraArgs: [String] = [], environment: [String: String] = [:],
         launcher: [String] = [], socket: String? = nil, waitServing: Bool = true, logName: String = "uprobed") throws {
        self.dir = dir
        self.socket = socket ?? dir + "/uprobed.sock"
        stateDir = dir + "/state"
        configPath = dir + "/uprobed.conf"
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        var n = 0
        var log = dir + "/\(logName).log"
        while FileManager.default.fileExists(atPath: log) { n += 1; log = dir + "/\(logName)-\(n).log" }
        logPath = log
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        pinDir = testPinDir(for: dir)
        let pinArgs = extraArgs.contains("--pin-dir") ? [] : ["--pin-dir", pinDir]
        // A probes directory of its own (absent unless a test makes it), unless the config names one.
        let probes = config.contains("probes_dir") ? [] : ["--probes-dir", dir + "/probes.d"]
        let args = ["--socket", dir + "/uprobed.sock", "--state-dir", stateDir, "--config", configPath, "--log-level", "debug"]
            + pinArgs + probes + extraArgs
        process = Process()
        let exe = try Paths.product("uprobed")
        if launcher.isEmpty {
            process.executableURL = URL(fileURLWithPath: exe)
            process.arguments = args
        } else {
            process.executableURL = URL(fileURLWithPath: launcher[0])
            process.arguments = Array(launcher.dropFirst()) + [exe] + args
        }
        var env = ProcessInfo.processInfo.environment
        for k in ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"] {
            env.removeValue(forKey: k)
        }
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardError = FileHandle(forWritingAtPath: log)
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        if waitServing { try waitUntilServing() }
    }

    /// Until the socket accepts; fails at once if the daemon exits first. The deadline only
    /// bounds a daemon that runs and never serves: a start that adopts pins and attaches again
    /// takes well under a second alone, and far longer on a 2-core machine under a full build.
    func waitUntilServing(seconds: Double = 120) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if !process.isRunning {
                throw TestFailure("uprobed exited with \(process.terminationStatus) before serving:\n\(log)")
            }
            if (try? LineClient(socketPath: socket, timeoutSeconds: 2)) != nil { return }
            usleep(20_000)
        }
        throw TestFailure("uprobed did not serve \(socket) within \(seconds) s:\n\(log)")
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    var pid: Int32 { process.processIdentifier }

    /// Waits for the process to exit (up to `seconds`); its exit status, or nil if still running.
    func waitExit(seconds: Double = 30) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { return nil }
        finished = true
        return process.terminationStatus
    }

    /// SIGTERM and wait; the exit status (SIGKILL after 30 s, reported as a failure by callers).
    @discardableResult
    func stop() -> Int32 {
        if finished { return process.terminationStatus }
        if process.isRunning { kill(pid, SIGTERM) }
        if let s = waitExit() { return s }
        kill(pid, SIGKILL)
        process.waitUntilExit()
        finished = true
        return -1
    }

    /// SIGKILL and reap.
    func kill9() {
        if process.isRunning { kill(pid, SIGKILL) }
        process.waitUntilExit()
        finished = true
    }

    deinit { if !finished { kill9() } }
}

/// Removes a test directory (and everything in it) at the end of a test, and its pins: a pinned
/// link stays attached after its daemon exits until its pin is removed.
func removeServiceDir(_ dir: String) {
    removePins(testPinDir(for: dir))
    try? FileManager.default.removeItem(atPath: dir)
}

/// The pin directory of the daemons of the test dir `dir`.
func testPinDir(for dir: String) -> String {
    "/sys/fs/bpf/uprobed-test/" + (dir as NSString).lastPathComponent
}

/// Removes every pin under `path` (unlink on bpffs; links with no other reference detach).
func removePins(_ path: String) {
    guard path.hasPrefix("/sys/fs/bpf/uprobed-test/") else { return }
    try? FileManager.default.removeItem(atPath: path)
}

/// A second, unprivileged uid for access-control tests: `uprobed-test`, created if missing
/// (a system user without home or login shell; left in place for the next run).
enum TestUser {
    static let name = "uprobed-test"

    static func ensure() throws -> (uid: UInt32, gid: UInt32) {
        if let ids = lookup() { return ids }
        let r = try run(["/usr/sbin/useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        // 9: exists (a parallel test created it first); anything else is a real failure.
        guard r.status == 0 || r.status == 9, let ids = lookup() else {
            throw TestFailure("useradd \(name) failed (\(r.status)): \(r.err)")
        }
        return ids
    }

    static func lookup() -> (uid: UInt32, gid: UInt32)? {
        guard let pw = getpwnam(name) else { return nil }
        return (pw.pointee.pw_uid, pw.pointee.pw_gid)
    }

    /// argv that runs `command` as (uid, gid) with exactly `groups` as supplementary groups.
    static func asUser(_ uid: UInt32, _ gid: UInt32, groups: [UInt32] = [], _ command: [String]) -> [String] {
        let g = groups.isEmpty ? "--clear-groups" : "--groups=" + groups.map(String.init).joined(separator: ",")
        return ["/usr/bin/setpriv", "--reuid=\(uid)", "--regid=\(gid)", g, "--"] + command
    }
}

/// A JSON-lines client run as another uid (python3 from Debian, readable by every user):
/// sends each request on one connection and returns the replies in order.
func callAsUser(uid: UInt32, gid: UInt32, groups: [UInt32] = [], socket: String, _ requests: [JSONObject]) throws -> [JSONObject] {
    let script = """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    for line in sys.stdin.buffer:
        f.write(line.rstrip(b"\\n") + b"\\n"); f.flush()
        sys.stdout.buffer.write(f.readline()); sys.stdout.flush()
    """
    let input = requests.map { JSONSerializer.serialize(.object($0)) }.joined(separator: "\n") + "\n"
    let r = try run(TestUser.asUser(uid, gid, groups: groups, ["/usr/bin/python3", "-c", script, socket]), stdin: input)
    guard r.status == 0 else { throw TestFailure("client as uid \(uid) failed (\(r.status)): \(r.err)") }
    return try r.out.split(separator: "\n").map { line in
        guard let o = try JSONParser.parse(String(line)).objectValue else { throw TestFailure("not an object: \(line)") }
        return o
    }
}

/// A datagram socket standing in for systemd's notify socket: collects every message the
/// daemon sends (sd_notify), and, the moment READY=1 arrives, checks whether the daemon's
/// control socket already accepts connections.
final class NotifyListener: @unchecked Sendable {
    // @unchecked: `messages`/`readyServing` are guarded by `lock`.
    let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var messages: [String] = []
    private var readyServing: [Bool] = []
    private var thread: Thread?
    private var closed = false

    init(path: String, controlSocket: String) throws {
        self.path = path
        let sock = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard sock >= 0 else { throw TestFailure("socket: \(errno)") }
        fd = sock
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() where i < raw.count - 1 { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sock, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { Glibc.close(sock); throw TestFailure("bind \(path): \(errno)") }
        var tv = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let t = Thread { [weak self] in
            var buf = [UInt8](repeating: 0, count: 65536)
            while let me = self, !me.isClosed {
                let n = buf.withUnsafeMutableBytes { recv(sock, $0.baseAddress, $0.count, 0) }
                guard n > 0 else { continue }
                let text = String(decoding: buf[0..<n], as: UTF8.self)
                var serving: Bool? = nil
                if text.split(separator: "\n").contains("READY=1") {
                    serving = (try? LineClient(socketPath: controlSocket, timeoutSeconds: 1)) != nil
                }
                me.lock.lock()
                me.messages.append(text)
                if let serving { me.readyServing.append(serving) }
                me.lock.unlock()
            }
        }
        thread = t
        t.start()
    }

    private var isClosed: Bool { lock.lock(); defer { lock.unlock() }; return closed }

    /// Every datagram so far, in order.
    var all: [String] { lock.lock(); defer { lock.unlock() }; return messages }
    /// For each READY=1: whether the control socket accepted a connection at that moment.
    var servingAtReady: [Bool] { lock.lock(); defer { lock.unlock() }; return readyServing }

    /// Waits until some message has a line equal to `line` (or with that prefix if it ends in '=').
    func wait(for line: String, count: Int = 1, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            let n = all.reduce(0) { acc, m in
                acc + m.split(separator: "\n").filter { line.hasSuffix("=") ? $0.hasPrefix(line) : $0 == line }.count
            }
            if n >= count { return true }
            usleep(10_000)
        }
        return false
    }

    func close() {
        lock.lock()
        closed = true
        lock.unlock()
        Glibc.close(fd)
        unlink(path)
    }
}

/// One HTTP/1.1 GET over a Unix socket or loopback TCP; returns (status line, body).
func httpGet(unixPath: String? = nil, port: UInt16? = nil, path: String) throws -> (status: String, body: String) {
    let fd: Int32
    if let unixPath {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(unixPath.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() where i < raw.count - 1 { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { close(fd); throw TestFailure("connect \(unixPath): errno \(errno)") }
    } else if let port {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw TestFailure("connect 127.0.0.1:\(port): errno \(errno)") }
    } else {
        throw TestFailure("httpGet needs a unix path or a port")
    }
    defer { close(fd) }
    var tv = timeval(tv_sec: 20, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    let req = Array("GET \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".utf8)
    _ = req.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
    var data = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n <= 0 { break }
        data += buf[0..<n]
    }
    let text = String(decoding: data, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n") else { throw TestFailure("no HTTP header end in: \(text.prefix(200))") }
    let status = String(text[..<split.lowerBound].split(separator: "\r\n").first ?? "")
    return (status, String(text[split.upperBound...]))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it, close).
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw TestFailure("no free port: errno \(errno)") }
    return UInt16(bigEndian: addr.sin_port)
}
