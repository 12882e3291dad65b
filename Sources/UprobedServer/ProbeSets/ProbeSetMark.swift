/// Where a probe set comes from: a file in `probes_dir`, or `uprobectl apply` (the `apply` op).
public enum ProbeSetSource: String, Sendable {
    case file
    case api
}

/// How a registration names the set that owns it (`ProbeRecord.probeSet`, saved in the state
/// files as `"set"`): `file:NAME` or `api:NAME`. The source is part of the mark so that a
/// restart knows, without any other file, which registrations belong to a file that is gone
/// (removed) and which to an applied set (kept as applied).
struct ProbeSetMark: Hashable, Sendable {
    var source: ProbeSetSource
    var name: String

    var text: String { "\(source.rawValue):\(name)" }

    init(_ source: ProbeSetSource, _ name: String) {
        self.source = source
        self.name = name
    }

    /// The mark a registration carries, nil for one registered through the API (or a mark
    /// this daemon does not know).
    init?(_ text: String?) {
        guard let text, let colon = text.firstIndex(of: ":"),
              let source = ProbeSetSource(rawValue: String(text[..<colon])) else { return nil }
        self.init(source, String(text[text.index(after: colon)...]))
    }
}
