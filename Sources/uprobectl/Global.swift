import ArgumentParser
import UprobedClient
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Options every command takes. The root command and each subcommand declare this group, so
/// `uprobectl --socket S stats` and `uprobectl stats --socket S` both work (ArgumentParser
/// parses the root's options from the whole command line, and the subcommand sees the same
/// values) and each subcommand's `--help` still lists them.
struct GlobalOptions: ParsableArguments {
    static let defaultSocket = "/run/uprobed/uprobed.sock"

    @Option(name: .long, help: ArgumentHelp("uprobed's socket (default: $UPROBED_SOCKET, else \(GlobalOptions.defaultSocket)).",
                                            valueName: "path"),
            completion: .file())
    var socket: String?

    @Flag(name: .long, help: "Print JSON instead of a table (see each command's help for its shape).")
    var json = false

    /// The socket to use, and where that choice came from (for error messages).
    var socketChoice: (path: String, source: String) {
        if let socket { return (socket, "--socket") }
        if let env = getenv("UPROBED_SOCKET"), env.pointee != 0 { return (String(cString: env), "$UPROBED_SOCKET") }
        return (Self.defaultSocket, "the default")
    }

    var socketPath: String { socketChoice.path }

    /// Connects, or fails with an error that says what to do (exit status 3).
    func connect(timeoutSeconds: Int = 60) throws(CtlError) -> Daemon {
        let (path, source) = socketChoice
        do {
            return Daemon(client: try LineClient(socketPath: path, timeoutSeconds: timeoutSeconds), printsJSON: json)
        } catch {
            throw Self.unreachable(error, path: path, source: source)
        }
    }

    /// One request on a fresh connection; `--json` prints the daemon's reply as it came.
    func call(_ request: JSONObject) throws(CtlError) -> JSONObject {
        try connect().call(request)
    }

    /// Why connect(2) failed, in terms of what the user can do about it.
    static func unreachable(_ error: ClientError, path: String, source: String) -> CtlError {
        let tried = "\(path) (from \(source))"
        let start = "Start it with `systemctl start uprobed.socket` (or run `uprobed --socket \(path)` as root), "
            + "or point --socket or $UPROBED_SOCKET at the socket it serves."
        switch error.connectErrno {
        case ENOENT?:
            return .unreachable("no socket at \(tried): is uprobed running? \(start)")
        case ECONNREFUSED?:
            return .unreachable("nothing listens on \(tried): is uprobed running? (the socket file is left over from a daemon that stopped) \(start)")
        case EACCES?, EPERM?:
            return .unreachable("permission denied on \(tried): " + permissionAdvice(path))
        default:
            return .unreachable(error.message)
        }
    }

    /// Which file blocks the user and how to get in: the socket's group (the shipped unit
    /// creates it 0660 root:uprobed) or a directory on the way.
    static func permissionAdvice(_ path: String) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else {
            let dir = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
            return "the directory \(dir.isEmpty ? "/" : dir) is not searchable for you; run uprobectl as root or ask for access to it."
        }
        let group = groupName(st.st_gid)
        let mode = String(st.st_mode & 0o777, radix: 8)
        guard st.st_gid != 0 else {
            // Joining group root is not advice anyone should follow.
            return "the socket is mode 0\(mode), group root: run uprobectl as root, or give the socket a group of "
                + "its own (the shipped uprobed.socket uses SocketGroup=uprobed) and join that group."
        }
        let user = getpwuid(getuid()).flatMap { $0.pointee.pw_name.map { String(cString: $0) } } ?? "$USER"
        return "the socket is mode 0\(mode), group \(group). Join that group (`sudo usermod -aG \(group) \(user)`, "
            + "then log in again or run `newgrp \(group)`), or run uprobectl as root."
    }

    static func groupName(_ gid: gid_t) -> String {
        guard let g = getgrgid(gid), let name = g.pointee.gr_name else { return String(gid) }
        return String(cString: name)
    }
}

/// One connection to the daemon, used for one or many requests.
final class Daemon {
    let client: LineClient
    /// `--json`: `call` prints each reply as it came.
    let printsJSON: Bool

    init(client: LineClient, printsJSON: Bool) {
        self.client = client
        self.printsJSON = printsJSON
    }

    var socketPath: String { client.socketPath }

    /// Sends a request and returns the reply object, whatever its `ok`.
    func send(_ request: JSONObject) throws(CtlError) -> JSONObject {
        let reply: JSONValue
        do { reply = try client.call(request) } catch { throw .unreachable(error.message) }
        guard let obj = reply.objectValue else {
            throw .unreachable("unexpected reply from uprobed: \(JSONSerializer.serialize(reply))")
        }
        return obj
    }

    /// Sends a request; a refusal becomes a `CtlError` (exit status 1) with the daemon's message
    /// and code. With `--json` the reply is printed as it came, refusals included.
    func call(_ request: JSONObject) throws(CtlError) -> JSONObject {
        let obj = try send(request)
        if printsJSON { print(JSONSerializer.serialize(.object(obj))) }
        if let e = ReplyError(reply: obj) {
            // With --json the reply on stdout already says it all; stderr stays quiet.
            if printsJSON { throw CtlError(message: "", status: ExitStatus.refused) }
            throw .refused(e.description)
        }
        return obj
    }

    /// Like `call` without printing: for commands that build their own output from several replies.
    func quietCall(_ request: JSONObject) throws(CtlError) -> JSONObject {
        let obj = try send(request)
        if let e = ReplyError(reply: obj) { throw .refused(e.description) }
        return obj
    }

    func list(consumer: String? = nil) throws(CtlError) -> [ListedProbe] {
        let reply = try quietCall(Request.list(consumer: consumer).json())
        do { return try ListedProbe.fromList(reply) } catch { throw .refused(error.description) }
    }

    func stats(ids: [String]? = nil, consumer: String? = nil) throws(CtlError) -> [ProbeCount] {
        let reply = try quietCall(Request.stats(ids: ids, versions: false, consumer: consumer).json())
        do { return try ProbeCount.fromStats(reply) } catch { throw .refused(error.description) }
    }

    /// `stats` filtered, sorted and cut by the daemon; `total`: how many matched before the cut.
    func stats(consumer: String?, query: StatsQuery) throws(CtlError) -> (counts: [ProbeCount], total: Int) {
        let reply = try quietCall(Request.stats(ids: nil, versions: false, consumer: consumer, query: query).json())
        do {
            let counts = try ProbeCount.fromStats(reply)
            return (counts, reply["total"]?.int64Value.map { Int($0) } ?? counts.count)
        } catch { throw .refused(error.description) }
    }

    /// `list` filtered and paged by the daemon; `total`: how many matched before paging.
    func list(consumer: String?, query: ListQuery) throws(CtlError) -> (probes: [ListedProbe], total: Int) {
        let reply = try quietCall(Request.list(consumer: consumer, query: query).json())
        do {
            let probes = try ListedProbe.fromList(reply)
            return (probes, reply["total"]?.int64Value.map { Int($0) } ?? probes.count)
        } catch { throw .refused(error.description) }
    }

    func status() throws(CtlError) -> DaemonStatus {
        let reply = try quietCall(Request.status.json())
        do { return try DaemonStatus(reply: reply) } catch { throw .refused(error.description) }
    }
}
