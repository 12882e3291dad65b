import Foundation
import Logging
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
    public static let version = "0.1.0"

    public init(engine: Engine, resolver: Resolver, limits: RequestDecoder.Limits, logger: Logger) {
        self.engine = engine
        self.resolver = resolver
        self.limits = limits
        self.logger = logger
        self.startedAt = .now
    }

    /// Handles one line; `watch` is answered by the caller (it streams).
    public func handle(line: some Collection<UInt8>, peer: Peer) async -> JSONValue {
        switch RequestDecoder.decode(line, limits: limits) {
        case .failure(let f):
            logger.notice("bad request", metadata: ["error_code": "\(f.error.code)", "peer_pid": "\(peer.pid)"])
            return Reply.failure(id: f.id, f.error)
        case .success(let env):
            return await handle(env, peer: peer)
        }
    }

    public func handle(_ env: RequestEnvelope, peer: Peer) async -> JSONValue {
        let result: Result<JSONObject, ProtocolError>
        switch env.request {
        case .register(let specs, let consumer): result = await register(specs, consumer: consumer, peer: peer)
        case .unregister(let ids, let consumer): result = await unregister(ids: ids, consumer: consumer, peer: peer)
        case .list(let consumer): result = .success(list(consumer: consumer))
        case .stats(let ids): result = stats(ids: ids)
        case .status: result = .success(status())
        case .resolve(let specs): result = resolve(specs).map { ["probes": .array($0.flatMap { $0.map(Self.describe) })] }
        case .watch(_, let ids): result = stats(ids: ids)  // the server streams; this is one event
        }
        switch result {
        case .success(let payload): return Reply.success(id: env.id, payload)
        case .failure(let error):
            logger.notice("request failed", metadata: ["op": "\(env.request.op)", "error_code": "\(error.code)",
                                                       "peer_pid": "\(peer.pid)", "peer_uid": "\(peer.uid)"])
            return Reply.failure(id: env.id, error)
        }
    }

    // MARK: - ops

    static func input(_ s: ProbeSpec) -> ProbeSpecInput {
        ProbeSpecInput(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                       retprobe: s.retprobe, force: s.force)
    }

    static func specJSON(_ s: ProbeSpecInput) -> JSONValue {
        ProbeSpec(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                  retprobe: s.retprobe, force: s.force).json
    }

    /// Resolves every spec; the first failure fails the request and names the spec.
    func resolve(_ specs: [ProbeSpec]) -> Result<[[ResolvedProbe]], ProtocolError> {
        var out: [[ResolvedProbe]] = []
        out.reserveCapacity(specs.count)
        var total = 0
        for (n, spec) in specs.enumerated() {
            do {
                let targets = try resolver.resolve(Self.input(spec))
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
        if case .degraded(let reason) = r.state {
            o["state"] = "degraded"
            o["reason"] = .string(reason)
        }
        return .object(o)
    }

    func register(_ specs: [ProbeSpec], consumer: String?, peer: Peer) async -> Result<JSONObject, ProtocolError> {
        let resolved: [[ResolvedProbe]]
        switch resolve(specs) {
        case .failure(let e): return .failure(e)
        case .success(let r): resolved = r
        }
        let items = zip(specs, resolved).map { RegisterItem(spec: Self.input($0), targets: $1) }
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

    func unregister(ids: [String]?, consumer: String?, peer: Peer) async -> Result<JSONObject, ProtocolError> {
        switch await engine.unregister(ids: ids, consumer: consumer, peer: peer) {
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
            return .object(o)
        })]
    }

    func stats(ids: [String]?) -> Result<JSONObject, ProtocolError> {
        switch engine.stats(ids: ids) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let stats):
            return .success(["stats": .array(stats.map { s in
                var o = JSONObject()
                o["id"] = .string(s.id)
                o["hits"] = JSONValue(s.hits)
                o["rate"] = .double((s.ratePerSecond * 1000).rounded() / 1000)
                if case .degraded(let reason) = s.state {
                    o["state"] = "degraded"
                    o["reason"] = .string(reason)
                }
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
        batching["links_created"] = JSONValue(s.counters.linksCreated)
        batching["links_closed"] = JSONValue(s.counters.linksClosed)
        batching["link_rebuilds"] = JSONValue(s.counters.linkRebuilds)
        batching["grace_periods"] = JSONValue(s.counters.gracePeriods)
        batching["pending_removals"] = JSONValue(s.counters.pendingRemovals)
        var o = JSONObject()
        o["version"] = .string(Self.version)
        o["uptime_s"] = .double((seconds(up) * 10).rounded() / 10)
        o["probes"] = JSONValue(s.probes.count)
        o["uprobes"] = JSONValue(s.uprobes)
        o["links"] = JSONValue(s.linksOpen)
        o["slots_in_use"] = JSONValue(s.slotsInUse)
        o["slot_capacity"] = JSONValue(UInt64(s.slotCapacity))
        o["batching"] = .object(batching)
        return o
    }

    static func protocolError(_ e: EngineError) -> ProtocolError {
        var details = JSONObject()
        if let i = e.probeIndex { details["probe"] = .int(Int64(i)) }
        return ProtocolError(ErrorCode(e.code), e.message, details: details)
    }
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}
