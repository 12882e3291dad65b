import Foundation
import Logging
import NIOCore
import Synchronization
import UprobeCore
import UprobeELF
import UprobeKernel
import UprobedProtocol

/// How replies are written: sites, registrations, stats rows and the status object.
extension RequestHandler {
    /// The members describing one resolved site (inside an object the caller opened).
    static func writeTarget(_ t: ResolvedProbe, into w: inout JSONWriter) {
        w.field("path", t.path)
        w.field("offset", t.fileOffset)
        t.withSymbolUTF8 { w.field("symbol", utf8: $0) }
        if !t.aliases.isEmpty { w.field("aliases", strings: t.aliases) }
        if let b = t.buildID { w.field("build_id", b) }
        if let r = t.refCtrOffset { w.field("ref_ctr_offset", r) }
        if let warning = t.warning { w.field("warning", warning) }
    }

    /// The functions the request's globs skipped, each with the index of its spec.
    static func skipped(_ resolutions: [Resolution]) -> [(probe: Int, site: SkippedSite)] {
        resolutions.enumerated().flatMap { n, r in r.skipped.map { (probe: n, site: $0) } }
    }

    /// `skipped_count` and `skipped` (each function a glob left out because x86 uprobes cannot
    /// probe its first instruction: spec index, path, symbol, offset, reason); nothing when no
    /// glob skipped any.
    static func writeSkipped(_ skipped: [(probe: Int, site: SkippedSite)], into w: inout JSONWriter) {
        guard !skipped.isEmpty else { return }
        w.field("skipped_count", Int64(skipped.count))
        w.objects("skipped", skipped) { w, s in
            w.field("probe", Int64(s.probe))
            w.field("path", s.site.path)
            if let name = s.site.symbol { w.field("symbol", name) }
            w.field("offset", s.site.fileOffset)
            w.field("reason", s.site.reason)
        }
    }

    /// The members describing a registration: its id, its (first) site, all sites if there are
    /// several, its state if it is not active. The object is left open for more members.
    static func writeRecord(_ r: ProbeRecord, into w: inout JSONWriter) {
        // From the id's number: a record makes its id string when asked.
        if let n = r.number {
            w.key("id")
            w.string("p", number: n)
        } else {
            w.field("id", r.id)
        }
        if let first = r.firstTarget { writeTarget(first, into: &w) }
        if r.targetCount > 1 {
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

    /// A register reply's compact members: `"reply": "compact"`, `count` (probes registered),
    /// `files` (per file: what its probes share once — path, device, inode, build_id — their
    /// number and sites, and their ids as ranges `{"first", "last"}` of consecutive numbers),
    /// and `warnings` (`{"id", "warning"}`, only for probes that have one). 241,363 probes of
    /// one glob are one file with one range, where the full form was 61 MB; the per-probe
    /// detail is in `list` (filters and paging).
    static func writeCompactRegistered(_ records: [ProbeRecord], into w: inout JSONWriter) {
        struct FileKey: Hashable {
            var path: String, device: UInt64, inode: UInt64, buildID: String?
        }
        struct Group {
            var key: FileKey
            var count = 0, sites = 0
            /// Runs of consecutive ids, as the positions in `records` of their first and last
            /// records (ids are made when written).
            var ranges: [(first: Int, last: Int)] = []
            /// The id number of the last record counted.
            var lastNumber: UInt64?
        }
        var groups: [Group] = []
        var index: [FileKey: Int] = [:]
        var warnings: [(String, String)] = []
        // The last record's file object and group: the records of one glob share the object,
        // so its key (two strings to retain, hash and compare) is made once per run, not per
        // record. The reply of a whole binary waited ~25 ms for this loop.
        var last: (file: ResolvedFile, group: Int)?
        for (k, r) in records.enumerated() {
            let t = r.firstTarget ?? r.sites.first?.target
            let g: Int
            if let last, let t, last.file === t.file {
                g = last.group
            } else {
                let key = FileKey(path: t?.path ?? r.spec.path, device: t?.device ?? 0, inode: t?.inode ?? 0, buildID: t?.buildID)
                if let known = index[key] {
                    g = known
                } else {
                    g = groups.count
                    groups.append(Group(key: key))
                    index[key] = g
                }
                last = t.map { ($0.file, g) }
            }
            groups[g].count += 1
            groups[g].sites += max(r.sites.count, 1)
            let n = r.number
            if let n, let i = groups[g].ranges.indices.last, groups[g].lastNumber.map({ $0 &+ 1 == n }) == true {
                groups[g].ranges[i].last = k
            } else {
                groups[g].ranges.append((k, k))
            }
            groups[g].lastNumber = n
            if r.targetCount == 1 {  // without making a targets array per record
                if let warning = t?.warning { warnings.append((r.id, warning)) }
            } else {
                for t in r.targets { if let warning = t.warning { warnings.append((r.id, warning)) } }
            }
        }
        w.field("reply", "compact")
        w.field("count", Int64(records.count))
        w.objects("files", groups) { w, g in
            w.field("path", g.key.path)
            w.field("device", g.key.device)
            w.field("inode", g.key.inode)
            if let b = g.key.buildID { w.field("build_id", b) }
            w.field("count", Int64(g.count))
            w.field("sites", Int64(g.sites))
            w.objects("ids", g.ranges) { w, range in
                w.field("first", records[range.first].id)
                w.field("last", records[range.last].id)
            }
        }
        if !warnings.isEmpty {
            w.objects("warnings", warnings) { w, item in
                w.field("id", item.0)
                w.field("warning", item.1)
            }
        }
    }

    /// The `stats` member: per probe its id, hits, rate (from `rate`, rounded to 1/1000), its
    /// state if not active, and the per-file breakdown when asked for or when there is more
    /// than one file (an upgrade in progress) — a 10,000-probe reply stays small. A plain row
    /// (see `StatsTable`) is written from its id number without touching its record.
    /// A latency probe's entry carries `latency` (`latency(i)`: the totals, or a `watch`
    /// interval's), with its non-empty buckets when `buckets`.
    static func writeStats(_ table: StatsTable, versions: Bool, buckets: Bool = false, into w: inout JSONWriter,
                           rate: (Int) -> Double, latency: (Int) -> LatencyHistogram? = { _ in nil }) {
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
            if let h = latency(i) { writeLatency(h, buckets: buckets, into: &w) }
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
        service["otlp_exports"] = JSONValue(counters.otlpExports.load(ordering: .relaxed))
        service["otlp_export_failures"] = JSONValue(counters.otlpExportFailures.load(ordering: .relaxed))
        o["service"] = .object(service)
        if let p = counters.pins.withLock({ $0 }) {
            var pins = JSONObject()
            pins["dir"] = .string(p.directory)
            pins["adopted_links"] = JSONValue(p.adoptedLinks)
            pins["adopted_probes"] = JSONValue(p.adoptedProbes)
            pins["rebuilt_probes"] = JSONValue(p.rebuiltProbes)
            pins["stale_links"] = JSONValue(p.staleLinks)
            pins["migrated_links"] = JSONValue(p.migratedLinks)
            pins["adopted_latency_links"] = JSONValue(p.adoptedLatencyLinks)
            pins["latency_pins_removed"] = JSONValue(p.latencyPinsRemoved)
            if let from = p.resizedFrom { pins["resized_from"] = .int(Int64(from)) }
            pins["handoffs_ended"] = JSONValue(p.handoffsEnded)
            pins["objects_adopted"] = .array(p.objectsAdopted.map { .string($0) })
            pins["objects_created"] = .array(p.objectsCreated.map { .string($0) })
            pins["reconcile_us"] = .int(p.micros)
            o["pins"] = .object(pins)
        }
        if let sets = probeSets {
            var held: [ProbeSetMark: Int] = [:]
            for r in s.probes.values { if let m = ProbeSetMark(r.probeSet) { held[m, default: 0] += 1 } }
            o["probe_sets"] = sets.table.json(held: held)
        }
        o["elf_cache"] = .object(["files": JSONValue(resolver.cache.count), "bytes": JSONValue(resolver.cache.bytes),
                          "budget": JSONValue(resolver.cache.byteBudget)])
        if let t = resolver.names?.totals {
            o["names_compacted"] = .object(["buffers": JSONValue(t.buffers), "plain_bytes": JSONValue(t.plainBytes),
                                            "stored_bytes": JSONValue(t.storedBytes), "cpu_us": JSONValue(t.cpuMicros)])
        }
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
                  retprobe: s.retprobe, force: s.force, follow: s.follow, latency: s.latency)
    }
}

extension RequestHandler {
    /// The `latency` member of a `stats` entry: exact counts, the sum, min and max, and
    /// percentiles (the middle of the bucket holding them: within 1/16 of the true value, see
    /// `LatencyHistogram`; null while no call has returned); with `buckets`, the non-empty
    /// buckets as [lower_ns, upper_ns, count] (upper null for the overflow bucket, >= 2^42 ns).
    static func writeLatency(_ h: LatencyHistogram, buckets: Bool, into w: inout JSONWriter) {
        w.key("latency")
        w.beginObject()
        w.field("calls", h.calls)
        w.field("returns", h.returns)
        w.field("in_flight", h.inFlight)
        w.field("unobserved", h.unobserved)
        w.field("sum_ns", h.sumNanoseconds)
        for (name, value) in [("min_ns", h.returns > 0 ? h.minNanoseconds : nil), ("max_ns", h.returns > 0 ? h.maxNanoseconds : nil)] as [(StaticString, UInt64?)] {
            w.key(name)
            if let value { w.uint(value) } else { w.null() }
        }
        for (name, q) in Self.latencyQuantiles {
            w.key(name)
            if let v = h.quantile(q) { w.uint(v) } else { w.null() }
        }
        if buckets {
            w.key("buckets")
            w.beginArray()
            for b in h.nonEmptyBuckets {
                w.beginArray()
                w.uint(b.lower)
                if let upper = b.upper { w.uint(upper) } else { w.null() }
                w.uint(b.count)
                w.endArray()
            }
            w.endArray()
        }
        w.endObject()
    }

    static let latencyQuantiles: [(StaticString, Double)] = [("p50_ns", 0.5), ("p90_ns", 0.9), ("p99_ns", 0.99), ("p999_ns", 0.999)]
}

/// What a `watch` stream remembers of its previous event: each probe's hits (for rates over
/// the interval) and latency probes' histograms (for the interval's calls).
struct WatchMemory {
    var hits: [String: UInt64] = [:]
    var latency: [String: LatencyHistogram] = [:]
    init() {}
    init(_ table: StatsTable) {
        hits = Dictionary(zip((0..<table.count).lazy.map(table.id), table.hits), uniquingKeysWith: { a, _ in a })
        for i in 0..<table.count { if let h = table.detail(i)?.latency { latency[table.id(i)] = h } }
    }
}
