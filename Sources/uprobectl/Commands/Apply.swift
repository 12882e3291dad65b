import ArgumentParser
import UprobedProbeSets
import UprobedProtocol

/// The set file `apply` and `diff` read, and the set's name.
struct SetFileOptions: ParsableArguments {
    @Option(name: [.customShort("f"), .customLong("file")],
            help: ArgumentHelp("The probe-set file (YAML, as in probes_dir; '-': stdin).", valueName: "file"),
            completion: .file(extensions: ["yaml", "yml"]))
    var file: String

    @Option(name: .long, help: ArgumentHelp("The set's name (default: the file's name without .yaml/.yml).", valueName: "name"))
    var name: String?

    /// The set, parsed here (the daemon gets its specs), or a usage error naming file and line.
    func load() throws(CtlError) -> ProbeSetFile {
        let base = String(file.split(separator: "/").last ?? Substring(file))
        guard let set = name ?? ProbeSetFile.setName(fileName: base) else {
            throw .usage(file == "-" ? "a set read from stdin needs --name NAME"
                                     : "\(file) is not NAME.yaml or NAME.yml: name the set with --name NAME")
        }
        let bytes = try readAll(from: file)
        guard let text = String(validating: bytes, as: UTF8.self) else { throw .usage("\(file): not UTF-8 text") }
        do { return try ProbeSetFile.parse(text, name: set) } catch {
            throw .usage(located(error.line, error.message))
        }
    }

    /// `FILE:LINE: message` (or `FILE: message`).
    func located(_ line: Int?, _ message: String) -> String {
        "\(file == "-" ? "<stdin>" : file)\(line.map { ":\($0)" } ?? ""): \(message)"
    }
}

extension UprobeCtl {
    struct Apply: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a probe set hold exactly the probes of a set file; prints what changed.",
            discussion: """
                The file is a probe set as in probes_dir (docs/PROBE-SETS.md). Probes the set \
                holds and the file still lists keep their ids and counts; new ones are registered \
                (all or none: if one fails, nothing changes), and those no longer listed are \
                removed. An empty set (probes: []) removes the set. The set is the applier's: \
                only that uid or an admin may change it, and a set name that has a file in \
                probes_dir is refused (set_conflict).
                """)

        @OptionGroup var global: GlobalOptions
        @OptionGroup var set: SetFileOptions

        func run() throws {
            let file = try set.load()
            let reply = try sendApply(file, dryRun: false, global: global, options: set)
            if global.json { return }
            printChanges(reply, file: file, dryRun: false)
        }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show what apply -f FILE would change, and change nothing.",
            discussion: """
                One line per probe spelling: '+' would be registered (with how many probes it \
                makes), '-' would be removed (with its ids). The daemon resolves the new ones, so \
                a probe that apply would refuse is refused here too. Exit status 0: no \
                difference; 4: differences (see EXIT STATUS in uprobectl --help).
                """)

        @OptionGroup var global: GlobalOptions
        @OptionGroup var set: SetFileOptions

        func run() throws {
            let file = try set.load()
            let reply = try sendApply(file, dryRun: true, global: global, options: set)
            let changed = !(reply["added"]?.arrayValue ?? []).isEmpty || !(reply["removed"]?.arrayValue ?? []).isEmpty
            if !global.json { printChanges(reply, file: file, dryRun: true) }
            if changed { throw CtlError(message: "", status: ExitStatus.differs) }
        }
    }
}

/// Sends the set; a refusal naming a probe is reported at its line of the file.
private func sendApply(_ file: ProbeSetFile, dryRun: Bool, global: GlobalOptions, options: SetFileOptions) throws(CtlError) -> JSONObject {
    let daemon = try global.connect()
    let reply = try daemon.send(Request.apply(set: file.name, probes: file.specs, dryRun: dryRun).json())
    if global.json { print(JSONSerializer.serialize(.object(reply))) }
    if let e = ReplyError(reply: reply) {
        if global.json { throw CtlError(message: "", status: ExitStatus.refused) }
        let line = e.probe.flatMap { file.line(of: $0) }
        throw .refused(options.located(line, line == nil ? e.description : ProbeSetError.withoutIndex(e.description)))
    }
    if let w = reply["warning"]?.stringValue { Stderr.warning(w) }
    return reply
}

/// kubectl-like lines: `+ spelling  (N probes)` / `- spelling  (ids)`, then a summary.
private func printChanges(_ reply: JSONObject, file: ProbeSetFile, dryRun: Bool) {
    let added = reply["added"]?.arrayValue ?? []
    let removed = reply["removed"]?.arrayValue ?? []
    var rows: [[String]] = []
    var addedProbes: Int64 = 0, removedProbes = 0
    for a in added {
        let o = a.objectValue ?? JSONObject()
        let spec = o["spec"].flatMap { try? ProbeSpec(json: $0, context: "spec") }
        let count = o["count"]?.int64Value ?? 0
        addedProbes += count
        let ids = o["ids"]?.arrayValue?.compactMap(\.stringValue) ?? []
        let what = dryRun ? "\(count) probe\(count == 1 ? "" : "s")" : idList(ids)
        rows.append(["+", spec?.spelling ?? "?", what])
    }
    for r in removed {
        let o = r.objectValue ?? JSONObject()
        let spec = o["spec"].flatMap { try? ProbeSpec(json: $0, context: "spec") }
        let ids = o["ids"]?.arrayValue?.compactMap(\.stringValue) ?? []
        removedProbes += ids.count
        rows.append(["-", spec?.spelling ?? "?", idList(ids)])
    }
    var t = Table([Table.Column(title: ""), Table.Column(title: "PROBE"), Table.Column(title: dryRun ? "PROBES" : "IDS")])
    t.rows = rows
    for line in t.render(header: false) { print(line) }
    let unchanged = reply["unchanged"]?.int64Value ?? 0
    func probes(_ n: Int64) -> String { n == 1 ? "1 probe" : "\(n) probes" }
    func lines(_ n: Int) -> String { n == 1 ? "1 line" : "\(n) lines" }
    let (add, remove) = dryRun ? ("would add", "would remove") : ("added", "removed")
    print("set \(file.name): \(add) \(probes(addedProbes)) (\(lines(added.count))), \(remove) \(probes(Int64(removedProbes))) "
          + "(\(lines(removed.count))), \(lines(Int(unchanged))) unchanged")
    reportSkipped(reply)
}

/// Ids of one line: all of a few, the first and last of many (a glob line can hold thousands;
/// `--json` has them all).
func idList(_ ids: [String]) -> String {
    guard ids.count > 4, let first = ids.first, let last = ids.last else { return ids.joined(separator: " ") }
    return "\(first) … \(last) (\(ids.count) ids)"
}
