import Foundation
import Testing
@testable import UprobeCore
@testable import UprobedServer

/// A full disk under the state directory: the space reserve keeps removals durable, and what is
/// not on disk is known (`status`, the log line of a failed final save).
struct StateSpaceTests {
    @Test("reserve sizing: the removal line of a 10,000-id unregister, measured, fits nine times in the reserve (scattered ids, the longest line; consecutive ones are one range)")
    func reserveSize() {
        let ids = stride(from: 1_000_000, to: 1_020_000, by: 2).map { ProbeID.make(UInt64($0)) }
        let line = StateCodec.encodeLogEntry(seq: 1_234_567, add: [], remove: ids)
        #expect(line.count == 80_031, "a scattered removal costs 8 bytes per 7-digit id; update SpaceReserve.defaultBytes' comment")
        #expect(line.count * 9 <= SpaceReserve.defaultBytes)
        let consecutive = (1_000_000..<1_010_000).map { ProbeID.make(UInt64($0)) }
        #expect(StateCodec.encodeLogEntry(seq: 1_234_567, add: [], remove: consecutive).count < 64)
        let back = try? StateCodec.replay(StateCodec.encodeLogEntry(seq: 1, add: [], remove: ids + consecutive + ["custom"]),
                                          onto: SavedState(bootID: nil, savedAt: 0, probes: (ids + consecutive + ["custom", "p1"]).map {
                                              var p = StateFileTests.rowProbe(1); p.id = $0; return p }))
        #expect(back?.probes.map(\.id) == ["p1"], "every removed id, ranges, lone ids and others, is removed")
    }

    /// A tmpfs of `size` on a fresh directory; the caller unmounts it (`unmount`).
    static func mountTmpfs(size: String) throws -> String {
        let dir = try StateFileTests.tempDir()
        guard mount("tmpfs", dir, "tmpfs", 0, "size=\(size),mode=0700") == 0 else {
            throw StateError(code: .stateIO, message: "mount tmpfs on \(dir): \(String(cString: strerror(errno)))")
        }
        return dir
    }

    static func unmount(_ dir: String) {
        umount2(dir, Int32(MNT_DETACH))
        rmdir(dir)
    }

    /// Writes DIR/filler until the file system is full.
    static func fill(_ dir: String) {
        let fd = open(dir + "/filler", O_WRONLY | O_CREAT | O_APPEND, 0o600)
        defer { close(fd) }
        let chunk = [UInt8](repeating: 1, count: 64 << 10)
        for size in [64 << 10, 4096, 1] {
            while chunk.withUnsafeBytes({ write(fd, $0.baseAddress, size) }) > 0 {}
        }
    }

    static func isDiskFull(_ body: () throws -> Void) -> Bool {
        do {
            try body()
            return false
        } catch let e as StateError {
            return e.isDiskFull
        } catch {
            return false
        }
    }

    @Test("on a full disk a removal line takes the reserve and is written; a line that only adds, or a snapshot larger than the room it would make, leaves the reserve alone; the reserve comes back once there is space", .enabled(if: geteuid() == 0, "mounts a tmpfs"))
    func fullDisk() throws {
        let mnt = try Self.mountTmpfs(size: "3m")
        defer { Self.unmount(mnt) }
        let store = StateStore(dir: mnt + "/state")
        try store.prepare()
        var st = stat()
        #expect(store.reserve.heldBytes == SpaceReserve.defaultBytes)
        #expect(stat(store.reserve.path, &st) == 0 && Int(st.st_blocks) * 512 >= SpaceReserve.defaultBytes, "its blocks are allocated")
        let probe = StateFileTests.sampleProbes[0]  // aliases: written in full, ~400 bytes
        func probes(_ numbers: Range<Int>) -> [SavedProbe] { numbers.map { var p = probe; p.id = "p\($0)"; return p } }
        try store.append(StateCodec.encodeLogEntry(seq: 1, add: probes(100..<140), remove: []))
        Self.fill(mnt)

        // Each line needs pages of its own (more than 4 KiB).
        #expect(Self.isDiskFull { try store.append(StateCodec.encodeLogEntry(seq: 2, add: probes(200..<240), remove: [])) })
        #expect(store.reserve.heldBytes == SpaceReserve.defaultBytes, "an add-only line does not take the reserve")
        let removal = StateCodec.encodeLogEntry(seq: 2, add: [], remove: probes(100..<140).map(\.id) + stride(from: 1000, to: 3000, by: 2).map { "p\($0)" })
        #expect(removal.count > 4096)
        try store.append(removal, useReserve: true)
        #expect(store.reserve.heldBytes == 0 && access(store.reserve.path, F_OK) != 0)
        #expect(try store.load()?.probes.isEmpty == true, "the removal is on disk")

        // Space again: the next write makes the reserve again.
        unlink(mnt + "/filler")
        try store.append(StateCodec.encodeLogEntry(seq: 3, add: probes(300..<301), remove: []))
        #expect(store.reserve.heldBytes == SpaceReserve.defaultBytes)

        // Snapshots: one the reserve cannot make room for fails and leaves it; a small one takes it.
        Self.fill(mnt)
        var big = SavedState(bootID: nil, savedAt: 1, probes: probes(10_000..<14_000))
        big.seq = 4
        #expect(StateCodec.encode(big).count > SpaceReserve.defaultBytes)
        #expect(Self.isDiskFull { try store.write(big) })
        #expect(store.reserve.heldBytes == SpaceReserve.defaultBytes)
        #expect(access(store.dir + "/state.json.tmp", F_OK) != 0, "no partial snapshot left taking space")
        var small = SavedState(bootID: nil, savedAt: 1, probes: probes(300..<301))
        small.seq = 4
        small.nextID = 301
        try store.write(small)
        #expect(store.reserve.heldBytes == 0)
        #expect(try store.load() == small)
    }

    @Test("removals not on disk are counted (status) and named (a failed final save): a failed append, a failed fsync of their line; a snapshot or the rewrite saves them")
    func unsavedRemovals() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = try StateFileTests.stampableFile(in: dir)
        let store = try StateFileTests.preparedStore(in: dir)
        let counters = ServiceCounters()
        let p = StatePersister(store: store, kernel: StateFileTests.ZeroKernel(), counters: counters, restored: nil)
        #expect(counters.stateReserveBytes.load(ordering: .relaxed) == SpaceReserve.defaultBytes)
        var snap = RegistrySnapshot()
        snap.add(StateFileTests.records(1..<6, path: binary), generation: 1)
        try p.persist(snap)
        try p.sync()
        #expect(p.unsaved(snap).removals.isEmpty && p.unsaved(snap).registrations.isEmpty)
        func remove(_ ids: [String], generation: UInt64) {
            for id in ids { _ = snap.probes.remove(id) }
            snap.generation = generation
            snap.batchAdded = []
            snap.batchRemoved = ids
        }
        func unsavedCount() -> Int { counters.stateUnsavedRemovals.load(ordering: .relaxed) }
        // The log cannot be opened: a directory in its place (root ignores modes).
        func breakLog() throws {
            #expect(rename(store.logPath, store.logPath + ".aside") == 0)
            try FileManager.default.createDirectory(atPath: store.logPath, withIntermediateDirectories: false)
        }
        func repairLog() throws {
            try FileManager.default.removeItem(atPath: store.logPath)
            #expect(rename(store.logPath + ".aside", store.logPath) == 0)
        }

        // The append fails.
        try breakLog()
        remove(["p1"], generation: 2)
        #expect(throws: StateError.self) { try p.persist(snap) }
        try repairLog()
        #expect(unsavedCount() == 1 && p.unsaved(snap).removals == ["p1"])
        // A checkpoint saves the registry without it.
        try p.checkpoint(snap)
        #expect(unsavedCount() == 0 && p.unsaved(snap).removals.isEmpty)
        #expect(try StateStore(dir: store.dir).load()?.probes.map(\.id) == ["p2", "p3", "p4", "p5"])

        // The append works, its fsync fails: the line may be lost.
        remove(["p2", "p3"], generation: 3)
        try p.persist(snap)
        try breakLog()
        #expect(throws: StateError.self) { try p.sync() }
        try repairLog()
        #expect(unsavedCount() == 2 && p.unsaved(snap).removals.sorted() == ["p2", "p3"])
        let told = p.unsaved(snap).describe(now: clockRealtime())
        #expect(told.contains("2 unregistered probe(s) are still in the state files and will come back at the next start (p2,p3)"), "\(told)")
        #expect(told.contains("hit counts"))
        // The next change rewrites the snapshot, which leaves them out.
        snap.add(StateFileTests.records(6..<7, path: binary), generation: 4)
        snap.batchRemoved = []
        try p.persist(snap)
        #expect(unsavedCount() == 0 && p.unsaved(snap).removals.isEmpty)
        #expect(try StateStore(dir: store.dir).load()?.probes.map(\.id) == ["p4", "p5", "p6"])
    }

    @Test("the account of a failed final save: removals that come back, registrations that are missing, ids up to 20, hit counts since the snapshot")
    func unsavedDescription() {
        let none = UnsavedChanges(removals: [], registrations: [], snapshotAt: 1000)
        #expect(none.describe(now: 1090) == "every registration and removal is on disk; hit counts (and degraded or ended states) since the last snapshot, written 90 s ago, are lost")
        let many = UnsavedChanges(removals: (1...25).map { "p\($0)" }, registrations: ["p40"], snapshotAt: nil)
        let text = many.describe(now: 0)
        #expect(text.contains("25 unregistered probe(s) are still in the state files and will come back at the next start (p1,p2,"))
        #expect(text.contains("p20,… (5 more))"))
        #expect(text.contains("1 registered probe(s) are in no state file and will be missing after the next start (p40)"))
        #expect(text.contains("there is no snapshot"))
    }
}
