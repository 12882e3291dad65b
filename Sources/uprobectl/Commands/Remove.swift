import ArgumentParser
import UprobedProtocol

extension UprobeCtl {
    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Unregister probes: by id, by consumer, all of them, or those matching a glob.",
            discussion: """
                Select the probes one way: ids (arguments, or -f FILE / -f - with one id per \
                line), --consumer NAME, --all, --path PATH and/or --symbol GLOB, or --match GLOB \
                (each of the last three may be narrowed by --consumer). Prints how many were \
                removed.

                --consumer alone, --all, --path and --symbol are one request, selected and removed \
                atomically by the daemon (241,000 probes of a whole binary in one small request); \
                a non-admin's --all, --path or --symbol removes only its own probes. Ids and \
                --match (which also matches demangled names, known only here) are sent as \
                requests of up to \(requestChunk) ids each: each request is atomic, the whole \
                removal is not (a refusal stops it and the count says how far it got). A probe \
                removed by someone else meanwhile is skipped. A non-admin may remove only its \
                own probes: a request holding anyone else's is refused.
                """)

        @OptionGroup var global: GlobalOptions

        @Argument(help: "Probe ids.")
        var ids: [String] = []

        @Option(name: [.customShort("f"), .customLong("file")],
                help: ArgumentHelp("Read probe ids from this file, one per line ('-': stdin).", valueName: "file"),
                completion: .file())
        var file: String?

        @Option(name: .long, help: "Remove the probes of this consumer (with --match/--path: only those among them).")
        var consumer: String?

        @Flag(name: .long, help: "Remove every probe.")
        var all = false

        @Option(name: .long, help: ArgumentHelp("Remove probes whose symbol (raw or demangled) or path matches this shell glob.",
                                                valueName: "glob"))
        var match: String?

        @Option(name: .long, help: ArgumentHelp("Remove probes in this binary: full path, file name, or glob.", valueName: "path"))
        var path: String?

        @Option(name: .long, help: ArgumentHelp("Remove probes whose raw symbol matches this shell glob (selected by the daemon).",
                                                valueName: "glob"))
        var symbol: String?

        @Flag(name: .long, help: "Print how many probes would be removed, and remove none.")
        var dryRun = false

        func validate() throws {
            let byID = !ids.isEmpty || file != nil
            let byFilter = match != nil || path != nil || symbol != nil
            let ways = (byID ? 1 : 0) + (all ? 1 : 0) + (byFilter ? 1 : 0) + (consumer != nil && !byFilter ? 1 : 0)
            guard ways == 1 else {
                throw ValidationError("select probes one way: ids (or -f FILE), --consumer NAME, --all, or --match GLOB/--path PATH/--symbol GLOB")
            }
            if all && consumer != nil { throw ValidationError("--all removes every probe; for one consumer's use --consumer alone") }
            if match != nil && symbol != nil { throw ValidationError("give --match or --symbol, not both") }
        }

        func run() throws {
            let daemon = try global.connect()
            if let consumer, match == nil, path == nil, symbol == nil {
                // One request: the daemon selects the consumer's probes atomically.
                let reply = try daemon.quietCall(Request.unregister(ids: nil, consumer: consumer).json())
                report(removed: reply["removed"]?.int64Value ?? 0, requests: 1, warning: reply["warning"]?.stringValue)
                return
            }
            if match == nil, all || path != nil || symbol != nil {
                // One request: the daemon selects by path and symbol (--all: every path).
                let glob = ProbeMatch(path: path ?? (symbol == nil ? "*" : nil), symbol: symbol)
                if dryRun {
                    let total = try daemon.list(consumer: consumer, query: ListQuery(match: glob, limit: 0)).total
                    printWouldRemove(total)
                    return
                }
                let reply = try daemon.quietCall(Request.unregister(ids: nil, consumer: consumer, match: glob).json())
                let removed = reply["removed"]?.int64Value ?? 0
                if let left = reply["left_in_sets"]?.objectValue, left.count > 0 {
                    let n = left.pairs.reduce(Int64(0)) { $0 + ($1.value.int64Value ?? 0) }
                    Stderr.write("uprobectl: leaving \(n) probe(s) of probe sets alone (\(left.keys.sorted().joined(separator: ", "))); change a set through its file or uprobectl apply\n")
                }
                report(removed: removed, requests: 1, warning: reply["warning"]?.stringValue, nothing: removed == 0)
                return
            }
            var selected = ids
            if let file { selected += try readItems(from: file) }
            let selecting = all || match != nil || path != nil
            if selecting {
                let catalog = Catalog(consumer: consumer)
                try catalog.refresh(daemon)
                let filter = ProbeFilter(consumer: consumer, path: path, match: match)
                let matching = catalog.probes.values
                    .filter { filter.matches(catalog.row(ProbeCount(id: $0.id, hits: 0, rate: 0), rate: nil)) }
                // A probe set's probes are changed through the set (its file, or apply): left out.
                let inSets = matching.filter { $0.probeSet != nil }
                if !inSets.isEmpty {
                    let names = Set(inSets.compactMap(\.probeSet)).sorted().joined(separator: ", ")
                    Stderr.write("uprobectl: leaving \(inSets.count) probe(s) of probe sets alone (\(names)); change a set through its file or uprobectl apply\n")
                }
                selected = matching.filter { $0.probeSet == nil }
                    .map { catalog.row(ProbeCount(id: $0.id, hits: 0, rate: 0), rate: nil) }
                    .sorted { $0.idNumber < $1.idNumber }
                    .map(\.id)
            }
            if dryRun {
                printWouldRemove(selected.count)
                return
            }
            var removed: Int64 = 0
            var requests = 0
            var warning: String? = nil
            for chunk in chunked(selected, requestChunk) {
                var ids = Array(chunk)
                var reply = try daemon.send(Request.unregister(ids: ids, consumer: nil).json())
                if selecting, ReplyError(reply: reply)?.code == ErrorCode.probeNotFound.rawValue {
                    // Someone removed some of these meanwhile: keep those still registered, once.
                    let present = Set(try daemon.list().map(\.id))
                    ids = ids.filter(present.contains)
                    if ids.isEmpty { continue }
                    reply = try daemon.send(Request.unregister(ids: ids, consumer: nil).json())
                }
                requests += 1
                if let e = ReplyError(reply: reply) {
                    let done = removed > 0 ? " (\(removed) removed by the \(requests - 1) earlier requests)" : ""
                    if global.json { print(JSONSerializer.serialize(.object(reply))) }
                    throw CtlError.refused(e.description + done)
                }
                removed += reply["removed"]?.int64Value ?? 0
                warning = reply["warning"]?.stringValue ?? warning
            }
            report(removed: removed, requests: requests, warning: warning, nothing: selected.isEmpty && selecting)
        }

        private func printWouldRemove(_ n: Int) {
            if global.json { print(JSONSerializer.serialize(.object(["ok": true, "would_remove": .int(Int64(n))]))) }
            else { print("would remove \(n)") }
        }

        private func report(removed: Int64, requests: Int, warning: String?, nothing: Bool = false) {
            if global.json {
                var o: JSONObject = ["ok": true, "removed": .int(removed), "requests": .int(Int64(requests))]
                if let warning { o["warning"] = .string(warning) }
                print(JSONSerializer.serialize(.object(o)))
            } else {
                print(nothing ? "removed 0 (no probe matched)" : "removed \(removed)")
            }
            if let warning { Stderr.warning(warning) }
        }
    }
}
