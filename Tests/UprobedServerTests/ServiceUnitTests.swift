import Foundation
import Logging
import Testing
@testable import UprobeCore
import UprobeKernel
import UprobeELF
import UprobedProtocol
@testable import UprobedServer
import Synchronization

/// journald's field mapping (there is no journald on the test machine: the handler's
/// sd_journal_sendv call itself is not exercised here).
struct JournalFieldTests {
    @Test("metadata keys become upper-case journal fields; the entry carries PRIORITY, MESSAGE, SYSLOG_IDENTIFIER")
    func fieldMapping() {
        let f = JournalLogHandler.fields(level: .warning, message: "access denied\nsecond line",
                                         metadata: ["probe_id": "p7", "path": "/usr/bin/bash", "consumer": "ci",
                                                    "error_code": "permission_denied", "peer_uid": "1000"])
        #expect(Array(f.prefix(3)) == ["PRIORITY=4", "MESSAGE=access denied\nsecond line", "SYSLOG_IDENTIFIER=uprobed"])
        #expect(Array(f.dropFirst(3)) == ["CONSUMER=ci", "ERROR_CODE=permission_denied", "PATH=/usr/bin/bash",
                                          "PEER_UID=1000", "PROBE_ID=p7"])
    }

    @Test("field names are sanitized: no leading underscore or digit, [A-Z0-9_] only, entry fields not shadowed, at most 64")
    func fieldNames() {
        #expect(JournalLogHandler.fieldName("sl-service") == "SL_SERVICE")
        #expect(JournalLogHandler.fieldName("_trusted") == "TRUSTED")
        #expect(JournalLogHandler.fieldName("9lives") == "F9LIVES")
        #expect(JournalLogHandler.fieldName("message") == "UPROBED_MESSAGE")
        #expect(JournalLogHandler.fieldName("priority") == "UPROBED_PRIORITY")
        #expect(JournalLogHandler.fieldName(String(repeating: "a", count: 100)).count == 64)
        #expect(JournalLogHandler.fieldName("ünïcode") == "N_CODE")
    }

    @Test("priorities follow syslog: debug 7 ... critical 2")
    func priorities() {
        #expect(PriorityStderrLogHandler.priority(.debug) == 7)
        #expect(PriorityStderrLogHandler.priority(.info) == 6)
        #expect(PriorityStderrLogHandler.priority(.notice) == 5)
        #expect(PriorityStderrLogHandler.priority(.error) == 3)
        #expect(PriorityStderrLogHandler.priority(.critical) == 2)
    }

    @Test("the shared level cell changes every handler's level at once (config reload)")
    func levelCell() {
        let cell = LogLevelCell(.info)
        let a = PriorityStderrLogHandler(label: "a", levelCell: cell)
        let b = JournalLogHandler(label: "b", levelCell: cell)
        cell.level = .error
        #expect(a.logLevel == .error && b.logLevel == .error)
    }
}

struct StateFileTests {
    static func tempDir() throws -> String {
        let template = NSTemporaryDirectory() + "uprobed-statetest-XXXXXX"
        var buf = Array(template.utf8CString)
        guard mkdtemp(&buf) != nil else { throw StateError(code: .stateIO, message: "mkdtemp") }
        return String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static let sample = { () -> SavedState in
        var s = SavedState(bootID: "b-1", savedAt: 1.5, probes: sampleProbes)
        s.nextID = 12  // p10 and p11 were handed out and removed
        return s
    }()
    static let sampleProbes = [
        SavedProbe(id: "p3", consumer: "ci", owner: Peer(pid: 10, uid: 1000, gid: 1000),
                   spec: ProbeSpecInput(path: "/bin/x", symbol: "f*", pid: 42, retprobe: true),
                   registeredAt: 100.25, hits: UInt64(Int64.max) + 5,
                   targets: [ResolvedProbe(path: "/bin/x", device: 1, inode: 2, buildID: "abcd", fileOffset: 0x1189,
                                           symbol: "fa", aliases: ["fa_alias"], refCtrOffset: 7)],
                   stamp: FileStamp(device: 1, inode: 2, size: 300, mtimeNanos: 123_456_789),
                   pidStartTime: 999, degradedReason: nil),
        SavedProbe(id: "p9", consumer: nil, owner: Peer(pid: 0, uid: 0, gid: 0),
                   spec: ProbeSpecInput(path: "/bin/y", usdt: "prov:name"), registeredAt: 1, hits: 0,
                   targets: [], stamp: nil, pidStartTime: nil, degradedReason: "binary /bin/y no longer exists"),
    ]

    @Test("glibc accepts the daemon's malloc settings (large buffers from the heap, freed memory kept)")
    func mallocSettings() {
        #expect(DaemonProcess.keepFreedMemory())
    }

    @Test("encode/decode round trip keeps every field, 64-bit values included")
    func roundTrip() throws {
        let bytes = StateCodec.encode(Self.sample)
        #expect(try StateCodec.decode(bytes) == Self.sample)
    }

    /// A probe a run can carry: one target that is its spec's plain symbol.
    static func rowProbe(_ n: Int) -> SavedProbe {
        SavedProbe(id: "p\(n)", consumer: "bulk", owner: Peer(pid: 7, uid: 1000, gid: 100),
                   spec: ProbeSpecInput(path: "/bin/m", symbol: "g\(n)"), registeredAt: 5.25, hits: 0,
                   targets: [ResolvedProbe(path: "/bin/m", device: 3, inode: 4, buildID: "beef", fileOffset: UInt64(0x1000 + n),
                                           symbol: "g\(n)")],
                   stamp: FileStamp(device: 3, inode: 4, size: 99, mtimeNanos: 42), pidStartTime: nil, degradedReason: nil)
    }

    @Test("groups: probes that differ only in id, symbol, offset, hits, slot and aliases share one entry; any other difference starts a new one; all decode back exactly")
    func groups() throws {
        // Each variant differs from rowProbe in one field a row does not carry.
        let variants: [(String, (inout SavedProbe) -> Void)] = [
            ("consumer", { $0.consumer = "other" }), ("no consumer", { $0.consumer = nil }),
            ("owner", { $0.owner.pid = 8 }), ("registered_at", { $0.registeredAt = 6 }),
            ("stamp", { $0.stamp?.mtimeNanos = 43 }), ("no stamp", { $0.stamp = nil }),
            ("pid start", { $0.pidStartTime = 12 }), ("degraded", { $0.degradedReason = "gone" }),
            ("ended", { $0.endedReason = "over" }),
            ("spec path", { $0.spec.path = "libm" }), ("spec pid", { $0.spec.pid = 9 }),
            ("retprobe", { $0.spec.retprobe = true }), ("force", { $0.spec.force = true }),
            ("follow", { $0.spec.follow = false }), ("target path", { $0.targets[0].path = "/bin/n" }),
            ("device", { $0.targets[0].device = 5 }), ("inode", { $0.targets[0].inode = 5 }),
            ("build id", { $0.targets[0].buildID = nil }),
        ]
        var probes = (1...5).map(Self.rowProbe)
        probes[1].hits = UInt64(Int64.max) + 3                    // a row with hits, beyond Int64
        probes[2].targets[0].fileOffset = UInt64(Int64.max) + 9   // and an offset beyond it
        var n = 100
        for (_, change) in variants {
            var a = Self.rowProbe(n), b = Self.rowProbe(n + 1)
            change(&a); change(&b)
            probes += [a, b]  // a run of two of their own
            n += 2
        }
        // Not in a group: a semaphore, two targets, an offset spec; and lone members (an
        // alias, a glob).
        var alias = Self.rowProbe(200); alias.targets[0].aliases = ["h"]; alias.targets[0].buildID = "cafe"
        var usdt = Self.rowProbe(201); usdt.targets[0].refCtrOffset = 16
        var glob = Self.rowProbe(202); glob.spec.symbol = "g*"
        var two = Self.rowProbe(203); two.targets.append(two.targets[0])
        var byOffset = Self.rowProbe(204); byOffset.spec.symbol = nil; byOffset.spec.offset = 0x1000
        probes += [alias, usdt, glob, two, byOffset, Self.rowProbe(205)]

        var state = SavedState(bootID: "b", savedAt: 1, probes: probes)
        state.nextID = 300
        let text = String(decoding: StateCodec.encode(state), as: UTF8.self)
        #expect(text.components(separatedBy: "\"group\"").count - 1 == 1 + variants.count, "one group of five, one per variant")
        #expect(try StateCodec.decode(Array(text.utf8)) == state)
        let log = StateCodec.encodeLogEntry(seq: 1, add: probes, remove: [])
        #expect(try StateCodec.replay(log, onto: SavedState(bootID: nil, savedAt: 0, probes: [])).probes == probes)
        let big = (1...10_000).map(Self.rowProbe)
        let bigText = StateCodec.encodeLogEntry(seq: 1, add: big, remove: [])
        #expect(bigText.count < 16 * big.count, "\(bigText.count) bytes for \(big.count) probes")
        #expect(try StateCodec.replay(bigText, onto: SavedState(bootID: nil, savedAt: 0, probes: [])).probes == big)
    }

    @Test("a latency probe's histogram round-trips through the snapshot and the log, and never rides in a run")
    func latencyRoundTrip() throws {
        var p = Self.rowProbe(1)
        p.spec.latency = true
        var h = LatencyHistogram()
        h.calls = 10; h.returns = 7; h.unobserved = 1; h.sumNanoseconds = 1 << 40; h.minNanoseconds = 3; h.maxNanoseconds = UInt64.max - 1
        h.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount)
        h.buckets[3] = 2; h.buckets[LatencyHistogram.overflowIndex] = 5
        p.latency = h
        let state = SavedState(bootID: "b", savedAt: 1, probes: [p, Self.rowProbe(2)])
        #expect(try StateCodec.decode(StateCodec.encode(state)).probes == state.probes)
        #expect(!StateCodec.isGroupMember(p))
        let log = StateCodec.encodeLogEntry(seq: 1, add: [p], remove: [])
        #expect(try StateCodec.replay(log, onto: SavedState(bootID: nil, savedAt: 0, probes: [])).probes == [p])
        // New latency probes (nothing measured yet) share a run, as counting probes do.
        let fresh = (10...14).map { n -> SavedProbe in
            var q = Self.rowProbe(n)
            q.spec.latency = true
            q.latency = LatencyHistogram()
            return q
        }
        #expect(StateCodec.isGroupMember(fresh[0]) && StateCodec.sameGroupShape(fresh[0], fresh[1]))
        #expect(!StateCodec.sameGroupShape(fresh[0], Self.rowProbe(2)))
        let runLog = StateCodec.encodeLogEntry(seq: 1, add: fresh + [Self.rowProbe(2)], remove: [])
        #expect(String(decoding: runLog, as: UTF8.self).components(separatedBy: "\"group\"").count - 1 == 1, "one group of the five")
        #expect(try StateCodec.replay(runLog, onto: SavedState(bootID: nil, savedAt: 0, probes: [])).probes == fresh + [Self.rowProbe(2)])
    }

    @Test("slots and base hits (pinned-link adoption) round-trip in full entries and in rows, mixed with rows that have none")
    func slotsRoundTrip() throws {
        var probes = (1...6).map(Self.rowProbe)
        probes[0].slots = [0]
        probes[1].slots = [7]; probes[1].hits = 12; probes[1].baseHits = 5
        probes[2].slots = [UInt32.max]; probes[2].baseHits = UInt64(Int64.max) + 1
        probes[4].hits = 3  // no slots: a row of four
        var usdt = Self.rowProbe(50); usdt.targets.append(usdt.targets[0]); usdt.targets[1].fileOffset += 8
        usdt.slots = [3, 4]; usdt.baseHits = 99
        probes.append(usdt)
        var state = SavedState(bootID: "b", savedAt: 1, probes: probes)
        state.nextID = 100
        let text = String(decoding: StateCodec.encode(state), as: UTF8.self)
        #expect(text.contains(#""slots":[[0,1],[7,1],[4294967295,1]]"#) && text.contains(#""base_hits":[[1,5],[2,"9223372036854775808"]]"#), "\(text)")
        #expect(text.contains(#""slots":[3,4],"base_hits":99"#), "\(text)")
        #expect(try StateCodec.decode(Array(text.utf8)) == state)
        let bad = #"{"format":"uprobed-state","version":3,"probes":[\#(String(text.split(separator: "[", maxSplits: 1)[1]).replacingOccurrences(of: #""slots":[3,4]"#, with: #""slots":[3]"#))"#
        #expect(throws: StateError.self) { try StateCodec.decode(Array(bad.utf8)) }
    }

    @Test("a latency probe's slots and latency base round-trip; latency_base without slots or malformed is state_corrupt; new latency probes with slots still share a group")
    func latencyBaseRoundTrip() throws {
        var measured = Self.rowProbe(1)
        measured.spec.latency = true
        var total = LatencyHistogram(), base = LatencyHistogram()
        base.calls = 3; base.returns = 3; base.sumNanoseconds = 30; base.minNanoseconds = 9; base.maxNanoseconds = 11
        base.buckets = [UInt64](repeating: 0, count: LatencyHistogram.bucketCount); base.buckets[9] = 3
        total = base; total.calls = 5; total.returns = 5; total.buckets[9] = 5
        measured.latency = total
        measured.slots = [4]; measured.hits = 5; measured.baseHits = 3; measured.latencyBase = base
        #expect(!StateCodec.isGroupMember(measured))
        let fresh = (2...3).map { n -> SavedProbe in
            var q = Self.rowProbe(n)
            q.spec.latency = true
            q.latency = LatencyHistogram()
            q.slots = [UInt32(n)]
            return q
        }
        var state = SavedState(bootID: "b", savedAt: 1, probes: [measured] + fresh)
        state.nextID = 10
        let text = String(decoding: StateCodec.encode(state), as: UTF8.self)
        #expect(text.contains(#""latency_base":{"#), "\(text)")
        #expect(text.components(separatedBy: "\"group\"").count - 1 == 1, "the two new ones are one group: \(text)")
        #expect(try StateCodec.decode(Array(text.utf8)) == state)
        let orphan = text.replacingOccurrences(of: #""slots":[4],"base_hits":3,"#, with: "")
        #expect(orphan != text)
        #expect(throws: StateError.self) { try StateCodec.decode(Array(orphan.utf8)) }
        let malformed = text.replacingOccurrences(of: #""latency_base":{"#, with: #""latency_base":{"x":1,"#)
            .replacingOccurrences(of: #","calls":3"#, with: "")
        #expect(throws: StateError.self) { try StateCodec.decode(Array(malformed.utf8)) }
    }

    @Test("a followed registration's older sites and retired versions round-trip; they keep it out of groups; bad ones are state_corrupt")
    func followedRoundTrip() throws {
        var p = Self.rowProbe(1)
        p.slots = [9]; p.hits = 40; p.baseHits = 12
        var old = p.targets[0]
        old.inode = 77; old.buildID = "cafe"
        p.olderSites = [SavedSite(target: old, slot: 3)]
        p.retired = RetiredVersions(recent: (1...9).map { RetiredVersion(version: FileVersion(device: 3, inode: UInt64(100 + $0), buildID: nil, path: "/bin/m"), hits: UInt64($0)) },
                                    olderCount: 2, olderHits: 5)
        #expect(p.retired.recent.count == RetiredVersions.keptApart && p.retired.count == 10)
        #expect(!StateCodec.isGroupMember(p))
        var onlyRetired = Self.rowProbe(2)
        onlyRetired.retired = [RetiredVersion(version: FileVersion(device: 3, inode: 5, buildID: "ab", path: "/bin/m"), hits: 4)]
        #expect(!StateCodec.isGroupMember(onlyRetired))
        var state = SavedState(bootID: "b", savedAt: 1, probes: [p, onlyRetired, Self.rowProbe(3), Self.rowProbe(4)])
        state.nextID = 10
        let text = String(decoding: StateCodec.encode(state), as: UTF8.self)
        #expect(text.contains(#""older_sites":[{"#) && text.contains(#""older_count":2,"older_hits":5"#), "\(text)")
        #expect(try StateCodec.decode(Array(text.utf8)) == state)
        for bad in [text.replacingOccurrences(of: #""slot":3"#, with: #""slot":-3"#),
                    text.replacingOccurrences(of: #""older_count":2"#, with: #""older_count":-2"#),
                    text.replacingOccurrences(of: #""slots":[9],"base_hits":12,"#, with: "")] {
            #expect(bad != text)
            #expect(throws: StateError.self) { try StateCodec.decode(Array(bad.utf8)) }
        }
    }

    @Test("a glob's registrations are one group (the spec's symbol once, each target's symbol in a column), aliases sparse, ids as ranges; a glob and plain symbols do not share a group")
    func globGroups() throws {
        let glob = (1...6).map { n -> SavedProbe in
            var p = Self.rowProbe(n)
            p.spec.symbol = "g*"
            p.slots = [UInt32(100 + n)]
            return p
        }
        var probes = glob
        probes[2].targets[0].aliases = ["g3_alias", "g3_other"]
        probes[4].id = "p50"        // a hole in the ids: two ranges
        probes[5].slots = [7]       // and in the slots
        probes += [Self.rowProbe(60), Self.rowProbe(61)]   // plain symbols: a group of their own
        var state = SavedState(bootID: "b", savedAt: 1, probes: probes)
        state.nextID = 62
        let text = String(decoding: StateCodec.encode(state), as: UTF8.self)
        #expect(text.components(separatedBy: "\"group\"").count - 1 == 2, "\(text)")
        #expect(text.contains(#""ids":[[1,4],[50,50],[6,6]]"#) && text.contains(#""slots":[[101,5],[7,1]]"#), "\(text)")
        #expect(text.contains(#""aliases":[[2,["g3_alias","g3_other"]]]"#) && text.contains(#""each_symbol":true"#), "\(text)")
        #expect(!text.contains(#""hits":["#), "no hits column when every count is zero")
        #expect(try StateCodec.decode(Array(text.utf8)) == state)
        let log = StateCodec.encodeLogEntry(seq: 1, add: probes, remove: ["p70"])
        #expect(try StateCodec.replay(log, onto: SavedState(bootID: nil, savedAt: 0, probes: [])).probes == probes)
        // 10,000 registrations of a glob: a column entry each (the symbol and offset), not an entry.
        let big = (1...10_000).map { n -> SavedProbe in
            var p = Self.rowProbe(n)
            p.spec.symbol = "*"
            p.slots = [UInt32(n)]
            return p
        }
        let bigText = StateCodec.encodeLogEntry(seq: 1, add: big, remove: [])
        #expect(bigText.count < 16 * big.count, "\(bigText.count) bytes for \(big.count) probes")
        #expect(try StateCodec.replay(bigText, onto: SavedState(bootID: nil, savedAt: 0, probes: [])).probes == big)
    }

    @Test("bad groups are state_corrupt: columns of other lengths, bad ranges, a first registration that cannot be a member, a sparse index out of range")
    func corruptGroups() throws {
        var a = Self.rowProbe(1), b = Self.rowProbe(2)
        a.slots = [1]; b.slots = [2]
        let line = String(decoding: StateCodec.encodeLogEntry(seq: 1, add: [a, b], remove: []), as: UTF8.self)
        let good = #"{"format":"uprobed-state","version":4,"probes":\#(line.dropFirst(#"{"seq":1,"add":"#.count).dropLast("}\n".count))}"#
        #expect(try StateCodec.decode(Array(good.utf8)).probes == [a, b])
        let breaks = [(#""ids":[[1,2]]"#, #""ids":[[1,3]]"#), (#""ids":[[1,2]]"#, #""ids":[[2,1]]"#),
                      (#""ids":[[1,2]]"#, #""id_list":["p1"]"#), (#""slots":[[1,2]]"#, #""slots":[[1,1]]"#),
                      (#""slots":[[1,2]]"#, #""slots":[[4294967295,2]]"#), (#""offsets":[4097,4098]"#, #""offsets":[4097]"#),
                      (#""symbols":["g1","g2"]"#, #""symbols":["g1",""]"#), (#""offsets":[4097,4098]"#, #""offsets":[4097,-1]"#),
                      (#""each_symbol":true"#, #""each_symbol":true,"aliases":[[2,["x"]]]"#),
                      (#""each_symbol":true"#, #""each_symbol":true,"hits":[1]"#),
                      (#""spec":{"#, #""spec":{"usdt":"a:b","#)]
        for (from, to) in breaks {
            #expect(good.contains(from), "\(from) in \(good)")
            let bad = good.replacingOccurrences(of: from, with: to)
            do {
                _ = try StateCodec.decode(Array(bad.utf8))
                Issue.record("accepted: \(to)")
            } catch {
                #expect(error.code.rawValue == "state_corrupt", "\(to)")
            }
        }
    }

    @Test("a version 3 state (full entries and runs of rows with slots) loads, and the first change rewrites it as version 5 with the same registrations")
    func migrateVersion3() throws {
        // As uprobed wrote version 3: a run's rows are [id, symbol, offset, hits, slot(, base hits)].
        let first = String(decoding: StateCodec.encodeLogEntry(seq: 1, add: [Self.rowProbe(1)], remove: []), as: UTF8.self)
        let probe = String(first.dropFirst(#"{"seq":1,"add":["#.count).dropLast("]}\n".count))
        let v3 = #"{"format":"uprobed-state","version":3,"seq":4,"next_id":9,"probes":[\#(probe.replacingOccurrences(of: #""id":"p1""#, with: #""id":"p8""#)),{"run":\#(probe),"rows":[["p1","g1",4097,0,3],["p2","g2",4098,5,4,2]]}]}"#
        var p1 = Self.rowProbe(1); p1.slots = [3]
        var p2 = Self.rowProbe(2); p2.slots = [4]; p2.hits = 5; p2.baseHits = 2
        var p8 = Self.rowProbe(1); p8.id = "p8"
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir)
        try Data(v3.utf8).write(to: URL(fileURLWithPath: store.path))
        let restored = try #require(try store.load())
        #expect(restored.formatVersion == 3 && restored.probes == [p8, p1, p2] && restored.nextID == 9)
        let persister = StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: restored)
        var snap = RegistrySnapshot()
        snap.add(Self.records(20..<22, path: dir), generation: 1)
        try persister.persist(snap)
        try persister.sync()
        let onDisk = try String(contentsOfFile: store.path, encoding: .utf8)
        #expect(onDisk.contains(#""version":5"#) && !onDisk.contains(#""rows""#))
        #expect(try StateStore(dir: dir).load()?.probes.map(\.id) == ["p20", "p21"])
    }

    @Test("the types a run shares are the ones sameRowShape compares: a new field must be taught to it (this test lists them)")
    func rowFields() {
        func fields(_ v: Any) -> [String] { Mirror(reflecting: v).children.compactMap(\.label) }
        let p = Self.rowProbe(1)
        #expect(fields(p) == ["id", "consumer", "owner", "spec", "registeredAt", "hits", "targets", "stamp", "pidStartTime", "degradedReason", "endedReason", "slots", "baseHits", "probeSet", "latency", "latencyBase", "olderSites", "retired", "nameFile", "unknownNames"])
        #expect(fields(p.spec) == ["path", "symbol", "offset", "usdt", "pid", "retprobe", "force", "follow", "latency"])
        // A target keeps its file (path, device, inode, build-id, and the buffer its symbol is
        // in: `nameAt` is where, each row's own) and its rare parts (aliases, semaphore,
        // warning) behind references.
        #expect(fields(p.targets[0]) == ["file", "fileOffset", "details", "nameAt"])
        #expect(fields(p.targets[0].file) == ["path", "device", "inode", "buildID", "names"])
    }

    @Test("bad runs are state_corrupt: no rows, a short row, a first probe that cannot be a row")
    func corruptRuns() throws {
        let first = String(decoding: StateCodec.encodeLogEntry(seq: 1, add: [Self.rowProbe(1)], remove: []), as: UTF8.self)
        // {"seq":1,"add":[<probe>]}\n -> the probe's text
        let probe = String(first.dropFirst(#"{"seq":1,"add":["#.count).dropLast("]}\n".count))
        var alias = Self.rowProbe(2); alias.targets[0].aliases = ["h"]
        let aliasText = String(decoding: StateCodec.encodeLogEntry(seq: 1, add: [alias], remove: []), as: UTF8.self)
            .dropFirst(#"{"seq":1,"add":["#.count).dropLast("]}\n".count)
        for run in [#"{"run":\#(probe),"rows":[]}"#, #"{"rows":[["p1","g1",4096]]}"#,
                    #"{"run":\#(probe),"rows":[["p1","g1"]]}"#, #"{"run":\#(probe),"rows":[["p1","",4096]]}"#,
                    #"{"run":\#(probe),"rows":[["p1","g1",-1]]}"#, #"{"run":\#(probe),"rows":[["p1","g1",1,2,3,4,5]]}"#,
                    #"{"run":\#(probe),"rows":[["p1","g1",1,2,-3]]}"#,
                    #"{"run":\#(aliasText),"rows":[["p1","g1",4096]]}"#] {
            let text = #"{"format":"uprobed-state","version":2,"probes":[\#(run)]}"#
            do {
                _ = try StateCodec.decode(Array(text.utf8))
                Issue.record("accepted: \(run)")
            } catch {
                #expect(error.code.rawValue == "state_corrupt")
            }
        }
        let good = #"{"format":"uprobed-state","version":2,"probes":[{"run":\#(probe),"rows":[["p1","g1",4097],["p2","g2",4098,5]]}]}"#
        let decoded = try StateCodec.decode(Array(good.utf8)).probes
        var second = Self.rowProbe(2); second.hits = 5
        #expect(decoded == [Self.rowProbe(1), second])
    }

    @Test("format versions: 1 is read, 6 is refused; after restoring a version 1 file, the first change rewrites the snapshot instead of appending to the log")
    func formatVersions() throws {
        var v1 = String(decoding: StateCodec.encode(Self.sample), as: UTF8.self)
        #expect(v1.contains(#""version":5"#))
        v1 = v1.replacingOccurrences(of: #""version":5"#, with: #""version":1"#)
        let read = try StateCodec.decode(Array(v1.utf8))
        #expect(read.formatVersion == 1 && read.probes == Self.sample.probes)
        let v6 = v1.replacingOccurrences(of: #""version":1"#, with: #""version":6"#)
        #expect(throws: StateError.self) { try StateCodec.decode(Array(v6.utf8)) }

        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir)
        try Data(v1.utf8).write(to: URL(fileURLWithPath: store.path))
        let restored = try #require(try store.load())
        let persister = StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: restored)
        var snap = RegistrySnapshot()
        snap.add(Self.records(20..<22, path: dir), generation: 1)
        try persister.persist(snap)
        try persister.sync()
        let onDisk = try String(contentsOfFile: store.path, encoding: .utf8)
        #expect(onDisk.contains(#""version":5"#) && onDisk.contains(#""p20""#))
        #expect(store.size(store.logPath) == 0, "nothing appended after a version 1 snapshot")
        #expect(try StateStore(dir: dir).load()?.probes.map(\.id) == ["p20", "p21"])
    }

    @Test("after a failed fsync the next change rewrites the snapshot instead of appending to the log")
    func rewriteAfterFailedSync() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir)
        let persister = StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: nil)
        var snap = RegistrySnapshot()
        snap.add(Self.records(20..<21, path: dir), generation: 1)
        try persister.persist(snap)
        // The sync opens the log by name: a directory there makes it fail (root ignores modes).
        #expect(rename(store.logPath, store.logPath + ".aside") == 0)
        try FileManager.default.createDirectory(atPath: store.logPath, withIntermediateDirectories: false)
        #expect(throws: StateError.self) { try persister.sync() }
        try FileManager.default.removeItem(atPath: store.logPath)
        #expect(rename(store.logPath + ".aside", store.logPath) == 0)

        snap.add(Self.records(21..<22, path: dir), generation: 2)
        try persister.persist(snap)
        try persister.sync()
        let onDisk = try String(contentsOfFile: store.path, encoding: .utf8)
        #expect(onDisk.contains(#""p20""#) && onDisk.contains(#""p21""#), "the snapshot holds both")
        #expect(store.size(store.logPath) == 0, "nothing appended after the failed sync")
        #expect(try StateStore(dir: dir).load()?.probes.map(\.id) == ["p20", "p21"])
    }

    @Test("next_id: kept as saved, never below the highest saved or logged id; old files without it get one")
    func nextIDFloor() throws {
        var old = Self.sample
        old.nextID = 1
        var text = String(decoding: StateCodec.encode(old), as: UTF8.self)
        text = text.replacingOccurrences(of: #""next_id":1,"#, with: "")
        #expect(!text.contains("next_id"))
        #expect(try StateCodec.decode(Array(text.utf8)).nextID == 10, "highest saved id is p9")
        let log = StateCodec.encodeLogEntry(seq: 1, add: [SavedProbe(id: "p40", consumer: nil, owner: Peer(pid: 0, uid: 0, gid: 0),
                                                                     spec: ProbeSpecInput(path: "/bin/x", symbol: "f"), registeredAt: 1,
                                                                     hits: 0, targets: [], stamp: nil, pidStartTime: nil,
                                                                     degradedReason: nil)],
                                            remove: ["p40"])
        #expect(try StateCodec.replay(log, onto: Self.sample).nextID == 41, "an id added and removed in the log stays used")
    }

    @Test("corrupt files are state_corrupt errors, never an empty state")
    func corrupt() {
        for text in ["", "{", "[]", "{\"format\":\"other\",\"version\":1,\"probes\":[]}",
                     "{\"format\":\"uprobed-state\",\"version\":99,\"probes\":[]}",
                     "{\"format\":\"uprobed-state\",\"version\":1,\"probes\":[{\"id\":\"p1\"}]}",
                     "{\"format\":\"uprobed-state\",\"version\":1}"] {
            do {
                _ = try StateCodec.decode(Array(text.utf8))
                Issue.record("accepted: \(text)")
            } catch {
                #expect(error.code.rawValue == "state_corrupt")
            }
        }
    }

    @Test("the store writes atomically (no temporary left), loads what it wrote, reports a missing file as nil")
    func store() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir + "/nested/state")
        try store.prepare()
        #expect(try store.load() == nil)
        try store.write(Self.sample)
        #expect(try store.load() == Self.sample)
        #expect(!FileManager.default.fileExists(atPath: store.path + ".tmp"))
        var st = stat()
        #expect(stat(dir + "/nested/state", &st) == 0 && st.st_mode & 0o777 == 0o700)
        #expect(stat(store.path, &st) == 0 && st.st_mode & 0o777 == 0o600)
        try "garbage".write(toFile: store.path, atomically: true, encoding: .utf8)
        #expect(throws: StateError.self) { try store.load() }
        let moved = try store.moveAside()
        #expect(moved.count == 1 && moved.allSatisfy { FileManager.default.fileExists(atPath: $0) }, "\(moved)")
        #expect(try store.load() == nil)
    }

    @Test("a file system error is state_io and names what the store was doing, the call, its file and the errno")
    func ioErrors() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "".write(toFile: dir + "/file", atomically: true, encoding: .utf8)
        do {
            try StateStore(dir: dir + "/file/state").prepare()
            Issue.record("made a directory under a file")
        } catch {
            #expect(error.code.rawValue == "state_io" && error.cause?.errno == .notDirectory)
            #expect(error.message == "cannot create the state directory: mkdir(\(dir)/file/state): Not a directory", "\(error)")
        }
        let store = StateStore(dir: dir + "/state")
        try store.prepare()
        #expect(mkdir(store.path, 0o700) == 0)  // a snapshot that is a directory
        do {
            _ = try store.load()
            Issue.record("read a directory as the snapshot")
        } catch {
            #expect(error.code.rawValue == "state_io" && !error.isDiskFull)
            #expect(error.message == "cannot read the snapshot: read(\(store.path)): Is a directory", "\(error)")
        }
    }

    @Test("the log: entries apply in order above the snapshot's seq; a torn last line is ignored; a bad middle line is corruption")
    func logReplay() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir)
        var base = Self.sample
        base.seq = 5
        try store.write(base)  // also drops any log
        let p3 = base.probes[0]
        var p4 = p3
        p4.id = "p4"
        try store.append(StateCodec.encodeLogEntry(seq: 4, add: [p4], remove: []))          // already in the snapshot: skipped
        try store.append(StateCodec.encodeLogEntry(seq: 6, add: [p4], remove: ["p9"]))
        try store.append(StateCodec.encodeLogEntry(seq: 7, add: [], remove: ["p3"]))
        var loaded = try store.load()
        #expect(loaded?.probes.map(\.id) == ["p4"])
        #expect(loaded?.seq == 7)
        // A torn tail (crash mid-append, never synced, never acknowledged) is ignored.
        let fd = open(store.logPath, O_WRONLY | O_APPEND)
        let torn = Array(StateCodec.encodeLogEntry(seq: 8, add: [p3], remove: []).dropLast(10))
        _ = torn.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        loaded = try store.load()
        #expect(loaded?.probes.map(\.id) == ["p4"])
        // The same bytes followed by a complete line: corruption in the middle.
        try store.append(StateCodec.encodeLogEntry(seq: 9, add: [], remove: []))
        #expect(throws: StateError.self) { try store.load() }
        // A snapshot write drops the log.
        try store.write(base)
        #expect(!FileManager.default.fileExists(atPath: store.logPath))
        #expect(try store.load()?.probes.map(\.id) == ["p3", "p9"])
    }

    @Test("a log moved aside for a snapshot (state.log.prev) is replayed before the log; a snapshot that covers only it drops it and keeps the log")
    func previousLog() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir)
        var base = Self.sample  // p3, p9
        base.seq = 5
        try store.write(base)
        #expect(try store.rotateLog() == false, "no log to move aside")
        var p4 = base.probes[0]
        p4.id = "p4"
        var p5 = p4
        p5.id = "p5"
        try store.append(StateCodec.encodeLogEntry(seq: 4, add: [p5], remove: []))          // in the snapshot already: skipped
        try store.append(StateCodec.encodeLogEntry(seq: 6, add: [p4], remove: ["p9"]))
        #expect(try store.rotateLog() == true)
        #expect(!FileManager.default.fileExists(atPath: store.logPath))
        try store.append(StateCodec.encodeLogEntry(seq: 7, add: [p5], remove: ["p3"]))
        try store.append(StateCodec.encodeLogEntry(seq: 8, add: [], remove: ["p4"]))
        #expect(try store.rotateLog() == false, "a prev is still there")
        var loaded = try #require(try store.load())
        #expect(loaded.probes.map(\.id) == ["p5"] && loaded.seq == 8, "prev's lines first, then the log's")
        // A crash after the new snapshot (seq 6) was renamed in place, before prev was dropped.
        var covered = try StateCodec.replay(Array(StateCodec.encodeLogEntry(seq: 6, add: [p4], remove: ["p9"])), onto: base)
        covered.seq = 6
        let prevText = try Data(contentsOf: URL(fileURLWithPath: store.previousLogPath))
        try store.write(covered, covering: .previousLog)
        #expect(!FileManager.default.fileExists(atPath: store.previousLogPath))
        #expect(try store.load() == loaded)
        try prevText.write(to: URL(fileURLWithPath: store.previousLogPath))
        loaded = try #require(try store.load())
        #expect(loaded.probes.map(\.id) == ["p5"] && loaded.seq == 8, "prev's lines are at or below the snapshot's seq")
        try store.write(loaded)
        #expect(!FileManager.default.fileExists(atPath: store.previousLogPath) && !FileManager.default.fileExists(atPath: store.logPath))
    }

    @Test("a snapshot due while batches go on is written off the writer: the log moves aside, later batches start a new log, and every batch stays on disk")
    func snapshotOffTheWriter() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try Self.stampableFile(in: dir)
        let store = try Self.preparedStore(in: dir)
        let queue = DispatchQueue(label: "snapshot-test")
        let persister = StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: nil,
                                       snapshotQueue: queue)
        var snap = RegistrySnapshot()
        var next: UInt64 = 1
        var generation: UInt64 = 0
        func batch() throws {
            generation += 1
            let added = Self.records(next..<next + 500, path: binary)
            next += 500
            // Remove half of what is there: the log carries removals, and soon holds more dead
            // entries than half the live ones, which makes a snapshot due (`compactionDue`).
            let removed = snap.sortedProbes.enumerated().filter { $0.offset % 2 == 1 }.map(\.element.id)
            for id in removed { _ = snap.probes.remove(id) }
            snap.add(added, generation: generation)
            snap.batchRemoved = removed
            try persister.persist(snap)
            try persister.sync()
        }
        func onDisk() throws -> [String] { try #require(try StateStore(dir: dir + "/state").load()).probes.map(\.id) }

        // The snapshot writer is held up: batches must go on without it.
        let gate = DispatchSemaphore(value: 0)
        queue.async { gate.wait() }
        var rounds = 0
        while !FileManager.default.fileExists(atPath: store.previousLogPath) && rounds < 400 {
            try batch()
            rounds += 1
        }
        #expect(FileManager.default.fileExists(atPath: store.previousLogPath), "the log passed 1 MiB and was moved aside")
        for _ in 0..<3 { try batch() }
        #expect(!FileManager.default.fileExists(atPath: store.path), "the snapshot is not written by the batches")
        #expect(try onDisk() == snap.sortedProbes.map(\.id), "a crash now: no snapshot, prev and the new log hold everything")

        gate.signal()
        persister.waitForSnapshotWrite()
        #expect(FileManager.default.fileExists(atPath: store.path))
        #expect(!FileManager.default.fileExists(atPath: store.previousLogPath), "the snapshot in place, the log it covers is gone")
        let saved = try StateCodec.decode(Array(try Data(contentsOf: URL(fileURLWithPath: store.path))))
        let lines = try String(contentsOfFile: store.logPath, encoding: .utf8).split(separator: "\n")
        let seqs = lines.compactMap { try? JSONParser.parse(Array($0.utf8)).objectValue?["seq"]?.int64Value }
        #expect(seqs == Array(Int64(saved.seq) + 1...Int64(saved.seq) + 3),
                "the three batches after the one that took the snapshot, in a new log: \(seqs), snapshot seq \(saved.seq)")
        #expect(try onDisk() == snap.sortedProbes.map(\.id))
        for _ in 0..<10 {
            try batch()
            persister.waitForSnapshotWrite()
            #expect(try onDisk() == snap.sortedProbes.map(\.id))
        }
        // A checkpoint writes the same way; the log's lines are all at or below its seq.
        try persister.checkpoint(snap)
        #expect(try onDisk() == snap.sortedProbes.map(\.id))
        #expect(!FileManager.default.fileExists(atPath: store.logPath) && !FileManager.default.fileExists(atPath: store.previousLogPath))
    }

    @Test("compaction on thresholds: a log of one large registration is not rewritten as a snapshot, nor a log of live registrations in a few lines; removing most of them makes one due")
    func compactionThresholds() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try Self.stampableFile(in: dir)
        let store = try Self.preparedStore(in: dir)
        let persister = StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: nil)
        var snap = RegistrySnapshot()
        var generation: UInt64 = 0
        func commit(_ add: [ProbeRecord], remove: [String] = []) throws {
            generation += 1
            for id in remove { _ = snap.probes.remove(id) }
            snap.add(add, generation: generation)
            snap.batchRemoved = remove
            try persister.persist(snap)
            try persister.sync()
            persister.waitForSnapshotWrite()
        }
        // Records that differ in every shared field (alternating files and consumers) are written
        // in full: 40,000 of them are several MiB, far past the compaction floor.
        let big = Self.records(1..<40_001, path: binary)
        try commit(big)
        #expect(store.size(store.logPath) > 4 << 20 && !FileManager.default.fileExists(atPath: store.path),
                "one large line: no snapshot rewrite (log \(store.size(store.logPath)) bytes)")
        try commit(Self.records(40_001..<40_003, path: binary))
        #expect(!FileManager.default.fileExists(atPath: store.path), "two lines of live registrations: none either")
        // Most removed: the files hold mostly dead entries, and a snapshot replaces the log.
        try commit([], remove: big.prefix(30_000).map(\.id))
        #expect(FileManager.default.fileExists(atPath: store.path) && store.size(store.logPath) == 0, "compacted")
        #expect(try StateStore(dir: dir + "/state").load()?.probes.map(\.id) == snap.sortedProbes.map(\.id))
    }

    /// A state store at DIR/state, its directory made.
    static func preparedStore(in dir: String) throws -> StateStore {
        let store = StateStore(dir: dir + "/state")
        try store.prepare()
        return store
    }

    /// A file at DIR/bin for records to point at, so the persister has something to stamp.
    static func stampableFile(in dir: String) throws -> String {
        let binary = dir + "/bin"
        try Data("x".utf8).write(to: URL(fileURLWithPath: binary))
        return binary
    }

    @Test("a checkpoint with nothing registered, removed or counted since the last snapshot writes nothing; a hit or a change makes it write")
    func idleCheckpointSkipped() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try Self.stampableFile(in: dir)
        let store = try Self.preparedStore(in: dir)
        let kernel = SettableKernel()
        let counters = ServiceCounters()
        let persister = StatePersister(store: store, kernel: kernel, counters: counters, restored: nil)
        var snap = RegistrySnapshot()
        snap.add(Self.records(1..<4, path: binary), generation: 1)
        snap.slotHighWater = 4
        try persister.persist(snap)
        try persister.sync()
        func writes() -> UInt64 { counters.stateWrites.load(ordering: .relaxed) }
        func inode() -> UInt64 { var st = stat(); return stat(store.path, &st) == 0 ? UInt64(st.st_ino) : 0 }

        try persister.checkpoint(snap)
        let (w1, i1) = (writes(), inode())
        #expect(i1 != 0)
        try persister.checkpoint(snap)
        try persister.checkpoint(snap)
        #expect(writes() == w1 && inode() == i1, "idle: the snapshot on disk is the same file")

        kernel.counts.withLock { $0[2] = 5 }
        try persister.checkpoint(snap)
        #expect(writes() == w1 + 1 && inode() != i1, "a hit since: rewritten")
        #expect(try StateStore(dir: dir + "/state").load()?.probes.first { $0.id == "p2" }?.hits == 5)
        let i2 = inode()
        try persister.checkpoint(snap)
        #expect(inode() == i2)

        snap.add(Self.records(4..<5, path: binary), generation: 2)
        try persister.persist(snap)
        try persister.sync()
        try persister.checkpoint(snap)
        #expect(inode() != i2, "a registration since: rewritten")
        #expect(try StateStore(dir: dir + "/state").load()?.probes.count == 4)
    }

    /// Hit counters a test sets by slot.
    final class SettableKernel: KernelBackend, Sendable {
        let counts = Mutex<[UInt64]>(Array(repeating: 0, count: 16))
        var capacity: UInt32 { 16 }
        func attach(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool) throws(KernelError) -> any KernelLink {
            throw KernelError(code: .internalError, message: "not in this test")
        }
        func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) {}
        func sweepMarks(slots: Set<UInt32>) throws(KernelError) {}
        func resetCounters(slots: [UInt32]) throws(KernelError) {}
        func readCounters(upTo: UInt32) throws(KernelError) -> [UInt64] { counts.withLock { Array($0.prefix(Int(upTo))) } }
        func closeAll(_ links: [any KernelLink]) {}
    }

    /// Reads zero hits; the persister needs nothing else from the kernel.
    struct ZeroKernel: KernelBackend {
        var capacity: UInt32 { 1 << 20 }
        func attach(path: String, sites: [LinkSite], pid: Int32?, retprobe: Bool) throws(KernelError) -> any KernelLink {
            throw KernelError(code: .internalError, message: "not in this test")
        }
        func setOverlap(_ on: Bool, slots: [UInt32]) throws(KernelError) {}
        func sweepMarks(slots: Set<UInt32>) throws(KernelError) {}
        func resetCounters(slots: [UInt32]) throws(KernelError) {}
        func readCounters(upTo: UInt32) throws(KernelError) -> [UInt64] { Array(repeating: 0, count: Int(upTo)) }
        func closeAll(_ links: [any KernelLink]) {}
    }

    /// Records of `path`; odd ones claim another file (device 7, inode 8), so their stamp is nil.
    static func records(_ numbers: Range<UInt64>, path: String) -> [ProbeRecord] {
        var st = stat()
        _ = stat(path, &st)
        return numbers.map { n in
            let target = ResolvedProbe(path: path, device: n % 2 == 0 ? UInt64(st.st_dev) : 7, inode: n % 2 == 0 ? UInt64(st.st_ino) : 8,
                                       buildID: "b\(n % 3)", fileOffset: 0x1000 + n,
                                       symbol: "f\(n)", aliases: [], refCtrOffset: nil)
            return ProbeRecord(id: ProbeID.make(n), consumer: n % 2 == 0 ? "even" : nil, owner: Peer(pid: 5, uid: 1000, gid: 100),
                               spec: ProbeSpecInput(path: path, symbol: "f\(n)"), sites: [ProbeSite(target: target, slot: UInt32(n))],
                               registeredAt: 1_700_000_000.25, registeredAtMonotonic: .now, state: .active, baseHits: 0,
                               targets: [target])
        }
    }

    @Test("new records encoded ahead as groups straight from the records are the same bytes as their saved forms encoded: globs, plain symbols, aliases, slots or none, hits, other ids, shapes that differ, and runs with a latency or degraded record")
    func recordGroupsMatchSavedForm() throws {
        func record(_ n: UInt64, id: String? = nil, symbol: String = "*", consumer: String? = "c", path: String = "/bin/m",
                    aliases: [String] = [], slotMatches: Bool = true, baseHits: UInt64 = 0, latency: Bool = false,
                    state: ProbeState = .active, pid: Int32? = nil) -> ProbeRecord {
            let target = ResolvedProbe(path: path, device: 3, inode: 4, buildID: "beef", fileOffset: 0x1000 + n,
                                       symbol: "f\(n)", aliases: aliases, refCtrOffset: nil)
            var site = target
            if !slotMatches { site.fileOffset += 1 }
            return ProbeRecord(id: id ?? ProbeID.make(n), consumer: consumer, owner: Peer(pid: 5, uid: 0, gid: 0),
                               spec: ProbeSpecInput(path: path, symbol: symbol == "own" ? "f\(n)" : symbol, pid: pid, latency: latency),
                               sites: [ProbeSite(target: site, slot: UInt32(n))], registeredAt: 7.5, registeredAtMonotonic: .now,
                               state: state, baseHits: baseHits, targets: [target])
        }
        let stamp = ProbeStamps(file: FileStamp(device: 3, inode: 4, size: 1, mtimeNanos: 2), processStart: nil)
        var mixed = (1...5).map { record($0) }                                   // a glob
        mixed += [record(6, aliases: ["a6", "b6"]), record(7, baseHits: 9), record(9), record(10, slotMatches: false)]
        mixed += (20...23).map { record($0, symbol: "own") }                      // plain symbols
        mixed += [record(24, id: "custom", symbol: "own"), record(25, consumer: nil), record(26, consumer: nil),
                  record(27, path: "/bin/n"), record(28, pid: 44), record(29, pid: 44)]
        let cases: [[ProbeRecord]] = [mixed, mixed + [record(40, latency: true)], [record(50, state: .degraded(reason: "x")), record(51)],
                                      [record(60)], (1...3).map { record($0 + 70, symbol: "g*") }]
        for records in cases {
            var stamps = records.map { _ in stamp }
            if records.count > 20 { stamps[records.count - 1].processStart = 99 }
            let direct = StateCodec.encodeElements(records: records, stamps: stamps)
            let saved = StateCodec.encodeElements(zip(records, stamps).map { SavedProbe($0, hits: $0.baseHits, stamps: $1) })
            #expect(direct == saved, "\(String(decoding: direct, as: UTF8.self))\n\(String(decoding: saved, as: UTF8.self))")
        }
        #expect(String(decoding: StateCodec.encodeElements(records: mixed, stamps: mixed.map { _ in stamp }), as: UTF8.self)
            .components(separatedBy: "\"group\"").count - 1 >= 3)
    }

    @Test("a register reply written ahead is the same text as one written after, and only for the records it was written for")
    func preparedReply() throws {
        let records = Self.records(1..<1201, path: "/bin/x")
        let queue = DispatchQueue(label: "prepared-reply-test")
        let ahead = PreparedReply()
        #expect(ahead.take(for: records) == nil, "nothing before it is written")
        ahead.start(records, on: queue)
        queue.sync {}
        var inline = JSONWriter()
        inline.beginObject()
        inline.objects("probes", records) { w, r in RequestHandler.writeRecord(r, into: &w) }
        inline.endObject()
        let text = try #require(ahead.take(for: records))
        var spliced = JSONWriter()
        spliced.beginObject()
        spliced.key("probes")
        text.withUnsafeBufferPointer { spliced.rawValue($0) }
        spliced.endObject()
        #expect(spliced.bytes == inline.bytes)
        #expect(ahead.take(for: Array(records.dropLast())) == nil)
        #expect(ahead.take(for: Self.records(1..<1201, path: "/bin/x")) == nil, "same ids, other records")
    }

    /// A published registry as `persist` sees it: its generation and the registrations its batch added.
    static func snapshot(_ generation: UInt64, adding: [ProbeRecord]) -> RegistrySnapshot {
        var s = RegistrySnapshot()
        s.generation = generation
        s.batchAdded = adding
        return s
    }

    @Test("runs encoded ahead (prepare) are spliced into the log entry; a run its batch did not add is dropped and written inline later")
    func preparedRuns() throws {
        let dirA = try Self.tempDir(), dirB = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dirA); try? FileManager.default.removeItem(atPath: dirB) }
        let binary = try Self.stampableFile(in: dirA)
        let small = Self.records(1..<4, path: binary), big = Self.records(4..<1504, path: binary),
            failed = Self.records(1504..<2504, path: binary)
        func persister(_ dir: String) throws -> StatePersister {
            let store = StateStore(dir: dir)
            try store.prepare()
            return StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: nil)
        }
        // A: two runs prepared; the batch adds a few inline, then one run (the other request failed).
        let a = try persister(dirA)
        a.prepare(big)
        a.prepare(failed)
        try a.persist(Self.snapshot(1, adding: small + big))
        // The failed request's ids come back later in another batch (they would not: ids are
        // not reused; this checks the dropped run is not spliced in by mistake).
        try a.persist(Self.snapshot(2, adding: Array(failed.prefix(2))))
        // B: the same batches without prepare: everything written inline.
        let b = try persister(dirB)
        try b.persist(Self.snapshot(1, adding: small + big))
        try b.persist(Self.snapshot(2, adding: Array(failed.prefix(2))))
        try a.sync(); try b.sync()
        let loadedA = try #require(try StateStore(dir: dirA).load())
        let loadedB = try #require(try StateStore(dir: dirB).load())
        #expect(loadedA.probes.count == 3 + 1500 + 2)
        let same = loadedA.probes.sorted { $0.id < $1.id } == loadedB.probes.sorted { $0.id < $1.id }
        #expect(same, "prepared and inline encodings decode to the same registrations")
        let byID = Dictionary(loadedA.probes.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        #expect(byID["p4"]?.stamp != nil && byID["p5"]?.stamp == nil && byID["p2"]?.stamp != nil,
                "a stamp only for the file the probe was resolved in, spliced or not")
        let log = try String(contentsOfFile: StateStore(dir: dirA).logPath, encoding: .utf8)
        #expect(log.split(separator: "\n").count == 2)
        #expect(log.components(separatedBy: "\"p1504\"").count == 2,
                "a dropped run is never spliced: p1504 appears once, in the second entry")

        // A spliced run's ids are entered into the memo off the writer; a removal right after
        // must still find them on disk (or it would be left out of the log).
        var removal = Self.snapshot(3, adding: [])
        removal.batchRemoved = [big[0].id, big[1499].id]
        try a.persist(removal)
        try a.sync()
        let afterRemoval = try #require(try StateStore(dir: dirA).load())
        #expect(afterRemoval.probes.count == 3 + 1500 + 2 - 2)
        #expect(!afterRemoval.probes.contains { $0.id == big[0].id || $0.id == big[1499].id })
    }

    @Test("a batch whose run is still being encoded ahead, behind a deferred settle of the batch before, is saved: the writer does not wait for the encode with the memo lock held")
    func preparedRunBehindSettle() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try Self.stampableFile(in: dir)
        let first = Self.records(1..<1201, path: binary), second = Self.records(1201..<2401, path: binary)
        let store = try Self.preparedStore(in: dir)
        let queue = DispatchQueue(label: "ahead-test")
        let persister = StatePersister(store: store, kernel: ZeroKernel(), counters: ServiceCounters(), restored: nil,
                                       aheadQueue: queue)
        persister.prepare(first)
        try persister.persist(Self.snapshot(1, adding: first))  // defers its settle 20 ms, onto `queue`
        // The queue is busy (as with a large reply being encoded) until the settle has queued
        // behind it, then the next large register's encode behind that.
        let busy = DispatchSemaphore(value: 0)
        queue.async { busy.wait() }
        usleep(100_000)
        persister.prepare(second)
        let saved = DispatchSemaphore(value: 0)
        let failure = Mutex<String?>(nil)
        let next = Self.snapshot(2, adding: second)
        Thread {
            do { try persister.persist(next) } catch { failure.withLock { $0 = "\(error)" } }
            saved.signal()
        }.start()
        usleep(50_000)  // the writer is in persist, waiting for the encode
        busy.signal()
        #expect(saved.wait(timeout: .now() + 10) == .success, "persist deadlocked")
        #expect(failure.withLock { $0 } == nil)
        try persister.sync()
        #expect(try StateStore(dir: dir + "/state").load()?.probes.count == 2400)
    }

    @Test("restore planning: a gone pid, a gone binary and another boot are degraded with reasons")
    func planner() throws {
        var state = Self.sample
        state.probes[0].spec.pid = Int32.max  // no such process
        let items = RestorePlanner.plan(state, resolver: Resolver(), bootID: "b-1")
        #expect(items.count == 2)
        #expect(items[0].degradedReason?.contains("no longer exists") == true, "\(String(describing: items[0].degradedReason))")
        #expect(items[0].baseHits == UInt64(Int64.max) + 5)
        #expect(items[1].degradedReason?.contains("no longer exists") == true || items[1].degradedReason?.contains("no target") == true)
        state.probes[0].spec.pid = getpid()
        let other = RestorePlanner.plan(state, resolver: Resolver(), bootID: "b-2")
        #expect(other[0].degradedReason?.contains("earlier boot") == true)
    }

    @Test("restore planning: the functions of a saved glob, each resolved apart, come back sharing one file object and one names buffer, their names and offsets unchanged")
    func restoreSharesFiles() throws {
        let lib = "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0"
        let glob = try Resolver().resolution(ProbeSpecInput(path: lib, symbol: "sqlite3_*")).probes
        try #require(glob.count > 100, "libsqlite3 exports its API")
        // As the state file gives them back: each its own target, spec naming its function.
        let probes = glob.enumerated().map { n, t in
            SavedProbe(id: "p\(n + 1)", consumer: "ci", owner: Peer(pid: 1, uid: 0, gid: 0),
                       spec: ProbeSpecInput(path: lib, symbol: t.symbol), registeredAt: 1, hits: UInt64(n),
                       targets: [ResolvedProbe(path: t.path, device: t.device, inode: t.inode, buildID: t.buildID,
                                               fileOffset: t.fileOffset, symbol: t.symbol)],
                       stamp: fileStamp(t.path), pidStartTime: nil, degradedReason: nil)
        }
        let items = RestorePlanner.plan(SavedState(bootID: "b-1", savedAt: 1, probes: probes), resolver: Resolver(), bootID: "b-1")
        #expect(items.count == glob.count)
        #expect(items.allSatisfy { $0.degradedReason == nil && $0.targets.count == 1 })
        #expect(Set(items.compactMap { $0.targets.first.map { ObjectIdentifier($0.file) } }).count == 1)
        #expect(Set(items.compactMap { $0.targets.first?.file.names.map(ObjectIdentifier.init) }).count == 1)
        for (item, t) in zip(items, glob) {
            #expect(item.targets.first?.symbol == t.symbol && item.targets.first?.fileOffset == t.fileOffset)
        }
    }

    @Test("an ended registration round-trips as ended and comes back ended, never resolved or attached again")
    func endedStaysEnded() throws {
        var state = Self.sample
        state.probes[0].spec.pid = getpid()  // alive and the same process: without the end it would attach
        state.probes[0].pidStartTime = processStartTime(getpid())
        state.probes[0].endedReason = "process 42 is no longer uid 1000's (…)"
        #expect(try StateCodec.decode(StateCodec.encode(state)) == state)
        let items = RestorePlanner.plan(state, resolver: Resolver(), bootID: "b-1")
        #expect(items[0].ended && items[0].degradedReason == state.probes[0].endedReason)
        #expect(items[0].baseHits == state.probes[0].hits)
        #expect(!items[1].ended, "degraded stays degraded: decided afresh at every start")
    }

    @Test("restore planning asks the ownership rule about a live pid filter: a process no longer its owner's comes back ended")
    func plannerOwnership() throws {
        let spec = ProbeSpecInput(path: "libc.so.6", symbol: "getpid", pid: getpid())
        var state = Self.sample
        state.probes = [state.probes[0]]
        state.probes[0].spec = spec
        state.probes[0].targets = try Resolver().resolve(spec)
        state.probes[0].stamp = nil
        state.probes[0].pidStartTime = processStartTime(getpid())
        let kept = RestorePlanner.plan(state, resolver: Resolver(), bootID: "b-1")
        #expect(kept[0].degradedReason == nil && !kept[0].ended, "\(String(describing: kept[0].degradedReason))")
        let ended = RestorePlanner.plan(state, resolver: Resolver(), bootID: "b-1", ownership: { _, pid in
            pid == getpid() ? "not yours" : nil
        })
        #expect(ended[0].ended && ended[0].degradedReason == "not yours")
        // The rule as the daemon builds it: root's probes are never judged; a gone process is
        // the start-time check's business.
        let check = RestorePlanner.ownershipCheck(policy: AccessPolicy(config: DaemonConfig()))
        var p = state.probes[0]
        p.owner = Peer(pid: 1, uid: 0, gid: 0)
        #expect(check(p, 1) == nil)
        p.owner = Peer(pid: 1, uid: 4242, gid: 4242)
        #expect(check(p, 1)?.contains("process 1 is no longer uid 4242's") == true)
        #expect(check(p, Int32.max) == nil)
    }

    @Test("process start time reads field 22 of /proc/PID/stat")
    func startTime() {
        #expect(processStartTime(getpid()) != nil)
        #expect(processStartTime(Int32.max) == nil)
    }
}

struct AccessPolicyTests {
    func who(_ uid: UInt32, _ gid: UInt32 = 100, groups: [UInt32] = []) -> PeerIdentity {
        PeerIdentity(peer: Peer(pid: 1, uid: uid, gid: gid), supplementaryGroups: groups)
    }

    @Test("roles: root is admin; uid and group lists grant admin/register/read; * is everyone; others get none")
    func roles() {
        var c = DaemonConfig()
        c.adminUsers = ["1001"]; c.adminGroups = ["501"]
        c.registerUsers = ["1002"]; c.registerGroups = ["502"]
        c.readUsers = ["1003"]; c.readGroups = ["503"]
        let p = AccessPolicy(config: c)
        #expect(p.role(of: who(0)) == .admin)
        #expect(p.role(of: who(1001)) == .admin)
        #expect(p.role(of: who(2000, groups: [7, 501])) == .admin)
        #expect(p.role(of: who(1002)) == .register)
        #expect(p.role(of: who(2000, 502)) == .register, "primary gid counts")
        #expect(p.role(of: who(1003)) == .read)
        #expect(p.role(of: who(2000, groups: [503])) == .read)
        #expect(p.role(of: who(2000)) == .none)
        #expect(p.role(of: who(2000, groups: [4])) == .none)
        // The defaults: anyone who can connect may read, nobody else may register.
        let d = AccessPolicy(config: DaemonConfig())
        #expect(d.role(of: who(4242)) == .read)
        #expect(d.role(of: who(0)) == .admin)
    }

    @Test("names resolve through passwd/group; unknown names match nobody and are reported")
    func names() {
        var c = DaemonConfig()
        c.adminUsers = ["root", "no-such-user-xyz"]
        c.readGroups = ["root"]
        let p = AccessPolicy(config: c)
        #expect(p.warnings.count == 1 && p.warnings[0].contains("no-such-user-xyz"))
        #expect(p.role(of: who(5000, groups: [0])) == .read)
    }

    @Test("operations need their role; the denial names the keys that grant it")
    func required() {
        var c = DaemonConfig()
        c.readUsers = ["1003"]
        let p = AccessPolicy(config: c)
        #expect(AccessControl.check(who(1003), has: .read, for: "stats", policy: p) == nil)
        let e = AccessControl.check(who(1003), has: .register, for: "register", policy: p)
        #expect(e?.code == .permissionDenied)
        #expect(e?.message.contains("register_uids") == true)
    }

    @Test("readability by mode bits: owner, group (primary or supplementary), other; directory search; identity check")
    func readable() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o755)
        let file = dir + "/bin"
        try "x".write(toFile: file, atomically: true, encoding: .utf8)
        chown(file, 1234, 4321)
        chmod(file, 0o640)
        #expect(AccessControl.unreadable(path: file, device: nil, inode: nil, uid: 1234, groups: []) == nil)
        #expect(AccessControl.unreadable(path: file, device: nil, inode: nil, uid: 999, groups: [4321]) == nil)
        #expect(AccessControl.unreadable(path: file, device: nil, inode: nil, uid: 999, groups: [1]) != nil)
        chmod(file, 0o604)  // group excluded even though other may read: the kernel's rule
        #expect(AccessControl.unreadable(path: file, device: nil, inode: nil, uid: 999, groups: [4321]) != nil)
        #expect(AccessControl.unreadable(path: file, device: nil, inode: nil, uid: 999, groups: []) == nil)
        chmod(dir, 0o700)
        #expect(AccessControl.unreadable(path: file, device: nil, inode: nil, uid: 999, groups: [])?.contains("search") == true)
        chmod(dir, 0o755)
        var st = stat()
        stat(file, &st)
        #expect(AccessControl.unreadable(path: file, device: UInt64(st.st_dev), inode: UInt64(st.st_ino) + 1, uid: 999, groups: [])?.contains("changed") == true)
    }

    @Test("process ownership reads the real, effective, saved and filesystem uids")
    func ownership() {
        #expect(AccessControl.processNotOwned(pid: getpid(), uid: getuid()) == nil)
        #expect(AccessControl.processNotOwned(pid: getpid(), uid: getuid() + 1) != nil)
        #expect(AccessControl.processNotOwned(pid: Int32.max, uid: 0)?.contains("does not exist") == true)
    }
}

/// The rule of `ProcessOwnership` on /proc/PID/status text.
struct ProcessOwnershipTests {
    static func status(uid: String = "1000\t1000\t1000\t1000", gid: String = "100\t100\t100\t100",
                       prm: String = "0000000000000000", eff: String = "0000000000000000", amb: String? = "0000000000000000") -> ArraySlice<UInt8> {
        var text = "Name:\tpasswd\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t\(uid)\nGid:\t\(gid)\nGroups:\t100 \n"
        text += "CapInh:\t0000000000000000\nCapPrm:\t\(prm)\nCapEff:\t\(eff)\nCapBnd:\t000001ffffffffff\n"
        if let amb { text += "CapAmb:\t\(amb)\n" }
        return Array(text.utf8)[...]
    }

    func judge(_ bytes: ArraySlice<UInt8>, fileUID: UInt32 = 1000, uid: UInt32 = 1000, confined: Bool = false) -> ProcessOwnership.Problem? {
        guard let c = ProcessOwnership.parse(bytes, fileUID: fileUID) else { return .gone }
        return ProcessOwnership.judge(c, uid: uid, capsConfined: { confined })
    }

    @Test("owned: four equal uids, one gid, no capabilities, dumpable (status file owned by the uid)")
    func owned() {
        #expect(judge(Self.status()) == nil)
        #expect(judge(Self.status(amb: nil)) == nil, "kernels without CapAmb")
    }

    @Test("a setuid exec (uids), a setgid exec (gids), file capabilities, and undumpability each fail, with what was seen")
    func notOwned() {
        #expect(judge(Self.status(uid: "1000\t0\t0\t0")) == .uids([1000, 0, 0, 0]))
        #expect(judge(Self.status(uid: "1000\t1000\t1000\t0")) == .uids([1000, 1000, 1000, 0]), "fsuid counts")
        #expect(judge(Self.status(gid: "100\t42\t42\t42")) == .gids([100, 42, 42, 42]))
        #expect(judge(Self.status(prm: "0000000000002000")) == .capabilities(permitted: 0x2000, effective: 0, ambient: 0))
        #expect(judge(Self.status(amb: "0000000000000400")) == .capabilities(permitted: 0, effective: 0, ambient: 0x400))
        #expect(judge(Self.status(), fileUID: 0) == .notDumpable)
        #expect(ProcessOwnership.Problem.uids([1000, 0, 0, 0]).detail == "uids 1000 0 0 0")
        #expect(ProcessOwnership.Problem.capabilities(permitted: 0x2000, effective: 0, ambient: 0).detail
                == "capabilities CapPrm 0000000000002000 CapEff 0000000000000000 CapAmb 0000000000000000")
    }

    @Test("capabilities held inside a user namespace the owner created do not count; root's own never do")
    func capabilityExceptions() {
        #expect(judge(Self.status(prm: "000001ffffffffff", eff: "000001ffffffffff"), confined: true) == nil)
        #expect(judge(Self.status(uid: "0\t0\t0\t0", gid: "0\t0\t0\t0", prm: "000001ffffffffff"), fileUID: 0, uid: 0) == nil)
    }

    @Test("status text missing a line the rule needs is not read as owned")
    func malformed() {
        #expect(ProcessOwnership.parse(Array("Name:\tx\nUid:\t1\t1\t1\t1\n".utf8)[...], fileUID: 1) == nil)
    }

    @Test("this test process (root) is root's; the daemon's user database gives a user's groups")
    func live() {
        #expect(ProcessOwnership.problem(pid: getpid(), uid: 0) == nil)
        #expect(ProcessOwnership.problem(pid: Int32.max, uid: 0) == .gone)
        #expect(OwnershipWatcher.groups(of: 0, primary: 0).contains(0))
        #expect(OwnershipWatcher.groups(of: 4_000_000_123, primary: 77) == [77], "a uid the database does not know")
    }
}

/// The path watcher's /proc readers.
struct PathWatcherTests {
    @Test("/proc/*/maps scanning finds this test's own executable by device and inode")
    func mappedFilesSeeOwnExecutable() {
        var st = stat()
        #expect(stat("/proc/self/exe", &st) == 0)
        let key = PathWatcher.mapsKey(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        #expect(PathWatcher.mappedFiles().contains(key), "\(key)")
    }

    @Test("process start times: this process has one; a pid that does not exist has none")
    func processStart() {
        #expect(PathWatcher.processStart(getpid()) != nil)
        #expect(PathWatcher.processStart(Int32.max) == nil)
    }

    @Test("the follow spec field round-trips: default true and omitted on the wire, false kept")
    func followField() throws {
        let d = try ProbeSpec(json: .object(["path": "/bin/x", "symbol": "f"]), context: "p")
        #expect(d.follow && d.json.objectValue?["follow"] == nil)
        let pinned = try ProbeSpec(json: .object(["path": "/bin/x", "symbol": "f", "follow": false]), context: "p")
        #expect(!pinned.follow && pinned.json.objectValue?["follow"] == .bool(false))
        #expect(RequestHandler.input(pinned).follow == false)
        #expect(throws: ProtocolError.self) { try ProbeSpec(json: .object(["path": "/bin/x", "symbol": "f", "follow": 1]), context: "p") }
    }
}

extension RegistrySnapshot {
    /// Makes this the snapshot of the next batch, one that registered `records`.
    mutating func add(_ records: [ProbeRecord], generation: UInt64) {
        self.generation = generation
        batchAdded = records
        for r in records { probes.insert(r) }
    }
}
