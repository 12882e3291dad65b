import Foundation
import Synchronization
import UprobeELF
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// The names files of a state directory (`DIR/names/`, see `NameTable`): where a glob group's
/// function names are kept so that its log line and snapshot element carry only offsets.
///
/// Durability: a names file is written and fsynced (temporary name, fsync, rename, directory
/// fsync) before any line or snapshot that refers to it is appended. For a large register that
/// happens on the encode-ahead queue while the kernel attaches, so the reply does not wait
/// for it unless the attach is done first. There is therefore no moment at which a synced line
/// refers to a names file that is not on disk; what can still happen, and what a restore does:
///
/// - the names file is missing, unreadable or damaged (deleted by hand, a disk error): the names
///   are taken from the binary itself if it is still exactly the file the registrations were
///   made on (device, inode, size, mtime, build-id): resolving the group's glob again gives
///   each offset its name. The file is written again from them at the next snapshot.
/// - that, and the binary was also replaced or changed: the registrations come back, degraded
///   as they would be anyway (their binary changed), with their ids, offsets, counter slots
///   and hits, but without their function names (`SavedProbe.unknownNames` says why), so one
///   that follows its path cannot find its function in the new file. Nothing else is lost.
/// - a crash while a names file is being written leaves a `.tmp` file (removed at the next
///   `collect`) and no line that refers to it: the register had not been answered.
final class NameFiles: Sendable {
    let dir: String
    /// Names files known to be complete and durable: written here, or read and checked.
    private let known = Mutex<Set<String>>([])
    private let tmpSerial = Atomic<UInt64>(0)
    /// When each names file was last stored (written or found already there), for `collect`:
    /// a run encoded ahead refers to its names file before its line is appended.
    private let lastStored = Mutex<[String: Double]>([:])
    /// Names files by the layout of the registrations they were stored for (binary, spec,
    /// offsets: `StateCodec.storedNames`), for registrations this process resolved.
    private let byLayout = Mutex<[UInt64: String]>([:])
    /// How long after its last store a names file is kept whatever the snapshot says: longer
    /// than any attach between a run's encoding and its line.
    static let graceSeconds: Double = 600

    init(stateDir: String) { dir = stateDir + "/names" }

    /// Makes sure `table`'s names file is on disk and durable; returns its name, or nil if it
    /// could not be written (the caller then writes the names inline, as format 4 did).
    func store(_ table: NameTable) -> String? {
        let sum = table.checksum()
        let name = NameTable.fileName(sum)
        lastStored.withLock { $0[name] = Date().timeIntervalSince1970 }
        if isKnown(name) { return name }
        do throws(SyscallError) {
            try write(table, checksum: sum, as: name)
        } catch {
            return nil
        }
        known.withLock { _ = $0.insert(name) }
        return name
    }

    /// The names file stored for `layout` in this process, if it is still there (and counted
    /// as stored now, like `store`).
    func reused(layout: UInt64) -> String? {
        guard let name = byLayout.withLock({ $0[layout] }), isKnown(name) else { return nil }
        lastStored.withLock { $0[name] = Date().timeIntervalSince1970 }
        return name
    }

    /// Whether `name` was stored or read here and is still there (one access(2): a file
    /// deleted by hand is written again rather than referred to).
    private func isKnown(_ name: String) -> Bool {
        guard known.withLock({ $0.contains(name) }) else { return false }
        if access(dir + "/" + name, F_OK) == 0 { return true }
        known.withLock { _ = $0.remove(name) }
        return false
    }

    func remember(layout: UInt64, name: String) {
        byLayout.withLock { $0[layout] = name }
    }

    /// Writes `table`'s file piece by piece (`NameTable.chunks`), then its checksum.
    private func write(_ table: NameTable, checksum: UInt64, as name: String) throws(SyscallError) {
        do throws(SyscallError) { try Syscall.run("mkdir", dir) { mkdir(dir, 0o700) } } catch {
            guard error.errno == .fileExists else { throw error }
        }
        let target = dir + "/" + name
        // Unique: the snapshot thread and the encode-ahead queue may write the same file at once.
        let tmp = target + ".tmp.\(tmpSerial.add(1, ordering: .relaxed).newValue)"
        do throws(SyscallError) {
            let fd = try Syscall.run("open", tmp) { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
            defer { close(fd) }
            var failure: SyscallError?
            table.chunks { chunk in
                var off = 0
                while failure == nil, off < chunk.count {
                    do throws(SyscallError) {
                        off += try Syscall.count("write", tmp) { Glibc.write(fd, chunk.baseAddress! + off, chunk.count - off) }
                    } catch { failure = error }
                }
            }
            if let failure { throw failure }
            try withUnsafeBytes(of: checksum.littleEndian) { (b: UnsafeRawBufferPointer) throws(SyscallError) in
                var off = 0
                while off < b.count { off += try Syscall.count("write", tmp) { Glibc.write(fd, b.baseAddress! + off, b.count - off) } }
            }
            try Syscall.run("fsync", tmp) { fsync(fd) }
            try Syscall.run("rename", "\(tmp), \(target)") { rename(tmp, target) }
            let dfd = try Syscall.run("open", dir) { open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
            defer { close(dfd) }
            try Syscall.run("fsync", dir) { fsync(dfd) }
        } catch {
            unlink(tmp)
            throw error
        }
    }

    /// The names file `name`, checked; a message saying what is wrong with it otherwise.
    func read(_ name: String) -> Result<NameTable, Problem> {
        // A name this daemon makes, never a path: a state file must not point it elsewhere.
        guard name.hasPrefix("names-"), name.hasSuffix(".bin"), !name.contains("/") else {
            return .failure(Problem("\"\(name)\" is not a names file name"))
        }
        let path = dir + "/" + name
        guard let bytes = readWholeFile(path, limit: 1 << 30) else {
            return .failure(Problem("\(path) is missing or unreadable"))
        }
        do throws(NameTable.Damage) {
            let t = try NameTable.decode(bytes)
            known.withLock { _ = $0.insert(name) }
            return .success(t)
        } catch {
            return .failure(Problem("\(path) is damaged: \(error.why)"))
        }
    }

    /// Why a names file cannot be used.
    struct Problem: Error {
        let message: String
        init(_ message: String) { self.message = message }
    }

    /// The names of offsets in a binary, from wherever they can be found (`fill`).
    typealias Names = [UInt64: (symbol: String, aliases: [String])]

    /// Gives the members of loaded groups (`SavedProbe.nameFile`) their function names: from
    /// their names file, else from the binary if it is still exactly their file (`recover`).
    /// Returns one message per names file that could not be used (for the log); members left
    /// without names have `unknownNames` saying why. Never drops a registration.
    func fill(_ state: inout SavedState, source: NameSource? = nil, recover: (NameIdentity, ProbeSpecInput) -> Names?) -> [String] {
        let source = source ?? NameSource(self)
        var recovered: [NameIdentity: [ProbeSpecInput: Names?]] = [:]
        for i in state.probes.indices {
            guard let file = state.probes[i].nameFile else { continue }
            state.probes[i].nameFile = nil
            let offset = state.probes[i].targets[0].fileOffset
            if let loaded = source.loaded(file, for: state.probes[i]), let k = loaded.entry(at: offset) {
                state.probes[i].targets[0].symbol = loaded.table.symbols[k]
                state.probes[i].targets[0].aliases = loaded.table.aliases[k] ?? []
                continue
            }
            var why = source.problem(file) ?? "\(dir)/\(file) has no name for offset \(offset)"
            var found: (symbol: String, aliases: [String])?
            if let id = NameIdentity(state.probes[i]) {
                let spec = state.probes[i].spec
                let names: Names?
                if let known = recovered[id]?[spec] { names = known } else {
                    names = recover(id, spec)
                    recovered[id, default: [:]][spec] = .some(names)
                }
                found = names?[offset]
                if found == nil {
                    why += "; \(id.path) is no longer the file these registrations were made on, so the names cannot be read from it either"
                }
            }
            if let found {
                state.probes[i].targets[0].symbol = found.symbol
                state.probes[i].targets[0].aliases = found.aliases
            } else {
                state.probes[i].unknownNames = why
            }
        }
        return source.problems
    }

    /// The names of a group's members read from their binary, if it is still exactly the file
    /// they were registered on: the glob resolved again (the same resolver rules that named
    /// them), each site by offset.
    static func fromBinary(_ id: NameIdentity, _ spec: ProbeSpecInput) -> Names? {
        guard id.matchesFileNow else { return nil }
        let resolver = Resolver(limits: ResolverLimits(maxMatchesPerSpec: 1 << 20))
        guard let resolution = try? resolver.resolution(spec) else { return nil }
        var names: Names = [:]
        for t in resolution.probes {
            guard t.device == id.device, t.inode == id.inode, t.buildID == id.buildID, let s = t.symbol else { return nil }
            names[t.fileOffset] = (s, t.aliases)
        }
        return names
    }

    /// Removes the names files not in `keep` (after a snapshot is in place: the files it and
    /// the lines appended since it was taken refer to) and not stored in the last
    /// `graceSeconds` (a run encoded ahead whose line is still to come), and temporary files a
    /// crash left (older than a minute: a younger one may be in the middle of being written).
    func collect(keep: Set<String>) {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return }
        let now = Date().timeIntervalSince1970
        let recent = lastStored.withLock { stored in
            stored = stored.filter { $0.value > now - Self.graceSeconds }
            return Set(stored.keys)
        }
        for e in entries where e.hasPrefix("names-") && !keep.contains(e) && !recent.contains(e) {
            let path = dir + "/" + e
            if e.contains(".tmp") {
                var st = stat()
                guard stat(path, &st) == 0, Double(st.st_mtim.tv_sec) < now - 60 else { continue }
            } else {
                known.withLock { _ = $0.remove(e) }
                byLayout.withLock { $0 = $0.filter { $0.value != e } }
            }
            unlink(path)
        }
    }
}

/// The names files one encoding referred to (`StateCodec.writeGroup`), to keep them when
/// older ones are collected. Used by one thread at a time.
final class NameRefs {
    let files: NameFiles
    private(set) var used: Set<String> = []
    init(_ files: NameFiles) { self.files = files }

    /// `NameFiles.store`, remembering the name.
    func store(_ table: NameTable) -> String? {
        let name = files.store(table)
        if let name { used.insert(name) }
        return name
    }

    /// `NameFiles.reused`, remembering the name.
    func reused(layout: UInt64) -> String? {
        let name = files.reused(layout: layout)
        if let name { used.insert(name) }
        return name
    }
}

extension NameIdentity {
    /// The same binary: all but the path (a registration made through /proc/PID/root names
    /// the same file under another path).
    func sameFile(as o: NameIdentity) -> Bool {
        device == o.device && inode == o.inode && size == o.size && mtimeNanos == o.mtimeNanos && buildID == o.buildID
    }
}

/// A names file read at load (`NameSource`). A group's members come in the order of its
/// entries, so each is looked for at the entry after the last one found before any index is
/// made (an index of 241,000 offsets and the lookups in it were a third of naming them).
final class LoadedNames {
    let table: NameTable
    private var next = 0
    private var index: [UInt64: Int]?
    init(_ table: NameTable) { self.table = table }

    func entry(at offset: UInt64) -> Int? {
        let k: Int?
        if next < table.offsets.count, table.offsets[next] == offset {
            k = next
        } else {
            if index == nil {
                var byOffset: [UInt64: Int] = [:]
                byOffset.reserveCapacity(table.count)
                for (k, o) in table.offsets.enumerated() where byOffset[o] == nil { byOffset[o] = k }
                index = byOffset
            }
            k = index?[offset]
        }
        if let k { next = k + 1 }
        return k
    }
}

/// The names files of one load, each read once: `StateCodec.decode` and `replay` name a glob
/// group's members from it as they make them (a second pass over 241,000 registrations took
/// 120 ms of a restart), `NameFiles.fill` the ones left. Single-threaded.
final class NameSource {
    let files: NameFiles
    private var tables: [String: Result<LoadedNames, NameFiles.Problem>] = [:]
    /// A group's members are consecutive: the last file answers without hashing its name.
    private var last: (file: String, table: Result<LoadedNames, NameFiles.Problem>)?
    /// One message per names file that could not be used.
    private(set) var problems: [String] = []

    init(_ files: NameFiles) { self.files = files }

    /// The names file `file` for a group whose first member is `p`; nil if it cannot be used
    /// (`problem` says why).
    func loaded(_ file: String, for p: SavedProbe) -> LoadedNames? {
        try? table(file, p).get()
    }

    func problem(_ file: String) -> String? {
        if case .failure(let p)? = tables[file] { return p.message }
        return nil
    }

    private func table(_ file: String, _ p: SavedProbe) -> Result<LoadedNames, NameFiles.Problem> {
        if let last, last.file == file { return last.table }
        let table: Result<LoadedNames, NameFiles.Problem>
        if let known = tables[file] { table = known } else {
            table = files.read(file).flatMap { t -> Result<LoadedNames, NameFiles.Problem> in
                guard let id = NameIdentity(p), id.sameFile(as: t.identity) else {
                    return .failure(NameFiles.Problem("\(files.dir)/\(file) belongs to another binary (\(t.identity.path))"))
                }
                return .success(LoadedNames(t))
            }
            tables[file] = table
            if case .failure(let p) = table { problems.append(p.message) }
        }
        last = (file, table)
        return table
    }
}
