import Testing
@testable import UprobeCore
import UprobeELF
import UprobeKernel

/// The compact per-probe state: what a request shares is one object, a record's targets are its
/// sites' unless they differ, a target's file is shared; the values read back are the same.
struct CompactRecordTests {
    @Test("a ResolvedProbe compares and hashes by value, whether its file object is shared or not; setters change only their field")
    func resolvedProbeValues() {
        let file = ResolvedFile(path: "/bin/x", device: 1, inode: 2, buildID: "ab")
        let shared = ResolvedProbe(file: file, fileOffset: 0x10, symbol: "f")
        let apart = ResolvedProbe(path: "/bin/x", device: 1, inode: 2, buildID: "ab", fileOffset: 0x10, symbol: "f")
        #expect(shared == apart && shared.hashValue == apart.hashValue)
        #expect(Set([shared, apart]).count == 1)

        var moved = shared
        moved.path = "/bin/y"
        #expect(moved.path == "/bin/y" && moved.device == 1 && moved.inode == 2 && moved.buildID == "ab")
        #expect(shared.path == "/bin/x", "the shared file object is not changed")
        #expect(moved != shared)

        var detailed = shared
        detailed.aliases = ["g"]
        detailed.warning = "w"
        detailed.refCtrOffset = 8
        #expect(detailed.aliases == ["g"] && detailed.warning == "w" && detailed.refCtrOffset == 8)
        #expect(detailed != shared)
        detailed.aliases = []
        detailed.warning = nil
        detailed.refCtrOffset = nil
        #expect(detailed == shared && detailed.hashValue == shared.hashValue)
    }

    @Test("a record keeps its targets only where they differ from its sites'; what it reads back is the same either way")
    func recordTargets() {
        let t1 = target("/a", inode: 1, offset: 0x10), t2 = target("/a", inode: 1, offset: 0x20)
        let sites = [ProbeSite(target: t1, slot: 3), ProbeSite(target: t2, slot: 4)]
        let plain = ProbeRecord(id: "p1", consumer: "c", owner: .daemon, spec: ProbeSpecInput(path: "/a", usdt: "p:n"),
                                sites: sites, registeredAt: 1, registeredAtMonotonic: .now, state: .active, baseHits: 0,
                                targets: [t1, t2])
        #expect(plain.targets == [t1, t2] && plain.targetCount == 2 && plain.firstTarget == t1)
        #expect(plain.hasRareParts, "two sites are kept in the rare parts")
        let single = ProbeRecord(id: "p1", consumer: "c", owner: .daemon, spec: ProbeSpecInput(path: "/a", symbol: "f"),
                                 sites: [sites[0]], registeredAt: 1, registeredAtMonotonic: .now, state: .active, baseHits: 0,
                                 targets: [t1])
        #expect(!single.hasRareParts, "an active p<N> record whose one target is its site's has no rare parts")
        #expect(single.targets == [t1] && single.targetCount == 1 && single.firstTarget == t1 && Array(single.sites) == [sites[0]])

        // Degraded: no sites, the targets as resolved at registration.
        let degraded = plain.with(sites: [], state: .degraded(reason: "gone"), baseHits: 5, targets: [t2], retired: [])
        #expect(degraded.targets == [t2] && degraded.targetCount == 1 && degraded.firstTarget == t2)
        #expect(degraded.consumer == "c" && degraded.spec.usdt == "p:n" && degraded.registeredAt == 1)
        #expect(degraded.terms === plain.terms, "a new version of a registration shares its terms")
    }

    @Test("the records of one request share one terms object; a request with other terms has its own")
    func sharedTerms() throws {
        let h = Harness()
        // (Two requests of one batch with equal terms may share the object: it is a value.)
        let results = h.registerBatch([[item("/a", inode: 1, offsets: [0x10, 0x20, 0x30])], [item("/b", inode: 2, offsets: [0x40])]])
        let first = try results[0].get(), second = try results[1].get()
        #expect(first.count == 3 && second.count == 1)
        #expect(first.allSatisfy { $0.terms === first[0].terms })
        #expect(second[0].terms !== first[0].terms && second[0].spec.path == "/b")
        #expect(first.map(\.firstTarget?.fileOffset) == [0x10, 0x20, 0x30])
        #expect(first.allSatisfy { $0.spec.symbol == "f*" && $0.consumer == nil && $0.targetCount == 1 })
    }

    @Test("a record's id, state, retired versions and base histogram read back whether kept inline or apart")
    func rareParts() {
        let t = target("/a", inode: 1, offset: 0x10)
        let spec = ProbeSpecInput(path: "/a", symbol: "f")
        func record(_ id: String, state: ProbeState = .active, retired: RetiredVersions = [],
                    latency: LatencyHistogram? = nil) -> ProbeRecord {
            ProbeRecord(id: id, consumer: nil, owner: .daemon, spec: spec, sites: [ProbeSite(target: t, slot: 7)],
                        registeredAt: 1, registeredAtMonotonic: .now, state: state, baseHits: 9, targets: [t],
                        retired: retired, baseLatency: latency)
        }
        for (id, number) in [("p0", UInt64(0)), ("p9", 9), ("p10", 10), ("p123456789012345", 123_456_789_012_345),
                             ("p18446744073709551615", UInt64.max)] {
            let r = record(id)
            #expect(r.id == id && r.number == number && r.isActive && r.state == .active && !r.hasRetired)
            #expect(ProbeID.make(number) == id)
        }
        let other = record("probe-x")
        #expect(other.id == "probe-x" && other.number == nil)
        let degraded = record("p3", state: .degraded(reason: "gone"))
        #expect(degraded.id == "p3" && degraded.number == 3 && degraded.state == .degraded(reason: "gone") && !degraded.isActive)
        let v = RetiredVersion(version: FileVersion(t), hits: 4)
        let retired = record("p4", retired: [v])
        #expect(retired.hasRetired && retired.retired == [v] && retired.isActive)
        var h = LatencyHistogram()
        h.calls = 2
        #expect(record("p5", latency: h).baseLatency == h)
        #expect(degraded.baseHits == 9 && degraded.sites.count == 1 && degraded.sites[0].slot == 7)
    }

    @Test("a record's sites read like the array they were made from: none, one kept inline, several")
    func probeSites() {
        let sites = (0..<3).map { ProbeSite(target: target("/a", inode: 1, offset: 0x10 * UInt64($0 + 1)), slot: UInt32($0)) }
        for n in 0...3 {
            let s = ProbeSites(Array(sites.prefix(n)))
            #expect(Array(s) == Array(sites.prefix(n)) && s.count == n && s.isEmpty == (n == 0))
            #expect(s.map(\.slot) == (0..<UInt32(n)).map { $0 } && s.first == sites.prefix(n).first)
        }
        #expect(ProbeSites([sites[0]]) == ProbeSites(sites.prefix(1)) && ProbeSites([sites[0]]) != ProbeSites(sites))
    }

    @Test("packed symbol names read back as written: empty, one byte, 127 and 128 bytes (a longer length prefix), non-ASCII, absent")
    func packedNames() {
        let names: [String?] = ["", "f", String(repeating: "a", count: 127), String(repeating: "b", count: 128), nil,
                                "_ZN5swift4Lowering", "größe→∞", String(repeating: "c", count: 20_000)]
        let packed = SymbolNames.pack(names)
        #expect(packed.count == names.count)
        #expect(Set(packed.compactMap { $0.map { ObjectIdentifier($0.names) } }).count == 1, "one buffer for all")
        let file = ResolvedFile(path: "/a", device: 1, inode: 1, buildID: nil)
        for (name, p) in zip(names, packed) {
            #expect((p == nil) == (name == nil))
            let r = ResolvedProbe(file: p.map { file.with(names: $0.names) } ?? file, fileOffset: 0x10, nameAt: p?.at)
            #expect(r.symbol == name && r.hasSymbol == (name != nil) && r.symbolIs(name))
            #expect(r.symbolByteCount == (name?.utf8.count ?? 0))
            let alone = ResolvedProbe(file: file, fileOffset: 0x10, symbol: name)
            #expect(alone == r && alone.hashValue == r.hashValue)
            // NUL after the bytes: fnmatch reads them in place.
            r.withSymbolUTF8 { #expect($0.baseAddress?[$0.count] == 0) }
        }
        guard let f = packed[1] else { Issue.record("no name packed"); return }
        var renamed = ResolvedProbe(file: file.with(names: f.names), fileOffset: 0x10, nameAt: f.at)
        renamed.symbol = "g"
        #expect(renamed.symbol == "g" && !renamed.symbolIs("f") && renamed != ResolvedProbe(file: file, fileOffset: 0x10, symbol: "f"))
        renamed.symbol = nil
        #expect(renamed.symbol == nil && !renamed.hasSymbol && renamed.symbolIs(String?.none))
        #expect(renamed == ResolvedProbe(file: file, fileOffset: 0x10, symbol: nil), "names buffers are not the file's identity")
    }

    @Test("what a resident probe takes: the record (one site inline) in one 64-byte malloc block, a target in 28 bytes, a stats row in 24")
    func sizes() {
        #expect(MemoryLayout<ResolvedProbe>.size <= 28)
        #expect(MemoryLayout<StatsRow>.stride == 24)
        #expect(MemoryLayout<ProbeSites>.size <= 32)
        let t = target("/a", inode: 1, offset: 0x10)
        for baseHits in [UInt64(0), UInt64(UInt32.max) - 1, UInt64(UInt32.max), .max] {
            let r = ProbeRecord(id: "p1", consumer: nil, owner: .daemon, spec: ProbeSpecInput(path: "/a", symbol: "f"),
                                sites: [ProbeSite(target: t, slot: 1)], registeredAt: 1, registeredAtMonotonic: .now,
                                state: .active, baseHits: baseHits, targets: [t])
            let block = mallocUsableSize(Unmanaged.passUnretained(r).toOpaque())
            // 56 usable bytes: a 64-byte chunk (a 57-byte request would take 80).
            #expect(block == 56, "usable size of the record's malloc block: \(block)")
            #expect(r.hasRareParts == (baseHits >= UInt64(UInt32.max)))
        }
    }

    @Test("one site is kept in the record's own fields and reads back equal: with or without a name, at large offsets and slots; a site with details, several or none take the rare parts")
    func siteInFields() {
        let file = ResolvedFile(path: "/a", device: 7, inode: 9, buildID: "ab")
        let names = SymbolNames.pack(["f", nil, String(repeating: "g", count: 300)])
        func record(_ sites: [ProbeSite], state: ProbeState = .active) -> ProbeRecord {
            ProbeRecord(id: "p5", consumer: nil, owner: .daemon, spec: ProbeSpecInput(path: "/a", symbol: "*"), sites: sites,
                        registeredAt: 1, registeredAtMonotonic: .now, state: state, baseHits: 3, targets: sites.map(\.target))
        }
        var plainSites: [ProbeSite] = []
        for (i, packed) in names.enumerated() {
            let t = ResolvedProbe(file: packed.map { file.with(names: $0.names) } ?? file,
                                  fileOffset: i == 2 ? .max : UInt64(0x1000 * i), nameAt: packed?.at)
            plainSites.append(ProbeSite(target: t, slot: i == 2 ? .max : UInt32(i)))
        }
        plainSites.append(ProbeSite(target: ResolvedProbe(file: file, fileOffset: 0x40, symbol: nil), slot: 1 << 20))
        for site in plainSites {
            let r = record([site])
            #expect(!r.hasRareParts)
            #expect(Array(r.sites) == [site] && r.sites.count == 1 && r.targets == [site.target])
            #expect(r.firstTarget == site.target && r.targetCount == 1 && r.sites[0].slot == site.slot)
            #expect(r.firstTarget?.symbol == site.target.symbol && r.firstTarget?.file === site.target.file)
            // A new version with other sites, and back.
            let two = r.with(sites: [site, plainSites[0]], state: .active, baseHits: 4, targets: [site.target, plainSites[0].target], retired: [])
            #expect(two.hasRareParts && Array(two.sites) == [site, plainSites[0]] && two.targetCount == 2)
            let back = two.with(sites: [site], state: .active, baseHits: 5, targets: [site.target], retired: [])
            #expect(!back.hasRareParts && Array(back.sites) == [site] && back.baseHits == 5)
        }
        var detailed = plainSites[0]
        detailed.target.aliases = ["alias"]
        detailed.target.warning = "w"
        let d = record([detailed])
        #expect(!d.hasRareParts && d.keepsDetailedSite, "a site with details alone goes apart with the terms")
        #expect(Array(d.sites) == [detailed] && d.firstTarget?.aliases == ["alias"] && d.targetCount == 1)
        #expect(d.targets == [detailed.target] && d.consumer == nil && d.spec.symbol == "*" && d.baseHits == 3)
        var semaphore = plainSites[1]
        semaphore.target.refCtrOffset = 0x88
        let sem = record([semaphore])
        #expect(sem.keepsDetailedSite && Array(sem.sites) == [semaphore] && sem.firstTarget?.refCtrOffset == 0x88)
        // Details and something rare: the rare parts hold the site.
        let degradedDetailed = record([detailed], state: .degraded(reason: "gone"))
        #expect(degradedDetailed.hasRareParts && !degradedDetailed.keepsDetailedSite)
        #expect(Array(degradedDetailed.sites) == [detailed] && degradedDetailed.targetCount == 1)
        let plainAgain = d.with(sites: [plainSites[0]], state: .active, baseHits: 3, targets: [plainSites[0].target], retired: [])
        #expect(!plainAgain.hasRareParts && !plainAgain.keepsDetailedSite && Array(plainAgain.sites) == [plainSites[0]])
        let none = record([], state: .ended(reason: "exited"))
        #expect(none.hasRareParts && none.sites.isEmpty && none.targetCount == 0 && none.firstTarget == nil)
        let degradedOne = record([plainSites[0]], state: .degraded(reason: "gone"))
        #expect(degradedOne.hasRareParts && Array(degradedOne.sites) == [plainSites[0]])
    }

    @Test("ids and base hits near 2^32 read back whole; only those that do not fit in 32 bits take the rare parts")
    func narrowFields() {
        let t = target("/a", inode: 1, offset: 0x10)
        let spec = ProbeSpecInput(path: "/a", symbol: "f")
        func record(_ id: String, baseHits: UInt64, state: ProbeState = .active) -> ProbeRecord {
            ProbeRecord(id: id, consumer: nil, owner: .daemon, spec: spec, sites: [ProbeSite(target: t, slot: 7)],
                        registeredAt: 1, registeredAtMonotonic: .now, state: state, baseHits: baseHits, targets: [t])
        }
        func hasRare(_ r: ProbeRecord) -> Bool { r.hasRareParts }
        let limit = UInt64(UInt32.max)
        let numbers: [UInt64] = [0, 1, limit - 1, limit, limit + 1, 1 << 40, .max - 1, .max]
        let hits: [UInt64] = [0, 1, 1_000_000, limit - 1, limit, limit + 1, .max]
        for n in numbers {
            for h in hits {
                let r = record(ProbeID.make(n), baseHits: h)
                #expect(r.id == ProbeID.make(n) && r.number == n && r.baseHits == h && r.isActive)
                #expect(hasRare(r) == (n >= limit || h >= limit), "p\(n) with \(h) base hits")
                // A new version keeps both.
                let next = r.with(sites: r.sites, state: .active, baseHits: h &+ 1, targets: [t], retired: [])
                #expect(next.id == r.id && next.number == n && next.baseHits == h &+ 1)
            }
        }
        // With other rare parts: a degraded record, an id not of the form p<N>.
        let degraded = record("p4294967296", baseHits: .max, state: .degraded(reason: "gone"))
        #expect(degraded.number == 1 << 32 && degraded.baseHits == .max && degraded.state == .degraded(reason: "gone"))
        let other = record("probe-x", baseHits: limit)
        #expect(other.id == "probe-x" && other.number == nil && other.baseHits == limit)
        let otherSmall = record("p007", baseHits: 3)
        #expect(otherSmall.id == "p007" && otherSmall.number == nil && otherSmall.baseHits == 3)
        // A restored record (base hits below 2^32 - 1) stays one block.
        #expect(!hasRare(record("p12", baseHits: 123_456_789)))
    }
}

/// glibc's size of the malloc block at `p` (not in the Glibc module's headers).
@_silgen_name("malloc_usable_size")
private func mallocUsableSize(_ p: UnsafeMutableRawPointer) -> Int
