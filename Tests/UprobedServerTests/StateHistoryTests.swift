import Foundation
import Logging
import Testing
@testable import UprobeCore
@testable import UprobedServer

/// The state files as a history of numbered changes: a start refuses files with changes missing
/// between them (a deleted snapshot, a lost log), and nothing the daemon itself does to them
/// (snapshots beside a rotated log, failed snapshots, failed fsyncs, a crash mid-append, the
/// first start) looks like a gap.
struct StateHistoryTests {
    /// What `load` throws, or nil if it loads.
    static func loadError(_ store: StateStore) -> StateError? {
        do {
            _ = try StateStore(dir: store.dir).load()
            return nil
        } catch {
            return error
        }
    }

    static func line(_ seq: UInt64, add: [SavedProbe] = [], remove: [String] = []) -> [UInt8] {
        StateCodec.encodeLogEntry(seq: seq, add: add, remove: remove)
    }

    @Test("changes missing between the files are state_incomplete with the missing seqs: state.json deleted, a hole in the log, a log that starts past the snapshot, a hole between state.log.prev and state.log")
    func gapsAreIncomplete() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir)
        var base = StateFileTests.sample  // p3, p9
        base.seq = 5
        try store.write(base)
        var p4 = base.probes[0]
        p4.id = "p4"
        try store.append(Self.line(6, add: [p4]))
        try store.append(Self.line(7, remove: ["p3"]))
        #expect(try store.load()?.probes.map(\.id) == ["p9", "p4"])
        let snapshot = try Data(contentsOf: URL(fileURLWithPath: store.path))

        // The snapshot deleted: the log alone would start with p4 and without p9.
        unlink(store.path)
        var e = Self.loadError(store)
        #expect(e?.code.rawValue == "state_incomplete", "\(String(describing: e))")
        #expect(e?.message.contains("changes 1 to 5 are in no file") == true, "\(String(describing: e))")
        #expect(e?.message.contains("every registration made before this log began") == true)
        #expect(e?.message.contains("state.json is missing") == true)

        // The snapshot back, the log's first line lost.
        try snapshot.write(to: URL(fileURLWithPath: store.path))
        unlink(store.logPath)
        try store.append(Self.line(7, remove: ["p3"]))
        e = Self.loadError(store)
        #expect(e?.code.rawValue == "state_incomplete" && e?.message.contains("change 6 is in no file") == true, "\(String(describing: e))")

        // A hole in the middle of the log.
        unlink(store.logPath)
        try store.append(Self.line(6, add: [p4]))
        try store.append(Self.line(8, remove: ["p3"]))
        e = Self.loadError(store)
        #expect(e?.code.rawValue == "state_incomplete" && e?.message.contains("from change 6 to change 8") == true, "\(String(describing: e))")

        // Lines the snapshot covers are skipped, not checked; the first one above it must follow it.
        unlink(store.logPath)
        try store.append(Self.line(2, add: [p4]))
        try store.append(Self.line(5, remove: ["p3"]))
        try store.append(Self.line(6, remove: ["p9"]))
        #expect(try store.load()?.probes.map(\.id) == ["p3"])

        // Between state.log.prev and state.log.
        unlink(store.logPath)
        try store.append(Self.line(6, add: [p4]))
        #expect(try store.rotateLog())
        try store.append(Self.line(8, remove: ["p3"]))
        e = Self.loadError(store)
        #expect(e?.code.rawValue == "state_incomplete" && e?.message.contains("change 7 is in no file") == true, "\(String(describing: e))")

        // Without a snapshot, a first log starting at 1 is the whole history.
        unlink(store.path)
        unlink(store.previousLogPath)
        unlink(store.logPath)
        try store.append(Self.line(1, add: [p4]))
        try store.append(Self.line(2, remove: ["p4"]))
        #expect(try store.load()?.probes.isEmpty == true)
    }

    @Test("the daemon's own histories load without a gap: the first log, snapshots beside a rotated log, a failed snapshot leaving state.log.prev, a restart with it, a failed fsync and the rewrite after it")
    func noFalseGaps() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try StateFileTests.stampableFile(in: dir)
        let store = try StateFileTests.preparedStore(in: dir)
        func persister(_ restored: SavedState?) -> StatePersister {
            StatePersister(store: store, kernel: StateFileTests.ZeroKernel(), counters: ServiceCounters(), restored: restored)
        }
        var p = persister(nil)
        var snap = RegistrySnapshot()
        var next: UInt64 = 1
        var generation: UInt64 = 0
        // Adds two registrations and removes the oldest one left.
        func batch() throws {
            generation += 1
            let removed = snap.sortedProbes.prefix(1).map(\.id)
            for id in removed { _ = snap.probes.remove(id) }
            snap.add(StateFileTests.records(next..<next + 2, path: binary), generation: generation)
            snap.batchRemoved = removed
            next += 2
            try p.persist(snap)
            try p.sync()
        }
        // A start now (a crash at this point) loads exactly the registry.
        func check(_ when: String, sourceLocation: SourceLocation = #_sourceLocation) {
            do {
                let loaded = try StateStore(dir: store.dir).load()
                #expect(loaded?.probes.map(\.id) ?? [] == snap.sortedProbes.map(\.id), "\(when)", sourceLocation: sourceLocation)
            } catch {
                Issue.record("\(when): \(error)", sourceLocation: sourceLocation)
            }
        }

        // The first start: no snapshot, the log begins at 1.
        for _ in 0..<3 { try batch() }
        check("first log")
        // A checkpoint: the log moves aside, the snapshot takes its seq, the next line follows it.
        try p.checkpoint(snap)
        try batch()
        check("after a checkpoint")
        #expect(!FileManager.default.fileExists(atPath: store.previousLogPath))

        // A snapshot that fails (its temporary file cannot be made) after the log moved aside.
        try FileManager.default.createDirectory(atPath: store.dir + "/state.json.tmp", withIntermediateDirectories: false)
        try batch()
        #expect(throws: StateError.self) { try p.checkpoint(snap) }
        #expect(FileManager.default.fileExists(atPath: store.previousLogPath))
        check("a failed snapshot left state.log.prev")
        // The rewrite that is then due fails too: the batch is refused and nothing is appended.
        generation += 1
        var refused = snap
        refused.add(StateFileTests.records(next..<next + 1, path: binary), generation: generation)
        next += 1
        #expect(throws: StateError.self) { try p.persist(refused) }
        check("a failed rewrite")

        // A restart with state.log.prev still there: appends go on at the seq reached, and the
        // next snapshot cannot move the log aside (prev is taken), so it covers prev only.
        try FileManager.default.removeItem(atPath: store.dir + "/state.json.tmp")
        p = persister(try StateStore(dir: store.dir).load())
        for _ in 0..<2 { try batch() }
        check("restart with prev")
        try p.checkpoint(snap)
        #expect(!FileManager.default.fileExists(atPath: store.previousLogPath))
        #expect(FileManager.default.fileExists(atPath: store.logPath), "the log it could not move aside stays, at or below the snapshot's seq")
        check("snapshot beside a log it does not cover")
        try batch()
        check("a line after that snapshot")

        // A failed fsync: the next change rewrites the snapshot (taking a seq of its own).
        #expect(rename(store.logPath, store.logPath + ".aside") == 0)
        try FileManager.default.createDirectory(atPath: store.logPath, withIntermediateDirectories: false)
        #expect(throws: StateError.self) { try p.sync() }
        try FileManager.default.removeItem(atPath: store.logPath)
        #expect(rename(store.logPath + ".aside", store.logPath) == 0)
        try batch()
        check("the rewrite after a failed fsync")
        try batch()
        check("a line after the rewrite")
        p = persister(try StateStore(dir: store.dir).load())
        try batch()
        check("a restart after all that")
    }

    @Test("after a crash tore the last log line, the start cuts it off: the line appended next is not glued to it, and the start after that reads every line")
    func tornTailIsCut() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try StateFileTests.stampableFile(in: dir)
        let store = try StateFileTests.preparedStore(in: dir)
        var p = StatePersister(store: store, kernel: StateFileTests.ZeroKernel(), counters: ServiceCounters(), restored: nil)
        var snap = RegistrySnapshot()
        snap.add(StateFileTests.records(1..<3, path: binary), generation: 1)
        try p.persist(snap)
        try p.sync()
        // The daemon dies in the middle of its next append (never synced, never acknowledged).
        let torn = Array(Self.line(2, remove: ["p1"]).dropLast(4))
        let fd = open(store.logPath, O_WRONLY | O_APPEND)
        _ = torn.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)

        let restored = try UprobedService.loadState(StateStore(dir: store.dir), moveCorrupt: false, logger: Logger(label: "test"))
        #expect(restored?.probes.map(\.id) == ["p1", "p2"])
        p = StatePersister(store: store, kernel: StateFileTests.ZeroKernel(), counters: ServiceCounters(), restored: restored)
        snap.add(StateFileTests.records(3..<4, path: binary), generation: 2)
        try p.persist(snap)
        try p.sync()
        #expect(try StateStore(dir: store.dir).load()?.probes.map(\.id) == ["p1", "p2", "p3"])
    }
}

/// The persister's memo: ids as ranges of their numbers, stamps kept once per distinct value.
struct PersisterMemoTests {
    @Test("ProbeIDSet: p<N> ids and other ids, inserted, removed from the middle of a range, counted")
    func idSet() {
        var s = ProbeIDSet((1...1000).map { ProbeID.make(UInt64($0)) } + ["custom", "p007"])
        #expect(s.count == 1002 && s.contains("p1") && s.contains("p1000") && s.contains("custom") && s.contains("p007"))
        #expect(!s.contains("p0") && !s.contains("p1001") && !s.contains("p7x"))
        s.subtract(["p500", "p1", "custom", "p99999"])
        #expect(s.count == 999 && !s.contains("p500") && s.contains("p499") && s.contains("p501") && !s.contains("custom"))
        s.insert("p500")
        #expect(s.count == 1000 && s.contains("p500"))
        s.formUnion(["p18446744073709551615"])   // beyond Int: kept as a string
        #expect(s.contains("p18446744073709551615") && s.count == 1001)
    }

    @Test("StampBook: each id's stamps read back, shared values stored once, removal, keeping only live ids")
    func stampBook() {
        let a = ProbeStamps(file: FileStamp(device: 1, inode: 2, size: 3, mtimeNanos: 4), processStart: nil)
        let b = ProbeStamps(file: nil, processStart: 77)
        var book = StampBook()
        for n in 1...100 { book[ProbeID.make(UInt64(n))] = n % 10 == 0 ? b : a }
        book["custom"] = b
        #expect(book.count == 101 && book["p3"] == a && book["p10"] == b && book["custom"] == b && book["p101"] == nil)
        book.remove("p3")
        book["p4"] = nil
        #expect(book["p3"] == nil && book["p4"] == nil && book.count == 99)
        let kept = book.keeping(ProbeIDSet(["p10", "p11", "custom", "p3"]))
        #expect(kept.count == 3 && kept["p10"] == b && kept["p11"] == a && kept["custom"] == b && kept["p12"] == nil)

        // Runs: 241,362 consecutive ids with one stamp, removed together, in parts, or one by one
        // from the middle; every other id reads back as it was set.
        var big = StampBook()
        for n in 1...241_362 { big[ProbeID.make(UInt64(n))] = a }
        big["p500000"] = b
        #expect(big.count == 241_363 && big["p1"] == a && big["p241362"] == a && big["p241363"] == nil && big["p500000"] == b)
        big.remove((1000...2000).map { ProbeID.make(UInt64($0)) } + ["p5", "p7", "custom"])
        #expect(big.count == 241_363 - 1001 - 2)
        #expect(big["p999"] == a && big["p1000"] == nil && big["p2000"] == nil && big["p2001"] == a && big["p5"] == nil && big["p6"] == a)
        big["p6"] = b    // a stamp changed in the middle of a run
        #expect(big["p6"] == b && big["p4"] == a && big["p8"] == a)
        big["p5"] = b    // joins p6's
        big["p7"] = a    // joins p8's
        #expect(big["p5"] == b && big["p7"] == a && big.count == 241_363 - 1001)
        big.remove((1...241_362).map { ProbeID.make(UInt64($0)) })
        #expect(big.count == 1 && big["p500000"] == b && big["p3"] == nil)
        var ids = ProbeIDSet((1...10).map { ProbeID.make(UInt64($0)) })
        ids.subtract(["p3", "p4", "p5", "p9", "x"])
        #expect(ids.count == 6 && ids.contains("p2") && !ids.contains("p4") && ids.contains("p6") && !ids.contains("p9") && ids.contains("p10"))
    }
}
