import UprobedProtocol
import Yams

/// One probe-set file: a YAML document that lists probes in the spellings `uprobectl add` takes.
/// The daemon reads them from `probes_dir` (at start and on SIGHUP), `uprobectl apply -f` and
/// `diff -f` read one; both go through `ProbeSetFile.parse`, so a file means the same to both.
///
/// ```yaml
/// # /etc/uprobed/probes.d/alloc.yaml: the set "alloc" (the file's name is its consumer)
/// probes:
///   - libc:malloc                          # a spelling, as for `uprobectl add`
///   - uretprobe:libc:free
///   - probe: /usr/sbin/nginx:ngx_http_*    # or a mapping with options
///     follow: false
/// ```
///
/// A set names binaries, not processes: there is no `pid` (a pid-filtered probe is registered
/// through the API by the process's owner).
public struct ProbeSetFile: Sendable, Equatable {
    /// The set's name: the file's name without `.yaml`/`.yml`. It is also the consumer of its probes.
    public var name: String
    public var entries: [Entry]

    /// One probe of the set, with the line it is on (for errors).
    public struct Entry: Sendable, Equatable {
        public var spec: ProbeSpec
        public var line: Int
        public init(spec: ProbeSpec, line: Int) {
            self.spec = spec
            self.line = line
        }
    }

    public init(name: String, entries: [Entry]) {
        self.name = name
        self.entries = entries
    }

    public var specs: [ProbeSpec] { entries.map(\.spec) }

    /// The line of the entry that made `spec`, if any.
    public func line(of index: Int) -> Int? { entries.indices.contains(index) ? entries[index].line : nil }

    /// File name endings that make a file in `probes_dir` a probe set; other files are ignored.
    public static let extensions = [".yaml", ".yml"]

    /// Largest file read (a ConfigMap holds at most 1 MiB in all).
    public static let maxBytes = 1 << 20

    /// Keys an entry written as a mapping may have (the options of a wire spec that a set may
    /// carry; `pid` is refused with its own reason).
    static let entryKeys = ["probe", "follow", "force", "latency"]

    /// The set name of a file in the probes directory, nil if the file is not a probe set (no
    /// `.yaml`/`.yml` ending, or hidden: Kubernetes' `..data` and editors' `.swp` files).
    public static func setName(fileName: String) -> String? {
        guard !fileName.hasPrefix(".") else { return nil }
        for ext in extensions where fileName.hasSuffix(ext) && fileName.count > ext.count {
            return String(fileName.dropLast(ext.count))
        }
        return nil
    }

    /// Why `name` cannot name a set (nil: it can): 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting
    /// with a dot. The name is the probes' consumer and a metrics label, and travels through
    /// ConfigMap keys, which allow the same characters.
    public static func nameProblem(_ name: String) -> String? {
        if name.isEmpty || name.utf8.count > 128 { return "a set name has 1 to 128 characters" }
        if name.hasPrefix(".") { return "a set name does not start with '.'" }
        let ok = name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2e || c == 0x5f || c == 0x2d
        }
        return ok ? nil : "set name '\(name)' may only hold letters, digits, '.', '_' and '-'"
    }

    /// Parses a set's text. `name` is the set's name (from the file name or `--name`).
    public static func parse(_ text: String, name: String) throws(ProbeSetError) -> ProbeSetFile {
        if let why = nameProblem(name) { throw ProbeSetError(line: nil, why) }
        let root: Node?
        do { root = try Yams.compose(yaml: text) } catch {
            throw yamlError(error)
        }
        guard let root else {
            throw ProbeSetError(line: nil, "the file is empty; a set lists its probes under 'probes:' ('probes: []' for none)")
        }
        guard case .mapping(let top) = root else {
            throw ProbeSetError(line: root.mark?.line, "the file must be a mapping with a 'probes:' list, not \(kind(root))")
        }
        var list: [Node]?
        for (key, value) in top {
            guard let k = key.scalar?.string else { throw ProbeSetError(line: key.mark?.line, "keys must be plain strings") }
            switch k {
            case "probes":
                if case .scalar(let s) = value, s.style == .plain, ["", "~", "null"].contains(s.string) {
                    list = []  // `probes:` with nothing after it: an empty set
                } else {
                    guard case .sequence(let seq) = value else {
                        throw ProbeSetError(line: value.mark?.line ?? key.mark?.line, "'probes' must be a list, not \(kind(value))")
                    }
                    list = Array(seq)
                }
            default:
                throw ProbeSetError(line: key.mark?.line, "unknown key '\(k)' (a set file has only 'probes')")
            }
        }
        guard let list else { throw ProbeSetError(line: root.mark?.line, "no 'probes:' list") }
        var entries: [Entry] = []
        var seen: [ProbeSpec: Int] = [:]
        for item in list {
            let line = item.mark?.line ?? 0
            let spec = try entry(item, line: line)
            if let first = seen[spec] {
                throw ProbeSetError(line: line, "the same probe as line \(first)")
            }
            seen[spec] = line
            entries.append(Entry(spec: spec, line: line))
        }
        return ProbeSetFile(name: name, entries: entries)
    }

    /// One list item: a spelling, or a mapping with `probe:` and options.
    static func entry(_ item: Node, line: Int) throws(ProbeSetError) -> ProbeSpec {
        switch item {
        case .scalar(let s):
            return try spelling(s.string, line: line)
        case .mapping(let m):
            var probe: String?
            var follow: Bool?
            var force: Bool?
            var latency: Bool?
            for (key, value) in m {
                let kline = key.mark?.line ?? line
                guard let k = key.scalar?.string else { throw ProbeSetError(line: kline, "keys must be plain strings") }
                switch k {
                case "probe":
                    guard case .scalar(let s) = value else { throw ProbeSetError(line: kline, "'probe' must be a probe spelling") }
                    probe = s.string
                case "follow", "force", "latency":
                    guard let b = value.bool else { throw ProbeSetError(line: kline, "'\(k)' must be true or false") }
                    switch k {
                    case "follow": follow = b
                    case "force": force = b
                    default: latency = b
                    }
                case "pid":
                    throw ProbeSetError(line: kline, pidRefusal)
                default:
                    throw ProbeSetError(line: kline, "unknown key '\(k)' in a probe (known: \(entryKeys.joined(separator: ", ")))")
                }
            }
            guard let probe else { throw ProbeSetError(line: line, "a probe written as a mapping needs 'probe: SPELLING'") }
            var spec = try spelling(probe, line: line)
            if let follow { spec.follow = follow }
            if let force { spec.force = force }
            if let latency, latency {
                // The wire spec's rules (ProbeSpec's JSON decoding), here at the entry's line.
                if spec.retprobe {
                    throw ProbeSetError(line: line, "'latency' on a uretprobe: a latency probe already sees each call's return (use uprobe:)")
                }
                if spec.usdt != nil {
                    throw ProbeSetError(line: line, "'latency' on a USDT probe: a USDT note is a point, not a function with a return")
                }
                spec.latency = true
            }
            return spec
        default:
            throw ProbeSetError(line: line, "a probe is a spelling (libc:malloc) or a mapping with 'probe:', not \(kind(item))")
        }
    }

    static let pidRefusal = "a probe set names binaries, not processes: 'pid' is not allowed (register pid-filtered probes with uprobectl add --pid)"

    static func spelling(_ text: String, line: Int) throws(ProbeSetError) -> ProbeSpec {
        let spec: ProbeSpec
        do { spec = try ProbeSpec(cliSpelling: text) } catch { throw ProbeSetError(line: line, error.message) }
        if let why = spec.probeSetProblem { throw ProbeSetError(line: line, why) }
        return spec
    }

    static func kind(_ n: Node) -> String {
        switch n {
        case .scalar(let s): return "the value '\(s.string)'"
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    /// Yams' error with its line, in one line (its description adds the offending text).
    static func yamlError(_ error: any Error) -> ProbeSetError {
        guard let y = error as? YamlError else { return ProbeSetError(line: nil, "not YAML: \(error)") }
        switch y {
        case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _),
             .composer(let context, let problem, let mark, _):
            let ctx = context.map { "\($0.text) " } ?? ""
            return ProbeSetError(line: mark.line, "not valid YAML: \(ctx)\(problem)")
        case .duplicatedKeysInMapping(let duplicates, let context):
            // Yams marks the mapping that holds the duplicate, not the second key.
            return ProbeSetError(line: context.mark.line,
                                 "not valid YAML: duplicate key \(duplicates.map { "'\($0)'" }.joined(separator: ", ")) in the mapping that starts here")
        case .reader(let problem, _, _, _):
            return ProbeSetError(line: nil, "not readable as YAML: \(problem)")
        default:
            return ProbeSetError(line: nil, "not valid YAML: \(y)")
        }
    }
}

extension ProbeSpec {
    /// Why this spec cannot be part of a probe set (nil: it can): a `pid` filter (a set names
    /// binaries, not processes) or a relative path (a set means the same wherever it is read).
    public var probeSetProblem: String? {
        if pid != nil { return ProbeSetFile.pidRefusal }
        if !path.hasPrefix("/") && path.contains("/") {
            return "path '\(path)' is relative; a probe set names an absolute path or a library name (libc)"
        }
        return nil
    }
}

/// Why a probe-set file was refused: the line (1-based) when one is to blame, and the reason.
public struct ProbeSetError: Error, Sendable, Equatable, CustomStringConvertible {
    public var line: Int?
    public var message: String
    public init(line: Int?, _ message: String) {
        self.line = line
        self.message = message
    }
    /// `line 7: …` or the message alone.
    public var description: String { line.map { "line \($0): \(message)" } ?? message }

    /// A daemon's message without its leading `probes[N]: `, for a report that names the line instead.
    public static func withoutIndex(_ message: String) -> String {
        guard message.hasPrefix("probes["), let close = message.firstIndex(of: "]"),
              message[message.index(message.startIndex, offsetBy: 7)..<close].allSatisfy(\.isNumber),
              message[close...].hasPrefix("]: ") else { return message }
        return String(message[message.index(close, offsetBy: 3)...])
    }
}
