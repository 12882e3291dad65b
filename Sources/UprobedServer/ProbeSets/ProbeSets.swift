import Foundation
import Logging
import Synchronization
import UprobeCore
import UprobeELF
import UprobedProbeSets
import UprobedProtocol

/// Declarative probe sets: the files of `probes_dir` (reconciled at start and on SIGHUP) and the
/// sets applied with `uprobectl apply` (the `apply` op).
///
/// A set's registrations carry its mark (`ProbeSetMark`: source and name) in the registry and in
/// the state files; the mark, not the consumer name, is what a reconcile looks at. So a set never
/// touches registrations made through `register` (even under the same consumer name), and
/// `unregister` leaves the set's alone (`probe_in_set`): each registration has one owner.
///
/// Reconciling one set: the specs it lists are compared with those of its registrations
/// (`SetChange`); the new ones are resolved and registered as one request (atomic: all or none,
/// and a failure leaves the set as it was), then the registrations of the specs no longer listed
/// are unregistered. Make before break: while both steps run, old and new probes both count;
/// between the two there is no moment with neither. One set at a time (`SerialGate`).
public final class ProbeSets: Sendable {
    let engine: Engine
    let logger: Logger
    /// What `status` shows of each set.
    let table = ProbeSetTable()
    let gate = SerialGate()
    private let resolver = Mutex<(@Sendable ([ProbeSpecInput]) async -> Result<[Resolution], ProtocolError>)?>(nil)
    /// The set names that have a file in the probes directory, from the last scan (a set name
    /// held by a file cannot be applied through the API, even while the file is refused).
    private let fileNames = Mutex<[String: String]>([:])
    /// Where the applied sets' lists are kept (`AppliedSets`), and those lists.
    let store: StateStore
    let applied = Mutex(AppliedSets())

    public init(engine: Engine, logger: Logger, store: StateStore) {
        self.engine = engine
        self.logger = logger
        self.store = store
    }

    /// Most lines one set may have: `max_probes_per_request`, as for an `apply` (set by `connect`).
    let maxSpecs = Atomic<Int>(10_000)

    /// How specs are resolved: the request handler's way (its thread pool, its limits).
    func connect(_ handler: RequestHandler) {
        resolver.withLock { $0 = { specs in await handler.resolve(specs) } }
        maxSpecs.store(handler.limits.maxProbesPerRequest, ordering: .relaxed)
    }

    /// The registrations `mark`'s set owns now, in id order.
    func records(of mark: ProbeSetMark) -> [ProbeRecord] {
        let text = mark.text
        return engine.read { s, _ in s.probes.sorted(where: { $0.probeSet == text }) }
    }

    /// Every set mark among the registrations, with how many each owns.
    func marks() -> [ProbeSetMark: Int] {
        engine.read { s, _ in
            var out: [ProbeSetMark: Int] = [:]
            for r in s.probes.values {
                if let m = ProbeSetMark(r.probeSet) { out[m, default: 0] += 1 }
            }
            return out
        }
    }

    // MARK: - one set

    /// Makes `mark`'s set hold exactly `desired` (see the type's comment). `authorize`: asked with
    /// the added specs' resolutions before anything is registered (an `apply`'s access checks).
    /// `dryRun`: resolves and reports, changes nothing. `between`: runs after the additions are
    /// registered and before the removals; an error from it takes the additions back out and
    /// fails the reconcile (an applied set saves its list there).
    func reconcile(_ mark: ProbeSetMark, desired: [ProbeSpec], owner: Peer, dryRun: Bool = false,
                   authorize: ([RegisterItem]) -> ProtocolError? = { _ in nil },
                   between: (() -> ProtocolError?)? = nil) async -> Result<SetOutcome, SetFailure> {
        let change = SetChange(desired: desired, records: records(of: mark))
        var outcome = SetOutcome(change: change)
        if !change.added.isEmpty {
            let inputs = change.added.map { RequestHandler.input($0.spec) }
            guard let resolve = resolver.withLock({ $0 }) else {
                return .failure(SetFailure(error: ProtocolError(.internalError, "probe sets are not connected to a resolver"), index: nil))
            }
            let resolutions: [Resolution]
            switch await resolve(inputs) {
            case .failure(let e): return .failure(SetFailure(error: Self.renumbered(e, change), index: Self.index(e, change)))
            case .success(let r): resolutions = r
            }
            let items = zip(inputs, resolutions).map { RegisterItem(spec: $0, targets: $1.probes, probeSet: mark.text) }
            if let denied = authorize(items) { return .failure(SetFailure(error: Self.renumbered(denied, change), index: Self.index(denied, change))) }
            outcome.counts = items.map(\.probeCount)
            outcome.skipped = RequestHandler.skipped(resolutions)
            if !dryRun {
                switch await engine.register(items, consumer: mark.name, peer: owner) {
                case .failure(let e):
                    let pe = RequestHandler.protocolError(e)
                    return .failure(SetFailure(error: Self.renumbered(pe, change), index: Self.index(pe, change)))
                case .success(let records):
                    // The engine returns them in spec order: each spec's share, in turn.
                    var rest = records[...]
                    outcome.registered = items.map { item in
                        let n = min(item.probeCount, rest.count)
                        defer { rest = rest.dropFirst(n) }
                        return Array(rest.prefix(n))
                    }
                }
            }
        }
        if !dryRun, let between, let failed = between() {
            let added = outcome.registered.flatMap { $0.map(\.id) }
            if !added.isEmpty, case .failure(let e) = await engine.unregister(ids: added, consumer: nil, peer: owner) {
                logger.error("a refused probe-set change could not take its new registrations back out", metadata: [
                    "set": "\(mark.name)", "probe_id": "\(added.first ?? "")", "count": "\(added.count)",
                    "error_code": "\(e.code)", "error": "\(e.message)"])
            }
            return .failure(SetFailure(error: failed, index: nil))
        }
        if !change.removed.isEmpty && !dryRun {
            let ids = change.removed.flatMap(\.ids)
            switch await engine.unregister(ids: ids, consumer: nil, peer: owner) {
            case .failure(let e):
                // Only when stopping, or when a probe vanished meanwhile: the additions stand.
                let why = "\(ids.count) registrations of specs no longer listed were not removed (\(e.code): \(e.message)); the next reconcile removes them"
                if change.added.isEmpty { return .failure(SetFailure(error: RequestHandler.protocolError(e), index: nil)) }
                outcome.warning = why
            case .success(let removal):
                if let unsaved = removal.unsaved {
                    outcome.warning = "removed, but not saved yet (\(unsaved)); a restart before the next successful save would bring them back"
                }
            }
        }
        return .success(outcome)
    }

    /// The index in the desired list of the spec an error names (`details.probe`, an index
    /// among the added specs).
    static func index(_ e: ProtocolError, _ change: SetChange) -> Int? {
        guard let n = e.details["probe"]?.int64Value, n >= 0, Int(n) < change.added.count else { return nil }
        return change.added[Int(n)].index
    }

    /// `e` with `details.probe` (and a leading `probes[N]:`) counted in the desired list.
    static func renumbered(_ e: ProtocolError, _ change: SetChange) -> ProtocolError {
        guard let n = e.details["probe"]?.int64Value, let i = index(e, change) else { return e }
        var out = e
        out.details["probe"] = .int(Int64(i))
        let old = "probes[\(n)]", new = "probes[\(i)]"
        if out.message.hasPrefix(old) { out.message = new + out.message.dropFirst(old.count) }
        return out
    }
}

/// What `status` shows of each set: where it comes from and whether its last reconcile was refused.
final class ProbeSetTable: Sendable {
    struct Entry: Sendable {
        var source: ProbeSetSource
        /// The file of a `probes_dir` set.
        var file: String?
        /// Why its last reconcile was refused (its probes are those of the last good one), and the
        /// line to blame.
        var refused: (code: ErrorCode, message: String, line: Int?)?
        /// Wall-clock seconds of its last good reconcile in this daemon.
        var appliedAt: Double?
    }
    private let entries = Mutex<[String: Entry]>([:])
    /// Reconciles of the probes directory (start and each reload) since the start.
    let directoryReconciles = Atomic<UInt64>(0)

    /// Drops the entries `gone` picks.
    func forget(where gone: (String, Entry) -> Bool) {
        entries.withLock { all in all = all.filter { !gone($0.key, $0.value) } }
    }

    func update(_ name: String, _ body: (inout Entry?) -> Void) {
        entries.withLock { all in
            var e = all[name]
            body(&e)
            all[name] = e
        }
    }

    /// Sets whose last reconcile was applied and refused; `marks`: the set marks of the registry's
    /// registrations (a set known only from them, e.g. applied before a restart, is applied).
    func counts(marks: [ProbeSetMark]) -> (applied: Int, refused: Int) {
        let known = entries.withLock { $0 }
        var names = Set(known.keys)
        for m in marks { names.insert(m.name) }
        let refused = names.filter { known[$0]?.refused != nil }.count
        return (names.count - refused, refused)
    }

    /// `status`'s `probe_sets`: the reconcile count and every set known from the registry or
    /// from a reconcile, with its registrations (`held`: counted from the same registry).
    func json(held: [ProbeSetMark: Int]) -> JSONValue {
        let known = entries.withLock { $0 }
        var names = Set(known.keys)
        for m in held.keys { names.insert(m.name) }
        var sets: [JSONValue] = []
        var refused = 0
        for name in names.sorted() {
            var o = JSONObject()
            o["set"] = .string(name)
            let e = known[name]
            let source = e?.source ?? held.keys.first { $0.name == name }?.source ?? .file
            o["source"] = .string(source.rawValue)
            if let f = e?.file { o["file"] = .string(f) }
            o["probes"] = .int(Int64(held[ProbeSetMark(source, name)] ?? 0))
            if let r = e?.refused {
                refused += 1
                o["state"] = "refused"
                var err: JSONObject = ["code": .string(r.code.rawValue), "message": .string(r.message)]
                if let line = r.line { err["line"] = .int(Int64(line)) }
                o["error"] = .object(err)
            } else {
                o["state"] = "applied"
            }
            if let t = e?.appliedAt { o["applied_at"] = .double(t) }
            sets.append(.object(o))
        }
        return .object(["reconciles": JSONValue(directoryReconciles.load(ordering: .relaxed)),
                        "refused": .int(Int64(refused)), "sets": .array(sets)])
    }
}

extension ProbeSets {
    /// Names that have a file in the probes directory (last scan), with the file.
    var filesByName: [String: String] {
        get { fileNames.withLock { $0 } }
    }

    func setFiles(_ files: [String: String]) { fileNames.withLock { $0 = files } }
}
