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
    public static let version = UprobedVersion.current

    /// Where a large register's reply is written while the writer attaches its probes.
    let aheadQueue: DispatchQueue
    /// Where the files peers name are opened and parsed. Never the task pool (two threads on
    /// two CPUs, shared by every connection): a file on a hung network mount blocks open(2)
    /// whatever its flags, and would stall every client. Here it holds one pool thread.
    let resolverPool: NIOThreadPool
    /// Told of every successful registration (the ownership watcher checks new `pid` filters).
    let registered: @Sendable ([ProbeRecord]) -> Void
    /// The probe sets (`apply`, and `status`'s `probe_sets`); nil where none are served.
    let probeSets: ProbeSets?

    public init(engine: Engine, resolver: UprobeELF.Resolver, limits: RequestDecoder.Limits, logger: Logger,
                access: PolicyCell = PolicyCell(AccessPolicy(config: DaemonConfig())),
                counters: ServiceCounters = ServiceCounters(), aheadQueue: DispatchQueue = .global(),
                resolverPool: NIOThreadPool = .singleton,
                registered: @escaping @Sendable ([ProbeRecord]) -> Void = { _ in }, probeSets: ProbeSets? = nil) {
        self.probeSets = probeSets
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
            case .register(let specs, let consumer, let form):
                result = await register(specs, consumer: consumer, form: form, who: who, policy: policy)
            case .unregister(let ids, let consumer, let match):
                result = await unregister(ids: ids, consumer: consumer, match: match, who: who, policy: policy).map { .members($0) }
            case .list(let consumer, let query): result = .success(list(consumer: consumer, query: query))
            case .stats, .status: result = readOnlyResult(env.request)  // the event loop answers most (`replyWithoutWaiting`)
            case .resolve(let specs): result = await resolveChecked(specs, who: who, policy: policy)
            case .apply(let set, let specs, let dryRun):
                result = await apply(set: set, specs: specs, dryRun: dryRun, who: who, policy: policy)
            case .watch(_, let ids, let buckets): result = stats(ids: ids, buckets: buckets)  // the server streams; see `watchEvent`
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
        if case .stats(let ids, let versions, let consumer, let query, let buckets) = request {
            return stats(ids: ids, consumer: consumer, versions: versions, query: query, buckets: buckets)
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
    func watchEvent(_ env: RequestEnvelope, peer who: PeerIdentity, previous: inout WatchMemory,
                    seconds: Double) -> (line: ByteBuffer, failed: Bool) {
        guard case .watch(_, let ids, let buckets) = env.request else { return (ByteBuffer(), true) }
        let result: Result<ReplyBody, ProtocolError>
        if let denial = AccessControl.check(who, has: AccessControl.requiredRole(env.request), for: env.request.op,
                                            policy: access.load()) {
            result = .failure(denial)
        } else {
            switch engine.statsTable(ids: ids) {
            case .failure(let e): result = .failure(Self.protocolError(e))
            case .success(let table):
                let before = previous
                previous = WatchMemory(table)
                result = .success(.written(estimatedBytes: table.count * 48) { w in
                    w.field("event", "stats")
                    Self.writeStats(table, versions: false, buckets: buckets, into: &w, rate: { i in
                        guard let was = before.hits[table.id(i)], seconds > 0 else { return table.rates[i] }
                        return Double(table.hits[i] &- was) / seconds
                    }, latency: { i in
                        // The calls that returned in the interval (all of them on the first event).
                        guard let now = table.detail(i)?.latency else { return nil }
                        guard let was = before.latency[table.id(i)] else { return now }
                        return now.since(was)
                    })
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
        return await resolve(inputs).flatMap { resolutions in
            let items = zip(inputs, resolutions).map { RegisterItem(spec: $0, targets: $1.probes) }
            if let denial = AccessControl.checkTargets(who, items: items, held: nil, policy: policy) { return .failure(denial) }
            let targets = resolutions.flatMap(\.probes)
            let skipped = Self.skipped(resolutions)
            return .success(.written(estimatedBytes: targets.count * 128 + skipped.count * 256) { w in
                w.objects("probes", targets) { w, t in Self.writeTarget(t, into: &w) }
                Self.writeSkipped(skipped, into: &w)
            })
        }
    }

    // MARK: - ops

    static func input(_ s: ProbeSpec) -> ProbeSpecInput {
        ProbeSpecInput(path: s.path, symbol: s.symbol, offset: s.offset, usdt: s.usdt, pid: s.pid,
                       retprobe: s.retprobe, force: s.force, follow: s.follow, latency: s.latency)
    }


    /// Resolves every spec on `resolverPool`; the first failure fails the request and names the spec.
    func resolve(_ specs: [ProbeSpecInput]) async -> Result<[Resolution], ProtocolError> {
        let resolver = self.resolver
        let results: [Result<Resolution, ResolveError>]
        do {
            // One open per (path, pid) for the whole request: see Resolver.resolveMany.
            results = try await resolverPool.runIfActive { resolver.resolutions(specs) }
        } catch {
            return .failure(ProtocolError(.shuttingDown, "uprobed is stopping; the probes were not resolved"))
        }
        var out: [Resolution] = []
        out.reserveCapacity(specs.count)
        var total = 0
        for (n, result) in results.enumerated() {
            do {
                let targets = try result.get()
                total += targets.probes.count
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

    func register(_ specs: [ProbeSpec], consumer: String?, form: RegisterReplyForm = .auto, who: PeerIdentity,
                  policy: AccessPolicy) async -> Result<ReplyBody, ProtocolError> {
        let peer = who.peer
        let inputs = specs.map(Self.input)
        if let denial = AccessControl.checkSpecs(who, specs: inputs, systemWideOK: false, policy: policy) {
            return .failure(denial)
        }
        let resolutions: [Resolution]
        let resolveStarted = ContinuousClock.now
        switch await resolve(inputs) {
        case .failure(let e): return .failure(e)
        case .success(let r): resolutions = r
        }
        let resolved = ContinuousClock.now
        let items = zip(inputs, resolutions).map { RegisterItem(spec: $0, targets: $1.probes) }
        let skipped = Self.skipped(resolutions)
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
        // A compact reply is small and quick: nothing to write ahead of the attach.
        let compact = form.isCompact(probes: adding)
        let early: (@Sendable ([ProbeRecord]) -> Void)? = compact ? nil : { @Sendable records in ahead.start(records, on: queue) }
        switch await engine.register(items, consumer: consumer, peer: peer, early: early) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let records):
            registered(records)
            if records.count >= Self.releaseLaterMinimum {
                // The request's largest arrays are let go on another thread, not between the
                // engine's answer and the reply's write: dropping a whole binary's 241,000 records
                // (one cache miss each), targets and resolutions costs tens of milliseconds. The
                // 100 ms only keeps that work off the CPU while the reply is written; nothing
                // depends on it for correctness (the engine holds its own references).
                let held = (records, items, resolutions)
                DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + .milliseconds(100)) {
                    withExtendedLifetime(held) {}
                }
            }
            // One line per request: a 10,000-probe request would otherwise log 10,000 lines.
            logger.info("probes registered", metadata: [
                "resolve_us": "\((resolved - resolveStarted).microseconds)", "engine_us": "\((ContinuousClock.now - resolved).microseconds)",
                "count": "\(records.count)", "probe_id": "\(records.first?.id ?? "")", "last_probe_id": "\(records.last?.id ?? "")",
                "path": "\(records.first?.sites.first?.target.path ?? "")", "consumer": "\(consumer ?? "")", "peer_uid": "\(peer.uid)"])
            if logger.logLevel <= .debug {  // checked once, not 10,000 times for a large request
                for r in records {
                    logger.debug("probe registered", metadata: ["probe_id": "\(r.id)", "path": "\(r.sites.first?.target.path ?? "")"])
                }
            }
            if compact {
                return .success(.written(estimatedBytes: 512 + skipped.count * 256) { w in
                    Self.writeCompactRegistered(records, into: &w)
                    Self.writeSkipped(skipped, into: &w)
                })
            }
            if let text = ahead.take(for: records) {
                return .success(.written(estimatedBytes: text.count + skipped.count * 256) { w in
                    w.key("probes")
                    text.withUnsafeBufferPointer { w.rawValue($0) }
                    Self.writeSkipped(skipped, into: &w)
                })
            }
            return .success(.written(estimatedBytes: records.count * 128 + skipped.count * 256) { w in
                w.key("probes")
                Self.writeRegistered(records, into: &w)
                Self.writeSkipped(skipped, into: &w)
            })
        }
    }

    /// Registrations in one request from which its arrays are released after its reply.
    static let releaseLaterMinimum = 50_000

    func unregister(ids: [String]?, consumer: String?, match: ProbeMatch = ProbeMatch(), who: PeerIdentity,
                    policy: AccessPolicy) async -> Result<JSONObject, ProtocolError> {
        let peer = who.peer
        let isAdmin = policy.role(of: who) == .admin
        // Non-admins may remove only their own probes; the engine asks for each selected probe.
        let authorize: @Sendable (ProbeRecord) -> Bool = { r in isAdmin || r.owner.uid == peer.uid }
        let outcome: Result<Removal, EngineError>
        if let ids {
            if let owned = setOwned(ids) { return .failure(owned) }
            outcome = await engine.unregister(ids: ids, consumer: nil, peer: peer, authorize: authorize)
        } else {
            var selection = ProbeSelection(consumer: consumer, path: match.path, symbol: match.symbol)
            // A glob of a non-admin selects its own probes only ("every probe in libc" must not
            // fail because an admin probes libc too). A consumer alone names a group the peer
            // claims as a whole: someone else's probe in it is refused, as it always was.
            if !isAdmin && !match.isEmpty { selection.ownerUID = peer.uid }
            outcome = await engine.unregister(matching: selection, peer: peer, authorize: authorize)
        }
        switch outcome {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let removal):
            logger.info("probes unregistered", metadata: ["count": "\(removal.count)", "consumer": "\(consumer ?? "")", "peer_uid": "\(peer.uid)"])
            var reply: JSONObject = ["removed": .int(Int64(removal.count))]
            if !removal.leftInSets.isEmpty {
                // Matched but not removed: a set's probes are changed through the set.
                var left = JSONObject()
                for (mark, n) in removal.leftInSets.sorted(by: { $0.key < $1.key }) {
                    left[ProbeSetMark(mark)?.name ?? mark] = .int(Int64(n))
                }
                reply["left_in_sets"] = .object(left)
            }
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
    func list(consumer: String?, query: ListQuery = ListQuery()) -> ReplyBody {
        let (text, total) = engine.read { snap, _ -> ([UInt8], Int) in
            let probes = Self.listed(snap.probes, consumer: consumer, query: query)
            var w = JSONWriter(reservingCapacity: probes.page.count * 256)
            w.beginArray()
            for r in probes.page {
                w.beginObject()
                Self.writeRecord(r, into: &w)
                w.key("spec")
                ProbeSpec(r.spec).write(into: &w)
                if let c = r.consumer { w.field("consumer", c) }
                w.field("owner_uid", Int64(r.owner.uid))
                w.field("registered_at", r.registeredAt)
                // Whether the probe follows its path through file replacements (see PathWatcher).
                w.field("follow", r.follows)
                if let mark = ProbeSetMark(r.probeSet) {
                    w.field("set", mark.name)
                    w.field("set_source", mark.source.rawValue)
                }
                w.endObject()
            }
            w.endArray()
            return (w.bytes, probes.total)
        }
        return .written(estimatedBytes: text.count + 32) { w in
            w.key("probes")
            text.withUnsafeBufferPointer { w.rawValue($0) }
            if !query.isDefault { w.field("total", Int64(total)) }
        }
    }

    /// The registrations a `list` shows, in id order, and how many matched before paging.
    /// Unknown ids in `query.ids` are left out (a list reads what is there).
    static func listed(_ probes: ProbeMap, consumer: String?, query: ListQuery) -> (page: [ProbeRecord], total: Int) {
        var matcher = ProbeSelection(consumer: consumer, path: query.match.path, symbol: query.match.symbol).matcher()
        var page: [ProbeRecord] = []
        var total = 0
        let limit = query.limit ?? .max
        func consider(_ r: ProbeRecord) {
            guard matcher.matches(r) else { return }
            if total >= query.offset && page.count < limit { page.append(r) }
            total += 1
        }
        if let ids = query.ids {
            var seen = Set<String>()
            for id in ids where seen.insert(id).inserted {
                if let r = probes[id] { consider(r) }
            }
        } else {
            probes.forEach(consider)
        }
        return (page, total)
    }

    func stats(ids: [String]?, consumer: String? = nil, versions: Bool = false,
               query: StatsQuery = StatsQuery(), buckets: Bool = false) -> Result<ReplyBody, ProtocolError> {
        let match = query.match.isEmpty ? nil : ProbeSelection(path: query.match.path, symbol: query.match.symbol)
        let order = Self.order(query.effectiveSort)
        switch engine.statsTable(ids: ids, consumer: consumer, allVersions: versions, match: match, order: order, top: query.top) {
        case .failure(let e): return .failure(Self.protocolError(e))
        case .success(let table):
            return .success(.written(estimatedBytes: table.count * 48 + 32) { w in
                Self.writeStats(table, versions: versions, buckets: buckets, into: &w, rate: { table.rates[$0] },
                                latency: { table.detail($0)?.latency })
                if !query.isDefault { w.field("total", Int64(table.total)) }
            })
        }
    }

    /// The engine's order for a wire sort key.
    static func order(_ sort: StatsSort) -> StatsTable.Order {
        switch sort {
        case .id: return .id
        case .hits: return .hits
        case .rate: return .rate
        case .calls: return .calls
        case .p50: return .p50
        case .p99: return .p99
        case .max: return .max
        }
    }
}
