// What the writer is asked to do: the ops connections, the restore, the path watcher and the
// detach worker queue for it (`OpQueue` in Engine.swift), applied in batches by `BatchApplier`.

/// A request waiting for the writer.
enum PendingOp: Sendable {
    /// `early`: told the request's records while the kernel attaches them, if the request is large
    /// (see `EngineConfig.prepareMinimum`); they are its reply's records if it succeeds.
    case register(items: [RegisterItem], consumer: String?, peer: Peer,
                  early: (@Sendable ([ProbeRecord]) -> Void)?,
                  reply: @Sendable (Result<[ProbeRecord], EngineError>) -> Void)
    /// Registrations from the state file, with their ids; each one is atomic on its own.
    case restore(items: [RestoreItem], nextIDFloor: UInt64, adoption: Adoption, reply: @Sendable ([Result<ProbeRecord, EngineError>]) -> Void)
    /// By ids (all must exist), or every registration `selection` matches. `authorize` is asked
    /// for each selected probe; one it refuses fails the request.
    case unregister(ids: [String]?, selection: ProbeSelection?, peer: Peer, authorize: @Sendable (ProbeRecord) -> Bool,
                    reply: @Sendable (Result<Removal, EngineError>) -> Void)
    /// The path watcher's changes to existing registrations (see `FollowChange`).
    case follow(changes: [FollowChange], reply: @Sendable () -> Void)
    /// Wakes the writer: a detach round finished on the detach worker.
    case detachFinished
}

extension PendingOp {
    /// Probe sites a register resolved to (a glob's items are one spec, and a whole binary's
    /// waited out the batch window as a one-probe request) or ids an unregister names; 0 for
    /// every other op.
    var probeCount: Int {
        switch self {
        case .register(let items, _, _, _, _): return items.reduce(0) { $0 + $1.targets.count }
        case .unregister(let ids?, _, _, _, _): return ids.count
        default: return 0
        }
    }
}
