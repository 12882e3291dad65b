import ArgumentParser
import UprobedProtocol

extension UprobeCtl {
    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls", abstract: "List registered probes with their specs (symbols as registered, not demangled).")

        @OptionGroup var global: GlobalOptions

        @Option(name: .long, help: "Only this consumer's probes.")
        var consumer: String?

        func run() throws {
            let reply = try global.call(Request.list(consumer: consumer).json())
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

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the daemon's version, uptime, counts and batching counters.")

        @OptionGroup var global: GlobalOptions

        func run() throws {
            let reply = try global.call(Request.status.json())
            guard !global.json else { return }
            for member in reply.pairs where member.key != "ok" && member.key != "id" {
                let (k, v) = (member.key, member.value)
                if k == "probe_sets", let o = v.objectValue {
                    printProbeSets(o)
                } else if let o = v.objectValue {
                    print("\(k):")
                    for m in o.pairs { print("  \(m.key): \(text(m.value))") }
                } else {
                    print("\(k): \(text(v))")
                }
            }
        }
    }

    /// One line per set: where it comes from, its probes, and why its last reconcile was refused.
    private static func printProbeSets(_ o: JSONObject) {
        print("probe_sets:")
        print("  reconciles: \(text(o["reconciles"]))")
        for s in o["sets"]?.arrayValue ?? [] {
            let e = s.objectValue ?? JSONObject()
            var line = "  \(text(e["set"])): \(text(e["source"]))"
            if let file = e["file"]?.stringValue { line += " \(file)" }
            line += ", \(text(e["probes"])) probes, \(text(e["state"]))"
            if let err = e["error"]?.objectValue {
                line += (err["line"].map { " at line \(text($0))" } ?? "") + ": \(text(err["message"])) [\(text(err["code"]))]"
            }
            print(line)
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
            let specs = try parseSpecs(probes, pid: pid)
            let reply = try global.call(Request.resolve(probes: specs).json())
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
