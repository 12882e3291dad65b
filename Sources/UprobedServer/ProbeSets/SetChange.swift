import UprobeCore
import UprobeELF
import UprobedProtocol

/// What making a set hold `desired` changes, against the registrations it owns now. Probes are
/// compared by their spec (a glob's functions all come from one spec): a spec still listed keeps
/// its registrations, ids and counts; one no longer listed loses all of its registrations; a new
/// one is registered.
struct SetChange: Sendable {
    /// Specs to register, with their index in the desired list (for the line of an error).
    var added: [(index: Int, spec: ProbeSpec)] = []
    /// Specs to unregister, with the ids of their registrations.
    var removed: [(spec: ProbeSpec, ids: [String])] = []
    /// Specs listed before and now.
    var unchanged = 0
    /// Registrations the set holds now.
    var held = 0
    /// The uids that own its registrations now (an applied set is its applier's).
    var owners: Set<UInt32> = []

    var isEmpty: Bool { added.isEmpty && removed.isEmpty }

    /// `records`: every registration the set owns now (in id order).
    init(desired: [ProbeSpec], records: [ProbeRecord]) {
        var current: [ProbeSpecInput: [String]] = [:]
        var order: [ProbeSpecInput] = []
        for r in records {
            if current[r.spec] == nil { order.append(r.spec) }
            current[r.spec, default: []].append(r.id)
            owners.insert(r.owner.uid)
        }
        held = records.count
        var wanted = Set<ProbeSpecInput>()
        for (n, spec) in desired.enumerated() {
            let input = RequestHandler.input(spec)
            wanted.insert(input)
            if current[input] != nil { unchanged += 1 } else { added.append((n, spec)) }
        }
        for spec in order where !wanted.contains(spec) {
            removed.append((ProbeSpec(spec), current[spec] ?? []))
        }
    }
}

/// What a reconcile did (or, dry, would do) to one set.
struct SetOutcome: Sendable {
    var change: SetChange
    /// For each added spec (in `change.added`'s order): its registrations (empty when dry).
    var registered: [[ProbeRecord]] = []
    /// For each added spec: how many registrations it makes (what a dry run tells).
    var counts: [Int] = []
    /// Functions the added globs skipped (first instruction not probeable), by added index.
    var skipped: [(probe: Int, site: SkippedSite)] = []
    /// Set when the removals could not be saved (see `Removal.unsaved`), or failed after the
    /// additions were made.
    var warning: String?
}

/// Why a set could not be reconciled: the error, and the index in the desired list of the spec
/// to blame, if one is.
struct SetFailure: Error, Sendable {
    var error: ProtocolError
    var index: Int?
}
