import Testing
@testable import UprobeCore
import UprobeELF

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
        #expect(Mirror(reflecting: plain).children.first { $0.label == "ownTargets" }.map { "\($0.value)" } == "nil")

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
}
