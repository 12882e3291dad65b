import ArgumentParser
import UprobedProtocol

extension UprobeCtl {
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Register probes; prints one row per attached probe.",
            discussion: """
                Probes come from the arguments and from -f FILE (one spelling per line; blank \
                lines and # comments are skipped; -f - reads stdin). Up to \(requestChunk) spellings \
                go in one request, which is atomic: all of its probes attach or none do. A longer \
                list is sent as several requests; if one is refused, the probes of the earlier \
                ones stay registered and the error says which.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Probes to register (see PROBE spellings in uprobectl --help).")
        var probes: [String] = []

        @Option(name: [.customShort("f"), .customLong("file")],
                help: ArgumentHelp("Read probe spellings from this file, one per line ('-': stdin).", valueName: "file"),
                completion: .file())
        var file: String?

        @Option(name: .long, help: "Count only hits in this process.")
        var pid: Int32?

        @Flag(name: .long, help: "Count function returns instead of entries.")
        var retprobe = false

        @Flag(name: .long, help: "Allow an offset that is not a function start, or a return probe on a Go binary.")
        var force = false

        @Option(name: .long, help: "Consumer name to group these probes (unregister them together with rm --consumer).")
        var consumer: String?

        func validate() throws {
            if probes.isEmpty && file == nil { throw ValidationError("give probes to register, or -f FILE (-f - for stdin)") }
        }

        func run() throws {
            var spellings = probes
            if let file { spellings += try readItems(from: file) }
            guard !spellings.isEmpty else { throw CtlError.usage("no probe spellings in \(file ?? "the arguments")") }
            let specs = try parseSpecs(spellings, pid: pid, retprobe: retprobe, force: force)
            let daemon = try global.connect()
            var rows: [[String]] = []
            var registered: [String] = []
            for (n, chunk) in chunked(specs, requestChunk).enumerated() {
                let req = Request.register(probes: Array(chunk), consumer: consumer).json()
                let reply: JSONObject
                do { reply = try daemon.call(req) } catch {
                    guard n > 0 else { throw error }
                    let first = chunk.startIndex
                    var e = error
                    e.message += " (request \(n + 1): spellings \(first + 1)–\(chunk.endIndex); the \(registered.count) probes "
                        + "of the earlier requests stay registered: \(registered.first ?? "")…\(registered.last ?? ""))"
                    throw e
                }
                if !global.json { reportSkipped(reply) }
                // A large glob's reply is compact (README, "Compact register replies"): one row
                // per file and id range; `uprobectl list --path` shows each probe.
                for f in reply["files"]?.arrayValue ?? [] {
                    let o = f.objectValue ?? JSONObject()
                    for r in o["ids"]?.arrayValue ?? [] {
                        let first = text(r.objectValue?["first"]), last = text(r.objectValue?["last"])
                        registered += [first, last]
                        rows.append([first == last ? first : "\(first)…\(last)", text(o["path"]), "-",
                                     "(\(text(o["count"])) probes in this file)"])
                    }
                }
                for w in reply["warnings"]?.arrayValue ?? [] {
                    Stderr.warning("\(text(w.objectValue?["id"])): \(text(w.objectValue?["warning"]))")
                }
                for p in reply["probes"]?.arrayValue ?? [] {
                    let o = p.objectValue ?? JSONObject()
                    var sym = text(o["symbol"])
                    if let w = o["warning"]?.stringValue { Stderr.warning(w) }
                    if let sites = o["sites"]?.arrayValue { sym += " (\(sites.count) sites)" }
                    if let id = o["id"]?.stringValue { registered.append(id) }
                    rows.append([text(o["id"]), text(o["path"]), hex(o["offset"]), sym])
                }
            }
            if !global.json { printTable(["ID", "PATH", "OFFSET", "SYMBOL"], rows) }
        }
    }
}
