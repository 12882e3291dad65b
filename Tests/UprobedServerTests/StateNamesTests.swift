import Foundation
import Testing
@testable import UprobeCore
import UprobeELF
import UprobedProtocol
@testable import UprobedServer
import Synchronization

/// Names files (format 5): a glob group's function names kept beside the state, its log line
/// and snapshot element carrying only offsets.
struct StateNamesTests {
    static let identity = NameIdentity(path: "/bin/m", device: 3, inode: 4, size: 99, mtimeNanos: 42, buildID: "beef")

    /// A glob's registrations on /bin/m (rowProbe's file and stamp), one with aliases.
    static func globProbes(_ numbers: ClosedRange<Int>) -> [SavedProbe] {
        numbers.map { n in
            var p = StateFileTests.rowProbe(n)
            p.spec.symbol = "g*"
            p.slots = [UInt32(n)]
            p.hits = UInt64(n * 3)
            if n == numbers.lowerBound + 1 { p.targets[0].aliases = ["alias_\(n)", "other_\(n)"] }
            return p
        }
    }

    static func table(_ n: Int) -> NameTable {
        var t = NameTable(identity: identity)
        for k in 0..<n {
            t.offsets.append(UInt64(0x1000 + k))
            t.symbols.append("$s4main\(k)yyF\(String(repeating: "x", count: k % 7))")
            if k % 5 == 1 { t.aliases[k] = ["a\(k)", "b\(k)"] }
        }
        return t
    }

    @Test("a names file decodes to the table it was made from; its checksum is the same however the bytes are cut; the same names make the same file name")
    func tableRoundTrip() throws {
        let t = Self.table(1000)
        let (bytes, name) = t.encode()
        #expect(try NameTable.decode(bytes) == t)
        #expect(name == NameTable.fileName(t.checksum()) && name.hasPrefix("names-") && name.hasSuffix(".bin"))
        #expect(Self.table(1000).encode().name == name)
        var other = t
        other.symbols[500] += "_"
        #expect(other.encode().name != name, "another name, another file")
        var moved = t
        moved.identity.inode = 5
        #expect(moved.encode().name != name, "another binary, another file")
        // The checksum of a stream cut at every size is the checksum of the whole.
        let body = Array(bytes.dropLast(8))
        for cut in [1, 3, 7, 8, 13, 4096] {
            var c = NameChecksum()
            var i = 0
            while i < body.count {
                let end = min(body.count, i + cut)
                body[i..<end].withUnsafeBytes { c.add($0) }
                i = end
            }
            #expect(c.value == t.checksum(), "pieces of \(cut)")
        }
    }

    @Test("a damaged names file is refused with what is wrong: cut short, a flipped bit, another file, trailing bytes")
    func damagedTable() throws {
        let (bytes, _) = Self.table(50).encode()
        var flipped = bytes
        flipped[bytes.count / 2] ^= 0x10
        var foreign = bytes
        foreign[0] = UInt8(ascii: "X")
        for (what, bad) in [("cut", Array(bytes.prefix(bytes.count - 20))), ("flipped", flipped), ("foreign", foreign),
                            ("empty", [UInt8]()), ("trailing", bytes + [0])] {
            #expect(throws: NameTable.Damage.self, "\(what)") { try NameTable.decode(bad) }
        }
    }

    @Test("a glob group's names go to a names file and its element names it; a group of named functions keeps its symbols; loading gives every member back exactly")
    func groupWithNamesFile() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = StateStore(dir: dir, logger: nil, recoverNames: { _, _ in nil })
        let globs = Self.globProbes(1...40)
        let named = (100...105).map { StateFileTests.rowProbe($0) }  // each its own symbol
        var state = SavedState(bootID: nil, savedAt: 1, probes: globs + named)
        state.seq = 3
        let used = try store.write(state)
        #expect(used.count == 1)
        let text = try String(contentsOfFile: store.path, encoding: .utf8)
        #expect(text.contains(#""names":"\#(used.first ?? "")""#) && !text.contains(#""g2""#) && !text.contains("alias_2"),
                "the glob's names are not in the snapshot")
        #expect(text.contains(#""symbols":["g100","g101""#), "named functions stay inline")
        #expect(FileManager.default.fileExists(atPath: dir + "/names/" + (used.first ?? "")))
        let back = try #require(try store.load())
        #expect(back.probes == state.probes && !back.namesRepairDue)
        // Written again (the same registrations): the same file, not a second one.
        #expect(try store.write(state) == used)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/names") == Array(used))
    }

    @Test("without its names file, a group's names come from the binary when it is still theirs; otherwise the registrations load without names, all of them, with the reason")
    func missingNamesFile() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let globs = Self.globProbes(1...10)
        var state = SavedState(bootID: nil, savedAt: 1, probes: globs)
        state.seq = 1
        let writer = StateStore(dir: dir, logger: nil, recoverNames: { _, _ in nil })
        let used = try #require(try writer.write(state).first)
        let file = dir + "/names/" + used
        var bytes = try #require(FileManager.default.contents(atPath: file))
        bytes[bytes.count / 2] ^= 1
        try bytes.write(to: URL(fileURLWithPath: file))

        // The binary is still theirs: the recovery gives each offset its name (and aliases).
        let asked = Mutex<[NameIdentity]>([])
        let fromBinary = StateStore(dir: dir, logger: nil, recoverNames: { id, spec in
            asked.withLock { $0.append(id) }
            guard spec.symbol == "g*" else { return nil }
            var names: NameFiles.Names = [:]
            for p in globs { names[p.targets[0].fileOffset] = (p.targets[0].symbol ?? "", p.targets[0].aliases) }
            return names
        })
        let recovered = try #require(try fromBinary.load())
        #expect(recovered.probes == globs && recovered.namesRepairDue)
        #expect(asked.withLock { $0 } == [Self.identity], "asked once, for the group's file")

        // Not theirs any more: every registration is there, with ids, offsets, slots and hits,
        // without names, saying why.
        let lost = try #require(try StateStore(dir: dir, logger: nil, recoverNames: { _, _ in nil }).load())
        #expect(lost.probes.count == globs.count && lost.namesRepairDue)
        for (p, q) in zip(lost.probes, globs) {
            #expect(p.id == q.id && p.targets[0].fileOffset == q.targets[0].fileOffset && p.slots == q.slots && p.hits == q.hits)
            #expect(p.targets[0].symbol == nil && p.nameFile == nil)
            #expect(p.unknownNames?.contains("is damaged: its checksum does not match") == true, "\(p.unknownNames ?? "")")
        }
        // Written again, they are full entries without a symbol (not a group of empty names), and load as they are.
        let rewritten = StateStore(dir: dir, logger: nil, recoverNames: { _, _ in nil })
        var again = lost
        again.probes = lost.probes.map { var p = $0; p.unknownNames = nil; return p }
        try rewritten.write(again)
        let reread = try #require(try rewritten.load())
        #expect(reread.probes == again.probes)

        // A state file naming something that is not a names file is not read.
        let text = try String(contentsOfFile: writer.path, encoding: .utf8)
        #expect(!text.contains("../"))
        var names = NameFiles(stateDir: dir)
        if case .success = names.read("../state.json") { Issue.record("read a path outside the names directory") }
        names = NameFiles(stateDir: dir)
        if case .success = names.read("names-0000000000000000.bin") { Issue.record("read a missing file") }
    }

    @Test("records encoded ahead with names files are the same bytes as their saved forms encoded with names files, and name the same file")
    func recordsWithNames() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let files = NameFiles(stateDir: dir)
        func record(_ n: UInt64, aliases: [String] = []) -> ProbeRecord {
            let target = ResolvedProbe(path: "/bin/m", device: 3, inode: 4, buildID: "beef", fileOffset: 0x1000 + n,
                                       symbol: "f\(n)", aliases: aliases, refCtrOffset: nil)
            return ProbeRecord(id: ProbeID.make(n), consumer: "c", owner: Peer(pid: 5, uid: 0, gid: 0),
                               spec: ProbeSpecInput(path: "/bin/m", symbol: "f*"),
                               sites: [ProbeSite(target: target, slot: UInt32(n))], registeredAt: 7.5, registeredAtMonotonic: .now,
                               state: .active, baseHits: 0, targets: [target])
        }
        let records = (1...30).map { record($0, aliases: $0 == 4 ? ["x4"] : []) }
        let stamps = records.map { _ in ProbeStamps(file: FileStamp(device: 3, inode: 4, size: 1, mtimeNanos: 2), processStart: nil) }
        let a = NameRefs(files), b = NameRefs(files)
        let direct = StateCodec.encodeElements(records: records, stamps: stamps, names: a)
        var w = JSONWriter()
        w.beginArray()
        _ = w.flush()
        StateCodec.writeProbes(zip(records, stamps).map { SavedProbe($0, hits: $0.baseHits, stamps: $1) }, names: b, into: &w)
        let saved = w.flush()
        #expect(direct == saved, "\(String(decoding: direct, as: UTF8.self))")
        #expect(a.used == b.used && a.used.count == 1)
        #expect(!String(decoding: direct, as: UTF8.self).contains("\"f7\""))

        // The same glob registered again (new records, same binary, spec and offsets) finds its
        // names file by their layout; a names file deleted by hand is written again.
        let name = try #require(a.used.first)
        let again = (1...30).map { record($0, aliases: $0 == 4 ? ["x4"] : []) }
        let c = NameRefs(files)
        #expect(StateCodec.encodeElements(records: again, stamps: stamps, names: c) == direct && c.used == [name])
        try FileManager.default.removeItem(atPath: files.dir + "/" + name)
        let d = NameRefs(files)
        #expect(StateCodec.encodeElements(records: again, stamps: stamps, names: d) == direct && d.used == [name])
        #expect(FileManager.default.fileExists(atPath: files.dir + "/" + name), "written again")
    }

    @Test("collect removes the names files nothing refers to and keeps the ones stored recently")
    func collect() throws {
        let dir = try StateFileTests.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let files = NameFiles(stateDir: dir)
        let kept = try #require(files.store(Self.table(10)))
        let recent = try #require(files.store(Self.table(11)))
        // An old one (another daemon's, before a restart) that nothing refers to.
        let (oldBytes, oldName) = Self.table(12).encode()
        try Data(oldBytes).write(to: URL(fileURLWithPath: files.dir + "/" + oldName))
        files.collect(keep: [kept])
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: files.dir))
        #expect(left == [kept, recent])
    }
}
