import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import UprobeCore
import UprobeELF
import UprobedProtocol

/// Turns one decoded request into one reply: resolve outside any lock, hand mutations to the
/// engine, answer reads from the published snapshot.
public struct RequestHandler: Sendable {
    public let engine: Engine
    public let resolver: UprobeELF.Resolver
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

    /// Where a large register's reply is written while the writer attaches its probes.
    let aheadQueue: DispatchQueue
    /// Where the files peers name are opened and parsed. Never the task pool (two threads on
    /// two CPUs, shared by every connection): a file on a hung network mount blocks open(2)
    /// whatever its flags, and would stall every client. Here it holds one pool thread.
    let resolverPool: NIOThreadPool
    /// Told of every successful registration (the ownership watcher checks new `pid` filters).
    let registered: @Sendable ([ProbeRecord]) -> Void

    public init(engine: Engine, resolver: UprobeELF.Resolver, limits: RequestDecoder.Limits, logger: Logger,
                access: PolicyCell = PolicyCell(AccessPolicy(config: DaemonConfig())),
                counters: ServiceCounters = ServiceCounters(), aheadQueue: DispatchQueue = .global(),
                resolverPool: NIOThreadPool = .singleton,
                registered: @escaping @Sendable ([ProbeRecord]) -> Void = { _ in }) {
        self.aheadQueue = aheadQueue
        self.resolverPool = resolverPool
        self.registered = registered
        self.engine = engine
        self.resolver = resolver
        self.limits = limits
        self.logger = logger
        self.startedAt = .now
        self.access = access
        self.counters = counters
    }

    /// A successful reply's members after `id` and `ok`: a small object, or a writer for the
    /// large replies (register, list, resolve, stats), which never become a `JSONValue` tree.
    enum ReplyBody {
        case members(JSONObject)
        case written(estimatedBytes: Int, (inout JSONWriter) -> Void)
    }

    /// The reply line (newline included) for one decoded request; `watch` is answered by the
    /// caller (it streams).
    public func reply(_ env: RequestEnvelope, peer who: PeerIdentity) async -> ByteBuffer {
        let policy = access.load()
        let result: Result<ReplyBody, ProtocolError>
        if let denial = AccessControl.check(who, has: AccessControl.requiredRole(env.request), for: env.request.op, policy: policy) {
            result = .failure(denial)
        } else {
            switch env.request {
            case .register(let specs, let consumer): result = await register(specs, consumer: consumer, who: who, policy: policy)
            case .unregister(let ids, let consumer):
                result = await unregister(ids: ids, consumer: consumer, who: who, policy: policy).map { .members($0) }
            case .list(let consumer): result = .success(list(consumer: consumer))
            case .stats, .status: result = readOnlyResult(env.request)  // the event loop answers most (`replyWithoutWaiting`)
            case .resolve(let specs): result = await resolveChecked(specs, who: who, policy: policy)
            case .watch(_, let ids): result = stats(ids: ids)  // the server streams; see `watchEvent`
            }
        }
        return line(for: env, who: who, result)
    }

    /// The reply line for `stats` and `status`, which read the published snapshot and the
    /// counters and wait for nothing; nil for every other request. The event loop that read the
    /// line calls this directly (see `ImmediateReplies`).
    func replyWithoutWaiting(_ env: RequestEnvelope, peer who: PeerIdentity) -> ByteBuffer? {
        switch env.request {
        case .stats, .status: break
        default: return nil
        }
        if let denial = AccessControl.check(who, has: AccessControl.requiredRole(env.request), for: env.request.op,
                                            policy: access.load()) {
            return line(for: env, who: who, .failure(denial))
        }
        return line(for: env, who: who, readOnlyResult(env.request))
    }

    private func readOnlyResult(_ request: Request) -> Result<ReplyBody, ProtocolError> {
        if case .stats(let ids, let versions, let consumer) = request {
            return stats(ids: ids, consumer: consumer, versions: versions)
        }
        return .success(.members(status()))
    }

    /// The reply line for `result`: `{"id", "ok": true, …body}`, or the error reply, with the
    /// failure logged and a denial counted.
    private func line(for env: RequestEnvelope, who: PeerIdentity, _ result: Result<ReplyBody, ProtocolError>) -> ByteBuffer {
        switch result {
        case .success(let body):
            switch body {
            case .members(let payload): return ByteBuffer(bytes: JSONSerializer.serializeLine(Reply.success(id: env.id, payload)))
            case .written(let estimate, let write):
                var w = JSONWriter(reservingCapacity: estimate + 64)
                w.beginObject()
                if let id = env.id { w.field("id", id) }
                w.field("ok", true)
                write(&w)
                w.endObject()
                // Straight into the buffer the channel sends (a large reply was copied twice).
                return w.withLine { ByteBuffer(bytes: $0) }
            }
        case .failure(let error):
            if error.code == .permissionDenied || error.code == .probeLimitExceeded {
                counters.accessDenied.add(1, ordering: .relaxed)
                logger.warning("access denied", metadata: ["op": "\(env.request.op)", "error_code": "\(error.code)",
                                                           "peer_pid": "\(who.peer.pid)", "peer_uid": "\(who.peer.uid)",
                                                           "reason": "\(error.message)"])
            } else {
                logger.notice("request failed", metadata: ["op": "\(env.request.op)", "error_code": "\(error.code)",
                                                           "peer_pid": "\(who.peer.pid)", "peer_uid": "\(who.peer.uid)"])
            }
            return ByteBuffer(bytes: JSONSerializer.serializeLine(Reply.failure(id: env.id, error)))
        }
    }

    /// One `watch` event: `stats` with `"event": "stats"`, each rate over the interval since the
    /// previous event (`previous`: hits then, updated here) instead of since registration.
    /// `failed`: the line is an error reply and the stream ends.
    func watchEvent(_ env: RequestEnvelope, peer who: PeerIdentity, previous: inout [String: UInt64],
                    seconds: Double) -> (line: ByteBuffer, failed: Bool) {
        guard case .watch(_, let ids) = env.request else { return (ByteBuffer(), true) }
        let result: Result<ReplyBody, ProtocolError>
        if let denial = AccessControl.check(who, has: AccessControl.requiredRole(env.request), for: env.request.op,
                                            policy: access.load()) {
            result = .failure(denial)
        } else {
            switch engine.statsTable(ids: ids) {
            case .failure(let e): result = .failure(Self.protocolError(e))
            case .success(let table):
                let before = previous
                previous = Dictionary(zip((0..<table.count).lazy.map(table.id), table.hits), uniquingKeysWith: { a, _ in a })
                result = .success(.written(estimatedBytes: table.count * 48) { w in
                    w.field("event", "stats")
                    Self.writeStats(table, versions: false, into: &w) { i in
                        guard let was = before[table.id(i)], seconds > 0 else { return table.rates[i] }
                        return Double(table.hits[i] &- was) / seconds
                    }
                })
            }
        }
        let failed: Bool
        if case .failure = result { failed = true } else { failed = false }
        return (line(for: env, who: who, result), failed)
    }

    /// `resolve` reads ELF files for the peer: a non-admin only learns about files it can read.
    func resolveChecked(_ specs: [ProbeSpec], who: PeerIdentity, policy: AccessPolicy) async -> Result<ReplyBody, ProtocolError> {
        let inputs = specs.map(Self.input)
        if let denial = AccessControl.checkSpecs(who, specs: inputs, systemWideOK: true, policy: policy) {
            return .failure(denial)
        }
        return await resolve(inputs).flatMap { resolved in
            let items = zip(inputs, resolved).map { RegisterItem(spec: $0, targets: $1) }
            if let denial = AccessControl.checkTargets(who, items: items, held: nil, policy: policy) { return .failure(denial) }
            let targets = resolved.flatMap { $0 }
            return .success(.written(estimatedBytes: targets.count * 128) { w in
                w.objects("probes", targets) { w, t in Self.writeTarget(t, into: &w) }
            })
        }
    }

    // MARK: - ops

    static func input(_ s: ProbeSpec) -> ProbeSpecInput {
        ProbeSpecInput(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                       retprobe: s.retprobe, force: s.force, follow: s.follow)
    }


    /// Resolves every spec on `resolverPool`; the first failure fails the request and names the spec.
    func resolve(_ specs: [ProbeSpecInput]) async -> Result<[[ResolvedProbe]], ProtocolError> {
        let resolver = self.resolver
        let results: [Result<[ResolvedProbe], ResolveError>]
        do {
            // One open per (path, pid) for the whole request: see Resolver.resolveMany.
            results = try await resolverPool.runIfActive { resolver.resolveMany(specs) }
        } catch {
            return .failure(ProtocolError(.shuttingDown, "uprobed is stopping; the probes were not resolved"))
        }
        var out: [[ResolvedProbe]] = []
        out.reserveCapacity(specs.count)
        var total = 0
        for (n, result) in results.enumerated() {
            do {
                let targets = try result.get()
                total += targets.count
                if total > limits.maxProbesPerRequest * 4 {
                    return .failure(ProtocolError(.tooManyProbes, "the request expands to more than \(limits.maxProbesPerRequest * 4) probes",
                                                  details: ["probe": .int(Int64(n))]))
                }
                out.append(targets)
            } catch {
                return .failure(ProtocolError(error.code, "probes[\(n)]: \(error.message)",
                                              details: ["probe": .int(Int64(n))]))
            }
        }
        return .success(out)
    }

    /// The members describing one resolved site (inside an object the caller opened).
    static func writeTarget(_ t: ResolvedProbe, into w: inout JSONWriter) {
        w.field("path", t.path)
        w.field("offset", t.fileOffset)
        if let s = t.symbol { w.field("symbol", s) }
        if !t.aliases.isEmpty { w.field("aliases", strings: t.aliases) }
        if let b = t.buildID { w.field("build_id", b) }
        if let r = t.refCtrOffset { w.field("ref_ctr_offset", r) }
        if let warning = t.warning { w.field("warning", warning) }
    }

    /// The members describing a registration: its id, its (first) site, all sites if there are
    /// several, its state if it is not active. The object is left open for more members.
    static func writeRecord(_ r: ProbeRecord, into w: inout JSONWriter) {
        w.field("id", r.id)
        if let first = r.targets.first { writeTarget(first, into: &w) }
        if r.targets.count > 1 {
            w.objects("sites", r.targets) { w, t in writeTarget(t, into: &w) }
        }
        if let reason = r.state.reason {
            w.field("state", r.state.name)
            w.field("reason", reason)
        }
    }

    /// A register reply's `probes` value: one object per registration (`writeRecord`).
    static func writeRegistered(_ records: [ProbeRecord], into w: inout JSONWriter) {
        w.beginArray()
        for r in records {
            w.beginObject()
            writeRecord(r, into: &w)
            w.endObject()
        }
        w.endArray()
    }

    func register(_ specs: [ProbeSpec], consumer: String?, who: PeerIdentity, policy: AccessPolicy) async -> Result<ReplyBody, ProtocolError> {
        let peer = who.peer
        let inputs = specs.map(Self.input)
        if let denial = AccessControl.checkSpecs(who, specs: inputs, systemWideOK: false, policy: policy) {
            return .failure(denial)
        }
        let resolved: [[ResolvedProbe]]
        switch await resolve(inputs) {
        case .failure(let e): return .failure(e)
        case .success(let r): resolved = r
        }
        let items = zip(inputs, resolved).map { RegisterItem(spec: $0, targets: $1) }
        let adding = items.reduce(0) { $0 + $1.probeCount }
        let isAdmin = policy.role(of: who) == .admin
        if !isAdmin {
            // Reserve first, then count: two concurrent requests of one uid both see each other.
            let pending = inFlight.add(uid: peer.uid, adding)
            let held = engine.read { s, _ in s.probes.values.reduce(0) { $0 + ($1.owner.uid == peer.uid ? 1 : 0) } } + pending - adding
            if let denial = AccessControl.checkTargets(who, items: items, held: held, policy: policy) {
                inFlight.add(uid: peer.uid, -adding)
                return .failure(denial)
            }
        }
        defer { if !isAdmin { inFlight.add(uid: peer.uid, -adding) } }
        let ahead = PreparedReply()
        let queue = aheadQueue
        switch await engine.register(items, consumer: consumer, peer: peer, early: { ahead.start($0, on: queue) }) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let records):
            registered(records)
            // One line per request: a 10,000-probe request would otherwise log 10,000 lines.
            logger.info("probes registered", metadata: [
                "count": "\(records.count)", "probe_id": "\(records.first?.id ?? "")", "last_probe_id": "\(records.last?.id ?? "")",
                "path": "\(records.first?.sites.first?.target.path ?? "")", "consumer": "\(consumer ?? "")", "peer_uid": "\(peer.uid)"])
            if logger.logLevel <= .debug {  // checked once, not 10,000 times for a large request
                for r in records {
                    logger.debug("probe registered", metadata: ["probe_id": "\(r.id)", "path": "\(r.sites.first?.target.path ?? "")"])
                }
            }
            if let text = ahead.take(for: records) {
                return .success(.written(estimatedBytes: text.count) { w in
                    w.key("probes")
                    text.withUnsafeBufferPointer { w.rawValue($0) }
                })
            }
            return .success(.written(estimatedBytes: records.count * 128) { w in
                w.key("probes")
                Self.writeRegistered(records, into: &w)
            })
        }
    }

    func unregister(ids: [String]?, consumer: String?, who: PeerIdentity, policy: AccessPolicy) async -> Result<JSONObject, ProtocolError> {
        let peer = who.peer
        let isAdmin = policy.role(of: who) == .admin
        // Non-admins may remove only their own probes; the engine asks for each selected probe.
        let authorize: @Sendable (ProbeRecord) -> Bool = { r in isAdmin || r.owner.uid == peer.uid }
        switch await engine.unregister(ids: ids, consumer: consumer, peer: peer, authorize: authorize) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let removal):
            logger.info("probes unregistered", metadata: ["count": "\(removal.count)", "consumer": "\(consumer ?? "")", "peer_uid": "\(peer.uid)"])
            var reply: JSONObject = ["removed": .int(Int64(removal.count))]
            if let why = removal.unsaved {
                // Removed all the same: saying otherwise would have the client retry a removal
                // that happened, or believe its probes still count.
                logger.warning("probes unregistered but not saved", metadata: ["count": "\(removal.count)", "reason": "\(why)"])
                reply["warning"] = .string("removed, but not saved yet (\(why)); a restart before the next successful save would bring them back")
            }
            return .success(reply)
        }
    }

    /// Written inside the read section: the records are read where the tree lends them, not
    /// retained one by one into a list first.
    func list(consumer: String?) -> ReplyBody {
        let text = engine.read { snap, _ -> [UInt8] in
            let probes = snap.probes.sorted(where: { consumer == nil || $0.consumer == consumer })
            var w = JSONWriter(reservingCapacity: probes.count * 256)
            w.beginArray()
            for r in probes {
                w.beginObject()
                Self.writeRecord(r, into: &w)
                w.key("spec")
                ProbeSpec(r.spec).write(into: &w)
                if let c = r.consumer { w.field("consumer", c) }
                w.field("owner_uid", Int64(r.owner.uid))
                w.field("registered_at", r.registeredAt)
                // Whether the probe follows its path through file replacements (see PathWatcher).
                w.field("follow", r.follows)
                w.endObject()
            }
            w.endArray()
            return w.bytes
        }
        return .written(estimatedBytes: text.count) { w in
            w.key("probes")
            text.withUnsafeBufferPointer { w.rawValue($0) }
        }
    }

    func stats(ids: [String]?, consumer: String? = nil, versions: Bool = false) -> Result<ReplyBody, ProtocolError> {
        switch engine.statsTable(ids: ids, consumer: consumer, allVersions: versions) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let table):
            return .success(.written(estimatedBytes: table.count * 48) { w in
                Self.writeStats(table, versions: versions, into: &w) { table.rates[$0] }
            })
        }
    }

    /// The `stats` member: per probe its id, hits, rate (from `rate`, rounded to 1/1000), its
    /// state if not active, and the per-file breakdown when asked for or when there is more
    /// than one file (an upgrade in progress) — a 10,000-probe reply stays small. A plain row
    /// (see `StatsTable`) is written from its id number without touching its record.
    static func writeStats(_ table: StatsTable, versions: Bool, into w: inout JSONWriter,
                           rate: (Int) -> Double) {
        w.key("stats")
        w.beginArray()
        for i in 0..<table.count {
            if let number = table.plainID(i) {
                // In one go: an id `p<N>` and two numbers, nothing to escape.
                w.unchecked(maxBytes: 32 + 3 * JSONWriter.Unchecked.numberBytes) { t in
                    t.literal("{\"id\":\"p")
                    t.digits(number)
                    t.literal("\",\"hits\":")
                    t.digits(table.hits[i])
                    t.literal(",\"rate\":")
                    t.fixed(rate(i), decimals: 3)
                    t.literal("}")
                }
                continue
            }
            guard let d = table.detail(i) else { continue }
            w.beginObject()
            w.field("id", d.record.id)
            w.field("hits", table.hits[i])
            w.key("rate")
            w.fixed(rate(i), decimals: 3)
            if let reason = d.record.state.reason {
                w.field("state", d.record.state.name)
                w.field("reason", reason)
            }
            if let breakdown = d.versions, versions || breakdown.count > 1 {
                w.objects("versions", breakdown) { w, v in
                    w.field("path", v.version.path)
                    w.field("device", v.version.device)
                    w.field("inode", v.version.inode)
                    if let b = v.version.buildID { w.field("build_id", b) }
                    w.field("hits", v.hits)
                    w.field("current", v.current)
                    if v.retired { w.field("retired", true) }
                }
                // Retired versions beyond the newest few are kept as one count and one sum.
                let older = d.record.retired
                if older.olderCount > 0 {
                    w.key("older_versions")
                    w.beginObject()
                    w.field("retired", Int64(older.olderCount))
                    w.field("hits", older.olderHits)
                    w.endObject()
                }
            }
            w.endObject()
        }
        w.endArray()
    }

    func status() -> JSONObject {
        engine.read { s, uprobes in status(s, uprobes: uprobes) }
    }

    private func status(_ s: borrowing RegistrySnapshot, uprobes: Int) -> JSONObject {
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
        o["uprobes"] = JSONValue(uprobes)
        o["links"] = JSONValue(s.linksOpen)
        o["slots_in_use"] = JSONValue(s.slotsInUse)
        o["slot_capacity"] = JSONValue(UInt64(s.slotCapacity))
        o["batching"] = .object(batching)
        o["degraded"] = JSONValue(s.probes.values.reduce(0) { $0 + ($1.state == .active ? 0 : 1) })
        var service = JSONObject()
        service["access_denied"] = JSONValue(counters.accessDenied.load(ordering: .relaxed))
        service["connections"] = JSONValue(counters.connectionsOpen.load(ordering: .relaxed))
        service["connections_refused"] = JSONValue(counters.connectionsRefused.load(ordering: .relaxed))
        service["replies_on_event_loop"] = JSONValue(counters.repliesOnEventLoop.load(ordering: .relaxed))
        service["state_writes"] = JSONValue(counters.stateWrites.load(ordering: .relaxed))
        service["state_syncs"] = JSONValue(counters.stateSyncs.load(ordering: .relaxed))
        service["state_write_failures"] = JSONValue(counters.stateWriteFailures.load(ordering: .relaxed))
        service["state_unsaved_removals"] = JSONValue(counters.stateUnsavedRemovals.load(ordering: .relaxed))
        service["state_reserve_bytes"] = JSONValue(counters.stateReserveBytes.load(ordering: .relaxed))
        service["config_reloads"] = JSONValue(counters.configReloads.load(ordering: .relaxed))
        service["config_reload_failures"] = JSONValue(counters.configReloadFailures.load(ordering: .relaxed))
        o["service"] = .object(service)
        o["elf_cache"] = .object(["files": JSONValue(resolver.cache.count), "bytes": JSONValue(resolver.cache.bytes),
                          "budget": JSONValue(resolver.cache.byteBudget)])
        return o
    }

    static func protocolError(_ e: EngineError) -> ProtocolError {
        var details = JSONObject()
        if let i = e.probeIndex { details["probe"] = .int(Int64(i)) }
        return ProtocolError(e.code, e.message, details: details)
    }
}

extension ProbeSpec {
    /// The wire form of a resolver spec (the inverse of `RequestHandler.input`).
    init(_ s: ProbeSpecInput) {
        self.init(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                  retprobe: s.retprobe, force: s.force, follow: s.follow)
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
    /// Unregistered probes whose removal is not on disk yet (a restart now would bring them back).
    public let stateUnsavedRemovals = Atomic<Int>(0)
    /// Bytes of the state directory's space reserve (0: used up by a full disk, or not made).
    public let stateReserveBytes = Atomic<Int>(0)
    /// fsyncs of the state log by group commit (each covers one or more batches).
    public let stateSyncs = Atomic<UInt64>(0)
    public let configReloads = Atomic<UInt64>(0)
    public let configReloadFailures = Atomic<UInt64>(0)
    public let metricsScrapes = Atomic<UInt64>(0)
    /// Client connections being served now.
    public let connectionsOpen = Atomic<Int>(0)
    /// Connections turned away because `max_connections` were open.
    public let connectionsRefused = Atomic<UInt64>(0)
    /// `stats` and `status` requests answered by the event loop that read them (`ImmediateReplies`).
    public let repliesOnEventLoop = Atomic<UInt64>(0)
    public init() {}
}

/// The `probes` member of a large register's reply, written on the encode-ahead queue from
/// the records the engine made during the attach (`Engine.register`'s `early`): the reply is
/// ready when the batch is durable instead of being written after the sync. Never waited
/// for: if it is not done (or the request failed), the reply is written as usual.
final class PreparedReply: Sendable {
    private let written = Mutex<(records: [ProbeRecord], text: [UInt8])?>(nil)

    func start(_ records: [ProbeRecord], on queue: DispatchQueue) {
        queue.async {
            var w = JSONWriter(reservingCapacity: records.count * 128)
            RequestHandler.writeRegistered(records, into: &w)
            let text = w.bytes
            self.written.withLock { $0 = (records, text) }
        }
    }

    /// The text, if it is done and was written for exactly `records`.
    func take(for records: [ProbeRecord]) -> [UInt8]? {
        written.withLock { done in
            guard let done, done.records.count == records.count,
                  zip(done.records, records).allSatisfy({ $0 === $1 }) else { return nil }
            return done.text
        }
    }
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
