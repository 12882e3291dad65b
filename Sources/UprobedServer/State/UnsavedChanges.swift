/// What the state files lack compared with the running registry, told to the operator when
/// the final save at stop fails (`UprobedService.finalSave`): what the next start will get
/// wrong.
public struct UnsavedChanges: Sendable, Equatable {
    /// Unregistered (and acknowledged), yet still in the files: they come back at the next start.
    public var removals: [String]
    /// Registered, yet in no file: they will be missing after the next start.
    public var registrations: [String]
    /// When the snapshot on disk was written (Unix time); nil if there is none. Hit counts and
    /// degraded or ended states since then are in no file.
    public var snapshotAt: Double?

    /// Ids named in a log line; beyond that, how many more.
    static let idsShown = 20

    /// One sentence per thing at risk.
    public func describe(now: Double) -> String {
        var parts: [String] = []
        if !removals.isEmpty {
            parts.append("\(removals.count) unregistered probe(s) are still in the state files and will come back at the next start (\(Self.list(removals)))")
        }
        if !registrations.isEmpty {
            parts.append("\(registrations.count) registered probe(s) are in no state file and will be missing after the next start (\(Self.list(registrations)))")
        }
        if removals.isEmpty && registrations.isEmpty {
            parts.append("every registration and removal is on disk")
        }
        if let snapshotAt {
            parts.append("hit counts (and degraded or ended states) since the last snapshot, written \(Int(max(0, now - snapshotAt))) s ago, are lost")
        } else {
            parts.append("hit counts (and degraded or ended states) since the registrations were made are lost: there is no snapshot")
        }
        return parts.joined(separator: "; ")
    }

    static func list(_ ids: [String]) -> String {
        ids.count <= idsShown ? ids.joined(separator: ",") : ids.prefix(idsShown).joined(separator: ",") + ",… (\(ids.count - idsShown) more)"
    }
}
