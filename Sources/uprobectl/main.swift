import ArgumentParser
import UprobedClient
import UprobedProtocol
#if canImport(Glibc)
import Glibc
#endif

/// `uprobectl` — a thin client of uprobed's JSON-lines socket.
struct UprobeCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uprobectl",
        abstract: "Register, list and read user-space probes owned by uprobed.",
        discussion: """
            PROBE spellings: PATH:SYMBOL, PATH:0xOFFSET, or bpftrace's uprobe:PATH:SYMBOL, \
            uretprobe:PATH:SYMBOL, usdt:PATH:PROVIDER:NAME. PATH may be a library name (libc).
            SYMBOL may be a glob (f*), which registers one probe per matching function.
            The socket is --socket, else $UPROBED_SOCKET, else /run/uprobed/uprobed.sock.
            """,
        version: "0.1.0",
        subcommands: [Add.self, Remove.self, List.self, Stats.self, Watch.self, Status.self, Resolve.self])
}

struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: "uprobed's socket (default: $UPROBED_SOCKET or /run/uprobed/uprobed.sock).")
    var socket: String?

    @Flag(name: .long, help: "Print the daemon's JSON reply instead of a table.")
    var json = false

    var socketPath: String {
        if let socket { return socket }
        if let env = getenv("UPROBED_SOCKET"), env.pointee != 0 { return String(cString: env) }
        return "/run/uprobed/uprobed.sock"
    }

    /// Sends one request and returns the reply object, or exits with the daemon's error.
    func call(_ request: JSONObject) throws -> JSONObject {
        let client: LineClient
        do { client = try LineClient(socketPath: socketPath) } catch { fail(error.message) }
        let reply: JSONValue
        do { reply = try client.call(request) } catch { fail(error.message) }
        guard let obj = reply.objectValue else { fail("unexpected reply: \(JSONSerializer.serialize(reply))") }
        if json { print(JSONSerializer.serialize(reply)) }
        if obj["ok"] != .bool(true) {
            let e = obj["error"]?.objectValue
            let code = e?["code"]?.stringValue ?? "unknown"
            let message = e?["message"]?.stringValue ?? JSONSerializer.serialize(reply)
            if json { throw ExitCode(1) }
            fail("\(message) [\(code)]")
        }
        return obj
    }
}

/// Command-line probe spellings to wire specs; exits with the parse error of the first bad one.
func parseSpecs(_ spellings: [String], pid: Int32?, retprobe: Bool = false, force: Bool = false) -> [JSONValue] {
    spellings.map { text in
        do throws(ProtocolError) {
            var spec = try ProbeSpec(cliSpelling: text)
            spec.path = absolutePath(spec.path)
            if let pid { spec.pid = pid }
            if retprobe { spec.retprobe = true }
            if force { spec.force = true }
            return spec.json
        } catch { fail(error.message) }
    }
}

/// The daemon runs elsewhere: a relative path (one with a '/') is made absolute here.
/// A bare name ("libc") is a library name and stays as it is.
func absolutePath(_ path: String) -> String {
    guard !path.hasPrefix("/"), path.contains("/") else { return path }
    var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buf, buf.count) != nil else { return path }
    let cwd = String(cString: buf)
    return (cwd == "/" ? "" : cwd) + "/" + (path.hasPrefix("./") ? String(path.dropFirst(2)) : path)
}

func fail(_ message: String) -> Never {
    FileHandleStderr.write("uprobectl: error: \(message)\n")
    exit(1)
}

enum FileHandleStderr {
    /// write(2) on fd 2: no shared FILE* state, so it is safe from any context.
    static func write(_ s: String) {
        var bytes = Array(s.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            bytes = bytes.dropFirst(n)
        }
    }
}

/// Left-aligned columns.
func printTable(_ header: [String], _ rows: [[String]]) {
    let all = [header] + rows
    let widths = header.indices.map { i in all.map { $0.count > i ? $0[i].count : 0 }.max() ?? 0 }
    for row in all {
        let cells = row.enumerated().map { i, c in i == row.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
        print(cells.joined(separator: "  "))
    }
}

extension String {
    func padding(toLength n: Int, withPad pad: String, startingAt: Int) -> String {
        count >= n ? self : self + String(repeating: pad, count: n - count)
    }
}

func text(_ v: JSONValue?) -> String {
    switch v {
    case .string(let s)?: return s
    case .int(let i)?: return String(i)
    case .double(let d)?: return String(d)
    case .bool(let b)?: return String(b)
    case nil, .null?: return "-"
    case let other?: return JSONSerializer.serialize(other)
    }
}

func hex(_ v: JSONValue?) -> String {
    guard let i = v?.int64Value else { return "-" }
    return "0x" + String(i, radix: 16)
}

extension UprobeCtl {
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Register probes; prints one id per attached probe.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Probes to register (see PROBE spellings in uprobectl --help).")
        var probes: [String]
        @Option(name: .long, help: "Count only hits in this process.")
        var pid: Int32?
        @Flag(name: .long, help: "Count function returns instead of entries.")
        var retprobe = false
        @Flag(name: .long, help: "Allow an offset that is not a function start, or a return probe on a Go binary.")
        var force = false
        @Option(name: .long, help: "Consumer name to group these probes (unregister them together with rm --consumer).")
        var consumer: String?

        func run() throws {
            let specs = parseSpecs(probes, pid: pid, retprobe: retprobe, force: force)
            var req: JSONObject = ["op": "register", "probes": .array(specs)]
            if let consumer { req["consumer"] = .string(consumer) }
            let reply = try global.call(req)
            guard !global.json else { return }
            let rows = (reply["probes"]?.arrayValue ?? []).map { p -> [String] in
                let o = p.objectValue ?? JSONObject()
                var sym = text(o["symbol"])
                if let w = o["warning"]?.stringValue { FileHandleStderr.write("uprobectl: warning: \(w)\n") }
                if let sites = o["sites"]?.arrayValue { sym += " (\(sites.count) sites)" }
                return [text(o["id"]), text(o["path"]), hex(o["offset"]), sym]
            }
            printTable(["ID", "PATH", "OFFSET", "SYMBOL"], rows)
            reportSkipped(reply)
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Unregister probes by id, or all of one consumer.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Probe ids.")
        var ids: [String] = []
        @Option(name: .long, help: "Remove every probe of this consumer instead.")
        var consumer: String?

        func validate() throws {
            guard ids.isEmpty != (consumer == nil) else { throw ValidationError("give probe ids or --consumer, not both (and not neither)") }
        }

        func run() throws {
            var req: JSONObject = ["op": "unregister"]
            if let consumer { req["consumer"] = .string(consumer) } else { req["probes"] = .array(ids.map { .string($0) }) }
            let reply = try global.call(req)
            if !global.json { print("removed \(text(reply["removed"]))") }
            if let w = reply["warning"]?.stringValue { FileHandleStderr.write("uprobectl: warning: \(w)\n") }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List registered probes.")
        @OptionGroup var global: GlobalOptions
        @Option(name: .long, help: "Only this consumer's probes.")
        var consumer: String?

        func run() throws {
            var req: JSONObject = ["op": "list"]
            if let consumer { req["consumer"] = .string(consumer) }
            let reply = try global.call(req)
            guard !global.json else { return }
            let rows = (reply["probes"]?.arrayValue ?? []).map { p -> [String] in
                let o = p.objectValue ?? JSONObject()
                let spec = o["spec"]?.objectValue ?? JSONObject()
                var kind = spec["retprobe"] == .bool(true) ? "uretprobe" : (spec["usdt"] != nil ? "usdt" : "uprobe")
                if let pid = spec["pid"] { kind += " pid=\(text(pid))" }
                let state = o["state"]?.stringValue.map { "\($0): \(text(o["reason"]))" } ?? "active"
                return [text(o["id"]), kind, text(o["path"]), hex(o["offset"]), text(o["symbol"]), text(o["consumer"]), state]
            }
            printTable(["ID", "KIND", "PATH", "OFFSET", "SYMBOL", "CONSUMER", "STATE"], rows)
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show exact hit counts since each probe was registered.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Probe ids (default: all).")
        var ids: [String] = []
        @Option(name: .long, help: "Only the probes registered under this consumer name (not with ids).")
        var consumer: String?

        func validate() throws {
            if consumer != nil && !ids.isEmpty { throw ValidationError("give probe ids or --consumer, not both") }
        }

        func run() throws {
            var req: JSONObject = ["op": "stats"]
            if !ids.isEmpty { req["probes"] = .array(ids.map { .string($0) }) }
            if let consumer { req["consumer"] = .string(consumer) }
            let reply = try global.call(req)
            guard !global.json else { return }
            let rows = (reply["stats"]?.arrayValue ?? []).map { s -> [String] in
                let o = s.objectValue ?? JSONObject()
                return [text(o["id"]), text(o["hits"]), text(o["rate"]), o["state"]?.stringValue ?? "active"]
            }
            printTable(["ID", "HITS", "RATE/S", "STATE"], rows)
        }
    }

    struct Watch: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stream hit counts every interval until interrupted.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Probe ids (default: all).")
        var ids: [String] = []
        @Option(name: .long, help: "Milliseconds between updates.")
        var interval: Int = 1000

        func run() throws {
            var req: JSONObject = ["op": "watch", "interval_ms": .int(Int64(interval))]
            if !ids.isEmpty { req["probes"] = .array(ids.map { .string($0) }) }
            let client: LineClient
            do { client = try LineClient(socketPath: global.socketPath, timeoutSeconds: max(30, interval / 1000 * 3)) } catch { fail(error.message) }
            do {
                try client.send(.object(req))
                while true {
                    let event = try client.readReply()
                    if global.json { print(JSONSerializer.serialize(event)); continue }
                    guard let o = event.objectValue, o["ok"] == .bool(true) else {
                        fail(text(event.objectValue?["error"]?.objectValue?["message"]))
                    }
                    let rows = (o["stats"]?.arrayValue ?? []).map { s -> [String] in
                        let so = s.objectValue ?? JSONObject()
                        return [text(so["id"]), text(so["hits"]), text(so["rate"])]
                    }
                    printTable(["ID", "HITS", "RATE/S"], rows)
                    print("")
                }
            } catch { fail(error.message) }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the daemon's version, uptime, counts and batching counters.")
        @OptionGroup var global: GlobalOptions

        func run() throws {
            let reply = try global.call(["op": "status"])
            guard !global.json else { return }
            for member in reply.pairs where member.key != "ok" && member.key != "id" {
                let (k, v) = (member.key, member.value)
                if let o = v.objectValue {
                    print("\(k):")
                    for m in o.pairs { print("  \(m.key): \(text(m.value))") }
                } else {
                    print("\(k): \(text(v))")
                }
            }
        }
    }

    struct Resolve: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show what probes would be attached, without attaching them.")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "Probes to resolve.")
        var probes: [String]
        @Option(name: .long, help: "Resolve inside this process's view (its root and mapped libraries).")
        var pid: Int32?

        func run() throws {
            let specs = parseSpecs(probes, pid: pid)
            let reply = try global.call(["op": "resolve", "probes": .array(specs)])
            guard !global.json else { return }
            let rows = (reply["probes"]?.arrayValue ?? []).map { p -> [String] in
                let o = p.objectValue ?? JSONObject()
                return [text(o["path"]), hex(o["offset"]), text(o["symbol"]), text(o["build_id"])]
            }
            printTable(["PATH", "OFFSET", "SYMBOL", "BUILD-ID"], rows)
            reportSkipped(reply)
        }
    }
}

/// The functions a glob left out (their first instruction cannot be probed), on stderr.
func reportSkipped(_ reply: JSONObject) {
    guard let skipped = reply["skipped"]?.arrayValue, !skipped.isEmpty else { return }
    FileHandleStderr.write("uprobectl: skipped \(skipped.count) function(s) whose first instruction cannot be probed:\n")
    for s in skipped {
        let o = s.objectValue ?? JSONObject()
        FileHandleStderr.write("  \(text(o["symbol"])) \(hex(o["offset"])): \(text(o["reason"]))\n")
    }
}

UprobeCtl.main()
