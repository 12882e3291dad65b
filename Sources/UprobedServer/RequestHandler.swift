import Foundation
import Logging
import Synchronization
import UprobeCore
import UprobeELF
import UprobedProtocol

/// Turns one decoded request into one reply: resolve outside any lock, hand mutations to the
/// engine, answer reads from the published snapshot.
public struct RequestHandler: Sendable {
    public let engine: Engine
    public let resolver: Resolver
    public let limits: RequestDecoder.Limits
    public let logger: Logger
    public let startedAt: ContinuousClock.Instant
    /// The access policy in force; replaced as a whole by a config reload (SIGHUP).
    public let access: PolicyCell
    /// The daemon's own counters (denials, state writes), for `status` and metrics.
    public let counters: ServiceCounters
    /// Probes each uid has in register requests not yet answered, so concurrent requests of
    /// one uid cannot slip past `max_probes_per_uid` together.
    private let inFlight = InFlightProbes()
    public static let version = "0.1.0"

    public init(engine: Engine, resolver: Resolver, limits: RequestDecoder.Limits, logger: Logger,
                access: PolicyCell = PolicyCell(AccessPolicy(config: DaemonConfig())),
                counters: ServiceCounters = ServiceCounters()) {
        self.engine = engine
        self.resolver = resolver
        self.limits = limits
        self.logger = logger
        self.startedAt = .now
        self.access = access
        self.counters = counters
    }

    /// Handles one line; `watch` is answered by the caller (it streams).
    public func handle(line: some Collection<UInt8>, peer: PeerIdentity) async -> JSONValue {
        switch RequestDecoder.decode(line, limits: limits) {
        case .failure(let f):
            logger.notice("bad request", metadata: ["error_code": "\(f.error.code)", "peer_pid": "\(peer.peer.pid)"])
            return Reply.failure(id: f.id, f.error)
        case .success(let env):
            return await handle(env, peer: peer)
        }
    }

    public func handle(_ env: RequestEnvelope, peer who: PeerIdentity) async -> JSONValue {
        let policy = access.load()
        let result: Result<JSONObject, ProtocolError>
        if let denial = AccessControl.check(who, has: AccessControl.requiredRole(env.request), for: env.request.op, policy: policy) {
            result = .failure(denial)
        } else {
            switch env.request {
            case .register(let specs, let consumer): result = await register(specs, consumer: consumer, who: who, policy: policy)
            case .unregister(let ids, let consumer): result = await unregister(ids: ids, consumer: consumer, who: who, policy: policy)
            case .list(let consumer): result = .success(list(consumer: consumer))
            case .stats(let ids, let versions): result = stats(ids: ids, versions: versions)
            case .status: result = .success(status())
            case .resolve(let specs): result = resolveChecked(specs, who: who, policy: policy)
            case .watch(_, let ids): result = stats(ids: ids)  // the server streams; this is one event
            }
        }
        switch result {
        case .success(let payload): return Reply.success(id: env.id, payload)
        case .failure(let error):
            if error.code == .permissionDenied || error.code == AccessControl.limitExceeded {
                counters.accessDenied.add(1, ordering: .relaxed)
                logger.warning("access denied", metadata: ["op": "\(env.request.op)", "error_code": "\(error.code)",
                                                           "peer_pid": "\(who.peer.pid)", "peer_uid": "\(who.peer.uid)",
                                                           "reason": "\(error.message)"])
            } else {
                logger.notice("request failed", metadata: ["op": "\(env.request.op)", "error_code": "\(error.code)",
                                                           "peer_pid": "\(who.peer.pid)", "peer_uid": "\(who.peer.uid)"])
            }
            return Reply.failure(id: env.id, error)
        }
    }

    /// `resolve` reads ELF files for the peer: a non-admin only learns about files it can read.
    func resolveChecked(_ specs: [ProbeSpec], who: PeerIdentity, policy: AccessPolicy) -> Result<JSONObject, ProtocolError> {
        if let denial = AccessControl.checkSpecs(who, specs: specs.map(Self.input), systemWideOK: true, policy: policy) {
            return .failure(denial)
        }
        return resolve(specs).flatMap { resolved in
            let items = zip(specs, resolved).map { RegisterItem(spec: Self.input($0), targets: $1) }
            if let denial = AccessControl.checkTargets(who, items: items, held: nil, policy: policy) { return .failure(denial) }
            return .success(["probes": .array(resolved.flatMap { $0.map(Self.describe) })])
        }
    }

    // MARK: - ops

    static func input(_ s: ProbeSpec) -> ProbeSpecInput {
        ProbeSpecInput(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                       retprobe: s.retprobe, force: s.force, follow: s.follow)
    }

    static func specJSON(_ s: ProbeSpecInput) -> JSONValue {
        ProbeSpec(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                  retprobe: s.retprobe, force: s.force, follow: s.follow).json
    }

    /// Resolves every spec; the first failure fails the request and names the spec.
    func resolve(_ specs: [ProbeSpec]) -> Result<[[ResolvedProbe]], ProtocolError> {
        var out: [[ResolvedProbe]] = []
        out.reserveCapacity(specs.count)
        var total = 0
        // One open per (path, pid) for the whole request: see Resolver.resolveMany.
        for (n, result) in resolver.resolveMany(specs.map(Self.input)).enumerated() {
            do {
                let targets = try result.get()
                total += targets.count
                if total > limits.maxProbesPerRequest * 4 {
                    return .failure(ProtocolError(.tooManyProbes, "the request expands to more than \(limits.maxProbesPerRequest * 4) probes",
                                                  details: ["probe": .int(Int64(n))]))
                }
                out.append(targets)
            } catch {
                return .failure(ProtocolError(ErrorCode(error.code), "probes[\(n)]: \(error.message)",
                                              details: ["probe": .int(Int64(n))]))
            }
        }
        return .success(out)
    }

    static func describe(_ t: ResolvedProbe) -> JSONValue {
        var o = JSONObject()
        o["path"] = .string(t.path)
        o["offset"] = JSONValue(t.fileOffset)
        if let s = t.symbol { o["symbol"] = .string(s) }
        if !t.aliases.isEmpty { o["aliases"] = .array(t.aliases.map { .string($0) }) }
        if let b = t.buildID { o["build_id"] = .string(b) }
        if let r = t.refCtrOffset { o["ref_ctr_offset"] = JSONValue(r) }
        if let w = t.warning { o["warning"] = .string(w) }
        return .object(o)
    }

    static func describe(_ r: ProbeRecord) -> JSONValue {
        guard var o = r.targets.first.map({ describe($0) })?.objectValue else { return .null }
        var head = JSONObject()
        head["id"] = .string(r.id)
        for p in o.pairs { head[p.key] = p.value }
        o = head
        if r.targets.count > 1 {
            o["sites"] = .array(r.targets.map { describe($0) })
        }
        if let reason = r.state.reason {
            o["state"] = .string(r.state.name)
            o["reason"] = .string(reason)
        }
        return .object(o)
    }

    func register(_ specs: [ProbeSpec], consumer: String?, who: PeerIdentity, policy: AccessPolicy) async -> Result<JSONObject, ProtocolError> {
        let peer = who.peer
        if let denial = AccessControl.checkSpecs(who, specs: specs.map(Self.input), systemWideOK: false, policy: policy) {
            return .failure(denial)
        }
        let resolved: [[ResolvedProbe]]
        switch resolve(specs) {
        case .failure(let e): return .failure(e)
        case .success(let r): resolved = r
        }
        let items = zip(specs, resolved).map { RegisterItem(spec: Self.input($0), targets: $1) }
        let adding = items.reduce(0) { $0 + $1.probeCount }
        let isAdmin = policy.role(of: who) == .admin
        if !isAdmin {
            // Reserve first, then count: two concurrent requests of one uid both see each other.
            let pending = inFlight.add(uid: peer.uid, adding)
            let held = engine.snapshot.probes.values.reduce(0) { $0 + ($1.owner.uid == peer.uid ? 1 : 0) } + pending - adding
            if let denial = AccessControl.checkTargets(who, items: items, held: held, policy: policy) {
                inFlight.add(uid: peer.uid, -adding)
                return .failure(denial)
            }
        }
        defer { if !isAdmin { inFlight.add(uid: peer.uid, -adding) } }
        switch await engine.register(items, consumer: consumer, peer: peer) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let records):
            for r in records {
                logger.info("probe registered", metadata: ["probe_id": "\(r.id)", "path": "\(r.sites.first?.target.path ?? "")",
                                                           "consumer": "\(consumer ?? "")", "peer_uid": "\(peer.uid)"])
            }
            return .success(["probes": .array(records.map(Self.describe))])
        }
    }

    func unregister(ids: [String]?, consumer: String?, who: PeerIdentity, policy: AccessPolicy) async -> Result<JSONObject, ProtocolError> {
        let peer = who.peer
        let isAdmin = policy.role(of: who) == .admin
        // Non-admins may remove only their own probes; the engine asks for each selected probe.
        let authorize: @Sendable (ProbeRecord) -> Bool = { r in isAdmin || r.owner.uid == peer.uid }
        switch await engine.unregister(ids: ids, consumer: consumer, peer: peer, authorize: authorize) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let n):
            logger.info("probes unregistered", metadata: ["count": "\(n)", "consumer": "\(consumer ?? "")", "peer_uid": "\(peer.uid)"])
            return .success(["removed": .int(Int64(n))])
        }
    }

    func list(consumer: String?) -> JSONObject {
        let probes = engine.snapshot.sortedProbes.filter { consumer == nil || $0.consumer == consumer }
        return ["probes": .array(probes.map { r in
            guard var o = Self.describe(r).objectValue else { return .null }
            o["spec"] = Self.specJSON(r.spec)
            if let c = r.consumer { o["consumer"] = .string(c) }
            o["owner_uid"] = .int(Int64(r.owner.uid))
            o["registered_at"] = .double(r.registeredAt)
            // Whether the probe follows its path through file replacements (see PathWatcher).
            o["follow"] = .bool(r.follows)
            return .object(o)
        })]
    }

    func stats(ids: [String]?, versions: Bool = false) -> Result<JSONObject, ProtocolError> {
        switch engine.stats(ids: ids, allVersions: versions) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let stats):
            return .success(["stats": .array(stats.map { s in
                var o = JSONObject()
                o["id"] = .string(s.id)
                o["hits"] = JSONValue(s.hits)
                o["rate"] = .double((s.ratePerSecond * 1000).rounded() / 1000)
                if let reason = s.state.reason {
                    o["state"] = .string(s.state.name)
                    o["reason"] = .string(reason)
                }
                // Per file version: old and new builds side by side during an upgrade. Only when
                // asked or when there is more than one: a 10,000-probe reply stays small.
                guard versions || s.versions.count > 1 else { return .object(o) }
                o["versions"] = .array(s.versions.map { v in
                    var x = JSONObject()
                    x["path"] = .string(v.version.path)
                    x["device"] = JSONValue(v.version.device)
                    x["inode"] = JSONValue(v.version.inode)
                    if let b = v.version.buildID { x["build_id"] = .string(b) }
                    x["hits"] = JSONValue(v.hits)
                    x["current"] = .bool(v.current)
                    if v.retired { x["retired"] = true }
                    return .object(x)
                })
                return .object(o)
            })])
        }
    }

    func status() -> JSONObject {
        let s = engine.snapshot
        let up = ContinuousClock.now - startedAt
        var batching = JSONObject()
        batching["requests"] = JSONValue(s.counters.requests)
        batching["batches"] = JSONValue(s.counters.batches)
        batching["mean_batch_size"] = .double((s.counters.meanBatchSize * 100).rounded() / 100)
        batching["max_batch_size"] = JSONValue(s.counters.maxBatchSize)
        batching["last_batch_size"] = JSONValue(s.counters.lastBatchSize)
        batching["last_batch_us"] = JSONValue(s.counters.lastBatchMicros)
        batching["writer_busy_us"] = JSONValue(s.counters.busyMicros)
        batching["state_write_us"] = JSONValue(s.counters.persistMicros)
        batching["links_created"] = JSONValue(s.counters.linksCreated)
        batching["links_closed"] = JSONValue(s.counters.linksClosed)
        batching["link_rebuilds"] = JSONValue(s.counters.linkRebuilds)
        batching["grace_periods"] = JSONValue(s.counters.gracePeriods)
        batching["pending_removals"] = JSONValue(s.counters.pendingRemovals)
        var o = JSONObject()
        o["version"] = .string(Self.version)
        o["uptime_s"] = .double((up.inSeconds * 10).rounded() / 10)
        o["probes"] = JSONValue(s.probes.count)
        o["uprobes"] = JSONValue(s.uprobes)
        o["links"] = JSONValue(s.linksOpen)
        o["slots_in_use"] = JSONValue(s.slotsInUse)
        o["slot_capacity"] = JSONValue(UInt64(s.slotCapacity))
        o["batching"] = .object(batching)
        o["degraded"] = JSONValue(s.probes.values.reduce(0) { $0 + ($1.state == .active ? 0 : 1) })
        var service = JSONObject()
        service["access_denied"] = JSONValue(counters.accessDenied.load(ordering: .relaxed))
        service["state_writes"] = JSONValue(counters.stateWrites.load(ordering: .relaxed))
        service["state_write_failures"] = JSONValue(counters.stateWriteFailures.load(ordering: .relaxed))
        service["config_reloads"] = JSONValue(counters.configReloads.load(ordering: .relaxed))
        service["config_reload_failures"] = JSONValue(counters.configReloadFailures.load(ordering: .relaxed))
        o["service"] = .object(service)
        return o
    }

    static func protocolError(_ e: EngineError) -> ProtocolError {
        var details = JSONObject()
        if let i = e.probeIndex { details["probe"] = .int(Int64(i)) }
        return ProtocolError(ErrorCode(e.code), e.message, details: details)
    }
}

/// The access policy in force. Readers copy it per request; a reload swaps it whole.
public final class PolicyCell: Sendable {
    private let value: Mutex<AccessPolicy>
    public init(_ p: AccessPolicy) { value = Mutex(p) }
    public func load() -> AccessPolicy { value.withLock { $0 } }
    public func store(_ p: AccessPolicy) { value.withLock { $0 = p } }
}

/// The daemon's own counters, beside the engine's: reported by `status` and the metrics endpoint.
public final class ServiceCounters: Sendable {
    public let accessDenied = Atomic<UInt64>(0)
    public let stateWrites = Atomic<UInt64>(0)
    public let stateWriteFailures = Atomic<UInt64>(0)
    public let configReloads = Atomic<UInt64>(0)
    public let configReloadFailures = Atomic<UInt64>(0)
    public let metricsScrapes = Atomic<UInt64>(0)
    public init() {}
}

/// Probes per uid in register requests that were checked but not yet answered.
final class InFlightProbes: Sendable {
    private let counts = Mutex<[UInt32: Int]>([:])
    /// Adds `n` (may be negative) and returns the uid's new in-flight total.
    @discardableResult
    func add(uid: UInt32, _ n: Int) -> Int {
        counts.withLock { c in
            let v = (c[uid] ?? 0) + n
            if v == 0 { c.removeValue(forKey: uid) } else { c[uid] = v }
            return v
        }
    }
}
