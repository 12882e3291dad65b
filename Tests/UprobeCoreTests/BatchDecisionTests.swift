import Foundation
import Logging
import Synchronization
import Testing
@testable import UprobeCore
import UprobeELF
import UprobeKernel
import UprobeTree

/// A kernel that records calls instead of attaching: for the batching *decisions* only (how
/// many links, which requests fail, when detach work runs). Counting itself is tested against
/// the real kernel in IntegrationTests and UprobeKernelTests.
final class FakeKernel: KernelBackend, @unchecked Sendable {
    // @unchecked: all state behind `lock`.
    let lock = NSLock()
    let capacity: UInt32
    var attaches: [(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool)] = []
    var closed = 0
    var closeRounds = 0
    var overlapCalls = 0
    var openLinks: [ObjectIdentifier: FakeLink] = [:]
    var failPaths: Set<String> = []
    /// A link holding any of these offsets fails (a request the kernel rejects inside a group).
    var failOffsets: Set<UInt64> = []
    var nextGeneration: UInt32 = 1
    /// When set, `closeAll` blocks until it is signalled (a grace period that takes its time).
    var closeGate: DispatchSemaphore?
    /// When set, signalled by each `closeAll` as it begins (before `closeGate`).
    var closeEntered: DispatchSemaphore?
    /// When set, `attach` signals `attachEntered` and then blocks until `attachGate` is
    /// signalled: the writer held in the middle of a batch.
    var attachGate: DispatchSemaphore?
    var attachEntered: DispatchSemaphore?
    /// Most links ever attached on one slot at the same time (the counting program allows two).
    var maxLinksPerSlot = 0

    init(capacity: UInt32 = 1024) { self.capacity = capacity }

    final class FakeLink: KernelLink, @unchecked Sendable {
        let generation: UInt32
        let sites: [LinkSite]
        weak var owner: FakeKernel?
        init(generation: UInt32, sites: [LinkSite], owner: FakeKernel) {
            self.generation = generation
            self.sites = sites
            self.owner = owner
        }
        func close() {}
    }

    func attach(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool) throws(KernelError) -> any KernelLink {
        if let gate = lock.withLock({ attachGate }) {
            lock.withLock { attachEntered }?.signal()
            gate.wait()
        }
        lock.lock(); defer { lock.unlock() }
        if failPaths.contains(path) { throw KernelError(code: .linkCreateFailed, message: "fake failure on \(path)") }
        if let bad = sites.first(where: { failOffsets.contains($0.offset) }) {
            throw KernelError(code: .linkCreateFailed, message: "fake failure at offset \(bad.offset)")
        }
        attaches.append((path, sites, pid, retprobe))
        let l = FakeLink(generation: nextGeneration, sites: sites, owner: self)
        nextGeneration += 1
        openLinks[ObjectIdentifier(l)] = l
        var perSlot: [UInt32: Int] = [:]
        for link in openLinks.values { for site in link.sites { perSlot[site.slot, default: 0] += 1 } }
        maxLinksPerSlot = max(maxLinksPerSlot, perSlot.values.max() ?? 0)
        return l
    }
    func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) { lock.lock(); overlapCalls += 1; lock.unlock() }
    func sweepMarks(slots: Set<UInt32>) throws(KernelError) {}
    func resetCounters(slots: [UInt32]) throws(KernelError) {}
    func readCounters(upTo: UInt32) throws(KernelError) -> [UInt64] { Array(repeating: 0, count: Int(upTo)) }
    func closeAll(_ links: [any KernelLink]) {
        lock.withLock { closeEntered }?.signal()
        if let gate = lock.withLock({ closeGate }) { gate.wait() }
        lock.lock(); defer { lock.unlock() }
        closeRounds += 1
        for l in links { if openLinks.removeValue(forKey: ObjectIdentifier(l)) != nil { closed += 1 } }
    }
    var openSlots: Set<UInt32> {
        lock.lock(); defer { lock.unlock() }
        return Set(openLinks.values.flatMap { $0.sites.map(\.slot) })
    }
    var attachCount: Int { lock.lock(); defer { lock.unlock() }; return attaches.count }
}

func target(_ path: String, inode: UInt64, offset: UInt64) -> ResolvedProbe {
    ResolvedProbe(path: path, device: 1, inode: inode, buildID: nil, fileOffset: offset, symbol: "f\(offset)",
                  aliases: [], refCtrOffset: nil, warning: nil)
}

func item(_ path: String, inode: UInt64, offsets: [UInt64], pid: Int32? = nil) -> RegisterItem {
    RegisterItem(spec: ProbeSpecInput(path: path, symbol: "f*", pid: pid),
                 targets: offsets.map { target(path, inode: inode, offset: $0) })
}

/// Drives a BatchApplier directly (no thread) so a test decides exactly what forms a batch.
final class Harness {
    let kernel: FakeKernel
    let applier: BatchApplier
    let tree = UprobeTree(readerSlots: 4)
    /// What readers see: the registry published in the tree's current version.
    var published: Published { Published(tree: tree) }
    struct Published {
        let tree: UprobeTree
        func load() -> RegistrySnapshot {
            tree.read { $0.withPayload(as: PublishedRegistry.self) { $0.snapshot } } ?? RegistrySnapshot()
        }
    }
    init(kernel: FakeKernel = FakeKernel(), tuning: EngineConfig = EngineConfig(compactionDelay: .seconds(3600)),
         persist: @escaping (RegistrySnapshot) throws -> Void = { _ in },
         sync: (@Sendable () throws -> Void)? = nil,
         prepare: (@Sendable ([ProbeRecord]) -> Void)? = nil,
         requeue: @escaping @Sendable (PendingOp) -> Void = { _ in }) {
        self.kernel = kernel
        applier = BatchApplier(kernel: kernel, tree: tree, tuning: tuning, logger: Logger(label: "test"),
                               persist: persist, sync: sync, prepare: prepare,
                               requeue: requeue)
    }
    deinit { applier.shutdown() }

    /// Applies the registrations as one batch and returns each request's result.
    /// `early`: each request's own early hook, told its index.
    func registerBatch(_ requests: [[RegisterItem]],
                       early: (@Sendable (Int, [ProbeRecord]) -> Void)? = nil) -> [Result<[ProbeRecord], EngineError>] {
        let box = Mutex<[Int: Result<[ProbeRecord], EngineError>]>([:])
        let ops = requests.enumerated().map { n, items in
            PendingOp.register(items: items, consumer: nil, peer: .daemon, early: early.map { hook in { hook(n, $0) } },
                               reply: { r in box.withLock { $0[n] = r } })
        }
        applier.apply(ops)
        return box.withLock { d in (0..<requests.count).compactMap { d[$0] } }
    }

    func unregister(_ ids: [String]) -> Result<Removal, EngineError>? {
        let box = Mutex<Result<Removal, EngineError>?>(nil)
        applier.apply([.unregister(ids: ids, selection: nil, peer: .daemon, authorize: { _ in true },
                                   reply: { r in box.withLock { $0 = r } })])
        return box.withLock { $0 }
    }
}

struct BatchDecisionTests {
    @Test("one batch of many requests makes one link per (binary, pid, direction)")
    func oneLinkPerGroup() throws {
        let h = Harness()
        let results = h.registerBatch([
            [item("/a", inode: 1, offsets: [0x10, 0x20])],
            [item("/a", inode: 1, offsets: [0x30])],
            [item("/b", inode: 2, offsets: [0x10])],
            [item("/a", inode: 1, offsets: [0x40], pid: 42)],
        ])
        #expect(results.allSatisfy { (try? $0.get()) != nil })
        #expect(h.kernel.attachCount == 3)
        let sizes = h.kernel.attaches.map(\.sites.count).sorted()
        #expect(sizes == [1, 1, 3])
    }

    @Test("a latency probe on a kernel without uprobe sessions fails alone with latency_unsupported; a counting probe on the same function in the same batch attaches")
    func latencyUnsupported() throws {
        let h = Harness()
        var latency = item("/a", inode: 1, offsets: [0x10])
        latency.spec.latency = true
        let results = h.registerBatch([[latency], [item("/a", inode: 1, offsets: [0x10])]])
        guard case .failure(let e) = results[0] else { Issue.record("the latency probe attached"); return }
        #expect(e.code == .latencyUnsupported)
        #expect((try? results[1].get())?.count == 1)
        #expect(h.kernel.attachCount == 1, "the counting link only")
        #expect(h.published.load().probes.count == 1)
    }

    @Test("a large request's records are made before the attach and handed to prepare; they enter the registry only if it succeeds")
    func earlyRecords() throws {
        let prepared = Mutex<[[ProbeRecord]]>([])
        let kernel = FakeKernel(capacity: 4096)
        kernel.failPaths = ["/bad"]
        let h = Harness(kernel: kernel, tuning: EngineConfig(compactionDelay: .seconds(3600), prepareMinimum: 100),
                        prepare: { records in prepared.withLock { $0.append(records) } })
        let early = Mutex<[Int: [ProbeRecord]]>([:])
        let results = h.registerBatch([
            [item("/a", inode: 1, offsets: (0..<150).map { 0x1000 + $0 * 0x10 })],            // large, succeeds
            [item("/a", inode: 1, offsets: [0x10])],                                            // small: not prepared
            [item("/bad", inode: 9, offsets: (0..<120).map { 0x1000 + $0 * 0x10 })],          // large, fails in the kernel
        ], early: { n, records in early.withLock { $0[n] = records } })
        let runs = prepared.withLock { $0 }
        #expect(runs.map(\.count) == [150, 120], "only the large requests are prepared, before their outcome")
        let good = try results[0].get()
        #expect(good.count == 150 && zip(good, runs[0]).allSatisfy { $0 === $1 }, "the prepared records are the registered ones")
        let told = early.withLock { $0 }
        #expect(told.keys.sorted() == [0, 2], "each large request's own hook hears its records")
        #expect(told[0]?.count == 150 && zip(told[0] ?? [], good).allSatisfy { $0 === $1 })
        // Without the persister's hook, a request's own hook still gets the registered records.
        let alone = Harness(kernel: FakeKernel(capacity: 4096), tuning: EngineConfig(compactionDelay: .seconds(3600), prepareMinimum: 100))
        let toldAlone = Mutex<[ProbeRecord]>([])
        let registered = try alone.registerBatch([[item("/a", inode: 1, offsets: (0..<100).map { 0x1000 + $0 * 0x10 })]],
                                                 early: { _, records in toldAlone.withLock { $0 = records } })[0].get()
        #expect(registered.count == 100 && toldAlone.withLock { zip($0, registered).allSatisfy { $0 === $1 } && $0.count == 100 })
        #expect((try? results[1].get())?.count == 1)
        guard case .failure = results[2] else { Issue.record("the request on /bad should fail"); return }
        let snap = h.published.load()
        #expect(snap.probes.count == 151)
        #expect(runs[1].allSatisfy { snap.probes[$0.id] == nil }, "a failed request's early records are never registered")
        // They entered the registry and the tree during the attach, and left both again.
        #expect(h.tree.count == 151 && h.tree.read { $0.consumerCount } == 151, "the failed request's consumers left the tree")
        #expect(snap.slotsInUse == 151, "and its slots are not counted")
        let allIDs = (good + ((try? results[1].get()) ?? []) + runs[1]).map(\.id)
        #expect(Set(allIDs).count == allIDs.count, "ids stay unique (a failed request's are simply not used)")
    }

    @Test("a failing binary fails only the requests that touch it, each whole")
    func failureIsolation() throws {
        let h = Harness()
        h.kernel.failPaths = ["/bad"]
        let results = h.registerBatch([
            [item("/a", inode: 1, offsets: [0x10])],
            [item("/a", inode: 1, offsets: [0x20]), item("/bad", inode: 9, offsets: [0x10])],
            [item("/a", inode: 1, offsets: [0x30])],
        ])
        #expect((try? results[0].get())?.count == 1)
        #expect((try? results[2].get())?.count == 1)
        guard case .failure(let e) = results[1] else { Issue.record("request 1 should fail"); return }
        #expect(e.code == .linkCreateFailed)
        #expect(e.message.contains("/bad"))
        // Request 1's site on /a was attached in the shared link: it must be detached, not counted.
        h.applier.compact(wait: true)
        let live = h.kernel.openSlots
        #expect(live.count == 2, "only the two successful probes stay attached: \(live)")
    }

    @Test("a group's link failing is retried request by request: the request the kernel rejects fails, its neighbours attach")
    func groupRetry() throws {
        let h = Harness()
        h.kernel.failOffsets = [0x20]
        let results = h.registerBatch([
            [item("/a", inode: 1, offsets: [0x10])],
            [item("/a", inode: 1, offsets: [0x20, 0x30])],
            [item("/a", inode: 1, offsets: [0x40])],
        ])
        #expect((try? results[0].get())?.count == 1)
        #expect((try? results[2].get())?.count == 1)
        guard case .failure(let e) = results[1] else { Issue.record("request 1 should fail"); return }
        #expect(e.code == .linkCreateFailed && e.message.contains("offset 32"), "\(e.message)")
        #expect(h.kernel.openSlots.count == 2, "only the two good requests' sites are attached")
        #expect(h.published.load().probes.count == 2)
    }

    @Test("removals are deferred and then share one rebuild and one close round")
    func deferredCompaction() throws {
        let h = Harness()
        let r = h.registerBatch([[item("/a", inode: 1, offsets: Array(stride(from: 0x10, to: 0x10 + 100 * 0x10, by: 0x10)))]])
        let ids = (try? r[0].get())?.map(\.id) ?? []
        #expect(ids.count == 100)
        for id in ids.prefix(30) { _ = h.unregister([id]) }
        #expect(h.kernel.closeRounds == 0, "nothing detached before the delay")
        #expect(h.kernel.openSlots.count == 100)
        h.applier.compact(wait: true)
        #expect(h.kernel.closeRounds == 1)
        #expect(h.kernel.openSlots.count == 70)
        #expect(h.kernel.attachCount == 2, "one rebuild for thirty removals")
    }

    @Test("link closes run off the writer: batches go on during a grace period, and a slot never has a third link")
    func detachOffTheWriter() throws {
        let kernel = FakeKernel()
        let gate = DispatchSemaphore(value: 0)
        kernel.closeGate = gate
        let h = Harness(kernel: kernel)
        let r = h.registerBatch([[item("/a", inode: 1, offsets: Array(stride(from: 0x10, to: 0x10 + 10 * 0x10, by: 0x10)))]])
        let ids = (try? r[0].get())?.map(\.id) ?? []
        #expect(ids.count == 10)
        _ = h.unregister([ids[0]])
        h.applier.compact()  // rebuilds the link without ids[0]; the old link's close blocks on the gate
        // The writer is not held up by the close: more batches apply meanwhile.
        let more = h.registerBatch([[item("/a", inode: 1, offsets: [0x1000])]])
        #expect((try? more[0].get())?.count == 1)
        #expect(h.published.load().counters.pendingRemovals == 1, "the removed site is pending until its link is closed")
        #expect(h.published.load().linksOpen == 3, "rebuilt + closing + new: the closing link still counts as open")
        _ = h.unregister([ids[1]])
        h.applier.compact()  // ids[1] sits in the link that is in hand-off: it must wait
        #expect(kernel.attachCount == 3, "no rebuild of a link whose slots are in hand-off")
        #expect(kernel.maxLinksPerSlot == 2)
        gate.signal()
        gate.signal()
        kernel.lock.withLock { kernel.closeGate = nil }
        h.applier.compact(wait: true)
        h.applier.maintain()  // publishes
        #expect(kernel.maxLinksPerSlot == 2)
        #expect(h.published.load().counters.pendingRemovals == 0)
        #expect(h.published.load().linksOpen == 2)
        #expect(kernel.openSlots.count == 9, "8 staying + 1 added")
    }

    @Test("many small links of one group are merged into one")
    func mergeSmallLinks() {
        let h = Harness(tuning: EngineConfig(compactionDelay: .zero, maxLinksPerGroup: 4))
        for n in 0..<10 { _ = h.registerBatch([[item("/a", inode: 1, offsets: [UInt64(0x10 * (n + 1))])]]) }
        h.applier.compact(wait: true)
        #expect(h.kernel.openLinks.count <= 4)
        #expect(h.kernel.openSlots.count == 10)
    }

    @Test("the uprobes tree mirrors the registry: consumers in, consumers out, same slots")
    func treeMirrorsRegistry() throws {
        let h = Harness()
        let r = h.registerBatch([
            [item("/a", inode: 1, offsets: [0x10, 0x20, 0x30])],
            [item("/a", inode: 1, offsets: [0x20]), item("/b", inode: 2, offsets: [0x10])],
        ])
        let ids = r.flatMap { (try? $0.get()) ?? [] }
        #expect(ids.count == 5)
        func check() {
            let snap = h.published.load()
            var fromTree: [UInt64: [UInt32]] = [:]
            h.tree.read { view in view.forEach { _, list in list.forEach { fromTree[$0.registration, default: []].append($0.slot) } } }
            var fromRegistry: [UInt64: [UInt32]] = [:]
            for p in snap.probes.values { fromRegistry[ProbeID.number(p.id) ?? 0] = p.sites.map(\.slot) }
            #expect(fromTree.mapValues { $0.sorted() } == fromRegistry.mapValues { $0.sorted() })
        }
        check()
        #expect(h.tree.count == 4, "0x20 on /a is one uprobe with two consumers")
        _ = h.unregister([ids[1].id, ids[4].id])
        check()
        h.applier.compact(wait: true)
        check()
        #expect(h.tree.count == 3)
    }

    @Test("probe ids: number reads exactly the ids make writes")
    func probeIDNumbers() {
        for n: UInt64 in [0, 1, 9, 10, 1023, 1024, 123_456_789, UInt64.max] {
            #expect(ProbeID.number(ProbeID.make(n)) == n)
        }
        for id in ["", "p", "q1", "P1", "p+5", "p-0", "p007", "p00", "p1a", "p 1", "p１", "p18446744073709551616", " p1"] {
            #expect(ProbeID.number(id) == nil, "\(id)")
        }
        #expect(ProbeID.order("p9", "p10") && !ProbeID.order("p10", "p9") && ProbeID.order("a", "b"))
    }

    @Test("probe map: a snapshot never changes when the writer's map does; order is registration order")
    func probeMapCopyOnWrite() {
        func record(_ n: Int) -> ProbeRecord {
            ProbeRecord(id: ProbeID.make(UInt64(n)), consumer: nil, owner: .daemon, spec: ProbeSpecInput(path: "/x", symbol: "f"),
                        sites: [], registeredAt: 0, registeredAtMonotonic: .now, state: .active, baseHits: 0, targets: [])
        }
        var m = ProbeMap()
        for n in [3000, 1, 2, 1500] { m.insert(record(n)) }
        let snapshot = m
        m.remove("p2")
        m.insert(record(7))
        m.remove("p3000")
        #expect(snapshot.sorted.map(\.id) == ["p1", "p2", "p1500", "p3000"])
        #expect(snapshot.count == 4 && snapshot["p2"] != nil && snapshot["p7"] == nil)
        #expect(m.sorted.map(\.id) == ["p1", "p7", "p1500"])
        #expect(m.count == 3 && m["p3000"] == nil && m["nope"] == nil)
    }

    @Test("retired versions: the newest eight keep their entry, older ones fold into a count and a sum that the total keeps")
    func retiredVersionsFold() {
        var r = RetiredVersions()
        #expect(r.isEmpty && r.totalHits == 0 && r.count == 0)
        for i in 1...11 {
            r.append(RetiredVersion(version: FileVersion(device: 1, inode: UInt64(i), buildID: nil, path: "/x"), hits: UInt64(i * 10)))
        }
        #expect(r.recent.map(\.version.inode) == Array(4...11), "the newest eight, oldest first")
        #expect(r.olderCount == 3 && r.olderHits == 60)
        #expect(r.totalHits == 660 && r.count == 11)
        let record = ProbeRecord(id: "p1", consumer: nil, owner: .daemon, spec: ProbeSpecInput(path: "/x", symbol: "f"), sites: [],
                                 registeredAt: 0, registeredAtMonotonic: .now - .seconds(10), state: .active, baseHits: 660,
                                 targets: [], retired: r)
        var map = ProbeMap()
        map.insert(record)
        let table = try? StatsTable.make(map, counts: [], ids: nil, consumer: nil, allVersions: true,
                                         now: MonotonicEpoch.seconds(.now)).get()
        #expect(table?.hits.first == 660)
        #expect(table?.detail(0)?.versions?.count == 8, "the breakdown lists the kept entries only")
        #expect(abs((table?.rates.first ?? 0) - 66) < 1, "the rate still counts the folded hits: 660 in ~10 s")
    }

    @Test("stats rows: plain rows read without their record give what the records say; consumer numbers are reused only when free")
    func statsRows() throws {
        let start = ContinuousClock.now
        func record(_ id: String, consumer: String?, sites: [(inode: UInt64, slot: UInt32)], state: ProbeState = .active,
                    baseHits: UInt64 = 0, retired: RetiredVersions = [], secondsAgo: Double = 10) -> ProbeRecord {
            let at = start - .milliseconds(Int64(secondsAgo * 1000))
            return ProbeRecord(id: id, consumer: consumer, owner: .daemon, spec: ProbeSpecInput(path: "/x", symbol: "f"),
                               sites: sites.map { ProbeSite(target: target("/x", inode: $0.inode, offset: UInt64($0.slot) * 16), slot: $0.slot) },
                               registeredAt: 0, registeredAtMonotonic: at, state: state, baseHits: baseHits,
                               targets: [target("/x", inode: 1, offset: 0)], retired: retired)
        }
        let old = RetiredVersion(version: FileVersion(device: 1, inode: 9, buildID: nil, path: "/x"), hits: 4)
        let records = [
            record("p1", consumer: "a", sites: [(1, 0)]),
            record("p2", consumer: "b", sites: [(1, 1)], baseHits: 100, secondsAgo: 2),
            record("p3", consumer: nil, sites: [(1, 2)]),
            record("p4", consumer: "a", sites: [(1, 3), (1, 4)]),           // two sites, one file
            record("p5", consumer: "a", sites: [(1, 5), (2, 6)]),           // two files: a breakdown is shown
            record("p6", consumer: "b", sites: [], state: .degraded(reason: "gone"), baseHits: 7),
            record("p7", consumer: "a", sites: [(1, 7)], baseHits: 4, retired: [old]),
            record("p2000", consumer: "a", sites: [(1, 8)]),                // another chunk
            record("custom", consumer: "a", sites: [(1, 9)]),               // an id this daemon does not make
            record("p8", consumer: "a", sites: [(1, 99)]),                  // a slot past the counters read
        ]
        var map = ProbeMap()
        for r in records { map.insert(r) }
        let counts: [UInt64] = (0..<10).map { 1000 + UInt64($0) }
        let now = MonotonicEpoch.seconds(start)

        // What each row must be, computed from the record alone.
        func expected(_ r: ProbeRecord, allVersions: Bool) -> ProbeStats {
            let counted = r.sites.reduce(UInt64(0)) { $0 + (Int($1.slot) < counts.count ? counts[Int($1.slot)] : 0) }
            let retiredHits = r.retired.totalHits
            let files = Set(r.sites.map(\.target.inode)).count + r.retired.recent.count
            let secs = now - MonotonicEpoch.seconds(r.registeredAtMonotonic)
            return ProbeStats(id: r.id, hits: r.baseHits + counted, ratePerSecond: Double(counted + retiredHits) / secs,
                              sites: r.sites.count, state: r.state,
                              versions: (allVersions || files > 1) ? Array(repeating: VersionStats(version: old.version, hits: 0, current: false, retired: false), count: files) : [])
        }
        func check(_ m: ProbeMap, ids: [String]?, consumer: String?, allVersions: Bool = false, want: [String],
                   _ note: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let table = try StatsTable.make(m, counts: counts, ids: ids, consumer: consumer, allVersions: allVersions, now: now).get()
            #expect(table.rows.map(\.id) == want, "\(note)", sourceLocation: sourceLocation)
            for (i, got) in table.rows.enumerated() {
                guard let r = m[got.id] else { Issue.record("\(note): no record \(got.id)", sourceLocation: sourceLocation); continue }
                let e = expected(r, allVersions: allVersions)
                #expect(got.hits == e.hits && got.ratePerSecond == e.ratePerSecond && got.sites == e.sites && got.state == e.state,
                        "\(note): \(got.id) \(got) vs \(e)", sourceLocation: sourceLocation)
                #expect(got.versions.count == e.versions.count, "\(note): \(got.id) versions", sourceLocation: sourceLocation)
                #expect(table.id(i) == got.id, sourceLocation: sourceLocation)
                // Plain exactly when active, one site, no retired versions, an id p<N> and no breakdown
                // asked for; given ids are looked up by record.
                let plain = ids == nil && !allVersions && r.sites.count == 1 && r.retired.isEmpty && r.state == .active && ProbeID.number(r.id) != nil
                #expect((table.plainID(i) != nil) == plain && (table.detail(i) == nil) == plain, "\(note): \(got.id) plain",
                        sourceLocation: sourceLocation)
                if let n = table.plainID(i) { #expect(ProbeID.make(n) == got.id, sourceLocation: sourceLocation) }
            }
        }
        let all = ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p2000", "custom"]
        try check(map, ids: nil, consumer: nil, want: all, "all")
        try check(map, ids: nil, consumer: nil, allVersions: true, want: all, "all, every breakdown")
        try check(map, ids: nil, consumer: "a", want: ["p1", "p4", "p5", "p7", "p8", "p2000", "custom"], "consumer a")
        try check(map, ids: nil, consumer: "b", want: ["p2", "p6"], "consumer b")
        try check(map, ids: nil, consumer: "nobody", want: [], "unknown consumer")
        try check(map, ids: ["p6", "p1", "custom"], consumer: nil, want: ["p6", "p1", "custom"], "ids")
        #expect(throws: EngineError.self) { try StatsTable.make(map, counts: counts, ids: ["p1", "p999"], consumer: nil, allVersions: false, now: now).get() }

        // Consumer b goes away: its number is reused by c, and neither sees the other's rows,
        // in the writer's map or in the snapshot taken before.
        let before = map
        map.remove("p2")
        map.remove("p6")
        map.insert(record("p9", consumer: "c", sites: [(1, 2)]))
        map.insert(record("p10", consumer: "c", sites: [(1, 3)]))
        try check(map, ids: nil, consumer: "b", want: [], "b gone")
        #expect(map.consumerKey("b") == nil && map.consumerKey("c")?.key == before.consumerKey("b")?.key)
        try check(map, ids: nil, consumer: "c", want: ["p9", "p10"], "c")
        try check(before, ids: nil, consumer: "b", want: ["p2", "p6"], "snapshot: b")
        try check(before, ids: nil, consumer: "c", want: [], "snapshot: no c")
        // A new version of a record (here degraded) replaces its row too.
        map.insert(record("p9", consumer: "c", sites: [], state: .ended(reason: "exited"), baseHits: 3))
        try check(map, ids: nil, consumer: "c", want: ["p9", "p10"], "c after p9 ended")
        // The last records of a consumer outside the chunks and inside them go: no rows left.
        for id in ["p1", "p4", "p5", "p7", "p8", "p2000", "custom"] { map.remove(id) }
        try check(map, ids: nil, consumer: "a", want: [], "a gone")
        try check(map, ids: nil, consumer: nil, want: ["p3", "p9", "p10"], "what is left")
        #expect(map.consumerNames == 1, "only c's name is kept")
    }

    @Test("the engine's threads carry their names where top -H and perf read them")
    func threadNames() throws {
        let h = Harness()
        _ = h.registerBatch([[item("/a", inode: 1, offsets: [0x10])]])
        // A thread names itself once it runs: give a busy machine a few seconds.
        var names: Set<String> = []
        for _ in 0..<300 where !names.isSuperset(of: ["uprobed-attach", "uprobed-detach"]) {
            let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")
            names = Set(tasks.compactMap { try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8) }
                .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) })
            usleep(10_000)
        }
        #expect(names.isSuperset(of: ["uprobed-attach", "uprobed-detach"]), "\(names.sorted())")
        withExtendedLifetime(h) {}
    }

    @Test("a batch whose state write fails registers nothing: replies fail, probes are detached")
    func persistFailureRollsBack() {
        struct DiskFull: Error {}
        let h = Harness(persist: { _ in throw DiskFull() })
        let r = h.registerBatch([[item("/a", inode: 1, offsets: [0x10, 0x20])]])
        guard case .failure(let e) = r[0] else { Issue.record("register should fail"); return }
        #expect(e.code == .stateWriteFailed)
        #expect(h.published.load().probes.isEmpty)
        #expect(h.tree.count == 0)
        h.applier.compact(wait: true)
        #expect(h.kernel.openSlots.isEmpty, "the attached link is closed")
    }

    @Test("a removal whose state write or sync fails is still done and acknowledged, saying it is not saved")
    func unsavedRemoval() throws {
        struct DiskFull: Error {}
        let failing = Mutex(false)
        let h = Harness(persist: { _ in if failing.withLock({ $0 }) { throw DiskFull() } })
        let ids = try h.registerBatch([[item("/a", inode: 1, offsets: [0x10])], [item("/a", inode: 1, offsets: [0x20])]])
            .map { try #require(try $0.get().first?.id) }
        let saved = try #require(try h.unregister([ids[0]])?.get())
        #expect(saved == Removal(count: 1, unsaved: nil))
        failing.withLock { $0 = true }
        let unsaved = try #require(try h.unregister([ids[1]])?.get())
        #expect(unsaved.count == 1)
        #expect(unsaved.unsaved?.contains("could not be written") == true, "\(unsaved)")
        #expect(h.published.load().probes.isEmpty, "removed all the same")

        let gate = DispatchSemaphore(value: 0)
        let g = Harness(sync: { gate.wait(); if failing.withLock({ $0 }) { throw DiskFull() } }, requeue: { _ in })
        failing.withLock { $0 = false }
        let id = Mutex<String?>(nil)
        g.applier.apply([.register(items: [item("/a", inode: 1, offsets: [0x10])], consumer: nil, peer: .daemon, early: nil,
                                   reply: { r in id.withLock { $0 = (try? r.get())?.first?.id } })])
        gate.signal()
        g.applier.waitForCommits()
        let registered = try #require(id.withLock { $0 })
        failing.withLock { $0 = true }
        let removal = Mutex<Result<Removal, EngineError>?>(nil)
        g.applier.apply([.unregister(ids: [registered], selection: nil, peer: .daemon, authorize: { _ in true },
                                     reply: { r in removal.withLock { $0 = r } })])
        gate.signal()
        g.applier.waitForCommits()
        let synced = try #require(try removal.withLock { $0 }?.get())
        #expect(synced.count == 1)
        #expect(synced.unsaved?.contains("could not be synced") == true, "\(synced)")
    }

    @Test("group commit: replies wait for the sync, the writer does not; a failed sync refuses and takes back")
    func groupCommit() throws {
        struct DiskGone: Error {}
        let gate = DispatchSemaphore(value: 0)
        let failing = Mutex(false)
        let requeued = Mutex<[PendingOp]>([])
        let h = Harness(sync: {
            gate.wait()
            if failing.withLock({ $0 }) { throw DiskGone() }
        }, requeue: { op in requeued.withLock { $0.append(op) } })
        let replies = Mutex<[String: Result<[ProbeRecord], EngineError>]>([:])
        func register(_ name: String, offset: UInt64) {
            h.applier.apply([.register(items: [item("/a", inode: 1, offsets: [offset])], consumer: nil, peer: .daemon, early: nil,
                                       reply: { r in replies.withLock { $0[name] = r } })])
        }
        register("first", offset: 0x10)
        #expect(replies.withLock { $0.isEmpty }, "no reply before the sync")
        register("second", offset: 0x20)  // the writer applies the next batch while the first waits
        #expect(replies.withLock { $0.isEmpty })
        #expect(h.published.load().probes.count == 2)
        gate.signal()
        gate.signal()
        h.applier.waitForCommits()
        #expect(replies.withLock { $0.values.allSatisfy { (try? $0.get())?.count == 1 } && $0.count == 2 })

        failing.withLock { $0 = true }
        register("third", offset: 0x30)
        gate.signal()
        h.applier.waitForCommits()
        guard case .failure(let e)? = replies.withLock({ $0["third"] }) else { Issue.record("the unsynced register must fail"); return }
        #expect(e.code == .stateWriteFailed)
        let undo = requeued.withLock { $0 }
        #expect(undo.count == 1, "one removal per unconfirmed registration")
        failing.withLock { $0 = false }
        h.applier.apply(undo)  // what the engine does with a requeued op
        gate.signal()
        h.applier.waitForCommits()
        #expect(h.published.load().probes.count == 2, "the unconfirmed registration is taken back out")
    }

    @Test("write-ahead: new registrations are saved before the kernel attaches them; one the kernel refuses is removed by the batch's own entry, and every reply waits for the sync")
    func writeAhead() throws {
        let kernel = FakeKernel()
        kernel.failOffsets = [0x20]
        struct Saved { var added: [String]; var removed: [String]; var attachesBefore: Int }
        let saved = Mutex<[Saved]>([])
        let syncs = Mutex(0)
        let gate = DispatchSemaphore(value: 0)
        let h = Harness(kernel: kernel, persist: { s in
            saved.withLock { $0.append(Saved(added: s.batchAdded.map(\.id), removed: s.batchRemoved, attachesBefore: kernel.attachCount)) }
        }, sync: {
            gate.wait()
            syncs.withLock { $0 += 1 }
        })
        let replies = Mutex<[Int: Result<[ProbeRecord], EngineError>]>([:])
        func register(_ batch: [(Int, UInt64, UInt64)]) {
            h.applier.apply(batch.map { n, inode, offset in
                .register(items: [item("/a\(inode)", inode: inode, offsets: [offset])], consumer: nil, peer: .daemon, early: nil,
                          reply: { r in replies.withLock { $0[n] = r } })
            })
        }
        // Two requests on two files: the second one's link fails.
        register([(0, 1, 0x10), (1, 2, 0x20)])
        let first = saved.withLock { $0 }
        #expect(first.count == 2, "one entry ahead of the attach, one after it")
        #expect(first.first?.added == ["p1", "p2"] && first.first?.attachesBefore == 0, "saved before any link")
        #expect(first.last?.added == [] && first.last?.removed == ["p2"], "the refused one leaves the log again")
        #expect(replies.withLock { $0.isEmpty }, "no reply before the sync, not even the failure")
        gate.signal()
        gate.signal()  // the removal's sync (one sync covers both if the committer took them together)
        h.applier.waitForCommits()
        let ok = try #require(replies.withLock { $0[0] })
        #expect((try? ok.get())?.map(\.id) == ["p1"])
        guard case .failure(let refused)? = replies.withLock({ $0[1] }) else { Issue.record("the refused register must fail"); return }
        #expect(refused.code == .linkCreateFailed)
        #expect(h.published.load().probes.values.map(\.id) == ["p1"])

        // A batch whose registrations all attach appends nothing after the attach: one sync.
        let before = syncs.withLock { $0 }
        register([(2, 1, 0x30)])
        let second = saved.withLock { $0.suffix(2) }
        #expect(second.first?.added == ["p3"] && second.first?.attachesBefore == 1, "before the second batch's link")
        #expect(second.last?.added == [] && second.last?.removed == [], "nothing left to save after the attach")
        gate.signal()
        h.applier.waitForCommits()
        #expect(syncs.withLock { $0 } == before + 1)
        #expect((try? replies.withLock { $0[2] }?.get())?.map(\.id) == ["p3"])
    }

    @Test("op queue: a push wakes a writer waiting for work, and one waiting in the window only once the batch is full")
    func opQueueWakeups() throws {
        let queue = OpQueue()
        let taken = Mutex<[Int]>([])
        let done = DispatchSemaphore(value: 0)
        // A window far longer than the test: only a wake-up can end it early.
        let writer = Thread {
            while let batch = queue.nextBatch(window: .seconds(600), max: 3) {
                taken.withLock { $0.append(batch.count) }
                done.signal()
            }
            done.signal()
        }
        writer.start()
        usleep(50_000)  // the writer now waits for work
        #expect(queue.push(.detachFinished))
        usleep(50_000)
        // Its window is open; two more fill the batch.
        #expect(queue.push(.detachFinished))
        #expect(queue.push(.detachFinished))
        #expect(done.wait(timeout: .now() + 30) == .success, "a full batch must wake the writer before its window ends")
        #expect(taken.withLock { $0 } == [3])
        // Closing wakes it too, whatever it waits for.
        #expect(queue.close())
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(!queue.push(.detachFinished))
    }

    @Test("op queue: work that queued while the writer was busy is taken at once, without a window")
    func opQueueBacklog() throws {
        let queue = OpQueue()
        #expect(queue.push(.detachFinished))
        #expect(queue.push(.detachFinished))
        let taken = Mutex<[Int]>([])
        let done = DispatchSemaphore(value: 0)
        // A window far longer than the test: a writer that waited it out would time the test out.
        Thread {
            if let batch = queue.nextBatch(window: .seconds(600), max: 10) { taken.withLock { $0.append(batch.count) } }
            done.signal()
        }.start()
        #expect(done.wait(timeout: .now() + 30) == .success, "queued work must not wait for the window")
        #expect(taken.withLock { $0 } == [2])
        #expect(queue.close())
    }

    @Test("op queue: a request of many probes does not wait for the window; a small one does")
    func opQueueLargeRequest() throws {
        let queue = OpQueue()
        let taken = Mutex<[Int]>([])
        let done = DispatchSemaphore(value: 0)
        let items = (0..<4).map { RegisterItem(spec: ProbeSpecInput(path: "/x", symbol: "f\($0)"),
                                               targets: [target("/x", inode: 1, offset: UInt64($0))]) }
        func register(_ n: Int) -> PendingOp {
            .register(items: Array(items.prefix(n)), consumer: nil, peer: .daemon, early: nil, reply: { _ in })
        }
        // One glob spec is one item however many functions it matched: its sites count.
        let glob = RegisterItem(spec: ProbeSpecInput(path: "/x", symbol: "f*"),
                                targets: (0..<4).map { target("/x", inode: 1, offset: UInt64($0)) })
        // A window far longer than the test: only the size of the request can end it early.
        let writer = Thread {
            while let batch = queue.nextBatch(window: .seconds(600), max: 100, largeRequest: 4) {
                taken.withLock { $0.append(batch.count) }
                done.signal()
            }
            done.signal()
        }
        writer.start()
        usleep(50_000)  // the writer now waits for work
        #expect(queue.push(.register(items: [glob], consumer: nil, peer: .daemon, early: nil, reply: { _ in })))
        #expect(done.wait(timeout: .now() + 30) == .success, "a glob of 4 sites is a large request: no window")
        #expect(taken.withLock { $0 } == [1])
        usleep(50_000)
        #expect(queue.push(register(4)))
        #expect(done.wait(timeout: .now() + 30) == .success, "a large request must not wait for the window")
        #expect(taken.withLock { $0 } == [1, 1])
        usleep(50_000)
        #expect(queue.push(register(3)))
        #expect(done.wait(timeout: .now() + 1) == .timedOut, "a small request waits in the window")
        #expect(queue.close())
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(taken.withLock { $0 } == [1, 1, 1])
    }

    @Test("a restore with adopted links: adopted registrations keep their slots (no attach, no reset), slots no one claims are detached make-before-break by the next compaction, new slots avoid the claimed ones")
    func restoreAdoption() throws {
        let h = Harness()
        let adoptedLink = FakeKernel.FakeLink(generation: 40, sites: [], owner: h.kernel)
        let sites = [LinkSite(offset: 0x10, refCtrOffset: nil, slot: 5), LinkSite(offset: 0x20, refCtrOffset: nil, slot: 9),
                     LinkSite(offset: 0x30, refCtrOffset: nil, slot: 2)]
        let adoption = Adoption(links: [AdoptedLink(file: FileID(device: 1, inode: 1), pid: 0, retprobe: false, path: "/a",
                                                    sites: sites, handle: adoptedLink)],
                                deadSlots: [2])
        var kept = RestoreItem(id: "p3", consumer: nil, owner: .daemon, spec: ProbeSpecInput(path: "/a", symbol: "f*"),
                               registeredAt: 1, baseHits: 7, targets: [target("/a", inode: 1, offset: 0x10), target("/a", inode: 1, offset: 0x20)],
                               degradedReason: nil)
        kept.adoptedSlots = [5, 9]
        let fresh = RestoreItem(id: "p4", consumer: nil, owner: .daemon, spec: ProbeSpecInput(path: "/b", symbol: "g"),
                                registeredAt: 1, baseHits: 3, targets: [target("/b", inode: 2, offset: 0x40)], degradedReason: nil)
        let box = Mutex<[Result<ProbeRecord, EngineError>]>([])
        h.applier.apply([.restore(items: [kept, fresh], nextIDFloor: 10, adoption: adoption, reply: { r in box.withLock { $0 = r } })])
        let results = box.withLock { $0 }.compactMap { try? $0.get() }
        #expect(results.count == 2)
        #expect(results.first { $0.id == "p3" }?.sites.map(\.slot) == [5, 9] && results.first { $0.id == "p3" }?.baseHits == 7)
        #expect(h.kernel.attaches.map(\.path) == ["/b"], "only the registration without a pinned link is attached")
        let freshSlot = try #require(results.first { $0.id == "p4" }?.sites.first?.slot)
        #expect(![2, 5, 9].contains(freshSlot), "a new slot is never one an adopted link holds")
        var snap = h.published.load()
        #expect(snap.slotsInUse == 4 && snap.linksOpen == 2)
        // The dead slot 2 goes at the next compaction: the adopted link is rebuilt with 5 and 9.
        h.applier.compact(wait: true)
        #expect(h.kernel.attaches.last?.sites.map(\.slot) == [5, 9])
        snap = h.applier.makeSnapshot()
        #expect(snap.slotsInUse == 3 && h.kernel.maxLinksPerSlot <= 2)
    }

    @Test("slot allocator: lowest first, all-or-nothing, high water shrinks")
    func slotAllocator() {
        var a = SlotAllocator(capacity: 8)
        #expect(a.allocate(3) == [0, 1, 2])
        #expect(a.allocate(6) == nil)
        #expect(a.allocate(5) == [3, 4, 5, 6, 7])
        a.release([1, 7])
        #expect(a.highWater == 7)
        #expect(a.allocate(1) == [1])
        a.release([0, 1, 2, 3, 4, 5, 6])
        #expect(a.highWater == 0)
        #expect(a.inUse == 0)
        // A free run at the top goes at once; a gap below it stays free under the high water.
        var b = SlotAllocator(capacity: 20_000)
        _ = b.allocate(20_000)
        b.release(Array(10_000..<20_000).map(UInt32.init) + [5])
        #expect(b.highWater == 10_000 && b.inUse == 9_999 && b.available == 10_001)
        #expect(b.allocate(2) == [5, 10_000])
    }

    @Test("slot set and slot table agree with Set and Dictionary under random inserts and removals")
    func slotContainers() {
        var generator = SystemRandomNumberGenerator()
        var bits = SlotSet(), model = Set<UInt32>()
        var table = SlotTable<FakeKernel>(), tableModel: [UInt32: FakeKernel] = [:]
        let values = [FakeKernel(), FakeKernel()]
        for step in 0..<20_000 {
            let slot = UInt32.random(in: 0..<(step % 2 == 0 ? 130 : 5_000), using: &generator)
            switch Int.random(in: 0..<4, using: &generator) {
            case 0, 1: bits.insert(slot); model.insert(slot)
            case 2: bits.remove(slot); model.remove(slot)
            default:
                let v = Bool.random(using: &generator) ? values[Int(slot % 2)] : nil
                table[slot] = v
                tableModel[slot] = v
            }
            #expect(bits.contains(slot) == model.contains(slot) && bits.count == model.count && bits.isEmpty == model.isEmpty)
            #expect(table[slot] === tableModel[slot])
        }
        #expect(Array(bits) == model.sorted())
        bits.subtract(Array(model))
        #expect(bits.isEmpty && Array(bits).isEmpty)
        bits.formUnion([63, 64, 0, 4_000_000])
        #expect(Array(bits) == [0, 63, 64, 4_000_000] && !bits.contains(65) && !bits.contains(9_000_000))
        #expect(table[9_000_000] == nil)
    }

    @Test("a compaction that can do nothing (every dead site in a link in hand-off) is not rerun after every batch")
    func stalledCompaction() throws {
        let kernel = FakeKernel()
        let gate = DispatchSemaphore(value: 0)
        kernel.closeGate = gate
        let h = Harness(kernel: kernel, tuning: EngineConfig(compactionDelay: .seconds(3600), bulkDetachSites: 3))
        let ids = try h.registerBatch([[item("/a", inode: 1, offsets: (1...8).map { UInt64($0) * 0x10 })]])[0].get().map(\.id)
        _ = h.unregister(Array(ids[0..<3]))  // a bulk removal: the link is rebuilt at once, its old link's close waits
        #expect(kernel.attachCount == 2)
        _ = h.unregister(Array(ids[3..<6]))  // dead sites in the link in hand-off: nothing can be done yet
        let stalled = h.published.load().counters.compactions
        for n in 0..<5 { _ = h.registerBatch([[item("/b", inode: 2, offsets: [UInt64(n + 1) * 0x10])]]) }
        #expect(h.published.load().counters.compactions == stalled, "no rescans while the hand-off lasts")
        #expect(h.published.load().counters.pendingRemovals == 6)
        gate.signal()
        kernel.lock.withLock { kernel.closeGate = nil }
        h.applier.finishDetaches()
        _ = h.registerBatch([[item("/b", inode: 2, offsets: [0x100])]])  // the round is collected: due again
        #expect(h.published.load().counters.compactions > stalled)
        h.applier.compact(wait: true)
        h.applier.maintain()
        #expect(h.published.load().counters.pendingRemovals == 0)
        #expect(kernel.openSlots.count == 2 + 6, "ids[6], ids[7] and the six on /b")
    }
}
