import Foundation
import Testing
import UprobeCore
import UprobedProtocol
@testable import UprobedServer

struct ProbeSetDirectoryTests {
    func tempDir() throws -> String {
        let d = NSTemporaryDirectory() + "uprobed-probes-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }

    @Test("which entries of probes_dir are sets: *.yaml and *.yml, through links; not hidden entries, directories, dangling links or other files; one set in two files is refused")
    func entries() throws {
        let d = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: d) }
        let fm = FileManager.default
        func write(_ name: String, _ text: String = "probes: []\n") throws { try text.write(toFile: d + "/" + name, atomically: true, encoding: .utf8) }
        try write("a.yaml", "probes:\n  - libc:malloc\n")
        try write("b.yml")
        try write("twice.yaml")
        try write("twice.yml")
        try write("bad.yaml", "probes: [\n")
        try write(".hidden.yaml")
        try write("notes.txt")
        try fm.createDirectory(atPath: d + "/dir.yaml", withIntermediateDirectories: false)
        try fm.createSymbolicLink(atPath: d + "/dangling.yaml", withDestinationPath: d + "/nowhere")
        try fm.createSymbolicLink(atPath: d + "/linked.yaml", withDestinationPath: d + "/b.yml")
        let found = try ProbeSetDirectory.read(d)
        #expect(Set(found.sets.keys) == ["a", "b", "twice", "bad", "linked"])
        #expect(try found.sets["a"]?.content.get().specs == [ProbeSpec(path: "libc", symbol: "malloc")])
        #expect(try found.sets["linked"]?.content.get().entries.isEmpty == true)
        guard case .failure(let twice)? = found.sets["twice"]?.content else { Issue.record("twice accepted"); return }
        #expect(twice.message.contains("defined twice (twice.yaml and twice.yml)"))
        guard case .failure(let bad)? = found.sets["bad"]?.content else { Issue.record("bad accepted"); return }
        #expect(bad.line == 2 && bad.message.contains("not valid YAML"))
    }

    @Test("a missing directory holds no sets; a file that is not a directory cannot be listed (an error, so nothing is removed)")
    func missingAndUnlistable() throws {
        let d = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: d) }
        #expect(try ProbeSetDirectory.read(d + "/absent").sets.isEmpty)
        try "x".write(toFile: d + "/file", atomically: true, encoding: .utf8)
        #expect(throws: (any Error).self) { try ProbeSetDirectory.read(d + "/file") }
    }

    @Test("a file over 1 MiB is refused; so is text that is not UTF-8")
    func sizeAndEncoding() throws {
        let d = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: d) }
        try Data(repeating: 0x23, count: (1 << 20) + 1).write(to: URL(fileURLWithPath: d + "/big.yaml"))
        try Data([0x70, 0xff, 0xfe]).write(to: URL(fileURLWithPath: d + "/latin.yaml"))
        let found = try ProbeSetDirectory.read(d)
        guard case .failure(let big)? = found.sets["big"]?.content, case .failure(let latin)? = found.sets["latin"]?.content else {
            Issue.record("accepted: \(found.sets)")
            return
        }
        #expect(big.message.contains("larger than"))
        #expect(latin.message.contains("not UTF-8"))
    }

    @Test("the applied sets' file round-trips; a bad one is state_corrupt")
    func appliedSetsFile() throws {
        var sets = AppliedSets()
        sets.sets = ["web": [ProbeSpec(path: "/x", symbol: "f", follow: false), ProbeSpec(path: "libc", usdt: "p:n")], "empty": []]
        #expect(try AppliedSets.decode(sets.encode()) == sets)
        for bad in ["{", "[]", #"{"format":"other","version":1,"sets":{}}"#, #"{"format":"uprobed-probe-sets","version":2,"sets":{}}"#,
                    #"{"format":"uprobed-probe-sets","version":1,"sets":{"a":3}}"#,
                    #"{"format":"uprobed-probe-sets","version":1,"sets":{"a":[{"path":"/x"}]}}"#] {
            #expect(throws: StateError.self, "\(bad)") { try AppliedSets.decode(Array(bad.utf8)) }
        }
    }

    @Test("a set's change is computed per spec: kept specs keep their ids, all registrations of a dropped spec go")
    func setChange() {
        func record(_ id: String, _ symbol: String, uid: UInt32 = 0) -> ProbeRecord {
            ProbeRecord(id: id, consumer: "s", owner: Peer(pid: 1, uid: uid, gid: 0), spec: RequestHandler.input(ProbeSpec(path: "/x", symbol: symbol)),
                        sites: [], registeredAt: 0, registeredAtMonotonic: .now, state: .active, baseHits: 0, targets: [], probeSet: "file:s")
        }
        // "f*" registered two functions; "g" one.
        let records = [record("p1", "f*"), record("p2", "f*"), record("p3", "g", uid: 7)]
        let change = SetChange(desired: [ProbeSpec(path: "/x", symbol: "g"), ProbeSpec(path: "/x", symbol: "h")], records: records)
        #expect(change.unchanged == 1 && change.held == 3 && change.owners == [0, 7])
        #expect(change.added.map(\.index) == [1] && change.added.map(\.spec.symbol) == ["h"])
        #expect(change.removed.map(\.ids) == [["p1", "p2"]] && change.removed.map(\.spec.symbol) == ["f*"])
        #expect(SetChange(desired: [ProbeSpec(path: "/x", symbol: "f*"), ProbeSpec(path: "/x", symbol: "g")], records: records).isEmpty)
    }
}
